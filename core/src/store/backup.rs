//! Server-side key backups: each user's backup versions and the room keys stored in them. The
//! rules (which key wins, when the etag moves) are `crate::backup`'s; this file only reads and
//! writes rows. The writes of one request go through a [`WriteTxn`].

use sqlx::{AssertSqlSafe, Row};

use super::{Store, WriteTxn};
use crate::{
    backup::{KeyBackupData, KeyRank, KeyScope},
    Result,
};

/// A backup version as stored, with the number of keys it holds.
#[derive(Debug, Clone)]
pub struct BackupVersionRow {
    pub version: i64,
    pub algorithm: String,
    pub auth_data: String,
    pub etag: i64,
    pub count: i64,
}

/// One stored room key.
#[derive(Debug, Clone)]
pub struct RoomKeyRow {
    pub room_id: String,
    pub session_id: String,
    pub first_message_index: i64,
    pub forwarded_count: i64,
    pub is_verified: bool,
    pub session_data: String,
}

const VERSION_SELECT: &str = "SELECT v.version, v.algorithm, v.auth_data, v.etag, \
     (SELECT COUNT(*) FROM backup_keys k WHERE k.user_id = v.user_id AND k.version = v.version) \
     FROM backup_versions v WHERE v.user_id = $1 AND v.deleted = 0";

/// `WHERE` conditions selecting the keys of a scope; `$1` is the user, `$2` the version, then
/// the room and session bound by [`bind_scope`].
fn scope_filter(scope: &KeyScope<'_>) -> &'static str {
    match scope {
        KeyScope::All => "user_id = $1 AND version = $2",
        KeyScope::Room(_) => "user_id = $1 AND version = $2 AND room_id = $3",
        KeyScope::Session(..) => {
            "user_id = $1 AND version = $2 AND room_id = $3 AND session_id = $4"
        }
    }
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>;

fn bind_scope<'q>(q: AnyQuery<'q>, scope: &KeyScope<'q>) -> AnyQuery<'q> {
    match *scope {
        KeyScope::All => q,
        KeyScope::Room(room) => q.bind(room.as_str()),
        KeyScope::Session(room, session) => q.bind(room.as_str()).bind(session),
    }
}

impl Store {
    /// Creates the user's next backup version (one past every version they ever had).
    pub async fn create_backup_version(
        &self,
        user_id: &str,
        algorithm: &str,
        auth_data: &str,
    ) -> Result<i64> {
        let mut w = self.write().await?;
        let last: Option<i64> =
            sqlx::query_scalar("SELECT MAX(version) FROM backup_versions WHERE user_id = $1")
                .bind(user_id)
                .fetch_one(&mut *w.tx)
                .await?;
        let version = last.unwrap_or(0) + 1;
        sqlx::query(
            "INSERT INTO backup_versions (user_id, version, algorithm, auth_data) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(user_id)
        .bind(version)
        .bind(algorithm)
        .bind(auth_data)
        .execute(&mut *w.tx)
        .await?;
        w.commit().await?;
        Ok(version)
    }

    /// The user's backup version `version`, or their latest for `None`; deleted versions are
    /// never found.
    pub async fn backup_version(
        &self,
        user_id: &str,
        version: Option<i64>,
    ) -> Result<Option<BackupVersionRow>> {
        let query = match version {
            Some(v) => sqlx::query(AssertSqlSafe(format!(
                "{VERSION_SELECT} AND v.version = $2"
            )))
            .bind(user_id)
            .bind(v),
            None => sqlx::query(AssertSqlSafe(format!(
                "{VERSION_SELECT} ORDER BY v.version DESC LIMIT 1"
            )))
            .bind(user_id),
        };
        Ok(query
            .fetch_optional(self.pool())
            .await?
            .map(|r| BackupVersionRow {
                version: r.get(0),
                algorithm: r.get(1),
                auth_data: r.get(2),
                etag: r.get(3),
                count: r.get(4),
            }))
    }

    /// Replaces a version's `auth_data`; false when the version is unknown or deleted.
    pub async fn update_backup_auth_data(
        &self,
        user_id: &str,
        version: i64,
        auth_data: &str,
    ) -> Result<bool> {
        let mut w = self.write().await?;
        let updated = sqlx::query(
            "UPDATE backup_versions SET auth_data = $3 \
             WHERE user_id = $1 AND version = $2 AND deleted = 0",
        )
        .bind(user_id)
        .bind(version)
        .bind(auth_data)
        .execute(&mut *w.tx)
        .await?
        .rows_affected();
        w.commit().await?;
        Ok(updated > 0)
    }

    /// Marks a version deleted and deletes its keys; false when the user never had it.
    pub async fn delete_backup_version(&self, user_id: &str, version: i64) -> Result<bool> {
        let mut w = self.write().await?;
        let found = sqlx::query(
            "UPDATE backup_versions SET deleted = 1 WHERE user_id = $1 AND version = $2",
        )
        .bind(user_id)
        .bind(version)
        .execute(&mut *w.tx)
        .await?
        .rows_affected();
        w.delete_room_keys(user_id, version, &KeyScope::All).await?;
        w.commit().await?;
        Ok(found > 0)
    }

    /// The keys of `scope` in a version, by room and session.
    pub async fn room_keys(
        &self,
        user_id: &str,
        version: i64,
        scope: &KeyScope<'_>,
    ) -> Result<Vec<RoomKeyRow>> {
        let sql = format!(
            "SELECT room_id, session_id, first_message_index, forwarded_count, is_verified, \
             session_data FROM backup_keys WHERE {} ORDER BY room_id, session_id",
            scope_filter(scope)
        );
        let query = sqlx::query(AssertSqlSafe(sql)).bind(user_id).bind(version);
        Ok(bind_scope(query, scope)
            .fetch_all(self.pool())
            .await?
            .into_iter()
            .map(|r| RoomKeyRow {
                room_id: r.get(0),
                session_id: r.get(1),
                first_message_index: r.get(2),
                forwarded_count: r.get(3),
                is_verified: r.get::<i64, _>(4) != 0,
                session_data: r.get(5),
            })
            .collect())
    }
}

impl WriteTxn<'_> {
    /// The user's latest version that is not deleted.
    pub async fn current_backup_version(&mut self, user_id: &str) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT MAX(version) FROM backup_versions WHERE user_id = $1 AND deleted = 0",
        )
        .bind(user_id)
        .fetch_one(&mut *self.tx)
        .await?)
    }

    /// Takes the row lock of a version that is not deleted (on PostgreSQL a concurrent delete
    /// of it then waits for this transaction); false when there is no such version.
    pub async fn lock_backup_version(&mut self, user_id: &str, version: i64) -> Result<bool> {
        let locked = sqlx::query(
            "UPDATE backup_versions SET etag = etag \
             WHERE user_id = $1 AND version = $2 AND deleted = 0",
        )
        .bind(user_id)
        .bind(version)
        .execute(&mut *self.tx)
        .await?
        .rows_affected();
        Ok(locked > 0)
    }

    /// What the replacement rule needs of the stored key of a session, if any.
    pub async fn room_key_rank(
        &mut self,
        user_id: &str,
        version: i64,
        room_id: &str,
        session_id: &str,
    ) -> Result<Option<KeyRank>> {
        Ok(sqlx::query(
            "SELECT is_verified, first_message_index, forwarded_count FROM backup_keys \
             WHERE user_id = $1 AND version = $2 AND room_id = $3 AND session_id = $4",
        )
        .bind(user_id)
        .bind(version)
        .bind(room_id)
        .bind(session_id)
        .fetch_optional(&mut *self.tx)
        .await?
        .map(|r| KeyRank {
            is_verified: r.get::<i64, _>(0) != 0,
            first_message_index: r.get(1),
            forwarded_count: r.get(2),
        }))
    }

    /// Stores a session's key, replacing the one stored.
    pub async fn put_room_key(
        &mut self,
        user_id: &str,
        version: i64,
        room_id: &str,
        session_id: &str,
        key: &KeyBackupData,
    ) -> Result<()> {
        let rank = key.rank();
        sqlx::query(
            "INSERT INTO backup_keys (user_id, version, room_id, session_id, \
             first_message_index, forwarded_count, is_verified, session_data) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (user_id, version, room_id, session_id) DO UPDATE SET \
             first_message_index = $5, forwarded_count = $6, is_verified = $7, \
             session_data = $8",
        )
        .bind(user_id)
        .bind(version)
        .bind(room_id)
        .bind(session_id)
        .bind(rank.first_message_index)
        .bind(rank.forwarded_count)
        .bind(i64::from(rank.is_verified))
        .bind(serde_json::to_string(&key.session_data)?)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Deletes the keys of `scope` in a version; returns how many there were.
    pub async fn delete_room_keys(
        &mut self,
        user_id: &str,
        version: i64,
        scope: &KeyScope<'_>,
    ) -> Result<u64> {
        let sql = format!("DELETE FROM backup_keys WHERE {}", scope_filter(scope));
        let query = sqlx::query(AssertSqlSafe(sql)).bind(user_id).bind(version);
        Ok(bind_scope(query, scope)
            .execute(&mut *self.tx)
            .await?
            .rows_affected())
    }

    /// Moves a version's etag on: its stored keys changed.
    pub async fn advance_backup_etag(&mut self, user_id: &str, version: i64) -> Result<()> {
        sqlx::query(
            "UPDATE backup_versions SET etag = etag + 1 WHERE user_id = $1 AND version = $2",
        )
        .bind(user_id)
        .bind(version)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// A version's etag and key count.
    pub async fn backup_etag_and_count(
        &mut self,
        user_id: &str,
        version: i64,
    ) -> Result<(i64, i64)> {
        let row = sqlx::query(
            "SELECT v.etag, (SELECT COUNT(*) FROM backup_keys k \
             WHERE k.user_id = v.user_id AND k.version = v.version) \
             FROM backup_versions v WHERE v.user_id = $1 AND v.version = $2",
        )
        .bind(user_id)
        .bind(version)
        .fetch_one(&mut *self.tx)
        .await?;
        Ok((row.get(0), row.get(1)))
    }
}
