//! `/sync` (spec § "Syncing"): initial and incremental sync of one device, long-polling on the
//! notifier. One function serves every sync transport.
//!
//! A sync between tokens `since` and `now` looks only at rooms whose latest position moved past
//! `since` (known in memory), so an idle poll costs no query. Every change after `since` is
//! returned exactly once: the response's `next_batch` is `now`, and everything at or below `now`
//! was committed before `now` was read.

use std::{collections::HashMap, sync::Arc, time::Duration};

use ruma::events::TimelineEventType;
use serde_json::{json, Map, Value};

use crate::{
    filter::Filter,
    server::{RoomInfo, StoredEvent},
    state::StateMap,
    store::MembershipRow,
    token::{PageToken, SyncToken},
    Result, Server,
};

/// Parameters of one sync request.
pub struct SyncRequest {
    pub user_id: String,
    pub device_id: String,
    pub since: Option<SyncToken>,
    pub full_state: bool,
    pub filter: Filter,
    pub use_state_after: bool,
    pub timeout: Duration,
    /// `set_presence` of the request (`online`, `unavailable`, `offline`); `None` = `online`.
    pub set_presence: Option<String>,
    /// Whether the request itself counts its device as syncing while it runs (`GET /sync`).
    /// A WebSocket stream does not: its socket holds the device's presence guard, which
    /// `ping` frames update.
    pub holds_presence: bool,
    /// To-device messages up to this position are acknowledged (deleted) before the batch is
    /// read. `GET /sync` passes `since`'s position (the spec's rule); the WebSocket stream
    /// passes only what the client acknowledged, since it computes batches from the last one
    /// *sent*, which the client may not have processed.
    pub ack_to_device: Option<i64>,
}

const DEFAULT_TIMELINE_LIMIT: i64 = 10;
const MAX_TIMELINE_LIMIT: i64 = 500;

/// A room's sync window read ahead of `room_sync`.
pub(crate) enum Window {
    /// Every event of the window, oldest first (from the recent-events buffer).
    All(Vec<Arc<StoredEvent>>),
    /// The first page, newest first (from the batched query).
    FirstPage(Vec<crate::store::EventRow>),
}

/// A room's timeline window, read by [`Server::timeline_slice`].
pub(crate) struct TimelineSlice {
    pub events: Vec<Arc<StoredEvent>>,
    pub limited: bool,
    pub first_before: Option<i64>,
}

/// The timeline limit a filter asks for (default 10).
fn timeline_limit(filter: &Filter) -> i64 {
    filter
        .room
        .timeline
        .limit
        .map(|l| l as i64)
        .unwrap_or(DEFAULT_TIMELINE_LIMIT)
        .clamp(1, MAX_TIMELINE_LIMIT)
}

impl Server {
    /// The positions of every stream now.
    pub fn current_token(&self) -> SyncToken {
        SyncToken {
            events: self.events_stream.current(),
            account_data: self.account_data_stream.current(),
            to_device: self.to_device_stream.current(),
            device_lists: self.device_list_stream.current(),
            receipts: self.receipt_stream.current(),
            typing: self.typing_stream.current(),
            presence: self.presence_stream.current(),
        }
    }

    /// Runs one sync, waiting up to `timeout` for something to report. The computation is
    /// boxed so that a waiting poll holds only its small wait state, not the (large) future of
    /// a sync computation.
    pub async fn sync(&self, req: &SyncRequest) -> Result<Value> {
        self.sync_batch(req).await.map(|(body, _)| body)
    }

    /// [`Server::sync`], also telling whether the batch is empty (nothing to report since
    /// `since`): a stream transport sends only non-empty batches after the first.
    pub async fn sync_batch(&self, req: &SyncRequest) -> Result<(Value, bool)> {
        crate::presence::check_set_presence(req.set_presence.as_deref())?;
        // The device counts as syncing while this request runs (and for a grace period).
        let _syncing = req.holds_presence.then(|| {
            self.presence
                .syncing(&req.user_id, &req.device_id, req.set_presence.as_deref())
        });
        let mut wake = self.notifier.subscribe(&req.user_id);
        wake.borrow_and_update();
        let deadline = tokio::time::Instant::now() + req.timeout;
        loop {
            let now = self.current_token();
            let stopping = self
                .shutting_down
                .load(std::sync::atomic::Ordering::Relaxed);
            let unchanged = req.since.is_some_and(|s| s.covers(&now));
            if !unchanged || req.full_state || req.timeout.is_zero() || stopping {
                let (body, empty) = Box::pin(self.compute_sync(req, now)).await?;
                if !empty
                    || req.since.is_none()
                    || req.full_state
                    || stopping
                    || tokio::time::Instant::now() >= deadline
                {
                    return Ok((body, empty));
                }
            }
            match tokio::time::timeout_at(deadline, wake.changed()).await {
                Ok(Ok(())) => {
                    wake.borrow_and_update();
                }
                _ => {
                    let now = self.current_token();
                    return Box::pin(self.compute_sync(req, now)).await;
                }
            }
        }
    }

    /// A joined room's ephemeral events for the sync: receipts (and typing) that moved past
    /// `since`, or all of them when the room is reported in full.
    async fn room_ephemeral(
        &self,
        req: &SyncRequest,
        room_id: &str,
        since: SyncToken,
        now: SyncToken,
        full: bool,
    ) -> Result<Vec<Value>> {
        let filter = &req.filter.room.ephemeral;
        let mut events = Vec::new();
        if !filter.allows_room(room_id) {
            return Ok(events);
        }
        if filter.allows_type_sender("m.receipt", "") {
            let since = (!full).then_some(since.receipts);
            if let Some(ev) = self
                .room_receipts_event(&req.user_id, room_id, since, now.receipts)
                .await?
            {
                events.push(ev);
            }
        }
        Ok(events)
    }

    async fn compute_sync(&self, req: &SyncRequest, now: SyncToken) -> Result<(Value, bool)> {
        let since = req.since.unwrap_or_default();
        let initial = req.since.is_none();
        let mut join = Map::new();
        let mut invite = Map::new();
        let mut leave = Map::new();
        let mut knock = Map::new();

        // Account data changed in the window.
        let ad = if initial || since.account_data < now.account_data {
            self.store
                .account_data_since(&req.user_id, since.account_data, now.account_data)
                .await?
        } else {
            vec![]
        };
        let mut global_ad = Vec::new();
        let mut room_ad: HashMap<String, Vec<Value>> = HashMap::new();
        for row in ad {
            let content: Value = serde_json::from_str(&row.content).unwrap_or(json!({}));
            let ev = json!({"type": row.data_type, "content": content});
            if row.room_id.is_empty() {
                if req
                    .filter
                    .account_data
                    .allows_type_sender(&row.data_type, "")
                {
                    global_ad.push(ev);
                }
            } else if req
                .filter
                .room
                .account_data
                .allows_type_sender(&row.data_type, "")
            {
                room_ad.entry(row.room_id).or_default().push(ev);
            }
        }

        let memberships = self.user_memberships(&req.user_id).await?;
        // The newest events of every joined room that will be reported: from memory where the
        // recent-events buffer covers the window, the others' first pages in one query.
        let tf_limit = timeline_limit(&req.filter);
        let mut windows: HashMap<i64, Window> = HashMap::new();
        let mut to_read: Vec<(i64, i64)> = Vec::new();
        for m in memberships.iter() {
            let reported = m.membership == "join"
                && m.stream_ordering <= now.events
                && (initial
                    || req.full_state
                    || m.stream_ordering > since.events
                    || self.room_position(m.room_nid) > since.events);
            if !reported {
                continue;
            }
            let from = if m.stream_ordering > since.events {
                0
            } else {
                since.events
            };
            match self.recent_events(m.room_nid, from, now.events) {
                Some(events) => {
                    windows.insert(m.room_nid, Window::All(events));
                }
                None => to_read.push((m.room_nid, from)),
            }
        }
        if to_read.len() > 1 {
            let rows = self
                .store
                .rooms_events_stream_desc(&to_read, now.events, (tf_limit + 1) * 2)
                .await?;
            for (room, _) in &to_read {
                windows.insert(*room, Window::FirstPage(Vec::new()));
            }
            for row in rows {
                if let Some(Window::FirstPage(page)) = windows.get_mut(&row.room_nid) {
                    page.push(row);
                }
            }
        }
        for m in memberships.iter().cloned() {
            if m.stream_ordering > now.events {
                // Committed after `now` was read: the next sync reports it.
                continue;
            }
            let room = self.room_by_nid(m.room_nid).await?;
            let rid = room.room_id.to_string();
            if !req.filter.room.allows_room(&rid) {
                continue;
            }
            let changed = self.room_position(room.nid) > since.events;
            let ad_here = room_ad.remove(&rid).unwrap_or_default();
            match m.membership.as_str() {
                "join" => {
                    let newly = m.stream_ordering > since.events;
                    let mut ephemeral = self
                        .room_ephemeral(req, &rid, since, now, initial || newly || req.full_state)
                        .await?;
                    let typing_since = (!(initial || newly)).then_some(since.typing);
                    ephemeral.extend(self.typing_for_sync(
                        &rid,
                        typing_since,
                        now.typing,
                        &req.filter.room.ephemeral,
                    ));
                    if !(initial
                        || req.full_state
                        || changed
                        || !ad_here.is_empty()
                        || !ephemeral.is_empty())
                    {
                        continue;
                    }
                    let from = if newly { 0 } else { since.events };
                    let mut body = self
                        .room_sync(
                            req,
                            &room,
                            (from, now.events),
                            initial || newly || req.full_state,
                            &m,
                            windows.remove(&room.nid),
                        )
                        .await?;
                    body.insert("account_data".into(), json!({ "events": ad_here }));
                    body.insert("ephemeral".into(), json!({ "events": ephemeral }));
                    let per_thread = req.filter.room.timeline.unread_thread_notifications;
                    crate::push::add_unread_counts(
                        self,
                        &mut body,
                        &req.user_id,
                        &room,
                        per_thread,
                    )
                    .await?;
                    join.insert(rid, Value::Object(body));
                }
                "invite" => {
                    if !initial && m.stream_ordering <= since.events {
                        continue;
                    }
                    let stripped = self.stripped_state(&room, m.event_nid).await?;
                    invite.insert(rid, json!({ "invite_state": { "events": stripped } }));
                }
                "knock" => {
                    if !initial && m.stream_ordering <= since.events {
                        continue;
                    }
                    let stripped = self.stripped_state(&room, m.event_nid).await?;
                    knock.insert(rid, json!({ "knock_state": { "events": stripped } }));
                }
                _ => {
                    // leave or ban: reported once, after it happened (or on an initial sync
                    // only when the filter asks for left rooms).
                    let report = if initial {
                        req.filter.room.include_leave && !m.forgotten
                    } else {
                        m.stream_ordering > since.events
                    };
                    if !report {
                        continue;
                    }
                    let from = if initial { 0 } else { since.events };
                    let mut body = self
                        .room_sync(req, &room, (from, m.stream_ordering), true, &m, None)
                        .await?;
                    body.insert("account_data".into(), json!({ "events": ad_here }));
                    leave.insert(rid, Value::Object(body));
                }
            }
        }
        // End-to-end encryption: to-device messages (the ones up to `ack_to_device`
        // acknowledged), device-list changes, key counts.
        if let Some(up_to) = req.ack_to_device {
            self.ack_to_device(&req.user_id, &req.device_id, up_to)
                .await?;
        }
        let to_device = self
            .to_device_window(
                &req.user_id,
                &req.device_id,
                req.since.map(|s| s.to_device),
                now.to_device,
            )
            .await?;
        let device_lists = match req.since {
            Some(since) => self.device_list_delta(&req.user_id, since, now).await?,
            None => Default::default(),
        };
        let (otk_counts, fallback_types) = self.key_counts(&req.user_id, &req.device_id).await?;
        let presence = self
            .presence_for_sync(
                &req.user_id,
                req.since.map(|s| s.presence),
                now.presence,
                &req.filter.presence,
            )
            .await?;
        let empty = presence.is_empty()
            && join.is_empty()
            && invite.is_empty()
            && leave.is_empty()
            && global_ad.is_empty()
            && to_device.events.is_empty()
            && device_lists.changed.is_empty()
            && device_lists.left.is_empty();
        let next = SyncToken {
            to_device: to_device.next,
            ..now
        };
        let mut rooms = Map::new();
        rooms.insert("join".into(), Value::Object(join));
        rooms.insert("invite".into(), Value::Object(invite));
        rooms.insert("leave".into(), Value::Object(leave));
        rooms.insert("knock".into(), Value::Object(knock));
        let body = json!({
            "next_batch": next.encode(),
            "rooms": rooms,
            "account_data": { "events": global_ad },
            "presence": { "events": presence },
            "to_device": { "events": to_device.events },
            "device_lists": { "changed": device_lists.changed, "left": device_lists.left },
            "device_one_time_keys_count": otk_counts,
            "device_unused_fallback_key_types": fallback_types,
        });
        Ok((body, empty))
    }

    /// The body of one joined (or left) room between stream positions `from` and `to`.
    async fn room_sync(
        &self,
        req: &SyncRequest,
        room: &Arc<RoomInfo>,
        (from, to): (i64, i64),
        full: bool,
        membership: &MembershipRow,
        window: Option<Window>,
    ) -> Result<Map<String, Value>> {
        let tf = &req.filter.room.timeline;
        let limit = timeline_limit(&req.filter);
        let TimelineSlice {
            events: timeline,
            limited,
            first_before: window_first_before,
        } = self
            .timeline_slice(
                &req.user_id,
                Some(membership.membership.as_str()),
                room,
                (from, to),
                limit,
                window,
                |pdu| tf.allows(pdu),
            )
            .await?;

        // State at the window's start (since) and at the timeline's start and end. When the
        // whole window was read (not limited), the state at `since` is the state before its
        // first event, and the state at `to` is known in memory for the room's latest event.
        let since_group = if full || from == 0 {
            None
        } else if let (false, Some(first)) = (limited, window_first_before) {
            Some(first)
        } else {
            self.store.state_group_at(room.nid, from).await?
        };
        let since_state = match since_group {
            Some(g) if g != 0 => self.state_map(g).await?,
            _ => Arc::new(StateMap::new()),
        };
        let end_group = match self.room_tip(room.nid) {
            Some((pos, g)) if to >= pos => Some(g),
            _ => self.store.state_group_at(room.nid, to).await?,
        };
        let first_before = timeline.first().and_then(|e| e.state_before);
        let start_group = if limited || !timeline.is_empty() {
            first_before.or(end_group)
        } else {
            end_group
        };
        let target_group = if req.use_state_after {
            end_group
        } else {
            start_group
        };
        let target = match target_group {
            Some(g) if g != 0 => self.state_map(g).await?,
            _ => Arc::new(StateMap::new()),
        };
        let mut state_nids: Vec<i64> = target
            .iter()
            .filter(|(k, v)| since_state.get(k) != Some(v))
            .map(|(_, v)| *v)
            .collect();
        if !req.use_state_after {
            let in_timeline: std::collections::HashSet<i64> =
                timeline.iter().map(|e| e.nid).collect();
            state_nids.retain(|n| !in_timeline.contains(n));
        }
        let mut state_events = self.events(&state_nids).await?;
        let sf = &req.filter.room.state;
        let lazy = sf.lazy_load_members || tf.lazy_load_members;
        let senders: std::collections::HashSet<String> = timeline
            .iter()
            .map(|e| e.pdu.sender.to_string())
            .chain(std::iter::once(req.user_id.clone()))
            .collect();
        state_events.retain(|e| {
            if lazy && e.pdu.kind == TimelineEventType::RoomMember {
                return e
                    .pdu
                    .state_key
                    .as_ref()
                    .is_some_and(|k| senders.contains(k));
            }
            sf.allows(&e.pdu)
        });
        let prev_batch = timeline
            .first()
            .map(|e| e.token_before().encode())
            .unwrap_or_else(|| PageToken::Stream(to).encode());

        let mut body = Map::new();
        let rendered_state = self
            .render_events(&state_events, &req.user_id, &req.device_id)
            .await?;
        let key = if req.use_state_after {
            "state_after"
        } else {
            "state"
        };
        body.insert(key.into(), json!({ "events": rendered_state }));
        body.insert(
            "timeline".into(),
            json!({
                "events": self.render_events(&timeline, &req.user_id, &req.device_id).await?,
                "limited": limited,
                "prev_batch": prev_batch,
            }),
        );
        if full
            || from == 0
            || state_events
                .iter()
                .chain(&timeline)
                .any(|e| e.pdu.kind == TimelineEventType::RoomMember)
        {
            body.insert(
                "summary".into(),
                self.room_summary(room, &req.user_id).await?,
            );
        }
        Ok(body)
    }

    /// The newest visible events of a room with `from < position ≤ to` that `allows` accepts,
    /// at most `limit`, oldest first. `limited` says more were there; `first_before` is the
    /// state before the oldest event read. Shared by `/sync` and sliding sync.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn timeline_slice(
        &self,
        user: &str,
        current: Option<&str>,
        room: &RoomInfo,
        (from, to): (i64, i64),
        limit: i64,
        window: Option<Window>,
        allows: impl Fn(&crate::pdu::Pdu) -> bool,
    ) -> Result<TimelineSlice> {
        // Walk the window newest first until `limit` visible events pass the filter; one more
        // match means the timeline is limited.
        let batch = (limit + 1) * 2;
        let mut upper = to;
        let mut limited = false;
        let mut timeline: Vec<Arc<StoredEvent>> = Vec::new();
        // The state before the oldest event read in the window.
        let mut window_first_before = None;
        // A woken sync usually finds its whole window among the room's recent events in
        // memory; otherwise it pages through the database.
        let mut ahead = window.or_else(|| self.recent_events(room.nid, from, to).map(Window::All));
        'pages: loop {
            let (events, complete) = match ahead.take() {
                Some(Window::All(mut events)) => {
                    events.reverse();
                    (events, true)
                }
                page => {
                    let rows = match page {
                        Some(Window::FirstPage(rows)) => rows,
                        _ => {
                            self.store
                                .room_events_stream_desc(room.nid, from, upper, batch)
                                .await?
                        }
                    };
                    let n = rows.len() as i64;
                    if let Some(last) = rows.last() {
                        upper = last.stream_ordering.unwrap_or(from) - 1;
                    }
                    let complete = n < batch || upper <= from;
                    (self.events_from_rows(rows).await?, complete)
                }
            };
            if events.is_empty() {
                break;
            }
            window_first_before = events.last().and_then(|e| e.state_before);
            for ev in self.filter_visible(user, current, events).await? {
                if !allows(&ev.pdu) {
                    continue;
                }
                if timeline.len() as i64 == limit {
                    limited = true;
                    break 'pages;
                }
                timeline.push(ev);
            }
            if complete {
                break;
            }
        }
        timeline.reverse();
        Ok(TimelineSlice {
            events: timeline,
            limited,
            first_before: window_first_before,
        })
    }

    /// `m.heroes`, `m.joined_member_count`, `m.invited_member_count`.
    pub async fn room_summary(&self, room: &RoomInfo, user: &str) -> Result<Value> {
        let members = self.members(room.nid).await?;
        let joined = members.values().filter(|m| *m == "join").count();
        let invited = members.values().filter(|m| *m == "invite").count();
        let mut heroes: Vec<&String> = members
            .iter()
            .filter(|(u, m)| u.as_str() != user && (*m == "join" || *m == "invite"))
            .map(|(u, _)| u)
            .collect();
        if heroes.is_empty() {
            heroes = members
                .iter()
                .filter(|(u, _)| u.as_str() != user)
                .map(|(u, _)| u)
                .collect();
        }
        heroes.sort();
        heroes.truncate(5);
        Ok(json!({
            "m.heroes": heroes,
            "m.joined_member_count": joined,
            "m.invited_member_count": invited,
        }))
    }

    /// Stripped state shown with an invite: the room's key state and the invite itself.
    pub async fn stripped_state(
        &self,
        room: &RoomInfo,
        member_event_nid: i64,
    ) -> Result<Vec<Value>> {
        let ev = self.event(member_event_nid).await?;
        let state = match ev.state_after {
            Some(g) if g != 0 => self.state_map(g).await?,
            _ => {
                // An invite from another server to a room we are not in: the state it came with.
                if let Some(sk) = ev.pdu.state_key.as_deref() {
                    if let Some(mut stripped) = self.remote_invite_state(room.nid, sk).await? {
                        let mut own = ev.pdu.to_stripped();
                        own["event_id"] = json!(ev.pdu.event_id);
                        own["origin_server_ts"] = json!(u64::from(ev.pdu.origin_server_ts.0));
                        stripped.push(own);
                        return Ok(stripped);
                    }
                }
                self.current_state(room).await?
            }
        };
        let mut out = self.key_stripped_state(&state).await?;
        if let Some(e) = self
            .state_event(&state, "m.room.member", ev.pdu.sender.as_str())
            .await?
        {
            out.push(e.pdu.to_stripped());
        }
        let mut own = ev.pdu.to_stripped();
        own["event_id"] = json!(ev.pdu.event_id);
        own["origin_server_ts"] = json!(u64::from(ev.pdu.origin_server_ts.0));
        out.push(own);
        Ok(out)
    }

    /// The stripped form of a room's key state events (sent with invites and knocks).
    pub async fn key_stripped_state(&self, state: &crate::state::StateMap) -> Result<Vec<Value>> {
        let mut out = Vec::new();
        for (t, k) in [
            ("m.room.create", ""),
            ("m.room.join_rules", ""),
            ("m.room.name", ""),
            ("m.room.avatar", ""),
            ("m.room.topic", ""),
            ("m.room.canonical_alias", ""),
            ("m.room.encryption", ""),
        ] {
            if let Some(e) = self.state_event(state, t, k).await? {
                out.push(e.pdu.to_stripped());
            }
        }
        Ok(out)
    }

    /// Renders events for a viewer: `unsigned.transaction_id` for the sending device,
    /// `redacted_because` for redacted events, `prev_content` for replaced state.
    pub async fn render_events(
        &self,
        events: &[Arc<StoredEvent>],
        viewer: &str,
        device: &str,
    ) -> Result<Vec<Value>> {
        // Transaction IDs of the viewer's own events; the database is asked only about events
        // loaded from it.
        let unknown: Vec<i64> = events
            .iter()
            .filter(|e| e.pdu.sender.as_str() == viewer && e.txn.is_none())
            .map(|e| e.nid)
            .collect();
        let mut txns: HashMap<i64, (String, String)> = self
            .store
            .txn_of_events(&unknown)
            .await?
            .into_iter()
            .map(|(n, d, t)| (n, (d, t)))
            .collect();
        for e in events {
            if let Some(Some(dt)) = &e.txn {
                txns.insert(e.nid, dt.clone());
            }
        }
        let mut out = Vec::with_capacity(events.len());
        for e in events {
            let mut unsigned = Map::new();
            if let Some((d, t)) = txns.get(&e.nid) {
                if d == device {
                    unsigned.insert("transaction_id".into(), json!(t));
                }
            }
            if let Some(by) = &e.redacted_by {
                if let Ok(id) = ruma::OwnedEventId::try_from(by.as_str()) {
                    if let Some(r) = self.event_by_id(&id).await? {
                        unsigned.insert("redacted_because".into(), r.pdu.to_client(Map::new()));
                    }
                }
            }
            if let (Some(sk), Some(g)) = (&e.pdu.state_key, e.state_before) {
                if g != 0 {
                    let before = self.state_map(g).await?;
                    if let Some(prev) = self
                        .state_event(&before, &e.pdu.kind.to_string(), sk)
                        .await?
                    {
                        unsigned.insert("prev_content".into(), prev.pdu.content_value());
                        unsigned.insert("replaces_state".into(), json!(prev.pdu.event_id));
                    }
                }
            }
            out.push(e.pdu.to_client(unsigned));
        }
        Ok(out)
    }
}
