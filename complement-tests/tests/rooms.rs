//! Room creation and room state: `POST /createRoom` with each preset and
//! option (name, topic, initial_state, invite, room_alias_name,
//! power_level_content_override, is_direct, room_version), `GET
//! /rooms/{roomId}/state`, `GET/PUT /rooms/{roomId}/state/{type}/{key}`, and
//! power-level enforcement on state changes.

use complement_tests::{assert_error, backend_tests, ok, state_path, success, Client, TestServer};
use serde_json::{json, Value};

/// The content of one state event, requiring 200.
async fn state(client: &Client, room: &str, event_type: &str, key: &str) -> anyhow::Result<Value> {
    let response = client.get_state(room, event_type, key).await?;
    success(response, &format!("GET state {event_type}/{key:?}"))
}

/// The content of a state event with an empty state key, or, if the room
/// has none, the content the spec says its absence stands for.
async fn state_or(
    client: &Client,
    room: &str,
    event_type: &str,
    default: &str,
) -> anyhow::Result<Value> {
    let response = client.get_state(room, event_type, "").await?;
    if response.status == 404 {
        let key = event_type.trim_start_matches("m.room.");
        return Ok(json!({ key: default }));
    }
    success(response, &format!("GET state {event_type}"))
}

/// The three presets set join rules, history visibility and guest access
/// as the spec's table says; the default room version is 12.
async fn presets(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let bob = server.register("bob", "bob-password").await?;

    let cases = [
        ("private_chat", "invite", "shared", "can_join"),
        ("public_chat", "public", "shared", "forbidden"),
        ("trusted_private_chat", "invite", "shared", "can_join"),
    ];
    for (preset, join_rule, history, guest) in cases {
        let room = alice
            .create_room(&json!({"preset": preset, "invite": [bob.user_id]}))
            .await?;
        assert!(room.starts_with('!'), "room IDs start with '!': {room}");
        let rules = state(&alice, &room, "m.room.join_rules", "").await?;
        assert_eq!(rules["join_rule"], join_rule, "{preset} join_rule");
        // An absent m.room.history_visibility means `shared` and an
        // absent m.room.guest_access means `forbidden` (event schemas), so
        // a server may leave out an event whose value is the default.
        let visibility = state_or(&alice, &room, "m.room.history_visibility", "shared").await?;
        assert_eq!(
            visibility["history_visibility"], history,
            "{preset} history_visibility"
        );
        let guests = state_or(&alice, &room, "m.room.guest_access", "forbidden").await?;
        assert_eq!(guests["guest_access"], guest, "{preset} guest_access");

        let create = state(&alice, &room, "m.room.create", "").await?;
        assert_eq!(
            create["room_version"], "12",
            "{preset}: default room version"
        );
        let power = state(&alice, &room, "m.room.power_levels", "").await?;
        assert!(
            power["users"].get(&alice.user_id).is_none(),
            "room v12: the creator must not be listed in power_levels.users: {power}"
        );
        let state_default = power["state_default"].as_i64().unwrap_or(50);
        let tombstone = power["events"]["m.room.tombstone"]
            .as_i64()
            .unwrap_or_else(|| panic!("v12 rooms set m.room.tombstone explicitly: {power}"));
        assert!(
            tombstone > state_default,
            "tombstone power must exceed state_default: {power}"
        );

        let member = state(&alice, &room, "m.room.member", &bob.user_id).await?;
        assert_eq!(
            member["membership"], "invite",
            "{preset}: invitee is invited"
        );
        if preset == "trusted_private_chat" {
            let additional = create["additional_creators"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            assert!(
                additional.contains(&json!(bob.user_id)),
                "trusted_private_chat in v12 adds invitees to additional_creators: {create}"
            );
        }
    }

    // trusted_private_chat in a v11 room gives invitees the creator's power.
    let room = alice
        .create_room(&json!({
            "preset": "trusted_private_chat",
            "invite": [bob.user_id],
            "room_version": "11",
        }))
        .await?;
    let power = state(&alice, &room, "m.room.power_levels", "").await?;
    assert_eq!(
        power["users"][&alice.user_id], 100,
        "v11 creator power: {power}"
    );
    assert_eq!(
        power["users"][&bob.user_id], 100,
        "v11 trusted invitee power: {power}"
    );
    Ok(())
}

/// name, topic, initial_state, room_alias_name, invite + is_direct,
/// power_level_content_override and room_version all land in the state.
async fn create_room_options(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let bob = server.register("bob", "bob-password").await?;
    let alias = server.alias("options");

    let room = alice
        .create_room(&json!({
            "preset": "private_chat",
            "name": "The Options Room",
            "topic": "All the options",
            "room_alias_name": "options",
            "invite": [bob.user_id],
            "is_direct": true,
            "room_version": "11",
            "initial_state": [
                {"type": "m.room.history_visibility", "content": {"history_visibility": "joined"}},
                {"type": "com.example.custom", "state_key": "k", "content": {"answer": 42}},
                {"type": "m.room.name", "content": {"name": "overridden by `name`"}},
            ],
            "power_level_content_override": {
                "kick": 42,
                "events": {"m.room.topic": 0},
            },
        }))
        .await?;

    let create = state(&alice, &room, "m.room.create", "").await?;
    assert_eq!(create["room_version"], "11");
    assert_eq!(
        state(&alice, &room, "m.room.name", "").await?["name"],
        "The Options Room"
    );
    assert_eq!(
        state(&alice, &room, "m.room.topic", "").await?["topic"],
        "All the options"
    );
    assert_eq!(
        state(&alice, &room, "m.room.history_visibility", "").await?["history_visibility"],
        "joined",
        "initial_state takes precedence over the preset"
    );
    assert_eq!(
        state(&alice, &room, "com.example.custom", "k").await?["answer"],
        42
    );
    assert_eq!(
        state(&alice, &room, "m.room.canonical_alias", "").await?["alias"],
        alias
    );
    let resolved = ok(alice
        .get(&format!(
            "/directory/room/{}",
            complement_tests::enc(&alias)
        ))
        .await?);
    assert_eq!(resolved["room_id"], room);

    let invite = state(&alice, &room, "m.room.member", &bob.user_id).await?;
    assert_eq!(invite["membership"], "invite");
    assert_eq!(
        invite["is_direct"], true,
        "is_direct marks the invite: {invite}"
    );

    let power = state(&alice, &room, "m.room.power_levels", "").await?;
    assert_eq!(power["kick"], 42, "override applied: {power}");
    assert_eq!(
        power["events"]["m.room.topic"], 0,
        "override applied: {power}"
    );
    assert_eq!(
        power["users"][&alice.user_id], 100,
        "v11 creator keeps 100: {power}"
    );

    // The override is enforced: a power-0 member may now set the topic.
    bob.join(&room).await?;
    bob.send_state(&room, "m.room.topic", "", &json!({"topic": "bob was here"}))
        .await?;
    assert_eq!(
        state(&alice, &room, "m.room.topic", "").await?["topic"],
        "bob was here"
    );
    Ok(())
}

/// A taken alias is 400 `M_ROOM_IN_USE`; an unknown room version is 400
/// `M_UNSUPPORTED_ROOM_VERSION`; neither creates a room.
async fn create_room_errors(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    alice
        .create_room(&json!({"room_alias_name": "taken"}))
        .await?;
    let before = ok(alice.get("/joined_rooms").await?);

    let dup = alice
        .post("/createRoom", &json!({"room_alias_name": "taken"}))
        .await?;
    assert_error(&dup, 400, "M_ROOM_IN_USE");
    let bad_version = alice
        .post("/createRoom", &json!({"room_version": "999"}))
        .await?;
    assert_error(&bad_version, 400, "M_UNSUPPORTED_ROOM_VERSION");

    assert_eq!(
        ok(alice.get("/joined_rooms").await?),
        before,
        "no room was created"
    );
    Ok(())
}

/// `GET /rooms/{id}/state` returns every state event; the single-event
/// endpoint returns the content (or the whole event with
/// `format=event`), 404 `M_NOT_FOUND` for missing state, 403 for
/// non-members. `PUT` state returns an event ID and replaces the state.
async fn room_state_endpoints(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let eve = server.register("eve", "eve-password").await?;
    let room = alice
        .create_room(&json!({"preset": "private_chat", "name": "Stateful"}))
        .await?;

    let all = alice.room_state(&room).await?;
    let types: Vec<&str> = all.iter().filter_map(|e| e["type"].as_str()).collect();
    for required in [
        "m.room.create",
        "m.room.member",
        "m.room.power_levels",
        "m.room.join_rules",
        "m.room.history_visibility",
        "m.room.name",
    ] {
        assert!(
            types.contains(&required),
            "state lacks {required}: {types:?}"
        );
    }
    for event in &all {
        assert!(
            event["event_id"].is_string(),
            "state event without event_id: {event}"
        );
        assert!(
            event["state_key"].is_string(),
            "state event without state_key: {event}"
        );
        assert_eq!(event["room_id"], room);
        assert!(event["sender"].is_string() && event["origin_server_ts"].is_u64());
    }
    let create = all
        .iter()
        .find(|e| e["type"] == "m.room.create")
        .expect("create");
    assert_eq!(create["sender"], alice.user_id);

    let event_id = alice
        .send_state(&room, "com.example.thing", "key-1", &json!({"v": 1}))
        .await?;
    assert!(event_id.starts_with('$'));
    alice
        .send_state(&room, "com.example.thing", "key-1", &json!({"v": 2}))
        .await?;
    assert_eq!(
        state(&alice, &room, "com.example.thing", "key-1").await?,
        json!({"v": 2})
    );

    let full = ok(alice
        .get(&format!(
            "{}?format=event",
            state_path(&room, "m.room.name", "")
        ))
        .await?);
    assert_eq!(full["type"], "m.room.name");
    assert_eq!(full["content"]["name"], "Stateful");
    assert!(
        full["event_id"].is_string(),
        "format=event returns the whole event: {full}"
    );

    let missing = alice
        .get_state(&room, "com.example.thing", "no-such-key")
        .await?;
    assert_error(&missing, 404, "M_NOT_FOUND");

    let outsider = eve.get_state(&room, "m.room.name", "").await?;
    assert_error(&outsider, 403, "M_FORBIDDEN");
    assert_error(
        &eve.get(&format!("/rooms/{}/state", complement_tests::enc(&room)))
            .await?,
        403,
        "M_FORBIDDEN",
    );
    let write = eve
        .put(
            &state_path(&room, "m.room.topic", ""),
            &json!({"topic": "hijack"}),
        )
        .await?;
    assert_error(&write, 403, "M_FORBIDDEN");
    Ok(())
}

/// In a `public_chat` room a member with power 0 may not change the
/// topic (state_default 50): 403 `M_FORBIDDEN`, and the topic stays.
async fn state_needs_power(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let bob = server.register("bob", "bob-password").await?;
    let room = alice
        .create_room(&json!({"preset": "public_chat", "topic": "original topic"}))
        .await?;
    bob.join(&room).await?;

    let denied = bob
        .put(
            &state_path(&room, "m.room.topic", ""),
            &json!({"topic": "bob's topic"}),
        )
        .await?;
    assert_error(&denied, 403, "M_FORBIDDEN");
    assert_eq!(
        state(&alice, &room, "m.room.topic", "").await?["topic"],
        "original topic"
    );

    let power = bob
        .put(
            &state_path(&room, "m.room.power_levels", ""),
            &json!({"users": {bob.user_id.clone(): 100}}),
        )
        .await?;
    assert_error(&power, 403, "M_FORBIDDEN");

    // Messages (events_default 0) are fine.
    bob.send_message(&room, "hello").await?;
    // The creator may change it.
    alice
        .send_state(&room, "m.room.topic", "", &json!({"topic": "new topic"}))
        .await?;
    assert_eq!(
        state(&bob, &room, "m.room.topic", "").await?["topic"],
        "new topic"
    );
    Ok(())
}

backend_tests!(
    presets,
    create_room_options,
    create_room_errors,
    room_state_endpoints,
    state_needs_power
);
