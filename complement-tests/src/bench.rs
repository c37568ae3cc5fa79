//! What the benchmark programs (`src/bin/*-bench.rs`) share: order statistics of a sample
//! of milliseconds and the rounding of the figures they print.

use std::time::Duration;

use serde_json::{json, Value};

/// Order statistics (nearest rank) of a sample in milliseconds; `NaN` for an empty one.
pub struct Stats {
    pub n: usize,
    pub min: f64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Stats {
    pub fn new(mut v: Vec<f64>) -> Self {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let pct = |p: f64| -> f64 {
            if n == 0 {
                return f64::NAN;
            }
            let rank = ((p / 100.0) * n as f64).ceil() as usize;
            v[rank.clamp(1, n) - 1]
        };
        Stats {
            n,
            min: v.first().copied().unwrap_or(f64::NAN),
            p50: pct(50.0),
            p99: pct(99.0),
            max: v.last().copied().unwrap_or(f64::NAN),
            mean: if n == 0 {
                f64::NAN
            } else {
                v.iter().sum::<f64>() / n as f64
            },
        }
    }

    pub fn json(&self) -> Value {
        json!({
            "n": self.n,
            "min_ms": round3(self.min),
            "p50_ms": round3(self.p50),
            "p99_ms": round3(self.p99),
            "max_ms": round3(self.max),
            "mean_ms": round3(self.mean),
        })
    }
}

/// `x` to three decimals.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// A duration in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
