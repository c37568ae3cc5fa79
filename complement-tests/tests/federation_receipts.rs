//! Receipts across two Myelin servers: `m.read` travels as an `m.receipt` EDU both ways and
//! shows in the other server's `/sync`; `m.read.private` never leaves its server.

use complement_tests::federation::{eventually, wait_for_message, wait_membership};
use complement_tests::{enc, ok, pair_tests, Client, TestServer};
use serde_json::{json, Value};

/// The receipt data `user` has of `kind` on `event` in a sync's room, if any.
fn receipt_of(sync: &Value, room: &str, event: &str, kind: &str, user: &str) -> Option<Value> {
    sync["rooms"]["join"][room]["ephemeral"]["events"]
        .as_array()?
        .iter()
        .filter(|e| e["type"] == "m.receipt")
        .map(|r| r["content"][event][kind][user].clone())
        .find(|d| !d.is_null())
}

async fn send_receipt(client: &Client, room: &str, kind: &str, event: &str) -> anyhow::Result<()> {
    let path = format!("/rooms/{}/receipt/{kind}/{}", enc(room), enc(event));
    ok(client.post(&path, &json!({})).await?);
    Ok(())
}

/// Waits until `client`'s initial sync shows the receipt.
async fn wait_receipt(
    client: &Client,
    room: &str,
    event: &str,
    kind: &str,
    user: &str,
) -> anyhow::Result<Value> {
    eventually("the receipt from the other server", || async {
        let sync = client.sync(None, Some(0), None).await?;
        Ok(receipt_of(&sync, room, event, kind, user))
    })
    .await
}

async fn read_receipts_cross_servers(a: TestServer, b: TestServer) -> anyhow::Result<()> {
    let alice = a.register("alice", "alice-password").await?;
    let bob = b.register("bob", "bob-password").await?;
    let room = alice
        .create_room(&json!({"preset": "public_chat", "room_alias_name": "reading"}))
        .await?;
    bob.join(&format!("#reading:{}", a.server_name())).await?;
    wait_membership(&alice, &room, &bob.user_id, "join").await?;

    let hello = alice.send_message(&room, "hello bob").await?;
    wait_for_message(&bob, &room, "hello bob").await?;
    // Bob's private receipt first, then his public one on a later event: once Alice's server
    // has the public one, the private one (sent before it) would have arrived if it travelled.
    send_receipt(&bob, &room, "m.read.private", &hello).await?;
    let later = alice.send_message(&room, "read this").await?;
    wait_for_message(&bob, &room, "read this").await?;
    send_receipt(&bob, &room, "m.read", &later).await?;
    let data = wait_receipt(&alice, &room, &later, "m.read", &bob.user_id).await?;
    assert!(data["ts"].is_u64(), "{data}");
    let sync = alice.sync(None, Some(0), None).await?;
    assert!(
        receipt_of(&sync, &room, &hello, "m.read.private", &bob.user_id).is_none(),
        "a private receipt crossed servers: {sync}"
    );

    // And back: Alice's threaded receipt reaches Bob with its thread_id.
    let answer = bob.send_message(&room, "answer").await?;
    wait_for_message(&alice, &room, "answer").await?;
    let path = format!("/rooms/{}/receipt/m.read/{}", enc(&room), enc(&answer));
    ok(alice.post(&path, &json!({"thread_id": "main"})).await?);
    let data = wait_receipt(&bob, &room, &answer, "m.read", &alice.user_id).await?;
    assert_eq!(data["thread_id"], "main", "{data}");
    Ok(())
}

pair_tests!(read_receipts_cross_servers);
