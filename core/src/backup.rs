//! Server-side key backups (spec § "Server-side key backups"): a user's backup versions, each
//! with its `auth_data`, and the encrypted megolm session keys clients store in them.
//!
//! - Versions are numbered per user, counting up, and never reused; the *current* version is
//!   the latest one not deleted, and only it takes new keys. Keys are read from, and deleted
//!   from, any version not deleted.
//! - A key uploaded for a session already stored replaces it only when it is better
//!   ([`KeyRank::replaces`]).
//! - Each version has an etag that moves whenever its stored keys change, and nothing else;
//!   `count` is the number of keys in the version.
//!
//! Everything one request writes is one transaction.

use std::{collections::BTreeMap, fmt};

use ruma::{OwnedRoomId, RoomId, UInt, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::{store::Store, Error, Result};

/// A backup version. Clients see it as an opaque string: its decimal form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackupVersion(i64);

impl BackupVersion {
    /// The version a client names, if it is one this server could have handed out (a positive
    /// decimal number, written the way we write it).
    pub fn parse(s: &str) -> Option<Self> {
        let n: i64 = s.parse().ok()?;
        (n > 0 && n.to_string() == s).then_some(Self(n))
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Display for BackupVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One session's key as uploaded and served (spec: `KeyBackupData`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyBackupData {
    pub first_message_index: UInt,
    pub forwarded_count: UInt,
    pub is_verified: bool,
    /// Encrypted by the client; the server never looks inside.
    pub session_data: Map<String, Value>,
}

/// The keys of one room, by session ID (spec: `RoomKeyBackup`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoomKeyBackup {
    pub sessions: BTreeMap<String, KeyBackupData>,
}

/// Keys by room.
pub type RoomKeys = BTreeMap<OwnedRoomId, RoomKeyBackup>;

/// What decides between two keys of one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyRank {
    pub is_verified: bool,
    pub first_message_index: i64,
    pub forwarded_count: i64,
}

impl KeyRank {
    /// The spec's rule for a session already in the backup: a verified key beats an unverified
    /// one; between keys equally verified, the lower `first_message_index` wins, then the lower
    /// `forwarded_count`; a complete tie keeps the stored key.
    pub fn replaces(self, stored: KeyRank) -> bool {
        let order = |k: KeyRank| (!k.is_verified, k.first_message_index, k.forwarded_count);
        order(self) < order(stored)
    }
}

impl KeyBackupData {
    pub fn rank(&self) -> KeyRank {
        KeyRank {
            is_verified: self.is_verified,
            first_message_index: self.first_message_index.into(),
            forwarded_count: self.forwarded_count.into(),
        }
    }
}

/// Which keys of a version a request reads or deletes.
#[derive(Debug, Clone, Copy)]
pub enum KeyScope<'a> {
    All,
    Room(&'a RoomId),
    Session(&'a RoomId, &'a str),
}

/// A backup version as `GET /room_keys/version` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct BackupInfo {
    pub version: BackupVersion,
    pub algorithm: String,
    pub auth_data: Value,
    pub etag: String,
    pub count: u64,
}

impl BackupInfo {
    pub fn to_json(&self) -> Value {
        json!({
            "version": self.version.to_string(),
            "algorithm": self.algorithm,
            "auth_data": self.auth_data,
            "etag": self.etag,
            "count": self.count,
        })
    }
}

/// The state of a version's keys after a change (spec: `RoomKeysUpdateResponse`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeysUpdate {
    pub etag: String,
    pub count: u64,
}

impl KeysUpdate {
    pub fn to_json(&self) -> Value {
        json!({ "etag": self.etag, "count": self.count })
    }
}

/// Keys were uploaded to a version other than the current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotCurrent {
    pub current: BackupVersion,
}

fn unknown_version() -> Error {
    Error::not_found("Unknown backup version")
}

fn etag(counter: i64) -> String {
    counter.to_string()
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// Creates the user's next backup version, which becomes the current one.
pub async fn create_version(
    store: &Store,
    user: &UserId,
    algorithm: &str,
    auth_data: &Map<String, Value>,
) -> Result<BackupVersion> {
    let auth_data = serde_json::to_string(auth_data)?;
    let v = store
        .create_backup_version(user.as_str(), algorithm, &auth_data)
        .await?;
    Ok(BackupVersion(v))
}

/// A version (`None`: the current one), `M_NOT_FOUND` when there is none.
pub async fn version_info(
    store: &Store,
    user: &UserId,
    version: Option<BackupVersion>,
) -> Result<BackupInfo> {
    let row = store
        .backup_version(user.as_str(), version.map(BackupVersion::get))
        .await?
        .ok_or_else(|| match version {
            Some(_) => unknown_version(),
            None => Error::not_found("No current backup version"),
        })?;
    Ok(BackupInfo {
        version: BackupVersion(row.version),
        algorithm: row.algorithm,
        auth_data: serde_json::from_str(&row.auth_data)?,
        etag: etag(row.etag),
        count: count(row.count),
    })
}

/// Replaces a version's `auth_data`; its algorithm cannot change (`M_INVALID_PARAM`).
pub async fn update_version(
    store: &Store,
    user: &UserId,
    version: BackupVersion,
    algorithm: &str,
    auth_data: &Map<String, Value>,
) -> Result<()> {
    let info = version_info(store, user, Some(version)).await?;
    if info.algorithm != algorithm {
        return Err(Error::invalid_param("Algorithm does not match"));
    }
    let auth_data = serde_json::to_string(auth_data)?;
    if !store
        .update_backup_auth_data(user.as_str(), version.get(), &auth_data)
        .await?
    {
        return Err(unknown_version());
    }
    Ok(())
}

/// Deletes a version and its keys. Deleting a version again succeeds; one the user never had
/// is `M_NOT_FOUND`.
pub async fn delete_version(store: &Store, user: &UserId, version: BackupVersion) -> Result<()> {
    if store
        .delete_backup_version(user.as_str(), version.get())
        .await?
    {
        Ok(())
    } else {
        Err(unknown_version())
    }
}

/// Stores keys in the current version, each only where it beats the key stored for its
/// session. `Ok(Err(_))` when `version` (`None`: one we never hand out) is not the current
/// version; `M_NOT_FOUND` when the user has no backup at all. Nothing is written unless all
/// of it is.
pub async fn put_keys(
    store: &Store,
    user: &UserId,
    version: Option<BackupVersion>,
    rooms: &RoomKeys,
) -> Result<Result<KeysUpdate, NotCurrent>> {
    let uid = user.as_str();
    let mut w = store.write().await?;
    // Lock the named version first, so that a delete of it either waits for us or is seen.
    let locked = match version {
        Some(v) => w.lock_backup_version(uid, v.get()).await?,
        None => false,
    };
    let current = w
        .current_backup_version(uid)
        .await?
        .map(BackupVersion)
        .ok_or_else(|| Error::not_found("No current backup version"))?;
    if !locked || version != Some(current) {
        return Ok(Err(NotCurrent { current }));
    }
    let v = current.get();
    let mut changed = false;
    for (room_id, room) in rooms {
        for (session_id, key) in &room.sessions {
            let stored = w
                .room_key_rank(uid, v, room_id.as_str(), session_id)
                .await?;
            if stored.is_none_or(|stored| key.rank().replaces(stored)) {
                w.put_room_key(uid, v, room_id.as_str(), session_id, key)
                    .await?;
                changed = true;
            }
        }
    }
    if changed {
        w.advance_backup_etag(uid, v).await?;
    }
    let (tag, n) = w.backup_etag_and_count(uid, v).await?;
    w.commit().await?;
    Ok(Ok(KeysUpdate {
        etag: etag(tag),
        count: count(n),
    }))
}

/// The keys of `scope` in a version, `M_NOT_FOUND` when the version is unknown or deleted.
pub async fn get_keys(
    store: &Store,
    user: &UserId,
    version: BackupVersion,
    scope: &KeyScope<'_>,
) -> Result<RoomKeys> {
    version_info(store, user, Some(version)).await?;
    let mut rooms = RoomKeys::new();
    for row in store.room_keys(user.as_str(), version.get(), scope).await? {
        let room_id = OwnedRoomId::try_from(row.room_id)
            .map_err(|e| Error::internal(format!("stored room ID: {e}")))?;
        let key = KeyBackupData {
            first_message_index: stored_uint(row.first_message_index)?,
            forwarded_count: stored_uint(row.forwarded_count)?,
            is_verified: row.is_verified,
            session_data: serde_json::from_str(&row.session_data)?,
        };
        rooms
            .entry(room_id)
            .or_default()
            .sessions
            .insert(row.session_id, key);
    }
    Ok(rooms)
}

fn stored_uint(n: i64) -> Result<UInt> {
    UInt::try_from(n).map_err(|_| Error::internal(format!("stored key index out of range: {n}")))
}

/// Deletes the keys of `scope` from a version, `M_NOT_FOUND` when the version is unknown or
/// deleted.
pub async fn delete_keys(
    store: &Store,
    user: &UserId,
    version: BackupVersion,
    scope: &KeyScope<'_>,
) -> Result<KeysUpdate> {
    let (uid, v) = (user.as_str(), version.get());
    let mut w = store.write().await?;
    if !w.lock_backup_version(uid, v).await? {
        return Err(unknown_version());
    }
    if w.delete_room_keys(uid, v, scope).await? > 0 {
        w.advance_backup_etag(uid, v).await?;
    }
    let (tag, n) = w.backup_etag_and_count(uid, v).await?;
    w.commit().await?;
    Ok(KeysUpdate {
        etag: etag(tag),
        count: count(n),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rank(is_verified: bool, first_message_index: i64, forwarded_count: i64) -> KeyRank {
        KeyRank {
            is_verified,
            first_message_index,
            forwarded_count,
        }
    }

    #[test]
    fn verified_beats_unverified_whatever_the_indices() {
        assert!(rank(true, 9, 9).replaces(rank(false, 0, 0)));
        assert!(!rank(false, 0, 0).replaces(rank(true, 9, 9)));
    }

    #[test]
    fn lower_first_message_index_wins_then_lower_forwarded_count() {
        assert!(rank(false, 1, 5).replaces(rank(false, 2, 0)));
        assert!(!rank(false, 2, 0).replaces(rank(false, 1, 5)));
        assert!(rank(true, 3, 0).replaces(rank(true, 3, 1)));
        assert!(!rank(true, 3, 1).replaces(rank(true, 3, 0)));
    }

    #[test]
    fn a_tie_keeps_the_stored_key() {
        assert!(!rank(true, 3, 1).replaces(rank(true, 3, 1)));
        assert!(!rank(false, 0, 0).replaces(rank(false, 0, 0)));
    }

    #[test]
    fn versions_are_the_decimal_numbers_we_hand_out() {
        assert_eq!(BackupVersion::parse("7"), Some(BackupVersion(7)));
        assert_eq!(BackupVersion(7).to_string(), "7");
        for bad in [
            "",
            "0",
            "-1",
            "+1",
            "01",
            "1.0",
            "x",
            "99999999999999999999",
        ] {
            assert_eq!(BackupVersion::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn key_data_must_have_the_spec_shape() {
        let ok = json!({"first_message_index": 1, "forwarded_count": 0, "is_verified": true,
                        "session_data": {"ciphertext": "c"}});
        assert!(serde_json::from_value::<KeyBackupData>(ok.clone()).is_ok());
        for (field, bad) in [
            ("first_message_index", json!(-1)),
            ("first_message_index", json!(1.5)),
            ("forwarded_count", json!("0")),
            ("is_verified", json!(1)),
            ("session_data", json!("opaque")),
        ] {
            let mut key = ok.clone();
            key[field] = bad;
            assert!(
                serde_json::from_value::<KeyBackupData>(key).is_err(),
                "{field}"
            );
        }
        let mut missing = ok;
        missing.as_object_mut().map(|o| o.remove("is_verified"));
        assert!(serde_json::from_value::<KeyBackupData>(missing).is_err());
    }

    /// A store in a fresh SQLite file, removed with the value.
    struct TempStore {
        store: Store,
        dir: std::path::PathBuf,
    }

    impl TempStore {
        async fn new() -> TempStore {
            let dir = std::env::temp_dir().join(format!(
                "myelin-backup-{}-{}",
                std::process::id(),
                crate::server::random_string(8)
            ));
            let url = format!("sqlite://{}", dir.join("db.sqlite").display());
            let store = Store::connect(&url, 1).await.expect("temporary store");
            TempStore { store, dir }
        }
    }

    impl Drop for TempStore {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn key(is_verified: bool, first_message_index: u32, forwarded_count: u32) -> KeyBackupData {
        KeyBackupData {
            first_message_index: first_message_index.into(),
            forwarded_count: forwarded_count.into(),
            is_verified,
            session_data: Map::from_iter([("ciphertext".to_owned(), json!("c"))]),
        }
    }

    fn one_key(room: &str, session: &str, key: KeyBackupData) -> RoomKeys {
        let room = OwnedRoomId::try_from(room).expect("room ID");
        let sessions = BTreeMap::from([(session.to_owned(), key)]);
        RoomKeys::from([(room, RoomKeyBackup { sessions })])
    }

    #[tokio::test]
    async fn the_etag_moves_exactly_when_stored_keys_change() {
        let t = TempStore::new().await;
        let user = <&UserId>::try_from("@alice:test.local").expect("user ID");
        let v = create_version(
            &t.store,
            user,
            "m.megolm_backup.v1.curve25519-aes-sha2",
            &Map::new(),
        )
        .await
        .expect("create");
        let put = |keys: RoomKeys| {
            let store = &t.store;
            async move {
                put_keys(store, user, Some(v), &keys)
                    .await
                    .expect("put")
                    .expect("current")
            }
        };

        let first = put(one_key("!a:test.local", "s1", key(false, 5, 0))).await;
        assert_eq!(first.count, 1);
        let loser = put(one_key("!a:test.local", "s1", key(false, 6, 0))).await;
        assert_eq!(loser, first, "a key that loses changes nothing");
        let winner = put(one_key("!a:test.local", "s1", key(false, 4, 0))).await;
        assert_ne!(winner.etag, first.etag);
        assert_eq!(winner.count, 1);
        let more = put(one_key("!b:test.local", "s1", key(false, 0, 0))).await;
        assert_eq!(more.count, 2);
        assert_eq!(
            version_info(&t.store, user, None).await.expect("info").etag,
            more.etag
        );

        let room = <&RoomId>::try_from("!a:test.local").expect("room ID");
        let nothing = delete_keys(&t.store, user, v, &KeyScope::Session(room, "nope"))
            .await
            .expect("delete");
        assert_eq!(nothing, more, "deleting nothing changes nothing");
        let deleted = delete_keys(&t.store, user, v, &KeyScope::Room(room))
            .await
            .expect("delete");
        assert_eq!(deleted.count, 1);
        assert_ne!(deleted.etag, more.etag);
        let left = get_keys(&t.store, user, v, &KeyScope::All)
            .await
            .expect("get");
        assert_eq!(left.len(), 1);
        assert_eq!(left.values().next().map(|r| r.sessions.len()), Some(1));
    }

    #[tokio::test]
    async fn only_the_current_version_takes_keys() {
        let t = TempStore::new().await;
        let user = <&UserId>::try_from("@alice:test.local").expect("user ID");
        let keys = one_key("!a:test.local", "s1", key(true, 0, 0));
        let none = put_keys(&t.store, user, BackupVersion::parse("1"), &keys).await;
        assert!(matches!(none, Err(e) if e.kind() == crate::ErrorKind::NotFound));

        let algorithm = "m.megolm_backup.v1.curve25519-aes-sha2";
        let v1 = create_version(&t.store, user, algorithm, &Map::new())
            .await
            .expect("v1");
        let v2 = create_version(&t.store, user, algorithm, &Map::new())
            .await
            .expect("v2");
        let old = put_keys(&t.store, user, Some(v1), &keys)
            .await
            .expect("put");
        assert_eq!(old, Err(NotCurrent { current: v2 }));
        let unknown = put_keys(&t.store, user, None, &keys).await.expect("put");
        assert_eq!(unknown, Err(NotCurrent { current: v2 }));

        delete_version(&t.store, user, v2).await.expect("delete");
        delete_version(&t.store, user, v2)
            .await
            .expect("deleting again succeeds");
        assert!(put_keys(&t.store, user, Some(v1), &keys)
            .await
            .expect("put")
            .is_ok());
        let v3 = create_version(&t.store, user, algorithm, &Map::new())
            .await
            .expect("v3");
        assert_eq!(v3.get(), 3, "a deleted version's number is not reused");
    }
}
