//! `payouts.v1.ClaimService`.

use std::sync::Arc;

use futures::future::BoxFuture;
use tonic::{Code, Request, Response, Status, Streaming};

use super::imports::{self, Import, RowResult, Written};
use super::operation::Operation;
use super::{
    Context, Violations, convert, found, idempotency, listing, missing, record_touched, respond,
    stored_id,
};
use crate::audit::{CallRecord, Resource};
use crate::domain::text::Reason;
use crate::domain::{
    self, BusinessRegistrationNumber, Claim, Evidence, LossItem, NewClaim, Policy, ReviewDecision,
};
use crate::principal::Principal;
use crate::proto::payouts::v1::{self as pb, claim_service_server::ClaimService};
use crate::status::status_with_reason;
use crate::store::{
    Attachment, BatchAudit, ClaimFilter, ClaimSubmission, PartnerRef, Review, Store, Stored,
};

pub struct Claims {
    pub ctx: Context,
}

fn parse_items(v: &mut Violations, items: &[pb::LossItem]) -> Option<Vec<LossItem>> {
    let mut parsed = Vec::with_capacity(items.len());
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let pb::LossItem {
            service,
            baseline_week_sales_krw,
            outage_week_sales_krw,
        } = item;
        let Some(service) = v.check(
            format_args!("items[{i}].service"),
            convert::parse_affected_service(*service),
        ) else {
            ok = false;
            continue;
        };
        match LossItem::parse(service, *baseline_week_sales_krw, *outage_week_sales_krw) {
            Ok(item) => parsed.push(item),
            Err((field, why)) => {
                ok = false;
                v.add(format!("items[{i}].{field}"), why.0);
            }
        }
    }
    if !ok {
        return None;
    }
    v.check("items", domain::check_items(parsed))
}

fn parse_evidence(v: &mut Violations, field: &str, e: &pb::Evidence) -> Option<Evidence> {
    let pb::Evidence {
        kind,
        uri,
        sha256,
        attach_time: _,
    } = e;
    let kind = v.check(
        format_args!("{field}.kind"),
        convert::parse_evidence_kind(*kind),
    )?;
    Evidence::parse(kind, uri, sha256)
        .map_err(|(f, why)| v.add(format!("{field}.{f}"), why.0))
        .ok()
}

fn render_claim<R: prost::Message>(wrap: fn(pb::Claim) -> R) -> impl Fn(&Claim) -> Vec<u8> {
    move |c| wrap(convert::claim(c)).encode_to_vec()
}

/// Notes for the call the claim, its partner and its disbursement (if it has one yet).
pub fn touched_claim(call: &CallRecord, claim: Option<&pb::Claim>) {
    if let Some(c) = claim {
        record_touched(
            call,
            &[
                (Resource::Partner, &c.partner_id),
                (Resource::Claim, &c.claim_id),
                (Resource::Disbursement, &c.disbursement_id),
            ],
        );
    }
}

/// The decision of a review, with the compensation it sets (at most `cap`).
fn review_decision(
    v: &mut Violations,
    r: &pb::ReviewClaimRequest,
    cap: i64,
) -> Option<ReviewDecision> {
    match pb::ReviewDecision::try_from(r.decision) {
        Ok(pb::ReviewDecision::Approve) => v.check(
            "compensation_krw",
            ReviewDecision::approve(r.compensation_krw, cap),
        ),
        Ok(pb::ReviewDecision::Reject) => v.check(
            "compensation_krw",
            ReviewDecision::reject(r.compensation_krw),
        ),
        Ok(pb::ReviewDecision::Unspecified) | Err(_) => {
            v.add(
                "decision",
                "must be REVIEW_DECISION_APPROVE or REVIEW_DECISION_REJECT",
            );
            None
        }
    }
}

/// The `SubmitClaim` response kept for replays.
pub fn render_submitted(c: &Claim) -> Vec<u8> {
    render_claim(|c| pb::SubmitClaimResponse { claim: Some(c) })(c)
}

/// The claim a submission's answer names, for the audit log (the most specific resource, as
/// `record_touched` ranks them).
pub fn submitted_id(stored: &Stored<Claim>) -> String {
    stored_id(stored, |r: pb::SubmitClaimResponse| {
        r.claim.map(|c| c.claim_id)
    })
}

/// How a claim names its partner: `SubmitClaim` by id, an `ImportClaims` row either way.
pub enum PartnerField<'a> {
    Id(&'a str),
    RegistrationNumber(&'a str),
    Missing,
}

/// The fields of a `SubmitClaim` request (or an `ImportClaims` row, which is one).
pub struct ClaimFields<'a> {
    pub request_id: &'a str,
    pub partner: PartnerField<'a>,
    pub items: &'a [pb::LossItem],
    pub evidence: &'a [pb::Evidence],
}

/// A claim as the store takes it: validated, decided under `policy`, with the request id and
/// the digest of `body` (the request without its id). The error is what the call answers.
pub fn prepare_submission(
    policy: &Policy,
    fields: ClaimFields<'_>,
    body: &impl prost::Message,
    actor: String,
) -> Result<ClaimSubmission, Status> {
    let mut v = Violations::default();
    let request_id = v.request_id(fields.request_id);
    let partner = match fields.partner {
        PartnerField::Id(raw) => v.id("partner_id", raw).map(PartnerRef::Id),
        PartnerField::RegistrationNumber(raw) => v
            .check(
                "business_registration_number",
                BusinessRegistrationNumber::parse(raw),
            )
            .map(PartnerRef::RegistrationNumber),
        PartnerField::Missing => {
            v.add(
                "partner_id",
                "name the partner: set partner_id or business_registration_number",
            );
            None
        }
    };
    let items = parse_items(&mut v, fields.items);
    let evidence: Vec<Option<Evidence>> = fields
        .evidence
        .iter()
        .enumerate()
        .map(|(i, e)| parse_evidence(&mut v, &format!("evidence[{i}]"), e))
        .collect();
    v.finish()?;
    let (Some(request_id), Some(partner), Some(items)) = (request_id, partner, items) else {
        return Err(missing());
    };
    let evidence: Vec<Evidence> = evidence
        .into_iter()
        .collect::<Option<_>>()
        .ok_or_else(missing)?;
    if !policy.intake_open_at(jiff::Timestamp::now()) {
        return Err(status_with_reason(
            Code::FailedPrecondition,
            "INTAKE_CLOSED",
            "claims are not being taken under the policy in force",
            &[("policy_version", policy.version.clone())],
        ));
    }
    let decision = policy.decide(&items);
    let claim = NewClaim {
        // Named by registration number, the partner is the store's to find.
        partner_id: match &partner {
            PartnerRef::Id(id) => *id,
            PartnerRef::RegistrationNumber(_) => uuid::Uuid::nil().into(),
        },
        items,
        evidence,
        decision,
        submitted_by: actor,
        trace_context: crate::telemetry::current_context_headers(),
    };
    Ok(ClaimSubmission {
        idem: idempotency(&claim.submitted_by, request_id, "SubmitClaim", body),
        partner,
        claim,
    })
}

/// `ImportClaims`: every row is a `SubmitClaim` call, written in batches.
struct ClaimImport {
    store: Arc<dyn Store>,
    policy: Arc<Policy>,
}

impl Import for ClaimImport {
    type Request = pb::ImportClaimsRequest;
    type Response = pb::ImportClaimsResponse;
    type Row = ClaimSubmission;
    type Value = Claim;
    type Stored = pb::SubmitClaimResponse;
    type Proto = pb::Claim;

    const PATH: &'static str = "/payouts.v1.ClaimService/ImportClaims";

    fn request_id(request: &Self::Request) -> &str {
        &request.request_id
    }

    fn prepare(&self, request: Self::Request, principal: &str) -> Result<Self::Row, Status> {
        use pb::import_claims_request::Partner;
        let fields = |partner| ClaimFields {
            request_id: &request.request_id,
            partner,
            items: &request.items,
            evidence: &request.evidence,
        };
        let body_of = |request: &pb::ImportClaimsRequest| pb::ImportClaimsRequest {
            request_id: String::new(),
            ..request.clone()
        };
        let actor = principal.to_owned();
        match &request.partner {
            // Exactly a SubmitClaim request: the same digest, so either one replays the other.
            Some(Partner::PartnerId(id)) => {
                let body = pb::SubmitClaimRequest {
                    request_id: String::new(),
                    partner_id: id.clone(),
                    items: request.items.clone(),
                    evidence: request.evidence.clone(),
                };
                prepare_submission(&self.policy, fields(PartnerField::Id(id)), &body, actor)
            }
            Some(Partner::BusinessRegistrationNumber(brn)) => prepare_submission(
                &self.policy,
                fields(PartnerField::RegistrationNumber(brn)),
                &body_of(&request),
                actor,
            ),
            None => prepare_submission(
                &self.policy,
                fields(PartnerField::Missing),
                &body_of(&request),
                actor,
            ),
        }
    }

    fn write<'a>(
        &'a self,
        rows: &'a [Self::Row],
        audit: BatchAudit<'a, Self::Value>,
    ) -> BoxFuture<'a, Written<Self::Value>> {
        self.store.submit_claims(rows, &render_submitted, audit)
    }

    fn stored_id(stored: &Stored<Self::Value>) -> String {
        submitted_id(stored)
    }

    fn fresh(value: &Self::Value) -> Self::Proto {
        convert::claim(value)
    }

    fn replayed(stored: Self::Stored) -> Option<Self::Proto> {
        stored.claim
    }

    fn response(row: i64, result: RowResult<Self::Proto>) -> Self::Response {
        use pb::import_claims_response::Outcome;
        let outcome = match &result {
            RowResult::Created(_) => Outcome::Created,
            RowResult::Replayed(_) => Outcome::Replayed,
            RowResult::Rejected(_) => Outcome::Rejected,
        };
        let (claim, error) = result.into_parts();
        pb::ImportClaimsResponse {
            row,
            outcome: outcome as i32,
            claim,
            error,
        }
    }
}

#[tonic::async_trait]
impl ClaimService for Claims {
    type ImportClaimsStream = imports::ImportAnswers<pb::ImportClaimsResponse>;

    async fn import_claims(
        &self,
        request: Request<Streaming<pb::ImportClaimsRequest>>,
    ) -> Result<Response<Self::ImportClaimsStream>, Status> {
        let import = ClaimImport {
            store: self.ctx.store.clone(),
            policy: self.ctx.policy.clone(),
        };
        Ok(Response::new(imports::run(import, request)))
    }

    async fn submit_claim(
        &self,
        request: Request<pb::SubmitClaimRequest>,
    ) -> Result<Response<pb::SubmitClaimResponse>, Status> {
        let actor = Principal::of(&request);
        let call = CallRecord::of(&request);
        let mut body = request.into_inner();
        // What is left is the body whose digest goes with the request id.
        let request_id = std::mem::take(&mut body.request_id);
        // In the audit log even when refused.
        call.note_request_id(&request_id);
        let fields = ClaimFields {
            request_id: &request_id,
            partner: PartnerField::Id(&body.partner_id),
            items: &body.items,
            evidence: &body.evidence,
        };
        let row = prepare_submission(&self.ctx.policy, fields, &body, actor)?;
        // Shares a commit with whatever other submissions are in flight.
        let stored = self.ctx.intake.claims.submit(row, &call).await?;
        let response = respond(&call, stored, |c| pb::SubmitClaimResponse {
            claim: Some(convert::claim(c)),
        })?;
        touched_claim(&call, response.get_ref().claim.as_ref());
        Ok(response)
    }

    async fn preview_compensation(
        &self,
        request: Request<pb::PreviewCompensationRequest>,
    ) -> Result<Response<pb::PreviewCompensationResponse>, Status> {
        let mut v = Violations::default();
        let items = parse_items(&mut v, &request.get_ref().items);
        v.finish()?;
        let items = items.ok_or_else(missing)?;
        Ok(Response::new(pb::PreviewCompensationResponse {
            decision: Some(convert::decision(&self.ctx.policy.decide(&items))),
        }))
    }

    async fn attach_evidence(
        &self,
        request: Request<pb::AttachEvidenceRequest>,
    ) -> Result<Response<pb::AttachEvidenceResponse>, Status> {
        let (op, evidence) = Operation::parse(request, |v, r| match &r.evidence {
            Some(e) => parse_evidence(v, "evidence", e),
            None => {
                v.add("evidence", "is required");
                None
            }
        })?;
        let attachment = Attachment {
            claim_id: op.id,
            evidence: &evidence,
            attached_by: &op.actor,
        };
        op.answer(|rec| self.ctx.store.attach_evidence(rec, &attachment))
            .await
    }

    async fn review_claim(
        &self,
        request: Request<pb::ReviewClaimRequest>,
    ) -> Result<Response<pb::ReviewClaimResponse>, Status> {
        let cap = self.ctx.policy.review_cap_krw.won();
        let (op, (decision, reason)) = Operation::parse(request, |v, r| {
            let decision = review_decision(v, r, cap);
            let reason = v.check("reason", Reason::parse(&r.reason));
            Some((decision?, reason?))
        })?;
        let trace_context = crate::telemetry::current_context_headers();
        let review = Review {
            claim_id: op.id,
            decision,
            reason: reason.as_str(),
            reviewer: &op.actor,
            trace_context: trace_context.as_deref(),
        };
        op.answer(|rec| self.ctx.store.review_claim(rec, &review))
            .await
    }

    async fn get_claim(
        &self,
        request: Request<pb::GetClaimRequest>,
    ) -> Result<Response<pb::GetClaimResponse>, Status> {
        let call = CallRecord::of(&request);
        let get = |id| self.ctx.store.get_claim(id);
        let claim = found("claim_id", &request.get_ref().claim_id, "claim", get).await?;
        let claim = convert::claim(&claim);
        touched_claim(&call, Some(&claim));
        Ok(Response::new(pb::GetClaimResponse { claim: Some(claim) }))
    }

    async fn list_claims(
        &self,
        request: Request<pb::ListClaimsRequest>,
    ) -> Result<Response<pb::ListClaimsResponse>, Status> {
        let (page, filter) = listing::parse(request.get_ref(), |v, r| ClaimFilter {
            status: v
                .check("status", convert::parse_claim_status_filter(r.status))
                .flatten(),
            tier: v
                .check("tier", convert::parse_tier_filter(r.tier))
                .flatten(),
            partner_id: v.optional_id("partner_id", &r.partner_id),
        })?;
        let found = self.ctx.store.list_claims(&filter, &page).await?;
        Ok(listing::answer(
            &page,
            &found,
            |c| c.claim_id,
            convert::claim,
        ))
    }

    async fn get_policy(
        &self,
        _request: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::GetPolicyResponse>, Status> {
        Ok(Response::new(pb::GetPolicyResponse {
            policy: Some(convert::policy(&self.ctx.policy)),
        }))
    }
}
