//! Room events (spec § "Events", "Redactions", "Syncing" pagination): send with txn-ID
//! idempotency, state get/put, single event lookup, `/messages` in both directions (going
//! backwards past a backward extremity, other servers are asked for the history first),
//! `/context` and `redact`. History visibility filters everything a caller reads.

use std::{sync::Arc, time::Duration};

use axum::{
    extract::{Path, Query, State},
    Extension, Json,
};
use myelin_core::{
    filter::EventFilter, pdu::NewEvent, ruma::OwnedEventId, token::PageToken, Append, Error,
    ErrorKind, RoomInfo, Server, StoredEvent,
};
use myelin_federation::{history::BACKFILL_MAX, Federation};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{
    error::{err, ApiResult},
    extract::{parse_id, Auth, JsonBody},
    membership::readable_state,
};

/// Sends one event with txn-ID idempotency; returns its event ID. `txn` is
/// `(scope, txn_id)`: a transaction ID is unique per device and request path.
///
/// Retries are answered from memory when the first send happened since start; otherwise the
/// database's unique key on the transaction refuses the duplicate and the original event is
/// looked up, so a first send costs no extra query.
async fn send_event(
    server: &Server,
    auth: &Auth,
    room: &Arc<RoomInfo>,
    event: NewEvent,
    txn: Option<(&str, &str)>,
) -> ApiResult<String> {
    let (user, device) = (auth.user_id.as_str(), auth.device_id.as_str());
    if let Some((scope, t)) = txn {
        if let Some(id) = server.txns.get(user, device, scope, t) {
            return Ok(id);
        }
    }
    let append = Append {
        sender: auth.user_id.clone(),
        event,
        txn: txn.map(|(s, t)| (auth.device_id.clone(), s.to_owned(), t.to_owned())),
    };
    match server.append(room, vec![append]).await {
        Ok(stored) => {
            let id = stored[0].pdu.event_id.to_string();
            if let Some((scope, t)) = txn {
                server.txns.put(user, device, scope, t, &id);
            }
            Ok(id)
        }
        Err(e) => {
            // A retry of a transaction sent before a restart, or a concurrent retry.
            if let Some((scope, t)) = txn {
                if let Some(id) = server.store.event_for_txn(user, device, scope, t).await? {
                    server.txns.put(user, device, scope, t, &id);
                    return Ok(id);
                }
            }
            Err(e.into())
        }
    }
}

fn content_object(v: Value) -> ApiResult<Value> {
    if !v.is_object() {
        return err(ErrorKind::BadJson, "Event content must be a JSON object");
    }
    Ok(v)
}

pub async fn send(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path((room_id, event_type, txn_id)): Path<(String, String, String)>,
    JsonBody(content): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    let room = crate::extract::room(&server, &room_id).await?;
    if event_type == "m.room.create" {
        return err(ErrorKind::Forbidden, "Cannot send a create event");
    }
    let content = content_object(content)?;
    if serde_json::to_vec(&content).map(|v| v.len()).unwrap_or(0) > server.config.max_event_bytes {
        return err(ErrorKind::TooLarge, "Event is too large");
    }
    let mut event = NewEvent::message(&event_type, content)?;
    if event_type == "m.room.redaction" {
        // A redaction sent through /send still needs its target.
        event.redacts = event
            .content
            .get("redacts")
            .and_then(|v| v.as_str())
            .and_then(|s| OwnedEventId::try_from(s).ok());
    }
    let scope = format!("send/{}/{event_type}", room.room_id);
    let id = send_event(&server, &auth, &room, event, Some((&scope, &txn_id))).await?;
    server.presence.active(auth.user_id.as_str());
    Ok(Json(json!({ "event_id": id })))
}

pub async fn put_state(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path((room_id, event_type, state_key)): Path<(String, String, String)>,
    JsonBody(content): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    put_state_inner(&server, &auth, &room_id, &event_type, &state_key, content).await
}

pub async fn put_state_empty_key(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path((room_id, event_type)): Path<(String, String)>,
    JsonBody(content): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    put_state_inner(&server, &auth, &room_id, &event_type, "", content).await
}

async fn put_state_inner(
    server: &Server,
    auth: &Auth,
    room_id: &str,
    event_type: &str,
    state_key: &str,
    content: Value,
) -> ApiResult<Json<Value>> {
    let room = crate::extract::room(server, room_id).await?;
    if event_type == "m.room.create" {
        return err(ErrorKind::Forbidden, "Cannot replace the create event");
    }
    let content = content_object(content)?;
    if serde_json::to_vec(&content).map(|v| v.len()).unwrap_or(0) > server.config.max_event_bytes {
        return err(ErrorKind::TooLarge, "Event is too large");
    }
    let event = NewEvent::state(event_type, state_key, content)?;
    let id = send_event(server, auth, &room, event, None).await?;
    Ok(Json(json!({ "event_id": id })))
}

pub async fn get_state(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(room_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let room = crate::extract::room(&server, &room_id).await?;
    let state = readable_state(&server, &room, auth.user_id.as_str()).await?;
    let events = server.state_events(&state).await?;
    Ok(Json(Value::Array(
        server
            .render_events(&events, auth.user_id.as_str(), &auth.device_id)
            .await?,
    )))
}

#[derive(Deserialize)]
pub struct FormatQuery {
    format: Option<String>,
}

pub async fn get_state_event(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path((room_id, event_type, state_key)): Path<(String, String, String)>,
    Query(q): Query<FormatQuery>,
) -> ApiResult<Json<Value>> {
    get_state_inner(
        &server,
        &auth,
        &room_id,
        &event_type,
        &state_key,
        q.format.as_deref(),
    )
    .await
}

pub async fn get_state_event_empty_key(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path((room_id, event_type)): Path<(String, String)>,
    Query(q): Query<FormatQuery>,
) -> ApiResult<Json<Value>> {
    get_state_inner(
        &server,
        &auth,
        &room_id,
        &event_type,
        "",
        q.format.as_deref(),
    )
    .await
}

async fn get_state_inner(
    server: &Server,
    auth: &Auth,
    room_id: &str,
    event_type: &str,
    state_key: &str,
    format: Option<&str>,
) -> ApiResult<Json<Value>> {
    let room = crate::extract::room(server, room_id).await?;
    let state = readable_state(server, &room, auth.user_id.as_str()).await?;
    let ev = server
        .state_event(&state, event_type, state_key)
        .await?
        .ok_or_else(|| Error::not_found("Event not found"))?;
    if format == Some("event") {
        let r = server
            .render_events(&[ev], auth.user_id.as_str(), &auth.device_id)
            .await?;
        return Ok(Json(r.into_iter().next().unwrap_or(Value::Null)));
    }
    Ok(Json(ev.pdu.content_value()))
}

pub async fn get_event(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path((room_id, event_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let room = crate::extract::room(&server, &room_id).await?;
    let id: OwnedEventId = parse_id(&event_id, "event ID")?;
    let ev = server
        .event_by_id(&id)
        .await?
        .filter(|e| e.room_nid == room.nid)
        .ok_or_else(|| Error::not_found("Event not found"))?;
    if !server.can_see_event(auth.user_id.as_str(), &ev).await? {
        return err(ErrorKind::NotFound, "Event not found");
    }
    let r = server
        .render_events(&[ev], auth.user_id.as_str(), &auth.device_id)
        .await?;
    Ok(Json(r.into_iter().next().unwrap_or(Value::Null)))
}

#[derive(Deserialize)]
pub struct MessagesQuery {
    from: Option<String>,
    to: Option<String>,
    dir: Option<String>,
    limit: Option<String>,
    filter: Option<String>,
}

/// A `limit` query parameter (default 10), clamped to `0..=max`.
fn parse_limit(limit: Option<&str>, max: i64) -> ApiResult<i64> {
    let limit = match limit {
        Some(l) => l
            .parse::<i64>()
            .map_err(|_| Error::invalid_param("Invalid limit"))?,
        None => 10,
    };
    Ok(limit.clamp(0, max))
}

fn parse_filter(f: Option<&str>) -> ApiResult<EventFilter> {
    match f {
        None => Ok(EventFilter::default()),
        Some(s) => serde_json::from_str(s)
            .map_err(|e| Error::bad_json(format!("Invalid filter: {e}")).into()),
    }
}

/// The caller's membership, 403 unless they are or were in the room (or it is world-readable).
async fn check_can_read(
    server: &Server,
    room: &Arc<RoomInfo>,
    user: &str,
) -> ApiResult<Option<String>> {
    let m = server
        .store
        .membership(room.nid, user)
        .await?
        .map(|m| m.membership);
    if m.is_none() {
        readable_state(server, room, user).await?;
    }
    Ok(m)
}

/// Time one `/messages` request may spend backfilling.
const BACKFILL_BUDGET: Duration = Duration::from_secs(8);
/// Backfills one `/messages` request may make.
const BACKFILL_ROUNDS: usize = 4;
/// Backward extremities asked for in one backfill.
const BACKFILL_FROM: usize = 10;

pub async fn messages(
    State(server): State<Arc<Server>>,
    Extension(fed): Extension<Arc<Federation>>,
    auth: Auth,
    Path(room_id): Path<String>,
    Query(q): Query<MessagesQuery>,
) -> ApiResult<Json<Value>> {
    let room = crate::extract::room(&server, &room_id).await?;
    let uid = auth.user_id.as_str();
    let current = check_can_read(&server, &room, uid).await?;
    let backwards = match q.dir.as_deref() {
        Some("b") => true,
        Some("f") => false,
        _ => return err(ErrorKind::InvalidParam, "dir must be b or f"),
    };
    let limit = parse_limit(q.limit.as_deref(), 1000)?;
    let filter = parse_filter(q.filter.as_deref())?;
    let limit = filter
        .limit
        .map(|l| l as i64)
        .unwrap_or(limit)
        .clamp(0, 1000);
    let now = server.events_stream.current();
    let (depth, stream, stream_max) = match q.from.as_deref().map(PageToken::parse).transpose()? {
        Some(PageToken::Topological { depth, stream }) => (depth, stream, now),
        Some(PageToken::Stream(s)) => (
            if backwards { i64::MAX } else { i64::MIN },
            if backwards { s } else { 0 },
            if backwards { s } else { now },
        ),
        None => {
            if backwards {
                (i64::MAX, now, now)
            } else {
                (i64::MIN, 0, now)
            }
        }
    };
    let start = PageToken::Topological { depth, stream };
    let start_token = match q.from.as_deref() {
        Some(f) => f.to_owned(),
        None => start.encode(),
    };
    let to = q.to.as_deref().map(PageToken::parse).transpose()?;
    let mut chunk: Vec<Arc<StoredEvent>> = Vec::new();
    let (mut cur_depth, mut cur_stream) = (depth, stream);
    let mut exhausted = false;
    // Going backwards, nothing older than a backward extremity is read before other servers
    // were asked for the history there: within a budget, and a gap that nobody could fill is
    // passed over (those at `passed` depth or above).
    let deadline = tokio::time::Instant::now() + BACKFILL_BUDGET;
    let mut rounds = 0;
    let mut passed = i64::MAX;
    // The gaps below the position read from. Reads stop at the deepest, so they stay the
    // same until a backfill round (or a gap passed over) changes them.
    let mut gap = Vec::new();
    let mut gap_stale = backwards;
    // Read pages until `limit` visible, filtered events are found or the room runs out.
    while (chunk.len() as i64) < limit {
        let want = (limit - chunk.len() as i64).max(1) * 2;
        if gap_stale {
            let below = cur_depth.min(passed.saturating_sub(1));
            gap = server
                .backward_extremities(room.nid, below, BACKFILL_FROM)
                .await?;
            gap_stale = false;
        }
        let mut rows = server
            .store
            .room_events_topological(room.nid, cur_depth, cur_stream, backwards, stream_max, want)
            .await?;
        let got = rows.len() as i64;
        // The deepest gap below the position read from: rows past it wait for the backfill.
        let gap_depth = gap.first().map(|(_, d)| *d);
        let mut at_gap = false;
        if let Some(d) = gap_depth {
            if let Some(i) = rows.iter().position(|r| r.depth < d) {
                rows.truncate(i);
                at_gap = true;
            } else if got < want {
                at_gap = true;
            }
        }
        let events = server.events_from_rows(rows).await?;
        if let Some(last) = events.last() {
            cur_depth = last.depth;
            cur_stream = last.stream_ordering.unwrap_or(0) - if backwards { 1 } else { 0 };
        }
        let mut stop = false;
        let visible = server
            .filter_visible(uid, current.as_deref(), events)
            .await?;
        for ev in visible {
            if let Some(PageToken::Topological {
                depth: td,
                stream: ts,
            }) = to
            {
                let pos = (ev.depth, ev.stream_ordering.unwrap_or(0));
                let past = if backwards {
                    pos <= (td, ts)
                } else {
                    pos > (td, ts)
                };
                if past {
                    stop = true;
                    break;
                }
            }
            if filter.allows(&ev.pdu) && filter.allows_room(room.room_id.as_str()) {
                chunk.push(ev);
                if chunk.len() as i64 >= limit {
                    break;
                }
            }
        }
        if stop {
            exhausted = true;
            break;
        }
        if let (true, Some(d)) = (at_gap, gap_depth) {
            if chunk.len() as i64 >= limit {
                break;
            }
            if rounds == BACKFILL_ROUNDS || tokio::time::Instant::now() >= deadline {
                // Out of budget: the next page starts here and backfills again.
                break;
            }
            rounds += 1;
            let from: Vec<OwnedEventId> = gap
                .iter()
                .filter(|(_, gd)| *gd == d)
                .map(|(id, _)| id.clone())
                .collect();
            let count = ((limit - chunk.len() as i64) * 2).clamp(20, BACKFILL_MAX as i64) as usize;
            // (Cut off at the deadline, a backfill keeps what it stored: each event is
            // written whole or not at all.)
            let backfill = fed.backfill(&room, &from, count, deadline);
            match tokio::time::timeout_at(deadline, backfill).await {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => passed = d,
                Ok(Err(e)) => {
                    tracing::warn!(room = %room.room_id, error = %e, "backfill failed");
                    passed = d;
                }
                // Out of time: the next page starts here and backfills again.
                Err(_) => break,
            }
            gap_stale = true;
            continue;
        }
        if got < want {
            exhausted = true;
            break;
        }
    }
    let end = match chunk.last() {
        Some(last) if !exhausted || chunk.len() as i64 >= limit => Some(
            if backwards {
                last.token_before()
            } else {
                last.token_after()
            }
            .encode(),
        ),
        _ if !exhausted => Some(
            PageToken::Topological {
                depth: cur_depth,
                stream: cur_stream,
            }
            .encode(),
        ),
        _ => None,
    };
    let mut out = json!({
        "chunk": server.render_events(&chunk, uid, &auth.device_id).await?,
        "start": start_token,
    });
    if let Some(e) = end {
        out["end"] = json!(e);
    }
    if filter.lazy_load_members {
        let state = server.current_state(&room).await?;
        let mut senders: Vec<String> = chunk.iter().map(|e| e.pdu.sender.to_string()).collect();
        senders.sort();
        senders.dedup();
        let mut members = Vec::new();
        for s in senders {
            if let Some(ev) = server.state_event(&state, "m.room.member", &s).await? {
                members.push(ev);
            }
        }
        out["state"] = json!(server.render_events(&members, uid, &auth.device_id).await?);
    }
    Ok(Json(out))
}

#[derive(Deserialize)]
pub struct ContextQuery {
    limit: Option<String>,
    filter: Option<String>,
}

pub async fn context(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path((room_id, event_id)): Path<(String, String)>,
    Query(q): Query<ContextQuery>,
) -> ApiResult<Json<Value>> {
    let room = crate::extract::room(&server, &room_id).await?;
    let uid = auth.user_id.as_str();
    let current = check_can_read(&server, &room, uid).await?;
    let id: OwnedEventId = parse_id(&event_id, "event ID")?;
    let ev = server
        .event_by_id(&id)
        .await?
        .filter(|e| e.room_nid == room.nid)
        .ok_or_else(|| Error::not_found("Event not found"))?;
    if !server.can_see_event(uid, &ev).await? {
        return err(ErrorKind::NotFound, "Event not found");
    }
    let limit = parse_limit(q.limit.as_deref(), 100)?;
    let filter = parse_filter(q.filter.as_deref())?;
    let before_n = limit / 2;
    let after_n = limit - before_n;
    let s = ev.stream_ordering.unwrap_or(0);
    let now = server.events_stream.current();
    let before_rows = server
        .store
        .room_events_topological(room.nid, ev.depth, s - 1, true, now, before_n)
        .await?;
    let after_rows = server
        .store
        .room_events_topological(room.nid, ev.depth, s, false, now, after_n)
        .await?;
    let before = server
        .filter_visible(
            uid,
            current.as_deref(),
            server.events_from_rows(before_rows).await?,
        )
        .await?;
    let after = server
        .filter_visible(
            uid,
            current.as_deref(),
            server.events_from_rows(after_rows).await?,
        )
        .await?;
    let before: Vec<_> = before
        .into_iter()
        .filter(|e| filter.allows(&e.pdu))
        .collect();
    let after: Vec<_> = after
        .into_iter()
        .filter(|e| filter.allows(&e.pdu))
        .collect();
    let start = before.last().unwrap_or(&ev).token_before();
    let end = after.last().unwrap_or(&ev).token_after();
    let state_group = ev.state_after.unwrap_or(0);
    let state = server.state_map(state_group).await?;
    let mut state_events = server.state_events(&state).await?;
    if filter.lazy_load_members {
        let senders: std::collections::HashSet<String> = before
            .iter()
            .chain(after.iter())
            .chain(std::iter::once(&ev))
            .map(|e| e.pdu.sender.to_string())
            .collect();
        state_events.retain(|e| {
            e.pdu.kind.to_string() != "m.room.member"
                || e.pdu
                    .state_key
                    .as_ref()
                    .is_some_and(|k| senders.contains(k))
        });
    }
    Ok(Json(json!({
        "event": server.render_events(std::slice::from_ref(&ev), uid, &auth.device_id).await?.pop(),
        "events_before": server.render_events(&before, uid, &auth.device_id).await?,
        "events_after": server.render_events(&after, uid, &auth.device_id).await?,
        "start": start.encode(),
        "end": end.encode(),
        "state": server.render_events(&state_events, uid, &auth.device_id).await?,
    })))
}

#[derive(Deserialize, Default)]
pub struct RedactBody {
    reason: Option<String>,
}

pub async fn redact(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path((room_id, event_id, txn_id)): Path<(String, String, String)>,
    JsonBody(body): JsonBody<RedactBody>,
) -> ApiResult<Json<Value>> {
    let room = crate::extract::room(&server, &room_id).await?;
    let target: OwnedEventId = parse_id(&event_id, "event ID")?;
    let mut content = json!({});
    if let Some(r) = body.reason {
        content["reason"] = json!(r);
    }
    let mut event = NewEvent::message("m.room.redaction", content)?;
    event.redacts = Some(target);
    let scope = format!("redact/{}/{event_id}", room.room_id);
    let id = send_event(&server, &auth, &room, event, Some((&scope, &txn_id))).await?;
    Ok(Json(json!({ "event_id": id })))
}
