//! Simplified sliding sync (MSC4186) over raw HTTP:
//! `POST /_matrix/client/unstable/org.matrix.simplified_msc3575/sync`.
//!
//! Lists (ranges, counts, activity order, filters), room configs (`timeline_limit`,
//! `required_state` with `*`, `$LAZY`, `$ME`), incremental responses carrying only changes,
//! room subscriptions, leaves, `pos` handling (`M_UNKNOWN_POS`, `/messages` from a `pos`),
//! long-polling, the `to_device`, `e2ee`, `account_data` and `receipts` extensions, and bad
//! input.

use std::collections::BTreeSet;

use complement_tests::{
    assert_error, backend_tests, enc, ok, query, unique_txn_id, Client, Response, TestServer,
};
use reqwest::Method;
use serde_json::{json, Value};

const SS: &str = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync";
const PW: &str = "sliding-password";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// One sliding-sync request.
async fn ss(
    client: &Client,
    pos: Option<&str>,
    timeout: Option<u64>,
    body: &Value,
) -> anyhow::Result<Response> {
    let timeout = timeout.map(|t| t.to_string());
    let mut pairs = Vec::new();
    if let Some(p) = pos {
        pairs.push(("pos", p));
    }
    if let Some(t) = &timeout {
        pairs.push(("timeout", t.as_str()));
    }
    client.post(&format!("{SS}{}", query(&pairs)), body).await
}

/// One request that must succeed.
async fn ss_ok(client: &Client, pos: Option<&str>, body: &Value) -> anyhow::Result<Value> {
    Ok(ok(ss(client, pos, Some(0), body).await?))
}

fn pos(resp: &Value) -> String {
    resp["pos"]
        .as_str()
        .unwrap_or_else(|| panic!("response without pos: {resp}"))
        .to_owned()
}

fn room_ids(resp: &Value) -> BTreeSet<String> {
    resp["rooms"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

fn set(ids: &[&String]) -> BTreeSet<String> {
    ids.iter().map(|s| (*s).clone()).collect()
}

fn bodies(room: &Value) -> Vec<String> {
    room["timeline"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter(|e| e["type"] == "m.room.message")
                .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn state_keys(room: &Value) -> BTreeSet<(String, String)> {
    room["required_state"]
        .as_array()
        .map(|s| {
            s.iter()
                .map(|e| {
                    (
                        e["type"].as_str().unwrap_or("").to_owned(),
                        e["state_key"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn list(name: &str, ranges: Value, timeline_limit: u64, required_state: Value) -> Value {
    json!({ "lists": { name: {
        "ranges": ranges,
        "timeline_limit": timeline_limit,
        "required_state": required_state,
    }}})
}

fn pair(t: &str, k: &str) -> (String, String) {
    (t.to_owned(), k.to_owned())
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// `/versions` advertises the feature the SDKs look for.
async fn versions_advertise_simplified_sliding_sync(server: TestServer) -> anyhow::Result<()> {
    let v = ok(server.anonymous().get("/_matrix/client/versions").await?);
    assert_eq!(
        v["unstable_features"]["org.matrix.simplified_msc3575"],
        true
    );
    Ok(())
}

/// Rooms come most recently active first; ranges index into that order; `count` counts
/// every matching room.
async fn lists_ranges_count_and_order(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", PW).await?;
    let r1 = alice.create_room(&json!({"name": "one"})).await?;
    let r2 = alice.create_room(&json!({"name": "two"})).await?;
    let r3 = alice.create_room(&json!({"name": "three"})).await?;
    alice.send_message(&r1, "r1 is now the most recent").await?;

    let first = ss_ok(&alice, None, &list("all", json!([[0, 0]]), 1, json!([]))).await?;
    assert_eq!(first["lists"]["all"]["count"], 3, "{first}");
    assert_eq!(room_ids(&first), set(&[&r1]), "{first}");
    let room = &first["rooms"][&r1];
    assert_eq!(room["initial"], true);
    assert_eq!(room["name"], "one");
    assert_eq!(bodies(room), vec!["r1 is now the most recent"]);

    let rest = ss_ok(&alice, None, &list("all", json!([[1, 5]]), 1, json!([]))).await?;
    assert_eq!(room_ids(&rest), set(&[&r2, &r3]), "{rest}");
    let stamp = |r: &Value, id: &str| r["rooms"][id]["bump_stamp"].as_i64().unwrap_or(-1);
    assert!(stamp(&first, &r1) > stamp(&rest, &r3), "{first} {rest}");
    assert!(stamp(&rest, &r3) > stamp(&rest, &r2), "{rest}");

    // Two ranges, and no ranges at all (every room).
    let two = ss_ok(
        &alice,
        None,
        &list("all", json!([[0, 0], [2, 2]]), 0, json!([])),
    )
    .await?;
    assert_eq!(room_ids(&two), set(&[&r1, &r2]), "{two}");
    let body = json!({"lists": {"all": {"timeline_limit": 0, "required_state": []}}});
    let every = ss_ok(&alice, None, &body).await?;
    assert_eq!(room_ids(&every), set(&[&r1, &r2, &r3]), "{every}");
    // The newest text's single `range`.
    let body = json!({"lists": {"all": {"range": [1, 1], "timeline_limit": 0}}});
    let one = ss_ok(&alice, None, &body).await?;
    assert_eq!(room_ids(&one), set(&[&r3]), "{one}");
    Ok(())
}

/// `timeline_limit` caps the timeline (oldest first), `limited` says more exist, and
/// `prev_batch` (and a `pos`) paginate with `/messages`.
async fn timeline_limit_limited_and_prev_batch(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", PW).await?;
    let room = alice.create_room(&json!({})).await?;
    for i in 1..=5 {
        alice.send_message(&room, &format!("m{i}")).await?;
    }
    let resp = ss_ok(&alice, None, &list("all", json!([[0, 9]]), 2, json!([]))).await?;
    let r = &resp["rooms"][&room];
    assert_eq!(bodies(r), vec!["m4", "m5"], "{r}");
    assert_eq!(r["limited"], true, "{r}");
    assert_eq!(r["num_live"], 0, "{r}");
    let prev = r["prev_batch"].as_str().expect("prev_batch");
    let older = ok(alice
        .get(&format!(
            "/rooms/{}/messages?dir=b&limit=2&from={}",
            enc(&room),
            enc(prev)
        ))
        .await?);
    let got: Vec<&str> = older["chunk"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["content"]["body"].as_str())
        .collect();
    assert_eq!(got, vec!["m3", "m2"], "{older}");

    // The response's pos works as a `from` token too: backwards from it is the newest event.
    let p = pos(&resp);
    let newest = ok(alice
        .get(&format!(
            "/rooms/{}/messages?dir=b&limit=1&from={}",
            enc(&room),
            enc(&p)
        ))
        .await?);
    assert_eq!(newest["chunk"][0]["content"]["body"], "m5", "{newest}");

    // A timeline that fits is not limited.
    let all = ss_ok(&alice, None, &list("all", json!([[0, 9]]), 50, json!([]))).await?;
    let r = &all["rooms"][&room];
    assert!(r["limited"].is_null() || r["limited"] == false, "{r}");
    assert_eq!(bodies(r), vec!["m1", "m2", "m3", "m4", "m5"]);
    assert_eq!(r["timeline"][0]["type"], "m.room.create", "{r}");
    Ok(())
}

/// An incremental response carries only rooms that changed, with only the new events.
async fn incremental_responses_carry_only_changes(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", PW).await?;
    let bob = server.register("bob", PW).await?;
    let r1 = alice.create_room(&json!({"preset": "public_chat"})).await?;
    let r2 = alice.create_room(&json!({})).await?;
    bob.join(&r1).await?;
    let req = list("all", json!([[0, 9]]), 5, json!([["m.room.member", "$ME"]]));
    let first = ss_ok(&alice, None, &req).await?;
    assert_eq!(room_ids(&first), set(&[&r1, &r2]));

    // Nothing new: an empty answer (with timeout 0).
    let p1 = pos(&first);
    let idle = ss_ok(&alice, Some(&p1), &req).await?;
    assert_eq!(room_ids(&idle), BTreeSet::new(), "{idle}");

    bob.send_message(&r1, "news").await?;
    let p2 = pos(&idle);
    let next = ss_ok(&alice, Some(&p2), &req).await?;
    assert_eq!(room_ids(&next), set(&[&r1]), "{next}");
    let r = &next["rooms"][&r1];
    assert!(r["initial"].is_null() || r["initial"] == false, "{r}");
    assert_eq!(bodies(r), vec!["news"], "{r}");
    assert_eq!(r["timeline"].as_array().map(Vec::len), Some(1), "{r}");
    assert_eq!(r["num_live"], 1, "{r}");
    // The own membership was sent before and did not change.
    assert!(state_keys(r).is_empty(), "{r}");

    // A retry of the same pos gives the same changes (the client may not have seen them).
    let again = ss_ok(&alice, Some(&p2), &req).await?;
    assert_eq!(bodies(&again["rooms"][&r1]), vec!["news"], "{again}");
    Ok(())
}

/// `required_state`: exact pairs, `$ME`, `$LAZY` (members of the timeline's senders only),
/// and `["*", "*"]`.
async fn required_state_specials(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", PW).await?;
    let bob = server.register("bob", PW).await?;
    let carol = server.register("carol", PW).await?;
    let room = alice
        .create_room(&json!({"preset": "public_chat", "name": "N", "topic": "T"}))
        .await?;
    carol.join(&room).await?;
    bob.join(&room).await?;
    bob.send_message(&room, "bob speaks").await?;

    let req = list(
        "l",
        json!([[0, 0]]),
        1,
        json!([["m.room.name", ""], ["m.room.member", "$ME"]]),
    );
    let r = ss_ok(&alice, None, &req).await?;
    let keys = state_keys(&r["rooms"][&room]);
    assert_eq!(
        keys,
        [
            pair("m.room.name", ""),
            pair("m.room.member", &alice.user_id)
        ]
        .into(),
        "{r}"
    );

    let req = list("l", json!([[0, 0]]), 1, json!([["m.room.member", "$LAZY"]]));
    let r = ss_ok(&alice, None, &req).await?;
    let keys = state_keys(&r["rooms"][&room]);
    assert_eq!(keys, [pair("m.room.member", &bob.user_id)].into(), "{r}");
    assert_eq!(r["rooms"][&room]["joined_count"], 3);

    let req = list("l", json!([[0, 0]]), 1, json!([["*", "*"]]));
    let r = ss_ok(&alice, None, &req).await?;
    let keys = state_keys(&r["rooms"][&room]);
    for k in [
        pair("m.room.create", ""),
        pair("m.room.topic", ""),
        pair("m.room.member", &carol.user_id),
    ] {
        assert!(keys.contains(&k), "{k:?} missing in {r}");
    }
    // A state key wildcard for one type.
    let req = list("l", json!([[0, 0]]), 1, json!([["m.room.member", "*"]]));
    let r = ss_ok(&alice, None, &req).await?;
    assert_eq!(state_keys(&r["rooms"][&room]).len(), 3, "{r}");
    Ok(())
}

/// Room subscriptions return their room with their own config, also outside every list;
/// rooms the user was never in are not returned.
async fn room_subscriptions(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", PW).await?;
    let bob = server.register("bob", PW).await?;
    let old = alice.create_room(&json!({})).await?;
    for i in 1..=4 {
        alice.send_message(&old, &format!("o{i}")).await?;
    }
    let newer = alice.create_room(&json!({})).await?;
    let foreign = bob.create_room(&json!({})).await?;
    let mut body = list("l", json!([[0, 0]]), 1, json!([]));
    body["room_subscriptions"] = json!({
        &old: {"timeline_limit": 3, "required_state": [["m.room.create", ""]]},
        &foreign: {"timeline_limit": 3, "required_state": []},
    });
    let r = ss_ok(&alice, None, &body).await?;
    assert_eq!(room_ids(&r), set(&[&newer, &old]), "{r}");
    assert_eq!(bodies(&r["rooms"][&old]), vec!["o2", "o3", "o4"]);
    assert_eq!(
        state_keys(&r["rooms"][&old]),
        [pair("m.room.create", "")].into()
    );

    // A raised timeline limit on a known room sends the newest events again at once.
    let p = pos(&r);
    body["room_subscriptions"][&old]["timeline_limit"] = json!(4);
    let r = ss_ok(&alice, Some(&p), &body).await?;
    assert_eq!(room_ids(&r), set(&[&old]), "{r}");
    assert_eq!(bodies(&r["rooms"][&old]), vec!["o1", "o2", "o3", "o4"]);
    assert_eq!(r["rooms"][&old]["unstable_expanded_timeline"], true);

    let bad = json!({"room_subscriptions": {"not-a-room": {"timeline_limit": 1}}});
    assert_error(&ss(&alice, None, None, &bad).await?, 400, "M_INVALID_PARAM");
    Ok(())
}

/// Filters `is_dm`, `is_encrypted`, `is_invite`, `room_types`; invites carry `invite_state`.
async fn list_filters(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", PW).await?;
    let bob = server.register("bob", PW).await?;
    let plain = alice.create_room(&json!({})).await?;
    let encrypted = alice
        .create_room(&json!({"initial_state": [{
            "type": "m.room.encryption", "state_key": "",
            "content": {"algorithm": "m.megolm.v1.aes-sha2"}
        }]}))
        .await?;
    let dm = alice.create_room(&json!({})).await?;
    let space = alice
        .create_room(&json!({"creation_content": {"type": "m.space"}}))
        .await?;
    let invited = bob.create_room(&json!({"name": "Bob's"})).await?;
    bob.invite(&invited, &alice.user_id).await?;
    ok(alice
        .put(
            &format!("/user/{}/account_data/m.direct", enc(&alice.user_id)),
            &json!({ &bob.user_id: [&dm] }),
        )
        .await?);

    let filtered = |filters: Value| {
        json!({"lists": {"f": {"ranges": [[0, 20]], "timeline_limit": 1,
            "required_state": [], "filters": filters}}})
    };
    let r = ss_ok(&alice, None, &filtered(json!({"is_dm": true}))).await?;
    assert_eq!(room_ids(&r), set(&[&dm]), "{r}");
    assert_eq!(r["rooms"][&dm]["is_dm"], true);
    let r = ss_ok(&alice, None, &filtered(json!({"is_dm": false}))).await?;
    assert_eq!(r["lists"]["f"]["count"], 4, "{r}");
    let r = ss_ok(&alice, None, &filtered(json!({"is_encrypted": true}))).await?;
    assert_eq!(room_ids(&r), set(&[&encrypted]), "{r}");
    let r = ss_ok(&alice, None, &filtered(json!({"is_invite": true}))).await?;
    assert_eq!(room_ids(&r), set(&[&invited]), "{r}");
    let inv = &r["rooms"][&invited];
    let stripped: BTreeSet<String> = inv["invite_state"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["type"].as_str().map(str::to_owned))
        .collect();
    assert!(stripped.contains("m.room.name"), "{inv}");
    assert!(stripped.contains("m.room.member"), "{inv}");
    assert!(
        inv["timeline"].is_null(),
        "an invite has no timeline: {inv}"
    );
    let r = ss_ok(&alice, None, &filtered(json!({"is_invite": false}))).await?;
    assert_eq!(room_ids(&r), set(&[&plain, &encrypted, &dm, &space]), "{r}");
    let r = ss_ok(&alice, None, &filtered(json!({"room_types": ["m.space"]}))).await?;
    assert_eq!(room_ids(&r), set(&[&space]), "{r}");
    let r = ss_ok(
        &alice,
        None,
        &filtered(json!({"not_room_types": ["m.space"]})),
    )
    .await?;
    assert_eq!(r["lists"]["f"]["count"], 4, "{r}");
    let r = ss_ok(&alice, None, &filtered(json!({"room_types": [null]}))).await?;
    assert!(!room_ids(&r).contains(&space), "{r}");

    // Accepting the invite: the room comes again, as a joined room, in full.
    let p = pos(&ss_ok(&alice, None, &filtered(json!({}))).await?);
    alice.join(&invited).await?;
    let r = ss_ok(&alice, Some(&p), &filtered(json!({}))).await?;
    let joined = &r["rooms"][&invited];
    assert_eq!(joined["initial"], true, "{r}");
    assert!(joined["invite_state"].is_null(), "{joined}");
    assert!(joined["timeline"].as_array().is_some_and(|t| !t.is_empty()));
    Ok(())
}

/// A left room shows once, with the leave in its timeline, then drops out of the list.
async fn leaves_show_once(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", PW).await?;
    let bob = server.register("bob", PW).await?;
    let room = alice.create_room(&json!({"preset": "public_chat"})).await?;
    bob.join(&room).await?;
    let req = list("l", json!([[0, 9]]), 3, json!([]));
    let p = pos(&ss_ok(&bob, None, &req).await?);
    bob.leave(&room).await?;
    let r = ss_ok(&bob, Some(&p), &req).await?;
    let left = &r["rooms"][&room];
    let last = left["timeline"]
        .as_array()
        .and_then(|t| t.last())
        .cloned()
        .unwrap_or_default();
    assert_eq!(last["type"], "m.room.member", "{left}");
    assert_eq!(last["content"]["membership"], "leave", "{left}");
    assert_eq!(r["lists"]["l"]["count"], 1, "{r}");

    alice.send_message(&room, "after bob left").await?;
    let r = ss_ok(&bob, Some(&pos(&r)), &req).await?;
    assert!(!room_ids(&r).contains(&room), "{r}");
    assert_eq!(r["lists"]["l"]["count"], 0, "{r}");
    Ok(())
}

/// An unknown, malformed or foreign `pos` is `M_UNKNOWN_POS`.
async fn unknown_pos(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", PW).await?;
    let bob = server.register("bob", PW).await?;
    let alice2 = server.login("alice", PW, None).await?;
    let body = json!({"conn_id": "main", "lists": {}});
    let p = pos(&ss_ok(&alice, None, &body).await?);
    ok(ss(&alice, Some(&p), Some(0), &body).await?);

    for bad in ["garbage", "s1_1_0_0_0_0_0_0.nope.1", ""] {
        assert_error(
            &ss(&alice, Some(bad), Some(0), &body).await?,
            400,
            "M_UNKNOWN_POS",
        );
    }
    // Another user's, another device's, another connection's pos.
    assert_error(
        &ss(&bob, Some(&p), Some(0), &body).await?,
        400,
        "M_UNKNOWN_POS",
    );
    assert_error(
        &ss(&alice2, Some(&p), Some(0), &body).await?,
        400,
        "M_UNKNOWN_POS",
    );
    let other = json!({"conn_id": "other", "lists": {}});
    assert_error(
        &ss(&alice, Some(&p), Some(0), &other).await?,
        400,
        "M_UNKNOWN_POS",
    );
    // A new connection with the same conn_id replaces the old one.
    let fresh = pos(&ok(ss(&alice, None, None, &body).await?));
    assert_error(
        &ss(&alice, Some(&p), Some(0), &body).await?,
        400,
        "M_UNKNOWN_POS",
    );
    // Connections live in memory: after a restart every pos is unknown.
    ok(ss(&alice, Some(&fresh), Some(0), &body).await?);
    server.restart().await?;
    assert_error(
        &ss(&alice, Some(&fresh), Some(0), &body).await?,
        400,
        "M_UNKNOWN_POS",
    );
    Ok(())
}

/// A long-poll answers when something happens in a listed room.
async fn long_poll_wakes_on_new_event(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", PW).await?;
    let bob = server.register("bob", PW).await?;
    let room = alice.create_room(&json!({"preset": "public_chat"})).await?;
    bob.join(&room).await?;
    let req = list("l", json!([[0, 9]]), 5, json!([]));
    let p = pos(&ss_ok(&alice, None, &req).await?);
    let waiting = {
        let alice = alice.clone();
        let req = req.clone();
        tokio::spawn(async move { ss(&alice, Some(&p), Some(60_000), &req).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    bob.send_message(&room, "wake up").await?;
    let r = ok(waiting.await??);
    assert_eq!(bodies(&r["rooms"][&room]), vec!["wake up"], "{r}");
    Ok(())
}

/// `to_device`: messages are redelivered until a request's `since` is a `next_batch` that
/// covered them.
async fn to_device_extension(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", PW).await?;
    let bob = server.register("bob", PW).await?;
    let send = json!({"messages": {&bob.user_id: {&bob.device_id: {"n": 1}}}});
    ok(alice
        .put(&format!("/sendToDevice/m.test/{}", unique_txn_id()), &send)
        .await?);
    let body = |since: Option<&str>| {
        let mut td = json!({"enabled": true, "limit": 10});
        if let Some(s) = since {
            td["since"] = json!(s);
        }
        json!({"conn_id": "encryption", "extensions": {"to_device": td}})
    };
    let r = ss_ok(&bob, None, &body(None)).await?;
    let td = &r["extensions"]["to_device"];
    assert_eq!(td["events"][0]["type"], "m.test", "{r}");
    assert_eq!(td["events"][0]["sender"], alice.user_id);
    let next = td["next_batch"].as_str().expect("next_batch").to_owned();

    // Not acknowledged yet: delivered again (on a new connection too).
    let again = ss_ok(&bob, None, &body(None)).await?;
    assert_eq!(
        again["extensions"]["to_device"]["events"][0]["content"]["n"],
        1
    );
    // Acknowledged: gone; next_batch is always there.
    let acked = ss_ok(&bob, Some(&pos(&again)), &body(Some(&next))).await?;
    let td = &acked["extensions"]["to_device"];
    assert!(
        td["events"].as_array().is_none_or(|e| e.is_empty()),
        "{acked}"
    );
    assert!(td["next_batch"].is_string(), "{acked}");
    let fresh = ss_ok(&bob, None, &body(None)).await?;
    assert!(fresh["extensions"]["to_device"]["events"]
        .as_array()
        .is_none_or(|e| e.is_empty()));

    assert_error(
        &ss(&bob, None, None, &body(Some("not-a-token"))).await?,
        400,
        "M_INVALID_PARAM",
    );
    // Disabled (absent): no to_device section.
    let off = ss_ok(&bob, None, &json!({})).await?;
    assert!(off["extensions"]["to_device"].is_null(), "{off}");
    Ok(())
}

/// `e2ee`: key counts always; `device_lists` only in incremental responses.
async fn e2ee_extension(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", PW).await?;
    let bob = server.register("bob", PW).await?;
    let room = alice
        .create_room(&json!({"preset": "public_chat", "initial_state": [{
            "type": "m.room.encryption", "state_key": "",
            "content": {"algorithm": "m.megolm.v1.aes-sha2"}
        }]}))
        .await?;
    let body = json!({"conn_id": "encryption", "extensions": {"e2ee": {"enabled": true}}});
    let r = ss_ok(&alice, None, &body).await?;
    let e2ee = &r["extensions"]["e2ee"];
    assert_eq!(
        e2ee["device_one_time_keys_count"]["signed_curve25519"], 0,
        "{r}"
    );
    assert!(e2ee["device_unused_fallback_key_types"].is_array(), "{r}");
    assert!(
        e2ee["device_lists"].is_null(),
        "no device_lists without a pos: {r}"
    );

    bob.join(&room).await?;
    let r = ok(ss(&alice, Some(&pos(&r)), Some(10_000), &body).await?);
    let changed = &r["extensions"]["e2ee"]["device_lists"]["changed"];
    assert!(
        changed
            .as_array()
            .is_some_and(|c| c.contains(&json!(bob.user_id))),
        "{r}"
    );
    Ok(())
}

/// `account_data`: global and room data, then only what changed.
async fn account_data_extension(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", PW).await?;
    let room = alice.create_room(&json!({})).await?;
    let uid = enc(&alice.user_id);
    ok(alice
        .put(&format!("/user/{uid}/account_data/x.one"), &json!({"v": 1}))
        .await?);
    ok(alice
        .put(
            &format!("/user/{uid}/rooms/{}/account_data/x.room", enc(&room)),
            &json!({"v": 2}),
        )
        .await?);
    let mut body = list("l", json!([[0, 9]]), 1, json!([]));
    body["extensions"] = json!({"account_data": {"enabled": true}});
    let r = ss_ok(&alice, None, &body).await?;
    let ad = &r["extensions"]["account_data"];
    let types: BTreeSet<&str> = ad["global"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["type"].as_str())
        .collect();
    assert!(types.contains("x.one"), "{r}");
    assert_eq!(ad["rooms"][&room][0]["type"], "x.room", "{r}");
    assert_eq!(ad["rooms"][&room][0]["content"]["v"], 2, "{r}");

    ok(alice
        .put(&format!("/user/{uid}/account_data/x.two"), &json!({"v": 3}))
        .await?);
    let r = ss_ok(&alice, Some(&pos(&r)), &body).await?;
    let ad = &r["extensions"]["account_data"];
    let types: Vec<&str> = ad["global"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["type"].as_str())
        .collect();
    assert_eq!(types, vec!["x.two"], "{r}");
    assert!(ad["rooms"].as_object().is_none_or(|m| m.is_empty()), "{r}");
    Ok(())
}

/// `receipts`: a room's receipts when it is first sent, then only new ones; private receipts
/// only to their owner.
async fn receipts_extension(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", PW).await?;
    let bob = server.register("bob", PW).await?;
    let room = alice.create_room(&json!({"preset": "public_chat"})).await?;
    bob.join(&room).await?;
    let first = alice.send_message(&room, "one").await?;
    let receipt = |c: &Client, kind: &str, ev: &str| {
        let path = format!("/rooms/{}/receipt/{kind}/{}", enc(&room), enc(ev));
        let c = c.clone();
        async move { c.post(&path, &json!({})).await }
    };
    ok(receipt(&bob, "m.read", &first).await?);
    let mut body = list("l", json!([[0, 9]]), 1, json!([]));
    body["extensions"] = json!({"receipts": {"enabled": true, "rooms": ["*"], "lists": ["l"]}});
    let r = ss_ok(&alice, None, &body).await?;
    let ev = &r["extensions"]["receipts"]["rooms"][&room];
    assert_eq!(ev["type"], "m.receipt", "{r}");
    assert!(
        ev["content"][&first]["m.read"][&bob.user_id]["ts"].is_u64(),
        "{r}"
    );

    // Nothing new: no receipts; then a new one, and a private one of Bob's that Alice never
    // sees.
    let r = ss_ok(&alice, Some(&pos(&r)), &body).await?;
    assert!(
        r["extensions"]["receipts"]["rooms"]
            .as_object()
            .is_none_or(|m| m.is_empty()),
        "{r}"
    );
    let second = alice.send_message(&room, "two").await?;
    ok(receipt(&bob, "m.read.private", &second).await?);
    let third = alice.send_message(&room, "three").await?;
    ok(receipt(&bob, "m.read", &third).await?);
    let r = ss_ok(&alice, Some(&pos(&r)), &body).await?;
    let content = &r["extensions"]["receipts"]["rooms"][&room]["content"];
    assert!(content[&third]["m.read"][&bob.user_id].is_object(), "{r}");
    assert!(content[&first].is_null(), "only new receipts: {r}");
    assert!(content[&second].is_null(), "{r}");

    // Disabled: no receipts section.
    let off = ss_ok(&alice, None, &list("l", json!([[0, 9]]), 1, json!([]))).await?;
    assert!(off["extensions"]["receipts"].is_null(), "{off}");
    Ok(())
}

/// The typing extension: who types in a room when it is first sent, then only changes.
async fn typing_extension(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", PW).await?;
    let bob = server.register("bob", PW).await?;
    let room = alice.create_room(&json!({"preset": "public_chat"})).await?;
    bob.join(&room).await?;
    let typing = |c: &Client, on: bool| {
        let path = format!("/rooms/{}/typing/{}", enc(&room), enc(&c.user_id));
        let c = c.clone();
        async move { c.put(&path, &json!({"typing": on, "timeout": 20000})).await }
    };
    ok(typing(&bob, true).await?);
    let mut body = list("l", json!([[0, 9]]), 1, json!([]));
    body["extensions"] = json!({"typing": {"enabled": true, "lists": ["l"]}});
    let r = ss_ok(&alice, None, &body).await?;
    let ev = &r["extensions"]["typing"]["rooms"][&room];
    assert_eq!(ev["type"], "m.typing", "{r}");
    assert_eq!(ev["content"]["user_ids"], json!([bob.user_id]), "{r}");

    // Nothing changed: no typing; Bob stops: an empty set.
    let r = ss_ok(&alice, Some(&pos(&r)), &body).await?;
    assert!(
        r["extensions"]["typing"]["rooms"].get(&room).is_none(),
        "{r}"
    );
    ok(typing(&bob, false).await?);
    let r = ss_ok(&alice, Some(&pos(&r)), &body).await?;
    assert_eq!(
        r["extensions"]["typing"]["rooms"][&room]["content"]["user_ids"],
        json!([]),
        "{r}"
    );
    Ok(())
}

/// A joined room carries its unread counts; a receipt of the user's own that clears them
/// sends the room again with just the new counts.
async fn unread_counts(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", PW).await?;
    let bob = server.register("bob", PW).await?;
    let room = alice
        .create_room(&json!({"preset": "private_chat", "invite": [bob.user_id]}))
        .await?;
    bob.join(&room).await?;
    alice.send_message(&room, "one").await?;
    let mention = alice
        .send_event(
            &room,
            "m.room.message",
            &json!({"msgtype": "m.text", "body": "hey bob",
                    "m.mentions": {"user_ids": [bob.user_id]}}),
        )
        .await?;
    let body = list("l", json!([[0, 9]]), 1, json!([]));
    let r = ss_ok(&bob, None, &body).await?;
    assert_eq!(r["rooms"][&room]["notification_count"], 2, "{r}");
    assert_eq!(r["rooms"][&room]["highlight_count"], 1, "{r}");

    let path = format!("/rooms/{}/receipt/m.read/{}", enc(&room), enc(&mention));
    ok(bob.post(&path, &json!({})).await?);
    let r = ss_ok(&bob, Some(&pos(&r)), &body).await?;
    let entry = &r["rooms"][&room];
    assert_eq!(entry["notification_count"], 0, "{r}");
    assert_eq!(entry["highlight_count"], 0, "{r}");
    assert!(entry["timeline"].is_null(), "only the counts changed: {r}");

    // Nothing changed since: the room is not sent again.
    let r = ss_ok(&bob, Some(&pos(&r)), &body).await?;
    assert!(r["rooms"].get(&room).is_none(), "{r}");
    Ok(())
}

/// Bad input gets the spec's errors.
async fn bad_input(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", PW).await?;
    let r = alice
        .raw(
            Method::POST,
            SS,
            Some(b"{not json".to_vec()),
            Some("application/json"),
        )
        .await?;
    assert_error(&r, 400, "M_NOT_JSON");
    assert_error(
        &ss(&alice, None, None, &json!({"lists": "nope"})).await?,
        400,
        "M_BAD_JSON",
    );
    assert_error(
        &ss(
            &alice,
            None,
            None,
            &json!({"lists": {"l": {"ranges": [[0]], "timeline_limit": 1}}}),
        )
        .await?,
        400,
        "M_BAD_JSON",
    );
    assert_error(
        &ss(
            &alice,
            None,
            None,
            &list("l", json!([[5, 1]]), 1, json!([])),
        )
        .await?,
        400,
        "M_INVALID_PARAM",
    );
    let long = "x".repeat(65);
    assert_error(
        &ss(
            &alice,
            None,
            None,
            &list(&long, json!([[0, 1]]), 1, json!([])),
        )
        .await?,
        400,
        "M_INVALID_PARAM",
    );
    assert_error(
        &alice
            .post(&format!("{SS}?timeout=soon"), &json!({}))
            .await?,
        400,
        "M_INVALID_PARAM",
    );
    assert_error(
        &server.anonymous().post(SS, &json!({})).await?,
        401,
        "M_MISSING_TOKEN",
    );
    // txn_id is echoed.
    let r = ss_ok(&alice, None, &json!({"txn_id": "t-1"})).await?;
    assert_eq!(r["txn_id"], "t-1");
    Ok(())
}

backend_tests!(
    versions_advertise_simplified_sliding_sync,
    lists_ranges_count_and_order,
    timeline_limit_limited_and_prev_batch,
    incremental_responses_carry_only_changes,
    required_state_specials,
    room_subscriptions,
    list_filters,
    leaves_show_once,
    unknown_pos,
    long_poll_wakes_on_new_event,
    to_device_extension,
    e2ee_extension,
    account_data_extension,
    receipts_extension,
    unread_counts,
    typing_extension,
    bad_input,
);
