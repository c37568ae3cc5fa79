//! Rooms: the room table, interned state keys, state-group snapshots, memberships, aliases and
//! the public room directory.

use sqlx::Row;

use sqlx::AssertSqlSafe;

use std::collections::HashMap;

use super::{insert_rows, Store, V};
use crate::Result;

/// A room row.
#[derive(Debug, Clone)]
pub struct RoomRow {
    pub room_nid: i64,
    pub room_id: String,
    pub room_version: String,
    pub is_public: bool,
    pub state_group: Option<i64>,
}

/// One stored state group: its parent and its own edits `(state_key_nid, event_nid)`.
#[derive(Debug, Clone)]
pub struct StateGroupRow {
    pub parent: Option<i64>,
    pub chain_len: i64,
    pub edits: Vec<(i64, i64)>,
}

/// A membership row.
#[derive(Debug, Clone)]
pub struct MembershipRow {
    pub room_nid: i64,
    pub user_id: String,
    pub membership: String,
    pub event_nid: i64,
    pub stream_ordering: i64,
    pub forgotten: bool,
}

const ROOM_COLS: &str = "room_nid, room_id, room_version, is_public, state_group";

fn room_row(r: sqlx::any::AnyRow) -> RoomRow {
    RoomRow {
        room_nid: r.get(0),
        room_id: r.get(1),
        room_version: r.get(2),
        is_public: r.get::<i64, _>(3) != 0,
        state_group: r.get(4),
    }
}

fn membership_row(r: sqlx::any::AnyRow) -> MembershipRow {
    MembershipRow {
        room_nid: r.get(0),
        user_id: r.get(1),
        membership: r.get(2),
        event_nid: r.get(3),
        stream_ordering: r.get(4),
        forgotten: r.get::<i64, _>(5) != 0,
    }
}

const MEMBER_COLS: &str = "room_nid, user_id, membership, event_nid, stream_ordering, forgotten";

impl Store {
    pub async fn max_room_nid(&self) -> Result<i64> {
        let v: Option<i64> = sqlx::query_scalar("SELECT MAX(room_nid) FROM rooms")
            .fetch_one(self.pool())
            .await?;
        Ok(v.unwrap_or(0))
    }

    pub async fn room(&self, room_id: &str) -> Result<Option<RoomRow>> {
        let sql = format!("SELECT {ROOM_COLS} FROM rooms WHERE room_id = $1");
        Ok(sqlx::query(AssertSqlSafe(sql))
            .bind(room_id)
            .fetch_optional(self.pool())
            .await?
            .map(room_row))
    }

    pub async fn room_by_nid(&self, nid: i64) -> Result<Option<RoomRow>> {
        let sql = format!("SELECT {ROOM_COLS} FROM rooms WHERE room_nid = $1");
        Ok(sqlx::query(AssertSqlSafe(sql))
            .bind(nid)
            .fetch_optional(self.pool())
            .await?
            .map(room_row))
    }

    /// Event IDs, depths and numeric IDs of the room's forward extremities.
    pub async fn forward_extremities(&self, room_nid: i64) -> Result<Vec<(String, i64, i64)>> {
        Ok(sqlx::query(
            "SELECT e.event_id, e.depth, e.event_nid FROM forward_extremities f \
             JOIN events e ON e.event_nid = f.event_nid WHERE f.room_nid = $1",
        )
        .bind(room_nid)
        .fetch_all(self.pool())
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
    }

    // State keys ---------------------------------------------------------------------------

    /// Interns many `(event_type, state_key)` pairs in one transaction; their IDs, in order.
    pub async fn intern_state_keys(&self, pairs: &[(String, String)]) -> Result<Vec<i64>> {
        if pairs.is_empty() {
            return Ok(Vec::new());
        }
        let mut w = self.write().await?;
        let rows = pairs
            .iter()
            .map(|(t, k)| vec![V::S(t.clone()), V::S(k.clone())])
            .collect();
        insert_rows(
            &mut w.tx,
            "INSERT INTO state_keys (event_type, state_key)",
            2,
            rows,
            "ON CONFLICT (event_type, state_key) DO NOTHING",
        )
        .await?;
        // Read back per event type, a few hundred keys a statement.
        let mut by_type: HashMap<&str, Vec<&str>> = HashMap::new();
        for (t, k) in pairs {
            by_type.entry(t.as_str()).or_default().push(k.as_str());
        }
        let mut nids: HashMap<(String, String), i64> = HashMap::with_capacity(pairs.len());
        for (ty, keys) in by_type {
            for chunk in keys.chunks(500) {
                let marks: Vec<String> = (0..chunk.len()).map(|i| format!("${}", i + 2)).collect();
                let sql = format!(
                    "SELECT state_key_nid, state_key FROM state_keys \
                     WHERE event_type = $1 AND state_key IN ({})",
                    marks.join(",")
                );
                let mut q = sqlx::query(AssertSqlSafe(sql)).bind(ty);
                for k in chunk {
                    q = q.bind(*k);
                }
                for row in q.fetch_all(&mut *w.tx).await? {
                    nids.insert((ty.to_owned(), row.get(1)), row.get(0));
                }
            }
        }
        w.commit().await?;
        pairs
            .iter()
            .map(|(t, k)| {
                nids.get(&(t.clone(), k.clone())).copied().ok_or_else(|| {
                    crate::Error::internal(format!("state key {t} {k} not interned"))
                })
            })
            .collect()
    }

    pub async fn lookup_state_key(&self, event_type: &str, state_key: &str) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT state_key_nid FROM state_keys WHERE event_type = $1 AND state_key = $2",
        )
        .bind(event_type)
        .bind(state_key)
        .fetch_optional(self.pool())
        .await?)
    }

    pub async fn state_group(&self, group: i64) -> Result<Option<StateGroupRow>> {
        let row =
            sqlx::query("SELECT parent_group, chain_len FROM state_groups WHERE state_group = $1")
                .bind(group)
                .fetch_optional(self.pool())
                .await?;
        let Some(row) = row else { return Ok(None) };
        let edits = sqlx::query(
            "SELECT state_key_nid, event_nid FROM state_group_edits WHERE state_group = $1",
        )
        .bind(group)
        .fetch_all(self.pool())
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
        Ok(Some(StateGroupRow {
            parent: row.get(0),
            chain_len: row.get(1),
            edits,
        }))
    }

    // Memberships --------------------------------------------------------------------------

    /// The rooms a user has the given membership in (current state).
    pub async fn rooms_of_user(&self, user_id: &str) -> Result<Vec<MembershipRow>> {
        let sql = format!("SELECT {MEMBER_COLS} FROM room_memberships WHERE user_id = $1");
        Ok(sqlx::query(AssertSqlSafe(sql))
            .bind(user_id)
            .fetch_all(self.pool())
            .await?
            .into_iter()
            .map(membership_row)
            .collect())
    }

    /// The rooms a user is joined to (for users of other servers, whose memberships are not
    /// cached).
    pub async fn rooms_with_member(&self, user_id: &str) -> Result<Vec<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT room_nid FROM room_memberships WHERE user_id = $1 AND membership = 'join'",
        )
        .bind(user_id)
        .fetch_all(self.pool())
        .await?)
    }

    /// `(user, membership)` of a room's members whose membership changed in `(from, to]`.
    pub async fn membership_changes(
        &self,
        room_nid: i64,
        from: i64,
        to: i64,
    ) -> Result<Vec<(String, String)>> {
        Ok(sqlx::query(
            "SELECT user_id, membership FROM room_memberships \
             WHERE room_nid = $1 AND stream_ordering > $2 AND stream_ordering <= $3",
        )
        .bind(room_nid)
        .bind(from)
        .bind(to)
        .fetch_all(self.pool())
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
    }

    pub async fn membership(&self, room_nid: i64, user_id: &str) -> Result<Option<MembershipRow>> {
        let sql = format!(
            "SELECT {MEMBER_COLS} FROM room_memberships WHERE room_nid = $1 AND user_id = $2"
        );
        Ok(sqlx::query(AssertSqlSafe(sql))
            .bind(room_nid)
            .bind(user_id)
            .fetch_optional(self.pool())
            .await?
            .map(membership_row))
    }

    pub async fn room_members(&self, room_nid: i64) -> Result<Vec<MembershipRow>> {
        let sql = format!("SELECT {MEMBER_COLS} FROM room_memberships WHERE room_nid = $1");
        Ok(sqlx::query(AssertSqlSafe(sql))
            .bind(room_nid)
            .fetch_all(self.pool())
            .await?
            .into_iter()
            .map(membership_row)
            .collect())
    }

    pub async fn forget_room(&self, room_nid: i64, user_id: &str) -> Result<()> {
        let mut w = self.write().await?;
        sqlx::query(
            "UPDATE room_memberships SET forgotten = 1 WHERE room_nid = $1 AND user_id = $2",
        )
        .bind(room_nid)
        .bind(user_id)
        .execute(&mut *w.tx)
        .await?;
        w.commit().await
    }

    // Aliases and directory ----------------------------------------------------------------

    pub async fn put_alias(&self, alias: &str, room_id: &str, creator: &str) -> Result<bool> {
        let mut w = self.write().await?;
        let n = sqlx::query(
            "INSERT INTO room_aliases (alias, room_id, creator) VALUES ($1, $2, $3) \
             ON CONFLICT (alias) DO NOTHING",
        )
        .bind(alias)
        .bind(room_id)
        .bind(creator)
        .execute(&mut *w.tx)
        .await?
        .rows_affected();
        w.commit().await?;
        Ok(n == 1)
    }

    pub async fn alias(&self, alias: &str) -> Result<Option<(String, String)>> {
        let row = sqlx::query("SELECT room_id, creator FROM room_aliases WHERE alias = $1")
            .bind(alias)
            .fetch_optional(self.pool())
            .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    pub async fn delete_alias(&self, alias: &str) -> Result<bool> {
        let mut w = self.write().await?;
        let n = sqlx::query("DELETE FROM room_aliases WHERE alias = $1")
            .bind(alias)
            .execute(&mut *w.tx)
            .await?
            .rows_affected();
        w.commit().await?;
        Ok(n == 1)
    }

    pub async fn aliases_of_room(&self, room_id: &str) -> Result<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT alias FROM room_aliases WHERE room_id = $1 ORDER BY alias")
                .bind(room_id)
                .fetch_all(self.pool())
                .await?,
        )
    }

    pub async fn set_room_public(&self, room_nid: i64, public: bool) -> Result<()> {
        let mut w = self.write().await?;
        sqlx::query("UPDATE rooms SET is_public = $2 WHERE room_nid = $1")
            .bind(room_nid)
            .bind(public as i64)
            .execute(&mut *w.tx)
            .await?;
        w.commit().await
    }

    pub async fn public_rooms(&self) -> Result<Vec<RoomRow>> {
        let sql = format!("SELECT {ROOM_COLS} FROM rooms WHERE is_public = 1 ORDER BY room_nid");
        Ok(sqlx::query(AssertSqlSafe(sql))
            .fetch_all(self.pool())
            .await?
            .into_iter()
            .map(room_row)
            .collect())
    }
}
