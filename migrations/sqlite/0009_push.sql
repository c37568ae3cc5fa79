-- Push notifications: what the push rules decided for each local user and event, the users'
-- pushers, and the durable queue of notifications for push gateways.

-- One row per (user, event) whose push rules gave a `notify` action: the unread counts of
-- /sync and the /notifications list. `thread_id` is the thread root's event ID, or 'main';
-- `counted` is 0 for an invite to a user not in the room (notified, not unread in it).
CREATE TABLE event_push_actions (
    user_id         TEXT NOT NULL,
    room_nid        BIGINT NOT NULL,
    event_nid       BIGINT NOT NULL,
    stream_ordering BIGINT NOT NULL,
    thread_id       TEXT NOT NULL,
    highlight       BIGINT NOT NULL,
    counted         BIGINT NOT NULL,
    actions         TEXT NOT NULL,
    ts              BIGINT NOT NULL,
    PRIMARY KEY (user_id, event_nid)
);
CREATE INDEX event_push_actions_room ON event_push_actions (user_id, room_nid, stream_ordering);
CREATE INDEX event_push_actions_stream ON event_push_actions (user_id, stream_ordering);

-- A user's pushers (POST /pushers/set), tied to the device whose access token made them.
CREATE TABLE pushers (
    id                  INTEGER PRIMARY KEY,
    user_id             TEXT NOT NULL,
    device_id           TEXT NOT NULL,
    kind                TEXT NOT NULL,
    app_id              TEXT NOT NULL,
    pushkey             TEXT NOT NULL,
    app_display_name    TEXT NOT NULL,
    device_display_name TEXT NOT NULL,
    profile_tag         TEXT,
    lang                TEXT NOT NULL,
    data                TEXT NOT NULL,
    pushkey_ts          BIGINT NOT NULL,
    UNIQUE (app_id, pushkey, user_id)
);
CREATE INDEX pushers_user ON pushers (user_id);

-- Notifications to send to a pusher's gateway, written with the push actions that caused
-- them and deleted once the gateway accepted them (or the pusher is gone).
CREATE TABLE push_queue (
    id              INTEGER PRIMARY KEY,
    pusher_id       BIGINT NOT NULL,
    user_id         TEXT NOT NULL,
    event_nid       BIGINT NOT NULL,
    actions         TEXT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_ts BIGINT NOT NULL DEFAULT 0,
    created_ts      BIGINT NOT NULL
);
CREATE INDEX push_queue_pusher ON push_queue (pusher_id, id);
