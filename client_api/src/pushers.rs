//! Push notifications (spec § "Push Notifications", "Client behaviour"): `/pushers`,
//! `/pushers/set` and `/notifications`. The rules (validation, replacement, read markers) are
//! `myelin_core::push`'s; the push gateway calls are `push_sender.rs`'s.

use std::{collections::HashMap, sync::Arc};

use axum::{
    extract::{Query, State},
    Json,
};
use myelin_core::{Error, Server};
use serde_json::{json, Value};

use crate::{
    error::ApiResult,
    extract::{Auth, JsonBody},
};

/// `GET /pushers`.
pub async fn get_pushers(State(server): State<Arc<Server>>, auth: Auth) -> ApiResult<Json<Value>> {
    Ok(Json(
        myelin_core::push::pushers_json(&server, auth.user_id.as_str()).await?,
    ))
}

/// `POST /pushers/set`: adds, replaces (`kind` given) or deletes (`kind: null`) a pusher; it
/// belongs to the caller's device and goes with it.
pub async fn set_pusher(
    State(server): State<Arc<Server>>,
    auth: Auth,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    myelin_core::push::set_pusher(&server, auth.user_id.as_str(), &auth.device_id, &body).await?;
    Ok(Json(json!({})))
}

/// `GET /notifications?from=&limit=&only=highlight`.
pub async fn notifications(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let limit = match q.get("limit") {
        None => None,
        Some(l) => Some(
            l.parse::<i64>()
                .ok()
                .filter(|l| *l >= 0)
                .ok_or_else(|| Error::invalid_param("limit must be a non-negative integer"))?,
        ),
    };
    let only_highlight = match q.get("only").map(String::as_str) {
        None | Some("") => false,
        Some("highlight") => true,
        Some(_) => return Err(Error::invalid_param("only may only be \"highlight\"").into()),
    };
    Ok(Json(
        myelin_core::push::notifications(
            &server,
            auth.user_id.as_str(),
            &auth.device_id,
            q.get("from").map(String::as_str),
            limit,
            only_highlight,
        )
        .await?,
    ))
}
