//! `payouts.v1.DisbursementService`.

use tonic::{Request, Response, Status};

use super::operation::{Change, Operation};
use super::{Context, Violations, convert, finance, found, listing, record_touched};
use crate::audit::{CallRecord, Resource};
use crate::domain::text::Reason;
use crate::proto::payouts::v1::{self as pb, disbursement_service_server::DisbursementService};
use crate::store::{DisbursementFilter, DispatchState};

pub struct Disbursements {
    pub ctx: Context,
}

impl Disbursements {
    /// Pauses dispatch (`paused`) or resumes it, as `request` asks, for the reason `reason`
    /// reads from it (recording why it is bad, if it is).
    async fn set_paused<B, R>(
        &self,
        request: Request<B>,
        paused: bool,
        reason: impl FnOnce(&mut Violations, &mut B) -> Option<R>,
    ) -> Result<Response<B::Response>, Status>
    where
        B: Change<Value = DispatchState>,
        R: AsRef<str>,
    {
        let (op, reason) = Operation::parse(request, reason)?;
        let asked = op.asked(reason.as_ref());
        op.answer(|rec| self.ctx.store.set_dispatch_paused(rec, paused, &asked))
            .await
    }
}

#[tonic::async_trait]
impl DisbursementService for Disbursements {
    type ExportDisbursementsStream = finance::ResponseStream<pb::ExportDisbursementsResponse>;
    type ReconcileSettlementsStream = finance::ResponseStream<pb::ReconcileSettlementsResponse>;

    async fn get_disbursement(
        &self,
        request: Request<pb::GetDisbursementRequest>,
    ) -> Result<Response<pb::GetDisbursementResponse>, Status> {
        let call = CallRecord::of(&request);
        let get = |id| self.ctx.store.get_disbursement(id);
        let raw = &request.get_ref().disbursement_id;
        let d = found("disbursement_id", raw, "disbursement", get).await?;
        record_touched(
            &call,
            &[
                (Resource::Partner, &d.partner_id.to_string()),
                (Resource::Claim, &d.claim_id.to_string()),
                (Resource::Disbursement, &d.disbursement_id.to_string()),
            ],
        );
        Ok(Response::new(pb::GetDisbursementResponse {
            disbursement: Some(convert::disbursement(&d)),
        }))
    }

    async fn list_disbursements(
        &self,
        request: Request<pb::ListDisbursementsRequest>,
    ) -> Result<Response<pb::ListDisbursementsResponse>, Status> {
        let (page, filter) = listing::parse(request.get_ref(), |v, r| DisbursementFilter {
            status: v
                .check(
                    "status",
                    convert::parse_disbursement_status_filter(r.status),
                )
                .flatten(),
            partner_id: v.optional_id("partner_id", &r.partner_id),
        })?;
        let found = self.ctx.store.list_disbursements(&filter, &page).await?;
        Ok(listing::answer(
            &page,
            &found,
            |d| d.disbursement_id,
            convert::disbursement,
        ))
    }

    async fn retry_disbursement(
        &self,
        request: Request<pb::RetryDisbursementRequest>,
    ) -> Result<Response<pb::RetryDisbursementResponse>, Status> {
        let (op, ()) = Operation::parse(request, |_, _| Some(()))?;
        op.answer(|rec| self.ctx.store.retry_disbursement(rec, op.id, &op.actor))
            .await
    }

    async fn cancel_disbursement(
        &self,
        request: Request<pb::CancelDisbursementRequest>,
    ) -> Result<Response<pb::CancelDisbursementResponse>, Status> {
        let (op, reason) =
            Operation::parse(request, |v, r| v.check("reason", Reason::parse(&r.reason)))?;
        let asked = op.asked(reason.as_str());
        op.answer(|rec| self.ctx.store.cancel_disbursement(rec, op.id, &asked))
            .await
    }

    async fn pause_dispatch(
        &self,
        request: Request<pb::PauseDispatchRequest>,
    ) -> Result<Response<pb::PauseDispatchResponse>, Status> {
        let reason = |v: &mut Violations, r: &mut pb::PauseDispatchRequest| {
            v.check("reason", Reason::parse(&r.reason))
        };
        self.set_paused(request, true, reason).await
    }

    async fn resume_dispatch(
        &self,
        request: Request<pb::ResumeDispatchRequest>,
    ) -> Result<Response<pb::ResumeDispatchResponse>, Status> {
        // Resuming clears the reason of the pause.
        self.set_paused(request, false, |_, _| Some("")).await
    }

    async fn export_disbursements(
        &self,
        request: Request<pb::ExportDisbursementsRequest>,
    ) -> Result<Response<Self::ExportDisbursementsStream>, Status> {
        finance::export(&self.ctx, request.into_inner()).map(Response::new)
    }

    async fn reconcile_settlements(
        &self,
        request: Request<tonic::Streaming<pb::ReconcileSettlementsRequest>>,
    ) -> Result<Response<Self::ReconcileSettlementsStream>, Status> {
        finance::reconcile(&self.ctx, request).await
    }

    async fn get_program_summary(
        &self,
        _request: Request<pb::GetProgramSummaryRequest>,
    ) -> Result<Response<pb::GetProgramSummaryResponse>, Status> {
        let s = self.ctx.store.program_summary().await?;
        let in_flight_krw = s.queued.krw.checked_add(s.submitted.krw).ok_or_else(|| {
            crate::status::internal("the in-flight total passes the range of KRW")
        })?;
        Ok(Response::new(pb::GetProgramSummaryResponse {
            approved_count: s.approved.count,
            approved_krw: s.approved.krw.won(),
            paid_count: s.paid.count,
            paid_krw: s.paid.krw.won(),
            in_flight_count: s.queued.count + s.submitted.count,
            in_flight_krw: in_flight_krw.won(),
            failed_count: s.failed.count,
            failed_krw: s.failed.krw.won(),
            cancelled_count: s.cancelled.count,
            cancelled_krw: s.cancelled.krw.won(),
            pending_review_count: s.pending_review_count,
            rejected_count: s.rejected_count,
            queued_count: s.queued.count,
            submitted_count: s.submitted.count,
            dispatch: Some(convert::dispatch_state(&s.dispatch)),
        }))
    }
}
