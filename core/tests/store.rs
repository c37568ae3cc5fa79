//! Store tests, run against both backends: SQLite in a temporary directory and a throwaway
//! PostgreSQL database (from `MYELIN_TEST_DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`), created per test and dropped after it.

use std::{path::PathBuf, sync::Arc};

use myelin_core::{
    config::Config,
    pdu::NewEvent,
    ruma::{OwnedUserId, RoomVersionId},
    sqlx_support::{create_test_database, drop_test_database},
    Append, Server,
};
use serde_json::json;

struct Backend {
    url: String,
    dir: PathBuf,
    pg: Option<(String, String)>,
}

impl Backend {
    async fn new(kind: &str) -> Backend {
        let dir = std::env::temp_dir().join(format!(
            "myelin-store-{}-{}",
            std::process::id(),
            myelin_core::server::random_string(8)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        if kind == "sqlite" {
            let url = format!("sqlite://{}", dir.join("db.sqlite").display());
            return Backend { url, dir, pg: None };
        }
        let admin = std::env::var("MYELIN_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
        let name = format!(
            "myelin_store_{}",
            myelin_core::server::random_string(12).to_lowercase()
        );
        let url = create_test_database(&admin, &name)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "PostgreSQL is needed for the store tests and {admin} is not usable ({e}). \
                 Point MYELIN_TEST_DATABASE_URL at a server where this user may CREATE DATABASE."
                )
            });
        Backend {
            url,
            dir,
            pg: Some((admin, name)),
        }
    }

    fn config(&self) -> Config {
        Config {
            server_name: "test.local".to_owned(),
            data_dir: self.dir.clone(),
            database_url: Some(self.url.clone()),
            ..Config::default()
        }
    }

    async fn finish(self) {
        if let Some((admin, name)) = &self.pg {
            drop_test_database(admin, name).await.unwrap();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn uid(s: &str) -> OwnedUserId {
    OwnedUserId::try_from(format!("@{s}:test.local")).unwrap()
}

fn msg(sender: &OwnedUserId, body: &str) -> Append {
    Append {
        sender: sender.clone(),
        event: NewEvent::message("m.room.message", json!({"msgtype": "m.text", "body": body}))
            .unwrap(),
        txn: None,
    }
}

async fn new_room(server: &Arc<Server>, alice: &OwnedUserId) -> Arc<myelin_core::RoomInfo> {
    let rest = vec![
        Append {
            sender: alice.clone(),
            event: NewEvent::state(
                "m.room.member",
                alice.as_str(),
                json!({"membership": "join"}),
            )
            .unwrap(),
            txn: None,
        },
        Append {
            sender: alice.clone(),
            event: NewEvent::state("m.room.power_levels", "", json!({"users": {}})).unwrap(),
            txn: None,
        },
        Append {
            sender: alice.clone(),
            event: NewEvent::state("m.room.join_rules", "", json!({"join_rule": "public"}))
                .unwrap(),
            txn: None,
        },
    ];
    server
        .create_room(
            RoomVersionId::V12,
            alice,
            json!({"room_version": "12"}),
            rest,
        )
        .await
        .unwrap()
        .0
}

async fn events_persist_and_survive_a_restart(kind: &str) {
    let b = Backend::new(kind).await;
    let alice = uid("alice");
    let bob = uid("bob");
    let (room_id, last_pos) = {
        let server = Server::open(b.config()).await.unwrap();
        let room = new_room(&server, &alice).await;
        let join = Append {
            sender: bob.clone(),
            event: NewEvent::state("m.room.member", bob.as_str(), json!({"membership": "join"}))
                .unwrap(),
            txn: None,
        };
        server.append(&room, vec![join]).await.unwrap();
        for i in 0..20 {
            server
                .append(&room, vec![msg(&alice, &format!("m{i}"))])
                .await
                .unwrap();
        }
        let members = server.members(room.nid).await.unwrap();
        assert_eq!(members.get(bob.as_str()).map(String::as_str), Some("join"));
        let pos = server.events_stream.current();
        assert_eq!(pos, 25, "create + 3 initial state + join + 20 messages");
        server.store.close().await;
        (room.room_id.clone(), pos)
    };
    // A second start on the same data: migrations are a no-op, positions continue.
    let server = Server::open(b.config()).await.unwrap();
    assert_eq!(server.store.schema_version().await.unwrap(), 10); // highest migration
    assert_eq!(server.events_stream.current(), last_pos);
    let room = server.room_or_404(&room_id).await.unwrap();
    let stored = server
        .append(&room, vec![msg(&bob, "after restart")])
        .await
        .unwrap();
    assert_eq!(stored[0].stream_ordering, Some(last_pos + 1));
    // Its prev_event is the last event before the restart.
    let rows = server
        .store
        .room_events_stream_desc(room.nid, 0, i64::MAX, 2)
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(stored[0].pdu.prev_events[0].as_str(), rows[1].event_id);
    server.store.close().await;
    b.finish().await;
}

async fn state_snapshots_share_structure(kind: &str) {
    let b = Backend::new(kind).await;
    let server = Server::open(b.config()).await.unwrap();
    let alice = uid("alice");
    let room = new_room(&server, &alice).await;
    for i in 0..30 {
        let topic = Append {
            sender: alice.clone(),
            event: NewEvent::state("m.room.topic", "", json!({"topic": format!("t{i}")})).unwrap(),
            txn: None,
        };
        server.append(&room, vec![topic]).await.unwrap();
    }
    let edits: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM state_group_edits")
        .fetch_one(server.store.pool())
        .await
        .unwrap();
    // 34 state events; full copies would hold 4+5+…≈ 600 rows, deltas hold about one each.
    assert!(
        edits < 60,
        "state groups should be deltas, found {edits} rows"
    );
    let state = server.current_state(&room).await.unwrap();
    let topic = server
        .state_event(&state, "m.room.topic", "")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(topic.pdu.content_str("topic").as_deref(), Some("t29"));
    // A snapshot resolved from the database alone equals the in-memory one.
    server.store.close().await;
    let server = Server::open(b.config()).await.unwrap();
    let room = server.room_or_404(&room.room_id).await.unwrap();
    let reloaded = server.current_state(&room).await.unwrap();
    assert_eq!(*reloaded, *state);
    server.store.close().await;
    b.finish().await;
}

async fn refused_events_change_nothing(kind: &str) {
    let b = Backend::new(kind).await;
    let server = Server::open(b.config()).await.unwrap();
    let alice = uid("alice");
    let mallory = uid("mallory");
    let room = new_room(&server, &alice).await;
    let before = server.events_stream.current();
    // Not a member: the auth rules refuse, nothing is written.
    let err = server
        .append(&room, vec![msg(&mallory, "hi")])
        .await
        .unwrap_err();
    assert_eq!(err.kind().errcode(), "M_FORBIDDEN");
    // A batch whose second event is refused writes neither.
    let err = server
        .append(&room, vec![msg(&alice, "ok"), msg(&mallory, "no")])
        .await
        .unwrap_err();
    assert_eq!(err.kind().errcode(), "M_FORBIDDEN");
    assert_eq!(server.events_stream.current(), before);
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM events")
        .fetch_one(server.store.pool())
        .await
        .unwrap();
    assert_eq!(n, 4);
    server.store.close().await;
    b.finish().await;
}

async fn redaction_rewrites_stored_content(kind: &str) {
    let b = Backend::new(kind).await;
    let server = Server::open(b.config()).await.unwrap();
    let alice = uid("alice");
    let room = new_room(&server, &alice).await;
    let target = server
        .append(&room, vec![msg(&alice, "secret")])
        .await
        .unwrap()
        .remove(0);
    let mut red = NewEvent::message("m.room.redaction", json!({})).unwrap();
    red.redacts = Some(target.pdu.event_id.clone());
    server
        .append(
            &room,
            vec![Append {
                sender: alice.clone(),
                event: red,
                txn: None,
            }],
        )
        .await
        .unwrap();
    let row = server
        .store
        .event_by_id(target.pdu.event_id.as_str())
        .await
        .unwrap()
        .unwrap();
    assert!(
        !row.json.contains("secret"),
        "stored JSON still has the content: {}",
        row.json
    );
    assert!(row.redacted_by.is_some());
    server.store.close().await;
    b.finish().await;
}

async fn a_failed_commit_discards_the_head(kind: &str) {
    let b = Backend::new(kind).await;
    let server = Server::open(b.config()).await.unwrap();
    let alice = uid("alice");
    let room = new_room(&server, &alice).await;
    let with_txn = |body: &str| Append {
        sender: alice.clone(),
        event: NewEvent::message("m.room.message", json!({"msgtype": "m.text", "body": body}))
            .unwrap(),
        txn: Some(("DEV".into(), "send/r/m.room.message".into(), "t1".into())),
    };
    let first = server
        .append(&room, vec![with_txn("one")])
        .await
        .unwrap()
        .remove(0);
    // The same transaction again reaches the database's unique key and fails to commit.
    assert!(server.append(&room, vec![with_txn("two")]).await.is_err());
    // The room goes on from the last committed event, not from the failed one.
    let next = server
        .append(&room, vec![msg(&alice, "three")])
        .await
        .unwrap()
        .remove(0);
    assert_eq!(next.pdu.prev_events, vec![first.pdu.event_id.clone()]);
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM events")
        .fetch_one(server.store.pool())
        .await
        .unwrap();
    assert_eq!(n, 6, "4 initial + one + three");
    server.store.close().await;
    b.finish().await;
}

/// Concurrent sends to one room share group commits and keep a single linear history.
async fn concurrent_sends_stay_linear(kind: &str) {
    let b = Backend::new(kind).await;
    let server = Server::open(b.config()).await.unwrap();
    let alice = uid("alice");
    let room = new_room(&server, &alice).await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let (server, room, alice) = (server.clone(), room.clone(), alice.clone());
        tasks.push(tokio::spawn(async move {
            server
                .append(&room, vec![msg(&alice, &format!("m{i}"))])
                .await
                .unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let rows = server
        .store
        .room_events_stream_desc(room.nid, 0, i64::MAX, 100)
        .await
        .unwrap();
    assert_eq!(rows.len(), 54);
    // Newest first: each event's single prev_event is the one before it.
    let events = server.events_from_rows(rows).await.unwrap();
    for pair in events.windows(2) {
        assert_eq!(pair[0].pdu.prev_events, vec![pair[1].pdu.event_id.clone()]);
        assert_eq!(pair[0].depth, pair[1].depth + 1);
    }
    server.store.close().await;
    b.finish().await;
}

/// An incremental sync answered from the in-memory recent events equals the same sync
/// answered from the database after a restart.
async fn sync_from_memory_equals_sync_from_database(kind: &str) {
    use myelin_core::sync::SyncRequest;
    let b = Backend::new(kind).await;
    let alice = uid("alice");
    let req = |since| SyncRequest {
        user_id: alice.to_string(),
        device_id: "DEV".into(),
        since,
        full_state: false,
        filter: Default::default(),
        use_state_after: true,
        timeout: std::time::Duration::ZERO,
        set_presence: None,
        holds_presence: true,
        ack_to_device: None,
    };
    let ids = |body: &serde_json::Value| -> Vec<String> {
        let rooms = body["rooms"]["join"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        rooms
            .values()
            .flat_map(|r| {
                r["timeline"]["events"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .map(|e| e["event_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (since, from_memory) = {
        let server = Server::open(b.config()).await.unwrap();
        let room = new_room(&server, &alice).await;
        let since = server.current_token();
        for i in 0..5 {
            server
                .append(&room, vec![msg(&alice, &format!("m{i}"))])
                .await
                .unwrap();
        }
        let body = server.sync(&req(Some(since))).await.unwrap();
        server.store.close().await;
        (since, body)
    };
    assert_eq!(ids(&from_memory).len(), 5, "{from_memory}");
    let server = Server::open(b.config()).await.unwrap();
    let from_db = server.sync(&req(Some(since))).await.unwrap();
    assert_eq!(ids(&from_memory), ids(&from_db));
    // The same positions, but for typing (in memory, restarting from the clock) and presence
    // (the syncs themselves make alice online).
    let persisted = |body: &serde_json::Value| {
        let t = myelin_core::token::SyncToken::parse(body["next_batch"].as_str().unwrap()).unwrap();
        myelin_core::token::SyncToken {
            typing: 0,
            presence: 0,
            ..t
        }
    };
    assert_eq!(persisted(&from_memory), persisted(&from_db));
    server.store.close().await;
    b.finish().await;
}

/// A historical event (as backfill writes it) is in the timeline `/messages` reads but not in
/// what `/sync` reads, never the state at a stream position; backward extremities keep the
/// deepest depth they are named at and go when the event arrives.
async fn historical_events_stay_out_of_sync(kind: &str) {
    use myelin_core::store::{EventWrite, HistoricalWrite};
    let b = Backend::new(kind).await;
    let alice = uid("alice");
    let server = Server::open(b.config()).await.unwrap();
    let room = new_room(&server, &alice).await;
    let live = server
        .append(&room, vec![msg(&alice, "live")])
        .await
        .unwrap();
    let now = server.events_stream.current();
    let group = live[0].state_after.unwrap();
    let historical =
        |nid: i64, id: &str, position: i64, depth: i64, gaps: Vec<(&str, i64)>| HistoricalWrite {
            room_nid: room.nid,
            event: EventWrite {
                event_nid: nid,
                event_id: id.to_owned(),
                event_type: "m.room.message".to_owned(),
                state_key: None,
                sender: alice.to_string(),
                depth,
                origin_server_ts: 0,
                stream_ordering: position,
                json: "{}".to_owned(),
                state_before: group,
                state_after: group,
                new_group: None,
                membership: None,
                txn: None,
            },
            promote: false,
            groups: vec![],
            backward_add: gaps.into_iter().map(|(g, d)| (g.to_owned(), d)).collect(),
        };
    let store = &server.store;
    store
        .write_historical(&historical(
            90_001,
            "$old",
            -1,
            3,
            vec![("$gap", 1), ("$gap", 3)],
        ))
        .await
        .unwrap();
    store
        .write_historical(&historical(90_002, "$older", -2, 2, vec![("$gap", 2)]))
        .await
        .unwrap();
    assert_eq!(
        store.backward_extremities(room.nid, 100, 10).await.unwrap(),
        vec![("$gap".to_owned(), 3)]
    );
    assert!(store
        .backward_extremities(room.nid, 2, 10)
        .await
        .unwrap()
        .is_empty());
    let timeline: Vec<String> = store
        .room_events_topological(room.nid, i64::MAX, now, true, now, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.event_id)
        .collect();
    assert_eq!(timeline.len(), 7, "{timeline:?}");
    assert_eq!(timeline[0], live[0].pdu.event_id.as_str());
    // Depth 3 ("$old") sits with the room's depth-3 event, below it by position.
    assert!(
        timeline.iter().position(|i| i == "$old") < timeline.iter().position(|i| i == "$older")
    );
    let synced: Vec<String> = store
        .room_events_stream_desc(room.nid, 0, now, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.event_id)
        .collect();
    assert_eq!(synced.len(), 5);
    assert!(!synced.iter().any(|i| i.starts_with("$old")));
    assert_eq!(
        store.state_group_at(room.nid, now).await.unwrap(),
        Some(group)
    );
    assert_eq!(store.min_stream_ordering().await.unwrap(), -2);
    // The missing event arrives: the gap closes.
    store
        .write_historical(&historical(90_003, "$gap", -3, 1, vec![]))
        .await
        .unwrap();
    assert!(store
        .backward_extremities(room.nid, 100, 10)
        .await
        .unwrap()
        .is_empty());
    // The same event twice is refused whole.
    assert!(store
        .write_historical(&historical(90_004, "$gap", -4, 1, vec![("$x", 1)]))
        .await
        .is_err());
    assert!(store
        .backward_extremities(room.nid, 100, 10)
        .await
        .unwrap()
        .is_empty());
    server.store.close().await;
    b.finish().await;
}

/// Another server's user's device list only moves forward: a whole list fetched before an
/// update that followed it, arriving after that update, is not kept; an update is kept only
/// over the list it was applied to.
async fn remote_device_lists_move_forward(kind: &str) {
    let b = Backend::new(kind).await;
    let server = Server::open(b.config()).await.unwrap();
    let bob = "@bob:remote.test";
    let devices = |ids: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    };
    let held = |server: Arc<Server>| async move {
        let list = server.store.remote_device_list(bob).await.unwrap().unwrap();
        let ds: Vec<serde_json::Value> = serde_json::from_str(&list.devices).unwrap();
        let mut ids: Vec<String> = ds
            .iter()
            .map(|d| d["device_id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        (list.stream_id, ids)
    };
    let whole = |stream: i64, ids: &[&str]| {
        json!({
            "user_id": bob,
            "stream_id": stream,
            "devices": ids.iter().map(|d| json!({"device_id": d, "keys": {}})).collect::<Vec<_>>(),
        })
    };
    server
        .store_remote_user_devices(bob, &whole(5, &["ONE"]))
        .await
        .unwrap();
    let update =
        json!({"user_id": bob, "device_id": "TWO", "stream_id": 6, "prev_id": [5], "keys": {}});
    assert!(server.apply_device_list_update(&update).await.unwrap());
    assert_eq!(held(server.clone()).await, (6, devices(&["ONE", "TWO"])));
    // The earlier whole list lands late: what is held stays.
    server
        .store_remote_user_devices(bob, &whole(5, &["ONE"]))
        .await
        .unwrap();
    assert_eq!(held(server.clone()).await, (6, devices(&["ONE", "TWO"])));
    // An update that does not follow on asks for a resync and changes nothing.
    let gap =
        json!({"user_id": bob, "device_id": "THREE", "stream_id": 9, "prev_id": [8], "keys": {}});
    assert!(!server.apply_device_list_update(&gap).await.unwrap());
    assert_eq!(held(server.clone()).await, (6, devices(&["ONE", "TWO"])));
    // A newer whole list is kept; replaying an old update is a no-op.
    server
        .store_remote_user_devices(bob, &whole(9, &["ONE", "THREE"]))
        .await
        .unwrap();
    assert!(server.apply_device_list_update(&update).await.unwrap());
    assert_eq!(held(server.clone()).await, (9, devices(&["ONE", "THREE"])));
    // Kept only over the position it was read at.
    let list = server.store.remote_device_list(bob).await.unwrap().unwrap();
    let mut w = server.store.write().await.unwrap();
    let stale = myelin_core::store::RemoteDeviceList {
        stream_id: 10,
        devices: "[]".to_owned(),
        ..list
    };
    assert!(!w
        .put_remote_device_list(bob, &stale, Some(8))
        .await
        .unwrap());
    assert!(w
        .put_remote_device_list(bob, &stale, Some(9))
        .await
        .unwrap());
    w.commit().await.unwrap();
    assert_eq!(held(server.clone()).await, (10, devices(&[])));
    server.store.close().await;
    b.finish().await;
}

macro_rules! both_backends {
    ($($name:ident),*) => {
        mod sqlite {
            $(#[tokio::test] async fn $name() { super::$name("sqlite").await })*
        }
        mod postgres {
            $(#[tokio::test] async fn $name() { super::$name("postgres").await })*
        }
    };
}

both_backends!(
    events_persist_and_survive_a_restart,
    state_snapshots_share_structure,
    refused_events_change_nothing,
    redaction_rewrites_stored_content,
    a_failed_commit_discards_the_head,
    concurrent_sends_stay_linear,
    sync_from_memory_equals_sync_from_database,
    historical_events_stay_out_of_sync,
    remote_device_lists_move_forward
);
