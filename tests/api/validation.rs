//! Hostile text and times through the wire: a NUL or another control character, an endless
//! reason, a link that is no place to keep a document, a name that shows nothing, a timestamp
//! outside the protobuf range. Each is refused with `INVALID_ARGUMENT` naming its field before
//! anything is stored, alike on both databases, and never fails anyone else's write.

use futures::future::join_all;
use partner_payouts::proto::google::rpc;
use partner_payouts::proto::payouts::v1::{
    self as pb, audit_service_client::AuditServiceClient, import_claims_request,
};
use prost::Message as _;
use tonic::Code;

use crate::helpers::*;
use crate::on_both_databases;

use pb::DisbursementStatus::{Failed, Paid};

const NUL_URI: &str = "s3://payouts-evidence/claims/a\u{0}b.pdf";
/// A recognised loss that sends a claim to review.
const REVIEW_LOSS_KRW: i64 = 600_000;
/// 10000-01-01T00:00:00Z: one second past the last a protobuf timestamp may hold.
const YEAR_10000: i64 = 253_402_300_800;
const FIRST_SECOND: i64 = -62_135_596_800;
const LAST_SECOND: i64 = 253_402_300_799;

fn evidence(uri: &str) -> pb::Evidence {
    pb::Evidence {
        kind: pb::EvidenceKind::SalesLossProof as i32,
        uri: uri.into(),
        sha256: "ab".repeat(32),
        attach_time: None,
    }
}

fn ts(seconds: i64, nanos: i32) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds, nanos }
}

/// Timestamps a request must not carry: year 10000, negative nanos, nanos of a whole second.
fn out_of_range_times() -> [prost_types::Timestamp; 3] {
    [ts(YEAR_10000, 0), ts(1_000, -1), ts(1_000, 1_000_000_000)]
}

fn audit(app: &TestApp) -> AuditServiceClient<tonic::transport::Channel> {
    AuditServiceClient::new(app.channel.clone())
}

async fn claims_of(app: &TestApp, partner_id: &str) -> Vec<pb::Claim> {
    app.claims()
        .list_claims(pb::ListClaimsRequest {
            partner_id: partner_id.into(),
            ..Default::default()
        })
        .await
        .expect("list claims")
        .into_inner()
        .claims
}

async fn submit_with(
    app: &TestApp,
    partner_id: &str,
    loss_krw: i64,
    evidence: Vec<pb::Evidence>,
) -> Result<pb::Claim, tonic::Status> {
    app.claims()
        .submit_claim(pb::SubmitClaimRequest {
            request_id: request_id(),
            partner_id: partner_id.into(),
            items: vec![full_weight_item(loss_krw)],
            evidence,
        })
        .await
        .map(|r| r.into_inner().claim.expect("claim"))
}

async fn attach(app: &TestApp, claim_id: &str, uri: &str) -> Result<pb::Claim, tonic::Status> {
    app.claims()
        .attach_evidence(pb::AttachEvidenceRequest {
            request_id: request_id(),
            claim_id: claim_id.into(),
            evidence: Some(evidence(uri)),
        })
        .await
        .map(|r| r.into_inner().claim.expect("claim"))
}

async fn review(app: &TestApp, claim_id: &str, reason: &str) -> Result<pb::Claim, tonic::Status> {
    app.claims()
        .review_claim(pb::ReviewClaimRequest {
            request_id: request_id(),
            claim_id: claim_id.into(),
            decision: pb::ReviewDecision::Reject as i32,
            compensation_krw: 0,
            reason: reason.into(),
        })
        .await
        .map(|r| r.into_inner().claim.expect("claim"))
}

async fn pause(app: &TestApp, reason: &str) -> Result<pb::DispatchState, tonic::Status> {
    app.disbursements()
        .pause_dispatch(pb::PauseDispatchRequest {
            request_id: request_id(),
            reason: reason.into(),
        })
        .await
        .map(|r| r.into_inner().state.expect("state"))
}

async fn dispatch_state(app: &TestApp) -> pb::DispatchState {
    app.disbursements()
        .get_program_summary(pb::GetProgramSummaryRequest {})
        .await
        .expect("summary")
        .into_inner()
        .dispatch
        .expect("dispatch state")
}

/// A partner with a claim waiting for review.
async fn pending_claim(app: &TestApp, seed: u64) -> pb::Claim {
    let partner = register(app, partner(seed)).await;
    let claim = submit_with(app, &partner.partner_id, REVIEW_LOSS_KRW, vec![])
        .await
        .expect("submit");
    assert_eq!(claim.status(), pb::ClaimStatus::PendingReview);
    claim
}

/// A rejected import row's error as the status a unary call would have failed with.
fn row_error(error: Option<&rpc::Status>) -> tonic::Status {
    let error = error.expect("a rejected row carries its error");
    tonic::Status::with_details(
        Code::from(error.code),
        error.message.clone(),
        error.encode_to_vec().into(),
    )
}

on_both_databases!(
    a_nul_in_a_claim_is_refused_naming_the_field_and_stores_nothing,
    |app: TestApp| async move {
        let partner = register(&app, partner(1)).await;
        let status = submit_with(&app, &partner.partner_id, 100, vec![evidence(NUL_URI)])
            .await
            .expect_err("NUL in evidence.uri");
        assert_eq!(bad_fields(&status), vec!["evidence[0].uri"]);
        assert!(claims_of(&app, &partner.partner_id).await.is_empty());
        // The partner's one claim is still to be filed.
        let claim = submit_with(&app, &partner.partner_id, REVIEW_LOSS_KRW, vec![])
            .await
            .expect("a claim without the NUL");
        assert_eq!(claim.status(), pb::ClaimStatus::PendingReview);

        let status = attach(&app, &claim.claim_id, NUL_URI)
            .await
            .expect_err("NUL in evidence.uri");
        assert_eq!(bad_fields(&status), vec!["evidence.uri"]);
        assert_eq!(get_claim(&app, &claim.claim_id).await, claim);

        for reason in ["no proof\u{0}", "\u{0}", "no\u{1b}[2Jproof", "two\nlines"] {
            let status = review(&app, &claim.claim_id, reason)
                .await
                .expect_err("control character in reason");
            assert_eq!(bad_fields(&status), vec!["reason"], "{reason:?}");
        }
        let status = review(&app, &claim.claim_id, &"x".repeat(2_001))
            .await
            .expect_err("reason over 2,000 characters");
        assert_eq!(bad_fields(&status), vec!["reason"]);
        assert_eq!(get_claim(&app, &claim.claim_id).await, claim);

        let reviewed = review(&app, &claim.claim_id, &"가".repeat(2_000))
            .await
            .expect("a reason of 2,000 characters");
        assert_eq!(reviewed.status(), pb::ClaimStatus::Rejected);
        assert_eq!(reviewed.review_reason, "가".repeat(2_000));
    }
);

on_both_databases!(
    a_nul_in_one_import_row_rejects_that_row_alone,
    |app: TestApp| async move {
        let mut partners = Vec::new();
        for seed in 1..=5 {
            partners.push(register(&app, partner(seed)).await.partner_id);
        }
        let rows: Vec<pb::ImportClaimsRequest> = partners
            .iter()
            .enumerate()
            .map(|(i, partner_id)| pb::ImportClaimsRequest {
                request_id: request_id(),
                partner: Some(import_claims_request::Partner::PartnerId(
                    partner_id.clone(),
                )),
                items: vec![full_weight_item(100)],
                evidence: vec![evidence(if i == 2 {
                    NUL_URI
                } else {
                    "s3://payouts-evidence/claims/ok.pdf"
                })],
            })
            .collect();
        let mut answers = app
            .claims()
            .import_claims(tokio_stream::iter(rows))
            .await
            .expect("import claims")
            .into_inner();
        let mut outcomes = Vec::new();
        while let Some(answer) = answers.message().await.expect("answer") {
            outcomes.push(answer);
        }
        use pb::import_claims_response::Outcome;
        let kinds: Vec<Outcome> = outcomes.iter().map(|a| a.outcome()).collect();
        assert_eq!(
            kinds,
            [
                Outcome::Created,
                Outcome::Created,
                Outcome::Rejected,
                Outcome::Created,
                Outcome::Created
            ],
            "{outcomes:#?}"
        );
        assert_eq!(
            bad_fields(&row_error(outcomes[2].error.as_ref())),
            vec!["evidence[0].uri"]
        );
        for (i, partner_id) in partners.iter().enumerate() {
            let stored = claims_of(&app, partner_id).await;
            assert_eq!(stored.len(), usize::from(i != 2), "partner {i}");
        }
    }
);

on_both_databases!(
    one_bad_submission_among_concurrent_ones_fails_alone,
    |app: TestApp| async move {
        let mut partners = Vec::new();
        for seed in 1..=100 {
            partners.push(register(&app, partner(seed)).await.partner_id);
        }
        // Every tenth carries a NUL; all are sent at once, so they would share group commits.
        let calls = partners.iter().enumerate().map(|(i, partner_id)| {
            let uri = if i % 10 == 3 {
                NUL_URI
            } else {
                "gs://payouts-evidence/claims/ok.pdf"
            };
            let app = &app;
            async move {
                submit_with(app, partner_id, 100, vec![evidence(uri)])
                    .await
                    .map_err(|status| (i, status))
            }
        });
        let results = join_all(calls).await;
        let mut ok = 0;
        for (i, result) in results.into_iter().enumerate() {
            match result {
                Ok(claim) => {
                    assert_ne!(i % 10, 3, "claim {i} was taken with a NUL");
                    assert_eq!(claim.status(), pb::ClaimStatus::Approved);
                    ok += 1;
                }
                Err((i, status)) => {
                    assert_eq!(i % 10, 3, "claim {i} failed: {status:?}");
                    assert_eq!(bad_fields(&status), vec!["evidence[0].uri"]);
                }
            }
        }
        assert_eq!(ok, 90);
    }
);

on_both_databases!(
    dispatch_and_cancellation_reasons_are_one_line_of_at_most_2000_characters,
    |app: TestApp| async move {
        for reason in [
            "bank\u{0} incident".to_owned(),
            "bank incident\u{7}".to_owned(),
            "bank\u{85}incident".to_owned(),
            "\u{200B}\u{202E}".to_owned(),
            "x".repeat(300_000),
            "x".repeat(2_001),
        ] {
            let status = pause(&app, &reason).await.expect_err("bad reason");
            assert_eq!(bad_fields(&status), vec!["reason"], "{}", reason.len());
        }
        assert!(!dispatch_state(&app).await.paused, "nothing was paused");

        let claim = approved_claim(&app, 1, ACCOUNT, 100).await;
        let status = app
            .disbursements()
            .cancel_disbursement(pb::CancelDisbursementRequest {
                request_id: request_id(),
                disbursement_id: claim.disbursement_id.clone(),
                reason: "duplicate\u{0}".into(),
            })
            .await
            .expect_err("NUL in reason");
        assert_eq!(bad_fields(&status), vec!["reason"]);
        let d = get(&app, &claim.disbursement_id).await;
        assert_ne!(d.status(), pb::DisbursementStatus::Cancelled);

        let longest = "점검".repeat(1_000);
        let state = pause(&app, &longest).await.expect("2,000 characters");
        assert!(state.paused);
        assert_eq!(state.reason, longest);
    }
);

on_both_databases!(
    evidence_is_kept_only_on_https_s3_or_gs,
    |app: TestApp| async move {
        let claim = pending_claim(&app, 1).await;
        for uri in [
            "javascript:alert(1)",
            "javascript://host/%0Aalert(1)",
            "http://files.example.com/sales.pdf",
            "file:///etc/passwd",
            "s3://",
            "https://user:secret@files.example.com/sales.pdf",
            "s3://payouts-evidence/a\u{202E}fdp.exe",
            "s3://payouts-evidence/a\tb",
        ] {
            let status = attach(&app, &claim.claim_id, uri)
                .await
                .expect_err("refused URI");
            assert_eq!(bad_fields(&status), vec!["evidence.uri"], "{uri:?}");
        }
        assert_eq!(get_claim(&app, &claim.claim_id).await, claim);

        let accepted = [
            "https://files.example.com/claims/sales.pdf",
            "s3://payouts-evidence/claims/sales.pdf",
            "gs://payouts-evidence/claims/sales.pdf",
            "S3://payouts-evidence/claims/upper.pdf",
        ];
        for uri in accepted {
            attach(&app, &claim.claim_id, uri)
                .await
                .unwrap_or_else(|e| panic!("{uri}: {e:?}"));
        }
        let kept: Vec<String> = get_claim(&app, &claim.claim_id)
            .await
            .evidence
            .into_iter()
            .map(|e| e.uri)
            .collect();
        assert_eq!(kept, accepted);
    }
);

on_both_databases!(
    names_must_show_something_and_keep_their_direction,
    |app: TestApp| async move {
        let mut invisible = partner(1);
        invisible.legal_name = "\u{200B}\u{202E}".into();
        let status = app
            .partners()
            .register_partner(pb::RegisterPartnerRequest {
                request_id: request_id(),
                partner: Some(invisible),
            })
            .await
            .expect_err("invisible legal name");
        assert_eq!(bad_fields(&status), vec!["partner.legal_name"]);

        let mut fillers = partner(2);
        fillers.representative_name = "\u{3164}\u{FEFF}".into();
        fillers.bank_account.as_mut().expect("account").holder_name = "Kim\u{202E}Minji".into();
        let status = app
            .partners()
            .register_partner(pb::RegisterPartnerRequest {
                request_id: request_id(),
                partner: Some(fillers),
            })
            .await
            .expect_err("invisible representative, reversed holder");
        assert_eq!(
            bad_fields(&status),
            vec![
                "partner.representative_name",
                "partner.bank_account.holder_name"
            ]
        );
        let listed = app
            .partners()
            .list_partners(pb::ListPartnersRequest::default())
            .await
            .expect("list")
            .into_inner()
            .partners;
        assert!(listed.is_empty(), "{listed:?}");

        let mut korean = partner(3);
        korean.legal_name = "하늘베이커리".into();
        korean.representative_name = "김민지".into();
        korean.bank_account.as_mut().expect("account").holder_name = "하늘베이커리".into();
        let registered = register(&app, korean).await;
        assert_eq!(registered.legal_name, "하늘베이커리");
        assert_eq!(registered.representative_name, "김민지");

        let status = app
            .partners()
            .update_partner_bank_account(pb::UpdatePartnerBankAccountRequest {
                request_id: request_id(),
                partner_id: registered.partner_id.clone(),
                bank_account: Some(pb::BankAccount {
                    bank_code: "004".into(),
                    account_number: ACCOUNT.into(),
                    holder_name: "\u{2066}\u{2069}".into(),
                }),
                etag: registered.etag.clone(),
            })
            .await
            .expect_err("invisible holder");
        assert_eq!(bad_fields(&status), vec!["bank_account.holder_name"]);
    }
);

on_both_databases!(
    audit_filters_and_times_are_checked,
    |app: TestApp| async move {
        let list = |request: pb::ListAuditEventsRequest| {
            let mut client = audit(&app);
            async move { client.list_audit_events(request).await }
        };
        for t in out_of_range_times() {
            let status = list(pb::ListAuditEventsRequest {
                start_time: Some(t),
                ..Default::default()
            })
            .await
            .expect_err("bad start_time");
            assert_eq!(bad_fields(&status), vec!["start_time"], "{t:?}");
            let status = list(pb::ListAuditEventsRequest {
                end_time: Some(t),
                ..Default::default()
            })
            .await
            .expect_err("bad end_time");
            assert_eq!(bad_fields(&status), vec!["end_time"], "{t:?}");
        }
        let status = list(pb::ListAuditEventsRequest {
            principal: "claims-intake\u{0}".into(),
            resource_id: "r".repeat(201),
            ..Default::default()
        })
        .await
        .expect_err("bad filters");
        assert_eq!(bad_fields(&status), vec!["principal", "resource_id"]);

        // The first and the last instant a timestamp may hold are fine.
        register(&app, partner(1)).await;
        let events = list(pb::ListAuditEventsRequest {
            start_time: Some(ts(FIRST_SECOND, 0)),
            end_time: Some(ts(LAST_SECOND, 999_999_999)),
            ..Default::default()
        })
        .await
        .expect("whole range")
        .into_inner()
        .audit_events;
        assert!(
            events
                .iter()
                .any(|e| e.method.ends_with("/RegisterPartner") && e.outcome_code == "OK"),
            "{events:#?}"
        );
    }
);

async fn export(
    app: &TestApp,
    request: pb::ExportDisbursementsRequest,
) -> Result<Vec<pb::ExportedDisbursement>, tonic::Status> {
    let mut stream = app
        .disbursements()
        .export_disbursements(request)
        .await?
        .into_inner();
    let mut rows = Vec::new();
    while let Some(page) = stream.message().await? {
        rows.extend(page.disbursements);
    }
    Ok(rows)
}

on_both_databases!(
    export_times_must_be_protobuf_timestamps,
    |app: TestApp| async move {
        let claim = approved_claim(&app, 1, ACCOUNT, 100).await;
        for t in out_of_range_times() {
            let status = export(
                &app,
                pb::ExportDisbursementsRequest {
                    start_time: Some(t),
                    ..Default::default()
                },
            )
            .await
            .expect_err("bad start_time");
            assert_eq!(bad_fields(&status), vec!["start_time"], "{t:?}");
            let status = export(
                &app,
                pb::ExportDisbursementsRequest {
                    end_time: Some(t),
                    ..Default::default()
                },
            )
            .await
            .expect_err("bad end_time");
            assert_eq!(bad_fields(&status), vec!["end_time"], "{t:?}");
        }
        let rows = export(
            &app,
            pb::ExportDisbursementsRequest {
                start_time: Some(ts(FIRST_SECOND, 0)),
                end_time: Some(ts(LAST_SECOND, 999_999_999)),
                ..Default::default()
            },
        )
        .await
        .expect("whole range");
        let ids: Vec<&str> = rows.iter().map(|r| r.disbursement_id.as_str()).collect();
        assert_eq!(ids, [claim.disbursement_id.as_str()]);
    }
);

fn line(key: &str, status: pb::SettlementStatus, amount_krw: i64) -> pb::SettlementLine {
    pb::SettlementLine {
        idempotency_key: key.into(),
        amount_krw,
        status: status as i32,
        settled_time: None,
    }
}

fn now() -> prost_types::Timestamp {
    let micros = jiff::Timestamp::now().as_microsecond();
    ts(
        micros.div_euclid(1_000_000),
        i32::try_from(micros.rem_euclid(1_000_000) * 1_000).expect("nanos"),
    )
}

async fn reconcile(
    app: &TestApp,
    messages: Vec<pb::ReconcileSettlementsRequest>,
) -> Result<Vec<pb::ReconcileSettlementsResponse>, tonic::Status> {
    let mut stream = app
        .disbursements()
        .reconcile_settlements(tokio_stream::iter(messages))
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(message) = stream.message().await? {
        out.push(message);
    }
    Ok(out)
}

on_both_databases!(
    a_bad_settlement_line_or_time_refuses_the_report_and_changes_nothing,
    |app: TestApp| async move {
        use pb::SettlementStatus::{Returned, Settled};
        let claim = approved_claim(&app, 1, ACCOUNT, 100).await;
        let paid = wait_for(&app, &claim.disbursement_id, Paid).await;
        let key = paid.idempotency_key.clone();
        let returned = line(&key, Returned, paid.amount_krw);
        let header = |lines: Vec<pb::SettlementLine>, cutoff: prost_types::Timestamp| {
            pb::ReconcileSettlementsRequest {
                request_id: request_id(),
                cutoff_time: Some(cutoff),
                lines,
            }
        };

        // A NUL in a key: in the first message, and in a later one.
        let nul = line("k\u{0}1", Settled, 100);
        let status = reconcile(
            &app,
            vec![header(vec![returned.clone(), nul.clone()], now())],
        )
        .await
        .expect_err("NUL in the first message");
        assert_eq!(bad_fields(&status), vec!["lines[1].idempotency_key"]);
        let status = reconcile(
            &app,
            vec![
                header(vec![returned.clone()], now()),
                pb::ReconcileSettlementsRequest {
                    lines: vec![nul],
                    ..Default::default()
                },
            ],
        )
        .await
        .expect_err("NUL in a later message");
        assert_eq!(bad_fields(&status), vec!["lines[0].idempotency_key"]);

        let mut long_key = line(&"k".repeat(201), Settled, 100);
        long_key.settled_time = Some(ts(YEAR_10000, 0));
        let status = reconcile(&app, vec![header(vec![returned.clone(), long_key], now())])
            .await
            .expect_err("long key, settled in year 10000");
        assert_eq!(
            bad_fields(&status),
            vec!["lines[1].settled_time", "lines[1].idempotency_key"]
        );

        for t in out_of_range_times() {
            let status = reconcile(&app, vec![header(vec![returned.clone()], t)])
                .await
                .expect_err("bad cutoff_time");
            assert_eq!(bad_fields(&status), vec!["cutoff_time"], "{t:?}");
            let mut bad_time = returned.clone();
            bad_time.settled_time = Some(t);
            let status = reconcile(&app, vec![header(vec![bad_time], now())])
                .await
                .expect_err("bad settled_time");
            assert_eq!(bad_fields(&status), vec!["lines[0].settled_time"], "{t:?}");
        }
        let still = get(&app, &claim.disbursement_id).await;
        assert_eq!(still.status(), Paid, "no refused report reopened it");

        // The same return in a good report does reopen it.
        reconcile(&app, vec![header(vec![returned], now())])
            .await
            .expect("good report");
        assert_eq!(get(&app, &claim.disbursement_id).await.status(), Failed);
    }
);
