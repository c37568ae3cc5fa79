//! `POST /_matrix/client/unstable/org.matrix.simplified_msc3575/sync`: simplified sliding sync
//! (MSC4186). Parses the query (`pos`, `timeout`, `set_presence`) and the body, and hands them
//! to `myelin_core::sliding_sync`.

use std::{sync::Arc, time::Duration};

use axum::{
    extract::{Query, State},
    Json,
};
use myelin_core::{
    sliding_sync::{Body, SlidingRequest},
    Error, Server,
};
use serde::Deserialize;
use serde_json::Value;

use crate::{
    error::ApiResult,
    extract::{Auth, JsonBody},
};

/// Longest long-poll a client may ask for.
const MAX_TIMEOUT_MS: u64 = 300_000;

#[derive(Deserialize)]
pub struct SlidingQuery {
    pos: Option<String>,
    timeout: Option<String>,
    set_presence: Option<String>,
}

pub async fn sync(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Query(q): Query<SlidingQuery>,
    JsonBody(body): JsonBody<Body>,
) -> ApiResult<Json<Value>> {
    let timeout = match &q.timeout {
        Some(t) => Some(
            t.parse::<u64>()
                .map_err(|_| Error::invalid_param("Invalid timeout"))?,
        ),
        None => body.timeout,
    }
    .unwrap_or(0)
    .min(MAX_TIMEOUT_MS);
    let req = SlidingRequest {
        user_id: auth.user_id.to_string(),
        device_id: auth.device_id.clone(),
        pos: q.pos.or_else(|| body.pos.clone()),
        timeout: Duration::from_millis(timeout),
        set_presence: q.set_presence.or_else(|| body.set_presence.clone()),
        body,
    };
    Ok(Json(server.sliding_sync(&req).await?))
}
