-- Myelin schema v3: other servers' signing keys (the same in SQLite and PostgreSQL).
-- See ARCHITECTURE.md § Storage.

-- Each verify key of another server, as fetched from its key server and checked against the
-- response's self-signature. `valid_until_ts` is the lesser of the response's valid_until_ts and
-- fetch time + 7 days (the spec's rule); `expired_ts` is set for keys from old_verify_keys (they
-- verify only what was signed before it).
CREATE TABLE server_keys (
    server_name     TEXT NOT NULL,
    key_id          TEXT NOT NULL,
    public_key      TEXT NOT NULL,
    valid_until_ts  BIGINT NOT NULL,
    expired_ts      BIGINT,
    fetched_ts      BIGINT NOT NULL,
    PRIMARY KEY (server_name, key_id)
);

-- The latest verified key response of each server, exactly as received (origin-signed), which
-- the notary endpoints (/_matrix/key/v2/query) serve again with our signature added.
CREATE TABLE server_key_responses (
    server_name     TEXT PRIMARY KEY,
    response_json   TEXT NOT NULL,
    valid_until_ts  BIGINT NOT NULL,
    fetched_ts      BIGINT NOT NULL
);
