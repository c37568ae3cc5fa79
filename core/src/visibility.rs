//! History visibility (spec § "History visibility"): which room events a user may see, from the
//! room's `m.room.history_visibility` and the user's membership at each event.

use std::{collections::HashMap, sync::Arc};

use crate::{server::StoredEvent, Result, Server};

impl Server {
    /// The history visibility and `user`'s membership in force at a state group.
    async fn visibility_at(&self, group: i64, user: &str) -> Result<(String, Option<String>)> {
        let state = self.state_map(group).await?;
        let hv = self
            .state_event(&state, "m.room.history_visibility", "")
            .await?
            .and_then(|e| e.pdu.content_str("history_visibility"))
            .unwrap_or_else(|| "shared".to_owned());
        let membership = self.membership_in(&state, user).await?;
        Ok((hv, membership))
    }

    /// Keeps the events `user` may see. `current` is the user's current membership in the room.
    pub async fn filter_visible(
        &self,
        user: &str,
        current: Option<&str>,
        events: Vec<Arc<StoredEvent>>,
    ) -> Result<Vec<Arc<StoredEvent>>> {
        let mut memo: HashMap<i64, bool> = HashMap::new();
        let mut out = Vec::with_capacity(events.len());
        for ev in events {
            // A user's own membership event is judged by the state after it.
            let own = ev.pdu.kind == ruma::events::TimelineEventType::RoomMember
                && ev.pdu.state_key.as_deref() == Some(user);
            let group = if own { ev.state_after } else { ev.state_before };
            let Some(group) = group else { continue };
            let ok = match memo.get(&group) {
                Some(v) => *v,
                None => {
                    let (hv, at) = if group == 0 {
                        ("shared".to_owned(), None)
                    } else {
                        self.visibility_at(group, user).await?
                    };
                    let v = match (hv.as_str(), at.as_deref()) {
                        ("world_readable", _) => true,
                        (_, Some("join")) => true,
                        ("shared", _) => current == Some("join"),
                        ("invited", Some("invite")) => true,
                        _ => false,
                    };
                    memo.insert(group, v);
                    v
                }
            };
            if ok || own {
                out.push(ev);
            }
        }
        Ok(out)
    }

    /// Whether `user` may see one event.
    pub async fn can_see_event(&self, user: &str, ev: &Arc<StoredEvent>) -> Result<bool> {
        let current = self
            .store
            .membership(ev.room_nid, user)
            .await?
            .map(|m| m.membership);
        Ok(!self
            .filter_visible(user, current.as_deref(), vec![ev.clone()])
            .await?
            .is_empty())
    }
}
