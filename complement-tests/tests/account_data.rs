//! Client config: global and per-room account data (`/user/{userId}/
//! account_data/{type}`, `/user/{userId}/rooms/{roomId}/account_data/{type}`),
//! room tags (`/user/{userId}/rooms/{roomId}/tags[/{tag}]`), and their
//! delivery in `/sync`.

use complement_tests::{assert_error, backend_tests, enc, ok, TestServer};
use reqwest::Method;
use serde_json::{json, Value};

fn find_account_data<'a>(events: &'a Value, event_type: &str) -> Option<&'a Value> {
    events
        .as_array()?
        .iter()
        .find(|e| e["type"] == event_type)
        .map(|e| &e["content"])
}

/// Global and room account data round-trip; other users may not read or
/// write them; unknown types are 404; server-managed types are 405.
async fn account_data_round_trip(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let bob = server.register("bob", "bob-password").await?;
    let room = alice.create_room(&json!({})).await?;
    let me = enc(&alice.user_id);
    let global = format!("/user/{me}/account_data/com.example.settings");
    let in_room = format!(
        "/user/{me}/rooms/{}/account_data/com.example.room",
        enc(&room)
    );

    assert_error(&alice.get(&global).await?, 404, "M_NOT_FOUND");
    ok(alice
        .put(&global, &json!({"theme": "dark", "size": 3}))
        .await?);
    assert_eq!(
        ok(alice.get(&global).await?),
        json!({"theme": "dark", "size": 3})
    );
    ok(alice.put(&global, &json!({"theme": "light"})).await?);
    assert_eq!(
        ok(alice.get(&global).await?),
        json!({"theme": "light"}),
        "PUT replaces the content"
    );

    assert_error(&alice.get(&in_room).await?, 404, "M_NOT_FOUND");
    ok(alice.put(&in_room, &json!({"pinned": true})).await?);
    assert_eq!(ok(alice.get(&in_room).await?), json!({"pinned": true}));
    // Room data is separate from global data of the same type.
    assert_error(
        &alice
            .get(&format!("/user/{me}/account_data/com.example.room"))
            .await?,
        404,
        "M_NOT_FOUND",
    );

    assert_error(&bob.get(&global).await?, 403, "M_FORBIDDEN");
    assert_error(
        &bob.put(&global, &json!({"theme": "hacked"})).await?,
        403,
        "M_FORBIDDEN",
    );
    assert_error(&bob.get(&in_room).await?, 403, "M_FORBIDDEN");
    assert_eq!(ok(alice.get(&global).await?), json!({"theme": "light"}));

    let push_rules = alice
        .put(&format!("/user/{me}/account_data/m.push_rules"), &json!({}))
        .await?;
    assert_error(&push_rules, 405, "M_BAD_JSON");
    let fully_read = alice
        .put(
            &format!("/user/{me}/rooms/{}/account_data/m.fully_read", enc(&room)),
            &json!({"event_id": "$x"}),
        )
        .await?;
    assert_error(&fully_read, 405, "M_BAD_JSON");

    let bad_room = alice
        .put(
            &format!(
                "/user/{me}/rooms/{}/account_data/com.example.room",
                enc("not-a-room-id")
            ),
            &json!({}),
        )
        .await?;
    assert_error(&bad_room, 400, "M_INVALID_PARAM");

    let not_object = alice
        .raw(
            Method::PUT,
            &global,
            Some(b"[1, 2, 3]".to_vec()),
            Some("application/json"),
        )
        .await?;
    assert_eq!(
        not_object.status, 400,
        "a non-object body is refused: {:?}",
        not_object
    );
    assert!(
        ["M_BAD_JSON", "M_NOT_JSON"].contains(&not_object.errcode()),
        "{:?}",
        not_object
    );
    assert_eq!(ok(alice.get(&global).await?), json!({"theme": "light"}));
    Ok(())
}

/// Tags: add with and without `order`, list, delete.
async fn room_tags(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let room = alice.create_room(&json!({})).await?;
    let base = format!("/user/{}/rooms/{}/tags", enc(&alice.user_id), enc(&room));

    assert_eq!(ok(alice.get(&base).await?), json!({"tags": {}}));
    ok(alice
        .put(&format!("{base}/u.work"), &json!({"order": 0.25}))
        .await?);
    ok(alice
        .put(&format!("{base}/m.favourite"), &json!({}))
        .await?);

    let tags = ok(alice.get(&base).await?);
    let order = tags["tags"]["u.work"]["order"].as_f64();
    assert_eq!(order, Some(0.25), "{tags}");
    assert!(tags["tags"]["m.favourite"].is_object(), "{tags}");
    assert_eq!(tags["tags"].as_object().map(|t| t.len()), Some(2));

    ok(alice.delete(&format!("{base}/u.work")).await?);
    let tags = ok(alice.get(&base).await?);
    assert!(tags["tags"].get("u.work").is_none(), "{tags}");
    assert!(tags["tags"]["m.favourite"].is_object(), "{tags}");

    let bob = server.register("bob", "bob-password").await?;
    assert_error(&bob.get(&base).await?, 403, "M_FORBIDDEN");
    Ok(())
}

/// Account data and tags reach `/sync`: global under
/// `account_data.events`, per room under `rooms.join.<id>.account_data`
/// (tags as `m.tag`), and changes arrive incrementally.
async fn account_data_in_sync(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let room = alice.create_room(&json!({})).await?;
    let me = enc(&alice.user_id);
    ok(alice
        .put(
            &format!("/user/{me}/account_data/com.example.global"),
            &json!({"v": 1}),
        )
        .await?);
    ok(alice
        .put(
            &format!(
                "/user/{me}/rooms/{}/account_data/com.example.local",
                enc(&room)
            ),
            &json!({"v": 2}),
        )
        .await?);
    ok(alice
        .put(
            &format!("/user/{me}/rooms/{}/tags/u.work", enc(&room)),
            &json!({"order": 0.5}),
        )
        .await?);

    let initial = alice.sync(None, None, None).await?;
    assert_eq!(
        find_account_data(&initial["account_data"]["events"], "com.example.global"),
        Some(&json!({"v": 1})),
        "global account data in initial sync: {initial}"
    );
    let room_data = &initial["rooms"]["join"][&room]["account_data"]["events"];
    assert_eq!(
        find_account_data(room_data, "com.example.local"),
        Some(&json!({"v": 2})),
        "{initial}"
    );
    let tag =
        find_account_data(room_data, "m.tag").unwrap_or_else(|| panic!("m.tag in sync: {initial}"));
    assert_eq!(tag["tags"]["u.work"]["order"].as_f64(), Some(0.5));

    let since = initial["next_batch"]
        .as_str()
        .expect("next_batch")
        .to_owned();
    ok(alice
        .put(
            &format!("/user/{me}/account_data/com.example.global"),
            &json!({"v": 3}),
        )
        .await?);
    let next = alice
        .sync_until(
            Some(&since),
            None,
            std::time::Duration::from_secs(10),
            |s| find_account_data(&s["account_data"]["events"], "com.example.global").is_some(),
        )
        .await?;
    assert_eq!(
        find_account_data(&next["account_data"]["events"], "com.example.global"),
        Some(&json!({"v": 3}))
    );
    assert!(
        find_account_data(&next["account_data"]["events"], "com.example.other").is_none(),
        "nothing invented"
    );
    Ok(())
}

backend_tests!(account_data_round_trip, room_tags, account_data_in_sync);
