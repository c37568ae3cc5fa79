//! Typing notifications (`PUT /rooms/{roomId}/typing/{userId}`) and their delivery as
//! `m.typing` in `rooms.join.<room>.ephemeral` of `/sync`: start, stop and expiry seen by the
//! other members (a room whose only change is typing still appears), the ephemeral filter,
//! and the forbidden and malformed requests.

use std::time::Duration;

use complement_tests::{assert_error, backend_tests, enc, ok, Client, TestServer};
use serde_json::{json, Value};

/// The `user_ids` of the room's `m.typing` event in a sync response, if it has one.
fn typing_in(sync: &Value, room: &str) -> Option<Vec<String>> {
    let events = sync["rooms"]["join"][room]["ephemeral"]["events"].as_array()?;
    let typing = events.iter().find(|e| e["type"] == "m.typing")?;
    Some(
        typing["content"]["user_ids"]
            .as_array()?
            .iter()
            .filter_map(|u| u.as_str().map(str::to_owned))
            .collect(),
    )
}

fn typing_path(room: &str, user: &str) -> String {
    format!("/rooms/{}/typing/{}", enc(room), enc(user))
}

/// Syncs from `since` until the room's typing set is `want`; answers the accepting response.
async fn sync_until_typing(
    client: &Client,
    since: &str,
    room: &str,
    want: &[&str],
) -> anyhow::Result<Value> {
    client
        .sync_until(Some(since), None, Duration::from_secs(20), |s| {
            typing_in(s, room).is_some_and(|t| t == want)
        })
        .await
}

async fn next_batch(client: &Client) -> anyhow::Result<String> {
    let body = client.sync(None, Some(0), None).await?;
    Ok(body["next_batch"].as_str().unwrap_or_default().to_owned())
}

async fn shared_room(server: &TestServer) -> anyhow::Result<(Client, Client, String)> {
    let alice = server.register("alice", "alice-password").await?;
    let bob = server.register("bob", "bob-password").await?;
    let room = alice.create_room(&json!({"preset": "public_chat"})).await?;
    bob.join(&room).await?;
    Ok((alice, bob, room))
}

/// Alice starts and stops typing; Bob's sync shows each change, in a room that has no new
/// events, and Alice's own sync shows it too.
async fn typing_start_and_stop(server: TestServer) -> anyhow::Result<()> {
    let (alice, bob, room) = shared_room(&server).await?;
    let since = next_batch(&bob).await?;
    let alice_since = next_batch(&alice).await?;
    ok(alice
        .put(
            &typing_path(&room, &alice.user_id),
            &json!({"typing": true, "timeout": 30000}),
        )
        .await?);
    let seen = sync_until_typing(&bob, &since, &room, &[alice.user_id.as_str()]).await?;
    assert_eq!(
        seen["rooms"]["join"][&room]["timeline"]["events"],
        json!([]),
        "only typing changed: {seen}"
    );
    sync_until_typing(&alice, &alice_since, &room, &[alice.user_id.as_str()]).await?;

    // Bob types too: both, in order.
    ok(bob
        .put(
            &typing_path(&room, &bob.user_id),
            &json!({"typing": true, "timeout": 30000}),
        )
        .await?);
    let mut both = vec![alice.user_id.as_str(), bob.user_id.as_str()];
    both.sort();
    let since = seen["next_batch"].as_str().unwrap_or_default().to_owned();
    let seen = sync_until_typing(&bob, &since, &room, &both).await?;

    // An initial sync shows who types now.
    let initial = bob.sync(None, Some(0), None).await?;
    assert_eq!(
        typing_in(&initial, &room),
        Some(both.iter().map(|s| s.to_string()).collect())
    );

    // Both stop: the set empties, and then nothing more is reported.
    for c in [&alice, &bob] {
        ok(
            c.put(&typing_path(&room, &c.user_id), &json!({"typing": false}))
                .await?,
        );
    }
    let since = seen["next_batch"].as_str().unwrap_or_default().to_owned();
    let seen = sync_until_typing(&bob, &since, &room, &[]).await?;
    let since = seen["next_batch"].as_str().unwrap_or_default();
    let after = bob.sync(Some(since), Some(500), None).await?;
    assert!(typing_in(&after, &room).is_none(), "{after}");
    Ok(())
}

/// A typing notice ends by itself at its timeout.
async fn typing_expires(server: TestServer) -> anyhow::Result<()> {
    let (alice, bob, room) = shared_room(&server).await?;
    let since = next_batch(&bob).await?;
    ok(alice
        .put(
            &typing_path(&room, &alice.user_id),
            &json!({"typing": true, "timeout": 1000}),
        )
        .await?);
    let seen = sync_until_typing(&bob, &since, &room, &[alice.user_id.as_str()]).await?;
    let since = seen["next_batch"].as_str().unwrap_or_default();
    // No further request: the server ends it.
    sync_until_typing(&bob, since, &room, &[]).await?;
    Ok(())
}

/// The ephemeral filter of a sync decides whether `m.typing` is delivered.
async fn typing_filtered(server: TestServer) -> anyhow::Result<()> {
    let (alice, bob, room) = shared_room(&server).await?;
    ok(alice
        .put(
            &typing_path(&room, &alice.user_id),
            &json!({"typing": true, "timeout": 30000}),
        )
        .await?);
    let no_typing = json!({"room": {"ephemeral": {"not_types": ["m.typing"]}}}).to_string();
    let body = bob.sync(None, Some(0), Some(&no_typing)).await?;
    assert!(typing_in(&body, &room).is_none(), "{body}");
    let other_rooms = json!({"room": {"ephemeral": {"rooms": ["!elsewhere:example.org"]}}});
    let body = bob
        .sync(None, Some(0), Some(&other_rooms.to_string()))
        .await?;
    assert!(typing_in(&body, &room).is_none(), "{body}");
    let body = bob.sync(None, Some(0), None).await?;
    assert_eq!(typing_in(&body, &room), Some(vec![alice.user_id.clone()]));
    Ok(())
}

/// Only for oneself, only in a room one is joined to, with a well-formed body.
async fn typing_refused(server: TestServer) -> anyhow::Result<()> {
    let (alice, bob, room) = shared_room(&server).await?;
    let carol = server.register("carol", "carol-password").await?;
    let body = json!({"typing": true, "timeout": 5000});
    assert_error(
        &alice.put(&typing_path(&room, &bob.user_id), &body).await?,
        403,
        "M_FORBIDDEN",
    );
    assert_error(
        &carol
            .put(&typing_path(&room, &carol.user_id), &body)
            .await?,
        403,
        "M_FORBIDDEN",
    );
    let mine = typing_path(&room, &alice.user_id);
    for bad in [
        json!({"typing": "yes"}),
        json!({"timeout": 5000}),
        json!({"typing": true, "timeout": -5}),
        json!({"typing": true, "timeout": "soon"}),
        json!([true]),
    ] {
        assert_error(&alice.put(&mine, &bad).await?, 400, "M_BAD_JSON");
    }
    let not_json = alice
        .raw(
            reqwest::Method::PUT,
            &mine,
            Some(b"not json".to_vec()),
            Some("application/json"),
        )
        .await?;
    assert_error(&not_json, 400, "M_NOT_JSON");
    assert_error(
        &alice
            .put(&typing_path("not-a-room", &alice.user_id), &body)
            .await?,
        400,
        "M_INVALID_PARAM",
    );
    // Nothing of this reached Bob.
    let body = bob.sync(None, Some(0), None).await?;
    assert!(typing_in(&body, &room).is_none(), "{body}");
    Ok(())
}

backend_tests!(
    typing_start_and_stop,
    typing_expires,
    typing_filtered,
    typing_refused
);
