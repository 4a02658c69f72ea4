-- A request id belongs to the principal that sent it: the idempotency record is keyed by
-- (request_id, principal), so another principal's use of the same id is a request of its own,
-- executed and checked as such, never a replay of the first (nor a sign that it exists).
-- request_id leads the key so that a batch looks up its ids with one indexed IN list, as before.
--
-- Existing records get the principal that made them:
-- - a settlement run's request id, the actor of its first run (settlement_runs keeps it);
-- - any other, the principal of the first allowed, non-replayed call with that request id in
--   the audit log (every allowed mutating call is recorded there; the id is compared in the
--   canonical lower-case form the idempotency table stores);
-- - an id found in neither (its audit entry was lost, or the caller wrote the UUID in another
--   form) gets '', a name no principal can have (the settings refuse empty names). Such a
--   record is never replayed again: giving it to a guessed principal could replay one
--   caller's answer to another, which is what this change ends. Sent again by its caller, the
--   request is executed afresh, and the domain's own rules refuse a repeat that matters (one
--   claim per partner, one partner per registration number, reviews of pending claims only,
--   retries of failed payouts only, cancels of unpaid ones only).
ALTER TABLE idempotency ADD COLUMN principal TEXT NOT NULL DEFAULT '';

UPDATE idempotency i SET principal = r.actor
FROM (
    SELECT DISTINCT ON (request_id) request_id, actor
    FROM settlement_runs
    ORDER BY request_id, start_time, run_id
) r
WHERE i.method = 'ReconcileSettlements' AND r.request_id = i.request_id;

UPDATE idempotency i SET principal = a.principal
FROM (
    SELECT DISTINCT ON (lower(request_id)) lower(request_id) AS request_id, principal
    FROM audit_events
    WHERE outcome_code = 'OK' AND NOT replayed AND request_id <> '' AND principal <> ''
    ORDER BY lower(request_id), time, audit_event_id
) a
WHERE i.principal = '' AND a.request_id = i.request_id;

ALTER TABLE idempotency ALTER COLUMN principal DROP DEFAULT;
ALTER TABLE idempotency DROP CONSTRAINT idempotency_pkey;
ALTER TABLE idempotency ADD PRIMARY KEY (request_id, principal);

-- A repeated settlement run is compared with the earlier runs of the same actor only.
DROP INDEX settlement_runs_by_request;
CREATE INDEX settlement_runs_by_request ON settlement_runs (request_id, actor);
