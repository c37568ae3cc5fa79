//! Spaces (spec § "Spaces"): a room's `m.space.child` links and whether a user or another
//! server may see a room in a space hierarchy.
//!
//! [`Server::space_room`] is the one function behind both `/hierarchy` endpoints: for a room
//! we hold the state of, it says whether the requester (a local user, or another server) may
//! see it and gives its summary with its valid child links in the spec's order. The client
//! endpoint walks the tree with it (asking other servers for rooms we are not in, and judging
//! their answers with [`Server::may_see_remote`]); the federation endpoint answers one level
//! with [`Server::federation_hierarchy`].

use std::{cmp::Ordering, collections::HashMap};

use ruma::{OwnedRoomId, OwnedServerName, RoomId, ServerName, UserId};
use serde_json::{json, Value};

use crate::{directory::RoomSummary, server::RoomInfo, Result, Server};

/// Who asks to see a room.
#[derive(Debug, Clone, Copy)]
pub enum Requester<'a> {
    User(&'a UserId),
    Server(&'a ServerName),
}

/// One valid `m.space.child` link of a space.
#[derive(Debug, Clone, PartialEq)]
pub struct SpaceChild {
    pub room_id: OwnedRoomId,
    pub via: Vec<OwnedServerName>,
    pub suggested: bool,
    /// A valid `order` (≤ 50 characters in `\x20`–`\x7E`).
    pub order: Option<String>,
    pub origin_server_ts: u64,
    /// The event as stripped state with `origin_server_ts` (for `children_state`).
    pub stripped: Value,
}

/// A link from a child event's parts, if valid: the state key is a room ID and `via` lists
/// at least one valid server name.
pub fn space_child(
    state_key: &str,
    content: &Value,
    sender: &str,
    origin_server_ts: u64,
) -> Option<SpaceChild> {
    let room_id = OwnedRoomId::try_from(state_key).ok()?;
    let via: Vec<OwnedServerName> = content
        .get("via")?
        .as_array()?
        .iter()
        .filter_map(Value::as_str)
        .filter_map(|s| OwnedServerName::try_from(s).ok())
        .collect();
    if via.is_empty() {
        return None;
    }
    let order = content
        .get("order")
        .and_then(Value::as_str)
        .filter(|o| o.chars().count() <= 50 && o.chars().all(|c| (' '..='~').contains(&c)))
        .map(str::to_owned);
    Some(SpaceChild {
        room_id,
        via,
        suggested: content.get("suggested").and_then(Value::as_bool) == Some(true),
        order,
        origin_server_ts,
        stripped: json!({
            "type": "m.space.child",
            "state_key": state_key,
            "content": content,
            "sender": sender,
            "origin_server_ts": origin_server_ts,
        }),
    })
}

/// The spec's order of a space's children: valid `order` first (by code point), then by the
/// child event's timestamp, then by room ID.
pub fn order_children(children: &mut [SpaceChild]) {
    children.sort_by(|a, b| {
        let by_order = match (&a.order, &b.order) {
            (Some(x), Some(y)) => x.cmp(y),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        };
        by_order
            .then(a.origin_server_ts.cmp(&b.origin_server_ts))
            .then_with(|| a.room_id.cmp(&b.room_id))
    });
}

/// A room as one entry of a hierarchy: its summary and (for a space) its child links.
#[derive(Debug, Clone)]
pub struct SpaceRoom {
    pub summary: RoomSummary,
    pub children: Vec<SpaceChild>,
}

impl SpaceRoom {
    /// The entry as the hierarchy endpoints show it: the summary with `children_state`.
    pub fn to_json(&self) -> Value {
        let mut out = self.summary.summary_json();
        out["children_state"] = json!(self
            .children
            .iter()
            .map(|c| c.stripped.clone())
            .collect::<Vec<_>>());
        out
    }
}

/// Whether a requester may see a room in a hierarchy.
#[derive(Debug, Clone)]
pub enum SpaceEntry {
    /// We do not hold the room's state.
    Unknown,
    /// We do, but the requester may not peek or join it.
    Inaccessible,
    Accessible(Box<SpaceRoom>),
}

/// Whether a join rule lets anyone see the room from outside (public, or one may knock on
/// it), or the room is world-readable.
fn open_to_all(summary: &RoomSummary, knocking: bool, knock_restricted: bool) -> bool {
    summary.world_readable
        || match summary.join_rule.as_deref() {
            Some("public") => true,
            Some("knock") => knocking,
            Some("knock_restricted") => knock_restricted,
            _ => false,
        }
}

impl Server {
    /// A room's place in a space hierarchy as `requester` may see it: unknown, inaccessible,
    /// or its summary with its valid child links (only a space has them; with
    /// `suggested_only`, only the suggested ones), in the spec's order.
    pub async fn space_room(
        &self,
        room_id: &RoomId,
        requester: Requester<'_>,
        suggested_only: bool,
    ) -> Result<SpaceEntry> {
        let Some(room) = self.room(room_id).await? else {
            return Ok(SpaceEntry::Unknown);
        };
        if !self.has_state(&room).await? {
            return Ok(SpaceEntry::Unknown);
        }
        let state = self.current_state(&room).await?;
        let members = self.members(room.nid).await?;
        let summary = self.summary_in(&room, &state, &members).await?;
        if !self.may_see(&room, &summary, &members, requester).await? {
            return Ok(SpaceEntry::Inaccessible);
        }
        let mut children = Vec::new();
        if summary.room_type.as_deref() == Some("m.space") {
            for ev in self.state_events(&state).await? {
                if ev.pdu.kind.to_string() != "m.space.child" {
                    continue;
                }
                let Some(sk) = ev.pdu.state_key.as_deref() else {
                    continue;
                };
                let child = space_child(
                    sk,
                    &ev.pdu.content_value(),
                    ev.pdu.sender.as_str(),
                    u64::from(ev.pdu.origin_server_ts.0),
                );
                if let Some(c) = child.filter(|c| c.suggested || !suggested_only) {
                    children.push(c);
                }
            }
            order_children(&mut children);
        }
        Ok(SpaceEntry::Accessible(Box::new(SpaceRoom {
            summary,
            children,
        })))
    }

    /// The spec's rules for who may see a room in a hierarchy. A user: joined or invited,
    /// a public or knockable or world-readable room, or a restricted one whose condition they
    /// meet (joined to an allowed room), and never when banned unless world-readable. Another
    /// server: one of its users is joined or invited, the room is open to all, or it is
    /// restricted and the server has a user joined to an allowed room.
    async fn may_see(
        &self,
        room: &RoomInfo,
        summary: &RoomSummary,
        members: &HashMap<String, String>,
        requester: Requester<'_>,
    ) -> Result<bool> {
        let auth = &room.rules.authorization;
        match requester {
            Requester::User(user) => {
                let membership = members.get(user.as_str()).map(String::as_str);
                if membership == Some("ban") {
                    return Ok(summary.world_readable);
                }
                if matches!(membership, Some("join" | "invite"))
                    || open_to_all(summary, auth.knocking, auth.knock_restricted_join_rule)
                {
                    return Ok(true);
                }
                self.joined_any(user, &summary.allowed_room_ids).await
            }
            Requester::Server(origin) => {
                let suffix = format!(":{origin}");
                if members
                    .iter()
                    .any(|(u, m)| u.ends_with(&suffix) && (m == "join" || m == "invite"))
                    || open_to_all(summary, auth.knocking, auth.knock_restricted_join_rule)
                {
                    return Ok(true);
                }
                self.any_room_where(&summary.allowed_room_ids, |m| {
                    m.iter().any(|(u, s)| u.ends_with(&suffix) && s == "join")
                })
                .await
            }
        }
    }

    /// Whether `user` is joined to any of `rooms` here.
    async fn joined_any(&self, user: &UserId, rooms: &[String]) -> Result<bool> {
        self.any_room_where(rooms, |m| {
            m.get(user.as_str()).map(String::as_str) == Some("join")
        })
        .await
    }

    /// Whether the members (`user → membership`) of any of `rooms` that we know satisfy
    /// `test`.
    async fn any_room_where(
        &self,
        rooms: &[String],
        test: impl Fn(&HashMap<String, String>) -> bool,
    ) -> Result<bool> {
        for allowed in rooms {
            let Ok(id) = OwnedRoomId::try_from(allowed.as_str()) else {
                continue;
            };
            if let Some(r) = self.room(&id).await? {
                if test(&*self.members(r.nid).await?) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Whether `user` may see a room another server described (a `RoomSummary` from its
    /// `/hierarchy`): open to all, or restricted with the user joined to an allowed room here,
    /// or the user is joined or invited as far as we know.
    pub async fn may_see_remote(&self, user: &UserId, summary: &Value) -> Result<bool> {
        let join_rule = summary.get("join_rule").and_then(Value::as_str);
        let world_readable = summary.get("world_readable").and_then(Value::as_bool) == Some(true);
        if world_readable || matches!(join_rule, Some("public" | "knock" | "knock_restricted")) {
            return Ok(true);
        }
        if matches!(join_rule, Some("restricted")) {
            let allowed: Vec<String> = summary
                .get("allowed_room_ids")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect();
            if self.joined_any(user, &allowed).await? {
                return Ok(true);
            }
        }
        let Some(room_id) = summary
            .get("room_id")
            .and_then(Value::as_str)
            .and_then(|r| OwnedRoomId::try_from(r).ok())
        else {
            return Ok(false);
        };
        Ok(match self.room(&room_id).await? {
            Some(r) => matches!(
                self.store
                    .membership(r.nid, user.as_str())
                    .await?
                    .map(|m| m.membership)
                    .as_deref(),
                Some("join" | "invite")
            ),
            None => false,
        })
    }

    /// The federation `/hierarchy` answer for `origin`: the room (404 when unknown or not
    /// visible to it), the children it may see that we hold the state of, and the IDs of
    /// those it may not. Children we know nothing about are left out.
    pub async fn federation_hierarchy(
        &self,
        room_id: &RoomId,
        origin: &ServerName,
        suggested_only: bool,
    ) -> Result<Value> {
        let requester = Requester::Server(origin);
        let SpaceEntry::Accessible(room) =
            self.space_room(room_id, requester, suggested_only).await?
        else {
            return Err(crate::Error::not_found(
                "Room not found or not visible to you",
            ));
        };
        let mut children = Vec::new();
        let mut inaccessible = Vec::new();
        for c in &room.children {
            match self.space_room(&c.room_id, requester, false).await? {
                SpaceEntry::Unknown => {}
                SpaceEntry::Inaccessible => inaccessible.push(c.room_id.to_string()),
                SpaceEntry::Accessible(child) => children.push(child.to_json()),
            }
        }
        Ok(json!({
            "room": room.to_json(),
            "children": children,
            "inaccessible_children": inaccessible,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn child(id: &str, order: Option<&str>, ts: u64) -> SpaceChild {
        let mut content = json!({"via": ["example.org"]});
        if let Some(o) = order {
            content["order"] = json!(o);
        }
        space_child(id, &content, "@a:example.org", ts).unwrap()
    }

    #[test]
    fn children_are_ordered_as_the_spec_says() {
        // The spec's own example.
        let mut c = vec![
            child("!b:example.org", Some(" "), 1640341000000),
            child("!a:example.org", Some("aaaa"), 1640141000000),
            child("!c:example.org", Some("first"), 1640841000000),
            child("!e:example.org", None, 1640641000000),
            child("!d:example.org", None, 1640741000000),
        ];
        c.reverse();
        order_children(&mut c);
        let ids: Vec<&str> = c.iter().map(|c| c.room_id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "!b:example.org",
                "!a:example.org",
                "!c:example.org",
                "!e:example.org",
                "!d:example.org"
            ]
        );
        // Equal order and timestamp: by room ID.
        let mut c = vec![child("!z:x", Some("a"), 5), child("!y:x", Some("a"), 5)];
        order_children(&mut c);
        assert_eq!(c[0].room_id.as_str(), "!y:x");
    }

    #[test]
    fn invalid_links_and_orders() {
        assert!(
            space_child("!r:x", &json!({}), "@a:x", 1).is_none(),
            "no via"
        );
        assert!(space_child("!r:x", &json!({"via": []}), "@a:x", 1).is_none());
        assert!(space_child("!r:x", &json!({"via": "x"}), "@a:x", 1).is_none());
        assert!(space_child("not-a-room", &json!({"via": ["x"]}), "@a:x", 1).is_none());
        let long = "a".repeat(51);
        let c = space_child("!r:x", &json!({"via": ["x"], "order": long}), "@a:x", 1).unwrap();
        assert_eq!(c.order, None, "too long an order is ignored");
        let c = space_child("!r:x", &json!({"via": ["x"], "order": "\u{7f}"}), "@a:x", 1).unwrap();
        assert_eq!(c.order, None, "outside \\x20-\\x7E");
        let c = space_child(
            "!r:x",
            &json!({"via": ["x"], "suggested": true, "order": "~"}),
            "@a:x",
            7,
        )
        .unwrap();
        assert!(c.suggested);
        assert_eq!(c.order.as_deref(), Some("~"));
        assert_eq!(c.stripped["origin_server_ts"], 7);
        assert_eq!(c.stripped["sender"], "@a:x");
    }

    #[test]
    fn open_rooms() {
        let mut s = RoomSummary {
            join_rule: Some("invite".into()),
            ..Default::default()
        };
        assert!(!open_to_all(&s, true, true));
        s.world_readable = true;
        assert!(open_to_all(&s, false, false));
        s.world_readable = false;
        s.join_rule = Some("knock".into());
        assert!(open_to_all(&s, true, false));
        assert!(
            !open_to_all(&s, false, false),
            "knock in a version without it"
        );
        s.join_rule = Some("public".into());
        assert!(open_to_all(&s, false, false));
    }
}
