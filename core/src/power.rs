//! Power levels as the room's state defines them (`m.room.power_levels`, and in room v12 the
//! creators' unlimited power), for the checks the server makes itself beyond the auth rules
//! (who may redact others' events, who may send which event types, who may authorise
//! restricted joins).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use ruma::{events::StateEventType, room_version_rules::RoomVersionRules, UserId};
use serde::Deserialize;

use crate::pdu::Pdu;

/// A user's power: a level, or unlimited for a v12 room creator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Power {
    Level(i64),
    Creator,
}

#[derive(Debug, Default, Deserialize)]
struct Content {
    #[serde(default)]
    users: BTreeMap<String, serde_json::Value>,
    users_default: Option<serde_json::Value>,
    events: Option<BTreeMap<String, serde_json::Value>>,
    events_default: Option<serde_json::Value>,
    state_default: Option<serde_json::Value>,
    redact: Option<serde_json::Value>,
    invite: Option<serde_json::Value>,
}

fn int(v: &Option<serde_json::Value>, default: i64) -> i64 {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_i64().unwrap_or(default),
        Some(serde_json::Value::String(s)) => s.parse().unwrap_or(default),
        _ => default,
    }
}

/// The room's power levels.
#[derive(Debug, Default)]
pub struct PowerLevels {
    content: Content,
    privileged_creators: bool,
    creators: Vec<String>,
}

impl PowerLevels {
    /// From the power levels and create events among the events the auth rules consult.
    pub fn from_auth(
        auth: &HashMap<(StateEventType, String), Arc<Pdu>>,
        rules: &RoomVersionRules,
    ) -> Self {
        let get = |ty: StateEventType| auth.get(&(ty, String::new())).map(|p| &**p);
        Self::from_state(
            get(StateEventType::RoomPowerLevels),
            get(StateEventType::RoomCreate),
            rules,
        )
    }

    pub fn from_state(pl: Option<&Pdu>, create: Option<&Pdu>, rules: &RoomVersionRules) -> Self {
        let content: Content = pl
            .and_then(|p| serde_json::from_str(p.content.get()).ok())
            .unwrap_or_default();
        let mut creators = Vec::new();
        if let Some(c) = create {
            if rules.authorization.explicitly_privilege_room_creators {
                creators.push(c.sender.to_string());
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(c.content.get()) {
                    if let Some(extra) = v.get("additional_creators").and_then(|a| a.as_array()) {
                        creators.extend(extra.iter().filter_map(|u| u.as_str().map(str::to_owned)));
                    }
                }
            } else if pl.is_none() {
                // Without a power-levels event the creator has level 100.
                creators.push(c.sender.to_string());
            }
        }
        PowerLevels {
            content,
            privileged_creators: rules.authorization.explicitly_privilege_room_creators,
            creators,
        }
    }

    pub fn user(&self, user: &UserId) -> Power {
        if self.creators.iter().any(|c| c == user.as_str()) {
            return if self.privileged_creators {
                Power::Creator
            } else {
                Power::Level(100)
            };
        }
        Power::Level(
            self.content
                .users
                .get(user.as_str())
                .map(|v| int(&Some(v.clone()), 0))
                .unwrap_or_else(|| int(&self.content.users_default, 0)),
        )
    }

    fn at_least(&self, user: &UserId, level: i64) -> bool {
        match self.user(user) {
            Power::Creator => true,
            Power::Level(l) => l >= level,
        }
    }

    pub fn can_redact(&self, user: &UserId) -> bool {
        self.at_least(user, int(&self.content.redact, 50))
    }

    /// Whether `user` may invite others (the `invite` level, 0 by default).
    pub fn can_invite(&self, user: &UserId) -> bool {
        self.at_least(user, int(&self.content.invite, 0))
    }

    /// Whether `user` may send an event of this type (state or not).
    pub fn can_send(&self, user: &UserId, event_type: &str, is_state: bool) -> bool {
        let level = self
            .content
            .events
            .as_ref()
            .and_then(|e| e.get(event_type))
            .map(|v| int(&Some(v.clone()), 0))
            .unwrap_or_else(|| {
                if is_state {
                    int(&self.content.state_default, 50)
                } else {
                    int(&self.content.events_default, 0)
                }
            });
        self.at_least(user, level)
    }
}
