//! Profiles (spec § "Profiles"): `GET /profile/{userId}`, `GET`/`PUT /profile/{userId}/{keyName}`.
//!
//! Only the two historical fields, `displayname` and `avatar_url`, are stored (the store has no
//! table for custom fields; the `m.profile_fields` capability says so). Other well-formed keys
//! read as absent (404) and are refused on write (403). A change is copied into the user's
//! `m.room.member` event in every room they are joined to, as the spec asks.

use std::sync::Arc;

use axum::{
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use myelin_core::{pdu::NewEvent, store::UserRow, Append, Error, Server};
use ruma::{OwnedUserId, UserId};
use serde_json::{json, Map, Value};

use crate::{
    error::matrix_error,
    error::ApiResult,
    extract::{parse_id, Auth, JsonBody},
};

/// The longest profile key the spec allows, in bytes.
const MAX_KEY_BYTES: usize = 255;
/// Limits on the stored fields, in bytes (they are copied into every member event).
const MAX_DISPLAYNAME_BYTES: usize = 256;
const MAX_AVATAR_URL_BYTES: usize = 1000;

/// The fields Myelin stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Displayname,
    AvatarUrl,
}

impl Field {
    fn name(self) -> &'static str {
        match self {
            Field::Displayname => "displayname",
            Field::AvatarUrl => "avatar_url",
        }
    }
}

/// What a `{keyName}` path segment is.
#[derive(Debug, PartialEq, Eq)]
enum Key {
    Stored(Field),
    /// A well-formed key (`m.tz` or a namespaced custom key) that is not stored.
    Other,
}

/// Whether `s` is `[a-z][a-z0-9_]*`.
fn is_key_segment(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Why a `{keyName}` path segment is refused.
#[derive(Debug, PartialEq, Eq)]
enum BadKey {
    /// Longer than 255 bytes: 400 `M_KEY_TOO_LARGE`.
    TooLarge,
    /// Not of the key grammar: 400 `M_INVALID_PARAM`.
    Invalid,
}

impl BadKey {
    fn response(&self) -> Response {
        match self {
            BadKey::TooLarge => matrix_error(
                StatusCode::BAD_REQUEST,
                "M_KEY_TOO_LARGE",
                "Profile keys are at most 255 bytes",
            ),
            BadKey::Invalid => matrix_error(
                StatusCode::BAD_REQUEST,
                "M_INVALID_PARAM",
                "Invalid profile key",
            ),
        }
    }
}

/// Classifies a profile key by the spec's grammar:
/// `avatar_url | displayname | m.tz | [a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+`.
fn classify_key(key: &str) -> Result<Key, BadKey> {
    if key.len() > MAX_KEY_BYTES {
        return Err(BadKey::TooLarge);
    }
    match key {
        "displayname" => return Ok(Key::Stored(Field::Displayname)),
        "avatar_url" => return Ok(Key::Stored(Field::AvatarUrl)),
        _ => {}
    }
    let segments: Vec<&str> = key.split('.').collect();
    if segments.len() >= 2 && segments.iter().all(|s| is_key_segment(s)) {
        Ok(Key::Other)
    } else {
        Err(BadKey::Invalid)
    }
}

fn field_value(user: &UserRow, field: Field) -> Option<&str> {
    match field {
        Field::Displayname => user.displayname.as_deref(),
        Field::AvatarUrl => user.avatar_url.as_deref(),
    }
}

/// The profile object of a user: only the fields that are set.
fn profile_json(user: &UserRow) -> Map<String, Value> {
    let mut out = Map::new();
    for f in [Field::Displayname, Field::AvatarUrl] {
        if let Some(v) = field_value(user, f) {
            out.insert(f.name().into(), json!(v));
        }
    }
    out
}

/// A local user by path segment, 404 `M_NOT_FOUND` when unknown.
async fn profile_owner(server: &Server, user_id: &str) -> ApiResult<(OwnedUserId, UserRow)> {
    let user: OwnedUserId = parse_id(user_id, "user ID")?;
    let row = server
        .store
        .user(user.as_str())
        .await?
        .ok_or_else(|| Error::not_found("Profile not found"))?;
    Ok((user, row))
}

/// `GET /profile/{userId}` (asking the user's server for users of other servers).
pub async fn get_profile(
    State(server): State<Arc<Server>>,
    axum::Extension(fed): axum::Extension<Arc<myelin_federation::Federation>>,
    Path(user_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let user: OwnedUserId = parse_id(&user_id, "user ID")?;
    if user.server_name().as_str() != server.server_name() {
        return Ok(Json(fed.query_profile(&user, None).await?));
    }
    let (_, row) = profile_owner(&server, &user_id).await?;
    Ok(Json(Value::Object(profile_json(&row))))
}

/// `GET /profile/{userId}/{keyName}`.
pub async fn get_field(
    State(server): State<Arc<Server>>,
    axum::Extension(fed): axum::Extension<Arc<myelin_federation::Federation>>,
    Path((user_id, key)): Path<(String, String)>,
) -> ApiResult<Response> {
    let key = match classify_key(&key) {
        Ok(k) => k,
        Err(bad) => return Ok(bad.response()),
    };
    let user: OwnedUserId = parse_id(&user_id, "user ID")?;
    if user.server_name().as_str() != server.server_name() {
        let name = match &key {
            Key::Stored(f) => f.name().to_owned(),
            _ => return Err(Error::not_found("Profile field not found").into()),
        };
        let remote = fed.query_profile(&user, Some(&name)).await?;
        return match remote.get(&name) {
            Some(v) => Ok(Json(json!({ name: v })).into_response()),
            None => Err(Error::not_found("Profile field not found").into()),
        };
    }
    let (_, row) = profile_owner(&server, &user_id).await?;
    let Key::Stored(field) = key else {
        return Err(Error::not_found("Profile field not found").into());
    };
    let value =
        field_value(&row, field).ok_or_else(|| Error::not_found("Profile field not found"))?;
    Ok(Json(json!({ field.name(): value })).into_response())
}

/// The new value of `field` from a `PUT` body: a string or `null`; `""` and `null` clear it.
fn new_value(field: Field, body: &Map<String, Value>) -> ApiResult<Option<String>> {
    let value = body
        .get(field.name())
        .ok_or_else(|| Error::missing_param(format!("Missing {}", field.name())))?;
    let s = match value {
        Value::Null => return Ok(None),
        Value::String(s) => s,
        _ => return Err(Error::bad_json(format!("{} must be a string", field.name())).into()),
    };
    let max = match field {
        Field::Displayname => MAX_DISPLAYNAME_BYTES,
        Field::AvatarUrl => MAX_AVATAR_URL_BYTES,
    };
    if s.len() > max {
        return Err(Error::bad_json(format!("{} is too long", field.name())).into());
    }
    Ok((!s.is_empty()).then(|| s.clone()))
}

/// `PUT /profile/{userId}/{keyName}`.
pub async fn put_field(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path((user_id, key)): Path<(String, String)>,
    JsonBody(body): JsonBody<Map<String, Value>>,
) -> ApiResult<Response> {
    let key = match classify_key(&key) {
        Ok(k) => k,
        Err(bad) => return Ok(bad.response()),
    };
    let user: OwnedUserId = parse_id(&user_id, "user ID")?;
    if user != auth.user_id && !auth.is_admin {
        return Err(Error::forbidden("Cannot change the profile of another user").into());
    }
    let Key::Stored(field) = key else {
        return Err(
            Error::forbidden("Only displayname and avatar_url can be set on this server").into(),
        );
    };
    let value = new_value(field, &body)?;
    if server.store.user(user.as_str()).await?.is_none() {
        return Err(Error::not_found("Unknown user").into());
    }
    let v = Some(value.as_deref());
    match field {
        Field::Displayname => {
            server
                .store
                .set_profile_field(user.as_str(), v, None)
                .await?
        }
        Field::AvatarUrl => {
            server
                .store
                .set_profile_field(user.as_str(), None, v)
                .await?
        }
    }
    if let Some(row) = server.store.user(user.as_str()).await? {
        update_member_events(&server, &user, &row).await;
    }
    Ok(Json(json!({})).into_response())
}

/// The member event content carrying the current profile, or `None` if nothing changes.
fn member_content_with_profile(old: &Value, row: &UserRow) -> Option<Value> {
    let mut content = old.as_object().cloned().unwrap_or_default();
    if content.get("membership").and_then(Value::as_str) != Some("join") {
        return None;
    }
    for f in [Field::Displayname, Field::AvatarUrl] {
        match field_value(row, f) {
            Some(v) => content.insert(f.name().into(), json!(v)),
            None => content.remove(f.name()),
        };
    }
    // The restricted-join authorisation belongs to the original join only.
    content.remove("join_authorised_via_users_server");
    let new = Value::Object(content);
    (new != *old).then_some(new)
}

/// Sends a new `m.room.member` join event with the current profile into every room the user
/// is joined to. Failures are per room and only logged.
pub async fn update_member_events(server: &Server, user: &UserId, row: &UserRow) {
    let rooms = match server.store.rooms_of_user(user.as_str()).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(user = %user, error = %e, "cannot list rooms for a profile update");
            return;
        }
    };
    for m in rooms.into_iter().filter(|m| m.membership == "join") {
        if let Err(e) = update_member_event(server, user, row, m.room_nid).await {
            tracing::warn!(user = %user, room_nid = m.room_nid, error = %e, "profile update not sent");
        }
    }
}

async fn update_member_event(
    server: &Server,
    user: &UserId,
    row: &UserRow,
    room_nid: i64,
) -> myelin_core::Result<()> {
    let room = server.room_by_nid(room_nid).await?;
    let state = server.current_state(&room).await?;
    let Some(ev) = server
        .state_event(&state, "m.room.member", user.as_str())
        .await?
    else {
        return Ok(());
    };
    let Some(content) = member_content_with_profile(&ev.pdu.content_value(), row) else {
        return Ok(());
    };
    server
        .append(
            &room,
            vec![Append {
                sender: user.to_owned(),
                event: NewEvent::state("m.room.member", user.as_str(), content)?,
                txn: None,
            }],
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(displayname: Option<&str>, avatar_url: Option<&str>) -> UserRow {
        UserRow {
            user_id: "@a:x".into(),
            password_hash: None,
            is_admin: false,
            deactivated: false,
            displayname: displayname.map(Into::into),
            avatar_url: avatar_url.map(Into::into),
        }
    }

    #[test]
    fn keys_follow_the_grammar() {
        assert_eq!(
            classify_key("displayname").unwrap(),
            Key::Stored(Field::Displayname)
        );
        assert_eq!(
            classify_key("avatar_url").unwrap(),
            Key::Stored(Field::AvatarUrl)
        );
        assert_eq!(classify_key("m.tz").unwrap(), Key::Other);
        assert_eq!(classify_key("com.example.field_1").unwrap(), Key::Other);
        for bad in [
            "nodot",
            "Com.example",
            "com.",
            ".com",
            "com..x",
            "com.1x",
            "a b.c",
        ] {
            assert!(classify_key(bad).is_err(), "{bad} accepted");
        }
        let long = format!("a.{}", "b".repeat(300));
        assert_eq!(classify_key(&long).unwrap_err(), BadKey::TooLarge);
        assert_eq!(classify_key("nodot").unwrap_err(), BadKey::Invalid);
    }

    #[test]
    fn profile_omits_unset_fields() {
        assert_eq!(
            Value::Object(profile_json(&row(Some("Al"), None))),
            json!({"displayname": "Al"})
        );
        assert_eq!(Value::Object(profile_json(&row(None, None))), json!({}));
    }

    #[test]
    fn put_values_are_checked() {
        let body = |v: Value| -> Map<String, Value> { serde_json::from_value(v).unwrap() };
        let f = Field::Displayname;
        assert_eq!(
            new_value(f, &body(json!({"displayname": "Bob"}))).unwrap(),
            Some("Bob".into())
        );
        assert_eq!(
            new_value(f, &body(json!({"displayname": null}))).unwrap(),
            None
        );
        assert_eq!(
            new_value(f, &body(json!({"displayname": ""}))).unwrap(),
            None
        );
        assert!(new_value(f, &body(json!({"displayname": 5}))).is_err());
        assert!(new_value(f, &body(json!({"avatar_url": "mxc://a/b"}))).is_err());
        assert!(new_value(f, &body(json!({"displayname": "x".repeat(300)}))).is_err());
    }

    #[test]
    fn member_content_takes_the_profile() {
        let old = json!({"membership": "join", "displayname": "Old", "avatar_url": "mxc://a/b",
            "join_authorised_via_users_server": "@x:y"});
        let new = member_content_with_profile(&old, &row(Some("New"), None)).unwrap();
        assert_eq!(new, json!({"membership": "join", "displayname": "New"}));
        // Nothing to change.
        let same = json!({"membership": "join", "displayname": "New"});
        assert!(member_content_with_profile(&same, &row(Some("New"), None)).is_none());
        // Not joined.
        assert!(
            member_content_with_profile(&json!({"membership": "leave"}), &row(None, None))
                .is_none()
        );
    }
}
