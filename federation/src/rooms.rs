//! Room discovery across servers, both ways: the published room directory
//! (`/_matrix/federation/v1/publicRooms`, GET and POST) and the space hierarchy
//! (`/_matrix/federation/v1/hierarchy/{roomId}`) served to other servers from the core, and
//! asked of other servers for our clients (`publicRooms?server=`, `/hierarchy` children we are
//! not in). Hierarchy answers from other servers are cached briefly, as the spec suggests.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use axum::{
    extract::{Path, Query, RawQuery, State},
    Json,
};
use myelin_core::{
    directory::{parse_limit, PublicRoomsBody, PublicRoomsQuery},
    ruma::{OwnedRoomId, OwnedServerName, RoomId, ServerName},
    Error, Result,
};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{
    auth::Signed, inbound::encode, outbound::remote_error, FedResult, FedState, Federation,
};

/// How long another server's hierarchy answer (or its refusal) is reused.
const HIERARCHY_TTL: Duration = Duration::from_secs(60);
/// Most cached hierarchy answers (the cache is emptied when full).
const HIERARCHY_CACHE_MAX: usize = 1000;

/// Other servers' `/hierarchy` answers: `(room ID, suggested_only) → (when, answer)`; `None`
/// when no server would describe the room.
#[derive(Default)]
pub struct HierarchyCache {
    entries: Mutex<HashMap<HierarchyKey, (Instant, Option<Value>)>>,
}

/// `(room ID, suggested_only)`.
type HierarchyKey = (String, bool);

impl HierarchyCache {
    fn get(&self, key: &HierarchyKey) -> Option<Option<Value>> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(key)
            .filter(|(at, _)| at.elapsed() < HIERARCHY_TTL)
            .map(|(_, v)| v.clone())
    }

    fn put(&self, key: HierarchyKey, value: Option<Value>) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= HIERARCHY_CACHE_MAX {
            entries.clear();
        }
        entries.insert(key, (Instant::now(), value));
    }
}

/// Whether an answer to `/hierarchy/{room_id}` has the shape the spec requires.
fn valid_hierarchy(answer: &Value, room_id: &RoomId) -> bool {
    let room = &answer["room"];
    room["room_id"].as_str() == Some(room_id.as_str())
        && room["children_state"].is_array()
        && room["num_joined_members"].is_u64()
        && answer["children"].is_array()
        && answer["inaccessible_children"].is_array()
}

impl Federation {
    /// Another server's published room directory (`GET` without a filter, else `POST`).
    pub async fn public_rooms(
        &self,
        destination: &ServerName,
        q: &PublicRoomsQuery,
    ) -> Result<Value> {
        let include_all_networks = q.include_all_networks;
        let filtered = q.term.is_some() || !q.room_types.is_empty();
        let resp = if filtered {
            let mut filter = json!({});
            if let Some(t) = &q.term {
                filter["generic_search_term"] = json!(t);
            }
            if !q.room_types.is_empty() {
                filter["room_types"] = json!(q.room_types);
            }
            let mut body =
                json!({ "filter": filter, "include_all_networks": include_all_networks });
            if let Some(l) = q.limit {
                body["limit"] = json!(l);
            }
            if let Some(s) = &q.since {
                body["since"] = json!(s);
            }
            if let Some(t) = &q.third_party_instance_id {
                body["third_party_instance_id"] = json!(t);
            }
            self.client
                .request(
                    destination,
                    http::Method::POST,
                    "/_matrix/federation/v1/publicRooms",
                    Some(&body),
                )
                .await
        } else {
            let mut params = vec![format!("include_all_networks={include_all_networks}")];
            if let Some(l) = q.limit {
                params.push(format!("limit={l}"));
            }
            if let Some(s) = &q.since {
                params.push(format!("since={}", encode(s)));
            }
            if let Some(t) = &q.third_party_instance_id {
                params.push(format!("third_party_instance_id={}", encode(t)));
            }
            let path = format!("/_matrix/federation/v1/publicRooms?{}", params.join("&"));
            self.client
                .request(destination, http::Method::GET, &path, None)
                .await
        }
        .map_err(|e| match (e.status(), e.errcode()) {
            // Our client's own parameters (a bad `since` token) refused by the other server.
            (Some(400), Some(code)) => Error::invalid_param(format!("room directory: {code}: {e}")),
            _ => remote_error("room directory", e),
        })?;
        if !resp["chunk"].is_array() {
            return Err(Error::new(
                myelin_core::ErrorKind::Unknown,
                "the other server's room directory answer has no chunk",
            ));
        }
        Ok(resp)
    }

    /// A room's `/hierarchy` from the first of `via` that describes it (cached), or `None`
    /// when none will.
    pub async fn remote_hierarchy(
        &self,
        room_id: &RoomId,
        via: &[OwnedServerName],
        suggested_only: bool,
    ) -> Option<Value> {
        let key = (room_id.to_string(), suggested_only);
        if let Some(cached) = self.hierarchy.get(&key) {
            return cached;
        }
        let path = format!(
            "/_matrix/federation/v1/hierarchy/{}?suggested_only={suggested_only}",
            encode(room_id.as_str())
        );
        let mut answer = None;
        for server in via.iter().filter(|s| **s != self.server.server_name) {
            match self
                .client
                .request(server, http::Method::GET, &path, None)
                .await
            {
                Ok(v) if valid_hierarchy(&v, room_id) => {
                    answer = Some(v);
                    break;
                }
                Ok(_) => {
                    tracing::info!(via = %server, room = %room_id, "malformed hierarchy answer")
                }
                Err(e) => {
                    tracing::debug!(via = %server, room = %room_id, error = %e, "no hierarchy")
                }
            }
        }
        self.hierarchy.put(key, answer.clone());
        answer
    }
}

// Endpoints ------------------------------------------------------------------------------------

fn bool_param(v: Option<&str>, name: &str) -> FedResult<bool> {
    match v {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(_) => Err(Error::invalid_param(format!("{name} must be true or false")).into()),
    }
}

#[derive(Deserialize)]
pub(crate) struct PublicRoomsParams {
    limit: Option<String>,
    since: Option<String>,
    include_all_networks: Option<String>,
    third_party_instance_id: Option<String>,
}

/// `GET /publicRooms`: our directory (`limit` 0 or absent: no limit but the page maximum).
pub(crate) async fn public_rooms_get(
    State(st): State<FedState>,
    Query(q): Query<PublicRoomsParams>,
    _signed: Signed,
) -> FedResult<Json<Value>> {
    let limit = parse_limit(q.limit.as_deref())?;
    let all = bool_param(q.include_all_networks.as_deref(), "include_all_networks")?;
    let query = PublicRoomsQuery {
        limit,
        since: q.since,
        include_all_networks: all,
        third_party_instance_id: q.third_party_instance_id,
        ..Default::default()
    };
    Ok(Json(st.0.server.public_rooms(query).await?))
}

/// `POST /publicRooms`: our directory, filtered.
pub(crate) async fn public_rooms_post(
    State(st): State<FedState>,
    signed: Signed,
) -> FedResult<Json<Value>> {
    let body = signed
        .body
        .clone()
        .ok_or_else(|| Error::new(myelin_core::ErrorKind::NotJson, "Body must be JSON"))?;
    let b: PublicRoomsBody =
        serde_json::from_value(body).map_err(|e| Error::bad_json(e.to_string()))?;
    Ok(Json(st.0.server.public_rooms(b.into()).await?))
}

/// `GET /hierarchy/{roomId}?suggested_only=`.
pub(crate) async fn hierarchy(
    State(st): State<FedState>,
    Path(room_id): Path<String>,
    RawQuery(q): RawQuery,
    signed: Signed,
) -> FedResult<Json<Value>> {
    let room_id =
        OwnedRoomId::try_from(room_id).map_err(|_| Error::invalid_param("invalid room ID"))?;
    let mut suggested = None;
    for kv in q.as_deref().unwrap_or_default().split('&') {
        if let Some(v) = kv.strip_prefix("suggested_only=") {
            suggested = Some(v.to_owned());
        }
    }
    let suggested_only = bool_param(suggested.as_deref(), "suggested_only")?;
    Ok(Json(
        st.0.server
            .federation_hierarchy(&room_id, &signed.origin, suggested_only)
            .await?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hierarchy_answers_must_have_the_spec_shape() {
        let id = OwnedRoomId::try_from("!s:x").unwrap();
        let good = json!({
            "room": {"room_id": "!s:x", "children_state": [], "num_joined_members": 1,
                     "world_readable": false, "guest_can_join": false},
            "children": [], "inaccessible_children": [],
        });
        assert!(valid_hierarchy(&good, &id));
        let mut other = good.clone();
        other["room"]["room_id"] = json!("!t:x");
        assert!(!valid_hierarchy(&other, &id), "another room");
        let mut no_children = good.clone();
        no_children.as_object_mut().unwrap().remove("children");
        assert!(!valid_hierarchy(&no_children, &id));
        assert!(!valid_hierarchy(&json!([]), &id));
    }

    #[test]
    fn the_cache_remembers_refusals_too() {
        let c = HierarchyCache::default();
        let k = ("!r:x".to_owned(), false);
        assert_eq!(c.get(&k), None);
        c.put(k.clone(), None);
        assert_eq!(c.get(&k), Some(None));
        c.put(k.clone(), Some(json!({"a": 1})));
        assert_eq!(c.get(&k), Some(Some(json!({"a": 1}))));
    }
}
