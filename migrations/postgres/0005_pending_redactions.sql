-- Myelin schema v5: redactions from other servers whose target is not stored yet (the same in
-- SQLite and PostgreSQL). See ARCHITECTURE.md § Storage. (Numbered 5: 4 is left to the
-- concurrent backfill work.)

-- A redaction accepted into a room's timeline before the event it redacts arrived. When the
-- target arrives it is stored redacted if the redaction qualifies: the target is in the same
-- room, and the redacter had the power to redact (`power_ok`, decided by the room's state when
-- the redaction was accepted) or is on the target sender's server. Either way the rows for a
-- target are deleted once the target is stored.
CREATE TABLE pending_redactions (
    target_event_id     TEXT NOT NULL,
    redaction_event_id  TEXT NOT NULL,
    room_nid            BIGINT NOT NULL,
    sender_server       TEXT NOT NULL,
    power_ok            BIGINT NOT NULL,
    PRIMARY KEY (target_event_id, redaction_event_id)
);
CREATE INDEX pending_redactions_room ON pending_redactions (room_nid);
