//! The dispatcher's bookkeeping in SQL, a leased batch at a time: a round of the dispatcher
//! costs a constant number of transactions however many disbursements it works on.
//!
//! - [`DispatchStore::lease_batch`] leases due outbox rows and reads their disbursements;
//! - [`DispatchStore::record_dispatch`] writes what the backend answered for a batch
//!   (attempts, holders verified, final states with their history, rows made due again) and
//!   makes instruction keys, in one transaction, with multi-row statements;
//! - [`DispatchStore::renew_leases`] keeps a long round's rows from being taken over.
//!
//! A batch's rows go to the database as a table `v` (columns `column1`, `column2`, ...), built
//! by [`BatchSql::table`]: on PostgreSQL its columns are bound as arrays (`UNNEST`), so each
//! statement's text is the same for any number of rows and is prepared once per connection; on
//! SQLite they are a `VALUES` list, cut into pieces under the bind-parameter limit.
//!
//! A disbursement's row is written before its outbox row (as `CancelDisbursement` does), and
//! `dispatch_control`, which serialises key assignment across replicas, is locked after the
//! batch's attempts, final states and released rows are written, so that it is held briefly.
//! Reads take no row locks: every status change is an update guarded by the status it
//! expects, which a concurrent cancel makes fail.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use payouts_macros::store_span;
use sqlx::FromRow as _;

use super::disbursements::load_dispatch_state;
use super::{DB_SYSTEM, Db, DbRow, SqlStore, Tx, dialect, fetch_pieces};
use crate::domain::{DisbursementId, DisbursementStatus, Krw, PayoutRef, StatusMove};
use crate::store::batch::{BatchSql, Column as Col};
use crate::store::rows::{DisbursementRow, unexpected, uuid};
use crate::store::{
    Attempt, Disbursement, DispatchOutcome, DispatchRecord, DispatchStore, DispatchTerms,
    KeyAssignment, Micros, Requeue, Result, StoreError, retry_contention,
};

/// The actor of the dispatcher's status changes, in the history and the feed.
const DISPATCHER: &str = "dispatcher";

/// Runs `head v tail` with the batch's rows as the table `v`, in as many statements as
/// the database needs; returns the rows they answered.
async fn rows(tx: &mut Tx, head: &str, columns: Vec<Col<'_>>, tail: &str) -> Result<Vec<DbRow>> {
    let statements = <Db as BatchSql>::table(head, columns, tail);
    Ok(fetch_pieces(tx, statements).await?)
}

fn ids<'a>(ids: impl IntoIterator<Item = &'a DisbursementId>) -> Col<'static> {
    Col::Text(ids.into_iter().map(|id| id.to_string().into()).collect())
}

/// A disbursement id a statement answered, with its status where it answers one.
#[derive(sqlx::FromRow)]
struct IdRow {
    disbursement_id: String,
    #[sqlx(default)]
    status: String,
}

impl IdRow {
    fn read(row: &DbRow) -> Result<(DisbursementId, Self)> {
        let id_row = Self::from_row(row)?;
        Ok((uuid("disbursement_id", &id_row.disbursement_id)?, id_row))
    }

    fn status(&self) -> Result<DisbursementStatus> {
        DisbursementStatus::from_key(&self.status)
            .ok_or_else(|| unexpected(format!("status: {}", self.status)))
    }
}

async fn lease_in(
    tx: &mut Tx,
    now: Micros,
    lease_until: Micros,
    limit: u32,
) -> Result<Vec<Disbursement>> {
    if load_dispatch_state(tx).await?.paused {
        return Ok(Vec::new());
    }
    // Planned afresh at each lease, for the outbox as it is then. A plan kept prepared is the
    // one made at the connection's first leases, while the outbox was small: it reads the
    // whole outbox (a sequential scan, every due row sorted) at every lease once a backlog
    // builds up, which is when the dispatcher most needs to keep up.
    let leased: Vec<String> = sqlx::query_scalar(dialect::LEASE_DUE)
        .bind(lease_until)
        .bind(now)
        .bind(i64::from(limit))
        .persistent(false)
        .fetch_all(&mut **tx)
        .await?;
    let found = rows(
        tx,
        "SELECT * FROM disbursements WHERE disbursement_id IN (SELECT column1 FROM ",
        vec![Col::owned_text(leased)],
        ") ORDER BY disbursement_id",
    )
    .await?;
    found
        .iter()
        .map(|row| Disbursement::try_from(DisbursementRow::from_row(row)?))
        .collect()
}

async fn insert_attempts(tx: &mut Tx, attempts: &[(DisbursementId, Attempt)]) -> Result<()> {
    let text = |f: fn(&Attempt) -> &str| {
        Col::Text(attempts.iter().map(|(_, a)| f(a).into()).collect())
    };
    // Rows go in in the order of the list, which is the order of their ids.
    rows(
        tx,
        "INSERT INTO disbursement_attempts (disbursement_id, operation, idempotency_key, \
         outcome, code, message, time) \
         SELECT column1, column2, column3, column4, column5, column6, column7 FROM ",
        vec![
            ids(attempts.iter().map(|(id, _)| id)),
            text(|a| a.operation.as_str()),
            text(|a| &a.idempotency_key),
            text(|a| a.outcome.as_str()),
            text(|a| &a.code),
            text(|a| &a.message),
            Col::BigInt(attempts.iter().map(|(_, a)| a.time).collect()),
        ],
        "",
    )
    .await?;
    Ok(())
}

/// One status change of the history, by the dispatcher.
struct Move<'a> {
    disbursement_id: DisbursementId,
    from: DisbursementStatus,
    to: DisbursementStatus,
    reason: &'a str,
    /// The code a failure leaves.
    failure_code: Option<&'a str>,
}

/// What a status update answers of each disbursement it moved, for the feed.
const RETURNING_PAYOUT: &str = " RETURNING disbursement_id, claim_id, partner_id, amount_krw";

#[derive(sqlx::FromRow)]
struct PayoutRow {
    disbursement_id: String,
    claim_id: String,
    partner_id: String,
    amount_krw: i64,
}

/// The payouts a status update moved ([`RETURNING_PAYOUT`]), by id.
fn moved_payouts(rows: &[DbRow]) -> Result<HashMap<DisbursementId, PayoutRef>> {
    rows.iter()
        .map(|row| {
            let r = PayoutRow::from_row(row)?;
            let disbursement_id = uuid("disbursement_id", &r.disbursement_id)?;
            let payout = PayoutRef {
                disbursement_id,
                claim_id: uuid("claim_id", &r.claim_id)?,
                partner_id: uuid("partner_id", &r.partner_id)?,
                amount_krw: Krw::new(r.amount_krw),
            };
            Ok((disbursement_id, payout))
        })
        .collect()
}

/// The history entries of the `moved` among `moves`, with their feed events.
async fn insert_events(
    tx: &mut Tx,
    moves: &[Move<'_>],
    moved: &HashMap<DisbursementId, PayoutRef>,
    now: Micros,
) -> Result<()> {
    let events: Vec<(&Move<'_>, &PayoutRef)> = moves
        .iter()
        .filter_map(|m| Some((m, moved.get(&m.disbursement_id)?)))
        .collect();
    for (m, payout) in &events {
        tx.emit(payout.status_changed(StatusMove {
            from: Some(m.from),
            to: m.to,
            failure_code: m.failure_code,
            actor: DISPATCHER,
            reason: m.reason,
            time: now,
        }));
    }
    let events: Vec<&Move<'_>> = events.into_iter().map(|(m, _)| m).collect();
    let text =
        |f: &dyn Fn(&Move<'_>) -> String| Col::Text(events.iter().map(|e| f(e).into()).collect());
    rows(
        tx,
        "INSERT INTO disbursement_events (disbursement_id, from_status, to_status, actor, \
         reason, time) SELECT column1, column2, column3, column4, column5, column6 FROM ",
        vec![
            ids(events.iter().map(|e| &e.disbursement_id)),
            text(&|e| e.from.key().to_owned()),
            text(&|e| e.to.key().to_owned()),
            text(&|_| DISPATCHER.to_owned()),
            text(&|e| e.reason.to_owned()),
            Col::BigInt(vec![now; events.len()]),
        ],
        "",
    )
    .await?;
    Ok(())
}

/// Makes each of `moves` whose disbursement is still in its `from` status, with its history
/// entry; returns the ids that moved.
async fn transition_all(
    tx: &mut Tx,
    moves: &[Move<'_>],
    now: Micros,
) -> Result<HashSet<DisbursementId>> {
    let moved = rows(
        tx,
        "UPDATE disbursements SET status = v.column3, update_time = v.column4 FROM ",
        vec![
            ids(moves.iter().map(|m| &m.disbursement_id)),
            Col::Text(moves.iter().map(|m| m.from.key().into()).collect()),
            Col::Text(moves.iter().map(|m| m.to.key().into()).collect()),
            Col::BigInt(vec![now; moves.len()]),
        ],
        &format!(
            " WHERE disbursements.disbursement_id = v.column1 \
             AND disbursements.status = v.column2{RETURNING_PAYOUT}"
        ),
    )
    .await?;
    let moved = moved_payouts(&moved)?;
    insert_events(tx, moves, &moved, now).await?;
    Ok(moved.into_keys().collect())
}

/// The statuses of `disbursements` now.
async fn statuses(
    tx: &mut Tx,
    disbursements: Col<'_>,
) -> Result<HashMap<DisbursementId, DisbursementStatus>> {
    let found = rows(
        tx,
        "SELECT disbursement_id, status FROM disbursements \
         WHERE disbursement_id IN (SELECT column1 FROM ",
        vec![disbursements],
        ")",
    )
    .await?;
    let mut status = HashMap::with_capacity(found.len());
    for row in &found {
        let (id, row) = IdRow::read(row)?;
        status.insert(id, row.status()?);
    }
    Ok(status)
}

/// Ends the dispatch of `finished`: each still in a status that may become `PAID` or
/// `FAILED` moves there with its history (a failure with its code), and its outbox row
/// is removed.
async fn finish(
    tx: &mut Tx,
    finished: &[(DisbursementId, DispatchOutcome)],
    now: Micros,
) -> Result<()> {
    if finished.is_empty() {
        return Ok(());
    }
    let status = statuses(tx, ids(finished.iter().map(|(id, _)| id))).await?;
    let mut moves = Vec::with_capacity(finished.len());
    for (id, outcome) in finished {
        let from = *status.get(id).ok_or(StoreError::NotFound("disbursement"))?;
        let (to, reason, failure_code) = match outcome {
            DispatchOutcome::Paid => (DisbursementStatus::Paid, "backend reports paid", None),
            DispatchOutcome::Failed { code, .. } => (
                DisbursementStatus::Failed,
                code.as_str(),
                Some(code.as_str()),
            ),
        };
        if from.can_become(to) {
            moves.push(Move {
                disbursement_id: *id,
                from,
                to,
                reason,
                failure_code,
            });
        }
    }
    let moved = transition_all(tx, &moves, now).await?;
    // Only a disbursement that really fails now (not one cancelled meanwhile) takes the
    // failure code.
    let failures: Vec<(&DisbursementId, &String, &String)> = finished
        .iter()
        .filter(|(id, _)| moved.contains(id))
        .filter_map(|(id, outcome)| match outcome {
            DispatchOutcome::Failed { code, message } => Some((id, code, message)),
            DispatchOutcome::Paid => None,
        })
        .collect();
    rows(
        tx,
        "UPDATE disbursements SET failure_code = v.column2, failure_message = v.column3 FROM ",
        vec![
            ids(failures.iter().map(|(id, _, _)| *id)),
            Col::Text(
                failures
                    .iter()
                    .map(|(_, code, _)| code.as_str().into())
                    .collect(),
            ),
            Col::Text(
                failures
                    .iter()
                    .map(|(_, _, message)| message.as_str().into())
                    .collect(),
            ),
        ],
        " WHERE disbursements.disbursement_id = v.column1",
    )
    .await?;
    rows(
        tx,
        "DELETE FROM outbox WHERE disbursement_id IN (SELECT column1 FROM ",
        vec![ids(finished.iter().map(|(id, _)| id))],
        ")",
    )
    .await?;
    Ok(())
}

/// An outbox row's failures so far, as counted.
#[derive(sqlx::FromRow)]
struct FailuresRow {
    disbursement_id: String,
    failures: i32,
}

/// Releases the leases of `requeued` and makes each row due again: at its time, or at
/// the back-off for its failures so far after counting one more.
async fn requeue(
    tx: &mut Tx,
    requeued: &[(DisbursementId, Requeue)],
    back_off: &(dyn Fn(u32) -> Micros + Send + Sync),
) -> Result<()> {
    let mut failures = HashMap::new();
    let backing_off = requeued
        .iter()
        .filter(|(_, r)| *r == Requeue::BackOff)
        .map(|(id, _)| id);
    for row in rows(
        tx,
        "UPDATE outbox SET failures = failures + 1 \
         WHERE disbursement_id IN (SELECT column1 FROM ",
        vec![ids(backing_off)],
        ") RETURNING disbursement_id, failures",
    )
    .await?
    {
        let row = FailuresRow::from_row(&row)?;
        let n = row.failures.max(0).unsigned_abs();
        failures.insert(
            uuid::<DisbursementId>("disbursement_id", &row.disbursement_id)?,
            n,
        );
    }
    let due: Vec<(&DisbursementId, Micros)> = requeued
        .iter()
        .filter_map(|(id, r)| match r {
            Requeue::At(at) => Some((id, *at)),
            // A row that is gone (finished meanwhile) has nothing to make due.
            Requeue::BackOff => failures.get(id).map(|&n| (id, back_off(n))),
        })
        .collect();
    rows(
        tx,
        "UPDATE outbox SET lease_until = 0, due_time = v.column2 FROM ",
        vec![
            ids(due.iter().map(|(id, _)| *id)),
            Col::BigInt(due.iter().map(|(_, at)| *at).collect()),
        ],
        " WHERE outbox.disbursement_id = v.column1",
    )
    .await?;
    Ok(())
}

/// What key assignment needs of a disbursement.
#[derive(sqlx::FromRow)]
struct KeyRow {
    disbursement_id: String,
    status: String,
    amount_krw: i64,
    key_seq: i64,
    idempotency_key: Option<String>,
}

/// What key assignment answers each disbursement, and the keys it makes (by disbursement).
type KeysMade = (Vec<KeyAssignment>, Vec<(DisbursementId, String)>);

/// The answer for each of `ids` (in order) given their rows, the budget counting the keys
/// made earlier in the batch on top of `committed` (what is sent or paid already); and the
/// keys to make.
fn decide_keys(
    ids: &[DisbursementId],
    found: &HashMap<DisbursementId, (DisbursementStatus, KeyRow)>,
    budget_krw: Option<Krw>,
    mut committed: Option<i128>,
) -> Result<KeysMade> {
    let mut answers = Vec::with_capacity(ids.len());
    let mut making: Vec<(DisbursementId, String)> = Vec::new();
    for id in ids {
        let Some((status, row)) = found.get(id) else {
            return Err(StoreError::NotFound("disbursement"));
        };
        match (status, &row.idempotency_key) {
            (DisbursementStatus::Submitted, Some(key)) => {
                answers.push(KeyAssignment::Key(key.clone()));
                continue;
            }
            (DisbursementStatus::Queued, _) => {}
            _ => {
                answers.push(KeyAssignment::Gone);
                continue;
            }
        }
        if let (Some(budget), Some(sum)) = (budget_krw, committed.as_mut()) {
            if *sum + i128::from(row.amount_krw) > i128::from(budget.won()) {
                answers.push(KeyAssignment::OverBudget);
                continue;
            }
            *sum += i128::from(row.amount_krw);
        }
        // Derived, not random: a crash between storing and sending resends the same key.
        let key = format!("{id}-{}", row.key_seq);
        making.push((*id, key.clone()));
        answers.push(KeyAssignment::Key(key));
    }
    Ok((answers, making))
}

/// The rows of `ids` key assignment looks at, and (with a budget) what is committed already.
async fn key_rows(
    tx: &mut Tx,
    ids_to_key: &[DisbursementId],
    budget_krw: Option<Krw>,
) -> Result<(
    HashMap<DisbursementId, (DisbursementStatus, KeyRow)>,
    Option<i128>,
)> {
    let mut found = HashMap::new();
    for row in rows(
        tx,
        "SELECT disbursement_id, status, amount_krw, key_seq, idempotency_key \
         FROM disbursements WHERE disbursement_id IN (SELECT column1 FROM ",
        vec![ids(ids_to_key)],
        ")",
    )
    .await?
    {
        let row = KeyRow::from_row(&row)?;
        let status = DisbursementStatus::from_key(&row.status)
            .ok_or_else(|| unexpected(format!("status: {}", row.status)))?;
        found.insert(
            uuid("disbursement_id", &row.disbursement_id)?,
            (status, row),
        );
    }
    let mut committed = None;
    if budget_krw.is_some() {
        // The kept figures (migration 0010), not a sum over every disbursement.
        let sum: i64 = sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(krw), 0) AS BIGINT) FROM program_totals \
             WHERE kind = 'disbursement' AND status IN ($1, $2)",
        )
        .bind(DisbursementStatus::Submitted.key())
        .bind(DisbursementStatus::Paid.key())
        .fetch_one(&mut **tx)
        .await?;
        committed = Some(i128::from(sum));
    }
    Ok((found, committed))
}

/// Makes (or returns) the instruction keys of `ids` in order and moves each from
/// `QUEUED` to `SUBMITTED`, the budget counting the keys made earlier in the batch;
/// also returns the ids that moved to `SUBMITTED`.
async fn assign_keys(
    tx: &mut Tx,
    ids_to_key: &[DisbursementId],
    budget_krw: Option<Krw>,
    now: Micros,
) -> Result<(Vec<KeyAssignment>, HashSet<DisbursementId>)> {
    if ids_to_key.is_empty() {
        return Ok((Vec::new(), HashSet::new()));
    }
    // One key assignment at a time across replicas keeps the budget check exact. Without a
    // budget each key depends on its own row alone (the rows were leased to this round), so
    // rounds assign keys side by side.
    if budget_krw.is_some() {
        sqlx::query(dialect::LOCK_DISPATCH_CONTROL)
            .fetch_one(&mut **tx)
            .await?;
    }
    let (found, committed) = key_rows(tx, ids_to_key, budget_krw).await?;
    let (answers, making) = decide_keys(ids_to_key, &found, budget_krw, committed)?;
    // Every row sent for has had its holder verified: the flag goes with the key.
    let n = making.len();
    let moved = rows(
        tx,
        "UPDATE disbursements SET idempotency_key = v.column2, holder_verified = TRUE, \
         status = v.column4, update_time = v.column5 FROM ",
        vec![
            ids(making.iter().map(|(id, _)| id)),
            Col::Text(making.iter().map(|(_, key)| key.as_str().into()).collect()),
            Col::Text(vec![DisbursementStatus::Queued.key().into(); n]),
            Col::Text(vec![DisbursementStatus::Submitted.key().into(); n]),
            Col::BigInt(vec![now; n]),
        ],
        &format!(
            " WHERE disbursements.disbursement_id = v.column1 \
             AND disbursements.status = v.column3{RETURNING_PAYOUT}"
        ),
    )
    .await?;
    let moved = moved_payouts(&moved)?;
    let events: Vec<Move<'_>> = making
        .iter()
        .map(|(id, _)| Move {
            disbursement_id: *id,
            from: DisbursementStatus::Queued,
            to: DisbursementStatus::Submitted,
            reason: "instruction key stored before sending",
            failure_code: None,
        })
        .collect();
    insert_events(tx, &events, &moved, now).await?;
    let moved: HashSet<DisbursementId> = moved.into_keys().collect();
    // A row that left QUEUED meanwhile (cancelled) is not moved and gets no key.
    let made: HashSet<&DisbursementId> = making.iter().map(|(id, _)| id).collect();
    let answers = ids_to_key
        .iter()
        .zip(answers)
        .map(|(id, answer)| match answer {
            KeyAssignment::Key(_) if made.contains(id) && !moved.contains(id) => {
                KeyAssignment::Gone
            }
            other => other,
        })
        .collect();
    Ok((answers, moved))
}

async fn record_in(
    tx: &mut Tx,
    record: &DispatchRecord,
    terms: &DispatchTerms<'_>,
) -> Result<Vec<KeyAssignment>> {
    let now = terms.now;
    insert_attempts(tx, &record.attempts).await?;
    finish(tx, &record.finished, now).await?;
    requeue(tx, &record.requeued, terms.back_off).await?;
    let (keys, keyed) = assign_keys(tx, &record.assign_keys, terms.budget_krw, now).await?;
    // A row given its key was marked verified with it, in the same statement.
    rows(
        tx,
        "UPDATE disbursements SET holder_verified = TRUE \
         WHERE disbursement_id IN (SELECT column1 FROM ",
        vec![ids(record.verified.iter().filter(|id| !keyed.contains(id)))],
        ")",
    )
    .await?;
    Ok(keys)
}

#[async_trait]
impl DispatchStore for SqlStore {
    #[store_span]
    async fn outbox_stats(&self) -> Result<(i64, Option<Micros>)> {
        Ok(
            sqlx::query_as("SELECT COUNT(*) AS n, MIN(due_time) AS oldest FROM outbox")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    #[store_span(limit = limit)]
    async fn lease_batch(
        &self,
        now: Micros,
        lease_until: Micros,
        limit: u32,
    ) -> Result<Vec<Disbursement>> {
        retry_contention("lease_batch", move || async move {
            let mut tx = self.begin_write().await?;
            let leased = lease_in(&mut tx, now, lease_until, limit).await?;
            tx.commit().await?;
            Ok(leased)
        })
        .await
    }

    #[store_span(rows = disbursement_ids.len())]
    async fn renew_leases(
        &self,
        disbursement_ids: &[DisbursementId],
        held_until: Micros,
        lease_until: Micros,
    ) -> Result<u64> {
        let n = disbursement_ids.len();
        retry_contention("renew_leases", move || async move {
            let mut tx = self.begin_write().await?;
            let renewed = rows(
                &mut tx,
                "UPDATE outbox SET lease_until = v.column2 FROM ",
                vec![
                    ids(disbursement_ids),
                    Col::BigInt(vec![lease_until; n]),
                    Col::BigInt(vec![held_until; n]),
                ],
                " WHERE outbox.disbursement_id = v.column1 AND outbox.lease_until = v.column3 \
             RETURNING disbursement_id",
            )
            .await?;
            tx.commit().await?;
            Ok(u64::try_from(renewed.len()).unwrap_or(u64::MAX))
        })
        .await
    }

    #[store_span(attempts = record.attempts.len(), keys = record.assign_keys.len())]
    async fn record_dispatch(
        &self,
        record: &DispatchRecord,
        terms: &DispatchTerms<'_>,
    ) -> Result<Vec<KeyAssignment>> {
        retry_contention("record_dispatch", move || async move {
            let mut tx = self.begin_write().await?;
            let keys = record_in(&mut tx, record, terms).await?;
            tx.commit().await?;
            Ok(keys)
        })
        .await
    }
}
