//! History from other servers, as the core sees it: events learnt by backfill added to the
//! timeline as historical events, and the state after an event the timeline does not hold,
//! built from the state another server reported at it.
//!
//! A historical event is checked against its own auth events and against the state before it
//! (resolved over its parents' states, or taken from another server's report for a parent we
//! lack), like any event from another server. It is not checked against the current state: it
//! changes neither the current state, the memberships nor the forward extremities, nobody is
//! woken for it, and it takes a negative stream position, so `/messages` orders it by depth
//! while `/sync` never shows it as new. An event we hold as an outlier (learnt as state or
//! auth) joins the timeline the same way.
//!
//! Fetching is the federation crate's job: these functions say what they lack
//! ([`Ingested::Missing`]) and are called again once it is stored.

use super::remote::{check_auth, AuthState, Parents};
use super::*;
use crate::store::{EventWrite, HistoricalWrite};

impl Server {
    /// The state after `prev`, an event the timeline does not hold, from the state before it
    /// that another server reported (`state_ids`): the stored, unrejected state events among
    /// them, then `prev` itself when it is a stored state event. Events not stored are left out
    /// (the caller fetched what it could); a state without a create event is refused.
    pub async fn state_after_remote(
        &self,
        room: &RoomInfo,
        prev: &OwnedEventId,
        state_ids: &[OwnedEventId],
    ) -> Result<Arc<StateMap>> {
        let ids: Vec<OwnedEventId> = state_ids
            .iter()
            .chain(std::iter::once(prev))
            .cloned()
            .collect();
        let (map, left_out) = self.state_map_of(room, &ids).await?;
        if left_out > 0 {
            tracing::info!(room = %room.room_id, %prev, left_out, "state at a missing event: some events could not be had");
        }
        if self.state_event(&map, "m.room.create", "").await?.is_none() {
            return Err(Error::bad_json(format!(
                "the state reported at {prev} has no create event"
            )));
        }
        Ok(Arc::new(map))
    }

    /// Adds an event learnt by backfill to the room's timeline as history (see the module
    /// documentation). `gap` holds the state after each parent the timeline does not hold, as
    /// another server reported it ([`Server::state_after_remote`]); those parents become
    /// backward extremities. A parent neither held nor in `gap` is reported missing.
    pub async fn ingest_historical(
        &self,
        room: &Arc<RoomInfo>,
        pdu: Pdu,
        gap: &HashMap<OwnedEventId, Arc<StateMap>>,
    ) -> Result<Ingested> {
        if pdu.room_id != room.room_id {
            return Err(Error::bad_json("event is for another room"));
        }
        // An outlier joins the timeline (keeping its stored, perhaps redacted, form).
        let outlier = match self.event_by_id(&pdu.event_id).await? {
            Some(e) if e.rejected => {
                return Ok(Ingested::Rejected("the event was rejected before".into()))
            }
            Some(e) if !e.outlier => return Ok(Ingested::Known),
            other => other,
        };
        let held = outlier.is_some();
        // 1. Against its own auth events.
        let auth: AuthState = match self.auth_events_of(room, &pdu, &HashMap::new()).await {
            Ok(Ok(a)) => a,
            Ok(Err(missing)) => return Ok(Ingested::Missing(missing)),
            Err(e) => return self.refuse_historical(room, &pdu, held, e.message()).await,
        };
        if let Err(why) = check_auth(&room.rules, &pdu, &auth) {
            return self.refuse_historical(room, &pdu, held, why).await;
        }
        // Parents: held in the timeline, or their state reported by another server.
        let Parents {
            groups,
            reported,
            reported_ids: backward_add,
            missing,
        } = self.parents_of(&pdu, gap, &[]).await?;
        if !missing.is_empty() {
            return Ok(Ingested::Missing(missing));
        }
        let is_create = pdu.kind == TimelineEventType::RoomCreate;
        if groups.is_empty() && reported.is_empty() && !is_create {
            return self
                .refuse_historical(room, &pdu, held, "every parent was rejected".into())
                .await;
        }
        // 2. Against the state before it.
        let mut extra_groups = Vec::new();
        let mut new_maps = Vec::new();
        let (before_group, before_map, before_chain) = if is_create {
            (0, Arc::new(StateMap::new()), 0)
        } else {
            let (group, map, chain, write) = self.state_before(room, &groups, reported).await?;
            if let Some(w) = write {
                extra_groups.push(w);
                new_maps.push((group, map.clone(), chain));
            }
            (group, map, chain)
        };
        let before_auth = self.auth_state_from(&room.rules, &before_map, &pdu).await?;
        if let Err(why) = check_auth(&room.rules, &pdu, &before_auth) {
            let why = format!("not allowed by the state before it: {why}");
            return self.refuse_historical(room, &pdu, held, why).await;
        }
        // The state after it.
        let nid = match &outlier {
            Some(e) => e.nid,
            None => self.next_event_nid.fetch_add(1, Ordering::Relaxed),
        };
        let mut after_group = before_group;
        let mut new_group = None;
        if let Some(sk) = &pdu.state_key {
            let k = self
                .state
                .intern(&self.store, &pdu.kind.to_string(), sk)
                .await?;
            let mut after = (*before_map).clone();
            after.insert(k, nid);
            let (mut g, chain) =
                self.group_for(Some((before_group, &before_map, before_chain)), &after);
            g.state_key_nid = k;
            after_group = g.group;
            new_maps.push((g.group, Arc::new(after), chain));
            new_group = Some(g);
        }
        let position = self.next_historical.fetch_sub(1, Ordering::Relaxed);
        let write = HistoricalWrite {
            room_nid: room.nid,
            event: EventWrite {
                event_nid: nid,
                event_id: pdu.event_id.to_string(),
                event_type: pdu.kind.to_string(),
                state_key: pdu.state_key.clone(),
                sender: pdu.sender.to_string(),
                depth: pdu.depth,
                origin_server_ts: u64::from(pdu.origin_server_ts.0) as i64,
                stream_ordering: position,
                json: pdu.json.get().to_owned(),
                state_before: before_group,
                state_after: after_group,
                new_group,
                membership: None,
                txn: None,
            },
            promote: outlier.is_some(),
            groups: extra_groups,
            backward_add,
        };
        self.store.write_historical(&write).await?;
        // Committed: the caches follow.
        for (group, map, chain) in new_maps {
            self.state.insert_group(group, map, chain);
        }
        let (pdu, redacted_by) = match outlier {
            Some(e) => (e.pdu.clone(), e.redacted_by.clone()),
            None => (Arc::new(pdu), None),
        };
        let ev = Arc::new(StoredEvent {
            nid,
            room_nid: room.nid,
            depth: pdu.depth,
            pdu,
            stream_ordering: Some(position),
            state_before: Some(before_group),
            state_after: Some(after_group),
            redacted_by,
            outlier: false,
            rejected: false,
            txn: Some(None),
        });
        self.cache_event(ev.clone());
        Ok(Ingested::Accepted(ev))
    }

    /// A refused historical event: remembered as rejected, unless it is held already (an
    /// outlier stays as it was).
    async fn refuse_historical(
        &self,
        room: &RoomInfo,
        pdu: &Pdu,
        held: bool,
        why: String,
    ) -> Result<Ingested> {
        tracing::info!(event = %pdu.event_id, %why, "rejected a backfilled event");
        if !held {
            self.store_outside(room, pdu, true).await?;
        }
        Ok(Ingested::Rejected(why))
    }

    /// A room's backward extremities named at `depth` or below, deepest first (at most
    /// `limit`): `(event ID, depth of the event naming it)`.
    pub async fn backward_extremities(
        &self,
        room_nid: i64,
        depth: i64,
        limit: usize,
    ) -> Result<Vec<(OwnedEventId, i64)>> {
        Ok(self
            .store
            .backward_extremities(room_nid, depth, limit as i64)
            .await?
            .into_iter()
            .filter_map(|(id, d)| OwnedEventId::try_from(id).ok().map(|id| (id, d)))
            .collect())
    }

    /// Which of `ids` the room's timeline does not hold (absent, or held only as outliers).
    pub async fn not_in_timeline(&self, ids: &[OwnedEventId]) -> Result<Vec<OwnedEventId>> {
        let mut out = Vec::new();
        for id in ids {
            if self.event_by_id(id).await?.is_none_or(|e| e.outlier) {
                out.push(id.clone());
            }
        }
        Ok(out)
    }
}
