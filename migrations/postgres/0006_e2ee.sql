-- End-to-end encryption: device and cross-signing keys, one-time and fallback keys, uploaded
-- signatures, to-device messages, the device-list stream, and the device lists of other
-- servers' users as their servers told us.

-- Each device's signed identity keys (`device_keys` of /keys/upload), exactly as uploaded.
CREATE TABLE device_keys (
    user_id         TEXT NOT NULL,
    device_id       TEXT NOT NULL,
    key_json        TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);

-- Unclaimed one-time keys; a claim deletes the row it hands out.
CREATE TABLE one_time_keys (
    user_id         TEXT NOT NULL,
    device_id       TEXT NOT NULL,
    algorithm       TEXT NOT NULL,
    key_id          TEXT NOT NULL,
    key_json        TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id, algorithm, key_id)
);

-- One fallback key per device and algorithm; `used` once a claim has handed it out.
CREATE TABLE fallback_keys (
    user_id         TEXT NOT NULL,
    device_id       TEXT NOT NULL,
    algorithm       TEXT NOT NULL,
    key_id          TEXT NOT NULL,
    key_json        TEXT NOT NULL,
    used            BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, device_id, algorithm)
);

-- Cross-signing keys: key_type is master, self_signing or user_signing.
CREATE TABLE cross_signing_keys (
    user_id         TEXT NOT NULL,
    key_type        TEXT NOT NULL,
    key_json        TEXT NOT NULL,
    PRIMARY KEY (user_id, key_type)
);

-- Signatures from /keys/signatures/upload, merged into the key they sign when it is served.
-- target_key_id is a device ID or a cross-signing key's unpadded base64 public key.
CREATE TABLE key_signatures (
    target_user_id  TEXT NOT NULL,
    target_key_id   TEXT NOT NULL,
    signer_user_id  TEXT NOT NULL,
    signer_key_id   TEXT NOT NULL,
    signature       TEXT NOT NULL,
    PRIMARY KEY (target_user_id, target_key_id, signer_user_id, signer_key_id)
);

-- The device-list stream: one row per change of a user's devices or cross-signing keys (our
-- users, and other servers' users whose updates reached us). A local user's rows with a
-- device_id (device changes, not cross-signing ones) are also the stream_id/prev_id chain of
-- their m.device_list_update EDUs.
CREATE TABLE device_list_changes (
    stream_id       BIGINT PRIMARY KEY,
    user_id         TEXT NOT NULL,
    device_id       TEXT
);
CREATE INDEX device_list_changes_user ON device_list_changes (user_id, stream_id);

-- To-device messages not yet acknowledged by their device (deleted once it syncs past them).
CREATE TABLE to_device_messages (
    stream_id       BIGINT PRIMARY KEY,
    user_id         TEXT NOT NULL,
    device_id       TEXT NOT NULL,
    sender          TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    content         TEXT NOT NULL
);
CREATE INDEX to_device_messages_device ON to_device_messages (user_id, device_id, stream_id);

-- sendToDevice transactions already carried out, per sending device. For messages that came
-- over federation, device_id is empty and txn_id is the EDU's message_id.
CREATE TABLE to_device_txns (
    user_id         TEXT NOT NULL,
    device_id       TEXT NOT NULL,
    txn_id          TEXT NOT NULL,
    created_ts      BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id, txn_id)
);

-- Other servers' users' device lists, kept in step with their m.device_list_update EDUs
-- (stream_id is the origin's) and resynced through /user/devices when a gap shows.
-- devices is the JSON array of /user/devices; the cross-signing keys are JSON objects.
CREATE TABLE remote_device_lists (
    user_id         TEXT PRIMARY KEY,
    stream_id       BIGINT NOT NULL,
    devices         TEXT NOT NULL,
    master_key      TEXT,
    self_signing_key TEXT,
    updated_ts      BIGINT NOT NULL
);
