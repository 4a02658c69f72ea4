-- What the programme summary reads: disbursements (count and KRW) and claims (count) by status,
-- kept by the statements that change them instead of counted from every row at each read.
-- SQLite has one writer at a time, so each status has one row, moved by a trigger on each row
-- written in the same transaction as the row.
CREATE TABLE program_totals (
    kind   TEXT NOT NULL CHECK (kind IN ('disbursement', 'claim')),
    status TEXT NOT NULL,
    n      BIGINT NOT NULL,
    krw    BIGINT NOT NULL,
    PRIMARY KEY (kind, status)
);

INSERT INTO program_totals (kind, status, n, krw)
SELECT 'disbursement', status, COUNT(*), COALESCE(SUM(amount_krw), 0) FROM disbursements GROUP BY status;
INSERT INTO program_totals (kind, status, n, krw)
SELECT 'claim', status, COUNT(*), 0 FROM claims GROUP BY status;

CREATE TRIGGER disbursements_totals_insert AFTER INSERT ON disbursements
BEGIN
    INSERT INTO program_totals (kind, status, n, krw)
    VALUES ('disbursement', NEW.status, 1, NEW.amount_krw)
    ON CONFLICT (kind, status) DO UPDATE SET n = n + excluded.n, krw = krw + excluded.krw;
END;
CREATE TRIGGER disbursements_totals_update AFTER UPDATE OF status, amount_krw ON disbursements
BEGIN
    INSERT INTO program_totals (kind, status, n, krw)
    VALUES ('disbursement', OLD.status, -1, -OLD.amount_krw)
    ON CONFLICT (kind, status) DO UPDATE SET n = n + excluded.n, krw = krw + excluded.krw;
    INSERT INTO program_totals (kind, status, n, krw)
    VALUES ('disbursement', NEW.status, 1, NEW.amount_krw)
    ON CONFLICT (kind, status) DO UPDATE SET n = n + excluded.n, krw = krw + excluded.krw;
END;
CREATE TRIGGER disbursements_totals_delete AFTER DELETE ON disbursements
BEGIN
    INSERT INTO program_totals (kind, status, n, krw)
    VALUES ('disbursement', OLD.status, -1, -OLD.amount_krw)
    ON CONFLICT (kind, status) DO UPDATE SET n = n + excluded.n, krw = krw + excluded.krw;
END;
CREATE TRIGGER claims_totals_insert AFTER INSERT ON claims
BEGIN
    INSERT INTO program_totals (kind, status, n, krw) VALUES ('claim', NEW.status, 1, 0)
    ON CONFLICT (kind, status) DO UPDATE SET n = n + excluded.n;
END;
CREATE TRIGGER claims_totals_update AFTER UPDATE OF status ON claims
BEGIN
    INSERT INTO program_totals (kind, status, n, krw) VALUES ('claim', OLD.status, -1, 0)
    ON CONFLICT (kind, status) DO UPDATE SET n = n + excluded.n;
    INSERT INTO program_totals (kind, status, n, krw) VALUES ('claim', NEW.status, 1, 0)
    ON CONFLICT (kind, status) DO UPDATE SET n = n + excluded.n;
END;
CREATE TRIGGER claims_totals_delete AFTER DELETE ON claims
BEGIN
    INSERT INTO program_totals (kind, status, n, krw) VALUES ('claim', OLD.status, -1, 0)
    ON CONFLICT (kind, status) DO UPDATE SET n = n + excluded.n;
END;
