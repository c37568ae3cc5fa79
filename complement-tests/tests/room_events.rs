//! Room events: `PUT /rooms/{id}/send/{type}/{txnId}` (including
//! transaction-ID idempotency), `GET /rooms/{id}/event/{eventId}`, `GET
//! /rooms/{id}/messages` in both directions with token chaining, limits and
//! filters, `GET /rooms/{id}/context/{eventId}`, and redaction.

use complement_tests::{assert_error, backend_tests, enc, ok, unique_txn_id, Client, TestServer};
use serde_json::{json, Value};

/// Sends `count` messages "<prefix> i" and returns their event IDs in order.
async fn send_numbered(
    client: &Client,
    room: &str,
    prefix: &str,
    count: usize,
) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::with_capacity(count);
    for i in 0..count {
        ids.push(client.send_message(room, &format!("{prefix} {i}")).await?);
    }
    Ok(ids)
}

fn chunk_ids(body: &Value) -> Vec<String> {
    body["chunk"]
        .as_array()
        .unwrap_or_else(|| panic!("/messages without a chunk array: {body}"))
        .iter()
        .map(|e| e["event_id"].as_str().expect("event_id").to_owned())
        .collect()
}

/// Pages through `/messages` in `dir` from `from` (or the default end) with
/// `limit`, following `end` until it is omitted; returns every event ID in
/// the order received. Panics if the chain does not terminate.
async fn paginate(
    client: &Client,
    room: &str,
    dir: &str,
    from: Option<&str>,
    limit: u32,
    filter: Option<&str>,
) -> anyhow::Result<Vec<Value>> {
    let limit = limit.to_string();
    let mut token = from.map(str::to_owned);
    let mut events = Vec::new();
    for _ in 0..100 {
        let mut params: Vec<(&str, &str)> = vec![("dir", dir), ("limit", &limit)];
        if let Some(token) = &token {
            params.push(("from", token));
        }
        if let Some(filter) = filter {
            params.push(("filter", filter));
        }
        let page = client.messages(room, &params).await?;
        assert!(
            page["start"].is_string(),
            "/messages must return `start`: {page}"
        );
        let chunk = page["chunk"].as_array().cloned().unwrap_or_default();
        assert!(
            chunk.len() <= limit.parse::<usize>().unwrap_or(usize::MAX),
            "chunk longer than limit {limit}: {page}"
        );
        let empty = chunk.is_empty();
        events.extend(chunk);
        match page["end"].as_str() {
            Some(end) if !empty => token = Some(end.to_owned()),
            _ => return Ok(events),
        }
    }
    panic!("/messages pagination did not end after 100 pages");
}

fn bodies(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect()
}

/// Sending returns an event ID; retrying with the same transaction ID
/// returns the same event ID and does not send twice (also after a token
/// refresh), while the same transaction ID from another device or on
/// another path is a new request; `GET /event` returns the event in
/// client format; an unknown event is 404.
async fn send_and_get_event(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let room = alice
        .create_room(&json!({"preset": "private_chat"}))
        .await?;

    let txn = unique_txn_id();
    let path = format!("/rooms/{}/send/m.room.message/{txn}", enc(&room));
    let content = json!({"msgtype": "m.text", "body": "only once"});
    let first = ok(alice.put(&path, &content).await?);
    let event_id = first["event_id"].as_str().expect("event_id").to_owned();
    assert!(event_id.starts_with('$'));
    let retry = ok(alice.put(&path, &content).await?);
    assert_eq!(retry["event_id"], event_id, "same txn id, same event");

    let recent = alice
        .messages(&room, &[("dir", "b"), ("limit", "50")])
        .await?;
    let copies = recent["chunk"]
        .as_array()
        .expect("chunk")
        .iter()
        .filter(|e| e["content"]["body"] == "only once")
        .count();
    assert_eq!(copies, 1, "a retried transaction must not send twice");

    // Transaction IDs are scoped to a device: another device of the same
    // user using the same path sends a new event...
    let other_device = server
        .login("alice", "alice-password", Some("OTHERDEV"))
        .await?;
    let other = ok(other_device.put(&path, &content).await?);
    assert_ne!(other["event_id"], event_id, "txn IDs are per device");
    // ...and to an endpoint: the same txn ID in another room is distinct.
    let room2 = alice
        .create_room(&json!({"preset": "private_chat"}))
        .await?;
    let elsewhere = ok(alice
        .put(
            &format!("/rooms/{}/send/m.room.message/{txn}", enc(&room2)),
            &content,
        )
        .await?);
    assert_ne!(
        elsewhere["event_id"], event_id,
        "the same txn ID on another path (another room) is a new request, not a retry"
    );
    // A refreshed access token keeps the device, so a retry after a
    // refresh is still the same transaction.
    let login = ok(server
        .anonymous()
        .post(
            "/login",
            &json!({
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": "alice"},
                "password": "alice-password",
                "refresh_token": true,
            }),
        )
        .await?);
    let session = server
        .anonymous()
        .with_access_token(login["access_token"].as_str());
    let retried_path = format!(
        "/rooms/{}/send/m.room.message/{}",
        enc(&room),
        unique_txn_id()
    );
    let before_refresh = ok(session.put(&retried_path, &content).await?);
    let refreshed = ok(server
        .anonymous()
        .post(
            "/refresh",
            &json!({"refresh_token": login["refresh_token"]}),
        )
        .await?);
    let session = session.with_access_token(refreshed["access_token"].as_str());
    let after_refresh = ok(session.put(&retried_path, &content).await?);
    assert_eq!(
        after_refresh["event_id"], before_refresh["event_id"],
        "a retry after refreshing the token is the same transaction"
    );

    let event = ok(alice
        .get(&format!("/rooms/{}/event/{}", enc(&room), enc(&event_id)))
        .await?);
    assert_eq!(event["event_id"], event_id);
    assert_eq!(event["room_id"], room);
    assert_eq!(event["type"], "m.room.message");
    assert_eq!(event["sender"], alice.user_id);
    assert_eq!(event["content"], content);
    assert!(event["origin_server_ts"].is_u64());

    let missing = alice
        .get(&format!(
            "/rooms/{}/event/{}",
            enc(&room),
            enc("$doesnotexist")
        ))
        .await?;
    assert_error(&missing, 404, "M_NOT_FOUND");

    // A custom event type goes through as-is.
    let custom = alice
        .send_event(&room, "com.example.ping", &json!({"n": 7}))
        .await?;
    let got = ok(alice
        .get(&format!("/rooms/{}/event/{}", enc(&room), enc(&custom)))
        .await?);
    assert_eq!(got["type"], "com.example.ping");
    assert_eq!(got["content"]["n"], 7);
    Ok(())
}

/// `/messages` backwards from the end and forwards from the start, with
/// `end` tokens chained until omitted; events come in order, none
/// repeated or lost; `from` tokens from one direction work in the
/// other; `filter` restricts types.
async fn messages_pagination(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let room = alice
        .create_room(&json!({"preset": "private_chat", "name": "Paged"}))
        .await?;
    let sent = send_numbered(&alice, &room, "msg", 7).await?;
    let expected: Vec<String> = (0..7).map(|i| format!("msg {i}")).collect();

    // Backwards from the end, in pages of 3, down to the create event.
    let backwards = paginate(&alice, &room, "b", None, 3, None).await?;
    let mut ids: Vec<&str> = backwards
        .iter()
        .filter_map(|e| e["event_id"].as_str())
        .collect();
    let total = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), total, "backward pagination repeated an event");
    let mut back_bodies = bodies(&backwards);
    back_bodies.reverse();
    assert_eq!(back_bodies, expected);
    assert_eq!(
        backwards.last().map(|e| e["type"].clone()),
        Some(json!("m.room.create")),
        "backward pagination ends at the create event"
    );
    assert_eq!(backwards[0]["event_id"], sent[6], "newest first");

    // Forwards from the start (no `from`).
    let forwards = paginate(&alice, &room, "f", None, 3, None).await?;
    assert_eq!(
        forwards[0]["type"], "m.room.create",
        "forward pagination starts at creation"
    );
    assert_eq!(bodies(&forwards), expected);
    assert_eq!(
        forwards.len(),
        backwards.len(),
        "both directions see the same events"
    );

    // A backward `end` token, used forwards, yields exactly what follows it.
    let page = alice
        .messages(&room, &[("dir", "b"), ("limit", "3")])
        .await?;
    assert_eq!(
        chunk_ids(&page),
        vec![sent[6].clone(), sent[5].clone(), sent[4].clone()]
    );
    let end = page["end"]
        .as_str()
        .expect("more history remains, so `end` is set")
        .to_owned();
    let after = alice
        .messages(&room, &[("dir", "f"), ("from", &end), ("limit", "10")])
        .await?;
    assert_eq!(chunk_ids(&after), sent[4..].to_vec());

    // A type filter.
    let filter = json!({"types": ["m.room.message"]}).to_string();
    let only_messages = paginate(&alice, &room, "b", None, 4, Some(&filter)).await?;
    assert!(
        only_messages.iter().all(|e| e["type"] == "m.room.message"),
        "filter ignored"
    );
    assert_eq!(only_messages.len(), 7);
    let not_messages = json!({"not_types": ["m.room.message"]}).to_string();
    let rest = paginate(&alice, &room, "b", None, 50, Some(&not_messages)).await?;
    assert!(rest.iter().all(|e| e["type"] != "m.room.message"));
    assert!(rest.iter().any(|e| e["type"] == "m.room.name"));

    // A limit larger than the room returns everything in one page.
    let all = alice
        .messages(&room, &[("dir", "b"), ("limit", "1000")])
        .await?;
    assert_eq!(chunk_ids(&all).len(), backwards.len());

    // Non-members cannot read.
    let eve = server.register("eve", "eve-password").await?;
    let denied = eve
        .get(&format!("/rooms/{}/messages?dir=b", enc(&room)))
        .await?;
    assert_error(&denied, 403, "M_FORBIDDEN");
    Ok(())
}

/// `/context/{eventId}` returns the event, events before it (newest
/// first) and after it (oldest first), tokens, and the state.
async fn event_context(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let room = alice
        .create_room(&json!({"preset": "private_chat"}))
        .await?;
    let sent = send_numbered(&alice, &room, "ctx", 5).await?;

    let body = ok(alice
        .get(&format!(
            "/rooms/{}/context/{}?limit=20",
            enc(&room),
            enc(&sent[2])
        ))
        .await?);
    assert_eq!(body["event"]["event_id"], sent[2]);
    assert_eq!(body["event"]["content"]["body"], "ctx 2");
    let before = chunk_ids(&json!({"chunk": body["events_before"]}));
    assert_eq!(
        before[..2],
        [sent[1].clone(), sent[0].clone()],
        "events_before newest first"
    );
    let after = chunk_ids(&json!({"chunk": body["events_after"]}));
    assert_eq!(after, sent[3..].to_vec(), "events_after oldest first");
    assert!(
        body["start"].is_string() && body["end"].is_string(),
        "tokens: {body}"
    );
    let state = body["state"].as_array().expect("state array");
    assert!(state.iter().any(|e| e["type"] == "m.room.create"));

    // The limit bounds the sum of both sides; the event is always returned.
    let small = ok(alice
        .get(&format!(
            "/rooms/{}/context/{}?limit=2",
            enc(&room),
            enc(&sent[2])
        ))
        .await?);
    assert_eq!(small["event"]["event_id"], sent[2]);
    let count = small["events_before"].as_array().map_or(0, Vec::len)
        + small["events_after"].as_array().map_or(0, Vec::len);
    assert!(count <= 2, "limit=2 returned {count} context events");
    let zero = ok(alice
        .get(&format!(
            "/rooms/{}/context/{}?limit=0",
            enc(&room),
            enc(&sent[2])
        ))
        .await?);
    assert_eq!(zero["event"]["event_id"], sent[2]);

    // The `end` token continues forwards in /messages.
    let end = small["end"].as_str().expect("end token").to_owned();
    let next = alice
        .messages(&room, &[("dir", "f"), ("from", &end), ("limit", "10")])
        .await?;
    let next_ids = chunk_ids(&next);
    assert_eq!(
        next_ids.last(),
        sent.last(),
        "paginating on from the context reaches the newest event"
    );
    assert!(
        !next_ids.contains(&sent[2]),
        "the context event is not repeated"
    );

    let missing = alice
        .get(&format!("/rooms/{}/context/{}", enc(&room), enc("$nope")))
        .await?;
    assert_error(&missing, 404, "M_NOT_FOUND");
    Ok(())
}

/// After `PUT /redact`, the event is served with empty content and the
/// redaction under `unsigned.redacted_because`; a power-0 member may not
/// redact someone else's event.
async fn redaction(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let bob = server.register("bob", "bob-password").await?;
    let room = alice.create_room(&json!({"preset": "public_chat"})).await?;
    bob.join(&room).await?;
    let target = alice.send_message(&room, "regrettable").await?;

    let denied = bob
        .put(
            &format!(
                "/rooms/{}/redact/{}/{}",
                enc(&room),
                enc(&target),
                unique_txn_id()
            ),
            &json!({"reason": "not yours"}),
        )
        .await?;
    assert_error(&denied, 403, "M_FORBIDDEN");

    let redaction = ok(alice
        .put(
            &format!(
                "/rooms/{}/redact/{}/{}",
                enc(&room),
                enc(&target),
                unique_txn_id()
            ),
            &json!({"reason": "oops"}),
        )
        .await?);
    let redaction_id = redaction["event_id"]
        .as_str()
        .expect("redaction event_id")
        .to_owned();

    let event = ok(bob
        .get(&format!("/rooms/{}/event/{}", enc(&room), enc(&target)))
        .await?);
    assert_eq!(event["event_id"], target);
    assert_eq!(event["type"], "m.room.message");
    assert_eq!(
        event["content"],
        json!({}),
        "redacted content is emptied: {event}"
    );
    let because = &event["unsigned"]["redacted_because"];
    assert_eq!(
        because["type"], "m.room.redaction",
        "redacted_because: {event}"
    );
    assert_eq!(because["event_id"], redaction_id);
    assert_eq!(because["content"]["reason"], "oops");

    let page = bob
        .messages(&room, &[("dir", "b"), ("limit", "10")])
        .await?;
    let chunk = page["chunk"].as_array().expect("chunk");
    let in_timeline = chunk
        .iter()
        .find(|e| e["event_id"] == target)
        .expect("still in the timeline");
    assert_eq!(in_timeline["content"], json!({}));
    let redaction_event = chunk
        .iter()
        .find(|e| e["event_id"] == redaction_id)
        .expect("redaction in timeline");
    assert_eq!(redaction_event["type"], "m.room.redaction");

    // Users may redact their own events.
    let own = bob.send_message(&room, "bob's own").await?;
    ok(bob
        .put(
            &format!(
                "/rooms/{}/redact/{}/{}",
                enc(&room),
                enc(&own),
                unique_txn_id()
            ),
            &json!({}),
        )
        .await?);
    let own_event = ok(alice
        .get(&format!("/rooms/{}/event/{}", enc(&room), enc(&own)))
        .await?);
    assert_eq!(own_event["content"], json!({}));
    Ok(())
}

backend_tests!(
    send_and_get_event,
    messages_pagination,
    event_context,
    redaction
);
