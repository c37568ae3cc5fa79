//! Accounts: users, devices, access and refresh tokens (stored as sha256 hashes), registration
//! tokens and user-interactive-auth sessions.

use sqlx::Row;

use sqlx::AssertSqlSafe;

use super::{now_ms, Store};
use crate::Result;

/// A user row.
#[derive(Debug, Clone)]
pub struct UserRow {
    pub user_id: String,
    pub password_hash: Option<String>,
    pub is_admin: bool,
    pub deactivated: bool,
    pub displayname: Option<String>,
    pub avatar_url: Option<String>,
}

/// What an access token resolves to.
#[derive(Debug, Clone)]
pub struct TokenOwner {
    pub user_id: String,
    pub device_id: String,
    pub expires_ts: Option<i64>,
}

/// A device row.
#[derive(Debug, Clone)]
pub struct DeviceRow {
    pub device_id: String,
    pub display_name: Option<String>,
    pub last_seen_ts: Option<i64>,
    pub last_seen_ip: Option<String>,
}

/// A registration token row.
#[derive(Debug, Clone)]
pub struct RegistrationTokenRow {
    pub token: String,
    pub uses_allowed: Option<i64>,
    pub completed: i64,
    pub expiry_ts: Option<i64>,
}

impl Store {
    pub async fn user(&self, user_id: &str) -> Result<Option<UserRow>> {
        let row = sqlx::query(
            "SELECT user_id, password_hash, is_admin, deactivated, displayname, avatar_url \
             FROM users WHERE user_id = $1",
        )
        .bind(user_id)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(|r| UserRow {
            user_id: r.get(0),
            password_hash: r.get(1),
            is_admin: r.get::<i64, _>(2) != 0,
            deactivated: r.get::<i64, _>(3) != 0,
            displayname: r.get(4),
            avatar_url: r.get(5),
        }))
    }

    /// Creates a user; returns false when the ID is taken.
    pub async fn create_user(
        &self,
        user_id: &str,
        password_hash: Option<&str>,
        is_admin: bool,
        displayname: &str,
    ) -> Result<bool> {
        let mut w = self.write().await?;
        let done = sqlx::query(
            "INSERT INTO users (user_id, password_hash, is_admin, created_ts, displayname) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (user_id) DO NOTHING",
        )
        .bind(user_id)
        .bind(password_hash)
        .bind(is_admin as i64)
        .bind(now_ms())
        .bind(displayname)
        .execute(&mut *w.tx)
        .await?
        .rows_affected();
        w.commit().await?;
        Ok(done == 1)
    }

    pub async fn set_password_hash(&self, user_id: &str, hash: Option<&str>) -> Result<bool> {
        let mut w = self.write().await?;
        let n = sqlx::query("UPDATE users SET password_hash = $2 WHERE user_id = $1")
            .bind(user_id)
            .bind(hash)
            .execute(&mut *w.tx)
            .await?
            .rows_affected();
        w.commit().await?;
        Ok(n == 1)
    }

    pub async fn set_deactivated(&self, user_id: &str) -> Result<()> {
        let mut w = self.write().await?;
        sqlx::query("UPDATE users SET deactivated = 1, password_hash = NULL WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut *w.tx)
            .await?;
        for table in [
            "access_tokens",
            "refresh_tokens",
            "devices",
            "device_keys",
            "one_time_keys",
            "fallback_keys",
            "to_device_messages",
            "push_queue",
            "pushers",
        ] {
            sqlx::query(AssertSqlSafe(format!(
                "DELETE FROM {table} WHERE user_id = $1"
            )))
            .bind(user_id)
            .execute(&mut *w.tx)
            .await?;
        }
        w.commit().await
    }

    pub async fn set_profile_field(
        &self,
        user_id: &str,
        displayname: Option<Option<&str>>,
        avatar_url: Option<Option<&str>>,
    ) -> Result<()> {
        let mut w = self.write().await?;
        if let Some(d) = displayname {
            sqlx::query("UPDATE users SET displayname = $2 WHERE user_id = $1")
                .bind(user_id)
                .bind(d)
                .execute(&mut *w.tx)
                .await?;
        }
        if let Some(a) = avatar_url {
            sqlx::query("UPDATE users SET avatar_url = $2 WHERE user_id = $1")
                .bind(user_id)
                .bind(a)
                .execute(&mut *w.tx)
                .await?;
        }
        w.commit().await
    }

    /// Creates or refreshes a device and issues its access token (and optional refresh token).
    pub async fn login_device(
        &self,
        user_id: &str,
        device_id: &str,
        display_name: Option<&str>,
        access_hash: &str,
        expires_ts: Option<i64>,
        refresh_hash: Option<&str>,
    ) -> Result<()> {
        let now = now_ms();
        let mut w = self.write().await?;
        sqlx::query(
            "INSERT INTO devices (user_id, device_id, display_name, created_ts, last_seen_ts) \
             VALUES ($1, $2, $3, $4, $4) ON CONFLICT (user_id, device_id) DO UPDATE SET \
             last_seen_ts = $4",
        )
        .bind(user_id)
        .bind(device_id)
        .bind(display_name)
        .bind(now)
        .execute(&mut *w.tx)
        .await?;
        // A re-used device ID replaces the device's old session.
        for table in ["access_tokens", "refresh_tokens"] {
            sqlx::query(AssertSqlSafe(format!(
                "DELETE FROM {table} WHERE user_id = $1 AND device_id = $2"
            )))
            .bind(user_id)
            .bind(device_id)
            .execute(&mut *w.tx)
            .await?;
        }
        insert_tokens(
            &mut w.tx,
            user_id,
            device_id,
            access_hash,
            expires_ts,
            refresh_hash,
            now,
        )
        .await?;
        w.commit().await
    }

    /// Exchanges a refresh token for new tokens; returns the owner or None if unknown.
    pub async fn rotate_refresh_token(
        &self,
        old_refresh_hash: &str,
        access_hash: &str,
        expires_ts: Option<i64>,
        refresh_hash: &str,
    ) -> Result<Option<(String, String)>> {
        let mut w = self.write().await?;
        let row =
            sqlx::query("SELECT user_id, device_id FROM refresh_tokens WHERE token_hash = $1")
                .bind(old_refresh_hash)
                .fetch_optional(&mut *w.tx)
                .await?;
        let Some(row) = row else { return Ok(None) };
        let (user_id, device_id): (String, String) = (row.get(0), row.get(1));
        for table in ["access_tokens", "refresh_tokens"] {
            sqlx::query(AssertSqlSafe(format!(
                "DELETE FROM {table} WHERE user_id = $1 AND device_id = $2"
            )))
            .bind(&user_id)
            .bind(&device_id)
            .execute(&mut *w.tx)
            .await?;
        }
        insert_tokens(
            &mut w.tx,
            &user_id,
            &device_id,
            access_hash,
            expires_ts,
            Some(refresh_hash),
            now_ms(),
        )
        .await?;
        w.commit().await?;
        Ok(Some((user_id, device_id)))
    }

    pub async fn token_owner(&self, token_hash: &str) -> Result<Option<TokenOwner>> {
        let row = sqlx::query(
            "SELECT user_id, device_id, expires_ts FROM access_tokens WHERE token_hash = $1",
        )
        .bind(token_hash)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(|r| TokenOwner {
            user_id: r.get(0),
            device_id: r.get(1),
            expires_ts: r.get(2),
        }))
    }

    pub async fn devices(&self, user_id: &str) -> Result<Vec<DeviceRow>> {
        let rows = sqlx::query(
            "SELECT device_id, display_name, last_seen_ts, last_seen_ip FROM devices \
             WHERE user_id = $1 ORDER BY device_id",
        )
        .bind(user_id)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| DeviceRow {
                device_id: r.get(0),
                display_name: r.get(1),
                last_seen_ts: r.get(2),
                last_seen_ip: r.get(3),
            })
            .collect())
    }

    pub async fn rename_device(&self, user_id: &str, device_id: &str, name: &str) -> Result<bool> {
        let mut w = self.write().await?;
        let n = sqlx::query(
            "UPDATE devices SET display_name = $3 WHERE user_id = $1 AND device_id = $2",
        )
        .bind(user_id)
        .bind(device_id)
        .bind(name)
        .execute(&mut *w.tx)
        .await?
        .rows_affected();
        w.commit().await?;
        Ok(n == 1)
    }

    // Registration tokens ------------------------------------------------------------------

    pub async fn create_registration_token(
        &self,
        token: &str,
        uses_allowed: Option<i64>,
        expiry_ts: Option<i64>,
    ) -> Result<bool> {
        let mut w = self.write().await?;
        let n = sqlx::query(
            "INSERT INTO registration_tokens (token, uses_allowed, expiry_ts, created_ts) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (token) DO NOTHING",
        )
        .bind(token)
        .bind(uses_allowed)
        .bind(expiry_ts)
        .bind(now_ms())
        .execute(&mut *w.tx)
        .await?
        .rows_affected();
        w.commit().await?;
        Ok(n == 1)
    }

    pub async fn registration_tokens(&self) -> Result<Vec<RegistrationTokenRow>> {
        let rows = sqlx::query(
            "SELECT token, uses_allowed, completed, expiry_ts FROM registration_tokens \
             ORDER BY token",
        )
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| RegistrationTokenRow {
                token: r.get(0),
                uses_allowed: r.get(1),
                completed: r.get(2),
                expiry_ts: r.get(3),
            })
            .collect())
    }

    pub async fn delete_registration_token(&self, token: &str) -> Result<bool> {
        let mut w = self.write().await?;
        let n = sqlx::query("DELETE FROM registration_tokens WHERE token = $1")
            .bind(token)
            .execute(&mut *w.tx)
            .await?
            .rows_affected();
        w.commit().await?;
        Ok(n == 1)
    }

    /// Whether a registration token can be used now.
    pub async fn registration_token_valid(&self, token: &str) -> Result<bool> {
        let row = sqlx::query(
            "SELECT uses_allowed, completed, expiry_ts FROM registration_tokens WHERE token = $1",
        )
        .bind(token)
        .fetch_optional(self.pool())
        .await?;
        Ok(match row {
            None => false,
            Some(r) => {
                let uses: Option<i64> = r.get(0);
                let done: i64 = r.get(1);
                let expiry: Option<i64> = r.get(2);
                uses.is_none_or(|u| done < u) && expiry.is_none_or(|e| e > now_ms())
            }
        })
    }

    /// Counts one completed registration against a token; false if it was used up meanwhile.
    pub async fn consume_registration_token(&self, token: &str) -> Result<bool> {
        let mut w = self.write().await?;
        let n = sqlx::query(
            "UPDATE registration_tokens SET completed = completed + 1 WHERE token = $1 \
             AND (uses_allowed IS NULL OR completed < uses_allowed)",
        )
        .bind(token)
        .execute(&mut *w.tx)
        .await?
        .rows_affected();
        w.commit().await?;
        Ok(n == 1)
    }

    // UIA sessions -------------------------------------------------------------------------

    pub async fn uia_session(&self, session: &str) -> Result<Option<(Option<String>, String)>> {
        let row = sqlx::query("SELECT user_id, completed FROM uia_sessions WHERE session_id = $1")
            .bind(session)
            .fetch_optional(self.pool())
            .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    pub async fn put_uia_session(
        &self,
        session: &str,
        user_id: Option<&str>,
        completed: &str,
    ) -> Result<()> {
        let mut w = self.write().await?;
        sqlx::query(
            "INSERT INTO uia_sessions (session_id, user_id, completed, created_ts) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (session_id) DO UPDATE SET completed = $3",
        )
        .bind(session)
        .bind(user_id)
        .bind(completed)
        .bind(now_ms())
        .execute(&mut *w.tx)
        .await?;
        // Sessions older than a day are abandoned.
        sqlx::query("DELETE FROM uia_sessions WHERE created_ts < $1")
            .bind(now_ms() - 86_400_000)
            .execute(&mut *w.tx)
            .await?;
        w.commit().await
    }

    pub async fn delete_uia_session(&self, session: &str) -> Result<()> {
        let mut w = self.write().await?;
        sqlx::query("DELETE FROM uia_sessions WHERE session_id = $1")
            .bind(session)
            .execute(&mut *w.tx)
            .await?;
        w.commit().await
    }
}

async fn insert_tokens(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    user_id: &str,
    device_id: &str,
    access_hash: &str,
    expires_ts: Option<i64>,
    refresh_hash: Option<&str>,
    now: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO access_tokens (token_hash, user_id, device_id, expires_ts, created_ts) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(access_hash)
    .bind(user_id)
    .bind(device_id)
    .bind(expires_ts)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    if let Some(r) = refresh_hash {
        sqlx::query(
            "INSERT INTO refresh_tokens (token_hash, user_id, device_id, created_ts) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(r)
        .bind(user_id)
        .bind(device_id)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

impl super::WriteTxn<'_> {
    /// A user's device IDs.
    pub async fn device_ids(&mut self, user_id: &str) -> Result<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT device_id FROM devices WHERE user_id = $1")
                .bind(user_id)
                .fetch_all(&mut *self.tx)
                .await?,
        )
    }

    /// Deletes a device with its tokens and everything E2EE of it (keys, one-time and
    /// fallback keys, waiting to-device messages, signatures on it).
    pub async fn delete_device(&mut self, user_id: &str, device_id: &str) -> Result<()> {
        for table in [
            "access_tokens",
            "refresh_tokens",
            "devices",
            "device_keys",
            "one_time_keys",
            "fallback_keys",
            "to_device_messages",
        ] {
            sqlx::query(AssertSqlSafe(format!(
                "DELETE FROM {table} WHERE user_id = $1 AND device_id = $2"
            )))
            .bind(user_id)
            .bind(device_id)
            .execute(&mut *self.tx)
            .await?;
        }
        sqlx::query("DELETE FROM key_signatures WHERE target_user_id = $1 AND target_key_id = $2")
            .bind(user_id)
            .bind(device_id)
            .execute(&mut *self.tx)
            .await?;
        self.delete_device_pushers(user_id, device_id).await?;
        Ok(())
    }
}
