//! Filters: `POST /user/{userId}/filter`, `GET
//! /user/{userId}/filter/{filterId}`, and `/sync` honouring a stored filter
//! ID or an inline JSON filter (timeline limit, room selection, event
//! types).

use complement_tests::{assert_error, backend_tests, client::sync, enc, ok, TestServer};
use serde_json::json;

/// Upload a filter, read it back, and use its ID in `/sync`.
async fn stored_filter(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let me = enc(&alice.user_id);
    let definition = json!({
        "room": {"timeline": {"limit": 2}},
        "presence": {"types": []},
    });
    let created = ok(alice
        .post(&format!("/user/{me}/filter"), &definition)
        .await?);
    let filter_id = created["filter_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no filter_id: {created}"))
        .to_owned();
    assert!(
        !filter_id.starts_with('{'),
        "filter IDs must not start with '{{'"
    );

    let fetched = ok(alice
        .get(&format!("/user/{me}/filter/{}", enc(&filter_id)))
        .await?);
    assert_eq!(fetched["room"]["timeline"]["limit"], 2, "{fetched}");
    assert_eq!(fetched["presence"]["types"], json!([]));

    let missing = alice
        .get(&format!("/user/{me}/filter/{}", enc("99999999")))
        .await?;
    assert_error(&missing, 404, "M_NOT_FOUND");

    let room = alice
        .create_room(&json!({"preset": "private_chat"}))
        .await?;
    let mut sent = Vec::new();
    for i in 0..5 {
        sent.push(alice.send_message(&room, &format!("filtered {i}")).await?);
    }
    let filtered = alice.sync(None, None, Some(&filter_id)).await?;
    let ids = sync::timeline_ids(&filtered, &room);
    assert_eq!(
        ids,
        sent[3..].to_vec(),
        "timeline limit 2 keeps the newest two: {filtered}"
    );
    assert_eq!(
        filtered["rooms"]["join"][&room]["timeline"]["limited"],
        true
    );

    let unfiltered = alice.sync(None, None, None).await?;
    assert!(
        sync::timeline_ids(&unfiltered, &room).len() > 2,
        "without the filter more is returned"
    );
    Ok(())
}

/// Inline JSON filters work too: timeline limit, `rooms` selection and
/// timeline `types`.
async fn inline_filter(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let wanted = alice
        .create_room(&json!({"preset": "private_chat", "name": "wanted"}))
        .await?;
    let other = alice
        .create_room(&json!({"preset": "private_chat", "name": "other"}))
        .await?;
    let mut sent = Vec::new();
    for i in 0..4 {
        sent.push(alice.send_message(&wanted, &format!("inline {i}")).await?);
    }
    alice
        .send_event(&wanted, "com.example.noise", &json!({}))
        .await?;

    let limit_one = json!({"room": {"timeline": {"limit": 1}}}).to_string();
    let response = alice.sync(None, None, Some(&limit_one)).await?;
    assert_eq!(sync::timeline(&response, &wanted).len(), 1, "{response}");
    assert_eq!(sync::timeline(&response, &other).len(), 1, "{response}");

    let only_wanted = json!({"room": {"rooms": [wanted], "timeline": {"limit": 10}}}).to_string();
    let response = alice.sync(None, None, Some(&only_wanted)).await?;
    assert!(
        response["rooms"]["join"].get(&wanted).is_some(),
        "{response}"
    );
    assert!(
        response["rooms"]["join"].get(&other).is_none(),
        "room filter ignored: {response}"
    );

    let messages_only = json!({
        "room": {"rooms": [wanted], "timeline": {"limit": 3, "types": ["m.room.message"]}}
    })
    .to_string();
    let response = alice.sync(None, None, Some(&messages_only)).await?;
    let timeline = sync::timeline(&response, &wanted);
    assert!(
        timeline.iter().all(|e| e["type"] == "m.room.message"),
        "{response}"
    );
    assert_eq!(sync::timeline_ids(&response, &wanted), sent[1..].to_vec());
    Ok(())
}

backend_tests!(stored_filter, inline_filter);
