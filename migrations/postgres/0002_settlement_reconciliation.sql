-- Reconciliation against the payments backend's settlement report.

-- One reconciliation: who sent which report, with which cut-off, and what it found.
CREATE TABLE settlement_runs (
    run_id         TEXT PRIMARY KEY,
    -- The caller's request_id; a repeated one must come with the same report.
    request_id     TEXT NOT NULL,
    actor          TEXT NOT NULL,
    cutoff_time    BIGINT NOT NULL,
    -- SHA-256 of the report's lines in the order sent; set once the whole report is in.
    report_sha256  TEXT,
    line_count     BIGINT NOT NULL DEFAULT 0,
    matched_count  BIGINT NOT NULL DEFAULT 0,
    mismatch_count BIGINT NOT NULL DEFAULT 0,
    reopened_count BIGINT NOT NULL DEFAULT 0,
    start_time     BIGINT NOT NULL,
    finish_time    BIGINT
);
CREATE INDEX settlement_runs_by_request ON settlement_runs (request_id);

-- The report's lines, staged so that questions about the whole report (is a key listed twice,
-- which PAID payouts does it lack) are answered by the database, never held in memory. Kept as
-- the record of what the backend reported.
CREATE TABLE settlement_lines (
    run_id          TEXT NOT NULL REFERENCES settlement_runs (run_id),
    idempotency_key TEXT NOT NULL,
    amount_krw      BIGINT NOT NULL,
    status          TEXT NOT NULL,
    -- 0 when the report gives no time.
    settled_time    BIGINT NOT NULL,
    PRIMARY KEY (run_id, idempotency_key)
);

-- A report line may name a key a retry has since replaced: find its disbursement by the
-- attempts made under it.
CREATE INDEX disbursement_attempts_by_key ON disbursement_attempts (idempotency_key);
