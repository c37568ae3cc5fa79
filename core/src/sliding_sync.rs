//! Simplified sliding sync (MSC4186, the wire format clients speak since 2025-09: `lists` with
//! `ranges`, `room_subscriptions`, `required_state` tuples with `*`/`$LAZY`/`$ME`, and the
//! `to_device`, `e2ee`, `account_data`, `receipts` and `typing` extensions).
//!
//! A *connection* is `(user, device, conn_id)`. The server remembers, per connection and in
//! memory only, what it sent: for each room the membership, the stream position up to which
//! its timeline and state were sent, the room config used and the lazily sent members. Each
//! response gets a `pos` naming the remembered state it leads to; a request with that `pos`
//! computes only what changed since. States are kept for the last few `pos` of a connection
//! (so a retried or cancelled request still finds its `pos`), connections expire after
//! [`CONN_IDLE`] and each device keeps at most [`CONNS_PER_DEVICE`]. An unknown, expired or
//! foreign `pos` is `M_UNKNOWN_POS`, after which clients start over.
//!
//! A `pos` is `<sync token>.<connection nonce>.<seq>`: its first part is an ordinary sync
//! token of the position the response was computed at, so it also works as a `from` token
//! for `/messages` (see [`crate::token::PageToken::parse`]).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ruma::events::TimelineEventType;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::{
    server::{RoomInfo, StoredEvent},
    state::StateMap,
    store::MembershipRow,
    token::{PageToken, SyncToken},
    Error, ErrorKind, Result, Server,
};

/// How long an unused connection is remembered.
pub const CONN_IDLE: Duration = Duration::from_secs(30 * 60);
/// Connections remembered per device (the least recently used one goes first).
pub const CONNS_PER_DEVICE: usize = 10;
/// Connections remembered in all.
const MAX_CONNS: usize = 50_000;
/// States kept per connection: the newest `pos` and a few before it.
const STATES_PER_CONN: usize = 4;
/// Cap on `timeline_limit`.
const MAX_TIMELINE_LIMIT: u64 = 500;
/// At most this many lists, with names of at most this many bytes (MSC4186).
const MAX_LISTS: usize = 100;
const MAX_LIST_NAME: usize = 64;
/// Heroes reported per room.
const MAX_HEROES: usize = 5;

// Request ---------------------------------------------------------------------------------

/// The request body. `pos`, `timeout` and `set_presence` may also come in the body (the
/// newest MSC text); the query parameters win.
#[derive(Debug, Default, Deserialize)]
pub struct Body {
    #[serde(default)]
    pub conn_id: Option<String>,
    #[serde(default)]
    pub txn_id: Option<String>,
    #[serde(default)]
    pub lists: BTreeMap<String, ListConfig>,
    #[serde(default)]
    pub room_subscriptions: BTreeMap<String, RoomConfig>,
    #[serde(default)]
    pub extensions: Extensions,
    #[serde(default)]
    pub pos: Option<String>,
    #[serde(default)]
    pub timeout: Option<u64>,
    #[serde(default)]
    pub set_presence: Option<String>,
}

/// One list: a window (`ranges`, or the newest text's single `range`) into the user's rooms
/// sorted by activity, after `filters`.
#[derive(Debug, Default, Deserialize)]
pub struct ListConfig {
    #[serde(default)]
    pub ranges: Option<Vec<(u64, u64)>>,
    #[serde(default)]
    pub range: Option<(u64, u64)>,
    #[serde(default)]
    pub timeline_limit: Option<u64>,
    #[serde(default)]
    pub required_state: RequiredState,
    #[serde(default)]
    pub filters: Option<ListFilters>,
}

/// A room subscription's config.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct RoomConfig {
    #[serde(default)]
    pub timeline_limit: Option<u64>,
    #[serde(default)]
    pub required_state: RequiredState,
}

/// `required_state`: `[[type, state_key], …]` (2025-09 shape) or
/// `{include: [{type?, state_key?}], exclude: […], lazy_members}` (newest text).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RequiredState {
    Tuples(Vec<(String, String)>),
    Shaped {
        #[serde(default)]
        include: Vec<StateFilter>,
        #[serde(default)]
        exclude: Vec<StateFilter>,
        #[serde(default)]
        lazy_members: bool,
    },
}

impl Default for RequiredState {
    fn default() -> Self {
        RequiredState::Tuples(Vec::new())
    }
}

/// A `{type, state_key}` matcher of the newest text; an absent field matches anything.
#[derive(Debug, Clone, Deserialize)]
pub struct StateFilter {
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub state_key: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
pub struct ListFilters {
    #[serde(default)]
    pub is_dm: Option<bool>,
    #[serde(default)]
    pub is_encrypted: Option<bool>,
    #[serde(default)]
    pub is_invite: Option<bool>,
    /// `null` entries stand for rooms without a type.
    #[serde(default)]
    pub room_types: Option<Vec<Option<String>>>,
    #[serde(default)]
    pub not_room_types: Option<Vec<Option<String>>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Extensions {
    #[serde(default)]
    pub to_device: Option<ToDeviceConfig>,
    #[serde(default)]
    pub e2ee: Option<Toggle>,
    #[serde(default)]
    pub account_data: Option<RoomsConfig>,
    #[serde(default)]
    pub receipts: Option<RoomsConfig>,
    #[serde(default)]
    pub typing: Option<RoomsConfig>,
}

#[derive(Debug, Default, Deserialize)]
pub struct ToDeviceConfig {
    #[serde(default)]
    pub enabled: Option<bool>,
    #[serde(default)]
    pub limit: Option<u64>,
    #[serde(default)]
    pub since: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Toggle {
    #[serde(default)]
    pub enabled: Option<bool>,
}

/// An extension that applies to some rooms: those of `lists` (names) and `rooms` (room IDs,
/// `"*"` = every subscribed room). Both absent: every room the connection knows.
#[derive(Debug, Default, Deserialize)]
pub struct RoomsConfig {
    #[serde(default)]
    pub enabled: Option<bool>,
    #[serde(default)]
    pub lists: Option<Vec<String>>,
    #[serde(default)]
    pub rooms: Option<Vec<String>>,
}

/// One sliding-sync request of a device.
pub struct SlidingRequest {
    pub user_id: String,
    pub device_id: String,
    pub pos: Option<String>,
    pub timeout: Duration,
    pub set_presence: Option<String>,
    pub body: Body,
}

/// Which state events a room config asks for, with `$ME` resolved. `*` is a wildcard.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct StateSelect {
    include: BTreeSet<(String, String)>,
    exclude: BTreeSet<(String, String)>,
    lazy: bool,
}

const MEMBER: &str = "m.room.member";
const ANY: &str = "*";

impl StateSelect {
    fn from_request(rs: &RequiredState, user: &str) -> StateSelect {
        let resolve = |k: &str| {
            if k == "$ME" {
                user.to_owned()
            } else {
                k.to_owned()
            }
        };
        let mut out = StateSelect::default();
        match rs {
            RequiredState::Tuples(pairs) => {
                for (t, k) in pairs {
                    if t == MEMBER && k == "$LAZY" {
                        out.lazy = true;
                    } else {
                        out.include.insert((t.clone(), resolve(k)));
                    }
                }
            }
            RequiredState::Shaped {
                include,
                exclude,
                lazy_members,
            } => {
                let pair = |f: &StateFilter| {
                    (
                        f.kind.clone().unwrap_or_else(|| ANY.into()),
                        f.state_key
                            .as_deref()
                            .map(resolve)
                            .unwrap_or_else(|| ANY.into()),
                    )
                };
                out.include = include.iter().map(pair).collect();
                out.exclude = exclude.iter().map(pair).collect();
                out.lazy = *lazy_members;
            }
        }
        out
    }

    /// The superset of two configs.
    fn merge(&mut self, other: &StateSelect) {
        self.include.extend(other.include.iter().cloned());
        self.exclude = self.exclude.intersection(&other.exclude).cloned().collect();
        self.lazy |= other.lazy;
    }

    fn has(set: &BTreeSet<(String, String)>, t: &str, k: &str) -> bool {
        [(t, k), (t, ANY), (ANY, k), (ANY, ANY)]
            .iter()
            .any(|(a, b)| set.contains(&((*a).to_owned(), (*b).to_owned())))
    }

    /// Whether state `(t, k)` is wanted; lazily loaded members only when in `lazy_users`.
    fn wants(&self, t: &str, k: &str, lazy_users: &HashSet<String>) -> bool {
        if t == MEMBER {
            let explicit = self.include.contains(&(MEMBER.into(), k.into()))
                || self.include.contains(&(MEMBER.into(), ANY.into()));
            if explicit {
                return true;
            }
            if self.lazy {
                return lazy_users.contains(k);
            }
        }
        Self::has(&self.include, t, k) && !Self::has(&self.exclude, t, k)
    }

    /// Whether answering needs every state event (a wildcard other than lazy members).
    fn needs_all(&self) -> bool {
        self.include.iter().any(|(t, k)| t == ANY || k == ANY)
    }
}

/// A room's config combined over every list and subscription that matched it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Combined {
    timeline_limit: u64,
    state: StateSelect,
}

impl Combined {
    fn merge(&mut self, limit: Option<u64>, state: &StateSelect) {
        self.timeline_limit = self
            .timeline_limit
            .max(limit.unwrap_or(0).min(MAX_TIMELINE_LIMIT));
        self.state.merge(state);
    }
}

/// Checks a request for what its types cannot say.
fn validate(body: &Body) -> Result<()> {
    if body.lists.len() > MAX_LISTS {
        return Err(Error::invalid_param(format!(
            "At most {MAX_LISTS} lists are allowed"
        )));
    }
    for (name, list) in &body.lists {
        if name.len() > MAX_LIST_NAME {
            return Err(Error::invalid_param(format!(
                "List names are at most {MAX_LIST_NAME} bytes"
            )));
        }
        for (a, b) in list.ranges.iter().flatten().chain(list.range.iter()) {
            if a > b {
                return Err(Error::invalid_param(format!(
                    "Range [{a}, {b}] of list {name} is reversed"
                )));
            }
        }
    }
    for room in body.room_subscriptions.keys() {
        if ruma::RoomId::parse(room).is_err() {
            return Err(Error::invalid_param(format!(
                "Invalid room ID in room_subscriptions: {room}"
            )));
        }
    }
    if let Some(since) = body
        .extensions
        .to_device
        .as_ref()
        .and_then(|t| t.since.as_deref())
    {
        if !since.parse::<i64>().is_ok_and(|s| s >= 0) {
            return Err(Error::invalid_param("Invalid to_device since token"));
        }
    }
    Ok(())
}

// Connections -----------------------------------------------------------------------------

/// What a connection has sent about one room.
#[derive(Debug, Clone)]
struct SentRoom {
    membership: String,
    /// Stream position up to which the room's timeline and state were sent.
    pos: i64,
    config: Combined,
    /// Members sent because of `$LAZY`.
    lazy_sent: HashSet<String>,
    /// `(notification_count, highlight_count)` last sent (joined rooms).
    counts: Option<(i64, i64)>,
}

/// A joined room's unread counts, flattened into the room as MSC4186 has them.
fn insert_counts(body: &mut Map<String, Value>, (notifications, highlights): (i64, i64)) {
    body.insert("notification_count".into(), json!(notifications));
    body.insert("highlight_count".into(), json!(highlights));
}

impl Server {
    /// A user's unread `(notifications, highlights)` in a room, over all its threads.
    async fn total_unread(&self, user_id: &str, room: &RoomInfo) -> Result<(i64, i64)> {
        let counts = crate::push::unread_counts(self, user_id, room).await?;
        Ok(crate::push::total(&counts))
    }
}

/// What a connection has sent, as of one `pos`.
#[derive(Debug, Clone, Default)]
struct ConnState {
    token: SyncToken,
    rooms: HashMap<i64, SentRoom>,
    list_counts: BTreeMap<String, usize>,
}

type ConnKey = (String, String, String);

struct Conn {
    nonce: String,
    next_seq: u64,
    states: BTreeMap<u64, Arc<ConnState>>,
    last_used: Instant,
}

/// Every connection's remembered states (in memory: after a restart every `pos` is unknown).
#[derive(Default)]
pub struct Connections {
    inner: Mutex<ConnTable>,
}

#[derive(Default)]
struct ConnTable {
    conns: HashMap<ConnKey, Conn>,
    last_sweep: Option<Instant>,
}

fn unknown_pos() -> Error {
    Error::new(
        ErrorKind::UnknownPos,
        "Unknown position; start a new connection",
    )
}

impl Connections {
    /// Starts a request: a new connection (no `pos`, replacing any of the same key), or the
    /// state a `pos` of the caller's connection leads to.
    fn begin(&self, key: &ConnKey, pos: Option<&str>) -> Result<(String, Option<Arc<ConnState>>)> {
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if t.last_sweep
            .is_none_or(|s| now.duration_since(s) > Duration::from_secs(60))
        {
            t.conns
                .retain(|_, c| now.duration_since(c.last_used) < CONN_IDLE);
            t.last_sweep = Some(now);
        }
        let Some(pos) = pos else {
            let nonce = crate::server::random_string(8);
            t.conns.insert(
                key.clone(),
                Conn {
                    nonce: nonce.clone(),
                    next_seq: 1,
                    states: BTreeMap::new(),
                    last_used: now,
                },
            );
            // Bounds: per device, then in all (least recently used first).
            let mut of_device: Vec<(Instant, ConnKey)> = t
                .conns
                .iter()
                .filter(|(k, _)| k.0 == key.0 && k.1 == key.1)
                .map(|(k, c)| (c.last_used, k.clone()))
                .collect();
            if of_device.len() > CONNS_PER_DEVICE {
                of_device.sort();
                for (_, k) in &of_device[..of_device.len() - CONNS_PER_DEVICE] {
                    t.conns.remove(k);
                }
            }
            if t.conns.len() > MAX_CONNS {
                let oldest = t
                    .conns
                    .iter()
                    .filter(|(k, _)| *k != key)
                    .min_by_key(|(_, c)| c.last_used)
                    .map(|(k, _)| k.clone());
                if let Some(oldest) = oldest {
                    t.conns.remove(&oldest);
                }
            }
            return Ok((nonce, None));
        };
        let (nonce, seq) = parse_pos(pos).ok_or_else(unknown_pos)?;
        let conn = t.conns.get_mut(key).ok_or_else(unknown_pos)?;
        if conn.nonce != nonce {
            return Err(unknown_pos());
        }
        let state = conn.states.get(&seq).cloned().ok_or_else(unknown_pos)?;
        // The client has processed `seq`: earlier states are dead.
        conn.states = conn.states.split_off(&seq);
        conn.last_used = now;
        Ok((conn.nonce.clone(), Some(state)))
    }

    /// Remembers the state a response leads to; returns its `seq` (None when the connection
    /// was replaced or expired meanwhile).
    fn commit(&self, key: &ConnKey, nonce: &str, state: ConnState) -> Option<u64> {
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let conn = t.conns.get_mut(key)?;
        if conn.nonce != nonce {
            return None;
        }
        let seq = conn.next_seq;
        conn.next_seq += 1;
        conn.states.insert(seq, Arc::new(state));
        while conn.states.len() > STATES_PER_CONN {
            conn.states.pop_first();
        }
        conn.last_used = Instant::now();
        Some(seq)
    }
}

/// `<sync token>.<nonce>.<seq>` → `(nonce, seq)`.
fn parse_pos(pos: &str) -> Option<(&str, u64)> {
    let mut parts = pos.split('.');
    let token = parts.next()?;
    let nonce = parts.next()?;
    let seq = parts.next()?.parse().ok()?;
    if parts.next().is_some() || SyncToken::parse(token).is_err() {
        return None;
    }
    Some((nonce, seq))
}

// Computing -------------------------------------------------------------------------------

/// One room the user may see in lists.
struct Candidate {
    m: MembershipRow,
    room: Arc<RoomInfo>,
    /// Activity position for ordering (and `bump_stamp`).
    activity: i64,
}

/// What filters ask about a room.
#[derive(Default, Clone)]
struct Facts {
    encrypted: bool,
    room_type: Option<String>,
}

/// The result of one computation, before it is committed.
struct Computed {
    body: Map<String, Value>,
    state: ConnState,
    empty: bool,
}

impl Server {
    /// Runs one sliding-sync request, long-polling up to `timeout` when it continues a
    /// connection and nothing changed.
    pub async fn sliding_sync(&self, req: &SlidingRequest) -> Result<Value> {
        validate(&req.body)?;
        crate::presence::check_set_presence(req.set_presence.as_deref())?;
        let key = (
            req.user_id.clone(),
            req.device_id.clone(),
            req.body.conn_id.clone().unwrap_or_default(),
        );
        let (nonce, prev) = self.sliding.begin(&key, req.pos.as_deref())?;
        let _syncing =
            self.presence
                .syncing(&req.user_id, &req.device_id, req.set_presence.as_deref());
        let mut wake = self.notifier.subscribe(&req.user_id);
        wake.borrow_and_update();
        let timeout = if prev.is_some() {
            req.timeout
        } else {
            Duration::ZERO
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last: Option<SyncToken> = None;
        let computed = loop {
            let now = self.current_token();
            let stopping = self
                .shutting_down
                .load(std::sync::atomic::Ordering::Relaxed);
            if last.is_none_or(|l| !l.covers(&now)) || stopping {
                let c = Box::pin(self.compute_sliding(req, prev.as_deref(), now)).await?;
                if !c.empty || stopping || tokio::time::Instant::now() >= deadline {
                    break c;
                }
                last = Some(now);
            }
            match tokio::time::timeout_at(deadline, wake.changed()).await {
                Ok(Ok(())) => {
                    wake.borrow_and_update();
                }
                _ => {
                    let now = self.current_token();
                    break Box::pin(self.compute_sliding(req, prev.as_deref(), now)).await?;
                }
            }
        };
        let Computed {
            mut body, state, ..
        } = computed;
        let token = state.token;
        let seq = self.sliding.commit(&key, &nonce, state).unwrap_or(0);
        body.insert(
            "pos".into(),
            json!(format!("{}.{nonce}.{seq}", token.encode())),
        );
        if let Some(txn) = &req.body.txn_id {
            body.insert("txn_id".into(), json!(txn));
        }
        Ok(Value::Object(body))
    }

    async fn compute_sliding(
        &self,
        req: &SlidingRequest,
        prev: Option<&ConnState>,
        now: SyncToken,
    ) -> Result<Computed> {
        let user = req.user_id.as_str();
        let since = prev.map(|p| p.token);
        let mut state = prev.cloned().unwrap_or_default();
        let previous = state.token;
        state.token = now;

        let direct = self.direct_rooms(user).await?;
        let cands = self.candidates(user, prev, now).await?;
        let mut facts: HashMap<i64, Facts> = HashMap::new();

        // Lists: filter, count, take the ranges; each room's combined config.
        let mut selected: HashMap<i64, Combined> = HashMap::new();
        let mut room_lists: HashMap<i64, Vec<String>> = HashMap::new();
        let mut lists_out = Map::new();
        let mut counts = BTreeMap::new();
        for (name, list) in &req.body.lists {
            let select = StateSelect::from_request(&list.required_state, user);
            let mut matching: Vec<&Candidate> = Vec::new();
            for c in &cands {
                if self
                    .matches_filters(c, list.filters.as_ref(), &direct, &mut facts)
                    .await?
                {
                    matching.push(c);
                }
            }
            let count = matching.len();
            lists_out.insert(name.clone(), json!({ "count": count }));
            counts.insert(name.clone(), count);
            let ranges: Vec<(u64, u64)> = match (&list.ranges, list.range) {
                (Some(r), _) => r.clone(),
                (None, Some(r)) => vec![r],
                (None, None) => vec![(0, u64::MAX)],
            };
            for (a, b) in ranges {
                let (a, b) = (a as usize, b.min(usize::MAX as u64 - 1) as usize);
                for c in matching.iter().skip(a).take(b.saturating_sub(a) + 1) {
                    selected
                        .entry(c.room.nid)
                        .or_default()
                        .merge(list.timeline_limit, &select);
                    room_lists.entry(c.room.nid).or_default().push(name.clone());
                }
            }
        }
        // Subscriptions: rooms the user is or was in.
        let mut subscribed: HashSet<i64> = HashSet::new();
        let mut extra: Vec<Candidate> = Vec::new();
        for (room_id, cfg) in &req.body.room_subscriptions {
            let Ok(rid) = ruma::RoomId::parse(room_id) else {
                continue;
            };
            let Some(room) = self.room(&rid).await? else {
                continue;
            };
            let nid = room.nid;
            if !cands.iter().chain(extra.iter()).any(|c| c.room.nid == nid) {
                let Some(m) = self
                    .user_memberships(user)
                    .await?
                    .iter()
                    .find(|m| m.room_nid == nid && m.stream_ordering <= now.events && !m.forgotten)
                    .cloned()
                else {
                    continue;
                };
                extra.push(Candidate {
                    activity: m.stream_ordering,
                    m,
                    room,
                });
            }
            subscribed.insert(nid);
            selected.entry(nid).or_default().merge(
                cfg.timeline_limit,
                &StateSelect::from_request(&cfg.required_state, user),
            );
        }

        // Rooms: what changed for each selected room since it was last sent.
        let mut rooms_out = Map::new();
        let mut first_sent: HashSet<i64> = HashSet::new();
        for c in cands.iter().chain(extra.iter()) {
            let Some(config) = selected.get(&c.room.nid) else {
                continue;
            };
            let sent = state.rooms.get(&c.room.nid).cloned();
            if let Some((room_body, record)) = self
                .sliding_room(req, c, config, sent.as_ref(), (previous, now), &direct)
                .await?
            {
                if sent.is_none() {
                    first_sent.insert(c.room.nid);
                }
                state.rooms.insert(c.room.nid, record);
                rooms_out.insert(c.room.room_id.to_string(), Value::Object(room_body));
            }
        }

        // Extensions.
        let ext = &req.body.extensions;
        let mut ext_out = Map::new();
        let mut ext_news = false;
        if let Some(td) = ext.to_device.as_ref().filter(|t| t.enabled == Some(true)) {
            let since_td = td
                .since
                .as_deref()
                .and_then(|s| s.parse::<i64>().ok())
                .map(|s| s.min(now.to_device));
            let batch = self
                .to_device_batch(user, &req.device_id, since_td, now.to_device)
                .await?;
            ext_news |= !batch.events.is_empty();
            ext_out.insert(
                "to_device".into(),
                json!({ "next_batch": batch.next.to_string(), "events": batch.events }),
            );
        }
        if ext.e2ee.as_ref().is_some_and(|e| e.enabled == Some(true)) {
            let mut e2ee = Map::new();
            if let Some(since) = since {
                let delta = self.device_list_delta(user, since, now).await?;
                if !delta.changed.is_empty() || !delta.left.is_empty() {
                    ext_news = true;
                    e2ee.insert(
                        "device_lists".into(),
                        json!({ "changed": delta.changed, "left": delta.left }),
                    );
                }
            }
            let (otk, fallback) = self.key_counts(user, &req.device_id).await?;
            e2ee.insert("device_one_time_keys_count".into(), json!(otk));
            e2ee.insert("device_unused_fallback_key_types".into(), json!(fallback));
            ext_out.insert("e2ee".into(), Value::Object(e2ee));
        }
        // Room IDs of the rooms considered, for the room extensions (when one is on).
        let on = |c: Option<&RoomsConfig>| c.is_some_and(|c| c.enabled == Some(true));
        let room_ids: HashMap<i64, String> = if on(ext.account_data.as_ref())
            || on(ext.receipts.as_ref())
            || on(ext.typing.as_ref())
        {
            cands
                .iter()
                .chain(extra.iter())
                .map(|c| (c.room.nid, c.room.room_id.to_string()))
                .collect()
        } else {
            HashMap::new()
        };
        if let Some(ad) = ext
            .account_data
            .as_ref()
            .filter(|a| a.enabled == Some(true))
        {
            let wanted: HashSet<String> = state
                .rooms
                .keys()
                .filter(|nid| extension_applies(ad, **nid, &room_lists, &subscribed, &room_ids))
                .filter_map(|nid| room_ids.get(nid).cloned())
                .collect();
            let fresh: HashSet<String> = first_sent
                .iter()
                .filter_map(|nid| room_ids.get(nid).cloned())
                .collect();
            let (global, rooms, news) = self
                .sliding_account_data(user, since, now, &wanted, &fresh)
                .await?;
            ext_news |= news;
            ext_out.insert(
                "account_data".into(),
                json!({ "global": global, "rooms": rooms }),
            );
        }

        if let Some(rc) = ext.receipts.as_ref().filter(|r| r.enabled == Some(true)) {
            // Rooms sent for the first time now get their receipts in full, the others what
            // moved since the previous response.
            let (mut fresh, mut known) = (HashSet::new(), HashSet::new());
            // Receipts are for members only (not invitees, nor after a leave).
            for (nid, sent) in &state.rooms {
                if sent.membership != "join"
                    || !extension_applies(rc, *nid, &room_lists, &subscribed, &room_ids)
                {
                    continue;
                }
                let Some(id) = room_ids.get(nid).cloned() else {
                    continue;
                };
                if since.is_none() || first_sent.contains(nid) {
                    fresh.insert(id);
                } else {
                    known.insert(id);
                }
            }
            let mut rooms = self
                .receipts_for_rooms(user, &fresh, None, now.receipts)
                .await?;
            if let Some(since) = since.filter(|s| s.receipts < now.receipts) {
                rooms.extend(
                    self.receipts_for_rooms(user, &known, Some(since.receipts), now.receipts)
                        .await?,
                );
            }
            ext_news |= !rooms.is_empty();
            ext_out.insert("receipts".into(), json!({ "rooms": rooms }));
        }

        if let Some(tc) = ext.typing.as_ref().filter(|t| t.enabled == Some(true)) {
            // Rooms sent for the first time now get who types there (if anyone); the others
            // their typing set if it changed since the previous response (as `/sync` does).
            let everything = crate::filter::EventFilter::default();
            let mut rooms = Map::new();
            for (nid, sent) in &state.rooms {
                if sent.membership != "join"
                    || !extension_applies(tc, *nid, &room_lists, &subscribed, &room_ids)
                {
                    continue;
                }
                let Some(id) = room_ids.get(nid) else {
                    continue;
                };
                let since = since
                    .filter(|_| !first_sent.contains(nid))
                    .map(|s| s.typing);
                if let Some(event) = self.typing_for_sync(id, since, now.typing, &everything) {
                    rooms.insert(id.clone(), event);
                }
            }
            ext_news |= !rooms.is_empty();
            ext_out.insert("typing".into(), json!({ "rooms": rooms }));
        }

        let empty =
            rooms_out.is_empty() && !ext_news && prev.is_some_and(|p| p.list_counts == counts);
        state.list_counts = counts;
        let mut body = Map::new();
        body.insert("lists".into(), Value::Object(lists_out));
        body.insert("rooms".into(), Value::Object(rooms_out));
        body.insert("extensions".into(), Value::Object(ext_out));
        Ok(Computed { body, state, empty })
    }

    /// The rooms listed in the user's `m.direct` account data.
    async fn direct_rooms(&self, user: &str) -> Result<HashSet<String>> {
        let Some(raw) = self.store.account_data(user, "", "m.direct").await? else {
            return Ok(HashSet::new());
        };
        let v: Value = serde_json::from_str(&raw).unwrap_or(Value::Null);
        Ok(v.as_object()
            .into_iter()
            .flat_map(|m| m.values())
            .filter_map(|rooms| rooms.as_array())
            .flatten()
            .filter_map(|r| r.as_str().map(str::to_owned))
            .collect())
    }

    /// The user's rooms for lists, most recent activity first: joined, invited, knocked,
    /// banned and kicked rooms, and rooms the user left that this connection sent and has not
    /// yet reported the leave of.
    async fn candidates(
        &self,
        user: &str,
        prev: Option<&ConnState>,
        now: SyncToken,
    ) -> Result<Vec<Candidate>> {
        let mut out = Vec::new();
        for m in self.user_memberships(user).await?.iter() {
            if m.stream_ordering > now.events || m.forgotten {
                continue;
            }
            let include = match m.membership.as_str() {
                "join" | "invite" | "knock" | "ban" => true,
                _ => {
                    let sent = prev.and_then(|p| p.rooms.get(&m.room_nid));
                    let unreported = sent.is_some_and(|s| s.membership != "leave");
                    unreported || {
                        // Kicked: the leave was someone else's doing.
                        let ev = self.event(m.event_nid).await?;
                        ev.pdu.sender.as_str() != user
                    }
                }
            };
            if !include {
                continue;
            }
            let activity = if m.membership == "join" {
                self.room_position(m.room_nid).max(m.stream_ordering)
            } else {
                m.stream_ordering
            };
            let room = self.room_by_nid(m.room_nid).await?;
            out.push(Candidate {
                m: m.clone(),
                room,
                activity,
            });
        }
        out.sort_by(|a, b| {
            b.activity
                .cmp(&a.activity)
                .then_with(|| a.room.room_id.cmp(&b.room.room_id))
        });
        Ok(out)
    }

    async fn matches_filters(
        &self,
        c: &Candidate,
        filters: Option<&ListFilters>,
        direct: &HashSet<String>,
        facts: &mut HashMap<i64, Facts>,
    ) -> Result<bool> {
        let Some(f) = filters else {
            return Ok(true);
        };
        if let Some(want) = f.is_invite {
            if (c.m.membership == "invite") != want {
                return Ok(false);
            }
        }
        if let Some(want) = f.is_dm {
            if self.is_dm(c, direct).await? != want {
                return Ok(false);
            }
        }
        if f.is_encrypted.is_some() || f.room_types.is_some() || f.not_room_types.is_some() {
            let fa = match facts.get(&c.room.nid) {
                Some(fa) => fa.clone(),
                None => {
                    let fa = self.room_facts(c).await?;
                    facts.insert(c.room.nid, fa.clone());
                    fa
                }
            };
            if f.is_encrypted.is_some_and(|want| fa.encrypted != want) {
                return Ok(false);
            }
            if let Some(types) = &f.room_types {
                if !types.contains(&fa.room_type) {
                    return Ok(false);
                }
            }
            if let Some(types) = &f.not_room_types {
                if types.contains(&fa.room_type) {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// A DM: listed in `m.direct`, or an invite marked `is_direct`.
    async fn is_dm(&self, c: &Candidate, direct: &HashSet<String>) -> Result<bool> {
        if direct.contains(c.room.room_id.as_str()) {
            return Ok(true);
        }
        if c.m.membership == "invite" {
            let ev = self.event(c.m.event_nid).await?;
            return Ok(ev.pdu.content_value()["is_direct"] == json!(true));
        }
        Ok(false)
    }

    /// The state the user may see of a room: current for members, as of the membership
    /// otherwise; `None` for a room known only through stripped invite state.
    async fn visible_state(&self, c: &Candidate) -> Result<Option<Arc<StateMap>>> {
        if c.m.membership == "join" {
            return Ok(Some(self.current_state(&c.room).await?));
        }
        let ev = self.event(c.m.event_nid).await?;
        match ev.state_after {
            Some(g) if g != 0 => Ok(Some(self.state_map(g).await?)),
            _ => Ok(None),
        }
    }

    async fn room_facts(&self, c: &Candidate) -> Result<Facts> {
        if let Some(state) = self.visible_state(c).await? {
            let encrypted = self
                .state_event(&state, "m.room.encryption", "")
                .await?
                .is_some();
            let room_type = self.state_field(&state, "m.room.create", "type").await?;
            return Ok(Facts {
                encrypted,
                room_type,
            });
        }
        let stripped = self.stripped_state(&c.room, c.m.event_nid).await?;
        let mut fa = Facts::default();
        for e in stripped {
            match e["type"].as_str() {
                Some("m.room.encryption") => fa.encrypted = true,
                Some("m.room.create") => {
                    fa.room_type = e["content"]["type"].as_str().map(str::to_owned)
                }
                _ => {}
            }
        }
        Ok(fa)
    }

    /// One room's entry, or `None` when nothing changed since it was last sent; with the
    /// record of what is now sent.
    async fn sliding_room(
        &self,
        req: &SlidingRequest,
        c: &Candidate,
        config: &Combined,
        sent: Option<&SentRoom>,
        (previous, now): (SyncToken, SyncToken),
        direct: &HashSet<String>,
    ) -> Result<Option<(Map<String, Value>, SentRoom)>> {
        let user = req.user_id.as_str();
        let ms = c.m.membership.as_str();
        let mut body = Map::new();
        let membership_moved = sent.is_some_and(|s| c.m.stream_ordering > s.pos);
        if matches!(ms, "invite" | "knock") {
            if sent.is_some_and(|s| s.membership == ms) && !membership_moved {
                return Ok(None);
            }
            let stripped = self.stripped_state(&c.room, c.m.event_nid).await?;
            let key = if ms == "invite" {
                "invite_state"
            } else {
                "knock_state"
            };
            body.insert(key.into(), json!(stripped));
            body.insert("initial".into(), json!(true));
            body.insert("bump_stamp".into(), json!(c.activity));
            if self.is_dm(c, direct).await? {
                body.insert("is_dm".into(), json!(true));
            }
            let record = SentRoom {
                membership: ms.to_owned(),
                pos: c.m.stream_ordering,
                config: config.clone(),
                lazy_sent: HashSet::new(),
                counts: None,
            };
            return Ok(Some((body, record)));
        }

        // Joined, left or banned.
        let to = if ms == "join" {
            now.events
        } else {
            c.m.stream_ordering
        };
        // Initial: never sent, or the client had only stripped state (or a leave) before.
        let initial = match sent {
            None => true,
            Some(s) => s.membership != ms && s.membership != "join",
        };
        let (expanded_tl, expanded_state) = match sent {
            Some(s) if !initial => (
                config.timeline_limit > s.config.timeline_limit,
                config.state != s.config.state,
            ),
            _ => (false, false),
        };
        let last = sent.map(|s| s.pos).unwrap_or(0);
        if !initial {
            let new_events = self.room_position(c.room.nid).min(to) > last;
            if !(new_events || membership_moved || expanded_tl || expanded_state) {
                // Only receipts may have moved: a room whose unread counts changed with them
                // is sent with just its new counts.
                let Some(sent) = sent.filter(|_| ms == "join") else {
                    return Ok(None);
                };
                if !self.receipts_moved(c.room.room_id.as_str(), previous.receipts) {
                    return Ok(None);
                }
                let counts = self.total_unread(user, &c.room).await?;
                if sent.counts == Some(counts) {
                    return Ok(None);
                }
                insert_counts(&mut body, counts);
                let record = SentRoom {
                    counts: Some(counts),
                    ..sent.clone()
                };
                return Ok(Some((body, record)));
            }
        }
        let from = if initial || expanded_tl { 0 } else { last };
        let limit = config.timeline_limit as i64;
        let slice = self
            .timeline_slice(user, Some(ms), &c.room, (from, to), limit, None, |_| true)
            .await?;
        let timeline = slice.events;
        let num_live = if initial {
            0
        } else {
            timeline
                .iter()
                .filter(|e| e.stream_ordering.is_some_and(|p| p > last))
                .count()
        };

        // State: all of the config's state at `to` when initial or the config changed; else
        // what changed since `last`. Members of the timeline's senders and targets for `$LAZY`.
        let end_group = match self.room_tip(c.room.nid) {
            Some((pos, g)) if to >= pos => Some(g),
            _ => self.store.state_group_at(c.room.nid, to).await?,
        };
        let end_state = match end_group {
            Some(g) if g != 0 => self.state_map(g).await?,
            _ => Arc::new(StateMap::new()),
        };
        let mut lazy_sent = match sent {
            Some(s) if !initial => s.lazy_sent.clone(),
            _ => HashSet::new(),
        };
        let lazy_users: HashSet<String> = if config.state.lazy {
            timeline
                .iter()
                .flat_map(|e| {
                    let target = (e.pdu.kind == TimelineEventType::RoomMember)
                        .then(|| e.pdu.state_key.clone())
                        .flatten();
                    std::iter::once(e.pdu.sender.to_string()).chain(target)
                })
                .filter(|u| !lazy_sent.contains(u))
                .collect()
        } else {
            HashSet::new()
        };
        let full_state = initial || expanded_state;
        let mut state_events: Vec<Arc<StoredEvent>> = Vec::new();
        if full_state {
            if config.state.needs_all() {
                // Skip the events whose (type, state_key) is known and not wanted (say, the
                // members of a large room) without loading them.
                let nids: Vec<i64> = end_state
                    .iter()
                    .filter(|(key, _)| {
                        self.state
                            .cached_pair(**key)
                            .is_none_or(|(t, k)| config.state.wants(&t, &k, &lazy_users))
                    })
                    .map(|(_, nid)| *nid)
                    .collect();
                for e in self.events(&nids).await? {
                    let (t, k) = (e.pdu.kind.to_string(), e.pdu.state_key.clone());
                    if config
                        .state
                        .wants(&t, k.as_deref().unwrap_or(""), &lazy_users)
                    {
                        state_events.push(e);
                    }
                }
            } else {
                for (t, k) in &config.state.include {
                    if let Some(e) = self.state_event(&end_state, t, k).await? {
                        state_events.push(e);
                    }
                }
            }
        } else {
            let since_state = match self.store.state_group_at(c.room.nid, last).await? {
                Some(g) if g != 0 => self.state_map(g).await?,
                _ => Arc::new(StateMap::new()),
            };
            let changed: Vec<i64> = end_state
                .iter()
                .filter(|(k, v)| since_state.get(k) != Some(v))
                .map(|(_, v)| *v)
                .collect();
            for e in self.events(&changed).await? {
                let t = e.pdu.kind.to_string();
                let k = e.pdu.state_key.clone().unwrap_or_default();
                // Without a gap, lazy loading still reports every membership change.
                let lazy_ok = config.state.lazy && t == MEMBER && !slice.limited;
                if lazy_ok || config.state.wants(&t, &k, &lazy_users) {
                    state_events.push(e);
                }
            }
        }
        for u in &lazy_users {
            if let Some(e) = self.state_event(&end_state, MEMBER, u).await? {
                state_events.push(e);
            }
        }
        lazy_sent.extend(lazy_users);
        let mut seen = HashSet::new();
        state_events.retain(|e| seen.insert(e.nid));

        // Room summary fields: on first sending, or when what they derive from changed.
        let touched = |kinds: &[&str]| {
            full_state
                || state_events
                    .iter()
                    .chain(timeline.iter())
                    .any(|e| e.pdu.is_state() && kinds.contains(&e.pdu.kind.to_string().as_str()))
        };
        let members_changed = membership_moved || touched(&[MEMBER]);
        if ms == "join" && (initial || members_changed) {
            let members = self.members(c.room.nid).await?;
            let joined = members.values().filter(|m| *m == "join").count();
            let invited = members.values().filter(|m| *m == "invite").count();
            body.insert("joined_count".into(), json!(joined));
            body.insert("invited_count".into(), json!(invited));
        }
        if initial || touched(&["m.room.name", "m.room.canonical_alias", MEMBER]) {
            let (name, heroes) = self.room_name_and_heroes(c, &end_state).await?;
            if let Some(name) = name {
                body.insert("name".into(), json!(name));
            }
            if initial || members_changed {
                body.insert("heroes".into(), json!(heroes));
            }
        }
        if initial || touched(&["m.room.avatar"]) {
            match self.state_field(&end_state, "m.room.avatar", "url").await? {
                Some(url) if !url.is_empty() => {
                    body.insert("avatar".into(), json!(url));
                }
                _ if !initial => {
                    body.insert("avatar".into(), Value::Null);
                }
                _ => {}
            }
        }
        if initial {
            body.insert("initial".into(), json!(true));
            if self.is_dm(c, direct).await? {
                body.insert("is_dm".into(), json!(true));
            }
        }
        if expanded_tl && !initial {
            body.insert("unstable_expanded_timeline".into(), json!(true));
        }
        let prev_batch = timeline
            .first()
            .map(|e| e.token_before().encode())
            .unwrap_or_else(|| PageToken::Stream(to).encode());
        body.insert(
            "timeline".into(),
            json!(self.render_events(&timeline, user, &req.device_id).await?),
        );
        body.insert(
            "required_state".into(),
            json!(
                self.render_events(&state_events, user, &req.device_id)
                    .await?
            ),
        );
        body.insert("prev_batch".into(), json!(prev_batch));
        if slice.limited {
            body.insert("limited".into(), json!(true));
        }
        body.insert("num_live".into(), json!(num_live));
        body.insert("bump_stamp".into(), json!(c.activity));
        let counts = if ms == "join" {
            let counts = self.total_unread(user, &c.room).await?;
            insert_counts(&mut body, counts);
            Some(counts)
        } else {
            None
        };
        let record = SentRoom {
            membership: ms.to_owned(),
            pos: to,
            config: config.clone(),
            lazy_sent,
            counts,
        };
        Ok(Some((body, record)))
    }

    /// The room's name by the spec's algorithm (`m.room.name`, the canonical alias, then the
    /// heroes), and the heroes: up to five other members, joined and invited first.
    async fn room_name_and_heroes(
        &self,
        c: &Candidate,
        state: &StateMap,
    ) -> Result<(Option<String>, Vec<Value>)> {
        let user = c.m.user_id.as_str();
        let members = self.members(c.room.nid).await?;
        let mut active: Vec<&String> = members
            .iter()
            .filter(|(u, m)| u.as_str() != user && (*m == "join" || *m == "invite"))
            .map(|(u, _)| u)
            .collect();
        active.sort();
        let mut gone: Vec<&String> = members
            .iter()
            .filter(|(u, m)| u.as_str() != user && (*m == "leave" || *m == "ban"))
            .map(|(u, _)| u)
            .collect();
        gone.sort();
        let mut heroes = Vec::new();
        let mut hero_names = Vec::new();
        for u in active.iter().chain(gone.iter()).take(MAX_HEROES) {
            let mut h = Map::new();
            h.insert("user_id".into(), json!(u));
            let ev = self.state_event(state, MEMBER, u).await?;
            let content = ev.map(|e| e.pdu.content_value()).unwrap_or(Value::Null);
            let display = content["displayname"].as_str().filter(|s| !s.is_empty());
            if let Some(d) = display {
                h.insert("displayname".into(), json!(d));
            }
            if let Some(a) = content["avatar_url"].as_str().filter(|s| !s.is_empty()) {
                h.insert("avatar_url".into(), json!(a));
            }
            hero_names.push(display.map(str::to_owned).unwrap_or_else(|| u.to_string()));
            heroes.push(Value::Object(h));
        }
        if let Some(n) = self
            .state_field(state, "m.room.name", "name")
            .await?
            .filter(|n| !n.is_empty())
        {
            return Ok((Some(n), heroes));
        }
        if let Some(a) = self
            .state_field(state, "m.room.canonical_alias", "alias")
            .await?
            .filter(|a| !a.is_empty())
        {
            return Ok((Some(a), heroes));
        }
        let others = active.len();
        let shown = hero_names.len().min(others.max(1));
        let name = if others == 0 {
            if hero_names.is_empty() {
                "Empty Room".to_owned()
            } else {
                format!("Empty Room (was {})", join_names(&hero_names, 0))
            }
        } else {
            join_names(&hero_names[..shown], others.saturating_sub(shown))
        };
        Ok((Some(name), heroes))
    }

    /// The `account_data` extension: global data and data of `rooms`, changed since the
    /// previous response (all of it when there is none, and for `fresh` rooms sent for the
    /// first time now).
    async fn sliding_account_data(
        &self,
        user: &str,
        since: Option<SyncToken>,
        now: SyncToken,
        rooms: &HashSet<String>,
        fresh: &HashSet<String>,
    ) -> Result<(Vec<Value>, Map<String, Value>, bool)> {
        let from = since.map(|s| s.account_data).unwrap_or(0);
        let mut rows = if from < now.account_data {
            self.store
                .account_data_since(user, from, now.account_data)
                .await?
        } else {
            Vec::new()
        };
        if from > 0 && !fresh.is_empty() {
            let all = self.store.account_data_since(user, 0, from).await?;
            rows.extend(all.into_iter().filter(|r| fresh.contains(&r.room_id)));
        }
        let mut global = Vec::new();
        let mut by_room: Map<String, Value> = Map::new();
        for row in rows {
            let content: Value = serde_json::from_str(&row.content).unwrap_or(json!({}));
            let ev = json!({"type": row.data_type, "content": content});
            if row.room_id.is_empty() {
                global.push(ev);
            } else if rooms.contains(&row.room_id) {
                if let Value::Array(l) = by_room.entry(row.room_id).or_insert_with(|| json!([])) {
                    l.push(ev);
                }
            }
        }
        let news = !global.is_empty() || !by_room.is_empty();
        Ok((global, by_room, news))
    }
}

/// Whether a room extension (account data, receipts, typing) covers room `nid`.
fn extension_applies(
    cfg: &RoomsConfig,
    nid: i64,
    room_lists: &HashMap<i64, Vec<String>>,
    subscribed: &HashSet<i64>,
    room_ids: &HashMap<i64, String>,
) -> bool {
    if cfg.lists.is_none() && cfg.rooms.is_none() {
        return true;
    }
    let in_list = cfg.lists.as_ref().is_some_and(|names| {
        room_lists
            .get(&nid)
            .is_some_and(|ls| ls.iter().any(|l| names.contains(l)))
    });
    let in_rooms = cfg.rooms.as_ref().is_some_and(|rs| {
        rs.iter().any(|r| {
            (r == "*" && subscribed.contains(&nid)) || room_ids.get(&nid).is_some_and(|id| id == r)
        })
    });
    in_list || in_rooms
}

/// "A", "A and B", "A, B and C", "A, B and 3 others".
fn join_names(names: &[String], more: usize) -> String {
    match (names, more) {
        ([], _) => String::new(),
        ([one], 0) => one.clone(),
        (_, 0) => {
            let (last, rest) = names
                .split_last()
                .map(|(l, r)| (l.clone(), r))
                .unwrap_or_default();
            format!("{} and {last}", rest.join(", "))
        }
        (_, n) => format!("{} and {n} others", names.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_select_specials() {
        let rs: RequiredState = serde_json::from_value(json!([
            ["m.room.name", ""],
            ["m.room.member", "$LAZY"],
            ["m.room.member", "$ME"],
            ["m.space.child", "*"]
        ]))
        .unwrap();
        let s = StateSelect::from_request(&rs, "@me:hs");
        let lazy: HashSet<String> = ["@bob:hs".to_owned()].into();
        assert!(s.lazy);
        assert!(s.wants("m.room.name", "", &lazy));
        assert!(!s.wants("m.room.topic", "", &lazy));
        assert!(s.wants("m.room.member", "@me:hs", &HashSet::new()));
        assert!(s.wants("m.room.member", "@bob:hs", &lazy));
        assert!(!s.wants("m.room.member", "@carol:hs", &lazy));
        assert!(s.wants("m.space.child", "!x:hs", &lazy));
        assert!(s.needs_all());

        let all: RequiredState = serde_json::from_value(json!({
            "include": [{}], "exclude": [{"type": "m.room.create"}]
        }))
        .unwrap();
        let s = StateSelect::from_request(&all, "@me:hs");
        assert!(s.wants("m.room.topic", "", &HashSet::new()));
        assert!(!s.wants("m.room.create", "", &HashSet::new()));
    }

    #[test]
    fn pos_parsing() {
        assert_eq!(parse_pos("s1_5_0_0_0_0_0_0.abc.3"), Some(("abc", 3)));
        for bad in ["", "abc", "s1_5.abc", "s1_5.abc.x", "x.abc.1", "s1_5.a.1.2"] {
            assert_eq!(parse_pos(bad), None, "{bad}");
        }
    }

    #[test]
    fn names_join() {
        let n = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(join_names(&n(&["A"]), 0), "A");
        assert_eq!(join_names(&n(&["A", "B"]), 0), "A and B");
        assert_eq!(join_names(&n(&["A", "B", "C"]), 0), "A, B and C");
        assert_eq!(join_names(&n(&["A", "B"]), 3), "A, B and 3 others");
    }
}
