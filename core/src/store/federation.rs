//! Federation's tables: the outbox per destination, back-off per destination, inbound
//! transactions already answered, and stripped state of invites from other servers.

use sqlx::{AssertSqlSafe, Row};

use super::Store;
use crate::Result;

/// One queued item for a destination: an event (by numeric ID) or an EDU (JSON).
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub event_nid: Option<i64>,
    pub edu: Option<String>,
}

impl Store {
    /// Destinations with queued items.
    pub async fn outbox_destinations(&self) -> Result<Vec<String>> {
        Ok(
            sqlx::query("SELECT DISTINCT destination FROM federation_outbox")
                .fetch_all(self.pool())
                .await?
                .into_iter()
                .map(|r| r.get(0))
                .collect(),
        )
    }

    /// The oldest queued items for a destination: at most `max_pdus` events and `max_edus`
    /// EDUs, in queue order, stopping at the first item over either limit.
    pub async fn outbox_next(
        &self,
        destination: &str,
        max_pdus: usize,
        max_edus: usize,
    ) -> Result<Vec<OutboxRow>> {
        let rows = sqlx::query(
            "SELECT id, event_nid, edu FROM federation_outbox WHERE destination = $1 \
             ORDER BY id LIMIT $2",
        )
        .bind(destination)
        .bind((max_pdus + max_edus) as i64)
        .fetch_all(self.pool())
        .await?;
        let (mut pdus, mut edus) = (0, 0);
        let mut out = Vec::new();
        for r in rows {
            let row = OutboxRow {
                id: r.get(0),
                event_nid: r.get(1),
                edu: r.get(2),
            };
            if row.event_nid.is_some() {
                if pdus == max_pdus {
                    break;
                }
                pdus += 1;
            } else {
                if edus == max_edus {
                    break;
                }
                edus += 1;
            }
            out.push(row);
        }
        Ok(out)
    }

    /// Removes delivered items.
    pub async fn outbox_delete(&self, destination: &str, ids: &[i64]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let list = ids
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let mut w = self.write().await?;
        sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM federation_outbox WHERE destination = $1 AND id IN ({list})"
        )))
        .bind(destination)
        .execute(&mut *w.tx)
        .await?;
        w.commit().await
    }

    /// `(consecutive failures, retry not before)` of a destination.
    pub async fn destination_backoff(&self, destination: &str) -> Result<(i64, i64)> {
        Ok(sqlx::query(
            "SELECT failures, retry_at FROM federation_destinations WHERE destination = $1",
        )
        .bind(destination)
        .fetch_optional(self.pool())
        .await?
        .map(|r| (r.get(0), r.get(1)))
        .unwrap_or((0, 0)))
    }

    pub async fn set_destination_backoff(
        &self,
        destination: &str,
        failures: i64,
        retry_at: i64,
    ) -> Result<()> {
        let mut w = self.write().await?;
        sqlx::query(
            "INSERT INTO federation_destinations (destination, failures, retry_at) \
             VALUES ($1, $2, $3) ON CONFLICT (destination) DO UPDATE SET \
             failures = excluded.failures, retry_at = excluded.retry_at",
        )
        .bind(destination)
        .bind(failures)
        .bind(retry_at)
        .execute(&mut *w.tx)
        .await?;
        w.commit().await
    }

    /// The response given to an inbound transaction already processed.
    pub async fn inbound_txn(&self, origin: &str, txn_id: &str) -> Result<Option<String>> {
        Ok(sqlx::query(
            "SELECT response FROM federation_inbound_txns WHERE origin = $1 AND txn_id = $2",
        )
        .bind(origin)
        .bind(txn_id)
        .fetch_optional(self.pool())
        .await?
        .map(|r| r.get(0)))
    }

    pub async fn put_inbound_txn(&self, origin: &str, txn_id: &str, response: &str) -> Result<()> {
        let mut w = self.write().await?;
        sqlx::query(
            "INSERT INTO federation_inbound_txns (origin, txn_id, response, received_ts) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (origin, txn_id) DO NOTHING",
        )
        .bind(origin)
        .bind(txn_id)
        .bind(response)
        .bind(super::now_ms())
        .execute(&mut *w.tx)
        .await?;
        w.commit().await
    }

    /// The stripped state stored with an invite from another server.
    pub async fn remote_invite(&self, room_nid: i64, user_id: &str) -> Result<Option<String>> {
        Ok(sqlx::query(
            "SELECT stripped_state FROM remote_invites WHERE room_nid = $1 AND user_id = $2",
        )
        .bind(room_nid)
        .bind(user_id)
        .fetch_optional(self.pool())
        .await?
        .map(|r| r.get(0)))
    }
}
