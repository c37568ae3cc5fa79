//! Presence rows: each user's published presence (see `crate::presence`).

use sqlx::Row;

use super::{Store, WriteTxn};
use crate::Result;

/// A user's published presence as stored.
#[derive(Debug, Clone)]
pub struct PresenceRow {
    pub user_id: String,
    pub state: String,
    pub status_msg: Option<String>,
    pub last_active_ts: i64,
    pub currently_active: bool,
    pub stream_id: i64,
}

impl Store {
    /// The highest presence stream position stored (0 when none).
    pub async fn max_presence_stream(&self) -> Result<i64> {
        let v: Option<i64> = sqlx::query_scalar("SELECT MAX(stream_id) FROM presence")
            .fetch_one(self.pool())
            .await?;
        Ok(v.unwrap_or(0))
    }

    /// Every stored presence row (read once at start-up).
    pub async fn all_presence(&self) -> Result<Vec<PresenceRow>> {
        Ok(sqlx::query(
            "SELECT user_id, state, status_msg, last_active_ts, currently_active, stream_id \
             FROM presence",
        )
        .fetch_all(self.pool())
        .await?
        .into_iter()
        .map(|r| PresenceRow {
            user_id: r.get(0),
            state: r.get(1),
            status_msg: r.get(2),
            last_active_ts: r.get(3),
            currently_active: r.get::<i64, _>(4) != 0,
            stream_id: r.get(5),
        })
        .collect())
    }
}

impl WriteTxn<'_> {
    /// Writes a user's published presence.
    pub async fn put_presence(&mut self, row: &PresenceRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO presence (user_id, state, status_msg, last_active_ts, currently_active, \
             stream_id) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (user_id) DO UPDATE SET \
             state = excluded.state, status_msg = excluded.status_msg, \
             last_active_ts = excluded.last_active_ts, \
             currently_active = excluded.currently_active, stream_id = excluded.stream_id",
        )
        .bind(&row.user_id)
        .bind(&row.state)
        .bind(&row.status_msg)
        .bind(row.last_active_ts)
        .bind(row.currently_active as i64)
        .bind(row.stream_id)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Moves a user's stored last-active time forward (no stream position: nobody is told).
    pub async fn touch_presence(&mut self, user_id: &str, last_active_ts: i64) -> Result<()> {
        sqlx::query(
            "UPDATE presence SET last_active_ts = $2 WHERE user_id = $1 AND last_active_ts < $2",
        )
        .bind(user_id)
        .bind(last_active_ts)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }
}
