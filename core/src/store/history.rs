//! History held only in part: backward extremities (events a room's timeline names as parents
//! but does not hold) and historical events (learnt by backfill), written into the timeline at
//! negative stream positions. `/messages` orders the timeline by (depth, stream position), so
//! historical events take their place in it; `/sync` reads only positive positions, so it never
//! shows them as new. A historical event changes neither the current state, the memberships nor
//! the forward extremities.

use sqlx::{Any, AssertSqlSafe, Row, Transaction};

use super::{
    batch::{insert_rows, EventWrite, GroupWrite, V},
    Store,
};
use crate::Result;

/// One historical event with everything it changes.
#[derive(Debug, Clone)]
pub struct HistoricalWrite {
    pub room_nid: i64,
    /// The event; `stream_ordering` is negative, `membership` and `txn` are unused.
    pub event: EventWrite,
    /// The event is stored as an outlier (learnt as state or auth): it joins the timeline.
    pub promote: bool,
    /// State groups beyond the event's own (the state before it, when resolved or received).
    pub groups: Vec<GroupWrite>,
    /// `(event ID, depth)`: parents it names that the timeline does not hold.
    pub backward_add: Vec<(String, i64)>,
}

impl Store {
    /// A room's backward extremities named at depth `max_depth` or below, deepest first, at
    /// most `limit`: `(event ID, depth of the event naming it)`.
    pub async fn backward_extremities(
        &self,
        room_nid: i64,
        max_depth: i64,
        limit: i64,
    ) -> Result<Vec<(String, i64)>> {
        Ok(sqlx::query(
            "SELECT event_id, depth FROM backward_extremities WHERE room_nid = $1 AND depth <= $2 \
             ORDER BY depth DESC, event_id LIMIT $3",
        )
        .bind(room_nid)
        .bind(max_depth)
        .bind(limit)
        .fetch_all(self.pool())
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
    }

    /// The lowest stream position stored, or 0: historical positions are allocated below it.
    pub async fn min_stream_ordering(&self) -> Result<i64> {
        let min: Option<i64> = sqlx::query_scalar("SELECT MIN(stream_ordering) FROM events")
            .fetch_one(self.pool())
            .await?;
        Ok(min.unwrap_or(0).min(0))
    }

    /// Writes a historical event, its state groups and the backward extremities it closes and
    /// opens, in one transaction.
    pub async fn write_historical(&self, w: &HistoricalWrite) -> Result<()> {
        let mut txn = self.write().await?;
        let tx = &mut txn.tx;
        let groups: Vec<(i64, &GroupWrite)> = (w.groups.iter().chain(w.event.new_group.iter()))
            .map(|g| (w.room_nid, g))
            .collect();
        super::batch::insert_groups(tx, &groups).await?;
        let e = &w.event;
        if w.promote {
            let done = sqlx::query(
                "UPDATE events SET outlier = 0, stream_ordering = $2, state_before = $3, \
                 state_after = $4 WHERE event_nid = $1 AND outlier = 1 AND rejected = 0",
            )
            .bind(e.event_nid)
            .bind(e.stream_ordering)
            .bind(e.state_before)
            .bind(e.state_after)
            .execute(&mut **tx)
            .await?;
            if done.rows_affected() != 1 {
                return Err(crate::Error::internal(format!(
                    "event {} is no longer an outlier",
                    e.event_id
                )));
            }
        } else {
            let row = vec![
                V::I(e.event_nid),
                V::S(e.event_id.clone()),
                V::I(w.room_nid),
                V::I(e.stream_ordering),
                V::I(e.depth),
                V::S(e.event_type.clone()),
                V::OS(e.state_key.clone()),
                V::S(e.sender.clone()),
                V::I(e.origin_server_ts),
                V::I(e.state_before),
                V::I(e.state_after),
                V::S(e.json.clone()),
            ];
            insert_rows(
                tx,
                "INSERT INTO events (event_nid, event_id, room_nid, stream_ordering, depth, \
                 event_type, state_key, sender, origin_server_ts, state_before, state_after, json)",
                12,
                vec![row],
                "",
            )
            .await?;
        }
        write_backward(
            tx,
            w.room_nid,
            &w.backward_add,
            std::slice::from_ref(&e.event_id),
        )
        .await?;
        txn.commit().await
    }
}

/// Removes the backward extremities now held, then records new ones (keeping the greatest
/// depth an extremity is named at).
pub(super) async fn write_backward(
    tx: &mut Transaction<'static, Any>,
    room_nid: i64,
    add: &[(String, i64)],
    remove: &[String],
) -> Result<()> {
    for chunk in remove.chunks(500) {
        let marks: Vec<String> = (0..chunk.len()).map(|i| format!("${}", i + 2)).collect();
        let sql = format!(
            "DELETE FROM backward_extremities WHERE room_nid = $1 AND event_id IN ({})",
            marks.join(",")
        );
        let mut q = sqlx::query(AssertSqlSafe(sql)).bind(room_nid);
        for id in chunk {
            q = q.bind(id.clone());
        }
        q.execute(&mut **tx).await?;
    }
    // One row per key per statement (an upsert may touch a row only once).
    let mut deepest: std::collections::BTreeMap<&str, i64> = Default::default();
    for (id, depth) in add {
        let d = deepest.entry(id.as_str()).or_insert(*depth);
        *d = (*d).max(*depth);
    }
    let rows = deepest
        .into_iter()
        .map(|(id, depth)| vec![V::I(room_nid), V::S(id.to_owned()), V::I(depth)])
        .collect();
    insert_rows(
        tx,
        "INSERT INTO backward_extremities (room_nid, event_id, depth)",
        3,
        rows,
        "ON CONFLICT (room_nid, event_id) DO UPDATE SET depth = CASE WHEN excluded.depth > \
         backward_extremities.depth THEN excluded.depth ELSE backward_extremities.depth END",
    )
    .await
}
