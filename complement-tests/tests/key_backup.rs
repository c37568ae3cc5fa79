//! Server-side key backups: backup versions (`/room_keys/version[/{version}]`) and the keys
//! stored in them (`/room_keys/keys[/{roomId}[/{sessionId}]]?version=`): the replacement rule,
//! etags and counts, deletes at every level, the current-version check, bad input, and that a
//! backup is its owner's alone.

use complement_tests::{assert_error, backend_tests, enc, ok, Client, TestServer};
use reqwest::Method;
use serde_json::{json, Value};

const ALGORITHM: &str = "m.megolm_backup.v1.curve25519-aes-sha2";
const ROOM_A: &str = "!room-a:example.org";
const ROOM_B: &str = "!room-b:example.org";
const ROOM_C: &str = "!room-c:example.org";

fn auth_data(public_key: &str) -> Value {
    json!({"public_key": public_key, "signatures": {}})
}

async fn create_backup(client: &Client, public_key: &str) -> anyhow::Result<String> {
    let body = ok(client
        .post(
            "/room_keys/version",
            &json!({"algorithm": ALGORITHM, "auth_data": auth_data(public_key)}),
        )
        .await?);
    Ok(body["version"]
        .as_str()
        .unwrap_or_else(|| panic!("version is a string: {body}"))
        .to_owned())
}

/// A key; `marker` tells stored keys apart.
fn key(is_verified: bool, first_message_index: u64, forwarded_count: u64, marker: &str) -> Value {
    json!({
        "first_message_index": first_message_index,
        "forwarded_count": forwarded_count,
        "is_verified": is_verified,
        "session_data": {"ephemeral": "e", "ciphertext": marker, "mac": "m"},
    })
}

/// `/room_keys/keys[/{room}[/{session}]]?version=`.
fn keys_path(version: &str, room: Option<&str>, session: Option<&str>) -> String {
    let mut path = "/room_keys/keys".to_owned();
    for part in [room, session].into_iter().flatten() {
        path.push('/');
        path.push_str(&enc(part));
    }
    format!("{path}?version={}", enc(version))
}

/// The stored key's marker (its `ciphertext`).
async fn stored_marker(client: &Client, version: &str, room: &str, session: &str) -> Value {
    let got = client
        .get(&keys_path(version, Some(room), Some(session)))
        .await
        .expect("GET key");
    ok(got)["session_data"]["ciphertext"].clone()
}

/// Create, read (latest and by version), update and delete versions; numbers are not reused.
async fn backup_versions(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let latest = alice.get("/room_keys/version").await?;
    assert_error(&latest, 404, "M_NOT_FOUND");
    assert_error(
        &alice.get("/room_keys/version/1").await?,
        404,
        "M_NOT_FOUND",
    );

    let v1 = create_backup(&alice, "key-1").await?;
    let expected = json!({
        "algorithm": ALGORITHM, "auth_data": auth_data("key-1"), "count": 0, "version": v1,
    });
    let info = ok(alice.get("/room_keys/version").await?);
    assert!(info["etag"].is_string(), "{info}");
    let without_etag = |mut v: Value| {
        v.as_object_mut().map(|o| o.remove("etag"));
        v
    };
    assert_eq!(without_etag(info.clone()), expected);
    let by_version = ok(alice.get(&format!("/room_keys/version/{v1}")).await?);
    assert_eq!(by_version, info);

    let update = json!({"algorithm": ALGORITHM, "auth_data": auth_data("key-1b"), "version": v1});
    let path = format!("/room_keys/version/{v1}");
    assert_eq!(ok(alice.put(&path, &update).await?), json!({}));
    let info = ok(alice.get(&path).await?);
    assert_eq!(info["auth_data"], auth_data("key-1b"), "{info}");
    let other_algorithm = json!({"algorithm": "m.other", "auth_data": auth_data("x")});
    assert_error(
        &alice.put(&path, &other_algorithm).await?,
        400,
        "M_INVALID_PARAM",
    );
    let other_version =
        json!({"algorithm": ALGORITHM, "auth_data": auth_data("x"), "version": "77"});
    assert_error(
        &alice.put(&path, &other_version).await?,
        400,
        "M_INVALID_PARAM",
    );
    let unknown = json!({"algorithm": ALGORITHM, "auth_data": auth_data("x")});
    assert_error(
        &alice.put("/room_keys/version/77", &unknown).await?,
        404,
        "M_NOT_FOUND",
    );
    assert_eq!(
        ok(alice.get(&path).await?)["auth_data"],
        auth_data("key-1b")
    );

    let v2 = create_backup(&alice, "key-2").await?;
    assert_ne!(v2, v1);
    assert_eq!(ok(alice.get("/room_keys/version").await?)["version"], v2);
    ok(alice.delete(&format!("/room_keys/version/{v2}")).await?);
    assert_error(
        &alice.get(&format!("/room_keys/version/{v2}")).await?,
        404,
        "M_NOT_FOUND",
    );
    assert_eq!(
        ok(alice.get("/room_keys/version").await?)["version"],
        v1,
        "the latest version left is current again"
    );
    ok(alice.delete(&format!("/room_keys/version/{v2}")).await?);
    assert_error(
        &alice.delete("/room_keys/version/77").await?,
        404,
        "M_NOT_FOUND",
    );

    let v3 = create_backup(&alice, "key-3").await?;
    assert!(
        v3 != v1 && v3 != v2,
        "a deleted version's number is not reused: {v1} {v2} {v3}"
    );
    ok(alice.delete(&format!("/room_keys/version/{v1}")).await?);
    ok(alice.delete(&format!("/room_keys/version/{v3}")).await?);
    assert_error(&alice.get("/room_keys/version").await?, 404, "M_NOT_FOUND");

    let missing = alice
        .post("/room_keys/version", &json!({"auth_data": {}}))
        .await?;
    assert_error(&missing, 400, "M_BAD_JSON");
    let not_object = json!({"algorithm": ALGORITHM, "auth_data": "opaque"});
    assert_error(
        &alice.post("/room_keys/version", &not_object).await?,
        400,
        "M_BAD_JSON",
    );
    assert_error(&alice.get("/room_keys/version").await?, 404, "M_NOT_FOUND");
    Ok(())
}

/// A new key replaces the stored one of its session only when it is better: verified beats
/// unverified, then the lower `first_message_index`, then the lower `forwarded_count`; a tie
/// keeps the stored key. The etag moves with every replacement and stays when the stored key
/// wins.
async fn replacement_rules(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let v = create_backup(&alice, "key").await?;
    let path = keys_path(&v, Some(ROOM_A), Some("session"));
    let mut etag = ok(alice.put(&path, &key(false, 5, 1, "first")).await?)["etag"].clone();

    // (new key, whether it replaces the stored one, what is stored afterwards)
    let steps = [
        (key(false, 6, 0, "higher-index"), false, "first"),
        (key(false, 4, 3, "lower-index"), true, "lower-index"),
        (key(false, 4, 4, "more-forwarded"), false, "lower-index"),
        (key(false, 4, 2, "less-forwarded"), true, "less-forwarded"),
        (key(false, 4, 2, "tie"), false, "less-forwarded"),
        (key(true, 9, 9, "verified"), true, "verified"),
        (key(false, 0, 0, "unverified"), false, "verified"),
        (
            key(true, 8, 9, "verified-lower-index"),
            true,
            "verified-lower-index",
        ),
    ];
    for (new, replaces, stored) in steps {
        let res = ok(alice.put(&path, &new).await?);
        assert_eq!(res["count"], 1, "{new}: {res}");
        if replaces {
            assert_ne!(res["etag"], etag, "{new} replaces the stored key");
        } else {
            assert_eq!(res["etag"], etag, "{new} loses to the stored key");
        }
        etag = res["etag"].clone();
        assert_eq!(stored_marker(&alice, &v, ROOM_A, "session").await, stored);
    }
    let info = ok(alice.get(&format!("/room_keys/version/{v}")).await?);
    assert_eq!(info["etag"], etag, "{info}");
    assert_eq!(
        ok(alice.get(&path).await?),
        key(true, 8, 9, "verified-lower-index"),
        "the stored key is served as uploaded"
    );
    Ok(())
}

/// Counts and reads at all three levels; deletes at all three levels.
async fn counts_and_deletes(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let v = create_backup(&alice, "key").await?;
    let all = json!({"rooms": {
        ROOM_A: {"sessions": {"s1": key(true, 0, 0, "a1"), "s2": key(true, 0, 0, "a2")}},
        ROOM_B: {"sessions": {"s1": key(false, 1, 0, "b1")}},
    }});
    let res = ok(alice.put(&keys_path(&v, None, None), &all).await?);
    assert_eq!(res["count"], 3, "{res}");
    let room_c = json!({"sessions": {"s1": key(false, 0, 0, "c1")}});
    let res = ok(alice
        .put(&keys_path(&v, Some(ROOM_C), None), &room_c)
        .await?);
    assert_eq!(res["count"], 4, "{res}");
    let res = ok(alice
        .put(
            &keys_path(&v, Some(ROOM_C), Some("s2")),
            &key(false, 0, 0, "c2"),
        )
        .await?);
    assert_eq!(res["count"], 5, "{res}");
    let mut etag = res["etag"].clone();
    assert_eq!(
        ok(alice.get(&format!("/room_keys/version/{v}")).await?)["count"],
        5
    );

    let got = ok(alice.get(&keys_path(&v, None, None)).await?);
    assert_eq!(got["rooms"][ROOM_A], all["rooms"][ROOM_A], "{got}");
    assert_eq!(got["rooms"][ROOM_B], all["rooms"][ROOM_B], "{got}");
    assert_eq!(got["rooms"].as_object().map(|r| r.len()), Some(3), "{got}");
    let got = ok(alice.get(&keys_path(&v, Some(ROOM_C), None)).await?);
    assert_eq!(
        got,
        json!({"sessions": {"s1": key(false, 0, 0, "c1"), "s2": key(false, 0, 0, "c2")}})
    );
    let empty = ok(alice
        .get(&keys_path(&v, Some("!nothing:example.org"), None))
        .await?);
    assert_eq!(empty, json!({"sessions": {}}));
    assert_error(
        &alice.get(&keys_path(&v, Some(ROOM_A), Some("s9"))).await?,
        404,
        "M_NOT_FOUND",
    );

    // (delete path, count left)
    let deletes = [
        (keys_path(&v, Some(ROOM_A), Some("s1")), 4),
        (keys_path(&v, Some(ROOM_C), None), 2),
        (keys_path(&v, None, None), 0),
    ];
    for (path, left) in deletes {
        let res = ok(alice.delete(&path).await?);
        assert_eq!(res["count"], left, "DELETE {path}: {res}");
        assert_ne!(res["etag"], etag, "DELETE {path} changes the etag");
        etag = res["etag"].clone();
    }
    let res = ok(alice.delete(&keys_path(&v, None, None)).await?);
    assert_eq!(
        (&res["count"], &res["etag"]),
        (&json!(0), &etag),
        "nothing to delete"
    );
    assert_eq!(
        ok(alice.get(&keys_path(&v, None, None)).await?),
        json!({"rooms": {}})
    );

    // Deleting the version deletes its keys: a new version starts empty.
    ok(alice
        .put(
            &keys_path(&v, Some(ROOM_A), Some("s1")),
            &key(true, 0, 0, "a1"),
        )
        .await?);
    ok(alice.delete(&format!("/room_keys/version/{v}")).await?);
    for path in [
        keys_path(&v, None, None),
        keys_path(&v, Some(ROOM_A), None),
        keys_path(&v, Some(ROOM_A), Some("s1")),
    ] {
        assert_error(&alice.get(&path).await?, 404, "M_NOT_FOUND");
        assert_error(&alice.delete(&path).await?, 404, "M_NOT_FOUND");
    }
    let v2 = create_backup(&alice, "key-2").await?;
    assert_eq!(
        ok(alice.get(&format!("/room_keys/version/{v2}")).await?)["count"],
        0
    );
    Ok(())
}

/// Keys go only into the current version (403 with `current_version` otherwise); `version`
/// is required; malformed bodies and room IDs are refused and store nothing.
async fn wrong_version_and_bad_input(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let no_backup = alice
        .put(
            &keys_path("1", Some(ROOM_A), Some("s")),
            &key(true, 0, 0, "x"),
        )
        .await?;
    assert_error(&no_backup, 404, "M_NOT_FOUND");

    let v1 = create_backup(&alice, "key-1").await?;
    let v2 = create_backup(&alice, "key-2").await?;
    for version in [v1.as_str(), "not-a-version", "999"] {
        let stale = alice
            .put(
                &keys_path(version, Some(ROOM_A), Some("s")),
                &key(true, 0, 0, "x"),
            )
            .await?;
        assert_error(&stale, 403, "M_WRONG_ROOM_KEYS_VERSION");
        assert_eq!(stale.body["current_version"], v2, "{:?}", stale);
    }
    let stale_all = alice
        .put(&keys_path(&v1, None, None), &json!({"rooms": {}}))
        .await?;
    assert_error(&stale_all, 403, "M_WRONG_ROOM_KEYS_VERSION");
    assert_eq!(
        ok(alice.get(&keys_path(&v1, None, None)).await?),
        json!({"rooms": {}}),
        "an older version can still be read"
    );

    for path in [
        "/room_keys/keys",
        "/room_keys/keys/!a:b",
        "/room_keys/keys/!a:b/s",
    ] {
        assert_error(&alice.get(path).await?, 400, "M_MISSING_PARAM");
        assert_error(&alice.delete(path).await?, 400, "M_MISSING_PARAM");
    }
    let no_version = alice
        .put("/room_keys/keys/!a:b/s", &key(true, 0, 0, "x"))
        .await?;
    assert_error(&no_version, 400, "M_MISSING_PARAM");

    let session = keys_path(&v2, Some(ROOM_A), Some("s"));
    for (field, bad) in [
        ("is_verified", Value::Null),
        ("first_message_index", json!("1")),
        ("first_message_index", json!(-1)),
        ("forwarded_count", json!(0.5)),
        ("session_data", json!("opaque")),
    ] {
        let mut body = key(true, 0, 0, "x");
        if bad.is_null() {
            body.as_object_mut().map(|o| o.remove(field));
        } else {
            body[field] = bad;
        }
        assert_error(&alice.put(&session, &body).await?, 400, "M_BAD_JSON");
    }
    let not_json = alice
        .raw(
            Method::PUT,
            &session,
            Some(b"{".to_vec()),
            Some("application/json"),
        )
        .await?;
    assert_eq!(not_json.status, 400, "{:?}", not_json);

    // One bad key or room ID refuses the whole upload.
    let one_bad_key = json!({"rooms": {
        ROOM_A: {"sessions": {"good": key(true, 0, 0, "x")}},
        ROOM_B: {"sessions": {"bad": {"first_message_index": 0}}},
    }});
    let bad_room_id = json!({"rooms": {
        ROOM_A: {"sessions": {"good": key(true, 0, 0, "x")}},
        "not-a-room-id": {"sessions": {"s": key(true, 0, 0, "x")}},
    }});
    let all = keys_path(&v2, None, None);
    assert_error(&alice.put(&all, &one_bad_key).await?, 400, "M_BAD_JSON");
    assert_error(
        &alice.put(&all, &json!({"rooms": []})).await?,
        400,
        "M_BAD_JSON",
    );
    assert_error(&alice.put(&all, &json!({})).await?, 400, "M_BAD_JSON");
    assert_error(
        &alice.put(&all, &bad_room_id).await?,
        400,
        "M_INVALID_PARAM",
    );
    let bad_path_room = alice
        .put(
            &keys_path(&v2, Some("not-a-room-id"), None),
            &json!({"sessions": {}}),
        )
        .await?;
    assert_error(&bad_path_room, 400, "M_INVALID_PARAM");
    let bad_room = keys_path(&v2, Some(ROOM_A), None);
    assert_error(
        &alice
            .put(&bad_room, &json!({"sessions": {"s": {}}}))
            .await?,
        400,
        "M_BAD_JSON",
    );
    assert_error(
        &alice
            .get(&keys_path(&v2, Some("not-a-room-id"), None))
            .await?,
        400,
        "M_INVALID_PARAM",
    );

    let info = ok(alice.get("/room_keys/version").await?);
    assert_eq!(info["count"], 0, "nothing was stored: {info}");
    assert_eq!(
        ok(alice.get(&all).await?),
        json!({"rooms": {}}),
        "nothing was stored"
    );
    Ok(())
}

/// Another user sees none of my backup and cannot change it.
async fn backups_are_private(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let bob = server.register("bob", "bob-password").await?;
    let v = create_backup(&alice, "alice-key").await?;
    let session = keys_path(&v, Some(ROOM_A), Some("s"));
    ok(alice.put(&session, &key(true, 0, 0, "alice")).await?);

    assert_error(&bob.get("/room_keys/version").await?, 404, "M_NOT_FOUND");
    let version = format!("/room_keys/version/{v}");
    assert_error(&bob.get(&version).await?, 404, "M_NOT_FOUND");
    let update = json!({"algorithm": ALGORITHM, "auth_data": auth_data("bob")});
    assert_error(&bob.put(&version, &update).await?, 404, "M_NOT_FOUND");
    assert_error(&bob.delete(&version).await?, 404, "M_NOT_FOUND");
    assert_error(&bob.get(&session).await?, 404, "M_NOT_FOUND");
    assert_error(
        &bob.get(&keys_path(&v, None, None)).await?,
        404,
        "M_NOT_FOUND",
    );
    assert_error(&bob.delete(&session).await?, 404, "M_NOT_FOUND");
    assert_error(
        &bob.put(&session, &key(true, 0, 0, "bob")).await?,
        404,
        "M_NOT_FOUND",
    );

    // Bob's own backup is numbered and filled independently.
    let bobs = create_backup(&bob, "bob-key").await?;
    ok(bob
        .put(
            &keys_path(&bobs, Some(ROOM_A), Some("s")),
            &key(true, 0, 0, "bob"),
        )
        .await?);
    let info = ok(alice.get(&version).await?);
    assert_eq!(info["auth_data"], auth_data("alice-key"), "{info}");
    assert_eq!(info["count"], 1, "{info}");
    assert_eq!(stored_marker(&alice, &v, ROOM_A, "s").await, "alice");
    Ok(())
}

backend_tests!(
    backup_versions,
    replacement_rules,
    counts_and_deletes,
    wrong_version_and_bad_input,
    backups_are_private
);
