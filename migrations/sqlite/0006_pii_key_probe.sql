-- The key probe: a known value sealed like an account number, written under the first key of
-- the first replica that starts on this database. A replica whose keys cannot open it (nor
-- every stored account number) refuses to start, so a replica with the wrong key never takes
-- payouts it cannot pay. `partner-payouts reseal` re-seals it with the account numbers.
CREATE TABLE pii_key_probe (
    probe_id       TEXT PRIMARY KEY CHECK (probe_id = 'probe'),
    account_sealed TEXT NOT NULL,
    create_time    BIGINT NOT NULL
);
