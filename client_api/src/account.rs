//! Accounts (spec § "Account registration and management", "Login", "Logout", "Refresh"):
//! register (+ availability), login, refresh, logout, whoami, password change, deactivation.

use std::sync::Arc;

use axum::{
    extract::{Query, State},
    response::{IntoResponse, Response},
    Json,
};
use myelin_core::{
    accounts::{new_device_id, validate_localpart},
    config::RegistrationMode,
    Error, ErrorKind, Server,
};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{
    error::{err, ApiResult},
    extract::{Auth, JsonBody},
    uia::{self, UiaOutcome},
};

#[derive(Deserialize)]
pub struct RegisterBody {
    username: Option<String>,
    password: Option<String>,
    device_id: Option<String>,
    initial_device_display_name: Option<String>,
    #[serde(default)]
    inhibit_login: bool,
    #[serde(default)]
    refresh_token: bool,
    auth: Option<Value>,
}

#[derive(Deserialize)]
pub struct KindQuery {
    kind: Option<String>,
}

pub async fn register(
    State(server): State<Arc<Server>>,
    Query(q): Query<KindQuery>,
    JsonBody(body): JsonBody<RegisterBody>,
) -> ApiResult<Response> {
    if q.kind.as_deref() == Some("guest") {
        return err(ErrorKind::GuestAccessForbidden, "Guest access is disabled");
    }
    let flows: &[&[&str]] = match server.config.registration {
        RegistrationMode::Closed => return err(ErrorKind::Forbidden, "Registration is disabled"),
        RegistrationMode::Open => &[&["m.login.dummy"]],
        RegistrationMode::Token => &[&["m.login.registration_token"]],
    };
    let localpart = match &body.username {
        Some(u) => u.to_lowercase(),
        None => myelin_core::server::random_string(12).to_lowercase(),
    };
    // Check the name before asking for auth, as clients expect.
    validate_localpart(&localpart)?;
    let candidate = format!("@{localpart}:{}", server.server_name());
    if server.store.user(&candidate).await?.is_some() {
        return err(ErrorKind::UserInUse, "User ID already taken");
    }
    if let UiaOutcome::Challenge(r) = uia::check(&server, body.auth.as_ref(), flows, None).await? {
        return Ok(r);
    }
    let token_used = body
        .auth
        .as_ref()
        .filter(|a| a.get("type").and_then(Value::as_str) == Some("m.login.registration_token"))
        .and_then(|a| a.get("token").and_then(Value::as_str));
    if let Some(t) = token_used {
        if !server.store.consume_registration_token(t).await? {
            return err(ErrorKind::Unauthorized, "Registration token is used up");
        }
    }
    let user_id = server
        .create_account(&localpart, body.password.as_deref(), false)
        .await?;
    if body.inhibit_login {
        return Ok(Json(json!({ "user_id": user_id })).into_response());
    }
    let out = new_session(
        &server,
        user_id.as_str(),
        body.device_id,
        body.initial_device_display_name.as_deref(),
        body.refresh_token,
    )
    .await?;
    Ok(Json(out).into_response())
}

/// Starts a session on a (new or given) device: the body shared by register and login.
async fn new_session(
    server: &Server,
    user_id: &str,
    device_id: Option<String>,
    display_name: Option<&str>,
    with_refresh: bool,
) -> ApiResult<Value> {
    let device_id = device_id.unwrap_or_else(new_device_id);
    let tokens = server
        .issue_tokens(user_id, &device_id, display_name, with_refresh)
        .await?;
    let mut out = json!({
        "user_id": user_id,
        "access_token": tokens.access_token,
        "device_id": device_id,
        "home_server": server.server_name(),
    });
    if let Some(r) = tokens.refresh_token {
        out["refresh_token"] = json!(r);
        out["expires_in_ms"] = json!(tokens.expires_in_ms);
    }
    Ok(out)
}

#[derive(Deserialize)]
pub struct AvailableQuery {
    username: String,
}

pub async fn register_available(
    State(server): State<Arc<Server>>,
    Query(q): Query<AvailableQuery>,
) -> ApiResult<Json<Value>> {
    let localpart = q.username.to_lowercase();
    validate_localpart(&localpart)?;
    if server
        .store
        .user(&format!("@{localpart}:{}", server.server_name()))
        .await?
        .is_some()
    {
        return err(ErrorKind::UserInUse, "User ID already taken");
    }
    Ok(Json(json!({ "available": true })))
}

pub async fn login_flows() -> Json<Value> {
    Json(json!({ "flows": [{ "type": "m.login.password" }] }))
}

#[derive(Deserialize)]
pub struct LoginBody {
    #[serde(rename = "type")]
    kind: String,
    identifier: Option<Value>,
    user: Option<String>,
    password: Option<String>,
    device_id: Option<String>,
    initial_device_display_name: Option<String>,
    #[serde(default)]
    refresh_token: bool,
}

pub async fn login(
    State(server): State<Arc<Server>>,
    JsonBody(body): JsonBody<LoginBody>,
) -> ApiResult<Json<Value>> {
    if body.kind != "m.login.password" {
        return err(ErrorKind::Unknown, "Unsupported login type");
    }
    let user = match (&body.identifier, &body.user) {
        (Some(id), _) => {
            if id.get("type").and_then(Value::as_str) != Some("m.id.user") {
                return err(ErrorKind::Unknown, "Unsupported identifier type");
            }
            id.get("user").and_then(Value::as_str).map(str::to_owned)
        }
        (None, Some(u)) => Some(u.clone()),
        (None, None) => None,
    }
    .ok_or_else(|| Error::bad_json("Missing user identifier"))?;
    let password = body
        .password
        .ok_or_else(|| Error::bad_json("Missing password"))?;
    let user_id = if user.starts_with('@') {
        user.to_lowercase()
    } else {
        format!("@{}:{}", user.to_lowercase(), server.server_name())
    };
    if !server.check_password(&user_id, &password).await? {
        return err(ErrorKind::Forbidden, "Invalid username or password");
    }
    let mut out = new_session(
        &server,
        &user_id,
        body.device_id,
        body.initial_device_display_name.as_deref(),
        body.refresh_token,
    )
    .await?;
    out["well_known"] = json!({ "m.homeserver": { "base_url": server.config.public_base_url() } });
    Ok(Json(out))
}

#[derive(Deserialize)]
pub struct RefreshBody {
    refresh_token: String,
}

pub async fn refresh(
    State(server): State<Arc<Server>>,
    JsonBody(body): JsonBody<RefreshBody>,
) -> ApiResult<Json<Value>> {
    let t = server.refresh_tokens(&body.refresh_token).await?;
    Ok(Json(json!({
        "access_token": t.access_token,
        "refresh_token": t.refresh_token,
        "expires_in_ms": t.expires_in_ms,
    })))
}

pub async fn logout(State(server): State<Arc<Server>>, auth: Auth) -> ApiResult<Json<Value>> {
    server
        .delete_devices(
            auth.user_id.as_str(),
            Some(std::slice::from_ref(&auth.device_id)),
            None,
        )
        .await?;
    Ok(Json(json!({})))
}

pub async fn logout_all(State(server): State<Arc<Server>>, auth: Auth) -> ApiResult<Json<Value>> {
    server
        .delete_devices(auth.user_id.as_str(), None, None)
        .await?;
    Ok(Json(json!({})))
}

pub async fn whoami(auth: Auth) -> Json<Value> {
    Json(json!({ "user_id": auth.user_id, "device_id": auth.device_id, "is_guest": false }))
}

#[derive(Deserialize)]
pub struct PasswordBody {
    new_password: String,
    #[serde(default = "yes")]
    logout_devices: bool,
    auth: Option<Value>,
}

fn yes() -> bool {
    true
}

pub async fn change_password(
    State(server): State<Arc<Server>>,
    auth: Auth,
    JsonBody(body): JsonBody<PasswordBody>,
) -> ApiResult<Response> {
    let uid = auth.user_id.as_str();
    if let Some(challenge) = uia::confirm_password(&server, body.auth.as_ref(), uid).await? {
        return Ok(challenge);
    }
    server.set_password(uid, &body.new_password).await?;
    if body.logout_devices {
        server
            .delete_devices(uid, None, Some(&auth.device_id))
            .await?;
    }
    Ok(Json(json!({})).into_response())
}

#[derive(Deserialize)]
pub struct DeactivateBody {
    auth: Option<Value>,
}

pub async fn deactivate(
    State(server): State<Arc<Server>>,
    auth: Auth,
    JsonBody(body): JsonBody<DeactivateBody>,
) -> ApiResult<Response> {
    let uid = auth.user_id.clone();
    if let Some(challenge) =
        uia::confirm_password(&server, body.auth.as_ref(), uid.as_str()).await?
    {
        return Ok(challenge);
    }
    crate::membership::leave_all_rooms(&server, &uid).await?;
    server.store.set_deactivated(uid.as_str()).await?;
    server.tokens.forget(uid.as_str(), None);
    server.push.forget_pushers(uid.as_str());
    Ok(Json(json!({ "id_server_unbind_result": "success" })).into_response())
}
