//! Presence (spec § "Presence"): `PUT` and `GET /presence/{userId}/status`.

use std::sync::Arc;

use axum::{
    extract::{Path, State},
    Json,
};
use myelin_core::{presence::State as PresenceState, ruma::OwnedUserId, Error, Server};
use serde_json::{json, Value};

use crate::{
    error::ApiResult,
    extract::{own_user, parse_id, Auth, JsonBody},
};

/// The longest status message kept, in bytes.
const MAX_STATUS_MSG_BYTES: usize = 1024;

/// `PUT /presence/{userId}/status` `{presence, status_msg?}`: one's own only. With presence
/// turned off it succeeds and changes nothing.
pub async fn put_status(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(user_id): Path<String>,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    let user = own_user(&auth, &user_id, "the presence")?;
    let Some(body) = body.as_object() else {
        return Err(Error::bad_json("The body must be a JSON object").into());
    };
    let presence = body
        .get("presence")
        .ok_or_else(|| Error::bad_json("`presence` is required"))?
        .as_str()
        .ok_or_else(|| Error::bad_json("`presence` must be a string"))?;
    let state = PresenceState::parse(presence)
        .ok_or_else(|| Error::invalid_param("`presence` must be online, unavailable or offline"))?;
    let status_msg = match body.get("status_msg") {
        None | Some(Value::Null) => None,
        Some(Value::String(m)) if m.len() <= MAX_STATUS_MSG_BYTES => Some(m.clone()),
        Some(Value::String(_)) => {
            return Err(Error::too_large("`status_msg` is too long").into());
        }
        Some(_) => return Err(Error::bad_json("`status_msg` must be a string").into()),
    };
    // Answered once the change is written and visible to syncs.
    let _ = server
        .presence
        .set_status(user.as_str(), state, status_msg)
        .await;
    Ok(Json(json!({})))
}

/// `GET /presence/{userId}/status`: one's own, or that of a user sharing a room.
pub async fn get_status(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(user_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let user: OwnedUserId = parse_id(&user_id, "user ID")?;
    Ok(Json(
        server
            .get_presence(auth.user_id.as_str(), user.as_str())
            .await?,
    ))
}
