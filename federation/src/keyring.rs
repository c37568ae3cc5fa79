//! The key ring: other servers' ed25519 verify keys, for checking X-Matrix requests and event
//! signatures. Keys come from memory, then the database, else from the server's own key server
//! (`GET /_matrix/key/v2/server`), whose response must carry the right `server_name` and a valid
//! self-signature. Spec rule ("Publishing Keys"): a key counts as valid until the lesser of the
//! response's `valid_until_ts` and fetch time + 7 days. Keys in `old_verify_keys` are kept with
//! their `expired_ts` and count only for timestamps before it.
//!
//! Refetching happens when no known key is valid at the wanted time (or the wanted key ID is
//! unknown), at most once per [`REFETCH_INTERVAL`] per server. When the server itself cannot be
//! reached, the configured `trusted_key_servers` are asked in turn (`POST
//! /_matrix/key/v2/query`): an answer counts only with the origin's own valid self-signature
//! *and* the notary's signature by a key fetched from the notary itself. Serving our own notary
//! endpoints never asks notaries (so two notaries trusting each other cannot wait on each
//! other).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use myelin_core::{
    ruma::{
        canonical_json::{CanonicalJsonObject, CanonicalJsonValue},
        serde::Base64,
        signatures::{verify_json, PublicKeyMap},
        OwnedServerName, ServerName,
    },
    store::{
        now_ms,
        server_keys::{ServerKeyResponse, ServerKeyRow},
    },
    Server,
};
use serde_json::Value;

use crate::client::{FedError, FederationClient};

/// Least time between two fetches of one server's keys.
pub const REFETCH_INTERVAL: Duration = Duration::from_secs(30);
/// A fetched key is never trusted for longer than this past its fetch (spec: 7 days).
pub const MAX_KEY_VALIDITY_MS: i64 = 7 * 24 * 60 * 60 * 1000;
/// Most servers whose keys are held in memory.
const CACHE_CAPACITY: usize = 10_000;

/// Other servers' verify keys, cached in memory and in the database.
pub struct KeyRing {
    server: Arc<Server>,
    client: Arc<FederationClient>,
    /// Our own keys that are no longer in use (`data_dir/old_signing_keys`).
    own_old_keys: Vec<ServerKeyRow>,
    /// `trusted_key_servers`, in the configured order.
    notaries: Vec<OwnedServerName>,
    cache: Mutex<HashMap<OwnedServerName, Arc<Vec<ServerKeyRow>>>>,
    last_fetch: Mutex<HashMap<OwnedServerName, Instant>>,
    fetch_locks: Mutex<HashMap<OwnedServerName, Arc<tokio::sync::Mutex<()>>>>,
}

impl KeyRing {
    /// A key ring fetching through `client`.
    pub fn new(server: Arc<Server>, client: Arc<FederationClient>) -> Self {
        let own_old_keys = crate::key_server::old_verify_keys(&server)
            .into_iter()
            .map(|k| ServerKeyRow {
                key_id: k.key_id,
                public_key: k.key,
                valid_until_ts: k.expired_ts,
                expired_ts: Some(k.expired_ts),
            })
            .collect();
        let notaries = server
            .config
            .trusted_key_servers
            .iter()
            .filter_map(|n| OwnedServerName::try_from(n.as_str()).ok())
            .collect();
        KeyRing {
            server,
            client,
            own_old_keys,
            notaries,
            cache: Mutex::default(),
            last_fetch: Mutex::default(),
            fetch_locks: Mutex::default(),
        }
    }

    /// The server this key ring belongs to.
    pub fn server(&self) -> &Arc<Server> {
        &self.server
    }

    /// The client it fetches with.
    pub fn client(&self) -> &Arc<FederationClient> {
        &self.client
    }

    /// `key_id → public key` of `origin` valid at `at_ts` (ms since the epoch), fetching when
    /// none is known. An error only when nothing is known and the fetch failed.
    pub async fn keys_for(
        &self,
        origin: &ServerName,
        at_ts: i64,
    ) -> Result<BTreeMap<String, Base64>, FedError> {
        self.keys_with(origin, at_ts, None).await
    }

    /// Like [`KeyRing::keys_for`], but also refetches when `key_id` is not among the known keys
    /// (the server may have rotated its key). The result may still lack `key_id`.
    pub async fn keys_with(
        &self,
        origin: &ServerName,
        at_ts: i64,
        key_id: Option<&str>,
    ) -> Result<BTreeMap<String, Base64>, FedError> {
        if origin == self.server.server_name {
            return Ok(self.own_keys(at_ts));
        }
        let known = self.known(origin).await;
        let valid = valid_at(&known, at_ts);
        if !valid.is_empty() && key_id.is_none_or(|k| valid.contains_key(k)) {
            return Ok(valid);
        }
        match self.fetch(origin, true).await {
            Ok(rows) => Ok(valid_at(&rows, at_ts)),
            Err(e) if valid.is_empty() => Err(e),
            Err(e) => {
                tracing::debug!(%origin, "refetching keys failed, using the known ones: {e}");
                Ok(valid)
            }
        }
    }

    /// A ruma `PublicKeyMap` for the given servers, each with its keys valid at the given time
    /// — for `ruma::signatures::verify_event` / `verify_json`. A server whose keys cannot be had
    /// gets an empty set (so verification of its signatures fails).
    pub async fn public_key_map(&self, wanted: &[(OwnedServerName, i64)]) -> PublicKeyMap {
        let mut map = PublicKeyMap::new();
        for (server, ts) in wanted {
            let keys = match self.keys_for(server, *ts).await {
                Ok(keys) => keys,
                Err(e) => {
                    tracing::debug!(%server, "no keys: {e}");
                    BTreeMap::new()
                }
            };
            map.entry(server.to_string()).or_default().extend(keys);
        }
        map
    }

    /// The latest verified key response of `origin` as stored (for the notary endpoints),
    /// fetching it when it is missing or not valid until `minimum_valid_until_ts`.
    pub async fn key_response(
        &self,
        origin: &ServerName,
        minimum_valid_until_ts: i64,
    ) -> Result<Option<Value>, FedError> {
        let stored = self.stored_response(origin).await;
        if let Some((json, valid_until)) = &stored {
            if *valid_until >= minimum_valid_until_ts {
                return Ok(Some(json.clone()));
            }
        }
        match self.fetch(origin, false).await {
            Ok(_) => Ok(self
                .stored_response(origin)
                .await
                .map(|(j, _)| j)
                .or(stored.map(|s| s.0))),
            // Serving cached responses for servers that are offline is what notaries are for.
            Err(e) => match stored {
                Some((json, _)) => Ok(Some(json)),
                None => Err(e),
            },
        }
    }

    async fn stored_response(&self, origin: &ServerName) -> Option<(Value, i64)> {
        match self.server.store.server_key_response(origin.as_str()).await {
            Ok(Some(r)) => serde_json::from_str(&r.response_json)
                .ok()
                .map(|j| (j, r.valid_until_ts)),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(%origin, "reading a stored key response: {e}");
                None
            }
        }
    }

    fn own_keys(&self, at_ts: i64) -> BTreeMap<String, Base64> {
        let mut keys = valid_at(&self.own_old_keys, at_ts);
        keys.insert(
            self.server.key.key_id(),
            Base64::new(self.server.key.pair.public_key().to_vec()),
        );
        keys
    }

    /// Keys known from memory, else the database.
    async fn known(&self, origin: &ServerName) -> Arc<Vec<ServerKeyRow>> {
        if let Some(rows) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(origin)
        {
            return rows.clone();
        }
        let rows = match self.server.store.server_keys(origin.as_str()).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(%origin, "reading stored server keys: {e}");
                return Arc::default();
            }
        };
        let rows = Arc::new(rows);
        if !rows.is_empty() {
            self.remember(origin, rows.clone());
        }
        rows
    }

    fn remember(&self, origin: &ServerName, rows: Arc<Vec<ServerKeyRow>>) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(origin.to_owned(), rows);
    }

    /// Fetches `origin`'s keys from its key server (once per [`REFETCH_INTERVAL`]; concurrent
    /// callers wait for one fetch), else, when `use_notaries` and the server did not answer,
    /// from the trusted notaries; returns everything known afterwards.
    async fn fetch(
        &self,
        origin: &ServerName,
        use_notaries: bool,
    ) -> Result<Arc<Vec<ServerKeyRow>>, FedError> {
        let lock = {
            let mut locks = self.fetch_locks.lock().unwrap_or_else(|e| e.into_inner());
            if locks.len() >= CACHE_CAPACITY {
                locks.retain(|_, l| Arc::strong_count(l) > 1);
            }
            locks.entry(origin.to_owned()).or_default().clone()
        };
        let _guard = lock.lock().await;
        if !self.may_fetch(origin) {
            return Ok(self.known(origin).await);
        }
        let direct = self.fetch_direct(origin).await;
        match direct {
            Err(e) if use_notaries && !self.notaries.is_empty() => {
                tracing::info!(%origin, "key server unreachable ({e}); asking notaries");
                match self.fetch_from_notaries(origin).await {
                    Some(rows) => Ok(rows),
                    None => Err(e),
                }
            }
            other => other,
        }
    }

    /// `GET /_matrix/key/v2/server` on `origin` itself, checked and stored.
    async fn fetch_direct(&self, origin: &ServerName) -> Result<Arc<Vec<ServerKeyRow>>, FedError> {
        let response = self
            .client
            .get_unauthenticated(origin, "/_matrix/key/v2/server")
            .await?;
        let fetched_ts = now_ms();
        let checked = verify_key_response(origin, &response, fetched_ts).map_err(|reason| {
            FedError::Malformed {
                destination: origin.to_string(),
                reason,
            }
        })?;
        self.store_response(origin, checked, fetched_ts).await
    }

    /// Asks each trusted notary in turn for `origin`'s keys; the first answer with at least
    /// one response that passes both signature checks is stored.
    async fn fetch_from_notaries(&self, origin: &ServerName) -> Option<Arc<Vec<ServerKeyRow>>> {
        let body = serde_json::json!({ "server_keys": { origin.as_str(): {} } });
        for notary in &self.notaries {
            if notary == origin || *notary == self.server.server_name {
                continue;
            }
            let answer = match self
                .client
                .request(
                    notary,
                    http::Method::POST,
                    "/_matrix/key/v2/query",
                    Some(&body),
                )
                .await
            {
                Ok(answer) => answer,
                Err(e) => {
                    tracing::info!(%notary, %origin, "notary query failed: {e}");
                    continue;
                }
            };
            let notary_keys = match self.notary_keys(notary).await {
                Ok(keys) => keys,
                Err(e) => {
                    tracing::info!(%notary, "no keys for the notary itself: {e}");
                    continue;
                }
            };
            let fetched_ts = now_ms();
            let mut stored = None;
            let responses = answer
                .get("server_keys")
                .and_then(Value::as_array)
                .into_iter()
                .flatten();
            for response in responses {
                match verify_notarised(origin, notary, &notary_keys, response, fetched_ts) {
                    Ok(checked) => match self.store_response(origin, checked, fetched_ts).await {
                        Ok(rows) => stored = Some(rows),
                        Err(e) => tracing::warn!(%origin, "storing notarised keys: {e}"),
                    },
                    Err(reason) => {
                        tracing::info!(%notary, %origin, "notary answer refused: {reason}")
                    }
                }
            }
            if stored.is_some() {
                return stored;
            }
        }
        None
    }

    /// The notary's own verify keys valid now, from memory, the database or the notary itself
    /// (never through another notary).
    async fn notary_keys(&self, notary: &ServerName) -> Result<BTreeMap<String, Base64>, FedError> {
        let now = now_ms();
        let known = valid_at(&self.known(notary).await, now);
        if !known.is_empty() {
            return Ok(known);
        }
        Ok(valid_at(&self.fetch_direct(notary).await?, now))
    }

    /// Whether `origin`'s keys may be fetched now (not within [`REFETCH_INTERVAL`] of the last
    /// attempt); if so, records this attempt.
    fn may_fetch(&self, origin: &ServerName) -> bool {
        let mut last = self.last_fetch.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if last
            .get(origin)
            .is_some_and(|t| now.duration_since(*t) < REFETCH_INTERVAL)
        {
            return false;
        }
        if last.len() >= CACHE_CAPACITY {
            last.retain(|_, t| now.duration_since(*t) < REFETCH_INTERVAL);
        }
        last.insert(origin.to_owned(), now);
        true
    }

    /// Stores a verified key response and returns everything now known about `origin`.
    async fn store_response(
        &self,
        origin: &ServerName,
        checked: VerifiedKeys,
        fetched_ts: i64,
    ) -> Result<Arc<Vec<ServerKeyRow>>, FedError> {
        let response = ServerKeyResponse {
            response_json: checked.json.to_string(),
            valid_until_ts: checked.valid_until_ts,
            fetched_ts,
        };
        if let Err(e) = self
            .server
            .store
            .put_server_keys(origin.as_str(), &checked.keys, &response)
            .await
        {
            tracing::warn!(%origin, "storing server keys: {e}");
        }
        let mut merged: BTreeMap<String, ServerKeyRow> = self
            .known(origin)
            .await
            .iter()
            .map(|r| (r.key_id.clone(), r.clone()))
            .collect();
        for key in checked.keys {
            merged.insert(key.key_id.clone(), key);
        }
        let rows = Arc::new(merged.into_values().collect::<Vec<_>>());
        self.remember(origin, rows.clone());
        Ok(rows)
    }
}

/// The keys of a key response that passed [`verify_key_response`].
#[derive(Debug, Clone)]
pub struct VerifiedKeys {
    /// The verify keys (bounded validity) and old verify keys.
    pub keys: Vec<ServerKeyRow>,
    /// The response's own `valid_until_ts`.
    pub valid_until_ts: i64,
    /// The response as received.
    pub json: Value,
}

/// Checks a `ServerKeys` object said to be `origin`'s: its `server_name`, its shape, and that
/// it is signed by at least one of its own `verify_keys` (every such signature present must
/// verify). `now` bounds key validity to 7 days.
pub fn verify_key_response(
    origin: &ServerName,
    response: &Value,
    now: i64,
) -> Result<VerifiedKeys, String> {
    let object: CanonicalJsonObject =
        serde_json::from_value(response.clone()).map_err(|e| format!("not canonical JSON: {e}"))?;
    match object.get("server_name") {
        Some(CanonicalJsonValue::String(name)) if name == origin.as_str() => {}
        other => return Err(format!("server_name is {other:?}, expected {origin}")),
    }
    let Some(CanonicalJsonValue::Integer(valid_until)) = object.get("valid_until_ts") else {
        return Err("no integer valid_until_ts".to_owned());
    };
    let valid_until_ts = i64::from(*valid_until);
    let Some(CanonicalJsonValue::Object(verify)) = object.get("verify_keys") else {
        return Err("no verify_keys object".to_owned());
    };
    let effective_until = valid_until_ts.min(now.saturating_add(MAX_KEY_VALIDITY_MS));
    let mut keys = Vec::new();
    let mut public = BTreeMap::new();
    for (key_id, entry) in verify {
        let key = key_of(entry).ok_or_else(|| format!("verify_keys.{key_id}: no key"))?;
        let decoded: Base64 =
            Base64::parse(&key).map_err(|e| format!("verify_keys.{key_id}: {e}"))?;
        public.insert(key_id.clone(), decoded);
        keys.push(ServerKeyRow {
            key_id: key_id.clone(),
            public_key: key,
            valid_until_ts: effective_until,
            expired_ts: None,
        });
    }
    if let Some(CanonicalJsonValue::Object(old)) = object.get("old_verify_keys") {
        for (key_id, entry) in old {
            let (Some(key), Some(CanonicalJsonValue::Integer(expired))) = (
                key_of(entry),
                match entry {
                    CanonicalJsonValue::Object(o) => o.get("expired_ts"),
                    _ => None,
                },
            ) else {
                continue; // A malformed old key is skipped, not fatal.
            };
            if public.contains_key(key_id) || parse_key(&key).is_none() {
                continue;
            }
            let expired = i64::from(*expired);
            keys.push(ServerKeyRow {
                key_id: key_id.clone(),
                public_key: key,
                valid_until_ts: expired,
                expired_ts: Some(expired),
            });
        }
    }
    // Only the origin's own signatures count (a notary may have added its own).
    verify_signed_by(&object, origin, public).map_err(|e| format!("self-signature: {e}"))?;
    Ok(VerifiedKeys {
        keys,
        valid_until_ts,
        json: response.clone(),
    })
}

/// Checks a key response that `notary` passed on for `origin`: the origin's own
/// self-signature ([`verify_key_response`]) and the notary's signature with `notary_keys`.
pub fn verify_notarised(
    origin: &ServerName,
    notary: &ServerName,
    notary_keys: &BTreeMap<String, Base64>,
    response: &Value,
    now: i64,
) -> Result<VerifiedKeys, String> {
    let checked = verify_key_response(origin, response, now)?;
    let object: CanonicalJsonObject =
        serde_json::from_value(response.clone()).map_err(|e| format!("not canonical JSON: {e}"))?;
    verify_signed_by(&object, notary, notary_keys.clone())
        .map_err(|e| format!("notary signature: {e}"))?;
    Ok(checked)
}

/// Checks the signature of `by` on `object` with `keys`, ignoring any other server's.
fn verify_signed_by(
    object: &CanonicalJsonObject,
    by: &ServerName,
    keys: BTreeMap<String, Base64>,
) -> Result<(), String> {
    let Some(CanonicalJsonValue::Object(signatures)) = object.get("signatures") else {
        return Err("no signatures".to_owned());
    };
    let theirs = signatures
        .get(by.as_str())
        .cloned()
        .ok_or_else(|| format!("not signed by {by}"))?;
    let mut only = object.clone();
    only.insert(
        "signatures".to_owned(),
        CanonicalJsonValue::Object(CanonicalJsonObject::from([(by.to_string(), theirs)])),
    );
    let map = PublicKeyMap::from([(by.to_string(), keys)]);
    verify_json(&map, &only).map_err(|e| e.to_string())
}

fn key_of(entry: &CanonicalJsonValue) -> Option<String> {
    match entry {
        CanonicalJsonValue::Object(o) => match o.get("key") {
            Some(CanonicalJsonValue::String(k)) => Some(k.clone()),
            _ => None,
        },
        _ => None,
    }
}

/// The keys of `rows` usable at `at_ts`.
fn valid_at(rows: &[ServerKeyRow], at_ts: i64) -> BTreeMap<String, Base64> {
    rows.iter()
        .filter(|r| match r.expired_ts {
            Some(expired) => at_ts < expired,
            None => at_ts <= r.valid_until_ts,
        })
        .filter_map(|r| Some((r.key_id.clone(), parse_key(&r.public_key)?)))
        .collect()
}

fn parse_key(b64: &str) -> Option<Base64> {
    Base64::parse(b64).ok()
}

#[cfg(test)]
mod tests {
    use myelin_core::ruma::signatures::{sign_json, Ed25519KeyPair};
    use serde_json::json;

    use super::*;

    fn signed_response(name: &str, key: &Ed25519KeyPair, valid_until: i64) -> Value {
        let public: Base64 = Base64::new(key.public_key().to_vec());
        let public = public.encode();
        let mut obj: CanonicalJsonObject = serde_json::from_value(json!({
            "server_name": name,
            "valid_until_ts": valid_until,
            "verify_keys": {format!("ed25519:{}", key.version()): {"key": public}},
            "old_verify_keys": {"ed25519:old": {"key": public, "expired_ts": 1000}},
        }))
        .unwrap();
        sign_json(name, key, &mut obj).unwrap();
        serde_json::to_value(obj).unwrap()
    }

    fn key(version: &str) -> Ed25519KeyPair {
        Ed25519KeyPair::from_der(Ed25519KeyPair::generate().as_ref(), version.into()).unwrap()
    }

    #[test]
    fn key_responses_are_checked() {
        let origin = <&ServerName>::try_from("remote.example").unwrap();
        let k = key("v1");
        let now = 1_000_000;
        let resp = signed_response("remote.example", &k, now + 100 * MAX_KEY_VALIDITY_MS);
        let checked = verify_key_response(origin, &resp, now).unwrap();
        let current = checked
            .keys
            .iter()
            .find(|r| r.key_id == "ed25519:v1")
            .unwrap();
        assert_eq!(current.valid_until_ts, now + MAX_KEY_VALIDITY_MS);
        let old = checked
            .keys
            .iter()
            .find(|r| r.key_id == "ed25519:old")
            .unwrap();
        assert_eq!(old.expired_ts, Some(1000));
        assert!(valid_at(&checked.keys, now).contains_key("ed25519:v1"));
        assert!(!valid_at(&checked.keys, now).contains_key("ed25519:old"));
        assert!(valid_at(&checked.keys, 999).contains_key("ed25519:old"));
        assert!(!valid_at(&checked.keys, now + MAX_KEY_VALIDITY_MS + 1).contains_key("ed25519:v1"));

        // Wrong server name, tampering, or a signature by another key fail.
        let other = <&ServerName>::try_from("other.example").unwrap();
        assert!(verify_key_response(other, &resp, now).is_err());
        let mut tampered = resp.clone();
        tampered["valid_until_ts"] = json!(now + 1);
        assert!(verify_key_response(origin, &tampered, now).is_err());
        let mut foreign = signed_response("remote.example", &key("v1"), now + 1);
        foreign["verify_keys"] = resp["verify_keys"].clone();
        assert!(verify_key_response(origin, &foreign, now).is_err());
        let mut unsigned = resp.clone();
        unsigned["signatures"] = json!({"notary.example": {"ed25519:n": "AAAA"}});
        assert!(verify_key_response(origin, &unsigned, now).is_err());

        // A notary's extra signature does not get in the way.
        let mut notarised = resp.clone();
        notarised["signatures"]["notary.example"] = json!({"ed25519:n": "AAAA"});
        assert!(verify_key_response(origin, &notarised, now).is_ok());
    }

    #[test]
    fn notarised_responses_need_both_signatures() {
        let origin = <&ServerName>::try_from("remote.example").unwrap();
        let notary = <&ServerName>::try_from("notary.example").unwrap();
        let (k, n) = (key("v1"), key("n1"));
        let n_keys = BTreeMap::from([(
            "ed25519:n1".to_owned(),
            Base64::new(n.public_key().to_vec()),
        )]);
        let now = 1_000_000;
        let resp = signed_response("remote.example", &k, now + 1000);
        let countersign = |value: &Value, by: &Ed25519KeyPair| {
            let mut obj: CanonicalJsonObject = serde_json::from_value(value.clone()).unwrap();
            sign_json("notary.example", by, &mut obj).unwrap();
            serde_json::to_value(obj).unwrap()
        };
        let good = countersign(&resp, &n);
        assert!(verify_notarised(origin, notary, &n_keys, &good, now).is_ok());
        // Without the notary's signature, or with one by another key: refused.
        assert!(verify_notarised(origin, notary, &n_keys, &resp, now).is_err());
        let forged = countersign(&resp, &key("n1"));
        assert!(verify_notarised(origin, notary, &n_keys, &forged, now).is_err());
        // The notary cannot vouch for keys the origin did not sign.
        let mut altered = resp.clone();
        altered["valid_until_ts"] = json!(now + 5000);
        let altered = countersign(&altered, &n);
        assert!(verify_notarised(origin, notary, &n_keys, &altered, now).is_err());
    }
}
