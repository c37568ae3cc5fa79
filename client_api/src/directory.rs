//! Room aliases and the published room directory (spec § "Room aliases", "Published room
//! directory"): alias create/resolve/delete, a room's local aliases, `publicRooms` (GET and
//! filtered POST, paginated) and a room's directory visibility.
//!
//! Only local aliases and the local directory are served; remote ones need federation.
//! `publicRooms` pagination tokens are `o<offset>` into the filtered list, which is ordered by
//! joined member count (largest first), then room ID.

use std::sync::Arc;

use axum::{
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use myelin_core::{pdu::NewEvent, power::PowerLevels, Append, Error, RoomInfo, Server};
use ruma::{OwnedRoomAliasId, OwnedRoomId, UserId};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::{
    error::matrix_error,
    error::ApiResult,
    extract::{parse_id, Auth, JsonBody},
};

/// Rooms per `publicRooms` page when the client asks for no (or a non-positive) limit, and the
/// most it may ask for.
const MAX_PUBLIC_ROOMS_PAGE: usize = 500;

// Shared helpers ------------------------------------------------------------------------------

/// A string field of a state event's content in the room's current state.
async fn state_str(
    server: &Server,
    state: &myelin_core::state::StateMap,
    event_type: &str,
    field: &str,
) -> myelin_core::Result<Option<String>> {
    Ok(server
        .state_event(state, event_type, "")
        .await?
        .and_then(|e| e.pdu.content_str(field)))
}

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
    let pl = server
        .state_event(&state, "m.room.power_levels", "")
        .await?;
    let create = server.state_event(&state, "m.room.create", "").await?;
    let power = PowerLevels::from_state(
        pl.as_ref().map(|e| &*e.pdu),
        create.as_ref().map(|e| &*e.pdu),
        &room.rules,
    );
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
        let vis = state_str(
            &server,
            &state,
            "m.room.history_visibility",
            "history_visibility",
        )
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

/// One entry of the published room directory.
#[derive(Debug, Clone, Default, PartialEq)]
struct PublicRoom {
    room_id: String,
    name: Option<String>,
    topic: Option<String>,
    canonical_alias: Option<String>,
    avatar_url: Option<String>,
    join_rule: Option<String>,
    room_type: Option<String>,
    world_readable: bool,
    guest_can_join: bool,
    num_joined_members: usize,
}

impl PublicRoom {
    fn to_json(&self) -> Value {
        let mut out = Map::new();
        out.insert("room_id".into(), json!(self.room_id));
        out.insert("num_joined_members".into(), json!(self.num_joined_members));
        out.insert("world_readable".into(), json!(self.world_readable));
        out.insert("guest_can_join".into(), json!(self.guest_can_join));
        for (k, v) in [
            ("name", &self.name),
            ("topic", &self.topic),
            ("canonical_alias", &self.canonical_alias),
            ("avatar_url", &self.avatar_url),
            ("join_rule", &self.join_rule),
            ("room_type", &self.room_type),
        ] {
            if let Some(v) = v {
                out.insert(k.into(), json!(v));
            }
        }
        Value::Object(out)
    }

    /// Whether the room's name, topic or canonical alias contains `term` (case-insensitive).
    fn matches_term(&self, term: &str) -> bool {
        let term = term.trim().to_lowercase();
        if term.is_empty() {
            return true;
        }
        [&self.name, &self.topic, &self.canonical_alias]
            .into_iter()
            .flatten()
            .any(|s| s.to_lowercase().contains(&term))
    }

    /// Whether the room's type is in `types` (`None` standing for rooms without a type).
    fn matches_types(&self, types: &[Option<String>]) -> bool {
        types.is_empty() || types.contains(&self.room_type)
    }
}

/// The directory entry of a room, from its current state.
async fn summarize(server: &Server, room: &RoomInfo) -> myelin_core::Result<PublicRoom> {
    let state = server.current_state(room).await?;
    let nonempty = |s: Option<String>| s.filter(|s| !s.is_empty());
    let num_joined_members = server
        .members(room.nid)
        .await?
        .values()
        .filter(|m| m.as_str() == "join")
        .count();
    let room_type = server
        .state_event(&state, "m.room.create", "")
        .await?
        .and_then(|e| e.pdu.content_str("type"));
    Ok(PublicRoom {
        room_id: room.room_id.to_string(),
        name: nonempty(state_str(server, &state, "m.room.name", "name").await?),
        topic: nonempty(state_str(server, &state, "m.room.topic", "topic").await?),
        canonical_alias: nonempty(
            state_str(server, &state, "m.room.canonical_alias", "alias").await?,
        ),
        avatar_url: nonempty(state_str(server, &state, "m.room.avatar", "url").await?),
        join_rule: state_str(server, &state, "m.room.join_rules", "join_rule").await?,
        room_type,
        world_readable: state_str(
            server,
            &state,
            "m.room.history_visibility",
            "history_visibility",
        )
        .await?
        .as_deref()
            == Some("world_readable"),
        guest_can_join: state_str(server, &state, "m.room.guest_access", "guest_access")
            .await?
            .as_deref()
            == Some("can_join"),
        num_joined_members,
    })
}

/// A `publicRooms` pagination token: the offset of the batch it asks for.
fn encode_token(offset: usize) -> String {
    format!("o{offset}")
}

fn decode_token(token: &str) -> Option<usize> {
    token.strip_prefix('o')?.parse().ok()
}

/// The page `[start, end)` of `total` entries and its `(next_batch, prev_batch)` offsets.
fn page(total: usize, start: usize, limit: usize) -> (usize, usize, Option<usize>, Option<usize>) {
    let start = start.min(total);
    let end = start.saturating_add(limit).min(total);
    let next = (end < total).then_some(end);
    let prev = (start > 0).then(|| start.saturating_sub(limit));
    (start, end, next, prev)
}

/// What a `publicRooms` request asks for.
struct DirectoryQuery {
    limit: Option<i64>,
    since: Option<String>,
    server: Option<String>,
    term: Option<String>,
    room_types: Vec<Option<String>>,
    /// A third-party network was asked for; Myelin bridges none, so nothing is in it.
    third_party_only: bool,
}

async fn public_rooms(server: &Server, q: DirectoryQuery) -> ApiResult<Json<Value>> {
    if q.server
        .as_deref()
        .is_some_and(|s| s != server.server_name())
    {
        return Err(Error::not_found("Room directories of other servers are not available").into());
    }
    let start = match q.since.as_deref() {
        None | Some("") => 0,
        Some(t) => decode_token(t).ok_or_else(|| Error::invalid_param("Invalid since token"))?,
    };
    let limit = match q.limit {
        Some(l) if l > 0 => (l as usize).min(MAX_PUBLIC_ROOMS_PAGE),
        _ => MAX_PUBLIC_ROOMS_PAGE,
    };
    let mut rooms = Vec::new();
    if !q.third_party_only {
        for row in server.store.public_rooms().await? {
            let room = server.room_by_nid(row.room_nid).await?;
            let entry = summarize(server, &room).await?;
            if q.term.as_deref().is_none_or(|t| entry.matches_term(t))
                && entry.matches_types(&q.room_types)
            {
                rooms.push(entry);
            }
        }
    }
    rooms.sort_by(|a, b| {
        b.num_joined_members
            .cmp(&a.num_joined_members)
            .then_with(|| a.room_id.cmp(&b.room_id))
    });
    let (start, end, next, prev) = page(rooms.len(), start, limit);
    let mut out = json!({
        "chunk": rooms[start..end].iter().map(PublicRoom::to_json).collect::<Vec<_>>(),
        "total_room_count_estimate": rooms.len(),
    });
    if let Some(n) = next {
        out["next_batch"] = json!(encode_token(n));
    }
    if let Some(p) = prev {
        out["prev_batch"] = json!(encode_token(p));
    }
    Ok(Json(out))
}

#[derive(Deserialize)]
pub struct PublicRoomsQuery {
    limit: Option<String>,
    since: Option<String>,
    server: Option<String>,
}

/// `GET /publicRooms` (no authentication needed).
pub async fn public_rooms_get(
    State(server): State<Arc<Server>>,
    Query(q): Query<PublicRoomsQuery>,
) -> ApiResult<Json<Value>> {
    let limit = match q.limit.as_deref() {
        None | Some("") => None,
        Some(l) => Some(
            l.parse::<i64>()
                .map_err(|_| Error::invalid_param("Invalid limit"))?,
        ),
    };
    public_rooms(
        &server,
        DirectoryQuery {
            limit,
            since: q.since,
            server: q.server,
            term: None,
            room_types: vec![],
            third_party_only: false,
        },
    )
    .await
}

#[derive(Deserialize, Default)]
pub struct PublicRoomsFilter {
    generic_search_term: Option<String>,
    room_types: Option<Vec<Option<String>>>,
}

#[derive(Deserialize)]
pub struct PublicRoomsBody {
    limit: Option<i64>,
    since: Option<String>,
    filter: Option<PublicRoomsFilter>,
    #[serde(default)]
    include_all_networks: bool,
    third_party_instance_id: Option<String>,
}

#[derive(Deserialize)]
pub struct ServerQuery {
    server: Option<String>,
}

/// `POST /publicRooms`.
pub async fn public_rooms_post(
    State(server): State<Arc<Server>>,
    _auth: Auth,
    Query(q): Query<ServerQuery>,
    JsonBody(body): JsonBody<PublicRoomsBody>,
) -> ApiResult<Json<Value>> {
    let filter = body.filter.unwrap_or_default();
    public_rooms(
        &server,
        DirectoryQuery {
            limit: body.limit,
            since: body.since,
            server: q.server,
            term: filter.generic_search_term,
            room_types: filter.room_types.unwrap_or_default(),
            third_party_only: !body.include_all_networks && body.third_party_instance_id.is_some(),
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        for n in [0, 1, 20, 123_456] {
            assert_eq!(decode_token(&encode_token(n)), Some(n));
        }
        for bad in ["", "o", "x5", "o-1", "ofive", "5"] {
            assert_eq!(decode_token(bad), None, "{bad}");
        }
    }

    #[test]
    fn pages_walk_forwards_and_backwards() {
        assert_eq!(page(5, 0, 2), (0, 2, Some(2), None));
        assert_eq!(page(5, 2, 2), (2, 4, Some(4), Some(0)));
        assert_eq!(page(5, 4, 2), (4, 5, None, Some(2)));
        assert_eq!(page(5, 1, 2), (1, 3, Some(3), Some(0)));
        assert_eq!(page(5, 9, 2), (5, 5, None, Some(3)));
        assert_eq!(page(0, 0, 10), (0, 0, None, None));
        assert_eq!(page(3, 0, usize::MAX), (0, 3, None, None));
    }

    fn room() -> PublicRoom {
        PublicRoom {
            room_id: "!r:x".into(),
            name: Some("Cheese Lovers".into()),
            topic: Some("All about Brie".into()),
            canonical_alias: Some("#fromage:x".into()),
            ..Default::default()
        }
    }

    #[test]
    fn search_matches_name_topic_alias_case_insensitively() {
        let r = room();
        assert!(r.matches_term("cheese"));
        assert!(r.matches_term("BRIE"));
        assert!(r.matches_term("fromage"));
        assert!(r.matches_term("  "));
        assert!(!r.matches_term("wine"));
        assert!(!PublicRoom::default().matches_term("x"));
    }

    #[test]
    fn room_types_filter() {
        let mut r = room();
        assert!(r.matches_types(&[]));
        assert!(r.matches_types(&[None]));
        assert!(!r.matches_types(&[Some("m.space".into())]));
        r.room_type = Some("m.space".into());
        assert!(r.matches_types(&[None, Some("m.space".into())]));
        assert!(!r.matches_types(&[None]));
    }

    #[test]
    fn entries_omit_absent_fields() {
        let v = PublicRoom {
            room_id: "!r:x".into(),
            num_joined_members: 3,
            ..Default::default()
        }
        .to_json();
        assert_eq!(
            v,
            json!({"room_id": "!r:x", "num_joined_members": 3, "world_readable": false,
                   "guest_can_join": false})
        );
        assert_eq!(room().to_json()["canonical_alias"], "#fromage:x");
    }

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
