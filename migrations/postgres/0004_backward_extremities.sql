-- Myelin schema v4: backward extremities (the same in SQLite and PostgreSQL).
-- See ARCHITECTURE.md § Storage.

-- Events a room's timeline names as prev_events but does not hold: where its known history
-- has a gap (before a join from another server, or a gap an incoming event could not close).
-- `depth` is the depth of the deepest held event naming it: `/messages` going backwards asks
-- other servers to backfill before it returns anything older than that.
CREATE TABLE backward_extremities (
    room_nid        BIGINT NOT NULL,
    event_id        TEXT NOT NULL,
    depth           BIGINT NOT NULL,
    PRIMARY KEY (room_nid, event_id)
);
CREATE INDEX backward_extremities_depth ON backward_extremities (room_nid, depth);
