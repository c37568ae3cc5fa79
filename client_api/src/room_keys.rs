//! Server-side key backups (spec § "Server-side key backups"): backup versions
//! (`/room_keys/version[/{version}]`) and the keys stored in them (`/room_keys/keys`, per room,
//! per session, each with `?version=`). The rules live in `myelin_core::backup`.

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use myelin_core::{
    backup::{self, BackupVersion, KeyBackupData, KeyScope, NotCurrent, RoomKeyBackup, RoomKeys},
    Error, ErrorKind, Server,
};
use ruma::OwnedRoomId;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::{
    error::ApiResult,
    extract::{parse_id, Auth, JsonBody},
};

/// A version in a path: one we never handed out is unknown.
fn path_version(version: &str) -> ApiResult<BackupVersion> {
    BackupVersion::parse(version).ok_or_else(|| Error::not_found("Unknown backup version").into())
}

#[derive(Deserialize)]
pub struct VersionQuery {
    version: Option<String>,
}

impl VersionQuery {
    fn raw(&self) -> ApiResult<&str> {
        self.version
            .as_deref()
            .ok_or_else(|| Error::missing_param("Missing version parameter").into())
    }

    /// The version to read or delete keys from.
    fn existing(&self) -> ApiResult<BackupVersion> {
        path_version(self.raw()?)
    }

    /// The version to store keys in; `None` when it names none we could have handed out.
    fn for_upload(&self) -> ApiResult<Option<BackupVersion>> {
        Ok(BackupVersion::parse(self.raw()?))
    }
}

#[derive(Deserialize)]
pub struct CreateVersionBody {
    algorithm: String,
    auth_data: Map<String, Value>,
}

/// `POST /room_keys/version`.
pub async fn create_version(
    State(server): State<Arc<Server>>,
    auth: Auth,
    JsonBody(body): JsonBody<CreateVersionBody>,
) -> ApiResult<Json<Value>> {
    let version = backup::create_version(
        &server.store,
        &auth.user_id,
        &body.algorithm,
        &body.auth_data,
    )
    .await?;
    Ok(Json(json!({ "version": version.to_string() })))
}

/// `GET /room_keys/version`: the current version.
pub async fn get_current_version(
    State(server): State<Arc<Server>>,
    auth: Auth,
) -> ApiResult<Json<Value>> {
    let info = backup::version_info(&server.store, &auth.user_id, None).await?;
    Ok(Json(info.to_json()))
}

/// `GET /room_keys/version/{version}`.
pub async fn get_version(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(version): Path<String>,
) -> ApiResult<Json<Value>> {
    let version = path_version(&version)?;
    let info = backup::version_info(&server.store, &auth.user_id, Some(version)).await?;
    Ok(Json(info.to_json()))
}

#[derive(Deserialize)]
pub struct UpdateVersionBody {
    algorithm: String,
    auth_data: Map<String, Value>,
    version: Option<String>,
}

/// `PUT /room_keys/version/{version}`: only `auth_data` may change.
pub async fn update_version(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(version): Path<String>,
    JsonBody(body): JsonBody<UpdateVersionBody>,
) -> ApiResult<Json<Value>> {
    if body.version.as_ref().is_some_and(|v| *v != version) {
        return Err(Error::invalid_param("The version in the body does not match the path").into());
    }
    let version = path_version(&version)?;
    backup::update_version(
        &server.store,
        &auth.user_id,
        version,
        &body.algorithm,
        &body.auth_data,
    )
    .await?;
    Ok(Json(json!({})))
}

/// `DELETE /room_keys/version/{version}`: the version and all its keys.
pub async fn delete_version(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(version): Path<String>,
) -> ApiResult<Json<Value>> {
    let version = path_version(&version)?;
    backup::delete_version(&server.store, &auth.user_id, version).await?;
    Ok(Json(json!({})))
}

// Keys ---------------------------------------------------------------------------------------

/// Stores keys; a version that is not the current one is 403 `M_WRONG_ROOM_KEYS_VERSION` with
/// the `current_version`.
async fn put(
    server: &Server,
    auth: &Auth,
    q: &VersionQuery,
    rooms: RoomKeys,
) -> ApiResult<Response> {
    match backup::put_keys(&server.store, &auth.user_id, q.for_upload()?, &rooms).await? {
        Ok(update) => Ok(Json(update.to_json()).into_response()),
        Err(NotCurrent { current }) => {
            let kind = ErrorKind::WrongRoomKeysVersion;
            let status = StatusCode::from_u16(kind.status()).unwrap_or(StatusCode::FORBIDDEN);
            let body = json!({
                "errcode": kind.errcode(),
                "error": "Wrong backup version",
                "current_version": current.to_string(),
            });
            Ok((status, Json(body)).into_response())
        }
    }
}

async fn get(
    server: &Server,
    auth: &Auth,
    q: &VersionQuery,
    scope: KeyScope<'_>,
) -> ApiResult<RoomKeys> {
    Ok(backup::get_keys(&server.store, &auth.user_id, q.existing()?, &scope).await?)
}

async fn delete(
    server: &Server,
    auth: &Auth,
    q: &VersionQuery,
    scope: KeyScope<'_>,
) -> ApiResult<Json<Value>> {
    let update = backup::delete_keys(&server.store, &auth.user_id, q.existing()?, &scope).await?;
    Ok(Json(update.to_json()))
}

fn room_id(room_id: &str) -> ApiResult<OwnedRoomId> {
    parse_id(room_id, "room ID")
}

#[derive(Deserialize)]
pub struct RoomsBody {
    rooms: BTreeMap<String, RoomKeyBackup>,
}

/// `PUT /room_keys/keys`.
pub async fn put_all(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Query(q): Query<VersionQuery>,
    JsonBody(body): JsonBody<RoomsBody>,
) -> ApiResult<Response> {
    let rooms = body
        .rooms
        .into_iter()
        .map(|(id, keys)| Ok((room_id(&id)?, keys)))
        .collect::<ApiResult<RoomKeys>>()?;
    put(&server, &auth, &q, rooms).await
}

/// `GET /room_keys/keys`.
pub async fn get_all(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Query(q): Query<VersionQuery>,
) -> ApiResult<Json<Value>> {
    let rooms = get(&server, &auth, &q, KeyScope::All).await?;
    Ok(Json(json!({ "rooms": rooms })))
}

/// `DELETE /room_keys/keys`.
pub async fn delete_all(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Query(q): Query<VersionQuery>,
) -> ApiResult<Json<Value>> {
    delete(&server, &auth, &q, KeyScope::All).await
}

/// `PUT /room_keys/keys/{roomId}`.
pub async fn put_room(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(room): Path<String>,
    Query(q): Query<VersionQuery>,
    JsonBody(keys): JsonBody<RoomKeyBackup>,
) -> ApiResult<Response> {
    let rooms = RoomKeys::from([(room_id(&room)?, keys)]);
    put(&server, &auth, &q, rooms).await
}

/// `GET /room_keys/keys/{roomId}`: `{"sessions": {}}` when the room has no keys.
pub async fn get_room(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(room): Path<String>,
    Query(q): Query<VersionQuery>,
) -> ApiResult<Json<RoomKeyBackup>> {
    let room = room_id(&room)?;
    let mut rooms = get(&server, &auth, &q, KeyScope::Room(&room)).await?;
    Ok(Json(rooms.remove(&room).unwrap_or_default()))
}

/// `DELETE /room_keys/keys/{roomId}`.
pub async fn delete_room(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(room): Path<String>,
    Query(q): Query<VersionQuery>,
) -> ApiResult<Json<Value>> {
    let room = room_id(&room)?;
    delete(&server, &auth, &q, KeyScope::Room(&room)).await
}

/// `PUT /room_keys/keys/{roomId}/{sessionId}`.
pub async fn put_session(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path((room, session)): Path<(String, String)>,
    Query(q): Query<VersionQuery>,
    JsonBody(key): JsonBody<KeyBackupData>,
) -> ApiResult<Response> {
    let sessions = BTreeMap::from([(session, key)]);
    let rooms = RoomKeys::from([(room_id(&room)?, RoomKeyBackup { sessions })]);
    put(&server, &auth, &q, rooms).await
}

/// `GET /room_keys/keys/{roomId}/{sessionId}`.
pub async fn get_session(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path((room, session)): Path<(String, String)>,
    Query(q): Query<VersionQuery>,
) -> ApiResult<Json<KeyBackupData>> {
    let room = room_id(&room)?;
    let mut rooms = get(&server, &auth, &q, KeyScope::Session(&room, &session)).await?;
    rooms
        .remove(&room)
        .and_then(|mut r| r.sessions.remove(&session))
        .map(Json)
        .ok_or_else(|| Error::not_found("Key not found").into())
}

/// `DELETE /room_keys/keys/{roomId}/{sessionId}`.
pub async fn delete_session(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path((room, session)): Path<(String, String)>,
    Query(q): Query<VersionQuery>,
) -> ApiResult<Json<Value>> {
    let room = room_id(&room)?;
    delete(&server, &auth, &q, KeyScope::Session(&room, &session)).await
}
