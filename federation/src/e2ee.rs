//! End-to-end encryption across servers: our users' keys served to other servers
//! (`/user/devices`, `/user/keys/query`, `/user/keys/claim`), other servers' users' keys asked
//! for our clients, and the EDUs that carry to-device messages and device-list changes.
//!
//! Other servers' users' device lists are kept in step with their `m.device_list_update`
//! EDUs; an EDU whose `prev_id` does not follow on from what we hold (or about a user we hold
//! nothing of) makes us resync the whole list through `/user/devices`.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use axum::{
    extract::{Path, State},
    Json,
};
use myelin_core::{
    e2ee::KeysAnswer,
    ruma::{OwnedServerName, OwnedUserId, ServerName},
    Error, Result,
};
use serde_json::{json, Map, Value};

use crate::{
    auth::Signed, inbound::encode, outbound::remote_error, FedResult, FedState, Federation,
};

/// Longest wait for another server's keys when the client gives no `timeout`.
pub const DEFAULT_KEYS_TIMEOUT: Duration = Duration::from_secs(10);

/// `user → device IDs` (empty: all devices).
pub type DeviceQuery = BTreeMap<String, Vec<String>>;
/// `user → device → algorithm`.
pub type ClaimQuery = BTreeMap<String, BTreeMap<String, String>>;

/// Device-list resyncs in flight: user → whether another was asked for meanwhile.
pub(crate) type Resyncs = std::sync::Mutex<std::collections::HashMap<OwnedUserId, bool>>;

/// Parses `device_keys` of a keys query (`user → [device IDs]`).
pub fn parse_device_query(v: Option<&Value>) -> Result<DeviceQuery> {
    let o = v
        .and_then(Value::as_object)
        .ok_or_else(|| Error::bad_json("device_keys must be an object"))?;
    let mut out = DeviceQuery::new();
    for (user, devices) in o {
        let devices = devices
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|d| d.as_str().map(str::to_owned))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| Error::bad_json("device_keys values must be arrays of device IDs"))?;
        out.insert(user.clone(), devices);
    }
    Ok(out)
}

/// Parses `one_time_keys` of a claim (`user → device → algorithm`).
pub fn parse_claim_query(v: Option<&Value>) -> Result<ClaimQuery> {
    let o = v
        .and_then(Value::as_object)
        .ok_or_else(|| Error::bad_json("one_time_keys must be an object"))?;
    let mut out = ClaimQuery::new();
    for (user, devices) in o {
        let devices = devices
            .as_object()
            .and_then(|m| {
                m.iter()
                    .map(|(d, a)| Some((d.clone(), a.as_str()?.to_owned())))
                    .collect::<Option<BTreeMap<_, _>>>()
            })
            .ok_or_else(|| {
                Error::bad_json("one_time_keys values must map devices to algorithms")
            })?;
        out.insert(user.clone(), devices);
    }
    Ok(out)
}

/// Splits a query by server; users with invalid IDs are dropped.
pub fn by_server<T: Clone>(
    q: &BTreeMap<String, T>,
) -> BTreeMap<OwnedServerName, BTreeMap<String, T>> {
    let mut out: BTreeMap<OwnedServerName, BTreeMap<String, T>> = BTreeMap::new();
    for (user, v) in q {
        if let Ok(u) = OwnedUserId::try_from(user.as_str()) {
            out.entry(u.server_name().to_owned())
                .or_default()
                .insert(user.clone(), v.clone());
        }
    }
    out
}

/// Adds `from`'s `field` entries for users of `server` to `into`.
fn merge_users(into: &mut Map<String, Value>, from: &Value, field: &str, server: &ServerName) {
    let Some(m) = from.get(field).and_then(Value::as_object) else {
        return;
    };
    for (user, v) in m {
        let theirs = OwnedUserId::try_from(user.as_str()).is_ok_and(|u| u.server_name() == server);
        if theirs {
            into.insert(user.clone(), v.clone());
        }
    }
}

impl Federation {
    /// The EDUs of a transaction from `origin`. An EDU we cannot use is logged and skipped;
    /// only a failure of ours (the database) fails the transaction, so that it is retried
    /// rather than acknowledged and lost.
    pub async fn receive_edus(self: &Arc<Self>, origin: &ServerName, edus: &[Value]) -> Result<()> {
        for edu in edus {
            let ty = edu.get("edu_type").and_then(Value::as_str).unwrap_or("");
            let content = edu.get("content").cloned().unwrap_or(Value::Null);
            let outcome = match ty {
                "m.direct_to_device" => {
                    self.server
                        .receive_to_device(origin.as_str(), &content)
                        .await
                }
                "m.device_list_update" => self.device_list_update(origin, &content).await,
                "m.signing_key_update" => self.signing_key_update(origin, &content).await,
                "m.receipt" => {
                    self.server
                        .receive_receipts(origin.as_str(), &content)
                        .await
                }
                "m.typing" => self.server.receive_typing(origin.as_str(), &content).await,
                "m.presence" => {
                    self.server
                        .receive_presence(origin.as_str(), &content)
                        .await
                }
                _ => Ok(()),
            };
            match outcome {
                Ok(()) => {}
                Err(e @ Error::Matrix { .. }) => {
                    tracing::info!(origin = %origin, edu = ty, error = %e, "EDU not used");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The user an EDU is about, checked to be of `origin` and to share a room with us.
    async fn tracked_user(
        &self,
        origin: &ServerName,
        content: &Value,
    ) -> Result<Option<OwnedUserId>> {
        let user = content
            .get("user_id")
            .and_then(Value::as_str)
            .and_then(|u| OwnedUserId::try_from(u).ok())
            .ok_or_else(|| Error::bad_json("EDU lacks a valid user_id"))?;
        if user.server_name() != origin {
            return Err(Error::forbidden("EDU about a user of another server"));
        }
        if !self.server.shares_room_with_local(user.as_str()).await? {
            return Ok(None);
        }
        Ok(Some(user))
    }

    async fn device_list_update(
        self: &Arc<Self>,
        origin: &ServerName,
        content: &Value,
    ) -> Result<()> {
        let Some(user) = self.tracked_user(origin, content).await? else {
            return Ok(());
        };
        if !self.server.apply_device_list_update(content).await? {
            self.spawn_resync(user);
        }
        Ok(())
    }

    async fn signing_key_update(
        self: &Arc<Self>,
        origin: &ServerName,
        content: &Value,
    ) -> Result<()> {
        let Some(user) = self.tracked_user(origin, content).await? else {
            return Ok(());
        };
        if !self.server.apply_signing_key_update(content).await? {
            self.spawn_resync(user);
        }
        Ok(())
    }

    /// Resyncs a user's device list in the background: one fetch per user at a time, and
    /// one more after it when asked again meanwhile (the answer in flight may predate the
    /// change that asked).
    fn spawn_resync(self: &Arc<Self>, user: OwnedUserId) {
        {
            let mut running = self.resyncs.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(again) = running.get_mut(&user) {
                *again = true;
                return;
            }
            running.insert(user.clone(), false);
        }
        let fed = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = fed.resync_devices(&user).await {
                    tracing::info!(user = %user, error = %e, "device list resync failed");
                }
                let mut running = fed.resyncs.lock().unwrap_or_else(|e| e.into_inner());
                match running.get_mut(&user) {
                    Some(again) if *again => *again = false,
                    _ => {
                        running.remove(&user);
                        break;
                    }
                }
            }
        });
    }

    /// Fetches a remote user's whole device list through `/user/devices` and keeps it.
    pub async fn resync_devices(&self, user: &OwnedUserId) -> Result<()> {
        let path = format!(
            "/_matrix/federation/v1/user/devices/{}",
            encode(user.as_str())
        );
        let answer = self
            .client
            .request(user.server_name(), http::Method::GET, &path, None)
            .await
            .map_err(|e| remote_error("device list", e))?;
        if answer.get("user_id").and_then(Value::as_str) != Some(user.as_str()) {
            return Err(Error::bad_json("/user/devices answered for another user"));
        }
        self.server
            .store_remote_user_devices(user.as_str(), &answer)
            .await
    }

    /// Posts `{field: users}` to `path` of every server the users belong to, all at once,
    /// each within `timeout`. A server that fails or does not answer in time is `Err`.
    async fn ask_servers<T: Clone + serde::Serialize>(
        self: &Arc<Self>,
        query: &BTreeMap<String, T>,
        field: &str,
        path: &str,
        timeout: Duration,
    ) -> Vec<(OwnedServerName, BTreeMap<String, T>, Result<Value, ()>)> {
        let asks = by_server(query).into_iter().map(|(server, users)| async move {
            let body = json!({ field: &users });
            let sent = self
                .client
                .request(&server, http::Method::POST, path, Some(&body));
            let res = match tokio::time::timeout(timeout, sent).await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => {
                    tracing::info!(server = %server, path, error = %e, "remote keys request failed");
                    Err(())
                }
                Err(_) => Err(()),
            };
            (server, users, res)
        });
        futures::future::join_all(asks).await
    }

    /// Keys of other servers' users for a client's `/keys/query`: from the lists we track,
    /// else asked of their servers (all at once, each within `timeout`). Unreachable servers
    /// are listed in the returned failures.
    pub async fn query_remote_keys(
        self: &Arc<Self>,
        query: &DeviceQuery,
        timeout: Duration,
    ) -> Result<(KeysAnswer, Map<String, Value>)> {
        let (mut ans, untracked) = self.server.cached_remote_keys(query).await?;
        let ask: DeviceQuery = query
            .iter()
            .filter(|(u, _)| untracked.contains(u))
            .map(|(u, d)| (u.clone(), d.clone()))
            .collect();
        let mut failures = Map::new();
        let answers = self
            .ask_servers(
                &ask,
                "device_keys",
                "/_matrix/federation/v1/user/keys/query",
                timeout,
            )
            .await;
        for (server, users, res) in answers {
            match res {
                Ok(v) => {
                    merge_users(&mut ans.device_keys, &v, "device_keys", &server);
                    merge_users(&mut ans.master_keys, &v, "master_keys", &server);
                    merge_users(&mut ans.self_signing_keys, &v, "self_signing_keys", &server);
                    // Keep the lists of users we share a room with in step from now on.
                    for user in users.keys() {
                        if let Ok(u) = OwnedUserId::try_from(user.as_str()) {
                            if self.server.shares_room_with_local(u.as_str()).await? {
                                self.spawn_resync(u);
                            }
                        }
                    }
                }
                Err(()) => {
                    failures.insert(server.to_string(), json!({}));
                }
            }
        }
        Ok((ans, failures))
    }

    /// One-time keys of other servers' devices for a client's `/keys/claim`.
    pub async fn claim_remote_keys(
        self: &Arc<Self>,
        query: &ClaimQuery,
        timeout: Duration,
    ) -> (Map<String, Value>, Map<String, Value>) {
        let answers = self
            .ask_servers(
                query,
                "one_time_keys",
                "/_matrix/federation/v1/user/keys/claim",
                timeout,
            )
            .await;
        let mut keys = Map::new();
        let mut failures = Map::new();
        for (server, _, res) in answers {
            match res {
                Ok(v) => merge_users(&mut keys, &v, "one_time_keys", &server),
                Err(()) => {
                    failures.insert(server.to_string(), json!({}));
                }
            }
        }
        (keys, failures)
    }
}

/// The local users of a query from another server (others are not ours to answer for).
fn local_only<T: Clone>(fed: &Federation, q: &BTreeMap<String, T>) -> BTreeMap<String, T> {
    q.iter()
        .filter(|(u, _)| fed.server.is_local_user(u))
        .map(|(u, v)| (u.clone(), v.clone()))
        .collect()
}

/// `GET /_matrix/federation/v1/user/devices/{userId}`.
pub async fn user_devices(
    State(st): State<FedState>,
    Path(user_id): Path<String>,
    _signed: Signed,
) -> FedResult<Json<Value>> {
    let server = &st.0.server;
    let user = OwnedUserId::try_from(user_id.as_str())
        .map_err(|_| Error::invalid_param("Invalid user ID"))?;
    if !server.is_local_user(user.as_str()) {
        return Err(Error::invalid_param("The user is not on this server").into());
    }
    Ok(Json(server.local_user_devices(user.as_str()).await?))
}

/// `POST /_matrix/federation/v1/user/keys/query`.
pub async fn user_keys_query(State(st): State<FedState>, signed: Signed) -> FedResult<Json<Value>> {
    let body = signed.body.as_ref();
    let q = parse_device_query(body.and_then(|b| b.get("device_keys")))?;
    let ans =
        st.0.server
            .query_local_keys(None, &local_only(&st.0, &q))
            .await?;
    Ok(Json(json!({
        "device_keys": ans.device_keys,
        "master_keys": ans.master_keys,
        "self_signing_keys": ans.self_signing_keys,
    })))
}

/// `POST /_matrix/federation/v1/user/keys/claim`.
pub async fn user_keys_claim(State(st): State<FedState>, signed: Signed) -> FedResult<Json<Value>> {
    let body = signed.body.as_ref();
    let q = parse_claim_query(body.and_then(|b| b.get("one_time_keys")))?;
    let keys = st.0.server.claim_local_keys(&local_only(&st.0, &q)).await?;
    Ok(Json(json!({ "one_time_keys": keys })))
}
