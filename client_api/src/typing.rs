//! Typing notifications (spec § "Typing Notifications"): `PUT /rooms/{roomId}/typing/{userId}`.

use std::sync::Arc;

use axum::{
    extract::{Path, State},
    Json,
};
use myelin_core::{Error, Server};
use serde_json::{json, Value};

use crate::{
    error::ApiResult,
    extract::{own_user, Auth, JsonBody},
};

/// `PUT /rooms/{roomId}/typing/{userId}` `{typing, timeout}`: only for oneself, in a room one
/// is joined to; the timeout (default and
/// cap 30 s) is optional.
pub async fn put_typing(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path((room_id, user_id)): Path<(String, String)>,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    let user = own_user(&auth, &user_id, "the typing state")?;
    let Some(body) = body.as_object() else {
        return Err(Error::bad_json("The body must be a JSON object").into());
    };
    let typing = body
        .get("typing")
        .and_then(Value::as_bool)
        .ok_or_else(|| Error::bad_json("`typing` must be a boolean"))?;
    let timeout = match body.get("timeout") {
        None | Some(Value::Null) => None,
        Some(t) => Some(t.as_u64().ok_or_else(|| {
            Error::bad_json("`timeout` must be a non-negative integer of milliseconds")
        })?),
    };
    let room = crate::extract::room(&server, &room_id).await?;
    server
        .set_typing(&room, user.as_str(), typing, timeout)
        .await?;
    Ok(Json(json!({})))
}
