//! Room summaries and the published room directory, shared by the client API
//! (`/publicRooms`, `/hierarchy`) and federation (`/publicRooms`, `/hierarchy`).
//!
//! A [`RoomSummary`] is read from a room's current state. The directory
//! ([`Server::public_rooms`]) lists the published rooms, filtered by a search term and room
//! types, ordered by joined member count (largest first), then room ID, in pages whose tokens
//! are `o<offset>` into that list.

use serde::Deserialize;
use serde_json::{json, Map, Value};

use std::collections::HashMap;

use crate::{server::RoomInfo, state::StateMap, Error, Result, Server};

/// Rooms per `publicRooms` page when no (or a non-positive) limit is asked for, and the most
/// one page holds.
const MAX_PUBLIC_ROOMS_PAGE: usize = 500;

/// What a room looks like from outside (spec: `PublicRoomsChunk`, `RoomSummary`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoomSummary {
    pub room_id: String,
    pub name: Option<String>,
    pub topic: Option<String>,
    pub canonical_alias: Option<String>,
    pub avatar_url: Option<String>,
    pub join_rule: Option<String>,
    pub room_type: Option<String>,
    pub world_readable: bool,
    pub guest_can_join: bool,
    pub num_joined_members: usize,
    pub room_version: String,
    /// The encryption algorithm, for an encrypted room.
    pub encryption: Option<String>,
    /// The rooms a `restricted` or `knock_restricted` join rule names.
    pub allowed_room_ids: Vec<String>,
}

impl RoomSummary {
    /// The `publicRooms` chunk entry (absent fields omitted).
    pub fn chunk_json(&self) -> Value {
        let mut out = Map::new();
        out.insert("room_id".into(), json!(self.room_id));
        out.insert("num_joined_members".into(), json!(self.num_joined_members));
        out.insert("world_readable".into(), json!(self.world_readable));
        out.insert("guest_can_join".into(), json!(self.guest_can_join));
        for (k, v) in [
            ("name", &self.name),
            ("topic", &self.topic),
            ("canonical_alias", &self.canonical_alias),
            ("avatar_url", &self.avatar_url),
            ("join_rule", &self.join_rule),
            ("room_type", &self.room_type),
        ] {
            if let Some(v) = v {
                out.insert(k.into(), json!(v));
            }
        }
        Value::Object(out)
    }

    /// The `RoomSummary` of the space hierarchy: the chunk entry with the room version,
    /// encryption and the rooms a restricted join rule names.
    pub fn summary_json(&self) -> Value {
        let mut out = self.chunk_json();
        out["room_version"] = json!(self.room_version);
        if let Some(e) = &self.encryption {
            out["encryption"] = json!(e);
        }
        if !self.allowed_room_ids.is_empty() {
            out["allowed_room_ids"] = json!(self.allowed_room_ids);
        }
        out
    }

    /// Whether the room's name, topic or canonical alias contains `term` (case-insensitive).
    pub fn matches_term(&self, term: &str) -> bool {
        let term = term.trim().to_lowercase();
        if term.is_empty() {
            return true;
        }
        [&self.name, &self.topic, &self.canonical_alias]
            .into_iter()
            .flatten()
            .any(|s| s.to_lowercase().contains(&term))
    }

    /// Whether the room's type is in `types` (`None` standing for rooms without a type).
    pub fn matches_types(&self, types: &[Option<String>]) -> bool {
        types.is_empty() || types.contains(&self.room_type)
    }
}

/// The rooms an `allow` list of a join rule names (`m.room_membership` entries).
pub fn allowed_rooms(join_rules: &Value) -> Vec<String> {
    join_rules
        .get("allow")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|a| a.get("type").and_then(Value::as_str) == Some("m.room_membership"))
        .filter_map(|a| a.get("room_id").and_then(Value::as_str))
        .map(str::to_owned)
        .collect()
}

/// What a `publicRooms` request asks for.
#[derive(Debug, Clone, Default)]
pub struct PublicRoomsQuery {
    /// Rooms per page; `None` or ≤ 0 for the largest page.
    pub limit: Option<i64>,
    pub since: Option<String>,
    pub term: Option<String>,
    pub room_types: Vec<Option<String>>,
    pub include_all_networks: bool,
    pub third_party_instance_id: Option<String>,
}

impl PublicRoomsQuery {
    /// Only a third-party network was asked for; Myelin bridges none, so nothing is in it.
    pub fn third_party_only(&self) -> bool {
        !self.include_all_networks && self.third_party_instance_id.is_some()
    }
}

/// The `limit` query parameter of `GET /publicRooms` (absent or empty: none).
pub fn parse_limit(limit: Option<&str>) -> Result<Option<i64>> {
    match limit {
        None | Some("") => Ok(None),
        Some(l) => l
            .parse::<i64>()
            .map(Some)
            .map_err(|_| Error::invalid_param("Invalid limit")),
    }
}

/// The body of `POST /publicRooms`, the same in the Client-Server and Server-Server APIs.
#[derive(Debug, Default, Deserialize)]
pub struct PublicRoomsBody {
    limit: Option<i64>,
    since: Option<String>,
    filter: Option<PublicRoomsFilter>,
    #[serde(default)]
    include_all_networks: bool,
    third_party_instance_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct PublicRoomsFilter {
    generic_search_term: Option<String>,
    room_types: Option<Vec<Option<String>>>,
}

impl From<PublicRoomsBody> for PublicRoomsQuery {
    fn from(b: PublicRoomsBody) -> Self {
        let filter = b.filter.unwrap_or_default();
        PublicRoomsQuery {
            limit: b.limit,
            since: b.since,
            term: filter.generic_search_term,
            room_types: filter.room_types.unwrap_or_default(),
            include_all_networks: b.include_all_networks,
            third_party_instance_id: b.third_party_instance_id,
        }
    }
}

/// A `publicRooms` pagination token: the offset of the batch it asks for.
fn encode_token(offset: usize) -> String {
    format!("o{offset}")
}

fn decode_token(token: &str) -> Option<usize> {
    token.strip_prefix('o')?.parse().ok()
}

/// The page `[start, end)` of `total` entries and its `(next_batch, prev_batch)` offsets.
fn page(total: usize, start: usize, limit: usize) -> (usize, usize, Option<usize>, Option<usize>) {
    let start = start.min(total);
    let end = start.saturating_add(limit).min(total);
    let next = (end < total).then_some(end);
    let prev = (start > 0).then(|| start.saturating_sub(limit));
    (start, end, next, prev)
}

impl Server {
    /// The summary of a room we hold the state of, from its current state.
    pub async fn directory_summary(&self, room: &RoomInfo) -> Result<RoomSummary> {
        let state = self.current_state(room).await?;
        let members = self.members(room.nid).await?;
        self.summary_in(room, &state, &members).await
    }

    /// The summary of a room from its current `state` and `members` (`user → membership`).
    pub async fn summary_in(
        &self,
        room: &RoomInfo,
        state: &StateMap,
        members: &HashMap<String, String>,
    ) -> Result<RoomSummary> {
        let nonempty = |s: Option<String>| s.filter(|s| !s.is_empty());
        let num_joined_members = members.values().filter(|m| m.as_str() == "join").count();
        let room_type = self.state_field(state, "m.room.create", "type").await?;
        let join_rules = self
            .state_event(state, "m.room.join_rules", "")
            .await?
            .map(|e| e.pdu.content_value());
        let join_rule = join_rules
            .as_ref()
            .and_then(|c| c.get("join_rule"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let allowed_room_ids = match join_rule.as_deref() {
            Some("restricted" | "knock_restricted") => {
                join_rules.as_ref().map(allowed_rooms).unwrap_or_default()
            }
            _ => Vec::new(),
        };
        let history = self
            .state_field(state, "m.room.history_visibility", "history_visibility")
            .await?;
        let guest = self
            .state_field(state, "m.room.guest_access", "guest_access")
            .await?;
        Ok(RoomSummary {
            room_id: room.room_id.to_string(),
            name: nonempty(self.state_field(state, "m.room.name", "name").await?),
            topic: nonempty(self.state_field(state, "m.room.topic", "topic").await?),
            canonical_alias: nonempty(
                self.state_field(state, "m.room.canonical_alias", "alias")
                    .await?,
            ),
            avatar_url: nonempty(self.state_field(state, "m.room.avatar", "url").await?),
            join_rule,
            room_type,
            world_readable: history.as_deref() == Some("world_readable"),
            guest_can_join: guest.as_deref() == Some("can_join"),
            num_joined_members,
            room_version: room.version.to_string(),
            encryption: self
                .state_field(state, "m.room.encryption", "algorithm")
                .await?,
            allowed_room_ids,
        })
    }

    /// A page of this server's published room directory (client and federation
    /// `publicRooms`): `{chunk, next_batch?, prev_batch?, total_room_count_estimate}`.
    pub async fn public_rooms(&self, q: PublicRoomsQuery) -> Result<Value> {
        let start = match q.since.as_deref() {
            None | Some("") => 0,
            Some(t) => {
                decode_token(t).ok_or_else(|| Error::invalid_param("Invalid since token"))?
            }
        };
        let limit = match q.limit {
            Some(l) if l > 0 => usize::try_from(l)
                .unwrap_or(MAX_PUBLIC_ROOMS_PAGE)
                .min(MAX_PUBLIC_ROOMS_PAGE),
            _ => MAX_PUBLIC_ROOMS_PAGE,
        };
        let mut rooms = Vec::new();
        if !q.third_party_only() {
            for row in self.store.public_rooms().await? {
                let room = self.room_by_nid(row.room_nid).await?;
                if !self.has_state(&room).await? {
                    continue;
                }
                let entry = self.directory_summary(&room).await?;
                if q.term.as_deref().is_none_or(|t| entry.matches_term(t))
                    && entry.matches_types(&q.room_types)
                {
                    rooms.push(entry);
                }
            }
        }
        rooms.sort_by(|a, b| {
            b.num_joined_members
                .cmp(&a.num_joined_members)
                .then_with(|| a.room_id.cmp(&b.room_id))
        });
        let (start, end, next, prev) = page(rooms.len(), start, limit);
        let mut out = json!({
            "chunk": rooms[start..end].iter().map(RoomSummary::chunk_json).collect::<Vec<_>>(),
            "total_room_count_estimate": rooms.len(),
        });
        if let Some(n) = next {
            out["next_batch"] = json!(encode_token(n));
        }
        if let Some(p) = prev {
            out["prev_batch"] = json!(encode_token(p));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        for n in [0, 1, 20, 123_456] {
            assert_eq!(decode_token(&encode_token(n)), Some(n));
        }
        for bad in ["", "o", "x5", "o-1", "ofive", "5"] {
            assert_eq!(decode_token(bad), None, "{bad}");
        }
    }

    #[test]
    fn pages_walk_forwards_and_backwards() {
        assert_eq!(page(5, 0, 2), (0, 2, Some(2), None));
        assert_eq!(page(5, 2, 2), (2, 4, Some(4), Some(0)));
        assert_eq!(page(5, 4, 2), (4, 5, None, Some(2)));
        assert_eq!(page(5, 1, 2), (1, 3, Some(3), Some(0)));
        assert_eq!(page(5, 9, 2), (5, 5, None, Some(3)));
        assert_eq!(page(0, 0, 10), (0, 0, None, None));
        assert_eq!(page(3, 0, usize::MAX), (0, 3, None, None));
    }

    fn room() -> RoomSummary {
        RoomSummary {
            room_id: "!r:x".into(),
            name: Some("Cheese Lovers".into()),
            topic: Some("All about Brie".into()),
            canonical_alias: Some("#fromage:x".into()),
            ..Default::default()
        }
    }

    #[test]
    fn search_matches_name_topic_alias_case_insensitively() {
        let r = room();
        assert!(r.matches_term("cheese"));
        assert!(r.matches_term("BRIE"));
        assert!(r.matches_term("fromage"));
        assert!(r.matches_term("  "));
        assert!(!r.matches_term("wine"));
        assert!(!RoomSummary::default().matches_term("x"));
    }

    #[test]
    fn room_types_filter() {
        let mut r = room();
        assert!(r.matches_types(&[]));
        assert!(r.matches_types(&[None]));
        assert!(!r.matches_types(&[Some("m.space".into())]));
        r.room_type = Some("m.space".into());
        assert!(r.matches_types(&[None, Some("m.space".into())]));
        assert!(!r.matches_types(&[None]));
    }

    #[test]
    fn entries_omit_absent_fields() {
        let v = RoomSummary {
            room_id: "!r:x".into(),
            num_joined_members: 3,
            room_version: "12".into(),
            ..Default::default()
        };
        assert_eq!(
            v.chunk_json(),
            json!({"room_id": "!r:x", "num_joined_members": 3, "world_readable": false,
                   "guest_can_join": false})
        );
        assert_eq!(
            v.summary_json(),
            json!({"room_id": "!r:x", "num_joined_members": 3, "world_readable": false,
                   "guest_can_join": false, "room_version": "12"})
        );
        assert_eq!(room().chunk_json()["canonical_alias"], "#fromage:x");
    }

    #[test]
    fn restricted_rules_name_their_rooms() {
        let rules = json!({"join_rule": "restricted", "allow": [
            {"type": "m.room_membership", "room_id": "!a:x"},
            {"type": "m.other", "room_id": "!b:x"},
            {"type": "m.room_membership"},
        ]});
        assert_eq!(allowed_rooms(&rules), vec!["!a:x".to_owned()]);
        assert!(allowed_rooms(&json!({"join_rule": "public"})).is_empty());
    }
}
