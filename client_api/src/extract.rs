//! Request extractors: the access-token check ([`Auth`]), JSON bodies with the spec's errors
//! ([`JsonBody`]: `M_NOT_JSON`, `M_BAD_JSON`, `M_TOO_LARGE`), and identifier parsing that
//! answers `M_INVALID_PARAM`.

use std::sync::Arc;

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Request},
    http::request::Parts,
};
use myelin_core::{
    accounts::Session,
    ruma::{OwnedRoomId, OwnedUserId},
    Error, ErrorKind, RoomInfo, Server,
};
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// The authenticated caller.
pub struct Auth(pub Arc<Session>);

impl std::ops::Deref for Auth {
    type Target = Session;
    fn deref(&self) -> &Session {
        &self.0
    }
}

/// The raw access token of a request: the `Authorization: Bearer` header, or (spec v1.19 and
/// earlier) the `access_token` query parameter.
pub fn access_token(parts: &Parts) -> Option<String> {
    if let Some(h) = parts.headers.get(axum::http::header::AUTHORIZATION) {
        let h = h.to_str().ok()?;
        return h.strip_prefix("Bearer ").map(|t| t.trim().to_owned());
    }
    parts.uri.query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("access_token=").map(percent_decode))
    })
}

/// Decodes `%XX` escapes and `+` (query-string values).
pub fn percent_decode(s: &str) -> String {
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
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl FromRequestParts<Arc<Server>> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, server: &Arc<Server>) -> Result<Self, ApiError> {
        let token = access_token(parts)
            .ok_or_else(|| Error::new(ErrorKind::MissingToken, "Missing access token"))?;
        Ok(Auth(server.authenticate(&token).await?))
    }
}

/// A JSON request body decoded into `T`.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                Error::too_large("Request body too large")
            } else {
                Error::new(ErrorKind::NotJson, format!("Could not read body: {e}"))
            }
        })?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Parses a body: not JSON at all → `M_NOT_JSON`; JSON of the wrong shape → `M_BAD_JSON`.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let bytes = if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        b"{}" as &[u8]
    } else {
        bytes
    };
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| Error::new(ErrorKind::NotJson, format!("Body is not valid JSON: {e}")))?;
    serde_json::from_value(value).map_err(|e| ApiError(Error::bad_json(format!("Bad JSON: {e}"))))
}

/// Parses a path or query identifier, `M_INVALID_PARAM` when malformed.
pub fn parse_id<T>(s: &str, what: &str) -> Result<T, ApiError>
where
    T: for<'a> TryFrom<&'a str>,
{
    T::try_from(s).map_err(|_| ApiError(Error::invalid_param(format!("Invalid {what}: {s}"))))
}

/// Parses the `{userId}` path segment and checks it is the caller (`M_FORBIDDEN` otherwise);
/// `what` names what the caller may only touch of their own.
pub fn own_user(auth: &Auth, user_id: &str, what: &str) -> Result<OwnedUserId, ApiError> {
    let user: OwnedUserId = parse_id(user_id, "user ID")?;
    if user != auth.user_id {
        return Err(ApiError(Error::forbidden(format!(
            "Cannot use {what} of other users"
        ))));
    }
    Ok(user)
}

/// The room named by a `{roomId}` path segment: 400 `M_INVALID_PARAM` when malformed, 404
/// `M_NOT_FOUND` when unknown.
pub async fn room(server: &Server, room_id: &str) -> Result<Arc<RoomInfo>, ApiError> {
    let id: OwnedRoomId = parse_id(room_id, "room ID")?;
    Ok(server.room_or_404(&id).await?)
}
