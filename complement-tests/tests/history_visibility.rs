//! History visibility (`m.room.history_visibility`): with `joined`, a user
//! who joins later cannot see earlier events through `/messages`, `/sync`
//! or `GET /event`; with `shared`, they can.

use complement_tests::{assert_error, backend_tests, client::sync, enc, ok, TestServer};
use serde_json::json;

/// `joined`: events from before the join are hidden everywhere.
async fn joined_hides_earlier_events(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let bob = server.register("bob", "bob-password").await?;
    let room = alice
        .create_room(&json!({
            "preset": "public_chat",
            "initial_state": [{
                "type": "m.room.history_visibility",
                "content": {"history_visibility": "joined"},
            }],
        }))
        .await?;
    let secret_ids = [
        alice.send_message(&room, "secret 1").await?,
        alice.send_message(&room, "secret 2").await?,
    ];

    bob.join(&room).await?;
    let visible_id = alice.send_message(&room, "visible").await?;

    // /messages
    let page = bob
        .messages(&room, &[("dir", "b"), ("limit", "100")])
        .await?;
    let chunk = page["chunk"].as_array().expect("chunk");
    assert!(
        chunk.iter().any(|e| e["event_id"] == visible_id),
        "bob sees messages after joining"
    );
    for event in chunk {
        let body = event["content"]["body"].as_str().unwrap_or_default();
        assert!(!body.starts_with("secret"), "bob must not see {event}");
        assert!(!secret_ids.iter().any(|id| event["event_id"] == *id));
    }
    let forwards = bob
        .messages(&room, &[("dir", "f"), ("limit", "100")])
        .await?;
    for event in forwards["chunk"].as_array().expect("chunk") {
        assert!(
            !secret_ids.iter().any(|id| event["event_id"] == *id),
            "bob must not see {event}"
        );
    }

    // /sync
    let synced = bob.sync(None, None, None).await?;
    let timeline = sync::timeline(&synced, &room);
    assert!(
        timeline.iter().any(|e| e["event_id"] == visible_id),
        "sync shows later events: {synced}"
    );
    for event in timeline {
        assert!(
            !secret_ids.iter().any(|id| event["event_id"] == *id),
            "sync leaked {event}"
        );
    }

    // GET /event
    for id in &secret_ids {
        let response = bob
            .get(&format!("/rooms/{}/event/{}", enc(&room), enc(id)))
            .await?;
        assert_error(&response, 404, "M_NOT_FOUND");
    }
    ok(bob
        .get(&format!("/rooms/{}/event/{}", enc(&room), enc(&visible_id)))
        .await?);
    // Someone who was never in the room gets the same 404 (the spec's
    // only error for this endpoint: not found or not permitted).
    let eve = server.register("eve", "eve-password").await?;
    let response = eve
        .get(&format!("/rooms/{}/event/{}", enc(&room), enc(&visible_id)))
        .await?;
    assert_error(&response, 404, "M_NOT_FOUND");
    // The sender still sees everything.
    ok(alice
        .get(&format!(
            "/rooms/{}/event/{}",
            enc(&room),
            enc(&secret_ids[0])
        ))
        .await?);
    Ok(())
}

/// `shared`: a later joiner sees the whole history.
async fn shared_shows_earlier_events(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let bob = server.register("bob", "bob-password").await?;
    let room = alice.create_room(&json!({"preset": "public_chat"})).await?;
    let visibility = ok(alice
        .get_state(&room, "m.room.history_visibility", "")
        .await?);
    assert_eq!(visibility["history_visibility"], "shared");
    let early = alice.send_message(&room, "early bird").await?;

    bob.join(&room).await?;
    let page = bob
        .messages(&room, &[("dir", "b"), ("limit", "100")])
        .await?;
    assert!(
        page["chunk"]
            .as_array()
            .expect("chunk")
            .iter()
            .any(|e| e["event_id"] == early),
        "shared history must be visible to later joiners: {page}"
    );
    let event = ok(bob
        .get(&format!("/rooms/{}/event/{}", enc(&room), enc(&early)))
        .await?);
    assert_eq!(event["content"]["body"], "early bird");
    Ok(())
}

backend_tests!(joined_hides_earlier_events, shared_shows_earlier_events);
