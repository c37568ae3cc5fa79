//! State resolution over events in memory: ruma's state resolution v2 / v2.1 for the room
//! version, with the conflicted state subgraph (v2.1, room v12) computed here. The server
//! loads the events and auth chains (`Server::resolve_states`); this part only computes, so
//! the state resolution benchmark (`src/bin/state-res-bench.rs`) measures exactly it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use ruma::{
    room_version_rules::RoomVersionRules,
    state_res::{utils::event_id_set::EventIdSet, StateMap},
    OwnedEventId,
};

use crate::{pdu::Pdu, Error, Result};

/// Resolves `states` (each `(type, state_key) → event ID`). `chains` holds the auth chain of
/// each state, in the same order; `pdus` every event of the states and of their auth chains.
pub fn resolve(
    rules: &RoomVersionRules,
    states: &[StateMap<OwnedEventId>],
    chains: Vec<EventIdSet<OwnedEventId>>,
    pdus: &HashMap<OwnedEventId, Arc<Pdu>>,
) -> Result<StateMap<OwnedEventId>> {
    let Some(state_res) = rules.state_res.v2_rules() else {
        return Err(Error::internal("room version without state resolution v2"));
    };
    let fetch = |id: &ruma::EventId| pdus.get(id).cloned();
    let subgraph =
        |conflicted: &StateMap<Vec<OwnedEventId>>| Some(conflicted_subgraph(conflicted, pdus));
    ruma::state_res::resolve(
        &rules.authorization,
        state_res,
        states.iter(),
        chains,
        fetch,
        subgraph,
    )
    .map_err(|e| Error::internal(format!("state resolution: {e}")))
}

/// The conflicted state subgraph (room v12): events on an auth path from one conflicted event
/// to another.
fn conflicted_subgraph(
    conflicted: &StateMap<Vec<OwnedEventId>>,
    pdus: &HashMap<OwnedEventId, Arc<Pdu>>,
) -> EventIdSet<OwnedEventId> {
    let targets: HashSet<&OwnedEventId> = conflicted.values().flatten().collect();
    // reaches[e]: e reaches a conflicted event through auth_events (e itself excluded).
    let mut reaches: HashMap<OwnedEventId, bool> = HashMap::new();
    fn visit(
        id: &OwnedEventId,
        pdus: &HashMap<OwnedEventId, Arc<Pdu>>,
        targets: &HashSet<&OwnedEventId>,
        reaches: &mut HashMap<OwnedEventId, bool>,
        depth: usize,
    ) -> bool {
        if let Some(r) = reaches.get(id) {
            return *r;
        }
        reaches.insert(id.clone(), false);
        let mut r = false;
        if depth < 10_000 {
            if let Some(p) = pdus.get(id) {
                for a in &p.auth_events {
                    if targets.contains(a) || visit(a, pdus, targets, reaches, depth + 1) {
                        r = true;
                    }
                }
            }
        }
        reaches.insert(id.clone(), r);
        r
    }
    let mut out = EventIdSet::new();
    for t in &targets {
        visit(t, pdus, &targets, &mut reaches, 0);
    }
    for (id, r) in &reaches {
        if *r || targets.contains(id) {
            out.insert(id.clone());
        }
    }
    for t in targets {
        out.insert(t.clone());
    }
    out
}
