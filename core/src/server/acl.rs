//! Server access control lists (`m.room.server_acl`; spec § "Server Access Control Lists"):
//! whether a room's current state lets a server take part. The Server-Server API applies it to
//! the origin of every request about the room and to every PDU of a transaction.

use ruma::{events::room::server_acl::RoomServerAclEventContent, ServerName};

use super::Server;
use crate::{Result, RoomInfo};

impl Server {
    /// Whether `server` may take part in `room` under its current server ACL (allowed when the
    /// room has none). An ACL whose content does not parse is ignored, with a warning.
    pub async fn server_acl_allows(&self, room: &RoomInfo, server: &ServerName) -> Result<bool> {
        let state = self.current_state(room).await?;
        let Some(acl) = self.state_event(&state, "m.room.server_acl", "").await? else {
            return Ok(true);
        };
        match serde_json::from_str::<RoomServerAclEventContent>(acl.pdu.content.get()) {
            Ok(content) => Ok(content.is_allowed(server)),
            Err(e) => {
                tracing::warn!(room = %room.room_id, event = %acl.pdu.event_id, "ignoring a malformed server ACL: {e}");
                Ok(true)
            }
        }
    }
}
