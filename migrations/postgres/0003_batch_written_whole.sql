-- A batch of intake rows written as one statement either stores every row or none: the
-- statement ends with this check, which fails it (SQLSTATE PB001) when a row was not stored
-- (its request id or registration number was taken meanwhile). The batch is then written the
-- careful way, a statement per step in one transaction.
CREATE FUNCTION batch_written_whole(whole BOOLEAN) RETURNS BOOLEAN
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT whole THEN
        RAISE EXCEPTION 'the batch was not written whole' USING ERRCODE = 'PB001';
    END IF;
    RETURN TRUE;
END;
$$;
