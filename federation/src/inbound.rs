//! Events from other servers: signatures and content hash checked with the senders' keys (a
//! hash mismatch keeps the redacted form), then handed to the core's three auth checks. What an
//! event lacks is fetched from the server that sent it: auth events through `/event_auth`,
//! parents through `/get_missing_events` (bounded), and the core is asked again. When the
//! parents fetched do not reach what we hold, the oldest of them (or else the event itself) is
//! accepted over the gap: the state after its missing parents is asked for
//! ([`Federation::state_after_missing`]) and the parents become backward extremities, which
//! `/messages` later backfills.

use std::{collections::HashMap, sync::Arc};

use myelin_core::{
    pdu::{rules_for, Pdu},
    ruma::{
        canonical_json::CanonicalJsonObject,
        signatures::{required_server_signatures_to_verify_event, verify_event, Verified},
        OwnedEventId, OwnedServerName, ServerName,
    },
    server::{pdu_from_federation, redacted_pdu, Ingested, Ingesting},
    state::StateMap,
    Error, Result, RoomInfo,
};
use serde_json::{json, Value};

use crate::Federation;

/// Parents fetched for one event at most (beyond that, the gap is crossed by asking for the
/// state at the missing parents).
const MAX_MISSING: usize = 50;
/// Events accepted over a gap while handling one incoming event (its fetched parents').
const MAX_GAPS_PER_EVENT: usize = 3;

/// An event received from another server as canonical JSON and parsed for its room version
/// (format checked, event ID computed); not verified yet.
pub fn parse_pdu(room: &RoomInfo, value: &Value) -> Result<(CanonicalJsonObject, Pdu)> {
    let obj: CanonicalJsonObject =
        match myelin_core::ruma::CanonicalJsonValue::try_from(value.clone()) {
            Ok(myelin_core::ruma::CanonicalJsonValue::Object(o)) => o,
            _ => return Err(Error::bad_json("event is not canonical JSON")),
        };
    let pdu = pdu_from_federation(&obj, &room.version)?;
    Ok((obj, pdu))
}

impl Federation {
    /// Parses and verifies an event received from another server: format, the signatures
    /// of every server that must sign it (keys valid at its `origin_server_ts`), and its content
    /// hash (a mismatch gives the redacted event, as the spec requires).
    pub async fn verify_pdu(&self, room: &RoomInfo, value: &Value) -> Result<Pdu> {
        let (obj, pdu) = parse_pdu(room, value)?;
        self.verify_parsed(room, &obj, pdu).await
    }

    /// [`Federation::verify_pdu`] for an event [`parse_pdu`] gave.
    pub async fn verify_parsed(
        &self,
        room: &RoomInfo,
        obj: &CanonicalJsonObject,
        pdu: Pdu,
    ) -> Result<Pdu> {
        if pdu.room_id != room.room_id {
            return Err(Error::bad_json("event is for another room"));
        }
        let servers = required_server_signatures_to_verify_event(obj, &room.rules.signatures)
            .map_err(|e| Error::forbidden(format!("signatures: {e}")))?;
        let ts = u64::from(pdu.origin_server_ts.0) as i64;
        let wanted: Vec<(OwnedServerName, i64)> = servers.into_iter().map(|s| (s, ts)).collect();
        let keys = self.keys.public_key_map(&wanted).await;
        match verify_event(&keys, obj, &room.rules) {
            Ok(Verified::All) => Ok(pdu),
            Ok(Verified::Signatures) => {
                tracing::info!(event = %pdu.event_id, "content hash mismatch: keeping the redacted form");
                redacted_pdu(&pdu, &room.rules)
            }
            Err(e) => Err(Error::forbidden(format!(
                "event {} failed signature checks: {e}",
                pdu.event_id
            ))),
        }
    }

    /// Verifies a list of events, dropping (and logging) those that fail.
    pub async fn verify_pdus(&self, room: &RoomInfo, values: &[Value]) -> Vec<Pdu> {
        let mut out = Vec::with_capacity(values.len());
        for v in values {
            match self.verify_pdu(room, v).await {
                Ok(p) => out.push(p),
                Err(e) => tracing::info!(error = %e, "dropping an event that failed verification"),
            }
        }
        out
    }

    /// Adds a verified event to its room, fetching missing auth events and parents from
    /// `origin` first.
    pub async fn handle_pdu(
        &self,
        origin: &ServerName,
        room: &Arc<RoomInfo>,
        pdu: Pdu,
        relay: bool,
    ) -> Result<Ingested> {
        let first = self
            .server
            .ingest_pdu_over_gap(room, pdu.clone(), relay.then_some(origin), &HashMap::new())
            .await?;
        self.fetch_missing(origin, room, pdu, relay, first).await
    }

    /// After an attempt to add `pdu` gave `outcome`: while it lacks events, fetches them from
    /// `origin` (its auth chain, then its missing parents, then the state after them to cross
    /// the gap) and tries again.
    async fn fetch_missing(
        &self,
        origin: &ServerName,
        room: &Arc<RoomInfo>,
        pdu: Pdu,
        relay: bool,
        mut outcome: Ingested,
    ) -> Result<Ingested> {
        let relay_from = relay.then_some(origin);
        let mut fetched_auth = false;
        let mut fetched_prev = false;
        let mut gap: Option<HashMap<OwnedEventId, Arc<StateMap>>> = None;
        loop {
            let Ingested::Missing(missing) = outcome else {
                return Ok(outcome);
            };
            let auth_missing = missing.iter().any(|m| pdu.auth_events.contains(m));
            if auth_missing && !fetched_auth {
                fetched_auth = true;
                self.fetch_auth_chain(origin, room, &pdu.event_id).await?;
            } else if !auth_missing && !fetched_prev {
                fetched_prev = true;
                self.fetch_missing_parents(origin, room, &pdu).await?;
            } else if !auth_missing && gap.is_none() {
                match self.gap_states(origin, room, &missing).await {
                    Some(states) => gap = Some(states),
                    None => return Ok(Ingested::Missing(missing)),
                }
            } else {
                return Ok(Ingested::Missing(missing));
            }
            outcome = self
                .server
                .ingest_pdu_over_gap(
                    room,
                    pdu.clone(),
                    relay_from,
                    gap.as_ref().unwrap_or(&HashMap::new()),
                )
                .await?;
        }
    }

    /// [`Federation::handle_pdu`] for the events of one transaction, in order: an event that
    /// extends what the room holds (its parent's commit possibly still in flight) is queued
    /// for the writer and returned as [`Ingesting::Queued`]; one whose parent is in flight
    /// otherwise, or an auth event in flight, gives [`Ingesting::InFlight`]; anything else is
    /// handled in full.
    pub async fn start_pdu(
        &self,
        origin: &ServerName,
        room: &Arc<RoomInfo>,
        pdu: Pdu,
    ) -> Result<Ingesting> {
        let first = self
            .server
            .start_ingest(room, pdu.clone(), None, &HashMap::new(), true)
            .await?;
        match first {
            Ingesting::Done(missing @ Ingested::Missing(_)) => Ok(Ingesting::Done(
                self.fetch_missing(origin, room, pdu, false, missing)
                    .await?,
            )),
            other => Ok(other),
        }
    }

    /// The state after each of `missing` (parents of one event), as `origin` reports it;
    /// `None` when there are too many or one cannot be had.
    async fn gap_states(
        &self,
        origin: &ServerName,
        room: &RoomInfo,
        missing: &[OwnedEventId],
    ) -> Option<HashMap<OwnedEventId, Arc<StateMap>>> {
        if missing.len() > crate::history::MAX_GAP_PARENTS {
            tracing::info!(
                missing = missing.len(),
                "too many missing parents to cross the gap"
            );
            return None;
        }
        let mut states = HashMap::new();
        for prev in missing {
            match self.state_after_missing(origin, room, prev).await {
                Ok(s) => {
                    states.insert(prev.clone(), s);
                }
                Err(e) => {
                    tracing::info!(%prev, error = %e, "the state at a missing parent");
                    return None;
                }
            }
        }
        Some(states)
    }

    /// Stores the auth chain of an event as the sending server reports it.
    pub(crate) async fn fetch_auth_chain(
        &self,
        origin: &ServerName,
        room: &RoomInfo,
        event_id: &OwnedEventId,
    ) -> Result<()> {
        let path = format!(
            "/_matrix/federation/v1/event_auth/{}/{}",
            encode(room.room_id.as_str()),
            encode(event_id.as_str())
        );
        let resp = self
            .client
            .request(origin, http::Method::GET, &path, None)
            .await
            .map_err(|e| Error::internal(format!("event_auth: {e}")))?;
        let chain = resp
            .get("auth_chain")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let pdus = self.verify_pdus(room, &chain).await;
        self.server.store_outliers(room, pdus).await?;
        Ok(())
    }

    /// Fetches the events between our forward extremities and `pdu` and adds them, oldest
    /// first.
    async fn fetch_missing_parents(
        &self,
        origin: &ServerName,
        room: &Arc<RoomInfo>,
        pdu: &Pdu,
    ) -> Result<()> {
        let earliest: Vec<String> = self
            .server
            .store
            .forward_extremities(room.nid)
            .await?
            .into_iter()
            .map(|(id, _, _)| id)
            .collect();
        let path = format!(
            "/_matrix/federation/v1/get_missing_events/{}",
            encode(room.room_id.as_str())
        );
        let body = json!({
            "earliest_events": earliest,
            "latest_events": [pdu.event_id],
            "limit": MAX_MISSING,
            "min_depth": 0,
        });
        let resp = self
            .client
            .request(origin, http::Method::POST, &path, Some(&body))
            .await
            .map_err(|e| Error::internal(format!("get_missing_events: {e}")))?;
        let events = resp
            .get("events")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut pdus = self.verify_pdus(room, &events).await;
        pdus.sort_by_key(|p| p.depth);
        let mut gaps_left = MAX_GAPS_PER_EVENT;
        for p in pdus.into_iter().take(MAX_MISSING) {
            let id = p.event_id.clone();
            // Each parent may lack its own auth events; its own parents should be in the list,
            // or else it is the oldest of them and is accepted over the gap.
            match Box::pin(self.handle_parent(origin, room, p, &mut gaps_left)).await {
                Ok(outcome) => tracing::debug!(event = %id, ?outcome, "fetched parent"),
                Err(e) => tracing::info!(event = %id, error = %e, "fetched parent failed"),
            }
        }
        Ok(())
    }

    /// Adds a parent fetched by `/get_missing_events`: fetching its auth events if needed,
    /// and crossing the gap below it (while `gaps_left` allows) if its own parents are missing.
    async fn handle_parent(
        &self,
        origin: &ServerName,
        room: &Arc<RoomInfo>,
        pdu: Pdu,
        gaps_left: &mut usize,
    ) -> Result<Ingested> {
        let mut outcome = self.server.ingest_pdu(room, pdu.clone(), None).await?;
        if let Ingested::Missing(m) = &outcome {
            if m.iter().any(|x| pdu.auth_events.contains(x)) {
                self.fetch_auth_chain(origin, room, &pdu.event_id).await?;
                outcome = self.server.ingest_pdu(room, pdu.clone(), None).await?;
            }
        }
        if let Ingested::Missing(m) = &outcome {
            if *gaps_left > 0 && !m.iter().any(|x| pdu.auth_events.contains(x)) {
                *gaps_left -= 1;
                if let Some(states) = self.gap_states(origin, room, m).await {
                    outcome = self
                        .server
                        .ingest_pdu_over_gap(room, pdu, None, &states)
                        .await?;
                }
            }
        }
        Ok(outcome)
    }

    /// The rules of a room version we can take part in.
    pub fn check_version(version: &myelin_core::ruma::RoomVersionId) -> Result<()> {
        rules_for(version).map(|_| ())
    }
}

/// Percent-encodes a path segment.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}
