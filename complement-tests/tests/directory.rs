//! Room aliases and the published room directory: `PUT/GET/DELETE
//! /directory/room/{roomAlias}`, `GET /rooms/{roomId}/aliases`, `GET/PUT
//! /directory/list/room/{roomId}` and `GET/POST /publicRooms` with
//! `generic_search_term` filtering and `limit`/`since` pagination.

use complement_tests::{assert_error, backend_tests, enc, ok, Client, TestServer};
use serde_json::{json, Value};
use std::collections::BTreeSet;

fn aliases_of(body: &Value) -> Vec<String> {
    body["aliases"]
        .as_array()
        .unwrap_or_else(|| panic!("aliases is not an array: {body}"))
        .iter()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect()
}

/// Follows `GET /publicRooms?limit=..&since=..` until `next_batch` is
/// omitted; returns the room IDs in order.
async fn all_public_rooms_get(client: &Client, limit: u32) -> anyhow::Result<Vec<String>> {
    let mut since: Option<String> = None;
    let mut rooms = Vec::new();
    for _ in 0..50 {
        let mut path = format!("/publicRooms?limit={limit}");
        if let Some(since) = &since {
            path.push_str(&format!("&since={}", enc(since)));
        }
        let page = ok(client.get(&path).await?);
        let chunk = page["chunk"]
            .as_array()
            .unwrap_or_else(|| panic!("chunk: {page}"));
        assert!(
            chunk.len() <= limit as usize,
            "page longer than limit: {page}"
        );
        rooms.extend(
            chunk
                .iter()
                .filter_map(|r| r["room_id"].as_str().map(str::to_owned)),
        );
        match page["next_batch"].as_str() {
            Some(next) if !chunk.is_empty() => since = Some(next.to_owned()),
            _ => return Ok(rooms),
        }
    }
    panic!("publicRooms pagination did not end");
}

/// Create, resolve, list, duplicate (409), delete and re-resolve (404)
/// an alias; invalid aliases are 400 `M_INVALID_PARAM`.
async fn room_aliases(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let room = alice.create_room(&json!({"preset": "public_chat"})).await?;
    let alias = server.alias("lounge");
    let path = format!("/directory/room/{}", enc(&alias));

    assert_error(&alice.get(&path).await?, 404, "M_NOT_FOUND");
    ok(alice.put(&path, &json!({"room_id": room})).await?);

    // Resolving needs no access token.
    let resolved = ok(server.anonymous().get(&path).await?);
    assert_eq!(resolved["room_id"], room);
    let servers = resolved["servers"]
        .as_array()
        .unwrap_or_else(|| panic!("servers: {resolved}"));
    assert!(
        servers.iter().any(|s| s == server.server_name()),
        "servers should include this server: {resolved}"
    );
    let authed = ok(alice.get(&path).await?);
    assert_eq!(authed["room_id"], room);

    let listed = ok(alice.get(&format!("/rooms/{}/aliases", enc(&room))).await?);
    assert!(aliases_of(&listed).contains(&alias), "{listed}");

    let other = alice.create_room(&json!({})).await?;
    let dup = alice.put(&path, &json!({"room_id": other})).await?;
    assert_eq!(
        dup.status, 409,
        "an existing alias is a conflict: {:?}",
        dup
    );
    assert_eq!(
        ok(alice.get(&path).await?)["room_id"],
        room,
        "the mapping is unchanged"
    );

    let invalid = alice
        .put(
            &format!("/directory/room/{}", enc("no-sigil-or-server")),
            &json!({"room_id": room}),
        )
        .await?;
    assert_error(&invalid, 400, "M_INVALID_PARAM");
    let invalid_get = alice
        .get(&format!("/directory/room/{}", enc("no-sigil-or-server")))
        .await?;
    assert_error(&invalid_get, 400, "M_INVALID_PARAM");

    ok(alice.delete(&path).await?);
    assert_error(&alice.get(&path).await?, 404, "M_NOT_FOUND");
    assert_error(&alice.delete(&path).await?, 404, "M_NOT_FOUND");
    let listed = ok(alice.get(&format!("/rooms/{}/aliases", enc(&room))).await?);
    assert!(!aliases_of(&listed).contains(&alias), "{listed}");

    // A non-member may not list the aliases of a private room.
    let private = alice
        .create_room(&json!({"preset": "private_chat"}))
        .await?;
    let eve = server.register("eve", "eve-password").await?;
    let denied = eve
        .get(&format!("/rooms/{}/aliases", enc(&private)))
        .await?;
    assert_error(&denied, 403, "M_FORBIDDEN");
    Ok(())
}

/// `GET/PUT /directory/list/room/{roomId}` and the effect on
/// `/publicRooms`; rooms created with `visibility: public` start
/// published.
async fn directory_visibility(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let room = alice
        .create_room(&json!({"preset": "public_chat", "name": "Toggled"}))
        .await?;
    let path = format!("/directory/list/room/{}", enc(&room));

    let vis = ok(server.anonymous().get(&path).await?);
    assert_eq!(
        vis["visibility"], "private",
        "rooms are unpublished by default"
    );
    assert!(!all_public_rooms_get(&alice, 10).await?.contains(&room));

    ok(alice.put(&path, &json!({"visibility": "public"})).await?);
    assert_eq!(ok(alice.get(&path).await?)["visibility"], "public");
    let listed = ok(server.anonymous().get("/publicRooms").await?);
    let entry = listed["chunk"]
        .as_array()
        .expect("chunk")
        .iter()
        .find(|r| r["room_id"] == room)
        .cloned()
        .unwrap_or_else(|| panic!("published room missing from /publicRooms: {listed}"));
    assert_eq!(entry["name"], "Toggled");
    assert_eq!(entry["num_joined_members"], 1);
    assert_eq!(entry["world_readable"], false);
    assert_eq!(entry["guest_can_join"], false);
    assert_eq!(entry["join_rule"], "public");

    ok(alice.put(&path, &json!({"visibility": "private"})).await?);
    assert_eq!(ok(alice.get(&path).await?)["visibility"], "private");
    assert!(!all_public_rooms_get(&alice, 10).await?.contains(&room));

    let published = alice
        .create_room(&json!({"preset": "public_chat", "visibility": "public"}))
        .await?;
    let vis = ok(alice
        .get(&format!("/directory/list/room/{}", enc(&published)))
        .await?);
    assert_eq!(vis["visibility"], "public");

    let unknown = format!("!unknownroom:{}", server.server_name());
    let missing = alice
        .get(&format!("/directory/list/room/{}", enc(&unknown)))
        .await?;
    assert_error(&missing, 404, "M_NOT_FOUND");
    Ok(())
}

/// `/publicRooms` paginates with `limit`/`next_batch` without repeats or
/// gaps; `POST` filters by `generic_search_term` (name or topic) and
/// paginates too.
async fn public_rooms_search_and_pagination(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let mut created = BTreeSet::new();
    for i in 0..5 {
        let room = alice
            .create_room(&json!({
                "preset": "public_chat",
                "visibility": "public",
                "name": format!("Published room {i}"),
            }))
            .await?;
        created.insert(room);
    }
    let needle = alice
        .create_room(&json!({
            "preset": "public_chat",
            "visibility": "public",
            "name": "Haystack",
            "topic": "there is a Needle in here",
        }))
        .await?;
    created.insert(needle.clone());
    // An unpublished room never shows up.
    let hidden = alice
        .create_room(&json!({"preset": "public_chat", "name": "Published room hidden"}))
        .await?;

    let paged = all_public_rooms_get(&alice, 2).await?;
    let unique: BTreeSet<String> = paged.iter().cloned().collect();
    assert_eq!(
        unique.len(),
        paged.len(),
        "pagination repeated a room: {paged:?}"
    );
    assert_eq!(unique, created, "pagination lost or invented rooms");

    let first = ok(alice.get("/publicRooms?limit=2").await?);
    if let Some(estimate) = first.get("total_room_count_estimate") {
        assert!(estimate.as_u64().is_some_and(|n| n >= 2), "{first}");
    }

    let search = ok(alice
        .post(
            "/publicRooms",
            &json!({"filter": {"generic_search_term": "needle"}}),
        )
        .await?);
    let found: Vec<&str> = search["chunk"]
        .as_array()
        .expect("chunk")
        .iter()
        .filter_map(|r| r["room_id"].as_str())
        .collect();
    assert_eq!(
        found,
        vec![needle.as_str()],
        "search is by name/topic, case-insensitive: {search}"
    );

    let by_name = ok(alice
        .post(
            "/publicRooms",
            &json!({"filter": {"generic_search_term": "Published room"}, "limit": 3}),
        )
        .await?);
    let mut seen: Vec<String> = by_name["chunk"]
        .as_array()
        .expect("chunk")
        .iter()
        .filter_map(|r| r["room_id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(seen.len(), 3, "limit honoured: {by_name}");
    let next = by_name["next_batch"]
        .as_str()
        .unwrap_or_else(|| panic!("more results remain: {by_name}"));
    let rest = ok(alice
        .post(
            "/publicRooms",
            &json!({
                "filter": {"generic_search_term": "Published room"},
                "limit": 3,
                "since": next,
            }),
        )
        .await?);
    seen.extend(
        rest["chunk"]
            .as_array()
            .expect("chunk")
            .iter()
            .filter_map(|r| r["room_id"].as_str().map(str::to_owned)),
    );
    let seen_set: BTreeSet<String> = seen.iter().cloned().collect();
    assert_eq!(seen.len(), 5, "five published rooms match: {seen:?}");
    assert_eq!(seen_set.len(), 5);
    assert!(!seen_set.contains(&hidden) && !seen_set.contains(&needle));

    let nothing = ok(alice
        .post(
            "/publicRooms",
            &json!({"filter": {"generic_search_term": "zzz-no-such-room"}}),
        )
        .await?);
    assert_eq!(nothing["chunk"], json!([]));
    Ok(())
}

backend_tests!(
    room_aliases,
    directory_visibility,
    public_rooms_search_and_pagination
);
