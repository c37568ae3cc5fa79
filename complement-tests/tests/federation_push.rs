//! Push rules over federation: events from another server are evaluated for the local members
//! as local ones are, so their unread counts and highlights show in `/sync`.

use complement_tests::federation::{wait_for_message, wait_membership};
use complement_tests::{pair_tests, Client, TestServer};
use serde_json::json;

async fn counts(client: &Client, room: &str) -> anyhow::Result<(i64, i64)> {
    let sync = client.sync(None, Some(0), None).await?;
    let c = &sync["rooms"]["join"][room]["unread_notifications"];
    Ok((
        c["notification_count"].as_i64().unwrap_or(-1),
        c["highlight_count"].as_i64().unwrap_or(-1),
    ))
}

async fn remote_events_notify(a: TestServer, b: TestServer) -> anyhow::Result<()> {
    let alice = a.register("alice", "alice-password").await?;
    let bob = b.register("bob", "bob-password").await?;
    let room = alice
        .create_room(&json!({"preset": "public_chat", "room_alias_name": "pushing"}))
        .await?;
    bob.join(&format!("#pushing:{}", a.server_name())).await?;
    wait_membership(&alice, &room, &bob.user_id, "join").await?;

    alice.send_message(&room, "hello bob").await?;
    alice
        .send_event(
            &room,
            "m.room.message",
            &json!({"msgtype": "m.text", "body": "ping bob",
                    "m.mentions": {"user_ids": [bob.user_id]}}),
        )
        .await?;
    wait_for_message(&bob, &room, "ping bob").await?;
    assert_eq!(
        counts(&bob, &room).await?,
        (2, 1),
        "alice's events counted on bob's server"
    );
    assert_eq!(counts(&alice, &room).await?, (0, 0));

    bob.send_message(&room, "hi alice").await?;
    wait_for_message(&alice, &room, "hi alice").await?;
    assert_eq!(
        counts(&alice, &room).await?,
        (1, 0),
        "bob's event counted on alice's server"
    );
    assert_eq!(counts(&bob, &room).await?, (2, 1), "own event not counted");
    Ok(())
}

pair_tests!(remote_events_notify);
