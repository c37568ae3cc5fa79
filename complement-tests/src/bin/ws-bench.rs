//! `ws-bench`: the WebSocket sync (`dev.myelin.ws_sync`) benchmark. Starts its own Myelin
//! through the black-box harness (a release build of this program builds and runs a release
//! `myelin`, or runs `$MYELIN_BIN`), on SQLite unless `--postgres` is given, and measures:
//!
//! 1. fan-out (run second): one message sent into a room of `--members` (100) members, every member
//!    streaming over a WebSocket (acking each batch); the time from the send request until the
//!    last member has the event, over `--sends` (100) sends; then the same with every member
//!    long-polling `GET /sync` instead. Target: p99 ≤ 10 ms over WebSockets.
//! 2. idle connections (run first, on the fresh server): `--idle` (10,000) sockets held open, of which `--idle-devices`
//!    (1,000) run a sync stream each (one stream per device; every device is a login, so
//!    fewer than all) and the others are authenticated with no stream. Server RSS per
//!    connection ((RSS after) − (RSS before)) / count for each kind (target ≤ 8 KiB), and the
//!    server's CPU time over `--idle-secs` (30) s of idleness.
//!
//! ```text
//! cargo run --release -p complement-tests --bin ws-bench -- \
//!     [--postgres] [--members 100] [--sends 100] [--idle 10000] [--idle-devices 1000] \
//!     [--idle-secs 30] [--json-out FILE]
//! ```
//!
//! The bench raises its open-file limit to the hard limit (`setrlimit`) before it starts the
//! server, which inherits it; 10,000 sockets need that many descriptors on both sides. Human-
//! readable lines go to stderr, the JSON summary to stdout (and to `--json-out`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use complement_tests::bench::{ms, Stats};
use complement_tests::ws::{self, next_batch, WsClient};
use complement_tests::{Backend, Client, TestServer};
use futures::stream::{self, StreamExt, TryStreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;

const PASSWORD: &str = "ws-bench-password";
/// Unmeasured sends before the measured ones.
const WARMUP: usize = 5;
/// Only room timelines; no presence or account data.
const FILTER: &str = r#"{"presence":{"types":[]},"account_data":{"types":[]}}"#;

#[derive(Parser, Debug)]
#[command(name = "ws-bench", about = "Benchmarks Myelin's WebSocket sync")]
struct Args {
    /// Run on PostgreSQL (a throwaway database) instead of SQLite.
    #[arg(long)]
    postgres: bool,
    /// Room members receiving each fan-out send.
    #[arg(long, default_value_t = 100)]
    members: usize,
    /// Measured fan-out sends per transport.
    #[arg(long, default_value_t = 100)]
    sends: usize,
    /// Idle sockets held open.
    #[arg(long, default_value_t = 10_000)]
    idle: usize,
    /// How many of the idle sockets run a sync stream (one login each).
    #[arg(long, default_value_t = 1_000)]
    idle_devices: usize,
    /// How long the idle CPU is measured (s).
    #[arg(long, default_value_t = 30)]
    idle_secs: u64,
    /// Concurrent registrations, logins and connects while setting up.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Skip the fan-out part.
    #[arg(long)]
    no_fanout: bool,
    /// Skip the idle part.
    #[arg(long)]
    no_idle: bool,
    /// Also write the JSON summary here.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let fds = raise_fd_limit();
    let backend = if args.postgres {
        Backend::Postgres
    } else {
        Backend::Sqlite
    };
    let server = TestServer::start(backend).await?;
    eprintln!(
        "ws-bench: {backend:?}; server at {}; open-file limit {fds} (inherited by the server)",
        server.base_url()
    );
    let outcome = measure(&args, &server).await;
    if outcome.is_err() {
        server.print_log_tail();
    }
    let mut summary = outcome?;
    summary["open_file_limit"] = json!(fds);
    let text = serde_json::to_string_pretty(&summary)?;
    println!("{text}");
    if let Some(path) = &args.json_out {
        std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Raises the soft open-file limit to the hard one; returns the limit in force.
fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls on a valid, owned struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

async fn measure(args: &Args, server: &TestServer) -> Result<Value> {
    let mut out = json!({"backend": format!("{:?}", server.backend())});
    // Idle first, on a fresh server: memory the fan-out leaves behind would blur the baseline.
    if !args.no_idle {
        out["idle"] = idle(args, server).await?;
    }
    if !args.no_fanout {
        out["fanout"] = fanout(args, server).await?;
    }
    Ok(out)
}

// Fan-out ------------------------------------------------------------------------------------

async fn fanout(args: &Args, server: &TestServer) -> Result<Value> {
    let t = Instant::now();
    let sender = server.register("sender", PASSWORD).await?;
    let room = sender
        .create_room(&json!({"preset": "public_chat", "name": "fan-out"}))
        .await?;
    let members: Vec<Client> = stream::iter(0..args.members)
        .map(|i| {
            let room = room.clone();
            async move {
                let c = server.register(&format!("member{i}"), PASSWORD).await?;
                c.join(&room).await?;
                anyhow::Ok(c)
            }
        })
        .buffered(args.concurrency.max(1))
        .try_collect()
        .await?;
    eprintln!(
        "fan-out: {} members joined in {:.1} s",
        members.len(),
        t.elapsed().as_secs_f64()
    );
    let total = WARMUP + args.sends;

    // Over WebSockets: every member's task reports (send index, arrival).
    let (tx, rx) = mpsc::unbounded_channel::<(usize, Instant)>();
    let mut tasks = Vec::new();
    for m in &members {
        let token = m.access_token.clone().unwrap_or_default();
        let (mut sock, _) = ws::open(server.base_url(), &token).await?;
        sock.send(&json!({"type": "sync", "filter": FILTER, "window": 8}))
            .await?;
        let first = sock.next_batch().await?;
        sock.send(&json!({"type": "ack", "next_batch": next_batch(&first)?}))
            .await?;
        let tx = tx.clone();
        let room = room.clone();
        tasks.push(tokio::spawn(async move {
            ws_member(sock, room, tx).await;
        }));
    }
    drop(tx);
    let ws_stats = drive(&sender, &room, total, args.members, rx, "ws").await?;
    for t in tasks {
        t.abort();
    }

    // Over long-polls.
    let (tx, rx) = mpsc::unbounded_channel::<(usize, Instant)>();
    let mut tasks = Vec::new();
    for m in &members {
        let first = m.sync(None, Some(0), Some(FILTER)).await?;
        let since = next_batch(&first)?;
        let (tx, room, m) = (tx.clone(), room.clone(), m.clone());
        tasks.push(tokio::spawn(async move {
            poll_member(m, since, room, tx).await;
        }));
    }
    drop(tx);
    // Let every long-poll reach the server.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let poll_stats = drive(&sender, &room, total, args.members, rx, "long-poll").await?;
    for t in tasks {
        t.abort();
    }
    Ok(json!({
        "members": args.members,
        "websocket": ws_stats.0.json(),
        "long_poll": poll_stats.0.json(),
        "send_answered": {"websocket": ws_stats.1.json(), "long_poll": poll_stats.1.json()},
    }))
}

/// Indices of the bench's messages (`"n"` in the content) in a room's timeline.
fn indices(body: &Value, room: &str) -> Vec<usize> {
    body["rooms"]["join"][room]["timeline"]["events"]
        .as_array()
        .map(|evs| {
            evs.iter()
                .filter_map(|e| e["content"]["n"].as_u64())
                .map(|n| n as usize)
                .collect()
        })
        .unwrap_or_default()
}

async fn ws_member(mut sock: WsClient, room: String, tx: mpsc::UnboundedSender<(usize, Instant)>) {
    loop {
        let Ok(f) = sock.next_frame_within(Duration::from_secs(3600)).await else {
            return;
        };
        let ws::Frame::Json(f) = f else { return };
        if f["type"] != "sync" {
            continue;
        }
        let now = Instant::now();
        for i in indices(&f["body"], &room) {
            let _ = tx.send((i, now));
        }
        let Ok(token) = next_batch(&f["body"]) else {
            return;
        };
        if sock
            .send(&json!({"type": "ack", "next_batch": token}))
            .await
            .is_err()
        {
            return;
        }
    }
}

async fn poll_member(
    c: Client,
    mut since: String,
    room: String,
    tx: mpsc::UnboundedSender<(usize, Instant)>,
) {
    loop {
        let Ok(body) = c.sync(Some(&since), Some(30_000), Some(FILTER)).await else {
            return;
        };
        let now = Instant::now();
        for i in indices(&body, &room) {
            let _ = tx.send((i, now));
        }
        match next_batch(&body) {
            Ok(t) => since = t,
            Err(_) => return,
        }
    }
}

/// Sends `total` messages one after the other; each is done when all `members` reported it.
async fn drive(
    sender: &Client,
    room: &str,
    total: usize,
    members: usize,
    mut rx: mpsc::UnboundedReceiver<(usize, Instant)>,
    what: &str,
) -> Result<(Stats, Stats)> {
    let mut samples = Vec::new();
    let mut sends = Vec::new();
    let mut seen: HashMap<usize, usize> = HashMap::new();
    for i in 0..total {
        let t0 = Instant::now();
        let res = sender
            .put(
                &format!(
                    "/rooms/{}/send/m.room.message/{}",
                    complement_tests::enc(room),
                    complement_tests::unique_txn_id()
                ),
                &json!({"msgtype": "m.text", "body": format!("fan-out {i}"), "n": i}),
            )
            .await?;
        complement_tests::success(res, "send")?;
        let answered = t0.elapsed();
        let last = loop {
            let (n, at) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .context("fan-out: a member did not get the event within 30 s")?
                .context("fan-out: members gone")?;
            let c = seen.entry(n).or_default();
            *c += 1;
            if *c > members {
                bail!("fan-out: event {n} delivered more than once to a member");
            }
            if n == i && *c == members {
                break at;
            }
        };
        if i >= WARMUP {
            samples.push(ms(last.duration_since(t0)));
            sends.push(ms(answered));
        }
    }
    let stats = Stats::new(samples);
    let sends = Stats::new(sends);
    eprintln!(
        "fan-out over {what}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (n = {}); \
         the send itself answered in p50 {:.2} ms, p99 {:.2} ms",
        stats.p50, stats.p99, stats.max, stats.n, sends.p50, sends.p99
    );
    Ok((stats, sends))
}

// Idle connections ---------------------------------------------------------------------------

/// Resident set size of a process, in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS not found")
}

/// User plus system CPU time of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let utime: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let stime: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    Ok(utime + stime)
}

async fn idle(args: &Args, server: &TestServer) -> Result<Value> {
    let pid = server.pid().context("server pid")?;
    let devices = args.idle_devices.min(args.idle);
    let plain = args.idle - devices;
    let t = Instant::now();
    let owner = server.register("idler", PASSWORD).await?;
    // One login per streaming device.
    let logins: Vec<Client> = stream::iter(0..devices)
        .map(|_| async { server.login("idler", PASSWORD, None).await })
        .buffer_unordered(args.concurrency.max(1))
        .try_collect()
        .await?;
    eprintln!(
        "idle: {} logins in {:.1} s",
        logins.len(),
        t.elapsed().as_secs_f64()
    );
    let token = owner.access_token.clone().unwrap_or_default();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss0 = rss_kib(pid)?;

    // Authenticated sockets with no stream, read by tasks that answer Pings.
    let t = Instant::now();
    let plain_socks: Vec<WsClient> = stream::iter(0..plain)
        .map(|_| {
            let token = token.clone();
            async move { Ok::<_, anyhow::Error>(ws::open(server.base_url(), &token).await?.0) }
        })
        .buffer_unordered(args.concurrency.max(1) * 8)
        .try_collect()
        .await?;
    let holders: Vec<_> = plain_socks.into_iter().map(hold).collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss1 = rss_kib(pid)?;
    eprintln!(
        "idle: {plain} plain sockets in {:.1} s; server RSS {rss0} → {rss1} KiB",
        t.elapsed().as_secs_f64()
    );

    // Streaming sockets: sync, first batch, ack.
    let t = Instant::now();
    let stream_socks: Vec<WsClient> = stream::iter(logins.iter())
        .map(|c| async move {
            let token = c.access_token.clone().unwrap_or_default();
            let (mut sock, _) = ws::open(server.base_url(), &token).await?;
            sock.send(&json!({"type": "sync"})).await?;
            let first = sock.next_batch().await?;
            sock.send(&json!({"type": "ack", "next_batch": next_batch(&first)?}))
                .await?;
            anyhow::Ok(sock)
        })
        .buffer_unordered(args.concurrency.max(1) * 8)
        .try_collect()
        .await?;
    let holders2: Vec<_> = stream_socks.into_iter().map(hold).collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss2 = rss_kib(pid)?;
    eprintln!(
        "idle: {devices} streaming sockets in {:.1} s; server RSS {rss1} → {rss2} KiB",
        t.elapsed().as_secs_f64()
    );

    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let c0 = cpu_ticks(pid)?;
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let c1 = cpu_ticks(pid)?;
    let cpu_s = (c1 - c0) as f64 / ticks_per_s;
    let rss3 = rss_kib(pid)?;
    let per = |delta: u64, n: usize| {
        if n == 0 {
            f64::NAN
        } else {
            complement_tests::bench::round3(delta as f64 * 1024.0 / n as f64 / 1024.0)
        }
    };
    let total_per = per(rss2.saturating_sub(rss0), args.idle);
    eprintln!(
        "idle: {} sockets; RSS per socket {total_per} KiB (plain {}, streaming {}); \
         CPU {cpu_s:.2} s over {} s ({:.2} %); RSS after idling {rss3} KiB",
        args.idle,
        per(rss1.saturating_sub(rss0), plain),
        per(rss2.saturating_sub(rss1), devices),
        args.idle_secs,
        cpu_s * 100.0 / args.idle_secs as f64
    );
    for h in holders.into_iter().chain(holders2) {
        h.abort();
    }
    Ok(json!({
        "sockets": args.idle,
        "streaming_sockets": devices,
        "rss_kib": {"before": rss0, "plain": rss1, "all": rss2, "after_idle": rss3},
        "rss_per_socket_kib": total_per,
        "rss_per_plain_socket_kib": per(rss1.saturating_sub(rss0), plain),
        "rss_per_streaming_socket_kib": per(rss2.saturating_sub(rss1), devices),
        "idle_cpu_seconds": cpu_s,
        "idle_seconds": args.idle_secs,
    }))
}

/// Keeps a socket read (so Pings are answered) until aborted.
fn hold(mut sock: WsClient) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok(ws::Frame::Json(_)) = sock.next_frame_within(Duration::from_secs(3600)).await {
        }
    })
}
