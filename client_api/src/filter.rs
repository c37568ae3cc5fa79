//! Filtering (spec § "Filtering"): `POST /user/{userId}/filter` stores a validated filter
//! definition as given and returns its ID; `GET /user/{userId}/filter/{filterId}` returns it.

use std::sync::Arc;

use axum::{
    extract::{Path, State},
    Json,
};
use myelin_core::{Error, Server};
use ruma::api::client::filter::FilterDefinition;
use serde_json::{json, Value};

use crate::{
    error::{ApiError, ApiResult},
    extract::{own_user, Auth, JsonBody},
};

/// Checks a filter definition (a JSON object of the spec's `Filter` shape), `M_BAD_JSON` if
/// it is not one.
pub fn parse_definition(value: &Value) -> Result<FilterDefinition, ApiError> {
    if !value.is_object() {
        return Err(Error::bad_json("A filter must be a JSON object").into());
    }
    // ruma accepts any string here; the spec allows only these two.
    match value.get("event_format") {
        None => {}
        Some(Value::String(f)) if f == "client" || f == "federation" => {}
        Some(_) => {
            return Err(Error::bad_json("event_format must be \"client\" or \"federation\"").into())
        }
    }
    serde_json::from_value(value.clone())
        .map_err(|e| Error::bad_json(format!("Invalid filter: {e}")).into())
}

async fn stored_json(server: &Server, user_id: &str, filter_id: &str) -> ApiResult<Option<String>> {
    let Ok(id) = filter_id.parse::<i64>() else {
        return Ok(None);
    };
    Ok(server.store.filter(user_id, id).await?)
}

/// `POST /user/{userId}/filter`.
pub async fn create(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(user_id): Path<String>,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    let user = own_user(&auth, &user_id, "filters")?;
    parse_definition(&body)?;
    let id = server
        .store
        .create_filter(user.as_str(), &body.to_string())
        .await?;
    Ok(Json(json!({ "filter_id": id.to_string() })))
}

/// `GET /user/{userId}/filter/{filterId}`.
pub async fn get(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path((user_id, filter_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let user = own_user(&auth, &user_id, "filters")?;
    let json = stored_json(&server, user.as_str(), &filter_id)
        .await?
        .ok_or_else(|| Error::not_found("Unknown filter"))?;
    Ok(Json(serde_json::from_str(&json)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_filters_parse() {
        let f = json!({
            "event_fields": ["type", "content.body"],
            "event_format": "client",
            "presence": {"not_types": ["*"]},
            "room": {
                "rooms": ["!a:example.org"],
                "state": {"lazy_load_members": true},
                "timeline": {"limit": 10, "types": ["m.room.message"]}
            }
        });
        assert!(parse_definition(&f).is_ok());
        assert!(parse_definition(&json!({})).is_ok());
    }

    #[test]
    fn invalid_filters_are_refused() {
        for bad in [
            json!([]),
            json!({"presence": "not_an_object"}),
            json!({"room": {"timeline": "not_an_object"}}),
            json!({"room": {"timeline": {"limit": -1}}}),
            json!({"room": {"rooms": "not_a_list"}}),
            json!({"room": {"rooms": ["not a room id"]}}),
            json!({"event_format": "other"}),
            json!({"event_fields": "type"}),
        ] {
            assert!(parse_definition(&bad).is_err(), "{bad} accepted");
        }
    }
}
