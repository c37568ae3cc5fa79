//! `presence-bench`: what presence costs the server when many users stay connected. Starts its
//! own Myelin through the black-box harness (a release build of this program builds and runs
//! a release `myelin`, or runs `$MYELIN_BIN`), on SQLite unless `--postgres` is given:
//!
//! 1. registers `--users` (10,000) users (without passwords, so no password hashing) and puts
//!    them into rooms of `--room-size` (100), so every user has `room-size − 1` watchers;
//! 2. connects every user the way a long-polling client is connected: a `/sync` with
//!    `timeout=30000` (the heartbeat: the server holds it 30 s, then the client polls again at
//!    once), the users' first polls spread over one period;
//! 3. once every user has been online for `--settle-s` seconds, measures over `--window-s`
//!    seconds the CPU time of the `myelin` process (`utime + stime` from `/proc/<pid>/stat`)
//!    and counts the heartbeats (completed polls) and the `m.presence` events the users get.
//!
//! Printed: CPU per heartbeat (= per user per 30 s period), the server's CPU share, and the
//! presence updates seen in the window — none is expected, since nobody's state changes (a
//! poll's end and the next poll are within the grace period). The idle timeout is set to an
//! hour so the window measures the steady state, not 10,000 users going idle at once.
//!
//! ```text
//! cargo run --release -p complement-tests --bin presence-bench -- \
//!     [--postgres] [--users 10000] [--room-size 100] [--settle-s 40] [--window-s 60] \
//!     [--json-out FILE]
//! ```
//!
//! Human-readable lines go to stderr, the JSON summary to stdout (and to `--json-out`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use complement_tests::bench::round3;
use complement_tests::{Backend, Client, TestServer};
use futures::stream::{self, StreamExt, TryStreamExt};
use serde_json::{json, Value};

/// The heartbeat: how long the server holds each poll.
const POLL_TIMEOUT_MS: u64 = 30_000;

#[derive(Parser, Debug)]
#[command(
    name = "presence-bench",
    about = "Measures the server CPU that connected users' presence costs"
)]
struct Args {
    /// Run on PostgreSQL (a throwaway database) instead of SQLite.
    #[arg(long)]
    postgres: bool,
    /// Connected users.
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    /// Users per room.
    #[arg(long, default_value_t = 100)]
    room_size: usize,
    /// Seconds after the last user came online before measuring.
    #[arg(long, default_value_t = 40)]
    settle_s: u64,
    /// The measured window, in seconds.
    #[arg(long, default_value_t = 60)]
    window_s: u64,
    /// Concurrent requests while setting up.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Also write the JSON summary here.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let backend = if args.postgres {
        Backend::Postgres
    } else {
        Backend::Sqlite
    };
    let server = TestServer::start_with(
        backend,
        &[
            ("MYELIN_PRESENCE_IDLE_MS", "3600000"),
            ("MYELIN_LOG", "warn"),
        ],
    )
    .await?;
    eprintln!(
        "presence-bench: {backend:?}; server at {}",
        server.base_url()
    );
    let outcome = measure(&args, &server).await;
    if outcome.is_err() {
        server.print_log_tail();
    }
    let summary = outcome?;
    let text = serde_json::to_string_pretty(&summary)?;
    println!("{text}");
    if let Some(path) = &args.json_out {
        std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Registers a user without a password (`m.login.dummy`).
async fn register(http: &reqwest::Client, base: &str, localpart: &str) -> Result<Client> {
    let anon = Client::anonymous(http.clone(), base);
    let mut request = json!({"username": localpart, "inhibit_login": false});
    let first = anon.post("/register", &request).await?;
    let done = if first.status == 401 {
        request["auth"] = json!({"type": "m.login.dummy", "session": first.body["session"]});
        anon.post("/register", &request).await?
    } else {
        first
    };
    if done.status != 200 {
        bail!("registering {localpart}: {} {}", done.status, done.body);
    }
    Client::from_login_response(http.clone(), base, &done.body)
}

/// `utime + stime` of a process, in milliseconds.
fn cpu_ms(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces; the fields after it are space-separated.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ")": state is field 3 of the whole line, so utime (14) and stime (15) are 11, 12.
    let utime: f64 = fields.get(11).context("utime")?.parse()?;
    let stime: f64 = fields.get(12).context("stime")?.parse()?;
    // SAFETY: sysconf reads a constant of the system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((utime + stime) * 1000.0 / ticks)
}

/// What the connected users count, shared by their tasks.
#[derive(Default)]
struct Counters {
    /// Completed polls while measuring.
    heartbeats: AtomicU64,
    /// `m.presence` events received while measuring.
    presence_events: AtomicU64,
    /// Of those, the ones not saying `online` (every user stays connected: a flap).
    flaps: AtomicU64,
    /// Failed polls (any time).
    errors: AtomicU64,
    measuring: AtomicBool,
    stop: AtomicBool,
}

/// One connected user: polls with `timeout=30000` until told to stop.
async fn connected(client: Client, since: String, first_delay: Duration, c: Arc<Counters>) {
    tokio::time::sleep(first_delay).await;
    let timeout = POLL_TIMEOUT_MS.to_string();
    let mut since = since;
    while !c.stop.load(Ordering::Relaxed) {
        let body = client
            .sync_with(&[("since", &since), ("timeout", &timeout)])
            .await;
        match body {
            Ok(body) => {
                if c.measuring.load(Ordering::Relaxed) {
                    c.heartbeats.fetch_add(1, Ordering::Relaxed);
                    let events = body["presence"]["events"].as_array();
                    for e in events.into_iter().flatten() {
                        c.presence_events.fetch_add(1, Ordering::Relaxed);
                        if e["content"]["presence"] != "online" {
                            c.flaps.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                if let Some(next) = body["next_batch"].as_str() {
                    since = next.to_owned();
                }
            }
            Err(_) => {
                c.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn measure(args: &Args, server: &TestServer) -> Result<Value> {
    let pid = server.pid().context("the server's pid")?;
    let http = reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(120))
        .timeout(Duration::from_secs(120))
        .build()?;
    let base = server.base_url().to_owned();
    let t = Instant::now();
    let run = std::process::id();
    let users: Vec<Client> = stream::iter(0..args.users)
        .map(|i| {
            let (http, base) = (http.clone(), base.clone());
            async move { register(&http, &base, &format!("pb{run}u{i}")).await }
        })
        .buffered(args.concurrency)
        .try_collect()
        .await?;
    eprintln!("registered {} users in {:.1?}", users.len(), t.elapsed());

    let t = Instant::now();
    let room_size = args.room_size.max(1);
    for group in users.chunks(room_size) {
        let room = group[0]
            .create_room(&json!({"preset": "public_chat"}))
            .await?;
        stream::iter(group[1..].iter())
            .map(|u| {
                let room = room.clone();
                async move { u.join(&room).await }
            })
            .buffer_unordered(args.concurrency)
            .try_collect::<Vec<_>>()
            .await?;
    }
    eprintln!(
        "{} rooms of {room_size} in {:.1?}",
        users.len().div_ceil(room_size),
        t.elapsed()
    );

    // Each user's first sync (the initial one, with set_presence=offline so nobody comes
    // online yet), unmeasured.
    let t = Instant::now();
    let sinces: Vec<String> = stream::iter(users.iter())
        .map(|u| async move {
            let body = u
                .sync_with(&[
                    ("timeout", "0"),
                    ("set_presence", "offline"),
                    ("filter", r#"{"room":{"timeline":{"limit":1}}}"#),
                ])
                .await?;
            Ok::<_, anyhow::Error>(body["next_batch"].as_str().unwrap_or_default().to_owned())
        })
        .buffered(args.concurrency)
        .try_collect()
        .await?;
    eprintln!("initial syncs in {:.1?}", t.elapsed());

    // Connect everyone, first polls spread over one period.
    let counters = Arc::new(Counters::default());
    let n = users.len().max(1) as u64;
    let mut tasks = Vec::new();
    for (i, (u, since)) in users.into_iter().zip(sinces).enumerate() {
        let delay = Duration::from_millis(POLL_TIMEOUT_MS * i as u64 / n);
        tasks.push(tokio::spawn(connected(u, since, delay, counters.clone())));
    }
    let settle = Duration::from_millis(POLL_TIMEOUT_MS) + Duration::from_secs(args.settle_s);
    eprintln!("connecting; measuring in {settle:.0?}");
    tokio::time::sleep(settle).await;

    let cpu0 = cpu_ms(pid)?;
    let t0 = Instant::now();
    counters.measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(args.window_s)).await;
    counters.measuring.store(false, Ordering::Relaxed);
    let cpu = cpu_ms(pid)? - cpu0;
    let wall = t0.elapsed();
    counters.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }

    let heartbeats = counters.heartbeats.load(Ordering::Relaxed);
    let presence_events = counters.presence_events.load(Ordering::Relaxed);
    let errors = counters.errors.load(Ordering::Relaxed);
    let flaps = counters.flaps.load(Ordering::Relaxed);
    let per_heartbeat_us = if heartbeats > 0 {
        cpu * 1000.0 / heartbeats as f64
    } else {
        f64::NAN
    };
    let share = cpu / (wall.as_secs_f64() * 1000.0);
    eprintln!(
        "window {wall:.1?}: {heartbeats} heartbeats, server CPU {cpu:.0} ms ({:.1}% of one core), \
         {per_heartbeat_us:.1} µs per heartbeat; {presence_events} presence updates, {flaps} not \
         online (flaps); {errors} failed polls",
        share * 100.0
    );
    Ok(json!({
        "backend": format!("{:?}", server.backend()),
        "users": args.users,
        "room_size": room_size,
        "poll_timeout_ms": POLL_TIMEOUT_MS,
        "window_s": round3(wall.as_secs_f64()),
        "heartbeats": heartbeats,
        "server_cpu_ms": round3(cpu),
        "server_cpu_share_of_one_core": round3(share),
        "cpu_us_per_heartbeat": round3(per_heartbeat_us),
        "presence_updates_in_window": presence_events,
        "flaps_in_window": flaps,
        "failed_polls": errors,
    }))
}
