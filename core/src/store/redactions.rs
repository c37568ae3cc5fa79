//! Redactions waiting for their target (migration 0005): a redaction from another server that
//! was accepted before the event it redacts arrived. Rows are written and deleted in the
//! writer's batch (`batch.rs`, with the events they belong to); this file reads them.

use sqlx::Row;

use super::Store;
use crate::Result;

/// A redaction whose target was not stored when it was accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRedaction {
    pub target_event_id: String,
    pub redaction_event_id: String,
    pub room_nid: i64,
    /// The server of the redaction's sender.
    pub sender_server: String,
    /// Whether the sender had the power to redact others' events when the redaction was
    /// accepted.
    pub power_ok: bool,
}

fn row(r: sqlx::any::AnyRow) -> PendingRedaction {
    PendingRedaction {
        target_event_id: r.get(0),
        redaction_event_id: r.get(1),
        room_nid: r.get(2),
        sender_server: r.get(3),
        power_ok: r.get::<i64, _>(4) != 0,
    }
}

const COLS: &str = "target_event_id, redaction_event_id, room_nid, sender_server, power_ok";

impl Store {
    /// The redactions waiting for `target_event_id`, oldest first.
    pub async fn pending_redactions_for(
        &self,
        target_event_id: &str,
    ) -> Result<Vec<PendingRedaction>> {
        let sql = format!(
            "SELECT {COLS} FROM pending_redactions WHERE target_event_id = $1 \
             ORDER BY redaction_event_id"
        );
        Ok(sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(target_event_id)
            .fetch_all(self.pool())
            .await?
            .into_iter()
            .map(row)
            .collect())
    }

    /// The targets that redactions wait for (read at start-up).
    pub async fn pending_redaction_targets(&self) -> Result<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT DISTINCT target_event_id FROM pending_redactions")
                .fetch_all(self.pool())
                .await?,
        )
    }

    /// Every redaction waiting in a room (for a batch of outliers).
    pub async fn pending_redactions_in_room(&self, room_nid: i64) -> Result<Vec<PendingRedaction>> {
        let sql = format!(
            "SELECT {COLS} FROM pending_redactions WHERE room_nid = $1 \
             ORDER BY redaction_event_id"
        );
        Ok(sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(room_nid)
            .fetch_all(self.pool())
            .await?
            .into_iter()
            .map(row)
            .collect())
    }
}
