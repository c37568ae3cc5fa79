//! History this server lacks, fetched from other servers:
//!
//! - **Backfill**: when `/messages` reaches a backward extremity (a parent the timeline names
//!   but does not hold), the room's other servers are asked in turn for the events before it
//!   (`/backfill`). Every event of the answer is verified (format, room, signatures, content
//!   hash); only those on the `prev_events` paths down from the extremities asked for are kept,
//!   and they are added oldest first as historical events (the core checks them against their
//!   auth events and the state before them).
//! - **The state at an event we lack** (`/state_ids` at it, then the events it names that we
//!   do not hold by `/event`, or all at once by `/state`): the state after an oldest
//!   backfilled event's missing parent, and the state after the missing parents of an incoming
//!   event that `/get_missing_events` could not connect (see [`crate::inbound`]).
//!
//! All of it is bounded: events per request, servers asked, events fetched one by one, and a
//! deadline from the caller.

use std::{
    collections::{BinaryHeap, HashMap, HashSet, VecDeque},
    sync::Arc,
};

use futures::StreamExt;
use myelin_core::{
    pdu::Pdu,
    ruma::{events::TimelineEventType, OwnedEventId, OwnedServerName, ServerName},
    server::Ingested,
    state::StateMap,
    Error, Result, RoomInfo,
};
use serde_json::Value;
use tokio::time::Instant;

use crate::{inbound::encode, Federation};

/// Most events asked for in one `/backfill` (what a Myelin server serves at most).
pub const BACKFILL_MAX: usize = 100;
/// Servers asked in turn for one backfill.
const MAX_SERVERS: usize = 5;
/// Events a reported state names that are fetched one by one; when more are missing, the
/// whole state is fetched with `/state`.
const MAX_EVENT_FETCHES: usize = 50;
/// `/event` requests in flight at once.
const FETCH_CONCURRENCY: usize = 8;
/// Missing parents of one event whose state is asked for.
pub const MAX_GAP_PARENTS: usize = 5;
/// Reported states fetched for one backfill answer.
const MAX_GAP_STATES: usize = 10;

/// Turns a request's outcome into our error, naming what was asked.
fn remote(what: &str, e: crate::client::FedError) -> Error {
    Error::internal(format!("{what}: {e}"))
}

impl Federation {
    /// Fetches the history before `from` (backward extremities of `room`) from the room's
    /// other servers and adds it as historical events, at most `limit` events, stopping at
    /// `deadline`. Returns whether the history before `from` moved: events were added (here or
    /// by a concurrent backfill of the same room).
    pub async fn backfill(
        &self,
        room: &Arc<RoomInfo>,
        from: &[OwnedEventId],
        limit: usize,
        deadline: Instant,
    ) -> Result<bool> {
        let lock = self.backfill_lock(room.nid);
        let _one_at_a_time = match tokio::time::timeout_at(deadline, lock.lock()).await {
            Ok(guard) => guard,
            Err(_) => return Ok(false),
        };
        let from = self.server.not_in_timeline(from).await?;
        if from.is_empty() {
            return Ok(true);
        }
        let limit = limit.clamp(1, BACKFILL_MAX);
        let servers = self.server.room_servers(room.nid).await?;
        for server in servers.iter().take(MAX_SERVERS) {
            let Ok(server) = OwnedServerName::try_from(server.as_str()) else {
                continue;
            };
            let mut path = format!(
                "/_matrix/federation/v1/backfill/{}?limit={limit}",
                encode(room.room_id.as_str())
            );
            for id in &from {
                path.push_str("&v=");
                path.push_str(&encode(id.as_str()));
            }
            let request = self.client.request(&server, http::Method::GET, &path, None);
            let answer = match tokio::time::timeout_at(deadline, request).await {
                Ok(Ok(a)) => a,
                Ok(Err(e)) => {
                    tracing::info!(room = %room.room_id, %server, error = %e, "backfill failed");
                    continue;
                }
                Err(_) => return Ok(false),
            };
            let pdus = answer
                .get("pdus")
                .and_then(Value::as_array)
                .map(|a| a.as_slice())
                .unwrap_or_default();
            // A server may send more than asked: the rest is not looked at.
            let pdus = &pdus[..pdus.len().min(limit)];
            let verified = self.verify_pdus(room, pdus).await;
            let history = self.history_down_from(&from, verified).await?;
            if history.is_empty() {
                tracing::info!(room = %room.room_id, %server, "backfill answer held nothing usable");
                continue;
            }
            let added = self.add_history(&server, room, history, deadline).await;
            tracing::debug!(room = %room.room_id, %server, added, "backfilled");
            if added > 0 {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The events of a backfill answer on the `prev_events` paths down from `from`, stopping
    /// at events the timeline holds, oldest first (parents before children, then by depth).
    async fn history_down_from(&self, from: &[OwnedEventId], answer: Vec<Pdu>) -> Result<Vec<Pdu>> {
        let total = answer.len();
        let mut by_id: HashMap<OwnedEventId, Pdu> = answer
            .into_iter()
            .map(|p| (p.event_id.clone(), p))
            .collect();
        let mut chosen: HashMap<OwnedEventId, Pdu> = HashMap::new();
        let mut queue: VecDeque<OwnedEventId> = from.iter().cloned().collect();
        while let Some(id) = queue.pop_front() {
            let Some(p) = by_id.remove(&id) else {
                continue;
            };
            if self
                .server
                .not_in_timeline(std::slice::from_ref(&id))
                .await?
                .is_empty()
            {
                continue;
            }
            queue.extend(p.prev_events.iter().cloned());
            chosen.insert(id, p);
        }
        if chosen.len() < total {
            tracing::debug!(
                kept = chosen.len(),
                total,
                "backfill answer: events off the asked-for history left out"
            );
        }
        // Parents first (Kahn's algorithm over the chosen events), shallowest first.
        let mut waiting: HashMap<OwnedEventId, usize> = HashMap::new();
        let mut children: HashMap<OwnedEventId, Vec<OwnedEventId>> = HashMap::new();
        for (id, p) in &chosen {
            let parents: HashSet<&OwnedEventId> = p
                .prev_events
                .iter()
                .filter(|prev| chosen.contains_key(*prev))
                .collect();
            waiting.insert(id.clone(), parents.len());
            for prev in parents {
                children.entry(prev.clone()).or_default().push(id.clone());
            }
        }
        let mut ready: BinaryHeap<std::cmp::Reverse<(i64, OwnedEventId)>> = waiting
            .iter()
            .filter(|(_, n)| **n == 0)
            .map(|(id, _)| std::cmp::Reverse((chosen[id].depth, id.clone())))
            .collect();
        let mut out = Vec::with_capacity(chosen.len());
        while let Some(std::cmp::Reverse((_, id))) = ready.pop() {
            for child in children.get(&id).into_iter().flatten() {
                if let Some(n) = waiting.get_mut(child) {
                    *n -= 1;
                    if *n == 0 {
                        ready.push(std::cmp::Reverse((chosen[child].depth, child.clone())));
                    }
                }
            }
            if let Some(p) = chosen.remove(&id) {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// Adds backfilled events (oldest first) as history, fetching from `origin` the auth
    /// events they lack and the state after parents that neither the timeline nor the answer
    /// holds. Returns how many were added.
    async fn add_history(
        &self,
        origin: &ServerName,
        room: &Arc<RoomInfo>,
        events: Vec<Pdu>,
        deadline: Instant,
    ) -> usize {
        let mut gap: HashMap<OwnedEventId, Arc<StateMap>> = HashMap::new();
        let mut states_fetched = 0;
        let mut added = 0;
        for pdu in events {
            if Instant::now() >= deadline {
                break;
            }
            let id = pdu.event_id.clone();
            let (mut fetched_auth, mut fetched_state) = (false, false);
            loop {
                let outcome = self.server.ingest_historical(room, pdu.clone(), &gap).await;
                let missing = match outcome {
                    Ok(Ingested::Accepted(_)) => {
                        added += 1;
                        break;
                    }
                    Ok(Ingested::Missing(m)) => m,
                    Ok(other) => {
                        tracing::debug!(event = %id, ?other, "backfilled event not added");
                        break;
                    }
                    Err(e) => {
                        tracing::info!(event = %id, error = %e, "backfilled event failed");
                        break;
                    }
                };
                let auth_missing = missing.iter().any(|m| pdu.auth_events.contains(m));
                if auth_missing && !fetched_auth {
                    fetched_auth = true;
                    if let Err(e) = self.fetch_auth_chain(origin, room, &id).await {
                        tracing::info!(event = %id, error = %e, "auth chain of a backfilled event");
                        break;
                    }
                } else if !auth_missing
                    && !fetched_state
                    && missing.len() <= MAX_GAP_PARENTS
                    && states_fetched + missing.len() <= MAX_GAP_STATES
                {
                    fetched_state = true;
                    states_fetched += missing.len();
                    for prev in missing {
                        match self.state_after_missing(origin, room, &prev).await {
                            Ok(state) => {
                                gap.insert(prev, state);
                            }
                            Err(e) => {
                                tracing::info!(%prev, error = %e, "state at a missing event")
                            }
                        }
                    }
                } else {
                    tracing::info!(event = %id, ?missing, "backfilled event lacks events");
                    break;
                }
            }
        }
        added
    }

    /// The state after `prev`, an event we lack, as `origin` reports it: `/state_ids` at it,
    /// `prev` itself and the events the state and its auth chain name that we lack (by `/event`,
    /// or `/state` when many are missing), each verified and stored as an outlier. After the
    /// create event the state is the create event alone: nothing is asked.
    pub(crate) async fn state_after_missing(
        &self,
        origin: &ServerName,
        room: &RoomInfo,
        prev: &OwnedEventId,
    ) -> Result<Arc<StateMap>> {
        let held = self.server.event_by_id(prev).await?;
        let is_create =
            |p: &Pdu| p.kind == TimelineEventType::RoomCreate && p.room_id == room.room_id;
        if held.as_ref().is_some_and(|e| is_create(&e.pdu)) {
            return self.server.state_after_remote(room, prev, &[]).await;
        }
        let mut fetched = Vec::new();
        if held.is_none() {
            let p = self.fetch_event(origin, room, prev.clone()).await?;
            if is_create(&p) {
                self.server.store_outliers(room, vec![p]).await?;
                return self.server.state_after_remote(room, prev, &[]).await;
            }
            fetched.push(p);
        }
        let room_path = encode(room.room_id.as_str());
        let at = encode(prev.as_str());
        let ids = self
            .client
            .request(
                origin,
                http::Method::GET,
                &format!("/_matrix/federation/v1/state_ids/{room_path}?event_id={at}"),
                None,
            )
            .await
            .map_err(|e| remote("state_ids", e))?;
        let list = |field: &str| -> Vec<OwnedEventId> {
            ids.get(field)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .filter_map(|s| OwnedEventId::try_from(s).ok())
                .collect()
        };
        let state_ids = list("pdu_ids");
        let mut wanted = state_ids.clone();
        wanted.extend(list("auth_chain_ids"));
        for p in &fetched {
            wanted.extend(p.auth_events.iter().cloned());
        }
        wanted.sort();
        wanted.dedup();
        let missing = self.server.unknown_events(&wanted).await?;
        if missing.len() > MAX_EVENT_FETCHES {
            let state = self
                .client
                .request(
                    origin,
                    http::Method::GET,
                    &format!("/_matrix/federation/v1/state/{room_path}?event_id={at}"),
                    None,
                )
                .await
                .map_err(|e| remote("state", e))?;
            let mut all: Vec<Value> = Vec::new();
            for field in ["pdus", "auth_chain"] {
                if let Some(a) = state.get(field).and_then(Value::as_array) {
                    all.extend(a.iter().cloned());
                }
            }
            fetched.extend(self.verify_pdus(room, &all).await);
        } else {
            let results: Vec<Result<Pdu>> = futures::stream::iter(missing)
                .map(|id| self.fetch_event(origin, room, id))
                .buffer_unordered(FETCH_CONCURRENCY)
                .collect()
                .await;
            for r in results {
                match r {
                    Ok(p) => fetched.push(p),
                    Err(e) => tracing::info!(error = %e, "fetching a state event"),
                }
            }
        }
        self.server.store_outliers(room, fetched).await?;
        self.server.state_after_remote(room, prev, &state_ids).await
    }

    /// One event from `origin` by `/event`, verified, and checked to be the one asked for.
    async fn fetch_event(
        &self,
        origin: &ServerName,
        room: &RoomInfo,
        id: OwnedEventId,
    ) -> Result<Pdu> {
        let answer = self
            .client
            .request(
                origin,
                http::Method::GET,
                &format!("/_matrix/federation/v1/event/{}", encode(id.as_str())),
                None,
            )
            .await
            .map_err(|e| remote("event", e))?;
        let value = answer
            .get("pdus")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .ok_or_else(|| Error::bad_json(format!("{origin} sent no event for {id}")))?;
        let pdu = self.verify_pdu(room, value).await?;
        if pdu.event_id != id {
            return Err(Error::bad_json(format!(
                "{origin} sent {} when asked for {id}",
                pdu.event_id
            )));
        }
        Ok(pdu)
    }

    /// The lock that keeps one backfill of a room at a time.
    fn backfill_lock(&self, room_nid: i64) -> Arc<tokio::sync::Mutex<()>> {
        self.backfill_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(room_nid)
            .or_default()
            .clone()
    }
}
