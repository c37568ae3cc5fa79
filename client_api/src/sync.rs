//! `GET /sync`: parses the query (filter by ID or inline JSON, `since`, `timeout`,
//! `full_state`, `use_state_after`) and hands it to `myelin_core::sync`.

use std::{sync::Arc, time::Duration};

use axum::{
    extract::{Query, State},
    Json,
};
use myelin_core::{filter::Filter, sync::SyncRequest, token::SyncToken, Error, Server};
use serde::Deserialize;
use serde_json::Value;

use crate::{error::ApiResult, extract::Auth};

#[derive(Deserialize)]
pub struct SyncQuery {
    since: Option<String>,
    timeout: Option<String>,
    full_state: Option<String>,
    filter: Option<String>,
    use_state_after: Option<String>,
    set_presence: Option<String>,
}

fn flag(v: &Option<String>) -> bool {
    matches!(v.as_deref(), Some("true") | Some("1"))
}

/// Resolves a filter parameter: a stored filter ID or an inline JSON filter.
pub async fn load_filter(server: &Server, user: &str, f: Option<&str>) -> Result<Filter, Error> {
    let Some(f) = f else {
        return Ok(Filter::default());
    };
    if f.trim_start().starts_with('{') {
        return serde_json::from_str(f)
            .map_err(|e| Error::bad_json(format!("Invalid filter: {e}")));
    }
    let id: i64 = f
        .parse()
        .map_err(|_| Error::invalid_param("Invalid filter ID"))?;
    let json = server
        .store
        .filter(user, id)
        .await?
        .ok_or_else(|| Error::invalid_param("Unknown filter"))?;
    serde_json::from_str(&json)
        .map_err(|e| Error::bad_json(format!("Stored filter is invalid: {e}")))
}

pub async fn sync(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Query(q): Query<SyncQuery>,
) -> ApiResult<Json<Value>> {
    let since = q.since.as_deref().map(SyncToken::parse).transpose()?;
    let timeout = match &q.timeout {
        Some(t) => t
            .parse::<u64>()
            .map_err(|_| Error::invalid_param("Invalid timeout"))?,
        None => 0,
    }
    .min(300_000);
    let filter = load_filter(&server, auth.user_id.as_str(), q.filter.as_deref()).await?;
    let req = SyncRequest {
        user_id: auth.user_id.to_string(),
        device_id: auth.device_id.clone(),
        since,
        full_state: flag(&q.full_state),
        filter,
        use_state_after: flag(&q.use_state_after),
        timeout: Duration::from_millis(timeout),
        set_presence: q.set_presence,
        holds_presence: true,
        ack_to_device: since.map(|s| s.to_device),
    };
    Ok(Json(server.sync(&req).await?))
}
