//! Push notifications (spec § "Push Notifications"): evaluating the push rules of a room's
//! local members for each new timeline event, the unread counts of `/sync`, the
//! `/notifications` list and pushers.
//!
//! Every new timeline event of a room (a local send, or a live event from another server; not
//! outliers, rejected, soft-failed or backfilled events) is evaluated, under the room's lock
//! and before it is queued for the writer, for each local joined member but its sender (and
//! the invitee of an invite) with ruma's rule evaluation. A `notify` result becomes a row of
//! `event_push_actions`, and for each of the user's pushers a row of `push_queue`, both written
//! in the event's own transaction (the writer's batch): a committed event has its push actions
//! and its queued notifications, and a failed write has none.
//!
//! Rule sets and pushers are cached per user, dropped when they change.

use std::collections::HashMap;
use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc, RwLock,
};

use ruma::{
    events::room::power_levels::{
        RoomPowerLevels, RoomPowerLevelsEventContent, RoomPowerLevelsSource,
    },
    push::{Action, PushConditionPowerLevelsCtx, PushConditionRoomCtx, Ruleset},
    serde::Raw,
    OwnedUserId, UInt, UserId,
};
use serde_json::{json, Map, Value};

use crate::{
    pdu::Pdu,
    server::RoomInfo,
    state::StateMap,
    store::{PushActionWrite, PushQueueWrite, PusherRow, Store},
    Error, Result, Server,
};

/// Users whose rule sets or pushers are kept in memory at most (the cache is emptied beyond).
const MAX_CACHED_USERS: usize = 20_000;

/// The thread of an event not in a thread.
pub const MAIN_THREAD: &str = "main";

/// Per-user caches of rule sets and pushers, and the push sender's wake-up.
#[derive(Default)]
pub struct Push {
    rules: RwLock<HashMap<String, Arc<Ruleset>>>,
    rules_epoch: AtomicU64,
    pushers: RwLock<HashMap<String, Arc<Vec<PusherRow>>>>,
    pushers_epoch: AtomicU64,
    /// Pushers with newly queued notifications (the push sender waits on it).
    pub queued: crate::server::KeyedSignal<i64>,
}

impl Push {
    /// A user's rule set (cached).
    pub async fn rules(&self, store: &Store, user_id: &UserId) -> Result<Arc<Ruleset>> {
        if let Some(r) = read(&self.rules).get(user_id.as_str()) {
            return Ok(r.clone());
        }
        let epoch = self.rules_epoch.load(Ordering::Acquire);
        let rules = Arc::new(load_ruleset(store, user_id).await?);
        // A change saved meanwhile may be missing from what was read.
        if self.rules_epoch.load(Ordering::Acquire) == epoch {
            insert_bounded(&self.rules, user_id.as_str(), rules.clone());
        }
        Ok(rules)
    }

    /// Forgets a user's cached rule set (it changed).
    pub fn forget_rules(&self, user_id: &str) {
        self.rules_epoch.fetch_add(1, Ordering::AcqRel);
        write(&self.rules).remove(user_id);
    }

    /// A user's pushers (cached).
    pub async fn pushers(&self, store: &Store, user_id: &str) -> Result<Arc<Vec<PusherRow>>> {
        if let Some(p) = read(&self.pushers).get(user_id) {
            return Ok(p.clone());
        }
        let epoch = self.pushers_epoch.load(Ordering::Acquire);
        let pushers = Arc::new(store.pushers_of(user_id).await?);
        if self.pushers_epoch.load(Ordering::Acquire) == epoch {
            insert_bounded(&self.pushers, user_id, pushers.clone());
        }
        Ok(pushers)
    }

    /// Forgets a user's cached pushers (they changed).
    pub fn forget_pushers(&self, user_id: &str) {
        self.pushers_epoch.fetch_add(1, Ordering::AcqRel);
        write(&self.pushers).remove(user_id);
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

fn insert_bounded<V>(map: &RwLock<HashMap<String, V>>, key: &str, v: V) {
    let mut m = write(map);
    if m.len() >= MAX_CACHED_USERS {
        m.clear();
    }
    m.insert(key.to_owned(), v);
}

/// A user's current rule set from their `m.push_rules` account data (`{"global": ruleset}`),
/// merged with the current server defaults so new predefined rules reach existing users; the
/// spec's predefined set (ruma's `Ruleset::server_default`) until they change anything.
pub async fn load_ruleset(store: &Store, user_id: &UserId) -> Result<Ruleset> {
    let defaults = Ruleset::server_default(user_id);
    let Some(stored) = store
        .account_data(user_id.as_str(), "", "m.push_rules")
        .await?
    else {
        return Ok(defaults);
    };
    let parsed = serde_json::from_str::<Value>(&stored)
        .ok()
        .and_then(|mut v| v.get_mut("global").map(Value::take))
        .and_then(|g| serde_json::from_value::<Ruleset>(g).ok());
    match parsed {
        Some(mut rules) => {
            rules.update_with_server_default(defaults);
            Ok(rules)
        }
        None => {
            tracing::warn!(user = %user_id, "stored push rules unreadable; using the defaults");
            Ok(defaults)
        }
    }
}

// Evaluation ----------------------------------------------------------------------------------

/// The outcome of one user's rules for one event of a batch, before positions are known.
#[derive(Debug, Clone)]
pub(crate) struct PendingPush {
    /// The event's index in its batch.
    index: usize,
    user_id: String,
    thread_id: String,
    highlight: bool,
    /// Whether it counts as unread in the room (not for the invite of a user not in it).
    counted: bool,
    actions: String,
    pushers: Vec<i64>,
}

/// An event to evaluate: the PDU and the room state after it.
pub(crate) struct ToEvaluate<'a> {
    pub pdu: &'a Arc<Pdu>,
    pub state_after: &'a Arc<StateMap>,
}

/// Evaluates the push rules of the room's local members for a batch of new timeline events.
/// `in_flight` holds the room's events not committed yet (they may be state the rules look
/// at). A failure is logged and yields no push actions: it must not fail the event.
pub(crate) async fn evaluate(
    server: &Server,
    room: &RoomInfo,
    events: &[ToEvaluate<'_>],
    in_flight: &HashMap<i64, Arc<Pdu>>,
) -> Vec<PendingPush> {
    match evaluate_inner(server, room, events, in_flight).await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(room = %room.room_id, error = %e, "push rule evaluation failed");
            Vec::new()
        }
    }
}

async fn evaluate_inner(
    server: &Server,
    room: &RoomInfo,
    events: &[ToEvaluate<'_>],
    in_flight: &HashMap<i64, Arc<Pdu>>,
) -> Result<Vec<PendingPush>> {
    let members = server.members(room.nid).await?;
    let ours = |u: &str| {
        u.split_once(':')
            .is_some_and(|(_, s)| s == server.server_name.as_str())
    };
    let joined: Vec<&str> = members
        .iter()
        .filter(|(_, m)| m.as_str() == "join")
        .map(|(u, _)| u.as_str())
        .collect();
    let member_count = UInt::try_from(joined.len() as u64).unwrap_or_default();
    let local_joined: Vec<&str> = joined.iter().copied().filter(|u| ours(u)).collect();
    let mut out = Vec::new();
    for (index, ev) in events.iter().enumerate() {
        let pdu = ev.pdu;
        let mut users: Vec<&str> = local_joined
            .iter()
            .copied()
            .filter(|u| *u != pdu.sender.as_str())
            .collect();
        // The invitee of an invite hears of it (`.m.rule.invite_for_me`).
        let invitee = match (&pdu.state_key, pdu.kind.to_string() == "m.room.member") {
            (Some(sk), true) if pdu.content_str("membership").as_deref() == Some("invite") => {
                Some(sk.clone())
            }
            _ => None,
        };
        // An invitee who is not in the room is notified, not counted as unread in it.
        let mut uncounted = None;
        if let Some(i) = invitee.as_deref() {
            if ours(i) && !users.contains(&i) && i != pdu.sender.as_str() {
                users.push(i);
                uncounted = Some(i);
            }
        }
        if users.is_empty() {
            continue;
        }
        let state = ev.state_after;
        let power = power_ctx(server, room, state, in_flight).await?;
        let raw: Raw<Value> = Raw::from_json(pdu.json.clone());
        let thread_id = thread_of(pdu);
        for user in users {
            let Ok(user_id) = OwnedUserId::try_from(user) else {
                continue;
            };
            let rules = server.push.rules(&server.store, &user_id).await?;
            let display_name = state_pdu(server, state, in_flight, "m.room.member", user)
                .await?
                .and_then(|p| p.content_str("displayname"))
                .unwrap_or_default();
            let mut ctx = PushConditionRoomCtx::new(
                room.room_id.clone(),
                member_count,
                user_id.clone(),
                display_name,
            );
            if let Some(p) = &power {
                ctx = ctx.with_power_levels(p.clone());
            }
            let actions = rules.get_actions(&raw, &ctx).await;
            if !actions.iter().any(Action::should_notify) {
                continue;
            }
            let pushers = server
                .push
                .pushers(&server.store, user)
                .await?
                .iter()
                .map(|p| p.id)
                .collect();
            out.push(PendingPush {
                index,
                user_id: user.to_owned(),
                thread_id: thread_id.clone(),
                highlight: actions.iter().any(Action::is_highlight),
                counted: uncounted != Some(user),
                actions: serde_json::to_string(actions)?,
                pushers,
            });
        }
    }
    Ok(out)
}

/// The rows to write for evaluated events, given their `(event_nid, stream position)`.
pub(crate) fn writes(
    pending: Vec<PendingPush>,
    events: &[(i64, i64)],
) -> (Vec<PushActionWrite>, Vec<PushQueueWrite>) {
    let mut actions = Vec::with_capacity(pending.len());
    let mut queue = Vec::new();
    let ts = crate::store::now_ms();
    for p in pending {
        let Some(&(event_nid, stream_ordering)) = events.get(p.index) else {
            continue;
        };
        for pusher_id in &p.pushers {
            queue.push(PushQueueWrite {
                pusher_id: *pusher_id,
                user_id: p.user_id.clone(),
                event_nid,
                actions: p.actions.clone(),
            });
        }
        actions.push(PushActionWrite {
            user_id: p.user_id,
            event_nid,
            stream_ordering,
            thread_id: p.thread_id,
            highlight: p.highlight,
            counted: p.counted,
            actions: p.actions,
            ts,
        });
    }
    (actions, queue)
}

/// The thread an event belongs to: its thread root's ID, or [`MAIN_THREAD`].
pub fn thread_of(pdu: &Pdu) -> String {
    let content = pdu.content_value();
    let rel = &content["m.relates_to"];
    match (rel["rel_type"].as_str(), rel["event_id"].as_str()) {
        (Some("m.thread"), Some(root)) => root.to_owned(),
        _ => MAIN_THREAD.to_owned(),
    }
}

/// The event at `(ty, state_key)` in `state`, in flight or stored.
async fn state_pdu(
    server: &Server,
    state: &StateMap,
    in_flight: &HashMap<i64, Arc<Pdu>>,
    ty: &str,
    state_key: &str,
) -> Result<Option<Arc<Pdu>>> {
    let Some(k) = server.state.lookup(&server.store, ty, state_key).await? else {
        return Ok(None);
    };
    let Some(nid) = state.get(&k) else {
        return Ok(None);
    };
    if let Some(p) = in_flight.get(nid) {
        return Ok(Some(p.clone()));
    }
    Ok(Some(server.event(*nid).await?.pdu.clone()))
}

/// The power levels the `sender_notification_permission` condition looks at.
async fn power_ctx(
    server: &Server,
    room: &RoomInfo,
    state: &StateMap,
    in_flight: &HashMap<i64, Arc<Pdu>>,
) -> Result<Option<PushConditionPowerLevelsCtx>> {
    let create = state_pdu(server, state, in_flight, "m.room.create", "").await?;
    let mut creators: Vec<OwnedUserId> = Vec::new();
    if let Some(c) = &create {
        creators.push(c.sender.clone());
        if let Some(extra) = c.content_value()["additional_creators"].as_array() {
            creators.extend(
                extra
                    .iter()
                    .filter_map(|u| u.as_str())
                    .filter_map(|u| OwnedUserId::try_from(u).ok()),
            );
        }
    }
    let source = match state_pdu(server, state, in_flight, "m.room.power_levels", "").await? {
        Some(p) => match serde_json::from_str::<RoomPowerLevelsEventContent>(p.content.get()) {
            Ok(c) => RoomPowerLevelsSource::Original(c),
            // Unreadable power levels: the conditions needing them never match.
            Err(_) => return Ok(None),
        },
        None => RoomPowerLevelsSource::None,
    };
    let levels = RoomPowerLevels::new(source, &room.rules.authorization, creators);
    Ok(Some(levels.into()))
}

// Unread counts ---------------------------------------------------------------------------------

/// Adds `unread_notifications` (and `unread_thread_notifications` when the filter asks for
/// them) to a joined room of a sync response: the user's push actions after their read
/// position (their latest `m.read` or `m.read.private` receipt; an unthreaded receipt covers
/// every thread, a threaded one only its own). The invite that brought them in is not
/// counted.
pub async fn add_unread_counts(
    server: &Server,
    body: &mut Map<String, Value>,
    user_id: &str,
    room: &RoomInfo,
    per_thread: bool,
) -> Result<()> {
    let counts = unread_counts(server, user_id, room).await?;
    let counts_json = |(n, h): (i64, i64)| json!({"notification_count": n, "highlight_count": h});
    if per_thread {
        let main = counts
            .iter()
            .find(|(t, _)| t == MAIN_THREAD)
            .map(|(_, c)| *c)
            .unwrap_or((0, 0));
        let threads: Map<String, Value> = counts
            .iter()
            .filter(|(t, _)| t != MAIN_THREAD)
            .map(|(t, c)| (t.clone(), counts_json(*c)))
            .collect();
        body.insert("unread_notifications".into(), counts_json(main));
        if !threads.is_empty() {
            body.insert("unread_thread_notifications".into(), Value::Object(threads));
        }
    } else {
        body.insert("unread_notifications".into(), counts_json(total(&counts)));
    }
    Ok(())
}

/// The sum over all threads of per-thread `(notifications, highlights)`.
pub fn total(counts: &[(String, (i64, i64))]) -> (i64, i64) {
    counts
        .iter()
        .fold((0, 0), |(n, h), (_, (a, b))| (n + a, h + b))
}

/// `(thread, (notifications, highlights))` unread by a user in a room: from memory, else
/// read up to the room's position and kept (see [`crate::unread`]).
pub async fn unread_counts(
    server: &Server,
    user_id: &str,
    room: &RoomInfo,
) -> Result<crate::unread::ThreadCounts> {
    let at = server.room_position(room.nid);
    let miss = match server.unread.get(room.nid, user_id, at) {
        Ok(counts) => return Ok(counts),
        Err(miss) => miss,
    };
    let counts = std::sync::Arc::new(
        server
            .store
            .unread_counts(user_id, room.nid, room.room_id.as_str(), at)
            .await?,
    );
    server
        .unread
        .fill(room.nid, user_id, miss, at, counts.clone());
    Ok(counts)
}

/// A user's read positions in a room: the unthreaded one, and per thread.
async fn read_positions(
    server: &Server,
    user_id: &str,
    room: &RoomInfo,
) -> Result<(i64, Vec<(String, i64)>)> {
    let positions = server
        .store
        .read_positions(user_id, room.room_id.as_str())
        .await?;
    let unthreaded = positions
        .iter()
        .filter(|(t, _)| t.is_empty())
        .map(|(_, p)| *p)
        .max()
        .unwrap_or(0);
    let threads = positions
        .into_iter()
        .filter(|(t, _)| !t.is_empty())
        .collect();
    Ok((unthreaded, threads))
}

/// The unread count of a push gateway notification: the user's unread notifications over all
/// their joined rooms.
pub async fn badge_count(server: &Server, user_id: &str) -> Result<i64> {
    let memberships = server.user_memberships(user_id).await?;
    let mut total = 0;
    for room_nid in server.store.push_action_rooms(user_id).await? {
        if !memberships
            .iter()
            .any(|m| m.room_nid == room_nid && m.membership == "join")
        {
            continue;
        }
        let room = server.room_by_nid(room_nid).await?;
        total += unread_counts(server, user_id, &room)
            .await?
            .iter()
            .map(|(_, (n, _))| n)
            .sum::<i64>();
    }
    Ok(total)
}

// /notifications ----------------------------------------------------------------------------

/// Most notifications one `/notifications` page holds.
const MAX_NOTIFICATIONS: i64 = 100;

/// `GET /notifications`: the user's notified events, newest first, from the position `from`
/// (a previous page's `next_token`).
pub async fn notifications(
    server: &Server,
    user_id: &str,
    device_id: &str,
    from: Option<&str>,
    limit: Option<i64>,
    only_highlight: bool,
) -> Result<Value> {
    let before = match from {
        None | Some("") => i64::MAX,
        Some(t) => t
            .parse::<i64>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| Error::invalid_param("Invalid from token"))?,
    };
    let limit = limit.unwrap_or(50).clamp(1, MAX_NOTIFICATIONS);
    let rows = server
        .store
        .notifications(user_id, before, limit, only_highlight)
        .await?;
    let mut reads: HashMap<i64, (i64, Vec<(String, i64)>)> = HashMap::new();
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        let room = server.room_by_nid(row.room_nid).await?;
        if let std::collections::hash_map::Entry::Vacant(e) = reads.entry(row.room_nid) {
            e.insert(read_positions(server, user_id, &room).await?);
        }
        let Some((unthreaded, threads)) = reads.get(&row.room_nid) else {
            continue;
        };
        let thread_pos = threads
            .iter()
            .filter(|(t, _)| *t == row.thread_id)
            .map(|(_, p)| *p)
            .max()
            .unwrap_or(0);
        let read = row.stream_ordering <= (*unthreaded).max(thread_pos);
        let ev = server.event(row.event_nid).await?;
        let event = server
            .render_events(&[ev], user_id, device_id)
            .await?
            .pop()
            .unwrap_or(Value::Null);
        let actions: Value = serde_json::from_str(&row.actions).unwrap_or_else(|_| json!([]));
        out.push(json!({
            "actions": actions,
            "event": event,
            "profile_tag": Value::Null,
            "read": read,
            "room_id": row.room_id,
            "ts": row.ts,
        }));
    }
    let mut body = json!({ "notifications": out });
    if rows.len() as i64 == limit {
        if let Some(last) = rows.last() {
            body["next_token"] = json!(last.stream_ordering.to_string());
        }
    }
    Ok(body)
}

// Pushers -------------------------------------------------------------------------------------

/// Longest pushkey (bytes) and app ID (characters) the spec allows.
const MAX_PUSHKEY_BYTES: usize = 512;
const MAX_APP_ID_CHARS: usize = 64;
/// The path a pusher's gateway URL must have.
pub const NOTIFY_PATH: &str = "/_matrix/push/v1/notify";

/// A user's pushers as `GET /pushers` lists them.
pub async fn pushers_json(server: &Server, user_id: &str) -> Result<Value> {
    let pushers = server.push.pushers(&server.store, user_id).await?;
    let list: Vec<Value> = pushers
        .iter()
        .map(|p| {
            let data: Value = serde_json::from_str(&p.data).unwrap_or_else(|_| json!({}));
            let mut v = json!({
                "pushkey": p.pushkey,
                "kind": p.kind,
                "app_id": p.app_id,
                "app_display_name": p.app_display_name,
                "device_display_name": p.device_display_name,
                "lang": p.lang,
                "data": data,
            });
            if let Some(tag) = &p.profile_tag {
                v["profile_tag"] = json!(tag);
            }
            v
        })
        .collect();
    Ok(json!({ "pushers": list }))
}

/// `POST /pushers/set` for `user_id`'s device `device_id` (the body already parsed as a
/// JSON object).
pub async fn set_pusher(
    server: &Server,
    user_id: &str,
    device_id: &str,
    body: &Value,
) -> Result<()> {
    let body = body
        .as_object()
        .ok_or_else(|| Error::bad_json("The body must be a JSON object"))?;
    let string = |k: &str| -> Result<Option<String>> {
        match body.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(Error::bad_json(format!("`{k}` must be a string"))),
        }
    };
    let app_id = string("app_id")?;
    let pushkey = string("pushkey")?;
    let kind = match body.get("kind") {
        None => return Err(Error::missing_param("Missing parameter: kind")),
        Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(Error::bad_json("`kind` must be a string or null")),
    };
    let mut missing: Vec<&str> = Vec::new();
    if app_id.is_none() {
        missing.push("app_id");
    }
    if pushkey.is_none() {
        missing.push("pushkey");
    }
    let (Some(app_id), Some(pushkey)) = (app_id, pushkey) else {
        return Err(Error::missing_param(format!(
            "Missing parameters: {}",
            missing.join(", ")
        )));
    };
    if pushkey.len() > MAX_PUSHKEY_BYTES {
        return Err(Error::invalid_param("pushkey is longer than 512 bytes"));
    }
    if app_id.chars().count() > MAX_APP_ID_CHARS {
        return Err(Error::invalid_param("app_id is longer than 64 characters"));
    }
    let Some(kind) = kind else {
        if server
            .store
            .delete_pusher(user_id, &app_id, &pushkey)
            .await?
        {
            server.push.forget_pushers(user_id);
        }
        return Ok(());
    };
    let append = match body.get("append") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(Error::bad_json("`append` must be a boolean")),
    };
    let app_display_name = string("app_display_name")?;
    let device_display_name = string("device_display_name")?;
    let lang = string("lang")?;
    let profile_tag = string("profile_tag")?;
    let data = match body.get("data") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(m.clone()),
        Some(_) => return Err(Error::bad_json("`data` must be an object")),
    };
    let mut missing = Vec::new();
    for (name, present) in [
        ("app_display_name", app_display_name.is_some()),
        ("device_display_name", device_display_name.is_some()),
        ("lang", lang.is_some()),
        ("data", data.is_some()),
    ] {
        if !present {
            missing.push(name);
        }
    }
    if !missing.is_empty() {
        return Err(Error::missing_param(format!(
            "Missing parameters: {}",
            missing.join(", ")
        )));
    }
    let data = data.unwrap_or_default();
    match kind.as_str() {
        "http" => {
            let url = match data.get("url") {
                Some(Value::String(u)) => u,
                None => {
                    return Err(Error::missing_param(
                        "`data.url` is required for http pushers",
                    ))
                }
                Some(_) => return Err(Error::bad_json("`data.url` must be a string")),
            };
            check_gateway_url(url)?;
            match data.get("format") {
                None | Some(Value::Null) => {}
                Some(Value::String(f)) if f == "event_id_only" => {}
                Some(_) => {
                    return Err(Error::invalid_param(
                        "`data.format` must be \"event_id_only\" when given",
                    ))
                }
            }
        }
        "email" => {
            return Err(Error::invalid_param(
                "Email pushers are not supported by this server",
            ))
        }
        other => {
            return Err(Error::invalid_param(format!(
                "Unknown pusher kind {other:?}"
            )))
        }
    }
    let row = PusherRow {
        id: 0,
        user_id: user_id.to_owned(),
        device_id: device_id.to_owned(),
        kind,
        app_id,
        pushkey,
        app_display_name: app_display_name.unwrap_or_default(),
        device_display_name: device_display_name.unwrap_or_default(),
        profile_tag,
        lang: lang.unwrap_or_default(),
        data: Value::Object(data).to_string(),
        pushkey_ts: crate::store::now_ms(),
    };
    for user in server.store.set_pusher(&row, append).await? {
        server.push.forget_pushers(&user);
    }
    Ok(())
}

/// A gateway URL: `http(s)://host[:port]/_matrix/push/v1/notify`.
fn check_gateway_url(url: &str) -> Result<()> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| Error::invalid_param("`data.url` must be an http(s) URL"))?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if host.is_empty() || host.contains(['@', ' ']) {
        return Err(Error::invalid_param("`data.url` has no valid host"));
    }
    if path != NOTIFY_PATH {
        return Err(Error::invalid_param(format!(
            "`data.url` must have the path {NOTIFY_PATH}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_results_become_rows_at_their_events_positions() {
        let pending = vec![
            PendingPush {
                index: 1,
                user_id: "@bob:x".into(),
                thread_id: MAIN_THREAD.into(),
                highlight: true,
                counted: true,
                actions: r#"["notify"]"#.into(),
                pushers: vec![7, 9],
            },
            PendingPush {
                index: 0,
                user_id: "@carol:x".into(),
                thread_id: "$root".into(),
                highlight: false,
                counted: false,
                actions: r#"["notify"]"#.into(),
                pushers: vec![],
            },
        ];
        let (actions, queue) = writes(pending, &[(100, 10), (101, 11)]);
        assert_eq!(actions.len(), 2);
        assert_eq!(
            (
                actions[0].event_nid,
                actions[0].stream_ordering,
                actions[0].highlight
            ),
            (101, 11, true)
        );
        assert_eq!((actions[1].event_nid, actions[1].counted), (100, false));
        assert_eq!(actions[1].thread_id, "$root");
        let pushers: Vec<(i64, i64)> = queue.iter().map(|q| (q.pusher_id, q.event_nid)).collect();
        assert_eq!(pushers, [(7, 101), (9, 101)], "one row per pusher");
    }

    /// The default rules as this module uses them: a message notifies in a group room and
    /// rings in a 1:1 room; a user mention highlights; `@room` needs the power to notify.
    #[tokio::test]
    async fn default_rules_through_ruma() {
        let bob = OwnedUserId::try_from("@bob:x").unwrap();
        let rules = Ruleset::server_default(&bob);
        let room = ruma::OwnedRoomId::try_from("!r:x").unwrap();
        let event = |content: Value| -> Raw<Value> {
            Raw::new(&json!({"type": "m.room.message", "sender": "@alice:x", "content": content}))
                .unwrap()
        };
        let ctx = |members: u32| {
            PushConditionRoomCtx::new(room.clone(), UInt::from(members), bob.clone(), "Bob".into())
        };
        let msg = event(json!({"msgtype": "m.text", "body": "hi"}));
        let group = rules.get_actions(&msg, &ctx(3)).await;
        assert!(group.iter().any(Action::should_notify));
        assert!(!group.iter().any(Action::is_highlight));
        let dm = rules.get_actions(&msg, &ctx(2)).await;
        assert!(dm.iter().any(|a| a.sound().is_some()));
        let mention = event(json!({"body": "x", "m.mentions": {"user_ids": ["@bob:x"]}}));
        assert!(rules
            .get_actions(&mention, &ctx(3))
            .await
            .iter()
            .any(Action::is_highlight));

        let at_room = event(json!({"body": "x", "m.mentions": {"room": true}}));
        let levels = |alice: i64| -> PushConditionPowerLevelsCtx {
            let content: RoomPowerLevelsEventContent =
                serde_json::from_value(json!({"users": {"@alice:x": alice}})).unwrap();
            let rules = ruma::room_version_rules::RoomVersionRules::V11;
            RoomPowerLevels::new(
                RoomPowerLevelsSource::Original(content),
                &rules.authorization,
                Vec::<OwnedUserId>::new(),
            )
            .into()
        };
        let strong = ctx(3).with_power_levels(levels(50));
        assert!(rules
            .get_actions(&at_room, &strong)
            .await
            .iter()
            .any(Action::is_highlight));
        let weak = ctx(3).with_power_levels(levels(0));
        assert!(!rules
            .get_actions(&at_room, &weak)
            .await
            .iter()
            .any(Action::is_highlight));
    }

    #[test]
    fn gateway_urls() {
        assert!(check_gateway_url("https://push.example.org/_matrix/push/v1/notify").is_ok());
        assert!(check_gateway_url("http://127.0.0.1:8080/_matrix/push/v1/notify").is_ok());
        for bad in [
            "https://push.example.org/",
            "https://push.example.org",
            "ftp://push.example.org/_matrix/push/v1/notify",
            "https:///_matrix/push/v1/notify",
            "https://push.example.org/_matrix/push/v1/notify?x=1",
            "push.example.org/_matrix/push/v1/notify",
        ] {
            assert!(check_gateway_url(bad).is_err(), "{bad}");
        }
    }
}
