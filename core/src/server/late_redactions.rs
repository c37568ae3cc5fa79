//! Redactions from other servers whose two halves arrive in either order (rooms v3+: a
//! redaction is applied only once both it and its target are stored and validated, and only
//! if the redacter may redact: power ≥ the room's `redact` level, or the same server as the
//! target's sender).
//!
//! - A redaction accepted before its target is remembered as pending
//!   (`pending_redactions`, with whether its sender had the power to redact then).
//! - An event arriving later is stored in its redacted form when a pending redaction of it
//!   qualifies; the pending rows for it are settled (deleted) either way.
//!
//! Everything is written in the transaction that stores the redaction or the target. Writes
//! still in flight are seen through the room head (its pending events and
//! `awaiting_redactions`), so a redaction and its target arriving at the same time from two
//! servers are still paired.

use super::*;
use crate::{power::PowerLevels, store::PendingRedaction};

/// What storing an event does about redactions whose other half came first.
#[derive(Debug, Clone, Default)]
pub(super) struct LateRedaction {
    /// The event is stored redacted, by this redaction (its `pdu` is the redacted form).
    pub redacted_by: Option<String>,
    /// Pending redactions of the event are settled (deleted) with its write.
    pub settles: bool,
    /// The event is a redaction whose target is not stored yet.
    pub awaits: Option<PendingRedaction>,
}

/// Whether a pending redaction may be applied to `target` (an event of `room_nid`).
fn qualifies(p: &PendingRedaction, room_nid: i64, target: &Pdu) -> bool {
    p.room_nid == room_nid
        && (p.power_ok || p.sender_server == target.sender.server_name().as_str())
}

impl Server {
    /// What an accepted redaction from another server does: `Ok(Some((target nid, redacted
    /// JSON)))` to apply it now, or a pending row in `late` when the target is not stored yet.
    /// `power` is the room's power levels the redaction was accepted under.
    pub(super) async fn remote_redaction(
        &self,
        room: &RoomInfo,
        head: &RoomHead,
        pdu: &Pdu,
        power: &PowerLevels,
        late: &mut LateRedaction,
    ) -> Result<Option<(i64, String)>> {
        let Some(target_id) = &pdu.redacts else {
            return Ok(None);
        };
        let redaction = PendingRedaction {
            target_event_id: target_id.to_string(),
            redaction_event_id: pdu.event_id.to_string(),
            room_nid: room.nid,
            sender_server: pdu.sender.server_name().to_string(),
            power_ok: power.can_redact(&pdu.sender),
        };
        if let Some(t) = self.event_by_id(target_id).await? {
            if t.redacted_by.is_none() && qualifies(&redaction, t.room_nid, &t.pdu) {
                let json = redact_json(&t.pdu.json, &room.rules)?;
                return Ok(Some((t.nid, json.get().to_owned())));
            }
            return Ok(None);
        }
        // A target whose write is still in flight.
        if let Some((nid, (_, t))) = head
            .pending
            .iter()
            .find(|(_, (_, p))| p.event_id == *target_id)
        {
            if !t.redacted && qualifies(&redaction, room.nid, t) {
                let json = redact_json(&t.json, &room.rules)?;
                return Ok(Some((*nid, json.get().to_owned())));
            }
            return Ok(None);
        }
        late.awaits = Some(redaction);
        Ok(None)
    }

    /// For an event from another server about to join the timeline: the redactions that were
    /// waiting for it. Returns the event as it is to be stored (redacted if one qualifies) and
    /// what to record.
    pub(super) async fn waiting_redactions(
        &self,
        room: &RoomInfo,
        head: &RoomHead,
        pdu: Arc<Pdu>,
        late: &mut LateRedaction,
    ) -> Result<Arc<Pdu>> {
        let mut waiting = if self.may_be_awaited(std::iter::once(pdu.event_id.as_str())) {
            self.store
                .pending_redactions_for(pdu.event_id.as_str())
                .await?
        } else {
            Vec::new()
        };
        waiting.extend(
            head.awaiting_redactions
                .iter()
                .filter(|(_, p)| p.target_event_id == pdu.event_id.as_str())
                .map(|(_, p)| p.clone()),
        );
        if waiting.is_empty() {
            return Ok(pdu);
        }
        late.settles = true;
        let Some(by) = waiting.iter().find(|p| qualifies(p, room.nid, &pdu)) else {
            tracing::info!(event = %pdu.event_id, "a redaction that came first may not redact it");
            return Ok(pdu);
        };
        late.redacted_by = Some(by.redaction_event_id.clone());
        Ok(Arc::new(redacted_pdu(&pdu, &room.rules)?))
    }

    /// Whether a redaction may be waiting for one of `ids` (`late_targets`).
    fn may_be_awaited<'a>(&self, mut ids: impl Iterator<Item = &'a str>) -> bool {
        let targets = self.late_targets.read().unwrap_or_else(|e| e.into_inner());
        !targets.is_empty() && ids.any(|id| targets.contains(id))
    }

    /// The redactions waiting in a room, for a batch of outliers (`store_outliers`) with
    /// event IDs `ids`; empty when none waits for one of them, which is the usual case.
    pub(super) async fn waiting_redactions_in_room<'a>(
        &self,
        room: &RoomInfo,
        ids: impl Iterator<Item = &'a str>,
    ) -> Result<Vec<PendingRedaction>> {
        if !self.may_be_awaited(ids) {
            return Ok(Vec::new());
        }
        self.store.pending_redactions_in_room(room.nid).await
    }
}

/// For an outlier about to be stored: `(redaction event ID)` of the first waiting redaction
/// that qualifies, and whether any waited for it.
pub(super) fn outlier_redaction(
    waiting: &[PendingRedaction],
    room_nid: i64,
    pdu: &Pdu,
) -> (Option<String>, bool) {
    let mut any = false;
    for p in waiting
        .iter()
        .filter(|p| p.target_event_id == pdu.event_id.as_str())
    {
        any = true;
        if qualifies(p, room_nid, pdu) {
            return (Some(p.redaction_event_id.clone()), true);
        }
    }
    (None, any)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(room_nid: i64, server: &str, power_ok: bool) -> PendingRedaction {
        PendingRedaction {
            target_event_id: "$target".into(),
            redaction_event_id: "$redaction".into(),
            room_nid,
            sender_server: server.into(),
            power_ok,
        }
    }

    fn target(sender: &str) -> Pdu {
        let json = serde_json::json!({
            "type": "m.room.message", "sender": sender, "room_id": "!r:a.example",
            "content": {"body": "hi"}, "origin_server_ts": 1, "depth": 3,
            "prev_events": [], "auth_events": [],
        });
        Pdu::parse(
            OwnedEventId::try_from("$target").unwrap(),
            OwnedRoomId::try_from("!r:a.example").unwrap(),
            RawValue::from_string(json.to_string()).unwrap(),
            false,
        )
        .unwrap()
    }

    #[test]
    fn a_redaction_qualifies_by_power_or_by_server() {
        let t = target("@carol:c.example");
        assert!(qualifies(&pending(1, "b.example", true), 1, &t));
        assert!(qualifies(&pending(1, "c.example", false), 1, &t));
        assert!(!qualifies(&pending(1, "b.example", false), 1, &t));
        assert!(
            !qualifies(&pending(2, "c.example", true), 1, &t),
            "another room"
        );
    }

    #[test]
    fn outliers_take_the_first_redaction_that_qualifies() {
        let t = target("@carol:c.example");
        let mut other = pending(1, "b.example", true);
        other.target_event_id = "$other".into();
        assert_eq!(outlier_redaction(&[other.clone()], 1, &t), (None, false));
        let no = pending(1, "b.example", false);
        assert_eq!(outlier_redaction(&[other, no.clone()], 1, &t), (None, true));
        let mut yes = pending(1, "c.example", false);
        yes.redaction_event_id = "$yes".into();
        assert_eq!(
            outlier_redaction(&[no, yes], 1, &t),
            (Some("$yes".into()), true)
        );
    }
}
