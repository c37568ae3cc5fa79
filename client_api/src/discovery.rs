//! Server discovery and negotiation (spec § "Server Discovery", "API Standards" versions,
//! "Capabilities negotiation", registration-token validity): `/_matrix/client/versions`,
//! `/v3/capabilities`, `/.well-known/matrix/{client,server}` and
//! `/v1/register/m.login.registration_token/validity`.

use std::sync::Arc;

use axum::{
    extract::{Query, State},
    Json,
};
use myelin_core::{
    config::RegistrationMode,
    pdu::{DEFAULT_ROOM_VERSION, SUPPORTED_ROOM_VERSIONS},
    Error, ErrorKind, Server,
};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::{
    error::{err, ApiResult},
    extract::Auth,
};

/// The spec versions advertised. Only versions whose endpoints Myelin serves: v1.11 would make
/// clients switch to authenticated media, v1.15 to `auth_metadata`, neither of which exists yet.
pub const SUPPORTED_VERSIONS: &[&str] = &[
    "r0.6.1", "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8", "v1.9", "v1.10",
];

/// `GET /_matrix/client/versions` (no authentication).
pub async fn versions() -> Json<Value> {
    Json(json!({
        "versions": SUPPORTED_VERSIONS,
        "unstable_features": {
            "org.matrix.simplified_msc3575": true,
            "dev.myelin.ws_sync": true,
        },
    }))
}

/// The capabilities object of `GET /capabilities`.
pub fn capabilities_object() -> Value {
    let available: Map<String, Value> = SUPPORTED_ROOM_VERSIONS
        .iter()
        .map(|v| ((*v).to_owned(), json!("stable")))
        .collect();
    json!({
        "m.room_versions": { "default": DEFAULT_ROOM_VERSION, "available": available },
        "m.change_password": { "enabled": true },
        "m.set_displayname": { "enabled": true },
        "m.set_avatar_url": { "enabled": true },
        // Only the two historical profile fields are stored (see `profile.rs`).
        "m.profile_fields": { "enabled": true, "allowed": ["displayname", "avatar_url"] },
        "m.3pid_changes": { "enabled": false },
        "m.get_login_token": { "enabled": false },
    })
}

/// `GET /capabilities`.
pub async fn capabilities(_auth: Auth) -> Json<Value> {
    Json(json!({ "capabilities": capabilities_object() }))
}

/// `GET /.well-known/matrix/client`.
pub async fn well_known_client(State(server): State<Arc<Server>>) -> Json<Value> {
    Json(json!({ "m.homeserver": { "base_url": server.config.public_base_url() } }))
}

/// The delegated federation address: the server name, with the default federation port
/// (8448) made explicit when the name has none.
fn delegated_server(server_name: &str) -> String {
    let has_port = match server_name.strip_prefix('[') {
        // IPv6 literal: `[::1]` or `[::1]:8448`.
        Some(rest) => rest
            .split_once(']')
            .is_some_and(|(_, tail)| tail.starts_with(':')),
        None => server_name.contains(':'),
    };
    if has_port {
        server_name.to_owned()
    } else {
        format!("{server_name}:8448")
    }
}

/// `GET /.well-known/matrix/server`.
pub async fn well_known_server(State(server): State<Arc<Server>>) -> Json<Value> {
    Json(json!({ "m.server": delegated_server(server.server_name()) }))
}

#[derive(Deserialize)]
pub struct TokenQuery {
    token: Option<String>,
}

/// `GET /_matrix/client/v1/register/m.login.registration_token/validity`.
pub async fn token_validity(
    State(server): State<Arc<Server>>,
    Query(q): Query<TokenQuery>,
) -> ApiResult<Json<Value>> {
    if server.config.registration != RegistrationMode::Token {
        return err(
            ErrorKind::Forbidden,
            "Registration with tokens is not enabled on this server",
        );
    }
    let token = q
        .token
        .ok_or_else(|| Error::missing_param("Missing token parameter"))?;
    let valid = server.store.registration_token_valid(&token).await?;
    Ok(Json(json!({ "valid": valid })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delegation_keeps_or_adds_the_port() {
        assert_eq!(delegated_server("example.org"), "example.org:8448");
        assert_eq!(delegated_server("localhost:8008"), "localhost:8008");
        assert_eq!(delegated_server("[::1]"), "[::1]:8448");
        assert_eq!(delegated_server("[::1]:443"), "[::1]:443");
    }

    #[test]
    fn room_versions_capability_lists_supported_versions() {
        let caps = capabilities_object();
        assert_eq!(caps["m.room_versions"]["default"], DEFAULT_ROOM_VERSION);
        for v in SUPPORTED_ROOM_VERSIONS {
            assert_eq!(caps["m.room_versions"]["available"][*v], "stable");
        }
        assert!(!SUPPORTED_VERSIONS.contains(&"v1.11"));
    }
}
