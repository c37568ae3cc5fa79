//! End-to-end encryption support (spec § "End-to-End Encryption", § "Send-to-Device
//! messaging"): the server carries keys and to-device messages; it never sees plaintext.
//!
//! - Device keys are checked (the caller's own user and device, self-signed by the device's
//!   ed25519 key) and kept exactly as uploaded; one-time keys are handed out once each, then the
//!   fallback key.
//! - Every change of a user's devices or cross-signing keys takes a position on the
//!   device-list stream, so syncs of users sharing an encrypted room report the user in
//!   `device_lists.changed`; local device changes also queue `m.device_list_update` EDUs
//!   (`stream_id`/`prev_id` chain) for the servers sharing a room, in the same transaction.
//! - To-device messages take positions on the to-device stream and stay until their device
//!   syncs past them.

use std::collections::{BTreeMap, HashMap, HashSet};

use base64::{
    engine::general_purpose::{STANDARD, STANDARD_NO_PAD},
    Engine,
};
use ruma::{
    signatures::{
        to_canonical_json_string_for_signing, verify_canonical_json_bytes, SigningKeyAlgorithm,
    },
    CanonicalJsonObject,
};
use serde_json::{json, Map, Value};

use crate::{
    store::{NewToDevice, RemoteDeviceList, SignatureRow, WriteTxn},
    token::SyncToken,
    Error, ErrorKind, Result, Server,
};

/// Largest serialized content of one to-device message (the spec's event size limit).
pub const MAX_TO_DEVICE_BYTES: usize = 65_536;
/// To-device messages delivered per sync response at most.
const TO_DEVICE_PER_SYNC: i64 = 100;

/// A one-time or fallback key to store: `(algorithm, key id, JSON)`.
type KeyEntry = (String, String, String);

/// A checked `/keys/upload` body.
#[derive(Debug, Default)]
pub struct KeyUpload {
    /// The device keys' JSON, exactly as uploaded.
    pub device_keys: Option<String>,
    pub one_time_keys: Vec<KeyEntry>,
    pub fallback_keys: Vec<KeyEntry>,
}

/// The target devices of a to-device message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceTarget {
    All,
    Device(String),
}

/// One checked to-device message: target user, devices, content JSON.
pub type ToDeviceMessage = (String, DeviceTarget, String);

/// The parts of a `/keys/query` answer for local users.
#[derive(Debug, Default)]
pub struct KeysAnswer {
    pub device_keys: Map<String, Value>,
    pub master_keys: Map<String, Value>,
    pub self_signing_keys: Map<String, Value>,
    pub user_signing_keys: Map<String, Value>,
}

/// The `device_lists` of a sync or of `/keys/changes`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DeviceListDelta {
    pub changed: Vec<String>,
    pub left: Vec<String>,
}

/// The to-device part of a sync: events and the stream position they reach.
pub struct ToDeviceBatch {
    pub events: Vec<Value>,
    pub next: i64,
}

fn bad(m: impl Into<String>) -> Error {
    Error::bad_json(m)
}

fn obj<'a>(v: &'a Value, what: &str) -> Result<&'a Map<String, Value>> {
    v.as_object()
        .ok_or_else(|| bad(format!("{what} must be an object")))
}

fn canonical(v: &Value) -> Result<CanonicalJsonObject> {
    serde_json::from_value(v.clone()).map_err(|e| bad(format!("not canonical JSON: {e}")))
}

fn decode_b64(s: &str) -> Option<Vec<u8>> {
    STANDARD_NO_PAD
        .decode(s.trim_end_matches('='))
        .or_else(|_| STANDARD.decode(s))
        .ok()
}

/// Whether `object` carries a valid ed25519 signature by `signer` with `key_id`
/// (`ed25519:<name>`) for the unpadded base64 `public_key`.
pub fn signed_by(object: &Value, signer: &str, key_id: &str, public_key: &str) -> bool {
    let Some(sig) = object
        .get("signatures")
        .and_then(|s| s.get(signer))
        .and_then(|s| s.get(key_id))
        .and_then(Value::as_str)
    else {
        return false;
    };
    let (Some(sig), Some(pk)) = (decode_b64(sig), decode_b64(public_key)) else {
        return false;
    };
    let Ok(c) = canonical(object) else {
        return false;
    };
    let Ok(text) = to_canonical_json_string_for_signing(&c) else {
        return false;
    };
    verify_canonical_json_bytes(&SigningKeyAlgorithm::Ed25519, &pk, &sig, text.as_bytes()).is_ok()
}

/// The object without `signatures` and `unsigned`: what a signature covers.
fn signed_part(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("signatures");
        o.remove("unsigned");
    }
    v
}

/// Checks a device's uploaded identity keys.
pub fn check_device_keys(user_id: &str, device_id: &str, keys: &Value) -> Result<()> {
    let o = obj(keys, "device_keys")?;
    let field = |name: &str| -> Result<&str> {
        o.get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("device_keys.{name} must be a string")))
    };
    if field("user_id")? != user_id {
        return Err(Error::invalid_param("device_keys.user_id is not yours"));
    }
    if field("device_id")? != device_id {
        return Err(Error::invalid_param(
            "device_keys.device_id is not the device of this access token",
        ));
    }
    match o.get("algorithms").and_then(Value::as_array) {
        Some(a) if a.iter().all(Value::is_string) => {}
        _ => return Err(bad("device_keys.algorithms must be an array of strings")),
    }
    let k = o
        .get("keys")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("device_keys.keys must be an object"))?;
    if !k.values().all(Value::is_string) {
        return Err(bad("device_keys.keys must map key IDs to strings"));
    }
    let sigs = o
        .get("signatures")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("device_keys.signatures must be an object"))?;
    if !sigs.values().all(|s| {
        s.as_object()
            .is_some_and(|m| m.values().all(Value::is_string))
    }) {
        return Err(bad(
            "device_keys.signatures must map users to key IDs to strings",
        ));
    }
    // Olm needs both identity keys of the device.
    let curve = format!("curve25519:{device_id}");
    if !k.contains_key(&curve) {
        return Err(Error::invalid_param(format!(
            "device_keys.keys lacks {curve}"
        )));
    }
    let key_id = format!("ed25519:{device_id}");
    let public = k
        .get(&key_id)
        .and_then(Value::as_str)
        .ok_or_else(|| Error::invalid_param(format!("device_keys.keys lacks {key_id}")))?;
    canonical(keys)?;
    if !signed_by(keys, user_id, &key_id, public) {
        return Err(Error::new(
            ErrorKind::InvalidSignature,
            "device_keys is not signed by its own ed25519 key",
        ));
    }
    Ok(())
}

/// Checks one-time or fallback keys (`<algorithm>:<key id>` → key string or signed key object).
fn parse_keys(v: &Value, what: &str) -> Result<Vec<KeyEntry>> {
    let mut out = Vec::new();
    for (id, key) in obj(v, what)? {
        let (alg, key_id) = id
            .split_once(':')
            .filter(|(a, k)| !a.is_empty() && !k.is_empty())
            .ok_or_else(|| bad(format!("{what}: key ID {id:?} is not <algorithm>:<id>")))?;
        match key {
            Value::String(_) => {}
            Value::Object(o) => {
                if !o.get("key").is_some_and(Value::is_string) {
                    return Err(bad(format!("{what}.{id}.key must be a string")));
                }
                if o.get("signatures").is_some_and(|s| !s.is_object()) {
                    return Err(bad(format!("{what}.{id}.signatures must be an object")));
                }
                canonical(key)?;
            }
            _ => return Err(bad(format!("{what}.{id} must be a string or an object"))),
        }
        out.push((alg.to_owned(), key_id.to_owned(), key.to_string()));
    }
    Ok(out)
}

/// Checks a whole `/keys/upload` body; nothing is stored when any part is wrong.
pub fn parse_key_upload(user_id: &str, device_id: &str, body: &Value) -> Result<KeyUpload> {
    let mut up = KeyUpload::default();
    if let Some(dk) = body.get("device_keys").filter(|v| !v.is_null()) {
        check_device_keys(user_id, device_id, dk)?;
        up.device_keys = Some(dk.to_string());
    }
    if let Some(otk) = body.get("one_time_keys").filter(|v| !v.is_null()) {
        up.one_time_keys = parse_keys(otk, "one_time_keys")?;
    }
    if let Some(fb) = body.get("fallback_keys").filter(|v| !v.is_null()) {
        // One key per algorithm: the last one named wins.
        let mut by_alg: BTreeMap<String, KeyEntry> = BTreeMap::new();
        for k in parse_keys(fb, "fallback_keys")? {
            by_alg.insert(k.0.clone(), k);
        }
        up.fallback_keys = by_alg.into_values().collect();
    }
    Ok(up)
}

/// The `keys` entry `ed25519:<public>` of a cross-signing key, checked: its owner, its usage,
/// exactly one key.
pub fn check_cross_signing_key(user_id: &str, usage: &str, key: &Value) -> Result<String> {
    let o = obj(key, usage)?;
    if o.get("user_id").and_then(Value::as_str) != Some(user_id) {
        return Err(Error::invalid_param(format!(
            "{usage} key is not for {user_id}"
        )));
    }
    let usages = o
        .get("usage")
        .and_then(Value::as_array)
        .ok_or_else(|| bad(format!("{usage}.usage must be an array")))?;
    if !usages.iter().any(|u| u.as_str() == Some(usage)) {
        return Err(Error::invalid_param(format!(
            "{usage} key lacks usage {usage}"
        )));
    }
    let keys = o
        .get("keys")
        .and_then(Value::as_object)
        .ok_or_else(|| bad(format!("{usage}.keys must be an object")))?;
    let mut it = keys.iter();
    let (Some((id, public)), None) = (it.next(), it.next()) else {
        return Err(Error::invalid_param(format!(
            "{usage} must hold exactly one key"
        )));
    };
    let public = public
        .as_str()
        .ok_or_else(|| bad(format!("{usage}.keys values must be strings")))?;
    if id.strip_prefix("ed25519:") != Some(public) {
        return Err(Error::invalid_param(format!(
            "{usage} key ID must be ed25519:<public key>"
        )));
    }
    if o.get("signatures").is_some_and(|s| !s.is_object()) {
        return Err(bad(format!("{usage}.signatures must be an object")));
    }
    canonical(key)?;
    Ok(public.to_owned())
}

/// The public key of a stored cross-signing key's JSON.
fn cross_signing_public(json: &str) -> Option<String> {
    let v: Value = serde_json::from_str(json).ok()?;
    v.get("keys")?
        .as_object()?
        .values()
        .next()?
        .as_str()
        .map(str::to_owned)
}

/// Adds uploaded signatures to a key object.
fn merge_signatures(key: &mut Value, sigs: &[&SignatureRow]) {
    if sigs.is_empty() {
        return;
    }
    let Some(o) = key.as_object_mut() else {
        return;
    };
    let all = o.entry("signatures").or_insert_with(|| json!({}));
    let Some(all) = all.as_object_mut() else {
        return;
    };
    for s in sigs {
        if let Some(m) = all
            .entry(s.signer_user_id.clone())
            .or_insert_with(|| json!({}))
            .as_object_mut()
        {
            m.insert(s.signer_key_id.clone(), json!(s.signature));
        }
    }
}

fn server_of(user_id: &str) -> &str {
    user_id.split_once(':').map(|(_, s)| s).unwrap_or("")
}

/// What `/sync` reports of a device's keys: one-time key counts (`signed_curve25519` always
/// present) and the algorithms of unused fallback keys.
pub type KeyCounts = (BTreeMap<String, i64>, Vec<String>);

/// Key counts of devices, kept after they are read so that a sync (every one of a device's
/// syncs reports them) usually asks nothing of the database. An entry is dropped after every
/// change of the device's one-time or fallback keys (upload, claim, device deletion); the
/// epoch keeps a read that raced such a change from filling the cache with what it read.
#[derive(Default)]
pub struct KeyCountCache {
    inner: std::sync::Mutex<KeyCountInner>,
}

#[derive(Default)]
struct KeyCountInner {
    epoch: u64,
    devices: HashMap<(String, String), KeyCounts>,
}

/// How far each device's to-device messages are known to be deleted (acknowledged), so that
/// the syncs of a device with nothing new to acknowledge ask nothing of the database. Every
/// position up to a recorded mark was committed before the client could name it, and later
/// messages get higher positions, so a mark stays true (also for a device ID used again).
#[derive(Default)]
pub struct AckMarks {
    devices: std::sync::Mutex<HashMap<(String, String), i64>>,
}

impl AckMarks {
    fn covers(&self, user_id: &str, device_id: &str, up_to: i64) -> bool {
        let g = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        g.get(&(user_id.to_owned(), device_id.to_owned()))
            .is_some_and(|m| *m >= up_to)
    }

    fn record(&self, user_id: &str, device_id: &str, up_to: i64) {
        let mut g = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        let m = g
            .entry((user_id.to_owned(), device_id.to_owned()))
            .or_insert(up_to);
        *m = (*m).max(up_to);
    }
}

impl KeyCountCache {
    fn get(&self, user_id: &str, device_id: &str) -> Result<KeyCounts, u64> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match g.devices.get(&(user_id.to_owned(), device_id.to_owned())) {
            Some(c) => Ok(c.clone()),
            None => Err(g.epoch),
        }
    }

    fn fill(&self, user_id: &str, device_id: &str, epoch: u64, counts: &KeyCounts) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.epoch == epoch {
            g.devices
                .insert((user_id.to_owned(), device_id.to_owned()), counts.clone());
        }
    }

    /// Forgets devices whose keys changed (call after the change is committed, or failed).
    pub fn forget<'a>(&self, devices: impl IntoIterator<Item = (&'a str, &'a str)>) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.epoch += 1;
        for (u, d) in devices {
            g.devices.remove(&(u.to_owned(), d.to_owned()));
        }
    }
}

impl Server {
    /// Whether a user ID belongs to this server.
    pub fn is_local_user(&self, user_id: &str) -> bool {
        server_of(user_id) == self.server_name.as_str()
    }

    /// Whether a room's current state enables encryption.
    pub async fn is_encrypted(&self, room: &crate::server::RoomInfo) -> Result<bool> {
        let state = self.current_state(room).await?;
        Ok(self
            .state_event(&state, "m.room.encryption", "")
            .await?
            .is_some())
    }

    /// The users joined to an encrypted room that `user` is joined to (`user` included).
    pub async fn encrypted_room_peers(&self, user_id: &str) -> Result<HashSet<String>> {
        let mut peers = HashSet::new();
        for m in self.user_memberships(user_id).await?.iter() {
            if m.membership != "join" {
                continue;
            }
            let room = self.room_by_nid(m.room_nid).await?;
            if !self.is_encrypted(&room).await? {
                continue;
            }
            for (u, ms) in self.members(room.nid).await?.iter() {
                if ms == "join" {
                    peers.insert(u.clone());
                }
            }
        }
        Ok(peers)
    }

    /// The local users and the other servers sharing a joined room with `user_id`.
    async fn room_sharers(&self, user_id: &str) -> Result<(HashSet<String>, Vec<String>)> {
        let mut users = HashSet::new();
        let mut servers = HashSet::new();
        users.insert(user_id.to_owned());
        for m in self.user_memberships(user_id).await?.iter() {
            if m.membership != "join" {
                continue;
            }
            for (u, ms) in self.members(m.room_nid).await?.iter() {
                if ms == "join" && self.is_local_user(u) {
                    users.insert(u.clone());
                }
            }
            servers.extend(self.room_servers(m.room_nid).await?.iter().cloned());
        }
        let mut servers: Vec<String> = servers.into_iter().collect();
        servers.sort();
        Ok((users, servers))
    }

    /// For every user sharing a room with `user_id`, local or remote: the local users to wake.
    async fn local_sharers(&self, user_id: &str) -> Result<HashSet<String>> {
        if self.is_local_user(user_id) {
            return Ok(self.room_sharers(user_id).await?.0);
        }
        let mut users = HashSet::new();
        for room_nid in self.store.rooms_with_member(user_id).await? {
            for (u, ms) in self.members(room_nid).await?.iter() {
                if ms == "join" && self.is_local_user(u) {
                    users.insert(u.clone());
                }
            }
        }
        Ok(users)
    }

    fn wake_users(&self, users: &HashSet<String>) {
        self.notifier.wake(users.iter().map(String::as_str));
    }

    /// `m.device_list_update` EDUs for one device change, to every destination.
    fn device_list_edus(&self, destinations: &[String], content: Value) -> Vec<(String, String)> {
        let edu = json!({"edu_type": "m.device_list_update", "content": content}).to_string();
        destinations
            .iter()
            .map(|d| (d.clone(), edu.clone()))
            .collect()
    }

    /// Records a device change in `w`: a device-list position for `user_id` and EDUs telling
    /// the servers sharing a room. `keys` is the device's keys JSON (None when deleted).
    #[allow(clippy::too_many_arguments)]
    async fn record_device_change(
        &self,
        w: &mut WriteTxn<'_>,
        user_id: &str,
        device_id: &str,
        position: i64,
        keys: Option<&str>,
        display_name: Option<&str>,
        destinations: &[String],
    ) -> Result<()> {
        let prev = w
            .device_list_changed(user_id, Some(device_id), position)
            .await?;
        if destinations.is_empty() {
            return Ok(());
        }
        let mut content = json!({
            "user_id": user_id,
            "device_id": device_id,
            "stream_id": position,
            "prev_id": prev.into_iter().collect::<Vec<_>>(),
        });
        match keys {
            Some(k) => {
                content["keys"] = serde_json::from_str(k).unwrap_or(json!({}));
                if let Some(n) = display_name {
                    content["device_display_name"] = json!(n);
                }
            }
            None => content["deleted"] = json!(true),
        }
        w.queue_edus(&self.device_list_edus(destinations, content))
            .await
    }

    /// Publishes committed device-list positions and wakes those concerned.
    fn device_list_committed(&self, positions: &[i64], wake: &HashSet<String>, dests: Vec<String>) {
        self.device_list_stream.complete(positions);
        self.wake_users(wake);
        self.outbox_signal.wake(dests);
    }

    // Keys ---------------------------------------------------------------------------------

    /// `/keys/upload`: stores what a checked upload holds, in one transaction; answers the
    /// device's one-time key counts.
    pub async fn upload_keys(
        &self,
        user_id: &str,
        device_id: &str,
        up: KeyUpload,
    ) -> Result<BTreeMap<String, i64>> {
        let (wake, dests) = match up.device_keys {
            Some(_) => self.room_sharers(user_id).await?,
            None => Default::default(),
        };
        let display_name = match up.device_keys {
            Some(_) => self
                .store
                .devices(user_id)
                .await?
                .into_iter()
                .find(|d| d.device_id == device_id)
                .and_then(|d| d.display_name),
            None => None,
        };
        let positions = match up.device_keys {
            Some(_) => self.device_list_stream.allocate(1),
            None => Vec::new(),
        };
        let result = async {
            let mut w = self.store.write().await?;
            let mut changed = false;
            if let Some(dk) = &up.device_keys {
                let held = w.device_keys(user_id, device_id).await?;
                if held.as_deref() != Some(dk.as_str()) {
                    w.put_device_keys(user_id, device_id, dk).await?;
                    self.record_device_change(
                        &mut w,
                        user_id,
                        device_id,
                        positions[0],
                        Some(dk),
                        display_name.as_deref(),
                        &dests,
                    )
                    .await?;
                    changed = true;
                }
            }
            w.add_one_time_keys(user_id, device_id, &up.one_time_keys)
                .await?;
            for fb in &up.fallback_keys {
                w.put_fallback_key(user_id, device_id, fb).await?;
            }
            let mut counts = w.one_time_key_counts(user_id, device_id).await?;
            w.commit().await?;
            counts.entry("signed_curve25519".into()).or_insert(0);
            Ok((counts, changed))
        }
        .await;
        self.key_counts.forget([(user_id, device_id)]);
        match result {
            Ok((counts, changed)) => {
                if changed {
                    self.device_list_committed(&positions, &wake, dests);
                } else {
                    self.device_list_stream.complete(&positions);
                }
                Ok(counts)
            }
            Err(e) => {
                self.device_list_stream.complete(&positions);
                Err(e)
            }
        }
    }

    /// Deletes devices (with their tokens, keys and waiting messages) and tells those sharing
    /// a room. `keep` is spared when deleting all of a user's devices.
    pub async fn remove_devices(
        &self,
        user_id: &str,
        devices: Option<&[String]>,
        keep: Option<&str>,
    ) -> Result<Vec<String>> {
        let (wake, dests) = self.room_sharers(user_id).await?;
        let mut w = self.store.write().await?;
        let doomed: Vec<String> = w
            .device_ids(user_id)
            .await?
            .into_iter()
            .filter(|d| devices.is_none_or(|list| list.contains(d)))
            .filter(|d| Some(d.as_str()) != keep)
            .collect();
        let positions = self.device_list_stream.allocate(doomed.len());
        let result = async {
            for (d, pos) in doomed.iter().zip(&positions) {
                w.delete_device(user_id, d).await?;
                self.record_device_change(&mut w, user_id, d, *pos, None, None, &dests)
                    .await?;
            }
            w.commit().await
        }
        .await;
        self.key_counts
            .forget(doomed.iter().map(|d| (user_id, d.as_str())));
        match result {
            Ok(()) => {
                if doomed.is_empty() {
                    self.device_list_stream.complete(&positions);
                } else {
                    self.device_list_committed(&positions, &wake, dests);
                }
                Ok(doomed)
            }
            Err(e) => {
                self.device_list_stream.complete(&positions);
                Err(e)
            }
        }
    }

    /// The keys of local users for `/keys/query` (from a client: `requester`, who alone sees
    /// its user-signing key and its own signatures of others' keys; from another server:
    /// None). `users` maps a user to the device IDs wanted (empty: all).
    pub async fn query_local_keys(
        &self,
        requester: Option<&str>,
        users: &BTreeMap<String, Vec<String>>,
    ) -> Result<KeysAnswer> {
        let ids: Vec<String> = users.keys().cloned().collect();
        let rows = self.store.device_keys_of(&ids).await?;
        let cs = self.store.cross_signing_keys_of(&ids).await?;
        let sigs = self.store.signatures_on(&ids).await?;
        let mut by_target: HashMap<(&str, &str), Vec<&SignatureRow>> = HashMap::new();
        for s in &sigs {
            if s.signer_user_id == s.target_user_id || Some(s.signer_user_id.as_str()) == requester
            {
                by_target
                    .entry((s.target_user_id.as_str(), s.target_key_id.as_str()))
                    .or_default()
                    .push(s);
            }
        }
        let mut ans = KeysAnswer::default();
        for u in users.keys() {
            ans.device_keys.insert(u.clone(), json!({}));
        }
        for r in rows {
            let wanted = users
                .get(&r.user_id)
                .is_some_and(|devs| devs.is_empty() || devs.contains(&r.device_id));
            if !wanted {
                continue;
            }
            let Ok(mut key) = serde_json::from_str::<Value>(&r.key_json) else {
                continue;
            };
            if let Some(s) = by_target.get(&(r.user_id.as_str(), r.device_id.as_str())) {
                merge_signatures(&mut key, s);
            }
            if let (Some(n), Some(o)) = (&r.display_name, key.as_object_mut()) {
                let unsigned = o.entry("unsigned").or_insert_with(|| json!({}));
                if let Some(u) = unsigned.as_object_mut() {
                    u.insert("device_display_name".into(), json!(n));
                }
            }
            if let Some(Value::Object(m)) = ans.device_keys.get_mut(&r.user_id) {
                m.insert(r.device_id.clone(), key);
            }
        }
        for (user, ty, json) in cs {
            let Ok(mut key) = serde_json::from_str::<Value>(&json) else {
                continue;
            };
            if let Some(public) = cross_signing_public(&json) {
                if let Some(s) = by_target.get(&(user.as_str(), public.as_str())) {
                    merge_signatures(&mut key, s);
                }
            }
            match ty.as_str() {
                "master" => ans.master_keys.insert(user, key),
                "self_signing" => ans.self_signing_keys.insert(user, key),
                "user_signing" if Some(user.as_str()) == requester => {
                    ans.user_signing_keys.insert(user, key)
                }
                _ => None,
            };
        }
        Ok(ans)
    }

    /// Claims one-time keys of local devices: `user → device → algorithm`.
    pub async fn claim_local_keys(
        &self,
        wanted: &BTreeMap<String, BTreeMap<String, String>>,
    ) -> Result<Map<String, Value>> {
        let list: Vec<(String, String, String)> = wanted
            .iter()
            .flat_map(|(u, devs)| {
                devs.iter()
                    .map(move |(d, alg)| (u.clone(), d.clone(), alg.clone()))
            })
            .collect();
        let mut out = Map::new();
        let claimed = self.store.claim_keys(&list).await;
        self.key_counts
            .forget(list.iter().map(|(u, d, _)| (u.as_str(), d.as_str())));
        for (user, device, key_id, json) in claimed? {
            let key: Value = serde_json::from_str(&json).unwrap_or(Value::String(json));
            let u = out.entry(user).or_insert_with(|| json!({}));
            if let Some(u) = u.as_object_mut() {
                u.insert(device, json!({ key_id: key }));
            }
        }
        Ok(out)
    }

    /// `device_lists` between two tokens for `user_id`: users sharing an encrypted room whose
    /// devices changed or who newly share one (`changed`), users who no longer share any
    /// (`left`).
    pub async fn device_list_delta(
        &self,
        user_id: &str,
        since: SyncToken,
        now: SyncToken,
    ) -> Result<DeviceListDelta> {
        let mut changed: HashSet<String> = HashSet::new();
        let mut left: HashSet<String> = HashSet::new();
        // Who shares an encrypted room with the user: computed once, only when needed.
        let mut peers: Option<HashSet<String>> = None;
        if since.device_lists < now.device_lists {
            let users = self
                .store
                .device_list_changes(since.device_lists, now.device_lists)
                .await?;
            if users.iter().any(|u| u != user_id) {
                peers = Some(self.encrypted_room_peers(user_id).await?);
            }
            for u in users {
                if u == user_id || peers.as_ref().is_some_and(|p| p.contains(&u)) {
                    changed.insert(u);
                }
            }
        }
        if since.events < now.events {
            for m in self.user_memberships(user_id).await?.iter() {
                let moved = m.stream_ordering > since.events && m.stream_ordering <= now.events;
                if !moved && self.room_position(m.room_nid) <= since.events {
                    continue;
                }
                // Invites and knocks share no room yet; a room left may be one known only
                // through an invite (no state).
                let left_room = matches!(m.membership.as_str(), "leave" | "ban");
                if !(m.membership == "join" || left_room && moved) {
                    continue;
                }
                let room = self.room_by_nid(m.room_nid).await?;
                if left_room && !self.has_state(&room).await? {
                    continue;
                }
                let state = self.current_state(&room).await?;
                let Some(enc) = self.state_event(&state, "m.room.encryption", "").await? else {
                    continue;
                };
                if peers.is_none() {
                    peers = Some(self.encrypted_room_peers(user_id).await?);
                }
                let peers = peers.get_or_insert_with(HashSet::new);
                let members = self.members(room.nid).await?;
                let newly_encrypted = enc
                    .stream_ordering
                    .is_some_and(|p| p > since.events && p <= now.events);
                if moved || newly_encrypted {
                    // We joined or left (or the room became encrypted): all its members.
                    for (u, ms) in members.iter() {
                        if ms != "join" || u == user_id {
                            continue;
                        }
                        if m.membership == "join" {
                            changed.insert(u.clone());
                        } else if !peers.contains(u) {
                            left.insert(u.clone());
                        }
                    }
                    if m.membership != "join" || !moved {
                        continue;
                    }
                }
                if m.membership != "join" {
                    continue;
                }
                for (u, ms) in self
                    .store
                    .membership_changes(room.nid, since.events, now.events)
                    .await?
                {
                    if u == user_id {
                        continue;
                    }
                    if ms == "join" {
                        changed.insert(u);
                    } else if !peers.contains(&u) {
                        left.insert(u);
                    }
                }
            }
        }
        for u in &changed {
            left.remove(u);
        }
        let mut changed: Vec<String> = changed.into_iter().collect();
        let mut left: Vec<String> = left.into_iter().collect();
        changed.sort();
        left.sort();
        Ok(DeviceListDelta { changed, left })
    }

    /// A device's one-time key counts (`signed_curve25519` always present) and unused
    /// fallback key algorithms, for sync.
    pub async fn key_counts(&self, user_id: &str, device_id: &str) -> Result<KeyCounts> {
        let epoch = match self.key_counts.get(user_id, device_id) {
            Ok(counts) => return Ok(counts),
            Err(epoch) => epoch,
        };
        let mut counts = self.store.one_time_key_counts(user_id, device_id).await?;
        counts.entry("signed_curve25519".into()).or_insert(0);
        let fallback = self
            .store
            .unused_fallback_key_types(user_id, device_id)
            .await?;
        let counts = (counts, fallback);
        self.key_counts.fill(user_id, device_id, epoch, &counts);
        Ok(counts)
    }

    // Cross-signing ------------------------------------------------------------------------

    /// Whether a cross-signing upload would replace keys the user already has (and so needs
    /// user-interactive auth). Uploading the same keys again does not.
    pub async fn cross_signing_upload_replaces(&self, user_id: &str, body: &Value) -> Result<bool> {
        let held: HashMap<String, Value> = self
            .store
            .cross_signing_keys_of(&[user_id.to_owned()])
            .await?
            .into_iter()
            .filter_map(|(_, ty, j)| Some((ty, serde_json::from_str(&j).ok()?)))
            .collect();
        if !held.contains_key("master") {
            return Ok(false);
        }
        for (field, ty) in [
            ("master_key", "master"),
            ("self_signing_key", "self_signing"),
            ("user_signing_key", "user_signing"),
        ] {
            if let Some(new) = body.get(field).filter(|v| !v.is_null()) {
                match held.get(ty) {
                    Some(old) if signed_part(old) == signed_part(new) => {}
                    _ => return Ok(true),
                }
            }
        }
        Ok(false)
    }

    /// `/keys/device_signing/upload` (after any UIA): checks and stores the keys.
    pub async fn upload_cross_signing(&self, user_id: &str, body: &Value) -> Result<()> {
        let get = |f: &str| body.get(f).filter(|v| !v.is_null());
        let (master, ssk, usk) = (
            get("master_key"),
            get("self_signing_key"),
            get("user_signing_key"),
        );
        let master_public = match master {
            Some(m) => Some(check_cross_signing_key(user_id, "master", m)?),
            None => None,
        };
        let (wake, dests) = self.room_sharers(user_id).await?;
        let positions = self.device_list_stream.allocate(1);
        let result = async {
            let mut w = self.store.write().await?;
            let master_public = match master_public {
                Some(p) => p,
                None => w
                    .cross_signing_key(user_id, "master")
                    .await?
                    .and_then(|j| cross_signing_public(&j))
                    .ok_or_else(|| Error::invalid_param("A master key is needed first"))?,
            };
            let master_id = format!("ed25519:{master_public}");
            for (key, usage) in [(ssk, "self_signing"), (usk, "user_signing")] {
                let Some(key) = key else { continue };
                check_cross_signing_key(user_id, usage, key)?;
                if !signed_by(key, user_id, &master_id, &master_public) {
                    return Err(Error::new(
                        ErrorKind::InvalidSignature,
                        format!("The {usage} key is not signed by the master key"),
                    ));
                }
            }
            for (key, ty) in [
                (master, "master"),
                (ssk, "self_signing"),
                (usk, "user_signing"),
            ] {
                if let Some(key) = key {
                    w.put_cross_signing_key(user_id, ty, &key.to_string())
                        .await?;
                }
            }
            w.device_list_changed(user_id, None, positions[0]).await?;
            if (master.is_some() || ssk.is_some()) && !dests.is_empty() {
                let mut content = json!({ "user_id": user_id });
                if let Some(m) = master {
                    content["master_key"] = m.clone();
                }
                if let Some(s) = ssk {
                    content["self_signing_key"] = s.clone();
                }
                let edu =
                    json!({"edu_type": "m.signing_key_update", "content": content}).to_string();
                let edus: Vec<(String, String)> =
                    dests.iter().map(|d| (d.clone(), edu.clone())).collect();
                w.queue_edus(&edus).await?;
            }
            w.commit().await
        }
        .await;
        match result {
            Ok(()) => {
                self.device_list_committed(&positions, &wake, dests);
                Ok(())
            }
            Err(e) => {
                self.device_list_stream.complete(&positions);
                Err(e)
            }
        }
    }

    /// `/keys/signatures/upload`: checks each signed object and stores the new signatures;
    /// answers the failures (`user → key ID → error`).
    pub async fn upload_signatures(
        &self,
        user_id: &str,
        body: &Map<String, Value>,
    ) -> Result<Map<String, Value>> {
        let mut failures = Map::new();
        let mut fail = |u: &str, k: &str, kind: ErrorKind, msg: &str| {
            let e = failures.entry(u.to_owned()).or_insert_with(|| json!({}));
            if let Some(e) = e.as_object_mut() {
                e.insert(
                    k.to_owned(),
                    json!({"errcode": kind.errcode(), "error": msg}),
                );
            }
        };
        let own = self
            .store
            .cross_signing_keys_of(&[user_id.to_owned()])
            .await?;
        let own_key = |ty: &str| {
            own.iter()
                .find(|(_, t, _)| t == ty)
                .and_then(|(_, _, j)| cross_signing_public(j))
        };
        let (own_master, own_ssk, own_usk) = (
            own_key("master"),
            own_key("self_signing"),
            own_key("user_signing"),
        );
        let own_devices: HashMap<String, Value> = self
            .store
            .device_keys_of(&[user_id.to_owned()])
            .await?
            .into_iter()
            .filter_map(|r| Some((r.device_id, serde_json::from_str(&r.key_json).ok()?)))
            .collect();
        let mut accepted: Vec<SignatureRow> = Vec::new();
        let mut device_changes: Vec<(String, Value)> = Vec::new();
        for (target_user, keys) in body {
            let Some(keys) = keys.as_object() else {
                fail(
                    target_user,
                    "",
                    ErrorKind::BadJson,
                    "Expected an object of keys",
                );
                continue;
            };
            for (key_id, signed) in keys {
                let Some(new_sigs) = signed
                    .get("signatures")
                    .and_then(|s| s.get(user_id))
                    .and_then(Value::as_object)
                else {
                    fail(
                        target_user,
                        key_id,
                        ErrorKind::BadJson,
                        "No signatures of yours",
                    );
                    continue;
                };
                // What is signed, and the keys that may sign it.
                let (stored, signers): (Option<Value>, Vec<(String, String)>) = if target_user
                    == user_id
                {
                    if let Some(dev) = own_devices.get(key_id) {
                        let signers = own_ssk.iter().map(|p| (format!("ed25519:{p}"), p.clone()));
                        (Some(dev.clone()), signers.collect())
                    } else if own_master.as_deref() == Some(key_id.as_str()) {
                        let master = own
                            .iter()
                            .find(|(_, t, _)| t == "master")
                            .and_then(|(_, _, j)| serde_json::from_str(j).ok());
                        let signers = own_devices.iter().filter_map(|(d, v)| {
                            let k = format!("ed25519:{d}");
                            v.get("keys")?
                                .get(&k)?
                                .as_str()
                                .map(|p| (k.clone(), p.to_owned()))
                        });
                        (master, signers.collect())
                    } else {
                        (None, Vec::new())
                    }
                } else {
                    let master = self.master_key_of(target_user).await?;
                    let master = master.filter(|m| {
                        cross_signing_public(&m.to_string()).as_deref() == Some(key_id.as_str())
                    });
                    let signers = own_usk.iter().map(|p| (format!("ed25519:{p}"), p.clone()));
                    (master, signers.collect())
                };
                let Some(stored) = stored else {
                    fail(target_user, key_id, ErrorKind::NotFound, "Unknown key");
                    continue;
                };
                if signed_part(&stored) != signed_part(signed) {
                    fail(
                        target_user,
                        key_id,
                        ErrorKind::InvalidSignature,
                        "The signed object is not the stored key",
                    );
                    continue;
                }
                let mut any = false;
                let mut bad_sig = false;
                for (sig_key, _) in new_sigs {
                    let Some((_, public)) = signers.iter().find(|(k, _)| k == sig_key) else {
                        continue;
                    };
                    if !signed_by(signed, user_id, sig_key, public) {
                        bad_sig = true;
                        continue;
                    }
                    any = true;
                    accepted.push(SignatureRow {
                        target_user_id: target_user.clone(),
                        target_key_id: key_id.clone(),
                        signer_user_id: user_id.to_owned(),
                        signer_key_id: sig_key.clone(),
                        signature: new_sigs[sig_key].as_str().unwrap_or_default().to_owned(),
                    });
                }
                if bad_sig || !any {
                    fail(
                        target_user,
                        key_id,
                        ErrorKind::InvalidSignature,
                        "Signature does not verify with a key allowed to sign this",
                    );
                }
                if any && target_user == user_id && own_devices.contains_key(key_id) {
                    device_changes.push((key_id.clone(), stored));
                }
            }
        }
        if accepted.is_empty() {
            return Ok(failures);
        }
        let (wake, dests) = self.room_sharers(user_id).await?;
        let positions = self.device_list_stream.allocate(1 + device_changes.len());
        let result = async {
            let mut w = self.store.write().await?;
            for s in &accepted {
                w.put_signature(s).await?;
            }
            w.device_list_changed(user_id, None, positions[0]).await?;
            for ((device, mut keys), pos) in device_changes.into_iter().zip(&positions[1..]) {
                let sigs: Vec<&SignatureRow> = accepted
                    .iter()
                    .filter(|s| s.target_user_id == user_id && s.target_key_id == device)
                    .collect();
                merge_signatures(&mut keys, &sigs);
                let keys = keys.to_string();
                self.record_device_change(
                    &mut w,
                    user_id,
                    &device,
                    *pos,
                    Some(&keys),
                    None,
                    &dests,
                )
                .await?;
            }
            w.commit().await
        }
        .await;
        match result {
            Ok(()) => {
                self.device_list_committed(&positions, &wake, dests);
                Ok(failures)
            }
            Err(e) => {
                self.device_list_stream.complete(&positions);
                Err(e)
            }
        }
    }

    /// A user's master key: local, or as the user's server last told us.
    async fn master_key_of(&self, user_id: &str) -> Result<Option<Value>> {
        if self.is_local_user(user_id) {
            return Ok(self
                .store
                .cross_signing_keys_of(&[user_id.to_owned()])
                .await?
                .into_iter()
                .find(|(_, t, _)| t == "master")
                .and_then(|(_, _, j)| serde_json::from_str(&j).ok()));
        }
        Ok(self
            .store
            .remote_device_list(user_id)
            .await?
            .and_then(|l| l.master_key)
            .and_then(|j| serde_json::from_str(&j).ok()))
    }

    // To-device ----------------------------------------------------------------------------

    /// `/sendToDevice` from a local device: stores messages for local devices and queues
    /// `m.direct_to_device` EDUs for other servers, once per `(device, txn ID)`.
    pub async fn send_to_device(
        &self,
        sender: &str,
        sender_device: &str,
        event_type: &str,
        txn_id: &str,
        messages: Vec<ToDeviceMessage>,
    ) -> Result<()> {
        let mut local: Vec<(String, String, String)> = Vec::new();
        let mut remote: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
        let mut device_cache: HashMap<String, Vec<String>> = HashMap::new();
        for (user, target, content) in messages {
            if !self.is_local_user(&user) {
                let content: Value = serde_json::from_str(&content)?;
                let server = server_of(&user).to_owned();
                let users = remote.entry(server).or_default();
                let devs = users.entry(user).or_insert_with(|| json!({}));
                let key = match target {
                    DeviceTarget::All => "*".to_owned(),
                    DeviceTarget::Device(d) => d,
                };
                if let Some(d) = devs.as_object_mut() {
                    d.insert(key, content);
                }
                continue;
            }
            if !device_cache.contains_key(&user) {
                let ids = self
                    .store
                    .devices(&user)
                    .await?
                    .into_iter()
                    .map(|d| d.device_id)
                    .collect();
                device_cache.insert(user.clone(), ids);
            }
            let devices = &device_cache[&user];
            match target {
                DeviceTarget::All => {
                    for d in devices {
                        local.push((user.clone(), d.clone(), content.clone()));
                    }
                }
                DeviceTarget::Device(d) => {
                    if devices.contains(&d) {
                        local.push((user.clone(), d, content));
                    }
                }
            }
        }
        // The message ID is derived from the transaction, so a retried request that reached
        // the outbox before is recognised by the other server too.
        let message_id = {
            use sha2::{Digest, Sha256};
            let h = Sha256::digest(format!("{sender}\n{sender_device}\n{txn_id}"));
            STANDARD_NO_PAD.encode(&h[..18])
        };
        let edus: Vec<(String, String)> = remote
            .into_iter()
            .map(|(server, users)| {
                let edu = json!({
                    "edu_type": "m.direct_to_device",
                    "content": {
                        "sender": sender,
                        "type": event_type,
                        "message_id": message_id,
                        "messages": users,
                    }
                });
                (server, edu.to_string())
            })
            .collect();
        let positions = self.to_device_stream.allocate(local.len());
        let rows: Vec<NewToDevice> = local
            .iter()
            .zip(&positions)
            .map(|((u, d, c), p)| {
                (
                    *p,
                    u.clone(),
                    d.clone(),
                    sender.to_owned(),
                    event_type.to_owned(),
                    c.clone(),
                )
            })
            .collect();
        let result = async {
            let mut w = self.store.write().await?;
            if !w.first_to_device_txn(sender, sender_device, txn_id).await? {
                return Ok::<_, Error>(false);
            }
            w.insert_to_device(rows).await?;
            w.queue_edus(&edus).await?;
            w.commit().await?;
            Ok(true)
        }
        .await;
        self.to_device_stream.complete(&positions);
        if result? {
            let users: HashSet<String> = local.into_iter().map(|(u, _, _)| u).collect();
            self.wake_users(&users);
            self.outbox_signal
                .wake(edus.into_iter().map(|(d, _)| d).collect());
        }
        Ok(())
    }

    /// An `m.direct_to_device` EDU from `origin`: stores its messages for our devices (once
    /// per `message_id`).
    pub async fn receive_to_device(&self, origin: &str, content: &Value) -> Result<()> {
        let (Some(sender), Some(ty), Some(message_id), Some(messages)) = (
            content.get("sender").and_then(Value::as_str),
            content.get("type").and_then(Value::as_str),
            content.get("message_id").and_then(Value::as_str),
            content.get("messages").and_then(Value::as_object),
        ) else {
            return Err(bad(
                "m.direct_to_device lacks sender, type, message_id or messages",
            ));
        };
        if server_of(sender) != origin {
            return Err(Error::forbidden(
                "m.direct_to_device sender is not of the origin",
            ));
        }
        let mut list = Vec::new();
        for (user, devices) in messages {
            if !self.is_local_user(user) {
                continue;
            }
            let Some(devices) = devices.as_object() else {
                continue;
            };
            for (device, c) in devices {
                if !c.is_object() || c.to_string().len() > MAX_TO_DEVICE_BYTES {
                    continue;
                }
                let target = if device == "*" {
                    DeviceTarget::All
                } else {
                    DeviceTarget::Device(device.clone())
                };
                list.push((user.clone(), target, c.to_string()));
            }
        }
        // Remote senders have no device of ours; their transactions are keyed by message ID.
        self.send_to_device(sender, "", ty, message_id, list).await
    }

    /// The to-device messages of a device after `since` (acknowledging, i.e. deleting, the
    /// ones up to it) and up to `now`.
    pub async fn to_device_batch(
        &self,
        user_id: &str,
        device_id: &str,
        since: Option<i64>,
        now: i64,
    ) -> Result<ToDeviceBatch> {
        if let Some(up_to) = since {
            self.ack_to_device(user_id, device_id, up_to).await?;
        }
        self.to_device_window(user_id, device_id, since, now).await
    }

    /// Acknowledges (deletes) the to-device messages of a device up to position `up_to`.
    pub async fn ack_to_device(&self, user_id: &str, device_id: &str, up_to: i64) -> Result<()> {
        if up_to <= 0 || self.to_device_acked.covers(user_id, device_id, up_to) {
            return Ok(());
        }
        self.store.ack_to_device(user_id, device_id, up_to).await?;
        self.to_device_acked.record(user_id, device_id, up_to);
        Ok(())
    }

    /// The to-device messages of a device after `since` and up to `now`, acknowledging none.
    pub async fn to_device_window(
        &self,
        user_id: &str,
        device_id: &str,
        since: Option<i64>,
        now: i64,
    ) -> Result<ToDeviceBatch> {
        let after = since.unwrap_or(0);
        if after >= now {
            return Ok(ToDeviceBatch {
                events: Vec::new(),
                next: now.max(after),
            });
        }
        let rows = self
            .store
            .to_device_messages(user_id, device_id, after, now, TO_DEVICE_PER_SYNC)
            .await?;
        let next = match rows.last() {
            Some(last) if rows.len() as i64 == TO_DEVICE_PER_SYNC => last.stream_id,
            _ => now,
        };
        let events = rows
            .into_iter()
            .map(|r| {
                let content: Value = serde_json::from_str(&r.content).unwrap_or(json!({}));
                json!({"type": r.event_type, "sender": r.sender, "content": content})
            })
            .collect();
        Ok(ToDeviceBatch { events, next })
    }

    // Other servers' device lists ----------------------------------------------------------

    /// A local user's devices for `/user/devices/{userId}`.
    pub async fn local_user_devices(&self, user_id: &str) -> Result<Value> {
        // The position is read before the devices: the list is then at least as new as it
        // says, and an update after that position applies over it harmlessly.
        let stream_id = self.store.device_list_position(user_id).await?;
        let mut q = BTreeMap::new();
        q.insert(user_id.to_owned(), Vec::new());
        let ans = self.query_local_keys(None, &q).await?;
        let names: HashMap<String, Option<String>> = self
            .store
            .devices(user_id)
            .await?
            .into_iter()
            .map(|d| (d.device_id, d.display_name))
            .collect();
        let mut devices = Vec::new();
        if let Some(Value::Object(m)) = ans.device_keys.get(user_id) {
            for (d, keys) in m {
                let mut keys = keys.clone();
                if let Some(o) = keys.as_object_mut() {
                    o.remove("unsigned");
                }
                let mut dev = json!({"device_id": d, "keys": keys});
                if let Some(Some(n)) = names.get(d) {
                    dev["device_display_name"] = json!(n);
                }
                devices.push(dev);
            }
        }
        let mut out = json!({
            "user_id": user_id,
            "stream_id": stream_id,
            "devices": devices,
        });
        if let Some(m) = ans.master_keys.get(user_id) {
            out["master_key"] = m.clone();
        }
        if let Some(s) = ans.self_signing_keys.get(user_id) {
            out["self_signing_key"] = s.clone();
        }
        Ok(out)
    }

    /// Whether a remote user shares a room with one of our users (we then track their
    /// devices).
    pub async fn shares_room_with_local(&self, user_id: &str) -> Result<bool> {
        Ok(!self.store.rooms_with_member(user_id).await?.is_empty())
    }

    /// Applies an `m.device_list_update` from the user's own server. Answers false when it
    /// does not follow on from what we hold (a gap, or nothing held): the caller then
    /// resyncs through `/user/devices`.
    pub async fn apply_device_list_update(&self, content: &Value) -> Result<bool> {
        let (Some(user_id), Some(device_id), Some(stream_id)) = (
            content.get("user_id").and_then(Value::as_str),
            content.get("device_id").and_then(Value::as_str),
            content.get("stream_id").and_then(Value::as_i64),
        ) else {
            return Err(bad(
                "m.device_list_update lacks user_id, device_id or stream_id",
            ));
        };
        let prev: Vec<i64> = content
            .get("prev_id")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_i64).collect())
            .unwrap_or_default();
        let deleted = content
            .get("deleted")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        // Read, change, and keep only over what was read: a resync or another update that
        // lands in between makes us read again.
        for _ in 0..3 {
            let Some(held) = self.store.remote_device_list(user_id).await? else {
                return Ok(false);
            };
            if stream_id <= held.stream_id {
                return Ok(true);
            }
            // It follows on from what we hold only if it names our position as its previous
            // one (or both begin the list).
            let follows = if prev.is_empty() {
                held.stream_id == 0
            } else {
                prev.contains(&held.stream_id) && prev.iter().all(|p| *p <= held.stream_id)
            };
            if !follows {
                return Ok(false);
            }
            let mut devices: Vec<Value> = serde_json::from_str(&held.devices).unwrap_or_default();
            devices.retain(|d| d.get("device_id").and_then(Value::as_str) != Some(device_id));
            if !deleted {
                let mut dev = json!({
                    "device_id": device_id,
                    "keys": content.get("keys").cloned().unwrap_or(json!({})),
                });
                if let Some(n) = content.get("device_display_name").and_then(Value::as_str) {
                    dev["device_display_name"] = json!(n);
                }
                devices.push(dev);
            }
            let expected = held.stream_id;
            let list = RemoteDeviceList {
                stream_id,
                devices: Value::Array(devices).to_string(),
                ..held
            };
            if self
                .store_remote_device_list(user_id, &list, Some(expected))
                .await?
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Applies an `m.signing_key_update`; false when we hold nothing of the user (resync).
    pub async fn apply_signing_key_update(&self, content: &Value) -> Result<bool> {
        let Some(user_id) = content.get("user_id").and_then(Value::as_str) else {
            return Err(bad("m.signing_key_update lacks user_id"));
        };
        for _ in 0..3 {
            let Some(mut held) = self.store.remote_device_list(user_id).await? else {
                return Ok(false);
            };
            if let Some(m) = content.get("master_key").filter(|v| v.is_object()) {
                held.master_key = Some(m.to_string());
            }
            if let Some(s) = content.get("self_signing_key").filter(|v| v.is_object()) {
                held.self_signing_key = Some(s.to_string());
            }
            let expected = held.stream_id;
            if self
                .store_remote_device_list(user_id, &held, Some(expected))
                .await?
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Keeps a remote user's device list as their server gave it (`/user/devices` answer),
    /// unless what we hold is newer already.
    pub async fn store_remote_user_devices(&self, user_id: &str, answer: &Value) -> Result<()> {
        let devices = answer
            .get("devices")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("/user/devices answer lacks devices"))?;
        let list = RemoteDeviceList {
            stream_id: answer.get("stream_id").and_then(Value::as_i64).unwrap_or(0),
            devices: Value::Array(devices.clone()).to_string(),
            master_key: answer
                .get("master_key")
                .filter(|v| v.is_object())
                .map(Value::to_string),
            self_signing_key: answer
                .get("self_signing_key")
                .filter(|v| v.is_object())
                .map(Value::to_string),
        };
        self.store_remote_device_list(user_id, &list, None).await?;
        Ok(())
    }

    /// Keeps a remote user's list (see [`crate::store::WriteTxn::put_remote_device_list`]
    /// for `expected`) and, when kept, tells the local users who share a room with them.
    async fn store_remote_device_list(
        &self,
        user_id: &str,
        list: &RemoteDeviceList,
        expected: Option<i64>,
    ) -> Result<bool> {
        let wake = self.local_sharers(user_id).await?;
        let positions = self.device_list_stream.allocate(1);
        let result = async {
            let mut w = self.store.write().await?;
            let kept = w.put_remote_device_list(user_id, list, expected).await?;
            if kept {
                w.device_list_changed(user_id, None, positions[0]).await?;
            }
            w.commit().await?;
            Ok::<_, Error>(kept)
        }
        .await;
        self.device_list_stream.complete(&positions);
        let kept = result?;
        if kept {
            self.wake_users(&wake);
        }
        Ok(kept)
    }

    /// The keys of remote users we track, for `/keys/query` (`None` for users we do not
    /// track: ask their server).
    pub async fn cached_remote_keys(
        &self,
        users: &BTreeMap<String, Vec<String>>,
    ) -> Result<(KeysAnswer, Vec<String>)> {
        let ids: Vec<String> = users.keys().cloned().collect();
        let held = self.store.remote_device_lists(&ids).await?;
        let mut ans = KeysAnswer::default();
        let mut untracked = Vec::new();
        for (user, wanted) in users {
            let Some(list) = held.get(user) else {
                untracked.push(user.clone());
                continue;
            };
            let devices: Vec<Value> = serde_json::from_str(&list.devices).unwrap_or_default();
            let mut m = Map::new();
            for d in devices {
                let Some(id) = d.get("device_id").and_then(Value::as_str) else {
                    continue;
                };
                if !wanted.is_empty() && !wanted.iter().any(|w| w == id) {
                    continue;
                }
                // A device that has uploaded no keys yet has none to give.
                let mut keys = match d.get("keys") {
                    Some(Value::Object(k)) if !k.is_empty() => Value::Object(k.clone()),
                    _ => continue,
                };
                if let (Some(n), Some(o)) = (
                    d.get("device_display_name").and_then(Value::as_str),
                    keys.as_object_mut(),
                ) {
                    o.insert("unsigned".into(), json!({"device_display_name": n}));
                }
                m.insert(id.to_owned(), keys);
            }
            ans.device_keys.insert(user.clone(), Value::Object(m));
            if let Some(k) = list
                .master_key
                .as_deref()
                .and_then(|j| serde_json::from_str(j).ok())
            {
                ans.master_keys.insert(user.clone(), k);
            }
            if let Some(k) = list
                .self_signing_key
                .as_deref()
                .and_then(|j| serde_json::from_str(j).ok())
            {
                ans.self_signing_keys.insert(user.clone(), k);
            }
        }
        Ok((ans, untracked))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruma::signatures::{sign_json, Ed25519KeyPair};

    fn signed_device(user: &str, device: &str, pair: &Ed25519KeyPair) -> Value {
        let public = STANDARD_NO_PAD.encode(pair.public_key());
        let v = json!({
            "user_id": user,
            "device_id": device,
            "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
            "keys": {
                format!("ed25519:{device}"): public,
                format!("curve25519:{device}"): "c2VjcmV0",
            },
        });
        let mut c: CanonicalJsonObject = serde_json::from_value(v).unwrap();
        sign_json(user, pair, &mut c).unwrap();
        serde_json::to_value(c).unwrap()
    }

    fn pair(version: &str) -> Ed25519KeyPair {
        Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), version.into()).unwrap()
    }

    #[test]
    fn device_keys_must_be_self_signed() {
        let p = pair("DEV");
        let keys = signed_device("@a:hs", "DEV", &p);
        check_device_keys("@a:hs", "DEV", &keys).unwrap();
        assert_eq!(
            check_device_keys("@b:hs", "DEV", &keys).unwrap_err().kind(),
            ErrorKind::InvalidParam
        );
        // Signed by another key under the device's key ID.
        let other = pair("DEV");
        let mut forged = signed_device("@a:hs", "DEV", &other);
        forged["keys"]["ed25519:DEV"] = keys["keys"]["ed25519:DEV"].clone();
        assert_eq!(
            check_device_keys("@a:hs", "DEV", &forged)
                .unwrap_err()
                .kind(),
            ErrorKind::InvalidSignature
        );
        let mut tampered = keys.clone();
        tampered["algorithms"] = json!(["x"]);
        assert_eq!(
            check_device_keys("@a:hs", "DEV", &tampered)
                .unwrap_err()
                .kind(),
            ErrorKind::InvalidSignature
        );
        let mut malformed = keys;
        malformed["signatures"] = json!("nope");
        assert_eq!(
            check_device_keys("@a:hs", "DEV", &malformed)
                .unwrap_err()
                .kind(),
            ErrorKind::BadJson
        );
    }

    #[test]
    fn one_time_key_ids_are_checked() {
        let ok = parse_keys(&json!({"signed_curve25519:AAA": {"key": "k"}}), "otk").unwrap();
        assert_eq!(ok[0].0, "signed_curve25519");
        assert_eq!(ok[0].1, "AAA");
        for bad_keys in [
            json!({"nocolon": "k"}),
            json!({"a:b": 5}),
            json!({"a:b": {"key": 1}}),
            json!([]),
        ] {
            assert_eq!(
                parse_keys(&bad_keys, "otk").unwrap_err().kind(),
                ErrorKind::BadJson
            );
        }
    }

    #[test]
    fn cross_signing_keys_are_checked() {
        let m = json!({"user_id": "@a:hs", "usage": ["master"], "keys": {"ed25519:PUB": "PUB"}});
        assert_eq!(
            check_cross_signing_key("@a:hs", "master", &m).unwrap(),
            "PUB"
        );
        assert!(check_cross_signing_key("@a:hs", "self_signing", &m).is_err());
        assert!(check_cross_signing_key("@b:hs", "master", &m).is_err());
        let two = json!({"user_id": "@a:hs", "usage": ["master"],
            "keys": {"ed25519:A": "A", "ed25519:B": "B"}});
        assert!(check_cross_signing_key("@a:hs", "master", &two).is_err());
    }
}
