//! Malformed and hostile requests: bodies that are not JSON (`M_NOT_JSON`),
//! JSON of the wrong shape (`M_BAD_JSON`), unknown endpoints and methods
//! (`M_UNRECOGNIZED`), oversized events (`M_TOO_LARGE`), invalid room IDs in
//! paths (`M_INVALID_PARAM`), missing or unknown access tokens, and event
//! content that is not canonical JSON (floats, integers beyond 2^53). After
//! each rejection the test checks that nothing changed.

use complement_tests::{assert_error, backend_tests, enc, ok, unique_txn_id, Client, TestServer};
use reqwest::Method;
use serde_json::json;

/// Sends a raw body to the room's send endpoint with a fresh transaction ID.
async fn send_raw(
    client: &Client,
    room: &str,
    event_type: &str,
    body: &str,
) -> anyhow::Result<complement_tests::Response> {
    let path = format!(
        "/rooms/{}/send/{}/{}",
        enc(room),
        enc(event_type),
        unique_txn_id()
    );
    client
        .raw(
            Method::PUT,
            &path,
            Some(body.as_bytes().to_vec()),
            Some("application/json"),
        )
        .await
}

/// Bodies that are not JSON are 400 `M_NOT_JSON`; valid JSON of the
/// wrong shape is 400 `M_BAD_JSON`; nothing is created.
async fn not_json_and_bad_json(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let room = alice
        .create_room(&json!({"preset": "private_chat"}))
        .await?;
    let rooms_before = ok(alice.get("/joined_rooms").await?);
    let timeline_before = alice.recent_event_ids(&room, 50).await?;

    for body in [
        &b"{\"name\": "[..],
        b"not json at all",
        b"{'single': 'quotes'}",
        b"\xff\xfe",
    ] {
        let response = alice
            .raw(
                Method::POST,
                "/createRoom",
                Some(body.to_vec()),
                Some("application/json"),
            )
            .await?;
        assert_error(&response, 400, "M_NOT_JSON");
    }
    let response = send_raw(
        &alice,
        &room,
        "m.room.message",
        "{\"msgtype\": \"m.text\", \"body\": ",
    )
    .await?;
    assert_error(&response, 400, "M_NOT_JSON");

    let wrong_type = alice.post("/createRoom", &json!({"name": 5})).await?;
    assert_error(&wrong_type, 400, "M_BAD_JSON");
    let wrong_preset = alice
        .post("/createRoom", &json!({"preset": "no_such_preset"}))
        .await?;
    assert_error(&wrong_preset, 400, "M_BAD_JSON");
    let invite_not_list = alice
        .post("/createRoom", &json!({"invite": "@bob:example.org"}))
        .await?;
    assert_error(&invite_not_list, 400, "M_BAD_JSON");

    let no_password = server
        .anonymous()
        .post(
            "/login",
            &json!({
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": "alice"},
            }),
        )
        .await?;
    assert_error(&no_password, 400, "M_BAD_JSON");

    // Event content must be a JSON object.
    let array_content = send_raw(&alice, &room, "m.room.message", "[1, 2]").await?;
    assert_error(&array_content, 400, "M_BAD_JSON");

    assert_eq!(
        ok(alice.get("/joined_rooms").await?),
        rooms_before,
        "no room was created"
    );
    assert_eq!(
        alice.recent_event_ids(&room, 50).await?,
        timeline_before,
        "the timeline is unchanged"
    );
    Ok(())
}

/// Unknown endpoints are 404 `M_UNRECOGNIZED`; a known path with the
/// wrong method is 405 `M_UNRECOGNIZED`.
async fn unrecognized_requests(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let anon = server.anonymous();
    for path in [
        "/_matrix/client/v3/definitely_not_an_endpoint",
        "/_matrix/client/v3/account/whoami/extra/segments",
        "/_matrix/client/unknown_version/sync",
        "/_matrix/not_an_api/v1/anything",
    ] {
        assert_error(&anon.get(path).await?, 404, "M_UNRECOGNIZED");
        assert_error(&alice.get(path).await?, 404, "M_UNRECOGNIZED");
    }
    assert_error(
        &alice
            .post("/_matrix/client/v3/definitely_not_an_endpoint", &json!({}))
            .await?,
        404,
        "M_UNRECOGNIZED",
    );

    assert_error(
        &anon.post("/_matrix/client/versions", &json!({})).await?,
        405,
        "M_UNRECOGNIZED",
    );
    assert_error(&alice.delete("/createRoom").await?, 405, "M_UNRECOGNIZED");
    assert_error(&alice.get("/createRoom").await?, 405, "M_UNRECOGNIZED");
    assert_error(
        &alice.put("/account/whoami", &json!({})).await?,
        405,
        "M_UNRECOGNIZED",
    );
    assert_error(&alice.get("/logout").await?, 405, "M_UNRECOGNIZED");
    Ok(())
}

/// No token is 401 `M_MISSING_TOKEN`; an unknown token is 401
/// `M_UNKNOWN_TOKEN`; either way nothing happens.
async fn access_tokens(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let room = alice
        .create_room(&json!({"preset": "private_chat"}))
        .await?;
    let before = alice.recent_event_ids(&room, 50).await?;
    let anon = server.anonymous();
    let forged = alice.with_access_token(Some("syt_not_a_real_token"));

    for client in [&anon, &forged] {
        let errcode = if client.access_token.is_some() {
            "M_UNKNOWN_TOKEN"
        } else {
            "M_MISSING_TOKEN"
        };
        assert_error(&client.get("/account/whoami").await?, 401, errcode);
        assert_error(&client.get("/sync").await?, 401, errcode);
        assert_error(&client.post("/createRoom", &json!({})).await?, 401, errcode);
        let send = client
            .put(
                &format!(
                    "/rooms/{}/send/m.room.message/{}",
                    enc(&room),
                    unique_txn_id()
                ),
                &json!({"msgtype": "m.text", "body": "intruder"}),
            )
            .await?;
        assert_error(&send, 401, errcode);
    }
    assert_eq!(alice.recent_event_ids(&room, 50).await?, before);
    Ok(())
}

/// An event bigger than 65536 bytes is 413 `M_TOO_LARGE` and is not
/// stored.
async fn oversized_event(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let room = alice
        .create_room(&json!({"preset": "private_chat"}))
        .await?;
    let before = alice.recent_event_ids(&room, 50).await?;

    let huge = "x".repeat(70_000);
    let message = alice
        .put(
            &format!(
                "/rooms/{}/send/m.room.message/{}",
                enc(&room),
                unique_txn_id()
            ),
            &json!({"msgtype": "m.text", "body": huge}),
        )
        .await?;
    assert_error(&message, 413, "M_TOO_LARGE");
    let state = alice
        .put(
            &complement_tests::state_path(&room, "m.room.topic", ""),
            &json!({"topic": huge}),
        )
        .await?;
    assert_error(&state, 413, "M_TOO_LARGE");
    assert_eq!(
        alice.recent_event_ids(&room, 50).await?,
        before,
        "nothing was stored"
    );

    // Just under the limit is fine.
    alice.send_message(&room, &"y".repeat(60_000)).await?;
    Ok(())
}

/// A malformed room ID in the path is 400 `M_INVALID_PARAM`.
async fn invalid_room_id_in_path(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    for bad in ["not-a-room-id", "#alias:localhost", "@user:localhost"] {
        let room = enc(bad);
        let send = alice
            .put(
                &format!("/rooms/{room}/send/m.room.message/{}", unique_txn_id()),
                &json!({"msgtype": "m.text", "body": "x"}),
            )
            .await?;
        assert_error(&send, 400, "M_INVALID_PARAM");
        assert_error(
            &alice.get(&format!("/rooms/{room}/state")).await?,
            400,
            "M_INVALID_PARAM",
        );
        assert_error(
            &alice.get(&format!("/rooms/{room}/messages?dir=b")).await?,
            400,
            "M_INVALID_PARAM",
        );
        assert_error(
            &alice
                .post(&format!("/rooms/{room}/leave"), &json!({}))
                .await?,
            400,
            "M_INVALID_PARAM",
        );
    }
    Ok(())
}

/// Event content must be canonical JSON: no floats, no integers outside
/// ±(2^53 − 1). Such events are 400 `M_BAD_JSON` and are not stored.
async fn non_canonical_event_content(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let room = alice
        .create_room(&json!({"preset": "private_chat"}))
        .await?;
    let before = alice.recent_event_ids(&room, 50).await?;

    for body in [
        r#"{"body":"x","msgtype":"m.text","n":1.5}"#,
        r#"{"body":"x","msgtype":"m.text","n":1e3}"#,
        r#"{"body":"x","msgtype":"m.text","n":9007199254740992}"#,
        r#"{"body":"x","msgtype":"m.text","n":-9007199254740992}"#,
        r#"{"body":"x","msgtype":"m.text","deep":{"list":[1, 2.25]}}"#,
        r#"{"body":"x","msgtype":"m.text","n":18446744073709551616}"#,
    ] {
        let response = send_raw(&alice, &room, "m.room.message", body).await?;
        assert_error(&response, 400, "M_BAD_JSON");
    }
    let state = alice
        .raw(
            Method::PUT,
            &complement_tests::state_path(&room, "com.example.state", ""),
            Some(br#"{"ratio":0.5}"#.to_vec()),
            Some("application/json"),
        )
        .await?;
    assert_error(&state, 400, "M_BAD_JSON");
    assert_eq!(
        alice.recent_event_ids(&room, 50).await?,
        before,
        "nothing was stored"
    );

    // The largest safe integers are accepted.
    let ok_body =
        r#"{"body":"x","msgtype":"m.text","max":9007199254740991,"min":-9007199254740991}"#;
    let accepted = send_raw(&alice, &room, "m.room.message", ok_body).await?;
    let event_id = ok(accepted)["event_id"]
        .as_str()
        .expect("event_id")
        .to_owned();
    let event = ok(alice
        .get(&format!("/rooms/{}/event/{}", enc(&room), enc(&event_id)))
        .await?);
    assert_eq!(event["content"]["max"], json!(9007199254740991_i64));
    assert_eq!(event["content"]["min"], json!(-9007199254740991_i64));
    Ok(())
}

backend_tests!(
    not_json_and_bad_json,
    unrecognized_requests,
    access_tokens,
    oversized_event,
    invalid_room_id_in_path,
    non_canonical_event_content
);
