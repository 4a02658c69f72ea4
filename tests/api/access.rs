//! Access control through the wire, on both databases: every RPC against every kind of caller
//! (no credentials, a token nobody was given, one principal per role), the audit log of allowed
//! and refused calls and its append-only table, account numbers sealed in the raw database,
//! the four-eyes rules, the per-principal rate limit, and local development mode.
//!
//! Client certificates (no certificate, another CA, the wrong role) are covered end to end by
//! the tests in `src/auth/tls.rs`, which run a real tonic server behind `AuthLayer`.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use base64::Engine as _;
use partner_payouts::app::Application;
use partner_payouts::auth::{AuthSettings, METHOD_RULES, MethodRule, PrincipalSettings, Role};
use partner_payouts::config::Settings;
use partner_payouts::proto::payouts::v1::{
    self as pb, audit_service_client::AuditServiceClient, event_service_client::EventServiceClient,
};
use prost::Message as _;
use sha2::{Digest as _, Sha256};
use sqlx::Connection as _;
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

use crate::helpers::*;
use crate::on_both_databases;

use pb::DisbursementStatus::{Cancelled, Failed, Paid, Queued};

/// Holds registrar and reviewer: may submit a claim and review claims, but not its own.
const INTAKE_REVIEWER: &str = "intake-reviewer";
/// Holds registrar and payments: may change an account and retry payouts, but not a payout
/// to an account it changed.
const OPS: &str = "ops";
/// A well-formed bearer token that no principal was given.
const WRONG_TOKEN: &str = "not-a-token-anyone-was-given";

/// Sandbox bank: accounts ending 0000 are closed.
const CLOSED_ACCOUNT: &str = "110-123-450000";
const GOOD_ACCOUNT: &str = "110-123-451234";

/// The bearer token of `principal` (the settings hold only its SHA-256).
pub(crate) fn token(principal: &str) -> String {
    format!("test-token-for-{principal}")
}

/// One principal per role, named after it, plus the two holding two roles each.
fn principals() -> Vec<(String, Vec<Role>)> {
    let mut all: Vec<(String, Vec<Role>)> = Role::ALL
        .into_iter()
        .map(|r| (r.as_str().to_owned(), vec![r]))
        .collect();
    all.push((
        INTAKE_REVIEWER.into(),
        vec![Role::Registrar, Role::Reviewer],
    ));
    all.push((OPS.into(), vec![Role::Registrar, Role::Payments]));
    all
}

pub(crate) fn auth_settings(rate_limit: Option<(u32, u32)>) -> AuthSettings {
    let mut auth = AuthSettings {
        principals: principals()
            .into_iter()
            .map(|(name, roles)| PrincipalSettings {
                token_sha256: Some(hex::encode(Sha256::digest(token(&name).as_bytes()))),
                roles: roles.iter().map(|r| r.as_str().to_owned()).collect(),
                name,
                client_cert_subject: None,
            })
            .collect(),
        // Refused calls reach the audit log well within the tests' waits.
        denial_audit_interval_ms: 100,
        ..AuthSettings::default()
    };
    if let Some((per_second, burst)) = rate_limit {
        auth.rate_limit_per_second = per_second;
        auth.rate_limit_burst = Some(burst);
    }
    auth
}

/// With `[auth]` the account-number key is not created on the fly: provide one.
pub(crate) fn write_pii_key(path: &std::path::Path) {
    let key = Sha256::digest(uuid::Uuid::now_v7().as_bytes());
    std::fs::write(
        path,
        format!(
            "{}\n",
            base64::engine::general_purpose::STANDARD.encode(key)
        ),
    )
    .expect("write the PII key file");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .expect("chmod the PII key file");
    }
}

/// The service with `[auth]`: every principal of [`principals`], optionally rate limited.
async fn spawn_secured(db: Db, rate_limit: Option<(u32, u32)>) -> TestApp {
    spawn_app(db, |s| {
        s.auth = Some(auth_settings(rate_limit));
        write_pii_key(&s.pii_key_file);
    })
    .await
}

/// `message` with `authorization: Bearer <token>`, or with no credentials.
pub(crate) fn authed<T>(token: Option<&str>, message: T) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        let value = format!("Bearer {token}").parse().expect("a token is ASCII");
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// `message` as `principal`.
pub(crate) fn r#as<T>(principal: &str, message: T) -> Request<T> {
    authed(Some(&token(principal)), message)
}

fn audit_client(app: &TestApp) -> AuditServiceClient<tonic::transport::Channel> {
    AuditServiceClient::new(app.channel.clone())
}

fn events_client(app: &TestApp) -> EventServiceClient<tonic::transport::Channel> {
    EventServiceClient::new(app.channel.clone())
}

fn evidence() -> pb::Evidence {
    pb::Evidence {
        kind: pb::EvidenceKind::SalesLossProof as i32,
        uri: "s3://payouts-evidence/claims/sales-ledger.pdf".into(),
        sha256: "ab".repeat(32),
        attach_time: None,
    }
}

fn bank_account(account_number: &str) -> pb::BankAccount {
    pb::BankAccount {
        bank_code: "004".into(),
        account_number: account_number.into(),
        holder_name: "Kim Minji".into(),
    }
}

async fn register_as(app: &TestApp, principal: &str, partner: pb::Partner) -> pb::Partner {
    app.partners()
        .register_partner(r#as(
            principal,
            pb::RegisterPartnerRequest {
                request_id: request_id(),
                partner: Some(partner),
            },
        ))
        .await
        .unwrap_or_else(|s| panic!("register partner as {principal}: {s:?}"))
        .into_inner()
        .partner
        .expect("partner in response")
}

async fn submit_as(
    app: &TestApp,
    principal: &str,
    partner_id: &str,
    recognised_loss_krw: i64,
    evidence: Vec<pb::Evidence>,
) -> pb::Claim {
    app.claims()
        .submit_claim(r#as(
            principal,
            pb::SubmitClaimRequest {
                request_id: request_id(),
                partner_id: partner_id.into(),
                items: vec![full_weight_item(recognised_loss_krw)],
                evidence,
            },
        ))
        .await
        .unwrap_or_else(|s| panic!("submit claim as {principal}: {s:?}"))
        .into_inner()
        .claim
        .expect("claim in response")
}

async fn get_partner(app: &TestApp, partner_id: &str) -> pb::Partner {
    app.partners()
        .get_partner(r#as(
            "viewer",
            pb::GetPartnerRequest {
                partner_id: partner_id.into(),
            },
        ))
        .await
        .expect("get partner")
        .into_inner()
        .partner
        .expect("partner in response")
}

pub(crate) async fn get_claim_as_viewer(app: &TestApp, claim_id: &str) -> pb::Claim {
    app.claims()
        .get_claim(r#as(
            "viewer",
            pb::GetClaimRequest {
                claim_id: claim_id.into(),
            },
        ))
        .await
        .expect("get claim")
        .into_inner()
        .claim
        .expect("claim in response")
}

async fn get_disbursement(app: &TestApp, disbursement_id: &str) -> pb::Disbursement {
    app.disbursements()
        .get_disbursement(r#as(
            "viewer",
            pb::GetDisbursementRequest {
                disbursement_id: disbursement_id.into(),
            },
        ))
        .await
        .expect("get disbursement")
        .into_inner()
        .disbursement
        .expect("disbursement in response")
}

/// Polls (as the viewer) until the disbursement is in `status`.
async fn wait_for(
    app: &TestApp,
    disbursement_id: &str,
    status: pb::DisbursementStatus,
) -> pb::Disbursement {
    eventually(5, || async {
        let d = get_disbursement(app, disbursement_id).await;
        (d.status() == status).then_some(d)
    })
    .await
}

async fn update_account_as(
    app: &TestApp,
    principal: &str,
    partner_id: &str,
    account_number: &str,
) -> pb::Partner {
    let current = get_partner(app, partner_id).await;
    app.partners()
        .update_partner_bank_account(r#as(
            principal,
            pb::UpdatePartnerBankAccountRequest {
                request_id: request_id(),
                partner_id: partner_id.into(),
                bank_account: Some(bank_account(account_number)),
                etag: current.etag,
            },
        ))
        .await
        .unwrap_or_else(|s| panic!("update bank account as {principal}: {s:?}"))
        .into_inner()
        .partner
        .expect("partner in response")
}

async fn retry_as(
    app: &TestApp,
    principal: &str,
    disbursement_id: &str,
    request_id: &str,
) -> Result<pb::Disbursement, Status> {
    app.disbursements()
        .retry_disbursement(r#as(
            principal,
            pb::RetryDisbursementRequest {
                request_id: request_id.into(),
                disbursement_id: disbursement_id.into(),
            },
        ))
        .await
        .map(|r| {
            r.into_inner()
                .disbursement
                .expect("disbursement in response")
        })
}

fn review_request(
    claim_id: &str,
    decision: pb::ReviewDecision,
    request_id: &str,
) -> pb::ReviewClaimRequest {
    pb::ReviewClaimRequest {
        request_id: request_id.into(),
        claim_id: claim_id.into(),
        decision: decision as i32,
        compensation_krw: if decision == pb::ReviewDecision::Approve {
            50_000
        } else {
            0
        },
        reason: "sales ledger checked against the card settlement report".into(),
    }
}

/// Every audit event, oldest first, read as `principal` (or without credentials).
pub(crate) async fn audit_events(
    app: &TestApp,
    token: Option<&str>,
) -> Result<Vec<pb::AuditEvent>, Status> {
    let mut events = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = audit_client(app)
            .list_audit_events(authed(
                token,
                pb::ListAuditEventsRequest {
                    page_size: 1000,
                    page_token,
                    ..Default::default()
                },
            ))
            .await?
            .into_inner();
        events.extend(page.audit_events);
        if page.next_page_token.is_empty() {
            return Ok(events);
        }
        page_token = page.next_page_token;
    }
}

/// Polls the audit log (as the auditor) until `done` says it holds what the test waits for.
async fn audit_until(
    app: &TestApp,
    done: impl Fn(&[pb::AuditEvent]) -> bool,
) -> Vec<pb::AuditEvent> {
    let auditor = token("auditor");
    eventually(5, || async {
        match audit_events(app, Some(&auditor)).await {
            Ok(events) => done(&events).then_some(events),
            // The rate-limit test polls faster than its limit allows.
            Err(s) if s.code() == Code::ResourceExhausted => None,
            Err(s) => panic!("list audit events as the auditor: {s:?}"),
        }
    })
    .await
}

fn assert_well_formed(event: &pb::AuditEvent) {
    assert!(!event.audit_event_id.is_empty(), "{event:?}");
    assert!(event.time.is_some(), "{event:?}");
    // A call's own entry names its connection; refused calls, counted per address, the address.
    let peer: IpAddr = event
        .peer_address
        .parse::<SocketAddr>()
        .map(|a| a.ip())
        .or_else(|_| event.peer_address.parse())
        .unwrap_or_else(|_| panic!("peer_address is an address: {event:?}"));
    assert!(peer.is_loopback(), "{event:?}");
    assert!(event.count >= 1, "{event:?}");
    assert!(!event.outcome_code.is_empty(), "{event:?}");
}

// ---------------------------------------------------------------------------------------------
// The matrix: every RPC x every kind of caller.
// ---------------------------------------------------------------------------------------------

/// The resources the matrix's requests act on, made (by allowed principals) before it runs.
struct Fixtures {
    /// For GetPartner and UpdatePartnerBankAccount (whose etag must still hold after the
    /// refused calls).
    partner: pb::Partner,
    /// Has no claim yet: for SubmitClaim.
    claimless_partner_id: String,
    /// PENDING_REVIEW without evidence: for AttachEvidence and GetClaim.
    pending_claim_id: String,
    /// PENDING_REVIEW with evidence: for ReviewClaim.
    evidenced_claim_id: String,
    /// FAILED (closed account): for RetryDisbursement and GetDisbursement.
    failed_disbursement_id: String,
    /// QUEUED (dispatch is paused): for CancelDisbursement.
    queued_disbursement_id: String,
}

/// The seed of the partner the matrix's RegisterPartner calls register (all of them the same,
/// so a refused call that got through would make the allowed one a conflict).
const MATRIX_NEW_PARTNER_SEED: u64 = 99;
/// The seed of the partner the matrix's ImportPartners rows register; its ImportClaims rows
/// then file that partner's claim, by registration number.
const MATRIX_IMPORTED_PARTNER_SEED: u64 = 98;
const MATRIX_UPDATED_ACCOUNT: &str = "110-123-457777";

/// Builds the fixtures and leaves dispatch paused, so nothing moves while the matrix runs.
async fn fixtures(app: &TestApp) -> Fixtures {
    let registrar = "registrar";
    let first = register_as(app, registrar, partner(1)).await;
    let claimless_partner_id = register_as(app, registrar, partner(2)).await.partner_id;

    let p3 = register_as(app, registrar, partner(3)).await;
    let pending = submit_as(app, registrar, &p3.partner_id, 600_000, vec![]).await;
    assert_eq!(
        pending.status(),
        pb::ClaimStatus::PendingReview,
        "{pending:?}"
    );

    let p4 = register_as(app, registrar, partner(4)).await;
    let evidenced = submit_as(app, registrar, &p4.partner_id, 600_000, vec![evidence()]).await;
    assert_eq!(
        evidenced.status(),
        pb::ClaimStatus::PendingReview,
        "{evidenced:?}"
    );
    assert_eq!(evidenced.evidence.len(), 1);

    let p5 = register_as(app, registrar, partner_with_account(5, CLOSED_ACCOUNT)).await;
    let closed = submit_as(app, registrar, &p5.partner_id, 100, vec![]).await;
    assert_eq!(closed.status(), pb::ClaimStatus::Approved, "{closed:?}");
    let failed = wait_for(app, &closed.disbursement_id, Failed).await;
    assert_eq!(failed.failure_code, "ACCOUNT_CLOSED");

    app.disbursements()
        .pause_dispatch(r#as(
            "payments",
            pb::PauseDispatchRequest {
                request_id: request_id(),
                reason: "the matrix needs a QUEUED payout".into(),
            },
        ))
        .await
        .expect("pause dispatch");
    let p6 = register_as(app, registrar, partner(6)).await;
    let queued = submit_as(app, registrar, &p6.partner_id, 100, vec![]).await;
    assert_eq!(queued.status(), pb::ClaimStatus::Approved, "{queued:?}");
    assert_eq!(
        get_disbursement(app, &queued.disbursement_id)
            .await
            .status(),
        Queued
    );

    Fixtures {
        partner: first,
        claimless_partner_id,
        pending_claim_id: pending.claim_id,
        evidenced_claim_id: evidenced.claim_id,
        failed_disbursement_id: failed.disbursement_id,
        queued_disbursement_id: queued.disbursement_id,
    }
}

/// A bulk-intake row's error, as the status its unary call would have failed with.
fn row_failure(error: Option<partner_payouts::proto::google::rpc::Status>) -> Result<(), Status> {
    match error {
        None => Ok(()),
        Some(e) => Err(Status::with_details(
            Code::from(e.code),
            e.message.clone(),
            e.encode_to_vec().into(),
        )),
    }
}

/// Calls the method at `path` with a valid request for `fx`, as `token` (or without
/// credentials). Panics for a method it does not know, so a new rule cannot be skipped.
async fn call(
    app: &TestApp,
    fx: &Fixtures,
    path: &str,
    token: Option<&str>,
    request_id: &str,
) -> Result<(), Status> {
    let request_id = request_id.to_owned();
    match path {
        "/payouts.v1.PartnerService/RegisterPartner" => app
            .partners()
            .register_partner(authed(
                token,
                pb::RegisterPartnerRequest {
                    request_id,
                    partner: Some(partner(MATRIX_NEW_PARTNER_SEED)),
                },
            ))
            .await
            .map(|_| ()),
        // Bulk intake: one row, which must be created; a refused row is the call's error.
        "/payouts.v1.PartnerService/ImportPartners" => {
            let row = pb::ImportPartnersRequest {
                request_id,
                partner: Some(partner(MATRIX_IMPORTED_PARTNER_SEED)),
            };
            let mut answers = app
                .partners()
                .import_partners(authed(token, tokio_stream::iter([row])))
                .await?
                .into_inner();
            while let Some(answer) = answers.message().await? {
                row_failure(answer.error)?;
            }
            Ok(())
        }
        "/payouts.v1.PartnerService/UpdatePartnerBankAccount" => app
            .partners()
            .update_partner_bank_account(authed(
                token,
                pb::UpdatePartnerBankAccountRequest {
                    request_id,
                    partner_id: fx.partner.partner_id.clone(),
                    bank_account: Some(bank_account(MATRIX_UPDATED_ACCOUNT)),
                    etag: fx.partner.etag.clone(),
                },
            ))
            .await
            .map(|_| ()),
        "/payouts.v1.PartnerService/GetPartner" => app
            .partners()
            .get_partner(authed(
                token,
                pb::GetPartnerRequest {
                    partner_id: fx.partner.partner_id.clone(),
                },
            ))
            .await
            .map(|_| ()),
        "/payouts.v1.PartnerService/ListPartners" => app
            .partners()
            .list_partners(authed(
                token,
                pb::ListPartnersRequest {
                    page_size: 10,
                    ..Default::default()
                },
            ))
            .await
            .map(|_| ()),
        "/payouts.v1.ClaimService/SubmitClaim" => app
            .claims()
            .submit_claim(authed(
                token,
                pb::SubmitClaimRequest {
                    request_id,
                    partner_id: fx.claimless_partner_id.clone(),
                    items: vec![full_weight_item(100)],
                    evidence: vec![],
                },
            ))
            .await
            .map(|_| ()),
        "/payouts.v1.ClaimService/ImportClaims" => {
            let row = pb::ImportClaimsRequest {
                request_id,
                partner: Some(
                    pb::import_claims_request::Partner::BusinessRegistrationNumber(brn(
                        MATRIX_IMPORTED_PARTNER_SEED,
                    )),
                ),
                items: vec![full_weight_item(100)],
                evidence: vec![],
            };
            let mut answers = app
                .claims()
                .import_claims(authed(token, tokio_stream::iter([row])))
                .await?
                .into_inner();
            while let Some(answer) = answers.message().await? {
                row_failure(answer.error)?;
            }
            Ok(())
        }
        "/payouts.v1.ClaimService/AttachEvidence" => app
            .claims()
            .attach_evidence(authed(
                token,
                pb::AttachEvidenceRequest {
                    request_id,
                    claim_id: fx.pending_claim_id.clone(),
                    evidence: Some(evidence()),
                },
            ))
            .await
            .map(|_| ()),
        "/payouts.v1.ClaimService/ReviewClaim" => app
            .claims()
            .review_claim(authed(
                token,
                review_request(
                    &fx.evidenced_claim_id,
                    pb::ReviewDecision::Approve,
                    &request_id,
                ),
            ))
            .await
            .map(|_| ()),
        "/payouts.v1.ClaimService/PreviewCompensation" => app
            .claims()
            .preview_compensation(authed(
                token,
                pb::PreviewCompensationRequest {
                    items: vec![full_weight_item(400_000)],
                },
            ))
            .await
            .map(|_| ()),
        "/payouts.v1.ClaimService/GetClaim" => app
            .claims()
            .get_claim(authed(
                token,
                pb::GetClaimRequest {
                    claim_id: fx.pending_claim_id.clone(),
                },
            ))
            .await
            .map(|_| ()),
        "/payouts.v1.ClaimService/ListClaims" => app
            .claims()
            .list_claims(authed(
                token,
                pb::ListClaimsRequest {
                    page_size: 10,
                    ..Default::default()
                },
            ))
            .await
            .map(|_| ()),
        "/payouts.v1.ClaimService/GetPolicy" => app
            .claims()
            .get_policy(authed(token, pb::GetPolicyRequest {}))
            .await
            .map(|_| ()),
        "/payouts.v1.DisbursementService/RetryDisbursement" => app
            .disbursements()
            .retry_disbursement(authed(
                token,
                pb::RetryDisbursementRequest {
                    request_id,
                    disbursement_id: fx.failed_disbursement_id.clone(),
                },
            ))
            .await
            .map(|_| ()),
        "/payouts.v1.DisbursementService/CancelDisbursement" => app
            .disbursements()
            .cancel_disbursement(authed(
                token,
                pb::CancelDisbursementRequest {
                    request_id,
                    disbursement_id: fx.queued_disbursement_id.clone(),
                    reason: "paid by hand at the branch".into(),
                },
            ))
            .await
            .map(|_| ()),
        "/payouts.v1.DisbursementService/PauseDispatch" => app
            .disbursements()
            .pause_dispatch(authed(
                token,
                pb::PauseDispatchRequest {
                    request_id,
                    reason: "bank incident".into(),
                },
            ))
            .await
            .map(|_| ()),
        "/payouts.v1.DisbursementService/ResumeDispatch" => app
            .disbursements()
            .resume_dispatch(authed(token, pb::ResumeDispatchRequest { request_id }))
            .await
            .map(|_| ()),
        "/payouts.v1.DisbursementService/GetDisbursement" => app
            .disbursements()
            .get_disbursement(authed(
                token,
                pb::GetDisbursementRequest {
                    disbursement_id: fx.failed_disbursement_id.clone(),
                },
            ))
            .await
            .map(|_| ()),
        "/payouts.v1.DisbursementService/ListDisbursements" => app
            .disbursements()
            .list_disbursements(authed(
                token,
                pb::ListDisbursementsRequest {
                    page_size: 10,
                    ..Default::default()
                },
            ))
            .await
            .map(|_| ()),
        "/payouts.v1.DisbursementService/GetProgramSummary" => app
            .disbursements()
            .get_program_summary(authed(token, pb::GetProgramSummaryRequest {}))
            .await
            .map(|_| ()),
        "/payouts.v1.AuditService/ListAuditEvents" => audit_client(app)
            .list_audit_events(authed(
                token,
                pb::ListAuditEventsRequest {
                    page_size: 10,
                    ..Default::default()
                },
            ))
            .await
            .map(|_| ()),
        "/payouts.v1.EventService/ListEvents" => events_client(app)
            .list_events(authed(token, pb::ListEventsRequest::default()))
            .await
            .map(|_| ()),
        "/payouts.v1.EventService/WatchEvents" => events_client(app)
            .watch_events(authed(token, pb::WatchEventsRequest::default()))
            .await
            .map(|_| ()),
        "/payouts.v1.DisbursementService/ExportDisbursements" => app
            .disbursements()
            .export_disbursements(authed(token, pb::ExportDisbursementsRequest::default()))
            .await
            .map(|_| ()),
        // A cut-off at the epoch and no lines: nothing to find, nothing to reopen.
        "/payouts.v1.DisbursementService/ReconcileSettlements" => {
            let report = pb::ReconcileSettlementsRequest {
                request_id,
                cutoff_time: Some(prost_types::Timestamp {
                    seconds: 1,
                    nanos: 0,
                }),
                lines: vec![],
            };
            let mut results = app
                .disbursements()
                .reconcile_settlements(authed(token, tokio_stream::iter([report])))
                .await?
                .into_inner();
            while results.message().await?.is_some() {}
            Ok(())
        }
        other => panic!("{other} has an access rule but no case in the access matrix; add one"),
    }
}

/// Everything a caller can observe, read as the viewer.
#[derive(Debug, PartialEq)]
struct Snapshot {
    partners: Vec<pb::Partner>,
    claims: Vec<pb::Claim>,
    disbursements: Vec<pb::Disbursement>,
    summary: pb::GetProgramSummaryResponse,
}

async fn snapshot(app: &TestApp) -> Snapshot {
    let partners = app
        .partners()
        .list_partners(r#as(
            "viewer",
            pb::ListPartnersRequest {
                page_size: 1000,
                ..Default::default()
            },
        ))
        .await
        .expect("list partners")
        .into_inner();
    let claims = app
        .claims()
        .list_claims(r#as(
            "viewer",
            pb::ListClaimsRequest {
                page_size: 1000,
                ..Default::default()
            },
        ))
        .await
        .expect("list claims")
        .into_inner();
    let disbursements = app
        .disbursements()
        .list_disbursements(r#as(
            "viewer",
            pb::ListDisbursementsRequest {
                page_size: 1000,
                ..Default::default()
            },
        ))
        .await
        .expect("list disbursements")
        .into_inner();
    assert!(partners.next_page_token.is_empty());
    assert!(claims.next_page_token.is_empty());
    assert!(disbursements.next_page_token.is_empty());
    let summary = app
        .disbursements()
        .get_program_summary(r#as("viewer", pb::GetProgramSummaryRequest {}))
        .await
        .expect("program summary")
        .into_inner();
    Snapshot {
        partners: partners.partners,
        claims: claims.claims,
        disbursements: disbursements.disbursements,
        summary,
    }
}

/// A kind of caller in the matrix.
struct MatrixCaller {
    label: String,
    token: Option<String>,
    /// The single role it holds; `None`: it cannot be identified.
    role: Option<Role>,
}

fn matrix_callers() -> Vec<MatrixCaller> {
    let mut callers = vec![
        MatrixCaller {
            label: "no credentials".into(),
            token: None,
            role: None,
        },
        MatrixCaller {
            label: "a wrong token".into(),
            token: Some(WRONG_TOKEN.into()),
            role: None,
        },
    ];
    callers.extend(Role::ALL.into_iter().map(|r| MatrixCaller {
        label: format!("the {r} principal"),
        token: Some(token(r.as_str())),
        role: Some(r),
    }));
    callers
}

/// The role the issue gives each method it names. The matrix takes its expectations from
/// `METHOD_RULES` (so a new method cannot be left out); this keeps the table itself honest.
const ISSUE_ROLES: &[(&str, Role)] = &[
    (
        "/payouts.v1.PartnerService/RegisterPartner",
        Role::Registrar,
    ),
    (
        "/payouts.v1.PartnerService/UpdatePartnerBankAccount",
        Role::Registrar,
    ),
    ("/payouts.v1.PartnerService/GetPartner", Role::Viewer),
    ("/payouts.v1.PartnerService/ListPartners", Role::Viewer),
    ("/payouts.v1.ClaimService/SubmitClaim", Role::Registrar),
    ("/payouts.v1.ClaimService/AttachEvidence", Role::Registrar),
    ("/payouts.v1.ClaimService/ReviewClaim", Role::Reviewer),
    ("/payouts.v1.ClaimService/PreviewCompensation", Role::Viewer),
    ("/payouts.v1.ClaimService/GetClaim", Role::Viewer),
    ("/payouts.v1.ClaimService/ListClaims", Role::Viewer),
    ("/payouts.v1.ClaimService/GetPolicy", Role::Viewer),
    (
        "/payouts.v1.DisbursementService/RetryDisbursement",
        Role::Payments,
    ),
    (
        "/payouts.v1.DisbursementService/CancelDisbursement",
        Role::Payments,
    ),
    (
        "/payouts.v1.DisbursementService/PauseDispatch",
        Role::Payments,
    ),
    (
        "/payouts.v1.DisbursementService/ResumeDispatch",
        Role::Payments,
    ),
    (
        "/payouts.v1.DisbursementService/GetDisbursement",
        Role::Viewer,
    ),
    (
        "/payouts.v1.DisbursementService/ListDisbursements",
        Role::Viewer,
    ),
    (
        "/payouts.v1.DisbursementService/GetProgramSummary",
        Role::Viewer,
    ),
    ("/payouts.v1.AuditService/ListAuditEvents", Role::Auditor),
    ("/payouts.v1.EventService/ListEvents", Role::Viewer),
    ("/payouts.v1.EventService/WatchEvents", Role::Viewer),
];

/// Every `payouts.v1` method the protos declare, as HTTP/2 paths.
fn proto_methods() -> BTreeSet<String> {
    let set = prost_types::FileDescriptorSet::decode(partner_payouts::proto::FILE_DESCRIPTOR_SET)
        .expect("the descriptor set decodes");
    set.file
        .iter()
        .filter(|f| f.package() == "payouts.v1")
        .flat_map(|f| {
            f.service.iter().flat_map(|s| {
                s.method
                    .iter()
                    .map(move |m| format!("/payouts.v1.{}/{}", s.name(), m.name()))
            })
        })
        .collect()
}

fn assert_refused(status: &Status, rule: &MethodRule, caller: &MatrixCaller) {
    let cell = format!("{} as {}", rule.path, caller.label);
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("{cell}: ErrorInfo details: {status:?}"));
    assert_eq!(info.domain, "payouts", "{cell}");
    match caller.role {
        None => {
            assert_eq!(status.code(), Code::Unauthenticated, "{cell}: {status:?}");
            assert_eq!(info.reason, "UNAUTHENTICATED", "{cell}");
        }
        Some(_) => {
            assert_eq!(status.code(), Code::PermissionDenied, "{cell}: {status:?}");
            assert_eq!(info.reason, "ROLE_REQUIRED", "{cell}");
            assert_eq!(
                info.metadata.get("role").map(String::as_str),
                Some(rule.role.as_str()),
                "{cell}"
            );
        }
    }
    if let Some(t) = &caller.token {
        assert!(!status.message().contains(t.as_str()), "{cell}: {status:?}");
    }
}

/// Every RPC x {no credentials, a wrong token, each role}: the allowed cells succeed, the others
/// get exactly UNAUTHENTICATED or PERMISSION_DENIED and change nothing; the audit log records
/// every mutating call, allowed or refused; and its rows cannot be changed or deleted.
async fn access_matrix(db: Db) {
    // The matrix makes hundreds of refused calls from one address within seconds: more than
    // the per-peer budget of refused calls (which `floods` tests) allows.
    let app = spawn_app(db, |s| {
        let mut auth = auth_settings(None);
        auth.denied_rate_limit_per_second = 100_000;
        s.auth = Some(auth);
        write_pii_key(&s.pii_key_file);
    })
    .await;

    // The matrix covers every method the protos declare, because every one has a rule.
    let rule_paths: BTreeSet<String> = METHOD_RULES.iter().map(|r| r.path.to_owned()).collect();
    let declared = proto_methods();
    assert!(declared.len() >= 18, "{declared:?}");
    let unruled: Vec<_> = declared.difference(&rule_paths).collect();
    assert!(unruled.is_empty(), "methods without a rule: {unruled:?}");
    for (path, role) in ISSUE_ROLES {
        let rule = METHOD_RULES
            .iter()
            .find(|r| r.path == *path)
            .unwrap_or_else(|| panic!("{path} has no access rule"));
        assert_eq!(rule.role, *role, "{path}");
    }

    let fx = fixtures(&app).await;
    let callers = matrix_callers();

    // 1. Every refused cell, with a valid request that would change something if let through.
    let before = snapshot(&app).await;
    let mut refused_cells = 0;
    for rule in METHOD_RULES {
        for caller in callers.iter().filter(|c| c.role != Some(rule.role)) {
            let status = call(&app, &fx, rule.path, caller.token.as_deref(), &request_id())
                .await
                .expect_err(&format!(
                    "{} as {} must be refused",
                    rule.path, caller.label
                ));
            assert_refused(&status, rule, caller);
            refused_cells += 1;
        }
    }
    assert_eq!(refused_cells, METHOD_RULES.len() * (callers.len() - 1));
    assert_eq!(
        snapshot(&app).await,
        before,
        "a refused call changed something"
    );

    // 2. Every allowed cell: exactly one per method, the principal holding its role.
    let mut allowed = Vec::new();
    for rule in METHOD_RULES {
        let caller = callers
            .iter()
            .find(|c| c.role == Some(rule.role))
            .unwrap_or_else(|| panic!("no caller holds {}", rule.role));
        let request_id = request_id();
        call(&app, &fx, rule.path, caller.token.as_deref(), &request_id)
            .await
            .unwrap_or_else(|s| panic!("{} as {} must succeed: {s:?}", rule.path, caller.label));
        allowed.push((rule, request_id));
    }
    assert_eq!(allowed.len(), rule_paths.len());

    // The allowed calls did what they say, as the principal that made them.
    let updated = get_partner(&app, &fx.partner.partner_id).await;
    assert_ne!(updated.etag, fx.partner.etag);
    assert_eq!(
        updated.bank_account.expect("account").account_number,
        "****7777"
    );
    let claims = snapshot(&app).await.claims;
    let new_claim = claims
        .iter()
        .find(|c| c.partner_id == fx.claimless_partner_id)
        .expect("SubmitClaim made a claim");
    assert_eq!(new_claim.submitted_by, "registrar");
    assert_eq!(
        get_claim_as_viewer(&app, &fx.pending_claim_id)
            .await
            .evidence
            .len(),
        1
    );
    let reviewed = get_claim_as_viewer(&app, &fx.evidenced_claim_id).await;
    assert_eq!(reviewed.status(), pb::ClaimStatus::Approved);
    assert_eq!(reviewed.reviewed_by, "reviewer");
    assert_eq!(reviewed.submitted_by, "registrar");
    let cancelled = get_disbursement(&app, &fx.queued_disbursement_id).await;
    assert_eq!(cancelled.status(), Cancelled);
    let retried = get_disbursement(&app, &fx.failed_disbursement_id).await;
    assert!(
        retried
            .history
            .iter()
            .any(|h| h.from_status() == Failed && h.to_status() == Queued && h.actor == "payments"),
        "{retried:?}"
    );
    let dispatch = snapshot(&app)
        .await
        .summary
        .dispatch
        .expect("dispatch state");
    assert!(!dispatch.paused);
    assert_eq!(dispatch.changed_by, "payments");

    // 3. The audit log: every mutating call, allowed or refused. Refused ones are written in
    // the background, so wait for them.
    let mutating: Vec<&MethodRule> = METHOD_RULES.iter().filter(|r| r.mutating).collect();
    assert!(mutating.len() >= 9, "{mutating:?}");
    let refused_per_method = callers.len() - 1;
    // Refused calls are recorded in aggregate: an entry's `count` is the calls it stands for.
    let refused_calls = |events: &[&pb::AuditEvent]| -> i64 {
        events
            .iter()
            .filter(|e| e.outcome_code != "OK")
            .map(|e| e.count)
            .sum()
    };
    let events = audit_until(&app, |events| {
        refused_calls(&events.iter().collect::<Vec<_>>())
            >= i64::try_from(mutating.len() * refused_per_method).expect("small")
    })
    .await;
    for event in &events {
        assert_well_formed(event);
    }
    for rule in &mutating {
        let of_method: Vec<&pb::AuditEvent> =
            events.iter().filter(|e| e.method == rule.path).collect();
        let unauthenticated: Vec<_> = of_method
            .iter()
            .filter(|e| e.outcome_code == "UNAUTHENTICATED")
            .collect();
        assert_eq!(
            unauthenticated.iter().map(|e| e.count).sum::<i64>(),
            2,
            "{}: {of_method:#?}",
            rule.path
        );
        assert!(
            unauthenticated.iter().all(|e| e.principal.is_empty()),
            "{unauthenticated:?}"
        );
        for role in Role::ALL.into_iter().filter(|r| *r != rule.role) {
            let denied: i64 = of_method
                .iter()
                .filter(|e| e.principal == role.as_str() && e.outcome_code == "PERMISSION_DENIED")
                .map(|e| e.count)
                .sum();
            assert_eq!(denied, 1, "{} as {role}: {of_method:#?}", rule.path);
        }
        let refused = refused_calls(&of_method);
        assert_eq!(
            refused,
            i64::try_from(refused_per_method).expect("small"),
            "{}: {of_method:#?}",
            rule.path
        );

        let (_, request_id) = allowed
            .iter()
            .find(|(r, _)| r.path == rule.path)
            .expect("an allowed call");
        let ok: Vec<_> = events
            .iter()
            .filter(|e| &e.request_id == request_id)
            .collect();
        assert_eq!(ok.len(), 1, "{}: {events:#?}", rule.path);
        assert_eq!(ok[0].method, rule.path);
        assert_eq!(ok[0].principal, rule.role.as_str());
        assert_eq!(ok[0].outcome_code, "OK");
        let expected_resource = match rule.path.rsplit('/').next() {
            Some("UpdatePartnerBankAccount") => Some(&fx.partner.partner_id),
            Some("SubmitClaim") => Some(&new_claim.claim_id),
            Some("AttachEvidence") => Some(&fx.pending_claim_id),
            Some("ReviewClaim") => Some(&fx.evidenced_claim_id),
            Some("RetryDisbursement") => Some(&fx.failed_disbursement_id),
            Some("CancelDisbursement") => Some(&fx.queued_disbursement_id),
            _ => None,
        };
        if let Some(resource) = expected_resource {
            assert_eq!(&ok[0].resource_id, resource, "{}", rule.path);
        }
    }

    // 4. The audit log is append-only, in the database itself.
    audit_rows_cannot_be_changed(&app).await;
}

/// A direct UPDATE, DELETE (and, on PostgreSQL, TRUNCATE) of audit rows fails.
async fn audit_rows_cannot_be_changed(app: &TestApp) {
    const COUNT: &str = "SELECT COUNT(*) FROM audit_events";
    const CHANGED: &str = "SELECT COUNT(*) FROM audit_events WHERE principal = 'intruder'";
    match app.db {
        Db::Postgres => {
            let mut conn = sqlx::PgConnection::connect(&app.database_url)
                .await
                .expect("connect to the test database");
            let rows: i64 = sqlx::query_scalar(COUNT)
                .fetch_one(&mut conn)
                .await
                .expect("count");
            assert!(rows > 0);
            for statement in [
                "UPDATE audit_events SET principal = 'intruder'",
                "DELETE FROM audit_events",
                "TRUNCATE audit_events",
            ] {
                let result = sqlx::query(statement).execute(&mut conn).await;
                assert!(result.is_err(), "{statement} succeeded: {result:?}");
            }
            let after: i64 = sqlx::query_scalar(COUNT)
                .fetch_one(&mut conn)
                .await
                .expect("count");
            assert_eq!(after, rows);
            let changed: i64 = sqlx::query_scalar(CHANGED)
                .fetch_one(&mut conn)
                .await
                .expect("count");
            assert_eq!(changed, 0);
        }
        Db::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(&app.database_url)
                .await
                .expect("open the test database");
            let rows: i64 = sqlx::query_scalar(COUNT)
                .fetch_one(&mut conn)
                .await
                .expect("count");
            assert!(rows > 0);
            for statement in [
                "UPDATE audit_events SET principal = 'intruder'",
                "DELETE FROM audit_events",
            ] {
                let result = sqlx::query(statement).execute(&mut conn).await;
                assert!(result.is_err(), "{statement} succeeded: {result:?}");
            }
            let after: i64 = sqlx::query_scalar(COUNT)
                .fetch_one(&mut conn)
                .await
                .expect("count");
            assert_eq!(after, rows);
            let changed: i64 = sqlx::query_scalar(CHANGED)
                .fetch_one(&mut conn)
                .await
                .expect("count");
            assert_eq!(changed, 0);
        }
    }
}

on_both_databases!(access_matrix, db = access_matrix);

// ---------------------------------------------------------------------------------------------
// Account numbers at rest.
// ---------------------------------------------------------------------------------------------

/// What the raw database must not contain for `account`: the number as typed, its digits, and
/// its first nine digits.
fn needles(account: &str) -> Vec<String> {
    let digits: String = account.chars().filter(char::is_ascii_digit).collect();
    let mut needles = vec![account.to_owned(), digits.clone(), digits[..9].to_owned()];
    needles.dedup();
    needles
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The raw bytes of the test database: the SQLite file and its WAL, or a `pg_dump`.
async fn raw_database(app: &TestApp) -> Vec<u8> {
    match app.db {
        Db::Sqlite => {
            let path = app
                .database_url
                .strip_prefix("sqlite://")
                .expect("a sqlite:// URL");
            let path = path.split('?').next().expect("a path");
            let mut bytes = std::fs::read(path).expect("read the SQLite file");
            for suffix in ["-wal", "-journal"] {
                if let Ok(more) = std::fs::read(format!("{path}{suffix}")) {
                    bytes.extend(more);
                }
            }
            bytes
        }
        Db::Postgres => {
            let url = app.database_url.clone();
            let output = tokio::task::spawn_blocking(move || {
                std::process::Command::new("pg_dump")
                    .args(["--no-owner", "--dbname", &url])
                    .output()
            })
            .await
            .expect("pg_dump task")
            .expect("run pg_dump (it must be installed)");
            assert!(
                output.status.success(),
                "pg_dump failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            output.stdout
        }
    }
}

async fn account_numbers_are_sealed_at_rest(db: Db) {
    let app = spawn_secured(db, None).await;
    let accounts = ["3561248790123", "481-902-735-61842", "7205 1938 4660"];
    let mut partners = Vec::new();
    for (seed, account) in (21..).zip(accounts) {
        partners.push(register_as(&app, "registrar", partner_with_account(seed, account)).await);
    }
    // One is paid (the disbursement and the dispatcher's rows hold the account too), and one
    // account is changed afterwards.
    let claim = submit_as(&app, "registrar", &partners[0].partner_id, 100, vec![]).await;
    let paid = wait_for(&app, &claim.disbursement_id, Paid).await;
    assert_eq!(paid.account_number, "****0123");
    let changed_to = "9913-5724-6802-4680";
    let updated = update_account_as(&app, "registrar", &partners[1].partner_id, changed_to).await;
    assert_eq!(
        updated.bank_account.expect("account").account_number,
        "****4680"
    );
    // Let the refused/allowed audit writes and the dispatcher settle.
    tokio::time::sleep(Duration::from_millis(100)).await;

    let raw = raw_database(&app).await;
    // The check reads the right bytes: what is not secret is there in plain text.
    for control in [&partners[0].legal_name, &partners[2].legal_name] {
        assert!(
            contains(&raw, control.as_bytes()),
            "{control:?} not found: the check is not reading the data"
        );
    }
    for account in accounts.into_iter().chain([changed_to]) {
        for needle in needles(account) {
            assert!(
                !contains(&raw, needle.as_bytes()),
                "{db:?}: {needle:?} (of account {account:?}) is in the raw database"
            );
            // pg_dump shows bytea columns (e.g. stored responses) as hex.
            assert!(
                !contains(&raw, hex::encode(needle.as_bytes()).as_bytes()),
                "{db:?}: {needle:?} (of account {account:?}) is in the raw database, hex-encoded"
            );
        }
    }
}

on_both_databases!(
    account_numbers_are_sealed_at_rest,
    db = account_numbers_are_sealed_at_rest
);

// ---------------------------------------------------------------------------------------------
// Four eyes.
// ---------------------------------------------------------------------------------------------

fn assert_same_principal(status: &Status) {
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason(status), "SAME_PRINCIPAL", "{status:?}");
}

async fn four_eyes(db: Db) {
    let app = spawn_secured(db, None).await;

    // The reviewer who decides a claim cannot be the principal who submitted it, even when it
    // holds the reviewer role.
    let p = register_as(&app, INTAKE_REVIEWER, partner(31)).await;
    let claim = submit_as(&app, INTAKE_REVIEWER, &p.partner_id, 600_000, vec![]).await;
    assert_eq!(claim.status(), pb::ClaimStatus::PendingReview, "{claim:?}");
    assert_eq!(claim.submitted_by, INTAKE_REVIEWER);
    app.claims()
        .attach_evidence(r#as(
            INTAKE_REVIEWER,
            pb::AttachEvidenceRequest {
                request_id: request_id(),
                claim_id: claim.claim_id.clone(),
                evidence: Some(evidence()),
            },
        ))
        .await
        .expect("attach evidence");
    let before = get_claim_as_viewer(&app, &claim.claim_id).await;
    let own_review = request_id();
    for (decision, rid) in [
        (pb::ReviewDecision::Approve, own_review.clone()),
        (pb::ReviewDecision::Reject, request_id()),
    ] {
        let status = app
            .claims()
            .review_claim(r#as(
                INTAKE_REVIEWER,
                review_request(&claim.claim_id, decision, &rid),
            ))
            .await
            .expect_err("reviewing one's own claim");
        assert_same_principal(&status);
    }
    assert_eq!(get_claim_as_viewer(&app, &claim.claim_id).await, before);
    let approved = app
        .claims()
        .review_claim(r#as(
            "reviewer",
            review_request(&claim.claim_id, pb::ReviewDecision::Approve, &request_id()),
        ))
        .await
        .expect("another reviewer decides")
        .into_inner()
        .claim
        .expect("claim");
    assert_eq!(approved.status(), pb::ClaimStatus::Approved);
    assert_eq!(approved.reviewed_by, "reviewer");
    assert_eq!(approved.compensation_krw, 50_000);
    assert!(!approved.disbursement_id.is_empty());

    // Retrying a failed payout after a bank account change cannot be done by the principal
    // who changed the account.
    let p = register_as(&app, OPS, partner_with_account(32, CLOSED_ACCOUNT)).await;
    let claim = submit_as(&app, OPS, &p.partner_id, 100, vec![]).await;
    let failed = wait_for(&app, &claim.disbursement_id, Failed).await;
    assert_eq!(failed.failure_code, "ACCOUNT_CLOSED");
    update_account_as(&app, OPS, &p.partner_id, GOOD_ACCOUNT).await;
    let own_retry = request_id();
    let own_retry_disbursement = failed.disbursement_id.clone();
    let status = retry_as(&app, OPS, &failed.disbursement_id, &own_retry)
        .await
        .expect_err("retry after changing the account oneself");
    assert_same_principal(&status);
    assert_eq!(
        get_disbursement(&app, &failed.disbursement_id).await,
        failed
    );
    let requeued = retry_as(&app, "payments", &failed.disbursement_id, &request_id())
        .await
        .expect("another payments principal retries");
    assert_ne!(requeued.status(), Failed);
    let paid = wait_for(&app, &failed.disbursement_id, Paid).await;
    assert_eq!(paid.account_number, "****1234");
    assert!(
        paid.history
            .iter()
            .any(|h| h.from_status() == Failed && h.actor == "payments"),
        "{paid:?}"
    );

    // The rule is about who changed the account: registering it is not a change, and a
    // change by someone else does not stop the retry.
    let p = register_as(&app, OPS, partner_with_account(33, CLOSED_ACCOUNT)).await;
    let claim = submit_as(&app, OPS, &p.partner_id, 100, vec![]).await;
    let failed = wait_for(&app, &claim.disbursement_id, Failed).await;
    update_account_as(&app, "registrar", &p.partner_id, GOOD_ACCOUNT).await;
    retry_as(&app, OPS, &failed.disbursement_id, &request_id())
        .await
        .expect("the account was changed by somebody else");
    wait_for(&app, &failed.disbursement_id, Paid).await;

    // Both refusals are in the audit log, with the principal, method and request.
    let events = audit_until(&app, |events| {
        [&own_review, &own_retry]
            .iter()
            .all(|rid| events.iter().any(|e| &e.request_id == *rid))
    })
    .await;
    for (rid, principal, method) in [
        (
            &own_review,
            INTAKE_REVIEWER,
            "/payouts.v1.ClaimService/ReviewClaim",
        ),
        (
            &own_retry,
            OPS,
            "/payouts.v1.DisbursementService/RetryDisbursement",
        ),
    ] {
        let event = events
            .iter()
            .find(|e| &e.request_id == rid)
            .unwrap_or_else(|| panic!("no audit event for {method}: {events:#?}"));
        assert_well_formed(event);
        assert_eq!(event.principal, principal);
        assert_eq!(event.method, method);
        assert_eq!(event.outcome_code, "PERMISSION_DENIED");
    }
    let retry_event = events
        .iter()
        .find(|e| e.request_id == own_retry)
        .expect("audited");
    assert_eq!(retry_event.resource_id, own_retry_disbursement);
}

/// An auditor looking up a claim's history (`ListAuditEvents{resource_id}`) sees a refused
/// attempt to review it, as it sees a refused retry of a disbursement.
async fn a_refused_review_is_found_by_its_claim(db: Db) {
    let app = spawn_secured(db, None).await;
    let p = register_as(&app, INTAKE_REVIEWER, partner(34)).await;
    let claim = submit_as(
        &app,
        INTAKE_REVIEWER,
        &p.partner_id,
        600_000,
        vec![evidence()],
    )
    .await;
    assert_eq!(claim.status(), pb::ClaimStatus::PendingReview, "{claim:?}");
    let rid = request_id();
    let status = app
        .claims()
        .review_claim(r#as(
            INTAKE_REVIEWER,
            review_request(&claim.claim_id, pb::ReviewDecision::Approve, &rid),
        ))
        .await
        .expect_err("reviewing one's own claim");
    assert_same_principal(&status);
    let event = audit_until(&app, |events| events.iter().any(|e| e.request_id == rid))
        .await
        .into_iter()
        .find(|e| e.request_id == rid)
        .expect("audited");
    assert_eq!(event.outcome_code, "PERMISSION_DENIED");
    assert_eq!(
        event.resource_id, claim.claim_id,
        "the audit row of a refused review must name the claim: {event:?}"
    );
    let by_claim = audit_client(&app)
        .list_audit_events(r#as(
            "auditor",
            pb::ListAuditEventsRequest {
                page_size: 100,
                resource_id: claim.claim_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .expect("list audit events by claim")
        .into_inner()
        .audit_events;
    assert!(
        by_claim.iter().any(|e| e.request_id == rid),
        "{by_claim:#?}"
    );
}

on_both_databases!(
    a_refused_review_is_found_by_its_claim,
    db = a_refused_review_is_found_by_its_claim
);

on_both_databases!(four_eyes, db = four_eyes);

// ---------------------------------------------------------------------------------------------
// Rate limits.
// ---------------------------------------------------------------------------------------------

async fn rate_limit(db: Db) {
    // 5 calls a second, bursts of 3.
    let app = spawn_secured(db, Some((5, 3))).await;
    let viewer = token("viewer");
    let mut ok = 0;
    let mut limited = Vec::new();
    for _ in 0..10 {
        match app
            .claims()
            .get_policy(authed(Some(&viewer), pb::GetPolicyRequest {}))
            .await
        {
            Ok(_) => ok += 1,
            Err(status) => limited.push(status),
        }
    }
    assert!((3..10).contains(&ok), "{ok} of 10 went through");
    let status = limited.first().expect("some calls were limited");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        limited.iter().all(|s| s.code() == Code::ResourceExhausted),
        "{limited:?}"
    );
    let retry_delay = status
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .expect("RetryInfo with a delay");
    assert!(
        retry_delay > Duration::ZERO && retry_delay <= Duration::from_millis(200),
        "{retry_delay:?}"
    );
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "RATE_LIMITED");
    assert_eq!(
        info.metadata.get("principal").map(String::as_str),
        Some("viewer")
    );
    assert!(!status.message().contains(&viewer), "{status:?}");

    // Each principal has its own budget.
    audit_events(&app, Some(&token("auditor")))
        .await
        .expect("the auditor is not limited by the viewer's calls");
    // After the delay it says, the caller may call again.
    tokio::time::sleep(retry_delay + Duration::from_millis(20)).await;
    app.claims()
        .get_policy(authed(Some(&viewer), pb::GetPolicyRequest {}))
        .await
        .expect("a call after the retry delay");

    // A limited mutating call is refused before it does anything, and is audited.
    let mut registered = 0;
    let mut limited: i64 = 0;
    for seed in 41..47 {
        match app
            .partners()
            .register_partner(r#as(
                "registrar",
                pb::RegisterPartnerRequest {
                    request_id: request_id(),
                    partner: Some(partner(seed)),
                },
            ))
            .await
        {
            Ok(_) => registered += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                limited += 1;
            }
        }
    }
    assert!(limited > 0, "registered {registered} without a limit");
    let limited_calls = |events: &[pb::AuditEvent]| -> i64 {
        events
            .iter()
            .filter(|e| e.outcome_code == "RESOURCE_EXHAUSTED")
            .map(|e| e.count)
            .sum()
    };
    let events = audit_until(&app, |events| limited_calls(events) >= limited).await;
    assert_eq!(limited_calls(&events), limited, "{events:#?}");
    let rows: Vec<_> = events
        .iter()
        .filter(|e| e.outcome_code == "RESOURCE_EXHAUSTED")
        .collect();
    for row in rows {
        assert_well_formed(row);
        assert_eq!(row.principal, "registrar");
        assert_eq!(row.method, "/payouts.v1.PartnerService/RegisterPartner");
    }
    // Only the calls let through registered anyone (the viewer may itself be limited).
    let partners = eventually(5, || async {
        match app
            .partners()
            .list_partners(r#as(
                "viewer",
                pb::ListPartnersRequest {
                    page_size: 100,
                    ..Default::default()
                },
            ))
            .await
        {
            Ok(response) => Some(response.into_inner().partners),
            Err(s) if s.code() == Code::ResourceExhausted => None,
            Err(s) => panic!("list partners: {s:?}"),
        }
    })
    .await;
    assert_eq!(partners.len(), registered);
}

on_both_databases!(rate_limit, db = rate_limit);

// ---------------------------------------------------------------------------------------------
// Local development mode.
// ---------------------------------------------------------------------------------------------

#[test]
fn without_auth_settings_only_allow_loopback() {
    for bad in ["0.0.0.0:50051", "[::]:50051", "10.1.2.3:50051"] {
        let listen_addr: SocketAddr = bad.parse().expect("addr");
        let settings = Settings {
            listen_addr,
            auth: None,
            ..Settings::default()
        };
        let message = format!("{:#}", settings.validate().expect_err(bad));
        assert!(message.contains(bad), "{message}");
        assert!(
            message.contains("[auth]") && message.contains("loopback"),
            "{message}"
        );
        let secured = Settings {
            auth: Some(auth_settings(None)),
            ..settings
        };
        secured.validate().expect("with [auth] any address is fine");
    }
    for good in ["127.0.0.1:50051", "[::1]:50051"] {
        let settings = Settings {
            listen_addr: good.parse().expect("addr"),
            ..Settings::default()
        };
        settings.validate().expect(good);
    }
}

#[test]
fn a_settings_file_without_auth_on_a_public_address_does_not_load() {
    if std::env::vars().any(|(k, _)| k.starts_with("PAYOUTS_")) {
        eprintln!("skipped: PAYOUTS_* variables would override the settings file");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("payouts.toml");
    std::fs::write(&file, "listen_addr = \"0.0.0.0:50051\"\n").expect("write settings");
    let message = format!(
        "{:#}",
        Settings::load(Some(&file)).expect_err("no [auth] on 0.0.0.0")
    );
    assert!(
        message.contains("0.0.0.0:50051") && message.contains("[auth]"),
        "{message}"
    );

    let digest = hex::encode(Sha256::digest(b"ops-token"));
    std::fs::write(
        &file,
        format!(
            "listen_addr = \"0.0.0.0:50051\"\n\n[[auth.principals]]\nname = \"ops\"\n\
             roles = [\"viewer\"]\ntoken_sha256 = \"{digest}\"\n"
        ),
    )
    .expect("write settings");
    let settings = Settings::load(Some(&file)).expect("with [auth] it loads");
    assert!(settings.auth.is_some());
}

#[tokio::test]
async fn the_application_refuses_to_start_beyond_loopback_without_auth() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("payouts.db");
    let settings = Settings {
        listen_addr: "0.0.0.0:0".parse().expect("addr"),
        database_url: format!("sqlite://{}", db.display()),
        pii_key_file: dir.path().join("pii.key"),
        auth: None,
        ..Settings::default()
    };
    let Err(error) = Application::build(settings).await else {
        panic!("Application::build served on 0.0.0.0 without [auth]");
    };
    let message = format!("{error:#}");
    assert!(
        message.contains("[auth]") && message.contains("loopback"),
        "{message}"
    );
    assert!(!db.exists(), "refused before opening the database");
    assert!(
        !dir.path().join("pii.key").exists(),
        "refused before creating a key"
    );
}

/// Without `[auth]`, on loopback: every caller, with or without a token, is `local-dev`
/// holding every role, so every method works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_auth_every_caller_is_local_dev_with_every_role() {
    let app = spawn_app(Db::Sqlite, |_| {}).await;
    let fx = fixtures(&app).await;
    let mut request_ids = Vec::new();
    for (i, rule) in METHOD_RULES.iter().enumerate() {
        let rid = request_id();
        let token = (i % 2 == 1).then_some(WRONG_TOKEN);
        call(&app, &fx, rule.path, token, &rid)
            .await
            .unwrap_or_else(|s| panic!("{} in local development mode: {s:?}", rule.path));
        if rule.mutating {
            request_ids.push(rid);
        }
    }
    let reviewed = get_claim_as_viewer(&app, &fx.evidenced_claim_id).await;
    assert_eq!(reviewed.submitted_by, "local-dev");
    assert_eq!(reviewed.reviewed_by, "local-dev");

    let events = audit_events(&app, None)
        .await
        .expect("the audit log needs no credentials either");
    for rid in &request_ids {
        assert!(
            events.iter().any(|e| &e.request_id == rid),
            "{rid}: {events:#?}"
        );
    }
    assert!(
        events.iter().all(|e| e.principal == "local-dev"),
        "{events:#?}"
    );
    assert!(events.iter().all(|e| e.outcome_code == "OK"), "{events:#?}");
}
