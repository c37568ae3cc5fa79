//! Receipts (spec § "Receipts"): `m.read` and `m.read.private`, unthreaded or threaded, from
//! our users and from other servers' (`m.receipt` EDUs); delivered in `/sync` as `m.receipt`
//! ephemeral events.
//!
//! Every receipt gets a position on the receipts stream and is written with its EDUs in one
//! transaction. An in-memory index holds each room's latest receipts position (loaded at
//! start-up), so a sync asks the database only for rooms whose receipts moved.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use ruma::{EventId, RoomId, UserId};
use serde_json::{json, Map, Value};

use crate::{
    server::RoomInfo,
    store::{now_ms, ReceiptRow, ReceiptWrite},
    Error, Result, Server,
};

/// The receipt types a client may send through `/receipt`.
pub const READ: &str = "m.read";
pub const READ_PRIVATE: &str = "m.read.private";
pub const FULLY_READ: &str = "m.fully_read";

/// Each room's latest receipts-stream position.
#[derive(Default)]
pub struct ReceiptIndex {
    rooms: RwLock<HashMap<String, i64>>,
}

impl ReceiptIndex {
    /// From the positions stored.
    pub fn new(positions: Vec<(String, i64)>) -> Self {
        ReceiptIndex {
            rooms: RwLock::new(positions.into_iter().collect()),
        }
    }

    fn moved(&self, room_id: &str, position: i64) {
        let mut rooms = self.rooms.write().unwrap_or_else(|e| e.into_inner());
        let p = rooms.entry(room_id.to_owned()).or_insert(0);
        *p = (*p).max(position);
    }

    /// The room's latest receipts position (0 when it has none).
    pub fn position(&self, room_id: &str) -> i64 {
        self.rooms
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(room_id)
            .copied()
            .unwrap_or(0)
    }
}

/// A receipt to record.
pub struct NewReceipt<'a> {
    pub room_id: &'a RoomId,
    pub receipt_type: &'a str,
    pub user_id: &'a str,
    pub event_id: &'a str,
    /// `None`: unthreaded; `main` or a thread root's event ID.
    pub thread_id: Option<&'a str>,
    pub ts: i64,
}

/// A receipt's `thread_id`: absent, or `main`, or an event ID.
pub fn check_thread_id(thread_id: Option<&Value>) -> Result<Option<String>> {
    match thread_id {
        None => Ok(None),
        Some(Value::String(t)) if t == "main" || EventId::parse(t.as_str()).is_ok() => {
            Ok(Some(t.clone()))
        }
        Some(_) => Err(Error::invalid_param(
            "thread_id must be \"main\" or the event ID of a thread root",
        )),
    }
}

impl Server {
    /// A local user's receipt, sent through `/receipt` or `/read_markers`. The user must be
    /// joined and the event in the room's timeline. A receipt behind the one held for the same
    /// type and thread changes nothing.
    pub async fn post_receipt(&self, r: NewReceipt<'_>) -> Result<()> {
        if r.receipt_type != READ && r.receipt_type != READ_PRIVATE {
            return Err(Error::invalid_param(format!(
                "Unknown receipt type {}",
                r.receipt_type
            )));
        }
        let (room, members, event_stream) = self
            .joined_and_in_timeline(r.user_id, r.room_id, r.event_id)
            .await?;
        let mut data = json!({ "ts": r.ts });
        if let Some(t) = r.thread_id {
            data["thread_id"] = json!(t);
        }
        let data = data.to_string();
        let public = r.receipt_type == READ;
        let dests: Vec<String> = if public {
            self.room_servers(room.nid).await?.to_vec()
        } else {
            vec![]
        };
        let edus: Vec<(String, String)> = if dests.is_empty() {
            vec![]
        } else {
            let mut receipt = json!({ "event_ids": [r.event_id], "data": { "ts": r.ts } });
            if let Some(t) = r.thread_id {
                receipt["data"]["thread_id"] = json!(t);
            }
            let edu = json!({
                "edu_type": "m.receipt",
                "content": { r.room_id.as_str(): { READ: { r.user_id: receipt } } },
            })
            .to_string();
            dests.iter().map(|d| (d.clone(), edu.clone())).collect()
        };

        let pos = self.receipt_stream.allocate(1);
        let written = async {
            let mut w = self.store.write().await?;
            let written = w
                .put_receipt(
                    &ReceiptWrite {
                        room_id: r.room_id.as_str(),
                        receipt_type: r.receipt_type,
                        user_id: r.user_id,
                        thread_id: r.thread_id.unwrap_or(""),
                        event_id: r.event_id,
                        event_stream,
                        data: &data,
                        stream_id: pos[0],
                    },
                    true,
                )
                .await?;
            if written {
                w.queue_edus(&edus).await?;
            }
            w.commit().await?;
            Ok::<_, Error>(written)
        }
        .await;
        let written = match written {
            Ok(w) => w,
            Err(e) => {
                self.receipt_stream.complete(&pos);
                return Err(e);
            }
        };
        if written {
            self.receipts.moved(r.room_id.as_str(), pos[0]);
            self.unread.forget(room.nid, r.user_id);
        }
        self.receipt_stream.complete(&pos);
        if written {
            if public {
                self.wake_local_members(&members);
                self.outbox_signal.wake(dests);
            } else {
                self.wake_user(r.user_id);
            }
        }
        self.presence.active(r.user_id);
        Ok(())
    }

    /// Checks that `user_id` may mark `event_id` as read (or fully read): they are joined to
    /// the room and the event is in its timeline.
    pub async fn check_receipt_target(
        &self,
        user_id: &str,
        room_id: &RoomId,
        event_id: &str,
    ) -> Result<()> {
        self.joined_and_in_timeline(user_id, room_id, event_id)
            .await
            .map(|_| ())
    }

    /// The room, its members and the event's stream position, when `user_id` is joined and
    /// the event is in the room's timeline.
    async fn joined_and_in_timeline(
        &self,
        user_id: &str,
        room_id: &RoomId,
        event_id: &str,
    ) -> Result<(Arc<RoomInfo>, Arc<HashMap<String, String>>, i64)> {
        let not_joined = || Error::forbidden("You are not in this room");
        let room = self.room(room_id).await?.ok_or_else(not_joined)?;
        let members = self.members(room.nid).await?;
        if members.get(user_id).map(String::as_str) != Some("join") {
            return Err(not_joined());
        }
        let not_found = || Error::not_found("Event not found in this room");
        let id = EventId::parse(event_id).map_err(|_| Error::invalid_param("Invalid event ID"))?;
        let ev = self.event_by_id(&id).await?.ok_or_else(not_found)?;
        if ev.room_nid != room.nid || ev.rejected || ev.outlier {
            return Err(not_found());
        }
        let stream = ev.stream_ordering.ok_or_else(not_found)?;
        Ok((room, members, stream))
    }

    fn wake_local_members(&self, members: &HashMap<String, String>) {
        self.notifier.wake(
            members
                .iter()
                .filter(|(u, m)| m.as_str() == "join" && self.is_local_user(u))
                .map(|(u, _)| u.as_str()),
        );
    }

    /// The `m.receipt` EDU of another server: `m.read` receipts of its users who are joined
    /// to the rooms named. Receipts we cannot use (other servers' users, rooms they are not
    /// in, malformed entries) are skipped; the usable ones are written in one transaction.
    pub async fn receive_receipts(&self, origin: &str, content: &Value) -> Result<()> {
        let rooms = content
            .as_object()
            .ok_or_else(|| Error::bad_json("m.receipt content must be an object"))?;
        let mut accepted: Vec<(String, String, String, Option<String>, i64, i64)> = Vec::new();
        let mut wake_rooms = Vec::new();
        for (room_id, by_type) in rooms {
            let Ok(rid) = RoomId::parse(room_id.as_str()) else {
                continue;
            };
            let Some(room) = self.room(&rid).await? else {
                continue;
            };
            let Some(users) = by_type.get(READ).and_then(Value::as_object) else {
                continue;
            };
            let members = self.members(room.nid).await?;
            let mut any = false;
            for (user_id, receipt) in users {
                let from_origin = UserId::parse(user_id.as_str())
                    .is_ok_and(|u| u.server_name().as_str() == origin);
                if !from_origin || members.get(user_id).map(String::as_str) != Some("join") {
                    continue;
                }
                let Some(event_id) = receipt
                    .get("event_ids")
                    .and_then(Value::as_array)
                    .and_then(|ids| ids.first())
                    .and_then(Value::as_str)
                    .filter(|id| EventId::parse(*id).is_ok())
                else {
                    continue;
                };
                let data = receipt.get("data");
                let ts = data
                    .and_then(|d| d.get("ts"))
                    .and_then(Value::as_i64)
                    .unwrap_or_else(now_ms);
                let Ok(thread) = check_thread_id(data.and_then(|d| d.get("thread_id"))) else {
                    continue;
                };
                let event_stream = match EventId::parse(event_id) {
                    Ok(id) => match self.event_by_id(&id).await? {
                        Some(ev) if ev.room_nid == room.nid => ev.stream_ordering.unwrap_or(0),
                        _ => 0,
                    },
                    Err(_) => 0,
                };
                accepted.push((
                    room_id.clone(),
                    user_id.clone(),
                    event_id.to_owned(),
                    thread,
                    ts,
                    event_stream,
                ));
                any = true;
            }
            if any {
                wake_rooms.push((room_id.clone(), members));
            }
        }
        if accepted.is_empty() {
            return Ok(());
        }
        let pos = self.receipt_stream.allocate(accepted.len());
        let res = async {
            let mut w = self.store.write().await?;
            for (i, (room_id, user_id, event_id, thread, ts, event_stream)) in
                accepted.iter().enumerate()
            {
                let mut data = json!({ "ts": ts });
                if let Some(t) = thread {
                    data["thread_id"] = json!(t);
                }
                w.put_receipt(
                    &ReceiptWrite {
                        room_id,
                        receipt_type: READ,
                        user_id,
                        thread_id: thread.as_deref().unwrap_or(""),
                        event_id,
                        event_stream: *event_stream,
                        data: &data.to_string(),
                        stream_id: pos[i],
                    },
                    false,
                )
                .await?;
            }
            w.commit().await
        }
        .await;
        if res.is_ok() {
            for (i, (room_id, ..)) in accepted.iter().enumerate() {
                self.receipts.moved(room_id, pos[i]);
            }
        }
        self.receipt_stream.complete(&pos);
        res?;
        for (_, members) in &wake_rooms {
            self.wake_local_members(members);
        }
        Ok(())
    }

    /// The `m.receipt` event of a room for `user_id`: the receipts with a position in
    /// `(since, now]` (`since` None: all of them), without other users' private receipts.
    /// None when there is nothing to report.
    pub async fn room_receipts_event(
        &self,
        user_id: &str,
        room_id: &str,
        since: Option<i64>,
        now: i64,
    ) -> Result<Option<Value>> {
        let after = since.unwrap_or(0);
        if self.receipts.position(room_id) <= after {
            return Ok(None);
        }
        let rows = self.store.room_receipts(room_id, after, now).await?;
        Ok(receipt_event(user_id, &rows))
    }

    /// `room_receipts_event` for several rooms: room ID → `m.receipt` event.
    pub async fn receipts_for_rooms(
        &self,
        user_id: &str,
        rooms: &HashSet<String>,
        since: Option<i64>,
        now: i64,
    ) -> Result<HashMap<String, Value>> {
        let mut out = HashMap::new();
        for room_id in rooms {
            if let Some(ev) = self
                .room_receipts_event(user_id, room_id, since, now)
                .await?
            {
                out.insert(room_id.clone(), ev);
            }
        }
        Ok(out)
    }

    /// Whether a room's receipts moved past `since` (so a sync must look at it).
    pub fn receipts_moved(&self, room_id: &str, since: i64) -> bool {
        self.receipts.position(room_id) > since
    }
}

/// Rows as one `m.receipt` event seen by `user_id` (None when empty): `{event_id: {type:
/// {user_id: data}}}`, later rows replacing earlier ones.
fn receipt_event(user_id: &str, rows: &[ReceiptRow]) -> Option<Value> {
    let mut content: Map<String, Value> = Map::new();
    for row in rows {
        if row.receipt_type == READ_PRIVATE && row.user_id != user_id {
            continue;
        }
        let data: Value = serde_json::from_str(&row.data).unwrap_or_else(|_| json!({}));
        let by_type = content
            .entry(row.event_id.clone())
            .or_insert_with(|| json!({}));
        if let Some(m) = by_type.as_object_mut() {
            let users = m
                .entry(row.receipt_type.clone())
                .or_insert_with(|| json!({}));
            users[row.user_id.as_str()] = data;
        }
    }
    if content.is_empty() {
        return None;
    }
    Some(json!({ "type": "m.receipt", "content": content }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(ty: &str, user: &str, event: &str, stream: i64) -> ReceiptRow {
        ReceiptRow {
            room_id: "!r:hs".into(),
            receipt_type: ty.into(),
            user_id: user.into(),
            event_id: event.into(),
            data: json!({"ts": stream}).to_string(),
            stream_id: stream,
        }
    }

    #[test]
    fn private_receipts_are_seen_only_by_their_owner() {
        let rows = [
            row(READ, "@a:hs", "$1", 1),
            row(READ_PRIVATE, "@b:hs", "$2", 2),
        ];
        let for_a = receipt_event("@a:hs", &rows).unwrap();
        assert!(for_a["content"]["$2"].is_null(), "{for_a}");
        assert_eq!(for_a["content"]["$1"][READ]["@a:hs"]["ts"], 1);
        let for_b = receipt_event("@b:hs", &rows).unwrap();
        assert_eq!(for_b["content"]["$2"][READ_PRIVATE]["@b:hs"]["ts"], 2);
        assert!(receipt_event("@c:hs", &rows[1..]).is_none());
    }

    #[test]
    fn thread_ids_are_main_or_event_ids() {
        assert_eq!(check_thread_id(None).unwrap(), None);
        assert_eq!(
            check_thread_id(Some(&json!("main"))).unwrap().as_deref(),
            Some("main")
        );
        assert!(check_thread_id(Some(&json!("$root"))).is_ok());
        for bad in [json!(""), json!("thread"), json!(3), json!(null)] {
            assert!(check_thread_id(Some(&bad)).is_err(), "{bad}");
        }
    }
}
