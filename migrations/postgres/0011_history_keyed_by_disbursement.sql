-- A disbursement's events and attempts are only ever read by their disbursement, in order
-- (its history; the settlement reports' paid time). Each table had two indexes for that: its
-- primary key on the generated id alone, which no query reads, and (disbursement_id, id).
-- The primary key is now (disbursement_id, id) and the second index goes: the same reads,
-- the same uniqueness (the id is generated), one index entry fewer for every event and every
-- attempt written. (In SQLite the id is the rowid, which costs no index of its own.)
ALTER TABLE disbursement_events DROP CONSTRAINT disbursement_events_pkey;
ALTER TABLE disbursement_events ADD CONSTRAINT disbursement_events_pkey
    PRIMARY KEY (disbursement_id, id);
DROP INDEX disbursement_events_by_disbursement;

ALTER TABLE disbursement_attempts DROP CONSTRAINT disbursement_attempts_pkey;
ALTER TABLE disbursement_attempts ADD CONSTRAINT disbursement_attempts_pkey
    PRIMARY KEY (disbursement_id, id);
DROP INDEX disbursement_attempts_by_disbursement;
