//! Events from other servers: checking them against the authorization rules three times (their
//! own auth events, the state before them, the room's current state), computing the state before
//! an event whose parents fork (state resolution), storing auth-chain and state events as
//! outliers, joining a room another server hosts, and remembering invites from other servers.
//!
//! Fetching what is missing is the federation crate's job: these functions say what they lack
//! ([`Ingested::Missing`]) and are called again once it is stored.

use std::collections::{HashMap, HashSet};

use ruma::{
    canonical_json::{CanonicalJsonObject, CanonicalJsonValue},
    events::StateEventType,
    state_res::utils::event_id_set::EventIdSet,
    ServerName,
};

use super::{late_redactions::outlier_redaction, *};
use crate::store::{CurrentWrite, GroupWrite, OutlierWrite};

/// What became of an event from another server.
#[derive(Debug)]
pub enum Ingested {
    /// Added to the room's timeline.
    Accepted(Arc<StoredEvent>),
    /// Already stored.
    Known,
    /// Authorised by its own auth events and the state before it, but not by the room's current
    /// state: stored, not shown, not built upon.
    SoftFailed,
    /// Refused by the authorization rules: remembered as rejected.
    Rejected(String),
    /// These events must be stored first (auth events or parents).
    Missing(Vec<OwnedEventId>),
}

/// An event from another server on its way in (see [`Server::start_ingest`]).
pub enum Ingesting {
    /// Decided without a write, or written.
    Done(Ingested),
    /// Authorised and queued for the writer; [`Server::finish_ingest`] awaits its commit.
    Queued(QueuedIngest),
    /// An event it refers to (an auth event, or a parent when it does not simply extend the
    /// room's only forward extremity) is still being written: ask again once the writes in
    /// flight are done.
    InFlight,
}

/// An accepted event whose commit is in flight.
pub struct QueuedIngest {
    room: Arc<RoomInfo>,
    generation: u64,
    done: tokio::sync::oneshot::Receiver<Result<Vec<Arc<StoredEvent>>>>,
}

/// The parents of an event, sorted out by [`Server::parents_of`].
#[derive(Default)]
pub(super) struct Parents {
    /// The state groups after those held in the timeline (sorted, without repeats).
    pub groups: Vec<i64>,
    /// The states another server reported after those not held, and those parents with the
    /// event's depth (backward extremities to be).
    pub reported: Vec<Arc<StateMap>>,
    pub reported_ids: Vec<(String, i64)>,
    /// Neither held nor reported.
    pub missing: Vec<OwnedEventId>,
}

/// `(type, state_key) → event` for the auth rules.
pub(super) type AuthState = HashMap<(StateEventType, String), Arc<Pdu>>;

/// Parses an event received from another server: checks its format for the room version and
/// computes its event ID (the reference hash). Signatures and the content hash are checked by
/// the caller, which knows the keys.
pub fn pdu_from_federation(obj: &CanonicalJsonObject, version: &RoomVersionId) -> Result<Pdu> {
    let rules = rules_for(version)?;
    ruma::state_res::check_pdu_format(obj, &rules.event_format)
        .map_err(|e| Error::bad_json(format!("malformed event: {e}")))?;
    let hash = ruma::signatures::reference_hash(obj, &rules)
        .map_err(|e| Error::bad_json(format!("event cannot be hashed: {e}")))?;
    let event_id = OwnedEventId::try_from(format!("${hash}"))
        .map_err(|e| Error::bad_json(format!("event id: {e}")))?;
    let is_create = obj.get("type") == Some(&CanonicalJsonValue::String("m.room.create".into()));
    let room_id = match obj.get("room_id") {
        Some(CanonicalJsonValue::String(r)) => OwnedRoomId::try_from(r.as_str())
            .map_err(|e| Error::bad_json(format!("room_id: {e}")))?,
        _ if rules.authorization.room_create_event_id_as_room_id && is_create => {
            OwnedRoomId::try_from(format!("!{hash}"))
                .map_err(|e| Error::bad_json(format!("room id: {e}")))?
        }
        _ => return Err(Error::bad_json("event has no room_id")),
    };
    let json = serde_json::to_string(obj)?;
    Pdu::parse(event_id, room_id, RawValue::from_string(json)?, false)
}

/// The event to store for a PDU whose content hash did not match: its redacted form.
pub fn redacted_pdu(pdu: &Pdu, rules: &RoomVersionRules) -> Result<Pdu> {
    let json = redact_json(&pdu.json, rules)?;
    Pdu::parse(pdu.event_id.clone(), pdu.room_id.clone(), json, true)
}

fn outlier_row(nid: i64, pdu: &Pdu, rejected: bool, stream_ordering: Option<i64>) -> OutlierWrite {
    OutlierWrite {
        event_nid: nid,
        event_id: pdu.event_id.to_string(),
        event_type: pdu.kind.to_string(),
        state_key: pdu.state_key.clone(),
        sender: pdu.sender.to_string(),
        depth: pdu.depth,
        origin_server_ts: u64::from(pdu.origin_server_ts.0) as i64,
        json: pdu.json.get().to_owned(),
        rejected,
        stream_ordering,
    }
}

fn state_pair(pdu: &Pdu) -> Option<(StateEventType, String)> {
    pdu.state_key
        .as_ref()
        .map(|sk| (StateEventType::from(pdu.kind.to_string()), sk.clone()))
}

/// Checks an event against the auth rules with the given state (the event's own auth events,
/// the state before it, or the current state).
pub(super) fn check_auth(
    rules: &RoomVersionRules,
    pdu: &Pdu,
    state: &AuthState,
) -> Result<(), String> {
    let by_id: HashMap<&ruma::EventId, &Pdu> =
        state.values().map(|p| (&*p.event_id, &**p)).collect();
    ruma::state_res::check_state_independent_auth_rules(&rules.authorization, pdu, |id| {
        by_id.get(id).copied()
    })?;
    ruma::state_res::check_state_dependent_auth_rules(&rules.authorization, pdu, |ty, sk| {
        state.get(&(ty.clone(), sk.to_owned())).map(|p| &**p)
    })
}

impl Server {
    /// The event IDs among `ids` that are not stored at all.
    pub async fn unknown_events(&self, ids: &[OwnedEventId]) -> Result<Vec<OwnedEventId>> {
        let mut out = Vec::new();
        for id in ids {
            if self.event_by_id(id).await?.is_none() {
                out.push(id.clone());
            }
        }
        Ok(out)
    }

    /// Whether we hold the room's state (false for a room we only know from an invite).
    pub async fn has_state(&self, room: &RoomInfo) -> Result<bool> {
        if self.room_tip(room.nid).is_some() {
            return Ok(true);
        }
        Ok(self
            .store
            .room_by_nid(room.nid)
            .await?
            .is_some_and(|r| r.state_group.is_some()))
    }

    /// The room's create event.
    async fn create_event(&self, room: &RoomInfo, state: Option<&StateMap>) -> Result<Arc<Pdu>> {
        if room.rules.authorization.room_create_event_id_as_room_id {
            let id = OwnedEventId::try_from(format!("${}", room.room_id.strip_sigil()))
                .map_err(|e| Error::internal(format!("create event id: {e}")))?;
            if let Some(e) = self.event_by_id(&id).await? {
                return Ok(e.pdu.clone());
            }
        }
        if let Some(state) = state {
            if let Some(e) = self.state_event(state, "m.room.create", "").await? {
                return Ok(e.pdu.clone());
            }
        }
        Err(Error::internal(format!(
            "the create event of {} (version {}) is not stored",
            room.room_id, room.version
        )))
    }

    /// An event's auth events as auth state (with the room's create event), or the IDs missing.
    pub(super) async fn auth_events_of(
        &self,
        room: &RoomInfo,
        pdu: &Pdu,
        extra: &HashMap<OwnedEventId, Arc<Pdu>>,
    ) -> Result<std::result::Result<AuthState, Vec<OwnedEventId>>> {
        let mut state = AuthState::new();
        let mut missing = Vec::new();
        for id in &pdu.auth_events {
            let found = match extra.get(id) {
                Some(p) => Some(p.clone()),
                None => match self.event_by_id(id).await? {
                    Some(e) if e.rejected => {
                        return Err(Error::forbidden(format!("auth event {id} was rejected")))
                    }
                    Some(e) => Some(e.pdu.clone()),
                    None => None,
                },
            };
            match found {
                Some(p) => {
                    if let Some(k) = state_pair(&p) {
                        state.insert(k, p);
                    }
                }
                None => missing.push(id.clone()),
            }
        }
        if !missing.is_empty() {
            return Ok(Err(missing));
        }
        if pdu.kind != TimelineEventType::RoomCreate {
            if let std::collections::hash_map::Entry::Vacant(slot) =
                state.entry((StateEventType::RoomCreate, String::new()))
            {
                let create = match extra
                    .values()
                    .find(|p| p.kind == TimelineEventType::RoomCreate)
                {
                    Some(c) => c.clone(),
                    None => self.create_event(room, None).await?,
                };
                slot.insert(create);
            }
        }
        Ok(Ok(state))
    }

    /// The events of `state` the auth rules may consult for `pdu`.
    pub(super) async fn auth_state_from(
        &self,
        rules: &RoomVersionRules,
        state: &StateMap,
        pdu: &Pdu,
    ) -> Result<AuthState> {
        let mut wanted = ruma::state_res::auth_types_for_event(
            &pdu.kind,
            &pdu.sender,
            pdu.state_key.as_deref(),
            &pdu.content,
            &rules.authorization,
        )
        .unwrap_or_default();
        wanted.push((StateEventType::RoomCreate, String::new()));
        wanted.push((StateEventType::RoomPowerLevels, String::new()));
        wanted.push((StateEventType::RoomJoinRules, String::new()));
        wanted.push((StateEventType::RoomMember, pdu.sender.to_string()));
        if let (TimelineEventType::RoomMember, Some(sk)) = (&pdu.kind, &pdu.state_key) {
            wanted.push((StateEventType::RoomMember, sk.clone()));
        }
        let mut out = AuthState::new();
        for (ty, sk) in wanted {
            if let Some(e) = self.state_event(state, &ty.to_string(), &sk).await? {
                out.insert((ty, sk), e.pdu.clone());
            }
        }
        Ok(out)
    }

    /// Stores events learnt as auth or state (not part of the timeline we know), each checked
    /// against its own auth events; ones failing are stored as rejected. Events whose auth
    /// events are neither stored nor among `pdus` are skipped. Returns the rejected IDs.
    pub async fn store_outliers(
        &self,
        room: &RoomInfo,
        pdus: Vec<Pdu>,
    ) -> Result<HashSet<OwnedEventId>> {
        let mut pending: HashMap<OwnedEventId, Arc<Pdu>> = HashMap::new();
        for p in pdus {
            if self.event_by_id(&p.event_id).await?.is_none() {
                pending.insert(p.event_id.clone(), Arc::new(p));
            }
        }
        let mut accepted: HashMap<OwnedEventId, Arc<Pdu>> = HashMap::new();
        let mut rejected: HashSet<OwnedEventId> = HashSet::new();
        let mut rows = Vec::new();
        // Redactions that arrived before these events (`late_redactions.rs`).
        let waiting = if pending.is_empty() {
            Vec::new()
        } else {
            self.waiting_redactions_in_room(room, pending.keys().map(|id| id.as_str()))
                .await?
        };
        let mut redactions = Vec::new();
        let mut settled = Vec::new();
        // Topological order over auth_events: store an event once all its auth events are.
        loop {
            // The create event goes first (room v12 events do not list it as an auth event).
            let create_pending = pending
                .values()
                .any(|p| p.kind == TimelineEventType::RoomCreate);
            let ready: Vec<OwnedEventId> = pending
                .values()
                .filter(|p| !create_pending || p.kind == TimelineEventType::RoomCreate)
                .filter(|p| {
                    p.auth_events
                        .iter()
                        .all(|a| !pending.contains_key(a) || accepted.contains_key(a))
                })
                .map(|p| p.event_id.clone())
                .collect();
            if ready.is_empty() {
                break;
            }
            for id in ready {
                let Some(p) = pending.remove(&id) else {
                    continue;
                };
                let refused = if p.auth_events.iter().any(|a| rejected.contains(a)) {
                    Some("an auth event was rejected".to_owned())
                } else {
                    match self.auth_events_of(room, &p, &accepted).await {
                        Ok(Ok(state)) => check_auth(&room.rules, &p, &state).err(),
                        Ok(Err(missing)) => {
                            tracing::debug!(event = %id, ?missing, "outlier lacks auth events");
                            continue;
                        }
                        Err(e) => Some(e.to_string()),
                    }
                };
                let nid = self.next_event_nid.fetch_add(1, Ordering::Relaxed);
                let mut row = outlier_row(nid, &p, refused.is_some(), None);
                if refused.is_none() {
                    let (by, any) = outlier_redaction(&waiting, room.nid, &p);
                    if let Some(by) = by {
                        row.json = redact_json(&p.json, &room.rules)?.get().to_owned();
                        redactions.push((nid, row.json.clone(), by));
                    }
                    if any {
                        settled.push(p.event_id.to_string());
                    }
                }
                rows.push(row);
                match refused {
                    Some(why) => {
                        tracing::info!(event = %id, %why, "rejected outlier");
                        rejected.insert(id);
                    }
                    None => {
                        accepted.insert(id, p);
                    }
                }
            }
        }
        if !rows.is_empty() {
            let write = RoomWrite {
                room_nid: room.nid,
                outliers: rows,
                redactions,
                settled_redactions: settled,
                ..Default::default()
            };
            self.store.write_rooms(&[&write]).await?;
        }
        Ok(rejected)
    }

    /// The auth chain of `ids` (every event reachable through `auth_events`), events stored.
    pub async fn auth_chain(&self, ids: &[OwnedEventId]) -> Result<Vec<Arc<StoredEvent>>> {
        let mut seen: HashSet<OwnedEventId> = HashSet::new();
        let mut out = Vec::new();
        let mut queue: Vec<OwnedEventId> = ids.to_vec();
        while let Some(id) = queue.pop() {
            if !seen.insert(id.clone()) {
                continue;
            }
            if let Some(e) = self.event_by_id(&id).await? {
                queue.extend(e.pdu.auth_events.iter().cloned());
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Resolves several states of a room with the room version's state resolution.
    /// `unstored` is an event some state holds that is not stored yet (the one being added).
    pub async fn resolve_states(
        &self,
        room: &RoomInfo,
        maps: &[Arc<StateMap>],
        unstored: Option<(i64, &Arc<Pdu>)>,
    ) -> Result<StateMap> {
        if maps.len() == 1 {
            return Ok((*maps[0]).clone());
        }
        // Events of every state, by ID, and the numeric IDs of events and state keys.
        let mut pdus: HashMap<OwnedEventId, Arc<Pdu>> = HashMap::new();
        let mut key_of: HashMap<OwnedEventId, i64> = HashMap::new();
        let mut nid_of: HashMap<OwnedEventId, i64> = HashMap::new();
        let mut ruma_maps = Vec::with_capacity(maps.len());
        for m in maps {
            let mut rm: ruma::state_res::StateMap<OwnedEventId> = HashMap::new();
            let entries: Vec<(i64, i64)> = m.iter().map(|(k, v)| (*k, *v)).collect();
            let stored: Vec<i64> = entries
                .iter()
                .map(|(_, v)| *v)
                .filter(|v| Some(*v) != unstored.map(|(n, _)| n))
                .collect();
            let loaded: HashMap<i64, Arc<Pdu>> = self
                .events(&stored)
                .await?
                .into_iter()
                .map(|e| (e.nid, e.pdu.clone()))
                .collect();
            for (k, nid) in entries {
                let pdu = match (loaded.get(&nid), unstored) {
                    (Some(p), _) => p.clone(),
                    (None, Some((n, p))) if n == nid => p.clone(),
                    _ => continue,
                };
                if let Some(pair) = state_pair(&pdu) {
                    rm.insert(pair, pdu.event_id.clone());
                }
                key_of.insert(pdu.event_id.clone(), k);
                nid_of.insert(pdu.event_id.clone(), nid);
                pdus.insert(pdu.event_id.clone(), pdu);
            }
            ruma_maps.push(rm);
        }
        // Auth chains of each state.
        let mut chains = Vec::with_capacity(maps.len());
        for rm in &ruma_maps {
            let mut ids: Vec<OwnedEventId> = rm.values().cloned().collect();
            let mut set = EventIdSet::new();
            if let Some((_, p)) = unstored.filter(|(_, p)| ids.contains(&p.event_id)) {
                // Not stored yet: its chain is its auth events' chains and itself.
                ids.retain(|i| *i != p.event_id);
                ids.extend(p.auth_events.iter().cloned());
                set.insert(p.event_id.clone());
            }
            let chain = self.auth_chain(&ids).await?;
            for e in chain {
                set.insert(e.pdu.event_id.clone());
                pdus.entry(e.pdu.event_id.clone()).or_insert(e.pdu.clone());
            }
            chains.push(set);
        }
        let resolved = crate::resolution::resolve(&room.rules, &ruma_maps, chains, &pdus)?;
        let mut out = StateMap::new();
        for ((ty, sk), id) in resolved {
            let k = match key_of.get(&id) {
                Some(k) => *k,
                None => self.state.intern(&self.store, &ty.to_string(), &sk).await?,
            };
            let nid = match nid_of.get(&id) {
                Some(n) => *n,
                None => match self.event_by_id(&id).await? {
                    Some(e) => e.nid,
                    None => continue,
                },
            };
            out.insert(k, nid);
        }
        Ok(out)
    }

    /// A state group for `map`: a delta on `base` when `map` only adds to or changes it,
    /// otherwise a full snapshot.
    pub(super) fn group_for(
        &self,
        base: Option<(i64, &StateMap, i64)>,
        map: &StateMap,
    ) -> (GroupWrite, i64) {
        let group = self.next_state_group.fetch_add(1, Ordering::Relaxed);
        if let Some((bg, bmap, chain)) = base {
            let removes = bmap.keys().any(|k| !map.contains_key(k));
            if !removes && chain < MAX_CHAIN && bg != 0 {
                let edits: Vec<(i64, i64)> = map
                    .iter()
                    .filter(|(k, v)| bmap.get(k) != Some(v))
                    .map(|(k, v)| (*k, *v))
                    .collect();
                return (
                    GroupWrite {
                        group,
                        parent: Some(bg),
                        chain_len: chain + 1,
                        state_key_nid: 0,
                        edits,
                    },
                    chain + 1,
                );
            }
        }
        (
            GroupWrite {
                group,
                parent: None,
                chain_len: 0,
                state_key_nid: 0,
                edits: map.iter().map(|(k, v)| (*k, *v)).collect(),
            },
            0,
        )
    }

    /// How the current state changes from `old` to `new`, with the memberships it changes.
    async fn current_change(
        &self,
        group: i64,
        old: &StateMap,
        new: &StateMap,
        replace_all: bool,
        unstored: i64,
    ) -> Result<CurrentWrite> {
        let upserts: Vec<(i64, i64)> = new
            .iter()
            .filter(|(k, v)| replace_all || old.get(k) != Some(v))
            .map(|(k, v)| (*k, *v))
            .collect();
        let removes: Vec<i64> = if replace_all {
            vec![]
        } else {
            old.keys()
                .filter(|k| !new.contains_key(k))
                .copied()
                .collect()
        };
        let mut memberships = Vec::new();
        // (`unstored`: the event being added, whose membership the caller records.)
        let changed: Vec<i64> = upserts
            .iter()
            .map(|(_, v)| *v)
            .filter(|v| *v != unstored)
            .collect();
        for e in self.events(&changed).await? {
            if e.pdu.kind == TimelineEventType::RoomMember {
                if let (Some(sk), Some(m)) = (&e.pdu.state_key, e.pdu.content_str("membership")) {
                    memberships.push((sk.clone(), m, e.nid));
                }
            }
        }
        Ok(CurrentWrite {
            group,
            replace_all,
            upserts,
            removes,
            memberships,
            position: 0,
        })
    }

    /// Writes refused or soft-failed events outside the timeline.
    pub(super) async fn store_outside(
        &self,
        room: &RoomInfo,
        pdu: &Pdu,
        rejected: bool,
    ) -> Result<()> {
        let nid = self.next_event_nid.fetch_add(1, Ordering::Relaxed);
        let write = RoomWrite {
            room_nid: room.nid,
            outliers: vec![outlier_row(nid, pdu, rejected, None)],
            ..Default::default()
        };
        self.store.write_rooms(&[&write]).await
    }

    /// Adds an event from another server to a room we are in. `relay_from` is set when we are
    /// the resident server passing on another server's join, leave or knock: it is then sent to
    /// the room's other servers.
    pub async fn ingest_pdu(
        &self,
        room: &Arc<RoomInfo>,
        pdu: Pdu,
        relay_from: Option<&ServerName>,
    ) -> Result<Ingested> {
        self.ingest_pdu_over_gap(room, pdu, relay_from, &HashMap::new())
            .await
    }

    /// [`Server::ingest_pdu`] for an event whose parents are not all held: `gap` holds the
    /// state after each missing parent as another server reported it (see
    /// [`Server::state_after_remote`]). The state before the event is resolved over those
    /// states and its held parents' states; the missing parents become backward extremities.
    pub async fn ingest_pdu_over_gap(
        &self,
        room: &Arc<RoomInfo>,
        pdu: Pdu,
        relay_from: Option<&ServerName>,
        gap: &HashMap<OwnedEventId, Arc<StateMap>>,
    ) -> Result<Ingested> {
        match self.start_ingest(room, pdu, relay_from, gap, false).await? {
            Ingesting::Done(outcome) => Ok(outcome),
            Ingesting::Queued(queued) => self.finish_ingest(queued).await,
            // Only pipelined ingestion looks at what is in flight.
            Ingesting::InFlight => Err(Error::internal("unpipelined ingestion waited")),
        }
    }

    /// Awaits the commit of an event [`Server::start_ingest`] queued.
    pub async fn finish_ingest(&self, queued: QueuedIngest) -> Result<Ingested> {
        let QueuedIngest {
            room,
            generation,
            done,
        } = queued;
        let mut stored = self.await_write(&room, generation, done).await?;
        stored
            .pop()
            .map(Ingested::Accepted)
            .ok_or_else(|| Error::internal("write returned nothing"))
    }

    /// [`Server::ingest_pdu_over_gap`] up to the write: an accepted event is queued for the
    /// writer, not awaited. With `pipelined`, an event whose only parent is the room's only
    /// forward extremity is accepted while that parent's commit is still in flight (the
    /// consecutive events of one `/send` transaction share the writer's commits that way);
    /// another event that refers to one in flight gives [`Ingesting::InFlight`]. Without it,
    /// an event in flight counts as missing.
    pub async fn start_ingest(
        &self,
        room: &Arc<RoomInfo>,
        pdu: Pdu,
        relay_from: Option<&ServerName>,
        gap: &HashMap<OwnedEventId, Arc<StateMap>>,
        pipelined: bool,
    ) -> Result<Ingesting> {
        if pdu.room_id != room.room_id {
            return Err(Error::bad_json("event is for another room"));
        }
        if self.event_by_id(&pdu.event_id).await?.is_some() {
            return Ok(Ingesting::Done(Ingested::Known));
        }
        // Parents and auth events whose commit is in flight (pipelined): not looked for in
        // the database; what lacks one of them asks again once it is written.
        let in_flight_refs: Vec<OwnedEventId> = if pipelined {
            let lock = self.head_lock(room.nid);
            let guard = lock.lock().await;
            let committed = self.events_stream.current();
            guard.as_ref().map_or_else(Vec::new, |h| {
                pdu.prev_events
                    .iter()
                    .chain(&pdu.auth_events)
                    .filter(|id| h.in_flight(id, committed))
                    .cloned()
                    .collect()
            })
        } else {
            Vec::new()
        };
        let lacking = |missing: Vec<OwnedEventId>| {
            if missing.iter().any(|m| in_flight_refs.contains(m)) {
                Ingesting::InFlight
            } else {
                Ingesting::Done(Ingested::Missing(missing))
            }
        };
        // 1. Against its own auth events.
        let auth = match self.auth_events_of(room, &pdu, &HashMap::new()).await {
            Ok(Ok(a)) => a,
            Ok(Err(missing)) => return Ok(lacking(missing)),
            Err(e) => {
                self.store_outside(room, &pdu, true).await?;
                return Ok(Ingesting::Done(Ingested::Rejected(e.message())));
            }
        };
        if let Err(why) = check_auth(&room.rules, &pdu, &auth) {
            self.store_outside(room, &pdu, true).await?;
            return Ok(Ingesting::Done(Ingested::Rejected(why)));
        }
        // Parents: each must be in the timeline (with a state after it), or its state known
        // from another server.
        let Parents {
            groups,
            reported,
            reported_ids,
            missing,
        } = self.parents_of(&pdu, gap, &in_flight_refs).await?;
        // A parent still being written: only as the room's one forward extremity (then the
        // state after it is the room's current state).
        let extends_pending =
            pdu.prev_events.len() == 1 && in_flight_refs.contains(&pdu.prev_events[0]);
        if !missing.is_empty() && !extends_pending {
            return Ok(lacking(missing));
        }
        if groups.is_empty() && reported.is_empty() && !extends_pending {
            self.store_outside(room, &pdu, true).await?;
            return Ok(Ingesting::Done(Ingested::Rejected(
                "every parent was rejected".into(),
            )));
        }
        let pdu = Arc::new(pdu);

        let lock = self.head_lock(room.nid);
        let mut guard = lock.lock().await;
        let mut head = self.load_head(room, &mut guard).await?.clone();
        let committed = self.events_stream.current();
        if self.event_by_id(&pdu.event_id).await?.is_some()
            || head.in_flight(&pdu.event_id, committed)
        {
            return Ok(Ingesting::Done(Ingested::Known));
        }
        head.pending.retain(|_, (pos, _)| *pos > committed);
        head.awaiting_redactions.retain(|(pos, _)| *pos > committed);
        if extends_pending {
            // The parent may have been committed since, or the room may have moved on.
            let parent = &pdu.prev_events[0];
            if !matches!(&head.extremities[..], [(id, _, _)] if id == parent) {
                return Ok(if head.in_flight(parent, committed) {
                    Ingesting::InFlight
                } else {
                    Ingesting::Done(Ingested::Missing(missing))
                });
            }
        }

        // 2. Against the state before it (resolved over its parents' states).
        let mut extra_groups = Vec::new();
        let (before_group, before_map, before_chain) = if extends_pending {
            (head.state_group, head.state.clone(), head.chain_len)
        } else {
            let (group, map, chain, write) = self.state_before(room, &groups, reported).await?;
            if let Some(w) = write {
                extra_groups.push(w);
                self.state.insert_group(group, map.clone(), chain);
            }
            (group, map, chain)
        };
        let before_auth = self.auth_state_from(&room.rules, &before_map, &pdu).await?;
        if let Err(why) = check_auth(&room.rules, &pdu, &before_auth) {
            drop(guard);
            self.store_outside(room, &pdu, true).await?;
            return Ok(Ingesting::Done(Ingested::Rejected(format!(
                "not allowed by the state before it: {why}"
            ))));
        }
        // 3. Against the current state: soft failure.
        let current_auth = self.auth_state_from(&room.rules, &head.state, &pdu).await?;
        if let Err(why) = check_auth(&room.rules, &pdu, &current_auth) {
            drop(guard);
            tracing::info!(event = %pdu.event_id, %why, "soft-failed event");
            self.store_outside(room, &pdu, false).await?;
            return Ok(Ingesting::Done(Ingested::SoftFailed));
        }

        // The state after it, the new extremities and the new current state.
        let nid = self.next_event_nid.fetch_add(1, Ordering::Relaxed);
        let mut after_map = (*before_map).clone();
        let mut new_group = None;
        if let Some(sk) = &pdu.state_key {
            let k = self
                .state
                .intern(&self.store, &pdu.kind.to_string(), sk)
                .await?;
            after_map.insert(k, nid);
            let (g, chain) =
                self.group_for(Some((before_group, &before_map, before_chain)), &after_map);
            new_group = Some(AppliedGroup {
                group: g.group,
                state_key_nid: k,
                parent: g.parent,
                chain_len: chain,
                edits: g.edits,
            });
        }
        let after_map = Arc::new(after_map);
        let after_group = new_group.as_ref().map_or(before_group, |g| g.group);
        let after_chain = new_group.as_ref().map_or(before_chain, |g| g.chain_len);
        let mut extremities: Vec<(OwnedEventId, i64, i64)> = head
            .extremities
            .iter()
            .filter(|(id, _, _)| !pdu.prev_events.contains(id))
            .cloned()
            .collect();
        extremities.push((pdu.event_id.clone(), pdu.depth, nid));
        let (current_group, current_map, current_chain) = if extremities.len() == 1 {
            (after_group, after_map.clone(), after_chain)
        } else {
            let mut maps = vec![after_map.clone()];
            for (_, _, enid) in extremities.iter().filter(|(_, _, n)| *n != nid) {
                let group = match head.pending.get(enid) {
                    Some(_) => Some(head.state_group),
                    None => self.event(*enid).await?.state_after,
                };
                if let Some(g) = group {
                    maps.push(self.state_map(g).await?);
                }
            }
            let resolved = self.resolve_states(room, &maps, Some((nid, &pdu))).await?;
            if resolved == *after_map {
                (after_group, after_map.clone(), after_chain)
            } else {
                let (g, chain) = self.group_for(None, &resolved);
                let group = g.group;
                extra_groups.push(g);
                (group, Arc::new(resolved), chain)
            }
        };
        let mut current = self
            .current_change(current_group, &head.state, &current_map, false, nid)
            .await?;
        // The new event's own membership is known before it is stored.
        if current_map.get(&new_group.as_ref().map_or(-1, |g| g.state_key_nid)) == Some(&nid) {
            if let (TimelineEventType::RoomMember, Some(sk), Some(m)) =
                (&pdu.kind, &pdu.state_key, pdu.content_str("membership"))
            {
                current.memberships.push((sk.clone(), m, nid));
            }
        }
        // A redaction applies when its sender may redact the target (or both come from one
        // server); otherwise it is kept but changes nothing. One whose target has not arrived
        // waits for it; an event a redaction waited for is stored redacted if that qualifies.
        let power = crate::power::PowerLevels::from_auth(&current_auth, &room.rules);
        let mut late = LateRedaction::default();
        let redaction = self
            .remote_redaction(room, &head, &pdu, &power, &mut late)
            .await?;
        let pdu = self.waiting_redactions(room, &head, pdu, &mut late).await?;
        let built = Built {
            pdu: pdu.clone(),
            sender_txn: None,
            redaction,
            late,
        };
        let applied = Applied {
            nid,
            state_before: before_group,
            new_group,
            state_after: after_map,
        };
        head.extremities = extremities;
        head.state = current_map;
        head.state_group = current_group;
        head.chain_len = current_chain;
        self.members(room.nid).await?;
        let mut in_flight: HashMap<i64, Arc<Pdu>> = head
            .pending
            .iter()
            .map(|(n, (_, p))| (*n, p.clone()))
            .collect();
        in_flight.insert(nid, pdu.clone());
        let push = self
            .evaluate_push(
                room,
                std::slice::from_ref(&built),
                std::slice::from_ref(&applied),
                &in_flight,
            )
            .await;
        let extras = Extras {
            servers: self.room_servers(room.nid).await?,
            push,
            extra_groups,
            current: Some(current),
            relay_from: relay_from.map(|s| s.to_string()),
            backward_add: reported_ids,
            backward_remove: vec![pdu.event_id.to_string()],
        };
        let generation = head.generation;
        let done =
            self.enqueue_write(room, false, vec![built], vec![applied], &mut head, extras)?;
        *guard = Some(head);
        drop(guard);
        Ok(Ingesting::Queued(QueuedIngest {
            room: room.clone(),
            generation,
            done,
        }))
    }

    /// The state made of the stored, unrejected state events of `room` among `ids` (a later
    /// one for the same key wins), keys interned together; and how many of `ids` are not
    /// stored.
    pub(super) async fn state_map_of(
        &self,
        room: &RoomInfo,
        ids: &[OwnedEventId],
    ) -> Result<(StateMap, usize)> {
        let mut pairs = Vec::with_capacity(ids.len());
        let mut nids = Vec::with_capacity(ids.len());
        let mut left_out = 0;
        for id in ids {
            let Some(e) = self.event_by_id(id).await? else {
                left_out += 1;
                continue;
            };
            if e.rejected || e.room_nid != room.nid {
                continue;
            }
            if let Some(sk) = &e.pdu.state_key {
                pairs.push((e.pdu.kind.to_string(), sk.clone()));
                nids.push(e.nid);
            }
        }
        let keys = self.state.intern_all(&self.store, &pairs).await?;
        Ok((keys.into_iter().zip(nids).collect(), left_out))
    }

    /// Sorts out the parents of `pdu`: held in the timeline (their state groups), reported
    /// by another server (`gap`: the state after each), or missing (also those in `skip`).
    pub(super) async fn parents_of(
        &self,
        pdu: &Pdu,
        gap: &HashMap<OwnedEventId, Arc<StateMap>>,
        skip: &[OwnedEventId],
    ) -> Result<Parents> {
        let mut out = Parents::default();
        for id in &pdu.prev_events {
            if skip.contains(id) {
                out.missing.push(id.clone());
                continue;
            }
            match self.event_by_id(id).await? {
                Some(e) if !e.outlier && e.state_after.is_some() => {
                    out.groups.extend(e.state_after)
                }
                Some(e) if e.rejected => {}
                _ => match gap.get(id) {
                    Some(state) => {
                        out.reported.push(state.clone());
                        out.reported_ids.push((id.to_string(), pdu.depth));
                    }
                    None => out.missing.push(id.clone()),
                },
            }
        }
        out.groups.sort();
        out.groups.dedup();
        Ok(out)
    }

    /// The state before an event from its parents' states: `(group, state, chain length,
    /// the group to write)`, the one group there is, or else their resolution in a new
    /// snapshot group.
    pub(super) async fn state_before(
        &self,
        room: &RoomInfo,
        groups: &[i64],
        reported: Vec<Arc<StateMap>>,
    ) -> Result<(i64, Arc<StateMap>, i64, Option<GroupWrite>)> {
        if let ([group], true) = (groups, reported.is_empty()) {
            let (map, chain) = self.state.group(&self.store, *group).await?;
            return Ok((*group, map, chain, None));
        }
        let mut maps = Vec::with_capacity(groups.len() + reported.len());
        for g in groups {
            maps.push(self.state_map(*g).await?);
        }
        maps.extend(reported);
        let resolved = Arc::new(self.resolve_states(room, &maps, None).await?);
        let (write, chain) = self.group_for(None, &resolved);
        Ok((write.group, resolved, chain, Some(write)))
    }

    /// Joins a room hosted elsewhere: stores the state and auth chain the resident server sent
    /// (each checked against its own auth events), then our join event on top of that state,
    /// all in one transaction. Works for a room we knew before (a rejoin) as for a new one.
    pub async fn join_from_remote(
        &self,
        version: RoomVersionId,
        room_id: &RoomId,
        state: Vec<Pdu>,
        auth_chain: Vec<Pdu>,
        join: Pdu,
    ) -> Result<(Arc<RoomInfo>, Arc<StoredEvent>)> {
        let rules = rules_for(&version)?;
        let (room, new_room) = match self.room(room_id).await? {
            Some(r) => (r, false),
            None => {
                let nid = self.next_room_nid.fetch_add(1, Ordering::Relaxed);
                (
                    Arc::new(RoomInfo {
                        nid,
                        room_id: room_id.to_owned(),
                        version: version.clone(),
                        rules,
                    }),
                    true,
                )
            }
        };
        let lock = self.head_lock(room.nid);
        let mut guard = lock.lock().await;
        if new_room {
            // The room row must exist before its outliers are written.
            let write = RoomWrite {
                room_nid: room.nid,
                new_room: Some((room.room_id.to_string(), room.version.to_string())),
                ..Default::default()
            };
            self.store.write_rooms(&[&write]).await?;
            self.rooms
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(room.nid, room.clone());
            self.room_nids
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(room.room_id.clone(), room.nid);
        }
        let state_ids: Vec<OwnedEventId> = state.iter().map(|p| p.event_id.clone()).collect();
        let mut all = auth_chain;
        all.extend(state);
        self.store_outliers(&room, all).await?;
        // The room's state as the resident server sent it, without refused events (stored
        // as rejected).
        let (map, _) = self.state_map_of(&room, &state_ids).await?;
        if self.state_event(&map, "m.room.create", "").await?.is_none() {
            return Err(Error::new(
                crate::ErrorKind::BadJson,
                "the resident server's state has no create event",
            ));
        }
        let join = Arc::new(join);
        let auth = self.auth_state_from(&room.rules, &map, &join).await?;
        check_auth(&room.rules, &join, &auth)
            .map_err(|e| Error::forbidden(format!("join not allowed by the room's state: {e}")))?;
        let (snapshot, _) = self.group_for(None, &map);
        let before_group = snapshot.group;
        let before_map = Arc::new(map);
        self.state.insert_group(before_group, before_map.clone(), 0);
        let nid = self.next_event_nid.fetch_add(1, Ordering::Relaxed);
        let sk = join.state_key.clone().unwrap_or_default();
        let k = self.state.intern(&self.store, "m.room.member", &sk).await?;
        let mut after = (*before_map).clone();
        after.insert(k, nid);
        let (g, chain) = self.group_for(Some((before_group, &before_map, 0)), &after);
        let after = Arc::new(after);
        let old_state = match guard.as_ref() {
            Some(h) => h.state.clone(),
            None if new_room || !self.has_state(&room).await? => Arc::new(StateMap::new()),
            None => self.load_head(&room, &mut guard).await?.state.clone(),
        };
        let mut current = self
            .current_change(g.group, &old_state, &after, true, nid)
            .await?;
        current
            .memberships
            .push((sk.clone(), "join".to_owned(), nid));
        let mut head = RoomHead {
            extremities: vec![(join.event_id.clone(), join.depth, nid)],
            state_group: g.group,
            chain_len: chain,
            state: after.clone(),
            generation: next_generation(),
            pending: HashMap::new(),
            awaiting_redactions: Vec::new(),
        };
        let applied = Applied {
            nid,
            state_before: before_group,
            new_group: Some(AppliedGroup {
                group: g.group,
                state_key_nid: k,
                parent: g.parent,
                chain_len: chain,
                edits: g.edits,
            }),
            state_after: after,
        };
        let built = Built {
            pdu: join,
            sender_txn: None,
            redaction: None,
            late: LateRedaction::default(),
        };
        self.members
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&room.nid);
        // The history before the join is not held (or not all of it, on a rejoin): its
        // parents are backward extremities, where `/messages` backfills from.
        let backward_add = self
            .not_in_timeline(&built.pdu.prev_events)
            .await?
            .into_iter()
            .map(|id| (id.to_string(), built.pdu.depth))
            .collect();
        let extras = Extras {
            servers: Arc::new(Vec::new()),
            extra_groups: vec![snapshot],
            current: Some(current),
            relay_from: None,
            backward_add,
            backward_remove: Vec::new(),
            push: Vec::new(),
        };
        let generation = head.generation;
        let done =
            self.enqueue_write(&room, false, vec![built], vec![applied], &mut head, extras)?;
        *guard = Some(head);
        drop(guard);
        let mut stored = self.await_write(&room, generation, done).await?;
        let ev = stored
            .pop()
            .ok_or_else(|| Error::internal("write returned nothing"))?;
        Ok((room, ev))
    }

    /// Remembers an invite from another server to one of our users (for a room we may not be
    /// in): the invite event outside the timeline, the invitee's membership and the stripped
    /// state shown with it. Also records the rejection of such an invite (a leave event made
    /// through the inviting server).
    pub async fn store_remote_membership(
        &self,
        version: RoomVersionId,
        invite: Pdu,
        stripped: Vec<serde_json::Value>,
    ) -> Result<()> {
        let rules = rules_for(&version)?;
        let user = invite
            .state_key
            .clone()
            .ok_or_else(|| Error::bad_json("invite without state_key"))?;
        let room = match self.room(&invite.room_id).await? {
            Some(r) => r,
            None => {
                let nid = self.next_room_nid.fetch_add(1, Ordering::Relaxed);
                let room = Arc::new(RoomInfo {
                    nid,
                    room_id: invite.room_id.clone(),
                    version: version.clone(),
                    rules,
                });
                let write = RoomWrite {
                    room_nid: nid,
                    new_room: Some((room.room_id.to_string(), version.to_string())),
                    ..Default::default()
                };
                self.store.write_rooms(&[&write]).await?;
                room
            }
        };
        let lock = self.head_lock(room.nid);
        let _guard = lock.lock().await;
        if self.event_by_id(&invite.event_id).await?.is_some() {
            return Ok(());
        }
        let nid = self.next_event_nid.fetch_add(1, Ordering::Relaxed);
        let positions = self.events_stream.allocate(1);
        let pos = positions[0];
        let write = RoomWrite {
            room_nid: room.nid,
            outliers: vec![outlier_row(nid, &invite, false, Some(pos))],
            remote_invite: Some((
                user.clone(),
                invite
                    .content_str("membership")
                    .unwrap_or_else(|| "invite".to_owned()),
                nid,
                pos,
                serde_json::to_string(&stripped)?,
            )),
            ..Default::default()
        };
        let result = self.store.write_rooms(&[&write]).await;
        if result.is_ok() {
            self.members
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&room.nid);
            self.membership_epoch.fetch_add(1, Ordering::AcqRel);
            self.user_rooms
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&user);
            self.room_positions
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(room.nid, pos);
        }
        self.events_stream.complete(&positions);
        self.notifier.wake([user.as_str()]);
        result
    }

    /// Builds and signs an event on the room's current state without adding it (an invite for
    /// another server to countersign, a membership template).
    pub async fn build_detached(
        &self,
        room: &Arc<RoomInfo>,
        sender: &UserId,
        event: NewEvent,
    ) -> Result<Arc<Pdu>> {
        let lock = self.head_lock(room.nid);
        let mut guard = lock.lock().await;
        let head = self.load_head(room, &mut guard).await?.clone();
        drop(guard);
        let local = head
            .pending
            .iter()
            .map(|(n, (_, p))| (*n, p.clone()))
            .collect();
        let built = self
            .build_one(
                room,
                &head,
                &local,
                Append {
                    sender: sender.to_owned(),
                    event,
                    txn: None,
                },
            )
            .await?;
        Ok(built.pdu)
    }

    /// The fields of an event another server will complete and sign (`make_join` and
    /// friends): prev_events, auth_events and depth from the current state; a join of a
    /// restricted room names the user of ours who authorises it. Checked against the auth
    /// rules first, so a refusal comes back at once.
    pub async fn membership_template(
        &self,
        room: &Arc<RoomInfo>,
        user: &UserId,
        membership: &str,
    ) -> Result<serde_json::Value> {
        let mut content = serde_json::json!({ "membership": membership });
        if membership == "join" {
            if let super::JoinAuthorisation::By(by) = self.join_authorisation(room, user).await? {
                content["join_authorised_via_users_server"] = serde_json::json!(by);
            }
        }
        let lock = self.head_lock(room.nid);
        let mut guard = lock.lock().await;
        let head = self.load_head(room, &mut guard).await?.clone();
        drop(guard);
        let raw = serde_json::value::to_raw_value(&content)?;
        let auth_types = ruma::state_res::auth_types_for_event(
            &TimelineEventType::RoomMember,
            user,
            Some(user.as_str()),
            &raw,
            &room.rules.authorization,
        )
        .map_err(Error::bad_json)?;
        let mut auth_events = Vec::new();
        for (ty, sk) in &auth_types {
            if room.rules.authorization.room_create_event_id_as_room_id
                && *ty == StateEventType::RoomCreate
            {
                continue;
            }
            if let Some(e) = self.state_event(&head.state, &ty.to_string(), sk).await? {
                auth_events.push(e.pdu.event_id.to_string());
            }
        }
        auth_events.sort();
        auth_events.dedup();
        let prev: Vec<String> = head
            .extremities
            .iter()
            .take(MAX_PREV_EVENTS)
            .map(|(id, _, _)| id.to_string())
            .collect();
        let depth = head
            .extremities
            .iter()
            .map(|(_, d, _)| *d)
            .max()
            .unwrap_or(0)
            + 1;
        let now = u64::from(MilliSecondsSinceUnixEpoch::now().0);
        let mut template = serde_json::json!({
            "type": "m.room.member",
            "state_key": user,
            "sender": user,
            "content": content,
            "room_id": room.room_id,
            "origin": user.server_name(),
            "origin_server_ts": now,
            "depth": depth,
            "prev_events": prev,
            "auth_events": auth_events,
        });
        // Check the rules on the unsigned template.
        let obj = crate::pdu::canonical_object(template.clone())?;
        let probe = pdu_from_federation(&obj, &room.version)?;
        let auth = self
            .auth_state_from(&room.rules, &head.state, &probe)
            .await?;
        check_auth(&room.rules, &probe, &auth).map_err(Error::forbidden)?;
        if let Some(o) = template.as_object_mut() {
            o.remove("origin");
        }
        Ok(template)
    }

    /// The stripped state stored with an invite from another server.
    pub async fn remote_invite_state(
        &self,
        room_nid: i64,
        user: &str,
    ) -> Result<Option<Vec<serde_json::Value>>> {
        Ok(match self.store.remote_invite(room_nid, user).await? {
            Some(s) => Some(serde_json::from_str(&s)?),
            None => None,
        })
    }
}
