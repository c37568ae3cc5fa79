//! The federation sender: one task per destination drains that destination's outbox (rows
//! written in the same transaction as the events they carry) in transactions of at most 50 PDUs
//! and 100 EDUs. A transaction's ID is derived from the outbox rows it carries, so a retry after
//! a failure or a restart sends the same ID and the receiver answers it once. Failures back off
//! exponentially with jitter, per destination, and the back-off is kept in the database.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use myelin_core::{ruma::OwnedServerName, store::now_ms, Server};
use serde_json::{json, Value};

use crate::Federation;

const MAX_PDUS: usize = 50;
const MAX_EDUS: usize = 100;

/// Starts the sender: resumes every destination with queued rows, then follows new ones.
pub fn start(fed: Arc<Federation>) {
    tokio::spawn(async move {
        let running: Arc<Mutex<HashSet<String>>> = Arc::default();
        match fed.server.store.outbox_destinations().await {
            Ok(dests) => {
                for d in dests {
                    spawn_destination(&fed, &running, d);
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading the federation outbox"),
        }
        loop {
            let dests = fed.server.outbox_signal.next().await;
            for d in dests {
                spawn_destination(&fed, &running, d);
            }
        }
    });
}

/// Runs a destination's queue unless it already runs (its task then picks up the new rows).
fn spawn_destination(fed: &Arc<Federation>, running: &Arc<Mutex<HashSet<String>>>, dest: String) {
    {
        let mut r = running.lock().unwrap_or_else(|e| e.into_inner());
        if r.contains(&dest) {
            if let Some(n) = NUDGES.lock().unwrap_or_else(|e| e.into_inner()).get(&dest) {
                n.notify_one();
            }
            return;
        }
        r.insert(dest.clone());
    }
    let fed = fed.clone();
    let running = running.clone();
    tokio::spawn(async move {
        let nudge = Arc::new(tokio::sync::Notify::new());
        NUDGES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(dest.clone(), nudge.clone());
        drain(&fed, &dest, &nudge).await;
        NUDGES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&dest);
        running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&dest);
        // Rows queued while stopping are picked up by the next signal; check once more.
        if let Ok(next) = fed.server.store.outbox_next(&dest, 1, 1).await {
            if !next.is_empty() {
                fed.server.outbox_signal.wake(vec![dest]);
            }
        }
    });
}

static NUDGES: std::sync::LazyLock<
    Mutex<std::collections::HashMap<String, Arc<tokio::sync::Notify>>>,
> = std::sync::LazyLock::new(Default::default);

/// Sends a destination's queue until it is empty.
async fn drain(fed: &Federation, dest: &str, nudge: &tokio::sync::Notify) {
    let server = &fed.server;
    let Ok(dest_name) = OwnedServerName::try_from(dest) else {
        tracing::warn!(
            destination = dest,
            "dropping the outbox of an invalid server name"
        );
        if let Ok(rows) = server
            .store
            .outbox_next(dest, usize::MAX / 4, usize::MAX / 4)
            .await
        {
            let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
            let _ = server.store.outbox_delete(dest, &ids).await;
        }
        return;
    };
    loop {
        if server
            .shutting_down
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        let (failures, retry_at) = server
            .store
            .destination_backoff(dest)
            .await
            .unwrap_or((0, 0));
        let wait = retry_at - now_ms();
        if wait > 0 {
            // A nudge (new rows) does not cut the back-off short.
            tokio::time::sleep(Duration::from_millis(wait as u64)).await;
        }
        let rows = match server.store.outbox_next(dest, MAX_PDUS, MAX_EDUS).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(destination = dest, error = %e, "reading the outbox");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if rows.is_empty() {
            // Wait briefly for more before ending the task.
            let more = tokio::time::timeout(Duration::from_secs(30), nudge.notified()).await;
            if more.is_err() {
                return;
            }
            continue;
        }
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let txn_id = format!("{}-{}", ids[0], ids[ids.len() - 1]);
        let body = match transaction_body(server, &rows).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(destination = dest, error = %e, "building a transaction");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let path = format!("/_matrix/federation/v1/send/{txn_id}");
        match fed
            .client
            .request(&dest_name, http::Method::PUT, &path, Some(&body))
            .await
        {
            Ok(resp) => {
                log_refusals(dest, &resp);
                if let Err(e) = server.store.outbox_delete(dest, &ids).await {
                    tracing::warn!(destination = dest, error = %e, "clearing the outbox");
                }
                if failures > 0 {
                    let _ = server.store.set_destination_backoff(dest, 0, 0).await;
                }
            }
            Err(e) => {
                let failures = failures + 1;
                let backoff = myelin_core::retry::backoff_ms(failures);
                tracing::info!(destination = dest, error = %e, failures, backoff_ms = backoff, "transaction failed; backing off");
                let _ = server
                    .store
                    .set_destination_backoff(dest, failures, now_ms() + backoff)
                    .await;
            }
        }
    }
}

async fn transaction_body(
    server: &Server,
    rows: &[myelin_core::store::OutboxRow],
) -> myelin_core::Result<Value> {
    let nids: Vec<i64> = rows.iter().filter_map(|r| r.event_nid).collect();
    let events = server.events(&nids).await?;
    let pdus: Vec<Value> = events
        .iter()
        .map(|e| serde_json::from_str(e.pdu.json.get()).unwrap_or(Value::Null))
        .collect();
    let edus: Vec<Value> = rows
        .iter()
        .filter_map(|r| r.edu.as_deref())
        .filter_map(|e| serde_json::from_str(e).ok())
        .collect();
    Ok(json!({
        "origin": server.server_name(),
        "origin_server_ts": now_ms(),
        "pdus": pdus,
        "edus": edus,
    }))
}

fn log_refusals(dest: &str, resp: &Value) {
    if let Some(results) = resp.get("pdus").and_then(Value::as_object) {
        for (id, r) in results {
            if let Some(err) = r.get("error") {
                tracing::info!(destination = dest, event = %id, error = %err, "peer refused an event");
            }
        }
    }
}
