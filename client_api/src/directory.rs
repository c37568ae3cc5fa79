//! Room aliases and the published room directory (spec § "Room aliases", "Published room
//! directory"): alias create/resolve/delete, a room's local aliases, `publicRooms` (GET and
//! filtered POST, paginated) and a room's directory visibility.
//!
//! Another server's aliases and room directory (`publicRooms?server=`) are asked for over
//! federation; our directory itself (summaries, filters, paging) is `myelin_core::directory`.

use std::sync::Arc;

use axum::{
    extract::{Extension, Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use myelin_core::{
    directory::{parse_limit, PublicRoomsBody, PublicRoomsQuery},
    pdu::NewEvent,
    Append, Error, RoomInfo, Server,
};
use myelin_federation::Federation;
use ruma::{OwnedRoomAliasId, OwnedRoomId, OwnedServerName, UserId};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{
    error::matrix_error,
    error::ApiResult,
    extract::{parse_id, Auth, JsonBody},
};

// Shared helpers ------------------------------------------------------------------------------

async fn is_joined(server: &Server, room: &RoomInfo, user: &UserId) -> myelin_core::Result<bool> {
    Ok(server
        .members(room.nid)
        .await?
        .get(user.as_str())
        .map(String::as_str)
        == Some("join"))
}

/// Whether `user` may manage the room's aliases and directory listing: joined, with the power
/// to send `m.room.canonical_alias`.
async fn can_manage(server: &Server, room: &RoomInfo, user: &UserId) -> myelin_core::Result<bool> {
    if !is_joined(server, room, user).await? {
        return Ok(false);
    }
    let state = server.current_state(room).await?;
    let power = server.power_levels(room, &state).await?;
    Ok(power.can_send(user, "m.room.canonical_alias", true))
}

/// Parses a `{roomAlias}` path segment (`M_INVALID_PARAM` when malformed).
fn parse_alias(alias: &str) -> ApiResult<OwnedRoomAliasId> {
    parse_id(alias, "room alias")
}

// Aliases -------------------------------------------------------------------------------------

/// `GET /directory/room/{roomAlias}`.
pub async fn get_alias(
    State(server): State<Arc<Server>>,
    axum::Extension(fed): axum::Extension<Arc<myelin_federation::Federation>>,
    Path(alias): Path<String>,
) -> ApiResult<Json<Value>> {
    let alias = parse_alias(&alias)?;
    let not_found = || Error::not_found(format!("Room alias {alias} not found"));
    if alias.server_name().as_str() != server.server_name() {
        // Another server's alias: ask it.
        let (room_id, servers) = fed.query_alias(alias.as_str()).await?;
        return Ok(Json(json!({ "room_id": room_id, "servers": servers })));
    }
    let (room_id, _) = server
        .store
        .alias(alias.as_str())
        .await?
        .ok_or_else(not_found)?;
    Ok(Json(
        json!({ "room_id": room_id, "servers": [server.server_name()] }),
    ))
}

#[derive(Deserialize)]
pub struct PutAliasBody {
    room_id: String,
}

/// `PUT /directory/room/{roomAlias}`: the alias must be on this server; the caller must be
/// joined to the room (or be a server admin).
pub async fn put_alias(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(alias): Path<String>,
    JsonBody(body): JsonBody<PutAliasBody>,
) -> ApiResult<Response> {
    let alias = parse_alias(&alias)?;
    if alias.server_name().as_str() != server.server_name() {
        return Err(Error::invalid_param("Room alias must be on this server").into());
    }
    let room_id: OwnedRoomId = parse_id(&body.room_id, "room ID")?;
    let room = server.room_or_404(&room_id).await?;
    if !auth.is_admin && !is_joined(&server, &room, &auth.user_id).await? {
        return Err(Error::forbidden("You are not joined to this room").into());
    }
    if !server
        .store
        .put_alias(alias.as_str(), room_id.as_str(), auth.user_id.as_str())
        .await?
    {
        return Ok(matrix_error(
            StatusCode::CONFLICT,
            "M_UNKNOWN",
            &format!("Room alias {alias} already exists"),
        ));
    }
    Ok(Json(json!({})).into_response())
}

/// `DELETE /directory/room/{roomAlias}`: by the alias's creator, a server admin, or a member
/// with the power to send `m.room.canonical_alias`. The alias is also taken out of the room's
/// canonical alias event if it is there.
pub async fn delete_alias(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(alias): Path<String>,
) -> ApiResult<Json<Value>> {
    let alias = parse_alias(&alias)?;
    let (room_id, creator) = server
        .store
        .alias(alias.as_str())
        .await?
        .ok_or_else(|| Error::not_found(format!("Room alias {alias} not found")))?;
    let room = match OwnedRoomId::try_from(room_id.as_str()) {
        Ok(id) => server.room(&id).await?,
        Err(_) => None,
    };
    let allowed = creator == auth.user_id.as_str()
        || auth.is_admin
        || match &room {
            Some(r) => can_manage(&server, r, &auth.user_id).await?,
            None => false,
        };
    if !allowed {
        return Err(Error::forbidden("You may not delete this alias").into());
    }
    if !server.store.delete_alias(alias.as_str()).await? {
        return Err(Error::not_found(format!("Room alias {alias} not found")).into());
    }
    if let Some(room) = room {
        if let Err(e) =
            drop_from_canonical_alias(&server, &room, &auth.user_id, alias.as_str()).await
        {
            tracing::warn!(alias = %alias, error = %e, "canonical alias event not updated");
        }
    }
    Ok(Json(json!({})))
}

/// `content` of `m.room.canonical_alias` without `alias`, or `None` if it does not mention it.
fn canonical_without(content: &Value, alias: &str) -> Option<Value> {
    let mut c = content.as_object().cloned().unwrap_or_default();
    let mut changed = false;
    if c.get("alias").and_then(Value::as_str) == Some(alias) {
        c.remove("alias");
        changed = true;
    }
    if let Some(Value::Array(alts)) = c.get_mut("alt_aliases") {
        let before = alts.len();
        alts.retain(|a| a.as_str() != Some(alias));
        changed |= alts.len() != before;
    }
    changed.then_some(Value::Object(c))
}

async fn drop_from_canonical_alias(
    server: &Server,
    room: &Arc<RoomInfo>,
    sender: &UserId,
    alias: &str,
) -> myelin_core::Result<()> {
    let state = server.current_state(room).await?;
    let Some(ev) = server
        .state_event(&state, "m.room.canonical_alias", "")
        .await?
    else {
        return Ok(());
    };
    let Some(content) = canonical_without(&ev.pdu.content_value(), alias) else {
        return Ok(());
    };
    server
        .append(
            room,
            vec![Append {
                sender: sender.to_owned(),
                event: NewEvent::state("m.room.canonical_alias", "", content)?,
                txn: None,
            }],
        )
        .await?;
    Ok(())
}

/// `GET /rooms/{roomId}/aliases`: for members, or anyone if the room is world-readable.
pub async fn room_aliases(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(room_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let room_id: OwnedRoomId = parse_id(&room_id, "room ID")?;
    let forbidden = || Error::forbidden("You are not a member of the room");
    let room = server.room(&room_id).await?.ok_or_else(forbidden)?;
    if !auth.is_admin && !is_joined(&server, &room, &auth.user_id).await? {
        let state = server.current_state(&room).await?;
        let vis = server
            .state_field(&state, "m.room.history_visibility", "history_visibility")
            .await?;
        if vis.as_deref() != Some("world_readable") {
            return Err(forbidden().into());
        }
    }
    let aliases = server.store.aliases_of_room(room_id.as_str()).await?;
    Ok(Json(json!({ "aliases": aliases })))
}

// Directory visibility ------------------------------------------------------------------------

/// `GET /directory/list/room/{roomId}`.
pub async fn get_visibility(
    State(server): State<Arc<Server>>,
    Path(room_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let room_id: OwnedRoomId = parse_id(&room_id, "room ID")?;
    let row = server
        .store
        .room(room_id.as_str())
        .await?
        .ok_or_else(|| Error::not_found("Room not found"))?;
    Ok(Json(
        json!({ "visibility": if row.is_public { "public" } else { "private" } }),
    ))
}

#[derive(Deserialize)]
pub struct VisibilityBody {
    visibility: Option<String>,
}

/// `PUT /directory/list/room/{roomId}`: for server admins and members who may send
/// `m.room.canonical_alias`.
pub async fn put_visibility(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(room_id): Path<String>,
    JsonBody(body): JsonBody<VisibilityBody>,
) -> ApiResult<Json<Value>> {
    let room_id: OwnedRoomId = parse_id(&room_id, "room ID")?;
    let public = match body.visibility.as_deref().unwrap_or("public") {
        "public" => true,
        "private" => false,
        other => return Err(Error::invalid_param(format!("Unknown visibility {other:?}")).into()),
    };
    let room = server
        .room(&room_id)
        .await?
        .ok_or_else(|| Error::not_found("Room not found"))?;
    if !auth.is_admin && !can_manage(&server, &room, &auth.user_id).await? {
        return Err(Error::forbidden("You may not change this room's directory listing").into());
    }
    server.store.set_room_public(room.nid, public).await?;
    Ok(Json(json!({})))
}

// publicRooms ---------------------------------------------------------------------------------

/// A `publicRooms` answer: ours from the directory, another server's over federation.
async fn public_rooms(
    server: &Server,
    fed: &Federation,
    remote: Option<String>,
    q: PublicRoomsQuery,
) -> ApiResult<Json<Value>> {
    if let Some(other) = remote.filter(|s| s != server.server_name()) {
        let other: OwnedServerName = parse_id(&other, "server name")?;
        let body = fed.public_rooms(&other, &q).await?;
        return Ok(Json(body));
    }
    Ok(Json(server.public_rooms(q).await?))
}

#[derive(Deserialize)]
pub struct PublicRoomsQueryParams {
    limit: Option<String>,
    since: Option<String>,
    server: Option<String>,
}

/// `GET /publicRooms` (no authentication needed); `server` names another server to ask.
pub async fn public_rooms_get(
    State(server): State<Arc<Server>>,
    Extension(fed): Extension<Arc<Federation>>,
    Query(q): Query<PublicRoomsQueryParams>,
) -> ApiResult<Json<Value>> {
    let query = PublicRoomsQuery {
        limit: parse_limit(q.limit.as_deref())?,
        since: q.since,
        ..Default::default()
    };
    public_rooms(&server, &fed, q.server, query).await
}

#[derive(Deserialize)]
pub struct ServerQuery {
    server: Option<String>,
}

/// `POST /publicRooms`.
pub async fn public_rooms_post(
    State(server): State<Arc<Server>>,
    Extension(fed): Extension<Arc<Federation>>,
    _auth: Auth,
    Query(q): Query<ServerQuery>,
    JsonBody(body): JsonBody<PublicRoomsBody>,
) -> ApiResult<Json<Value>> {
    public_rooms(&server, &fed, q.server, body.into()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_alias_loses_the_deleted_alias() {
        let c = json!({"alias": "#a:x", "alt_aliases": ["#a:x", "#b:x"]});
        assert_eq!(
            canonical_without(&c, "#a:x").unwrap(),
            json!({"alt_aliases": ["#b:x"]})
        );
        assert_eq!(
            canonical_without(&c, "#b:x").unwrap(),
            json!({"alias": "#a:x", "alt_aliases": ["#a:x"]})
        );
        assert!(canonical_without(&c, "#c:x").is_none());
    }
}
