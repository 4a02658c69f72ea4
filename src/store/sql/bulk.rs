//! Bulk intake in SQL, for both databases: a batch of partners or claims written in one
//! transaction with set-based statements, so a batch of N rows costs a handful of statements
//! and one commit instead of N. The waves and inserts are planned in
//! [`crate::store::intake`]; here they run.
//!
//! - request ids are taken first (`INSERT .. ON CONFLICT DO NOTHING`), as the one-row path
//!   does, so a concurrent call with the same id waits for us and then replays, or we for it;
//! - a row refused after its id was taken gives the id back, as a rolled-back call would.
//!
//! A concurrent writer can still slip in between a check and an insert (a unique violation) or
//! PostgreSQL can pick the transaction to break a deadlock: then the whole batch is rolled back
//! and redone row by row through the one-row methods, whose answers are the reference
//! ([`RowByRow`]); each row written so commits with its audit entry.

use std::collections::{BTreeMap, HashMap, HashSet};

use sqlx::{FromRow as _, QueryBuilder, Row as _};

use super::audit::insert_audit;
use super::{Conn, Db, DbRow, SqlStore, Tx, execute_pieces, fetch_pieces};
use crate::store::batch::{BatchSql, Lookup, not_written_whole};
use crate::store::idempotency::{KeyedEarlier, replay_of};
use crate::store::intake::{
    Answers, BulkError, BulkResult, REQUEST_KEY, request_ids_insert, request_key,
};
use crate::store::rows::unexpected;
use crate::store::{
    AuditEvent, BatchAudit, Idempotency, Micros, Recorded, Render, Result, StoreError, Stored,
};

/// The statements of a batch in this database's form.
pub(super) type BatchStatements = super::Pieces;

/// Rows whose column (the last word of `head`) is one of `values`, each value looked up
/// through the column's index ([`BatchSql::select_each`]): a plan of that shape stays right
/// however large a bulk load makes the table, so it is kept prepared.
pub(super) async fn select_in(
    conn: &mut Conn,
    head: &str,
    values: Vec<String>,
    tail: &str,
) -> BulkResult<Vec<DbRow>> {
    let mut rows = Vec::new();
    for mut qb in <Db as BatchSql>::select_each(head, values, tail) {
        // On PostgreSQL the text is the same for any number of values.
        let statement = qb.build().persistent(<Db as BatchSql>::PREPARED);
        rows.extend(statement.fetch_all(&mut *conn).await?);
    }
    Ok(rows)
}

/// Runs a statement of [`BatchSql::insert_whole`] on its own, as its own transaction (its feed
/// events included): true if it stored every row, false if it stored none because a row was
/// not new.
pub(super) async fn written_whole(
    store: &SqlStore,
    mut statement: QueryBuilder<Db>,
) -> BulkResult<bool> {
    let mut lease = store.held.take(&store.pool).await?;
    let written = match statement
        .build()
        .persistent(true)
        .execute(&mut *lease.conn)
        .await
    {
        Ok(_) => {
            store.feed_committed();
            true
        }
        Err(sqlx::Error::Database(e)) if not_written_whole(&*e) => false,
        // The connection goes back to the pool, which checks it before it is used again.
        Err(e) => return Err(e.into()),
    };
    store.held.keep(lease);
    Ok(written)
}

pub(super) async fn execute(tx: &mut Tx, statements: BatchStatements) -> BulkResult<()> {
    Ok(execute_pieces(tx, statements).await?)
}

/// Takes the request ids that are new (see [`request_ids_insert`]) and, in the same
/// round trip where the database allows, runs `lookup`. Returns the requests taken, by
/// [`request_key`] (the others were used before), and the lookup's values by key.
pub(super) async fn take_request_ids_and_look_up(
    tx: &mut Tx,
    idems: Vec<(&Idempotency, Option<Vec<u8>>)>,
    now: Micros,
    lookup: Lookup<'_>,
) -> BulkResult<(HashSet<String>, HashMap<String, String>)> {
    let statements =
        <Db as BatchSql>::insert_and_lookup(request_ids_insert(idems, now), REQUEST_KEY, lookup);
    let mut taken = HashSet::new();
    let mut found = HashMap::new();
    for row in fetch_pieces(tx, statements).await? {
        let part: String = row.try_get("part")?;
        let a: String = row.try_get("a")?;
        if part == "inserted" {
            taken.insert(a);
        } else {
            found.insert(a, row.try_get::<String, _>("b")?);
        }
    }
    Ok((taken, found))
}

/// Takes the request ids that are new (see [`request_ids_insert`]); returns the
/// requests taken, by [`request_key`]. The others were used before.
pub(super) async fn take_request_ids(
    tx: &mut Tx,
    idems: Vec<(&Idempotency, Option<Vec<u8>>)>,
    now: Micros,
) -> BulkResult<HashSet<String>> {
    let mut insert = request_ids_insert(idems, now);
    insert.tail = concat!(
        " ON CONFLICT (request_id, principal) DO NOTHING ",
        "RETURNING request_id || '/' || principal AS request_key"
    );
    let rows = fetch_pieces(tx, <Db as BatchSql>::insert_all(vec![insert])).await?;
    let mut taken = HashSet::new();
    for row in &rows {
        taken.insert(row.try_get::<String, _>("request_key")?);
    }
    Ok(taken)
}

/// Rows of a batch that share no key (their request, and whatever else two rows of the kind
/// may not share), written together: `wave` are their places in `rows`.
pub(super) struct Wave<'a, R, T> {
    pub rows: &'a [R],
    pub wave: &'a [usize],
    pub render: Render<'a, T>,
    pub now: Micros,
}

impl<'a, R: OneRow<T>, T> Wave<'a, R, T> {
    /// The request ids of the wave's rows, each with the response its row keeps if it is
    /// new: that of its candidate value (`None`: the row is refused anyway).
    pub(super) fn idems<'c>(
        &self,
        candidate: impl Fn(usize) -> Option<&'c T>,
    ) -> Vec<(&'a Idempotency, Option<Vec<u8>>)>
    where
        T: 'c,
    {
        self.wave
            .iter()
            .map(|&i| (self.rows[i].idem(), candidate(i).map(self.render)))
            .collect()
    }

    /// The wave's rows whose request id was `taken` (new), and those whose request id their
    /// principal used before, each with it.
    pub(super) fn split(
        &self,
        taken: &HashSet<String>,
    ) -> (Vec<usize>, Vec<(usize, &'a Idempotency)>) {
        let (fresh, used): (Vec<usize>, Vec<usize>) = self
            .wave
            .iter()
            .partition(|&&i| taken.contains(&request_key(self.rows[i].idem())));
        let used = used.into_iter().map(|i| (i, self.rows[i].idem())).collect();
        (fresh, used)
    }
}

/// The answers to rows whose request id their principal used before, as [`replay_of`]
/// decides for a single call. Other principals' uses of the same ids are not looked at.
pub(super) async fn replays<T>(
    tx: &mut Tx,
    idems: &[(usize, &Idempotency)],
    answers: &mut Answers<T>,
) -> BulkResult<()> {
    if idems.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = idems
        .iter()
        .map(|(_, i)| i.request_id.to_string())
        .collect();
    // By request id alone, which leads the key's index; the principal is matched below.
    let rows = select_in(
        tx,
        "SELECT request_id || '/' || principal AS request_key, method, fingerprint, \
         response FROM idempotency WHERE request_id",
        ids,
        "",
    )
    .await?;
    let mut earlier = HashMap::new();
    for row in &rows {
        let KeyedEarlier {
            request_key,
            earlier: e,
        } = KeyedEarlier::from_row(row)?;
        earlier.insert(request_key, e);
    }
    for (row, idem) in idems {
        answers[*row] = Some(match earlier.remove(&request_key(idem)) {
            None => Err(unexpected("a request id neither new nor recorded")),
            Some(e) => replay_of(idem, e).map(Stored::Replayed),
        });
    }
    Ok(())
}

/// Gives back the request ids of rows refused after taking them, each its own
/// principal's (one statement per principal: rows refused are few).
pub(super) async fn release_request_ids(tx: &mut Tx, idems: &[&Idempotency]) -> BulkResult<()> {
    let mut by_principal: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for idem in idems {
        by_principal
            .entry(idem.principal.as_str())
            .or_default()
            .push(idem.request_id.to_string());
    }
    for (principal, ids) in by_principal {
        let statements = <Db as BatchSql>::matching(
            "DELETE FROM idempotency WHERE request_id",
            ids,
            " AND principal = ",
        );
        for mut qb in statements {
            qb.push_bind(principal.to_owned());
            // Planned afresh each time: a plan made while the table was small (a sequential
            // scan) would otherwise stay while a bulk load makes it large.
            qb.build().persistent(false).execute(&mut **tx).await?;
        }
    }
    Ok(())
}

/// A row of a batch, as its one-row method writes it alone: after a race a batch is redone
/// row by row, and the one-row answers are the reference ([`batch_or_row_by_row`]).
pub(super) trait OneRow<T>: Sync {
    fn idem(&self) -> &Idempotency;

    /// Writes the row alone through its one-row method, recorded as `call` says.
    fn alone(
        &self,
        store: &SqlStore,
        call: Recorded<'_, T>,
    ) -> impl Future<Output = Result<Stored<T>>> + Send;
}

/// The answers to `rows`: those of `batch`, which writes them as one batch or, when a
/// concurrent writer raced it, of each row written alone ([`OneRow::alone`]; `writing` says
/// how in the log), each stored row committed with its audit entry.
pub(super) async fn batch_or_row_by_row<R: OneRow<T>, T: Clone + Send + Sync>(
    batch: impl Future<Output = BulkResult<Vec<Result<Stored<T>>>>>,
    store: &SqlStore,
    rows: &[R],
    render: Render<'_, T>,
    audit: BatchAudit<'_, T>,
    writing: &str,
) -> Result<Vec<Result<Stored<T>>>> {
    match batch.await {
        Ok(answers) => Ok(answers),
        Err(BulkError::Store(e)) => Err(e),
        Err(BulkError::Race) => {
            tracing::debug!(rows = rows.len(), "concurrent writer: {writing} row by row");
            let mut done = RowByRow::new(rows.len(), audit);
            for (i, row) in rows.iter().enumerate() {
                let entry = |value: &T| fresh_entry(audit, i, value);
                let call = Recorded::audited(row.idem(), render, &entry);
                done.answered(i, row.alone(store, call).await);
            }
            Ok(done.finish(store).await)
        }
    }
}

/// The audit entry row `i` of a batch writes with its row when the row is stored.
fn fresh_entry<T: Clone>(audit: BatchAudit<'_, T>, i: usize, value: &T) -> Option<AuditEvent> {
    (audit.row)(i, &Ok(Stored::Fresh(value.clone())))
}

/// A batch answered row by row: each row stored commits with its audit entry (see
/// [`fresh_entry`]); the entries of rows that stored nothing (replayed, refused, or refused
/// before the store) are kept for [`RowByRow::finish`].
struct RowByRow<'a, T> {
    audit: BatchAudit<'a, T>,
    answers: Vec<Result<Stored<T>>>,
    unstored: Vec<AuditEvent>,
}

impl<'a, T: Clone> RowByRow<'a, T> {
    fn new(rows: usize, audit: BatchAudit<'a, T>) -> Self {
        Self {
            audit,
            answers: Vec::with_capacity(rows),
            unstored: audit.refused.to_vec(),
        }
    }

    /// How row `i` was answered.
    fn answered(&mut self, i: usize, answer: Result<Stored<T>>) {
        if !matches!(answer, Ok(Stored::Fresh(_))) {
            self.unstored.extend((self.audit.row)(i, &answer));
        }
        self.answers.push(answer);
    }

    /// Writes the entries of the rows that stored nothing, and answers every row. Never fails:
    /// rows already stored stay so (a failed write of these entries is logged, as the audit
    /// layer logs one).
    async fn finish(self, store: &SqlStore) -> Vec<Result<Stored<T>>> {
        if !self.unstored.is_empty() {
            let written = async {
                let mut tx = store.begin_write().await?;
                insert_audit(&mut tx, &self.unstored).await?;
                tx.commit().await?;
                Ok::<_, StoreError>(())
            }
            .await;
            if let Err(e) = written {
                tracing::error!(error = %e, "audit log write failed");
            }
        }
        self.answers
    }
}
