//! `payouts.v1.ClaimService`.

use tonic::{Code, Request, Response, Status};

use super::{
    Context, Principal, Violations, convert, idempotency, next_page_token, page, record_touched,
    respond, status_with_reason,
};
use crate::domain::{self, Claim, Evidence, LossItem, NewClaim, ReviewDecision};
use crate::proto::payouts::v1::{self as pb, claim_service_server::ClaimService};
use crate::store::{ClaimFilter, Review, StoreError};

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
            format!("items[{i}].service"),
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
    let kind = v.check(format!("{field}.kind"), convert::parse_evidence_kind(*kind))?;
    Evidence::parse(kind, uri, sha256)
        .map_err(|(f, why)| v.add(format!("{field}.{f}"), why.0))
        .ok()
}

fn render_claim<R: prost::Message>(wrap: fn(pb::Claim) -> R) -> impl Fn(&Claim) -> Vec<u8> {
    move |c| wrap(convert::claim(c)).encode_to_vec()
}

fn touched_claim(claim: Option<&pb::Claim>) {
    if let Some(c) = claim {
        record_touched(&c.partner_id, &c.claim_id, &c.disbursement_id);
    }
}

fn missing() -> Status {
    Status::internal("validation passed without values")
}

#[tonic::async_trait]
impl ClaimService for Claims {
    async fn submit_claim(
        &self,
        request: Request<pb::SubmitClaimRequest>,
    ) -> Result<Response<pb::SubmitClaimResponse>, Status> {
        let actor = Principal::of(&request);
        let request = request.into_inner();
        let mut v = Violations::default();
        let request_id = v.request_id(&request.request_id);
        let partner_id = v.id("partner_id", &request.partner_id);
        let items = parse_items(&mut v, &request.items);
        let evidence: Vec<Option<Evidence>> = request
            .evidence
            .iter()
            .enumerate()
            .map(|(i, e)| parse_evidence(&mut v, &format!("evidence[{i}]"), e))
            .collect();
        v.finish()?;
        let (Some(request_id), Some(partner_id), Some(items)) = (request_id, partner_id, items)
        else {
            return Err(missing());
        };
        let evidence: Vec<Evidence> = evidence
            .into_iter()
            .collect::<Option<_>>()
            .ok_or_else(missing)?;
        let policy = &self.ctx.policy;
        if !policy.intake_open_at(jiff::Timestamp::now()) {
            return Err(status_with_reason(
                Code::FailedPrecondition,
                "INTAKE_CLOSED",
                "claims are not being taken under the policy in force",
                &[("policy_version", policy.version.clone())],
            ));
        }
        let decision = policy.decide(&items);
        let body = pb::SubmitClaimRequest {
            request_id: String::new(),
            ..request
        };
        let idem = idempotency(request_id, "SubmitClaim", &body);
        let claim = NewClaim {
            partner_id,
            items,
            evidence,
            decision,
            submitted_by: actor,
            trace_context: crate::telemetry::current_context_headers(),
        };
        let render = render_claim(|c| pb::SubmitClaimResponse { claim: Some(c) });
        let stored = self.ctx.store.submit_claim(&idem, &claim, &render).await?;
        let response = respond(stored, |c| pb::SubmitClaimResponse {
            claim: Some(convert::claim(c)),
        })?;
        touched_claim(response.get_ref().claim.as_ref());
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
        let actor = Principal::of(&request);
        let request = request.into_inner();
        let mut v = Violations::default();
        let request_id = v.request_id(&request.request_id);
        let claim_id = v.id("claim_id", &request.claim_id);
        let evidence = match &request.evidence {
            Some(e) => parse_evidence(&mut v, "evidence", e),
            None => {
                v.add("evidence", "is required");
                None
            }
        };
        v.finish()?;
        let (Some(request_id), Some(claim_id), Some(evidence)) = (request_id, claim_id, evidence)
        else {
            return Err(missing());
        };
        let body = pb::AttachEvidenceRequest {
            request_id: String::new(),
            ..request
        };
        let idem = idempotency(request_id, "AttachEvidence", &body);
        let render = render_claim(|c| pb::AttachEvidenceResponse { claim: Some(c) });
        let stored = self
            .ctx
            .store
            .attach_evidence(&idem, claim_id, &evidence, &actor, &render)
            .await?;
        let response = respond(stored, |c| pb::AttachEvidenceResponse {
            claim: Some(convert::claim(c)),
        })?;
        touched_claim(response.get_ref().claim.as_ref());
        Ok(response)
    }

    async fn review_claim(
        &self,
        request: Request<pb::ReviewClaimRequest>,
    ) -> Result<Response<pb::ReviewClaimResponse>, Status> {
        let reviewer = Principal::of(&request);
        let request = request.into_inner();
        let cap = self.ctx.policy.review_cap_krw;
        let mut v = Violations::default();
        let request_id = v.request_id(&request.request_id);
        let claim_id = v.id("claim_id", &request.claim_id);
        let decision = match pb::ReviewDecision::try_from(request.decision) {
            Ok(pb::ReviewDecision::Approve) => {
                if (1..=cap).contains(&request.compensation_krw) {
                    Some(ReviewDecision::Approve {
                        compensation_krw: request.compensation_krw,
                    })
                } else {
                    v.add(
                        "compensation_krw",
                        format!("must be between 1 and the review cap of {cap} KRW"),
                    );
                    None
                }
            }
            Ok(pb::ReviewDecision::Reject) => {
                if request.compensation_krw != 0 {
                    v.add("compensation_krw", "must be 0 when rejecting");
                }
                Some(ReviewDecision::Reject)
            }
            Ok(pb::ReviewDecision::Unspecified) | Err(_) => {
                v.add(
                    "decision",
                    "must be REVIEW_DECISION_APPROVE or REVIEW_DECISION_REJECT",
                );
                None
            }
        };
        let reason = request.reason.trim().to_owned();
        if reason.is_empty() || reason.chars().count() > 2000 {
            v.add("reason", "must be given, at most 2000 characters");
        }
        v.finish()?;
        let (Some(request_id), Some(claim_id), Some(decision)) = (request_id, claim_id, decision)
        else {
            return Err(missing());
        };
        let body = pb::ReviewClaimRequest {
            request_id: String::new(),
            ..request
        };
        let idem = idempotency(request_id, "ReviewClaim", &body);
        let render = render_claim(|c| pb::ReviewClaimResponse { claim: Some(c) });
        let stored = self
            .ctx
            .store
            .review_claim(
                &idem,
                claim_id,
                &Review {
                    decision,
                    reason: &reason,
                    reviewer: &reviewer,
                    trace_context: crate::telemetry::current_context_headers().as_deref(),
                },
                &render,
            )
            .await?;
        let response = respond(stored, |c| pb::ReviewClaimResponse {
            claim: Some(convert::claim(c)),
        })?;
        touched_claim(response.get_ref().claim.as_ref());
        Ok(response)
    }

    async fn get_claim(
        &self,
        request: Request<pb::GetClaimRequest>,
    ) -> Result<Response<pb::GetClaimResponse>, Status> {
        let mut v = Violations::default();
        let id = v.id("claim_id", &request.get_ref().claim_id);
        v.finish()?;
        let claim = self
            .ctx
            .store
            .get_claim(id.ok_or_else(missing)?)
            .await?
            .ok_or(StoreError::NotFound("claim"))?;
        let claim = convert::claim(&claim);
        touched_claim(Some(&claim));
        Ok(Response::new(pb::GetClaimResponse { claim: Some(claim) }))
    }

    async fn list_claims(
        &self,
        request: Request<pb::ListClaimsRequest>,
    ) -> Result<Response<pb::ListClaimsResponse>, Status> {
        let pb::ListClaimsRequest {
            page_size,
            page_token,
            status,
            tier,
            partner_id,
        } = request.into_inner();
        let mut v = Violations::default();
        let page = page(&mut v, page_size, &page_token);
        let status = v.check("status", convert::parse_claim_status_filter(status));
        let tier = v.check("tier", convert::parse_tier_filter(tier));
        let partner_id = if partner_id.is_empty() {
            None
        } else {
            v.id("partner_id", &partner_id)
        };
        v.finish()?;
        let filter = ClaimFilter {
            status: status.flatten(),
            tier: tier.flatten(),
            partner_id,
        };
        let claims = self.ctx.store.list_claims(&filter, &page).await?;
        Ok(Response::new(pb::ListClaimsResponse {
            next_page_token: next_page_token(
                &page,
                claims.len(),
                claims.last().map(|c| c.claim_id),
            ),
            claims: claims.iter().map(convert::claim).collect(),
        }))
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
