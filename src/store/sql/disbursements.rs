//! The disbursements in SQL, as operators see them: read, retried, cancelled; and dispatch
//! paused or resumed. Approval creates them ([`create_disbursement`]).

use async_trait::async_trait;
use payouts_macros::store_span;

use super::{Conn, DB_SYSTEM, DbRow, SqlStore, Tx, after_key, dialect, unexpected};
use crate::domain::{
    AccountChange, ClaimStatus, DisbursementId, DisbursementStatus, Krw, PayoutRef, Refusal,
    StatusMove, may_cancel, may_retry,
};
use crate::store::intake::CLAIM_APPROVED;
use crate::store::rows::{
    AttemptRow, DisbursementRow, DispatchStateRow, ProgramTotalRow, StatusChangeRow, uuid,
};
use crate::store::{
    Disbursement, DisbursementFilter, DisbursementStore, DispatchState, Micros, OperatorRequest,
    Page, ProgramSummary, Recorded, Result, StatusChange, StoreError, Stored, now_micros,
};

/// How many rows of `program_totals` a summary reads before it folds them into one per status.
const FOLD_AFTER: i64 = 256;

/// Approval and disbursement are one: the disbursement `payout`, its first history entry (and
/// feed event) and its outbox row are written in the approving transaction.
pub(super) async fn create_disbursement(
    tx: &mut Tx,
    payout: &PayoutRef,
    actor: &str,
    trace_context: Option<&str>,
    now: Micros,
) -> Result<()> {
    let disbursement_id = payout.disbursement_id;
    sqlx::query(
        "INSERT INTO disbursements (disbursement_id, claim_id, partner_id, amount_krw, \
         status, bank_code, account_sealed, account_last4, holder_name, trace_context, \
         create_time, update_time) \
         SELECT $1, $2, partner_id, $4, $5, bank_code, account_sealed, account_last4, \
         holder_name, $7, $6, $6 \
         FROM partners WHERE partner_id = $3",
    )
    .bind(disbursement_id.to_string())
    .bind(payout.claim_id.to_string())
    .bind(payout.partner_id.to_string())
    .bind(payout.amount_krw.won())
    .bind(DisbursementStatus::Queued.key())
    .bind(now)
    .bind(trace_context)
    .execute(&mut **tx)
    .await?;
    let first = StatusChange {
        from_status: None,
        to_status: DisbursementStatus::Queued,
        actor: actor.to_owned(),
        reason: CLAIM_APPROVED.to_owned(),
        time: now,
    };
    record_event(tx, disbursement_id, &first).await?;
    tx.emit(payout.status_changed(status_move(&first, None)));
    sqlx::query("INSERT INTO outbox (disbursement_id, due_time) VALUES ($1, $2)")
        .bind(disbursement_id.to_string())
        .bind(now)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// `change` as its feed event tells it, with the failure code it leaves (if any).
pub(super) fn status_move<'a>(
    change: &'a StatusChange,
    failure_code: Option<&'a str>,
) -> StatusMove<'a> {
    StatusMove {
        from: change.from_status,
        to: change.to_status,
        failure_code,
        actor: &change.actor,
        reason: &change.reason,
        time: change.time,
    }
}

async fn record_event(
    tx: &mut Tx,
    disbursement_id: DisbursementId,
    change: &StatusChange,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO disbursement_events (disbursement_id, from_status, to_status, actor, \
         reason, time) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(disbursement_id.to_string())
    .bind(change.from_status.map(|s| s.key()))
    .bind(change.to_status.key())
    .bind(&change.actor)
    .bind(&change.reason)
    .bind(change.time)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Moves a disbursement from `change.from_status` to `change.to_status` if it is still in the
/// former, with its history entry and feed event (which tells `failure_code`, the code the
/// move leaves); false otherwise (it changed meanwhile, or the move is not one the domain
/// allows).
pub(super) async fn transition(
    tx: &mut Tx,
    disbursement_id: DisbursementId,
    change: &StatusChange,
    failure_code: Option<&str>,
) -> Result<bool> {
    let (Some(from), to) = (change.from_status, change.to_status) else {
        return Ok(false);
    };
    if !from.can_become(to) {
        return Ok(false);
    }
    let moved: Option<(String, String, i64)> = sqlx::query_as(
        "UPDATE disbursements SET status = $1, update_time = $2 \
         WHERE disbursement_id = $3 AND status = $4 \
         RETURNING claim_id, partner_id, amount_krw",
    )
    .bind(to.key())
    .bind(change.time)
    .bind(disbursement_id.to_string())
    .bind(from.key())
    .fetch_optional(&mut **tx)
    .await?;
    let Some((claim_id, partner_id, amount_krw)) = moved else {
        return Ok(false);
    };
    record_event(tx, disbursement_id, change).await?;
    let payout = PayoutRef {
        disbursement_id,
        claim_id: uuid("claim_id", &claim_id)?,
        partner_id: uuid("partner_id", &partner_id)?,
        amount_krw: Krw::new(amount_krw),
    };
    tx.emit(payout.status_changed(status_move(change, failure_code)));
    Ok(true)
}

async fn load_disbursement(
    conn: &mut Conn,
    disbursement_id: DisbursementId,
) -> Result<Option<Disbursement>> {
    let row: Option<DisbursementRow> =
        sqlx::query_as("SELECT * FROM disbursements WHERE disbursement_id = $1")
            .bind(disbursement_id.to_string())
            .fetch_optional(&mut *conn)
            .await?;
    let Some(row) = row else { return Ok(None) };
    let mut d = Disbursement::try_from(row)?;
    let id = disbursement_id.to_string();
    d.attempts = rows_of::<AttemptRow, _>(conn, ATTEMPTS_OF, &id).await?;
    d.history = rows_of::<StatusChangeRow, _>(conn, HISTORY_OF, &id).await?;
    Ok(Some(d))
}

const ATTEMPTS_OF: &str =
    "SELECT * FROM disbursement_attempts WHERE disbursement_id = $1 ORDER BY id";
const HISTORY_OF: &str = "SELECT * FROM disbursement_events WHERE disbursement_id = $1 ORDER BY id";

/// What `statement` (of the disbursement `id`) reads: its attempts or its history, in the
/// order they were written.
async fn rows_of<R, T>(conn: &mut Conn, statement: &'static str, id: &str) -> Result<Vec<T>>
where
    R: for<'r> sqlx::FromRow<'r, DbRow> + Send + Unpin,
    T: TryFrom<R, Error = StoreError>,
{
    let rows: Vec<R> = sqlx::query_as(statement)
        .bind(id)
        .fetch_all(&mut *conn)
        .await?;
    rows.into_iter().map(T::try_from).collect()
}

/// The disbursement, locked so that concurrent retries and cancels see each other.
async fn require_disbursement(
    tx: &mut Tx,
    disbursement_id: DisbursementId,
) -> Result<Disbursement> {
    sqlx::query(dialect::LOCK_DISBURSEMENT)
        .bind(disbursement_id.to_string())
        .fetch_optional(&mut **tx)
        .await?
        .ok_or(StoreError::NotFound("disbursement"))?;
    load_disbursement(tx, disbursement_id)
        .await?
        .ok_or(StoreError::NotFound("disbursement"))
}

/// Ends a call on a disbursement with the disbursement as it now is.
async fn reloaded(mut tx: Tx, disbursement_id: DisbursementId) -> Result<(Tx, Disbursement)> {
    let stored = load_disbursement(&mut tx, disbursement_id)
        .await?
        .ok_or(StoreError::NotFound("disbursement"))?;
    Ok((tx, stored))
}

pub(super) async fn load_dispatch_state(conn: &mut Conn) -> Result<DispatchState> {
    let row: DispatchStateRow = sqlx::query_as("SELECT * FROM dispatch_control WHERE id = 1")
        .fetch_one(&mut *conn)
        .await?;
    Ok(row.into())
}

/// Moves a disbursement `from` one status `to` another by an operator's hand, now, and returns
/// the change. When the conditional move finds the row changed under it, the answer is what
/// `rule` says of the row as it is now, or (if `rule` would allow the move still) that `what`
/// could not be done: an inconsistency.
async fn operator_move(
    tx: &mut Tx,
    disbursement_id: DisbursementId,
    (from, to): (DisbursementStatus, DisbursementStatus),
    (actor, reason): (&str, &str),
    rule: impl Fn(&Disbursement) -> std::result::Result<(), Refusal>,
    what: &str,
) -> Result<StatusChange> {
    let change = StatusChange {
        from_status: Some(from),
        to_status: to,
        actor: actor.to_owned(),
        reason: reason.to_owned(),
        time: now_micros(),
    };
    if transition(tx, disbursement_id, &change, None).await? {
        return Ok(change);
    }
    let current = require_disbursement(tx, disbursement_id).await?;
    Err(match rule(&current) {
        Err(refusal) => refusal.into(),
        Ok(()) => unexpected(what),
    })
}

#[async_trait]
impl DisbursementStore for SqlStore {
    #[store_span]
    async fn get_disbursement(
        &self,
        disbursement_id: DisbursementId,
    ) -> Result<Option<Disbursement>> {
        let mut conn = self.pool.acquire().await?;
        load_disbursement(&mut conn, disbursement_id).await
    }

    #[store_span]
    async fn list_disbursements(
        &self,
        filter: &DisbursementFilter,
        page: &Page,
    ) -> Result<Vec<Disbursement>> {
        let mut conn = self.pool.acquire().await?;
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT disbursement_id FROM disbursements WHERE disbursement_id > $1 \
             AND ($2 = '' OR status = $2) AND ($3 = '' OR partner_id = $3) \
             ORDER BY disbursement_id LIMIT $4",
        )
        .bind(after_key(page))
        .bind(filter.status.map(|s| s.key()).unwrap_or_default())
        .bind(filter.partner_id.map(|p| p.to_string()).unwrap_or_default())
        .bind(i64::from(page.limit))
        .fetch_all(&mut *conn)
        .await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(d) = load_disbursement(&mut conn, uuid("disbursement_id", &id)?).await? {
                out.push(d);
            }
        }
        Ok(out)
    }

    #[store_span]
    async fn retry_disbursement(
        &self,
        call: Recorded<'_, Disbursement>,
        disbursement_id: DisbursementId,
        actor: &str,
    ) -> Result<Stored<Disbursement>> {
        self.mutate("retry_disbursement", call, move |mut tx| async move {
            let d = require_disbursement(&mut tx, disbursement_id).await?;
            let changed: Option<(String, i64)> = sqlx::query_as(
            "SELECT account_changed_by, account_change_time FROM partners WHERE partner_id = $1",
        )
        .bind(d.partner_id.to_string())
        .fetch_optional(&mut *tx)
        .await?;
            let account_change = changed
                .as_ref()
                .map(|(changed_by, change_time)| AccountChange {
                    changed_by,
                    change_time: *change_time,
                });
            may_retry(d.status, d.create_time, account_change, actor)?;
            // The failed instruction is final at the backend, so the next one gets a new key,
            // and goes to the partner's account as it is now.
            sqlx::query(
                "UPDATE disbursements SET key_seq = key_seq + 1, idempotency_key = NULL, \
             holder_verified = FALSE, failure_code = NULL, failure_message = NULL, \
             bank_code = p.bank_code, account_sealed = p.account_sealed, \
             account_last4 = p.account_last4, holder_name = p.holder_name \
             FROM partners p \
             WHERE disbursement_id = $1 AND p.partner_id = disbursements.partner_id",
            )
            .bind(disbursement_id.to_string())
            .execute(&mut *tx)
            .await?;
            let change = operator_move(
                &mut tx,
                disbursement_id,
                (DisbursementStatus::Failed, DisbursementStatus::Queued),
                (actor, "retry requested"),
                |d: &Disbursement| may_retry(d.status, d.create_time, None, actor),
                "a FAILED disbursement could not be queued again",
            )
            .await?;
            sqlx::query(
                "INSERT INTO outbox (disbursement_id, due_time) VALUES ($1, $2) \
             ON CONFLICT (disbursement_id) DO UPDATE \
             SET due_time = $2, lease_until = 0, failures = 0",
            )
            .bind(disbursement_id.to_string())
            .bind(change.time)
            .execute(&mut *tx)
            .await?;
            reloaded(tx, disbursement_id).await
        })
        .await
    }

    #[store_span]
    async fn cancel_disbursement(
        &self,
        call: Recorded<'_, Disbursement>,
        disbursement_id: DisbursementId,
        request: &OperatorRequest<'_>,
    ) -> Result<Stored<Disbursement>> {
        let OperatorRequest { actor, reason } = *request;
        self.mutate("cancel_disbursement", call, move |mut tx| async move {
            let d = require_disbursement(&mut tx, disbursement_id).await?;
            may_cancel(d.status)?;
            operator_move(
                &mut tx,
                disbursement_id,
                (DisbursementStatus::Queued, DisbursementStatus::Cancelled),
                (actor, reason),
                |d: &Disbursement| may_cancel(d.status),
                "a QUEUED disbursement could not be cancelled",
            )
            .await?;
            sqlx::query("DELETE FROM outbox WHERE disbursement_id = $1")
                .bind(disbursement_id.to_string())
                .execute(&mut *tx)
                .await?;
            reloaded(tx, disbursement_id).await
        })
        .await
    }

    #[store_span]
    async fn set_dispatch_paused(
        &self,
        call: Recorded<'_, DispatchState>,
        paused: bool,
        request: &OperatorRequest<'_>,
    ) -> Result<Stored<DispatchState>> {
        let OperatorRequest { actor, reason } = *request;
        self.mutate("set_dispatch_paused", call, move |mut tx| async move {
            sqlx::query(
                "UPDATE dispatch_control SET paused = $1, reason = $2, changed_by = $3, \
             change_time = $4 WHERE id = 1",
            )
            .bind(paused)
            .bind(reason)
            .bind(actor)
            .bind(now_micros())
            .execute(&mut *tx)
            .await?;
            let state = load_dispatch_state(&mut tx).await?;
            Ok((tx, state))
        })
        .await
    }

    #[store_span]
    async fn program_summary(&self) -> Result<ProgramSummary> {
        let mut conn = self.pool.acquire().await?;
        let mut summary = ProgramSummary {
            dispatch: load_dispatch_state(&mut conn).await?,
            ..ProgramSummary::default()
        };
        // The figures the writing statements keep (migration 0010), not a count of every row.
        let rows: Vec<ProgramTotalRow> = sqlx::query_as(
            "SELECT kind, status, CAST(SUM(n) AS BIGINT) AS n, CAST(SUM(krw) AS BIGINT) AS krw, \
             CAST(COUNT(*) AS BIGINT) AS parts FROM program_totals GROUP BY kind, status",
        )
        .fetch_all(&mut *conn)
        .await?;
        let mut parts = 0;
        for row in &rows {
            parts += row.parts;
            if row.kind == "claim" {
                match ClaimStatus::from_key(&row.status) {
                    Some(ClaimStatus::PendingReview) => summary.pending_review_count = row.n,
                    Some(ClaimStatus::Rejected) => summary.rejected_count = row.n,
                    Some(ClaimStatus::Approved) => {}
                    None => return Err(unexpected(format!("claim status: {}", row.status))),
                }
                continue;
            }
            let (status, bucket) = row.bucket()?;
            summary.approved.count += bucket.count;
            summary.approved.krw = summary
                .approved
                .krw
                .checked_add(bucket.krw)
                .ok_or_else(|| unexpected("the approved total passes the range of KRW"))?;
            *match status {
                DisbursementStatus::Queued => &mut summary.queued,
                DisbursementStatus::Submitted => &mut summary.submitted,
                DisbursementStatus::Paid => &mut summary.paid,
                DisbursementStatus::Failed => &mut summary.failed,
                DisbursementStatus::Cancelled => &mut summary.cancelled,
            } = bucket;
        }
        if let Some(fold) = dialect::FOLD_PROGRAM_TOTALS
            && parts > FOLD_AFTER
        {
            // The sums are unchanged by a fold; a failed one leaves the rows as they were.
            if let Err(e) = sqlx::query(fold).execute(&mut *conn).await {
                tracing::warn!(error = %e, "folding the programme totals");
            }
        }
        Ok(summary)
    }
}
