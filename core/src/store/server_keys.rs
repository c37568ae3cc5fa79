//! Other servers' signing keys and their latest key responses (migration 0003), for the
//! federation key ring and the notary endpoints.

use sqlx::Row;

use super::Store;
use crate::Result;

/// One stored verify key of a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerKeyRow {
    /// `ed25519:<version>`.
    pub key_id: String,
    /// Unpadded base64.
    pub public_key: String,
    /// Until when the key may be used (ms), already bounded by fetch time + 7 days.
    pub valid_until_ts: i64,
    /// For keys from `old_verify_keys`: when the key stopped being used (ms).
    pub expired_ts: Option<i64>,
}

/// A server's latest key response as received.
#[derive(Debug, Clone)]
pub struct ServerKeyResponse {
    pub response_json: String,
    pub valid_until_ts: i64,
    pub fetched_ts: i64,
}

impl Store {
    /// All stored keys of `server_name`.
    pub async fn server_keys(&self, server_name: &str) -> Result<Vec<ServerKeyRow>> {
        Ok(sqlx::query(
            "SELECT key_id, public_key, valid_until_ts, expired_ts FROM server_keys \
             WHERE server_name = $1",
        )
        .bind(server_name)
        .fetch_all(self.pool())
        .await?
        .into_iter()
        .map(|r| ServerKeyRow {
            key_id: r.get(0),
            public_key: r.get(1),
            valid_until_ts: r.get(2),
            expired_ts: r.get(3),
        })
        .collect())
    }

    /// Stores the keys of one verified key response of `server_name` (replacing what was known
    /// about the same key IDs) and the response itself.
    pub async fn put_server_keys(
        &self,
        server_name: &str,
        keys: &[ServerKeyRow],
        response: &ServerKeyResponse,
    ) -> Result<()> {
        let mut w = self.write().await?;
        for key in keys {
            sqlx::query(
                "INSERT INTO server_keys \
                 (server_name, key_id, public_key, valid_until_ts, expired_ts, fetched_ts) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (server_name, key_id) \
                 DO UPDATE SET public_key = $3, valid_until_ts = $4, expired_ts = $5, \
                 fetched_ts = $6",
            )
            .bind(server_name)
            .bind(&key.key_id)
            .bind(&key.public_key)
            .bind(key.valid_until_ts)
            .bind(key.expired_ts)
            .bind(response.fetched_ts)
            .execute(&mut *w.tx)
            .await?;
        }
        sqlx::query(
            "INSERT INTO server_key_responses \
             (server_name, response_json, valid_until_ts, fetched_ts) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (server_name) DO UPDATE SET response_json = $2, valid_until_ts = $3, \
             fetched_ts = $4",
        )
        .bind(server_name)
        .bind(&response.response_json)
        .bind(response.valid_until_ts)
        .bind(response.fetched_ts)
        .execute(&mut *w.tx)
        .await?;
        w.commit().await
    }

    /// The latest stored key response of `server_name`.
    pub async fn server_key_response(
        &self,
        server_name: &str,
    ) -> Result<Option<ServerKeyResponse>> {
        Ok(sqlx::query(
            "SELECT response_json, valid_until_ts, fetched_ts FROM server_key_responses \
             WHERE server_name = $1",
        )
        .bind(server_name)
        .fetch_optional(self.pool())
        .await?
        .map(|r| ServerKeyResponse {
            response_json: r.get(0),
            valid_until_ts: r.get(1),
            fetched_ts: r.get(2),
        }))
    }
}
