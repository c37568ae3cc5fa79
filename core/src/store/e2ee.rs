//! End-to-end encryption data: device and cross-signing keys, one-time and fallback keys,
//! uploaded signatures, to-device messages, the device-list stream and other servers' device
//! lists. What changes together is written through one [`WriteTxn`].

use std::collections::{BTreeMap, HashMap};

use sqlx::{AssertSqlSafe, Row};

use super::{now_ms, Backend, Store, WriteTxn};
use crate::{Error, Result};

/// Largest number of values in one `IN (…)` list.
const IN_CHUNK: usize = 500;

/// `$start, $start+1, …` for `n` values.
fn marks(start: usize, n: usize) -> String {
    (start..start + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A device's uploaded identity keys with its display name.
#[derive(Debug, Clone)]
pub struct DeviceKeysRow {
    pub user_id: String,
    pub device_id: String,
    pub key_json: String,
    pub display_name: Option<String>,
}

/// A signature uploaded through `/keys/signatures/upload`.
#[derive(Debug, Clone)]
pub struct SignatureRow {
    pub target_user_id: String,
    pub target_key_id: String,
    pub signer_user_id: String,
    pub signer_key_id: String,
    pub signature: String,
}

/// A to-device message waiting for its device.
#[derive(Debug, Clone)]
pub struct ToDeviceRow {
    pub stream_id: i64,
    pub sender: String,
    pub event_type: String,
    pub content: String,
}

/// A to-device message to store: `(stream_id, user, device, sender, type, content)`.
pub type NewToDevice = (i64, String, String, String, String, String);

/// What we hold of another server's user's devices.
#[derive(Debug, Clone)]
pub struct RemoteDeviceList {
    pub stream_id: i64,
    pub devices: String,
    pub master_key: Option<String>,
    pub self_signing_key: Option<String>,
}

impl Store {
    /// Uploaded device keys of these users' existing devices.
    pub async fn device_keys_of(&self, users: &[String]) -> Result<Vec<DeviceKeysRow>> {
        let mut out = Vec::new();
        for chunk in users.chunks(IN_CHUNK) {
            let sql = format!(
                "SELECT k.user_id, k.device_id, k.key_json, d.display_name FROM device_keys k \
                 JOIN devices d ON d.user_id = k.user_id AND d.device_id = k.device_id \
                 WHERE k.user_id IN ({})",
                marks(1, chunk.len())
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for u in chunk {
                q = q.bind(u);
            }
            for r in q.fetch_all(self.pool()).await? {
                out.push(DeviceKeysRow {
                    user_id: r.get(0),
                    device_id: r.get(1),
                    key_json: r.get(2),
                    display_name: r.get(3),
                });
            }
        }
        Ok(out)
    }

    /// `(user, key_type, key_json)` of these users' cross-signing keys.
    pub async fn cross_signing_keys_of(
        &self,
        users: &[String],
    ) -> Result<Vec<(String, String, String)>> {
        let mut out = Vec::new();
        for chunk in users.chunks(IN_CHUNK) {
            let sql = format!(
                "SELECT user_id, key_type, key_json FROM cross_signing_keys \
                 WHERE user_id IN ({})",
                marks(1, chunk.len())
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for u in chunk {
                q = q.bind(u);
            }
            for r in q.fetch_all(self.pool()).await? {
                out.push((r.get(0), r.get(1), r.get(2)));
            }
        }
        Ok(out)
    }

    /// Uploaded signatures on these users' keys.
    pub async fn signatures_on(&self, users: &[String]) -> Result<Vec<SignatureRow>> {
        let mut out = Vec::new();
        for chunk in users.chunks(IN_CHUNK) {
            let sql = format!(
                "SELECT target_user_id, target_key_id, signer_user_id, signer_key_id, signature \
                 FROM key_signatures WHERE target_user_id IN ({})",
                marks(1, chunk.len())
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for u in chunk {
                q = q.bind(u);
            }
            for r in q.fetch_all(self.pool()).await? {
                out.push(SignatureRow {
                    target_user_id: r.get(0),
                    target_key_id: r.get(1),
                    signer_user_id: r.get(2),
                    signer_key_id: r.get(3),
                    signature: r.get(4),
                });
            }
        }
        Ok(out)
    }

    /// The number of unclaimed one-time keys of a device, per algorithm.
    pub async fn one_time_key_counts(
        &self,
        user_id: &str,
        device_id: &str,
    ) -> Result<BTreeMap<String, i64>> {
        one_time_key_counts(self.pool(), user_id, device_id).await
    }

    /// The algorithms of a device's fallback keys not yet handed out.
    pub async fn unused_fallback_key_types(
        &self,
        user_id: &str,
        device_id: &str,
    ) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT algorithm FROM fallback_keys WHERE user_id = $1 AND device_id = $2 \
             AND used = 0 ORDER BY algorithm",
        )
        .bind(user_id)
        .bind(device_id)
        .fetch_all(self.pool())
        .await?)
    }

    /// Claims one key per `(user, device, algorithm)`: an unclaimed one-time key (deleted as it
    /// is handed out, so no two claims get the same one), else the fallback key (marked used).
    /// Returns `(user, device, "<algorithm>:<key id>", key JSON)` for those that had one.
    pub async fn claim_keys(
        &self,
        wanted: &[(String, String, String)],
    ) -> Result<Vec<(String, String, String, String)>> {
        let claim_sql = match self.backend() {
            // Concurrent claimers skip each other's locked rows instead of waiting to find
            // them gone.
            Backend::Postgres => {
                "DELETE FROM one_time_keys WHERE (user_id, device_id, algorithm, key_id) IN \
                 (SELECT user_id, device_id, algorithm, key_id FROM one_time_keys \
                  WHERE user_id = $1 AND device_id = $2 AND algorithm = $3 \
                  ORDER BY key_id LIMIT 1 FOR UPDATE SKIP LOCKED) \
                 RETURNING key_id, key_json"
            }
            // SQLite write transactions are serialised.
            Backend::Sqlite => {
                "DELETE FROM one_time_keys WHERE rowid IN \
                 (SELECT rowid FROM one_time_keys \
                  WHERE user_id = $1 AND device_id = $2 AND algorithm = $3 \
                  ORDER BY key_id LIMIT 1) \
                 RETURNING key_id, key_json"
            }
        };
        let mut w = self.write().await?;
        let mut out = Vec::with_capacity(wanted.len());
        for (user, device, alg) in wanted {
            let row = sqlx::query(claim_sql)
                .bind(user)
                .bind(device)
                .bind(alg)
                .fetch_optional(&mut *w.tx)
                .await?;
            if let Some(r) = row {
                let key_id: String = r.get(0);
                out.push((
                    user.clone(),
                    device.clone(),
                    format!("{alg}:{key_id}"),
                    r.get(1),
                ));
                continue;
            }
            let fallback = sqlx::query(
                "UPDATE fallback_keys SET used = 1 \
                 WHERE user_id = $1 AND device_id = $2 AND algorithm = $3 \
                 RETURNING key_id, key_json",
            )
            .bind(user)
            .bind(device)
            .bind(alg)
            .fetch_optional(&mut *w.tx)
            .await?;
            if let Some(r) = fallback {
                let key_id: String = r.get(0);
                out.push((
                    user.clone(),
                    device.clone(),
                    format!("{alg}:{key_id}"),
                    r.get(1),
                ));
            }
        }
        w.commit().await?;
        Ok(out)
    }

    /// Users whose device lists changed in `(from, to]`.
    pub async fn device_list_changes(&self, from: i64, to: i64) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT user_id FROM device_list_changes \
             WHERE stream_id > $1 AND stream_id <= $2",
        )
        .bind(from)
        .bind(to)
        .fetch_all(self.pool())
        .await?)
    }

    /// The position of a user's latest device change (the `stream_id` of `/user/devices`).
    pub async fn device_list_position(&self, user_id: &str) -> Result<i64> {
        let v: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(stream_id) FROM device_list_changes \
             WHERE user_id = $1 AND device_id IS NOT NULL",
        )
        .bind(user_id)
        .fetch_one(self.pool())
        .await?;
        Ok(v.unwrap_or(0))
    }

    pub async fn max_device_list_stream(&self) -> Result<i64> {
        let v: Option<i64> = sqlx::query_scalar("SELECT MAX(stream_id) FROM device_list_changes")
            .fetch_one(self.pool())
            .await?;
        Ok(v.unwrap_or(0))
    }

    /// The highest to-device position ever used: messages are deleted once read, so the
    /// high-water mark is also kept in `server_meta`.
    pub async fn max_to_device_stream(&self) -> Result<i64> {
        let held: Option<i64> = sqlx::query_scalar("SELECT MAX(stream_id) FROM to_device_messages")
            .fetch_one(self.pool())
            .await?;
        let mark: Option<String> = sqlx::query_scalar(
            "SELECT meta_value FROM server_meta WHERE meta_key = 'to_device_stream'",
        )
        .fetch_optional(self.pool())
        .await?;
        let mark = mark.and_then(|m| m.parse::<i64>().ok()).unwrap_or(0);
        Ok(held.unwrap_or(0).max(mark))
    }

    /// A device's to-device messages in `(after, upto]`, oldest first, at most `limit`.
    pub async fn to_device_messages(
        &self,
        user_id: &str,
        device_id: &str,
        after: i64,
        upto: i64,
        limit: i64,
    ) -> Result<Vec<ToDeviceRow>> {
        Ok(sqlx::query(
            "SELECT stream_id, sender, event_type, content FROM to_device_messages \
             WHERE user_id = $1 AND device_id = $2 AND stream_id > $3 AND stream_id <= $4 \
             ORDER BY stream_id LIMIT $5",
        )
        .bind(user_id)
        .bind(device_id)
        .bind(after)
        .bind(upto)
        .bind(limit)
        .fetch_all(self.pool())
        .await?
        .into_iter()
        .map(|r| ToDeviceRow {
            stream_id: r.get(0),
            sender: r.get(1),
            event_type: r.get(2),
            content: r.get(3),
        })
        .collect())
    }

    /// Deletes the messages a device has acknowledged (positions ≤ `upto`), keeping the
    /// stream's high-water mark. Does nothing (and writes nothing) when none are waiting.
    pub async fn ack_to_device(&self, user_id: &str, device_id: &str, upto: i64) -> Result<()> {
        let waiting: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(stream_id) FROM to_device_messages \
             WHERE user_id = $1 AND device_id = $2 AND stream_id <= $3",
        )
        .bind(user_id)
        .bind(device_id)
        .bind(upto)
        .fetch_one(self.pool())
        .await?;
        let Some(highest) = waiting else {
            return Ok(());
        };
        let mut w = self.write().await?;
        sqlx::query(
            "DELETE FROM to_device_messages \
             WHERE user_id = $1 AND device_id = $2 AND stream_id <= $3",
        )
        .bind(user_id)
        .bind(device_id)
        .bind(upto)
        .execute(&mut *w.tx)
        .await?;
        let current: Option<String> = sqlx::query_scalar(
            "SELECT meta_value FROM server_meta WHERE meta_key = 'to_device_stream'",
        )
        .fetch_optional(&mut *w.tx)
        .await?;
        if current.and_then(|c| c.parse::<i64>().ok()).unwrap_or(0) < highest {
            sqlx::query(
                "INSERT INTO server_meta (meta_key, meta_value) VALUES ('to_device_stream', $1) \
                 ON CONFLICT (meta_key) DO UPDATE SET meta_value = excluded.meta_value",
            )
            .bind(highest.to_string())
            .execute(&mut *w.tx)
            .await?;
        }
        w.commit().await
    }

    /// What we hold of a remote user's device list.
    pub async fn remote_device_list(&self, user_id: &str) -> Result<Option<RemoteDeviceList>> {
        Ok(sqlx::query(
            "SELECT stream_id, devices, master_key, self_signing_key FROM remote_device_lists \
             WHERE user_id = $1",
        )
        .bind(user_id)
        .fetch_optional(self.pool())
        .await?
        .map(|r| RemoteDeviceList {
            stream_id: r.get(0),
            devices: r.get(1),
            master_key: r.get(2),
            self_signing_key: r.get(3),
        }))
    }

    /// The device lists we hold of these remote users.
    pub async fn remote_device_lists(
        &self,
        users: &[String],
    ) -> Result<HashMap<String, RemoteDeviceList>> {
        let mut out = HashMap::new();
        for chunk in users.chunks(IN_CHUNK) {
            let sql = format!(
                "SELECT user_id, stream_id, devices, master_key, self_signing_key \
                 FROM remote_device_lists WHERE user_id IN ({})",
                marks(1, chunk.len())
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for u in chunk {
                q = q.bind(u);
            }
            for r in q.fetch_all(self.pool()).await? {
                out.insert(
                    r.get(0),
                    RemoteDeviceList {
                        stream_id: r.get(1),
                        devices: r.get(2),
                        master_key: r.get(3),
                        self_signing_key: r.get(4),
                    },
                );
            }
        }
        Ok(out)
    }
}

async fn one_time_key_counts<'e, E>(
    exec: E,
    user_id: &str,
    device_id: &str,
) -> Result<BTreeMap<String, i64>>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    Ok(sqlx::query(
        "SELECT algorithm, COUNT(*) FROM one_time_keys WHERE user_id = $1 AND device_id = $2 \
         GROUP BY algorithm",
    )
    .bind(user_id)
    .bind(device_id)
    .fetch_all(exec)
    .await?
    .into_iter()
    .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1)))
    .collect())
}

// Writes inside a caller's transaction ---------------------------------------------------------

impl WriteTxn<'_> {
    /// The stored device keys of a device.
    pub async fn device_keys(&mut self, user_id: &str, device_id: &str) -> Result<Option<String>> {
        Ok(sqlx::query_scalar(
            "SELECT key_json FROM device_keys WHERE user_id = $1 AND device_id = $2",
        )
        .bind(user_id)
        .bind(device_id)
        .fetch_optional(&mut *self.tx)
        .await?)
    }

    pub async fn put_device_keys(
        &mut self,
        user_id: &str,
        device_id: &str,
        json: &str,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO device_keys (user_id, device_id, key_json) VALUES ($1, $2, $3) \
             ON CONFLICT (user_id, device_id) DO UPDATE SET key_json = excluded.key_json",
        )
        .bind(user_id)
        .bind(device_id)
        .bind(json)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Adds one-time keys `(algorithm, key id, JSON)`. A key ID already held with other
    /// content is refused (`M_INVALID_PARAM`); the same content again is a no-op.
    pub async fn add_one_time_keys(
        &mut self,
        user_id: &str,
        device_id: &str,
        keys: &[(String, String, String)],
    ) -> Result<()> {
        for (alg, key_id, json) in keys {
            let held: Option<String> = sqlx::query_scalar(
                "SELECT key_json FROM one_time_keys WHERE user_id = $1 AND device_id = $2 \
                 AND algorithm = $3 AND key_id = $4",
            )
            .bind(user_id)
            .bind(device_id)
            .bind(alg)
            .bind(key_id)
            .fetch_optional(&mut *self.tx)
            .await?;
            match held {
                Some(h) if same_json(&h, json) => continue,
                Some(_) => {
                    return Err(Error::invalid_param(format!(
                        "One-time key {alg}:{key_id} already exists with other content"
                    )))
                }
                None => {}
            }
            sqlx::query(
                "INSERT INTO one_time_keys (user_id, device_id, algorithm, key_id, key_json) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(user_id)
            .bind(device_id)
            .bind(alg)
            .bind(key_id)
            .bind(json)
            .execute(&mut *self.tx)
            .await?;
        }
        Ok(())
    }

    /// Sets a device's fallback key for an algorithm (unused again unless it is the same key).
    pub async fn put_fallback_key(
        &mut self,
        user_id: &str,
        device_id: &str,
        (alg, key_id, json): &(String, String, String),
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO fallback_keys (user_id, device_id, algorithm, key_id, key_json, used) \
             VALUES ($1, $2, $3, $4, $5, 0) ON CONFLICT (user_id, device_id, algorithm) DO UPDATE \
             SET used = CASE WHEN fallback_keys.key_id = excluded.key_id \
                 AND fallback_keys.key_json = excluded.key_json THEN fallback_keys.used ELSE 0 END, \
             key_id = excluded.key_id, key_json = excluded.key_json",
        )
        .bind(user_id)
        .bind(device_id)
        .bind(alg)
        .bind(key_id)
        .bind(json)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    pub async fn one_time_key_counts(
        &mut self,
        user_id: &str,
        device_id: &str,
    ) -> Result<BTreeMap<String, i64>> {
        one_time_key_counts(&mut *self.tx, user_id, device_id).await
    }

    /// Records a change of a user's device list at `stream_id`: of one device (`Some`), or of
    /// the user's cross-signing keys or a remote user's list (`None`). For a device change,
    /// returns the user's previous device change (the `prev_id` of the EDU telling other
    /// servers).
    pub async fn device_list_changed(
        &mut self,
        user_id: &str,
        device_id: Option<&str>,
        stream_id: i64,
    ) -> Result<Option<i64>> {
        let prev: Option<i64> = match device_id {
            Some(_) => {
                sqlx::query_scalar(
                    "SELECT MAX(stream_id) FROM device_list_changes \
                     WHERE user_id = $1 AND device_id IS NOT NULL",
                )
                .bind(user_id)
                .fetch_one(&mut *self.tx)
                .await?
            }
            None => None,
        };
        sqlx::query(
            "INSERT INTO device_list_changes (stream_id, user_id, device_id) VALUES ($1, $2, $3)",
        )
        .bind(stream_id)
        .bind(user_id)
        .bind(device_id)
        .execute(&mut *self.tx)
        .await?;
        Ok(prev)
    }

    /// A user's cross-signing key of one type.
    pub async fn cross_signing_key(
        &mut self,
        user_id: &str,
        key_type: &str,
    ) -> Result<Option<String>> {
        Ok(sqlx::query_scalar(
            "SELECT key_json FROM cross_signing_keys WHERE user_id = $1 AND key_type = $2",
        )
        .bind(user_id)
        .bind(key_type)
        .fetch_optional(&mut *self.tx)
        .await?)
    }

    pub async fn put_cross_signing_key(
        &mut self,
        user_id: &str,
        key_type: &str,
        json: &str,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO cross_signing_keys (user_id, key_type, key_json) VALUES ($1, $2, $3) \
             ON CONFLICT (user_id, key_type) DO UPDATE SET key_json = excluded.key_json",
        )
        .bind(user_id)
        .bind(key_type)
        .bind(json)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    pub async fn put_signature(&mut self, s: &SignatureRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO key_signatures (target_user_id, target_key_id, signer_user_id, \
             signer_key_id, signature) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (target_user_id, target_key_id, signer_user_id, signer_key_id) \
             DO UPDATE SET signature = excluded.signature",
        )
        .bind(&s.target_user_id)
        .bind(&s.target_key_id)
        .bind(&s.signer_user_id)
        .bind(&s.signer_key_id)
        .bind(&s.signature)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Whether a sendToDevice transaction was already carried out; records it when not.
    pub async fn first_to_device_txn(
        &mut self,
        user_id: &str,
        device_id: &str,
        txn_id: &str,
    ) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO to_device_txns (user_id, device_id, txn_id, created_ts) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (user_id, device_id, txn_id) DO NOTHING",
        )
        .bind(user_id)
        .bind(device_id)
        .bind(txn_id)
        .bind(now_ms())
        .execute(&mut *self.tx)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn insert_to_device(&mut self, rows: Vec<NewToDevice>) -> Result<()> {
        let rows = rows
            .into_iter()
            .map(|(id, u, d, s, t, c)| {
                use super::batch::V;
                vec![V::I(id), V::S(u), V::S(d), V::S(s), V::S(t), V::S(c)]
            })
            .collect();
        super::batch::insert_rows(
            &mut self.tx,
            "INSERT INTO to_device_messages (stream_id, user_id, device_id, sender, event_type, \
             content)",
            6,
            rows,
            "",
        )
        .await
    }

    /// Queues EDUs `(destination, JSON)` for other servers.
    pub async fn queue_edus(&mut self, edus: &[(String, String)]) -> Result<()> {
        let now = now_ms();
        for (dest, edu) in edus {
            sqlx::query(
                "INSERT INTO federation_outbox (destination, edu, created_ts) VALUES ($1, $2, $3)",
            )
            .bind(dest)
            .bind(edu)
            .bind(now)
            .execute(&mut *self.tx)
            .await?;
        }
        Ok(())
    }

    /// Replaces what we hold of a remote user's device list.
    /// Keeps a remote user's device list, unless what is held has moved on: with `expected`,
    /// only over the list at that stream position (an update applied to what was read);
    /// without, only over a list no newer than this one (a whole list fetched from the
    /// user's server, which may arrive after an update that followed it). Answers whether
    /// it was kept.
    pub async fn put_remote_device_list(
        &mut self,
        user_id: &str,
        list: &RemoteDeviceList,
        expected: Option<i64>,
    ) -> Result<bool> {
        let guard = if expected.is_some() {
            "remote_device_lists.stream_id = $7"
        } else {
            "remote_device_lists.stream_id <= excluded.stream_id"
        };
        let sql = format!(
            "INSERT INTO remote_device_lists (user_id, stream_id, devices, master_key, \
             self_signing_key, updated_ts) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (user_id) DO UPDATE SET stream_id = excluded.stream_id, \
             devices = excluded.devices, master_key = excluded.master_key, \
             self_signing_key = excluded.self_signing_key, updated_ts = excluded.updated_ts \
             WHERE {guard}"
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(user_id)
            .bind(list.stream_id)
            .bind(&list.devices)
            .bind(&list.master_key)
            .bind(&list.self_signing_key)
            .bind(now_ms());
        if let Some(e) = expected {
            q = q.bind(e);
        }
        Ok(q.execute(&mut *self.tx).await?.rows_affected() > 0)
    }
}

/// Whether two JSON texts hold the same value.
fn same_json(a: &str, b: &str) -> bool {
    a == b
        || matches!(
            (
                serde_json::from_str::<serde_json::Value>(a),
                serde_json::from_str::<serde_json::Value>(b)
            ),
            (Ok(x), Ok(y)) if x == y
        )
}
