//! Finance: the disbursement export the finance team books payouts from, and reconciliation
//! against the payments backend's settlement report (`DisbursementService/ExportDisbursements`
//! and `/ReconcileSettlements`). Both stream, page by page, so neither holds a whole
//! programme's payouts or a whole report in memory.

use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use prost::Message as _;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;
use uuid::Uuid;

use super::{Context, Violations, convert};
use crate::audit::CallRecord;
use crate::domain::{
    DisbursementId, DisbursementStatus, Invalid, Krw, MismatchKind, SettlementLine,
    SettlementMismatch,
};
use crate::principal::Principal;
use crate::proto::payouts::v1 as pb;
use crate::store::isolate::{may_be_a_rows_fault, write_isolating};
use crate::store::{
    ExportFilter, LinePage, Micros, OperatorRequest, Page, SettlementTotals, Store, StoreError,
    now_micros,
};

/// Rows per export message, and per store query.
pub const EXPORT_PAGE_SIZE: u32 = 500;
/// Report lines staged, and reconciled, per transaction.
pub const RECONCILE_BATCH: u32 = 500;
/// How far ahead of our clock a cut-off may be: later is taken for a time-zone mistake, which
/// would flag every recent payout as missing from the report.
const CUTOFF_SKEW_MICROS: Micros = 5 * 60 * 1_000_000;

pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// `ExportDisbursements`: validates the filter, then reads one page per message the client
/// asks for, so a slow client holds back the reads rather than filling memory.
pub fn export(
    ctx: &Context,
    request: pb::ExportDisbursementsRequest,
) -> Result<ResponseStream<pb::ExportDisbursementsResponse>, Status> {
    let mut v = Violations::default();
    let status = v.check(
        "status",
        convert::parse_disbursement_status_filter(request.status),
    );
    let start_time = request
        .start_time
        .as_ref()
        .and_then(|t| v.check("start_time", convert::parse_timestamp(t)));
    let end_time = request
        .end_time
        .as_ref()
        .and_then(|t| v.check("end_time", convert::parse_timestamp(t)));
    if let (Some(start), Some(end)) = (start_time, end_time)
        && end <= start
    {
        v.add("end_time", "must be after start_time");
    }
    v.finish()?;
    let filter = ExportFilter {
        status: status.flatten(),
        start_time,
        end_time,
    };
    let store = ctx.store.clone();
    // The pages are read after the handler returned: keep their store spans in the call's trace.
    let span = tracing::Span::current();
    // State: the cursor of the next page (None before the first row), or None when done.
    let pages =
        futures::stream::try_unfold(Some(None), move |after: Option<Option<DisbursementId>>| {
            let (store, filter, span) = (store.clone(), filter.clone(), span.clone());
            async move {
                let Some(after) = after else {
                    return Ok::<_, Status>(None);
                };
                let rows = store
                    .export_disbursements(
                        &filter,
                        Page {
                            after,
                            limit: EXPORT_PAGE_SIZE,
                        },
                    )
                    .instrument(span)
                    .await?;
                if rows.is_empty() {
                    return Ok(None);
                }
                let next = (rows.len() == EXPORT_PAGE_SIZE as usize)
                    .then(|| rows.last().map(|r| r.disbursement_id));
                let page = pb::ExportDisbursementsResponse {
                    disbursements: rows.iter().map(convert::exported_disbursement).collect(),
                };
                Ok(Some((page, next)))
            }
        });
    Ok(Box::pin(pages))
}

/// A settlement report as it streams in: its header, its digest, and lines not yet staged.
struct Report {
    request_id: String,
    cutoff_time: Option<prost_types::Timestamp>,
    digest: Sha256,
    line_count: i64,
    pending: Vec<SettlementLine>,
    /// Where each pending line came from: its index in its message, and its number in the
    /// report (from 1).
    places: Vec<(usize, i64)>,
}

impl Report {
    /// Takes one request message: the header must match the first message's, every line must
    /// be valid. Nothing of a refused message is kept.
    fn take(&mut self, message: pb::ReconcileSettlementsRequest) -> Result<(), Status> {
        let mut v = Violations::default();
        let request_id = message.request_id.trim();
        if !request_id.is_empty()
            && Uuid::parse_str(request_id).map(|id| id.to_string()).ok()
                != Some(self.request_id.clone())
        {
            v.add(
                "request_id",
                "must be empty after the first message, or repeat the first message's",
            );
        }
        if message
            .cutoff_time
            .as_ref()
            .is_some_and(|t| Some(t) != self.cutoff_time.as_ref())
        {
            v.add(
                "cutoff_time",
                "must be unset after the first message, or repeat the first message's",
            );
        }
        let mut lines = Vec::with_capacity(message.lines.len());
        let mut places = Vec::with_capacity(message.lines.len());
        for (i, line) in message.lines.iter().enumerate() {
            let number = self.line_count + i64::try_from(i).unwrap_or(i64::MAX) + 1;
            let status = v.check(
                format_args!("lines[{i}].status"),
                convert::parse_settlement_status(line.status),
            );
            let settled_time = match &line.settled_time {
                None => Some(0),
                Some(t) => v.check(
                    format_args!("lines[{i}].settled_time"),
                    convert::parse_timestamp(t).map_err(|why| {
                        Invalid::new(format!("{why} (line {number} of the report)"))
                    }),
                ),
            };
            let parsed = SettlementLine::parse(
                &line.idempotency_key,
                line.amount_krw,
                status.unwrap_or(crate::domain::SettlementStatus::Settled),
                settled_time.unwrap_or(0),
            );
            match parsed {
                Ok(parsed) if status.is_some() && settled_time.is_some() => {
                    lines.push(parsed);
                    places.push((i, number));
                }
                Ok(_) => {}
                Err(bad) => {
                    for (field, why) in bad {
                        v.add(
                            format!("lines[{i}].{field}"),
                            format!("{why} (line {number} of the report)"),
                        );
                    }
                }
            }
        }
        v.finish()?;
        for line in &message.lines {
            // Length-delimited, so that lines cannot run into each other.
            self.digest.update(line.encode_length_delimited_to_vec());
        }
        self.line_count += i64::try_from(lines.len()).unwrap_or(i64::MAX);
        self.pending.extend(lines);
        self.places.extend(places);
        Ok(())
    }

    /// Stages pending lines in batches; a last, partial batch only when `all`. A batch the
    /// database refuses as a whole is staged again in parts, to find the line it refuses: the
    /// report is then refused naming that line, as a line refused on reading would be.
    async fn stage(&mut self, store: &dyn Store, run_id: Uuid, all: bool) -> Result<(), Status> {
        let batch = RECONCILE_BATCH as usize;
        while self.pending.len() >= batch || (all && !self.pending.is_empty()) {
            let take = self.pending.len().min(batch);
            let lines = &self.pending[..take];
            let staged = write_isolating("ReconcileSettlements", take, |range: Range<usize>| {
                let lines = &lines[range];
                async move {
                    store
                        .stage_settlement_lines(run_id, lines)
                        .await
                        .map(|()| vec![(); lines.len()])
                }
            })
            .await;
            // The first line refused refuses the report: nothing changes before all is staged.
            if let Some((i, e)) = staged
                .into_iter()
                .enumerate()
                .find_map(|(i, staged)| staged.err().map(|e| (i, e)))
            {
                return Err(self.refused(i, e));
            }
            self.pending.drain(..take);
            self.places.drain(..take);
        }
        Ok(())
    }

    /// The report's error when staging pending line `i` failed with `e`: a line the database
    /// refused alone is named, as a bad line is; any other failure is the call's.
    fn refused(&self, i: usize, e: StoreError) -> Status {
        let Some(&(index, number)) = self.places.get(i).filter(|_| may_be_a_rows_fault(&e)) else {
            return e.into();
        };
        tracing::warn!(
            line = number,
            error = format!("{e:#}"),
            "the database refused a line of a settlement report"
        );
        let mut v = Violations::default();
        v.add(
            format!("lines[{index}]"),
            format!("the database refused to store this line (line {number} of the report)"),
        );
        v.finish().expect_err("one violation")
    }
}

/// `ReconcileSettlements`. The first message is checked before the call is answered, so a
/// missing request id or cut-off is the call's own error (and in the audit log). The rest of
/// the report is staged in the database batch by batch; only once all of it is in does anything
/// change, so a refused line or a key listed twice leaves every disbursement as it was.
pub async fn reconcile(
    ctx: &Context,
    request: Request<Streaming<pb::ReconcileSettlementsRequest>>,
) -> Result<Response<ResponseStream<pb::ReconcileSettlementsResponse>>, Status> {
    let actor = Principal::of(&request);
    let call = CallRecord::of(&request);
    let mut inbound = request.into_inner();
    // An empty stream is a first message without request id and cut-off.
    let mut first = inbound.message().await?.unwrap_or_default();
    let mut v = Violations::default();
    let request_id = v.request_id(&first.request_id);
    call.note_request_id(&first.request_id);
    let cutoff_time = match &first.cutoff_time {
        None => {
            v.add(
                "cutoff_time",
                "is required: the report covers the payouts made before it",
            );
            None
        }
        Some(t) => match v.check("cutoff_time", convert::parse_timestamp(t)) {
            Some(cutoff) if cutoff > now_micros() + CUTOFF_SKEW_MICROS => {
                v.add("cutoff_time", "must not be in the future");
                None
            }
            cutoff => cutoff,
        },
    };
    v.finish()?;
    let (Some(request_id), Some(cutoff_time)) = (request_id, cutoff_time) else {
        return Err(super::missing());
    };
    let mut report = Report {
        request_id: request_id.to_string(),
        cutoff_time: first.cutoff_time.take(),
        digest: Sha256::new(),
        line_count: 0,
        pending: Vec::new(),
        places: Vec::new(),
    };
    // Compare against the canonical id, whatever spelling the first message used.
    first.request_id.clear();
    report.take(first)?;
    let store = ctx.store.clone();
    let run_id = store
        .start_settlement_run(request_id, cutoff_time, &actor)
        .await?;
    let reason = format!("settlement report {request_id}: the bank returned the payout");
    let (tx, rx) = mpsc::channel(64);
    let run = Run {
        store,
        run_id,
        cutoff_time,
        actor,
        reason,
        tx: tx.clone(),
    };
    tokio::spawn(
        async move {
            if let Err(status) = run.run(report, inbound).await {
                tracing::warn!(%run_id, code = ?status.code(), message = status.message(), "reconciliation stopped");
                let _ = tx.send(Err(status)).await;
            }
        }
        .instrument(tracing::Span::current()),
    );
    Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
}

/// One reconciliation run, after its first message.
struct Run {
    store: Arc<dyn Store>,
    run_id: Uuid,
    cutoff_time: Micros,
    actor: String,
    reason: String,
    tx: mpsc::Sender<Result<pb::ReconcileSettlementsResponse, Status>>,
}

/// Why a run stopped early.
enum Stop {
    /// The caller went away. What was done is complete and consistent, and running the report
    /// again finishes the job.
    Gone,
    Failed(Status),
}

impl From<crate::store::StoreError> for Stop {
    fn from(e: crate::store::StoreError) -> Self {
        Self::Failed(e.into())
    }
}

impl Run {
    async fn send(&self, item: pb::reconcile_settlements_response::Item) -> Result<(), Stop> {
        self.tx
            .send(Ok(pb::ReconcileSettlementsResponse { item: Some(item) }))
            .await
            .map_err(|_| Stop::Gone)
    }

    async fn run(
        self,
        mut report: Report,
        mut inbound: Streaming<pb::ReconcileSettlementsRequest>,
    ) -> Result<(), Status> {
        let store = self.store.as_ref();
        report.stage(store, self.run_id, false).await?;
        while let Some(message) = inbound.message().await? {
            report.take(message)?;
            report.stage(store, self.run_id, false).await?;
        }
        report.stage(store, self.run_id, true).await?;
        let digest = hex::encode(report.digest.finalize_reset());
        store
            .seal_settlement_report(self.run_id, &digest, report.line_count)
            .await?;
        let mut totals = SettlementTotals {
            line_count: report.line_count,
            ..SettlementTotals::default()
        };
        match self.reconcile(&mut totals).await {
            Ok(()) => {}
            Err(Stop::Gone) => return Ok(()),
            Err(Stop::Failed(status)) => return Err(status),
        }
        store.finish_settlement_run(self.run_id, &totals).await?;
        let summary = pb::ReconciliationSummary {
            line_count: totals.line_count,
            matched_count: totals.matched_count,
            mismatch_count: totals.mismatch_count,
            reopened_count: totals.reopened_count,
        };
        let _ = self
            .send(pb::reconcile_settlements_response::Item::Summary(summary))
            .await;
        Ok(())
    }

    /// Every staged line against our records, then our payouts against the report.
    async fn reconcile(&self, totals: &mut SettlementTotals) -> Result<(), Stop> {
        use pb::reconcile_settlements_response::Item;
        let store = self.store.as_ref();
        let mut after_key = String::new();
        loop {
            let page = store
                .reconcile_settlement_page(
                    self.run_id,
                    LinePage {
                        after_key: &after_key,
                        limit: RECONCILE_BATCH,
                    },
                    &OperatorRequest {
                        actor: &self.actor,
                        reason: &self.reason,
                    },
                )
                .await?;
            totals.matched_count += page.matched;
            totals.reopened_count += page.reopened;
            totals.mismatch_count += i64::try_from(page.mismatches.len()).unwrap_or(i64::MAX);
            for m in &page.mismatches {
                self.send(Item::Mismatch(convert::settlement_mismatch(m)))
                    .await?;
            }
            match page.last_key {
                Some(key) if page.lines == i64::from(RECONCILE_BATCH) => after_key = key,
                _ => break,
            }
        }
        let mut after = None;
        loop {
            let missing = store
                .paid_missing_from_report(
                    self.run_id,
                    self.cutoff_time,
                    Page {
                        after,
                        limit: RECONCILE_BATCH,
                    },
                )
                .await?;
            totals.mismatch_count += i64::try_from(missing.len()).unwrap_or(i64::MAX);
            for p in &missing {
                let paid = jiff::Timestamp::from_microsecond(p.paid_time)
                    .map_or_else(|_| p.paid_time.to_string(), |t| t.to_string());
                let m = SettlementMismatch {
                    idempotency_key: p.idempotency_key.clone(),
                    disbursement_id: Some(p.disbursement_id),
                    kind: MismatchKind::PaidHereNotThere,
                    our_amount_krw: p.amount_krw,
                    their_amount_krw: Krw::ZERO,
                    detail: format!(
                        "PAID here at {paid}, before the cut-off, but not in the report"
                    ),
                    reopened: false,
                    status: Some(DisbursementStatus::Paid),
                };
                self.send(Item::Mismatch(convert::settlement_mismatch(&m)))
                    .await?;
            }
            if missing.len() < RECONCILE_BATCH as usize {
                return Ok(());
            }
            after = missing.last().map(|p| p.disbursement_id);
        }
    }
}
