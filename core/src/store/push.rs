//! Push notifications: push actions (written by the writer's batch, see `batch.rs`), pushers
//! and the push queue. The rules (what counts as unread, which pusher replaces which) are
//! `crate::push`'s; this file only reads and writes rows.

use sqlx::Row;

use super::{now_ms, Store};
use crate::Result;

/// A push action to write with its event: the user's rules said `notify`.
#[derive(Debug, Clone)]
pub struct PushActionWrite {
    pub user_id: String,
    pub event_nid: i64,
    pub stream_ordering: i64,
    /// The thread root's event ID, or `main`.
    pub thread_id: String,
    pub highlight: bool,
    /// Counted in the room's unread counts (not an invite to a user not in the room).
    pub counted: bool,
    /// The actions as JSON.
    pub actions: String,
    pub ts: i64,
}

/// A notification to send to a pusher, queued with its push action.
#[derive(Debug, Clone)]
pub struct PushQueueWrite {
    pub pusher_id: i64,
    pub user_id: String,
    pub event_nid: i64,
    pub actions: String,
}

/// A stored pusher.
#[derive(Debug, Clone, PartialEq)]
pub struct PusherRow {
    pub id: i64,
    pub user_id: String,
    pub device_id: String,
    pub kind: String,
    pub app_id: String,
    pub pushkey: String,
    pub app_display_name: String,
    pub device_display_name: String,
    pub profile_tag: Option<String>,
    pub lang: String,
    /// `data` as JSON.
    pub data: String,
    pub pushkey_ts: i64,
}

/// One row of the push queue.
#[derive(Debug, Clone)]
pub struct PushQueueRow {
    pub id: i64,
    pub pusher_id: i64,
    pub user_id: String,
    pub event_nid: i64,
    pub actions: String,
    pub attempts: i64,
    pub next_attempt_ts: i64,
    pub created_ts: i64,
}

/// A stored push action, for `/notifications`.
#[derive(Debug, Clone)]
pub struct NotificationRow {
    pub room_nid: i64,
    pub room_id: String,
    pub event_nid: i64,
    pub stream_ordering: i64,
    pub thread_id: String,
    pub highlight: bool,
    pub actions: String,
    pub ts: i64,
}

const PUSHER_SELECT: &str = "SELECT id, user_id, device_id, kind, app_id, pushkey, \
     app_display_name, device_display_name, profile_tag, lang, data, pushkey_ts FROM pushers";

fn pusher_row(r: &sqlx::any::AnyRow) -> PusherRow {
    PusherRow {
        id: r.get(0),
        user_id: r.get(1),
        device_id: r.get(2),
        kind: r.get(3),
        app_id: r.get(4),
        pushkey: r.get(5),
        app_display_name: r.get(6),
        device_display_name: r.get(7),
        profile_tag: r.get(8),
        lang: r.get(9),
        data: r.get(10),
        pushkey_ts: r.get(11),
    }
}

const QUEUE_SELECT: &str = "SELECT id, pusher_id, user_id, event_nid, actions, attempts, \
     next_attempt_ts, created_ts FROM push_queue";

fn queue_row(r: &sqlx::any::AnyRow) -> PushQueueRow {
    PushQueueRow {
        id: r.get(0),
        pusher_id: r.get(1),
        user_id: r.get(2),
        event_nid: r.get(3),
        actions: r.get(4),
        attempts: r.get(5),
        next_attempt_ts: r.get(6),
        created_ts: r.get(7),
    }
}

/// `(notification count, highlight count)` of a set of push actions.
pub type Counts = (i64, i64);

impl Store {
    /// Writes push actions and queued notifications (part of the writer's batch transaction).
    pub(super) async fn write_push(
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        rooms: &[&super::RoomWrite],
    ) -> Result<()> {
        use super::batch::V;
        let actions: Vec<Vec<V>> = rooms
            .iter()
            .flat_map(|r| r.push_actions.iter().map(move |a| (r.room_nid, a)))
            .map(|(room, a)| {
                vec![
                    V::S(a.user_id.clone()),
                    V::I(room),
                    V::I(a.event_nid),
                    V::I(a.stream_ordering),
                    V::S(a.thread_id.clone()),
                    V::I(i64::from(a.highlight)),
                    V::I(i64::from(a.counted)),
                    V::S(a.actions.clone()),
                    V::I(a.ts),
                ]
            })
            .collect();
        super::batch::insert_rows(
            tx,
            "INSERT INTO event_push_actions (user_id, room_nid, event_nid, stream_ordering, \
             thread_id, highlight, counted, actions, ts)",
            9,
            actions,
            "ON CONFLICT (user_id, event_nid) DO NOTHING",
        )
        .await?;
        let now = now_ms();
        let queue: Vec<Vec<V>> = rooms
            .iter()
            .flat_map(|r| r.push_queue.iter())
            .map(|q| {
                vec![
                    V::I(q.pusher_id),
                    V::S(q.user_id.clone()),
                    V::I(q.event_nid),
                    V::S(q.actions.clone()),
                    V::I(now),
                ]
            })
            .collect();
        super::batch::insert_rows(
            tx,
            "INSERT INTO push_queue (pusher_id, user_id, event_nid, actions, created_ts)",
            5,
            queue,
            "",
        )
        .await
    }

    /// A user's unread `(notifications, highlights)` in a room per thread, in one query: the
    /// counted push actions after their read position, which for each action is the later of
    /// their unthreaded receipt and the receipt of the action's own thread (the later of
    /// `m.read` and `m.read.private`). Threads with nothing unread are left out. Only actions
    /// at or below stream position `up_to` are counted.
    pub async fn unread_counts(
        &self,
        user_id: &str,
        room_nid: i64,
        room_id: &str,
        up_to: i64,
    ) -> Result<Vec<(String, Counts)>> {
        let rows = sqlx::query(
            "SELECT a.thread_id, COUNT(*), CAST(COALESCE(SUM(a.highlight), 0) AS BIGINT) \
             FROM event_push_actions a WHERE a.user_id = $1 AND a.room_nid = $2 \
             AND a.counted = 1 AND a.stream_ordering <= $4 \
             AND a.stream_ordering > COALESCE((SELECT MAX(r.event_stream) FROM receipts r \
                 WHERE r.user_id = $1 AND r.room_id = $3 AND r.thread_id = '' \
                 AND r.receipt_type IN ('m.read', 'm.read.private')), 0) \
             AND a.stream_ordering > COALESCE((SELECT MAX(r.event_stream) FROM receipts r \
                 WHERE r.user_id = $1 AND r.room_id = $3 AND r.thread_id = a.thread_id \
                 AND r.receipt_type IN ('m.read', 'm.read.private')), 0) \
             GROUP BY a.thread_id",
        )
        .bind(user_id)
        .bind(room_nid)
        .bind(room_id)
        .bind(up_to)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<String, _>(0), (r.get(1), r.get(2))))
            .collect())
    }

    /// The rooms in which a user has push actions after... anything (for the badge count).
    pub async fn push_action_rooms(&self, user_id: &str) -> Result<Vec<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT room_nid FROM event_push_actions WHERE user_id = $1",
        )
        .bind(user_id)
        .fetch_all(self.pool())
        .await?)
    }

    /// A user's push actions, newest first, before stream position `before`.
    pub async fn notifications(
        &self,
        user_id: &str,
        before: i64,
        limit: i64,
        only_highlight: bool,
    ) -> Result<Vec<NotificationRow>> {
        let rows = sqlx::query(
            "SELECT a.room_nid, r.room_id, a.event_nid, a.stream_ordering, a.thread_id, \
             a.highlight, a.actions, a.ts FROM event_push_actions a \
             JOIN rooms r ON r.room_nid = a.room_nid \
             WHERE a.user_id = $1 AND a.stream_ordering < $2 AND a.highlight >= $3 \
             ORDER BY a.stream_ordering DESC LIMIT $4",
        )
        .bind(user_id)
        .bind(before)
        .bind(i64::from(only_highlight))
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .iter()
            .map(|r| NotificationRow {
                room_nid: r.get(0),
                room_id: r.get(1),
                event_nid: r.get(2),
                stream_ordering: r.get(3),
                thread_id: r.get(4),
                highlight: r.get::<i64, _>(5) != 0,
                actions: r.get(6),
                ts: r.get(7),
            })
            .collect())
    }

    /// A user's pushers.
    pub async fn pushers_of(&self, user_id: &str) -> Result<Vec<PusherRow>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{PUSHER_SELECT} WHERE user_id = $1 ORDER BY id"
        )))
        .bind(user_id)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(pusher_row).collect())
    }

    /// Adds or replaces the pusher `(app_id, pushkey)` of `p.user_id`; unless `append`, the
    /// pushers with that app ID and pushkey of other users are removed. Returns the users
    /// whose pushers changed.
    pub async fn set_pusher(&self, p: &PusherRow, append: bool) -> Result<Vec<String>> {
        let mut w = self.write().await?;
        let mut changed: Vec<String> = vec![p.user_id.clone()];
        if !append {
            let others: Vec<(i64, String)> = sqlx::query(
                "SELECT id, user_id FROM pushers WHERE app_id = $1 AND pushkey = $2 \
                 AND user_id <> $3",
            )
            .bind(&p.app_id)
            .bind(&p.pushkey)
            .bind(&p.user_id)
            .fetch_all(&mut *w.tx)
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
            for (id, user) in others {
                delete_pusher_rows(&mut w.tx, id).await?;
                changed.push(user);
            }
        }
        sqlx::query(
            "INSERT INTO pushers (user_id, device_id, kind, app_id, pushkey, app_display_name, \
             device_display_name, profile_tag, lang, data, pushkey_ts) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT (app_id, pushkey, user_id) DO UPDATE SET device_id = excluded.device_id, \
             kind = excluded.kind, app_display_name = excluded.app_display_name, \
             device_display_name = excluded.device_display_name, \
             profile_tag = excluded.profile_tag, lang = excluded.lang, data = excluded.data, \
             pushkey_ts = excluded.pushkey_ts",
        )
        .bind(&p.user_id)
        .bind(&p.device_id)
        .bind(&p.kind)
        .bind(&p.app_id)
        .bind(&p.pushkey)
        .bind(&p.app_display_name)
        .bind(&p.device_display_name)
        .bind(&p.profile_tag)
        .bind(&p.lang)
        .bind(&p.data)
        .bind(p.pushkey_ts)
        .execute(&mut *w.tx)
        .await?;
        w.commit().await?;
        changed.sort();
        changed.dedup();
        Ok(changed)
    }

    /// Deletes a user's pusher `(app_id, pushkey)` and its queue; whether there was one.
    pub async fn delete_pusher(&self, user_id: &str, app_id: &str, pushkey: &str) -> Result<bool> {
        let mut w = self.write().await?;
        let id: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM pushers WHERE user_id = $1 AND app_id = $2 AND pushkey = $3",
        )
        .bind(user_id)
        .bind(app_id)
        .bind(pushkey)
        .fetch_optional(&mut *w.tx)
        .await?;
        if let Some(id) = id {
            delete_pusher_rows(&mut w.tx, id).await?;
        }
        w.commit().await?;
        Ok(id.is_some())
    }

    /// Deletes a pusher by ID with its queue.
    pub async fn delete_pusher_by_id(&self, id: i64) -> Result<()> {
        let mut w = self.write().await?;
        delete_pusher_rows(&mut w.tx, id).await?;
        w.commit().await
    }

    /// The pushers with queued notifications.
    pub async fn queued_pushers(&self) -> Result<Vec<i64>> {
        Ok(
            sqlx::query_scalar("SELECT DISTINCT pusher_id FROM push_queue")
                .fetch_all(self.pool())
                .await?,
        )
    }

    /// A pusher's oldest queued notification.
    pub async fn push_queue_next(&self, pusher_id: i64) -> Result<Option<PushQueueRow>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{QUEUE_SELECT} WHERE pusher_id = $1 ORDER BY id LIMIT 1"
        )))
        .bind(pusher_id)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.as_ref().map(queue_row))
    }

    /// Deletes a queued notification (delivered, or given up).
    pub async fn push_queue_delete(&self, id: i64) -> Result<()> {
        let mut w = self.write().await?;
        sqlx::query("DELETE FROM push_queue WHERE id = $1")
            .bind(id)
            .execute(&mut *w.tx)
            .await?;
        w.commit().await
    }

    /// Records a failed attempt: the next one is due at `next_attempt_ts`.
    pub async fn push_queue_retry(
        &self,
        id: i64,
        attempts: i64,
        next_attempt_ts: i64,
    ) -> Result<()> {
        let mut w = self.write().await?;
        sqlx::query("UPDATE push_queue SET attempts = $2, next_attempt_ts = $3 WHERE id = $1")
            .bind(id)
            .bind(attempts)
            .bind(next_attempt_ts)
            .execute(&mut *w.tx)
            .await?;
        w.commit().await
    }
}

/// Deletes a pusher and its queued notifications.
async fn delete_pusher_rows(tx: &mut sqlx::Transaction<'static, sqlx::Any>, id: i64) -> Result<()> {
    sqlx::query("DELETE FROM push_queue WHERE pusher_id = $1")
        .bind(id)
        .execute(&mut **tx)
        .await?;
    sqlx::query("DELETE FROM pushers WHERE id = $1")
        .bind(id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

impl super::WriteTxn<'_> {
    /// Deletes the pushers made by a device and their queues (the device is deleted).
    pub async fn delete_device_pushers(&mut self, user_id: &str, device_id: &str) -> Result<()> {
        sqlx::query(
            "DELETE FROM push_queue WHERE pusher_id IN \
             (SELECT id FROM pushers WHERE user_id = $1 AND device_id = $2)",
        )
        .bind(user_id)
        .bind(device_id)
        .execute(&mut *self.tx)
        .await?;
        sqlx::query("DELETE FROM pushers WHERE user_id = $1 AND device_id = $2")
            .bind(user_id)
            .bind(device_id)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }
}
