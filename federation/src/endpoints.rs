//! `/_matrix/federation/*` handlers. Every one but `/version` takes a [`Signed`] request; data
//! of a room is served only to servers with a member in it.

use std::{
    collections::{HashSet, VecDeque},
    sync::Arc,
};

use axum::{
    extract::{Path, Query, RawQuery, State},
    routing::{get, post, put},
    Json, Router,
};
use myelin_core::{
    pdu::{Pdu, SUPPORTED_ROOM_VERSIONS},
    ruma::{
        canonical_json::CanonicalJsonObject, OwnedEventId, OwnedRoomId, OwnedUserId, RoomVersionId,
        ServerName,
    },
    server::{Ingested, Ingesting, JoinAuthorisation, QueuedIngest},
    Error, ErrorKind, RoomInfo, Server, StoredEvent,
};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::{auth::Signed, inbound::parse_pdu, FedResult, FedState, Federation};

/// Most PDUs and EDUs in one inbound transaction.
const MAX_TXN_PDUS: usize = 50;
const MAX_TXN_EDUS: usize = 100;
/// Most events served by one `/backfill` or `/get_missing_events`.
const MAX_SERVED: usize = 100;

pub fn routes() -> Router<FedState> {
    let v1 = Router::new()
        .route("/version", get(version))
        .route("/send/{txn_id}", put(send_transaction))
        .route("/make_join/{room_id}/{user_id}", get(make_join))
        .route("/make_leave/{room_id}/{user_id}", get(make_leave))
        .route("/make_knock/{room_id}/{user_id}", get(make_knock))
        .route("/send_knock/{room_id}/{event_id}", put(send_knock))
        .route("/event/{event_id}", get(get_event))
        .route("/state/{room_id}", get(get_state))
        .route("/state_ids/{room_id}", get(get_state_ids))
        .route("/event_auth/{room_id}/{event_id}", get(event_auth))
        .route("/backfill/{room_id}", get(backfill))
        .route("/get_missing_events/{room_id}", post(get_missing_events))
        .route("/query/directory", get(query_directory))
        .route(
            "/publicRooms",
            get(crate::rooms::public_rooms_get).post(crate::rooms::public_rooms_post),
        )
        .route("/hierarchy/{room_id}", get(crate::rooms::hierarchy))
        .route("/query/profile", get(query_profile))
        .route("/user/devices/{user_id}", get(crate::e2ee::user_devices))
        .route("/user/keys/query", post(crate::e2ee::user_keys_query))
        .route("/user/keys/claim", post(crate::e2ee::user_keys_claim));
    let v2 = Router::new()
        .route("/send_join/{room_id}/{event_id}", put(send_join))
        .route("/send_leave/{room_id}/{event_id}", put(send_leave))
        .route("/invite/{room_id}/{event_id}", put(invite));
    Router::new()
        .nest("/_matrix/federation/v1", v1)
        .nest("/_matrix/federation/v2", v2)
}

fn fed(s: &FedState) -> &Arc<Federation> {
    &s.0
}

async fn version() -> Json<Value> {
    Json(json!({ "server": { "name": "Myelin", "version": env!("CARGO_PKG_VERSION") } }))
}

fn parse<T: TryFrom<String>>(s: String, what: &str) -> FedResult<T> {
    T::try_from(s).map_err(|_| Error::invalid_param(format!("invalid {what}")).into())
}

async fn known_room(server: &Server, room_id: String) -> FedResult<Arc<RoomInfo>> {
    let room_id: OwnedRoomId = parse(room_id, "room ID")?;
    Ok(server.room_or_404(&room_id).await?)
}

/// Refuses servers the room's server ACL denies (403 `M_FORBIDDEN`, as the spec requires for
/// every membership handshake and room read).
async fn require_acl(server: &Server, room: &RoomInfo, origin: &ServerName) -> FedResult<()> {
    if server.server_acl_allows(room, origin).await? {
        Ok(())
    } else {
        Err(Error::forbidden("Your server is denied by the room's server ACL").into())
    }
}

/// The room of a membership handshake from `origin`: known here, and not denied to `origin`
/// by its server ACL.
async fn acl_room(
    server: &Server,
    room_id: String,
    origin: &ServerName,
) -> FedResult<Arc<RoomInfo>> {
    let room = known_room(server, room_id).await?;
    require_acl(server, &room, origin).await?;
    Ok(room)
}

/// Refuses servers without a member in the room (joined, invited or knocking), and servers the
/// room's server ACL denies.
async fn require_in_room(server: &Server, room: &RoomInfo, origin: &ServerName) -> FedResult<()> {
    require_acl(server, room, origin).await?;
    let members = server.members(room.nid).await?;
    let suffix = format!(":{origin}");
    if members
        .iter()
        .any(|(u, m)| u.ends_with(&suffix) && (m == "join" || m == "invite" || m == "knock"))
    {
        Ok(())
    } else {
        Err(Error::forbidden("Your server has no member in this room").into())
    }
}

/// Refuses a user ID that does not belong to the requesting server.
fn require_own_user(user: &OwnedUserId, origin: &ServerName) -> FedResult<()> {
    if user.server_name() != origin {
        return Err(Error::forbidden("The user does not belong to your server").into());
    }
    Ok(())
}

fn body(signed: &Signed) -> FedResult<&Map<String, Value>> {
    signed
        .body
        .as_ref()
        .and_then(Value::as_object)
        .ok_or_else(|| Error::new(ErrorKind::NotJson, "Body must be a JSON object").into())
}

// Transactions --------------------------------------------------------------------------------

async fn send_transaction(
    State(st): State<FedState>,
    Path(txn_id): Path<String>,
    signed: Signed,
) -> FedResult<Json<Value>> {
    let fed = fed(&st);
    let server = &fed.server;
    let origin = signed.origin.clone();
    if let Some(previous) = server.store.inbound_txn(origin.as_str(), &txn_id).await? {
        return Ok(Json(serde_json::from_str(&previous)?));
    }
    let b = body(&signed)?;
    let pdus = match b.get("pdus") {
        Some(Value::Array(p)) => p.clone(),
        None => vec![],
        Some(_) => return Err(Error::bad_json("pdus must be an array").into()),
    };
    let edus = match b.get("edus") {
        Some(Value::Array(e)) => e.clone(),
        None => vec![],
        Some(_) => return Err(Error::bad_json("edus must be an array").into()),
    };
    if pdus.len() > MAX_TXN_PDUS || edus.len() > MAX_TXN_EDUS {
        return Err(Error::bad_json(format!(
            "a transaction carries at most {MAX_TXN_PDUS} PDUs and {MAX_TXN_EDUS} EDUs"
        ))
        .into());
    }
    // In order; an event that extends the previous one is queued for the writer without
    // awaiting that one's commit, so a transaction's events share the writer's commits. One
    // that refers to a queued event otherwise (as an auth event, or as a parent beside
    // others) is handled once the queued ones are written.
    let mut results = Map::new();
    let mut queued: Vec<(String, QueuedIngest)> = Vec::new();
    for value in pdus {
        let (id, received) = receive_pdu(fed, &origin, &value).await;
        let outcome = match received {
            Err(e) => Err(e),
            Ok((room, pdu)) => {
                let id = pdu.event_id.to_string();
                let mut started = fed.start_pdu(&origin, &room, pdu.clone()).await;
                if matches!(started, Ok(Ingesting::InFlight)) {
                    finish_queued(fed, &origin, &mut queued, &mut results).await;
                    started = fed
                        .handle_pdu(&origin, &room, pdu, false)
                        .await
                        .map(Ingesting::Done);
                }
                match started {
                    Ok(Ingesting::Queued(q)) => {
                        queued.push((id, q));
                        continue;
                    }
                    Ok(Ingesting::Done(done)) => pdu_result(&origin, &id, Ok(done)),
                    Ok(Ingesting::InFlight) => {
                        Err("an event it refers to is still being stored".into())
                    }
                    Err(e) => pdu_result(&origin, &id, Err(e)),
                }
            }
        };
        if let Some(id) = id {
            results.insert(id, result_entry(outcome));
        }
    }
    finish_queued(fed, &origin, &mut queued, &mut results).await;
    // To-device messages and device-list changes are taken in; typing, receipts and presence
    // are dropped until their features exist (room EDUs must then pass
    // `Server::server_acl_allows` for their room, as PDUs do).
    fed.receive_edus(&origin, &edus).await?;
    let response = json!({ "pdus": results });
    server
        .store
        .put_inbound_txn(origin.as_str(), &txn_id, &response.to_string())
        .await?;
    Ok(Json(response))
}

/// Awaits the commits of the queued events of a transaction and records their outcomes.
async fn finish_queued(
    fed: &Federation,
    origin: &ServerName,
    queued: &mut Vec<(String, QueuedIngest)>,
    results: &mut Map<String, Value>,
) {
    for (id, q) in queued.drain(..) {
        let outcome = fed.server.finish_ingest(q).await;
        results.insert(id.clone(), result_entry(pdu_result(origin, &id, outcome)));
    }
}

/// A PDU's entry in the transaction's answer.
fn result_entry(outcome: Result<(), String>) -> Value {
    match outcome {
        Ok(()) => json!({}),
        Err(e) => json!({ "error": e }),
    }
}

/// What an event's handling means for the sending server.
fn pdu_result(
    origin: &ServerName,
    id: &str,
    outcome: myelin_core::Result<Ingested>,
) -> Result<(), String> {
    match outcome {
        Ok(Ingested::Accepted(_) | Ingested::Known | Ingested::SoftFailed) => Ok(()),
        Ok(Ingested::Rejected(why)) => Err(why),
        Ok(Ingested::Missing(ids)) => Err(format!("missing events: {ids:?}")),
        Err(e) => {
            tracing::warn!(origin = %origin, event = %id, error = %e, "handling an event failed");
            Err(e.message())
        }
    }
}

/// One PDU of a transaction, checked up to its ingestion: `(event ID if it could be
/// computed, its room and verified event, or why it was refused)`.
async fn receive_pdu(
    fed: &Federation,
    origin: &ServerName,
    value: &Value,
) -> (Option<String>, Result<(Arc<RoomInfo>, Pdu), String>) {
    let Some(room_id) = value.get("room_id").and_then(Value::as_str) else {
        return (None, Err("event has no room_id".into()));
    };
    let room = match OwnedRoomId::try_from(room_id) {
        Ok(r) => match fed.server.room(&r).await {
            Ok(Some(room)) => room,
            _ => return (None, Err("unknown room".into())),
        },
        Err(_) => return (None, Err("invalid room_id".into())),
    };
    match fed.server.has_state(&room).await {
        Ok(true) => {}
        _ => return (None, Err("this server is not in the room".into())),
    }
    let denied = !fed
        .server
        .server_acl_allows(&room, origin)
        .await
        .unwrap_or(false);
    // Parsed first, so a refusal can name the event.
    let (obj, pdu) = match parse_pdu(&room, value) {
        Ok(parsed) => parsed,
        Err(e) => return (None, Err(e.message())),
    };
    let id = Some(pdu.event_id.to_string());
    if denied {
        return (
            id,
            Err("your server is denied by the room's server ACL".into()),
        );
    }
    match fed.verify_parsed(&room, &obj, pdu).await {
        Ok(pdu) => (id, Ok((room, pdu))),
        Err(e) => (id, Err(e.message())),
    }
}

// Membership handshakes -----------------------------------------------------------------------

fn versions_from(raw: Option<String>) -> Vec<String> {
    raw.unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.strip_prefix("ver="))
        .map(|v| v.to_owned())
        .collect()
}

async fn template(
    st: &FedState,
    signed: &Signed,
    room_id: String,
    user_id: String,
    membership: &str,
    versions: Option<Vec<String>>,
) -> FedResult<Json<Value>> {
    let server = &fed(st).server;
    let user: OwnedUserId = parse(user_id, "user ID")?;
    require_own_user(&user, &signed.origin)?;
    let room = acl_room(server, room_id, &signed.origin).await?;
    if let Some(versions) = versions {
        let supported = if versions.is_empty() {
            vec!["1".to_owned()]
        } else {
            versions
        };
        if !supported.iter().any(|v| v == room.version.as_str()) {
            return Err(Error::new(
                ErrorKind::IncompatibleRoomVersion,
                format!("The room is version {}", room.version),
            )
            .into());
        }
    }
    let event = server.membership_template(&room, &user, membership).await?;
    Ok(Json(
        json!({ "event": event, "room_version": room.version }),
    ))
}

async fn make_join(
    State(st): State<FedState>,
    Path((room_id, user_id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    signed: Signed,
) -> FedResult<Json<Value>> {
    template(
        &st,
        &signed,
        room_id,
        user_id,
        "join",
        Some(versions_from(q)),
    )
    .await
}

async fn make_leave(
    State(st): State<FedState>,
    Path((room_id, user_id)): Path<(String, String)>,
    signed: Signed,
) -> FedResult<Json<Value>> {
    template(&st, &signed, room_id, user_id, "leave", None).await
}

async fn make_knock(
    State(st): State<FedState>,
    Path((room_id, user_id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    signed: Signed,
) -> FedResult<Json<Value>> {
    template(
        &st,
        &signed,
        room_id,
        user_id,
        "knock",
        Some(versions_from(q)),
    )
    .await
}

/// Checks and adds another server's membership event sent to us as the resident server, and
/// relays it to the room's other servers.
async fn accept_membership(
    st: &FedState,
    signed: &Signed,
    room: Arc<RoomInfo>,
    event_id: String,
    membership: &str,
) -> FedResult<(Arc<RoomInfo>, Arc<StoredEvent>)> {
    let fed = fed(st);
    let value = signed
        .body
        .clone()
        .ok_or_else(|| Error::new(ErrorKind::NotJson, "Body must be the event"))?;
    let pdu = fed.verify_pdu(&room, &value).await?;
    if pdu.event_id.as_str() != event_id {
        return Err(Error::bad_json("event ID does not match the path").into());
    }
    if pdu.kind.to_string() != "m.room.member"
        || pdu.state_key.as_deref() != Some(pdu.sender.as_str())
        || pdu.content_str("membership").as_deref() != Some(membership)
    {
        return Err(Error::bad_json(format!("not a {membership} event of its sender")).into());
    }
    if pdu.sender.server_name() != signed.origin {
        return Err(Error::forbidden("The sender does not belong to your server").into());
    }
    match fed
        .handle_pdu(&signed.origin, &room, pdu.clone(), true)
        .await?
    {
        Ingested::Accepted(ev) => Ok((room, ev)),
        Ingested::Known => {
            let ev = fed
                .server
                .event_by_id(&pdu.event_id)
                .await?
                .ok_or_else(|| Error::internal("event vanished"))?;
            Ok((room, ev))
        }
        Ingested::SoftFailed => {
            Err(Error::forbidden("not allowed by the room's current state").into())
        }
        Ingested::Rejected(why) => Err(Error::forbidden(why).into()),
        Ingested::Missing(ids) => Err(Error::forbidden(format!("unknown events {ids:?}")).into()),
    }
}

/// A join of a restricted room that names one of our users in
/// `join_authorised_via_users_server` needs our signature: given (on the body, before the
/// event is verified) only when the joining user still qualifies under the join rule.
async fn authorise_restricted_join(
    st: &FedState,
    signed: &mut Signed,
    room: &RoomInfo,
) -> FedResult<()> {
    let server = &fed(st).server;
    let Some(body) = signed.body.as_mut() else {
        return Ok(());
    };
    let named = body
        .get("content")
        .and_then(|c| c.get("join_authorised_via_users_server"))
        .and_then(Value::as_str)
        .and_then(|u| OwnedUserId::try_from(u).ok());
    let Some(named) = named else {
        return Ok(());
    };
    if named.server_name() != server.server_name() {
        return Ok(()); // Another resident server vouches; its signature is its own business.
    }
    let sender = body
        .get("sender")
        .and_then(Value::as_str)
        .and_then(|u| OwnedUserId::try_from(u).ok())
        .ok_or_else(|| Error::bad_json("join without a valid sender"))?;
    match server.join_authorisation(room, &sender).await? {
        JoinAuthorisation::By(_) => {}
        JoinAuthorisation::NotNeeded => {
            return Err(Error::bad_json(
                "join_authorised_via_users_server is set but the join needs no authorisation",
            )
            .into())
        }
    }
    let mut obj = myelin_core::pdu::canonical_object(body.clone())?;
    myelin_core::pdu::countersign(&mut obj, server.server_name(), &server.key, &room.rules)?;
    *body = serde_json::to_value(&obj)?;
    Ok(())
}

async fn send_join(
    State(st): State<FedState>,
    Path((room_id, event_id)): Path<(String, String)>,
    mut signed: Signed,
) -> FedResult<Json<Value>> {
    let server = &fed(&st).server;
    let room = acl_room(server, room_id, &signed.origin).await?;
    authorise_restricted_join(&st, &mut signed, &room).await?;
    let (room, ev) = accept_membership(&st, &signed, room, event_id, "join").await?;
    let state_group = ev
        .state_before
        .ok_or_else(|| Error::internal("join without state"))?;
    let state = server
        .state_events(&*server.state_map(state_group).await?)
        .await?;
    let mut ids: Vec<OwnedEventId> = state.iter().map(|e| e.pdu.event_id.clone()).collect();
    ids.extend(ev.pdu.auth_events.iter().cloned());
    let chain = server.auth_chain(&ids).await?;
    let servers: HashSet<String> = server
        .members(room.nid)
        .await?
        .iter()
        .filter(|(_, m)| m.as_str() == "join")
        .filter_map(|(u, _)| u.split_once(':').map(|(_, s)| s.to_owned()))
        .collect();
    Ok(Json(json!({
        "origin": server.server_name(),
        "state": state.iter().map(|e| pdu_json(e)).collect::<Vec<_>>(),
        "auth_chain": chain.iter().map(|e| pdu_json(e)).collect::<Vec<_>>(),
        "event": pdu_json(&ev),
        "members_omitted": false,
        "servers_in_room": servers,
    })))
}

async fn send_leave(
    State(st): State<FedState>,
    Path((room_id, event_id)): Path<(String, String)>,
    signed: Signed,
) -> FedResult<Json<Value>> {
    let room = acl_room(&fed(&st).server, room_id, &signed.origin).await?;
    accept_membership(&st, &signed, room, event_id, "leave").await?;
    Ok(Json(json!({})))
}

async fn send_knock(
    State(st): State<FedState>,
    Path((room_id, event_id)): Path<(String, String)>,
    signed: Signed,
) -> FedResult<Json<Value>> {
    let server = &fed(&st).server;
    let room = acl_room(server, room_id, &signed.origin).await?;
    let (room, ev) = accept_membership(&st, &signed, room, event_id, "knock").await?;
    let stripped = server.stripped_state(&room, ev.nid).await?;
    Ok(Json(json!({ "knock_room_state": stripped })))
}

async fn invite(
    State(st): State<FedState>,
    Path((room_id, event_id)): Path<(String, String)>,
    signed: Signed,
) -> FedResult<Json<Value>> {
    let fed = fed(&st);
    let server = &fed.server;
    let b = body(&signed)?;
    let version = b
        .get("room_version")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::bad_json("room_version is required"))?;
    let version =
        RoomVersionId::try_from(version).map_err(|_| Error::bad_json("invalid room_version"))?;
    if !SUPPORTED_ROOM_VERSIONS.contains(&version.as_str()) {
        return Err(Error::new(
            ErrorKind::IncompatibleRoomVersion,
            format!("Room version {version} is not supported"),
        )
        .into());
    }
    let event = b
        .get("event")
        .ok_or_else(|| Error::bad_json("event is required"))?;
    let room_id: OwnedRoomId = parse(room_id, "room ID")?;
    if let Some(known) = server.room(&room_id).await? {
        if server.has_state(&known).await? {
            require_acl(server, &known, &signed.origin).await?;
        }
    }
    let rules = myelin_core::pdu::rules_for(&version)?;
    let probe = RoomInfo {
        nid: 0,
        room_id: room_id.clone(),
        version: version.clone(),
        rules,
    };
    let pdu = fed.verify_pdu(&probe, event).await?;
    if pdu.event_id.as_str() != event_id {
        return Err(Error::bad_json("event ID does not match the path").into());
    }
    let invitee = pdu
        .state_key
        .as_deref()
        .and_then(|s| OwnedUserId::try_from(s).ok())
        .ok_or_else(|| Error::bad_json("invite without a valid state_key"))?;
    if pdu.content_str("membership").as_deref() != Some("invite")
        || pdu.kind.to_string() != "m.room.member"
    {
        return Err(Error::bad_json("not an invite").into());
    }
    if pdu.sender.server_name() != signed.origin {
        return Err(Error::forbidden("The sender does not belong to your server").into());
    }
    if *invitee.server_name() != *server.server_name {
        return Err(Error::bad_json("The invitee is not on this server").into());
    }
    match server.store.user(invitee.as_str()).await? {
        Some(u) if !u.deactivated => {}
        _ => return Err(Error::not_found("No such user").into()),
    }
    // Countersign the invite.
    let mut obj: CanonicalJsonObject = serde_json::from_str(pdu.json.get())?;
    myelin_core::pdu::countersign(&mut obj, server.server_name(), &server.key, &probe.rules)?;
    let signed_pdu = myelin_core::server::pdu_from_federation(&obj, &version)?;
    let stripped = b
        .get("invite_room_state")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    server
        .store_remote_membership(version, signed_pdu, stripped)
        .await?;
    Ok(Json(json!({ "event": obj })))
}

// Reading rooms -------------------------------------------------------------------------------

/// An event as served to other servers: the stored JSON as signed.
fn pdu_json(ev: &StoredEvent) -> Value {
    serde_json::from_str(ev.pdu.json.get()).unwrap_or(Value::Null)
}

async fn get_event(
    State(st): State<FedState>,
    Path(event_id): Path<String>,
    signed: Signed,
) -> FedResult<Json<Value>> {
    let server = &fed(&st).server;
    let id: OwnedEventId = parse(event_id, "event ID")?;
    let ev = server
        .event_by_id(&id)
        .await?
        .filter(|e| !e.rejected)
        .ok_or_else(|| Error::not_found("Unknown event"))?;
    let room = server.room_by_nid(ev.room_nid).await?;
    require_in_room(server, &room, &signed.origin).await?;
    Ok(Json(json!({
        "origin": server.server_name(),
        "origin_server_ts": myelin_core::store::now_ms(),
        "pdus": [pdu_json(&ev)],
    })))
}

#[derive(Deserialize)]
struct AtEvent {
    event_id: String,
}

/// `(state event IDs before the event, their auth chain)`.
async fn state_at(
    st: &FedState,
    signed: &Signed,
    room_id: String,
    event_id: String,
) -> FedResult<(Vec<Arc<StoredEvent>>, Vec<Arc<StoredEvent>>)> {
    let server = &fed(st).server;
    let room = known_room(server, room_id).await?;
    require_in_room(server, &room, &signed.origin).await?;
    let id: OwnedEventId = parse(event_id, "event ID")?;
    let ev = server
        .event_by_id(&id)
        .await?
        .filter(|e| e.room_nid == room.nid && !e.rejected)
        .ok_or_else(|| Error::not_found("Unknown event"))?;
    let group = ev
        .state_before
        .ok_or_else(|| Error::not_found("The state at this event is not known"))?;
    // Group 0 is the empty state before a room's create event; it has no stored snapshot.
    let state = if group == 0 {
        Vec::new()
    } else {
        server
            .state_events(&*server.state_map(group).await?)
            .await?
    };
    let ids: Vec<OwnedEventId> = state.iter().map(|e| e.pdu.event_id.clone()).collect();
    let chain = server.auth_chain(&ids).await?;
    Ok((state, chain))
}

async fn get_state(
    State(st): State<FedState>,
    Path(room_id): Path<String>,
    Query(q): Query<AtEvent>,
    signed: Signed,
) -> FedResult<Json<Value>> {
    let (state, chain) = state_at(&st, &signed, room_id, q.event_id).await?;
    Ok(Json(json!({
        "pdus": state.iter().map(|e| pdu_json(e)).collect::<Vec<_>>(),
        "auth_chain": chain.iter().map(|e| pdu_json(e)).collect::<Vec<_>>(),
    })))
}

async fn get_state_ids(
    State(st): State<FedState>,
    Path(room_id): Path<String>,
    Query(q): Query<AtEvent>,
    signed: Signed,
) -> FedResult<Json<Value>> {
    let (state, chain) = state_at(&st, &signed, room_id, q.event_id).await?;
    Ok(Json(json!({
        "pdu_ids": state.iter().map(|e| e.pdu.event_id.to_string()).collect::<Vec<_>>(),
        "auth_chain_ids": chain.iter().map(|e| e.pdu.event_id.to_string()).collect::<Vec<_>>(),
    })))
}

async fn event_auth(
    State(st): State<FedState>,
    Path((room_id, event_id)): Path<(String, String)>,
    signed: Signed,
) -> FedResult<Json<Value>> {
    let server = &fed(&st).server;
    let room = known_room(server, room_id).await?;
    require_in_room(server, &room, &signed.origin).await?;
    let id: OwnedEventId = parse(event_id, "event ID")?;
    let ev = server
        .event_by_id(&id)
        .await?
        .filter(|e| e.room_nid == room.nid)
        .ok_or_else(|| Error::not_found("Unknown event"))?;
    let chain = server.auth_chain(&ev.pdu.auth_events).await?;
    Ok(Json(json!({
        "auth_chain": chain.iter().map(|e| pdu_json(e)).collect::<Vec<_>>(),
    })))
}

/// Walks `prev_events` back from `from`, breadth first, stopping at `stop`, at most `limit`.
async fn walk_back(
    server: &Server,
    room: &RoomInfo,
    from: Vec<OwnedEventId>,
    stop: &HashSet<OwnedEventId>,
    limit: usize,
    min_depth: i64,
    include_start: bool,
) -> FedResult<Vec<Arc<StoredEvent>>> {
    let mut seen: HashSet<OwnedEventId> = HashSet::new();
    let mut queue: VecDeque<(OwnedEventId, bool)> = from.into_iter().map(|e| (e, true)).collect();
    let mut out = Vec::new();
    while let Some((id, start)) = queue.pop_front() {
        if out.len() >= limit {
            break;
        }
        if !seen.insert(id.clone()) || stop.contains(&id) {
            continue;
        }
        let Some(ev) = server.event_by_id(&id).await? else {
            continue;
        };
        if ev.room_nid != room.nid || ev.rejected || ev.pdu.depth < min_depth {
            continue;
        }
        for p in &ev.pdu.prev_events {
            queue.push_back((p.clone(), false));
        }
        if include_start || !start {
            out.push(ev);
        }
    }
    Ok(out)
}

async fn backfill(
    State(st): State<FedState>,
    Path(room_id): Path<String>,
    RawQuery(q): RawQuery,
    signed: Signed,
) -> FedResult<Json<Value>> {
    let server = &fed(&st).server;
    let room = known_room(server, room_id).await?;
    require_in_room(server, &room, &signed.origin).await?;
    let mut from = Vec::new();
    let mut limit = 10usize;
    for kv in q.unwrap_or_default().split('&') {
        if let Some(v) = kv.strip_prefix("v=") {
            let v = percent_decode(v);
            from.push(parse::<OwnedEventId>(v, "event ID")?);
        } else if let Some(l) = kv.strip_prefix("limit=") {
            limit = l
                .parse()
                .map_err(|_| Error::invalid_param("invalid limit"))?;
        }
    }
    let events = walk_back(
        server,
        &room,
        from,
        &HashSet::new(),
        limit.min(MAX_SERVED),
        0,
        true,
    )
    .await?;
    Ok(Json(json!({
        "origin": server.server_name(),
        "origin_server_ts": myelin_core::store::now_ms(),
        "pdus": events.iter().map(|e| pdu_json(e)).collect::<Vec<_>>(),
    })))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Deserialize)]
struct MissingBody {
    #[serde(default)]
    earliest_events: Vec<OwnedEventId>,
    latest_events: Vec<OwnedEventId>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    min_depth: Option<i64>,
}

async fn get_missing_events(
    State(st): State<FedState>,
    Path(room_id): Path<String>,
    signed: Signed,
) -> FedResult<Json<Value>> {
    let server = &fed(&st).server;
    let room = known_room(server, room_id).await?;
    require_in_room(server, &room, &signed.origin).await?;
    let b: MissingBody = serde_json::from_value(signed.body.clone().unwrap_or(Value::Null))
        .map_err(|e| Error::bad_json(e.to_string()))?;
    let stop: HashSet<OwnedEventId> = b.earliest_events.into_iter().collect();
    let limit = b.limit.unwrap_or(10).min(MAX_SERVED);
    let mut events = walk_back(
        server,
        &room,
        b.latest_events,
        &stop,
        limit,
        b.min_depth.unwrap_or(0),
        false,
    )
    .await?;
    events.sort_by_key(|e| e.pdu.depth);
    Ok(Json(json!({
        "events": events.iter().map(|e| pdu_json(e)).collect::<Vec<_>>(),
    })))
}

// Queries --------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct DirectoryQuery {
    room_alias: String,
}

async fn query_directory(
    State(st): State<FedState>,
    Query(q): Query<DirectoryQuery>,
    _signed: Signed,
) -> FedResult<Json<Value>> {
    let server = &fed(&st).server;
    let (room_id, _) = server
        .store
        .alias(&q.room_alias)
        .await?
        .ok_or_else(|| Error::not_found("Room alias not found"))?;
    let mut servers = vec![server.server_name().to_owned()];
    if let Some(room) = server
        .room(&parse::<OwnedRoomId>(room_id.clone(), "room ID")?)
        .await?
    {
        servers.extend(server.room_servers(room.nid).await?.iter().cloned());
    }
    Ok(Json(json!({ "room_id": room_id, "servers": servers })))
}

#[derive(Deserialize)]
struct ProfileQuery {
    user_id: String,
    field: Option<String>,
}

async fn query_profile(
    State(st): State<FedState>,
    Query(q): Query<ProfileQuery>,
    _signed: Signed,
) -> FedResult<Json<Value>> {
    let server = &fed(&st).server;
    let user: OwnedUserId = parse(q.user_id, "user ID")?;
    if *user.server_name() != *server.server_name {
        return Err(Error::invalid_param("The user is not on this server").into());
    }
    let row = server
        .store
        .user(user.as_str())
        .await?
        .ok_or_else(|| Error::not_found("No such user"))?;
    let mut out = Map::new();
    let want = |f: &str| q.field.as_deref().is_none_or(|w| w == f);
    if let (true, Some(d)) = (want("displayname"), row.displayname) {
        out.insert("displayname".into(), json!(d));
    }
    if let (true, Some(a)) = (want("avatar_url"), row.avatar_url) {
        out.insert("avatar_url".into(), json!(a));
    }
    Ok(Json(Value::Object(out)))
}
