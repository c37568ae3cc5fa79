//! `federation-bench`: the federation benchmark. Starts two federating Myelin servers on
//! loopback (A hosts the rooms, B joins them; TLS between them, the black-box harness's
//! set-up) and measures:
//!
//! 1. send→remote-sync latency: a user of A sends into a room that a user of B long-polls
//!    on B; the time from the send request to B's sync answering with the event;
//! 2. inbound throughput: this program acts as server B (signing with B's own key, as the
//!    federation tests' [`Peer`] does) and sends a steady stream of messages of B's user to A
//!    in `/send` transactions of 50 PDUs, one transaction in flight at a time as a federation
//!    sender keeps it; PDUs per second accepted and persisted (A answers a transaction after
//!    persisting it), every PDU checked to be accepted and, at the end, to be in A's history;
//! 3. remote join: a user of B joins, by alias, a room of A with `--members` members; the
//!    time of the join request, and a check that B then lists every member.
//!
//! ```text
//! cargo run --release -p complement-tests --bin federation-bench -- \
//!     [--postgres] [--members 1000] [--pdus 10000] [--iterations 100] [--json-out FILE]
//! ```
//!
//! A release build of this program builds and runs a release `myelin` (or `$MYELIN_BIN`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use clap::Parser;
use complement_tests::bench::{ms, round3, Stats};
use complement_tests::client::string_field;
use complement_tests::federation::{self, event_id, message_event, Peer};
use complement_tests::{enc, Backend, Client, TestServer};
use futures::stream::{self, StreamExt, TryStreamExt};
use myelin_core::ruma::OwnedEventId;
use serde_json::{json, Value};

const PASSWORD: &str = "federation-bench-password";
/// PDUs per transaction (the spec's limit).
const TXN_PDUS: usize = 50;

#[derive(Parser, Debug)]
#[command(
    name = "federation-bench",
    about = "Benchmarks federation between two Myelin servers on loopback"
)]
struct Args {
    /// Run both servers on PostgreSQL (throwaway databases) instead of SQLite.
    #[arg(long)]
    postgres: bool,
    /// Members of the room joined from B, its creator included.
    #[arg(long, default_value_t = 1000)]
    members: usize,
    /// PDUs of the inbound-throughput stream.
    #[arg(long, default_value_t = 10_000)]
    pdus: usize,
    /// Measured send→remote-sync round trips (after 5 unmeasured ones).
    #[arg(long, default_value_t = 100)]
    iterations: usize,
    /// Concurrent registrations and joins while setting up.
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
    let (a, b) = federation::pair(backend).await?;
    eprintln!(
        "federation-bench: {backend:?}; A {} ({}), B {} ({})",
        a.server_name(),
        a.base_url(),
        b.server_name(),
        b.base_url()
    );
    let outcome = measure(&args, &a, &b).await;
    if outcome.is_err() {
        eprintln!("---- server A ----");
        a.print_log_tail();
        eprintln!("---- server B ----");
        b.print_log_tail();
    }
    let summary = outcome?;
    let text = serde_json::to_string_pretty(&summary)?;
    println!("{text}");
    if let Some(path) = &args.json_out {
        std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

async fn measure(args: &Args, a: &TestServer, b: &TestServer) -> Result<Value> {
    let alice = a.register("alice", PASSWORD).await?;
    let bob = b.register("bob", PASSWORD).await?;
    let room = alice
        .create_room(&json!({
            "preset": "public_chat",
            "room_alias_name": "bench",
            "room_version": "12",
        }))
        .await?;
    let t = Instant::now();
    bob.join(&a.alias("bench")).await?;
    let small_join_ms = ms(t.elapsed());

    let latency = sync_latency(args, &alice, &bob, &room).await?;
    eprintln!(
        "send→remote sync: p50 {:.2} ms, p99 {:.2} ms over {} round trips (target p50 ≤ 20 ms)",
        latency.p50, latency.p99, latency.n
    );

    let inbound = inbound_stream(args, a, b, &alice, &bob, &room).await?;
    eprintln!(
        "inbound: {} PDUs in {:.2} s = {:.0} PDUs/s; transaction of {TXN_PDUS}: p50 {:.1} ms, \
         p99 {:.1} ms (target ≥ 2,000 PDUs/s)",
        args.pdus, inbound.seconds, inbound.rate, inbound.txn.p50, inbound.txn.p99
    );

    let join = big_join(args, a, b, &alice).await?;
    eprintln!(
        "remote join of a room of {} members: {:.0} ms (target ≤ 1,000 ms; a room of 2: {:.0} ms)",
        args.members, join, small_join_ms
    );

    Ok(json!({
        "backend": format!("{:?}", a.backend()),
        "send_remote_sync_ms": latency.json(),
        "inbound": {
            "pdus": args.pdus,
            "pdus_per_transaction": TXN_PDUS,
            "seconds": round3(inbound.seconds),
            "pdus_per_s": round3(inbound.rate),
            "transaction_ms": inbound.txn.json(),
        },
        "remote_join": {
            "members": args.members,
            "ms": round3(join),
            "small_room_ms": round3(small_join_ms),
        },
        "meets_targets": latency.p50 <= 20.0 && inbound.rate >= 2000.0 && join <= 1000.0,
    }))
}

/// Send on A → B's long-poll has it.
async fn sync_latency(args: &Args, alice: &Client, bob: &Client, room: &str) -> Result<Stats> {
    let filter = json!({
        "room": {"rooms": [room], "timeline": {"limit": 10}, "state": {"lazy_load_members": true}},
        "presence": {"types": []},
        "account_data": {"types": []},
    })
    .to_string();
    let mut since = string_field(&bob.sync(None, Some(0), Some(&filter)).await?, "next_batch")?;
    const WARMUP: usize = 5;
    let mut samples = Vec::with_capacity(args.iterations);
    for i in 0..WARMUP + args.iterations {
        let nonce = format!("latency {i} {}", std::process::id());
        let waiter = {
            let (bob, filter, since, nonce) =
                (bob.clone(), filter.clone(), since.clone(), nonce.clone());
            tokio::spawn(async move { wait_for_body(&bob, &filter, since, &nonce).await })
        };
        // Let the long-poll reach the server before the send.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let t0 = Instant::now();
        alice.send_message(room, &nonce).await?;
        let (arrived, next) = tokio::time::timeout(Duration::from_secs(30), waiter)
            .await
            .map_err(|_| anyhow!("round trip {i}: B did not see the message within 30 s"))???;
        since = next;
        if i >= WARMUP {
            samples.push(ms(arrived.saturating_duration_since(t0)));
        }
    }
    Ok(Stats::new(samples))
}

/// Long-polls `client` from `since` until a timeline event with body `body` arrives; when it
/// arrived and the token after it.
async fn wait_for_body(
    client: &Client,
    filter: &str,
    mut since: String,
    body: &str,
) -> Result<(Instant, String)> {
    loop {
        let sync = client
            .sync(Some(&since), Some(30_000), Some(filter))
            .await?;
        let arrived = Instant::now();
        since = string_field(&sync, "next_batch")?;
        let seen = sync["rooms"]["join"]
            .as_object()
            .into_iter()
            .flat_map(|rooms| rooms.values())
            .flat_map(|r| r["timeline"]["events"].as_array().into_iter().flatten())
            .any(|e| e["content"]["body"] == body);
        if seen {
            return Ok((arrived, since));
        }
    }
}

struct Inbound {
    seconds: f64,
    rate: f64,
    txn: Stats,
}

/// Acting as B: a stream of B's user's messages to A, 50 PDUs a transaction.
async fn inbound_stream(
    args: &Args,
    a: &TestServer,
    b: &TestServer,
    alice: &Client,
    bob: &Client,
    room: &str,
) -> Result<Inbound> {
    let peer = Peer::new(b)?;
    let bob_id = bob.whoami().await?;
    let state = alice.room_state(room).await?;
    let id_of = |ty: &str, sk: &str| -> Result<OwnedEventId> {
        let e = state
            .iter()
            .find(|e| e["type"] == ty && e["state_key"] == sk)
            .ok_or_else(|| anyhow!("A's room state has no {ty} {sk}"))?;
        Ok(OwnedEventId::try_from(string_field(e, "event_id")?)?)
    };
    let mut auth = vec![
        id_of("m.room.power_levels", "")?,
        id_of("m.room.member", &bob_id)?,
    ];
    auth.sort();
    let mut prev = federation::latest(alice, room).await?;
    let (status, latest) = peer
        .get(a, &format!("/_matrix/federation/v1/event/{}", enc(&prev)))
        .await?;
    ensure!(status == 200, "A's /event answered {status}: {latest}");
    let mut depth = latest["pdus"][0]["depth"]
        .as_i64()
        .ok_or_else(|| anyhow!("A's latest event has no depth: {latest}"))?;

    // Built and signed before the clock starts: that is the sender's work.
    let mut pdus = Vec::with_capacity(args.pdus);
    let mut ids = Vec::with_capacity(args.pdus);
    for i in 0..args.pdus {
        depth += 1;
        let pdu = peer.build(
            room,
            &bob_id,
            &prev,
            &auth,
            depth,
            message_event(&format!("inbound {i}"))?,
        )?;
        prev = event_id(&pdu)?;
        ids.push(prev.clone());
        pdus.push(pdu);
    }

    let mut txn_ms = Vec::new();
    let start = Instant::now();
    for (n, (chunk, chunk_ids)) in pdus.chunks(TXN_PDUS).zip(ids.chunks(TXN_PDUS)).enumerate() {
        let t = Instant::now();
        let (status, answer) = peer
            .send_txn(a, &format!("bench-{}-{n}", std::process::id()), chunk)
            .await?;
        txn_ms.push(ms(t.elapsed()));
        ensure!(status == 200, "transaction {n} answered {status}: {answer}");
        for id in chunk_ids {
            let result = &answer["pdus"][id];
            ensure!(
                result.as_object().is_some_and(|r| r.is_empty()),
                "transaction {n}: A did not accept {id}: {result}"
            );
        }
    }
    let seconds = start.elapsed().as_secs_f64();

    // Persisted and in order: A's history ends with the whole stream.
    let history = alice
        .messages(room, &[("dir", "b"), ("limit", &TXN_PDUS.to_string())])
        .await?;
    let newest: Vec<&str> = history["chunk"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["event_id"].as_str())
        .collect();
    let expected: Vec<&str> = ids
        .iter()
        .rev()
        .take(TXN_PDUS)
        .map(String::as_str)
        .collect();
    ensure!(
        newest == expected,
        "A's newest events are not the stream's last {TXN_PDUS}"
    );
    Ok(Inbound {
        seconds,
        rate: args.pdus as f64 / seconds.max(1e-9),
        txn: Stats::new(txn_ms),
    })
}

/// A user of B joins a room of A with `args.members` members; the join request's duration.
async fn big_join(args: &Args, a: &TestServer, b: &TestServer, alice: &Client) -> Result<f64> {
    let room = alice
        .create_room(&json!({
            "preset": "public_chat",
            "room_alias_name": "big",
            "room_version": "12",
        }))
        .await?;
    let t = Instant::now();
    let joined = stream::iter(1..args.members)
        .map(|i| {
            let room = room.clone();
            async move {
                let member = a.register(&format!("member{i}"), PASSWORD).await?;
                member.join(&room).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(args.concurrency.max(1))
        .try_collect::<Vec<()>>()
        .await;
    joined?;
    eprintln!(
        "set-up: {} members joined A's room in {:.1} s",
        args.members - 1,
        t.elapsed().as_secs_f64()
    );

    let carol = b.register("carol", PASSWORD).await?;
    let t = Instant::now();
    carol.join(&a.alias("big")).await?;
    let join_ms = ms(t.elapsed());

    let state = carol.room_state(&room).await?;
    let members = state
        .iter()
        .filter(|e| e["type"] == "m.room.member" && e["content"]["membership"] == "join")
        .count();
    if members != args.members + 1 {
        bail!(
            "after the join B lists {members} joined members, not {}",
            args.members + 1
        );
    }
    Ok(join_ms)
}
