//! Client config and room tagging (spec § "Client Config", "Room Tagging"): global and per-room
//! account data, and room tags, which are the per-room `m.tag` account data. Every write takes
//! a position on the account-data stream and wakes the user's syncs.

use std::sync::Arc;

use axum::{
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use myelin_core::{Error, Server};
use ruma::{OwnedRoomId, OwnedUserId};
use serde_json::{json, Map, Value};
use tokio::sync::Mutex;

use crate::{
    error::{matrix_error, ApiResult},
    extract::{own_user, parse_id, Auth, JsonBody},
};

/// Account-data types the server manages; clients may read them but not set them.
const SERVER_MANAGED: &[&str] = &["m.fully_read", "m.push_rules"];

/// The longest tag name the spec allows, in bytes.
const MAX_TAG_BYTES: usize = 255;

/// Serialises the read-modify-write of `m.tag` (tag changes are rare; one lock is enough).
static TAG_LOCK: Mutex<()> = Mutex::const_new(());

/// Writes account data and publishes it on the account-data stream.
pub async fn write_account_data(
    server: &Server,
    user_id: &str,
    room_id: &str,
    data_type: &str,
    content: &Value,
) -> ApiResult<()> {
    let pos = server.account_data_stream.allocate(1);
    let res = server
        .store
        .put_account_data(user_id, room_id, data_type, &content.to_string(), pos[0])
        .await;
    server.account_data_stream.complete(&pos);
    res?;
    server.wake_user(user_id);
    Ok(())
}

async fn read(
    server: &Server,
    user: &OwnedUserId,
    room_id: &str,
    data_type: &str,
) -> ApiResult<Value> {
    if let Some(json) = server
        .store
        .account_data(user.as_str(), room_id, data_type)
        .await?
    {
        return Ok(serde_json::from_str(&json)?);
    }
    // Push rules are served from their defaults until a user changes them.
    if room_id.is_empty() && data_type == "m.push_rules" {
        return Ok(crate::push::push_rules_content(user));
    }
    Err(Error::not_found("Account data not found").into())
}

async fn put(
    server: &Server,
    user: &OwnedUserId,
    room_id: &str,
    data_type: &str,
    content: Map<String, Value>,
) -> ApiResult<Response> {
    if SERVER_MANAGED.contains(&data_type) {
        return Ok(matrix_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "M_BAD_JSON",
            &format!("Cannot set {data_type} through this API"),
        ));
    }
    write_account_data(
        server,
        user.as_str(),
        room_id,
        data_type,
        &Value::Object(content),
    )
    .await?;
    Ok(Json(json!({})).into_response())
}

/// `GET /user/{userId}/account_data/{type}`.
pub async fn get_global(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path((user_id, data_type)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let user = own_user(&auth, &user_id, "account data")?;
    Ok(Json(read(&server, &user, "", &data_type).await?))
}

/// `PUT /user/{userId}/account_data/{type}`.
pub async fn put_global(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path((user_id, data_type)): Path<(String, String)>,
    JsonBody(content): JsonBody<Map<String, Value>>,
) -> ApiResult<Response> {
    let user = own_user(&auth, &user_id, "account data")?;
    put(&server, &user, "", &data_type, content).await
}

/// `GET /user/{userId}/rooms/{roomId}/account_data/{type}`.
pub async fn get_room(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path((user_id, room_id, data_type)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    let user = own_user(&auth, &user_id, "account data")?;
    let room: OwnedRoomId = parse_id(&room_id, "room ID")?;
    Ok(Json(read(&server, &user, room.as_str(), &data_type).await?))
}

/// `PUT /user/{userId}/rooms/{roomId}/account_data/{type}`.
pub async fn put_room(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path((user_id, room_id, data_type)): Path<(String, String, String)>,
    JsonBody(content): JsonBody<Map<String, Value>>,
) -> ApiResult<Response> {
    let user = own_user(&auth, &user_id, "account data")?;
    let room: OwnedRoomId = parse_id(&room_id, "room ID")?;
    put(&server, &user, room.as_str(), &data_type, content).await
}

// Tags ---------------------------------------------------------------------------------------

/// The `tags` object of stored `m.tag` content (empty when absent or malformed).
fn tags_of(content: Option<&str>) -> Map<String, Value> {
    content
        .and_then(|c| serde_json::from_str::<Value>(c).ok())
        .and_then(|mut v| match v.get_mut("tags").map(Value::take) {
            Some(Value::Object(m)) => Some(m),
            _ => None,
        })
        .unwrap_or_default()
}

/// Checks a tag's content: an object whose `order`, if present, is a number.
fn validate_tag(tag: &str, content: &Map<String, Value>) -> ApiResult<()> {
    if tag.is_empty() || tag.len() > MAX_TAG_BYTES {
        return Err(Error::invalid_param("Tag names must be 1 to 255 bytes long").into());
    }
    match content.get("order") {
        None | Some(Value::Number(_)) => Ok(()),
        Some(_) => Err(Error::bad_json("Tag order must be a number").into()),
    }
}

fn tag_path(auth: &Auth, user_id: &str, room_id: &str) -> ApiResult<(OwnedUserId, OwnedRoomId)> {
    let user = own_user(auth, user_id, "account data")?;
    let room: OwnedRoomId = parse_id(room_id, "room ID")?;
    Ok((user, room))
}

/// `GET /user/{userId}/rooms/{roomId}/tags`.
pub async fn get_tags(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path((user_id, room_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let (user, room) = tag_path(&auth, &user_id, &room_id)?;
    let stored = server
        .store
        .account_data(user.as_str(), room.as_str(), "m.tag")
        .await?;
    Ok(Json(json!({ "tags": tags_of(stored.as_deref()) })))
}

/// Applies `change` to the user's `m.tag` of a room and writes it back.
async fn update_tags(
    server: &Server,
    user: &OwnedUserId,
    room: &OwnedRoomId,
    change: impl FnOnce(&mut Map<String, Value>),
) -> ApiResult<()> {
    let _guard = TAG_LOCK.lock().await;
    let stored = server
        .store
        .account_data(user.as_str(), room.as_str(), "m.tag")
        .await?;
    let mut tags = tags_of(stored.as_deref());
    change(&mut tags);
    write_account_data(
        server,
        user.as_str(),
        room.as_str(),
        "m.tag",
        &json!({ "tags": tags }),
    )
    .await
}

/// `PUT /user/{userId}/rooms/{roomId}/tags/{tag}`.
pub async fn put_tag(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path((user_id, room_id, tag)): Path<(String, String, String)>,
    JsonBody(content): JsonBody<Map<String, Value>>,
) -> ApiResult<Json<Value>> {
    let (user, room) = tag_path(&auth, &user_id, &room_id)?;
    validate_tag(&tag, &content)?;
    update_tags(&server, &user, &room, |tags| {
        tags.insert(tag, Value::Object(content));
    })
    .await?;
    Ok(Json(json!({})))
}

/// `DELETE /user/{userId}/rooms/{roomId}/tags/{tag}`.
pub async fn delete_tag(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path((user_id, room_id, tag)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    let (user, room) = tag_path(&auth, &user_id, &room_id)?;
    update_tags(&server, &user, &room, |tags| {
        tags.remove(&tag);
    })
    .await?;
    Ok(Json(json!({})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_read_leniently() {
        assert!(tags_of(None).is_empty());
        assert!(tags_of(Some("not json")).is_empty());
        assert!(tags_of(Some(r#"{"tags": []}"#)).is_empty());
        let t = tags_of(Some(r#"{"tags": {"u.work": {"order": 0.5}}}"#));
        assert_eq!(t["u.work"]["order"], 0.5);
    }

    #[test]
    fn tag_content_is_checked() {
        let ok: Map<String, Value> = serde_json::from_value(json!({"order": 0.25})).unwrap();
        assert!(validate_tag("m.favourite", &ok).is_ok());
        assert!(validate_tag("m.favourite", &Map::new()).is_ok());
        let bad: Map<String, Value> = serde_json::from_value(json!({"order": "first"})).unwrap();
        assert!(validate_tag("u.x", &bad).is_err());
        assert!(validate_tag(&"x".repeat(256), &ok).is_err());
        assert!(validate_tag("", &ok).is_err());
    }
}
