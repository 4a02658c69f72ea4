-- The change feed: one row per state change, written by the transaction that made the change.
-- SQLite has one writer at a time, holding the database until it commits, so `sequence` is
-- taken in commit order: a reader that has seen sequence N can never later find a lower one.
CREATE TABLE change_events (
    sequence        INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id        TEXT NOT NULL UNIQUE,
    event_type      TEXT NOT NULL,
    time            BIGINT NOT NULL,
    actor           TEXT NOT NULL,
    partner_id      TEXT NOT NULL,
    claim_id        TEXT,
    disbursement_id TEXT,
    -- What changed, as JSON (never more of an account number than its last 4 digits).
    detail          TEXT NOT NULL
);
CREATE INDEX change_events_by_partner ON change_events (partner_id, sequence);

CREATE TRIGGER change_events_no_update BEFORE UPDATE ON change_events
BEGIN SELECT RAISE(ABORT, 'change_events is append-only'); END;
CREATE TRIGGER change_events_no_delete BEFORE DELETE ON change_events
BEGIN SELECT RAISE(ABORT, 'change_events is append-only'); END;
