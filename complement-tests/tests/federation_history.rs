//! History a server does not hold, fetched from another: two Myelin servers on loopback.
//!
//! - Backfill: B joins a room with a long history on A; B's user paginates `/messages` back to
//!   the room's creation and gets exactly A's timeline (same events, same order) when history
//!   is `shared`, and nothing before the join when it is `joined`. `/sync` never shows the
//!   backfilled events as new.
//! - A gap: A gives up on what it queued for B while B was down (as Synapse does: it sends a
//!   server that was down only the room's latest event), so B receives an event whose parents
//!   lie further back than `/get_missing_events` fetches. B accepts it over the gap, its sync
//!   is `limited`, and paginating back fills the gap by backfill: both list the same timeline.
//! - Bad answers: A is replaced by a fake on its address that answers `/backfill` with a
//!   forged event and an event from another room; neither is stored, and the real history
//!   comes in once the real A answers again.
//!
//! The tests look into the servers' databases to see what was stored, and edit A's federation
//! queue to make it give up on B.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use complement_tests::federation::{event_id, eventually, message_event, wait_membership, WAIT};
use complement_tests::{enc, ok, pair_tests, Client, Peer, TestServer};
use myelin_core::{
    pdu::rules_for,
    ruma::{MilliSecondsSinceUnixEpoch, RoomVersionId},
};
use serde_json::{json, Value};

/// Every event `client` sees in the room, newest first, paginating `/messages` backwards
/// from `from` (or the end) in pages of `page` until there is no `end` token.
async fn history(
    client: &Client,
    room: &str,
    from: Option<&str>,
    page: u32,
) -> anyhow::Result<Vec<Value>> {
    let page = page.to_string();
    let mut from = from.map(str::to_owned);
    let mut out = Vec::new();
    for _ in 0..200 {
        let mut params = vec![("dir", "b"), ("limit", page.as_str())];
        if let Some(f) = &from {
            params.push(("from", f.as_str()));
        }
        let body = client.messages(room, &params).await?;
        out.extend(body["chunk"].as_array().into_iter().flatten().cloned());
        match body["end"].as_str() {
            Some(end) => from = Some(end.to_owned()),
            None => return Ok(out),
        }
    }
    anyhow::bail!("pagination did not end after 200 pages")
}

fn ids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| e["event_id"].as_str().map(str::to_owned))
        .collect()
}

/// A connection to a test server's database.
async fn database(server: &TestServer) -> anyhow::Result<sqlx::AnyPool> {
    sqlx::any::install_default_drivers();
    Ok(sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(server.database_url())
        .await?)
}

/// How many of `ids` the server stores at all (in the timeline or outside it).
async fn stored(server: &TestServer, ids: &[&str]) -> anyhow::Result<i64> {
    let db = database(server).await?;
    let mut n = 0;
    for id in ids {
        let c: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM events WHERE event_id = $1")
            .bind(*id)
            .fetch_one(&db)
            .await?;
        n += c;
    }
    db.close().await;
    Ok(n)
}

/// Where the server stores an event: `None` when it does not; else whether it is outside the
/// timeline (an outlier) and its stream position.
async fn placed(server: &TestServer, id: &str) -> anyhow::Result<Option<(bool, Option<i64>)>> {
    let db = database(server).await?;
    let row: Option<(i64, Option<i64>)> =
        sqlx::query_as("SELECT outlier, stream_ordering FROM events WHERE event_id = $1")
            .bind(id)
            .fetch_optional(&db)
            .await?;
    db.close().await;
    Ok(row.map(|(outlier, pos)| (outlier != 0, pos)))
}

/// The backward extremities the server records for a room.
async fn backward_extremities(server: &TestServer, room: &str) -> anyhow::Result<Vec<String>> {
    let db = database(server).await?;
    let rows: Vec<String> = sqlx::query_scalar(
        "SELECT b.event_id FROM backward_extremities b JOIN rooms r ON r.room_nid = b.room_nid \
         WHERE r.room_id = $1 ORDER BY b.event_id",
    )
    .bind(room)
    .fetch_all(&db)
    .await?;
    db.close().await;
    Ok(rows)
}

async fn backfill_to_the_start(a: TestServer, b: TestServer) -> anyhow::Result<()> {
    let alice = a.register("alice", "alice-password").await?;
    let bob = b.register("bob", "bob-password").await?;
    let bob_id = b.user_id("bob");
    // A long history, with state changes in it (their events are not part of the room's
    // current state B receives when it joins).
    let room = alice
        .create_room(&json!({"preset": "public_chat", "room_alias_name": "long"}))
        .await?;
    for i in 0..120 {
        if i % 40 == 20 {
            alice
                .send_state(
                    &room,
                    "m.room.topic",
                    "",
                    &json!({"topic": format!("topic {i}")}),
                )
                .await?;
        }
        alice.send_message(&room, &format!("message {i}")).await?;
    }
    // The same with history visible to members only from their join.
    let private = alice
        .create_room(&json!({
            "preset": "public_chat",
            "room_alias_name": "private",
            "initial_state": [{
                "type": "m.room.history_visibility",
                "state_key": "",
                "content": {"history_visibility": "joined"}
            }]
        }))
        .await?;
    for i in 0..30 {
        alice.send_message(&private, &format!("secret {i}")).await?;
    }
    bob.join(&format!("#long:{}", a.server_name())).await?;
    bob.join(&format!("#private:{}", a.server_name())).await?;
    wait_membership(&alice, &private, &bob_id, "join").await?;
    let after_join = bob.sync(None, None, None).await?;
    let since = after_join["next_batch"]
        .as_str()
        .unwrap_or_default()
        .to_owned();

    // Shared history: B's user pages back to the create event and sees A's timeline.
    let on_a = ids(&history(&alice, &room, None, 50).await?);
    let on_b = ids(&history(&bob, &room, None, 25).await?);
    assert!(on_a.len() > 120, "A's history: {} events", on_a.len());
    assert_eq!(on_b, on_a, "B's backfilled timeline is A's");
    // All but bob's join came by backfill: historical, at negative stream positions.
    for id in &on_a[1..] {
        let at = placed(&b, id).await?;
        assert!(
            matches!(at, Some((false, Some(p))) if p < 0),
            "{id} is at {at:?} on B"
        );
    }
    assert!(backward_extremities(&b, &room).await?.is_empty());
    let first = history(&bob, &room, None, 1000).await?;
    assert_eq!(
        first.last().map(|e| e["type"].clone()),
        Some(json!("m.room.create"))
    );
    // Paginating again needs no other server and gives the same.
    assert_eq!(ids(&history(&bob, &room, None, 40).await?), on_a);
    // The room's state is the same on both (the backfilled state changed nothing).
    let topic = ok(bob.get_state(&room, "m.room.topic", "").await?);
    assert_eq!(topic["topic"], "topic 100");

    // Joined-only history: none of the messages before the join, though A has them and B
    // fetched them. (The room's first events, up to the one setting the visibility, fall
    // under the default `shared` and are shown: the spec's rule, as on A.)
    let private_on_a = history(&alice, &private, None, 50).await?;
    let private_on_b = history(&bob, &private, None, 20).await?;
    let messages_on_a = private_on_a
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .count();
    assert_eq!(messages_on_a, 30);
    assert!(
        private_on_b.iter().all(|e| e["type"] != "m.room.message"),
        "no message from before the join: {private_on_b:?}"
    );
    assert_eq!(private_on_b[0]["state_key"], bob_id.as_str());
    assert_eq!(private_on_b[0]["content"]["membership"], "join");
    let hv_at = private_on_a
        .iter()
        .position(|e| e["type"] == "m.room.history_visibility")
        .unwrap_or_default();
    let mut expected = vec![ids(&private_on_a)[0].clone()];
    expected.extend(ids(&private_on_a[hv_at..]));
    assert_eq!(ids(&private_on_b), expected);
    assert_eq!(
        stored(
            &b,
            &ids(&private_on_a)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
        )
        .await?,
        private_on_a.len() as i64,
        "B holds the whole history"
    );

    // The backfilled events are not news: an incremental sync has nothing for either room.
    let later = bob.sync(Some(&since), Some(0), None).await?;
    for r in [&room, &private] {
        let timeline = later["rooms"]["join"][r.as_str()]["timeline"]["events"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            timeline.is_empty(),
            "sync after backfill shows {timeline:?}"
        );
    }
    // A first backfill that stops just after the create event (B pages 10 at a time and
    // asks for 20 events; this room has 21 before the join), which B holds only as an
    // outlier: the next round brings it into the timeline too.
    let edge = alice
        .create_room(&json!({"preset": "public_chat", "room_alias_name": "edge"}))
        .await?;
    let before = history(&alice, &edge, None, 50).await?.len();
    for i in before..21 {
        alice.send_message(&edge, &format!("edge {i}")).await?;
    }
    bob.join(&format!("#edge:{}", a.server_name())).await?;
    let edge_on_a = ids(&history(&alice, &edge, None, 50).await?);
    assert_eq!(edge_on_a.len(), 22);
    assert_eq!(ids(&history(&bob, &edge, None, 10).await?), edge_on_a);

    // A new message still arrives as news.
    let news = alice.send_message(&room, "news").await?;
    bob.sync_until(Some(&since), None, WAIT, |s| {
        complement_tests::client::sync::timeline_ids(s, &room) == vec![news.clone()]
    })
    .await?;
    Ok(())
}

/// Makes A forget what it queued for B (and its back-off), as a sender that gave up on a
/// server that was down. A must be stopped.
async fn forget_queue(a: &TestServer, b: &TestServer) -> anyhow::Result<()> {
    let db = database(a).await?;
    for table in ["federation_outbox", "federation_destinations"] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {table} WHERE destination = $1"
        )))
        .bind(b.server_name())
        .execute(&db)
        .await?;
    }
    db.close().await;
    Ok(())
}

async fn gap_after_an_outage(a: TestServer, b: TestServer) -> anyhow::Result<()> {
    let alice = a.register("alice", "alice-password").await?;
    let bob = b.register("bob", "bob-password").await?;
    let bob_id = b.user_id("bob");
    let room = alice
        .create_room(&json!({"preset": "public_chat", "room_alias_name": "gap"}))
        .await?;
    bob.join(&format!("#gap:{}", a.server_name())).await?;
    wait_membership(&alice, &room, &bob_id, "join").await?;
    let last_seen = alice.send_message(&room, "before the outage").await?;
    let since = bob
        .sync_until(None, None, WAIT, |s| {
            complement_tests::client::sync::timeline_has(s, &room, &last_seen)
        })
        .await?["next_batch"]
        .as_str()
        .unwrap_or_default()
        .to_owned();

    // B is down while A sends more than /get_missing_events fetches (50).
    b.stop(Duration::from_secs(10)).await?;
    let mut while_down = Vec::new();
    for i in 0..60 {
        while_down.push(
            alice
                .send_message(&room, &format!("while B is down {i}"))
                .await?,
        );
    }
    a.stop(Duration::from_secs(10)).await?;
    forget_queue(&a, &b).await?;
    a.restart().await?;
    b.restart().await?;
    let alice = a.login("alice", "alice-password", None).await?;
    let bob = b.login("bob", "bob-password", None).await?;
    let latest = alice.send_message(&room, "after the outage").await?;

    // B accepts it although its parents are 61 events back, and tells its user that the
    // timeline is limited.
    let synced = eventually("the event after the outage on B", || async {
        let s = bob.sync(Some(&since), Some(0), None).await?;
        Ok(complement_tests::client::sync::timeline_has(&s, &room, &latest).then_some(s))
    })
    .await?;
    let timeline = &synced["rooms"]["join"][room.as_str()]["timeline"];
    assert_eq!(timeline["limited"], true, "{timeline}");
    let shown = complement_tests::client::sync::timeline_ids(&synced, &room);
    assert_eq!(shown.last(), Some(&latest));
    let prev_batch = timeline["prev_batch"].as_str().unwrap_or_default();
    // The 50 parents /get_missing_events gave are live events; the oldest of them was
    // accepted over the gap, whose far side is a backward extremity; the rest is not held in
    // the timeline yet.
    for id in &while_down[10..] {
        let at = placed(&b, id).await?;
        assert!(
            matches!(at, Some((false, Some(p))) if p > 0),
            "{id}: {at:?}"
        );
    }
    assert!(backward_extremities(&b, &room)
        .await?
        .contains(&while_down[9]));
    for id in &while_down[..10] {
        let at = placed(&b, id).await?;
        assert!(matches!(at, None | Some((true, _))), "{id}: {at:?}");
    }

    // Paginating back from the sync fills the gap (by backfill) and meets what B held.
    let on_a = ids(&history(&alice, &room, None, 50).await?);
    let mut on_b = shown.clone();
    on_b.reverse();
    on_b.extend(ids(&history(&bob, &room, Some(prev_batch), 20).await?));
    assert_eq!(on_b, on_a, "B's timeline after the gap is A's");
    assert_eq!(ids(&history(&bob, &room, None, 30).await?), on_a);
    for id in &while_down[..10] {
        let at = placed(&b, id).await?;
        assert!(
            matches!(at, Some((false, Some(p))) if p < 0),
            "{id}: {at:?}"
        );
    }
    assert!(backward_extremities(&b, &room).await?.is_empty());

    // Both carry on together.
    let reply = bob.send_message(&room, "bob is back").await?;
    eventually("bob's reply on A", || async {
        Ok(ids(&history(&alice, &room, None, 5).await?)
            .first()
            .is_some_and(|id| *id == reply)
            .then_some(()))
    })
    .await?;
    Ok(())
}

/// A stand-in for a server on its address (HTTPS with its certificate), answering
/// `/backfill` with `answer` and every other request with 404. Records the requests.
struct FakeServer {
    task: tokio::task::JoinHandle<()>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl FakeServer {
    async fn start(like: &TestServer, answer: Value) -> anyhow::Result<FakeServer> {
        use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
        let dir = like.data_dir();
        let certs =
            CertificateDer::pem_file_iter(dir.join("tls.crt"))?.collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(dir.join("tls.key"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let port = like
            .federation_url()
            .and_then(|u| u.rsplit(':').next())
            .and_then(|p| p.parse::<u16>().ok())
            .ok_or_else(|| anyhow::anyhow!("no federation port"))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let listener = {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match tokio::net::TcpListener::bind(addr).await {
                    Ok(l) => break l,
                    Err(e) if Instant::now() > deadline => return Err(e.into()),
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        };
        let requests: Arc<Mutex<Vec<String>>> = Arc::default();
        let seen = requests.clone();
        let answer = Arc::new(answer);
        let router = axum::Router::new().fallback(move |uri: axum::http::Uri| {
            let seen = seen.clone();
            let answer = answer.clone();
            async move {
                let path = uri
                    .path_and_query()
                    .map(|p| p.to_string())
                    .unwrap_or_default();
                seen.lock().unwrap().push(path.clone());
                if path.starts_with("/_matrix/federation/v1/backfill/") {
                    (axum::http::StatusCode::OK, axum::Json((*answer).clone()))
                } else {
                    (
                        axum::http::StatusCode::NOT_FOUND,
                        axum::Json(json!({"errcode": "M_UNRECOGNIZED", "error": "fake"})),
                    )
                }
            }
        });
        let task = tokio::spawn(async move {
            // The connections go with the fake (a client keeps its connections open).
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                while connections.try_join_next().is_some() {}
                let acceptor = acceptor.clone();
                let service = hyper_util::service::TowerToHyperService::new(router.clone());
                connections.spawn(async move {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                });
            }
        });
        Ok(FakeServer { task, requests })
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An event as A serves it over federation, fetched by the test signing as B (whose user is
/// in the room).
async fn federation_event(a: &TestServer, b: &TestServer, id: &str) -> anyhow::Result<Value> {
    let path = format!("/_matrix/federation/v1/event/{}", enc(id));
    let (_, body) = Peer::new(b)?.get(a, &path).await?;
    body["pdus"][0]
        .as_object()
        .map(|o| Value::Object(o.clone()))
        .ok_or_else(|| anyhow::anyhow!("no event in {body}"))
}

async fn bad_backfill_answers(a: TestServer, b: TestServer) -> anyhow::Result<()> {
    let alice = a.register("alice", "alice-password").await?;
    let bob = b.register("bob", "bob-password").await?;
    let room = alice
        .create_room(&json!({"preset": "public_chat", "room_alias_name": "fake"}))
        .await?;
    let other_room = alice.create_room(&json!({"preset": "public_chat"})).await?;
    let mut latest = String::new();
    for i in 0..5 {
        latest = alice.send_message(&room, &format!("message {i}")).await?;
    }
    bob.join(&format!("#fake:{}", a.server_name())).await?;
    let on_a = ids(&history(&alice, &room, None, 50).await?);

    // The event B's join follows, with its signature replaced by one from another key: the
    // same event ID, a forged signature.
    let genuine = federation_event(&a, &b, &latest).await?;
    let mut forged = genuine.clone();
    let as_a = Peer::new(&a)?;
    let impostor = as_a.impostor_key()?;
    let mut unsigned_copy = genuine.clone();
    if let Some(o) = unsigned_copy.as_object_mut() {
        o.remove("signatures");
        o.remove("unsigned");
    }
    let mut resigned = myelin_core::pdu::canonical_object(unsigned_copy)?;
    myelin_core::ruma::signatures::sign_event(
        a.server_name(),
        &impostor,
        &mut resigned,
        &rules_for(&RoomVersionId::V12)?.redaction,
    )?;
    forged["signatures"] = serde_json::to_value(&resigned)?["signatures"].clone();
    assert_ne!(forged["signatures"], genuine["signatures"]);
    assert_eq!(event_id(&forged)?, latest, "the forgery keeps the event ID");
    // An event of another room, properly signed by A.
    let elsewhere = as_a.build(
        &other_room,
        &a.user_id("alice"),
        &latest,
        &[],
        3,
        message_event("elsewhere")?,
    )?;
    let elsewhere_id = event_id(&elsewhere)?;

    // A is replaced by the fake, which answers every backfill with these.
    a.stop(Duration::from_secs(10)).await?;
    let fake = FakeServer::start(
        &a,
        json!({
            "origin": a.server_name(),
            "origin_server_ts": MilliSecondsSinceUnixEpoch::now().0,
            "pdus": [forged, elsewhere],
        }),
    )
    .await?;
    let seen = history(&bob, &room, None, 20).await?;
    assert_eq!(ids(&seen).len(), 1, "only bob's join: {seen:?}");
    let asked: Vec<String> = fake
        .requests()
        .into_iter()
        .filter(|r| r.starts_with("/_matrix/federation/v1/backfill/"))
        .collect();
    assert!(
        asked.iter().any(|r| r.contains(&enc(&latest))),
        "B asked the fake for the history before its join: {asked:?}"
    );
    assert_eq!(stored(&b, &[&latest, &elsewhere_id]).await?, 0);
    ok(bob.get("/_matrix/client/versions").await?);

    // The real A answers again: the real history comes in.
    drop(fake);
    a.restart().await?;
    let on_b = ids(&history(&bob, &room, None, 20).await?);
    assert_eq!(on_b, on_a);
    let ev = ok(bob
        .get(&format!("/rooms/{}/event/{}", enc(&room), enc(&latest)))
        .await?);
    assert_eq!(ev["content"]["body"], "message 4");
    assert_eq!(stored(&b, &[&elsewhere_id]).await?, 0);
    Ok(())
}

pair_tests!(
    backfill_to_the_start,
    gap_after_an_outage,
    bad_backfill_answers
);
