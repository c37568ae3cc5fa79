//! End-to-end encryption keys (spec § "End-to-End Encryption", "Cross-signing"):
//! `/keys/upload`, `/keys/query`, `/keys/claim`, `/keys/changes`,
//! `/keys/device_signing/upload` and `/keys/signatures/upload`. Other servers' users are asked
//! through federation, all servers at once within the request's `timeout`.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use axum::{
    extract::{Extension, Query, State},
    response::{IntoResponse, Response},
    Json,
};
use myelin_core::{e2ee, token::SyncToken, Error, Server};
use myelin_federation::{
    e2ee::{parse_claim_query, parse_device_query, DEFAULT_KEYS_TIMEOUT},
    Federation,
};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::{
    error::ApiResult,
    extract::{Auth, JsonBody},
    uia,
};

/// The request's `timeout` (ms) for other servers, at most a minute.
fn timeout_of(body: &Value) -> Duration {
    body.get("timeout")
        .and_then(Value::as_u64)
        .map(|ms| Duration::from_millis(ms.min(60_000)))
        .unwrap_or(DEFAULT_KEYS_TIMEOUT)
}

/// Splits a query into our users and other servers' users.
fn split<T: Clone>(
    server: &Server,
    q: &BTreeMap<String, T>,
) -> (BTreeMap<String, T>, BTreeMap<String, T>) {
    q.iter()
        .map(|(u, v)| (u.clone(), v.clone()))
        .partition(|(u, _)| server.is_local_user(u))
}

/// `POST /keys/upload`.
pub async fn upload(
    State(server): State<Arc<Server>>,
    auth: Auth,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    let (user, device) = (auth.user_id.as_str(), auth.device_id.as_str());
    let up = e2ee::parse_key_upload(user, device, &body)?;
    let counts = server.upload_keys(user, device, up).await?;
    Ok(Json(json!({ "one_time_key_counts": counts })))
}

/// `POST /keys/query`.
pub async fn query(
    State(server): State<Arc<Server>>,
    Extension(fed): Extension<Arc<Federation>>,
    auth: Auth,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    let q = parse_device_query(body.get("device_keys"))?;
    let (local, remote) = split(&server, &q);
    let mut ans = server
        .query_local_keys(Some(auth.user_id.as_str()), &local)
        .await?;
    let mut failures = Map::new();
    if !remote.is_empty() {
        let (theirs, failed) = fed.query_remote_keys(&remote, timeout_of(&body)).await?;
        ans.device_keys.extend(theirs.device_keys);
        ans.master_keys.extend(theirs.master_keys);
        ans.self_signing_keys.extend(theirs.self_signing_keys);
        failures = failed;
    }
    Ok(Json(json!({
        "device_keys": ans.device_keys,
        "master_keys": ans.master_keys,
        "self_signing_keys": ans.self_signing_keys,
        "user_signing_keys": ans.user_signing_keys,
        "failures": failures,
    })))
}

/// `POST /keys/claim`.
pub async fn claim(
    State(server): State<Arc<Server>>,
    Extension(fed): Extension<Arc<Federation>>,
    _auth: Auth,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    let q = parse_claim_query(body.get("one_time_keys"))?;
    let (local, remote) = split(&server, &q);
    let mut keys = server.claim_local_keys(&local).await?;
    let mut failures = Map::new();
    if !remote.is_empty() {
        let (theirs, failed) = fed.claim_remote_keys(&remote, timeout_of(&body)).await;
        keys.extend(theirs);
        failures = failed;
    }
    Ok(Json(json!({ "one_time_keys": keys, "failures": failures })))
}

#[derive(Deserialize)]
pub struct ChangesParams {
    from: String,
    to: String,
}

/// `GET /keys/changes?from=&to=`.
pub async fn changes(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Query(p): Query<ChangesParams>,
) -> ApiResult<Json<Value>> {
    let from = SyncToken::parse(&p.from)?;
    let to = SyncToken::parse(&p.to)?;
    // A token from the future reads as now.
    let now = server.current_token();
    let to = SyncToken {
        events: to.events.min(now.events),
        device_lists: to.device_lists.min(now.device_lists),
        ..to
    };
    let delta = server
        .device_list_delta(auth.user_id.as_str(), from, to)
        .await?;
    Ok(Json(
        json!({ "changed": delta.changed, "left": delta.left }),
    ))
}

/// `POST /keys/device_signing/upload`: the first upload needs no user-interactive auth;
/// replacing keys does.
pub async fn device_signing_upload(
    State(server): State<Arc<Server>>,
    auth: Auth,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<Response> {
    let user = auth.user_id.as_str();
    if !body.is_object() {
        return Err(Error::bad_json("Body must be an object").into());
    }
    if server.cross_signing_upload_replaces(user, &body).await? {
        if let Some(challenge) = uia::confirm_password(&server, body.get("auth"), user).await? {
            return Ok(challenge);
        }
    }
    let mut keys = body;
    if let Some(o) = keys.as_object_mut() {
        o.remove("auth");
    }
    server.upload_cross_signing(user, &keys).await?;
    Ok(Json(json!({})).into_response())
}

/// `POST /keys/signatures/upload`.
pub async fn signatures_upload(
    State(server): State<Arc<Server>>,
    auth: Auth,
    JsonBody(body): JsonBody<Map<String, Value>>,
) -> ApiResult<Json<Value>> {
    let failures = server
        .upload_signatures(auth.user_id.as_str(), &body)
        .await?;
    Ok(Json(json!({ "failures": failures })))
}

#[derive(Deserialize)]
pub struct SendToDeviceBody {
    messages: Map<String, Value>,
}

/// `PUT /sendToDevice/{eventType}/{txnId}`: every message is checked before any is stored.
pub async fn send_to_device(
    State(server): State<Arc<Server>>,
    auth: Auth,
    axum::extract::Path((event_type, txn_id)): axum::extract::Path<(String, String)>,
    JsonBody(body): JsonBody<SendToDeviceBody>,
) -> ApiResult<Json<Value>> {
    let mut list = Vec::new();
    for (user, devices) in &body.messages {
        if myelin_core::ruma::UserId::parse(user).is_err() {
            return Err(Error::invalid_param(format!("Invalid user ID {user:?}")).into());
        }
        let devices = devices
            .as_object()
            .ok_or_else(|| Error::bad_json("messages must map users to devices to contents"))?;
        for (device, content) in devices {
            if !content.is_object() {
                return Err(
                    Error::bad_json("A to-device message's content must be an object").into(),
                );
            }
            let text = content.to_string();
            if text.len() > e2ee::MAX_TO_DEVICE_BYTES {
                return Err(Error::too_large(format!(
                    "A to-device message may hold at most {} bytes",
                    e2ee::MAX_TO_DEVICE_BYTES
                ))
                .into());
            }
            let target = if device == "*" {
                e2ee::DeviceTarget::All
            } else {
                e2ee::DeviceTarget::Device(device.clone())
            };
            list.push((user.clone(), target, text));
        }
    }
    server
        .send_to_device(
            auth.user_id.as_str(),
            auth.device_id.as_str(),
            &event_type,
            &txn_id,
            list,
        )
        .await?;
    Ok(Json(json!({})))
}
