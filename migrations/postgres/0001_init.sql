-- Partners, claims, disbursements and the outbox that drives payment.
-- Ids are UUIDv7 text (they sort by creation time); times are Unix microseconds.

CREATE TABLE partners (
    partner_id                   TEXT PRIMARY KEY,
    business_registration_number TEXT NOT NULL UNIQUE,
    legal_name                   TEXT NOT NULL,
    representative_name          TEXT NOT NULL,
    affected_services            TEXT NOT NULL,
    bank_code                    TEXT NOT NULL,
    -- AES-256-GCM under a key id, bound to partner_id; never the plain number.
    account_sealed               TEXT NOT NULL,
    account_last4                TEXT NOT NULL,
    holder_name                  TEXT NOT NULL,
    -- Who changed the account last, for the four-eyes rule on retries.
    account_changed_by           TEXT NOT NULL,
    account_change_time          BIGINT NOT NULL,
    contact_email                TEXT NOT NULL,
    create_time                  BIGINT NOT NULL,
    update_time                  BIGINT NOT NULL,
    version                      BIGINT NOT NULL
);

CREATE TABLE idempotency (
    request_id  TEXT PRIMARY KEY,
    method      TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    response    BYTEA,
    create_time BIGINT NOT NULL
);

CREATE TABLE claims (
    claim_id            TEXT PRIMARY KEY,
    partner_id          TEXT NOT NULL UNIQUE REFERENCES partners (partner_id),
    status              TEXT NOT NULL,
    tier                TEXT NOT NULL,
    reported_loss_krw   BIGINT NOT NULL,
    recognized_loss_krw BIGINT NOT NULL,
    compensation_krw    BIGINT NOT NULL CHECK (compensation_krw >= 0),
    policy_version      TEXT NOT NULL,
    items               TEXT NOT NULL,
    decision            TEXT NOT NULL,
    submitted_by        TEXT NOT NULL,
    reviewed_by         TEXT,
    review_reason       TEXT,
    create_time         BIGINT NOT NULL,
    update_time         BIGINT NOT NULL
);
CREATE INDEX claims_by_status ON claims (status, claim_id);

CREATE TABLE evidence (
    claim_id    TEXT NOT NULL REFERENCES claims (claim_id),
    seq         INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    uri         TEXT NOT NULL,
    sha256      TEXT NOT NULL,
    attach_time BIGINT NOT NULL,
    attached_by TEXT NOT NULL,
    PRIMARY KEY (claim_id, seq)
);

CREATE TABLE disbursements (
    disbursement_id TEXT PRIMARY KEY,
    claim_id        TEXT NOT NULL UNIQUE REFERENCES claims (claim_id),
    partner_id      TEXT NOT NULL REFERENCES partners (partner_id),
    amount_krw      BIGINT NOT NULL CHECK (amount_krw > 0),
    status          TEXT NOT NULL,
    -- The account this payout goes to: the partner's at approval, refreshed on retry.
    bank_code       TEXT NOT NULL,
    account_sealed  TEXT NOT NULL,
    account_last4   TEXT NOT NULL,
    holder_name     TEXT NOT NULL,
    failure_code    TEXT,
    failure_message TEXT,
    key_seq         BIGINT NOT NULL DEFAULT 0,
    idempotency_key TEXT UNIQUE,
    holder_verified BOOLEAN NOT NULL DEFAULT FALSE,
    trace_context   TEXT,
    create_time     BIGINT NOT NULL,
    update_time     BIGINT NOT NULL
);
CREATE INDEX disbursements_by_status ON disbursements (status, disbursement_id);
CREATE INDEX disbursements_by_partner ON disbursements (partner_id, disbursement_id);

CREATE TABLE disbursement_attempts (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    disbursement_id TEXT NOT NULL REFERENCES disbursements (disbursement_id),
    operation       TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    outcome         TEXT NOT NULL,
    code            TEXT NOT NULL,
    message         TEXT NOT NULL,
    time            BIGINT NOT NULL
);
CREATE INDEX disbursement_attempts_by_disbursement ON disbursement_attempts (disbursement_id, id);

CREATE TABLE disbursement_events (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    disbursement_id TEXT NOT NULL REFERENCES disbursements (disbursement_id),
    from_status     TEXT,
    to_status       TEXT NOT NULL,
    actor           TEXT NOT NULL,
    reason          TEXT NOT NULL,
    time            BIGINT NOT NULL
);
CREATE INDEX disbursement_events_by_disbursement ON disbursement_events (disbursement_id, id);

CREATE TABLE outbox (
    disbursement_id TEXT PRIMARY KEY REFERENCES disbursements (disbursement_id),
    due_time        BIGINT NOT NULL,
    lease_until     BIGINT NOT NULL DEFAULT 0,
    failures        INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX outbox_by_due_time ON outbox (due_time);

CREATE TABLE dispatch_control (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    paused      BOOLEAN NOT NULL,
    reason      TEXT NOT NULL,
    changed_by  TEXT NOT NULL,
    change_time BIGINT NOT NULL
);
INSERT INTO dispatch_control (id, paused, reason, changed_by, change_time) VALUES (1, FALSE, '', '', 0);

-- History is appended, never rewritten.
CREATE FUNCTION refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME;
END;
$$;
CREATE TRIGGER disbursement_events_append_only BEFORE UPDATE OR DELETE ON disbursement_events
    FOR EACH ROW EXECUTE FUNCTION refuse_change();
CREATE TRIGGER disbursement_attempts_append_only BEFORE UPDATE OR DELETE ON disbursement_attempts
    FOR EACH ROW EXECUTE FUNCTION refuse_change();

-- Every mutating call, allowed or denied.
CREATE TABLE audit_events (
    audit_event_id TEXT PRIMARY KEY,
    time           BIGINT NOT NULL,
    principal      TEXT NOT NULL,
    method         TEXT NOT NULL,
    resource_id    TEXT NOT NULL,
    request_id     TEXT NOT NULL,
    outcome_code   TEXT NOT NULL,
    peer_address   TEXT NOT NULL
);
CREATE INDEX audit_events_by_principal ON audit_events (principal, audit_event_id);
CREATE INDEX audit_events_by_resource ON audit_events (resource_id, audit_event_id);
CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION refuse_change();
-- TRUNCATE skips row triggers; refuse it too.
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change();
