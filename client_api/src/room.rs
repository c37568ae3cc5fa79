//! Room creation (spec § "Creation", `POST /createRoom`): presets, initial power levels and
//! state, alias, local invites, all written as one transaction; then invites of other
//! servers' users, each over federation.

use std::sync::Arc;

use axum::{
    extract::{Extension, State},
    Json,
};
use myelin_core::{
    pdu::{NewEvent, DEFAULT_ROOM_VERSION, SUPPORTED_ROOM_VERSIONS},
    ruma::{OwnedUserId, RoomAliasId, RoomVersionId},
    Append, Error, ErrorKind, Server,
};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::{
    error::{err, ApiResult},
    extract::{Auth, JsonBody},
};

#[derive(Deserialize)]
pub struct CreateRoomBody {
    visibility: Option<String>,
    room_alias_name: Option<String>,
    name: Option<String>,
    topic: Option<String>,
    #[serde(default)]
    invite: Vec<String>,
    room_version: Option<String>,
    creation_content: Option<Map<String, Value>>,
    #[serde(default)]
    initial_state: Vec<InitialState>,
    preset: Option<String>,
    #[serde(default)]
    is_direct: bool,
    power_level_content_override: Option<Map<String, Value>>,
}

#[derive(Deserialize)]
struct InitialState {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    state_key: String,
    content: Value,
}

fn state(sender: &OwnedUserId, kind: &str, key: &str, content: Value) -> Result<Append, Error> {
    Ok(Append {
        sender: sender.clone(),
        event: NewEvent::state(kind, key, content)?,
        txn: None,
    })
}

pub async fn create_room(
    State(server): State<Arc<Server>>,
    Extension(fed): Extension<Arc<myelin_federation::Federation>>,
    auth: Auth,
    JsonBody(body): JsonBody<CreateRoomBody>,
) -> ApiResult<Json<Value>> {
    let creator = auth.user_id.clone();
    let version_str = body
        .room_version
        .clone()
        .unwrap_or_else(|| DEFAULT_ROOM_VERSION.to_owned());
    if !SUPPORTED_ROOM_VERSIONS.contains(&version_str.as_str()) {
        return err(
            ErrorKind::UnsupportedRoomVersion,
            format!("Room version {version_str} is not supported"),
        );
    }
    let version = RoomVersionId::try_from(version_str.as_str()).map_err(|_| {
        Error::new(
            ErrorKind::UnsupportedRoomVersion,
            "Unsupported room version",
        )
    })?;
    let rules = myelin_core::pdu::rules_for(&version)?;
    let preset = body.preset.clone().unwrap_or_else(|| {
        if body.visibility.as_deref() == Some("public") {
            "public_chat"
        } else {
            "private_chat"
        }
        .to_owned()
    });
    if !matches!(
        preset.as_str(),
        "public_chat" | "private_chat" | "trusted_private_chat"
    ) {
        return err(ErrorKind::BadJson, "Unknown preset");
    }
    if let Some(v) = &body.visibility {
        if v != "public" && v != "private" {
            return err(ErrorKind::BadJson, "visibility must be public or private");
        }
    }
    let mut invitees = Vec::new();
    for i in &body.invite {
        let u: OwnedUserId = crate::extract::parse_id(i, "user ID")?;
        invitees.push(u);
    }
    let alias = match &body.room_alias_name {
        Some(local) => {
            let a = format!("#{local}:{}", server.server_name());
            if local.contains(':') || RoomAliasId::parse(&a).is_err() {
                return err(ErrorKind::InvalidParam, "Invalid room_alias_name");
            }
            if server.store.alias(&a).await?.is_some() {
                return err(ErrorKind::RoomInUse, "Room alias already taken");
            }
            Some(a)
        }
        None => None,
    };

    // m.room.create
    let mut create = body.creation_content.clone().unwrap_or_default();
    create.insert("room_version".into(), json!(version_str));
    if !rules.authorization.use_room_create_sender {
        create.insert("creator".into(), json!(creator));
    }
    let v12 = rules.authorization.explicitly_privilege_room_creators;
    if v12 && preset == "trusted_private_chat" {
        // Room v12: trusted invitees become additional creators (spec v1.16).
        let mut extra: Vec<Value> = create
            .get("additional_creators")
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default();
        for i in &invitees {
            if !extra.contains(&json!(i)) && i != &creator {
                extra.push(json!(i));
            }
        }
        create.insert("additional_creators".into(), Value::Array(extra));
    }

    let mut rest = Vec::new();
    let profile = server.store.user(creator.as_str()).await?;
    let mut join = json!({"membership": "join"});
    if let Some(p) = &profile {
        if let Some(d) = &p.displayname {
            join["displayname"] = json!(d);
        }
        if let Some(a) = &p.avatar_url {
            join["avatar_url"] = json!(a);
        }
    }
    rest.push(state(&creator, "m.room.member", creator.as_str(), join)?);

    // m.room.power_levels
    let mut users = Map::new();
    if !v12 {
        users.insert(creator.to_string(), json!(100));
    }
    if preset == "trusted_private_chat" && !v12 {
        for i in &invitees {
            users.insert(i.to_string(), json!(100));
        }
    }
    let mut pl = json!({
        "users": users,
        "users_default": 0,
        "events": {
            "m.room.name": 50, "m.room.power_levels": 100, "m.room.history_visibility": 100,
            "m.room.canonical_alias": 50, "m.room.avatar": 50, "m.room.tombstone": if v12 { 150 } else { 100 },
            "m.room.server_acl": 100, "m.room.encryption": 100,
        },
        "events_default": 0, "state_default": 50, "ban": 50, "kick": 50, "redact": 50,
        "invite": 0,
        "notifications": { "room": 50 },
    });
    if let Some(o) = &body.power_level_content_override {
        for (k, v) in o {
            pl[k] = v.clone();
        }
    }
    rest.push(state(&creator, "m.room.power_levels", "", pl)?);
    if let Some(a) = &alias {
        rest.push(state(
            &creator,
            "m.room.canonical_alias",
            "",
            json!({"alias": a}),
        )?);
    }
    let (join_rule, hv, guest) = match preset.as_str() {
        "public_chat" => ("public", "shared", "forbidden"),
        _ => ("invite", "shared", "can_join"),
    };
    rest.push(state(
        &creator,
        "m.room.join_rules",
        "",
        json!({"join_rule": join_rule}),
    )?);
    rest.push(state(
        &creator,
        "m.room.history_visibility",
        "",
        json!({"history_visibility": hv}),
    )?);
    rest.push(state(
        &creator,
        "m.room.guest_access",
        "",
        json!({"guest_access": guest}),
    )?);
    for s in body.initial_state {
        if s.kind == "m.room.create" || s.kind == "m.room.member" {
            return err(
                ErrorKind::BadJson,
                "initial_state may not hold create or member events",
            );
        }
        // A later event for the same key replaces the preset's.
        rest.retain(|a| {
            !(a.event.kind == s.kind && a.event.state_key.as_deref() == Some(s.state_key.as_str()))
        });
        rest.push(state(&creator, &s.kind, &s.state_key, s.content)?);
    }
    if let Some(n) = &body.name {
        rest.push(state(&creator, "m.room.name", "", json!({"name": n}))?);
    }
    if let Some(t) = &body.topic {
        rest.push(state(
            &creator,
            "m.room.topic",
            "",
            json!({"topic": t, "m.topic": [{"mimetype": "text/plain", "body": t}]}),
        )?);
    }
    let mut remote_invitees = Vec::new();
    for i in &invitees {
        if i == &creator {
            continue;
        }
        if i.server_name().as_str() != server.server_name() {
            // Invited over federation once the room exists (their server countersigns).
            if !remote_invitees.contains(i) {
                remote_invitees.push(i.clone());
            }
            continue;
        }
        if server.store.user(i.as_str()).await?.is_none() {
            return err(ErrorKind::NotFound, format!("Unknown user {i}"));
        }
        let mut c = json!({"membership": "invite"});
        if body.is_direct {
            c["is_direct"] = json!(true);
        }
        rest.push(state(&creator, "m.room.member", i.as_str(), c)?);
    }

    let (room, _) = server
        .create_room(version, &creator, Value::Object(create), rest)
        .await?;
    if let Some(a) = &alias {
        if !server
            .store
            .put_alias(a, room.room_id.as_str(), creator.as_str())
            .await?
        {
            tracing::warn!(
                alias = a,
                "alias was taken while the room was being created"
            );
        }
    }
    if body.visibility.as_deref() == Some("public") {
        server.store.set_room_public(room.nid, true).await?;
    }
    // Users of other servers: one invite each over federation, as `/invite` sends it. The
    // room exists by now, so a server that cannot be reached or refuses does not undo it; the
    // failure is logged and the invite can be sent again with `/invite`.
    for i in &remote_invitees {
        let mut c = json!({"membership": "invite"});
        if body.is_direct {
            c["is_direct"] = json!(true);
        }
        if let Err(e) = fed.invite_remote_with(&room, &creator, i, c).await {
            tracing::warn!(room = %room.room_id, invitee = %i, error = %e, "createRoom invite failed");
        }
    }
    Ok(Json(json!({ "room_id": room.room_id })))
}
