//! The push sender (Push Gateway API, `POST /_matrix/push/v1/notify`): one task per pusher
//! with queued notifications sends them, oldest first, to the pusher's gateway.
//!
//! The queue (`push_queue`) is written with the push actions that cause it, in the event's
//! transaction, and read again at start-up, so nothing is lost across a restart. A row is
//! deleted only once the gateway answered 2xx (or refused it for good with another 4xx, or it
//! is a day old); a failure backs off exponentially with jitter (kept in the row). A pushkey
//! the gateway lists as `rejected` loses its pusher. Delivery is at least once: a crash
//! between the gateway's answer and the row's deletion sends it again, which gateways are
//! expected to tolerate (the notification carries its `event_id`).

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use myelin_core::{
    store::{now_ms, PushQueueRow, PusherRow},
    Server,
};
use serde_json::{json, Map, Value};

/// A gateway's answer is awaited this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A notification still undelivered after this is dropped.
const MAX_AGE_MS: i64 = 24 * 60 * 60 * 1000;
/// Without a wake-up, the queue is looked at this often.
const RESCAN: Duration = Duration::from_secs(30);

/// Starts the sender: resumes every pusher with queued notifications, then follows new ones.
pub fn start(server: Arc<Server>) {
    let client = match reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "push sender: no HTTP client; push notifications are off");
            return;
        }
    };
    tokio::spawn(async move {
        let running: Arc<Mutex<HashSet<i64>>> = Arc::default();
        // At start-up and every so often, from the database; otherwise as the writer queues.
        let mut pushers = queued_pushers(&server).await;
        loop {
            if server
                .shutting_down
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                return;
            }
            for pusher in pushers {
                spawn_pusher(&server, &client, &running, pusher);
            }
            pushers = match tokio::time::timeout(RESCAN, server.push.queued.next()).await {
                Ok(p) => p,
                Err(_) => queued_pushers(&server).await,
            };
        }
    });
}

/// The pushers with queued notifications, from the database (none when it fails: the next
/// rescan tries again).
async fn queued_pushers(server: &Server) -> Vec<i64> {
    server.store.queued_pushers().await.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "reading the push queue");
        Vec::new()
    })
}

/// Runs a pusher's queue unless it already runs (its task then finds the new rows itself).
fn spawn_pusher(
    server: &Arc<Server>,
    client: &reqwest::Client,
    running: &Arc<Mutex<HashSet<i64>>>,
    pusher: i64,
) {
    if !running
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(pusher)
    {
        return;
    }
    let (server, client, running) = (server.clone(), client.clone(), running.clone());
    tokio::spawn(async move {
        drain(&server, &client, pusher).await;
        running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pusher);
        // Rows queued while stopping: have the main loop look again.
        if let Ok(Some(_)) = server.store.push_queue_next(pusher).await {
            server.push.queued.wake(vec![pusher]);
        }
    });
}

/// What became of one attempt.
enum Outcome {
    /// Accepted, refused for good, or moot: the row goes.
    Done,
    /// The pusher goes (the gateway rejected its pushkey, or it no longer exists).
    DropPusher,
    /// Try again later.
    Retry(String),
}

/// Sends a pusher's queue until it is empty.
async fn drain(server: &Server, client: &reqwest::Client, pusher_id: i64) {
    loop {
        if server
            .shutting_down
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        let row = match server.store.push_queue_next(pusher_id).await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(pusher = pusher_id, error = %e, "reading the push queue");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let wait = row.next_attempt_ts - now_ms();
        if wait > 0 {
            tokio::time::sleep(Duration::from_millis(wait as u64)).await;
        }
        let pusher = match server.push.pushers(&server.store, &row.user_id).await {
            Ok(ps) => ps.iter().find(|p| p.id == pusher_id).cloned(),
            Err(e) => {
                tracing::warn!(pusher = pusher_id, error = %e, "reading a pusher");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let outcome = match &pusher {
            None => Outcome::DropPusher,
            Some(p) => attempt(server, client, p, &row).await,
        };
        let result = match outcome {
            Outcome::Done => server.store.push_queue_delete(row.id).await,
            Outcome::DropPusher => {
                if let Some(p) = &pusher {
                    tracing::info!(user = %p.user_id, app_id = %p.app_id, "pushkey rejected by the gateway; pusher removed");
                }
                let r = server.store.delete_pusher_by_id(pusher_id).await;
                if let Some(p) = &pusher {
                    server.push.forget_pushers(&p.user_id);
                }
                r
            }
            Outcome::Retry(why) => {
                if now_ms() - row.created_ts > MAX_AGE_MS {
                    tracing::info!(pusher = pusher_id, %why, "push notification undelivered for a day; dropped");
                    server.store.push_queue_delete(row.id).await
                } else {
                    let attempts = row.attempts + 1;
                    let backoff = myelin_core::retry::backoff_ms(attempts);
                    tracing::info!(pusher = pusher_id, %why, attempts, backoff_ms = backoff, "push gateway failed; backing off");
                    server
                        .store
                        .push_queue_retry(row.id, attempts, now_ms() + backoff)
                        .await
                }
            }
        };
        if let Err(e) = result {
            tracing::warn!(pusher = pusher_id, error = %e, "updating the push queue");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// One delivery attempt of `row` to `pusher`'s gateway.
async fn attempt(
    server: &Server,
    client: &reqwest::Client,
    pusher: &PusherRow,
    row: &PushQueueRow,
) -> Outcome {
    let data: Map<String, Value> = serde_json::from_str(&pusher.data).unwrap_or_default();
    let Some(url) = data.get("url").and_then(Value::as_str).map(str::to_owned) else {
        return Outcome::DropPusher;
    };
    let body = match notification_body(server, pusher, data, row).await {
        Ok(Some(b)) => b,
        // The event is gone: nothing to send.
        Ok(None) => return Outcome::Done,
        Err(e) => return Outcome::Retry(format!("building the notification: {e}")),
    };
    let resp = match client.post(&url).json(&body).send().await {
        Ok(r) => r,
        Err(e) => return Outcome::Retry(e.to_string()),
    };
    let status = resp.status();
    if status.is_success() {
        let answer: Value = resp.json().await.unwrap_or(Value::Null);
        let rejected = answer["rejected"]
            .as_array()
            .is_some_and(|r| r.iter().any(|k| k.as_str() == Some(&pusher.pushkey)));
        return if rejected {
            Outcome::DropPusher
        } else {
            Outcome::Done
        };
    }
    if status.is_client_error()
        && status != reqwest::StatusCode::REQUEST_TIMEOUT
        && status != reqwest::StatusCode::TOO_MANY_REQUESTS
    {
        tracing::info!(user = %pusher.user_id, %status, "push gateway refused a notification; dropped");
        return Outcome::Done;
    }
    Outcome::Retry(format!("gateway answered {status}"))
}

/// The body of `POST /_matrix/push/v1/notify` for a queued notification (`None` when its
/// event is no longer stored).
async fn notification_body(
    server: &Server,
    pusher: &PusherRow,
    mut data: Map<String, Value>,
    row: &PushQueueRow,
) -> myelin_core::Result<Option<Value>> {
    let ev = match server.event(row.event_nid).await {
        Ok(ev) => ev,
        // Gone (purged, say): nothing to notify. Any other failure is retried.
        Err(_) if server.store.event_by_nid(row.event_nid).await?.is_none() => return Ok(None),
        Err(e) => return Err(e),
    };
    data.remove("url");
    let event_id_only = data.get("format").and_then(Value::as_str) == Some("event_id_only");
    let actions: Value = serde_json::from_str(&row.actions).unwrap_or_else(|_| json!([]));
    let mut tweaks = Map::new();
    for a in actions.as_array().into_iter().flatten() {
        if let Some(name) = a.get("set_tweak").and_then(Value::as_str) {
            let value = a.get("value").cloned().unwrap_or(Value::Bool(true));
            tweaks.insert(name.to_owned(), value);
        }
    }
    let pdu = &ev.pdu;
    let high = tweaks.contains_key("sound")
        || tweaks.get("highlight") == Some(&Value::Bool(true))
        || pdu.kind.to_string() == "m.room.encrypted";
    let unread = myelin_core::push::badge_count(server, &row.user_id).await?;
    let device = json!({
        "app_id": pusher.app_id,
        "pushkey": pusher.pushkey,
        "pushkey_ts": pusher.pushkey_ts / 1000,
        "data": data,
        "tweaks": tweaks,
    });
    let mut n = json!({
        "event_id": pdu.event_id,
        "room_id": pdu.room_id,
        "prio": if high { "high" } else { "low" },
        "counts": { "unread": unread },
        "devices": [device],
    });
    if !event_id_only {
        n["type"] = json!(pdu.kind.to_string());
        n["sender"] = json!(pdu.sender);
        n["content"] = pdu.content_value();
        if pdu.kind.to_string() == "m.room.member" {
            n["user_is_target"] = json!(pdu.state_key.as_deref() == Some(row.user_id.as_str()));
        }
        if let Some(group) = ev.state_before.filter(|g| *g != 0) {
            let state = server.state_map(group).await?;
            if let Some(member) = server
                .state_event(&state, "m.room.member", pdu.sender.as_str())
                .await?
            {
                if let Some(name) = member.pdu.content_str("displayname") {
                    n["sender_display_name"] = json!(name);
                }
            }
            if let Some(name) = server.state_field(&state, "m.room.name", "name").await? {
                n["room_name"] = json!(name);
            }
            if let Some(alias) = server
                .state_field(&state, "m.room.canonical_alias", "alias")
                .await?
            {
                n["room_alias"] = json!(alias);
            }
        }
    }
    Ok(Some(json!({ "notification": n })))
}
