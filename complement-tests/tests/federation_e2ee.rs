//! End-to-end encryption across two Myelin servers, over the Client-Server API of each: keys of
//! the other server's users queried and claimed through federation, to-device messages carried
//! by `m.direct_to_device`, and device-list changes carried by `m.device_list_update` to the
//! users who share an encrypted room (and kept in step: the second change follows on from the
//! first).

use std::time::Duration;

use complement_tests::e2ee::DeviceKeys;
use complement_tests::federation::{eventually, wait_membership};
use complement_tests::{ok, pair_tests, unique_txn_id, Client, TestServer};
use serde_json::{json, Value};

/// An encrypted room on A with Alice, joined by Bob from B.
async fn encrypted_room(
    a: &TestServer,
    b: &TestServer,
) -> anyhow::Result<(Client, Client, String)> {
    let alice = a.register("alice", "alice-password").await?;
    let bob = b.register("bob", "bob-password").await?;
    let room = alice
        .create_room(&json!({
            "preset": "public_chat",
            "room_alias_name": "secrets",
            "initial_state": [{
                "type": "m.room.encryption", "state_key": "",
                "content": {"algorithm": "m.megolm.v1.aes-sha2"}
            }],
        }))
        .await?;
    bob.join(&format!("#secrets:{}", a.server_name())).await?;
    wait_membership(&alice, &room, &bob.user_id, "join").await?;
    Ok((alice, bob, room))
}

async fn next_batch(client: &Client, since: Option<&str>) -> anyhow::Result<(Value, String)> {
    let mut params = vec![("timeout", "0")];
    if let Some(s) = since {
        params.push(("since", s));
    }
    let body = client.sync_with(&params).await?;
    let next = body["next_batch"].as_str().unwrap_or_default().to_owned();
    Ok((body, next))
}

async fn keys_and_to_device(a: TestServer, b: TestServer) -> anyhow::Result<()> {
    let (alice, bob, _room) = encrypted_room(&a, &b).await?;
    let bob_keys = DeviceKeys::of(&bob);
    ok(bob.post("/keys/upload", &bob_keys.upload_body(3)).await?);

    // Alice's server asks Bob's for his device keys.
    let query = json!({"device_keys": {bob.user_id.clone(): []}, "timeout": 10000});
    let answer = ok(alice.post("/keys/query", &query).await?);
    let mut served = answer["device_keys"][&bob.user_id][&bob.device_id].clone();
    served.as_object_mut().map(|o| o.remove("unsigned"));
    assert_eq!(served, bob_keys.device_keys(), "{answer}");
    assert_eq!(answer["failures"], json!({}));

    // And claims one of his one-time keys there: each once.
    let claim = json!({"one_time_keys": {bob.user_id.clone(): {bob.device_id.clone(): "signed_curve25519"}}});
    let mut seen = Vec::new();
    for _ in 0..3 {
        let got = ok(alice.post("/keys/claim", &claim).await?);
        let keys = got["one_time_keys"][&bob.user_id][&bob.device_id]
            .as_object()
            .cloned()
            .unwrap_or_default();
        assert_eq!(keys.len(), 1, "{got}");
        seen.extend(keys.keys().cloned());
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 3, "three distinct one-time keys: {seen:?}");

    // A to-device message to Bob's device goes over federation, once.
    let (_, since) = next_batch(&bob, None).await?;
    let txn = unique_txn_id();
    let message = json!({"messages": {bob.user_id.clone(): {bob.device_id.clone(): {"secret": "hello over federation"}}}});
    ok(alice
        .put(&format!("/sendToDevice/m.test.e2ee/{txn}"), &message)
        .await?);
    // The same transaction again is not a second message.
    ok(alice
        .put(&format!("/sendToDevice/m.test.e2ee/{txn}"), &message)
        .await?);
    let events = eventually("the to-device message reaches Bob", || async {
        let (body, next) = next_batch(&bob, Some(&since)).await?;
        let events = body["to_device"]["events"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        Ok((!events.is_empty()).then_some((events, next)))
    })
    .await?;
    let (events, next) = events;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["sender"], alice.user_id.as_str());
    assert_eq!(events[0]["type"], "m.test.e2ee");
    assert_eq!(events[0]["content"]["secret"], "hello over federation");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (body, _) = next_batch(&bob, Some(&next)).await?;
    assert_eq!(body["to_device"]["events"], json!([]), "delivered once");
    Ok(())
}

async fn device_list_updates(a: TestServer, b: TestServer) -> anyhow::Result<()> {
    let (alice, bob, _room) = encrypted_room(&a, &b).await?;
    let carol = b.register("carol", "carol-password").await?;
    ok(bob
        .post("/keys/upload", &DeviceKeys::of(&bob).upload_body(0))
        .await?);
    // Alice learns Bob's keys (her server starts tracking his list).
    let query = json!({"device_keys": {bob.user_id.clone(): []}});
    eventually("Alice's server holds Bob's device", || async {
        let answer = ok(alice.post("/keys/query", &query).await?);
        Ok(answer["device_keys"][&bob.user_id]
            .get(&bob.device_id)
            .is_some()
            .then_some(()))
    })
    .await?;
    let (_, mut since) = next_batch(&alice, None).await?;

    // Bob logs in a second device with keys, then deletes it: each change reaches Alice.
    let bob2 = b.login("bob", "bob-password", Some("SECOND")).await?;
    let second = DeviceKeys::of(&bob2);
    ok(bob2.post("/keys/upload", &second.upload_body(0)).await?);
    for (what, present) in [("added", true), ("deleted", false)] {
        if !present {
            ok(bob
                .with_password_auth(
                    reqwest::Method::DELETE,
                    &format!("/devices/{}", bob2.device_id),
                    &json!({}),
                    "bob-password",
                )
                .await?);
        }
        // Alice's sync reports Bob, and her server answers from the list it keeps in step.
        let next = eventually(&format!("Alice sees Bob's device {what}"), || async {
            let (body, next) = next_batch(&alice, Some(&since)).await?;
            let changed = body["device_lists"]["changed"].clone();
            Ok(changed
                .as_array()
                .is_some_and(|c| c.iter().any(|u| u == bob.user_id.as_str()))
                .then_some(next))
        })
        .await?;
        eventually(
            &format!("Alice's server has Bob's device {what}"),
            || async {
                let answer = ok(alice.post("/keys/query", &query).await?);
                Ok(
                    (answer["device_keys"][&bob.user_id].get("SECOND").is_some() == present)
                        .then_some(()),
                )
            },
        )
        .await?;
        since = next;
    }
    // Carol shares no room with Alice: her changes are not Alice's business.
    ok(carol
        .post("/keys/upload", &DeviceKeys::of(&carol).upload_body(0))
        .await?);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (body, _) = next_batch(&alice, Some(&since)).await?;
    let changed = body["device_lists"]["changed"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        !changed.iter().any(|u| u == carol.user_id.as_str()),
        "{changed:?}"
    );
    Ok(())
}

pair_tests!(keys_and_to_device, device_list_updates);
