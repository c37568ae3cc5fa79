-- Server-side key backups: each user's backup versions and the room keys stored in them.

-- A user's backup versions. `version` counts up per user and is never reused: a deleted
-- version keeps its row (deleted = 1) so the next one is numbered past it. `etag` counts the
-- changes to the version's stored keys.
CREATE TABLE backup_versions (
    user_id         TEXT NOT NULL,
    version         BIGINT NOT NULL,
    algorithm       TEXT NOT NULL,
    auth_data       TEXT NOT NULL,
    etag            BIGINT NOT NULL DEFAULT 0,
    deleted         BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, version)
);

-- One key per megolm session and backup version; session_data is the encrypted JSON object
-- exactly as uploaded, is_verified 0 or 1.
CREATE TABLE backup_keys (
    user_id             TEXT NOT NULL,
    version             BIGINT NOT NULL,
    room_id             TEXT NOT NULL,
    session_id          TEXT NOT NULL,
    first_message_index BIGINT NOT NULL,
    forwarded_count     BIGINT NOT NULL,
    is_verified         BIGINT NOT NULL,
    session_data        TEXT NOT NULL,
    PRIMARY KEY (user_id, version, room_id, session_id)
);
