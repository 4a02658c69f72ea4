//! Finance in SQL: the export of disbursements, and reconciliation runs against the
//! backend's settlement report. Whether a line matches is `domain::judge`'s decision; the
//! store reads the lines with our side of each and carries out the reopenings it asks for.

use std::collections::HashSet;

use async_trait::async_trait;
use payouts_macros::store_span;
use uuid::Uuid;

use super::disbursements::transition;
use super::{DB_SYSTEM, Db, SqlStore, Tx, since, until};
use crate::domain::{
    DisbursementId, DisbursementStatus, OurPayout, Reopening, SettlementLine, SettlementMismatch,
    failure, judge,
};
use crate::store::batch::{BatchSql, Column};
use crate::store::rows::{ExportRow, OurSide, PaidRow, SettlementMatchRow};
use crate::store::{
    ExportFilter, ExportedDisbursement, LinePage, Micros, OperatorRequest, Page, PaidPayout,
    Result, SettlementPage, SettlementStore, SettlementTotals, StatusChange, StoreError,
    now_micros,
};

/// The method a reconciliation run's request id is taken for.
const RECONCILE: &str = "ReconcileSettlements";

/// `Err` naming the first of `lines` whose key `seen` has seen already: the report lists it
/// more than once.
fn each_key_once<'a>(
    lines: &'a [SettlementLine],
    mut seen: impl FnMut(&'a str) -> bool,
) -> Result<()> {
    match lines.iter().find(|l| seen(&l.idempotency_key)) {
        Some(twice) => Err(StoreError::InvalidField {
            field: "lines",
            description: format!(
                "idempotency_key {} appears more than once in the report",
                twice.idempotency_key
            ),
        }),
        None => Ok(()),
    }
}

/// Takes `actor`'s `request_id` for a reconciliation run, so no other method of the actor can
/// reuse it. Its report is too big to fingerprint up front: `seal_settlement_report` compares
/// reports, and a streamed response is never replayed, so none is stored.
async fn take_run_request_id(tx: &mut Tx, request_id: Uuid, actor: &str) -> Result<()> {
    let inserted = sqlx::query(
        "INSERT INTO idempotency \
         (request_id, principal, method, fingerprint, response, create_time) \
         VALUES ($1, $2, $3, 'settlement_runs.report_sha256', NULL, $4) \
         ON CONFLICT (request_id, principal) DO NOTHING",
    )
    .bind(request_id.to_string())
    .bind(actor)
    .bind(RECONCILE)
    .bind(now_micros())
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        let method: String = sqlx::query_scalar(
            "SELECT method FROM idempotency WHERE request_id = $1 AND principal = $2",
        )
        .bind(request_id.to_string())
        .bind(actor)
        .fetch_one(&mut **tx)
        .await?;
        if method != RECONCILE {
            return Err(StoreError::RequestIdReused);
        }
    }
    Ok(())
}

/// Moves a returned payout `PAID -> FAILED{RETURNED}`, conditional on its still being `PAID`
/// (a concurrent run reopens it once).
async fn reopen(
    tx: &mut Tx,
    disbursement_id: DisbursementId,
    change: &StatusChange,
) -> Result<Reopening> {
    if !transition(tx, disbursement_id, change, Some(failure::RETURNED)).await? {
        return Ok(Reopening::StatusChanged);
    }
    sqlx::query(
        "UPDATE disbursements SET failure_code = $1, failure_message = $2 \
         WHERE disbursement_id = $3",
    )
    .bind(failure::RETURNED)
    .bind(&change.reason)
    .bind(disbursement_id.to_string())
    .execute(&mut **tx)
    .await?;
    Ok(Reopening::Done)
}

/// Reconciles one line: judged by the domain, reopened if the judgement asks. Returns the
/// line's mismatch, if any, and whether its payout was reopened.
async fn reconcile_line(
    tx: &mut Tx,
    line: &SettlementLine,
    ours: Option<&OurSide>,
    reopening: &StatusChange,
) -> Result<(Option<SettlementMismatch>, bool)> {
    let payout = ours.map(|o| OurPayout {
        status: o.status,
        amount_krw: o.amount_krw,
        failure_code: o.failure_code.as_deref(),
        current_key: o.current_key,
    });
    let verdict = judge(line, payout.as_ref());
    let mut outcome = Reopening::NotAsked;
    if verdict.reopen
        && let Some(ours) = ours
    {
        outcome = reopen(tx, ours.disbursement_id, reopening).await?;
    }
    let disbursement_id = ours.map(|o| o.disbursement_id);
    let mismatch = verdict.into_mismatch(line, disbursement_id, payout.as_ref(), outcome);
    Ok((mismatch, outcome == Reopening::Done))
}

#[async_trait]
impl SettlementStore for SqlStore {
    #[store_span]
    async fn export_disbursements(
        &self,
        filter: &ExportFilter,
        page: Page<DisbursementId>,
    ) -> Result<Vec<ExportedDisbursement>> {
        let Page { after, limit } = page;
        // Keyset on the id, not on update_time: a row that changes while the export
        // runs can move in time but never in id, so it is exported at most once.
        let rows: Vec<ExportRow> = sqlx::query_as(
            "SELECT d.disbursement_id, d.claim_id, d.partner_id, d.amount_krw, d.status, \
             d.bank_code, d.account_last4, d.holder_name, d.idempotency_key, \
             d.failure_code, d.create_time, d.update_time, \
             p.business_registration_number, p.legal_name, p.representative_name, \
             c.policy_version, \
             (SELECT MAX(e.time) FROM disbursement_events e \
              WHERE e.disbursement_id = d.disbursement_id AND e.to_status = $6) AS paid_time \
             FROM disbursements d \
             JOIN partners p ON p.partner_id = d.partner_id \
             JOIN claims c ON c.claim_id = d.claim_id \
             WHERE d.disbursement_id > $1 AND ($2 = '' OR d.status = $2) \
             AND d.update_time >= $3 AND d.update_time < $4 \
             ORDER BY d.disbursement_id LIMIT $5",
        )
        .bind(after.map(|id| id.to_string()).unwrap_or_default())
        .bind(filter.status.map(|s| s.key()).unwrap_or_default())
        .bind(since(filter.start_time))
        .bind(until(filter.end_time))
        .bind(i64::from(limit))
        .bind(DisbursementStatus::Paid.key())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(ExportedDisbursement::try_from)
            .collect()
    }

    #[store_span]
    async fn start_settlement_run(
        &self,
        request_id: Uuid,
        cutoff_time: Micros,
        actor: &str,
    ) -> Result<Uuid> {
        self.in_transaction("start_settlement_run", move |mut tx| async move {
            take_run_request_id(&mut tx, request_id, actor).await?;
            let run_id = Uuid::now_v7();
            sqlx::query(
                "INSERT INTO settlement_runs (run_id, request_id, actor, cutoff_time, start_time) \
             VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(run_id.to_string())
            .bind(request_id.to_string())
            .bind(actor)
            .bind(cutoff_time)
            .bind(now_micros())
            .execute(&mut *tx)
            .await?;
            Ok((tx, run_id))
        })
        .await
    }

    #[store_span]
    async fn stage_settlement_lines(&self, run_id: Uuid, lines: &[SettlementLine]) -> Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut in_batch = HashSet::with_capacity(lines.len());
        each_key_once(lines, |key| !in_batch.insert(key))?;
        self.in_transaction("stage_settlement_lines", move |mut tx| async move {
            // A key already staged by an earlier batch is not returned, which is how a key
            // listed twice across batches shows.
            let statements = <Db as BatchSql>::insert(
                "INSERT INTO settlement_lines \
             (run_id, idempotency_key, amount_krw, status, settled_time)",
                vec![
                    Column::owned_text(vec![run_id.to_string(); lines.len()]),
                    Column::Text(lines.iter().map(|l| l.idempotency_key.as_str().into()).collect()),
                    Column::BigInt(lines.iter().map(|l| l.amount_krw.won()).collect()),
                    Column::Text(lines.iter().map(|l| l.status.key().into()).collect()),
                    Column::BigInt(lines.iter().map(|l| l.settled_time).collect()),
                ],
                " ON CONFLICT (run_id, idempotency_key) DO NOTHING RETURNING idempotency_key",
            );
            let mut staged = HashSet::with_capacity(lines.len());
            for mut qb in statements {
                let keys: Vec<String> = qb
                    .build_query_scalar()
                    .persistent(<Db as BatchSql>::PREPARED)
                    .fetch_all(&mut *tx)
                    .await?;
                staged.extend(keys);
            }
            each_key_once(lines, |key| !staged.contains(key)).map(|()| (tx, ()))
        })
        .await
    }

    #[store_span]
    async fn seal_settlement_report(
        &self,
        run_id: Uuid,
        report_sha256: &str,
        line_count: i64,
    ) -> Result<()> {
        self.in_transaction("seal_settlement_report", move |mut tx| async move {
            let conflicting: Option<String> = sqlx::query_scalar(
                "SELECT o.run_id FROM settlement_runs r JOIN settlement_runs o \
             ON o.request_id = r.request_id AND o.actor = r.actor AND o.run_id <> r.run_id \
             WHERE r.run_id = $1 AND o.report_sha256 IS NOT NULL \
             AND (o.report_sha256 <> $2 OR o.cutoff_time <> r.cutoff_time) LIMIT 1",
            )
            .bind(run_id.to_string())
            .bind(report_sha256)
            .fetch_optional(&mut *tx)
            .await?;
            if conflicting.is_some() {
                return Err(StoreError::RequestIdReused);
            }
            sqlx::query(
                "UPDATE settlement_runs SET report_sha256 = $1, line_count = $2 WHERE run_id = $3",
            )
            .bind(report_sha256)
            .bind(line_count)
            .bind(run_id.to_string())
            .execute(&mut *tx)
            .await?;
            Ok((tx, ()))
        })
        .await
    }

    #[store_span]
    async fn reconcile_settlement_page(
        &self,
        run_id: Uuid,
        page: LinePage<'_>,
        request: &OperatorRequest<'_>,
    ) -> Result<SettlementPage> {
        let LinePage { after_key, limit } = page;
        let OperatorRequest { actor, reason } = *request;
        self.in_transaction("reconcile_settlement_page", move |mut tx| async move {
            // One statement finds, for every line of the page, the disbursement that used
            // its key: as its current key, or as an earlier one a retry has replaced.
            let rows: Vec<SettlementMatchRow> = sqlx::query_as(
                "SELECT s.idempotency_key, s.amount_krw AS their_amount_krw, \
             s.status AS their_status, s.settled_time, d.disbursement_id, \
             d.status AS our_status, d.amount_krw AS our_amount_krw, d.failure_code, \
             d.idempotency_key AS current_key \
             FROM settlement_lines s LEFT JOIN disbursements d ON d.disbursement_id = COALESCE(\
             (SELECT c.disbursement_id FROM disbursements c \
              WHERE c.idempotency_key = s.idempotency_key), \
             (SELECT a.disbursement_id FROM disbursement_attempts a \
              WHERE a.idempotency_key = s.idempotency_key LIMIT 1)) \
             WHERE s.run_id = $1 AND s.idempotency_key > $2 \
             ORDER BY s.idempotency_key LIMIT $3",
            )
            .bind(run_id.to_string())
            .bind(after_key)
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await?;
            let reopening = StatusChange {
                from_status: Some(DisbursementStatus::Paid),
                to_status: DisbursementStatus::Failed,
                actor: actor.to_owned(),
                reason: reason.to_owned(),
                time: now_micros(),
            };
            let mut page = SettlementPage::default();
            for row in rows {
                let (line, ours) = row.into_parts()?;
                let (mismatch, reopened) =
                    reconcile_line(&mut tx, &line, ours.as_ref(), &reopening).await?;
                page.lines += 1;
                page.reopened += i64::from(reopened);
                match mismatch {
                    None => page.matched += 1,
                    Some(mismatch) => page.mismatches.push(mismatch),
                }
                page.last_key = Some(line.idempotency_key);
            }
            Ok((tx, page))
        })
        .await
    }

    #[store_span]
    async fn paid_missing_from_report(
        &self,
        run_id: Uuid,
        cutoff_time: Micros,
        page: Page<DisbursementId>,
    ) -> Result<Vec<PaidPayout>> {
        let Page { after, limit } = page;
        // Paid before the cut-off: no PAID event at or after it (a payout paid, returned
        // and paid again after the cut-off is not expected in this report).
        let rows: Vec<PaidRow> = sqlx::query_as(
            "SELECT d.disbursement_id, d.idempotency_key, d.amount_krw, \
             (SELECT MAX(e.time) FROM disbursement_events e \
              WHERE e.disbursement_id = d.disbursement_id AND e.to_status = $2) AS paid_time \
             FROM disbursements d \
             WHERE d.status = $2 AND d.disbursement_id > $3 \
             AND NOT EXISTS (SELECT 1 FROM disbursement_events e \
              WHERE e.disbursement_id = d.disbursement_id AND e.to_status = $2 \
              AND e.time >= $4) \
             AND NOT EXISTS (SELECT 1 FROM settlement_lines s \
              WHERE s.run_id = $1 AND s.idempotency_key = d.idempotency_key) \
             ORDER BY d.disbursement_id LIMIT $5",
        )
        .bind(run_id.to_string())
        .bind(DisbursementStatus::Paid.key())
        .bind(after.map(|id| id.to_string()).unwrap_or_default())
        .bind(cutoff_time)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(PaidPayout::try_from).collect()
    }

    #[store_span]
    async fn finish_settlement_run(&self, run_id: Uuid, totals: &SettlementTotals) -> Result<()> {
        sqlx::query(
            "UPDATE settlement_runs SET line_count = $1, matched_count = $2, \
             mismatch_count = $3, reopened_count = $4, finish_time = $5 WHERE run_id = $6",
        )
        .bind(totals.line_count)
        .bind(totals.matched_count)
        .bind(totals.mismatch_count)
        .bind(totals.reopened_count)
        .bind(now_micros())
        .bind(run_id.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
