//! Receipts: one row per (room, receipt type, user, thread), moved on as the user reads.

use sqlx::{AssertSqlSafe, Row};

use super::{Store, WriteTxn};
use crate::Result;

/// A stored receipt.
#[derive(Debug, Clone)]
pub struct ReceiptRow {
    pub room_id: String,
    pub receipt_type: String,
    pub user_id: String,
    pub event_id: String,
    /// `{"ts": …, "thread_id"?: …}`.
    pub data: String,
    pub stream_id: i64,
}

/// A receipt to store.
pub struct ReceiptWrite<'a> {
    pub room_id: &'a str,
    pub receipt_type: &'a str,
    pub user_id: &'a str,
    /// `""` for an unthreaded receipt.
    pub thread_id: &'a str,
    pub event_id: &'a str,
    /// Stream position of the receipted event (0 when not held).
    pub event_stream: i64,
    pub data: &'a str,
    pub stream_id: i64,
}

const COLUMNS: &str = "room_id, receipt_type, user_id, event_id, data, stream_id";

fn receipt_row(r: &sqlx::any::AnyRow) -> ReceiptRow {
    ReceiptRow {
        room_id: r.get(0),
        receipt_type: r.get(1),
        user_id: r.get(2),
        event_id: r.get(3),
        data: r.get(4),
        stream_id: r.get(5),
    }
}

impl WriteTxn<'_> {
    /// Stores a receipt. With `forward_only`, a receipt for an event before the one already
    /// held (same user, type and thread) changes nothing; answers whether a row was written.
    pub async fn put_receipt(&mut self, r: &ReceiptWrite<'_>, forward_only: bool) -> Result<bool> {
        let condition = if forward_only {
            " WHERE receipts.event_stream <= excluded.event_stream"
        } else {
            ""
        };
        let done = sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO receipts (room_id, receipt_type, user_id, thread_id, event_id, \
             event_stream, data, stream_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (room_id, receipt_type, user_id, thread_id) DO UPDATE SET \
             event_id = excluded.event_id, event_stream = excluded.event_stream, \
             data = excluded.data, stream_id = excluded.stream_id{condition}"
        )))
        .bind(r.room_id)
        .bind(r.receipt_type)
        .bind(r.user_id)
        .bind(r.thread_id)
        .bind(r.event_id)
        .bind(r.event_stream)
        .bind(r.data)
        .bind(r.stream_id)
        .execute(&mut *self.tx)
        .await?;
        Ok(done.rows_affected() > 0)
    }
}

impl Store {
    /// The highest receipts-stream position stored.
    pub async fn max_receipt_stream(&self) -> Result<i64> {
        let max: Option<i64> = sqlx::query_scalar("SELECT MAX(stream_id) FROM receipts")
            .fetch_one(self.pool())
            .await?;
        Ok(max.unwrap_or(0))
    }

    /// The latest receipts-stream position of every room with receipts.
    pub async fn receipt_room_positions(&self) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query("SELECT room_id, MAX(stream_id) FROM receipts GROUP BY room_id")
            .fetch_all(self.pool())
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// A room's receipts with a position in `(after, up_to]`, oldest first.
    pub async fn room_receipts(
        &self,
        room_id: &str,
        after: i64,
        up_to: i64,
    ) -> Result<Vec<ReceiptRow>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM receipts WHERE room_id = $1 AND stream_id > $2 \
             AND stream_id <= $3 ORDER BY stream_id"
        )))
        .bind(room_id)
        .bind(after)
        .bind(up_to)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(receipt_row).collect())
    }

    /// How far `user_id` has read in a room, per thread (`""` = unthreaded, `main`, or a
    /// thread root): the stream position of the later of their `m.read` and `m.read.private`
    /// receipts.
    pub async fn read_positions(&self, user_id: &str, room_id: &str) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query(
            "SELECT thread_id, MAX(event_stream) FROM receipts WHERE user_id = $1 \
             AND room_id = $2 AND receipt_type IN ('m.read', 'm.read.private') \
             GROUP BY thread_id",
        )
        .bind(user_id)
        .bind(room_id)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }
}
