//! `ClaimService` through the wire: the tiers at every boundary, previews, one claim per partner,
//! validation, request-id idempotency, the review flow, listing and the policy.

use std::collections::HashSet;

use partner_payouts::proto::payouts::v1 as pb;
use tonic::Code;

use crate::helpers::*;
use crate::on_both_databases;

/// The version of the shipped policy, which the test policy keeps.
const POLICY_VERSION: &str = "2022-12-29-illustrative-1";

fn sha256_hex() -> String {
    "ab".repeat(32)
}

fn evidence() -> pb::Evidence {
    pb::Evidence {
        kind: pb::EvidenceKind::SalesLossProof as i32,
        uri: "s3://payouts-evidence/claims/sales-ledger.pdf".into(),
        sha256: sha256_hex(),
        attach_time: None,
    }
}

async fn new_partner(app: &TestApp, seed: u64) -> String {
    register(app, partner(seed)).await.partner_id
}

async fn list_claims(app: &TestApp, request: pb::ListClaimsRequest) -> pb::ListClaimsResponse {
    app.claims()
        .list_claims(request)
        .await
        .expect("list claims")
        .into_inner()
}

async fn all_claim_ids(app: &TestApp, request: pb::ListClaimsRequest) -> Vec<String> {
    let response = list_claims(app, request).await;
    assert_eq!(response.next_page_token, "");
    response.claims.into_iter().map(|c| c.claim_id).collect()
}

async fn preview(app: &TestApp, items: Vec<pb::LossItem>) -> pb::CompensationDecision {
    app.claims()
        .preview_compensation(pb::PreviewCompensationRequest { items })
        .await
        .expect("preview")
        .into_inner()
        .decision
        .expect("decision in response")
}

fn review_request(
    claim_id: &str,
    decision: pb::ReviewDecision,
    compensation_krw: i64,
    reason: &str,
) -> pb::ReviewClaimRequest {
    pb::ReviewClaimRequest {
        request_id: request_id(),
        claim_id: claim_id.into(),
        decision: decision as i32,
        compensation_krw,
        reason: reason.into(),
    }
}

async fn review(
    app: &TestApp,
    request: pb::ReviewClaimRequest,
) -> Result<pb::Claim, tonic::Status> {
    app.claims()
        .review_claim(request)
        .await
        .map(|r| r.into_inner().claim.expect("claim in response"))
}

async fn attach(app: &TestApp, claim_id: &str) -> pb::Claim {
    app.claims()
        .attach_evidence(pb::AttachEvidenceRequest {
            request_id: request_id(),
            claim_id: claim_id.into(),
            evidence: Some(evidence()),
        })
        .await
        .expect("attach evidence")
        .into_inner()
        .claim
        .expect("claim in response")
}

/// A claim `PENDING_REVIEW` (recognised loss 600,000) for a new partner.
async fn pending_claim(app: &TestApp, seed: u64) -> pb::Claim {
    let partner_id = new_partner(app, seed).await;
    let claim = submit(app, &partner_id, vec![full_weight_item(600_000)]).await;
    assert_eq!(claim.status(), pb::ClaimStatus::PendingReview);
    assert_eq!(claim.tier(), pb::CompensationTier::Review);
    assert_eq!(claim.compensation_krw, 0);
    assert_eq!(claim.disbursement_id, "");
    claim
}

fn full_weight_line(loss_krw: i64) -> pb::BreakdownLine {
    pb::BreakdownLine {
        service: pb::AffectedService::Other as i32,
        loss_krw,
        operating_margin_bps: 10_000,
        kakao_share_bps: 10_000,
        alternative_factor_bps: 10_000,
        recognized_loss_krw: loss_krw,
    }
}

on_both_databases!(
    every_tier_boundary_decides_as_the_policy_says,
    |app: TestApp| async move {
        use pb::ClaimStatus::{Approved, PendingReview, Rejected};
        use pb::CompensationTier::{Lower, NotEligible, Review, Upper};
        let table = [
            (0, Rejected, NotEligible, 0),
            (1, Approved, Lower, 30_000),
            (300_000, Approved, Lower, 30_000),
            (300_001, Approved, Upper, 50_000),
            (500_000, Approved, Upper, 50_000),
            (500_001, PendingReview, Review, 0),
        ];
        for (seed, (loss, status, tier, compensation)) in (1u64..).zip(table) {
            let partner_id = new_partner(&app, seed).await;
            let claim = submit(&app, &partner_id, vec![full_weight_item(loss)]).await;
            let case = format!("recognised loss {loss}");
            assert_eq!(claim.partner_id, partner_id, "{case}");
            assert_eq!(claim.status(), status, "{case}");
            assert_eq!(claim.tier(), tier, "{case}");
            assert_eq!(claim.compensation_krw, compensation, "{case}");
            assert_eq!(claim.reported_loss_krw, loss, "{case}");
            assert_eq!(claim.recognized_loss_krw, loss, "{case}");
            assert_eq!(claim.policy_version, POLICY_VERSION, "{case}");
            assert_eq!(claim.breakdown, vec![full_weight_line(loss)], "{case}");
            assert_eq!(claim.items, vec![full_weight_item(loss)], "{case}");
            assert_eq!(claim.submitted_by, "local-dev", "{case}");
            assert_eq!(claim.reviewed_by, "", "{case}");
            assert!(claim.create_time.is_some(), "{case}");
            assert!(uuid::Uuid::parse_str(&claim.claim_id).is_ok(), "{case}");
            // Only an approved claim has a disbursement.
            assert_eq!(
                claim.disbursement_id.is_empty(),
                status != Approved,
                "{case}"
            );

            // "Why this amount": the stored claim answers with the same decision.
            assert_eq!(get_claim(&app, &claim.claim_id).await, claim, "{case}");

            // The preview gives the same decision for the same items.
            let decision = preview(&app, vec![full_weight_item(loss)]).await;
            assert_eq!(
                decision,
                pb::CompensationDecision {
                    reported_loss_krw: loss,
                    recognized_loss_krw: loss,
                    tier: tier as i32,
                    compensation_krw: compensation,
                    policy_version: POLICY_VERSION.into(),
                    breakdown: vec![full_weight_line(loss)],
                    status: status as i32,
                },
                "{case}"
            );
        }
        let all = list_claims(&app, pb::ListClaimsRequest::default()).await;
        assert_eq!(all.claims.len(), 6);
    }
);

on_both_databases!(
    preview_stores_nothing_and_ignores_item_order,
    |app: TestApp| async move {
        // 1,000,000 through a KakaoTalk Channel counts 20% x 90% = 180,000; 200,000 of `other`
        // counts in full: 380,000 recognised, the upper tier.
        let channel = pb::LossItem {
            service: pb::AffectedService::KakaotalkChannel as i32,
            baseline_week_sales_krw: 1_500_000,
            outage_week_sales_krw: 500_000,
        };
        let other = full_weight_item(200_000);
        let forward = preview(&app, vec![channel, other]).await;
        let backward = preview(&app, vec![other, channel]).await;
        assert_eq!(forward, backward);
        assert_eq!(forward.status(), pb::ClaimStatus::Approved);
        assert_eq!(forward.tier(), pb::CompensationTier::Upper);
        assert_eq!(forward.compensation_krw, 50_000);
        assert_eq!(forward.reported_loss_krw, 1_200_000);
        assert_eq!(forward.recognized_loss_krw, 380_000);
        assert_eq!(forward.policy_version, POLICY_VERSION);
        assert_eq!(
            forward.breakdown,
            vec![
                pb::BreakdownLine {
                    service: pb::AffectedService::KakaotalkChannel as i32,
                    loss_krw: 1_000_000,
                    operating_margin_bps: 2_000,
                    kakao_share_bps: 9_000,
                    alternative_factor_bps: 10_000,
                    recognized_loss_krw: 180_000,
                },
                full_weight_line(200_000),
            ]
        );

        // A preview is validated like a claim...
        let status = app
            .claims()
            .preview_compensation(pb::PreviewCompensationRequest { items: vec![] })
            .await
            .expect_err("empty preview");
        assert_eq!(bad_fields(&status), vec!["items"]);

        // ...and stores nothing.
        let listed = list_claims(&app, pb::ListClaimsRequest::default()).await;
        assert!(listed.claims.is_empty(), "{:?}", listed.claims);
        assert_eq!(listed.next_page_token, "");

        // Submitting the same items (in the other order) decides exactly as the preview did.
        let partner_id = new_partner(&app, 7).await;
        let claim = submit(&app, &partner_id, vec![other, channel]).await;
        assert_eq!(claim.status, forward.status);
        assert_eq!(claim.tier, forward.tier);
        assert_eq!(claim.compensation_krw, forward.compensation_krw);
        assert_eq!(claim.reported_loss_krw, forward.reported_loss_krw);
        assert_eq!(claim.recognized_loss_krw, forward.recognized_loss_krw);
        assert_eq!(claim.policy_version, forward.policy_version);
        assert_eq!(claim.breakdown, forward.breakdown);
        // Stored sorted by service, whatever the order sent.
        assert_eq!(claim.items, vec![channel, other]);
        assert_eq!(
            all_claim_ids(&app, pb::ListClaimsRequest::default()).await,
            vec![claim.claim_id]
        );
    }
);

on_both_databases!(
    one_claim_per_partner_and_only_for_known_partners,
    |app: TestApp| async move {
        let partner_id = new_partner(&app, 1).await;
        let first = submit(&app, &partner_id, vec![full_weight_item(1_000)]).await;
        assert_eq!(first.status(), pb::ClaimStatus::Approved);

        let status = app
            .claims()
            .submit_claim(pb::SubmitClaimRequest {
                request_id: request_id(),
                partner_id: partner_id.clone(),
                items: vec![full_weight_item(600_000)],
                evidence: vec![],
            })
            .await
            .expect_err("second claim");
        assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
        assert_eq!(reason(&status), "CLAIM_ALREADY_FILED");

        let status = app
            .claims()
            .submit_claim(pb::SubmitClaimRequest {
                request_id: request_id(),
                partner_id: uuid::Uuid::now_v7().to_string(),
                items: vec![full_weight_item(1_000)],
                evidence: vec![],
            })
            .await
            .expect_err("unknown partner");
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        assert_eq!(reason(&status), "PARTNER_NOT_FOUND");

        // Only the first claim is stored, unchanged.
        assert_eq!(
            all_claim_ids(&app, pb::ListClaimsRequest::default()).await,
            vec![first.claim_id.clone()]
        );
        assert_eq!(get_claim(&app, &first.claim_id).await, first);

        let status = app
            .claims()
            .get_claim(pb::GetClaimRequest {
                claim_id: uuid::Uuid::now_v7().to_string(),
            })
            .await
            .expect_err("unknown claim");
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        assert_eq!(reason(&status), "CLAIM_NOT_FOUND");
        let status = app
            .claims()
            .get_claim(pb::GetClaimRequest {
                claim_id: "claim-1".into(),
            })
            .await
            .expect_err("malformed claim id");
        assert_eq!(bad_fields(&status), vec!["claim_id"]);
    }
);

on_both_databases!(
    invalid_claims_name_every_bad_field_and_store_nothing,
    |app: TestApp| async move {
        let partner_id = new_partner(&app, 1).await;
        let item = |service: pb::AffectedService, baseline: i64, outage: i64| pb::LossItem {
            service: service as i32,
            baseline_week_sales_krw: baseline,
            outage_week_sales_krw: outage,
        };
        let good = full_weight_item(1_000);
        let over = 1_000_000_000_001;
        let cases: Vec<(&str, String, Vec<pb::LossItem>, Vec<&str>)> = vec![
            ("no items", request_id(), vec![], vec!["items"]),
            (
                "duplicate service",
                request_id(),
                vec![good, full_weight_item(5)],
                vec!["items"],
            ),
            (
                "unspecified service",
                request_id(),
                vec![item(pb::AffectedService::Unspecified, 10, 0)],
                vec!["items[0].service"],
            ),
            (
                "unknown service number",
                request_id(),
                vec![
                    good,
                    pb::LossItem {
                        service: 99,
                        ..good
                    },
                ],
                vec!["items[1].service"],
            ),
            (
                "negative baseline",
                request_id(),
                vec![item(pb::AffectedService::Other, -1, 0)],
                vec!["items[0].baseline_week_sales_krw"],
            ),
            (
                "baseline above 1e12",
                request_id(),
                vec![item(pb::AffectedService::Other, over, 0)],
                vec!["items[0].baseline_week_sales_krw"],
            ),
            (
                "outage above 1e12",
                request_id(),
                vec![item(pb::AffectedService::KakaoPay, 10, over)],
                vec!["items[0].outage_week_sales_krw"],
            ),
            (
                "negative outage",
                request_id(),
                vec![item(pb::AffectedService::KakaoPay, 10, -5)],
                vec!["items[0].outage_week_sales_krw"],
            ),
            (
                "bad request id",
                "not-a-uuid".into(),
                vec![good],
                vec!["request_id"],
            ),
            (
                "nil request id",
                uuid::Uuid::nil().to_string(),
                vec![good],
                vec!["request_id"],
            ),
            (
                "everything at once",
                String::new(),
                vec![
                    item(pb::AffectedService::Unspecified, 1, 0),
                    item(pb::AffectedService::Other, -1, 0),
                ],
                vec![
                    "request_id",
                    "items[0].service",
                    "items[1].baseline_week_sales_krw",
                ],
            ),
        ];
        for (case, request_id, items, fields) in cases {
            let status = app
                .claims()
                .submit_claim(pb::SubmitClaimRequest {
                    request_id,
                    partner_id: partner_id.clone(),
                    items,
                    evidence: vec![],
                })
                .await
                .expect_err(case);
            assert_eq!(bad_fields(&status), fields, "{case}");
        }
        let status = app
            .claims()
            .submit_claim(pb::SubmitClaimRequest {
                request_id: request_id(),
                partner_id: "partner-1".into(),
                items: vec![good],
                evidence: vec![pb::Evidence {
                    sha256: "not-hex".into(),
                    ..evidence()
                }],
            })
            .await
            .expect_err("bad partner id and evidence");
        assert_eq!(
            bad_fields(&status),
            vec!["partner_id", "evidence[0].sha256"]
        );

        // Nothing was stored: the partner still has its one claim to file.
        assert!(
            list_claims(&app, pb::ListClaimsRequest::default())
                .await
                .claims
                .is_empty()
        );
        let claim = submit(&app, &partner_id, vec![good]).await;
        assert_eq!(claim.status(), pb::ClaimStatus::Approved);
        assert_eq!(
            all_claim_ids(&app, pb::ListClaimsRequest::default()).await,
            vec![claim.claim_id]
        );
    }
);

on_both_databases!(
    submit_claim_is_idempotent_by_request_id,
    |app: TestApp| async move {
        let partner_id = new_partner(&app, 1).await;
        let request = pb::SubmitClaimRequest {
            request_id: request_id(),
            partner_id: partner_id.clone(),
            items: vec![full_weight_item(1_000)],
            evidence: vec![evidence()],
        };
        let first = app
            .claims()
            .submit_claim(request.clone())
            .await
            .expect("first submission")
            .into_inner()
            .claim
            .expect("claim");
        let again = app
            .claims()
            .submit_claim(request.clone())
            .await
            .expect("repeated submission")
            .into_inner()
            .claim
            .expect("claim");
        assert_eq!(again.claim_id, first.claim_id);
        assert_eq!(again, first);
        assert_eq!(first.evidence.len(), 1);

        let status = app
            .claims()
            .submit_claim(pb::SubmitClaimRequest {
                items: vec![full_weight_item(2_000)],
                ..request.clone()
            })
            .await
            .expect_err("same request id, other body");
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert_eq!(reason(&status), "REQUEST_ID_REUSED");

        // A different request id for the same partner is a second claim, refused.
        let status = app
            .claims()
            .submit_claim(pb::SubmitClaimRequest {
                request_id: request_id(),
                ..request
            })
            .await
            .expect_err("new request id");
        assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
        assert_eq!(reason(&status), "CLAIM_ALREADY_FILED");

        assert_eq!(
            all_claim_ids(&app, pb::ListClaimsRequest::default()).await,
            vec![first.claim_id.clone()]
        );
        let disbursements = app
            .disbursements()
            .list_disbursements(pb::ListDisbursementsRequest {
                partner_id: partner_id.clone(),
                ..Default::default()
            })
            .await
            .expect("list disbursements")
            .into_inner()
            .disbursements;
        assert_eq!(disbursements.len(), 1, "one approval, one disbursement");
        assert_eq!(disbursements[0].disbursement_id, first.disbursement_id);
    }
);

on_both_databases!(
    review_needs_evidence_and_pays_the_reviewed_amount,
    |app: TestApp| async move {
        use pb::ReviewDecision::Approve;
        let claim = pending_claim(&app, 1).await;
        let id = claim.claim_id.clone();

        let status = review(
            &app,
            review_request(&id, Approve, 40_000, "sales ledger checked"),
        )
        .await
        .expect_err("approve without evidence");
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert_eq!(reason(&status), "EVIDENCE_REQUIRED");

        for amount in [0, -1, 50_001] {
            let status = review(&app, review_request(&id, Approve, amount, "checked"))
                .await
                .expect_err("amount out of range");
            assert_eq!(
                bad_fields(&status),
                vec!["compensation_krw"],
                "amount {amount}"
            );
        }
        let status = review(
            &app,
            review_request(&id, pb::ReviewDecision::Unspecified, 40_000, ""),
        )
        .await
        .expect_err("no decision, no reason");
        assert_eq!(bad_fields(&status), vec!["decision", "reason"]);
        assert_eq!(
            get_claim(&app, &id).await,
            claim,
            "refused reviews change nothing"
        );

        let with_evidence = attach(&app, &id).await;
        assert_eq!(with_evidence.status(), pb::ClaimStatus::PendingReview);
        assert_eq!(with_evidence.evidence.len(), 1);
        let attached = &with_evidence.evidence[0];
        assert_eq!(attached.kind(), pb::EvidenceKind::SalesLossProof);
        assert_eq!(attached.uri, evidence().uri);
        assert_eq!(attached.sha256, sha256_hex());
        assert!(attached.attach_time.is_some());
        assert_eq!(with_evidence.disbursement_id, "");

        let approving = review_request(&id, Approve, 40_000, "sales ledger checked");
        let approved = review(&app, approving.clone()).await.expect("approve");
        assert_eq!(approved.status(), pb::ClaimStatus::Approved);
        assert_eq!(approved.tier(), pb::CompensationTier::Review);
        assert_eq!(approved.compensation_krw, 40_000);
        assert_eq!(approved.recognized_loss_krw, 600_000);
        assert_eq!(approved.reviewed_by, "local-dev");
        assert_eq!(approved.review_reason, "sales ledger checked");
        assert_eq!(approved.evidence, with_evidence.evidence);
        assert!(
            uuid::Uuid::parse_str(&approved.disbursement_id).is_ok(),
            "{approved:?}"
        );
        assert_eq!(get_claim(&app, &id).await, approved);

        // The same request again replays the first answer.
        assert_eq!(review(&app, approving).await.expect("replay"), approved);

        let disbursement = app
            .disbursements()
            .get_disbursement(pb::GetDisbursementRequest {
                disbursement_id: approved.disbursement_id.clone(),
            })
            .await
            .expect("disbursement")
            .into_inner()
            .disbursement
            .expect("disbursement in response");
        assert_eq!(disbursement.amount_krw, 40_000);
        assert_eq!(disbursement.claim_id, id);

        for request in [
            review_request(&id, Approve, 30_000, "again"),
            review_request(&id, pb::ReviewDecision::Reject, 0, "changed my mind"),
        ] {
            let status = review(&app, request).await.expect_err("already reviewed");
            assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
            assert_eq!(reason(&status), "CLAIM_NOT_PENDING_REVIEW");
        }
        assert_eq!(get_claim(&app, &id).await, approved);
    }
);

on_both_databases!(rejecting_a_review_pays_nothing, |app: TestApp| async move {
    use pb::ReviewDecision::Reject;
    let claim = pending_claim(&app, 1).await;
    let id = claim.claim_id.clone();

    let status = review(&app, review_request(&id, Reject, 0, "  "))
        .await
        .expect_err("reject without reason");
    assert_eq!(bad_fields(&status), vec!["reason"]);
    let status = review(&app, review_request(&id, Reject, 10_000, "no proof"))
        .await
        .expect_err("reject with an amount");
    assert_eq!(bad_fields(&status), vec!["compensation_krw"]);

    // Rejecting needs no evidence.
    let rejected = review(&app, review_request(&id, Reject, 0, "no proof of sales"))
        .await
        .expect("reject");
    assert_eq!(rejected.status(), pb::ClaimStatus::Rejected);
    assert_eq!(rejected.compensation_krw, 0);
    assert_eq!(rejected.disbursement_id, "");
    assert_eq!(rejected.reviewed_by, "local-dev");
    assert_eq!(rejected.review_reason, "no proof of sales");
    assert_eq!(get_claim(&app, &id).await, rejected);

    let disbursements = app
        .disbursements()
        .list_disbursements(pb::ListDisbursementsRequest::default())
        .await
        .expect("list disbursements")
        .into_inner()
        .disbursements;
    assert!(disbursements.is_empty(), "{disbursements:?}");

    attach(&app, &id).await;
    let status = review(
        &app,
        review_request(&id, pb::ReviewDecision::Approve, 40_000, "appeal"),
    )
    .await
    .expect_err("a rejected claim stays rejected");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason(&status), "CLAIM_NOT_PENDING_REVIEW");
});

on_both_databases!(
    only_pending_claims_can_be_reviewed,
    |app: TestApp| async move {
        let partner_id = new_partner(&app, 1).await;
        let approved = submit(&app, &partner_id, vec![full_weight_item(1_000)]).await;
        assert_eq!(approved.status(), pb::ClaimStatus::Approved);
        let with_evidence = attach(&app, &approved.claim_id).await;

        for request in [
            review_request(
                &approved.claim_id,
                pb::ReviewDecision::Approve,
                50_000,
                "more",
            ),
            review_request(&approved.claim_id, pb::ReviewDecision::Reject, 0, "less"),
        ] {
            let status = review(&app, request)
                .await
                .expect_err("auto-approved claim");
            assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
            assert_eq!(reason(&status), "CLAIM_NOT_PENDING_REVIEW");
        }
        let stored = get_claim(&app, &approved.claim_id).await;
        assert_eq!(stored, with_evidence);
        assert_eq!(stored.compensation_krw, 30_000);
        assert_eq!(stored.reviewed_by, "");

        let partner_id = new_partner(&app, 2).await;
        let not_eligible = submit(&app, &partner_id, vec![full_weight_item(0)]).await;
        let status = review(
            &app,
            review_request(&not_eligible.claim_id, pb::ReviewDecision::Reject, 0, "no"),
        )
        .await
        .expect_err("not-eligible claim");
        assert_eq!(reason(&status), "CLAIM_NOT_PENDING_REVIEW");

        let status = review(
            &app,
            review_request(
                &uuid::Uuid::now_v7().to_string(),
                pb::ReviewDecision::Reject,
                0,
                "no",
            ),
        )
        .await
        .expect_err("unknown claim");
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        assert_eq!(reason(&status), "CLAIM_NOT_FOUND");
    }
);

on_both_databases!(list_claims_filters_and_pages, |app: TestApp| async move {
    use pb::ClaimStatus::{Approved, PendingReview, Rejected, Unspecified as AnyStatus};
    use pb::CompensationTier::{Lower, NotEligible, Review, Unspecified as AnyTier, Upper};
    let losses = [0, 100, 400_000, 600_000, 200];
    let mut submitted = Vec::new();
    for (seed, loss) in (1u64..).zip(losses) {
        let partner_id = new_partner(&app, seed).await;
        submitted.push(submit(&app, &partner_id, vec![full_weight_item(loss)]).await);
    }
    let ids: Vec<String> = submitted.iter().map(|c| c.claim_id.clone()).collect();
    let pick = |indexes: &[usize]| -> Vec<String> {
        let mut picked: Vec<String> = indexes.iter().map(|i| ids[*i].clone()).collect();
        picked.sort();
        picked
    };
    let filtered = |status: pb::ClaimStatus, tier: pb::CompensationTier| pb::ListClaimsRequest {
        status: status as i32,
        tier: tier as i32,
        ..Default::default()
    };

    let everything = all_claim_ids(&app, pb::ListClaimsRequest::default()).await;
    assert_eq!(everything, pick(&[0, 1, 2, 3, 4]));
    let cases = [
        (Approved, AnyTier, pick(&[1, 2, 4])),
        (Rejected, AnyTier, pick(&[0])),
        (PendingReview, AnyTier, pick(&[3])),
        (AnyStatus, Lower, pick(&[1, 4])),
        (AnyStatus, Upper, pick(&[2])),
        (AnyStatus, NotEligible, pick(&[0])),
        (AnyStatus, Review, pick(&[3])),
        (Approved, Lower, pick(&[1, 4])),
        (Approved, Review, vec![]),
    ];
    for (status, tier, expected) in cases {
        assert_eq!(
            all_claim_ids(&app, filtered(status, tier)).await,
            expected,
            "{status:?} {tier:?}"
        );
    }
    let by_partner = list_claims(
        &app,
        pb::ListClaimsRequest {
            partner_id: submitted[2].partner_id.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_partner.claims, vec![submitted[2].clone()]);

    // Pages of 2 over 5 claims: 2, 2, 1, each token leading to the next page.
    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    let mut token = String::new();
    loop {
        let page = list_claims(
            &app,
            pb::ListClaimsRequest {
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            },
        )
        .await;
        sizes.push(page.claims.len());
        seen.extend(page.claims.into_iter().map(|c| c.claim_id));
        if page.next_page_token.is_empty() {
            break;
        }
        assert!(sizes.len() < 10, "paging does not end");
        token = page.next_page_token;
    }
    assert_eq!(sizes, vec![2, 2, 1]);
    assert_eq!(
        seen.iter().collect::<HashSet<_>>().len(),
        seen.len(),
        "no duplicates"
    );
    assert_eq!(seen, everything);

    // Paging combines with a filter.
    let first = list_claims(
        &app,
        pb::ListClaimsRequest {
            page_size: 2,
            ..filtered(Approved, AnyTier)
        },
    )
    .await;
    let second = list_claims(
        &app,
        pb::ListClaimsRequest {
            page_size: 2,
            page_token: first.next_page_token.clone(),
            ..filtered(Approved, AnyTier)
        },
    )
    .await;
    let mut approved: Vec<String> = first.claims.into_iter().map(|c| c.claim_id).collect();
    assert_eq!(second.next_page_token, "");
    approved.extend(second.claims.into_iter().map(|c| c.claim_id));
    assert_eq!(approved, pick(&[1, 2, 4]));

    for (token, size, fields) in [
        ("not a token", 0, vec!["page_token"]),
        ("AAAA", 0, vec!["page_token"]),
        ("", -1, vec!["page_size"]),
    ] {
        let status = app
            .claims()
            .list_claims(pb::ListClaimsRequest {
                page_size: size,
                page_token: token.into(),
                ..Default::default()
            })
            .await
            .expect_err("bad page");
        assert_eq!(bad_fields(&status), fields, "{token:?} {size}");
    }
    let status = app
        .claims()
        .list_claims(pb::ListClaimsRequest {
            status: 42,
            partner_id: "someone".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad filters");
    assert_eq!(bad_fields(&status), vec!["status", "partner_id"]);
});

on_both_databases!(
    get_policy_describes_the_policy_in_force,
    |app: TestApp| async move {
        let policy = app
            .claims()
            .get_policy(pb::GetPolicyRequest {})
            .await
            .expect("get policy")
            .into_inner()
            .policy
            .expect("policy in response");
        assert_eq!(policy.version, POLICY_VERSION);
        assert_eq!(policy.review_cap_krw, 50_000);
        assert_eq!(policy.lower_tier_max_recognized_loss_krw, 300_000);
        assert_eq!(policy.lower_tier_compensation_krw, 30_000);
        assert_eq!(policy.upper_tier_max_recognized_loss_krw, 500_000);
        assert_eq!(policy.upper_tier_compensation_krw, 50_000);
        assert_eq!(policy.intake_open_time, None);
        assert_eq!(policy.intake_close_time, None);
        assert_eq!(policy.services.len(), 8);
        let services: Vec<i32> = policy.services.iter().map(|s| s.service).collect();
        assert_eq!(services, (1..=8).collect::<Vec<i32>>());
        assert_eq!(
            policy.services[0],
            pb::ServiceFactors {
                service: pb::AffectedService::KakaotalkChannel as i32,
                operating_margin_bps: 2_000,
                kakao_share_bps: 9_000,
                alternative_available: false,
                alternative_factor_bps: 10_000,
            }
        );
        assert_eq!(
            policy.services[7],
            pb::ServiceFactors {
                service: pb::AffectedService::Other as i32,
                operating_margin_bps: 10_000,
                kakao_share_bps: 10_000,
                alternative_available: false,
                alternative_factor_bps: 10_000,
            }
        );
    }
);

on_both_databases!(
    concurrent_submissions_file_one_claim,
    |app: TestApp| async move {
        let partner_id = new_partner(&app, 1).await;
        let request = |request_id: String| pb::SubmitClaimRequest {
            request_id,
            partner_id: partner_id.clone(),
            items: vec![full_weight_item(1_000)],
            evidence: vec![],
        };

        // The same request sent four times at once: one claim, the same answer to all.
        let shared = request_id();
        let answers = futures::future::join_all((0..4).map(|_| {
            let mut client = app.claims();
            let request = request(shared.clone());
            async move { client.submit_claim(request).await }
        }))
        .await;
        let claims: Vec<pb::Claim> = answers
            .into_iter()
            .map(|a| {
                a.expect("same request id")
                    .into_inner()
                    .claim
                    .expect("claim")
            })
            .collect();
        assert!(claims.iter().all(|c| *c == claims[0]), "{claims:?}");

        // Different request ids at once: every one is refused as a second claim.
        let answers = futures::future::join_all((0..4).map(|_| {
            let mut client = app.claims();
            let request = request(request_id());
            async move { client.submit_claim(request).await }
        }))
        .await;
        for answer in answers {
            let status = answer.expect_err("second claim");
            assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
            assert_eq!(reason(&status), "CLAIM_ALREADY_FILED");
        }
        assert_eq!(
            all_claim_ids(&app, pb::ListClaimsRequest::default()).await,
            vec![claims[0].claim_id.clone()]
        );

        // Two new partners racing with several requests each: exactly one claim per partner.
        let mut winners = Vec::new();
        for seed in [2, 3] {
            let other = new_partner(&app, seed).await;
            let answers = futures::future::join_all((0..4).map(|_| {
                let mut client = app.claims();
                let request = pb::SubmitClaimRequest {
                    request_id: request_id(),
                    partner_id: other.clone(),
                    items: vec![full_weight_item(1_000)],
                    evidence: vec![],
                };
                async move { client.submit_claim(request).await }
            }))
            .await;
            let mut ok = 0;
            for answer in answers {
                match answer {
                    Ok(r) => {
                        ok += 1;
                        winners.push(r.into_inner().claim.expect("claim").claim_id);
                    }
                    Err(status) => {
                        assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
                        assert_eq!(reason(&status), "CLAIM_ALREADY_FILED");
                    }
                }
            }
            assert_eq!(ok, 1, "partner {seed}");
        }
        assert_eq!(winners.len(), 2);
        assert_ne!(winners[0], winners[1]);
        assert_eq!(
            list_claims(&app, pb::ListClaimsRequest::default())
                .await
                .claims
                .len(),
            3
        );
        let disbursements = app
            .disbursements()
            .list_disbursements(pb::ListDisbursementsRequest::default())
            .await
            .expect("list disbursements")
            .into_inner()
            .disbursements;
        assert_eq!(
            disbursements.len(),
            3,
            "one disbursement per approved claim"
        );
    }
);

on_both_databases!(
    a_listed_page_gives_each_claim_its_own_evidence_in_order,
    |app: TestApp| async move {
        // Three claims: two pieces of evidence, none, one; listed together on one page.
        let first = pending_claim(&app, 1).await;
        let bare = pending_claim(&app, 2).await;
        let third = pending_claim(&app, 3).await;
        attach(&app, &first.claim_id).await;
        let second_uri = "s3://payouts-evidence/claims/bank-statement.pdf";
        app.claims()
            .attach_evidence(pb::AttachEvidenceRequest {
                request_id: request_id(),
                claim_id: first.claim_id.clone(),
                evidence: Some(pb::Evidence {
                    uri: second_uri.into(),
                    ..evidence()
                }),
            })
            .await
            .expect("attach the second piece");
        attach(&app, &third.claim_id).await;

        let listed = list_claims(&app, pb::ListClaimsRequest::default()).await;
        let uris = |id: &str| -> Vec<String> {
            let claim = listed
                .claims
                .iter()
                .find(|c| c.claim_id == id)
                .expect("listed");
            claim.evidence.iter().map(|e| e.uri.clone()).collect()
        };
        assert_eq!(listed.claims.len(), 3);
        assert_eq!(
            uris(&first.claim_id),
            vec![evidence().uri, second_uri.to_owned()]
        );
        assert!(uris(&bare.claim_id).is_empty());
        assert_eq!(uris(&third.claim_id), vec![evidence().uri]);
        // The page says what each claim's own read says.
        for claim in &listed.claims {
            let read = app
                .claims()
                .get_claim(pb::GetClaimRequest {
                    claim_id: claim.claim_id.clone(),
                })
                .await
                .expect("get claim")
                .into_inner()
                .claim
                .expect("claim in response");
            assert_eq!(&read, claim);
        }
    }
);

/// Two replicas over one database, each writing its own batches: for every partner, calls
/// through both at once (the same request id on each, and fresh ones) file one claim. The
/// same request id answers the same claim on both; every other call is refused as a second
/// claim; each claim has one payout.
async fn two_replicas_racing_file_one_claim_per_partner(db: Db) {
    let a = spawn_app(db, |_| {}).await;
    let b = spawn_app_on(db, &a.database_url, &a.pii_key_file).await;
    let mut partners = Vec::new();
    for seed in 0..6 {
        partners.push(new_partner(&a, 40 + seed).await);
    }
    let call = |app: &TestApp, partner_id: &str, request_id: String| {
        let mut client = app.claims();
        let request = pb::SubmitClaimRequest {
            request_id,
            partner_id: partner_id.to_owned(),
            items: vec![full_weight_item(1_000)],
            evidence: vec![],
        };
        async move { client.submit_claim(request).await }
    };
    let mut calls = Vec::new();
    for partner_id in &partners {
        let shared = request_id();
        calls.push(call(&a, partner_id, shared.clone()));
        calls.push(call(&b, partner_id, shared));
        calls.push(call(&a, partner_id, request_id()));
        calls.push(call(&b, partner_id, request_id()));
    }
    let answers = futures::future::join_all(calls).await;
    for (partner_id, answers) in partners.iter().zip(answers.chunks(4)) {
        let mut claims: Vec<pb::Claim> = Vec::new();
        for answer in answers {
            match answer {
                Ok(r) => claims.push(r.get_ref().claim.clone().expect("claim")),
                Err(status) => {
                    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
                    assert_eq!(reason(status), "CLAIM_ALREADY_FILED");
                }
            }
        }
        let filed = all_claim_ids(
            &a,
            pb::ListClaimsRequest {
                partner_id: partner_id.clone(),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(filed.len(), 1, "partner {partner_id}: {claims:?}");
        assert!(
            claims.iter().all(|c| c.claim_id == filed[0]),
            "partner {partner_id}: {claims:?}"
        );
        // The two calls with one request id are one call: both refused, or both this claim.
        assert_eq!(
            answers[0].as_ref().ok().map(|r| r.get_ref().clone()),
            answers[1].as_ref().ok().map(|r| r.get_ref().clone()),
            "partner {partner_id}"
        );
        let claim = &claims[0];
        assert_eq!(claim.status(), pb::ClaimStatus::Approved, "{claim:?}");
        assert_eq!(
            get(&a, &claim.disbursement_id).await.claim_id,
            claim.claim_id
        );
    }
}

on_both_databases!(
    two_replicas_racing,
    db = two_replicas_racing_file_one_claim_per_partner
);
