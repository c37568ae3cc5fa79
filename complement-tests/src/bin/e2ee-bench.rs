//! `e2ee-bench`: the end-to-end-encryption benchmark. Starts its own Myelin through the
//! black-box harness (a release build of this program builds and runs a release `myelin`, or
//! runs `$MYELIN_BIN`), on SQLite unless `--postgres` is given, and measures:
//!
//! 1. `/keys/claim` of one `signed_curve25519` key from each of `--claim-devices` (100) devices
//!    in one request, every device holding enough one-time keys that every claim hands out a
//!    one-time key (never a fallback key); median and p99 over `--iterations` requests;
//! 2. `/keys/query` of `--query-users` (500) users in one request, each user with one device
//!    with uploaded keys; median and p99 over `--iterations` requests;
//! 3. to-device fan-out: one `sendToDevice` addressed to `*` of `--fanout-users` (100) users
//!    with `--devices-per-user` (10) devices each, 1,000 devices in all, every one of them
//!    with a long-poll `/sync` in flight; the time from the send request until the last device
//!    has the message, over `--rounds` rounds (each device is checked to get it exactly once).
//!
//! Targets: (1) and (2) a median of at most 20 ms.
//!
//! ```text
//! cargo run --release -p complement-tests --bin e2ee-bench -- \
//!     [--postgres] [--iterations 100] [--rounds 20] [--claim-devices 100] \
//!     [--query-users 500] [--fanout-users 100] [--devices-per-user 10] [--json-out FILE]
//! ```
//!
//! Request times are taken on the client from sending the request until the whole body has
//! been read; checking the answer (parsing it and counting its keys) comes after the clock
//! stops. Human-readable lines go to stderr, the JSON summary to stdout (and to `--json-out`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use clap::Parser;
use complement_tests::bench::{ms, Stats};
use complement_tests::client::{string_field, success};
use complement_tests::e2ee::{DeviceKeys, SIGNED_CURVE25519};
use complement_tests::{enc, query, unique_txn_id, Backend, Client, TestServer};
use futures::stream::{self, StreamExt, TryStreamExt};
use serde_json::{json, Value};

const PASSWORD: &str = "e2ee-bench-password";
/// Unmeasured requests before the measured ones.
const WARMUP: usize = 5;
/// Unmeasured fan-out rounds before the measured ones.
const WARMUP_ROUNDS: usize = 2;
/// A sync filter that leaves rooms, presence and account data out: the fan-out's long-polls
/// wait for to-device messages only.
const FANOUT_FILTER: &str =
    r#"{"room":{"rooms":[]},"presence":{"types":[]},"account_data":{"types":[]}}"#;

#[derive(Parser, Debug)]
#[command(
    name = "e2ee-bench",
    about = "Benchmarks Myelin's end-to-end-encryption endpoints"
)]
struct Args {
    /// Run on PostgreSQL (a throwaway database) instead of SQLite.
    #[arg(long)]
    postgres: bool,
    /// Measured requests of the claim and query benchmarks (after 5 unmeasured ones).
    #[arg(long, default_value_t = 100)]
    iterations: usize,
    /// Measured fan-out rounds (after 2 unmeasured ones).
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Devices whose keys one /keys/claim request claims.
    #[arg(long, default_value_t = 100)]
    claim_devices: usize,
    /// Users one /keys/query request asks for.
    #[arg(long, default_value_t = 500)]
    query_users: usize,
    /// Users the fan-out message goes to.
    #[arg(long, default_value_t = 100)]
    fanout_users: usize,
    /// Devices of each fan-out user (each one long-polls).
    #[arg(long, default_value_t = 10)]
    devices_per_user: usize,
    /// How long the fan-out waits, once every long-poll has been sent, before it sends (ms).
    #[arg(long, default_value_t = 1000)]
    settle_ms: u64,
    /// Concurrent registrations, logins and uploads while setting up.
    #[arg(long, default_value_t = 4)]
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
    let server = TestServer::start(backend).await?;
    eprintln!("e2ee-bench: {backend:?}; server at {}", server.base_url());
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

async fn measure(args: &Args, server: &TestServer) -> Result<Value> {
    let users_needed = args
        .query_users
        .max(args.claim_devices)
        .max(args.fanout_users);
    let otks_per_device = WARMUP + args.iterations;
    let t = Instant::now();
    // Every user's registration device uploads device keys; the first `claim_devices` also
    // enough one-time keys for every claim. All registrations come first, then the uploads.
    let users: Vec<Client> = stream::iter(0..users_needed)
        .map(|i| async move { server.register(&format!("user{i}"), PASSWORD).await })
        .buffered(args.concurrency.max(1))
        .try_collect()
        .await?;
    stream::iter(users.iter().enumerate())
        .map(|(i, user)| {
            let otks = if i < args.claim_devices {
                otks_per_device
            } else {
                0
            };
            async move {
                let keys = DeviceKeys::of(user);
                let answer = success(
                    user.post("/keys/upload", &keys.upload_body(otks)).await?,
                    "keys/upload",
                )?;
                ensure!(
                    answer["one_time_key_counts"][SIGNED_CURVE25519] == json!(otks),
                    "upload of {otks} keys answered {answer}"
                );
                anyhow::Ok(())
            }
        })
        .buffer_unordered(args.concurrency.max(1))
        .try_collect::<Vec<()>>()
        .await?;
    eprintln!(
        "set-up: {users_needed} users with device keys ({} with {otks_per_device} one-time keys) in {:.1} s",
        args.claim_devices,
        t.elapsed().as_secs_f64()
    );
    let querier = server.register("querier", PASSWORD).await?;
    let http = reqwest::Client::new();

    let claim = claim_bench(args, &http, &querier, &users[..args.claim_devices]).await?;
    eprintln!(
        "/keys/claim of {} devices: p50 {:.2} ms, p99 {:.2} ms over {} requests (target p50 ≤ 20 ms)",
        args.claim_devices, claim.p50, claim.p99, claim.n
    );
    let query_stats = query_bench(args, &http, &querier, &users[..args.query_users]).await?;
    eprintln!(
        "/keys/query of {} users: p50 {:.2} ms, p99 {:.2} ms over {} requests (target p50 ≤ 20 ms)",
        args.query_users, query_stats.p50, query_stats.p99, query_stats.n
    );
    let fanout = fanout_bench(args, server, &users[..args.fanout_users]).await?;
    eprintln!(
        "to-device fan-out to {} devices of {} users: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms \
         over {} rounds",
        fanout.devices,
        args.fanout_users,
        fanout.stats.p50,
        fanout.stats.p99,
        fanout.stats.max,
        fanout.stats.n
    );

    Ok(json!({
        "backend": format!("{:?}", server.backend()),
        "keys_claim": {
            "devices": args.claim_devices,
            "ms": claim.json(),
            "target_p50_ms": 20.0,
        },
        "keys_query": {
            "users": args.query_users,
            "ms": query_stats.json(),
            "target_p50_ms": 20.0,
        },
        "to_device_fanout": {
            "users": args.fanout_users,
            "devices": fanout.devices,
            "send_request_ms": fanout.send.json(),
            "send_to_last_delivery_ms": fanout.stats.json(),
        },
        "meets_targets": claim.p50 <= 20.0 && query_stats.p50 <= 20.0,
    }))
}

/// `POST path` with `body` as `client`, timed from sending until the whole body is read; the
/// status, the parsed body and the time.
async fn timed_post(
    http: &reqwest::Client,
    client: &Client,
    path: &str,
    body: &Value,
) -> Result<(u16, Value, Duration)> {
    let bytes = serde_json::to_vec(body)?;
    let token = client.access_token.as_deref().unwrap_or_default();
    let start = Instant::now();
    let response = http
        .post(client.url(path))
        .bearer_auth(token)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(bytes)
        .send()
        .await
        .with_context(|| format!("POST {path}"))?;
    let status = response.status().as_u16();
    let body = response.bytes().await?;
    let elapsed = start.elapsed();
    let value = serde_json::from_slice(&body)
        .with_context(|| format!("POST {path}: the answer is not JSON"))?;
    Ok((status, value, elapsed))
}

/// (1): one claim of a key from each device, `iterations` times.
async fn claim_bench(
    args: &Args,
    http: &reqwest::Client,
    claimer: &Client,
    devices: &[Client],
) -> Result<Stats> {
    let mut wanted: BTreeMap<&str, BTreeMap<&str, &str>> = BTreeMap::new();
    for d in devices {
        wanted
            .entry(&d.user_id)
            .or_default()
            .insert(&d.device_id, SIGNED_CURVE25519);
    }
    let body = json!({"one_time_keys": wanted});
    let mut samples = Vec::with_capacity(args.iterations);
    let mut seen = std::collections::HashSet::new();
    for i in 0..WARMUP + args.iterations {
        let (status, answer, elapsed) = timed_post(http, claimer, "/keys/claim", &body).await?;
        ensure!(status == 200, "claim {i}: {status} {answer}");
        for d in devices {
            let keys = answer["one_time_keys"][&d.user_id][&d.device_id]
                .as_object()
                .ok_or_else(|| anyhow!("claim {i}: no key of {} {}", d.user_id, d.device_id))?;
            let (id, key) = keys
                .iter()
                .next()
                .ok_or_else(|| anyhow!("claim {i}: no key of {}", d.user_id))?;
            ensure!(
                key.get("fallback").is_none(),
                "claim {i}: a fallback key, not a one-time key"
            );
            ensure!(
                seen.insert((d.user_id.clone(), id.clone())),
                "claim {i}: {id} of {} handed out twice",
                d.user_id
            );
        }
        if i >= WARMUP {
            samples.push(ms(elapsed));
        }
    }
    Ok(Stats::new(samples))
}

/// (2): one query of every user's devices, `iterations` times.
async fn query_bench(
    args: &Args,
    http: &reqwest::Client,
    querier: &Client,
    users: &[Client],
) -> Result<Stats> {
    let wanted: BTreeMap<&str, Value> = users
        .iter()
        .map(|u| (u.user_id.as_str(), json!([])))
        .collect();
    let body = json!({"device_keys": wanted});
    let mut samples = Vec::with_capacity(args.iterations);
    for i in 0..WARMUP + args.iterations {
        let (status, answer, elapsed) = timed_post(http, querier, "/keys/query", &body).await?;
        ensure!(status == 200, "query {i}: {status} {answer}");
        for u in users {
            ensure!(
                answer["device_keys"][&u.user_id][&u.device_id]["keys"].is_object(),
                "query {i}: no keys of {} {}",
                u.user_id,
                u.device_id
            );
        }
        if i >= WARMUP {
            samples.push(ms(elapsed));
        }
    }
    Ok(Stats::new(samples))
}

struct Fanout {
    devices: usize,
    /// Send → last device has it, per measured round.
    stats: Stats,
    /// The sendToDevice request itself, per measured round.
    send: Stats,
}

/// (3): one sendToDevice to `*` of every user; every device long-polls.
async fn fanout_bench(args: &Args, server: &TestServer, users: &[Client]) -> Result<Fanout> {
    let t = Instant::now();
    let logins: Vec<(usize, String)> = users
        .iter()
        .enumerate()
        .flat_map(|(i, _)| (1..args.devices_per_user).map(move |d| (i, format!("FAN{d}"))))
        .collect();
    let mut devices: Vec<Client> = users.to_vec();
    let logged_in: Vec<Client> = stream::iter(logins)
        .map(|(i, device)| async move {
            server
                .login(&format!("user{i}"), PASSWORD, Some(&device))
                .await
        })
        .buffer_unordered(args.concurrency.max(1))
        .try_collect()
        .await?;
    devices.extend(logged_in);
    let tokens: Vec<String> = stream::iter(devices.iter())
        .map(|d| async move {
            let sync = d.sync(None, Some(0), Some(FANOUT_FILTER)).await?;
            string_field(&sync, "next_batch")
        })
        .buffered(args.concurrency.max(1) * 4)
        .try_collect()
        .await?;
    eprintln!(
        "set-up: {} devices logged in and synced in {:.1} s",
        devices.len(),
        t.elapsed().as_secs_f64()
    );
    let sender = server.register("fanout-sender", PASSWORD).await?;
    let messages_for = |round: usize, nonce: &str| -> Value {
        users
            .iter()
            .map(|u| {
                (
                    u.user_id.clone(),
                    json!({"*": {"round": round, "nonce": nonce}}),
                )
            })
            .collect::<serde_json::Map<String, Value>>()
            .into()
    };

    let mut pollers: Vec<(Client, String)> = devices.into_iter().zip(tokens).collect();
    let mut samples = Vec::new();
    let mut send_samples = Vec::new();
    for round in 0..WARMUP_ROUNDS + args.rounds {
        let nonce = format!("fanout {round} {}", unique_txn_id());
        let started = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = pollers
            .iter()
            .map(|(device, since)| {
                let (device, since, nonce, started) = (
                    device.clone(),
                    since.clone(),
                    nonce.clone(),
                    started.clone(),
                );
                tokio::spawn(async move { wait_for(&device, since, &nonce, &started).await })
            })
            .collect();
        let all = handles.len();
        let deadline = Instant::now() + Duration::from_secs(30);
        while started.load(Ordering::SeqCst) < all {
            ensure!(
                Instant::now() < deadline,
                "round {round}: the long-polls did not all start"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;
        let early = handles.iter().filter(|h| h.is_finished()).count();
        ensure!(
            early == 0,
            "round {round}: {early} long-polls answered before the send"
        );

        let t0 = Instant::now();
        let path = format!(
            "/sendToDevice/{}/{}",
            enc("org.example.bench"),
            enc(&unique_txn_id())
        );
        let answer = sender
            .put(&path, &json!({"messages": messages_for(round, &nonce)}))
            .await?;
        let send_ms = ms(t0.elapsed());
        ensure!(
            answer.status == 200,
            "round {round}: sendToDevice answered {} {}",
            answer.status,
            answer.body
        );
        let mut last = Duration::ZERO;
        let mut next = Vec::with_capacity(all);
        for (handle, (device, _)) in handles.into_iter().zip(pollers) {
            let (arrived, since) = tokio::time::timeout(Duration::from_secs(60), handle)
                .await
                .map_err(|_| anyhow!("round {round}: {} not reached in 60 s", device.device_id))?
                .map_err(|e| anyhow!("round {round}: poller task: {e}"))??;
            last = last.max(arrived.saturating_duration_since(t0));
            next.push((device, since));
        }
        pollers = next;
        if round >= WARMUP_ROUNDS {
            samples.push(ms(last));
            send_samples.push(send_ms);
        }
        eprintln!(
            "  round {round}: send {send_ms:.1} ms, last device {:.1} ms",
            ms(last)
        );
    }
    Ok(Fanout {
        devices: pollers.len(),
        stats: Stats::new(samples),
        send: Stats::new(send_samples),
    })
}

/// Long-polls `device` from `since` until the to-device message carrying `nonce` arrives
/// (exactly once); when it arrived and the token after it.
async fn wait_for(
    device: &Client,
    mut since: String,
    nonce: &str,
    started: &AtomicUsize,
) -> Result<(Instant, String)> {
    let mut first = true;
    loop {
        let params = [
            ("since", since.as_str()),
            ("timeout", "30000"),
            ("filter", FANOUT_FILTER),
        ];
        let path = format!("/sync{}", query(&params));
        let request = device.get(&path);
        if first {
            started.fetch_add(1, Ordering::SeqCst);
            first = false;
        }
        let sync = success(request.await?, "sync")?;
        let arrived = Instant::now();
        since = string_field(&sync, "next_batch")?;
        let copies = sync["to_device"]["events"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["content"]["nonce"] == nonce)
            .count();
        match copies {
            0 => continue,
            1 => return Ok((arrived, since)),
            n => bail!("{} got the message {n} times", device.device_id),
        }
    }
}
