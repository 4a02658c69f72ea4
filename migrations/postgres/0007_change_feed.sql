-- The change feed: one row per state change, written by the transaction that made the change.
-- A transaction writes its events as its last statement, holding the feed's advisory lock
-- (pg_advisory_xact_lock) until it commits, so `sequence` is taken in commit order: a reader
-- that has seen sequence N can never later find a lower one.
CREATE TABLE change_events (
    sequence        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
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

CREATE TRIGGER change_events_append_only BEFORE UPDATE OR DELETE ON change_events
    FOR EACH ROW EXECUTE FUNCTION refuse_change();
CREATE TRIGGER change_events_no_truncate BEFORE TRUNCATE ON change_events
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change();
