//! `payouts.v1.DisbursementService`.

use tonic::{Request, Response, Status};

use super::{
    Context, Mutation, Violations, convert, finance, idempotency, listing, page, record_touched,
};
use crate::audit::{CallRecord, Resource};
use crate::domain::text::Reason;
use crate::principal::Principal;
use crate::proto::payouts::v1::{self as pb, disbursement_service_server::DisbursementService};
use crate::store::{Disbursement, DisbursementFilter, DispatchState, OperatorRequest, StoreError};

pub struct Disbursements {
    pub ctx: Context,
}

fn missing() -> Status {
    crate::status::internal("validation passed without values")
}

#[tonic::async_trait]
impl DisbursementService for Disbursements {
    async fn get_disbursement(
        &self,
        request: Request<pb::GetDisbursementRequest>,
    ) -> Result<Response<pb::GetDisbursementResponse>, Status> {
        let call = CallRecord::of(&request);
        let mut v = Violations::default();
        let id = v.id("disbursement_id", &request.get_ref().disbursement_id);
        v.finish()?;
        let d = self
            .ctx
            .store
            .get_disbursement(id.ok_or_else(missing)?)
            .await?
            .ok_or(StoreError::NotFound("disbursement"))?;
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
        let pb::ListDisbursementsRequest {
            page_size,
            page_token,
            status,
            partner_id,
        } = request.into_inner();
        let mut v = Violations::default();
        let page = page(&mut v, page_size, &page_token);
        let status = v.check("status", convert::parse_disbursement_status_filter(status));
        let partner_id = v.optional_id("partner_id", &partner_id);
        v.finish()?;
        let filter = DisbursementFilter {
            status: status.flatten(),
            partner_id,
        };
        let found = self.ctx.store.list_disbursements(&filter, &page).await?;
        let (next_page_token, disbursements) =
            listing::page_of(&page, &found, |d| d.disbursement_id, convert::disbursement);
        Ok(Response::new(pb::ListDisbursementsResponse {
            next_page_token,
            disbursements,
        }))
    }

    async fn retry_disbursement(
        &self,
        request: Request<pb::RetryDisbursementRequest>,
    ) -> Result<Response<pb::RetryDisbursementResponse>, Status> {
        let actor = Principal::of(&request);
        let call = CallRecord::of(&request);
        let request = request.into_inner();
        let mut v = Violations::default();
        let request_id = v.request_id(&request.request_id);
        call.note_request_id(&request.request_id);
        let id = v.id("disbursement_id", &request.disbursement_id);
        v.finish()?;
        let (Some(request_id), Some(id)) = (request_id, id) else {
            return Err(missing());
        };
        let body = pb::RetryDisbursementRequest {
            request_id: String::new(),
            ..request
        };
        record_touched(&call, &[(Resource::Disbursement, &body.disbursement_id)]);
        let idem = idempotency(&actor, request_id, "RetryDisbursement", &body);
        let mutation = Mutation::new(
            &call,
            idem,
            |d: &Disbursement| d.disbursement_id.to_string(),
            |d| pb::RetryDisbursementResponse {
                disbursement: Some(convert::disbursement(d)),
            },
        );
        let stored = self
            .ctx
            .store
            .retry_disbursement(mutation.recorded(), id, &actor)
            .await?;
        mutation.respond(stored)
    }

    async fn cancel_disbursement(
        &self,
        request: Request<pb::CancelDisbursementRequest>,
    ) -> Result<Response<pb::CancelDisbursementResponse>, Status> {
        let actor = Principal::of(&request);
        let call = CallRecord::of(&request);
        let request = request.into_inner();
        let mut v = Violations::default();
        let request_id = v.request_id(&request.request_id);
        call.note_request_id(&request.request_id);
        let id = v.id("disbursement_id", &request.disbursement_id);
        let reason = v.check("reason", Reason::parse(&request.reason));
        v.finish()?;
        let (Some(request_id), Some(id), Some(reason)) = (request_id, id, reason) else {
            return Err(missing());
        };
        let body = pb::CancelDisbursementRequest {
            request_id: String::new(),
            ..request
        };
        record_touched(&call, &[(Resource::Disbursement, &body.disbursement_id)]);
        let idem = idempotency(&actor, request_id, "CancelDisbursement", &body);
        let mutation = Mutation::new(
            &call,
            idem,
            |d: &Disbursement| d.disbursement_id.to_string(),
            |d| pb::CancelDisbursementResponse {
                disbursement: Some(convert::disbursement(d)),
            },
        );
        let stored = self
            .ctx
            .store
            .cancel_disbursement(
                mutation.recorded(),
                id,
                &OperatorRequest {
                    actor: &actor,
                    reason: reason.as_str(),
                },
            )
            .await?;
        mutation.respond(stored)
    }

    async fn pause_dispatch(
        &self,
        request: Request<pb::PauseDispatchRequest>,
    ) -> Result<Response<pb::PauseDispatchResponse>, Status> {
        let actor = Principal::of(&request);
        let call = CallRecord::of(&request);
        let request = request.into_inner();
        let mut v = Violations::default();
        let request_id = v.request_id(&request.request_id);
        call.note_request_id(&request.request_id);
        let reason = v.check("reason", Reason::parse(&request.reason));
        v.finish()?;
        let (Some(request_id), Some(reason)) = (request_id, reason) else {
            return Err(missing());
        };
        let body = pb::PauseDispatchRequest {
            request_id: String::new(),
            ..request
        };
        let idem = idempotency(&actor, request_id, "PauseDispatch", &body);
        let mutation = Mutation::new(
            &call,
            idem,
            |_: &DispatchState| String::new(),
            |s| pb::PauseDispatchResponse {
                state: Some(convert::dispatch_state(s)),
            },
        );
        let stored = self
            .ctx
            .store
            .set_dispatch_paused(
                mutation.recorded(),
                true,
                &OperatorRequest {
                    actor: &actor,
                    reason: reason.as_str(),
                },
            )
            .await?;
        mutation.respond(stored)
    }

    async fn resume_dispatch(
        &self,
        request: Request<pb::ResumeDispatchRequest>,
    ) -> Result<Response<pb::ResumeDispatchResponse>, Status> {
        let actor = Principal::of(&request);
        let call = CallRecord::of(&request);
        let request = request.into_inner();
        let mut v = Violations::default();
        let request_id = v.request_id(&request.request_id);
        call.note_request_id(&request.request_id);
        v.finish()?;
        let request_id = request_id.ok_or_else(missing)?;
        let idem = idempotency(
            &actor,
            request_id,
            "ResumeDispatch",
            &pb::ResumeDispatchRequest::default(),
        );
        let mutation = Mutation::new(
            &call,
            idem,
            |_: &DispatchState| String::new(),
            |s| pb::ResumeDispatchResponse {
                state: Some(convert::dispatch_state(s)),
            },
        );
        let stored = self
            .ctx
            .store
            .set_dispatch_paused(
                mutation.recorded(),
                false,
                // Resuming clears the reason of the pause.
                &OperatorRequest {
                    actor: &actor,
                    reason: "",
                },
            )
            .await?;
        mutation.respond(stored)
    }

    type ExportDisbursementsStream = finance::ResponseStream<pb::ExportDisbursementsResponse>;

    async fn export_disbursements(
        &self,
        request: Request<pb::ExportDisbursementsRequest>,
    ) -> Result<Response<Self::ExportDisbursementsStream>, Status> {
        finance::export(&self.ctx, request.into_inner()).map(Response::new)
    }

    type ReconcileSettlementsStream = finance::ResponseStream<pb::ReconcileSettlementsResponse>;

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
