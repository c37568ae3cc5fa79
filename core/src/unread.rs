//! Unread counts kept in memory, so that a sync (above all the fan-out of one message to
//! every member's stream) asks the database nothing for them.
//!
//! An entry holds a user's unread counts in a room per thread, exact *as of* a room position:
//! every counted push action up to it, after the user's read receipts. The writer moves
//! entries on as it publishes each commit of the room ([`UnreadCache::advance`]): an entry as
//! of the room's previous position gets the commit's counted actions and the new position.
//! Any other entry is stale and is read again from the database when asked for. A receipt of
//! the user changes what is unread in ways only the database knows, so it drops the entry
//! ([`UnreadCache::forget`]); a read that raced the receipt must not put back what it read
//! before the receipt was committed, which the room's epoch tells: every drop gives the room
//! a new epoch, and a read fills the cache only under the epoch it started with.
//!
//! Events are published in commit order, one room's in stream order, and a room's position
//! moves only after its events are committed; so the database read up to a room position
//! reads everything at or below it, and nothing is counted twice or missed. One process per
//! database (as for the other in-memory state).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::store::Counts;

/// A user's unread counts in a room, by thread (threads with nothing unread left out).
pub type ThreadCounts = Arc<Vec<(String, Counts)>>;

/// Most entries held; past it, whole rooms are dropped (any entry may go at any time).
const MAX_ENTRIES: usize = 1 << 18;

/// A counted push action of a commit: the user it is for, its thread, whether it highlights.
#[derive(Debug, Clone)]
pub struct Counted {
    pub user_id: String,
    pub thread_id: String,
    pub highlight: bool,
}

#[derive(Default)]
pub struct UnreadCache {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Source of room epochs: a room dropped and made again never reuses one.
    seq: u64,
    entries: usize,
    rooms: HashMap<i64, Room>,
}

struct Room {
    epoch: u64,
    users: HashMap<String, Entry>,
}

struct Entry {
    as_of: i64,
    counts: ThreadCounts,
}

/// What a read that missed must hand back to [`UnreadCache::fill`].
#[derive(Debug, Clone, Copy)]
pub struct Miss {
    epoch: u64,
}

impl Inner {
    fn room(&mut self, room_nid: i64) -> &mut Room {
        let seq = &mut self.seq;
        self.rooms.entry(room_nid).or_insert_with(|| {
            *seq += 1;
            Room {
                epoch: *seq,
                users: HashMap::new(),
            }
        })
    }

    /// Drops rooms other than `keep` until there is room for more entries.
    fn shed(&mut self, keep: i64) {
        let drop: Vec<i64> = self
            .rooms
            .iter()
            .filter(|(nid, _)| **nid != keep)
            .scan(0usize, |freed, (nid, r)| {
                (*freed < MAX_ENTRIES / 4).then(|| {
                    *freed += r.users.len();
                    *nid
                })
            })
            .collect();
        for nid in drop {
            if let Some(r) = self.rooms.remove(&nid) {
                self.entries -= r.users.len();
            }
        }
    }
}

impl UnreadCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The user's counts as of room position `at`, or what to fill them with once read.
    pub fn get(&self, room_nid: i64, user_id: &str, at: i64) -> Result<ThreadCounts, Miss> {
        let mut g = self.lock();
        let room = g.room(room_nid);
        match room.users.get(user_id) {
            Some(e) if e.as_of == at => Ok(e.counts.clone()),
            _ => Err(Miss { epoch: room.epoch }),
        }
    }

    /// Keeps counts read from the database as of `at`, unless a receipt came meanwhile or a
    /// newer entry is there already.
    pub fn fill(&self, room_nid: i64, user_id: &str, miss: Miss, at: i64, counts: ThreadCounts) {
        let mut g = self.lock();
        if g.rooms.get(&room_nid).is_none_or(|r| r.epoch != miss.epoch) {
            return;
        }
        if g.entries >= MAX_ENTRIES {
            g.shed(room_nid);
        }
        let Some(room) = g.rooms.get_mut(&room_nid) else {
            return;
        };
        let entry = Entry { as_of: at, counts };
        let added = match room.users.get_mut(user_id) {
            Some(e) if e.as_of >= at => return,
            Some(e) => {
                *e = entry;
                false
            }
            None => {
                room.users.insert(user_id.to_owned(), entry);
                true
            }
        };
        if added {
            g.entries += 1;
        }
    }

    /// A commit of the room moved it from position `prev` to `to` with these counted
    /// actions: entries as of `prev` take them and move to `to`.
    pub fn advance(&self, room_nid: i64, prev: i64, to: i64, counted: &[Counted]) {
        let mut g = self.lock();
        let Some(room) = g.rooms.get_mut(&room_nid) else {
            return;
        };
        let mut by_user: HashMap<&str, Vec<&Counted>> = HashMap::new();
        for c in counted {
            by_user.entry(c.user_id.as_str()).or_default().push(c);
        }
        for (user, e) in room.users.iter_mut() {
            if e.as_of != prev {
                continue;
            }
            e.as_of = to;
            let Some(mine) = by_user.get(user.as_str()) else {
                continue;
            };
            let mut v = e.counts.as_ref().clone();
            for c in mine {
                let hl = i64::from(c.highlight);
                match v.iter_mut().find(|(t, _)| *t == c.thread_id) {
                    Some((_, (n, h))) => {
                        *n += 1;
                        *h += hl;
                    }
                    None => v.push((c.thread_id.clone(), (1, hl))),
                }
            }
            e.counts = Arc::new(v);
        }
    }

    /// The user's receipt in the room was committed: what is unread must be read again.
    pub fn forget(&self, room_nid: i64, user_id: &str) {
        let mut g = self.lock();
        g.seq += 1;
        let epoch = g.seq;
        let Some(room) = g.rooms.get_mut(&room_nid) else {
            return;
        };
        room.epoch = epoch;
        if room.users.remove(user_id).is_some() {
            g.entries -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counted(user: &str, thread: &str, highlight: bool) -> Counted {
        Counted {
            user_id: user.to_owned(),
            thread_id: thread.to_owned(),
            highlight,
        }
    }

    fn sorted(c: &ThreadCounts) -> Vec<(String, Counts)> {
        let mut v = c.as_ref().clone();
        v.sort();
        v
    }

    #[test]
    fn a_filled_entry_moves_with_the_room() {
        let cache = UnreadCache::default();
        let miss = cache.get(1, "@a:x", 10).unwrap_err();
        cache.fill(1, "@a:x", miss, 10, Arc::new(vec![("main".into(), (2, 0))]));
        assert_eq!(
            sorted(&cache.get(1, "@a:x", 10).unwrap()),
            [("main".into(), (2, 0))]
        );
        cache.advance(
            1,
            10,
            12,
            &[
                counted("@a:x", "main", true),
                counted("@b:x", "main", false),
                counted("@a:x", "$root", false),
            ],
        );
        // Not as of 10 any more, and as of 12 with the commit's actions for @a only.
        assert!(cache.get(1, "@a:x", 10).is_err());
        assert_eq!(
            sorted(&cache.get(1, "@a:x", 12).unwrap()),
            [("$root".into(), (1, 0)), ("main".into(), (3, 1))]
        );
        // A commit with nothing for @a moves the entry on unchanged.
        cache.advance(1, 12, 13, &[counted("@b:x", "main", false)]);
        assert_eq!(cache.get(1, "@a:x", 13).unwrap().len(), 2);
    }

    #[test]
    fn a_missed_commit_leaves_the_entry_stale() {
        let cache = UnreadCache::default();
        let miss = cache.get(1, "@a:x", 10).unwrap_err();
        cache.fill(1, "@a:x", miss, 10, Arc::new(vec![]));
        // Published from 11, not from 10: the entry cannot know what came between.
        cache.advance(1, 11, 12, &[counted("@a:x", "main", false)]);
        assert!(cache.get(1, "@a:x", 12).is_err());
        assert!(cache.get(1, "@a:x", 10).is_ok());
    }

    #[test]
    fn a_receipt_during_a_read_keeps_the_read_out() {
        let cache = UnreadCache::default();
        let miss = cache.get(1, "@a:x", 10).unwrap_err();
        // The receipt is committed and forgotten while the read is under way.
        cache.forget(1, "@a:x");
        cache.fill(1, "@a:x", miss, 10, Arc::new(vec![("main".into(), (5, 0))]));
        let again = cache.get(1, "@a:x", 10).unwrap_err();
        cache.fill(1, "@a:x", again, 10, Arc::new(vec![]));
        assert!(cache.get(1, "@a:x", 10).unwrap().is_empty());
        // A receipt drops what is held.
        cache.forget(1, "@a:x");
        assert!(cache.get(1, "@a:x", 10).is_err());
    }

    #[test]
    fn an_older_read_does_not_replace_a_newer_entry() {
        let cache = UnreadCache::default();
        let old = cache.get(1, "@a:x", 10).unwrap_err();
        let new = cache.get(1, "@a:x", 12).unwrap_err();
        cache.fill(1, "@a:x", new, 12, Arc::new(vec![("main".into(), (1, 0))]));
        cache.fill(1, "@a:x", old, 10, Arc::new(vec![]));
        assert_eq!(cache.get(1, "@a:x", 12).unwrap().len(), 1);
    }

    #[test]
    fn entries_are_bounded() {
        let cache = UnreadCache::default();
        for room in 0..(MAX_ENTRIES as i64 / 1000 + 10) {
            for u in 0..1000 {
                let user = format!("@u{u}:x");
                let miss = cache.get(room, &user, 1).unwrap_err();
                cache.fill(room, &user, miss, 1, Arc::new(vec![]));
            }
        }
        let g = cache.lock();
        let held: usize = g.rooms.values().map(|r| r.users.len()).sum();
        assert_eq!(held, g.entries);
        assert!(held <= MAX_ENTRIES, "{held}");
    }
}
