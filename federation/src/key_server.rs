//! The key server (spec: "Retrieving server keys"): `GET /_matrix/key/v2/server` publishes this
//! server's verify key and its old ones, self-signed; the notary endpoints
//! `POST /_matrix/key/v2/query` and `GET /_matrix/key/v2/query/{serverName}` serve other
//! servers' key responses from the [`KeyRing`] (fetching when needed), each carrying the origin's
//! signature and ours.
//!
//! Old keys are read from `<data_dir>/old_signing_keys`, one per line:
//! `ed25519:<version> <unpadded base64 public key> <expired_ts in ms>` (`#` starts a comment).

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    extract::{FromRef, Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use myelin_core::{
    ruma::{
        canonical_json::{CanonicalJsonObject, CanonicalJsonValue},
        signatures::sign_json,
        OwnedServerName,
    },
    store::now_ms,
    Server,
};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::keyring::KeyRing;

/// How long a published key response may be cached by others.
const KEY_VALIDITY_MS: i64 = 24 * 60 * 60 * 1000;
/// Most servers answered in one notary query.
const MAX_QUERIED_SERVERS: usize = 100;

/// One of our keys no longer in use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldVerifyKey {
    /// `ed25519:<version>`.
    pub key_id: String,
    /// Unpadded base64 public key.
    pub key: String,
    /// When it stopped being used (ms).
    pub expired_ts: i64,
}

/// Our old verify keys from `<data_dir>/old_signing_keys` (none when the file is absent;
/// malformed lines are skipped with a warning).
pub fn old_verify_keys(server: &Server) -> Vec<OldVerifyKey> {
    let path = server.config.data_dir.join("old_signing_keys");
    match std::fs::read_to_string(&path) {
        Ok(text) => parse_old_keys(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            tracing::warn!("reading {}: {e}", path.display());
            Vec::new()
        }
    }
}

fn parse_old_keys(text: &str) -> Vec<OldVerifyKey> {
    let mut keys = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts[..] {
            [key_id, key, expired_ts]
                if key_id.starts_with("ed25519:") && expired_ts.parse::<i64>().is_ok() =>
            {
                keys.push(OldVerifyKey {
                    key_id: key_id.to_owned(),
                    key: key.trim_end_matches('=').to_owned(),
                    expired_ts: expired_ts.parse().unwrap_or(0),
                });
            }
            _ => tracing::warn!("old_signing_keys: skipping malformed line {line:?}"),
        }
    }
    keys
}

/// The signed `ServerKeys` object of this server.
pub fn server_keys_json(server: &Server) -> Result<CanonicalJsonObject, String> {
    let key_object = |key: String| {
        CanonicalJsonObject::from([("key".to_owned(), CanonicalJsonValue::String(key))])
    };
    let verify = CanonicalJsonObject::from([(
        server.key.key_id(),
        CanonicalJsonValue::Object(key_object(server.key.public_key_base64())),
    )]);
    let mut old = CanonicalJsonObject::new();
    for k in old_verify_keys(server) {
        if k.key_id == server.key.key_id() {
            continue;
        }
        let mut entry = key_object(k.key);
        entry.insert(
            "expired_ts".to_owned(),
            CanonicalJsonValue::Integer(k.expired_ts.try_into().map_err(|_| "expired_ts")?),
        );
        old.insert(k.key_id, CanonicalJsonValue::Object(entry));
    }
    let mut obj = CanonicalJsonObject::new();
    obj.insert(
        "server_name".into(),
        CanonicalJsonValue::String(server.server_name().to_owned()),
    );
    obj.insert("verify_keys".into(), CanonicalJsonValue::Object(verify));
    obj.insert("old_verify_keys".into(), CanonicalJsonValue::Object(old));
    obj.insert(
        "valid_until_ts".into(),
        CanonicalJsonValue::Integer((now_ms() + KEY_VALIDITY_MS).try_into().map_err(|_| "ts")?),
    );
    sign_json(server.server_name(), &server.key.pair, &mut obj).map_err(|e| e.to_string())?;
    Ok(obj)
}

/// `GET /_matrix/key/v2/server` (and the deprecated `/server/{keyId}`).
pub fn server_key_routes<S>() -> Router<S>
where
    Arc<Server>: FromRef<S>,
    S: Clone + Send + Sync + 'static,
{
    Router::new()
        .route("/_matrix/key/v2/server", get(server_keys))
        .route("/_matrix/key/v2/server/{key_id}", get(server_keys))
}

/// The notary endpoints `POST /_matrix/key/v2/query` and `GET /_matrix/key/v2/query/{serverName}`.
pub fn notary_routes<S>() -> Router<S>
where
    Arc<KeyRing>: FromRef<S>,
    S: Clone + Send + Sync + 'static,
{
    Router::new()
        .route("/_matrix/key/v2/query", post(query_keys))
        .route(
            "/_matrix/key/v2/query/{server_name}",
            get(query_server_keys),
        )
}

/// All key endpoints: [`server_key_routes`] and [`notary_routes`].
pub fn key_routes<S>() -> Router<S>
where
    Arc<Server>: FromRef<S>,
    Arc<KeyRing>: FromRef<S>,
    S: Clone + Send + Sync + 'static,
{
    server_key_routes().merge(notary_routes())
}

fn error(status: StatusCode, errcode: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"errcode": errcode, "error": message.into()})),
    )
        .into_response()
}

async fn server_keys(State(server): State<Arc<Server>>) -> Response {
    match server_keys_json(&server) {
        Ok(obj) => Json(obj).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN", e),
    }
}

#[derive(Deserialize)]
struct QueryBody {
    server_keys: BTreeMap<String, BTreeMap<String, Criteria>>,
}

#[derive(Deserialize, Default)]
struct Criteria {
    minimum_valid_until_ts: Option<i64>,
}

async fn query_keys(State(ring): State<Arc<KeyRing>>, body: axum::body::Bytes) -> Response {
    let Ok(query) = serde_json::from_slice::<QueryBody>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "M_BAD_JSON",
            "expected {\"server_keys\": {server: {key_id: {minimum_valid_until_ts}}}}",
        );
    };
    if query.server_keys.len() > MAX_QUERIED_SERVERS {
        return error(
            StatusCode::BAD_REQUEST,
            "M_LIMIT_EXCEEDED",
            format!("at most {MAX_QUERIED_SERVERS} servers per query"),
        );
    }
    let now = now_ms();
    let lookups = query.server_keys.iter().filter_map(|(name, keys)| {
        let name = OwnedServerName::try_from(name.as_str()).ok()?;
        let minimum = keys
            .values()
            .filter_map(|c| c.minimum_valid_until_ts)
            .max()
            .unwrap_or(now);
        Some(notarised(&ring, name, minimum))
    });
    let results: Vec<Value> = futures::future::join_all(lookups)
        .await
        .into_iter()
        .flatten()
        .collect();
    Json(json!({ "server_keys": results })).into_response()
}

#[derive(Deserialize)]
struct QueryParams {
    minimum_valid_until_ts: Option<i64>,
}

async fn query_server_keys(
    State(ring): State<Arc<KeyRing>>,
    Path(server_name): Path<String>,
    Query(params): Query<QueryParams>,
) -> Response {
    let Ok(name) = OwnedServerName::try_from(server_name.as_str()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
            "not a server name",
        );
    };
    let minimum = params.minimum_valid_until_ts.unwrap_or_else(now_ms);
    let results: Vec<Value> = notarised(&ring, name, minimum).await.into_iter().collect();
    Json(json!({ "server_keys": results })).into_response()
}

/// `name`'s key response with our signature added, or `None` when none can be had.
async fn notarised(ring: &KeyRing, name: OwnedServerName, minimum: i64) -> Option<Value> {
    let server = ring.server();
    let mut object: CanonicalJsonObject = if name == server.server_name {
        server_keys_json(server).ok()?
    } else {
        let response = match ring.key_response(&name, minimum).await {
            Ok(r) => r?,
            Err(e) => {
                tracing::debug!(server = %name, "notary: no keys: {e}");
                return None;
            }
        };
        serde_json::from_value(response).ok()?
    };
    if name != server.server_name {
        sign_json(server.server_name(), &server.key.pair, &mut object).ok()?;
    }
    serde_json::to_value(object).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_keys_file() {
        let keys = parse_old_keys(
            "# comment\ned25519:old1 AAAA= 1234\n\nbad line\ned25519:old2 BBBB 99 # trailing\n",
        );
        assert_eq!(
            keys,
            vec![
                OldVerifyKey {
                    key_id: "ed25519:old1".into(),
                    key: "AAAA".into(),
                    expired_ts: 1234
                },
                OldVerifyKey {
                    key_id: "ed25519:old2".into(),
                    key: "BBBB".into(),
                    expired_ts: 99
                },
            ]
        );
    }
}
