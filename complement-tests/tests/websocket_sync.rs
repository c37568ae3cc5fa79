//! The WebSocket sync extension `dev.myelin.ws_sync` v1 (docs/websocket-sync.md): discovery,
//! the upgrade's checks (subprotocol, header token), the `auth` frame and its timeout,
//! batches with the same tokens as `GET /sync` (both ways), the ack window and coalescing,
//! resuming without losing or repeating to-device messages, tunnelled requests, one stream
//! per device, token death, protocol errors and the shutdown close.

use complement_tests::client::sync::timeline_ids;
use complement_tests::ws::{self, next_batch, ConnectOptions, Connected, WsClient};
use complement_tests::{backend_tests, enc, success, unique_txn_id, Client, TestServer};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// Two users in one room: alice (who creates it) and bob.
async fn pair(server: &TestServer) -> anyhow::Result<(Client, Client, String)> {
    let alice = server.register("alice", "alice-password").await?;
    let bob = server.register("bob", "bob-password").await?;
    let room = alice
        .create_room(&json!({"preset": "public_chat", "name": "WS"}))
        .await?;
    bob.join(&room).await?;
    Ok((alice, bob, room))
}

async fn open(server: &TestServer, c: &Client) -> anyhow::Result<WsClient> {
    let token = c.access_token.as_deref().unwrap_or_default();
    Ok(ws::open(server.base_url(), token).await?.0)
}

/// Bodies of the `m.room.message` events of a room in a sync body.
fn bodies(sync: &Value, room: &str) -> Vec<String> {
    complement_tests::client::sync::message_bodies(sync, room)
}

/// The `content.n` of the to-device events of a sync body.
fn to_device_ns(sync: &Value) -> Vec<i64> {
    sync["to_device"]["events"]
        .as_array()
        .map(|evs| {
            evs.iter()
                .filter_map(|e| e["content"]["n"].as_i64())
                .collect()
        })
        .unwrap_or_default()
}

async fn send_to_device(from: &Client, to: &Client, n: i64) -> anyhow::Result<()> {
    let res = from
        .put(
            &format!("/sendToDevice/m.test/{}", enc(&unique_txn_id())),
            &json!({"messages": {to.user_id.clone(): {to.device_id.clone(): {"n": n}}}}),
        )
        .await?;
    success(res, "sendToDevice").map(drop)
}

/// Discovery, the upgrade's refusals, `hello`, the first batch (at once, even when empty)
/// and a live batch after another user's send.
async fn hello_first_and_live_batch(server: TestServer) -> anyhow::Result<()> {
    let versions = success(
        server.anonymous().get("/_matrix/client/versions").await?,
        "versions",
    )?;
    assert_eq!(
        versions["unstable_features"]["dev.myelin.ws_sync"],
        json!(true),
        "advertised: {versions}"
    );
    let (alice, bob, room) = pair(&server).await?;
    let token = alice.access_token.clone().unwrap_or_default();

    // No subprotocol, or an unknown one: 400 M_UNRECOGNIZED, no upgrade.
    for opts in [
        ConnectOptions {
            token: Some(&token),
            no_protocol: true,
            ..Default::default()
        },
        ConnectOptions {
            token: Some(&token),
            protocol: Some("dev.myelin.ws_sync.v9"),
            ..Default::default()
        },
    ] {
        match ws::connect(server.base_url(), opts).await? {
            Connected::Refused(status, body) => {
                assert_eq!(status, 400, "{body}");
                assert_eq!(body["errcode"], "M_UNRECOGNIZED", "{body}");
            }
            Connected::Open(_) => panic!("upgraded without the subprotocol"),
        }
    }
    // A bad header token: 401 as over REST.
    let bad = ConnectOptions {
        token: Some("not-a-token"),
        ..Default::default()
    };
    match ws::connect(server.base_url(), bad).await? {
        Connected::Refused(status, body) => {
            assert_eq!(status, 401, "{body}");
            assert_eq!(body["errcode"], "M_UNKNOWN_TOKEN", "{body}");
            assert_eq!(body["soft_logout"], false, "{body}");
        }
        Connected::Open(_) => panic!("upgraded with a bad token"),
    }

    let (mut sock, hello) = ws::open(server.base_url(), &token).await?;
    assert_eq!(hello["version"], "v1");
    assert_eq!(hello["user_id"], alice.user_id.as_str());
    assert_eq!(hello["device_id"], alice.device_id.as_str());
    assert_eq!(hello["max_window"], 8);
    assert!(hello["heartbeat_interval_ms"].as_u64().is_some(), "{hello}");

    // Initial: the room with its state.
    sock.send(&json!({"type": "sync"})).await?;
    let first = sock.next_batch().await?;
    assert!(first["rooms"]["join"][&room].is_object(), "{first}");
    let t1 = next_batch(&first)?;
    sock.send(&json!({"type": "ack", "next_batch": t1})).await?;

    // Live: bob sends, alice's socket pushes it without being asked.
    let ev = bob.send_message(&room, "pushed").await?;
    let live = sock.next_batch().await?;
    assert_eq!(timeline_ids(&live, &room), vec![ev.clone()], "{live}");
    let t2 = next_batch(&live)?;
    assert_ne!(t1, t2);

    // Restart the stream from the newest token: the first batch comes at once, empty.
    sock.send(&json!({"type": "sync", "since": t2})).await?;
    let empty = sock.next_batch().await?;
    assert!(
        empty["rooms"]["join"]
            .as_object()
            .is_some_and(|j| j.is_empty()),
        "{empty}"
    );
    assert!(next_batch(&empty).is_ok());

    // ping → pong with the id.
    sock.send(&json!({"type": "ping", "id": "p1", "set_presence": "online"}))
        .await?;
    let pong = sock.next_of("pong", &[]).await?;
    assert_eq!(pong["id"], "p1");
    Ok(())
}

/// The socket's tokens are `/v3/sync` tokens, both ways.
async fn same_tokens_as_http(server: TestServer) -> anyhow::Result<()> {
    let (alice, bob, room) = pair(&server).await?;
    let mut sock = open(&server, &alice).await?;
    sock.send(&json!({"type": "sync"})).await?;
    let t1 = next_batch(&sock.next_batch().await?)?;
    drop(sock);

    // Socket token → HTTP.
    let a = bob.send_message(&room, "after ws").await?;
    let http = alice.sync(Some(&t1), Some(0), None).await?;
    assert_eq!(timeline_ids(&http, &room), vec![a.clone()], "{http}");
    let t2 = next_batch(&http)?;

    // HTTP token → socket.
    let b = bob.send_message(&room, "after http").await?;
    let mut sock = open(&server, &alice).await?;
    sock.send(&json!({"type": "sync", "since": t2})).await?;
    let resumed = sock.next_batch().await?;
    assert_eq!(timeline_ids(&resumed, &room), vec![b], "{resumed}");
    Ok(())
}

/// window=1: while a batch is unacknowledged nothing more is sent; the batch after the ack
/// covers the whole burst.
async fn window_coalescing(server: TestServer) -> anyhow::Result<()> {
    let (alice, bob, room) = pair(&server).await?;
    let mut sock = open(&server, &alice).await?;
    sock.send(&json!({"type": "sync", "window": 1})).await?;
    let t1 = next_batch(&sock.next_batch().await?)?;
    // Not acknowledged yet: the burst waits.
    let mut sent = Vec::new();
    for i in 0..5 {
        sent.push(format!("burst {i}"));
        bob.send_message(&room, &format!("burst {i}")).await?;
    }
    sock.send(&json!({"type": "ack", "next_batch": t1})).await?;
    // The first frame after the ack is one batch with all five.
    let batch = sock.next_batch().await?;
    assert_eq!(bodies(&batch, &room), sent, "{batch}");

    // An ack of a token that was never sent: a non-fatal error.
    sock.send(&json!({"type": "ack", "next_batch": t1})).await?;
    let err = sock.next_of("error", &[]).await?;
    assert_eq!(err["errcode"], "M_INVALID_PARAM", "{err}");
    assert_eq!(err["fatal"], false, "{err}");

    // window=2: two batches may be in flight.
    let t0 = next_batch(&batch)?;
    sock.send(&json!({"type": "sync", "since": t0, "window": 2}))
        .await?;
    let _ = sock.next_batch().await?;
    bob.send_message(&room, "one").await?;
    let one = sock.next_batch().await?;
    assert_eq!(bodies(&one, &room), vec!["one"], "{one}");
    // Both slots taken now: the next two wait for an ack, then come together.
    bob.send_message(&room, "two").await?;
    bob.send_message(&room, "three").await?;
    sock.send(&json!({"type": "ack", "next_batch": next_batch(&one)?}))
        .await?;
    let rest = sock.next_batch().await?;
    assert_eq!(bodies(&rest, &room), vec!["two", "three"], "{rest}");
    Ok(())
}

/// To-device messages survive a killed socket until acknowledged, and are not repeated
/// after an ack.
async fn resume_without_loss_or_duplicates(server: TestServer) -> anyhow::Result<()> {
    let (alice, bob, _room) = pair(&server).await?;
    let mut sock = open(&server, &alice).await?;
    sock.send(&json!({"type": "sync", "window": 2})).await?;
    let t0 = next_batch(&sock.next_batch().await?)?;
    sock.send(&json!({"type": "ack", "next_batch": t0})).await?;

    // Delivered but never acknowledged: 1, then 2 in a second batch (computed from the
    // first batch's token, which must not delete 1).
    send_to_device(&bob, &alice, 1).await?;
    let b1 = sock.next_batch().await?;
    assert_eq!(to_device_ns(&b1), vec![1], "{b1}");
    send_to_device(&bob, &alice, 2).await?;
    let b2 = sock.next_batch().await?;
    assert_eq!(to_device_ns(&b2), vec![2], "{b2}");
    // Killed without a close; 3 is sent while no socket is open.
    drop(sock);
    send_to_device(&bob, &alice, 3).await?;

    // Resume from the last processed token: 1, 2 and 3, once each.
    let mut sock = open(&server, &alice).await?;
    sock.send(&json!({"type": "sync", "since": t0})).await?;
    let again = sock.next_batch().await?;
    assert_eq!(to_device_ns(&again), vec![1, 2, 3], "{again}");
    let t1 = next_batch(&again)?;
    sock.send(&json!({"type": "ack", "next_batch": t1})).await?;
    // Acknowledged: gone, even when a client resumes from an older token.
    send_to_device(&bob, &alice, 4).await?;
    let b4 = sock.next_batch().await?;
    assert_eq!(to_device_ns(&b4), vec![4], "{b4}");
    drop(sock);
    let mut sock = open(&server, &alice).await?;
    sock.send(&json!({"type": "sync", "since": t0})).await?;
    let after_ack = sock.next_batch().await?;
    assert_eq!(to_device_ns(&after_ack), vec![4], "{after_ack}");
    Ok(())
}

/// Tunnelled requests run through the REST handlers; others are 404 M_UNRECOGNIZED.
async fn tunnelled_requests(server: TestServer) -> anyhow::Result<()> {
    let (alice, _bob, room) = pair(&server).await?;
    let mut sock = open(&server, &alice).await?;
    sock.send(&json!({"type": "sync"})).await?;
    let t1 = next_batch(&sock.next_batch().await?)?;
    sock.send(&json!({"type": "ack", "next_batch": t1})).await?;

    let path = format!(
        "/_matrix/client/v3/rooms/{}/send/m.room.message/t42",
        enc(&room)
    );
    let content = json!({"msgtype": "m.text", "body": "tunnelled"});
    sock.send(
        &json!({"type": "request", "id": "r1", "method": "PUT", "path": path, "body": content}),
    )
    .await?;
    // The response and the remote echo, in either order.
    let mut response = None;
    let mut echo = None;
    while response.is_none() || echo.is_none() {
        let f = sock.next().await?;
        match f["type"].as_str() {
            Some("response") => response = Some(f),
            Some("sync") => echo = Some(f["body"].clone()),
            _ => anyhow::bail!("unexpected frame {f}"),
        }
    }
    let response = response.unwrap_or_default();
    let echo = echo.unwrap_or_default();
    assert_eq!(response["id"], "r1");
    assert_eq!(response["status"], 200, "{response}");
    let event_id = response["body"]["event_id"].as_str().unwrap_or_default();
    let timeline = complement_tests::client::sync::timeline(&echo, &room);
    assert_eq!(timeline.len(), 1, "{echo}");
    assert_eq!(timeline[0]["event_id"], event_id, "{echo}");
    assert_eq!(timeline[0]["unsigned"]["transaction_id"], "t42", "{echo}");
    // The same transaction again: the same event (REST idempotency).
    sock.send(
        &json!({"type": "request", "id": "r2", "method": "PUT", "path": path, "body": content}),
    )
    .await?;
    let again = sock.next_of("response", &[]).await?;
    assert_eq!(again["id"], "r2");
    assert_eq!(again["body"]["event_id"], event_id, "{again}");
    // The REST handler's own errors come back as they are.
    let bad_room = "/_matrix/client/v3/rooms/not-a-room/send/m.room.message/t1";
    sock.send(
        &json!({"type": "request", "id": "r3", "method": "PUT", "path": bad_room, "body": content}),
    )
    .await?;
    let bad = sock.next_of("response", &[]).await?;
    assert_eq!(bad["status"], 400, "{bad}");
    assert_eq!(bad["body"]["errcode"], "M_INVALID_PARAM", "{bad}");

    // Outside the allowlist.
    for (method, path) in [
        ("GET", "/_matrix/client/v3/joined_rooms"),
        ("POST", "/_matrix/client/v3/createRoom"),
        ("GET", "/_matrix/client/v3/sync"),
    ] {
        sock.send(&json!({"type": "request", "id": "x", "method": method, "path": path}))
            .await?;
        let r = sock.next_of("response", &[]).await?;
        assert_eq!(r["status"], 404, "{method} {path}: {r}");
        assert_eq!(r["body"]["errcode"], "M_UNRECOGNIZED", "{r}");
    }
    // Nothing was created by the refused createRoom.
    let rooms = success(alice.get("/joined_rooms").await?, "joined_rooms")?;
    assert_eq!(rooms["joined_rooms"], json!([room]), "{rooms}");
    Ok(())
}

/// A second sync stream of the same device closes the first with 4409; another device's
/// stream is not affected.
async fn superseded(server: TestServer) -> anyhow::Result<()> {
    let (alice, _bob, room) = pair(&server).await?;
    let mut old = open(&server, &alice).await?;
    old.send(&json!({"type": "sync"})).await?;
    let _ = old.next_batch().await?;
    let other_device = server.login("alice", "alice-password", None).await?;
    let mut other = open(&server, &other_device).await?;
    other.send(&json!({"type": "sync"})).await?;
    let t = next_batch(&other.next_batch().await?)?;
    other.send(&json!({"type": "ack", "next_batch": t})).await?;

    let mut new = open(&server, &alice).await?;
    new.send(&json!({"type": "sync"})).await?;
    let _ = new.next_batch().await?;
    let (code, _) = old.closed().await?;
    assert_eq!(code, Some(4409));
    // The other device still streams.
    let ev = alice.send_message(&room, "still here").await?;
    let b = other.next_batch().await?;
    assert_eq!(timeline_ids(&b, &room), vec![ev]);
    Ok(())
}

/// Logging out ends the socket: a fatal `M_UNKNOWN_TOKEN` error, then 4401.
async fn logout_closes_4401(server: TestServer) -> anyhow::Result<()> {
    let (alice, _bob, _room) = pair(&server).await?;
    let mut sock = open(&server, &alice).await?;
    sock.send(&json!({"type": "sync"})).await?;
    let _ = sock.next_batch().await?;
    success(alice.post("/logout", &json!({})).await?, "logout")?;
    let (code, frames) = sock.closed().await?;
    assert_eq!(code, Some(4401), "{frames:?}");
    let err = frames
        .iter()
        .find(|f| f["type"] == "error")
        .cloned()
        .unwrap_or_default();
    assert_eq!(err["errcode"], "M_UNKNOWN_TOKEN", "{frames:?}");
    assert_eq!(err["fatal"], true, "{frames:?}");
    Ok(())
}

/// The `auth` frame path (no header), bad tokens, the auth timeout (1 s here).
async fn auth_frame(server: TestServer) -> anyhow::Result<()> {
    let (alice, bob, room) = pair(&server).await?;
    let token = alice.access_token.clone().unwrap_or_default();
    let unauthenticated = async || -> anyhow::Result<WsClient> {
        match ws::connect(server.base_url(), ConnectOptions::default()).await? {
            Connected::Open(ws) => Ok(*ws),
            Connected::Refused(s, b) => anyhow::bail!("refused: {s} {b}"),
        }
    };
    // A good auth frame: hello, then the stream works.
    let mut sock = unauthenticated().await?;
    sock.send(&json!({"type": "auth", "access_token": token}))
        .await?;
    let hello = sock.next_of("hello", &[]).await?;
    assert_eq!(hello["user_id"], alice.user_id.as_str());
    sock.send(&json!({"type": "sync"})).await?;
    let t = next_batch(&sock.next_batch().await?)?;
    sock.send(&json!({"type": "ack", "next_batch": t})).await?;
    let ev = bob.send_message(&room, "to the auth-frame socket").await?;
    assert_eq!(timeline_ids(&sock.next_batch().await?, &room), vec![ev]);
    drop(sock);

    // A bad token: fatal error, 4401.
    let mut sock = unauthenticated().await?;
    sock.send(&json!({"type": "auth", "access_token": "nope"}))
        .await?;
    let (code, frames) = sock.closed().await?;
    assert_eq!(code, Some(4401), "{frames:?}");
    assert_eq!(
        frames.first().map(|f| f["errcode"].clone()),
        Some(json!("M_UNKNOWN_TOKEN"))
    );

    // Another frame before auth: 4401 as well.
    let mut sock = unauthenticated().await?;
    sock.send(&json!({"type": "sync"})).await?;
    let (code, frames) = sock.closed().await?;
    assert_eq!(code, Some(4401), "{frames:?}");
    assert_eq!(
        frames.first().map(|f| f["errcode"].clone()),
        Some(json!("M_MISSING_TOKEN"))
    );

    // Silence: 4408 once the (configured) auth timeout passes.
    let mut sock = unauthenticated().await?;
    let (code, _) = sock.closed().await?;
    assert_eq!(code, Some(4408));
    Ok(())
}

/// Binary → 1003, malformed → 4400, too large → 1009; unknown types and bad `since` are
/// non-fatal errors.
async fn protocol_errors(server: TestServer) -> anyhow::Result<()> {
    let (alice, _bob, _room) = pair(&server).await?;

    let mut sock = open(&server, &alice).await?;
    sock.send(&json!({"type": "frobnicate"})).await?;
    let err = sock.next_of("error", &[]).await?;
    assert_eq!(err["errcode"], "M_UNRECOGNIZED", "{err}");
    assert_eq!(err["fatal"], false, "{err}");
    sock.send(&json!({"type": "sync", "since": "garbage"}))
        .await?;
    let err = sock.next_of("error", &[]).await?;
    assert_eq!(err["errcode"], "M_INVALID_PARAM", "{err}");
    assert_eq!(err["fatal"], false, "{err}");
    sock.send(&json!({"type": "sync", "window": 9})).await?;
    let err = sock.next_of("error", &[]).await?;
    assert_eq!(err["errcode"], "M_INVALID_PARAM", "{err}");
    // Still usable after those.
    sock.send(&json!({"type": "ping", "id": "still"})).await?;
    assert_eq!(sock.next_of("pong", &[]).await?["id"], "still");

    sock.send_raw(Message::Binary(vec![1, 2, 3].into())).await?;
    let (code, _) = sock.closed().await?;
    assert_eq!(code, Some(1003));

    for bad in [
        "not json",
        "[1,2]",
        "{\"no\":\"type\"}",
        "{\"type\":\"ack\"}",
    ] {
        let mut sock = open(&server, &alice).await?;
        sock.send_raw(Message::Text(bad.into())).await?;
        let (code, frames) = sock.closed().await?;
        assert_eq!(code, Some(4400), "{bad}: {frames:?}");
        assert_eq!(
            frames.first().map(|f| f["fatal"].clone()),
            Some(json!(true)),
            "{bad}"
        );
    }

    // Over the configured 4096-byte limit.
    let mut sock = open(&server, &alice).await?;
    let big = json!({"type": "ping", "id": "x".repeat(5000)});
    sock.send(&big).await?;
    let (code, _) = sock.closed().await?;
    assert_eq!(code, Some(1009));
    Ok(())
}

/// A server shutting down closes its sockets with 1001.
async fn shutdown_closes_1001(server: TestServer) -> anyhow::Result<()> {
    let (alice, _bob, _room) = pair(&server).await?;
    let mut sock = open(&server, &alice).await?;
    sock.send(&json!({"type": "sync"})).await?;
    let _ = sock.next_batch().await?;
    server.terminate()?;
    let (code, _) = sock.closed().await?;
    assert_eq!(code, Some(1001));
    Ok(())
}

/// `alice`'s presence as `bob` reads it.
async fn presence_of(bob: &Client, alice: &Client) -> anyhow::Result<String> {
    let path = format!("/presence/{}/status", enc(&alice.user_id));
    let body = success(bob.get(&path).await?, "presence")?;
    Ok(body["presence"].as_str().unwrap_or_default().to_owned())
}

/// Waits (bounded) until `bob` reads `alice` as `want`.
async fn wait_presence(bob: &Client, alice: &Client, want: &str) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let got = presence_of(bob, alice).await?;
        if got == want {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "presence stayed {got:?}, expected {want:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A socket with a running stream keeps its user online, a `ping` with `set_presence` changes
/// it, and once the socket is gone the user goes offline after the grace period.
async fn presence_follows_the_socket(server: TestServer) -> anyhow::Result<()> {
    let (alice, bob, _room) = pair(&server).await?;
    assert_eq!(presence_of(&bob, &alice).await?, "offline");
    let mut sock = open(&server, &alice).await?;
    // Connected but not streaming: not syncing yet.
    assert_eq!(presence_of(&bob, &alice).await?, "offline");
    sock.send(&json!({"type": "sync"})).await?;
    sock.next_batch().await?;
    wait_presence(&bob, &alice, "online").await?;

    sock.send(&json!({"type": "ping", "id": "p1", "set_presence": "unavailable"}))
        .await?;
    let pong = sock.next_of("pong", &["sync"]).await?;
    assert_eq!(pong["id"], "p1", "{pong}");
    wait_presence(&bob, &alice, "unavailable").await?;
    sock.send(&json!({"type": "ping", "id": "p2", "set_presence": "online"}))
        .await?;
    sock.next_of("pong", &["sync"]).await?;
    wait_presence(&bob, &alice, "online").await?;

    drop(sock);
    wait_presence(&bob, &alice, "offline").await?;
    Ok(())
}

// These tests count batches exactly, so presence (whose "now online" would be a batch of its
// own) is off; `presence_follows_the_socket` below has it on.
backend_tests!(
    env = [("MYELIN_PRESENCE_ENABLED", "false")];
    hello_first_and_live_batch,
    same_tokens_as_http,
    window_coalescing,
    resume_without_loss_or_duplicates,
    tunnelled_requests,
    superseded,
    logout_closes_4401,
    shutdown_closes_1001,
);

backend_tests!(
    env = [
        ("MYELIN_PRESENCE_ENABLED", "false"),
        ("MYELIN_WS_SYNC_AUTH_TIMEOUT_MS", "1000"),
        ("MYELIN_WS_SYNC_MAX_FRAME_BYTES", "4096"),
    ];
    auth_frame,
    protocol_errors,
);

backend_tests!(
    env = [("MYELIN_PRESENCE_GRACE_MS", "1000")];
    presence_follows_the_socket,
);
