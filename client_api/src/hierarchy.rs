//! The space hierarchy (spec § "Spaces", `GET /_matrix/client/v1/rooms/{roomId}/hierarchy`):
//! a depth-first walk over `m.space.child` links from a space the user may see.
//!
//! Rooms we hold the state of are judged and summarised by the core
//! (`Server::space_room`); others are asked of the servers their link names (`via`) over
//! federation and judged by `Server::may_see_remote`. A room is listed once, children in the
//! spec's order, down to `max_depth`. The walk is deterministic, so a page token is where the
//! page starts in it, with the `max_depth` and `suggested_only` it was made for:
//! `<skip>_<max_depth>_<0|1>`. Each page walks again from the start (other servers' answers
//! are cached for a minute), bounded to [`MAX_WALK`] rooms.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use axum::{
    extract::{Extension, Path, Query, State},
    Json,
};
use myelin_core::{
    ruma::{OwnedRoomId, OwnedServerName, UserId},
    spaces::{order_children, space_child, Requester, SpaceEntry},
    Error, Server,
};
use myelin_federation::Federation;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{
    error::ApiResult,
    extract::{parse_id, Auth},
};

/// Rooms per page when the client asks for none, and the most it may ask for.
const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 100;
/// How deep the walk goes when the client does not say, and the deepest it may ask for.
const DEFAULT_MAX_DEPTH: usize = 10;
const MAX_DEPTH: usize = 50;
/// Most rooms one request looks at (the space tree can be large, or loop).
const MAX_WALK: usize = 1000;

#[derive(Deserialize)]
pub struct HierarchyParams {
    suggested_only: Option<String>,
    limit: Option<String>,
    max_depth: Option<String>,
    from: Option<String>,
}

/// What a page token holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Token {
    skip: usize,
    max_depth: usize,
    suggested_only: bool,
}

impl Token {
    fn encode(&self) -> String {
        format!(
            "{}_{}_{}",
            self.skip,
            self.max_depth,
            u8::from(self.suggested_only)
        )
    }

    fn decode(s: &str) -> Option<Self> {
        let mut parts = s.split('_');
        let skip = parts.next()?.parse().ok()?;
        let max_depth = parts.next()?.parse().ok()?;
        let suggested_only = match parts.next()? {
            "0" => false,
            "1" => true,
            _ => return None,
        };
        parts.next().is_none().then_some(Token {
            skip,
            max_depth,
            suggested_only,
        })
    }
}

fn parse_number(v: Option<&str>, name: &str) -> ApiResult<Option<usize>> {
    match v {
        None | Some("") => Ok(None),
        Some(s) => s.parse::<usize>().map(Some).map_err(|_| {
            Error::invalid_param(format!("{name} must be a non-negative integer")).into()
        }),
    }
}

fn parse_bool(v: Option<&str>, name: &str) -> ApiResult<Option<bool>> {
    match v {
        None | Some("") => Ok(None),
        Some("true") => Ok(Some(true)),
        Some("false") => Ok(Some(false)),
        Some(_) => Err(Error::invalid_param(format!("{name} must be true or false")).into()),
    }
}

/// The request's `(token, limit)`: a `from` token fixes `max_depth` and `suggested_only`.
fn parse_params(q: &HierarchyParams) -> ApiResult<(Token, usize)> {
    let limit = match parse_number(q.limit.as_deref(), "limit")? {
        None => DEFAULT_LIMIT,
        Some(0) => return Err(Error::invalid_param("limit must be greater than zero").into()),
        Some(l) => l.min(MAX_LIMIT),
    };
    let max_depth = parse_number(q.max_depth.as_deref(), "max_depth")?.map(|d| d.min(MAX_DEPTH));
    let suggested_only = parse_bool(q.suggested_only.as_deref(), "suggested_only")?;
    let token = match q.from.as_deref() {
        None | Some("") => Token {
            skip: 0,
            max_depth: max_depth.unwrap_or(DEFAULT_MAX_DEPTH),
            suggested_only: suggested_only.unwrap_or(false),
        },
        Some(from) => {
            let t =
                Token::decode(from).ok_or_else(|| Error::invalid_param("Unknown from token"))?;
            if max_depth.is_some_and(|d| d != t.max_depth)
                || suggested_only.is_some_and(|s| s != t.suggested_only)
            {
                return Err(Error::invalid_param(
                    "suggested_only and max_depth cannot change on paginated requests",
                )
                .into());
            }
            t
        }
    };
    Ok((token, limit))
}

/// A room to visit: its ID, the servers to ask if we are not in it, its depth.
type Visit = (OwnedRoomId, Vec<OwnedServerName>, usize);

/// What other servers told us during one walk.
#[derive(Default)]
struct Remote {
    /// Summaries of rooms given as another room's children.
    known: HashMap<String, Value>,
    /// Rooms a server said we may not see.
    inaccessible: HashSet<String>,
}

/// A room's links from its `children_state` (another server's answer), valid ones only, in
/// the spec's order.
fn remote_children(room: &Value, suggested_only: bool) -> Vec<(OwnedRoomId, Vec<OwnedServerName>)> {
    let mut children: Vec<_> = room["children_state"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["type"] == "m.space.child")
        .filter_map(|e| {
            space_child(
                e["state_key"].as_str()?,
                &e["content"],
                e["sender"].as_str().unwrap_or_default(),
                e["origin_server_ts"].as_u64().unwrap_or(0),
            )
        })
        .filter(|c| c.suggested || !suggested_only)
        .collect();
    order_children(&mut children);
    children.into_iter().map(|c| (c.room_id, c.via)).collect()
}

/// A room we are not in, from what other servers say: `(entry, children)` if the user may
/// see it.
async fn remote_room(
    server: &Server,
    fed: &Federation,
    user: &UserId,
    remote: &mut Remote,
    room_id: &OwnedRoomId,
    via: &[OwnedServerName],
    suggested_only: bool,
) -> ApiResult<Option<(Value, Vec<(OwnedRoomId, Vec<OwnedServerName>)>)>> {
    if remote.inaccessible.contains(room_id.as_str()) {
        return Ok(None);
    }
    // A child summary from its parent's answer will do unless it is a space without its links.
    let room = match remote.known.get(room_id.as_str()) {
        Some(r) if r["room_type"] != "m.space" || r["children_state"].is_array() => r.clone(),
        _ => {
            let Some(answer) = fed.remote_hierarchy(room_id, via, suggested_only).await else {
                return Ok(None);
            };
            for c in answer["children"].as_array().into_iter().flatten() {
                if let Some(id) = c["room_id"].as_str() {
                    remote.known.insert(id.to_owned(), c.clone());
                }
            }
            for id in answer["inaccessible_children"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                remote.inaccessible.insert(id.to_owned());
            }
            answer["room"].clone()
        }
    };
    if !room.is_object() || !server.may_see_remote(user, &room).await? {
        return Ok(None);
    }
    let children = if room["room_type"] == "m.space" {
        remote_children(&room, suggested_only)
    } else {
        Vec::new()
    };
    let mut entry = room;
    if !entry["children_state"].is_array() {
        entry["children_state"] = json!([]);
    }
    Ok(Some((entry, children)))
}

/// `GET /_matrix/client/v1/rooms/{roomId}/hierarchy`.
pub async fn hierarchy(
    State(server): State<Arc<Server>>,
    Extension(fed): Extension<Arc<Federation>>,
    auth: Auth,
    Path(room_id): Path<String>,
    Query(q): Query<HierarchyParams>,
) -> ApiResult<Json<Value>> {
    let root: OwnedRoomId = parse_id(&room_id, "room ID")?;
    let (token, limit) = parse_params(&q)?;
    let user = &auth.user_id;
    let want = token.skip.saturating_add(limit);
    let mut out: Vec<Value> = Vec::new();
    let mut seen: HashSet<OwnedRoomId> = HashSet::new();
    let mut remote = Remote::default();
    let mut stack: Vec<Visit> = vec![(root.clone(), Vec::new(), 0)];
    while let Some((id, via, depth)) = stack.pop() {
        // One room past the page tells whether there is a next one.
        if out.len() > want || seen.len() >= MAX_WALK {
            break;
        }
        if !seen.insert(id.clone()) {
            continue;
        }
        let found = match server
            .space_room(&id, Requester::User(user), token.suggested_only)
            .await?
        {
            SpaceEntry::Accessible(r) => Some((
                r.to_json(),
                r.children.into_iter().map(|c| (c.room_id, c.via)).collect(),
            )),
            SpaceEntry::Inaccessible => None,
            SpaceEntry::Unknown if id == root => None,
            SpaceEntry::Unknown => {
                remote_room(
                    &server,
                    &fed,
                    user,
                    &mut remote,
                    &id,
                    &via,
                    token.suggested_only,
                )
                .await?
            }
        };
        let Some((entry, children)) = found else {
            if id == root {
                return Err(Error::forbidden("You may not view this room").into());
            }
            continue;
        };
        out.push(entry);
        if depth < token.max_depth {
            // Pushed in reverse, so the first child is visited next.
            for (child, via) in children.into_iter().rev() {
                if !seen.contains(&child) {
                    stack.push((child, via, depth + 1));
                }
            }
        }
    }
    let more = out.len() > want;
    let rooms: Vec<Value> = out.into_iter().skip(token.skip).take(limit).collect();
    let mut body = json!({ "rooms": rooms });
    if more {
        body["next_batch"] = json!(Token {
            skip: want,
            ..token
        }
        .encode());
    }
    Ok(Json(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> HierarchyParams {
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        };
        HierarchyParams {
            suggested_only: get("suggested_only"),
            limit: get("limit"),
            max_depth: get("max_depth"),
            from: get("from"),
        }
    }

    #[test]
    fn tokens_round_trip_and_reject_garbage() {
        let t = Token {
            skip: 7,
            max_depth: 3,
            suggested_only: true,
        };
        assert_eq!(Token::decode(&t.encode()), Some(t));
        for bad in ["", "1_2", "1_2_3", "a_2_0", "1_2_0_4", "-1_2_0"] {
            assert_eq!(Token::decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn parameters_are_checked() {
        assert_eq!(
            parse_params(&params(&[])).unwrap(),
            (
                Token {
                    skip: 0,
                    max_depth: DEFAULT_MAX_DEPTH,
                    suggested_only: false
                },
                DEFAULT_LIMIT
            )
        );
        assert_eq!(
            parse_params(&params(&[("limit", "1000")])).unwrap().1,
            MAX_LIMIT
        );
        for bad in [
            vec![("limit", "0")],
            vec![("limit", "-3")],
            vec![("max_depth", "-1")],
            vec![("suggested_only", "yes")],
            vec![("from", "nonsense")],
            vec![("from", "2_1_0"), ("max_depth", "2")],
            vec![("from", "2_1_0"), ("suggested_only", "true")],
        ] {
            assert!(parse_params(&params(&bad)).is_err(), "{bad:?}");
        }
        let (t, _) = parse_params(&params(&[("from", "2_1_1"), ("max_depth", "1")])).unwrap();
        assert_eq!((t.skip, t.max_depth, t.suggested_only), (2, 1, true));
    }

    #[test]
    fn remote_children_are_valid_and_ordered() {
        let room = json!({"room_type": "m.space", "children_state": [
            {"type": "m.space.child", "state_key": "!b:x", "content": {"via": ["x"]},
             "sender": "@a:x", "origin_server_ts": 2},
            {"type": "m.space.child", "state_key": "!a:x", "content": {"via": ["x"], "suggested": true},
             "sender": "@a:x", "origin_server_ts": 3},
            {"type": "m.space.child", "state_key": "!gone:x", "content": {},
             "sender": "@a:x", "origin_server_ts": 1},
            {"type": "m.room.name", "state_key": "!c:x", "content": {"via": ["x"]}},
        ]});
        let ids: Vec<String> = remote_children(&room, false)
            .into_iter()
            .map(|(r, _)| r.to_string())
            .collect();
        assert_eq!(ids, ["!b:x", "!a:x"]);
        let ids: Vec<String> = remote_children(&room, true)
            .into_iter()
            .map(|(r, _)| r.to_string())
            .collect();
        assert_eq!(ids, ["!a:x"]);
    }
}
