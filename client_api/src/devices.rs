//! Device management (spec § "Device management"): list the caller's devices, get and rename
//! one, and delete one or many behind user-interactive authentication (`m.login.password`).

use std::sync::Arc;

use axum::{
    extract::{Path, State},
    response::{IntoResponse, Response},
    Json,
};
use myelin_core::{store::DeviceRow, Error, Server};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::{
    error::ApiResult,
    extract::{Auth, JsonBody},
    uia,
};

/// A device in the client format; absent values are omitted.
fn device_json(d: &DeviceRow) -> Value {
    let mut out = Map::new();
    out.insert("device_id".into(), json!(d.device_id));
    if let Some(n) = &d.display_name {
        out.insert("display_name".into(), json!(n));
    }
    if let Some(ip) = &d.last_seen_ip {
        out.insert("last_seen_ip".into(), json!(ip));
    }
    if let Some(ts) = d.last_seen_ts {
        out.insert("last_seen_ts".into(), json!(ts));
    }
    Value::Object(out)
}

async fn find_device(server: &Server, user_id: &str, device_id: &str) -> ApiResult<DeviceRow> {
    server
        .store
        .devices(user_id)
        .await?
        .into_iter()
        .find(|d| d.device_id == device_id)
        .ok_or_else(|| Error::not_found("Unknown device").into())
}

/// `GET /devices`.
pub async fn list(State(server): State<Arc<Server>>, auth: Auth) -> ApiResult<Json<Value>> {
    let devices = server.store.devices(auth.user_id.as_str()).await?;
    Ok(Json(
        json!({ "devices": devices.iter().map(device_json).collect::<Vec<_>>() }),
    ))
}

/// `GET /devices/{deviceId}`.
pub async fn get_one(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(device_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let d = find_device(&server, auth.user_id.as_str(), &device_id).await?;
    Ok(Json(device_json(&d)))
}

#[derive(Deserialize)]
pub struct RenameBody {
    display_name: Option<String>,
}

/// `PUT /devices/{deviceId}`: updates the display name of an existing device (creating devices
/// is for application services only, which Myelin does not have).
pub async fn rename(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(device_id): Path<String>,
    JsonBody(body): JsonBody<RenameBody>,
) -> ApiResult<Json<Value>> {
    let uid = auth.user_id.as_str();
    find_device(&server, uid, &device_id).await?;
    if let Some(name) = body.display_name {
        if !server.store.rename_device(uid, &device_id, &name).await? {
            return Err(Error::not_found("Unknown device").into());
        }
    }
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
pub struct DeleteOneBody {
    auth: Option<Value>,
}

/// `DELETE /devices/{deviceId}`.
pub async fn delete_one(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(device_id): Path<String>,
    JsonBody(body): JsonBody<DeleteOneBody>,
) -> ApiResult<Response> {
    let uid = auth.user_id.as_str();
    if let Some(challenge) = uia::confirm_password(&server, body.auth.as_ref(), uid).await? {
        return Ok(challenge);
    }
    server.delete_devices(uid, Some(&[device_id]), None).await?;
    Ok(Json(json!({})).into_response())
}

#[derive(Deserialize)]
pub struct DeleteManyBody {
    devices: Vec<String>,
    auth: Option<Value>,
}

/// `POST /delete_devices`.
pub async fn delete_many(
    State(server): State<Arc<Server>>,
    auth: Auth,
    JsonBody(body): JsonBody<DeleteManyBody>,
) -> ApiResult<Response> {
    let uid = auth.user_id.as_str();
    if let Some(challenge) = uia::confirm_password(&server, body.auth.as_ref(), uid).await? {
        return Ok(challenge);
    }
    if !body.devices.is_empty() {
        server
            .delete_devices(uid, Some(&body.devices), None)
            .await?;
    }
    Ok(Json(json!({})).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_device_fields_are_omitted() {
        let d = DeviceRow {
            device_id: "ABC".into(),
            display_name: None,
            last_seen_ts: Some(5),
            last_seen_ip: None,
        };
        assert_eq!(
            device_json(&d),
            json!({"device_id": "ABC", "last_seen_ts": 5})
        );
    }
}
