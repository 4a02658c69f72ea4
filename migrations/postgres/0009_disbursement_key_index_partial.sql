-- A disbursement's idempotency key is unique once it has one. It has none from its approval
-- until the dispatcher first sends it, so every approved claim put a NULL entry into the
-- key's unique index, which no lookup can find (a key is always looked up by equality).
-- The index now holds only the keys given: the same guarantee, one index entry fewer per
-- claim approved.
ALTER TABLE disbursements DROP CONSTRAINT disbursements_idempotency_key_key;
CREATE UNIQUE INDEX disbursements_by_idempotency_key ON disbursements (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
