//! Events: persisting a new event with everything it changes (one transaction), loading events
//! by numeric or string ID, and the room-timeline range queries behind sync and `/messages`.

use sqlx::{any::AnyRow, Row};

use sqlx::AssertSqlSafe;

use super::Store;
use crate::Result;

/// A stored event.
#[derive(Debug, Clone)]
pub struct EventRow {
    pub event_nid: i64,
    pub event_id: String,
    pub room_nid: i64,
    pub stream_ordering: Option<i64>,
    pub depth: i64,
    pub state_before: Option<i64>,
    pub state_after: Option<i64>,
    pub redacted_by: Option<String>,
    pub json: String,
    /// Stored outside the timeline (learnt as auth or state, refused, or soft-failed).
    pub outlier: bool,
    /// Failed the authorization rules: never used as state.
    pub rejected: bool,
}

const EVENT_COLS: &str = "event_nid, event_id, room_nid, stream_ordering, depth, state_before, \
                          state_after, redacted_by, json, outlier, rejected";

fn event_row(r: AnyRow) -> EventRow {
    EventRow {
        event_nid: r.get(0),
        event_id: r.get(1),
        room_nid: r.get(2),
        stream_ordering: r.get(3),
        depth: r.get(4),
        state_before: r.get(5),
        state_after: r.get(6),
        redacted_by: r.get(7),
        json: r.get(8),
        outlier: r.get::<i64, _>(9) != 0,
        rejected: r.get::<i64, _>(10) != 0,
    }
}

impl Store {
    pub async fn event_by_id(&self, event_id: &str) -> Result<Option<EventRow>> {
        let sql = format!("SELECT {EVENT_COLS} FROM events WHERE event_id = $1");
        Ok(sqlx::query(AssertSqlSafe(sql))
            .bind(event_id)
            .fetch_optional(self.pool())
            .await?
            .map(event_row))
    }

    pub async fn event_by_nid(&self, nid: i64) -> Result<Option<EventRow>> {
        let sql = format!("SELECT {EVENT_COLS} FROM events WHERE event_nid = $1");
        Ok(sqlx::query(AssertSqlSafe(sql))
            .bind(nid)
            .fetch_optional(self.pool())
            .await?
            .map(event_row))
    }

    /// Events by numeric ID, in no particular order.
    pub async fn events_by_nids(&self, nids: &[i64]) -> Result<Vec<EventRow>> {
        let mut out = Vec::with_capacity(nids.len());
        for chunk in nids.chunks(500) {
            let list = chunk
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(",");
            let sql = format!("SELECT {EVENT_COLS} FROM events WHERE event_nid IN ({list})");
            out.extend(
                sqlx::query(AssertSqlSafe(sql))
                    .fetch_all(self.pool())
                    .await?
                    .into_iter()
                    .map(event_row),
            );
        }
        Ok(out)
    }

    /// The event a client transaction ID produced on this request path, if any.
    pub async fn event_for_txn(
        &self,
        user_id: &str,
        device_id: &str,
        scope: &str,
        txn_id: &str,
    ) -> Result<Option<String>> {
        Ok(sqlx::query_scalar(
            "SELECT event_id FROM events WHERE sender = $1 AND txn_device = $2 AND txn_scope = $3 \
             AND txn_id = $4",
        )
        .bind(user_id)
        .bind(device_id)
        .bind(scope)
        .bind(txn_id)
        .fetch_optional(self.pool())
        .await?)
    }

    /// `(device_id, txn_id)` of a locally sent event, for `unsigned.transaction_id`.
    pub async fn txn_of_events(&self, nids: &[i64]) -> Result<Vec<(i64, String, String)>> {
        if nids.is_empty() {
            return Ok(vec![]);
        }
        let list = nids
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let sql = format!(
            "SELECT event_nid, txn_device, txn_id FROM events WHERE event_nid IN ({list}) \
             AND txn_id IS NOT NULL"
        );
        Ok(sqlx::query(AssertSqlSafe(sql))
            .fetch_all(self.pool())
            .await?
            .into_iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    /// Room events with `from < stream_ordering <= to`, newest first, at most `limit`.
    pub async fn room_events_stream_desc(
        &self,
        room_nid: i64,
        from: i64,
        to: i64,
        limit: i64,
    ) -> Result<Vec<EventRow>> {
        let sql = format!(
            "SELECT {EVENT_COLS} FROM events WHERE room_nid = $1 AND stream_ordering > $2 \
             AND stream_ordering <= $3 AND outlier = 0 ORDER BY stream_ordering DESC LIMIT $4"
        );
        Ok(sqlx::query(AssertSqlSafe(sql))
            .bind(room_nid)
            .bind(from)
            .bind(to)
            .bind(limit)
            .fetch_all(self.pool())
            .await?
            .into_iter()
            .map(event_row)
            .collect())
    }

    /// Topological pagination: events strictly before (`backwards`) or after the position
    /// `(depth, stream)`, also bounded by `stream_max`, at most `limit`.
    pub async fn room_events_topological(
        &self,
        room_nid: i64,
        depth: i64,
        stream: i64,
        backwards: bool,
        stream_max: i64,
        limit: i64,
    ) -> Result<Vec<EventRow>> {
        let sql = if backwards {
            format!(
                "SELECT {EVENT_COLS} FROM events WHERE room_nid = $1 AND outlier = 0 \
                 AND stream_ordering IS NOT NULL AND stream_ordering <= $4 \
                 AND (depth < $2 OR (depth = $2 AND stream_ordering <= $3)) \
                 ORDER BY depth DESC, stream_ordering DESC LIMIT $5"
            )
        } else {
            format!(
                "SELECT {EVENT_COLS} FROM events WHERE room_nid = $1 AND outlier = 0 \
                 AND stream_ordering IS NOT NULL AND stream_ordering <= $4 \
                 AND (depth > $2 OR (depth = $2 AND stream_ordering > $3)) \
                 ORDER BY depth ASC, stream_ordering ASC LIMIT $5"
            )
        };
        Ok(sqlx::query(AssertSqlSafe(sql))
            .bind(room_nid)
            .bind(depth)
            .bind(stream)
            .bind(stream_max)
            .bind(limit)
            .fetch_all(self.pool())
            .await?
            .into_iter()
            .map(event_row)
            .collect())
    }

    /// The highest stream ordering, event ID and state group persisted (to seed the in-process
    /// allocators).
    pub async fn max_ids(&self) -> Result<(i64, i64, i64)> {
        let r = sqlx::query(
            "SELECT (SELECT MAX(stream_ordering) FROM events), (SELECT MAX(event_nid) FROM events), \
             (SELECT MAX(state_group) FROM state_groups)",
        )
        .fetch_one(self.pool())
        .await?;
        let get = |i: usize| r.get::<Option<i64>, _>(i).unwrap_or(0);
        Ok((get(0), get(1), get(2)))
    }

    /// The latest stream ordering of every room (to seed the in-memory map).
    pub async fn room_latest_positions(&self) -> Result<Vec<(i64, i64)>> {
        Ok(sqlx::query(
            "SELECT room_nid, MAX(stream_ordering) FROM events WHERE stream_ordering IS NOT NULL \
             GROUP BY room_nid",
        )
        .fetch_all(self.pool())
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
    }
}

impl Store {
    /// The state group after the room's last event at or below stream position `pos`
    /// (historical events, at negative positions, were never the state at a position).
    pub async fn state_group_at(&self, room_nid: i64, pos: i64) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT state_after FROM events WHERE room_nid = $1 AND stream_ordering <= $2 \
             AND stream_ordering > 0 AND outlier = 0 ORDER BY stream_ordering DESC LIMIT 1",
        )
        .bind(room_nid)
        .bind(pos)
        .fetch_optional(self.pool())
        .await?
        .flatten())
    }
}

impl Store {
    /// For each `(room_nid, from)`, the room's newest events with `from < stream_ordering ≤ to`,
    /// at most `limit` per room, newest first — one round trip for many rooms.
    pub async fn rooms_events_stream_desc(
        &self,
        rooms: &[(i64, i64)],
        to: i64,
        limit: i64,
    ) -> Result<Vec<EventRow>> {
        let mut out = Vec::new();
        for chunk in rooms.chunks(100) {
            let parts: Vec<String> = chunk
                .iter()
                .enumerate()
                .map(|(i, (room, from))| {
                    format!(
                        "SELECT * FROM (SELECT {EVENT_COLS} FROM events WHERE room_nid = {room} \
                         AND stream_ordering > {from} AND stream_ordering <= {to} AND outlier = 0 \
                         ORDER BY stream_ordering DESC LIMIT {limit}) AS r{i}"
                    )
                })
                .collect();
            let sql = parts.join(" UNION ALL ");
            out.extend(
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .fetch_all(self.pool())
                    .await?
                    .into_iter()
                    .map(event_row),
            );
        }
        Ok(out)
    }
}
