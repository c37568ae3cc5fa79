//! `myelin-federation`: the Server-Server API. For now, the key server:
//! `GET /_matrix/key/v2/server` publishes this server's ed25519 verify key, self-signed.
//! (Inbound and outbound federation come with the federation issue.)

use std::sync::Arc;

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Json, Router};
use myelin_core::{
    ruma::{
        canonical_json::{CanonicalJsonObject, CanonicalJsonValue},
        signatures::sign_json,
    },
    store::now_ms,
    Server,
};
use serde_json::json;

/// How long a published key response may be cached by others.
const KEY_VALIDITY_MS: i64 = 24 * 60 * 60 * 1000;

/// The federation router (key server only for now).
pub fn router(server: Arc<Server>) -> Router {
    Router::new()
        .route("/_matrix/key/v2/server", get(server_keys))
        .route("/_matrix/key/v2/server/{key_id}", get(server_keys))
        .with_state(server)
}

/// The signed `ServerKeys` object of this server.
pub fn server_keys_json(server: &Server) -> Result<CanonicalJsonObject, String> {
    let mut verify = CanonicalJsonObject::new();
    let mut key = CanonicalJsonObject::new();
    key.insert(
        "key".into(),
        CanonicalJsonValue::String(server.key.public_key_base64()),
    );
    verify.insert(server.key.key_id(), CanonicalJsonValue::Object(key));
    let mut obj = CanonicalJsonObject::new();
    obj.insert(
        "server_name".into(),
        CanonicalJsonValue::String(server.server_name().to_owned()),
    );
    obj.insert("verify_keys".into(), CanonicalJsonValue::Object(verify));
    obj.insert(
        "old_verify_keys".into(),
        CanonicalJsonValue::Object(CanonicalJsonObject::new()),
    );
    obj.insert(
        "valid_until_ts".into(),
        CanonicalJsonValue::Integer((now_ms() + KEY_VALIDITY_MS).try_into().map_err(|_| "ts")?),
    );
    sign_json(server.server_name(), &server.key.pair, &mut obj).map_err(|e| e.to_string())?;
    Ok(obj)
}

async fn server_keys(State(server): State<Arc<Server>>) -> impl IntoResponse {
    match server_keys_json(&server) {
        Ok(obj) => (
            StatusCode::OK,
            Json(serde_json::to_value(obj).unwrap_or_default()),
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"errcode": "M_UNKNOWN", "error": e})),
        ),
    }
}
