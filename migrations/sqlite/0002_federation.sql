-- Federation: the durable outbox per destination, per-destination back-off, inbound transaction
-- IDs already answered, and the stripped state sent with invites from other servers.

CREATE TABLE federation_outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    destination     TEXT NOT NULL,
    event_nid       BIGINT,
    edu             TEXT,
    created_ts      BIGINT NOT NULL
);
CREATE INDEX federation_outbox_destination ON federation_outbox (destination, id);

CREATE TABLE federation_destinations (
    destination     TEXT PRIMARY KEY,
    failures        BIGINT NOT NULL DEFAULT 0,
    retry_at        BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE federation_inbound_txns (
    origin          TEXT NOT NULL,
    txn_id          TEXT NOT NULL,
    response        TEXT NOT NULL,
    received_ts     BIGINT NOT NULL,
    PRIMARY KEY (origin, txn_id)
);

CREATE TABLE remote_invites (
    room_nid        BIGINT NOT NULL,
    user_id         TEXT NOT NULL,
    event_nid       BIGINT NOT NULL,
    stripped_state  TEXT NOT NULL,
    PRIMARY KEY (room_nid, user_id)
);
