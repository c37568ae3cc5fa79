-- Receipts (m.read, m.read.private), ours and other servers' users'. One row per user,
-- receipt type and thread (`thread_id` '' = unthreaded), replaced as the receipt moves on.
-- `event_stream` is the stream position of the receipted event (0 when we do not hold it),
-- `data` the receipt's JSON (`ts`, `thread_id`), `stream_id` its receipts-stream position.
CREATE TABLE receipts (
    room_id         TEXT NOT NULL,
    receipt_type    TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    thread_id       TEXT NOT NULL,
    event_id        TEXT NOT NULL,
    event_stream    BIGINT NOT NULL,
    data            TEXT NOT NULL,
    stream_id       BIGINT NOT NULL,
    PRIMARY KEY (room_id, receipt_type, user_id, thread_id)
);
CREATE INDEX receipts_room_stream ON receipts (room_id, stream_id);
CREATE INDEX receipts_user_room ON receipts (user_id, room_id);
