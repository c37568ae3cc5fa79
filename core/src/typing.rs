//! Typing notifications (spec § "Typing Notifications"; federation § "Typing Notifications"):
//! who is typing in each room, in memory only.
//!
//! A user types until their timeout (at most [`MAX_TYPING_MS`]; other servers' users for
//! [`REMOTE_TYPING_MS`], since `m.typing` EDUs carry none) or until they say they stopped.
//! Every change of a room's set — a start, a stop or an expiry — takes a position on the typing
//! stream and wakes the room's members; a sync reports the rooms whose set changed after its
//! token. One task expires typing notices at their deadlines (a `BTreeSet` ordered by time), so
//! nothing scans the rooms.
//!
//! The stream is not persisted: it starts at the Unix time in milliseconds when the process
//! starts, so it begins above every position handed out by an earlier run (unless that run
//! averaged more than one change per millisecond). A token ahead of the stream anyway is
//! treated like no token for typing: the rooms where someone types now are reported.
//!
//! Typing EDUs for other servers go through the durable federation outbox, like every EDU: one
//! path, and they share transactions with the room's events. A notice that waits out a long
//! back-off is stale when it arrives; the receiver's own timeout (30 s) ends it.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use serde_json::{json, Value};
use tokio::time::Instant;

use crate::{filter::EventFilter, server::RoomInfo, Error, Result, Server};

/// The longest a client's typing notice lasts without being renewed.
pub const MAX_TYPING_MS: u64 = 30_000;
/// How long another server's user counts as typing after its `m.typing` EDU.
pub const REMOTE_TYPING_MS: u64 = 30_000;

/// Who types where.
#[derive(Default)]
pub struct Typing {
    inner: Mutex<Inner>,
    /// Wakes the expiry task when an earlier deadline is added.
    timer: Arc<tokio::sync::Notify>,
}

#[derive(Default)]
struct Inner {
    rooms: HashMap<String, RoomTyping>,
    /// `(expiry, room ID, user ID)` of every typing user.
    deadlines: BTreeSet<(Instant, String, String)>,
}

struct RoomTyping {
    room_nid: i64,
    /// Typing user → when it ends.
    users: HashMap<String, Instant>,
    /// The typing-stream position of the latest change.
    changed: i64,
}

/// One change to report: the room and whether a local user's EDU is to be sent.
struct Changed {
    room_nid: i64,
    room_id: String,
    user_id: String,
    typing: bool,
}

impl Typing {
    /// Sets (`Some(expiry)`) or clears `user`'s typing in a room; answers whether the room's
    /// set changed (a renewal changes nothing anyone sees).
    fn apply(
        &self,
        server: &Server,
        room_nid: i64,
        room_id: &str,
        user: &str,
        until: Option<Instant>,
    ) -> bool {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *g;
        let room = inner
            .rooms
            .entry(room_id.to_owned())
            .or_insert_with(|| RoomTyping {
                room_nid,
                users: HashMap::new(),
                changed: 0,
            });
        let previous = match until {
            Some(t) => room.users.insert(user.to_owned(), t),
            None => room.users.remove(user),
        };
        if let Some(p) = previous {
            inner
                .deadlines
                .remove(&(p, room_id.to_owned(), user.to_owned()));
        }
        let mut earliest = false;
        if let Some(t) = until {
            earliest = inner
                .deadlines
                .first()
                .is_none_or(|(first, _, _)| t < *first);
            inner
                .deadlines
                .insert((t, room_id.to_owned(), user.to_owned()));
        }
        let changed = previous.is_some() != until.is_some();
        if changed {
            let pos = server.typing_stream.allocate(1);
            room.changed = pos[0];
            server.typing_stream.complete(&pos);
        }
        drop(g);
        if earliest {
            self.timer.notify_one();
        }
        changed
    }

    /// Removes the notices whose time is up; answers the changes.
    fn expire(&self, server: &Server, now: Instant) -> Vec<Changed> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *g;
        let mut out = Vec::new();
        while let Some((t, _, _)) = inner.deadlines.first() {
            if *t > now {
                break;
            }
            let Some((_, room_id, user_id)) = inner.deadlines.pop_first() else {
                break;
            };
            if let Some(room) = inner.rooms.get_mut(&room_id) {
                if room.users.remove(&user_id).is_some() {
                    let pos = server.typing_stream.allocate(1);
                    room.changed = pos[0];
                    server.typing_stream.complete(&pos);
                    out.push(Changed {
                        room_nid: room.room_nid,
                        room_id,
                        user_id,
                        typing: false,
                    });
                }
            }
        }
        out
    }

    fn next_deadline(&self) -> Option<Instant> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.deadlines.first().map(|(t, _, _)| *t)
    }
}

/// Starts the task that expires typing notices.
pub fn start(server: &Arc<Server>) {
    let weak = Arc::downgrade(server);
    tokio::spawn(expiry_task(weak));
}

async fn expiry_task(weak: Weak<Server>) {
    loop {
        let Some(server) = weak.upgrade() else {
            return;
        };
        let next = server.typing.next_deadline();
        let timer = server.typing.timer.clone();
        // Do not hold the server while sleeping (it would never be dropped). A notification
        // sent meanwhile is kept as a permit.
        drop(server);
        let notified = timer.notified();
        match next {
            Some(t) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(t) => {}
                    _ = notified => continue,
                }
            }
            None => {
                // Re-check now and then that the server is still there.
                let _ = tokio::time::timeout(Duration::from_secs(60), notified).await;
                continue;
            }
        }
        let Some(server) = weak.upgrade() else {
            return;
        };
        for c in server.typing.expire(&server, Instant::now()) {
            server.typing_changed(c).await;
        }
    }
}

impl Server {
    /// `PUT /rooms/{roomId}/typing/{userId}` for `user` (already checked to be the caller):
    /// typing for `timeout_ms` (capped) or stopped. The user must be joined.
    pub async fn set_typing(
        &self,
        room: &RoomInfo,
        user: &str,
        typing: bool,
        timeout_ms: Option<u64>,
    ) -> Result<()> {
        if self.members(room.nid).await?.get(user).map(String::as_str) != Some("join") {
            return Err(Error::forbidden("You are not joined to this room"));
        }
        self.presence.active(user);
        let ms = timeout_ms.unwrap_or(MAX_TYPING_MS).clamp(1, MAX_TYPING_MS);
        let until = typing.then(|| Instant::now() + Duration::from_millis(ms));
        let room_id = room.room_id.as_str();
        if self.typing.apply(self, room.nid, room_id, user, until) {
            self.typing_changed(Changed {
                room_nid: room.nid,
                room_id: room_id.to_owned(),
                user_id: user.to_owned(),
                typing,
            })
            .await;
        }
        Ok(())
    }

    /// An `m.typing` EDU from `origin`: its user must be of `origin` and joined to the room.
    pub async fn receive_typing(&self, origin: &str, content: &Value) -> Result<()> {
        let (Some(room_id), Some(user_id), Some(typing)) = (
            content.get("room_id").and_then(Value::as_str),
            content.get("user_id").and_then(Value::as_str),
            content.get("typing").and_then(Value::as_bool),
        ) else {
            return Err(Error::bad_json("m.typing lacks room_id, user_id or typing"));
        };
        let user = ruma::UserId::parse(user_id)
            .map_err(|_| Error::bad_json("m.typing: invalid user_id"))?;
        if user.server_name().as_str() != origin {
            return Err(Error::forbidden("m.typing about a user of another server"));
        }
        let room_id = ruma::RoomId::parse(room_id)
            .map_err(|_| Error::bad_json("m.typing: invalid room_id"))?;
        let Some(room) = self.room(&room_id).await? else {
            return Err(Error::not_found("m.typing for an unknown room"));
        };
        if self
            .members(room.nid)
            .await?
            .get(user_id)
            .map(String::as_str)
            != Some("join")
        {
            return Err(Error::forbidden(
                "m.typing from a user not joined to the room",
            ));
        }
        let until = typing.then(|| Instant::now() + Duration::from_millis(REMOTE_TYPING_MS));
        if self
            .typing
            .apply(self, room.nid, room.room_id.as_str(), user_id, until)
        {
            self.typing_changed(Changed {
                room_nid: room.nid,
                room_id: room.room_id.to_string(),
                user_id: user_id.to_owned(),
                typing,
            })
            .await;
        }
        Ok(())
    }

    /// After a change: wakes the room's members; a local user's change goes to the other
    /// servers in the room.
    async fn typing_changed(&self, c: Changed) {
        match self.members(c.room_nid).await {
            Ok(m) => self.notifier.wake(m.keys().map(String::as_str)),
            Err(e) => tracing::warn!(error = %e, "loading members to wake for typing"),
        }
        if !self.is_local_user(&c.user_id) {
            return;
        }
        let servers = match self.room_servers(c.room_nid).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "room servers for a typing EDU");
                return;
            }
        };
        if servers.is_empty() {
            return;
        }
        let edu = json!({
            "edu_type": "m.typing",
            "content": {"room_id": c.room_id, "user_id": c.user_id, "typing": c.typing},
        })
        .to_string();
        let edus: Vec<(String, String)> =
            servers.iter().map(|s| (s.clone(), edu.clone())).collect();
        let queued = async {
            let mut w = self.store.write().await?;
            w.queue_edus(&edus).await?;
            w.commit().await
        }
        .await;
        match queued {
            Ok(()) => self.outbox_signal.wake(servers.to_vec()),
            Err(e) => tracing::warn!(error = %e, "queueing a typing EDU"),
        }
    }

    /// The `m.typing` event a sync between typing positions `since` (`None`: initial) and
    /// `now` reports for a joined room, if the filter lets it through.
    pub fn typing_for_sync(
        &self,
        room_id: &str,
        since: Option<i64>,
        now: i64,
        filter: &EventFilter,
    ) -> Option<Value> {
        if !ephemeral_allows(filter, room_id, "m.typing") {
            return None;
        }
        let since = since.filter(|s| *s <= now).unwrap_or(0);
        let g = self.typing.inner.lock().unwrap_or_else(|e| e.into_inner());
        let room = g.rooms.get(room_id)?;
        // A change after `now` is reported again, with the set then current, by the next
        // sync; showing the newer set already is harmless.
        let report = if since == 0 {
            !room.users.is_empty()
        } else {
            room.changed > since
        };
        if !report {
            return None;
        }
        let mut users: Vec<&String> = room.users.keys().collect();
        users.sort();
        Some(json!({"type": "m.typing", "content": {"user_ids": users}}))
    }
}

/// Whether a room's ephemeral filter lets events of `event_type` through.
pub fn ephemeral_allows(f: &EventFilter, room_id: &str, event_type: &str) -> bool {
    f.allows_room(room_id) && type_allowed(f, event_type)
}

/// Whether a filter's `types` and `not_types` let `event_type` through.
pub fn type_allowed(f: &EventFilter, event_type: &str) -> bool {
    !f.not_types
        .iter()
        .any(|t| crate::filter::glob(t, event_type))
        && f.types
            .as_ref()
            .is_none_or(|ts| ts.iter().any(|t| crate::filter::glob(t, event_type)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ephemeral_filter() {
        let f: EventFilter = serde_json::from_value(json!({"types": ["m.receipt"]})).unwrap();
        assert!(!ephemeral_allows(&f, "!a:x", "m.typing"));
        let f: EventFilter = serde_json::from_value(json!({"not_rooms": ["!a:x"]})).unwrap();
        assert!(!ephemeral_allows(&f, "!a:x", "m.typing"));
        assert!(ephemeral_allows(&f, "!b:x", "m.typing"));
        assert!(ephemeral_allows(
            &EventFilter::default(),
            "!b:x",
            "m.typing"
        ));
    }
}
