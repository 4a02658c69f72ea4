//! Batch isolation: rows written together (in one statement or one transaction) must not fail
//! together because of one of them. A batch that fails as a whole, for a reason one of its rows
//! may have caused, is written again in halves, down to the rows that fail alone; every other
//! row is stored and answered as if the batch had gone through.

use std::future::Future;
use std::ops::Range;

use super::{Result, StoreError};

/// Whether `e`, the failure of a write of several rows, may have been caused by one of them
/// (a value, constraint or trigger the database refused) rather than by the database itself
/// (unreachable, out of resources, shutting down) or by a statement no row could pass.
pub fn may_be_a_rows_fault(e: &StoreError) -> bool {
    let StoreError::Unexpected(error) = e else {
        return false;
    };
    let Some(error) = error.chain().find_map(|c| c.downcast_ref::<sqlx::Error>()) else {
        return false;
    };
    match error {
        sqlx::Error::Database(db) => {
            if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                // SQLSTATE classes of the connection, the server or the transaction, and of
                // statements wrong for every row: 08 connection, 0A not supported, 25 transaction
                // state, 28 authorization, 3D/3F no such database/schema, 40 rolled back, 42 syntax
                // or access, 53 resources, 57 operator intervention, 58 system, XX internal.
                let class = pg.code().get(..2).unwrap_or_default();
                !matches!(
                    class,
                    "08" | "0A"
                        | "25"
                        | "28"
                        | "3D"
                        | "3F"
                        | "40"
                        | "42"
                        | "53"
                        | "57"
                        | "58"
                        | "XX"
                )
            } else if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                // The primary result codes a value can cause: TOOBIG, CONSTRAINT (checks,
                // keys, and triggers' RAISE) and MISMATCH. The others are of the database
                // file, the connection, the lock or the statement.
                let code = db
                    .code()
                    .and_then(|c| c.parse::<i32>().ok())
                    .unwrap_or_default();
                matches!(code & 0xff, 18..=20)
            } else {
                false
            }
        }
        sqlx::Error::Encode(_) | sqlx::Error::Decode(_) | sqlx::Error::ColumnDecode { .. } => true,
        _ => false,
    }
}

/// Writes rows `0..rows` with `write`, which writes a range of them at once and answers each row
/// of it, in order (`Err`: nothing of the range was written). Answers each row: `Ok` with what
/// the write that stored it answered, or `Err` with the failure of the smallest write it was in.
///
/// A range that fails for a reason one of its rows may have caused ([`may_be_a_rows_fault`]) is
/// written again as two halves, the first half first (so a row is still written after the rows
/// before it), down to single rows: k refused rows among n cost O(k log n) more writes. A
/// failure no row causes fails every row of its range at once, without more writes. The first
/// write is always of every row, even of none.
pub async fn write_isolating<A, F, Fut>(
    batch: &'static str,
    rows: usize,
    mut write: F,
) -> Vec<Result<A>>
where
    F: FnMut(Range<usize>) -> Fut,
    Fut: Future<Output = Result<Vec<A>>>,
{
    let mut answers: Vec<Option<Result<A>>> = (0..rows).map(|_| None).collect();
    // Ranges still to write, the next one last.
    let mut ranges = Vec::new();
    ranges.push(0..rows);
    let (mut writes, mut isolated) = (0_usize, 0_usize);
    while let Some(range) = ranges.pop() {
        writes += 1;
        let error = match write(range.clone()).await {
            Ok(written) if written.len() == range.len() => {
                for (slot, answer) in answers[range].iter_mut().zip(written) {
                    *slot = Some(Ok(answer));
                }
                continue;
            }
            Ok(written) => {
                tracing::error!(
                    batch,
                    rows = range.len(),
                    answers = written.len(),
                    "a batch write answered the wrong number of rows"
                );
                StoreError::Unexpected(anyhow::anyhow!("the batch write lost a row"))
            }
            Err(e) if range.len() > 1 && may_be_a_rows_fault(&e) => {
                let middle = range.start + range.len() / 2;
                ranges.push(middle..range.end);
                ranges.push(range.start..middle);
                continue;
            }
            Err(e) => e,
        };
        if writes > 1 && range.len() == 1 && may_be_a_rows_fault(&error) {
            isolated += 1;
        }
        // The first row gets the error itself; the others (nothing of theirs was written
        // either) a copy of the same kind: a database out of reach is every row's answer.
        let copies: Vec<StoreError> = (1..range.len()).map(|_| error.for_another_row()).collect();
        let mut slots = answers[range].iter_mut();
        if let Some(first) = slots.next() {
            *first = Some(Err(error));
        }
        for (slot, copy) in slots.zip(copies) {
            *slot = Some(Err(copy));
        }
    }
    if writes > 1 {
        tracing::warn!(
            batch,
            rows,
            isolated,
            writes,
            "a batch failed as a whole; its rows were written apart, and the rows refused alone isolated"
        );
    }
    answers
        .into_iter()
        .map(|a| {
            a.unwrap_or_else(|| {
                Err(StoreError::Unexpected(anyhow::anyhow!(
                    "a row of the batch was not answered"
                )))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    fn refused_row() -> StoreError {
        sqlx::Error::Encode("a value the database refuses".into()).into()
    }

    fn database_down() -> StoreError {
        sqlx::Error::PoolTimedOut.into()
    }

    /// Writes rows `0..rows`, a write failing with `fault` when it holds a row of `poisoned`,
    /// else answering each row its index. Returns the answers and the ranges written, in order.
    async fn write(
        rows: usize,
        poisoned: &[usize],
        fault: fn() -> StoreError,
    ) -> (Vec<Result<usize>>, Vec<Range<usize>>) {
        let writes = Mutex::new(Vec::new());
        let answers = write_isolating("test", rows, |range: Range<usize>| {
            writes.lock().expect("lock").push(range.clone());
            let failed = poisoned.iter().any(|p| range.contains(p));
            async move {
                if failed {
                    Err(fault())
                } else {
                    Ok(range.collect())
                }
            }
        })
        .await;
        (answers, writes.into_inner().expect("lock"))
    }

    #[tokio::test]
    async fn only_the_refused_rows_fail_and_the_rest_are_written_in_order() {
        let poisoned: Vec<usize> = (3..100).step_by(10).collect();
        let (answers, writes) = write(100, &poisoned, refused_row).await;
        for (i, answer) in answers.iter().enumerate() {
            match answer {
                Ok(row) => assert_eq!(*row, i),
                Err(e) => {
                    assert!(poisoned.contains(&i), "row {i} failed: {e}");
                    assert!(may_be_a_rows_fault(e), "row {i} has the database's error");
                }
            }
        }
        assert_eq!(answers.iter().filter(|a| a.is_err()).count(), 10);
        // k refused rows among n: at most 2k log2(n) more writes.
        assert!(writes.len() <= 1 + 2 * 10 * 7, "{} writes", writes.len());
        // Parts are written first to last, so a row comes after the rows before it.
        let written: Vec<&Range<usize>> = writes
            .iter()
            .filter(|r| !poisoned.iter().any(|p| r.contains(p)))
            .collect();
        assert!(
            written.windows(2).all(|w| w[0].end <= w[1].start),
            "{writes:?}"
        );
    }

    #[tokio::test]
    async fn a_failure_no_row_causes_fails_every_row_at_once() {
        let (answers, writes) = write(50, &[7], database_down).await;
        assert_eq!(writes.len(), 1, "{writes:?}");
        assert_eq!(writes[0], 0..50);
        assert!(
            answers
                .iter()
                .all(|a| matches!(a, Err(StoreError::Unavailable(_)))),
            "every row's caller hears the database is out of reach"
        );
        assert!(!may_be_a_rows_fault(&database_down()));
    }

    #[tokio::test]
    async fn a_batch_of_no_rows_is_written_once() {
        let (answers, writes) = write(0, &[], refused_row).await;
        assert!(answers.is_empty());
        assert_eq!(writes.len(), 1, "{writes:?}");
        assert_eq!(writes[0], 0..0);
    }

    #[tokio::test]
    async fn a_row_every_write_refuses_fails_alone() {
        let (answers, _) = write(1, &[0], refused_row).await;
        assert!(matches!(answers.as_slice(), [Err(_)]));
        let (answers, writes) = write(2, &[0, 1], refused_row).await;
        assert!(answers.iter().all(Result::is_err));
        assert_eq!(writes, [0..2, 0..1, 1..2]);
    }

    #[tokio::test]
    async fn a_write_that_loses_a_row_fails_its_rows() {
        let answers = write_isolating("test", 3, |_: Range<usize>| async { Ok(vec![1, 2]) }).await;
        assert!(answers.iter().all(Result::is_err));
    }

    #[tokio::test]
    async fn a_row_a_sqlite_trigger_refuses_is_a_rows_fault() {
        use sqlx::Connection as _;
        let mut conn = sqlx::SqliteConnection::connect("sqlite::memory:")
            .await
            .expect("in-memory database");
        sqlx::raw_sql(
            "CREATE TABLE t (v TEXT NOT NULL); \
             CREATE TRIGGER refuse BEFORE INSERT ON t WHEN NEW.v = 'bad' \
             BEGIN SELECT RAISE(ABORT, 'refused'); END;",
        )
        .execute(&mut conn)
        .await
        .expect("schema");
        let refused: StoreError = sqlx::query("INSERT INTO t (v) VALUES ('bad')")
            .execute(&mut conn)
            .await
            .expect_err("the trigger refuses the row")
            .into();
        assert!(may_be_a_rows_fault(&refused), "{refused:#}");
        // A statement wrong for every row is not split.
        let wrong: StoreError = sqlx::query("SELECT * FROM no_such_table")
            .execute(&mut conn)
            .await
            .expect_err("no such table")
            .into();
        assert!(!may_be_a_rows_fault(&wrong), "{wrong:#}");
    }
}
