//! Push notifications: unread counts in `/sync` (1:1 and group rooms, highlights on mentions,
//! threads, reset by read receipts), push rule changes taking effect, `/notifications`,
//! pushers (`/pushers`, `/pushers/set`, their errors, their deletion with their device), and
//! delivery to a push gateway the test runs (body, retries, rejected pushkeys, a restart).

use std::net::SocketAddr;
use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc, Mutex,
};
use std::time::Duration;

use complement_tests::{assert_error, backend_tests, enc, eventually, ok, Client, TestServer};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

/// `(notification_count, highlight_count)` of a joined room in an initial sync.
async fn counts(client: &Client, room: &str) -> anyhow::Result<(i64, i64)> {
    let sync = client.sync(None, None, None).await?;
    Ok(counts_in(
        &sync["rooms"]["join"][room]["unread_notifications"],
    ))
}

fn counts_in(v: &Value) -> (i64, i64) {
    (
        v["notification_count"].as_i64().unwrap_or(-1),
        v["highlight_count"].as_i64().unwrap_or(-1),
    )
}

/// A room `creator` made with `members` joined.
async fn room_with(creator: &Client, members: &[&Client], body: Value) -> anyhow::Result<String> {
    let room = creator.create_room(&body).await?;
    for m in members {
        creator.invite(&room, &m.user_id).await?;
        m.join(&room).await?;
    }
    Ok(room)
}

/// Counts in a 1:1 and a group room: each message of another member is a notification for
/// everyone but its sender; a 1:1 room's rule also sets a sound.
async fn counts_in_one_to_one_and_group_rooms(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "pw-alice").await?;
    let bob = server.register("bob", "pw-bob").await?;
    let carol = server.register("carol", "pw-carol").await?;

    let dm = room_with(&alice, &[&bob], json!({"preset": "private_chat"})).await?;
    assert_eq!(counts(&bob, &dm).await?, (0, 0), "nothing sent yet");
    alice.send_message(&dm, "one").await?;
    alice.send_message(&dm, "two").await?;
    assert_eq!(counts(&bob, &dm).await?, (2, 0));
    assert_eq!(
        counts(&alice, &dm).await?,
        (0, 0),
        "own messages do not count"
    );
    let notifs = ok(bob.get("/notifications").await?);
    let actions = &notifs["notifications"][0]["actions"];
    assert!(
        actions
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["set_tweak"] == "sound")),
        "1:1 rule sets a sound: {actions}"
    );

    let group = room_with(&alice, &[&bob, &carol], json!({"preset": "public_chat"})).await?;
    alice.send_message(&group, "hello all").await?;
    bob.send_message(&group, "hi").await?;
    assert_eq!(counts(&carol, &group).await?, (2, 0));
    assert_eq!(counts(&bob, &group).await?, (1, 0));
    assert_eq!(counts(&alice, &group).await?, (1, 0));
    // The group rule sets no sound.
    let notifs = ok(carol.get("/notifications").await?);
    let newest = &notifs["notifications"][0];
    assert_eq!(newest["room_id"], group.as_str());
    assert_eq!(newest["actions"], json!(["notify"]), "{newest}");
    // Non-message events (a topic change) notify nobody under the defaults.
    alice
        .send_state(&group, "m.room.topic", "", &json!({"topic": "t"}))
        .await?;
    assert_eq!(counts(&carol, &group).await?, (2, 0));
    // An incremental sync carries the counts too.
    let first = carol.sync(None, None, None).await?;
    let since = first["next_batch"].as_str().unwrap_or_default().to_owned();
    alice.send_message(&group, "three").await?;
    let next = carol.sync(Some(&since), Some(5000), None).await?;
    assert_eq!(
        counts_in(&next["rooms"]["join"][group.as_str()]["unread_notifications"]),
        (3, 0)
    );
    Ok(())
}

/// Mentions highlight: `m.mentions.user_ids`, `@room` from a user with the power to notify
/// the room (not from one without), and the display name through a user rule with a
/// `contains_display_name` condition.
async fn mentions_highlight(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "pw-alice").await?;
    let bob = server.register("bob", "pw-bob").await?;
    let carol = server.register("carol", "pw-carol").await?;
    ok(bob
        .put(
            &format!("/profile/{}/displayname", enc(&bob.user_id)),
            &json!({"displayname": "Bobby Tables"}),
        )
        .await?);
    let room = room_with(&alice, &[&bob, &carol], json!({"preset": "public_chat"})).await?;

    alice
        .send_event(
            &room,
            "m.room.message",
            &json!({"msgtype": "m.text", "body": "bob!", "m.mentions": {"user_ids": [bob.user_id]}}),
        )
        .await?;
    assert_eq!(
        counts(&bob, &room).await?,
        (1, 1),
        "user mention highlights"
    );
    assert_eq!(counts(&carol, &room).await?, (1, 0), "not carol's mention");

    // @room: alice created the room and may; carol (power 0) may not.
    alice
        .send_event(
            &room,
            "m.room.message",
            &json!({"msgtype": "m.text", "body": "all", "m.mentions": {"room": true}}),
        )
        .await?;
    assert_eq!(counts(&carol, &room).await?, (2, 1));
    carol
        .send_event(
            &room,
            "m.room.message",
            &json!({"msgtype": "m.text", "body": "all", "m.mentions": {"room": true}}),
        )
        .await?;
    assert_eq!(
        counts(&alice, &room).await?,
        (1, 0),
        "carol may not notify the room"
    );

    // The display name, through a rule of bob's own.
    ok(bob
        .put(
            "/pushrules/global/override/display-name",
            &json!({
                "conditions": [{"kind": "contains_display_name"}],
                "actions": ["notify", {"set_tweak": "highlight"}],
            }),
        )
        .await?);
    alice.send_message(&room, "is Bobby Tables here?").await?;
    alice.send_message(&room, "no mention").await?;
    assert_eq!(counts(&bob, &room).await?, (5, 3));
    let only = ok(bob.get("/notifications?only=highlight").await?);
    let bodies: Vec<&str> = only["notifications"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["event"]["content"]["body"].as_str())
        .collect();
    assert_eq!(bodies, ["is Bobby Tables here?", "all", "bob!"]);
    Ok(())
}

/// Thread counts: with `unread_thread_notifications` the thread's events are counted under
/// their root, the rest under the room; without, all together.
async fn thread_counts(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "pw-alice").await?;
    let bob = server.register("bob", "pw-bob").await?;
    let carol = server.register("carol", "pw-carol").await?;
    let room = room_with(&alice, &[&bob, &carol], json!({"preset": "public_chat"})).await?;
    let root = alice.send_message(&room, "root").await?;
    for text in ["reply 1", "reply 2"] {
        alice
            .send_event(
                &room,
                "m.room.message",
                &json!({"msgtype": "m.text", "body": text,
                        "m.relates_to": {"rel_type": "m.thread", "event_id": root}}),
            )
            .await?;
    }
    alice.send_message(&room, "main again").await?;
    let filter = json!({"room": {"timeline": {"unread_thread_notifications": true}}}).to_string();
    let sync = bob.sync(None, None, Some(&filter)).await?;
    let joined = &sync["rooms"]["join"][room.as_str()];
    assert_eq!(
        counts_in(&joined["unread_notifications"]),
        (2, 0),
        "{joined}"
    );
    assert_eq!(
        counts_in(&joined["unread_thread_notifications"][root.as_str()]),
        (2, 0),
        "{joined}"
    );
    assert_eq!(
        counts(&bob, &room).await?,
        (4, 0),
        "all together without the filter"
    );
    Ok(())
}

/// Sends a read receipt of `kind` (`m.read`, `m.read.private`) for `event`, threaded or not.
async fn receipt(
    client: &Client,
    room: &str,
    kind: &str,
    event: &str,
    thread: Option<&str>,
) -> anyhow::Result<()> {
    let body = match thread {
        Some(t) => json!({ "thread_id": t }),
        None => json!({}),
    };
    ok(client
        .post(
            &format!("/rooms/{}/receipt/{kind}/{}", enc(room), enc(event)),
            &body,
        )
        .await?);
    Ok(())
}

/// Read receipts reset the counts: an unthreaded one everything up to its event, a threaded
/// one only its thread (`main` for the main timeline); private receipts count too, and the
/// next incremental sync carries the new counts.
async fn receipts_reset_counts(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "pw-alice").await?;
    let bob = server.register("bob", "pw-bob").await?;
    let carol = server.register("carol", "pw-carol").await?;
    let room = room_with(&alice, &[&bob, &carol], json!({"preset": "public_chat"})).await?;
    let _m1 = alice.send_message(&room, "m1").await?;
    let m2 = alice
        .send_event(
            &room,
            "m.room.message",
            &json!({"msgtype": "m.text", "body": "m2", "m.mentions": {"user_ids": [bob.user_id]}}),
        )
        .await?;
    let m3 = alice.send_message(&room, "m3").await?;
    assert_eq!(counts(&bob, &room).await?, (3, 1));
    let before = bob.sync(None, None, None).await?;
    let since = before["next_batch"].as_str().unwrap_or_default().to_owned();
    receipt(&bob, &room, "m.read", &m2, None).await?;
    let next = bob.sync(Some(&since), Some(5000), None).await?;
    assert_eq!(
        counts_in(&next["rooms"]["join"][room.as_str()]["unread_notifications"]),
        (1, 0),
        "the receipt's sync carries the counts: {next}"
    );
    receipt(&bob, &room, "m.read.private", &m3, None).await?;
    assert_eq!(counts(&bob, &room).await?, (0, 0));
    assert_eq!(
        counts(&carol, &room).await?,
        (3, 0),
        "bob's receipts are bob's"
    );
    // /notifications marks what was read.
    let notifs = ok(bob.get("/notifications").await?);
    assert!(notifs["notifications"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|n| n["read"] == true));
    alice.send_message(&room, "m4").await?;
    assert_eq!(counts(&bob, &room).await?, (1, 0));
    assert_eq!(
        ok(bob.get("/notifications").await?)["notifications"][0]["read"],
        false
    );

    // Threads.
    let filter = json!({"room": {"timeline": {"unread_thread_notifications": true}}}).to_string();
    let thread_counts = |sync: &Value| {
        let joined = &sync["rooms"]["join"][room.as_str()];
        let threads = joined["unread_thread_notifications"].clone();
        (counts_in(&joined["unread_notifications"]), threads)
    };
    let root = alice.send_message(&room, "root").await?;
    let mut replies = Vec::new();
    for text in ["r1", "r2"] {
        replies.push(
            alice
                .send_event(
                    &room,
                    "m.room.message",
                    &json!({"msgtype": "m.text", "body": text,
                            "m.relates_to": {"rel_type": "m.thread", "event_id": root}}),
                )
                .await?,
        );
    }
    let main = alice.send_message(&room, "main").await?;
    let (main_counts, threads) = thread_counts(&bob.sync(None, None, Some(&filter)).await?);
    assert_eq!(main_counts, (3, 0), "m4, root, main");
    assert_eq!(counts_in(&threads[root.as_str()]), (2, 0));
    // A receipt in the thread clears the thread only.
    receipt(&bob, &room, "m.read", &replies[1], Some(&root)).await?;
    let (main_counts, threads) = thread_counts(&bob.sync(None, None, Some(&filter)).await?);
    assert_eq!(main_counts, (3, 0));
    assert!(
        threads.get(root.as_str()).is_none(),
        "thread read: {threads}"
    );
    // A `main` receipt clears the main timeline only.
    alice
        .send_event(
            &room,
            "m.room.message",
            &json!({"msgtype": "m.text", "body": "r3",
                    "m.relates_to": {"rel_type": "m.thread", "event_id": root}}),
        )
        .await?;
    receipt(&bob, &room, "m.read", &main, Some("main")).await?;
    let (main_counts, threads) = thread_counts(&bob.sync(None, None, Some(&filter)).await?);
    assert_eq!(main_counts, (0, 0));
    assert_eq!(counts_in(&threads[root.as_str()]), (1, 0), "r3 unread");
    // An unthreaded receipt after everything clears it all.
    let last = alice.send_message(&room, "last").await?;
    receipt(&bob, &room, "m.read", &last, None).await?;
    assert_eq!(counts(&bob, &room).await?, (0, 0));
    Ok(())
}

/// Rule changes take effect at once: a room rule without actions silences the room, the
/// message rule disabled silences messages, the master rule silences everything.
async fn rule_changes_take_effect(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "pw-alice").await?;
    let bob = server.register("bob", "pw-bob").await?;
    let carol = server.register("carol", "pw-carol").await?;
    let room = room_with(&alice, &[&bob, &carol], json!({"preset": "public_chat"})).await?;
    alice.send_message(&room, "counted").await?;
    assert_eq!(counts(&bob, &room).await?, (1, 0));

    ok(bob
        .put(
            &format!("/pushrules/global/room/{}", enc(&room)),
            &json!({"actions": []}),
        )
        .await?);
    alice.send_message(&room, "muted room").await?;
    assert_eq!(
        counts(&bob, &room).await?,
        (1, 0),
        "the room rule silences it"
    );
    ok(bob
        .delete(&format!("/pushrules/global/room/{}", enc(&room)))
        .await?);
    alice.send_message(&room, "counted again").await?;
    assert_eq!(counts(&bob, &room).await?, (2, 0));

    ok(bob
        .put(
            "/pushrules/global/underride/.m.rule.message/enabled",
            &json!({"enabled": false}),
        )
        .await?);
    alice.send_message(&room, "message rule off").await?;
    assert_eq!(counts(&bob, &room).await?, (2, 0));
    assert_eq!(
        counts(&carol, &room).await?,
        (4, 0),
        "carol's rules are her own"
    );
    ok(bob
        .put(
            "/pushrules/global/underride/.m.rule.message/enabled",
            &json!({"enabled": true}),
        )
        .await?);
    ok(bob
        .put(
            "/pushrules/global/override/.m.rule.master/enabled",
            &json!({"enabled": true}),
        )
        .await?);
    alice
        .send_event(
            &room,
            "m.room.message",
            &json!({"msgtype": "m.text", "body": "x", "m.mentions": {"user_ids": [bob.user_id]}}),
        )
        .await?;
    assert_eq!(counts(&bob, &room).await?, (2, 0), "master rule: nothing");
    Ok(())
}

/// `/notifications`: newest first, pages through `next_token`, `only=highlight`, the event in
/// client format; bad parameters are `M_INVALID_PARAM`.
async fn notifications_paging(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "pw-alice").await?;
    let bob = server.register("bob", "pw-bob").await?;
    let carol = server.register("carol", "pw-carol").await?;
    let room = room_with(&alice, &[&bob, &carol], json!({"preset": "public_chat"})).await?;
    let mut sent = Vec::new();
    for i in 0..5 {
        let content = if i == 2 {
            json!({"msgtype": "m.text", "body": format!("m{i}"), "m.mentions": {"user_ids": [bob.user_id]}})
        } else {
            json!({"msgtype": "m.text", "body": format!("m{i}")})
        };
        sent.push(alice.send_event(&room, "m.room.message", &content).await?);
    }
    let mut seen = Vec::new();
    let mut from: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &from {
            Some(f) => format!("/notifications?limit=2&from={}", enc(f)),
            None => "/notifications?limit=2".to_owned(),
        };
        let page = ok(bob.get(&path).await?);
        pages += 1;
        for n in page["notifications"].as_array().into_iter().flatten() {
            assert_eq!(n["room_id"], room.as_str());
            assert_eq!(n["read"], false);
            assert!(n["ts"].is_i64(), "{n}");
            assert!(n.get("profile_tag").is_some(), "{n}");
            assert_eq!(n["event"]["sender"], alice.user_id.as_str());
            assert!(n["event"].get("signatures").is_none(), "client format: {n}");
            assert!(n["actions"]
                .as_array()
                .is_some_and(|a| a.contains(&json!("notify"))));
            seen.push(
                n["event"]["event_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
        match page["next_token"].as_str() {
            Some(t) => from = Some(t.to_owned()),
            None => break,
        }
        assert!(pages < 10, "paging does not end");
    }
    sent.reverse();
    // The invite that brought bob in notified him too (`.m.rule.invite_for_me`), first.
    let invite = seen.pop().unwrap_or_default();
    let invite_event = ok(bob
        .get(&format!("/rooms/{}/event/{}", enc(&room), enc(&invite)))
        .await?);
    assert_eq!(invite_event["type"], "m.room.member");
    assert_eq!(invite_event["content"]["membership"], "invite");
    assert_eq!(invite_event["state_key"], bob.user_id.as_str());
    assert_eq!(seen, sent, "every notification once, newest first");

    let only = ok(bob.get("/notifications?only=highlight").await?);
    let ids: Vec<&str> = only["notifications"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["event"]["event_id"].as_str())
        .collect();
    assert_eq!(ids, [sent[2].as_str()]);

    let none = ok(alice.get("/notifications").await?);
    assert_eq!(none["notifications"], json!([]));
    assert!(none.get("next_token").is_none());
    for bad in ["limit=ten", "limit=-1", "from=abc", "only=everything"] {
        assert_error(
            &bob.get(&format!("/notifications?{bad}")).await?,
            400,
            "M_INVALID_PARAM",
        );
    }
    Ok(())
}

fn http_pusher(pushkey: &str, url: &str) -> Value {
    json!({
        "kind": "http",
        "app_id": "org.example.app",
        "app_display_name": "Example",
        "device_display_name": "Phone",
        "profile_tag": "tag",
        "pushkey": pushkey,
        "lang": "en",
        "data": {"url": url, "custom": 7},
    })
}

const URL: &str = "https://push.example.org/_matrix/push/v1/notify";

/// Pushers: set, list, replace, delete; `append`; the errors for bad input; a device's
/// pushers go when it logs out.
async fn pushers_crud_and_errors(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "pw-alice").await?;
    let bob = server.register("bob", "pw-bob").await?;
    assert_eq!(ok(alice.get("/pushers").await?), json!({"pushers": []}));

    ok(alice
        .post("/pushers/set", &http_pusher("key1", URL))
        .await?);
    let list = ok(alice.get("/pushers").await?);
    assert_eq!(
        list["pushers"],
        json!([{
            "kind": "http", "app_id": "org.example.app", "app_display_name": "Example",
            "device_display_name": "Phone", "profile_tag": "tag", "pushkey": "key1",
            "lang": "en", "data": {"url": URL, "custom": 7},
        }])
    );
    // Same app ID and pushkey: replaced.
    let mut changed = http_pusher("key1", URL);
    changed["lang"] = json!("fr");
    ok(alice.post("/pushers/set", &changed).await?);
    let list = ok(alice.get("/pushers").await?);
    assert_eq!(list["pushers"].as_array().map(Vec::len), Some(1));
    assert_eq!(list["pushers"][0]["lang"], "fr");
    ok(alice
        .post("/pushers/set", &http_pusher("key2", URL))
        .await?);
    assert_eq!(
        ok(alice.get("/pushers").await?)["pushers"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );

    // Another user with the same pushkey: alice's goes unless bob appends.
    let mut appended = http_pusher("key2", URL);
    appended["append"] = json!(true);
    ok(bob.post("/pushers/set", &appended).await?);
    assert_eq!(
        ok(alice.get("/pushers").await?)["pushers"]
            .as_array()
            .map(Vec::len),
        Some(2),
        "append keeps alice's"
    );
    ok(bob.post("/pushers/set", &http_pusher("key2", URL)).await?);
    let keys: Vec<String> = ok(alice.get("/pushers").await?)["pushers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["pushkey"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(keys, ["key1"], "bob's key2 without append replaced alice's");

    // kind: null deletes.
    ok(alice
        .post(
            "/pushers/set",
            &json!({"kind": null, "app_id": "org.example.app", "pushkey": "key1"}),
        )
        .await?);
    assert_eq!(ok(alice.get("/pushers").await?), json!({"pushers": []}));

    // Errors.
    let cases: Vec<(Value, &str)> = vec![
        (json!({"app_id": "a", "pushkey": "k"}), "M_MISSING_PARAM"),
        (
            json!({"kind": "http", "pushkey": "k", "app_display_name": "A", "device_display_name": "D", "lang": "en", "data": {"url": URL}}),
            "M_MISSING_PARAM",
        ),
        (
            {
                let mut p = http_pusher("k", URL);
                p.as_object_mut().map(|o| o.remove("lang"));
                p
            },
            "M_MISSING_PARAM",
        ),
        (
            {
                let mut p = http_pusher("k", URL);
                p["data"] = json!({"format": "event_id_only"});
                p
            },
            "M_MISSING_PARAM",
        ),
        (
            http_pusher("k", "https://push.example.org/other/path"),
            "M_INVALID_PARAM",
        ),
        (http_pusher("k", "not a url"), "M_INVALID_PARAM"),
        (
            {
                let mut p = http_pusher("k", URL);
                p["kind"] = json!("carrier-pigeon");
                p
            },
            "M_INVALID_PARAM",
        ),
        (
            {
                let mut p = http_pusher("k", URL);
                p["kind"] = json!("email");
                p["app_id"] = json!("m.email");
                p
            },
            "M_INVALID_PARAM",
        ),
        (
            {
                let mut p = http_pusher("k", URL);
                p["pushkey"] = json!("k".repeat(513));
                p
            },
            "M_INVALID_PARAM",
        ),
        (
            {
                let mut p = http_pusher("k", URL);
                p["app_id"] = json!("a".repeat(65));
                p
            },
            "M_INVALID_PARAM",
        ),
        (
            {
                let mut p = http_pusher("k", URL);
                p["data"] = json!("a string");
                p
            },
            "M_BAD_JSON",
        ),
        (
            {
                let mut p = http_pusher("k", URL);
                p["kind"] = json!(5);
                p
            },
            "M_BAD_JSON",
        ),
        (
            {
                let mut p = http_pusher("k", URL);
                p["append"] = json!("yes");
                p
            },
            "M_BAD_JSON",
        ),
        (json!(["not", "an", "object"]), "M_BAD_JSON"),
    ];
    for (body, errcode) in cases {
        let res = alice.post("/pushers/set", &body).await?;
        assert_error(&res, 400, errcode);
    }
    assert_eq!(
        ok(alice.get("/pushers").await?),
        json!({"pushers": []}),
        "nothing was set by bad requests"
    );

    // A pusher belongs to the device that set it: logging it out removes it.
    let phone = server.login("alice", "pw-alice", None).await?;
    ok(phone
        .post("/pushers/set", &http_pusher("phone", URL))
        .await?);
    ok(alice
        .post("/pushers/set", &http_pusher("laptop", URL))
        .await?);
    ok(phone.post("/logout", &json!({})).await?);
    let keys: Vec<String> = ok(alice.get("/pushers").await?)["pushers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["pushkey"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(keys, ["laptop"]);
    Ok(())
}

/// A push gateway for the tests: records every notification, answers 500 while `failures`
/// is above zero (counting down), and lists the pushkeys in `rejected` as rejected.
#[derive(Clone, Default)]
struct Gateway {
    received: Arc<Mutex<Vec<Value>>>,
    failures: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    rejected: Arc<Mutex<Vec<String>>>,
}

impl Gateway {
    async fn start() -> anyhow::Result<(Gateway, String)> {
        let gw = Gateway::default();
        let state = gw.clone();
        let app = axum::Router::new().route(
            "/_matrix/push/v1/notify",
            axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
                let gw = state.clone();
                async move {
                    let failing = gw
                        .failures
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok();
                    if failing {
                        gw.failed.fetch_add(1, Ordering::SeqCst);
                        return (
                            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                            axum::Json(json!({})),
                        );
                    }
                    gw.received.lock().map(|mut r| r.push(body)).ok();
                    let rejected = gw.rejected.lock().map(|r| r.clone()).unwrap_or_default();
                    (
                        axum::http::StatusCode::OK,
                        axum::Json(json!({ "rejected": rejected })),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr: SocketAddr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok((gw, format!("http://{addr}/_matrix/push/v1/notify")))
    }

    fn received(&self) -> Vec<Value> {
        self.received.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Waits for a notification about `event_id` to `pushkey`.
    async fn wait_for(&self, event_id: &str, pushkey: &str) -> anyhow::Result<Value> {
        eventually(
            &format!("the gateway receives {event_id} for {pushkey}"),
            WAIT,
            || async {
                Ok(self.received().into_iter().find(|n| {
                    n["notification"]["event_id"] == event_id
                        && n["notification"]["devices"][0]["pushkey"] == pushkey
                }))
            },
        )
        .await
    }
}

/// Delivery to the gateway: the spec's body (full and `event_id_only`), then retries after
/// the gateway fails, and a rejected pushkey removes its pusher.
async fn gateway_delivery(server: TestServer) -> anyhow::Result<()> {
    let (gw, url) = Gateway::start().await?;
    let alice = server.register("alice", "pw-alice").await?;
    let bob = server.register("bob", "pw-bob").await?;
    ok(alice
        .put(
            &format!("/profile/{}/displayname", enc(&alice.user_id)),
            &json!({"displayname": "Alice A."}),
        )
        .await?);
    let room = room_with(
        &alice,
        &[&bob],
        json!({"preset": "private_chat", "name": "Our room"}),
    )
    .await?;
    ok(bob.post("/pushers/set", &http_pusher("full", &url)).await?);
    let mut short = http_pusher("short", &url);
    short["data"] = json!({"url": url, "format": "event_id_only"});
    ok(bob.post("/pushers/set", &short).await?);

    let event = alice.send_message(&room, "ping").await?;
    let full = gw.wait_for(&event, "full").await?;
    let n = &full["notification"];
    assert_eq!(n["room_id"], room.as_str());
    assert_eq!(n["type"], "m.room.message");
    assert_eq!(n["sender"], alice.user_id.as_str());
    assert_eq!(n["sender_display_name"], "Alice A.");
    assert_eq!(n["room_name"], "Our room");
    assert_eq!(n["content"], json!({"msgtype": "m.text", "body": "ping"}));
    assert_eq!(n["prio"], "high", "the 1:1 rule sets a sound");
    assert_eq!(n["counts"]["unread"], 1);
    let device = &n["devices"][0];
    assert_eq!(device["app_id"], "org.example.app");
    assert_eq!(device["data"], json!({"custom": 7}), "data without url");
    assert_eq!(device["tweaks"]["sound"], "default");
    assert!(device["pushkey_ts"].is_i64(), "{device}");
    let short = gw.wait_for(&event, "short").await?;
    let n = &short["notification"];
    assert_eq!(n["room_id"], room.as_str());
    assert_eq!(n["counts"]["unread"], 1);
    for absent in ["content", "sender", "type", "sender_display_name"] {
        assert!(
            n.get(absent).is_none(),
            "event_id_only without {absent}: {n}"
        );
    }
    assert_eq!(n["devices"][0]["data"], json!({"format": "event_id_only"}));
    // Alice has no pusher: nothing for her own message or for her.
    assert!(gw
        .received()
        .iter()
        .all(|r| r["notification"]["devices"][0]["pushkey"] != "alice"));

    // The gateway fails three times: the notification is retried until delivered.
    gw.failures.store(3, Ordering::SeqCst);
    let event2 = alice.send_message(&room, "pong").await?;
    gw.wait_for(&event2, "full").await?;
    gw.wait_for(&event2, "short").await?;
    assert_eq!(
        gw.failed.load(Ordering::SeqCst),
        3,
        "three failed attempts first"
    );
    assert_eq!(
        gw.received()
            .iter()
            .filter(|r| r["notification"]["event_id"] == event2.as_str())
            .count(),
        2,
        "delivered once per pusher"
    );

    // A rejected pushkey loses its pusher.
    gw.rejected.lock().map(|mut r| r.push("short".into())).ok();
    let event3 = alice.send_message(&room, "third").await?;
    gw.wait_for(&event3, "short").await?;
    eventually("the rejected pusher is removed", WAIT, || async {
        let list = ok(bob.get("/pushers").await?);
        let keys: Vec<String> = list["pushers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["pushkey"].as_str().map(str::to_owned))
            .collect();
        Ok((keys == ["full"]).then_some(()))
    })
    .await?;
    Ok(())
}

/// A notification queued while the gateway is down is delivered after Myelin restarts.
async fn queue_survives_restart(server: TestServer) -> anyhow::Result<()> {
    let (gw, url) = Gateway::start().await?;
    let alice = server.register("alice", "pw-alice").await?;
    let bob = server.register("bob", "pw-bob").await?;
    let room = room_with(&alice, &[&bob], json!({"preset": "private_chat"})).await?;
    ok(bob.post("/pushers/set", &http_pusher("key", &url)).await?);
    gw.failures.store(usize::MAX, Ordering::SeqCst);
    let event = alice.send_message(&room, "while down").await?;
    eventually("a first attempt fails", WAIT, || async {
        Ok((gw.failed.load(Ordering::SeqCst) > 0).then_some(()))
    })
    .await?;
    server.stop(Duration::from_secs(10)).await?;
    gw.failures.store(0, Ordering::SeqCst);
    assert!(gw.received().is_empty(), "nothing delivered yet");
    server.restart().await?;
    let got = gw.wait_for(&event, "key").await?;
    assert_eq!(got["notification"]["room_id"], room.as_str());
    Ok(())
}

backend_tests!(
    counts_in_one_to_one_and_group_rooms,
    mentions_highlight,
    thread_counts,
    receipts_reset_counts,
    rule_changes_take_effect,
    notifications_paging,
    pushers_crud_and_errors,
    gateway_delivery,
    queue_survives_restart,
);
