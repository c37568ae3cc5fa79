//! End-to-end encryption, Client-Server side: `/keys/upload`, `/keys/query`, `/keys/claim`,
//! `/keys/changes`, cross-signing (`/keys/device_signing/upload`, `/keys/signatures/upload`),
//! `/sendToDevice`, and what `/sync` carries for them (`to_device`, `device_lists`,
//! `device_one_time_keys_count`, `device_unused_fallback_key_types`).
//!
//! Every key here is real: each test device has an ed25519 key pair and signs its uploads
//! ([`complement_tests::e2ee`]), so the server's signature checks are exercised on objects a
//! real client would send, and on precisely broken ones.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use complement_tests::client::success;
use complement_tests::e2ee::{
    insert_signature, random_key, strip_signatures, verify, CrossSigningKeys, DeviceKeys,
    SigningKey, SIGNED_CURVE25519,
};
use complement_tests::{assert_error, backend_tests, enc, ok, unique_txn_id, Client, TestServer};
use reqwest::Method;
use serde_json::{json, Value};

const PASSWORD: &str = "e2ee-password";
/// How long a test waits for an effect to show in `/sync`.
const WITHIN: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn next_batch(sync: &Value) -> String {
    sync["next_batch"]
        .as_str()
        .unwrap_or_else(|| panic!("sync without next_batch: {sync}"))
        .to_owned()
}

/// `POST /keys/upload`, requiring 200.
async fn upload(client: &Client, body: &Value) -> anyhow::Result<Value> {
    success(client.post("/keys/upload", body).await?, "keys/upload")
}

/// The `signed_curve25519` count of an upload answer; it must be present.
fn otk_count(answer: &Value) -> u64 {
    answer["one_time_key_counts"][SIGNED_CURVE25519]
        .as_u64()
        .unwrap_or_else(|| {
            panic!("one_time_key_counts lacks a {SIGNED_CURVE25519} number: {answer}")
        })
}

/// The device's current `signed_curve25519` count, asked with an empty upload.
async fn current_otk_count(client: &Client) -> anyhow::Result<u64> {
    Ok(otk_count(&upload(client, &json!({})).await?))
}

/// `POST /keys/query` for all devices of `users`, requiring 200.
async fn query(client: &Client, users: &[impl AsRef<str>]) -> anyhow::Result<Value> {
    let device_keys: serde_json::Map<String, Value> = users
        .iter()
        .map(|u| (u.as_ref().to_owned(), json!([])))
        .collect();
    success(
        client
            .post("/keys/query", &json!({"device_keys": device_keys}))
            .await?,
        "keys/query",
    )
}

/// The device IDs `/keys/query` lists for `user`.
fn queried_devices(answer: &Value, user: &str) -> BTreeSet<String> {
    answer["device_keys"][user]
        .as_object()
        .map(|devices| devices.keys().cloned().collect())
        .unwrap_or_default()
}

/// `POST /keys/claim` of one `signed_curve25519` key of each `(user, device)`, requiring 200.
async fn claim<U: AsRef<str>, D: AsRef<str>>(
    client: &Client,
    targets: &[(U, D)],
) -> anyhow::Result<Value> {
    let mut wanted: BTreeMap<String, serde_json::Map<String, Value>> = BTreeMap::new();
    for (user, device) in targets {
        wanted
            .entry(user.as_ref().to_owned())
            .or_default()
            .insert(device.as_ref().to_owned(), json!(SIGNED_CURVE25519));
    }
    success(
        client
            .post("/keys/claim", &json!({"one_time_keys": wanted}))
            .await?,
        "keys/claim",
    )
}

/// The single `(key id, key object)` a claim answer holds for `user`'s `device`, if any.
fn claimed(answer: &Value, user: &str, device: &str) -> Option<(String, Value)> {
    let keys = answer["one_time_keys"][user][device].as_object()?;
    assert!(
        keys.len() <= 1,
        "one key per device and algorithm, got {}",
        answer
    );
    keys.iter()
        .next()
        .map(|(id, key)| (id.clone(), key.clone()))
}

/// `device_one_time_keys_count.signed_curve25519` of a sync (servers may omit a zero count).
fn sync_otk_count(sync: &Value) -> u64 {
    sync["device_one_time_keys_count"][SIGNED_CURVE25519]
        .as_u64()
        .unwrap_or(0)
}

/// `device_unused_fallback_key_types`, which the spec requires in every sync.
fn unused_fallback_types(sync: &Value) -> Vec<String> {
    sync["device_unused_fallback_key_types"]
        .as_array()
        .unwrap_or_else(|| panic!("sync lacks device_unused_fallback_key_types: {sync}"))
        .iter()
        .map(|t| t.as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The `to_device.events` of a sync.
fn to_device_events(sync: &Value) -> Vec<Value> {
    sync["to_device"]["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn device_list<'a>(sync: &'a Value, key: &str) -> impl Iterator<Item = String> + 'a {
    sync["device_lists"][key]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|u| u.as_str().map(str::to_owned))
}

/// What a run of incremental syncs carried, and the token after the last one.
#[derive(Default, Debug)]
struct Seen {
    changed: BTreeSet<String>,
    left: BTreeSet<String>,
    to_device: Vec<Value>,
    next_batch: String,
}

/// Incremental syncs (long-polls of at most a second) from `since`, each from the previous
/// one's `next_batch`, accumulating device-list changes and to-device events until `done`
/// accepts the accumulation (or fails after [`WITHIN`]).
async fn sync_collect(
    client: &Client,
    since: &str,
    mut done: impl FnMut(&Seen) -> bool,
) -> anyhow::Result<Seen> {
    let deadline = Instant::now() + WITHIN;
    let mut seen = Seen {
        next_batch: since.to_owned(),
        ..Seen::default()
    };
    loop {
        let sync = client
            .sync(Some(&seen.next_batch), Some(1000), None)
            .await?;
        seen.changed.extend(device_list(&sync, "changed"));
        seen.left.extend(device_list(&sync, "left"));
        seen.to_device.extend(to_device_events(&sync));
        seen.next_batch = next_batch(&sync);
        if done(&seen) {
            return Ok(seen);
        }
        if Instant::now() > deadline {
            bail!(
                "{}: condition not met within {WITHIN:?}; seen so far {seen:?}",
                client.user_id
            );
        }
    }
}

/// `PUT /sendToDevice/{type}/{txn}`.
async fn send_to_device(
    client: &Client,
    event_type: &str,
    txn_id: &str,
    messages: &Value,
) -> anyhow::Result<complement_tests::Response> {
    client
        .put(
            &format!("/sendToDevice/{}/{}", enc(event_type), enc(txn_id)),
            &json!({"messages": messages}),
        )
        .await
}

/// [`send_to_device`] with a fresh transaction ID, requiring 200 and `{}`.
async fn send_to_device_ok(
    client: &Client,
    event_type: &str,
    messages: &Value,
) -> anyhow::Result<()> {
    let answer = send_to_device(client, event_type, &unique_txn_id(), messages).await?;
    let body = success(answer, "sendToDevice")?;
    assert_eq!(body, json!({}), "sendToDevice answers an empty object");
    Ok(())
}

/// Creates a public room with `m.room.encryption` in its initial state.
async fn encrypted_room(creator: &Client) -> anyhow::Result<String> {
    creator
        .create_room(&json!({
            "preset": "public_chat",
            "initial_state": [{
                "type": "m.room.encryption",
                "state_key": "",
                "content": {"algorithm": "m.megolm.v1.aes-sha2"},
            }],
        }))
        .await
}

/// The current `next_batch` of a client (a sync without waiting).
async fn token(client: &Client) -> anyhow::Result<String> {
    Ok(next_batch(&client.sync(None, Some(0), None).await?))
}

/// The test key material itself (no server): signatures verify, and tampering, another key
/// or another signer breaks them; `unsigned` and other signatures are not covered.
#[test]
fn key_material_signs_and_verifies() {
    let keys = DeviceKeys::new("@alice:example.org", "DEVICE");
    let signed = keys.device_keys();
    let (me, key_id, public) = (
        "@alice:example.org",
        "ed25519:DEVICE",
        keys.ed25519.public.clone(),
    );
    assert!(verify(&signed, me, key_id, &public));
    let mut with_unsigned = signed.clone();
    with_unsigned["unsigned"] = json!({"device_display_name": "x"});
    insert_signature(
        &mut with_unsigned,
        "@bob:example.org",
        "ed25519:B",
        "sig".into(),
    );
    assert!(verify(&with_unsigned, me, key_id, &public));
    let mut tampered = signed.clone();
    tampered["algorithms"] = json!(["m.megolm.v1.aes-sha2"]);
    assert!(!verify(&tampered, me, key_id, &public));
    assert!(!verify(&signed, "@bob:example.org", key_id, &public));
    assert!(!verify(
        &signed,
        me,
        key_id,
        &SigningKey::generate(None).public
    ));
    let xs = CrossSigningKeys::new(me);
    assert_eq!(xs.master.key_id, format!("ed25519:{}", xs.master.public));
    assert!(verify(
        &xs.self_signing_key(),
        me,
        &xs.master.key_id,
        &xs.master.public
    ));
    assert!(verify(
        &xs.sign_device(&signed),
        me,
        &xs.self_signing.key_id,
        &xs.self_signing.public
    ));
    assert!(
        xs.sign_device(&signed)["signatures"][me][key_id].is_null(),
        "sign_device starts from the unsigned object"
    );
    let otks = keys.one_time_keys(3);
    assert_eq!(otks.as_object().map(|m| m.len()), Some(3));
    for key in otks.as_object().into_iter().flatten().map(|(_, k)| k) {
        assert!(verify(key, me, key_id, &public));
    }
}

// ---------------------------------------------------------------------------------------------
// /keys/upload and /keys/query
// ---------------------------------------------------------------------------------------------

/// Device keys and one-time keys upload; the counts answer; `/keys/query` shows the keys to
/// another user exactly as signed, with the device's display name under `unsigned`; devices
/// without keys are not listed; sync reports the one-time key count.
async fn upload_and_query_device_keys(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", PASSWORD).await?;
    let bob = server.register("bob", PASSWORD).await?;
    let phone = server.login("alice", PASSWORD, Some("PHONE")).await?;
    let keys = DeviceKeys::of(&alice);

    // No keys yet: the count is there, and zero.
    assert_eq!(current_otk_count(&alice).await?, 0);

    let answer = upload(&alice, &keys.upload_body(5)).await?;
    assert_eq!(otk_count(&answer), 5, "{answer}");
    let answer = upload(&alice, &json!({"one_time_keys": keys.one_time_keys(3)})).await?;
    assert_eq!(otk_count(&answer), 8, "{answer}");
    // Re-uploading identical device keys is fine.
    let answer = upload(&alice, &json!({"device_keys": keys.device_keys()})).await?;
    assert_eq!(otk_count(&answer), 8, "{answer}");

    let seen = query(&bob, &[&alice.user_id]).await?;
    assert_eq!(
        queried_devices(&seen, &alice.user_id),
        BTreeSet::from([alice.device_id.clone()]),
        "only the device with keys is listed (not PHONE): {seen}"
    );
    let device = &seen["device_keys"][&alice.user_id][&alice.device_id];
    assert_eq!(
        strip_signatures(device),
        keys.unsigned_device_keys(),
        "the keys as uploaded: {device}"
    );
    assert!(
        verify(
            device,
            &alice.user_id,
            &keys.ed25519.key_id,
            &keys.ed25519.public
        ),
        "the device's own signature survives: {device}"
    );
    assert_eq!(
        device["unsigned"]["device_display_name"], "complement-tests",
        "unsigned.device_display_name is the device's name: {device}"
    );

    // A rename shows in the next query.
    ok(alice
        .put(
            &format!("/devices/{}", enc(&alice.device_id)),
            &json!({"display_name": "Alice's laptop"}),
        )
        .await?);
    let seen = query(&bob, &[&alice.user_id]).await?;
    assert_eq!(
        seen["device_keys"][&alice.user_id][&alice.device_id]["unsigned"]["device_display_name"],
        "Alice's laptop"
    );

    // PHONE uploads too; now both are listed, and a query can name one device.
    let phone_keys = DeviceKeys::of(&phone);
    let answer = upload(&phone, &phone_keys.upload_body(0)).await?;
    assert_eq!(otk_count(&answer), 0, "counts are per device: {answer}");
    let seen = query(&bob, &[&alice.user_id]).await?;
    assert_eq!(
        queried_devices(&seen, &alice.user_id),
        BTreeSet::from([alice.device_id.clone(), "PHONE".to_owned()])
    );
    let one = success(
        bob.post(
            "/keys/query",
            &json!({"device_keys": {&alice.user_id: ["PHONE"]}, "timeout": 10000}),
        )
        .await?,
        "keys/query of one device",
    )?;
    assert_eq!(
        queried_devices(&one, &alice.user_id),
        BTreeSet::from(["PHONE".to_owned()]),
        "{one}"
    );
    let none = success(
        bob.post(
            "/keys/query",
            &json!({"device_keys": {&alice.user_id: ["NOSUCHDEVICE"]}}),
        )
        .await?,
        "keys/query of an unknown device",
    )?;
    assert!(queried_devices(&none, &alice.user_id).is_empty(), "{none}");

    // Bob has no keys: no devices of his.
    let seen = query(&alice, &[&bob.user_id]).await?;
    assert!(queried_devices(&seen, &bob.user_id).is_empty(), "{seen}");

    // Sync tells alice's device its count, PHONE its own.
    let sync = alice.sync(None, Some(0), None).await?;
    assert_eq!(
        sync_otk_count(&sync),
        8,
        "{}",
        sync["device_one_time_keys_count"]
    );
    let sync = phone.sync(None, Some(0), None).await?;
    assert_eq!(sync_otk_count(&sync), 0);

    // Unauthenticated upload is refused.
    assert_error(
        &server.anonymous().post("/keys/upload", &json!({})).await?,
        401,
        "M_MISSING_TOKEN",
    );
    Ok(())
}

/// A device-key upload that is wrong in any way is refused with the contract's error code and
/// stores nothing at all: not its device keys, not the one-time or fallback keys that came
/// with it.
async fn bad_uploads_store_nothing(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", PASSWORD).await?;
    let bob = server.register("bob", PASSWORD).await?;
    let keys = DeviceKeys::of(&alice);
    let me = alice.user_id.clone();
    let dev = alice.device_id.clone();
    let ed_id = keys.ed25519.key_id.clone();

    // Each case: (what, device_keys, expected errcode).
    let mut cases: Vec<(String, Value, &str)> = Vec::new();

    // The wrong user or device, otherwise well signed (under both user IDs).
    let mut other_user = keys.unsigned_device_keys();
    other_user["user_id"] = json!(bob.user_id);
    let other_user = keys.ed25519.sign(&bob.user_id, keys.sign(other_user));
    cases.push((
        "another user's user_id".to_owned(),
        other_user,
        "M_INVALID_PARAM",
    ));
    let other_device = DeviceKeys::new(&me, "NOTMYDEVICE").device_keys();
    cases.push((
        "another device's device_id".to_owned(),
        other_device,
        "M_INVALID_PARAM",
    ));

    // Bad signatures.
    let mut tampered = keys.device_keys();
    tampered["keys"][format!("curve25519:{dev}")] = json!(random_key());
    cases.push((
        "signed, then a key changed".to_owned(),
        tampered,
        "M_INVALID_SIGNATURE",
    ));
    let impostor = SigningKey::generate(Some(&dev));
    let mut wrong_signer = keys.unsigned_device_keys();
    insert_signature(
        &mut wrong_signer,
        &me,
        &ed_id,
        impostor.signature_of(&keys.unsigned_device_keys()),
    );
    cases.push((
        "signed by another key".to_owned(),
        wrong_signer,
        "M_INVALID_SIGNATURE",
    ));
    let mut garbage = keys.unsigned_device_keys();
    insert_signature(
        &mut garbage,
        &me,
        &ed_id,
        "!!not base64 at all!!".to_owned(),
    );
    cases.push((
        "a signature that is not base64".to_owned(),
        garbage,
        "M_INVALID_SIGNATURE",
    ));
    let mut zeros = keys.unsigned_device_keys();
    insert_signature(
        &mut zeros,
        &me,
        &ed_id,
        complement_tests::e2ee::b64(&[0u8; 64]),
    );
    cases.push((
        "64 zero bytes as signature".to_owned(),
        zeros,
        "M_INVALID_SIGNATURE",
    ));
    let mut empty_sigs = keys.unsigned_device_keys();
    empty_sigs["signatures"] = json!({});
    cases.push((
        "no signatures at all".to_owned(),
        empty_sigs,
        "M_INVALID_SIGNATURE",
    ));
    let mut no_own_key = keys.unsigned_device_keys();
    no_own_key["signatures"] = json!({&me: {}});
    cases.push((
        "no signature by its key".to_owned(),
        no_own_key,
        "M_INVALID_SIGNATURE",
    ));
    let other_key_id = keys.ed25519.sign(&me, keys.unsigned_device_keys());
    let sig = other_key_id["signatures"][&me][&ed_id].clone();
    let mut other_key_id = keys.unsigned_device_keys();
    other_key_id["signatures"] = json!({&me: {"ed25519:SOMEOTHERKEY": sig}});
    cases.push((
        "its signature filed under another key ID".to_owned(),
        other_key_id,
        "M_INVALID_SIGNATURE",
    ));
    let mut under_bob = keys.unsigned_device_keys();
    under_bob = keys.ed25519.sign(&bob.user_id, under_bob);
    cases.push((
        "its signature filed under another user".to_owned(),
        under_bob,
        "M_INVALID_SIGNATURE",
    ));

    // Malformed JSON.
    let mut sig_string = keys.device_keys();
    sig_string["signatures"] = json!("signed, honestly");
    cases.push(("signatures a string".to_owned(), sig_string, "M_BAD_JSON"));
    let mut sig_array = keys.device_keys();
    sig_array["signatures"] = json!([1, 2]);
    cases.push(("signatures an array".to_owned(), sig_array, "M_BAD_JSON"));
    for field in ["user_id", "device_id", "algorithms", "keys"] {
        let mut missing = keys.unsigned_device_keys();
        missing.as_object_mut().expect("object").remove(field);
        cases.push((format!("{field} missing"), keys.sign(missing), "M_BAD_JSON"));
    }
    let mut algorithms_string = keys.unsigned_device_keys();
    algorithms_string["algorithms"] = json!("m.megolm.v1.aes-sha2");
    cases.push((
        "algorithms a string".to_owned(),
        keys.sign(algorithms_string),
        "M_BAD_JSON",
    ));
    let mut keys_array = keys.unsigned_device_keys();
    keys_array["keys"] = json!(["ed25519"]);
    cases.push((
        "keys an array".to_owned(),
        keys.sign(keys_array),
        "M_BAD_JSON",
    ));
    let mut user_number = keys.unsigned_device_keys();
    user_number["user_id"] = json!(42);
    cases.push((
        "user_id a number".to_owned(),
        keys.sign(user_number),
        "M_BAD_JSON",
    ));
    cases.push((
        "device_keys a string".to_owned(),
        json!("keys"),
        "M_BAD_JSON",
    ));

    for (what, device_keys, errcode) in cases {
        let body = json!({
            "device_keys": device_keys,
            "one_time_keys": keys.one_time_keys(2),
            "fallback_keys": keys.fallback_keys(),
        });
        let answer = alice.post("/keys/upload", &body).await?;
        assert_eq!(
            (answer.status, answer.errcode()),
            (400, errcode),
            "{what}: expected 400 {errcode}, got {} {}\nrequest: {body}",
            answer.status,
            answer.body
        );
        assert!(answer.body["error"].is_string(), "{what}: {}", answer.body);
    }

    // No `signatures` member at all: refused, as a missing signature or as a missing field.
    let body = json!({
        "device_keys": keys.unsigned_device_keys(),
        "one_time_keys": keys.one_time_keys(2),
    });
    let answer = alice.post("/keys/upload", &body).await?;
    assert_eq!(
        answer.status, 400,
        "device keys without signatures: {}",
        answer.body
    );
    assert!(
        ["M_BAD_JSON", "M_INVALID_SIGNATURE"].contains(&answer.errcode()),
        "device keys without signatures: {}",
        answer.body
    );

    // The ed25519 or curve25519 identity key missing: refused (the contract requires both).
    for algorithm in ["ed25519", "curve25519"] {
        let mut missing = keys.unsigned_device_keys();
        missing["keys"]
            .as_object_mut()
            .expect("keys")
            .remove(&format!("{algorithm}:{dev}"));
        let body = json!({
            "device_keys": keys.sign(missing),
            "one_time_keys": keys.one_time_keys(2),
        });
        let answer = alice.post("/keys/upload", &body).await?;
        assert_eq!(
            answer.status, 400,
            "device keys without {algorithm}:{dev}: {}",
            answer.body
        );
        assert!(
            ["M_INVALID_PARAM", "M_BAD_JSON", "M_INVALID_SIGNATURE"].contains(&answer.errcode()),
            "device keys without {algorithm}:{dev}: {}",
            answer.body
        );
    }

    // Malformed key maps in otherwise good requests.
    for (what, body) in [
        ("one_time_keys an array", json!({"one_time_keys": [1]})),
        ("fallback_keys a string", json!({"fallback_keys": "k"})),
        (
            "device_keys valid, one_time_keys a number",
            json!({"device_keys": keys.device_keys(), "one_time_keys": 7}),
        ),
    ] {
        assert_error(&alice.post("/keys/upload", &body).await?, 400, "M_BAD_JSON");
        let _ = what;
    }

    // Nothing of all that was stored.
    assert_eq!(
        current_otk_count(&alice).await?,
        0,
        "no one-time keys stored"
    );
    let sync = alice.sync(None, Some(0), None).await?;
    assert!(
        unused_fallback_types(&sync).is_empty(),
        "no fallback key stored: {}",
        sync["device_unused_fallback_key_types"]
    );
    let seen = query(&bob, &[&alice.user_id]).await?;
    assert!(
        queried_devices(&seen, &alice.user_id).is_empty(),
        "no device keys stored: {seen}"
    );
    let claimed_now = claim(&bob, &[(&alice.user_id, &alice.device_id)]).await?;
    assert_eq!(
        claimed(&claimed_now, &alice.user_id, &alice.device_id),
        None,
        "nothing to claim: {claimed_now}"
    );

    // The same device keys, correctly signed, are then accepted.
    let answer = upload(&alice, &keys.upload_body(1)).await?;
    assert_eq!(otk_count(&answer), 1);
    let seen = query(&bob, &[&alice.user_id]).await?;
    assert_eq!(
        queried_devices(&seen, &alice.user_id),
        BTreeSet::from([dev.clone()])
    );
    Ok(())
}

/// One-time key IDs are unique per device: the same ID with other content is refused (and the
/// rest of that request is not stored), with the same content it is accepted and counted once.
async fn one_time_key_id_conflicts(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", PASSWORD).await?;
    let keys = DeviceKeys::of(&alice);
    upload(&alice, &json!({"device_keys": keys.device_keys()})).await?;

    let first = keys.signed_key(false);
    let id = format!("{SIGNED_CURVE25519}:AAAAAQ");
    let answer = upload(&alice, &json!({"one_time_keys": {&id: first}})).await?;
    assert_eq!(otk_count(&answer), 1);

    // Same ID, same content: fine, still one key.
    let answer = upload(&alice, &json!({"one_time_keys": {&id: first}})).await?;
    assert_eq!(otk_count(&answer), 1, "{answer}");

    // Same ID, different content (with a new key alongside): refused, nothing stored.
    let body = json!({"one_time_keys": {
        &id: keys.signed_key(false),
        format!("{SIGNED_CURVE25519}:AAAAAg"): keys.signed_key(false),
    }});
    assert_error(
        &alice.post("/keys/upload", &body).await?,
        400,
        "M_INVALID_PARAM",
    );
    assert_eq!(
        current_otk_count(&alice).await?,
        1,
        "the request stored nothing"
    );

    // Claiming it hands out the first content.
    let bob = server.register("bob", PASSWORD).await?;
    let answer = claim(&bob, &[(&alice.user_id, &alice.device_id)]).await?;
    let (claimed_id, key) =
        claimed(&answer, &alice.user_id, &alice.device_id).context("a key is claimed")?;
    assert_eq!(claimed_id, id);
    assert_eq!(key, first, "the key as first uploaded");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// /keys/claim, fallback keys
// ---------------------------------------------------------------------------------------------

/// Claims hand out each one-time key once, signed as uploaded, then the fallback key, which
/// stays and is reported as used in sync; a new fallback key replaces it.
async fn claim_one_time_and_fallback_keys(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", PASSWORD).await?;
    let phone = server.login("alice", PASSWORD, Some("PHONE")).await?;
    let bob = server.register("bob", PASSWORD).await?;
    let keys = DeviceKeys::of(&alice);
    let phone_keys = DeviceKeys::of(&phone);

    let otks = keys.one_time_keys(3);
    let fallback = keys.fallback_keys();
    let answer = upload(
        &alice,
        &json!({
            "device_keys": keys.device_keys(),
            "one_time_keys": otks,
            "fallback_keys": fallback,
        }),
    )
    .await?;
    assert_eq!(
        otk_count(&answer),
        3,
        "fallback keys are not counted: {answer}"
    );
    upload(&phone, &phone_keys.upload_body(1)).await?;

    let sync = alice.sync(None, Some(0), None).await?;
    assert_eq!(
        unused_fallback_types(&sync),
        vec![SIGNED_CURVE25519.to_owned()]
    );
    assert_eq!(sync_otk_count(&sync), 3);
    let since = next_batch(&sync);

    // Both devices in one claim; an unknown device and a device without keys are just absent.
    let answer = claim(
        &bob,
        &[
            (alice.user_id.as_str(), alice.device_id.as_str()),
            (&alice.user_id, "PHONE"),
            (&alice.user_id, "NOSUCHDEVICE"),
            (&bob.user_id, &bob.device_id),
        ],
    )
    .await?;
    let mut handed_out = BTreeSet::new();
    let (id, key) = claimed(&answer, &alice.user_id, &alice.device_id)
        .with_context(|| format!("alice's device has keys: {answer}"))?;
    assert_eq!(&otks[&id], &key, "claimed key is one uploaded, intact");
    assert!(verify(
        &key,
        &alice.user_id,
        &keys.ed25519.key_id,
        &keys.ed25519.public
    ));
    handed_out.insert(id);
    let (phone_id, _) =
        claimed(&answer, &alice.user_id, "PHONE").with_context(|| format!("{answer}"))?;
    assert!(phone_id.starts_with("signed_curve25519:"));
    assert_eq!(claimed(&answer, &alice.user_id, "NOSUCHDEVICE"), None);
    assert_eq!(claimed(&answer, &bob.user_id, &bob.device_id), None);

    for _ in 0..2 {
        let answer = claim(&bob, &[(&alice.user_id, &alice.device_id)]).await?;
        let (id, key) = claimed(&answer, &alice.user_id, &alice.device_id)
            .with_context(|| format!("{answer}"))?;
        assert_eq!(&otks[&id], &key);
        assert!(handed_out.insert(id.clone()), "{id} handed out twice");
    }
    assert_eq!(handed_out.len(), 3);
    assert_eq!(current_otk_count(&alice).await?, 0);
    // Still unused: no fallback key handed out so far.
    let sync = alice.sync(Some(&since), Some(0), None).await?;
    assert_eq!(
        unused_fallback_types(&sync),
        vec![SIGNED_CURVE25519.to_owned()]
    );
    assert_eq!(sync_otk_count(&sync), 0, "{sync}");

    // Out of one-time keys: the fallback key, every time.
    let (fallback_id, fallback_key) = fallback
        .as_object()
        .and_then(|m| m.iter().next())
        .map(|(id, key)| (id.clone(), key.clone()))
        .expect("one fallback key");
    for _ in 0..2 {
        let answer = claim(&bob, &[(&alice.user_id, &alice.device_id)]).await?;
        let (id, key) = claimed(&answer, &alice.user_id, &alice.device_id)
            .with_context(|| format!("the fallback key: {answer}"))?;
        assert_eq!(id, fallback_id);
        assert_eq!(
            key, fallback_key,
            "the fallback key, `fallback: true` and all"
        );
    }
    let sync = alice.sync(Some(&since), Some(0), None).await?;
    assert!(
        unused_fallback_types(&sync).is_empty(),
        "the fallback key is used: {}",
        sync["device_unused_fallback_key_types"]
    );

    // A new fallback key replaces the old one and is unused.
    let new_fallback = keys.fallback_keys();
    upload(&alice, &json!({"fallback_keys": new_fallback})).await?;
    let sync = alice.sync(Some(&since), Some(0), None).await?;
    assert_eq!(
        unused_fallback_types(&sync),
        vec![SIGNED_CURVE25519.to_owned()]
    );
    let answer = claim(&bob, &[(&alice.user_id, &alice.device_id)]).await?;
    let (id, key) =
        claimed(&answer, &alice.user_id, &alice.device_id).with_context(|| format!("{answer}"))?;
    let (new_id, new_key) = new_fallback
        .as_object()
        .and_then(|m| m.iter().next())
        .expect("one fallback key");
    assert_eq!((&id, &key), (new_id, new_key), "the new fallback key");

    // New one-time keys come before the fallback key again.
    let more = keys.one_time_keys(1);
    upload(&alice, &json!({"one_time_keys": more})).await?;
    let answer = claim(&bob, &[(&alice.user_id, &alice.device_id)]).await?;
    let (id, _) =
        claimed(&answer, &alice.user_id, &alice.device_id).with_context(|| format!("{answer}"))?;
    assert!(
        more.get(&id).is_some(),
        "a one-time key, not the fallback: {answer}"
    );
    Ok(())
}

/// 50 concurrent claims of one device's 20 one-time keys: each key goes to at most one
/// claimer, all 20 are handed out, and the other 30 claimers get the fallback key.
async fn concurrent_claims_hand_out_each_key_once(server: TestServer) -> anyhow::Result<()> {
    const KEYS: usize = 20;
    const CLAIMS: usize = 50;
    let alice = server.register("alice", PASSWORD).await?;
    let bob = server.register("bob", PASSWORD).await?;
    let carol = server.register("carol", PASSWORD).await?;
    let keys = DeviceKeys::of(&alice);
    let otks = keys.one_time_keys(KEYS);
    let fallback = keys.fallback_keys();
    let (fallback_id, _) = fallback
        .as_object()
        .and_then(|m| m.iter().next())
        .expect("one fallback key");
    let answer = upload(
        &alice,
        &json!({"device_keys": keys.device_keys(), "one_time_keys": otks, "fallback_keys": fallback}),
    )
    .await?;
    assert_eq!(otk_count(&answer) as usize, KEYS);

    let claimers = [&bob, &carol];
    let claims = (0..CLAIMS).map(|i| {
        let client = claimers[i % 2].clone();
        let (user, device) = (alice.user_id.clone(), alice.device_id.clone());
        async move { claim(&client, &[(&user, &device)]).await }
    });
    let answers = futures::future::join_all(claims).await;

    let mut one_time = Vec::new();
    let mut fallbacks = 0;
    for answer in answers {
        let answer = answer?;
        let (id, key) = claimed(&answer, &alice.user_id, &alice.device_id)
            .with_context(|| format!("every claim gets a key: {answer}"))?;
        if &id == fallback_id {
            fallbacks += 1;
        } else {
            assert_eq!(otks.get(&id), Some(&key), "an uploaded key, intact");
            one_time.push(id);
        }
    }
    let distinct: BTreeSet<&String> = one_time.iter().collect();
    assert_eq!(
        distinct.len(),
        one_time.len(),
        "a one-time key was handed out twice: {one_time:?}"
    );
    assert_eq!(one_time.len(), KEYS, "every one-time key handed out once");
    assert_eq!(fallbacks, CLAIMS - KEYS, "the rest got the fallback key");
    assert_eq!(current_otk_count(&alice).await?, 0);
    let sync = alice.sync(None, Some(0), None).await?;
    assert!(unused_fallback_types(&sync).is_empty());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Device lists: /sync device_lists and /keys/changes
// ---------------------------------------------------------------------------------------------

/// Bob's new device keys and deleted devices reach Alice (who shares an encrypted room with
/// him) in `device_lists.changed` and `/keys/changes`, and not Eve (who shares no room).
async fn device_list_changes_reach_room_members(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", PASSWORD).await?;
    let bob = server.register("bob", PASSWORD).await?;
    let eve = server.register("eve", PASSWORD).await?;
    let room = encrypted_room(&alice).await?;
    bob.join(&room).await?;
    let a0 = token(&alice).await?;
    let e0 = token(&eve).await?;

    // Bob uploads device keys.
    upload(&bob, &DeviceKeys::of(&bob).upload_body(1)).await?;
    let seen = sync_collect(&alice, &a0, |s| s.changed.contains(&bob.user_id)).await?;
    let a1 = seen.next_batch.clone();
    assert!(!seen.left.contains(&bob.user_id), "{seen:?}");

    let eve_sync = eve.sync(Some(&e0), Some(0), None).await?;
    assert!(
        !device_list(&eve_sync, "changed").any(|u| u == bob.user_id),
        "Eve shares no room with Bob: {}",
        eve_sync["device_lists"]
    );

    let changes = success(
        alice
            .get(&format!("/keys/changes?from={}&to={}", enc(&a0), enc(&a1)))
            .await?,
        "keys/changes",
    )?;
    assert!(
        changes["changed"]
            .as_array()
            .is_some_and(|c| c.contains(&json!(bob.user_id))),
        "/keys/changes from before the upload lists Bob: {changes}"
    );
    assert!(changes["left"].is_array(), "{changes}");
    let nothing = success(
        alice
            .get(&format!("/keys/changes?from={}&to={}", enc(&a1), enc(&a1)))
            .await?,
        "keys/changes",
    )?;
    assert!(
        !nothing["changed"]
            .as_array()
            .is_some_and(|c| c.contains(&json!(bob.user_id))),
        "/keys/changes over an empty range: {nothing}"
    );
    let eve_changes = success(
        eve.get(&format!(
            "/keys/changes?from={}&to={}",
            enc(&e0),
            enc(&token(&eve).await?)
        ))
        .await?,
        "keys/changes",
    )?;
    assert!(
        !eve_changes["changed"]
            .as_array()
            .is_some_and(|c| c.contains(&json!(bob.user_id))),
        "{eve_changes}"
    );

    // A second device of Bob's with keys.
    let tablet = server.login("bob", PASSWORD, Some("TABLET")).await?;
    let a2 = token(&alice).await?;
    upload(&tablet, &DeviceKeys::of(&tablet).upload_body(0)).await?;
    let seen = sync_collect(&alice, &a2, |s| s.changed.contains(&bob.user_id)).await?;
    assert_eq!(
        queried_devices(&query(&alice, &[&bob.user_id]).await?, &bob.user_id),
        BTreeSet::from([bob.device_id.clone(), "TABLET".to_owned()])
    );

    // Bob deletes it: a change, and its keys are gone.
    let a3 = seen.next_batch;
    ok(bob
        .with_password_auth(Method::DELETE, "/devices/TABLET", &json!({}), PASSWORD)
        .await?);
    let seen = sync_collect(&alice, &a3, |s| s.changed.contains(&bob.user_id)).await?;
    assert_eq!(
        queried_devices(&query(&alice, &[&bob.user_id]).await?, &bob.user_id),
        BTreeSet::from([bob.device_id.clone()]),
        "the deleted device's keys are gone"
    );
    let changes = success(
        alice
            .get(&format!(
                "/keys/changes?from={}&to={}",
                enc(&a3),
                enc(&seen.next_batch)
            ))
            .await?,
        "keys/changes",
    )?;
    assert!(
        changes["changed"]
            .as_array()
            .is_some_and(|c| c.contains(&json!(bob.user_id))),
        "/keys/changes lists Bob after the deletion: {changes}"
    );
    Ok(())
}

/// Carol joining an encrypted room Alice is in puts Carol in Alice's `changed`; Bob leaving
/// the only encrypted room he shares with Alice puts him in her `left`, and his later key
/// changes no longer reach her.
async fn device_lists_follow_membership(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", PASSWORD).await?;
    let bob = server.register("bob", PASSWORD).await?;
    let carol = server.register("carol", PASSWORD).await?;
    upload(&bob, &DeviceKeys::of(&bob).upload_body(0)).await?;
    upload(&carol, &DeviceKeys::of(&carol).upload_body(0)).await?;
    let room = encrypted_room(&alice).await?;
    bob.join(&room).await?;
    let a0 = token(&alice).await?;

    // Carol joins.
    carol.join(&room).await?;
    let seen = sync_collect(&alice, &a0, |s| s.changed.contains(&carol.user_id)).await?;
    assert!(!seen.left.contains(&carol.user_id), "{seen:?}");

    // Bob leaves.
    let a1 = seen.next_batch;
    bob.leave(&room).await?;
    let seen = sync_collect(&alice, &a1, |s| s.left.contains(&bob.user_id)).await?;
    let a2 = seen.next_batch;
    let changes = success(
        alice
            .get(&format!("/keys/changes?from={}&to={}", enc(&a1), enc(&a2)))
            .await?,
        "keys/changes",
    )?;
    assert!(
        changes["left"]
            .as_array()
            .is_some_and(|c| c.contains(&json!(bob.user_id))),
        "/keys/changes lists Bob as left: {changes}"
    );

    // Now Bob's new device does not reach Alice; Carol's (sentinel) does.
    let laptop = server.login("bob", PASSWORD, Some("LAPTOP")).await?;
    upload(&laptop, &DeviceKeys::of(&laptop).upload_body(0)).await?;
    let carol_laptop = server.login("carol", PASSWORD, Some("LAPTOP")).await?;
    upload(&carol_laptop, &DeviceKeys::of(&carol_laptop).upload_body(0)).await?;
    let seen = sync_collect(&alice, &a2, |s| s.changed.contains(&carol.user_id)).await?;
    assert!(
        !seen.changed.contains(&bob.user_id),
        "Bob shares no room with Alice any more: {seen:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// sendToDevice and to_device in /sync
// ---------------------------------------------------------------------------------------------

/// A message to one device reaches that device only; `*` reaches every device of the user;
/// each device gets each message once, with type, sender and content, and not again after it
/// has synced past it.
async fn to_device_delivery(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", PASSWORD).await?;
    let phone = server.login("alice", PASSWORD, Some("PHONE")).await?;
    let bob = server.register("bob", PASSWORD).await?;
    let t_alice = token(&alice).await?;
    let t_phone = token(&phone).await?;

    send_to_device_ok(
        &bob,
        "m.test.direct",
        &json!({&alice.user_id: {&alice.device_id: {"n": 1, "for": "laptop"}}}),
    )
    .await?;
    send_to_device_ok(
        &bob,
        "m.test.all",
        &json!({&alice.user_id: {"*": {"n": 2, "for": "everyone"}}}),
    )
    .await?;

    let seen = sync_collect(&alice, &t_alice, |s| s.to_device.len() >= 2).await?;
    assert_eq!(
        seen.to_device,
        vec![
            json!({"type": "m.test.direct", "sender": bob.user_id, "content": {"n": 1, "for": "laptop"}}),
            json!({"type": "m.test.all", "sender": bob.user_id, "content": {"n": 2, "for": "everyone"}}),
        ],
        "both messages, in order, exactly once"
    );
    let seen_phone = sync_collect(&phone, &t_phone, |s| !s.to_device.is_empty()).await?;
    assert_eq!(
        seen_phone.to_device,
        vec![
            json!({"type": "m.test.all", "sender": bob.user_id, "content": {"n": 2, "for": "everyone"}})
        ],
        "PHONE only gets the `*` message"
    );

    // Synced past: gone, on both.
    for (client, since) in [(&alice, &seen.next_batch), (&phone, &seen_phone.next_batch)] {
        let sync = client.sync(Some(since), Some(0), None).await?;
        let again = client.sync(Some(&next_batch(&sync)), Some(0), None).await?;
        assert!(to_device_events(&sync).is_empty(), "{}", sync["to_device"]);
        assert!(
            to_device_events(&again).is_empty(),
            "{}",
            again["to_device"]
        );
    }
    // An initial sync does not bring them back either.
    let initial = alice.sync(None, Some(0), None).await?;
    assert!(
        to_device_events(&initial).is_empty(),
        "{}",
        initial["to_device"]
    );
    Ok(())
}

/// A sync whose response the client never read (thrown away, or cut off mid-flight)
/// acknowledges nothing: the next sync from the same token brings the message again; only a
/// sync from the token that delivered it removes it.
async fn to_device_survives_lost_sync_responses(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", PASSWORD).await?;
    let bob = server.register("bob", PASSWORD).await?;
    let t0 = token(&alice).await?;
    let to_alice = |n: u32| json!({&alice.user_id: {&alice.device_id: {"n": n}}});
    let expected = |n: u32| json!({"type": "m.test", "sender": bob.user_id, "content": {"n": n}});

    send_to_device_ok(&bob, "m.test", &to_alice(1)).await?;
    // Delivered, but the response is thrown away.
    let lost = sync_collect(&alice, &t0, |s| !s.to_device.is_empty()).await?;
    assert_eq!(lost.to_device, vec![expected(1)]);
    // Again from T0: there again, once.
    let again = alice.sync(Some(&t0), Some(0), None).await?;
    assert_eq!(
        to_device_events(&again),
        vec![expected(1)],
        "a sync from T0 again brings the message again"
    );
    let again2 = alice.sync(Some(&t0), Some(0), None).await?;
    assert_eq!(to_device_events(&again2), vec![expected(1)], "and again");
    // From the token that delivered it: gone.
    let t1 = next_batch(&again2);
    let after = alice.sync(Some(&t1), Some(0), None).await?;
    assert!(
        to_device_events(&after).is_empty(),
        "{}",
        after["to_device"]
    );
    let t2 = next_batch(&after);

    // A long-poll in flight when the message comes, cut off by the client at once.
    let poll = {
        let alice = alice.clone();
        let t2 = t2.clone();
        tokio::spawn(async move { alice.sync(Some(&t2), Some(10_000), None).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    send_to_device_ok(&bob, "m.test", &to_alice(2)).await?;
    poll.abort();
    let _ = poll.await;
    // A request cut off a moment after it was sent (whether or not the server had answered).
    for delay_ms in [0, 1, 5, 20] {
        let _ = tokio::time::timeout(
            Duration::from_millis(delay_ms),
            alice.sync(Some(&t2), Some(0), None),
        )
        .await;
    }
    let seen = sync_collect(&alice, &t2, |s| !s.to_device.is_empty()).await?;
    assert_eq!(
        seen.to_device,
        vec![expected(2)],
        "the message survives cut-off syncs"
    );
    let after = alice.sync(Some(&seen.next_batch), Some(0), None).await?;
    assert!(
        to_device_events(&after).is_empty(),
        "{}",
        after["to_device"]
    );
    // And an old token no longer brings back acknowledged messages.
    let old = alice.sync(Some(&t0), Some(0), None).await?;
    assert!(
        to_device_events(&old).is_empty(),
        "acknowledged messages are deleted: {}",
        old["to_device"]
    );
    Ok(())
}

/// The same transaction ID from the same device is one send, whenever it is repeated; from
/// another device of the same user it is a different send.
async fn to_device_transaction_ids(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", PASSWORD).await?;
    let bob = server.register("bob", PASSWORD).await?;
    let bob2 = server.login("bob", PASSWORD, Some("BOB2")).await?;
    let t0 = token(&alice).await?;
    let to_alice = |n: u32| json!({&alice.user_id: {&alice.device_id: {"n": n}}});
    let txn = unique_txn_id();

    for _ in 0..2 {
        let answer = send_to_device(&bob, "m.test", &txn, &to_alice(1)).await?;
        assert_eq!(ok(answer), json!({}));
    }
    let seen = sync_collect(&alice, &t0, |s| !s.to_device.is_empty()).await?;
    // Once more after delivery and acknowledgement.
    let answer = send_to_device(&bob, "m.test", &txn, &to_alice(1)).await?;
    assert_eq!(ok(answer), json!({}));
    // Another device, same transaction ID: a new send.
    let answer = send_to_device(&bob2, "m.test", &txn, &to_alice(2)).await?;
    assert_eq!(ok(answer), json!({}));
    send_to_device_ok(&bob, "m.test", &to_alice(3)).await?;
    let rest = sync_collect(&alice, &seen.next_batch, |s| {
        s.to_device.iter().any(|e| e["content"]["n"] == 3)
    })
    .await?;
    let ns: Vec<Value> = seen
        .to_device
        .iter()
        .chain(&rest.to_device)
        .map(|e| e["content"]["n"].clone())
        .collect();
    assert_eq!(
        ns,
        vec![json!(1), json!(2), json!(3)],
        "one delivery per distinct (device, txn)"
    );
    Ok(())
}

/// A message content over 64 KiB is 413 `M_TOO_LARGE`; a non-object content is 400
/// `M_BAD_JSON`; neither request delivers anything, not even its good messages.
async fn to_device_limits(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", PASSWORD).await?;
    let phone = server.login("alice", PASSWORD, Some("PHONE")).await?;
    let bob = server.register("bob", PASSWORD).await?;
    let t0 = token(&alice).await?;
    let t_phone = token(&phone).await?;

    let big = "x".repeat(70_000);
    let answer = send_to_device(
        &bob,
        "m.test",
        &unique_txn_id(),
        &json!({&alice.user_id: {
            &alice.device_id: {"n": 1, "padding": big},
            "PHONE": {"n": 1},
        }}),
    )
    .await?;
    assert_error(&answer, 413, "M_TOO_LARGE");

    for (what, messages) in [
        (
            "a string content",
            json!({&alice.user_id: {&alice.device_id: "hello", "PHONE": {"n": 2}}}),
        ),
        (
            "an array content",
            json!({&alice.user_id: {"PHONE": {"n": 2}, &alice.device_id: [1, 2]}}),
        ),
        (
            "a device map that is a string",
            json!({&alice.user_id: "hello"}),
        ),
        ("messages an array", json!([1])),
    ] {
        let answer = send_to_device(&bob, "m.test", &unique_txn_id(), &messages).await?;
        assert_eq!(
            (answer.status, answer.errcode()),
            (400, "M_BAD_JSON"),
            "{what}: {}",
            answer.body
        );
    }
    let no_messages = bob
        .put(
            &format!("/sendToDevice/m.test/{}", unique_txn_id()),
            &json!({}),
        )
        .await?;
    assert_eq!(no_messages.status, 400, "no messages: {}", no_messages.body);

    // A large message just under the limit is fine.
    let under = "y".repeat(60_000);
    send_to_device_ok(
        &bob,
        "m.test",
        &json!({&alice.user_id: {"*": {"n": 3, "padding": under}}}),
    )
    .await?;
    for (client, since) in [(&alice, &t0), (&phone, &t_phone)] {
        let seen = sync_collect(client, since, |s| !s.to_device.is_empty()).await?;
        let ns: Vec<&Value> = seen.to_device.iter().map(|e| &e["content"]["n"]).collect();
        assert_eq!(ns, vec![&json!(3)], "only the good request was delivered");
        assert_eq!(seen.to_device[0]["content"]["padding"], json!(under));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Cross-signing
// ---------------------------------------------------------------------------------------------

/// The first cross-signing upload needs no UIA, an identical repeat neither; new keys need
/// UIA (password); keys not signed by the master key are refused and store nothing;
/// `/keys/query` shows master and self-signing keys to anyone, the user-signing key only to
/// its owner.
async fn cross_signing_keys_upload(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", PASSWORD).await?;
    let bob = server.register("bob", PASSWORD).await?;
    upload(&alice, &DeviceKeys::of(&alice).upload_body(0)).await?;
    let xs = CrossSigningKeys::new(&alice.user_id);

    // Badly signed self-signing or user-signing keys on a first upload: refused, nothing kept.
    let stranger = SigningKey::generate(None);
    let mut bad_cases = Vec::new();
    let mut unsigned_ssk = xs.upload_body();
    unsigned_ssk["self_signing_key"] = strip_signatures(&xs.self_signing_key());
    bad_cases.push(("an unsigned self-signing key".to_owned(), unsigned_ssk));
    let mut stranger_ssk = xs.upload_body();
    stranger_ssk["self_signing_key"] =
        stranger.sign(&alice.user_id, strip_signatures(&xs.self_signing_key()));
    bad_cases.push((
        "a self-signing key signed by another key".to_owned(),
        stranger_ssk,
    ));
    let mut forged_usk = xs.upload_body();
    let master_id = xs.master.key_id.clone();
    insert_signature(
        &mut forged_usk["user_signing_key"],
        &alice.user_id,
        &master_id,
        stranger.signature_of(&xs.user_signing_key()),
    );
    bad_cases.push((
        "a user-signing key with a forged master signature".to_owned(),
        forged_usk,
    ));
    let mut tampered_usk = xs.upload_body();
    tampered_usk["user_signing_key"]["org.example.note"] = json!("added after signing");
    bad_cases.push((
        "a user-signing key changed after signing".to_owned(),
        tampered_usk,
    ));
    for (what, body) in bad_cases {
        let answer = alice.post("/keys/device_signing/upload", &body).await?;
        assert_eq!(
            (answer.status, answer.errcode()),
            (400, "M_INVALID_SIGNATURE"),
            "{what}: {}",
            answer.body
        );
    }
    let seen = query(&bob, &[&alice.user_id]).await?;
    assert!(
        seen["master_keys"][&alice.user_id].is_null()
            && seen["self_signing_keys"][&alice.user_id].is_null(),
        "nothing stored: {seen}"
    );

    // Still a first upload: no UIA.
    let answer = alice
        .post("/keys/device_signing/upload", &xs.upload_body())
        .await?;
    assert_eq!(ok(answer), json!({}));
    // The same keys again: idempotent, no UIA.
    let answer = alice
        .post("/keys/device_signing/upload", &xs.upload_body())
        .await?;
    assert_eq!(
        answer.status, 200,
        "an identical re-upload needs no UIA: {}",
        answer.body
    );

    let by_bob = query(&bob, &[&alice.user_id]).await?;
    assert_eq!(
        strip_signatures(&by_bob["master_keys"][&alice.user_id]),
        xs.master_key(),
        "{by_bob}"
    );
    assert_eq!(
        strip_signatures(&by_bob["self_signing_keys"][&alice.user_id]),
        strip_signatures(&xs.self_signing_key()),
        "{by_bob}"
    );
    assert!(verify(
        &by_bob["self_signing_keys"][&alice.user_id],
        &alice.user_id,
        &xs.master.key_id,
        &xs.master.public
    ));
    assert!(
        by_bob["user_signing_keys"][&alice.user_id].is_null(),
        "Bob does not see Alice's user-signing key: {by_bob}"
    );
    let by_alice = query(&alice, &[&alice.user_id]).await?;
    assert_eq!(
        strip_signatures(&by_alice["user_signing_keys"][&alice.user_id]),
        strip_signatures(&xs.user_signing_key()),
        "Alice sees her own user-signing key: {by_alice}"
    );

    // New keys: UIA.
    let xs2 = CrossSigningKeys::new(&alice.user_id);
    let first = alice
        .post("/keys/device_signing/upload", &xs2.upload_body())
        .await?;
    assert_eq!(
        first.status, 401,
        "replacing keys needs UIA: {}",
        first.body
    );
    let still = query(&bob, &[&alice.user_id]).await?;
    assert_eq!(
        strip_signatures(&still["master_keys"][&alice.user_id]),
        xs.master_key(),
        "the 401 changed nothing"
    );
    let wrong = alice
        .post(
            "/keys/device_signing/upload",
            &json!({
                "master_key": xs2.master_key(),
                "self_signing_key": xs2.self_signing_key(),
                "user_signing_key": xs2.user_signing_key(),
                "auth": alice.password_auth(first.body["session"].as_str().unwrap_or_default(), "wrong"),
            }),
        )
        .await?;
    assert_eq!(wrong.status, 401, "a wrong password: {}", wrong.body);
    let done = alice
        .with_password_auth(
            Method::POST,
            "/keys/device_signing/upload",
            &xs2.upload_body(),
            PASSWORD,
        )
        .await?;
    assert_eq!(ok(done), json!({}));
    let by_bob = query(&bob, &[&alice.user_id]).await?;
    assert_eq!(
        strip_signatures(&by_bob["master_keys"][&alice.user_id]),
        xs2.master_key(),
        "the new master key: {by_bob}"
    );
    assert_eq!(
        strip_signatures(&by_bob["self_signing_keys"][&alice.user_id]),
        strip_signatures(&xs2.self_signing_key())
    );
    Ok(())
}

/// `/keys/signatures/upload`: a valid self-signing signature of Alice's own device shows in
/// everyone's `/keys/query`; a bad one is reported with `M_INVALID_SIGNATURE` and not stored;
/// a signature of a key whose content does not match the stored key is refused.
async fn cross_signing_signatures_upload(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", PASSWORD).await?;
    let bob = server.register("bob", PASSWORD).await?;
    let keys = DeviceKeys::of(&alice);
    upload(&alice, &keys.upload_body(0)).await?;
    let xs = CrossSigningKeys::new(&alice.user_id);
    ok(alice
        .post("/keys/device_signing/upload", &xs.upload_body())
        .await?);
    let dev = alice.device_id.clone();
    let ssk_id = xs.self_signing.key_id.clone();

    let stored =
        query(&alice, &[&alice.user_id]).await?["device_keys"][&alice.user_id][&dev].clone();

    // A bad signature: reported, not stored.
    let mut bad = strip_signatures(&stored);
    insert_signature(
        &mut bad,
        &alice.user_id,
        &ssk_id,
        SigningKey::generate(None).signature_of(&stored),
    );
    let answer = success(
        alice
            .post(
                "/keys/signatures/upload",
                &json!({&alice.user_id: {&dev: bad}}),
            )
            .await?,
        "signatures/upload",
    )?;
    assert_eq!(
        answer["failures"][&alice.user_id][&dev]["errcode"], "M_INVALID_SIGNATURE",
        "{answer}"
    );
    assert!(answer["failures"][&alice.user_id][&dev]["error"].is_string());
    let seen = query(&bob, &[&alice.user_id]).await?;
    assert!(
        seen["device_keys"][&alice.user_id][&dev]["signatures"][&alice.user_id][&ssk_id].is_null(),
        "the bad signature is not stored: {seen}"
    );

    // A signature of altered device keys: refused.
    let mut altered = strip_signatures(&stored);
    altered["keys"][format!("curve25519:{dev}")] = json!(random_key());
    let altered = xs.sign_device(&altered);
    let answer = success(
        alice
            .post(
                "/keys/signatures/upload",
                &json!({&alice.user_id: {&dev: altered}}),
            )
            .await?,
        "signatures/upload",
    )?;
    assert!(
        answer["failures"][&alice.user_id][&dev]["errcode"].is_string(),
        "signing something other than the stored keys fails: {answer}"
    );

    // A good signature: stored, served to anyone, verifiable; the device's own signature stays.
    let signed = xs.sign_device(&stored);
    let answer = success(
        alice
            .post(
                "/keys/signatures/upload",
                &json!({&alice.user_id: {&dev: signed}}),
            )
            .await?,
        "signatures/upload",
    )?;
    assert!(
        answer["failures"].as_object().is_none_or(|f| f.is_empty()),
        "no failures: {answer}"
    );
    for viewer in [&alice, &bob] {
        let seen = query(viewer, &[&alice.user_id]).await?;
        let device = &seen["device_keys"][&alice.user_id][&dev];
        assert!(
            verify(device, &alice.user_id, &ssk_id, &xs.self_signing.public),
            "{} sees the self-signing signature: {device}",
            viewer.user_id
        );
        assert!(
            verify(
                device,
                &alice.user_id,
                &keys.ed25519.key_id,
                &keys.ed25519.public
            ),
            "and the device's own: {device}"
        );
    }
    Ok(())
}

/// Signatures of master keys: Alice's device signing her own master key is visible to all;
/// Alice's user-signing key signing Bob's master key is accepted and visible to Alice only.
async fn master_key_signatures(server: TestServer) -> anyhow::Result<()> {
    let alice = server.register("alice", PASSWORD).await?;
    let bob = server.register("bob", PASSWORD).await?;
    let carol = server.register("carol", PASSWORD).await?;
    let keys = DeviceKeys::of(&alice);
    upload(&alice, &keys.upload_body(0)).await?;
    let alice_xs = CrossSigningKeys::new(&alice.user_id);
    let bob_xs = CrossSigningKeys::new(&bob.user_id);
    ok(alice
        .post("/keys/device_signing/upload", &alice_xs.upload_body())
        .await?);
    ok(bob
        .post("/keys/device_signing/upload", &bob_xs.upload_body())
        .await?);

    // Alice's device signs her master key (as after a verification).
    let master = alice_xs.master_key();
    let signed = keys.sign(master.clone());
    let answer = success(
        alice
            .post(
                "/keys/signatures/upload",
                &json!({&alice.user_id: {&alice_xs.master.public: signed}}),
            )
            .await?,
        "signatures/upload",
    )?;
    assert!(
        answer["failures"].as_object().is_none_or(|f| f.is_empty()),
        "{answer}"
    );
    let seen = query(&bob, &[&alice.user_id]).await?;
    assert!(
        verify(
            &seen["master_keys"][&alice.user_id],
            &alice.user_id,
            &keys.ed25519.key_id,
            &keys.ed25519.public
        ),
        "the device's signature of the master key is visible to others: {seen}"
    );

    // Alice's user-signing key signs Bob's master key.
    let bobs_master = query(&alice, &[&bob.user_id]).await?["master_keys"][&bob.user_id].clone();
    let signed = alice_xs.sign_user(&bobs_master);
    let answer = success(
        alice
            .post(
                "/keys/signatures/upload",
                &json!({&bob.user_id: {&bob_xs.master.public: signed}}),
            )
            .await?,
        "signatures/upload",
    )?;
    assert!(
        answer["failures"].as_object().is_none_or(|f| f.is_empty()),
        "{answer}"
    );
    let usk_id = alice_xs.user_signing.key_id.clone();
    let by_alice = query(&alice, &[&bob.user_id]).await?;
    assert!(
        verify(
            &by_alice["master_keys"][&bob.user_id],
            &alice.user_id,
            &usk_id,
            &alice_xs.user_signing.public
        ),
        "Alice sees her signature of Bob's master key: {by_alice}"
    );
    for other in [&bob, &carol] {
        let seen = query(other, &[&bob.user_id]).await?;
        assert!(
            seen["master_keys"][&bob.user_id]["signatures"][&alice.user_id].is_null(),
            "{} does not see Alice's user-signing signatures: {seen}",
            other.user_id
        );
    }

    // A bad user-signing signature of Bob's key is reported.
    let mut forged = strip_signatures(&bobs_master);
    insert_signature(
        &mut forged,
        &alice.user_id,
        &usk_id,
        SigningKey::generate(None).signature_of(&bobs_master),
    );
    let answer = success(
        alice
            .post(
                "/keys/signatures/upload",
                &json!({&bob.user_id: {&bob_xs.master.public: forged}}),
            )
            .await?,
        "signatures/upload",
    )?;
    assert_eq!(
        answer["failures"][&bob.user_id][&bob_xs.master.public]["errcode"], "M_INVALID_SIGNATURE",
        "{answer}"
    );
    Ok(())
}

backend_tests!(
    upload_and_query_device_keys,
    bad_uploads_store_nothing,
    one_time_key_id_conflicts,
    claim_one_time_and_fallback_keys,
    concurrent_claims_hand_out_each_key_once,
    device_list_changes_reach_room_members,
    device_lists_follow_membership,
    to_device_delivery,
    to_device_survives_lost_sync_responses,
    to_device_transaction_ids,
    to_device_limits,
    cross_signing_keys_upload,
    cross_signing_signatures_upload,
    master_key_signatures,
);
