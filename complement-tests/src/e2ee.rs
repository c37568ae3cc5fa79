//! End-to-end-encryption key material for the black-box tests and `e2ee-bench`: real ed25519
//! key pairs, and the signed objects a client uploads with them (device keys, one-time and
//! fallback keys, cross-signing keys, signatures of other keys).
//!
//! Signing follows the spec's "Signing JSON": the signature covers the canonical JSON of the
//! object without its `signatures` and `unsigned` members, and is stored under
//! `signatures.<user id>.<key id>` as unpadded base64. The objects are plain
//! [`serde_json::Value`]s so that a test can tamper with them before sending.
//!
//! Curve25519 keys are not used for any cryptography here (the server never checks them), so
//! a device's "curve25519" key and its one-time keys are just 32 random bytes (the public half
//! of a throwaway ed25519 key pair), base64-encoded.

use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{anyhow, Context};
use myelin_core::ruma::{
    canonical_json::CanonicalJsonObject,
    serde::{base64::Standard, Base64},
    signatures::{
        to_canonical_json_string_for_signing, verify_canonical_json_bytes, Ed25519KeyPair, KeyPair,
    },
    SigningKeyAlgorithm,
};
use serde_json::{json, Map, Value};

use crate::client::Client;

/// The one-time-key algorithm every client uses.
pub const SIGNED_CURVE25519: &str = "signed_curve25519";

/// The algorithms a device says it supports.
pub const ALGORITHMS: [&str; 2] = ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"];

/// Unpadded standard base64, the spec's encoding of keys and signatures.
pub fn b64(bytes: &[u8]) -> String {
    Base64::<Standard, &[u8]>::new(bytes).encode()
}

/// 32 random bytes, base64: stands in for a curve25519 public key.
pub fn random_key() -> String {
    SigningKey::generate(Some("x")).public
}

/// The canonical JSON the spec signs: `value` without `signatures` and `unsigned`.
pub fn canonical_for_signing(value: &Value) -> anyhow::Result<String> {
    let object: CanonicalJsonObject =
        serde_json::from_value(value.clone()).context("not a canonical JSON object")?;
    to_canonical_json_string_for_signing(&object).map_err(|e| anyhow!("canonical JSON: {e}"))
}

/// An ed25519 signing key pair and its key ID.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    /// The public key, unpadded base64.
    pub public: String,
    /// `ed25519:<name>`: the device ID for a device key, the public key for a cross-signing
    /// key.
    pub key_id: String,
}

impl SigningKey {
    /// A fresh key pair named `name` (its key ID is `ed25519:<name>`), or, with `None`, named
    /// after its own public key as cross-signing keys are.
    pub fn generate(name: Option<&str>) -> SigningKey {
        let der = Ed25519KeyPair::generate();
        let probe = Ed25519KeyPair::from_der(&der, "probe".to_owned()).expect("a fresh key parses");
        let public = b64(&probe.public_key());
        let name = name.map_or_else(|| public.clone(), str::to_owned);
        let pair = Ed25519KeyPair::from_der(&der, name.clone()).expect("a fresh key parses");
        SigningKey {
            pair,
            public,
            key_id: format!("ed25519:{name}"),
        }
    }

    /// The signature of `value`'s canonical JSON, unpadded base64.
    pub fn signature_of(&self, value: &Value) -> String {
        let canonical = canonical_for_signing(value).expect("a signable object");
        self.pair.sign(canonical.as_bytes()).base64()
    }

    /// Adds this key's signature of `value` under `signatures.<signer>.<key id>` (keeping any
    /// other signatures) and returns `value`.
    pub fn sign(&self, signer: &str, mut value: Value) -> Value {
        let signature = self.signature_of(&value);
        insert_signature(&mut value, signer, &self.key_id, signature);
        value
    }
}

/// Sets `signatures.<signer>.<key_id>` of the object `value` to `signature`.
pub fn insert_signature(value: &mut Value, signer: &str, key_id: &str, signature: String) {
    let object = value.as_object_mut().expect("signing an object");
    let signatures = object
        .entry("signatures")
        .or_insert_with(|| Value::Object(Map::new()));
    if !signatures.is_object() {
        *signatures = Value::Object(Map::new());
    }
    let by_signer = signatures
        .as_object_mut()
        .expect("an object")
        .entry(signer)
        .or_insert_with(|| Value::Object(Map::new()));
    by_signer
        .as_object_mut()
        .expect("signatures of one signer are an object")
        .insert(key_id.to_owned(), Value::String(signature));
}

/// Whether `value` carries a valid signature `signatures.<signer>.<key_id>` by the ed25519
/// public key `public` (unpadded base64).
pub fn verify(value: &Value, signer: &str, key_id: &str, public: &str) -> bool {
    let Some(signature) = value["signatures"][signer][key_id].as_str() else {
        return false;
    };
    let (Ok(signature), Ok(public), Ok(canonical)) = (
        Base64::<Standard>::parse(signature),
        Base64::<Standard>::parse(public),
        canonical_for_signing(value),
    ) else {
        return false;
    };
    verify_canonical_json_bytes(
        &SigningKeyAlgorithm::Ed25519,
        public.as_bytes(),
        signature.as_bytes(),
        canonical.as_bytes(),
    )
    .is_ok()
}

/// One device's keys: its ed25519 identity (signing) key, its curve25519 identity key, and a
/// counter for naming one-time keys.
pub struct DeviceKeys {
    pub user_id: String,
    pub device_id: String,
    pub ed25519: SigningKey,
    pub curve25519: String,
    next_key: AtomicUsize,
}

impl DeviceKeys {
    /// Fresh keys for `device_id` of `user_id`.
    pub fn new(user_id: &str, device_id: &str) -> DeviceKeys {
        DeviceKeys {
            user_id: user_id.to_owned(),
            device_id: device_id.to_owned(),
            ed25519: SigningKey::generate(Some(device_id)),
            curve25519: random_key(),
            next_key: AtomicUsize::new(0),
        }
    }

    /// Fresh keys for the session's device.
    pub fn of(client: &Client) -> DeviceKeys {
        DeviceKeys::new(&client.user_id, &client.device_id)
    }

    /// The `device_keys` object without signatures.
    pub fn unsigned_device_keys(&self) -> Value {
        json!({
            "user_id": self.user_id,
            "device_id": self.device_id,
            "algorithms": ALGORITHMS,
            "keys": {
                format!("ed25519:{}", self.device_id): self.ed25519.public,
                format!("curve25519:{}", self.device_id): self.curve25519,
            },
        })
    }

    /// The `device_keys` object of `/keys/upload`, self-signed.
    pub fn device_keys(&self) -> Value {
        self.ed25519
            .sign(&self.user_id, self.unsigned_device_keys())
    }

    /// Signs any object with the device's ed25519 key, as the user.
    pub fn sign(&self, value: Value) -> Value {
        self.ed25519.sign(&self.user_id, value)
    }

    /// A fresh key ID (`AAAAAA`, `AAAAAB`, ... with a per-device counter).
    fn fresh_key_id(&self) -> String {
        let n = self.next_key.fetch_add(1, Ordering::Relaxed);
        format!("AAAA{n:06}")
    }

    /// One signed curve25519 key object `{key, signatures}` (plus `fallback: true` for a
    /// fallback key).
    pub fn signed_key(&self, fallback: bool) -> Value {
        let mut key = json!({"key": random_key()});
        if fallback {
            key["fallback"] = Value::Bool(true);
        }
        self.sign(key)
    }

    /// `n` fresh signed one-time keys: `{"signed_curve25519:<id>": {key, signatures}}`.
    pub fn one_time_keys(&self, n: usize) -> Value {
        let mut keys = Map::new();
        for _ in 0..n {
            keys.insert(
                format!("{SIGNED_CURVE25519}:{}", self.fresh_key_id()),
                self.signed_key(false),
            );
        }
        Value::Object(keys)
    }

    /// A fresh signed fallback key: `{"signed_curve25519:<id>": {key, fallback, signatures}}`.
    pub fn fallback_keys(&self) -> Value {
        json!({
            format!("{SIGNED_CURVE25519}:{}", self.fresh_key_id()): self.signed_key(true),
        })
    }

    /// `/keys/upload` with the device keys and `otks` fresh one-time keys.
    pub fn upload_body(&self, otks: usize) -> Value {
        let mut body = json!({"device_keys": self.device_keys()});
        if otks > 0 {
            body["one_time_keys"] = self.one_time_keys(otks);
        }
        body
    }
}

/// A user's three cross-signing keys.
pub struct CrossSigningKeys {
    pub user_id: String,
    pub master: SigningKey,
    pub self_signing: SigningKey,
    pub user_signing: SigningKey,
}

impl CrossSigningKeys {
    /// Fresh keys for `user_id`.
    pub fn new(user_id: &str) -> CrossSigningKeys {
        CrossSigningKeys {
            user_id: user_id.to_owned(),
            master: SigningKey::generate(None),
            self_signing: SigningKey::generate(None),
            user_signing: SigningKey::generate(None),
        }
    }

    fn key_object(&self, usage: &str, key: &SigningKey) -> Value {
        json!({
            "user_id": self.user_id,
            "usage": [usage],
            "keys": {key.key_id.clone(): key.public},
        })
    }

    /// The master key object (unsigned: nothing needs to sign it).
    pub fn master_key(&self) -> Value {
        self.key_object("master", &self.master)
    }

    /// The self-signing key, signed by the master key.
    pub fn self_signing_key(&self) -> Value {
        self.master.sign(
            &self.user_id,
            self.key_object("self_signing", &self.self_signing),
        )
    }

    /// The user-signing key, signed by the master key.
    pub fn user_signing_key(&self) -> Value {
        self.master.sign(
            &self.user_id,
            self.key_object("user_signing", &self.user_signing),
        )
    }

    /// `/keys/device_signing/upload` with all three keys.
    pub fn upload_body(&self) -> Value {
        json!({
            "master_key": self.master_key(),
            "self_signing_key": self.self_signing_key(),
            "user_signing_key": self.user_signing_key(),
        })
    }

    /// `device_keys` as returned by the server (any `signatures`/`unsigned` it had are
    /// dropped), signed by this user's self-signing key: the object `/keys/signatures/upload`
    /// takes for a device.
    pub fn sign_device(&self, device_keys: &Value) -> Value {
        self.self_signing
            .sign(&self.user_id, strip_signatures(device_keys))
    }

    /// Another user's master key, signed by this user's user-signing key.
    pub fn sign_user(&self, other_master_key: &Value) -> Value {
        self.user_signing
            .sign(&self.user_id, strip_signatures(other_master_key))
    }
}

/// `value` without `signatures` and `unsigned`.
pub fn strip_signatures(value: &Value) -> Value {
    let mut value = value.clone();
    if let Some(object) = value.as_object_mut() {
        object.remove("signatures");
        object.remove("unsigned");
    }
    value
}
