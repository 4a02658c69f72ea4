-- What the programme summary reads: disbursements (count and KRW) and claims (count) by status,
-- kept by the statements that change them instead of counted from every row at each read.
--
-- Each statement that inserts, updates or deletes disbursements or claims adds a row here for
-- each status whose count or total it moved (a trigger on the statement, from its transition
-- tables), in its own transaction: writers only insert, so they never wait on one another
-- here, and a reader's snapshot sees exactly the changes it sees in the tables themselves. A
-- status's figures are the sum of its rows; the store folds them into one row per status now
-- and then (each fold deletes rows and inserts their sum in one statement).
CREATE TABLE program_totals (
    id     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind   TEXT COLLATE "C" NOT NULL CHECK (kind IN ('disbursement', 'claim')),
    status TEXT COLLATE "C" NOT NULL,
    n      BIGINT NOT NULL,
    krw    BIGINT NOT NULL
);

CREATE FUNCTION program_totals_disbursements() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO program_totals (kind, status, n, krw)
        SELECT 'disbursement', status, COUNT(*), SUM(amount_krw) FROM new_rows GROUP BY status;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO program_totals (kind, status, n, krw)
        SELECT 'disbursement', status, SUM(n), SUM(krw)
        FROM (SELECT status, -1 AS n, -amount_krw AS krw FROM old_rows
              UNION ALL
              SELECT status, 1, amount_krw FROM new_rows) AS moved
        GROUP BY status
        HAVING SUM(n) <> 0 OR SUM(krw) <> 0;
    ELSE
        INSERT INTO program_totals (kind, status, n, krw)
        SELECT 'disbursement', status, -COUNT(*), -SUM(amount_krw) FROM old_rows GROUP BY status;
    END IF;
    RETURN NULL;
END;
$$;

CREATE FUNCTION program_totals_claims() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO program_totals (kind, status, n, krw)
        SELECT 'claim', status, COUNT(*), 0 FROM new_rows GROUP BY status;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO program_totals (kind, status, n, krw)
        SELECT 'claim', status, SUM(n), 0
        FROM (SELECT status, -1 AS n FROM old_rows
              UNION ALL
              SELECT status, 1 FROM new_rows) AS moved
        GROUP BY status
        HAVING SUM(n) <> 0;
    ELSE
        INSERT INTO program_totals (kind, status, n, krw)
        SELECT 'claim', status, -COUNT(*), 0 FROM old_rows GROUP BY status;
    END IF;
    RETURN NULL;
END;
$$;

-- Creating a trigger locks its table against writers until this migration commits, so the
-- figures counted below are exactly those the triggers carry on from.
CREATE TRIGGER disbursements_totals_insert AFTER INSERT ON disbursements
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION program_totals_disbursements();
CREATE TRIGGER disbursements_totals_update AFTER UPDATE ON disbursements
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION program_totals_disbursements();
CREATE TRIGGER disbursements_totals_delete AFTER DELETE ON disbursements
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION program_totals_disbursements();
CREATE TRIGGER claims_totals_insert AFTER INSERT ON claims
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION program_totals_claims();
CREATE TRIGGER claims_totals_update AFTER UPDATE ON claims
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION program_totals_claims();
CREATE TRIGGER claims_totals_delete AFTER DELETE ON claims
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION program_totals_claims();

INSERT INTO program_totals (kind, status, n, krw)
SELECT 'disbursement', status, COUNT(*), COALESCE(SUM(amount_krw), 0) FROM disbursements GROUP BY status;
INSERT INTO program_totals (kind, status, n, krw)
SELECT 'claim', status, COUNT(*), 0 FROM claims GROUP BY status;
