//! Account logic: localpart rules, argon2 password hashes, access/refresh token minting
//! (tokens are random; only their sha256 is stored) and the access-token cache.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use argon2::{
    password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
    Argon2,
};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use sha2::{Digest, Sha256};

use crate::{server::random_string, store::now_ms, Error, ErrorKind, Result, Server};

/// Checks a requested localpart against the spec's grammar (`a-z0-9._=-/+`).
pub fn validate_localpart(localpart: &str) -> Result<()> {
    if localpart.is_empty()
        || !localpart.bytes().all(
            |b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'=' | b'-' | b'/' | b'+'),
        )
    {
        return Err(Error::new(
            ErrorKind::InvalidUsername,
            "User ID may only contain a-z, 0-9, and ._=-/+",
        ));
    }
    Ok(())
}

pub fn hash_password(password: &str) -> Result<String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Error::internal(format!("hashing password: {e}")))
}

pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A fresh random token with a readable prefix (`myl_`, `mylr_`).
pub fn new_token(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::Rng::fill(&mut rand::thread_rng(), &mut bytes);
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// The stored form of a token.
pub fn token_hash(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// argon2 needs 19 MiB and ~50 ms of CPU per hash: at most this many run at once, so a burst
/// of logins neither starves the request threads nor balloons memory.
static HASHING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// Runs a password hash or check off the async threads, bounded by [`HASHING`].
async fn hashing<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let _permit = HASHING
        .acquire()
        .await
        .map_err(|e| Error::internal(format!("semaphore: {e}")))?;
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::internal(format!("join: {e}")))
}

/// A new device ID.
pub fn new_device_id() -> String {
    random_string(10).to_uppercase()
}

/// The owner of a live access token.
#[derive(Debug, Clone)]
pub struct Session {
    pub user_id: ruma::OwnedUserId,
    pub device_id: String,
    pub is_admin: bool,
    pub expires_ts: Option<i64>,
}

/// Access tokens issued at login.
pub struct IssuedTokens {
    pub access_token: String,
    pub refresh_token: Option<String>,
    pub expires_in_ms: Option<u64>,
}

/// In-memory cache of token hash → session, invalidated on logout.
#[derive(Default)]
pub struct TokenCache {
    map: RwLock<HashMap<String, Arc<Session>>>,
}

impl TokenCache {
    fn get(&self, hash: &str) -> Option<Arc<Session>> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(hash)
            .cloned()
    }
    fn put(&self, hash: String, s: Arc<Session>) {
        let mut m = self.map.write().unwrap_or_else(|e| e.into_inner());
        if m.len() > 100_000 {
            m.clear();
        }
        m.insert(hash, s);
    }
    /// Drops every cached session of a user (device `None`) or of one device.
    pub fn forget(&self, user_id: &str, device_id: Option<&str>) {
        let mut m = self.map.write().unwrap_or_else(|e| e.into_inner());
        m.retain(|_, s| {
            !(s.user_id.as_str() == user_id && device_id.is_none_or(|d| d == s.device_id))
        });
    }
}

impl Server {
    /// Resolves an access token. Errors are `M_UNKNOWN_TOKEN` (soft logout when expired).
    pub async fn authenticate(&self, token: &str) -> Result<Arc<Session>> {
        let hash = token_hash(token);
        let session = match self.tokens.get(&hash) {
            Some(s) => s,
            None => {
                let owner = self.store.token_owner(&hash).await?.ok_or_else(|| {
                    Error::new(
                        ErrorKind::UnknownToken { soft_logout: false },
                        "Unknown access token",
                    )
                })?;
                let user = self.store.user(&owner.user_id).await?.ok_or_else(|| {
                    Error::new(
                        ErrorKind::UnknownToken { soft_logout: false },
                        "Unknown user",
                    )
                })?;
                let s = Arc::new(Session {
                    user_id: ruma::OwnedUserId::try_from(owner.user_id.as_str())
                        .map_err(|e| Error::internal(format!("user id: {e}")))?,
                    device_id: owner.device_id,
                    is_admin: user.is_admin,
                    expires_ts: owner.expires_ts,
                });
                self.tokens.put(hash, s.clone());
                s
            }
        };
        if session.expires_ts.is_some_and(|e| e <= now_ms()) {
            return Err(Error::new(
                ErrorKind::UnknownToken { soft_logout: true },
                "Access token has expired",
            ));
        }
        Ok(session)
    }

    /// Creates (or takes over) a device and issues its tokens.
    pub async fn issue_tokens(
        &self,
        user_id: &str,
        device_id: &str,
        display_name: Option<&str>,
        with_refresh: bool,
    ) -> Result<IssuedTokens> {
        let access = new_token("myl_");
        let refresh = with_refresh.then(|| new_token("mylr_"));
        let lifetime = self.config.access_token_lifetime_ms;
        let expires_ts = with_refresh.then(|| now_ms() + lifetime as i64);
        self.tokens.forget(user_id, Some(device_id));
        self.store
            .login_device(
                user_id,
                device_id,
                display_name,
                &token_hash(&access),
                expires_ts,
                refresh.as_deref().map(token_hash).as_deref(),
            )
            .await?;
        Ok(IssuedTokens {
            access_token: access,
            refresh_token: refresh,
            expires_in_ms: with_refresh.then_some(lifetime),
        })
    }

    /// Exchanges a refresh token.
    pub async fn refresh_tokens(&self, refresh_token: &str) -> Result<IssuedTokens> {
        let access = new_token("myl_");
        let refresh = new_token("mylr_");
        let lifetime = self.config.access_token_lifetime_ms;
        let owner = self
            .store
            .rotate_refresh_token(
                &token_hash(refresh_token),
                &token_hash(&access),
                Some(now_ms() + lifetime as i64),
                &token_hash(&refresh),
            )
            .await?
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::UnknownToken { soft_logout: false },
                    "Unknown refresh token",
                )
            })?;
        self.tokens.forget(&owner.0, Some(&owner.1));
        Ok(IssuedTokens {
            access_token: access,
            refresh_token: Some(refresh),
            expires_in_ms: Some(lifetime),
        })
    }

    /// Deletes devices and forgets their sessions.
    pub async fn delete_devices(
        &self,
        user_id: &str,
        devices: Option<&[String]>,
        keep: Option<&str>,
    ) -> Result<Vec<String>> {
        // Forgotten before too: the deletion wakes the user's streams, and a WebSocket sync
        // re-checks its token on that wake-up (it must not find it still cached).
        match devices {
            Some(list) => list
                .iter()
                .for_each(|d| self.tokens.forget(user_id, Some(d))),
            None => self.tokens.forget(user_id, None),
        }
        let gone = self.remove_devices(user_id, devices, keep).await?;
        for d in &gone {
            self.tokens.forget(user_id, Some(d));
        }
        // Their pushers went with them.
        self.push.forget_pushers(user_id);
        Ok(gone)
    }

    /// Checks a user's password.
    pub async fn check_password(&self, user_id: &str, password: &str) -> Result<bool> {
        let Some(user) = self.store.user(user_id).await? else {
            return Ok(false);
        };
        if user.deactivated {
            return Ok(false);
        }
        let Some(hash) = user.password_hash else {
            return Ok(false);
        };
        let password = password.to_owned();
        hashing(move || verify_password(&password, &hash)).await
    }

    /// Creates an account; `M_USER_IN_USE` when taken.
    pub async fn create_account(
        &self,
        localpart: &str,
        password: Option<&str>,
        admin: bool,
    ) -> Result<ruma::OwnedUserId> {
        validate_localpart(localpart)?;
        let user_id = ruma::OwnedUserId::try_from(format!("@{localpart}:{}", self.server_name))
            .map_err(|_| Error::new(ErrorKind::InvalidUsername, "Invalid user ID"))?;
        if user_id.as_str().len() > 255 {
            return Err(Error::new(
                ErrorKind::InvalidUsername,
                "User ID is too long",
            ));
        }
        let hash = match password {
            Some(p) => {
                let p = p.to_owned();
                Some(hashing(move || hash_password(&p)).await??)
            }
            None => None,
        };
        if !self
            .store
            .create_user(user_id.as_str(), hash.as_deref(), admin, localpart)
            .await?
        {
            return Err(Error::new(ErrorKind::UserInUse, "User ID already taken"));
        }
        Ok(user_id)
    }

    /// Sets a new password.
    pub async fn set_password(&self, user_id: &str, password: &str) -> Result<bool> {
        let p = password.to_owned();
        let hash = hashing(move || hash_password(&p)).await??;
        self.store.set_password_hash(user_id, Some(&hash)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_verify_only_themselves() {
        let h = hash_password("correct horse").unwrap();
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong", &h));
    }

    #[test]
    fn tokens_are_unique_and_hashed() {
        let a = new_token("myl_");
        let b = new_token("myl_");
        assert_ne!(a, b);
        assert!(a.starts_with("myl_"));
        assert_eq!(token_hash(&a).len(), 64);
        assert_ne!(token_hash(&a), token_hash(&b));
    }

    #[test]
    fn localparts_follow_the_grammar() {
        assert!(validate_localpart("alice.b-c_d=e/f+g").is_ok());
        assert!(validate_localpart("Alice").is_err());
        assert!(validate_localpart("").is_err());
        assert!(validate_localpart("a b").is_err());
    }
}
