//! Typing and presence across two Myelin servers: `m.typing` EDUs carry a user's typing to the
//! other server's members of the room (start and stop), and `m.presence` EDUs carry a user's
//! presence to the users of the other server who share a room, both ways.

use complement_tests::federation::{eventually, wait_membership};
use complement_tests::{enc, ok, pair_tests, Client, TestServer};
use serde_json::{json, Value};

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

fn presence_of(sync: &Value, user: &str) -> Option<String> {
    sync["presence"]["events"]
        .as_array()?
        .iter()
        .rev()
        .find(|e| e["type"] == "m.presence" && e["sender"] == user)
        .and_then(|e| e["content"]["presence"].as_str().map(str::to_owned))
}

/// Syncs `client` (quietly: `set_presence=offline`) from `since` until `done` accepts.
async fn sync_until(
    client: &Client,
    since: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> anyhow::Result<String> {
    let since = std::sync::Mutex::new(since.to_owned());
    eventually(what, || async {
        let s = since.lock().map(|s| s.clone()).unwrap_or_default();
        let body = client
            .sync_with(&[
                ("since", &s),
                ("timeout", "1000"),
                ("set_presence", "offline"),
            ])
            .await?;
        let next = body["next_batch"].as_str().unwrap_or_default().to_owned();
        if let Ok(mut g) = since.lock() {
            *g = next.clone();
        }
        Ok(done(&body).then_some(next))
    })
    .await
}

async fn quiet_since(client: &Client) -> anyhow::Result<String> {
    let body = client
        .sync_with(&[("timeout", "0"), ("set_presence", "offline")])
        .await?;
    Ok(body["next_batch"].as_str().unwrap_or_default().to_owned())
}

async fn typing_and_presence(a: TestServer, b: TestServer) -> anyhow::Result<()> {
    let alice = a.register("alice", "alice-password").await?;
    let bob = b.register("bob", "bob-password").await?;
    let room = alice
        .create_room(&json!({"preset": "public_chat", "room_alias_name": "chat"}))
        .await?;
    bob.join(&format!("#chat:{}", a.server_name())).await?;
    wait_membership(&alice, &room, &bob.user_id, "join").await?;

    // Typing, A → B.
    let since = quiet_since(&bob).await?;
    let path = format!("/rooms/{}/typing/{}", enc(&room), enc(&alice.user_id));
    ok(alice
        .put(&path, &json!({"typing": true, "timeout": 30000}))
        .await?);
    let since = sync_until(&bob, &since, "Bob sees Alice typing", |s| {
        typing_in(s, &room).is_some_and(|t| t == [alice.user_id.clone()])
    })
    .await?;
    ok(alice.put(&path, &json!({"typing": false})).await?);
    let since = sync_until(&bob, &since, "Bob sees Alice stop typing", |s| {
        typing_in(s, &room).is_some_and(|t| t.is_empty())
    })
    .await?;

    // Presence, A → B.
    alice
        .sync_with(&[("timeout", "0"), ("set_presence", "online")])
        .await?;
    sync_until(&bob, &since, "Bob sees Alice online", |s| {
        presence_of(s, &alice.user_id).as_deref() == Some("online")
    })
    .await?;
    let got = ok(bob
        .get(&format!("/presence/{}/status", enc(&alice.user_id)))
        .await?);
    assert_eq!(got["presence"], "online", "{got}");

    // Presence, B → A, with a status message.
    let alice_since = quiet_since(&alice).await?;
    ok(bob
        .put(
            &format!("/presence/{}/status", enc(&bob.user_id)),
            &json!({"presence": "unavailable", "status_msg": "away"}),
        )
        .await?);
    sync_until(&alice, &alice_since, "Alice sees Bob away", |s| {
        presence_of(s, &bob.user_id).as_deref() == Some("unavailable")
    })
    .await?;
    let got = ok(alice
        .get(&format!("/presence/{}/status", enc(&bob.user_id)))
        .await?);
    assert_eq!(got["status_msg"], "away", "{got}");
    Ok(())
}

pair_tests!(typing_and_presence);
