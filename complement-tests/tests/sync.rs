//! `GET /sync`: initial and incremental syncs, `use_state_after`, limited
//! timelines with `prev_batch` pagination, invites (`rooms.invite` with
//! `invite_state`), leaves (`rooms.leave`), long-polling, several devices of
//! one user, and exactly-once delivery across chained `since` tokens.

use complement_tests::client::sync::{message_bodies, timeline, timeline_has, timeline_ids};
use complement_tests::{backend_tests, TestServer};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

fn next_batch(sync: &Value) -> String {
    sync["next_batch"]
        .as_str()
        .unwrap_or_else(|| panic!("sync without next_batch: {sync}"))
        .to_owned()
}

fn state_events<'a>(sync: &'a Value, room: &str, key: &str) -> &'a [Value] {
    sync["rooms"]["join"][room][key]["events"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// An initial sync shows the joined room with its state and timeline;
/// an incremental sync returns only what is new.
async fn initial_and_incremental(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let room = alice
        .create_room(&json!({"preset": "private_chat", "name": "Synced"}))
        .await?;
    let first = alice.send_message(&room, "first").await?;

    let initial = alice.sync(None, None, None).await?;
    let joined = &initial["rooms"]["join"][&room];
    assert!(
        joined.is_object(),
        "the room is under rooms.join: {initial}"
    );
    assert!(
        timeline_has(&initial, &room, &first),
        "timeline has the message: {initial}"
    );
    let mut types: BTreeSet<String> = BTreeSet::new();
    for event in state_events(&initial, &room, "state")
        .iter()
        .chain(timeline(&initial, &room))
    {
        if event.get("state_key").is_some() {
            types.insert(event["type"].as_str().unwrap_or_default().to_owned());
        }
    }
    for required in [
        "m.room.create",
        "m.room.member",
        "m.room.power_levels",
        "m.room.name",
    ] {
        assert!(
            types.contains(required),
            "state+timeline lack {required}: {initial}"
        );
    }
    for event in timeline(&initial, &room) {
        assert!(
            event["event_id"].is_string() && event["sender"].is_string(),
            "{event}"
        );
        assert!(
            event["origin_server_ts"].is_u64() && event["content"].is_object(),
            "{event}"
        );
    }
    assert!(
        joined["timeline"]["limited"].is_boolean() || joined["timeline"].get("limited").is_none()
    );

    let since = next_batch(&initial);
    let second = alice.send_message(&room, "second").await?;
    let incremental = alice
        .sync_until(Some(&since), None, Duration::from_secs(10), |s| {
            timeline_has(s, &room, &second)
        })
        .await?;
    let ids = timeline_ids(&incremental, &room);
    assert_eq!(
        ids,
        vec![second.clone()],
        "only the new event: {incremental}"
    );
    assert!(
        state_events(&incremental, &room, "state").is_empty(),
        "no state changed: {incremental}"
    );

    // Nothing new: an immediate sync from the latest token has no room.
    let quiet = alice
        .sync(Some(&next_batch(&incremental)), Some(0), None)
        .await?;
    assert!(
        timeline(&quiet, &room).is_empty(),
        "nothing new expected: {quiet}"
    );
    Ok(())
}

/// `use_state_after=true` returns `state_after` (covering the end of
/// the timeline) and omits `state`.
async fn use_state_after(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let room = alice
        .create_room(&json!({"preset": "private_chat", "topic": "old"}))
        .await?;

    let initial = alice.sync_with(&[("use_state_after", "true")]).await?;
    let joined = &initial["rooms"]["join"][&room];
    assert!(
        joined.get("state").is_none(),
        "`state` must be omitted: {initial}"
    );
    assert!(
        joined["state_after"]["events"].is_array(),
        "`state_after` required: {initial}"
    );

    let since = next_batch(&initial);
    let topic_event = alice
        .send_state(&room, "m.room.topic", "", &json!({"topic": "new"}))
        .await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut token = since;
    let incremental = loop {
        let response = alice
            .sync_with(&[
                ("use_state_after", "true"),
                ("since", &token),
                ("timeout", "1000"),
            ])
            .await?;
        if timeline_has(&response, &room, &topic_event) || Instant::now() > deadline {
            break response;
        }
        token = next_batch(&response);
    };
    let joined = &incremental["rooms"]["join"][&room];
    assert!(
        joined.get("state").is_none(),
        "`state` must be omitted: {incremental}"
    );
    let after = joined["state_after"]["events"]
        .as_array()
        .expect("state_after.events");
    let topic = after
        .iter()
        .find(|e| e["type"] == "m.room.topic")
        .unwrap_or_else(|| {
            panic!("state_after has the topic change at the end of the timeline: {incremental}")
        });
    assert_eq!(topic["content"]["topic"], "new");
    assert_eq!(topic["event_id"], topic_event);

    // Without the flag: `state`, never `state_after`.
    let plain = alice.sync(None, None, None).await?;
    assert!(
        plain["rooms"]["join"][&room].get("state_after").is_none(),
        "{plain}"
    );
    Ok(())
}

/// A timeline cut by the limit is `limited: true` with a `prev_batch`
/// from which `/messages` continues backwards without gaps, both on the
/// initial sync and on an incremental sync with a gap.
async fn limited_timeline_and_prev_batch(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let room = alice
        .create_room(&json!({"preset": "private_chat"}))
        .await?;
    let mut sent = Vec::new();
    for i in 0..5 {
        sent.push(alice.send_message(&room, &format!("early {i}")).await?);
    }
    let filter = json!({"room": {"timeline": {"limit": 2}}}).to_string();

    let initial = alice.sync(None, None, Some(&filter)).await?;
    let tl = &initial["rooms"]["join"][&room]["timeline"];
    assert_eq!(tl["limited"], true, "{initial}");
    assert_eq!(timeline_ids(&initial, &room), sent[3..].to_vec());
    let prev = tl["prev_batch"].as_str().expect("prev_batch").to_owned();
    let page = alice
        .messages(&room, &[("dir", "b"), ("from", &prev), ("limit", "3")])
        .await?;
    let ids: Vec<&str> = page["chunk"]
        .as_array()
        .expect("chunk")
        .iter()
        .filter_map(|e| e["event_id"].as_str())
        .collect();
    assert_eq!(
        ids,
        vec![sent[2].as_str(), sent[1].as_str(), sent[0].as_str()],
        "no gap, no repeat"
    );

    // An incremental sync with more new events than the limit.
    let since = next_batch(&initial);
    let mut later = Vec::new();
    for i in 0..5 {
        later.push(alice.send_message(&room, &format!("later {i}")).await?);
    }
    let incremental = alice.sync(Some(&since), Some(0), Some(&filter)).await?;
    let tl = &incremental["rooms"]["join"][&room]["timeline"];
    assert_eq!(tl["limited"], true, "{incremental}");
    assert_eq!(timeline_ids(&incremental, &room), later[3..].to_vec());
    let prev = tl["prev_batch"].as_str().expect("prev_batch").to_owned();
    let page = alice
        .messages(&room, &[("dir", "b"), ("from", &prev), ("limit", "3")])
        .await?;
    let ids: Vec<&str> = page["chunk"]
        .as_array()
        .expect("chunk")
        .iter()
        .filter_map(|e| e["event_id"].as_str())
        .collect();
    assert_eq!(
        ids,
        vec![later[2].as_str(), later[1].as_str(), later[0].as_str()]
    );

    // An unlimited incremental sync is `limited: false` (or omitted).
    let since = next_batch(&incremental);
    let one = alice.send_message(&room, "one more").await?;
    let small = alice.sync(Some(&since), Some(0), Some(&filter)).await?;
    assert_eq!(timeline_ids(&small, &room), vec![one]);
    let limited = &small["rooms"]["join"][&room]["timeline"]["limited"];
    assert!(limited == &json!(false) || limited.is_null(), "{small}");
    Ok(())
}

/// Invites appear under `rooms.invite` with stripped `invite_state`;
/// after joining the room moves to `rooms.join`, after leaving to
/// `rooms.leave`.
async fn invite_join_leave_sections(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let bob = server.register("bob", "bob-password").await?;
    let room = alice
        .create_room(&json!({"preset": "private_chat", "name": "Invitation"}))
        .await?;
    let start = bob.sync(None, None, None).await?;
    let since = next_batch(&start);

    alice.invite(&room, &bob.user_id).await?;
    let invited = bob
        .sync_until(Some(&since), None, Duration::from_secs(10), |s| {
            s["rooms"]["invite"].get(&room).is_some()
        })
        .await?;
    let invite_state = invited["rooms"]["invite"][&room]["invite_state"]["events"]
        .as_array()
        .unwrap_or_else(|| panic!("invite_state.events: {invited}"));
    let own = invite_state
        .iter()
        .find(|e| e["type"] == "m.room.member" && e["state_key"] == bob.user_id)
        .unwrap_or_else(|| panic!("invite_state includes the invite itself: {invited}"));
    assert_eq!(own["content"]["membership"], "invite");
    assert_eq!(own["sender"], alice.user_id);
    let name = invite_state.iter().find(|e| e["type"] == "m.room.name");
    assert_eq!(
        name.map(|e| e["content"]["name"].clone()),
        Some(json!("Invitation")),
        "{invited}"
    );
    for event in invite_state {
        assert!(
            event["type"].is_string()
                && event["state_key"].is_string()
                && event["sender"].is_string()
        );
    }
    assert!(invited["rooms"]["join"].get(&room).is_none());

    let since = next_batch(&invited);
    bob.join(&room).await?;
    let joined = bob
        .sync_until(Some(&since), None, Duration::from_secs(10), |s| {
            s["rooms"]["join"].get(&room).is_some()
        })
        .await?;
    assert!(joined["rooms"]["invite"].get(&room).is_none(), "{joined}");

    let since = next_batch(&joined);
    bob.leave(&room).await?;
    let left = bob
        .sync_until(Some(&since), None, Duration::from_secs(10), |s| {
            s["rooms"]["leave"].get(&room).is_some()
        })
        .await?;
    let leave_timeline = left["rooms"]["leave"][&room]["timeline"]["events"]
        .as_array()
        .unwrap_or_else(|| panic!("rooms.leave timeline: {left}"));
    assert!(
        leave_timeline.iter().any(|e| e["type"] == "m.room.member"
            && e["state_key"] == bob.user_id
            && e["content"]["membership"] == "leave"),
        "the leave event is in the left room's timeline: {left}"
    );
    assert!(left["rooms"]["join"].get(&room).is_none(), "{left}");

    // Later messages do not reach the user who left.
    let since = next_batch(&left);
    let after = alice.send_message(&room, "after bob left").await?;
    let later = bob.sync(Some(&since), Some(500), None).await?;
    for section in ["join", "leave"] {
        let events = later["rooms"][section][&room]["timeline"]["events"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(!events.iter().any(|e| e["event_id"] == after), "{later}");
    }
    Ok(())
}

/// A long-polling sync parked before a message is sent returns promptly
/// with it.
async fn long_poll_wakes_up(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let bob = server.register("bob", "bob-password").await?;
    let room = alice.create_room(&json!({"preset": "public_chat"})).await?;
    bob.join(&room).await?;
    let settled = bob.sync(None, None, None).await?;
    let since = next_batch(&settled);
    // Drain anything still in flight so the next sync really waits.
    let drained = bob.sync(Some(&since), Some(0), None).await?;
    let since = next_batch(&drained);

    // With nothing to report, a long-poll waits for (about) its timeout.
    let started = Instant::now();
    let idle = bob.sync(Some(&since), Some(1000), None).await?;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(5),
        "an idle sync with timeout=1000 returned after {waited:?}: {idle}"
    );
    let since = next_batch(&idle);

    let waiter = bob.clone();
    let parked = tokio::spawn(async move {
        let started = Instant::now();
        let response = waiter.sync(Some(&since), Some(10_000), None).await;
        (response, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !parked.is_finished(),
        "sync with nothing new returned before the timeout"
    );

    let sent_at = Instant::now();
    let event_id = alice.send_message(&room, "wake up").await?;
    let (response, total) = parked.await?;
    let response = response?;
    let after_send = sent_at.elapsed();
    assert!(
        after_send < Duration::from_secs(5),
        "long-poll took {after_send:?} after the send (total {total:?})"
    );
    assert!(
        timeline_has(&response, &room, &event_id),
        "the woken sync carries the event: {response}"
    );
    Ok(())
}

/// Two devices of one user each get the message, independently of each
/// other's sync position.
async fn two_devices_both_receive(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let bob_phone = server.register("bob", "bob-password").await?;
    let bob_laptop = server.login("bob", "bob-password", Some("LAPTOP")).await?;
    let room = alice.create_room(&json!({"preset": "public_chat"})).await?;
    bob_phone.join(&room).await?;

    let phone_since = next_batch(&bob_phone.sync(None, None, None).await?);
    let laptop_since = next_batch(&bob_laptop.sync(None, None, None).await?);
    let event_id = alice.send_message(&room, "for both devices").await?;

    let laptop = bob_laptop
        .sync_until(Some(&laptop_since), None, Duration::from_secs(10), |s| {
            timeline_has(s, &room, &event_id)
        })
        .await?;
    let again = bob_laptop
        .sync(Some(&next_batch(&laptop)), Some(0), None)
        .await?;
    assert!(
        !timeline_has(&again, &room, &event_id),
        "delivered once per device: {again}"
    );

    // The phone has not synced since; its token still yields the event.
    let phone = bob_phone
        .sync_until(Some(&phone_since), None, Duration::from_secs(10), |s| {
            timeline_has(s, &room, &event_id)
        })
        .await?;
    assert_eq!(
        message_bodies(&phone, &room),
        vec!["for both devices".to_owned()]
    );
    Ok(())
}

/// Chaining `since` tokens while messages are being sent concurrently
/// delivers every event exactly once, in order.
async fn exactly_once_delivery(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", "alice-password").await?;
    let bob = server.register("bob", "bob-password").await?;
    let room = alice.create_room(&json!({"preset": "public_chat"})).await?;
    bob.join(&room).await?;
    let filter = json!({"room": {"rooms": [room], "timeline": {"limit": 100}}}).to_string();
    let mut since = next_batch(&bob.sync(None, None, Some(&filter)).await?);

    const COUNT: usize = 20;
    let sender = alice.clone();
    let sender_room = room.clone();
    let sending = tokio::spawn(async move {
        let mut ids = Vec::new();
        for i in 0..COUNT {
            ids.push(
                sender
                    .send_message(&sender_room, &format!("burst {i}"))
                    .await?,
            );
            if i % 5 == 4 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        anyhow::Ok(ids)
    });

    let mut received: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while received.len() < COUNT && Instant::now() < deadline {
        let response = bob.sync(Some(&since), Some(1000), Some(&filter)).await?;
        let limited = &response["rooms"]["join"][&room]["timeline"]["limited"];
        assert!(
            limited != &json!(true),
            "limit 100 must not be reached: {response}"
        );
        received.extend(
            timeline(&response, &room)
                .iter()
                .filter(|e| e["type"] == "m.room.message")
                .filter_map(|e| e["event_id"].as_str().map(str::to_owned)),
        );
        since = next_batch(&response);
    }
    let sent = sending.await??;
    // One more sync picks up anything that raced with the last one.
    let tail = bob.sync(Some(&since), Some(500), Some(&filter)).await?;
    received.extend(
        timeline_ids(&tail, &room)
            .into_iter()
            .filter(|id| sent.contains(id)),
    );

    let unique: BTreeSet<&String> = received.iter().collect();
    assert_eq!(
        unique.len(),
        received.len(),
        "an event was delivered twice: {received:?}"
    );
    assert_eq!(received, sent, "events lost or reordered");
    Ok(())
}

backend_tests!(
    initial_and_incremental,
    use_state_after,
    limited_timeline_and_prev_batch,
    invite_join_leave_sections,
    two_devices_both_receive,
    exactly_once_delivery
);

// Presence off: Bob's own "now online" (published shortly after his first sync) would answer
// the idle long-poll this test times.
backend_tests!(env = [("MYELIN_PRESENCE_ENABLED", "false")]; long_poll_wakes_up);
