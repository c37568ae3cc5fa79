//! Room membership (spec § "Room membership"): join (by ID or alias), invite, leave, forget,
//! kick, ban, unban, and the member lists. Whether a change is allowed is decided by the room
//! version's auth rules when the member event is built.

use std::{collections::HashMap, sync::Arc};

use axum::{
    extract::{Path, Query, RawQuery, State},
    Extension, Json,
};
use myelin_core::{
    pdu::NewEvent,
    ruma::{
        OwnedRoomAliasId, OwnedRoomId, OwnedServerName, OwnedUserId, RoomId, ServerName, UserId,
    },
    server::JoinAuthorisation,
    token::SyncToken,
    Append, Error, ErrorKind, RoomInfo, Server,
};
use myelin_federation::Federation;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{
    error::{err, ApiResult},
    extract::{parse_id, Auth, JsonBody},
};

#[derive(Deserialize, Default)]
pub struct ReasonBody {
    reason: Option<String>,
}

#[derive(Deserialize)]
pub struct TargetBody {
    user_id: String,
    reason: Option<String>,
}

/// The member event content for `user` with the given membership (profile included on join).
async fn member_content(
    server: &Server,
    user: &UserId,
    membership: &str,
    reason: Option<&str>,
) -> ApiResult<Value> {
    let mut c = json!({ "membership": membership });
    if membership == "join" || membership == "invite" {
        if let Some(p) = server.store.user(user.as_str()).await? {
            if let Some(d) = p.displayname {
                c["displayname"] = json!(d);
            }
            if let Some(a) = p.avatar_url {
                c["avatar_url"] = json!(a);
            }
        }
    }
    if let Some(r) = reason {
        c["reason"] = json!(r);
    }
    Ok(c)
}

async fn set_membership(
    server: &Server,
    room: &Arc<RoomInfo>,
    sender: &UserId,
    target: &UserId,
    membership: &str,
    reason: Option<&str>,
) -> ApiResult<()> {
    let content = member_content(server, target, membership, reason).await?;
    append_member(server, room, sender, target, content).await
}

/// Appends `target`'s membership event with `content`, sent by `sender`.
async fn append_member(
    server: &Server,
    room: &Arc<RoomInfo>,
    sender: &UserId,
    target: &UserId,
    content: Value,
) -> ApiResult<()> {
    server
        .append(
            room,
            vec![Append {
                sender: sender.to_owned(),
                event: NewEvent::state("m.room.member", target.as_str(), content)?,
                txn: None,
            }],
        )
        .await?;
    Ok(())
}

/// The servers to reach a room through: `via`, then the room ID's server; `M_NOT_FOUND`
/// (`missing`) when there is none.
fn through(
    mut via: Vec<OwnedServerName>,
    room_id: &RoomId,
    missing: &str,
) -> ApiResult<Vec<OwnedServerName>> {
    if let Some(s) = room_id.server_name() {
        via.push(s.to_owned());
    }
    via.dedup();
    if via.is_empty() {
        return err(ErrorKind::NotFound, missing);
    }
    Ok(via)
}

/// `?server_name=a&via=b&via=c` as server names (keys repeat, so the query is parsed by hand).
fn via_servers(raw: Option<String>) -> Vec<OwnedServerName> {
    raw.unwrap_or_default()
        .split('&')
        .filter_map(|kv| {
            kv.strip_prefix("server_name=")
                .or_else(|| kv.strip_prefix("via="))
        })
        .map(crate::extract::percent_decode)
        .filter_map(|s| OwnedServerName::try_from(s).ok())
        .collect()
}

pub async fn join_by_id_or_alias(
    State(server): State<Arc<Server>>,
    Extension(fed): Extension<Arc<Federation>>,
    auth: Auth,
    Path(target): Path<String>,
    RawQuery(query): RawQuery,
    JsonBody(body): JsonBody<ReasonBody>,
) -> ApiResult<Json<Value>> {
    let (room_id, via) = resolve_target(&server, &fed, &target, query).await?;
    join_room_id(&server, &fed, &auth, &room_id, via, body.reason).await
}

/// A room ID or alias from the path, with the servers to go through: `?via=` and
/// `?server_name=`, then those another server names for its alias.
async fn resolve_target(
    server: &Server,
    fed: &Federation,
    target: &str,
    query: Option<String>,
) -> ApiResult<(OwnedRoomId, Vec<OwnedServerName>)> {
    let mut via = via_servers(query);
    let room_id: OwnedRoomId = if target.starts_with('#') {
        let alias: OwnedRoomAliasId = parse_id(target, "room alias")?;
        if alias.server_name() == server.server_name.as_ref() as &ServerName {
            let (room_id, _) = server
                .store
                .alias(alias.as_str())
                .await?
                .ok_or_else(|| Error::not_found("Room alias not found"))?;
            parse_id(&room_id, "room ID")?
        } else {
            let (room_id, servers) = fed.query_alias(alias.as_str()).await?;
            via.extend(servers);
            room_id
        }
    } else if target.starts_with('!') {
        parse_id(target, "room ID")?
    } else {
        return err(ErrorKind::InvalidParam, "Expected a room ID or alias");
    };
    Ok((room_id, via))
}

/// `POST /knock/{roomIdOrAlias}`: asks to be let into a room whose join rule is `knock` (or
/// `knock_restricted`). Knocks locally when a user of ours is in the room, otherwise through
/// another server (`make_knock`/`send_knock`).
pub async fn knock(
    State(server): State<Arc<Server>>,
    Extension(fed): Extension<Arc<Federation>>,
    auth: Auth,
    Path(target): Path<String>,
    RawQuery(query): RawQuery,
    JsonBody(body): JsonBody<ReasonBody>,
) -> ApiResult<Json<Value>> {
    let (room_id, via) = resolve_target(&server, &fed, &target, query).await?;
    if let Some(room) = server.room(&room_id).await? {
        let current = server
            .store
            .membership(room.nid, auth.user_id.as_str())
            .await?;
        match current.as_ref().map(|m| m.membership.as_str()) {
            Some("knock") => return Ok(Json(json!({ "room_id": room_id }))),
            Some("join") => return err(ErrorKind::Forbidden, "You are already in the room"),
            Some("invite") => return err(ErrorKind::Forbidden, "You are invited to the room"),
            Some("ban") => return err(ErrorKind::Forbidden, "You are banned from the room"),
            _ => {}
        }
        if server.is_resident(room.nid).await? {
            set_membership(
                &server,
                &room,
                &auth.user_id,
                &auth.user_id,
                "knock",
                body.reason.as_deref(),
            )
            .await?;
            return Ok(Json(json!({ "room_id": room_id })));
        }
    }
    let via = through(via, &room_id, "Unknown room; no server to knock through")?;
    fed.knock_remote(&auth.user_id, &room_id, &via, body.reason.as_deref())
        .await?;
    Ok(Json(json!({ "room_id": room_id })))
}

pub async fn join(
    State(server): State<Arc<Server>>,
    Extension(fed): Extension<Arc<Federation>>,
    auth: Auth,
    Path(room_id): Path<String>,
    JsonBody(body): JsonBody<ReasonBody>,
) -> ApiResult<Json<Value>> {
    let room_id: OwnedRoomId = parse_id(&room_id, "room ID")?;
    join_room_id(&server, &fed, &auth, &room_id, vec![], body.reason).await
}

/// Joins locally when a user of ours is in the room, otherwise through another server: the
/// `via` servers, the server that invited us, and the room ID's server.
async fn join_room_id(
    server: &Server,
    fed: &Federation,
    auth: &Auth,
    room_id: &OwnedRoomId,
    mut via: Vec<OwnedServerName>,
    reason: Option<String>,
) -> ApiResult<Json<Value>> {
    let room = server.room(room_id).await?;
    if let Some(room) = &room {
        if server.is_resident(room.nid).await? {
            return do_join(server, auth, room, reason).await;
        }
        if let Some(m) = server
            .store
            .membership(room.nid, auth.user_id.as_str())
            .await?
        {
            if m.membership == "invite" {
                let ev = server.event(m.event_nid).await?;
                via.push(ev.pdu.sender.server_name().to_owned());
            }
        }
    }
    let via = through(via, room_id, "Unknown room; no server to join it through")?;
    fed.join_remote(&auth.user_id, room_id, &via, reason.as_deref())
        .await?;
    Ok(Json(json!({ "room_id": room_id })))
}

async fn do_join(
    server: &Server,
    auth: &Auth,
    room: &Arc<RoomInfo>,
    reason: Option<String>,
) -> ApiResult<Json<Value>> {
    let current = server
        .store
        .membership(room.nid, auth.user_id.as_str())
        .await?;
    if current.as_ref().is_some_and(|m| m.membership == "join") {
        // Joining again is a no-op (unless the profile changed, which the profile API handles).
        return Ok(Json(json!({ "room_id": room.room_id })));
    }
    let mut content = member_content(server, &auth.user_id, "join", reason.as_deref()).await?;
    // A restricted room: one of our users who may invite vouches for the join.
    if let JoinAuthorisation::By(by) = server.join_authorisation(room, &auth.user_id).await? {
        content["join_authorised_via_users_server"] = json!(by);
    }
    append_member(server, room, &auth.user_id, &auth.user_id, content).await?;
    Ok(Json(json!({ "room_id": room.room_id })))
}

pub async fn invite(
    State(server): State<Arc<Server>>,
    Extension(fed): Extension<Arc<Federation>>,
    auth: Auth,
    Path(room_id): Path<String>,
    JsonBody(body): JsonBody<TargetBody>,
) -> ApiResult<Json<Value>> {
    let room = crate::extract::room(&server, &room_id).await?;
    let target: OwnedUserId = parse_id(&body.user_id, "user ID")?;
    if target.server_name().as_str() != server.server_name() {
        let current = server.store.membership(room.nid, target.as_str()).await?;
        if current.as_ref().is_some_and(|m| m.membership == "invite") {
            return Ok(Json(json!({})));
        }
        fed.invite_remote(&room, &auth.user_id, &target, body.reason)
            .await?;
        return Ok(Json(json!({})));
    }
    if server.store.user(target.as_str()).await?.is_none() {
        return err(ErrorKind::NotFound, "Unknown user");
    }
    let current = server.store.membership(room.nid, target.as_str()).await?;
    if current.as_ref().is_some_and(|m| m.membership == "invite") {
        return Ok(Json(json!({})));
    }
    set_membership(
        &server,
        &room,
        &auth.user_id,
        &target,
        "invite",
        body.reason.as_deref(),
    )
    .await?;
    Ok(Json(json!({})))
}

pub async fn leave(
    State(server): State<Arc<Server>>,
    Extension(fed): Extension<Arc<Federation>>,
    auth: Auth,
    Path(room_id): Path<String>,
    JsonBody(body): JsonBody<ReasonBody>,
) -> ApiResult<Json<Value>> {
    let room = crate::extract::room(&server, &room_id).await?;
    let current = server
        .store
        .membership(room.nid, auth.user_id.as_str())
        .await?;
    match current.as_ref().map(|m| m.membership.as_str()) {
        Some("join") | Some("invite") | Some("knock") => {}
        Some("leave") => return Ok(Json(json!({}))),
        _ => return err(ErrorKind::Forbidden, "You are not in this room"),
    }
    if let Some(m) = current.as_ref().filter(|m| m.membership != "join") {
        if !server.is_resident(room.nid).await? {
            // An invite (or knock) to a room we are not in: leave through the other server.
            let ev = server.event(m.event_nid).await?;
            let mut via = vec![ev.pdu.sender.server_name().to_owned()];
            if let Some(s) = room.room_id.server_name() {
                via.push(s.to_owned());
            }
            // A knock's sender is our own user: the servers of the room's stripped state
            // (its creator's, first) know the room.
            for e in server
                .remote_invite_state(room.nid, auth.user_id.as_str())
                .await?
                .unwrap_or_default()
            {
                if let Some(s) = e
                    .get("sender")
                    .and_then(Value::as_str)
                    .and_then(|u| OwnedUserId::try_from(u).ok())
                {
                    if !via.iter().any(|v| v == s.server_name()) {
                        via.push(s.server_name().to_owned());
                    }
                }
            }
            fed.leave_remote(&auth.user_id, &room.room_id, &via, body.reason.as_deref())
                .await?;
            return Ok(Json(json!({})));
        }
    }
    let reason = body.reason;
    set_membership(
        &server,
        &room,
        &auth.user_id,
        &auth.user_id,
        "leave",
        reason.as_deref(),
    )
    .await?;
    Ok(Json(json!({})))
}

pub async fn forget(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(room_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let room = crate::extract::room(&server, &room_id).await?;
    match server
        .store
        .membership(room.nid, auth.user_id.as_str())
        .await?
    {
        Some(m) if m.membership == "join" || m.membership == "invite" => err(
            ErrorKind::BadState,
            "You must leave the room before forgetting it",
        ),
        Some(_) => {
            server.forget_room(room.nid, auth.user_id.as_str()).await?;
            Ok(Json(json!({})))
        }
        None => err(ErrorKind::NotFound, "You were never in this room"),
    }
}

async fn moderate(
    server: &Server,
    auth: &Auth,
    room_id: &str,
    body: TargetBody,
    membership: &str,
) -> ApiResult<Json<Value>> {
    let room = crate::extract::room(server, room_id).await?;
    let target: OwnedUserId = parse_id(&body.user_id, "user ID")?;
    if membership == "unban" {
        let current = server.store.membership(room.nid, target.as_str()).await?;
        if current.as_ref().map(|m| m.membership.as_str()) != Some("ban") {
            return err(ErrorKind::Forbidden, "User is not banned");
        }
        set_membership(
            server,
            &room,
            &auth.user_id,
            &target,
            "leave",
            body.reason.as_deref(),
        )
        .await?;
    } else {
        if membership == "leave" {
            let current = server.store.membership(room.nid, target.as_str()).await?;
            if !current
                .as_ref()
                .is_some_and(|m| matches!(m.membership.as_str(), "join" | "invite" | "knock"))
            {
                return err(ErrorKind::Forbidden, "User is not in the room");
            }
        }
        set_membership(
            server,
            &room,
            &auth.user_id,
            &target,
            membership,
            body.reason.as_deref(),
        )
        .await?;
    }
    Ok(Json(json!({})))
}

pub async fn kick(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(room_id): Path<String>,
    JsonBody(body): JsonBody<TargetBody>,
) -> ApiResult<Json<Value>> {
    moderate(&server, &auth, &room_id, body, "leave").await
}

pub async fn ban(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(room_id): Path<String>,
    JsonBody(body): JsonBody<TargetBody>,
) -> ApiResult<Json<Value>> {
    moderate(&server, &auth, &room_id, body, "ban").await
}

pub async fn unban(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(room_id): Path<String>,
    JsonBody(body): JsonBody<TargetBody>,
) -> ApiResult<Json<Value>> {
    moderate(&server, &auth, &room_id, body, "unban").await
}

pub async fn joined_rooms(State(server): State<Arc<Server>>, auth: Auth) -> ApiResult<Json<Value>> {
    let rooms = server.store.rooms_of_user(auth.user_id.as_str()).await?;
    let mut ids = Vec::new();
    for m in rooms.into_iter().filter(|m| m.membership == "join") {
        ids.push(server.room_by_nid(m.room_nid).await?.room_id.to_string());
    }
    Ok(Json(json!({ "joined_rooms": ids })))
}

/// The state a member may read: current state while joined, else the state when they left.
pub async fn readable_state(
    server: &Server,
    room: &Arc<RoomInfo>,
    user: &str,
) -> ApiResult<Arc<myelin_core::state::StateMap>> {
    let m = server.store.membership(room.nid, user).await?;
    match m {
        Some(m) if m.membership == "join" => Ok(server.current_state(room).await?),
        Some(m) if m.membership == "leave" || m.membership == "ban" => {
            let ev = server.event(m.event_nid).await?;
            let g = ev.state_before.unwrap_or(0);
            // State as it was when they left (including their leave).
            let g = ev.state_after.unwrap_or(g);
            Ok(server.state_map(g).await?)
        }
        _ => {
            let state = server.current_state(room).await?;
            let hv = server
                .state_event(&state, "m.room.history_visibility", "")
                .await?
                .and_then(|e| e.pdu.content_str("history_visibility"));
            if hv.as_deref() == Some("world_readable") {
                Ok(state)
            } else {
                err(ErrorKind::Forbidden, "You are not a member of this room")
            }
        }
    }
}

#[derive(Deserialize)]
pub struct MembersQuery {
    at: Option<String>,
    membership: Option<String>,
    not_membership: Option<String>,
}

pub async fn members(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(room_id): Path<String>,
    Query(q): Query<MembersQuery>,
) -> ApiResult<Json<Value>> {
    let room = crate::extract::room(&server, &room_id).await?;
    let mut state = readable_state(&server, &room, auth.user_id.as_str()).await?;
    if let Some(at) = &q.at {
        let pos = SyncToken::parse(at).map(|t| t.events).or_else(|_| {
            myelin_core::token::PageToken::parse(at).map(|p| match p {
                myelin_core::token::PageToken::Stream(s) => s,
                myelin_core::token::PageToken::Topological { stream, .. } => stream,
            })
        })?;
        // The caller may read the room (checked above); `at` picks an earlier snapshot.
        if let Some(g) = server.store.state_group_at(room.nid, pos).await? {
            state = server.state_map(g).await?;
        }
    }
    let events = server.state_events(&state).await?;
    let chunk: Vec<_> = events
        .into_iter()
        .filter(|e| e.pdu.kind.to_string() == "m.room.member")
        .filter(|e| {
            let m = e.pdu.content_str("membership").unwrap_or_default();
            q.membership.as_ref().is_none_or(|w| *w == m)
                && q.not_membership.as_ref().is_none_or(|n| *n != m)
        })
        .collect();
    let rendered = server
        .render_events(&chunk, auth.user_id.as_str(), &auth.device_id)
        .await?;
    Ok(Json(json!({ "chunk": rendered })))
}

pub async fn joined_members(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(room_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let room = crate::extract::room(&server, &room_id).await?;
    let state = readable_state(&server, &room, auth.user_id.as_str()).await?;
    let mut joined = HashMap::new();
    for e in server.state_events(&state).await? {
        if e.pdu.kind.to_string() != "m.room.member"
            || e.pdu.content_str("membership").as_deref() != Some("join")
        {
            continue;
        }
        let c = e.pdu.content_value();
        joined.insert(
            e.pdu.state_key.clone().unwrap_or_default(),
            json!({ "display_name": c.get("displayname"), "avatar_url": c.get("avatar_url") }),
        );
    }
    Ok(Json(json!({ "joined": joined })))
}

/// Leaves every room a user is joined to or invited to (account deactivation).
pub async fn leave_all_rooms(server: &Server, user: &OwnedUserId) -> ApiResult<()> {
    for m in server.store.rooms_of_user(user.as_str()).await? {
        if matches!(m.membership.as_str(), "join" | "invite" | "knock") {
            let room = server.room_by_nid(m.room_nid).await?;
            if let Err(e) = set_membership(server, &room, user, user, "leave", None).await {
                tracing::warn!(room = %room.room_id, error = ?e.0, "could not leave room on deactivation");
            }
        }
    }
    Ok(())
}
