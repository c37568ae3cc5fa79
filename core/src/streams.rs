//! Stream positions and the notifier.
//!
//! Every event gets a global `stream_ordering`, allocated in process under the room's lock and
//! published only once it and every lower position are committed, so a reader never sees a
//! position before all lower ones exist. Account data has its own stream. The notifier holds
//! one watch channel per user; a commit wakes exactly the users it concerns.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        atomic::{AtomicI64, Ordering},
        Mutex,
    },
};

use tokio::sync::watch;

/// Allocates positions and tracks the highest position below which everything is committed.
pub struct StreamTracker {
    inner: Mutex<TrackerInner>,
    current: AtomicI64,
}

struct TrackerInner {
    next: i64,
    in_flight: BTreeSet<i64>,
}

impl StreamTracker {
    /// Starts after `max_persisted`.
    pub fn new(max_persisted: i64) -> Self {
        StreamTracker {
            inner: Mutex::new(TrackerInner {
                next: max_persisted + 1,
                in_flight: BTreeSet::new(),
            }),
            current: AtomicI64::new(max_persisted),
        }
    }

    /// Reserves `n` consecutive positions.
    pub fn allocate(&self, n: usize) -> Vec<i64> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let ids: Vec<i64> = (g.next..g.next + n as i64).collect();
        g.next += n as i64;
        g.in_flight.extend(ids.iter().copied());
        ids
    }

    /// Marks positions as finished (committed or abandoned) and publishes the new current.
    pub fn complete(&self, ids: &[i64]) -> i64 {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            g.in_flight.remove(id);
        }
        let cur = match g.in_flight.first() {
            Some(first) => first - 1,
            None => g.next - 1,
        };
        self.current.store(cur, Ordering::Release);
        cur
    }

    /// Everything at or below this position is committed.
    pub fn current(&self) -> i64 {
        self.current.load(Ordering::Acquire)
    }
}

/// Wakes waiting syncs of the users a change concerns.
#[derive(Default)]
pub struct Notifier {
    users: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl Notifier {
    /// A receiver that changes whenever something for `user_id` is committed.
    pub fn subscribe(&self, user_id: &str) -> watch::Receiver<u64> {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        users
            .entry(user_id.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Wakes every waiter of these users.
    pub fn wake<'a>(&self, user_ids: impl IntoIterator<Item = &'a str>) {
        let users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        for u in user_ids {
            if let Some(tx) = users.get(u) {
                tx.send_modify(|v| *v += 1);
            }
        }
    }

    /// Wakes everyone (shutdown).
    pub fn wake_all(&self) {
        let users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        for tx in users.values() {
            tx.send_modify(|v| *v += 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_waits_for_lower_positions() {
        let t = StreamTracker::new(10);
        let a = t.allocate(1);
        let b = t.allocate(2);
        assert_eq!(t.current(), 10);
        t.complete(&b);
        assert_eq!(t.current(), 10, "11 is still in flight");
        t.complete(&a);
        assert_eq!(t.current(), 13);
    }
}
