//! User-interactive authentication (spec § "User-interactive authentication API"): the 401
//! challenge with `flows`, `params` and `session`, and the stages Myelin offers:
//! `m.login.dummy` and `m.login.registration_token` for registration, `m.login.password` to
//! re-confirm the caller's identity before sensitive changes.

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use myelin_core::{server::random_string, Server};
use serde_json::{json, Value};

use crate::error::ApiError;

/// Either the request may proceed, or a 401 challenge (or error) must be returned.
pub enum UiaOutcome {
    Done,
    Challenge(Response),
}

fn challenge(
    flows: &[&[&str]],
    session: &str,
    completed: &[String],
    error: Option<(&str, &str)>,
) -> Response {
    let mut body = json!({
        "flows": flows.iter().map(|f| json!({"stages": f})).collect::<Vec<_>>(),
        "params": {},
        "session": session,
        "completed": completed,
    });
    if let Some((code, msg)) = error {
        body["errcode"] = json!(code);
        body["error"] = json!(msg);
    }
    (StatusCode::UNAUTHORIZED, Json(body)).into_response()
}

/// Runs one UIA step for a single-stage flow set. `user_id` is the caller when re-authenticating
/// (for `m.login.password`).
pub async fn check(
    server: &Server,
    auth: Option<&Value>,
    flows: &[&[&str]],
    user_id: Option<&str>,
) -> Result<UiaOutcome, ApiError> {
    let Some(auth) = auth.filter(|a| a.is_object()) else {
        let session = random_string(24);
        server
            .store
            .put_uia_session(&session, user_id, "[]")
            .await?;
        return Ok(UiaOutcome::Challenge(challenge(flows, &session, &[], None)));
    };
    let session = auth
        .get("session")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let known = if session.is_empty() {
        None
    } else {
        server.store.uia_session(&session).await?
    };
    let session = match known {
        Some((owner, _)) if owner.as_deref() == user_id => session,
        _ => {
            // Unknown session: start a new one (clients may send auth with no session).
            let s = random_string(24);
            server.store.put_uia_session(&s, user_id, "[]").await?;
            s
        }
    };
    let stage = auth.get("type").and_then(Value::as_str).unwrap_or_default();
    if !flows.iter().any(|f| f.contains(&stage)) {
        return Ok(UiaOutcome::Challenge(challenge(
            flows,
            &session,
            &[],
            Some(("M_UNRECOGNIZED", "Unknown or unsupported auth type")),
        )));
    }
    let ok = match stage {
        "m.login.dummy" => true,
        "m.login.registration_token" => {
            let token = auth
                .get("token")
                .and_then(Value::as_str)
                .unwrap_or_default();
            server.store.registration_token_valid(token).await?
        }
        "m.login.password" => {
            let user = auth
                .get("identifier")
                .and_then(|i| i.get("user"))
                .or_else(|| auth.get("user"))
                .and_then(Value::as_str)
                .unwrap_or_default();
            let password = auth
                .get("password")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let expected = user_id.unwrap_or_default();
            let same_user =
                user == expected || format!("@{user}:{}", server.server_name()) == expected;
            same_user && server.check_password(expected, password).await?
        }
        _ => false,
    };
    if !ok {
        let (code, msg) = match stage {
            "m.login.registration_token" => ("M_UNAUTHORIZED", "Invalid registration token"),
            _ => ("M_FORBIDDEN", "Invalid password"),
        };
        return Ok(UiaOutcome::Challenge(challenge(
            flows,
            &session,
            &[],
            Some((code, msg)),
        )));
    }
    server.store.delete_uia_session(&session).await?;
    Ok(UiaOutcome::Done)
}

/// Re-confirms the caller's identity with their password (a single `m.login.password`
/// stage): `Some(challenge)` to return to the client, `None` when the request may proceed.
pub async fn confirm_password(
    server: &Server,
    auth: Option<&Value>,
    user_id: &str,
) -> Result<Option<Response>, ApiError> {
    Ok(
        match check(server, auth, &[&["m.login.password"]], Some(user_id)).await? {
            UiaOutcome::Challenge(r) => Some(r),
            UiaOutcome::Done => None,
        },
    )
}
