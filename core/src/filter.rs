//! Event filters (spec § "Filtering"): the subset of `Filter` / `RoomEventFilter` a server
//! applies — types and senders (with `*` wildcards), rooms, limits, `lazy_load_members`,
//! `include_leave`, `contains_url`. Parsed leniently: unknown fields are ignored.

use serde::Deserialize;

use crate::pdu::Pdu;

/// A `RoomEventFilter` / `EventFilter`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct EventFilter {
    pub limit: Option<u64>,
    pub types: Option<Vec<String>>,
    pub not_types: Vec<String>,
    pub senders: Option<Vec<String>>,
    pub not_senders: Vec<String>,
    pub rooms: Option<Vec<String>>,
    pub not_rooms: Vec<String>,
    pub contains_url: Option<bool>,
    pub lazy_load_members: bool,
    pub include_redundant_members: bool,
    /// Unread counts per thread (`unread_thread_notifications` of a joined room).
    pub unread_thread_notifications: bool,
}

/// The `room` part of a filter.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct RoomFilter {
    pub rooms: Option<Vec<String>>,
    pub not_rooms: Vec<String>,
    pub include_leave: bool,
    pub timeline: EventFilter,
    pub state: EventFilter,
    pub ephemeral: EventFilter,
    pub account_data: EventFilter,
}

/// A whole sync filter.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Filter {
    pub event_fields: Option<Vec<String>>,
    pub account_data: EventFilter,
    pub presence: EventFilter,
    pub room: RoomFilter,
}

/// Glob match with `*` as the only wildcard, as filters use.
pub fn glob(pattern: &str, value: &str) -> bool {
    if !pattern.contains('*') {
        return pattern == value;
    }
    let parts: Vec<&str> = pattern.split('*').collect();
    let mut rest = value;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            match rest.strip_prefix(part) {
                Some(r) => rest = r,
                None => return false,
            }
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(pos) => rest = &rest[pos + part.len()..],
                None => return false,
            }
        }
    }
    true
}

impl EventFilter {
    /// Whether an event of this type from this sender passes.
    pub fn allows_type_sender(&self, event_type: &str, sender: &str) -> bool {
        if self.not_types.iter().any(|t| glob(t, event_type)) {
            return false;
        }
        if let Some(types) = &self.types {
            if !types.iter().any(|t| glob(t, event_type)) {
                return false;
            }
        }
        if self.not_senders.iter().any(|s| s == sender) {
            return false;
        }
        if let Some(senders) = &self.senders {
            if !senders.iter().any(|s| s == sender) {
                return false;
            }
        }
        true
    }

    pub fn allows_room(&self, room_id: &str) -> bool {
        !self.not_rooms.iter().any(|r| r == room_id)
            && self
                .rooms
                .as_ref()
                .is_none_or(|rs| rs.iter().any(|r| r == room_id))
    }

    /// Whether a room event passes.
    pub fn allows(&self, pdu: &Pdu) -> bool {
        if !self.allows_type_sender(&pdu.kind.to_string(), pdu.sender.as_str()) {
            return false;
        }
        if let Some(want_url) = self.contains_url {
            let has = pdu
                .content_value()
                .get("url")
                .is_some_and(|u| u.is_string());
            if has != want_url {
                return false;
            }
        }
        true
    }
}

impl RoomFilter {
    pub fn allows_room(&self, room_id: &str) -> bool {
        !self.not_rooms.iter().any(|r| r == room_id)
            && self
                .rooms
                .as_ref()
                .is_none_or(|rs| rs.iter().any(|r| r == room_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("m.*", "m.room.message"));
        assert!(glob("*", "x"));
        assert!(glob("m.room.*.x", "m.room.a.x"));
        assert!(!glob("m.room.*.x", "m.room.a.y"));
        assert!(glob("m.room.message", "m.room.message"));
        assert!(!glob("m.room.message", "m.room.messages"));
    }

    #[test]
    fn types_and_senders() {
        let f: EventFilter = serde_json::from_value(serde_json::json!({
            "types": ["m.room.*"], "not_types": ["m.room.member"], "not_senders": ["@spam:x"]
        }))
        .unwrap();
        assert!(f.allows_type_sender("m.room.message", "@a:x"));
        assert!(!f.allows_type_sender("m.room.member", "@a:x"));
        assert!(!f.allows_type_sender("m.reaction", "@a:x"));
        assert!(!f.allows_type_sender("m.room.message", "@spam:x"));
        let senders: EventFilter =
            serde_json::from_value(serde_json::json!({"senders": ["@a:x"]})).unwrap();
        assert!(senders.allows_type_sender("anything", "@a:x"));
        assert!(!senders.allows_type_sender("anything", "@b:x"));
    }

    #[test]
    fn rooms() {
        let f: RoomFilter = serde_json::from_value(serde_json::json!({
            "rooms": ["!a:x", "!b:x"], "not_rooms": ["!b:x"]
        }))
        .unwrap();
        assert!(f.allows_room("!a:x"));
        assert!(!f.allows_room("!b:x"));
        assert!(!f.allows_room("!c:x"));
    }
}
