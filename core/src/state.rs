//! Room state in memory: interned `(type, state_key)` pairs and resolved state-group snapshots,
//! both cached with bounded size. A snapshot is a map from state-key ID to event ID (numeric).

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, RwLock},
};

use crate::{store::Store, Error, Result};

/// Resolved state: `state_key_nid → event_nid`.
pub type StateMap = HashMap<i64, i64>;

/// Longest delta chain before a full snapshot is written.
pub const MAX_CHAIN: i64 = 64;

const MAX_CACHED_GROUPS: usize = 20_000;

/// Caches for state keys and state groups.
#[derive(Default)]
pub struct StateCache {
    keys: RwLock<KeyMaps>,
    groups: RwLock<HashMap<i64, (Arc<StateMap>, i64)>>,
}

/// Pairs known not to be interned, kept while this process interns none (one process per
/// database, so every interning goes through [`StateCache::intern`]); at most this many.
const MAX_ABSENT: usize = 10_000;

#[derive(Default)]
struct KeyMaps {
    by_pair: HashMap<(String, String), i64>,
    by_nid: HashMap<i64, (String, String)>,
    /// Pairs the database did not have (looked up for a room without, say, a server ACL).
    absent: HashSet<(String, String)>,
    /// Bumped by every interning, so a lookup that raced one does not record an absence.
    epoch: u64,
}

impl StateCache {
    /// The ID of `(event_type, state_key)`, interning it if new.
    pub async fn intern(&self, store: &Store, event_type: &str, state_key: &str) -> Result<i64> {
        if let Some(n) = self.cached_nid(event_type, state_key) {
            return Ok(n);
        }
        let pair = [(event_type.to_owned(), state_key.to_owned())];
        let nids = self.intern_all(store, &pair).await?;
        nids.first()
            .copied()
            .ok_or_else(|| Error::internal("state key not interned"))
    }

    /// The IDs of many pairs, interning the new ones in one transaction.
    pub async fn intern_all(&self, store: &Store, pairs: &[(String, String)]) -> Result<Vec<i64>> {
        let new: Vec<(String, String)> = {
            let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
            let mut seen = HashSet::new();
            pairs
                .iter()
                .filter(|p| !keys.by_pair.contains_key(*p) && seen.insert(*p))
                .cloned()
                .collect()
        };
        for ((t, k), nid) in new.iter().zip(store.intern_state_keys(&new).await?) {
            self.remember(nid, t, k);
        }
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        pairs
            .iter()
            .map(|p| {
                keys.by_pair
                    .get(p)
                    .copied()
                    .ok_or_else(|| Error::internal("state key not interned"))
            })
            .collect()
    }

    /// The ID of `(event_type, state_key)` if it was ever interned.
    pub async fn lookup(
        &self,
        store: &Store,
        event_type: &str,
        state_key: &str,
    ) -> Result<Option<i64>> {
        let pair = (event_type.to_owned(), state_key.to_owned());
        let epoch = {
            let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = keys.by_pair.get(&pair) {
                return Ok(Some(*n));
            }
            if keys.absent.contains(&pair) {
                return Ok(None);
            }
            keys.epoch
        };
        let nid = store.lookup_state_key(event_type, state_key).await?;
        match nid {
            Some(n) => self.remember(n, event_type, state_key),
            None => {
                let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
                if keys.epoch == epoch {
                    if keys.absent.len() >= MAX_ABSENT {
                        keys.absent.clear();
                    }
                    keys.absent.insert(pair);
                }
            }
        }
        Ok(nid)
    }

    /// The `(event_type, state_key)` of an interned ID, when this process knows it.
    pub fn cached_pair(&self, nid: i64) -> Option<(String, String)> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        keys.by_nid.get(&nid).cloned()
    }

    fn cached_nid(&self, event_type: &str, state_key: &str) -> Option<i64> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        keys.by_pair
            .get(&(event_type.to_owned(), state_key.to_owned()))
            .copied()
    }

    fn remember(&self, nid: i64, event_type: &str, state_key: &str) {
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        keys.epoch += 1;
        let pair = (event_type.to_owned(), state_key.to_owned());
        keys.absent.remove(&pair);
        keys.by_pair.insert(pair, nid);
        keys.by_nid
            .insert(nid, (event_type.to_owned(), state_key.to_owned()));
    }

    /// The resolved snapshot of a state group and its chain length.
    pub async fn group(&self, store: &Store, group: i64) -> Result<(Arc<StateMap>, i64)> {
        if let Some(g) = self
            .groups
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&group)
        {
            return Ok(g.clone());
        }
        // Walk up to the nearest cached ancestor (or the root), then apply edits downwards.
        let mut chain = Vec::new();
        let mut cursor = Some(group);
        let mut base: Option<Arc<StateMap>> = None;
        while let Some(g) = cursor {
            if let Some((m, _)) = self
                .groups
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(&g)
            {
                base = Some(m.clone());
                break;
            }
            let row = store
                .state_group(g)
                .await?
                .ok_or_else(|| Error::internal(format!("missing state group {g}")))?;
            cursor = row.parent;
            chain.push((g, row));
        }
        let mut map: StateMap = base.map(|b| (*b).clone()).unwrap_or_default();
        let mut result = None;
        for (g, row) in chain.into_iter().rev() {
            for (k, e) in &row.edits {
                map.insert(*k, *e);
            }
            let snap = Arc::new(map.clone());
            self.insert_group(g, snap.clone(), row.chain_len);
            result = Some((snap, row.chain_len));
        }
        result.ok_or_else(|| Error::internal("empty state chain"))
    }

    /// Records a snapshot made by a write.
    pub fn insert_group(&self, group: i64, map: Arc<StateMap>, chain_len: i64) {
        let mut groups = self.groups.write().unwrap_or_else(|e| e.into_inner());
        if groups.len() >= MAX_CACHED_GROUPS {
            groups.clear();
        }
        groups.insert(group, (map, chain_len));
    }
}
