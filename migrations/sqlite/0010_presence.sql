-- Presence: the published state of each user, local or of another server. Written when the
-- published state or status message changes (with the stream position of the change), and
-- last_active_ts at most about once a minute while a user stays active; heartbeats write
-- nothing. `state` is online, unavailable or offline.
CREATE TABLE presence (
    user_id         TEXT NOT NULL PRIMARY KEY,
    state           TEXT NOT NULL,
    status_msg      TEXT,
    last_active_ts  BIGINT NOT NULL,
    currently_active BIGINT NOT NULL DEFAULT 0,
    stream_id       BIGINT NOT NULL
);
