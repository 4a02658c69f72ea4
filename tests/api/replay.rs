//! Replays belong to their caller, on both databases: a request id is scoped to the principal
//! that sent it, so another principal's use of the same id is a request of its own (executed
//! and checked as such, four eyes included), never a replay of the first (nor a sign that it
//! exists), whether it is a unary call, a row of a shared commit or an import, or a settlement
//! run; and every call answered by replay says so in its audit entry.

use partner_payouts::auth::{AuthSettings, PrincipalSettings, Role};
use partner_payouts::proto::payouts::v1::{
    self as pb, audit_service_client::AuditServiceClient, import_claims_request,
};
use sha2::{Digest as _, Sha256};
use tonic::Code;

use crate::access::{r#as, get_claim_as_viewer, token, write_pii_key};
use crate::helpers::*;
use crate::on_both_databases;

use pb::import_claims_response::Outcome as ClaimOutcome;

/// Holds registrar and reviewer: submits claims, and may review those of others.
const SUBMITTER: &str = "submitter";
const REVIEWER: &str = "reviewer";
const REGISTRAR_A: &str = "registrar-a";
const REGISTRAR_B: &str = "registrar-b";
const PAYMENTS_A: &str = "payments-a";
const PAYMENTS_B: &str = "payments-b";
const VIEWER: &str = "viewer";
const AUDITOR: &str = "auditor";

const REVIEW_CLAIM: &str = "/payouts.v1.ClaimService/ReviewClaim";
const REGISTER_PARTNER: &str = "/payouts.v1.PartnerService/RegisterPartner";
const SUBMIT_CLAIM: &str = "/payouts.v1.ClaimService/SubmitClaim";
const IMPORT_CLAIMS: &str = "/payouts.v1.ClaimService/ImportClaims";

/// The service with `[auth]` and the principals above, each with its bearer token.
async fn spawn_secured(db: Db) -> TestApp {
    let principals = [
        (SUBMITTER, vec![Role::Registrar, Role::Reviewer]),
        (REVIEWER, vec![Role::Reviewer]),
        (REGISTRAR_A, vec![Role::Registrar]),
        (REGISTRAR_B, vec![Role::Registrar]),
        (PAYMENTS_A, vec![Role::Payments]),
        (PAYMENTS_B, vec![Role::Payments]),
        (VIEWER, vec![Role::Viewer]),
        (AUDITOR, vec![Role::Auditor]),
    ];
    spawn_app(db, |s| {
        s.auth = Some(AuthSettings {
            principals: principals
                .into_iter()
                .map(|(name, roles)| PrincipalSettings {
                    name: name.to_owned(),
                    roles: roles.iter().map(|r| r.as_str().to_owned()).collect(),
                    token_sha256: Some(hex::encode(Sha256::digest(token(name).as_bytes()))),
                    client_cert_subject: None,
                })
                .collect(),
            ..AuthSettings::default()
        });
        // With `[auth]` the account-number key is not created on the fly.
        write_pii_key(&s.pii_key_file);
    })
    .await
}

/// Every audit entry, oldest first. Unary calls and import rows are recorded before they are
/// answered, so the entries of every answered call are there.
async fn audit_log(app: &TestApp) -> Vec<pb::AuditEvent> {
    let mut events = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = AuditServiceClient::new(app.channel.clone())
            .list_audit_events(r#as(
                AUDITOR,
                pb::ListAuditEventsRequest {
                    page_size: 1000,
                    page_token,
                    ..Default::default()
                },
            ))
            .await
            .expect("list audit events as the auditor")
            .into_inner();
        events.extend(page.audit_events);
        if page.next_page_token.is_empty() {
            return events;
        }
        page_token = page.next_page_token;
    }
}

/// The entries of `method` calls by `principal` with `request_id`, oldest first.
fn entries<'a>(
    events: &'a [pb::AuditEvent],
    principal: &str,
    method: &str,
    request_id: &str,
) -> Vec<&'a pb::AuditEvent> {
    events
        .iter()
        .filter(|e| e.principal == principal && e.method == method && e.request_id == request_id)
        .collect()
}

fn register_request(request_id: &str, partner: pb::Partner) -> pb::RegisterPartnerRequest {
    pb::RegisterPartnerRequest {
        request_id: request_id.into(),
        partner: Some(partner),
    }
}

async fn register_as(
    app: &TestApp,
    principal: &str,
    request: pb::RegisterPartnerRequest,
) -> Result<pb::Partner, tonic::Status> {
    app.partners()
        .register_partner(r#as(principal, request))
        .await
        .map(|r| r.into_inner().partner.expect("partner in response"))
}

fn submit_request(request_id: &str, partner_id: &str, loss_krw: i64) -> pb::SubmitClaimRequest {
    pb::SubmitClaimRequest {
        request_id: request_id.into(),
        partner_id: partner_id.into(),
        items: vec![full_weight_item(loss_krw)],
        evidence: vec![],
    }
}

async fn submit_as(app: &TestApp, principal: &str, request: pb::SubmitClaimRequest) -> pb::Claim {
    app.claims()
        .submit_claim(r#as(principal, request))
        .await
        .unwrap_or_else(|s| panic!("submit claim as {principal}: {s:?}"))
        .into_inner()
        .claim
        .expect("claim in response")
}

fn review_request(request_id: &str, claim_id: &str) -> pb::ReviewClaimRequest {
    pb::ReviewClaimRequest {
        request_id: request_id.into(),
        claim_id: claim_id.into(),
        decision: pb::ReviewDecision::Approve as i32,
        compensation_krw: 50_000,
        reason: "sales ledger checked against the card settlement report".into(),
    }
}

async fn review_as(
    app: &TestApp,
    principal: &str,
    request: pb::ReviewClaimRequest,
) -> Result<pb::Claim, tonic::Status> {
    app.claims()
        .review_claim(r#as(principal, request))
        .await
        .map(|r| r.into_inner().claim.expect("claim in response"))
}

// ---------------------------------------------------------------------------------------------
// (a), (b): a reviewer's request id, sent by the claim's submitter and by the reviewer again.
// ---------------------------------------------------------------------------------------------

async fn a_request_id_is_scoped_to_its_principal(db: Db) {
    let app = spawn_secured(db).await;
    let partner = register_as(
        &app,
        SUBMITTER,
        register_request(&request_id(), partner(61)),
    )
    .await
    .expect("register partner");
    let claim = submit_as(
        &app,
        SUBMITTER,
        submit_request(&request_id(), &partner.partner_id, 600_000),
    )
    .await;
    assert_eq!(claim.status(), pb::ClaimStatus::PendingReview, "{claim:?}");
    assert_eq!(claim.submitted_by, SUBMITTER);
    app.claims()
        .attach_evidence(r#as(
            SUBMITTER,
            pb::AttachEvidenceRequest {
                request_id: request_id(),
                claim_id: claim.claim_id.clone(),
                evidence: Some(sales_ledger()),
            },
        ))
        .await
        .expect("attach evidence");

    // The reviewer approves with request id R.
    let r = request_id();
    let approved = review_as(&app, REVIEWER, review_request(&r, &claim.claim_id))
        .await
        .expect("the reviewer approves");
    assert_eq!(approved.status(), pb::ClaimStatus::Approved, "{approved:?}");
    assert_eq!(approved.reviewed_by, REVIEWER);

    // The submitter sends R with the same body: its own request, which four eyes refuses.
    // (Keyed by request id alone, this was the reviewer's answer, replayed: OK.)
    let status = review_as(&app, SUBMITTER, review_request(&r, &claim.claim_id))
        .await
        .expect_err("the submitter may not review its own claim, whatever the request id");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason(&status), "SAME_PRINCIPAL", "{status:?}");
    let stored = get_claim_as_viewer(&app, &claim.claim_id).await;
    assert_eq!(stored.reviewed_by, REVIEWER, "{stored:?}");
    assert_eq!(stored.disbursement_id, approved.disbursement_id);

    // The reviewer sends R again: the first answer, replayed.
    let replayed = review_as(&app, REVIEWER, review_request(&r, &claim.claim_id))
        .await
        .expect("the reviewer's replay");
    assert_eq!(replayed, approved);

    let events = audit_log(&app).await;
    let submitter = entries(&events, SUBMITTER, REVIEW_CLAIM, &r);
    assert_eq!(submitter.len(), 1, "{events:#?}");
    assert_eq!(submitter[0].outcome_code, "PERMISSION_DENIED");
    assert!(!submitter[0].replayed, "{:?}", submitter[0]);
    assert_eq!(submitter[0].resource_id, claim.claim_id);
    assert!(
        !events.iter().any(|e| e.principal == SUBMITTER
            && e.method == REVIEW_CLAIM
            && e.outcome_code == "OK"),
        "the submitter never reviewed a claim: {events:#?}"
    );
    let reviewer = entries(&events, REVIEWER, REVIEW_CLAIM, &r);
    assert_eq!(reviewer.len(), 2, "{events:#?}");
    assert!(
        reviewer.iter().all(|e| e.outcome_code == "OK"),
        "{reviewer:#?}"
    );
    assert!(
        reviewer.iter().all(|e| e.resource_id == claim.claim_id),
        "{reviewer:#?}"
    );
    assert!(
        !reviewer[0].replayed,
        "the first review was made: {reviewer:#?}"
    );
    assert!(
        reviewer[1].replayed,
        "the second was replayed: {reviewer:#?}"
    );
    app.stop().await;
}

on_both_databases!(
    a_request_id_is_scoped_to_its_principal,
    db = a_request_id_is_scoped_to_its_principal
);

// ---------------------------------------------------------------------------------------------
// (c): another principal's use of a request id is its own request, in shared commits too.
// ---------------------------------------------------------------------------------------------

async fn another_principals_request_id_is_its_own_request(db: Db) {
    let app = spawn_secured(db).await;
    let r = request_id();
    let a_body = register_request(&r, partner(71));
    let a_partner = register_as(&app, REGISTRAR_A, a_body.clone())
        .await
        .expect("A registers");

    // B sends A's request id with A's body: executed as B's own registration, which finds the
    // registration number taken (not A's answer replayed).
    let status = register_as(&app, REGISTRAR_B, a_body.clone())
        .await
        .expect_err("the partner is A's");
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert_eq!(reason(&status), "PARTNER_ALREADY_REGISTERED", "{status:?}");

    // B sends it with another body: not REQUEST_ID_REUSED (B cannot tell that A used it) but
    // a new partner, as the body says.
    let b_body = register_request(&r, partner(72));
    let b_partner = register_as(&app, REGISTRAR_B, b_body.clone())
        .await
        .expect("B's own request under the same id");
    assert_ne!(b_partner.partner_id, a_partner.partner_id);
    assert_eq!(b_partner.business_registration_number, brn(72));

    // Each principal's id still answers its own first request, and only that.
    let a_again = register_as(&app, REGISTRAR_A, a_body.clone())
        .await
        .expect("A's replay");
    assert_eq!(a_again, a_partner);
    let b_again = register_as(&app, REGISTRAR_B, b_body.clone())
        .await
        .expect("B's replay");
    assert_eq!(b_again, b_partner);
    let status = register_as(&app, REGISTRAR_A, b_body)
        .await
        .expect_err("A's id with another body");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason(&status), "REQUEST_ID_REUSED", "{status:?}");

    // The same id from both at once (the calls may share a commit): each principal's is its
    // own registration.
    let shared = request_id();
    let (a, b) = tokio::join!(
        register_as(&app, REGISTRAR_A, register_request(&shared, partner(73))),
        register_as(&app, REGISTRAR_B, register_request(&shared, partner(74))),
    );
    let (a, b) = (a.expect("A's registration"), b.expect("B's registration"));
    assert_eq!(a.business_registration_number, brn(73));
    assert_eq!(b.business_registration_number, brn(74));

    let events = audit_log(&app).await;
    let a_entries = entries(&events, REGISTRAR_A, REGISTER_PARTNER, &r);
    let outcomes: Vec<(&str, bool)> = a_entries
        .iter()
        .map(|e| (e.outcome_code.as_str(), e.replayed))
        .collect();
    assert_eq!(
        outcomes,
        [("OK", false), ("OK", true), ("FAILED_PRECONDITION", false)],
        "{a_entries:#?}"
    );
    let b_entries = entries(&events, REGISTRAR_B, REGISTER_PARTNER, &r);
    let outcomes: Vec<(&str, bool)> = b_entries
        .iter()
        .map(|e| (e.outcome_code.as_str(), e.replayed))
        .collect();
    assert_eq!(
        outcomes,
        [("ALREADY_EXISTS", false), ("OK", false), ("OK", true)],
        "{b_entries:#?}"
    );
    assert_eq!(b_entries[1].resource_id, b_partner.partner_id);
    app.stop().await;
}

on_both_databases!(
    another_principals_request_id_is_its_own_request,
    db = another_principals_request_id_is_its_own_request
);

// ---------------------------------------------------------------------------------------------
// (d): an import row replays its principal's unary call, and only its principal's.
// ---------------------------------------------------------------------------------------------

async fn import_claims_as(
    app: &TestApp,
    principal: &str,
    rows: Vec<pb::ImportClaimsRequest>,
) -> Vec<pb::ImportClaimsResponse> {
    let mut answers = app
        .claims()
        .import_claims(r#as(principal, tokio_stream::iter(rows)))
        .await
        .unwrap_or_else(|s| panic!("import claims as {principal}: {s:?}"))
        .into_inner();
    let mut out = Vec::new();
    while let Some(answer) = answers.message().await.expect("answer") {
        out.push(answer);
    }
    out
}

async fn an_import_row_replays_only_its_own_principals_call(db: Db) {
    let app = spawn_secured(db).await;
    let partner = register_as(
        &app,
        REGISTRAR_A,
        register_request(&request_id(), partner(81)),
    )
    .await
    .expect("register partner");
    let r = request_id();
    let claim = submit_as(
        &app,
        REGISTRAR_A,
        submit_request(&r, &partner.partner_id, 200_000),
    )
    .await;
    assert_eq!(claim.status(), pb::ClaimStatus::Approved, "{claim:?}");
    // The same call as an import row: the same request id and body.
    let row = pb::ImportClaimsRequest {
        request_id: r.clone(),
        partner: Some(import_claims_request::Partner::PartnerId(
            partner.partner_id.clone(),
        )),
        items: vec![full_weight_item(200_000)],
        evidence: vec![],
    };

    let answers = import_claims_as(&app, REGISTRAR_A, vec![row.clone()]).await;
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(answers[0].outcome(), ClaimOutcome::Replayed, "{answers:?}");
    assert_eq!(answers[0].claim.as_ref(), Some(&claim));

    // Another principal's row with that id is its own claim, for a partner that has one.
    let answers = import_claims_as(&app, REGISTRAR_B, vec![row]).await;
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(answers[0].outcome(), ClaimOutcome::Rejected, "{answers:?}");
    let error = answers[0].error.as_ref().expect("the row's error");
    assert_eq!(error.code, Code::AlreadyExists as i32, "{error:?}");

    let events = audit_log(&app).await;
    let unary = entries(&events, REGISTRAR_A, SUBMIT_CLAIM, &r);
    assert_eq!(unary.len(), 1, "{events:#?}");
    assert!(!unary[0].replayed, "{unary:#?}");
    let a_row = entries(&events, REGISTRAR_A, IMPORT_CLAIMS, &r);
    assert_eq!(a_row.len(), 1, "{events:#?}");
    assert_eq!(a_row[0].outcome_code, "OK");
    assert!(a_row[0].replayed, "{a_row:#?}");
    assert_eq!(a_row[0].resource_id, claim.claim_id);
    let b_row = entries(&events, REGISTRAR_B, IMPORT_CLAIMS, &r);
    assert_eq!(b_row.len(), 1, "{events:#?}");
    assert_eq!(b_row[0].outcome_code, "ALREADY_EXISTS");
    assert!(!b_row[0].replayed, "{b_row:#?}");
    app.stop().await;
}

on_both_databases!(
    an_import_row_replays_only_its_own_principals_call,
    db = an_import_row_replays_only_its_own_principals_call
);

// ---------------------------------------------------------------------------------------------
// Settlement runs: a run's request id is its caller's too.
// ---------------------------------------------------------------------------------------------

/// Reconciles an empty report with cut-off `cutoff_seconds` as `principal`.
async fn reconcile_as(
    app: &TestApp,
    principal: &str,
    request_id: &str,
    cutoff_seconds: i64,
) -> Result<pb::ReconciliationSummary, tonic::Status> {
    let report = pb::ReconcileSettlementsRequest {
        request_id: request_id.into(),
        cutoff_time: Some(prost_types::Timestamp {
            seconds: cutoff_seconds,
            nanos: 0,
        }),
        lines: vec![],
    };
    let mut results = app
        .disbursements()
        .reconcile_settlements(r#as(principal, tokio_stream::iter([report])))
        .await?
        .into_inner();
    let mut summary = None;
    while let Some(message) = results.message().await? {
        if let Some(pb::reconcile_settlements_response::Item::Summary(s)) = message.item {
            summary = Some(s);
        }
    }
    Ok(summary.expect("a summary ends the run"))
}

async fn a_settlement_run_request_id_is_scoped_to_its_principal(db: Db) {
    let app = spawn_secured(db).await;
    let r = request_id();
    reconcile_as(&app, PAYMENTS_A, &r, 1)
        .await
        .expect("A's run");
    // B's run under A's id, with another cut-off: B's own run, not REQUEST_ID_REUSED.
    reconcile_as(&app, PAYMENTS_B, &r, 2)
        .await
        .expect("B's own run under the same id");
    // A's id with another cut-off is still refused to A.
    let status = reconcile_as(&app, PAYMENTS_A, &r, 2)
        .await
        .expect_err("A's id with another report");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason(&status), "REQUEST_ID_REUSED", "{status:?}");
    reconcile_as(&app, PAYMENTS_A, &r, 1)
        .await
        .expect("A's run again, with its report");

    // An id B used for another method is free for A's run.
    let paused = request_id();
    app.disbursements()
        .pause_dispatch(r#as(
            PAYMENTS_B,
            pb::PauseDispatchRequest {
                request_id: paused.clone(),
                reason: "bank maintenance".into(),
            },
        ))
        .await
        .expect("B pauses dispatch");
    reconcile_as(&app, PAYMENTS_A, &paused, 1)
        .await
        .expect("A's run under the id of B's pause");
    let status = reconcile_as(&app, PAYMENTS_B, &paused, 1)
        .await
        .expect_err("B's own id, used by another method");
    assert_eq!(reason(&status), "REQUEST_ID_REUSED", "{status:?}");
    app.stop().await;
}

on_both_databases!(
    a_settlement_run_request_id_is_scoped_to_its_principal,
    db = a_settlement_run_request_id_is_scoped_to_its_principal
);
