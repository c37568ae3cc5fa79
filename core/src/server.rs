//! The server: the store, the signing key, the caches and the event path, shared by every
//! request handler behind an `Arc<Server>`.
//!
//! Local events take this way: the room's head lock is taken; each event is built on the head
//! (prev_events = forward extremities, auth_events from current state), hashed, signed and
//! authorised with the room version's rules; the head advances in memory and the events are
//! queued for the group-commit writer, which writes them with everything they change in one
//! transaction. Only after the commit are the caches and stream position advanced, the
//! concerned users woken and the request answered. A failed commit discards the head.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc, RwLock,
    },
};

use ruma::{
    events::{StateEventType, TimelineEventType},
    room_version_rules::RoomVersionRules,
    MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedServerName, OwnedUserId, RoomId,
    RoomVersionId, UserId,
};
use serde_json::value::RawValue;
use tokio::sync::Mutex as AsyncMutex;

mod acl;
mod history;
mod late_redactions;
mod remote;
mod restricted;
use late_redactions::LateRedaction;
pub use remote::{pdu_from_federation, redacted_pdu, Ingested, Ingesting, QueuedIngest};
pub use restricted::JoinAuthorisation;

use crate::{
    config::Config,
    keys::SigningKey,
    pdu::{build_pdu, redact_json, rules_for, EventFrame, NewEvent, Pdu},
    state::{StateCache, StateMap, MAX_CHAIN},
    store::{EventRow, EventWrite, GroupWrite, RoomWrite, Store},
    streams::{Notifier, StreamTracker},
    Error, Result,
};

/// A room's identity and rules.
#[derive(Debug)]
pub struct RoomInfo {
    pub nid: i64,
    pub room_id: OwnedRoomId,
    pub version: RoomVersionId,
    pub rules: RoomVersionRules,
}

/// An event with where it sits in the server's streams.
#[derive(Debug)]
pub struct StoredEvent {
    pub nid: i64,
    pub room_nid: i64,
    pub pdu: Arc<Pdu>,
    pub stream_ordering: Option<i64>,
    pub depth: i64,
    pub state_before: Option<i64>,
    pub state_after: Option<i64>,
    pub redacted_by: Option<String>,
    /// Stored outside the timeline (see [`crate::store::OutlierWrite`]).
    pub outlier: bool,
    /// Failed the authorization rules: never used as state or served as part of the room.
    pub rejected: bool,
    /// `(device_id, txn_id)` of a client send, when known without asking the database: `Some`
    /// for events sent since start (`Some(None)`: sent without a transaction ID).
    pub txn: Option<Option<(String, String)>>,
}

impl StoredEvent {
    /// The pagination position just before this event.
    pub fn token_before(&self) -> crate::token::PageToken {
        crate::token::PageToken::Topological {
            depth: self.depth,
            stream: self.stream_ordering.unwrap_or(0) - 1,
        }
    }

    /// The pagination position just after this event.
    pub fn token_after(&self) -> crate::token::PageToken {
        crate::token::PageToken::Topological {
            depth: self.depth,
            stream: self.stream_ordering.unwrap_or(0),
        }
    }
}

/// The tip of a room: what the next local event builds on.
#[derive(Clone)]
struct RoomHead {
    /// `(event ID, depth, event_nid)` of each forward extremity.
    extremities: Vec<(OwnedEventId, i64, i64)>,
    state_group: i64,
    chain_len: i64,
    state: Arc<StateMap>,
    /// Identifies this head since it was loaded; a failed write discards the head, and the
    /// writer drops queued writes built on a discarded generation.
    generation: u64,
    /// Events built on this head whose commit is still in flight: `nid → (position, PDU)`.
    pending: HashMap<i64, (i64, Arc<Pdu>)>,
    /// Redactions waiting for their target whose commit is still in flight, with their
    /// position (see `late_redactions.rs`).
    awaiting_redactions: Vec<(i64, crate::store::PendingRedaction)>,
}

impl RoomHead {
    /// Whether `id` was built on this head and its commit is still in flight (positions up
    /// to `committed` are written).
    fn in_flight(&self, id: &ruma::EventId, committed: i64) -> bool {
        self.pending
            .values()
            .any(|(pos, p)| *pos > committed && p.event_id == id)
    }
}

static HEAD_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn next_generation() -> u64 {
    HEAD_GENERATION.fetch_add(1, Ordering::Relaxed)
}

/// One event to append.
pub struct Append {
    pub sender: OwnedUserId,
    pub event: NewEvent,
    /// `(device_id, scope, txn_id)` of a client send; the scope is the request path after the
    /// room (a txn ID is unique per device and path).
    pub txn: Option<(String, String, String)>,
}

const MAX_CACHED_EVENTS: usize = 100_000;
/// `(position after which the buffer is complete, the room's latest events in order)`.
type RecentEvents = (i64, std::collections::VecDeque<Arc<StoredEvent>>);

/// Events kept per room for syncs woken by new events.
const RECENT_PER_ROOM: usize = 64;
const MAX_PREV_EVENTS: usize = 10;

pub struct Server {
    pub config: Config,
    pub server_name: OwnedServerName,
    pub store: Arc<Store>,
    pub key: SigningKey,
    pub state: StateCache,
    pub notifier: Notifier,
    /// Presence of local users (which devices are syncing).
    pub presence: Arc<crate::presence::Presence>,
    /// Push rules and pushers of local users (cached), and the push sender's wake-up.
    pub push: crate::push::Push,
    /// Who is typing in each room (in memory only).
    pub typing: crate::typing::Typing,
    /// Devices' one-time and fallback key counts, as syncs report them.
    pub key_counts: crate::e2ee::KeyCountCache,
    /// How far each device's to-device messages are known to be acknowledged.
    pub to_device_acked: crate::e2ee::AckMarks,
    /// Users' unread counts per room, kept in step with each commit.
    pub unread: crate::unread::UnreadCache,
    /// Events stream.
    pub events_stream: StreamTracker,
    /// Account-data stream.
    pub account_data_stream: StreamTracker,
    /// To-device messages stream.
    pub to_device_stream: StreamTracker,
    /// Device-list stream (changes of users' devices and cross-signing keys).
    pub device_list_stream: StreamTracker,
    /// Receipts stream.
    pub receipt_stream: StreamTracker,
    /// Each room's latest receipts position.
    pub receipts: crate::receipts::ReceiptIndex,
    /// Typing stream (in memory only: typing notices do not outlive the process).
    pub typing_stream: StreamTracker,
    /// Presence stream.
    pub presence_stream: StreamTracker,
    next_event_nid: AtomicI64,
    next_state_group: AtomicI64,
    next_room_nid: AtomicI64,
    /// The next historical (backfilled) event's stream position: negative, counting down.
    next_historical: AtomicI64,
    last_create_ts: AtomicI64,
    rooms: RwLock<HashMap<i64, Arc<RoomInfo>>>,
    room_nids: RwLock<HashMap<OwnedRoomId, i64>>,
    heads: std::sync::Mutex<HashMap<i64, Arc<AsyncMutex<Option<RoomHead>>>>>,
    events: RwLock<HashMap<i64, Arc<StoredEvent>>>,
    event_nids: RwLock<HashMap<OwnedEventId, i64>>,
    /// Latest stream ordering per room, so a sync skips rooms with nothing new without a query.
    room_positions: RwLock<HashMap<i64, i64>>,
    /// `(stream position, state group after)` of each room's latest event, for rooms written
    /// since start (one lock, so the two are always read together).
    room_tips: RwLock<HashMap<i64, (i64, i64)>>,
    /// The latest committed events of each room (in order), so a woken sync reads its slice
    /// from memory: `(position below which the buffer is complete, events)`.
    recent: RwLock<HashMap<i64, RecentEvents>>,
    /// Bumped by every committed membership change, so a cache filled from a read that raced
    /// with one is not kept.
    membership_epoch: std::sync::atomic::AtomicU64,
    /// Each user's memberships, loaded on demand and dropped when one of them changes.
    user_rooms: RwLock<HashMap<String, Arc<Vec<crate::store::MembershipRow>>>>,
    /// The group-commit writer's queue.
    writer: tokio::sync::mpsc::UnboundedSender<WriteJob>,
    /// `user → membership` of each room whose members were loaded.
    members: RwLock<HashMap<i64, Arc<HashMap<String, String>>>>,
    /// Client transaction IDs sent since start.
    pub txns: TxnCache,
    /// Access-token cache.
    pub tokens: crate::accounts::TokenCache,
    /// The other servers with joined members of each room (derived from `members`).
    servers: RwLock<HashMap<i64, Arc<Vec<String>>>>,
    /// Tells the federation sender which destinations have new outbox rows.
    pub outbox_signal: OutboxSignal,
    /// The targets redactions may be waiting for in `pending_redactions` (read at start-up,
    /// added to when one is queued; one process per database): other events skip looking.
    /// Settled targets stay until a restart; they only cost their memory.
    late_targets: RwLock<HashSet<String>>,
    /// Set when the server is shutting down: long-polls answer at once.
    pub shutting_down: std::sync::atomic::AtomicBool,
    /// Sliding-sync connections (what each has sent), in memory.
    pub sliding: crate::sliding_sync::Connections,
}

impl Server {
    /// Opens the store (running migrations) and the signing key.
    pub async fn open(config: Config) -> Result<Arc<Self>> {
        let server_name = OwnedServerName::try_from(config.server_name.as_str())
            .map_err(|e| Error::internal(format!("server_name {:?}: {e}", config.server_name)))?;
        let store = Arc::new(
            Store::connect(&config.database_url(), config.database_max_connections).await?,
        );
        let (writer, jobs) = tokio::sync::mpsc::unbounded_channel();
        let key = SigningKey::load_or_generate(&config.data_dir.join("signing.key"))?;
        let (max_stream, max_event, max_group) = store.max_ids().await?;
        let max_ad = store.max_account_data_stream().await?;
        let max_to_device = store.max_to_device_stream().await?;
        let max_device_list = store.max_device_list_stream().await?;
        let max_receipt = store.max_receipt_stream().await?;
        let receipt_rooms = store.receipt_room_positions().await?;
        let max_presence = store.max_presence_stream().await?;
        let presence = Arc::new(crate::presence::Presence::new(&config.presence));
        let room_positions = store.room_latest_positions().await?.into_iter().collect();
        let max_room = store.max_room_nid().await?;
        let min_stream = store.min_stream_ordering().await?;
        let late_targets = RwLock::new(
            store
                .pending_redaction_targets()
                .await?
                .into_iter()
                .collect(),
        );
        let server = Arc::new(Server {
            config,
            server_name,
            store,
            key,
            state: StateCache::default(),
            notifier: Notifier::default(),
            presence,
            push: Default::default(),
            typing: Default::default(),
            key_counts: Default::default(),
            to_device_acked: Default::default(),
            unread: Default::default(),
            events_stream: StreamTracker::new(max_stream),
            account_data_stream: StreamTracker::new(max_ad),
            to_device_stream: StreamTracker::new(max_to_device),
            device_list_stream: StreamTracker::new(max_device_list),
            receipt_stream: StreamTracker::new(max_receipt),
            receipts: crate::receipts::ReceiptIndex::new(receipt_rooms),
            // Above every position of an earlier run (see typing.rs).
            typing_stream: StreamTracker::new(crate::store::now_ms()),
            presence_stream: StreamTracker::new(max_presence),
            next_event_nid: AtomicI64::new(max_event + 1),
            next_state_group: AtomicI64::new(max_group + 1),
            next_room_nid: AtomicI64::new(max_room + 1),
            next_historical: AtomicI64::new(min_stream - 1),
            last_create_ts: AtomicI64::new(0),
            rooms: RwLock::default(),
            room_nids: RwLock::default(),
            heads: Default::default(),
            events: RwLock::default(),
            event_nids: RwLock::default(),
            room_positions: RwLock::new(room_positions),
            room_tips: RwLock::default(),
            recent: RwLock::default(),
            user_rooms: RwLock::default(),
            membership_epoch: Default::default(),
            writer,
            members: RwLock::default(),
            tokens: Default::default(),
            txns: Default::default(),
            shutting_down: Default::default(),
            sliding: Default::default(),
            servers: RwLock::default(),
            outbox_signal: OutboxSignal::default(),
            late_targets,
        });
        tokio::spawn(run_writer(Arc::downgrade(&server), jobs));
        crate::presence::start(&server).await?;
        crate::typing::start(&server);
        Ok(server)
    }

    pub fn server_name(&self) -> &str {
        self.server_name.as_str()
    }

    // Rooms --------------------------------------------------------------------------------

    /// Looks a room up by ID.
    pub async fn room(&self, room_id: &RoomId) -> Result<Option<Arc<RoomInfo>>> {
        let nid = self
            .room_nids
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(room_id)
            .copied();
        if let Some(nid) = nid {
            return self.room_by_nid(nid).await.map(Some);
        }
        match self.store.room(room_id.as_str()).await? {
            Some(row) => self.room_by_nid(row.room_nid).await.map(Some),
            None => Ok(None),
        }
    }

    /// Looks a room up by ID, 404 `M_NOT_FOUND` when unknown.
    pub async fn room_or_404(&self, room_id: &RoomId) -> Result<Arc<RoomInfo>> {
        self.room(room_id)
            .await?
            .ok_or_else(|| Error::not_found("Unknown room"))
    }

    pub async fn room_by_nid(&self, nid: i64) -> Result<Arc<RoomInfo>> {
        if let Some(r) = self
            .rooms
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&nid)
        {
            return Ok(r.clone());
        }
        let row = self
            .store
            .room_by_nid(nid)
            .await?
            .ok_or_else(|| Error::internal(format!("room {nid} missing")))?;
        let version = RoomVersionId::try_from(row.room_version.as_str())
            .map_err(|e| Error::internal(format!("room version: {e}")))?;
        let info = Arc::new(RoomInfo {
            nid,
            room_id: OwnedRoomId::try_from(row.room_id.as_str())
                .map_err(|e| Error::internal(format!("room id: {e}")))?,
            rules: rules_for(&version)?,
            version,
        });
        self.room_nids
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(info.room_id.clone(), nid);
        self.rooms
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(nid, info.clone());
        Ok(info)
    }

    /// `(stream position, state group after)` of a room's latest event, when known in memory.
    pub fn room_tip(&self, room_nid: i64) -> Option<(i64, i64)> {
        self.room_tips
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&room_nid)
            .copied()
    }

    /// The latest stream position of a room.
    pub fn room_position(&self, room_nid: i64) -> i64 {
        self.room_positions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&room_nid)
            .copied()
            .unwrap_or(0)
    }

    // Events -------------------------------------------------------------------------------

    fn stored_from_row(&self, row: EventRow, room: &RoomInfo) -> Result<Arc<StoredEvent>> {
        let event_id = OwnedEventId::try_from(row.event_id.as_str())
            .map_err(|e| Error::internal(format!("event id: {e}")))?;
        let pdu = Pdu::parse(
            event_id.clone(),
            room.room_id.clone(),
            RawValue::from_string(row.json)?,
            row.redacted_by.is_some(),
        )?;
        let ev = Arc::new(StoredEvent {
            nid: row.event_nid,
            room_nid: row.room_nid,
            pdu: Arc::new(pdu),
            stream_ordering: row.stream_ordering,
            depth: row.depth,
            state_before: row.state_before,
            state_after: row.state_after,
            redacted_by: row.redacted_by,
            outlier: row.outlier,
            rejected: row.rejected,
            txn: None,
        });
        self.cache_event(ev.clone());
        Ok(ev)
    }

    fn cache_event(&self, ev: Arc<StoredEvent>) {
        let mut events = self.events.write().unwrap_or_else(|e| e.into_inner());
        let mut ids = self.event_nids.write().unwrap_or_else(|e| e.into_inner());
        if events.len() >= MAX_CACHED_EVENTS {
            events.clear();
            ids.clear();
        }
        ids.insert(ev.pdu.event_id.clone(), ev.nid);
        events.insert(ev.nid, ev);
    }

    fn uncache_event(&self, nid: i64) {
        self.events
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&nid);
    }

    /// An event by numeric ID.
    pub async fn event(&self, nid: i64) -> Result<Arc<StoredEvent>> {
        if let Some(e) = self
            .events
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&nid)
        {
            return Ok(e.clone());
        }
        let row = self
            .store
            .event_by_nid(nid)
            .await?
            .ok_or_else(|| Error::internal(format!("event {nid} missing")))?;
        let room = self.room_by_nid(row.room_nid).await?;
        self.stored_from_row(row, &room)
    }

    /// Events by numeric ID, in the order asked.
    pub async fn events(&self, nids: &[i64]) -> Result<Vec<Arc<StoredEvent>>> {
        let mut found: HashMap<i64, Arc<StoredEvent>> = HashMap::with_capacity(nids.len());
        let mut missing = Vec::new();
        {
            let events = self.events.read().unwrap_or_else(|e| e.into_inner());
            for n in nids {
                match events.get(n) {
                    Some(e) => {
                        found.insert(*n, e.clone());
                    }
                    None => missing.push(*n),
                }
            }
        }
        if !missing.is_empty() {
            for row in self.store.events_by_nids(&missing).await? {
                let room = self.room_by_nid(row.room_nid).await?;
                let ev = self.stored_from_row(row, &room)?;
                found.insert(ev.nid, ev);
            }
        }
        nids.iter()
            .map(|n| {
                found
                    .get(n)
                    .cloned()
                    .ok_or_else(|| Error::internal(format!("event {n} missing")))
            })
            .collect()
    }

    /// Events from rows already read (used by range queries); fills the cache.
    pub async fn events_from_rows(&self, rows: Vec<EventRow>) -> Result<Vec<Arc<StoredEvent>>> {
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let cached = self
                .events
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(&row.event_nid)
                .cloned();
            match cached {
                Some(e) => out.push(e),
                None => {
                    let room = self.room_by_nid(row.room_nid).await?;
                    out.push(self.stored_from_row(row, &room)?);
                }
            }
        }
        Ok(out)
    }

    /// An event by event ID, if stored.
    pub async fn event_by_id(&self, event_id: &ruma::EventId) -> Result<Option<Arc<StoredEvent>>> {
        let nid = self
            .event_nids
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(event_id)
            .copied();
        if let Some(nid) = nid {
            return self.event(nid).await.map(Some);
        }
        match self.store.event_by_id(event_id.as_str()).await? {
            Some(row) => {
                let room = self.room_by_nid(row.room_nid).await?;
                self.stored_from_row(row, &room).map(Some)
            }
            None => Ok(None),
        }
    }

    // State --------------------------------------------------------------------------------

    /// The resolved state of a group.
    pub async fn state_map(&self, group: i64) -> Result<Arc<StateMap>> {
        Ok(self.state.group(&self.store, group).await?.0)
    }

    /// The committed current state of a room. (The head may be ahead of it by events whose
    /// commit is in flight; readers never see those.)
    pub async fn current_state(&self, room: &RoomInfo) -> Result<Arc<StateMap>> {
        let lock = self.head_lock(room.nid);
        let mut guard = lock.lock().await;
        let committed = self.events_stream.current();
        let head = self.load_head(room, &mut guard).await?;
        if head.pending.values().all(|(pos, _)| *pos <= committed) {
            return Ok(head.state.clone());
        }
        let group = match self.room_tip(room.nid) {
            Some((_, group)) => group,
            None => self
                .store
                .room_by_nid(room.nid)
                .await?
                .and_then(|r| r.state_group)
                .ok_or_else(|| Error::internal("room has no state"))?,
        };
        self.state_map(group).await
    }

    /// The event at `(event_type, state_key)` in `state`.
    pub async fn state_event(
        &self,
        state: &StateMap,
        event_type: &str,
        state_key: &str,
    ) -> Result<Option<Arc<StoredEvent>>> {
        let Some(k) = self
            .state
            .lookup(&self.store, event_type, state_key)
            .await?
        else {
            return Ok(None);
        };
        match state.get(&k) {
            Some(nid) => self.event(*nid).await.map(Some),
            None => Ok(None),
        }
    }

    /// The power levels of `room` in `state`.
    pub async fn power_levels(
        &self,
        room: &RoomInfo,
        state: &StateMap,
    ) -> Result<crate::power::PowerLevels> {
        let pl = self.state_event(state, "m.room.power_levels", "").await?;
        let create = self.state_event(state, "m.room.create", "").await?;
        Ok(crate::power::PowerLevels::from_state(
            pl.as_ref().map(|e| &*e.pdu),
            create.as_ref().map(|e| &*e.pdu),
            &room.rules,
        ))
    }

    /// Whether a user of this server is joined to the room (it can then change memberships
    /// itself).
    pub async fn is_resident(&self, room_nid: i64) -> Result<bool> {
        let suffix = format!(":{}", self.server_name);
        Ok(self
            .members(room_nid)
            .await?
            .iter()
            .any(|(u, m)| m == "join" && u.ends_with(&suffix)))
    }

    /// A string field of the content of the state event `(ty, "")` in `state`.
    pub async fn state_field(
        &self,
        state: &StateMap,
        ty: &str,
        field: &str,
    ) -> Result<Option<String>> {
        Ok(self
            .state_event(state, ty, "")
            .await?
            .and_then(|e| e.pdu.content_str(field)))
    }

    /// All events of a state map, with their `(type, state_key)`.
    pub async fn state_events(&self, state: &StateMap) -> Result<Vec<Arc<StoredEvent>>> {
        let nids: Vec<i64> = state.values().copied().collect();
        self.events(&nids).await
    }

    /// The membership of `user` in `state`.
    pub async fn membership_in(&self, state: &StateMap, user: &str) -> Result<Option<String>> {
        Ok(self
            .state_event(state, "m.room.member", user)
            .await?
            .and_then(|e| e.pdu.content_str("membership")))
    }

    /// `user → membership` for a room's current state.
    pub async fn members(&self, room_nid: i64) -> Result<Arc<HashMap<String, String>>> {
        if let Some(m) = self
            .members
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&room_nid)
        {
            return Ok(m.clone());
        }
        let epoch = self.membership_epoch.load(Ordering::Acquire);
        let map: HashMap<String, String> = self
            .store
            .room_members(room_nid)
            .await?
            .into_iter()
            .map(|m| (m.user_id, m.membership))
            .collect();
        let map = Arc::new(map);
        // A membership change committed meanwhile may be missing from what was read.
        if self.membership_epoch.load(Ordering::Acquire) == epoch {
            self.members
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(room_nid, map.clone());
        }
        Ok(map)
    }

    /// The other servers with a joined member in a room (cached with the members).
    pub async fn room_servers(&self, room_nid: i64) -> Result<Arc<Vec<String>>> {
        if let Some(s) = self
            .servers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&room_nid)
        {
            return Ok(s.clone());
        }
        let epoch = self.membership_epoch.load(Ordering::Acquire);
        let members = self.members(room_nid).await?;
        let mut servers: Vec<String> = members
            .iter()
            .filter(|(_, m)| m.as_str() == "join")
            .filter_map(|(u, _)| u.split_once(':').map(|(_, s)| s.to_owned()))
            .filter(|s| s != self.server_name.as_str())
            .collect();
        servers.sort();
        servers.dedup();
        let servers = Arc::new(servers);
        if self.membership_epoch.load(Ordering::Acquire) == epoch {
            self.servers
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(room_nid, servers.clone());
        }
        Ok(servers)
    }

    fn head_lock(&self, room_nid: i64) -> Arc<AsyncMutex<Option<RoomHead>>> {
        self.heads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(room_nid)
            .or_default()
            .clone()
    }

    async fn load_head<'a>(
        &self,
        room: &RoomInfo,
        slot: &'a mut Option<RoomHead>,
    ) -> Result<&'a RoomHead> {
        if slot.is_none() {
            let row = self
                .store
                .room_by_nid(room.nid)
                .await?
                .ok_or_else(|| Error::internal("room row missing"))?;
            let group = row
                .state_group
                .ok_or_else(|| Error::internal("room has no state"))?;
            let (state, chain_len) = self.state.group(&self.store, group).await?;
            let extremities = self
                .store
                .forward_extremities(room.nid)
                .await?
                .into_iter()
                .filter_map(|(id, d, n)| OwnedEventId::try_from(id).ok().map(|id| (id, d, n)))
                .collect();
            *slot = Some(RoomHead {
                extremities,
                state_group: group,
                chain_len,
                state,
                generation: next_generation(),
                pending: HashMap::new(),
                awaiting_redactions: Vec::new(),
            });
        }
        slot.as_ref().ok_or_else(|| Error::internal("head"))
    }

    // The event path -----------------------------------------------------------------------

    /// Creates a room: the create event (built first, it may define the room ID) and then
    /// `rest`, all written in one transaction.
    pub async fn create_room(
        &self,
        version: RoomVersionId,
        creator: &UserId,
        create_content: serde_json::Value,
        rest: Vec<Append>,
    ) -> Result<(Arc<RoomInfo>, Vec<Arc<StoredEvent>>)> {
        let rules = rules_for(&version)?;
        let provisional = if rules.authorization.room_create_event_id_as_room_id {
            // Replaced by the create event's hash.
            OwnedRoomId::try_from(format!("!placeholder:{}", self.server_name))
        } else {
            OwnedRoomId::try_from(format!("!{}:{}", random_string(18), self.server_name))
        }
        .map_err(|e| Error::internal(format!("room id: {e}")))?;
        // Two creates by one user in the same millisecond would hash to the same v12 room ID:
        // create timestamps are made strictly increasing within the process.
        let now = {
            let wall = MilliSecondsSinceUnixEpoch::now().0;
            let wall = i64::from(wall);
            let prev = self.last_create_ts.fetch_max(wall, Ordering::AcqRel);
            let ts = if prev >= wall {
                self.last_create_ts.fetch_add(1, Ordering::AcqRel) + 1
            } else {
                wall
            };
            MilliSecondsSinceUnixEpoch(ruma::UInt::try_from(ts).unwrap_or_default())
        };
        let frame = EventFrame {
            room_id: &provisional,
            version: &version,
            rules: &rules,
            sender: creator,
            prev_events: &[],
            auth_events: &[],
            depth: 1,
            origin_server_ts: now,
        };
        let create = build_pdu(
            NewEvent::state("m.room.create", "", create_content)?,
            &frame,
            self.server_name.as_str(),
            &self.key,
        )?;
        ruma::state_res::check_state_independent_auth_rules(
            &rules.authorization,
            &create,
            |_: &ruma::EventId| -> Option<&Pdu> { None },
        )
        .map_err(|e| Error::bad_json(format!("invalid create event: {e}")))?;
        let room_id = create.room_id.clone();

        let room_nid = self.next_room_nid.fetch_add(1, Ordering::Relaxed);
        let room = Arc::new(RoomInfo {
            nid: room_nid,
            room_id: room_id.clone(),
            version,
            rules,
        });
        let empty = RoomHead {
            extremities: vec![],
            state_group: 0,
            chain_len: 0,
            state: Arc::new(StateMap::new()),
            generation: next_generation(),
            pending: HashMap::new(),
            awaiting_redactions: Vec::new(),
        };
        let mut all = vec![Built {
            pdu: Arc::new(create),
            sender_txn: None,
            redaction: None,
            late: LateRedaction::default(),
        }];
        let mut head = empty;
        let mut local = HashMap::new();
        // Build the create event into the head, then the rest on top of it.
        let first = self.apply_built(&mut head, &mut local, &all[0]).await?;
        let mut applied = vec![first];
        for item in rest {
            let built = self.build_one(&room, &head, &local, item).await?;
            applied.push(self.apply_built(&mut head, &mut local, &built).await?);
            all.push(built);
        }
        let lock = self.head_lock(room_nid);
        let mut guard = lock.lock().await;
        let generation = head.generation;
        self.members
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(room_nid, Arc::new(HashMap::new()));
        let done = self.enqueue_write(&room, true, all, applied, &mut head, Extras::default())?;
        *guard = Some(head);
        drop(guard);
        let stored = self.await_write(&room, generation, done).await?;
        self.rooms
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(room_nid, room.clone());
        self.room_nids
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(room_id, room_nid);
        Ok((room, stored))
    }

    /// Appends local events to a room, in order, in one transaction. Each is authorised against
    /// the state left by the previous one; if any is refused, nothing is written.
    pub async fn append(
        &self,
        room: &Arc<RoomInfo>,
        items: Vec<Append>,
    ) -> Result<Vec<Arc<StoredEvent>>> {
        let lock = self.head_lock(room.nid);
        let mut guard = lock.lock().await;
        let mut head = self.load_head(room, &mut guard).await?.clone();
        // Forget in-flight events that have committed since; the rest stay visible to the
        // auth checks of events built on top of them.
        let committed = self.events_stream.current();
        head.pending.retain(|_, (pos, _)| *pos > committed);
        let mut local: HashMap<i64, Arc<Pdu>> = head
            .pending
            .iter()
            .map(|(n, (_, p))| (*n, p.clone()))
            .collect();
        let mut built_all = Vec::with_capacity(items.len());
        let mut applied = Vec::with_capacity(items.len());
        for item in items {
            let built = self.build_one(room, &head, &local, item).await?;
            applied.push(self.apply_built(&mut head, &mut local, &built).await?);
            built_all.push(built);
        }
        let generation = head.generation;
        // The members are cached before the write, so the commit can wake them at once.
        self.members(room.nid).await?;
        let extras = Extras {
            servers: self.room_servers(room.nid).await?,
            push: self.evaluate_push(room, &built_all, &applied, &local).await,
            ..Default::default()
        };
        let done = self.enqueue_write(room, false, built_all, applied, &mut head, extras)?;
        *guard = Some(head);
        drop(guard);
        // The room is free for the next event while this one commits (pipelining: consecutive
        // events of a room can share one group commit).
        self.await_write(room, generation, done).await
    }

    /// Builds, signs and authorises one event on `head`.
    async fn build_one(
        &self,
        room: &RoomInfo,
        head: &RoomHead,
        local: &HashMap<i64, Arc<Pdu>>,
        item: Append,
    ) -> Result<Built> {
        let content_raw = serde_json::value::to_raw_value(&item.event.content)?;
        let auth_types = ruma::state_res::auth_types_for_event(
            &TimelineEventType::from(item.event.kind.as_str()),
            &item.sender,
            item.event.state_key.as_deref(),
            &content_raw,
            &room.rules.authorization,
        )
        .map_err(|e| Error::bad_json(format!("invalid content: {e}")))?;
        // The auth events and every state the auth rules may look at.
        let mut needed: HashMap<(StateEventType, String), Arc<Pdu>> = HashMap::new();
        let mut wanted = auth_types.clone();
        wanted.push((StateEventType::RoomCreate, String::new()));
        wanted.push((StateEventType::RoomPowerLevels, String::new()));
        wanted.push((StateEventType::RoomJoinRules, String::new()));
        wanted.push((StateEventType::RoomMember, item.sender.to_string()));
        for (ty, sk) in wanted {
            if let Some(k) = self.state.lookup(&self.store, &ty.to_string(), &sk).await? {
                if let Some(nid) = head.state.get(&k) {
                    let pdu = match local.get(nid) {
                        Some(p) => p.clone(),
                        None => self.event(*nid).await?.pdu.clone(),
                    };
                    needed.insert((ty, sk), pdu);
                }
            }
        }
        let mut auth_events: Vec<OwnedEventId> = auth_types
            .iter()
            .filter(|(ty, _)| {
                !(room.rules.authorization.room_create_event_id_as_room_id
                    && *ty == StateEventType::RoomCreate)
            })
            .filter_map(|k| needed.get(k).map(|p| p.event_id.clone()))
            .collect();
        auth_events.sort();
        auth_events.dedup();
        let prev: Vec<OwnedEventId> = head
            .extremities
            .iter()
            .take(MAX_PREV_EVENTS)
            .map(|(id, _, _)| id.clone())
            .collect();
        let depth = head
            .extremities
            .iter()
            .map(|(_, d, _)| *d)
            .max()
            .unwrap_or(0)
            + 1;
        let frame = EventFrame {
            room_id: &room.room_id,
            version: &room.version,
            rules: &room.rules,
            sender: &item.sender,
            prev_events: &prev,
            auth_events: &auth_events,
            depth,
            origin_server_ts: MilliSecondsSinceUnixEpoch::now(),
        };
        if item.event.kind == "m.room.create" {
            return Err(Error::forbidden("a room has exactly one create event"));
        }
        let redacts = item.event.redacts.clone();
        let pdu = build_pdu(item.event, &frame, self.server_name.as_str(), &self.key)?;
        let by_id: HashMap<&ruma::EventId, &Pdu> =
            needed.values().map(|p| (&*p.event_id, &**p)).collect();
        ruma::state_res::check_state_independent_auth_rules(
            &room.rules.authorization,
            &pdu,
            |id| by_id.get(id).copied(),
        )
        .map_err(|e| Error::forbidden(format!("event not allowed: {e}")))?;
        ruma::state_res::check_state_dependent_auth_rules(
            &room.rules.authorization,
            &pdu,
            |ty: &StateEventType, sk: &str| needed.get(&(ty.clone(), sk.to_owned())).map(|p| &**p),
        )
        .map_err(|e| Error::forbidden(format!("event not allowed: {e}")))?;

        // A redaction changes stored content only if its sender may redact the target.
        let redaction = match redacts {
            Some(target_id) => {
                let target = self
                    .event_by_id(&target_id)
                    .await?
                    .filter(|t| t.room_nid == room.nid)
                    .ok_or_else(|| Error::not_found("Event to redact not found"))?;
                let power = crate::power::PowerLevels::from_auth(&needed, &room.rules);
                if target.pdu.sender != item.sender && !power.can_redact(&item.sender) {
                    return Err(Error::forbidden("You may not redact this event"));
                }
                if target.redacted_by.is_some() {
                    None
                } else {
                    let red = redact_json(&target.pdu.json, &room.rules)?;
                    Some((target.nid, red.get().to_owned()))
                }
            }
            None => None,
        };
        Ok(Built {
            pdu: Arc::new(pdu),
            sender_txn: item.txn,
            redaction,
            late: LateRedaction::default(),
        })
    }

    /// Advances `head` by a built event (in memory only) and allocates its numeric IDs.
    async fn apply_built(
        &self,
        head: &mut RoomHead,
        local: &mut HashMap<i64, Arc<Pdu>>,
        built: &Built,
    ) -> Result<Applied> {
        let pdu = &built.pdu;
        let nid = self.next_event_nid.fetch_add(1, Ordering::Relaxed);
        local.insert(nid, pdu.clone());
        let state_before = head.state_group;
        let mut new_group = None;
        if let Some(sk) = &pdu.state_key {
            let k = self
                .state
                .intern(&self.store, &pdu.kind.to_string(), sk)
                .await?;
            let group = self.next_state_group.fetch_add(1, Ordering::Relaxed);
            let mut map = (*head.state).clone();
            map.insert(k, nid);
            let (parent, chain_len, edits) = if head.state_group == 0 || head.chain_len >= MAX_CHAIN
            {
                (None, 0, map.iter().map(|(k, v)| (*k, *v)).collect())
            } else {
                (Some(head.state_group), head.chain_len + 1, vec![(k, nid)])
            };
            head.state = Arc::new(map);
            head.state_group = group;
            head.chain_len = chain_len;
            new_group = Some(AppliedGroup {
                group,
                state_key_nid: k,
                parent,
                chain_len,
                edits,
            });
        }
        head.extremities = vec![(pdu.event_id.clone(), pdu.depth, nid)];
        Ok(Applied {
            nid,
            state_before,
            new_group,
            state_after: head.state.clone(),
        })
    }

    /// Allocates stream positions and queues a room's built events for the group-commit
    /// writer. Called under the room's head lock, so a room's writes queue in order.
    fn enqueue_write(
        &self,
        room: &Arc<RoomInfo>,
        new_room: bool,
        built: Vec<Built>,
        applied: Vec<Applied>,
        head: &mut RoomHead,
        extras: Extras,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<Vec<Arc<StoredEvent>>>>> {
        let positions = self.events_stream.allocate(built.len());
        let mut write = RoomWrite {
            room_nid: room.nid,
            new_room: new_room.then(|| (room.room_id.to_string(), room.version.to_string())),
            events: Vec::with_capacity(built.len()),
            extremities: Some(head.extremities.iter().map(|(_, _, nid)| *nid).collect()),
            ..Default::default()
        };
        for ((b, a), pos) in built.iter().zip(&applied).zip(&positions) {
            let pdu = &b.pdu;
            let membership = match (&pdu.state_key, pdu.kind == TimelineEventType::RoomMember) {
                (Some(sk), true) => pdu.content_str("membership").map(|m| (sk.clone(), m)),
                _ => None,
            };
            write.events.push(EventWrite {
                event_nid: a.nid,
                event_id: pdu.event_id.to_string(),
                event_type: pdu.kind.to_string(),
                state_key: pdu.state_key.clone(),
                sender: pdu.sender.to_string(),
                depth: pdu.depth,
                origin_server_ts: u64::from(pdu.origin_server_ts.0) as i64,
                stream_ordering: *pos,
                json: pdu.json.get().to_owned(),
                state_before: a.state_before,
                state_after: a.group_after(),
                new_group: a.new_group.as_ref().map(|g| GroupWrite {
                    group: g.group,
                    parent: g.parent,
                    chain_len: g.chain_len,
                    state_key_nid: g.state_key_nid,
                    edits: g.edits.clone(),
                }),
                membership,
                txn: b
                    .sender_txn
                    .as_ref()
                    .map(|(d, sc, t)| (pdu.sender.to_string(), d.clone(), sc.clone(), t.clone())),
            });
            if let Some((target, json)) = &b.redaction {
                write
                    .redactions
                    .push((*target, json.clone(), pdu.event_id.to_string()));
            }
            if let Some(by) = &b.late.redacted_by {
                // Stored in its redacted form from the start (`pdu` is already redacted).
                write
                    .redactions
                    .push((a.nid, pdu.json.get().to_owned(), by.clone()));
            }
            if b.late.settles {
                write.settled_redactions.push(pdu.event_id.to_string());
            }
            if let Some(p) = &b.late.awaits {
                self.late_targets
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(p.target_event_id.clone());
                write.pending_redactions.push(p.clone());
                head.awaiting_redactions.push((*pos, p.clone()));
            }
            // Our own events, and events we relay as the resident server, go to every other
            // server in the room (and to the target's server of a membership change).
            let ours = pdu.sender.server_name() == self.server_name;
            if ours || extras.relay_from.is_some() {
                let mut dests: Vec<&str> = extras.servers.iter().map(|s| s.as_str()).collect();
                if let Some(target) = pdu
                    .state_key
                    .as_deref()
                    .filter(|_| pdu.kind == TimelineEventType::RoomMember)
                    .and_then(|sk| UserId::parse(sk).ok())
                {
                    let server = target.server_name().as_str().to_owned();
                    if !dests.contains(&server.as_str()) && server != self.server_name.as_str() {
                        write.outbox.push((server, a.nid));
                    }
                }
                dests.retain(|d| Some(*d) != extras.relay_from.as_deref());
                write
                    .outbox
                    .extend(dests.into_iter().map(|d| (d.to_owned(), a.nid)));
            }
        }
        write.extra_groups = extras.extra_groups;
        let written: Vec<(i64, i64)> = applied
            .iter()
            .map(|a| a.nid)
            .zip(positions.clone())
            .collect();
        (write.push_actions, write.push_queue) = crate::push::writes(extras.push, &written);
        let mut pushers: Vec<i64> = write.push_queue.iter().map(|q| q.pusher_id).collect();
        pushers.sort_unstable();
        pushers.dedup();
        let counted = write
            .push_actions
            .iter()
            .filter(|a| a.counted)
            .map(|a| crate::unread::Counted {
                user_id: a.user_id.clone(),
                thread_id: a.thread_id.clone(),
                highlight: a.highlight,
            })
            .collect();
        write.backward_add = extras.backward_add;
        write.backward_remove = extras.backward_remove;
        let member_override = extras.current.as_ref().map(|c| {
            c.memberships
                .iter()
                .map(|(u, m, _)| (u.clone(), m.clone()))
                .collect::<Vec<_>>()
        });
        write.current = extras.current.map(|mut c| {
            // Membership changes are recorded at the position of the event that made them.
            c.position = positions.last().copied().unwrap_or(0);
            c
        });
        for ((b, a), pos) in built.iter().zip(&applied).zip(&positions) {
            head.pending.insert(a.nid, (*pos, b.pdu.clone()));
        }
        let (reply, done) = tokio::sync::oneshot::channel();
        let write_has_outbox: Vec<String> = {
            let mut d: Vec<String> = write.outbox.iter().map(|(d, _)| d.clone()).collect();
            d.sort();
            d.dedup();
            d
        };
        let job = WriteJob {
            room: write,
            generation: head.generation,
            publish: Publish {
                room: room.clone(),
                built,
                applied,
                positions: positions.clone(),
                tip_group: head.state_group,
                member_override,
                outbox: write_has_outbox,
                pushers,
                counted,
            },
            reply,
        };
        if self.writer.send(job).is_err() {
            self.events_stream.complete(&positions);
            return Err(Error::internal("writer stopped"));
        }
        Ok(done)
    }

    /// Evaluates the push rules of the room's local members for built events (see
    /// `crate::push`); `in_flight` holds the room's events not committed yet.
    async fn evaluate_push(
        &self,
        room: &RoomInfo,
        built: &[Built],
        applied: &[Applied],
        in_flight: &HashMap<i64, Arc<Pdu>>,
    ) -> Vec<crate::push::PendingPush> {
        let events: Vec<crate::push::ToEvaluate<'_>> = built
            .iter()
            .zip(applied)
            .map(|(b, a)| crate::push::ToEvaluate {
                pdu: &b.pdu,
                state_after: &a.state_after,
            })
            .collect();
        crate::push::evaluate(self, room, &events, in_flight).await
    }

    /// Waits for a queued write; on failure the room's head is discarded (reloaded from the
    /// database by the next event), since it includes the events that were not written.
    async fn await_write(
        &self,
        room: &Arc<RoomInfo>,
        generation: u64,
        done: tokio::sync::oneshot::Receiver<Result<Vec<Arc<StoredEvent>>>>,
    ) -> Result<Vec<Arc<StoredEvent>>> {
        let result = done
            .await
            .unwrap_or_else(|_| Err(Error::internal("writer stopped")));
        if result.is_err() {
            let lock = self.head_lock(room.nid);
            let mut guard = lock.lock().await;
            if guard.as_ref().is_some_and(|h| h.generation == generation) {
                *guard = None;
            }
            // Membership caches may have run ahead of the database.
            self.members
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&room.nid);
            self.servers
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&room.nid);
        }
        result
    }

    /// After a commit (called by the writer, in commit order): fills the caches, advances the
    /// room's tip and the stream position, and wakes the users concerned.
    fn publish(self: &Arc<Self>, p: Publish) -> Vec<Arc<StoredEvent>> {
        let Publish {
            room,
            built,
            applied,
            positions,
            tip_group,
            member_override,
            outbox,
            pushers,
            counted,
        } = p;
        let mut stored = Vec::with_capacity(built.len());
        let mut member_changes = Vec::new();
        for ((b, a), pos) in built.into_iter().zip(applied).zip(&positions) {
            if let Some(g) = &a.new_group {
                self.state
                    .insert_group(g.group, a.state_after.clone(), g.chain_len);
            }
            if let Some((target, _)) = &b.redaction {
                self.uncache_event(*target);
            }
            if b.pdu.kind == TimelineEventType::RoomMember && member_override.is_none() {
                if let (Some(sk), Some(m)) = (&b.pdu.state_key, b.pdu.content_str("membership")) {
                    member_changes.push((sk.clone(), m));
                }
            }
            let ev = Arc::new(StoredEvent {
                nid: a.nid,
                room_nid: room.nid,
                stream_ordering: Some(*pos),
                depth: b.pdu.depth,
                state_before: Some(a.state_before),
                state_after: Some(a.group_after()),
                redacted_by: b.late.redacted_by,
                outlier: false,
                rejected: false,
                txn: Some(b.sender_txn.map(|(d, _, t)| (d, t))),
                pdu: b.pdu,
            });
            self.cache_event(ev.clone());
            stored.push(ev);
        }
        if let Some(o) = member_override {
            member_changes = o;
        }
        let members = {
            let mut all = self.members.write().unwrap_or_else(|e| e.into_inner());
            match all.get(&room.nid).cloned() {
                Some(m) if !member_changes.is_empty() => {
                    let mut m = (*m).clone();
                    for (u, mem) in &member_changes {
                        m.insert(u.clone(), mem.clone());
                    }
                    let m = Arc::new(m);
                    all.insert(room.nid, m.clone());
                    Some(m)
                }
                unchanged => unchanged,
            }
        };
        {
            let prev = self.room_position(room.nid);
            let mut recent = self.recent.write().unwrap_or_else(|e| e.into_inner());
            let (complete_after, buf) = recent
                .entry(room.nid)
                .or_insert_with(|| (prev, Default::default()));
            if stored.iter().any(|e| e.pdu.redacts.is_some()) {
                // A redaction rewrites an earlier event: start the buffer afresh after it.
                buf.clear();
                *complete_after = positions.last().copied().unwrap_or(prev);
            } else {
                buf.extend(stored.iter().cloned());
                while buf.len() > RECENT_PER_ROOM {
                    if let Some(old) = buf.pop_front() {
                        *complete_after = old.stream_ordering.unwrap_or(*complete_after);
                    }
                }
            }
        }
        if !member_changes.is_empty() {
            self.servers
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&room.nid);
            self.membership_epoch.fetch_add(1, Ordering::AcqRel);
            let mut users = self.user_rooms.write().unwrap_or_else(|e| e.into_inner());
            for (u, _) in &member_changes {
                users.remove(u);
            }
        }
        if let Some(last) = positions.last() {
            let prev = self.room_position(room.nid);
            self.unread.advance(room.nid, prev, *last, &counted);
            self.room_positions
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(room.nid, *last);
            self.room_tips
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(room.nid, (*last, tip_group));
        }
        self.events_stream.complete(&positions);
        self.outbox_signal.wake(outbox);
        self.push.queued.wake(pushers);
        // Everyone with a membership (joined, invited, knocking, just left) hears of it.
        match members {
            Some(m) => self.notifier.wake(m.keys().map(|s| s.as_str())),
            None => {
                // The members were dropped from the cache meanwhile: load them, then wake.
                let server = self.clone();
                let room_nid = room.nid;
                tokio::spawn(async move {
                    match server.members(room_nid).await {
                        Ok(m) => server.notifier.wake(m.keys().map(|s| s.as_str())),
                        Err(e) => tracing::warn!(error = %e, "loading members to wake"),
                    }
                });
            }
        }
        stored
    }

    /// A room's events with `from < position ≤ to`, oldest first, if the in-memory buffer holds
    /// all of them.
    pub fn recent_events(
        &self,
        room_nid: i64,
        from: i64,
        to: i64,
    ) -> Option<Vec<Arc<StoredEvent>>> {
        let recent = self.recent.read().unwrap_or_else(|e| e.into_inner());
        let (complete_after, buf) = recent.get(&room_nid)?;
        if from < *complete_after {
            return None;
        }
        Some(
            buf.iter()
                .filter(|e| e.stream_ordering.is_some_and(|p| p > from && p <= to))
                .cloned()
                .collect(),
        )
    }

    /// A user's memberships (cached; dropped whenever one of them changes).
    pub async fn user_memberships(
        &self,
        user_id: &str,
    ) -> Result<Arc<Vec<crate::store::MembershipRow>>> {
        if let Some(m) = self
            .user_rooms
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(user_id)
        {
            return Ok(m.clone());
        }
        let epoch = self.membership_epoch.load(Ordering::Acquire);
        let rows = Arc::new(self.store.rooms_of_user(user_id).await?);
        let mut cache = self.user_rooms.write().unwrap_or_else(|e| e.into_inner());
        if self.membership_epoch.load(Ordering::Acquire) == epoch {
            if cache.len() >= 100_000 {
                cache.clear();
            }
            cache.insert(user_id.to_owned(), rows.clone());
        }
        Ok(rows)
    }

    /// Forgets a room for a user.
    pub async fn forget_room(&self, room_nid: i64, user_id: &str) -> Result<()> {
        self.store.forget_room(room_nid, user_id).await?;
        self.user_rooms
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(user_id);
        Ok(())
    }

    /// Answers a job after its write: published when committed; otherwise its stream
    /// positions are released and the error returned.
    fn finish(self: &Arc<Self>, job: WriteJob, written: Result<()>) {
        let answer = match written {
            Ok(()) => Ok(self.publish(job.publish)),
            Err(e) => {
                self.events_stream.complete(&job.publish.positions);
                Err(e)
            }
        };
        let _ = job.reply.send(answer);
    }

    /// Wakes a user's syncs (after account data and similar per-user changes).
    pub fn wake_user(&self, user_id: &str) {
        self.notifier.wake([user_id]);
    }
}

/// One room's events waiting for the group-commit writer.
struct WriteJob {
    room: RoomWrite,
    /// The head generation the events were built on.
    generation: u64,
    publish: Publish,
    reply: tokio::sync::oneshot::Sender<Result<Vec<Arc<StoredEvent>>>>,
}

/// What [`Server::publish`] needs once a job has committed.
struct Publish {
    room: Arc<RoomInfo>,
    built: Vec<Built>,
    applied: Vec<Applied>,
    positions: Vec<i64>,
    tip_group: i64,
    /// Membership changes when the current state was set explicitly.
    member_override: Option<Vec<(String, String)>>,
    /// Destinations with new outbox rows.
    outbox: Vec<String>,
    /// Pushers with notifications queued by the write.
    pushers: Vec<i64>,
    /// The counted push actions written, for the unread counts held in memory.
    counted: Vec<crate::unread::Counted>,
}

/// What a write carries beyond its events.
#[derive(Default)]
pub(crate) struct Extras {
    /// The other servers with joined members, before these events.
    servers: Arc<Vec<String>>,
    /// Resolved or received state groups.
    extra_groups: Vec<crate::store::GroupWrite>,
    /// The current state when it is not simply the last event's state.
    current: Option<crate::store::CurrentWrite>,
    /// The server whose event we relay to the room as its resident (send_join and friends).
    relay_from: Option<String>,
    /// Parents the events name that the timeline does not hold: `(event ID, depth)`.
    backward_add: Vec<(String, i64)>,
    /// Backward extremities the events are.
    backward_remove: Vec<String>,
    /// The push rules' outcome for these events (see `crate::push`).
    push: Vec<crate::push::PendingPush>,
}

/// Queues with new rows, by key, for the one task that sends them: destinations for the
/// federation sender ([`OutboxSignal`]), pushers for the push sender.
pub struct KeyedSignal<K> {
    pending: std::sync::Mutex<std::collections::HashSet<K>>,
    notify: tokio::sync::Notify,
}

impl<K> Default for KeyedSignal<K> {
    fn default() -> Self {
        KeyedSignal {
            pending: Default::default(),
            notify: Default::default(),
        }
    }
}

/// Destinations whose outbox has new rows, for the federation sender.
pub type OutboxSignal = KeyedSignal<String>;

impl<K: Eq + std::hash::Hash> KeyedSignal<K> {
    /// Records queues with new rows and wakes the sender.
    pub fn wake(&self, keys: Vec<K>) {
        if keys.is_empty() {
            return;
        }
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(keys);
        self.notify.notify_one();
    }

    /// Waits until some queue has new rows, and takes the set.
    pub async fn next(&self) -> Vec<K> {
        loop {
            let taken: Vec<K> = self
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .drain()
                .collect();
            if !taken.is_empty() {
                return taken;
            }
            self.notify.notified().await;
        }
    }
}

/// Most rooms' jobs written in one transaction.
const MAX_BATCH_JOBS: usize = 512;

/// The group-commit writer: takes every job that is waiting, writes them in one transaction,
/// publishes and answers each in order. If a batch fails, its jobs are retried one by one so
/// that one bad job fails alone; jobs built on top of a failed one (same room, same head
/// generation) fail with it, never reaching the database.
async fn run_writer(
    server: std::sync::Weak<Server>,
    mut jobs: tokio::sync::mpsc::UnboundedReceiver<WriteJob>,
) {
    let mut failed: std::collections::HashSet<(i64, u64)> = Default::default();
    while let Some(first) = jobs.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_JOBS {
            match jobs.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let Some(server) = server.upgrade() else {
            return;
        };
        if failed.len() > 10_000 {
            failed.clear();
        }
        let (live, doomed): (Vec<WriteJob>, Vec<WriteJob>) = batch
            .into_iter()
            .partition(|j| !failed.contains(&(j.room.room_nid, j.generation)));
        for j in doomed {
            let e = Error::internal("an earlier event of this room failed to commit");
            server.finish(j, Err(e));
        }
        if live.is_empty() {
            continue;
        }
        let rooms: Vec<&RoomWrite> = live.iter().map(|j| &j.room).collect();
        let result = server.store.write_rooms(&rooms).await;
        match result {
            Ok(()) => {
                for j in live {
                    server.finish(j, Ok(()));
                }
            }
            Err(e) if live.len() == 1 => {
                if let Some(j) = live.into_iter().next() {
                    failed.insert((j.room.room_nid, j.generation));
                    server.finish(j, Err(e));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, jobs = live.len(), "batch write failed; retrying singly");
                for j in live {
                    let key = (j.room.room_nid, j.generation);
                    let result = if failed.contains(&key) {
                        Err(Error::internal(
                            "an earlier event of this room failed to commit",
                        ))
                    } else {
                        server.store.write_rooms(&[&j.room]).await
                    };
                    if result.is_err() {
                        failed.insert(key);
                    }
                    server.finish(j, result);
                }
            }
        }
    }
}

struct Built {
    pdu: Arc<Pdu>,
    sender_txn: Option<(String, String, String)>,
    /// `(target nid, its redacted JSON)` of a redaction applied now.
    redaction: Option<(i64, String)>,
    /// Redactions of another server's event whose other half arrived first.
    late: LateRedaction,
}

struct AppliedGroup {
    group: i64,
    state_key_nid: i64,
    parent: Option<i64>,
    chain_len: i64,
    edits: Vec<(i64, i64)>,
}

struct Applied {
    nid: i64,
    state_before: i64,
    new_group: Option<AppliedGroup>,
    state_after: Arc<StateMap>,
}

impl Applied {
    /// The state group after the event.
    fn group_after(&self) -> i64 {
        self.new_group
            .as_ref()
            .map_or(self.state_before, |g| g.group)
    }
}

/// `(user, device, scope, txn_id) → event ID` of client sends since start (bounded); the
/// database's unique key on events' transaction IDs remains the authority across restarts.
#[derive(Default)]
pub struct TxnCache {
    map: std::sync::Mutex<HashMap<(String, String, String, String), String>>,
}

impl TxnCache {
    pub fn get(&self, user: &str, device: &str, scope: &str, txn: &str) -> Option<String> {
        let key = (
            user.to_owned(),
            device.to_owned(),
            scope.to_owned(),
            txn.to_owned(),
        );
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned()
    }

    pub fn put(&self, user: &str, device: &str, scope: &str, txn: &str, event_id: &str) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= 100_000 {
            map.clear();
        }
        map.insert(
            (
                user.to_owned(),
                device.to_owned(),
                scope.to_owned(),
                txn.to_owned(),
            ),
            event_id.to_owned(),
        );
    }
}

/// A random alphanumeric string (IDs, tokens).
pub fn random_string(n: usize) -> String {
    use rand::{distributions::Alphanumeric, Rng};
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}
