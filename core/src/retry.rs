//! Retrying deliveries to other hosts (federation transactions, push gateways).

use rand::Rng;

/// First retry after this, doubling per failure up to [`MAX_BACKOFF_MS`].
pub const MIN_BACKOFF_MS: i64 = 1_000;
pub const MAX_BACKOFF_MS: i64 = 60 * 60 * 1000;

/// How long to wait after `failures` consecutive failures: exponential back-off from
/// [`MIN_BACKOFF_MS`] to [`MAX_BACKOFF_MS`], with ±25% jitter so that many retries do not
/// fall on the same instant.
pub fn backoff_ms(failures: i64) -> i64 {
    let base = MIN_BACKOFF_MS
        .saturating_mul(1i64 << failures.clamp(1, 30).saturating_sub(1))
        .min(MAX_BACKOFF_MS);
    let jitter = rand::thread_rng().gen_range(-base / 4..=base / 4);
    (base + jitter).max(MIN_BACKOFF_MS / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_bounded() {
        for failures in [0, 1] {
            let first = backoff_ms(failures);
            assert!((750..=1250).contains(&first), "{first}");
        }
        let third = backoff_ms(3);
        assert!((3_000..=5_000).contains(&third), "{third}");
        let fifth = backoff_ms(5);
        assert!((12_000..=20_000).contains(&fifth), "{fifth}");
        assert!(backoff_ms(60) <= MAX_BACKOFF_MS + MAX_BACKOFF_MS / 4);
    }
}
