//! Restricted rooms (room versions 8+, `knock_restricted` from 10; spec § "Restricted rooms"):
//! a user who is neither invited nor joined may join when they are joined to one of the rooms
//! the join rule's `allow` list names. The join event then carries
//! `join_authorised_via_users_server`: a user of the resident server who may invite, and whose
//! server signs the join. This module decides, for a room we are in, whether a join needs that
//! and which of our users can vouch for it.

use ruma::{OwnedRoomId, OwnedUserId, UserId};

use super::Server;
use crate::{Error, ErrorKind, Result, RoomInfo};

/// What a join of a room takes, as far as restricted join rules go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinAuthorisation {
    /// Nothing: the room is not restricted, or the user is invited or already joined.
    NotNeeded,
    /// The join must name this user of ours in `join_authorised_via_users_server`.
    By(OwnedUserId),
}

impl Server {
    /// Whether `user` may join `room` under its restricted join rule and, if so, which of our
    /// users authorises it. Errors: the user is in none of the allowed rooms (403
    /// `M_FORBIDDEN`), we are in none of them and cannot tell (`M_UNABLE_TO_AUTHORISE_JOIN`),
    /// or no joined user of ours has the power to invite (`M_UNABLE_TO_GRANT_JOIN`).
    pub async fn join_authorisation(
        &self,
        room: &RoomInfo,
        user: &UserId,
    ) -> Result<JoinAuthorisation> {
        let auth = &room.rules.authorization;
        let state = self.current_state(room).await?;
        let Some(join_rules) = self.state_event(&state, "m.room.join_rules", "").await? else {
            return Ok(JoinAuthorisation::NotNeeded);
        };
        let content = join_rules.pdu.content_value();
        let rule = content.get("join_rule").and_then(|r| r.as_str());
        let restricted = match rule {
            Some("restricted") => auth.restricted_join_rule,
            Some("knock_restricted") => auth.knock_restricted_join_rule,
            _ => false,
        };
        if !restricted {
            return Ok(JoinAuthorisation::NotNeeded);
        }
        let members = self.members(room.nid).await?;
        if matches!(
            members.get(user.as_str()).map(String::as_str),
            Some("join" | "invite")
        ) {
            return Ok(JoinAuthorisation::NotNeeded);
        }
        let allowed: Vec<OwnedRoomId> = crate::directory::allowed_rooms(&content)
            .into_iter()
            .filter_map(|r| OwnedRoomId::try_from(r).ok())
            .collect();
        let mut known_any = false;
        let mut qualifies = false;
        for allowed_room in &allowed {
            let Some(other) = self.room(allowed_room).await? else {
                continue;
            };
            if !self.is_resident(other.nid).await? {
                continue; // We are not in it: what we know of it may be stale.
            }
            known_any = true;
            let other_members = self.members(other.nid).await?;
            if other_members.get(user.as_str()).map(String::as_str) == Some("join") {
                qualifies = true;
                break;
            }
        }
        if !qualifies {
            return Err(if known_any || allowed.is_empty() {
                Error::forbidden("You are not a member of any room this room's join rule allows")
            } else {
                Error::new(
                    ErrorKind::UnableToAuthoriseJoin,
                    "This server is in none of the rooms the join rule allows",
                )
            });
        }
        let power = self.power_levels(room, &state).await?;
        let suffix = format!(":{}", self.server_name());
        let mut candidates: Vec<OwnedUserId> = members
            .iter()
            .filter(|(u, m)| m.as_str() == "join" && u.ends_with(&suffix))
            .filter_map(|(u, _)| OwnedUserId::try_from(u.as_str()).ok())
            .filter(|u| power.can_invite(u))
            .collect();
        // The same user every time, for a stable choice.
        candidates.sort();
        match candidates.into_iter().next() {
            Some(by) => Ok(JoinAuthorisation::By(by)),
            None => Err(Error::new(
                ErrorKind::UnableToGrantJoin,
                "No user of this server in the room may invite",
            )),
        }
    }
}
