//! Presence: a user is `online` while one of their devices syncs (and for a grace period
//! after), `offline` after it, `unavailable` when every syncing device says so or after the
//! idle timeout; a reconnect within the grace period changes nothing anyone sees; several
//! devices aggregate. `PUT`/`GET /presence/{userId}/status` with `status_msg`, delivered in
//! `presence.events` of `/sync` only to users who share a room (and the user), kept across a
//! restart, and nothing of it when presence is turned off. The grace and idle timeouts are
//! set short or long per test through `MYELIN_PRESENCE_*`.

use std::time::Duration;

use complement_tests::{assert_error, backend_tests, enc, ok, Client, TestServer};
use serde_json::{json, Value};

/// The content of the last `m.presence` event about `user` in a sync response.
fn presence_of(sync: &Value, user: &str) -> Option<Value> {
    sync["presence"]["events"]
        .as_array()?
        .iter()
        .rev()
        .find(|e| e["type"] == "m.presence" && e["sender"] == user)
        .map(|e| e["content"].clone())
}

fn status_path(user: &str) -> String {
    format!("/presence/{}/status", enc(user))
}

fn next(sync: &Value) -> String {
    sync["next_batch"].as_str().unwrap_or_default().to_owned()
}

/// Syncs (without presence effect of its own: `set_presence=offline`) from `since` until
/// `user`'s presence reads `state`; answers the accepting response.
async fn watch_until(
    watcher: &Client,
    since: &str,
    user: &str,
    state: &str,
) -> anyhow::Result<Value> {
    let mut since = since.to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let body = watcher
            .sync_with(&[
                ("since", &since),
                ("timeout", "1000"),
                ("set_presence", "offline"),
            ])
            .await?;
        if presence_of(&body, user).is_some_and(|p| p["presence"] == state) {
            return Ok(body);
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("{user} never became {state}; last sync {body}");
        }
        since = next(&body);
    }
}

/// A quiet initial sync (one that does not make the watcher online).
async fn quiet_since(watcher: &Client) -> anyhow::Result<String> {
    let body = watcher
        .sync_with(&[("timeout", "0"), ("set_presence", "offline")])
        .await?;
    Ok(next(&body))
}

/// One sync of `client`'s device: it counts as syncing.
async fn heartbeat(client: &Client, set_presence: &str) -> anyhow::Result<Value> {
    client
        .sync_with(&[("timeout", "0"), ("set_presence", set_presence)])
        .await
}

async fn shared_room(server: &TestServer) -> anyhow::Result<(Client, Client, String)> {
    let alice = server.register("alice", "alice-password").await?;
    let bob = server.register("bob", "bob-password").await?;
    let room = alice.create_room(&json!({"preset": "public_chat"})).await?;
    bob.join(&room).await?;
    Ok((alice, bob, room))
}

/// Online while syncing (seen by the other member, and by GET), offline once the grace period
/// after the last sync is over.
async fn online_then_offline(server: TestServer) -> anyhow::Result<()> {
    let (alice, bob, _room) = shared_room(&server).await?;
    let since = quiet_since(&bob).await?;
    let own = heartbeat(&alice, "online").await?;
    let seen = watch_until(&bob, &since, &alice.user_id, "online").await?;
    let p = presence_of(&seen, &alice.user_id).unwrap_or_default();
    assert_eq!(p["currently_active"], true, "{p}");
    assert!(p["last_active_ago"].as_i64().is_some(), "{p}");
    let got = ok(bob.get(&status_path(&alice.user_id)).await?);
    assert_eq!(got["presence"], "online", "{got}");
    // The user sees their own presence too (in that first sync, or in a later one).
    if presence_of(&own, &alice.user_id).is_none() {
        alice
            .sync_until(Some(&next(&own)), None, Duration::from_secs(10), |s| {
                presence_of(s, &alice.user_id).is_some_and(|p| p["presence"] == "online")
            })
            .await?;
    }
    // Alice stops syncing: offline after the grace period, without any request of hers.
    watch_until(&bob, &next(&seen), &alice.user_id, "offline").await?;
    let got = ok(bob.get(&status_path(&alice.user_id)).await?);
    assert_eq!(got["presence"], "offline", "{got}");
    assert_eq!(got["currently_active"], false, "{got}");
    Ok(())
}

/// With a long grace period, a device that syncs again after its sync ended (a reconnect)
/// changes nothing: the watcher gets no presence update at all.
async fn reconnect_does_not_flap(server: TestServer) -> anyhow::Result<()> {
    let (alice, bob, _room) = shared_room(&server).await?;
    let since = quiet_since(&bob).await?;
    heartbeat(&alice, "online").await?;
    let seen = watch_until(&bob, &since, &alice.user_id, "online").await?;
    for _ in 0..5 {
        heartbeat(&alice, "online").await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let quiet = bob
        .sync_with(&[
            ("since", &next(&seen)),
            ("timeout", "1500"),
            ("set_presence", "offline"),
        ])
        .await?;
    assert!(presence_of(&quiet, &alice.user_id).is_none(), "{quiet}");
    Ok(())
}

/// Devices aggregate: one `unavailable` device alone → unavailable; another syncing online →
/// online; `set_presence=offline` does not count as syncing at all.
async fn devices_aggregate(server: TestServer) -> anyhow::Result<()> {
    let (alice, bob, _room) = shared_room(&server).await?;
    let carol = server.register("carol", "carol-password").await?;
    let room2 = carol.create_room(&json!({"preset": "public_chat"})).await?;
    bob.join(&room2).await?;
    let since = quiet_since(&bob).await?;
    heartbeat(&alice, "unavailable").await?;
    let seen = watch_until(&bob, &since, &alice.user_id, "unavailable").await?;
    let laptop = server
        .login("alice", "alice-password", Some("LAPTOP"))
        .await?;
    heartbeat(&laptop, "online").await?;
    watch_until(&bob, &next(&seen), &alice.user_id, "online").await?;
    // Carol syncs only with set_presence=offline: she never appears.
    heartbeat(&carol, "offline").await?;
    let got = ok(bob.get(&status_path(&carol.user_id)).await?);
    assert_eq!(got["presence"], "offline", "{got}");
    let body = bob.sync(None, Some(0), None).await?;
    assert!(presence_of(&body, &carol.user_id).is_none(), "{body}");
    Ok(())
}

/// No activity for the idle timeout → unavailable; a message → online again.
async fn idle_then_active(server: TestServer) -> anyhow::Result<()> {
    let (alice, bob, room) = shared_room(&server).await?;
    let since = quiet_since(&bob).await?;
    heartbeat(&alice, "online").await?;
    let seen = watch_until(&bob, &since, &alice.user_id, "unavailable").await?;
    let p = presence_of(&seen, &alice.user_id).unwrap_or_default();
    assert_eq!(p["currently_active"], false, "{p}");
    // Still syncing (a re-poll is no activity): still unavailable.
    heartbeat(&alice, "online").await?;
    let got = ok(bob.get(&status_path(&alice.user_id)).await?);
    assert_eq!(got["presence"], "unavailable", "{got}");
    alice.send_message(&room, "back").await?;
    watch_until(&bob, &next(&seen), &alice.user_id, "online").await?;
    Ok(())
}

/// PUT and GET of one's status: state, status message, who may read it, and bad requests.
async fn put_and_get_status(server: TestServer) -> anyhow::Result<()> {
    let (alice, bob, _room) = shared_room(&server).await?;
    let carol = server.register("carol", "carol-password").await?;
    let since = quiet_since(&bob).await?;
    let mine = status_path(&alice.user_id);
    ok(alice
        .put(
            &mine,
            &json!({"presence": "online", "status_msg": "writing tests"}),
        )
        .await?);
    let got = ok(alice.get(&mine).await?);
    assert_eq!(got["presence"], "online", "{got}");
    assert_eq!(got["status_msg"], "writing tests", "{got}");
    assert!(
        got["last_active_ago"].as_i64().is_some_and(|a| a >= 0),
        "{got}"
    );
    let seen = watch_until(&bob, &since, &alice.user_id, "online").await?;
    assert_eq!(
        presence_of(&seen, &alice.user_id).unwrap_or_default()["status_msg"],
        "writing tests"
    );
    assert_eq!(ok(bob.get(&mine).await?)["status_msg"], "writing tests");
    // Carol shares no room with Alice.
    assert_error(&carol.get(&mine).await?, 403, "M_FORBIDDEN");
    let body = carol.sync(None, Some(0), None).await?;
    assert!(presence_of(&body, &alice.user_id).is_none(), "{body}");

    ok(alice
        .put(
            &mine,
            &json!({"presence": "unavailable", "status_msg": "lunch"}),
        )
        .await?);
    watch_until(&bob, &next(&seen), &alice.user_id, "unavailable").await?;
    let got = ok(bob.get(&mine).await?);
    assert_eq!(got["status_msg"], "lunch", "{got}");

    assert_error(
        &bob.put(&mine, &json!({"presence": "offline"})).await?,
        403,
        "M_FORBIDDEN",
    );
    assert_error(
        &alice.put(&mine, &json!({"presence": "busy"})).await?,
        400,
        "M_INVALID_PARAM",
    );
    for bad in [
        json!({}),
        json!({"presence": 1}),
        json!({"presence": "online", "status_msg": 5}),
        json!(["online"]),
    ] {
        assert_error(&alice.put(&mine, &bad).await?, 400, "M_BAD_JSON");
    }
    assert_error(
        &alice.get("/presence/not-a-user/status").await?,
        400,
        "M_INVALID_PARAM",
    );
    let bad_set = alice.get("/sync?timeout=0&set_presence=busy").await?;
    assert_error(&bad_set, 400, "M_INVALID_PARAM");
    // A failed request changed nothing.
    assert_eq!(ok(alice.get(&mine).await?)["status_msg"], "lunch");
    Ok(())
}

/// An initial sync lists the presence of the users sharing a room; the status survives a
/// restart.
async fn initial_sync_and_restart(server: TestServer) -> anyhow::Result<()> {
    let (alice, bob, _room) = shared_room(&server).await?;
    let carol = server.register("carol", "carol-password").await?;
    ok(alice
        .put(
            &status_path(&alice.user_id),
            &json!({"presence": "online", "status_msg": "persisted"}),
        )
        .await?);
    ok(carol
        .put(&status_path(&carol.user_id), &json!({"presence": "online"}))
        .await?);
    let body = bob
        .sync_with(&[("timeout", "0"), ("set_presence", "offline")])
        .await?;
    assert_eq!(
        presence_of(&body, &alice.user_id).unwrap_or_default()["status_msg"],
        "persisted",
        "{body}"
    );
    assert!(presence_of(&body, &carol.user_id).is_none(), "{body}");
    let filtered = json!({"presence": {"not_senders": [alice.user_id.clone()]}}).to_string();
    let body = bob
        .sync_with(&[("timeout", "0"), ("filter", &filtered)])
        .await?;
    assert!(presence_of(&body, &alice.user_id).is_none(), "{body}");

    server.restart().await?;
    let got = ok(bob.get(&status_path(&alice.user_id)).await?);
    assert_eq!(got["status_msg"], "persisted", "{got}");
    let body = bob
        .sync_with(&[("timeout", "0"), ("set_presence", "offline")])
        .await?;
    assert_eq!(
        presence_of(&body, &alice.user_id).unwrap_or_default()["status_msg"],
        "persisted",
        "{body}"
    );
    Ok(())
}

/// With presence turned off: PUT succeeds and changes nothing, GET answers offline, syncs
/// carry no presence.
async fn presence_disabled(server: TestServer) -> anyhow::Result<()> {
    let (alice, bob, _room) = shared_room(&server).await?;
    heartbeat(&alice, "online").await?;
    ok(alice
        .put(
            &status_path(&alice.user_id),
            &json!({"presence": "online", "status_msg": "hidden"}),
        )
        .await?);
    let got = ok(bob.get(&status_path(&alice.user_id)).await?);
    assert_eq!(got, json!({"presence": "offline"}));
    let body = bob.sync(None, Some(0), None).await?;
    assert_eq!(body["presence"]["events"], json!([]), "{body}");
    Ok(())
}

backend_tests!(
    env = [("MYELIN_PRESENCE_GRACE_MS", "1500")];
    online_then_offline
);
backend_tests!(
    env = [("MYELIN_PRESENCE_GRACE_MS", "60000")];
    reconnect_does_not_flap,
    devices_aggregate,
    put_and_get_status,
    initial_sync_and_restart
);
backend_tests!(
    env = [("MYELIN_PRESENCE_GRACE_MS", "60000"), ("MYELIN_PRESENCE_IDLE_MS", "1500")];
    idle_then_active
);
backend_tests!(
    env = [("MYELIN_PRESENCE_ENABLED", "false")];
    presence_disabled
);
