//! PDUs: parsing stored events, building and signing new ones (content hash, signature,
//! reference-hash event ID), and rendering them in the client format.
//!
//! An event's JSON is kept exactly as signed; [`Pdu`] is a parsed view of it that also implements
//! ruma's state-res [`Event`](ruma::state_res::Event) trait, so the auth rules and state
//! resolution run on it directly.

use std::sync::Arc;

use ruma::{
    canonical_json::{CanonicalJsonObject, CanonicalJsonValue},
    events::TimelineEventType,
    room_version_rules::RoomVersionRules,
    EventId, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId,
    RoomVersionId, UserId,
};
use serde::Deserialize;
use serde_json::{value::RawValue, Map, Value};

use crate::{keys::SigningKey, Error, Result};

/// The largest PDU the spec allows, in bytes of its JSON.
pub const MAX_PDU_BYTES: usize = 65_536;

/// A parsed event. Cheap to share (`Arc<Pdu>`), immutable.
#[derive(Debug, Clone)]
pub struct Pdu {
    pub event_id: OwnedEventId,
    pub room_id: OwnedRoomId,
    pub sender: OwnedUserId,
    pub kind: TimelineEventType,
    pub state_key: Option<String>,
    pub content: Box<RawValue>,
    pub prev_events: Vec<OwnedEventId>,
    pub auth_events: Vec<OwnedEventId>,
    pub depth: i64,
    pub origin_server_ts: MilliSecondsSinceUnixEpoch,
    pub redacts: Option<OwnedEventId>,
    /// Whether the stored JSON is the redacted form.
    pub redacted: bool,
    /// Whether the JSON carries `room_id` (a room v12 create event does not).
    pub has_room_id: bool,
    /// The JSON as stored (signed; redacted if the event was redacted).
    pub json: Box<RawValue>,
}

#[derive(Deserialize)]
struct PduFields {
    room_id: Option<Box<RawValue>>,
    sender: OwnedUserId,
    #[serde(rename = "type")]
    kind: TimelineEventType,
    state_key: Option<String>,
    content: Box<RawValue>,
    #[serde(default)]
    prev_events: Vec<OwnedEventId>,
    #[serde(default)]
    auth_events: Vec<OwnedEventId>,
    depth: i64,
    origin_server_ts: MilliSecondsSinceUnixEpoch,
    redacts: Option<OwnedEventId>,
}

#[derive(Deserialize)]
struct RedactsInContent {
    redacts: Option<OwnedEventId>,
}

impl Pdu {
    /// Parses stored or received event JSON. `room_id` is given because a v12 create event
    /// carries none.
    pub fn parse(
        event_id: OwnedEventId,
        room_id: OwnedRoomId,
        json: Box<RawValue>,
        redacted: bool,
    ) -> Result<Self> {
        let f: PduFields = serde_json::from_str(json.get())
            .map_err(|e| Error::bad_json(format!("malformed PDU: {e}")))?;
        let redacts = match f.redacts {
            Some(r) => Some(r),
            None if f.kind == TimelineEventType::RoomRedaction => {
                serde_json::from_str::<RedactsInContent>(f.content.get())
                    .ok()
                    .and_then(|c| c.redacts)
            }
            None => None,
        };
        Ok(Pdu {
            event_id,
            room_id,
            sender: f.sender,
            kind: f.kind,
            state_key: f.state_key,
            content: f.content,
            prev_events: f.prev_events,
            auth_events: f.auth_events,
            depth: f.depth,
            origin_server_ts: f.origin_server_ts,
            redacts,
            redacted,
            has_room_id: f.room_id.is_some(),
            json,
        })
    }

    pub fn is_state(&self) -> bool {
        self.state_key.is_some()
    }

    /// The content as a JSON value.
    pub fn content_value(&self) -> Value {
        serde_json::from_str(self.content.get()).unwrap_or(Value::Object(Map::new()))
    }

    /// A string field of the content (e.g. `membership`).
    pub fn content_str(&self, field: &str) -> Option<String> {
        match self.content_value() {
            Value::Object(mut m) => match m.remove(field) {
                Some(Value::String(s)) => Some(s),
                _ => None,
            },
            _ => None,
        }
    }

    /// The event in the client format (`ClientEvent`), without `unsigned`.
    pub fn client_object(&self) -> Map<String, Value> {
        let mut out = Map::new();
        out.insert("event_id".into(), Value::String(self.event_id.to_string()));
        out.insert("room_id".into(), Value::String(self.room_id.to_string()));
        out.insert("sender".into(), Value::String(self.sender.to_string()));
        out.insert("type".into(), Value::String(self.kind.to_string()));
        out.insert(
            "origin_server_ts".into(),
            Value::from(u64::from(self.origin_server_ts.0)),
        );
        out.insert("content".into(), self.content_value());
        if let Some(sk) = &self.state_key {
            out.insert("state_key".into(), Value::String(sk.clone()));
        }
        if let Some(r) = &self.redacts {
            out.insert("redacts".into(), Value::String(r.to_string()));
        }
        out
    }

    /// The event in the client format with an `unsigned` block (age computed now).
    pub fn to_client(&self, mut unsigned: Map<String, Value>) -> Value {
        let mut obj = self.client_object();
        let now = MilliSecondsSinceUnixEpoch::now().0;
        let age = u64::from(now).saturating_sub(u64::from(self.origin_server_ts.0));
        unsigned.insert("age".into(), Value::from(age));
        obj.insert("unsigned".into(), Value::Object(unsigned));
        Value::Object(obj)
    }

    /// Stripped state form (for invites and knocks).
    pub fn to_stripped(&self) -> Value {
        serde_json::json!({
            "type": self.kind.to_string(),
            "state_key": self.state_key.clone().unwrap_or_default(),
            "sender": self.sender.to_string(),
            "content": self.content_value(),
        })
    }
}

impl ruma::state_res::Event for Pdu {
    type Id = OwnedEventId;

    fn event_id(&self) -> &Self::Id {
        &self.event_id
    }
    fn room_id(&self) -> Option<&RoomId> {
        self.has_room_id.then_some(&*self.room_id)
    }
    fn sender(&self) -> &UserId {
        &self.sender
    }
    fn origin_server_ts(&self) -> MilliSecondsSinceUnixEpoch {
        self.origin_server_ts
    }
    fn event_type(&self) -> &TimelineEventType {
        &self.kind
    }
    fn content(&self) -> &RawValue {
        &self.content
    }
    fn state_key(&self) -> Option<&str> {
        self.state_key.as_deref()
    }
    fn prev_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.prev_events.iter())
    }
    fn auth_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.auth_events.iter())
    }
    fn redacts(&self) -> Option<&Self::Id> {
        self.redacts.as_ref()
    }
    fn rejected(&self) -> bool {
        false
    }
}

/// The rules of a room version this server supports (6–12).
pub fn rules_for(version: &RoomVersionId) -> Result<RoomVersionRules> {
    if !SUPPORTED_ROOM_VERSIONS.contains(&version.as_str()) {
        return Err(Error::new(
            crate::ErrorKind::UnsupportedRoomVersion,
            format!("room version {version} is not supported"),
        ));
    }
    version
        .rules()
        .ok_or_else(|| Error::internal(format!("no rules for room version {version}")))
}

/// Room versions this server creates and joins (ruma's state resolution covers 6 and later).
pub const SUPPORTED_ROOM_VERSIONS: &[&str] = &["6", "7", "8", "9", "10", "11", "12"];
/// The room version of new rooms unless the client asks for another.
pub const DEFAULT_ROOM_VERSION: &str = "12";

/// Converts client-supplied JSON into canonical JSON: floats and integers outside ±(2^53−1) are
/// refused with `M_BAD_JSON`, as room versions 6+ require.
pub fn canonical_object(value: Value) -> Result<CanonicalJsonObject> {
    match CanonicalJsonValue::try_from(value) {
        Ok(CanonicalJsonValue::Object(o)) => Ok(o),
        Ok(_) => Err(Error::bad_json("content must be a JSON object")),
        Err(e) => Err(Error::bad_json(format!(
            "content is not canonical JSON: {e}"
        ))),
    }
}

/// Everything needed to create one new event; the room fills in the graph fields.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub kind: String,
    pub state_key: Option<String>,
    pub content: CanonicalJsonObject,
    /// For redactions: the event being redacted.
    pub redacts: Option<OwnedEventId>,
}

impl NewEvent {
    pub fn state(kind: &str, state_key: &str, content: Value) -> Result<Self> {
        Ok(NewEvent {
            kind: kind.to_owned(),
            state_key: Some(state_key.to_owned()),
            content: canonical_object(content)?,
            redacts: None,
        })
    }
    pub fn message(kind: &str, content: Value) -> Result<Self> {
        Ok(NewEvent {
            kind: kind.to_owned(),
            state_key: None,
            content: canonical_object(content)?,
            redacts: None,
        })
    }
}

/// The graph position and author of an event about to be signed.
pub struct EventFrame<'a> {
    pub room_id: &'a RoomId,
    pub version: &'a RoomVersionId,
    pub rules: &'a RoomVersionRules,
    pub sender: &'a UserId,
    pub prev_events: &'a [OwnedEventId],
    pub auth_events: &'a [OwnedEventId],
    pub depth: i64,
    pub origin_server_ts: MilliSecondsSinceUnixEpoch,
}

/// Builds, hashes and signs an event. For a v12 create event the room ID is derived from the
/// event ID, so `frame.room_id` is ignored and the returned [`Pdu`] carries the derived one.
pub fn build_pdu(
    ev: NewEvent,
    frame: &EventFrame<'_>,
    server_name: &str,
    key: &SigningKey,
) -> Result<Pdu> {
    let is_v12_create =
        ev.kind == "m.room.create" && frame.rules.authorization.room_create_event_id_as_room_id;
    let mut obj = CanonicalJsonObject::new();
    let ids = |v: &[OwnedEventId]| {
        CanonicalJsonValue::Array(
            v.iter()
                .map(|e| CanonicalJsonValue::String(e.to_string()))
                .collect(),
        )
    };
    obj.insert("auth_events".into(), ids(frame.auth_events));
    obj.insert("prev_events".into(), ids(frame.prev_events));
    let mut content = ev.content;
    if let Some(r) = &ev.redacts {
        // Room v11 moved `redacts` into the content; older versions keep it at the top level.
        if frame.rules.redaction.content_field_redacts {
            content.insert("redacts".into(), CanonicalJsonValue::String(r.to_string()));
        } else {
            obj.insert("redacts".into(), CanonicalJsonValue::String(r.to_string()));
        }
    }
    obj.insert("content".into(), CanonicalJsonValue::Object(content));
    obj.insert(
        "depth".into(),
        CanonicalJsonValue::Integer(frame.depth.try_into().unwrap_or_default()),
    );
    obj.insert(
        "origin_server_ts".into(),
        CanonicalJsonValue::Integer(frame.origin_server_ts.0.into()),
    );
    if !is_v12_create {
        obj.insert(
            "room_id".into(),
            CanonicalJsonValue::String(frame.room_id.to_string()),
        );
    }
    obj.insert(
        "sender".into(),
        CanonicalJsonValue::String(frame.sender.to_string()),
    );
    if let Some(sk) = &ev.state_key {
        obj.insert("state_key".into(), CanonicalJsonValue::String(sk.clone()));
    }
    obj.insert("type".into(), CanonicalJsonValue::String(ev.kind.clone()));

    ruma::signatures::hash_and_sign_event(server_name, &key.pair, &mut obj, &frame.rules.redaction)
        .map_err(|e| match e {
            ruma::signatures::JsonError::PduTooLarge => Error::too_large("event is too large"),
            e => Error::internal(format!("signing event: {e}")),
        })?;
    let hash = ruma::signatures::reference_hash(&obj, frame.rules).map_err(|e| match e {
        ruma::signatures::JsonError::PduTooLarge => Error::too_large("event is too large"),
        e => Error::internal(format!("hashing event: {e}")),
    })?;
    let event_id = EventId::parse(format!("${hash}"))
        .map_err(|e| Error::internal(format!("event id: {e}")))?;
    let room_id = if is_v12_create {
        RoomId::parse(format!("!{hash}")).map_err(|e| Error::internal(format!("room id: {e}")))?
    } else {
        frame.room_id.to_owned()
    };
    let json = serde_json::to_string(&obj)?;
    if json.len() > MAX_PDU_BYTES {
        return Err(Error::too_large("event is larger than 65536 bytes"));
    }
    Pdu::parse(event_id, room_id, RawValue::from_string(json)?, false)
}

/// The redacted form of an event's stored JSON, per its room version.
pub fn redact_json(json: &RawValue, rules: &RoomVersionRules) -> Result<Box<RawValue>> {
    let obj: CanonicalJsonObject = serde_json::from_str(json.get())?;
    let red = ruma::canonical_json::redact(obj, &rules.redaction, None)
        .map_err(|e| Error::internal(format!("redacting: {e}")))?;
    Ok(RawValue::from_string(serde_json::to_string(&red)?)?)
}

/// Adds `server`'s signature to an event someone else built (an invite we countersign, a
/// restricted join we authorise): like every event signature, it covers the redacted form
/// (spec § "Signing events"), so it verifies whatever happens to the content later.
pub fn countersign(
    obj: &mut CanonicalJsonObject,
    server: &str,
    key: &SigningKey,
    rules: &RoomVersionRules,
) -> Result<()> {
    let mut redacted = ruma::canonical_json::redact(obj.clone(), &rules.redaction, None)
        .map_err(|e| Error::bad_json(format!("the event cannot be redacted: {e}")))?;
    ruma::signatures::sign_json(server, &key.pair, &mut redacted)
        .map_err(|e| Error::internal(format!("signing: {e}")))?;
    let ours = match redacted.get("signatures") {
        Some(CanonicalJsonValue::Object(all)) => all.get(server).cloned(),
        _ => None,
    }
    .ok_or_else(|| Error::internal("signing left no signature"))?;
    match obj
        .entry("signatures".to_owned())
        .or_insert_with(|| CanonicalJsonValue::Object(CanonicalJsonObject::new()))
    {
        CanonicalJsonValue::Object(all) => {
            all.insert(server.to_owned(), ours);
            Ok(())
        }
        _ => Err(Error::bad_json("signatures is not an object")),
    }
}

/// Shared handle on a parsed event.
pub type PduRef = Arc<Pdu>;

#[cfg(test)]
mod tests {
    use super::*;
    use ruma::signatures::{verify_event, PublicKeyMap, Verified};
    use std::collections::BTreeMap;

    fn key() -> SigningKey {
        let dir = std::env::temp_dir().join(format!("myelin-pdu-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let k = SigningKey::load_or_generate(&dir.join("k")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        k
    }

    #[test]
    fn countersignatures_cover_the_redacted_event() {
        let (origin, other) = (key(), key());
        let rules = rules_for(&RoomVersionId::V11).unwrap();
        let mut obj = canonical_object(serde_json::json!({
            "type": "m.room.member",
            "room_id": "!r:origin.example",
            "sender": "@a:origin.example",
            "state_key": "@b:other.example",
            "content": {"membership": "invite", "reason": "hi"},
            "origin_server_ts": 1,
            "depth": 3,
            "prev_events": [],
            "auth_events": [],
        }))
        .unwrap();
        ruma::signatures::hash_and_sign_event(
            "origin.example",
            &origin.pair,
            &mut obj,
            &rules.redaction,
        )
        .unwrap();
        countersign(&mut obj, "other.example", &other, &rules).unwrap();
        let keys = |k: &SigningKey| {
            BTreeMap::from([(
                format!("ed25519:{}", k.pair.version()),
                ruma::serde::Base64::new(k.pair.public_key().to_vec()),
            )])
        };
        let map: PublicKeyMap = BTreeMap::from([
            ("origin.example".to_owned(), keys(&origin)),
            ("other.example".to_owned(), keys(&other)),
        ]);
        // Both signatures verify over the redacted event.
        for server in ["origin.example", "other.example"] {
            let mut redacted =
                ruma::canonical_json::redact(obj.clone(), &rules.redaction, None).unwrap();
            if let Some(CanonicalJsonValue::Object(sigs)) = redacted.get_mut("signatures") {
                sigs.retain(|s, _| s == server);
            }
            ruma::signatures::verify_json(&map, &redacted).unwrap();
        }
        assert!(matches!(
            verify_event(&map, &obj, &rules),
            Ok(Verified::All)
        ));
    }

    #[test]
    fn built_events_verify_and_hash_to_their_id() {
        let key = key();
        let version = RoomVersionId::V12;
        let rules = version.rules().unwrap();
        let sender = ruma::user_id!("@alice:example.org");
        let frame = EventFrame {
            room_id: ruma::room_id!("!placeholder:example.org"),
            version: &version,
            rules: &rules,
            sender,
            prev_events: &[],
            auth_events: &[],
            depth: 1,
            origin_server_ts: MilliSecondsSinceUnixEpoch::now(),
        };
        let create = NewEvent::state(
            "m.room.create",
            "",
            serde_json::json!({"room_version": "12"}),
        )
        .unwrap();
        let pdu = build_pdu(create, &frame, "example.org", &key).unwrap();
        // v12: the room ID is the create event's reference hash.
        assert_eq!(&pdu.room_id.as_str()[1..], &pdu.event_id.as_str()[1..]);
        let obj: CanonicalJsonObject = serde_json::from_str(pdu.json.get()).unwrap();
        assert!(!obj.contains_key("room_id"));
        let mut keys = BTreeMap::new();
        keys.insert(
            key.key_id(),
            ruma::serde::Base64::new(key.pair.public_key().to_vec()),
        );
        let mut map = PublicKeyMap::new();
        map.insert("example.org".to_owned(), keys);
        assert_eq!(verify_event(&map, &obj, &rules).unwrap(), Verified::All);
    }

    #[test]
    fn floats_and_huge_integers_are_bad_json() {
        assert!(canonical_object(serde_json::json!({"n": 1.5})).is_err());
        assert!(canonical_object(serde_json::json!({"n": 9007199254740992u64})).is_err());
        assert!(canonical_object(serde_json::json!({"n": 9007199254740991u64})).is_ok());
    }
}

/// The spec's cryptographic test vectors (`appendices.md` § "Cryptographic Test Vectors").
#[cfg(test)]
mod spec_vectors {
    use base64::{
        alphabet,
        engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig},
        Engine,
    };
    use ruma::{canonical_json::CanonicalJsonObject, signatures::Ed25519KeyPair};

    fn key() -> Ed25519KeyPair {
        // The spec's seed has non-zero trailing bits, which a lenient decoder accepts.
        let lenient = GeneralPurpose::new(
            &alphabet::STANDARD,
            GeneralPurposeConfig::new()
                .with_decode_allow_trailing_bits(true)
                .with_decode_padding_mode(DecodePaddingMode::Indifferent),
        );
        let seed = lenient
            .decode("YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1")
            .unwrap();
        // PKCS#8 v1 wrapping of an ed25519 seed.
        let mut der = hex_prefix();
        der.extend_from_slice(&seed);
        Ed25519KeyPair::from_der(&der, "1".to_owned()).unwrap()
    }

    fn hex_prefix() -> Vec<u8> {
        vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ]
    }

    fn obj(v: serde_json::Value) -> CanonicalJsonObject {
        serde_json::from_value(v).unwrap()
    }

    fn sig(o: &CanonicalJsonObject) -> String {
        o["signatures"].as_object().unwrap()["domain"]
            .as_object()
            .unwrap()["ed25519:1"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    #[test]
    fn json_signing() {
        let mut empty = obj(serde_json::json!({}));
        ruma::signatures::sign_json("domain", &key(), &mut empty).unwrap();
        assert_eq!(
            sig(&empty),
            "K8280/U9SSy9IVtjBuVeLr+HpOB4BQFWbg+UZaADMtTdGYI7Geitb76LTrr5QV/7Xg4ahLwYGYZzuHGZKM5ZAQ"
        );
        let mut data = obj(serde_json::json!({"one": 1, "two": "Two"}));
        ruma::signatures::sign_json("domain", &key(), &mut data).unwrap();
        assert_eq!(
            sig(&data),
            "KqmLSbO39/Bzb0QIYE82zqLwsA+PDzYIpIRA2sRQ4sL53+sN6/fpNSoqE7BP7vBZhG6kYdD13EIMJpvhJI+6Bw"
        );
    }

    #[test]
    fn canonical_json_ordering_and_escaping() {
        let v = obj(serde_json::json!({"b": "2", "a": {"d": 1, "c": "é\u{1}"}}));
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            "{\"a\":{\"c\":\"é\\u0001\",\"d\":1},\"b\":\"2\"}"
        );
    }

    #[test]
    fn event_signing() {
        let rules = ruma::RoomVersionId::V1.rules().unwrap();
        let mut ev = obj(serde_json::json!({
            "room_id": "!x:domain", "sender": "@a:domain", "origin": "domain",
            "origin_server_ts": 1000000, "signatures": {}, "hashes": {}, "type": "X",
            "content": {}, "prev_events": [], "auth_events": [], "depth": 3,
            "unsigned": {"age_ts": 1000000}
        }));
        ruma::signatures::hash_and_sign_event("domain", &key(), &mut ev, &rules.redaction).unwrap();
        assert_eq!(
            ev["hashes"].as_object().unwrap()["sha256"]
                .as_str()
                .unwrap(),
            "5jM4wQpv6lnBo7CLIghJuHdW+s2CMBJPUOGOC89ncos"
        );
        assert_eq!(
            sig(&ev),
            "KxwGjPSDEtvnFgU00fwFz+l6d2pJM6XBIaMEn81SXPTRl16AqLAYqfIReFGZlHi5KLjAWbOoMszkwsQma+lYAg"
        );
        let mut msg = obj(serde_json::json!({
            "content": {"body": "Here is the message content"}, "event_id": "$0:domain",
            "origin": "domain", "origin_server_ts": 1000000, "type": "m.room.message",
            "room_id": "!r:domain", "sender": "@u:domain", "signatures": {},
            "unsigned": {"age_ts": 1000000}
        }));
        ruma::signatures::hash_and_sign_event("domain", &key(), &mut msg, &rules.redaction)
            .unwrap();
        assert_eq!(
            msg["hashes"].as_object().unwrap()["sha256"]
                .as_str()
                .unwrap(),
            "onLKD1bGljeBWQhWZ1kaP9SorVmRQNdN5aM2JYU2n/g"
        );
        assert_eq!(
            sig(&msg),
            "Wm+VzmOUOz08Ds+0NTWb1d4CZrVsJSikkeRxh6aCcUwu6pNC78FunoD7KNWzqFn241eYHYMGCA5McEiVPdhzBA"
        );
    }
}
