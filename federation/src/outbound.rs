//! What our users do in rooms other servers host: joining (`make_join` → sign → `send_join` →
//! verify the returned state and auth chain → store it as the room's state), leaving a room we
//! only know through an invite (`make_leave`/`send_leave`), inviting users of other servers
//! (`/invite`, countersigned by their server), and directory and profile look-ups.

use std::sync::Arc;

use myelin_core::{
    pdu::{rules_for, NewEvent, Pdu, SUPPORTED_ROOM_VERSIONS},
    ruma::{
        canonical_json::CanonicalJsonObject, signatures::hash_and_sign_event, CanonicalJsonValue,
        MilliSecondsSinceUnixEpoch, OwnedRoomId, OwnedServerName, RoomId, RoomVersionId,
        ServerName, UserId,
    },
    server::{pdu_from_federation, Ingested},
    Error, ErrorKind, Result, RoomInfo, StoredEvent,
};
use serde_json::{json, Value};

use crate::{client::FedError, inbound::encode, Federation};

/// A failed request to another server as a Matrix error for our client: its refusals that
/// keep their meaning pass through (403, 404, a bad room version, ...), anything else is
/// 502 `M_UNKNOWN`, never a 500 of ours.
pub(crate) fn remote_error(what: &str, e: FedError) -> Error {
    match (e.status(), e.errcode()) {
        (Some(403), _) => Error::forbidden(format!("{what}: {e}")),
        (Some(404), _) => Error::not_found(format!("{what}: {e}")),
        (Some(_), code) => match code.and_then(ErrorKind::from_remote_errcode) {
            Some(kind) => Error::new(kind, format!("{what}: {e}")),
            None => Error::new(
                ErrorKind::RemoteUnavailable,
                format!("{what}: the other server failed: {e}"),
            ),
        },
        (None, _) => Error::new(
            ErrorKind::RemoteUnavailable,
            format!("{what}: the other server could not be reached: {e}"),
        ),
    }
}

fn probe_room(room_id: &RoomId, version: &RoomVersionId) -> Result<RoomInfo> {
    Ok(RoomInfo {
        nid: 0,
        room_id: room_id.to_owned(),
        version: version.clone(),
        rules: rules_for(version)?,
    })
}

impl Federation {
    /// Completes and signs an event template from `make_join`/`make_leave`.
    fn sign_template(
        &self,
        mut value: Value,
        version: &RoomVersionId,
    ) -> Result<(CanonicalJsonObject, Pdu)> {
        let obj_mut = value
            .as_object_mut()
            .ok_or_else(|| Error::bad_json("the event template is not an object"))?;
        obj_mut.insert(
            "origin_server_ts".into(),
            json!(u64::from(MilliSecondsSinceUnixEpoch::now().0)),
        );
        obj_mut.insert("origin".into(), json!(self.server.server_name()));
        obj_mut.remove("signatures");
        obj_mut.remove("hashes");
        obj_mut.remove("event_id");
        let mut obj = match CanonicalJsonValue::try_from(value) {
            Ok(CanonicalJsonValue::Object(o)) => o,
            _ => return Err(Error::bad_json("the event template is not canonical JSON")),
        };
        let rules = rules_for(version)?;
        hash_and_sign_event(
            self.server.server_name(),
            &self.server.key.pair,
            &mut obj,
            &rules.redaction,
        )
        .map_err(|e| Error::internal(format!("signing: {e}")))?;
        let pdu = pdu_from_federation(&obj, version)?;
        Ok((obj, pdu))
    }

    /// Asks `via` for a membership template (`make_join`, `make_leave`, `make_knock`) and
    /// signs it, with `reason` added to its content.
    async fn make_membership(
        &self,
        via: &ServerName,
        kind: &str,
        room_id: &RoomId,
        user: &UserId,
        reason: Option<&str>,
    ) -> Result<(RoomVersionId, CanonicalJsonObject, Pdu)> {
        let mut path = format!(
            "/_matrix/federation/v1/make_{kind}/{}/{}",
            encode(room_id.as_str()),
            encode(user.as_str())
        );
        if kind == "join" || kind == "knock" {
            let vers: Vec<String> = SUPPORTED_ROOM_VERSIONS
                .iter()
                .map(|v| format!("ver={v}"))
                .collect();
            path = format!("{path}?{}", vers.join("&"));
        }
        let resp = self
            .client
            .request(via, http::Method::GET, &path, None)
            .await
            .map_err(|e| remote_error(&format!("make_{kind}"), e))?;
        let version = resp
            .get("room_version")
            .and_then(Value::as_str)
            .unwrap_or("1");
        let version = RoomVersionId::try_from(version)
            .map_err(|_| Error::bad_json("the other server sent an invalid room version"))?;
        rules_for(&version)?;
        let mut template = resp
            .get("event")
            .cloned()
            .ok_or_else(|| Error::bad_json(format!("make_{kind} answer without an event")))?;
        let checks = [
            ("type", json!("m.room.member")),
            ("sender", json!(user)),
            ("state_key", json!(user)),
        ];
        for (field, want) in checks {
            if template.get(field) != Some(&want) {
                return Err(Error::bad_json(format!(
                    "the event template has a wrong {field}"
                )));
            }
        }
        if template.get("content").and_then(|c| c.get("membership")) != Some(&json!(kind)) {
            return Err(Error::bad_json("the event template has a wrong membership"));
        }
        if let Some(reason) = reason {
            template["content"]["reason"] = json!(reason);
        }
        let (obj, pdu) = self.sign_template(template, &version)?;
        Ok((version, obj, pdu))
    }

    /// Joins a room through the first of `via` that answers.
    pub async fn join_remote(
        &self,
        user: &UserId,
        room_id: &RoomId,
        via: &[OwnedServerName],
        reason: Option<&str>,
    ) -> Result<Arc<RoomInfo>> {
        let mut last = Error::not_found("No server in the room could be asked to join it");
        for server in via.iter().filter(|s| **s != self.server.server_name) {
            match self.join_via(server, user, room_id, reason).await {
                Ok(room) => return Ok(room),
                Err(e) => {
                    tracing::info!(via = %server, error = %e, "remote join failed");
                    last = e;
                }
            }
        }
        Err(last)
    }

    async fn join_via(
        &self,
        via: &ServerName,
        user: &UserId,
        room_id: &RoomId,
        reason: Option<&str>,
    ) -> Result<Arc<RoomInfo>> {
        let (version, obj, pdu) = self
            .make_membership(via, "join", room_id, user, reason)
            .await?;
        let path = format!(
            "/_matrix/federation/v2/send_join/{}/{}",
            encode(room_id.as_str()),
            encode(pdu.event_id.as_str())
        );
        let body = serde_json::to_value(&obj)?;
        let resp = self
            .client
            .request(via, http::Method::PUT, &path, Some(&body))
            .await
            .map_err(|e| remote_error("send_join", e))?;
        let probe = probe_room(room_id, &version)?;
        let list = |f: &str| {
            resp.get(f)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        let state = self.verify_pdus(&probe, &list("state")).await;
        let auth_chain = self.verify_pdus(&probe, &list("auth_chain")).await;
        // The resident server may have added its signature (restricted joins).
        let join = match resp.get("event") {
            Some(e) => {
                let returned = self.verify_pdu(&probe, e).await?;
                if returned.event_id != pdu.event_id {
                    return Err(Error::bad_json("send_join returned another event"));
                }
                returned
            }
            None => pdu,
        };
        let (room, _) = self
            .server
            .join_from_remote(version, room_id, state, auth_chain, join)
            .await?;
        Ok(room)
    }

    /// Leaves (or rejects an invite to, or withdraws a knock on) a room no user of ours is
    /// joined to, through the first of `via` that answers.
    pub async fn leave_remote(
        &self,
        user: &UserId,
        room_id: &RoomId,
        via: &[OwnedServerName],
        reason: Option<&str>,
    ) -> Result<()> {
        self.membership_through("leave", user, room_id, via, reason)
            .await
    }

    /// Knocks on a room we are not in, through the first of `via` that answers; the knock is
    /// remembered with the stripped state the resident server sent, for the knocker's
    /// `/sync` (`rooms.knock`).
    pub async fn knock_remote(
        &self,
        user: &UserId,
        room_id: &RoomId,
        via: &[OwnedServerName],
        reason: Option<&str>,
    ) -> Result<()> {
        self.membership_through("knock", user, room_id, via, reason)
            .await
    }

    /// `make_{kind}` → sign → `send_{kind}` (`leave` or `knock`) through the first of `via`
    /// that answers, then the membership is stored outside the timeline (we are not in the
    /// room) with the stripped state a `send_knock` answer carries.
    async fn membership_through(
        &self,
        kind: &str,
        user: &UserId,
        room_id: &RoomId,
        via: &[OwnedServerName],
        reason: Option<&str>,
    ) -> Result<()> {
        let mut last = Error::not_found(format!("No server in the room could be asked to {kind}"));
        for server in via.iter().filter(|s| **s != self.server.server_name) {
            let attempt = async {
                let (version, obj, pdu) = self
                    .make_membership(server, kind, room_id, user, reason)
                    .await?;
                // send_leave is v2 (v1 answers a bare array); send_knock only exists as v1.
                let api = if kind == "leave" { "v2" } else { "v1" };
                let path = format!(
                    "/_matrix/federation/{api}/send_{kind}/{}/{}",
                    encode(room_id.as_str()),
                    encode(pdu.event_id.as_str())
                );
                let body = serde_json::to_value(&obj)?;
                let resp = self
                    .client
                    .request(server, http::Method::PUT, &path, Some(&body))
                    .await
                    .map_err(|e| remote_error(&format!("send_{kind}"), e))?;
                let stripped = resp
                    .get("knock_room_state")
                    .or_else(|| resp.get("knock_state"))
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|e| e.get("type").is_some_and(Value::is_string))
                    .collect();
                self.server
                    .store_remote_membership(version, pdu, stripped)
                    .await
            };
            match attempt.await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::info!(via = %server, error = %e, "remote {kind} failed");
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// Invites a user of another server: their server countersigns the invite, then it is
    /// added to the room (and sent to the room's other servers).
    pub async fn invite_remote(
        &self,
        room: &Arc<RoomInfo>,
        sender: &UserId,
        invitee: &UserId,
        reason: Option<String>,
    ) -> Result<Arc<StoredEvent>> {
        let mut content = json!({ "membership": "invite" });
        if let Some(r) = reason {
            content["reason"] = json!(r);
        }
        self.invite_remote_with(room, sender, invitee, content)
            .await
    }

    /// [`Federation::invite_remote`] with the invite's whole content (`membership` is
    /// `invite`; `createRoom` adds `is_direct`).
    pub async fn invite_remote_with(
        &self,
        room: &Arc<RoomInfo>,
        sender: &UserId,
        invitee: &UserId,
        content: Value,
    ) -> Result<Arc<StoredEvent>> {
        let event = NewEvent::state("m.room.member", invitee.as_str(), content)?;
        let pdu = self.server.build_detached(room, sender, event).await?;
        let state = self.server.current_state(room).await?;
        let mut stripped = self.server.key_stripped_state(&state).await?;
        if let Some(e) = self
            .server
            .state_event(&state, "m.room.member", sender.as_str())
            .await?
        {
            stripped.push(e.pdu.to_stripped());
        }
        let path = format!(
            "/_matrix/federation/v2/invite/{}/{}",
            encode(room.room_id.as_str()),
            encode(pdu.event_id.as_str())
        );
        let event_json: Value = serde_json::from_str(pdu.json.get())?;
        let body = json!({
            "event": event_json,
            "room_version": room.version,
            "invite_room_state": stripped,
        });
        let resp = self
            .client
            .request(invitee.server_name(), http::Method::PUT, &path, Some(&body))
            .await
            .map_err(|e| remote_error("invite", e))?;
        let returned = resp
            .get("event")
            .ok_or_else(|| Error::bad_json("invite answer without an event"))?;
        let signed = self.verify_pdu(room, returned).await?;
        if signed.event_id != pdu.event_id {
            return Err(Error::bad_json("the invitee's server changed the invite"));
        }
        match self.server.ingest_pdu(room, signed, None).await? {
            Ingested::Accepted(ev) => Ok(ev),
            Ingested::Known => self
                .server
                .event_by_id(&pdu.event_id)
                .await?
                .ok_or_else(|| Error::internal("invite vanished")),
            Ingested::Rejected(why) => Err(Error::forbidden(why)),
            Ingested::SoftFailed => Err(Error::forbidden("the invite is no longer allowed")),
            Ingested::Missing(_) => Err(Error::internal("the invite's parents are missing")),
        }
    }

    /// Resolves an alias of another server: `(room ID, servers in the room)`.
    pub async fn query_alias(&self, alias: &str) -> Result<(OwnedRoomId, Vec<OwnedServerName>)> {
        let server = alias
            .split_once(':')
            .map(|(_, s)| s)
            .and_then(|s| OwnedServerName::try_from(s).ok())
            .ok_or_else(|| Error::invalid_param("invalid alias"))?;
        let path = format!(
            "/_matrix/federation/v1/query/directory?room_alias={}",
            encode(alias)
        );
        let resp = self
            .client
            .request(&server, http::Method::GET, &path, None)
            .await
            .map_err(|e| remote_error("alias lookup", e))?;
        let room_id = resp
            .get("room_id")
            .and_then(Value::as_str)
            .and_then(|r| OwnedRoomId::try_from(r).ok())
            .ok_or_else(|| Error::bad_json("alias answer without a room ID"))?;
        let mut servers: Vec<OwnedServerName> = resp
            .get("servers")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .filter_map(|s| OwnedServerName::try_from(s).ok())
                    .collect()
            })
            .unwrap_or_default();
        if !servers.contains(&server) {
            servers.insert(0, server);
        }
        Ok((room_id, servers))
    }

    /// A user's profile from their server (`field`: one field only).
    pub async fn query_profile(&self, user: &UserId, field: Option<&str>) -> Result<Value> {
        let mut path = format!(
            "/_matrix/federation/v1/query/profile?user_id={}",
            encode(user.as_str())
        );
        if let Some(f) = field {
            path.push_str(&format!("&field={}", encode(f)));
        }
        self.client
            .request(user.server_name(), http::Method::GET, &path, None)
            .await
            .map_err(|e| remote_error("profile lookup", e))
    }
}
