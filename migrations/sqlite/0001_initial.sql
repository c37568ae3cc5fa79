-- Myelin schema v1 (SQLite). The PostgreSQL schema in ../postgres is the same but for key types.
-- See ARCHITECTURE.md § Storage for what each table is for.

-- Accounts ---------------------------------------------------------------------------------------
CREATE TABLE users (
    user_id         TEXT PRIMARY KEY,
    password_hash   TEXT,
    is_admin        BIGINT NOT NULL DEFAULT 0,
    deactivated     BIGINT NOT NULL DEFAULT 0,
    created_ts      BIGINT NOT NULL,
    displayname     TEXT,
    avatar_url      TEXT
);

CREATE TABLE devices (
    user_id         TEXT NOT NULL,
    device_id       TEXT NOT NULL,
    display_name    TEXT,
    last_seen_ts    BIGINT,
    last_seen_ip    TEXT,
    created_ts      BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);

-- Only sha256 hashes of tokens are stored.
CREATE TABLE access_tokens (
    token_hash      TEXT PRIMARY KEY,
    user_id         TEXT NOT NULL,
    device_id       TEXT NOT NULL,
    expires_ts      BIGINT,
    created_ts      BIGINT NOT NULL
);
CREATE INDEX access_tokens_device ON access_tokens (user_id, device_id);

CREATE TABLE refresh_tokens (
    token_hash      TEXT PRIMARY KEY,
    user_id         TEXT NOT NULL,
    device_id       TEXT NOT NULL,
    created_ts      BIGINT NOT NULL
);
CREATE INDEX refresh_tokens_device ON refresh_tokens (user_id, device_id);

CREATE TABLE registration_tokens (
    token           TEXT PRIMARY KEY,
    uses_allowed    BIGINT,
    completed       BIGINT NOT NULL DEFAULT 0,
    expiry_ts       BIGINT,
    created_ts      BIGINT NOT NULL
);

CREATE TABLE uia_sessions (
    session_id      TEXT PRIMARY KEY,
    user_id         TEXT,
    completed       TEXT NOT NULL,
    created_ts      BIGINT NOT NULL
);

-- Rooms and events -------------------------------------------------------------------------------
CREATE TABLE rooms (
    room_nid        INTEGER PRIMARY KEY,
    room_id         TEXT NOT NULL UNIQUE,
    room_version    TEXT NOT NULL,
    is_public       BIGINT NOT NULL DEFAULT 0,
    state_group     BIGINT,
    created_ts      BIGINT NOT NULL
);

-- Interned (event type, state key) pairs.
CREATE TABLE state_keys (
    state_key_nid   INTEGER PRIMARY KEY,
    event_type      TEXT NOT NULL,
    state_key       TEXT NOT NULL,
    UNIQUE (event_type, state_key)
);

-- Every event exactly as signed (or as redacted), with its numeric id and positions. Its
-- prev_events are in its JSON. A local client send also records its transaction ID: a retried
-- PUT (same device, same path `txn_scope`, same txn ID) finds the event it made.
CREATE TABLE events (
    event_nid       INTEGER PRIMARY KEY,
    event_id        TEXT NOT NULL UNIQUE,
    room_nid        BIGINT NOT NULL,
    stream_ordering BIGINT UNIQUE,
    depth           BIGINT NOT NULL,
    event_type      TEXT NOT NULL,
    state_key       TEXT,
    sender          TEXT NOT NULL,
    origin_server_ts BIGINT NOT NULL,
    state_before    BIGINT,
    state_after     BIGINT,
    redacted_by     TEXT,
    outlier         BIGINT NOT NULL DEFAULT 0,
    rejected        BIGINT NOT NULL DEFAULT 0,
    txn_device      TEXT,
    txn_scope       TEXT,
    txn_id          TEXT,
    json            TEXT NOT NULL,
    UNIQUE (sender, txn_device, txn_scope, txn_id)
);
CREATE INDEX events_room_stream ON events (room_nid, stream_ordering);
CREATE INDEX events_room_topo ON events (room_nid, depth, stream_ordering);

CREATE TABLE forward_extremities (
    room_nid        BIGINT NOT NULL,
    event_nid       BIGINT NOT NULL,
    PRIMARY KEY (room_nid, event_nid)
);

-- State snapshots: a group is its parent's state plus its own edits (structure sharing). Chains are
-- cut at a bounded length by writing a full snapshot with no parent.
CREATE TABLE state_groups (
    state_group     INTEGER PRIMARY KEY,
    room_nid        BIGINT NOT NULL,
    parent_group    BIGINT,
    chain_len       BIGINT NOT NULL
);

CREATE TABLE state_group_edits (
    state_group     BIGINT NOT NULL,
    state_key_nid   BIGINT NOT NULL,
    event_nid       BIGINT NOT NULL,
    PRIMARY KEY (state_group, state_key_nid)
);

-- Materialised current state and memberships.
CREATE TABLE current_state (
    room_nid        BIGINT NOT NULL,
    state_key_nid   BIGINT NOT NULL,
    event_nid       BIGINT NOT NULL,
    PRIMARY KEY (room_nid, state_key_nid)
);

CREATE TABLE room_memberships (
    room_nid        BIGINT NOT NULL,
    user_id         TEXT NOT NULL,
    membership      TEXT NOT NULL,
    event_nid       BIGINT NOT NULL,
    stream_ordering BIGINT NOT NULL,
    forgotten       BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (room_nid, user_id)
);
CREATE INDEX room_memberships_user ON room_memberships (user_id, membership);

-- Directory --------------------------------------------------------------------------------------
CREATE TABLE room_aliases (
    alias           TEXT PRIMARY KEY,
    room_id         TEXT NOT NULL,
    creator         TEXT NOT NULL
);
CREATE INDEX room_aliases_room ON room_aliases (room_id);

-- Per-user data ----------------------------------------------------------------------------------
-- room_id is '' for global account data.
CREATE TABLE account_data (
    user_id         TEXT NOT NULL,
    room_id         TEXT NOT NULL,
    data_type       TEXT NOT NULL,
    content         TEXT NOT NULL,
    stream_id       BIGINT NOT NULL,
    PRIMARY KEY (user_id, room_id, data_type)
);
CREATE INDEX account_data_stream ON account_data (user_id, stream_id);

CREATE TABLE filters (
    user_id         TEXT NOT NULL,
    filter_id       BIGINT NOT NULL,
    filter_json     TEXT NOT NULL,
    PRIMARY KEY (user_id, filter_id)
);

-- Server-wide key/value facts (e.g. stream positions of streams that have no table of their own).
CREATE TABLE server_meta (
    meta_key        TEXT PRIMARY KEY,
    meta_value      TEXT NOT NULL
);
