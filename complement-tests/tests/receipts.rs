//! Receipts and read markers: `POST /rooms/{roomId}/receipt/{receiptType}/{eventId}`,
//! `POST /rooms/{roomId}/read_markers`, and the `m.receipt` ephemeral events of `/sync`
//! (public receipts to every member, private ones to their owner only, threaded receipts kept
//! apart from unthreaded ones).

use std::time::Duration;

use complement_tests::{assert_error, backend_tests, enc, ok, Client, Response, TestServer};
use serde_json::{json, Value};

const WITHIN: Duration = Duration::from_secs(15);

fn next_batch(sync: &Value) -> String {
    sync["next_batch"].as_str().unwrap_or_default().to_owned()
}

/// The `m.receipt` events in a joined room's `ephemeral` section.
fn receipts<'a>(sync: &'a Value, room: &str) -> Vec<&'a Value> {
    sync["rooms"]["join"][room]["ephemeral"]["events"]
        .as_array()
        .map(|evs| evs.iter().filter(|e| e["type"] == "m.receipt").collect())
        .unwrap_or_default()
}

/// The receipt data `user` has of `kind` on `event` in a sync, if any.
fn receipt_of<'a>(
    sync: &'a Value,
    room: &str,
    event: &str,
    kind: &str,
    user: &str,
) -> Option<&'a Value> {
    receipts(sync, room)
        .into_iter()
        .map(|r| &r["content"][event][kind][user])
        .find(|d| !d.is_null())
}

async fn receipt(
    client: &Client,
    room: &str,
    kind: &str,
    event: &str,
    body: Value,
) -> anyhow::Result<Response> {
    client
        .post(
            &format!("/rooms/{}/receipt/{kind}/{}", enc(room), enc(event)),
            &body,
        )
        .await
}

/// Alice and Bob in a private room Alice made.
async fn two_in_a_room(server: &TestServer) -> anyhow::Result<(Client, Client, String)> {
    let alice = server.register("alice", "alice-password").await?;
    let bob = server.register("bob", "bob-password").await?;
    let room = alice
        .create_room(&json!({"preset": "private_chat", "invite": [bob.user_id]}))
        .await?;
    bob.join(&room).await?;
    Ok((alice, bob, room))
}

/// A public receipt reaches every member in an incremental sync whose only change is the
/// receipt, and an initial sync carries the latest receipts.
async fn read_receipts_reach_members(server: TestServer) -> anyhow::Result<()> {
    let (alice, bob, room) = two_in_a_room(&server).await?;
    let first = bob.send_message(&room, "one").await?;
    let bob_since = next_batch(&bob.sync(None, Some(0), None).await?);

    ok(receipt(&alice, &room, "m.read", &first, json!({})).await?);
    let seen = bob
        .sync_until(Some(&bob_since), None, WITHIN, |s| {
            receipt_of(s, &room, &first, "m.read", &alice.user_id).is_some()
        })
        .await?;
    let data = receipt_of(&seen, &room, &first, "m.read", &alice.user_id).unwrap();
    assert!(data["ts"].is_u64(), "receipt carries ts: {seen}");
    assert!(data.get("thread_id").is_none(), "unthreaded: {seen}");
    assert!(
        seen["rooms"]["join"][&room]["timeline"]["events"]
            .as_array()
            .is_none_or(|t| t.is_empty()),
        "only the receipt changed: {seen}"
    );

    // Alice reads on: the receipt moves; an older one afterwards does not move it back.
    let second = bob.send_message(&room, "two").await?;
    ok(receipt(&alice, &room, "m.read", &second, json!({})).await?);
    ok(receipt(&alice, &room, "m.read", &first, json!({})).await?);
    let initial = bob.sync(None, Some(0), None).await?;
    assert!(
        receipt_of(&initial, &room, &second, "m.read", &alice.user_id).is_some(),
        "latest receipt in the initial sync: {initial}"
    );
    assert!(
        receipt_of(&initial, &room, &first, "m.read", &alice.user_id).is_none(),
        "a receipt replaced by a later one is gone: {initial}"
    );

    // Nothing new since: an immediate sync from the latest token reports no receipt.
    let quiet = bob.sync(Some(&next_batch(&initial)), Some(0), None).await?;
    assert!(receipts(&quiet, &room).is_empty(), "{quiet}");
    Ok(())
}

/// `m.read.private` is seen by its owner only.
async fn private_receipts_stay_private(server: TestServer) -> anyhow::Result<()> {
    let (alice, bob, room) = two_in_a_room(&server).await?;
    let event = bob.send_message(&room, "secret read").await?;
    let bob_since = next_batch(&bob.sync(None, Some(0), None).await?);
    let alice_since = next_batch(&alice.sync(None, Some(0), None).await?);

    ok(receipt(&alice, &room, "m.read.private", &event, json!({})).await?);
    let own = alice
        .sync_until(Some(&alice_since), None, WITHIN, |s| {
            receipt_of(s, &room, &event, "m.read.private", &alice.user_id).is_some()
        })
        .await?;
    assert!(receipt_of(&own, &room, &event, "m.read", &alice.user_id).is_none());

    // Bob: a later public receipt of his own shows that the stream moved past Alice's private
    // one, which he never sees.
    let marker = alice.send_message(&room, "marker").await?;
    ok(receipt(&bob, &room, "m.read", &marker, json!({})).await?);
    let theirs = bob
        .sync_until(Some(&bob_since), None, WITHIN, |s| {
            receipt_of(s, &room, &marker, "m.read", &bob.user_id).is_some()
        })
        .await?;
    assert!(
        receipt_of(&theirs, &room, &event, "m.read.private", &alice.user_id).is_none(),
        "another user's private receipt leaked: {theirs}"
    );
    let initial = bob.sync(None, Some(0), None).await?;
    assert!(
        receipt_of(&initial, &room, &event, "m.read.private", &alice.user_id).is_none(),
        "leaked in an initial sync: {initial}"
    );
    let alice_initial = alice.sync(None, Some(0), None).await?;
    assert!(receipt_of(
        &alice_initial,
        &room,
        &event,
        "m.read.private",
        &alice.user_id
    )
    .is_some());
    Ok(())
}

/// Threaded receipts (`main`, a thread root) are kept apart from the unthreaded one.
async fn threaded_receipts(server: TestServer) -> anyhow::Result<()> {
    let (alice, bob, room) = two_in_a_room(&server).await?;
    let root = bob.send_message(&room, "root").await?;
    let in_thread = bob
        .send_event(
            &room,
            "m.room.message",
            &json!({"msgtype": "m.text", "body": "reply",
                    "m.relates_to": {"rel_type": "m.thread", "event_id": root}}),
        )
        .await?;
    let main = bob.send_message(&room, "main timeline").await?;

    ok(receipt(
        &alice,
        &room,
        "m.read",
        &in_thread,
        json!({"thread_id": root}),
    )
    .await?);
    ok(receipt(&alice, &room, "m.read", &main, json!({"thread_id": "main"})).await?);
    ok(receipt(&alice, &room, "m.read", &root, json!({})).await?);

    let initial = bob.sync(None, Some(0), None).await?;
    let of = |event: &str| receipt_of(&initial, &room, event, "m.read", &alice.user_id).cloned();
    assert_eq!(
        of(&in_thread).map(|d| d["thread_id"].clone()),
        Some(json!(root))
    );
    assert_eq!(
        of(&main).map(|d| d["thread_id"].clone()),
        Some(json!("main"))
    );
    let unthreaded = of(&root).expect("unthreaded receipt kept beside the threaded ones");
    assert!(unthreaded.get("thread_id").is_none(), "{initial}");

    for bad in [
        json!({"thread_id": ""}),
        json!({"thread_id": 5}),
        json!({"thread_id": "x"}),
    ] {
        let r = receipt(&alice, &room, "m.read", &main, bad).await?;
        assert_error(&r, 400, "M_INVALID_PARAM");
    }
    Ok(())
}

/// Bad receipts get the spec's errors and change nothing.
async fn bad_receipts(server: TestServer) -> anyhow::Result<()> {
    let (alice, bob, room) = two_in_a_room(&server).await?;
    let event = bob.send_message(&room, "hello").await?;
    let carol = server.register("carol", "carol-password").await?;

    let r = receipt(&alice, &room, "m.seen", &event, json!({})).await?;
    assert_error(&r, 400, "M_INVALID_PARAM");
    let r = receipt(&carol, &room, "m.read", &event, json!({})).await?;
    assert_error(&r, 403, "M_FORBIDDEN");
    let r = receipt(&alice, &room, "m.read", "$nosuchevent", json!({})).await?;
    assert_error(&r, 404, "M_NOT_FOUND");
    let r = receipt(&alice, &room, "m.read", "not-an-event-id", json!({})).await?;
    assert_error(&r, 400, "M_INVALID_PARAM");
    let r = receipt(
        &alice,
        &room,
        "m.fully_read",
        &event,
        json!({"thread_id": "main"}),
    )
    .await?;
    assert_error(&r, 400, "M_INVALID_PARAM");
    let r = alice
        .raw(
            reqwest::Method::POST,
            &format!("/rooms/{}/receipt/m.read/{}", enc(&room), enc(&event)),
            Some(b"{not json".to_vec()),
            Some("application/json"),
        )
        .await?;
    assert_error(&r, 400, "M_NOT_JSON");
    // An event of another room.
    let other = carol.create_room(&json!({})).await?;
    let elsewhere = carol.send_message(&other, "elsewhere").await?;
    let r = receipt(&alice, &room, "m.read", &elsewhere, json!({})).await?;
    assert_error(&r, 404, "M_NOT_FOUND");

    let initial = bob.sync(None, Some(0), None).await?;
    assert!(receipts(&initial, &room).is_empty(), "{initial}");
    Ok(())
}

/// `read_markers` moves `m.fully_read` (room account data) and sends the receipts named;
/// `/receipt/m.fully_read` moves the marker too.
async fn read_markers(server: TestServer) -> anyhow::Result<()> {
    let (alice, bob, room) = two_in_a_room(&server).await?;
    let first = bob.send_message(&room, "one").await?;
    let second = bob.send_message(&room, "two").await?;
    let marker_path = format!(
        "/user/{}/rooms/{}/account_data/m.fully_read",
        enc(&alice.user_id),
        enc(&room)
    );

    ok(alice
        .post(
            &format!("/rooms/{}/read_markers", enc(&room)),
            &json!({"m.fully_read": first, "m.read": second}),
        )
        .await?);
    assert_eq!(ok(alice.get(&marker_path).await?)["event_id"], json!(first));
    let initial = bob.sync(None, Some(0), None).await?;
    assert!(receipt_of(&initial, &room, &second, "m.read", &alice.user_id).is_some());

    ok(receipt(&alice, &room, "m.fully_read", &second, json!({})).await?);
    assert_eq!(
        ok(alice.get(&marker_path).await?)["event_id"],
        json!(second)
    );
    // A fully-read marker is not a receipt others see.
    let initial = bob.sync(None, Some(0), None).await?;
    assert!(receipt_of(&initial, &room, &second, "m.fully_read", &alice.user_id).is_none());

    let r = alice
        .post(
            &format!("/rooms/{}/read_markers", enc(&room)),
            &json!({"m.fully_read": 7}),
        )
        .await?;
    assert_error(&r, 400, "M_BAD_JSON");
    let r = alice
        .post(
            &format!("/rooms/{}/read_markers", enc(&room)),
            &json!({"m.read": "$missing"}),
        )
        .await?;
    assert_error(&r, 404, "M_NOT_FOUND");
    Ok(())
}

/// Receipts survive a restart: the initial sync after it still carries them, and new ones
/// continue the stream.
async fn receipts_survive_restart(server: TestServer) -> anyhow::Result<()> {
    let (alice, bob, room) = two_in_a_room(&server).await?;
    let event = bob.send_message(&room, "before restart").await?;
    ok(receipt(&alice, &room, "m.read", &event, json!({})).await?);
    let since = next_batch(&bob.sync(None, Some(0), None).await?);
    server.restart().await?;
    let initial = bob.sync(None, Some(0), None).await?;
    assert!(receipt_of(&initial, &room, &event, "m.read", &alice.user_id).is_some());
    let later = bob.send_message(&room, "after restart").await?;
    ok(receipt(&alice, &room, "m.read", &later, json!({})).await?);
    bob.sync_until(Some(&since), None, WITHIN, |s| {
        receipt_of(s, &room, &later, "m.read", &alice.user_id).is_some()
    })
    .await?;
    Ok(())
}

backend_tests!(
    read_receipts_reach_members,
    private_receipts_stay_private,
    threaded_receipts,
    bad_receipts,
    read_markers,
    receipts_survive_restart,
);
