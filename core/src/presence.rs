//! Presence (spec § "Presence"): which devices of a user are connected, and the state that
//! follows from it.
//!
//! A transport that keeps a device connected (a `/sync` long-poll in flight, an open WebSocket
//! sync stream) holds a [`SyncingGuard`] for as long as it runs; dropping the guard starts the
//! device's grace period. Actions a user takes (sends, typing, receipts) mark them active.

use std::sync::Arc;

/// Presence of every local user.
#[derive(Default)]
pub struct Presence {}

/// Held while a device is syncing; see the module docs.
pub struct SyncingGuard {
    #[allow(dead_code)]
    presence: Arc<Presence>,
    #[allow(dead_code)]
    user_id: String,
    #[allow(dead_code)]
    device_id: String,
}

impl Presence {
    /// `device_id` of `user_id` is syncing with `set_presence` (`online`, `unavailable`,
    /// `offline`; `None` = `online`) until the guard is dropped.
    pub fn syncing(
        self: &Arc<Self>,
        user_id: &str,
        device_id: &str,
        _set_presence: Option<&str>,
    ) -> SyncingGuard {
        SyncingGuard {
            presence: self.clone(),
            user_id: user_id.to_owned(),
            device_id: device_id.to_owned(),
        }
    }

    /// `user_id` did something (sent, typed, sent a receipt): bumps `last_active_ts`.
    pub fn active(&self, _user_id: &str) {}
}

impl SyncingGuard {
    /// The device reports a new `set_presence` (a WebSocket `ping` or `sync` frame).
    pub fn set_presence(&self, _set_presence: Option<&str>) {}
}
