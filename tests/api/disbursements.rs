//! `DisbursementService` through the wire: paying an approved claim end to end through the
//! embedded sandbox bank, its failing test accounts, the programme summary, pause and cancel,
//! retry with a new instruction key, and listing.

use std::time::Duration;

use partner_payouts::proto::payouts::v1 as pb;
use tonic::Code;

use crate::helpers::*;
use crate::on_both_databases;

use pb::DisbursementStatus::{Cancelled, Failed, Paid, Queued, Submitted, Unspecified};

/// Sandbox accounts: closed, and held by somebody else.
const CLOSED_ACCOUNT: &str = "110-123-450000";
const FOREIGN_ACCOUNT: &str = "110-123-459999";

const VERIFY: &str = "VERIFY_ACCOUNT_HOLDER";
const SUBMIT: &str = "SUBMIT_INSTRUCTION";

async fn summary(app: &TestApp) -> pb::GetProgramSummaryResponse {
    app.disbursements()
        .get_program_summary(pb::GetProgramSummaryRequest {})
        .await
        .expect("program summary")
        .into_inner()
}

async fn list(
    app: &TestApp,
    request: pb::ListDisbursementsRequest,
) -> pb::ListDisbursementsResponse {
    app.disbursements()
        .list_disbursements(request)
        .await
        .expect("list disbursements")
        .into_inner()
}

async fn listed_ids(app: &TestApp, request: pb::ListDisbursementsRequest) -> Vec<String> {
    let response = list(app, request).await;
    assert_eq!(response.next_page_token, "");
    response
        .disbursements
        .into_iter()
        .map(|d| d.disbursement_id)
        .collect()
}

async fn retry(app: &TestApp, disbursement_id: &str) -> Result<pb::Disbursement, tonic::Status> {
    app.disbursements()
        .retry_disbursement(pb::RetryDisbursementRequest {
            request_id: request_id(),
            disbursement_id: disbursement_id.into(),
        })
        .await
        .map(|r| {
            r.into_inner()
                .disbursement
                .expect("disbursement in response")
        })
}

async fn cancel(
    app: &TestApp,
    disbursement_id: &str,
    why: &str,
) -> Result<pb::Disbursement, tonic::Status> {
    app.disbursements()
        .cancel_disbursement(pb::CancelDisbursementRequest {
            request_id: request_id(),
            disbursement_id: disbursement_id.into(),
            reason: why.into(),
        })
        .await
        .map(|r| {
            r.into_inner()
                .disbursement
                .expect("disbursement in response")
        })
}

fn operations(d: &pb::Disbursement) -> Vec<(String, String)> {
    d.attempts
        .iter()
        .map(|a| (a.operation.clone(), a.outcome.clone()))
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

fn transitions(d: &pb::Disbursement) -> Vec<(pb::DisbursementStatus, pb::DisbursementStatus)> {
    d.history
        .iter()
        .map(|h| (h.from_status(), h.to_status()))
        .collect()
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

on_both_databases!(
    an_approved_claim_is_paid_once_end_to_end,
    |app: TestApp| async move {
        let claim = approved_claim(&app, 1, ACCOUNT, 100).await;
        assert_eq!(claim.compensation_krw, 30_000);
        let id = claim.disbursement_id.clone();

        let paid = wait_for(&app, &id, Paid).await;
        assert_eq!(paid.disbursement_id, id);
        assert_eq!(paid.claim_id, claim.claim_id);
        assert_eq!(paid.partner_id, claim.partner_id);
        assert_eq!(paid.amount_krw, 30_000);
        assert_eq!(paid.failure_code, "");
        assert_eq!(paid.failure_message, "");
        assert_eq!(paid.idempotency_key, format!("{id}-0"));
        assert_eq!(
            operations(&paid),
            pairs(&[(VERIFY, "MATCH"), (SUBMIT, "PAID")])
        );
        assert_eq!(paid.attempts[0].idempotency_key, "");
        assert_eq!(paid.attempts[1].idempotency_key, paid.idempotency_key);
        assert!(paid.attempts.iter().all(|a| a.time.is_some()));
        assert_eq!(
            transitions(&paid),
            vec![
                (Unspecified, Queued),
                (Queued, Submitted),
                (Submitted, Paid)
            ]
        );
        assert_eq!(paid.history[0].actor, "local-dev");
        assert_eq!(paid.history[2].actor, "dispatcher");

        // Only the last 4 digits of the account ever leave the service.
        let digits: String = ACCOUNT.chars().filter(char::is_ascii_digit).collect();
        assert_eq!(
            paid.account_number,
            format!("****{}", &digits[digits.len() - 4..])
        );
        assert!(!paid.account_number.contains(&digits));
        assert!(!paid.account_number.contains(&digits[digits.len() - 5..]));
        assert!(!format!("{paid:?}").contains(&digits));
        assert_eq!(paid.bank_code, "004");
        assert_eq!(paid.holder_name, "Kim Minji");

        // Paid is final: a later look shows the same single instruction.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(get(&app, &id).await, paid);

        let status = app
            .disbursements()
            .get_disbursement(pb::GetDisbursementRequest {
                disbursement_id: uuid::Uuid::now_v7().to_string(),
            })
            .await
            .expect_err("unknown disbursement");
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        assert_eq!(reason(&status), "DISBURSEMENT_NOT_FOUND");
        let status = app
            .disbursements()
            .get_disbursement(pb::GetDisbursementRequest {
                disbursement_id: "d-1".into(),
            })
            .await
            .expect_err("malformed id");
        assert_eq!(bad_fields(&status), vec!["disbursement_id"]);
    }
);

on_both_databases!(
    test_accounts_fail_before_any_instruction_and_the_summary_adds_up,
    |app: TestApp| async move {
        let closed = approved_claim(&app, 1, CLOSED_ACCOUNT, 100).await;
        let foreign = approved_claim(&app, 2, FOREIGN_ACCOUNT, 300_000).await;
        let good = approved_claim(&app, 3, ACCOUNT, 400_000).await;
        assert_eq!(good.compensation_krw, 50_000);
        // Claims that are not approved have no disbursement and count apart.
        let pending = register(&app, partner(4)).await;
        submit(&app, &pending.partner_id, vec![full_weight_item(600_000)]).await;
        let rejected = register(&app, partner(5)).await;
        submit(&app, &rejected.partner_id, vec![full_weight_item(0)]).await;

        let closed = wait_for(&app, &closed.disbursement_id, Failed).await;
        assert_eq!(closed.failure_code, "ACCOUNT_CLOSED");
        assert_eq!(closed.amount_krw, 30_000);
        assert_eq!(operations(&closed), pairs(&[(VERIFY, "ACCOUNT_UNUSABLE")]));
        assert_eq!(closed.attempts[0].code, "ACCOUNT_CLOSED");
        assert_eq!(closed.idempotency_key, "", "no instruction key was made");
        assert_eq!(
            transitions(&closed),
            vec![(Unspecified, Queued), (Queued, Failed)]
        );
        assert_eq!(closed.account_number, "****0000");

        let foreign = wait_for(&app, &foreign.disbursement_id, Failed).await;
        assert_eq!(foreign.failure_code, "HOLDER_MISMATCH");
        assert_eq!(operations(&foreign), pairs(&[(VERIFY, "MISMATCH")]));
        assert_eq!(foreign.idempotency_key, "");
        assert_eq!(
            transitions(&foreign),
            vec![(Unspecified, Queued), (Queued, Failed)]
        );

        for d in [&closed, &foreign] {
            assert!(
                d.attempts.iter().all(|a| a.operation != SUBMIT),
                "nothing may be sent to a failing account: {d:?}"
            );
        }
        wait_for(&app, &good.disbursement_id, Paid).await;

        let s = summary(&app).await;
        assert_eq!(s.approved_count, 3);
        assert_eq!(s.approved_krw, 30_000 + 30_000 + 50_000);
        assert_eq!(s.paid_count, 1);
        assert_eq!(s.paid_krw, 50_000);
        assert_eq!(s.failed_count, 2);
        assert_eq!(s.failed_krw, 60_000);
        assert_eq!(s.in_flight_count, 0);
        assert_eq!(s.in_flight_krw, 0);
        assert_eq!(s.queued_count, 0);
        assert_eq!(s.submitted_count, 0);
        assert_eq!(s.cancelled_count, 0);
        assert_eq!(s.pending_review_count, 1);
        assert_eq!(s.rejected_count, 1);
        assert!(!s.dispatch.expect("dispatch state").paused);
    }
);

/// The figures of [`summed`] as the disbursements listed and the claims read give them
/// (nothing is `SUBMITTED` when they are read, so what is in flight is what is queued).
async fn counted(app: &TestApp, claims: &[&str]) -> [i64; 8] {
    let all = list(
        app,
        pb::ListDisbursementsRequest {
            page_size: 100,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(all.next_page_token, "");
    let of = |status: pb::DisbursementStatus| {
        all.disbursements
            .iter()
            .filter(|d| d.status() == status)
            .fold((0, 0), |(n, krw), d| (n + 1, krw + d.amount_krw))
    };
    let mut figures = [0; 8];
    figures[0] = all.disbursements.len() as i64;
    figures[1] = all.disbursements.iter().map(|d| d.amount_krw).sum();
    (figures[2], figures[3]) = of(Paid);
    (figures[4], figures[5]) = of(Queued);
    for claim_id in claims {
        match get_claim(app, claim_id).await.status() {
            pb::ClaimStatus::PendingReview => figures[6] += 1,
            pb::ClaimStatus::Rejected => figures[7] += 1,
            _ => {}
        }
    }
    figures
}

/// The summary's figures: approved and paid (count and KRW), queued, in flight (KRW),
/// pending review, rejected.
fn summed(s: &pb::GetProgramSummaryResponse) -> [i64; 8] {
    [
        s.approved_count,
        s.approved_krw,
        s.paid_count,
        s.paid_krw,
        s.queued_count,
        s.in_flight_krw,
        s.pending_review_count,
        s.rejected_count,
    ]
}

on_both_databases!(
    the_summary_follows_each_review_and_payout_as_the_rows_read,
    |app: TestApp| async move {
        set_paused(&app, true).await;
        let auto = approved_claim(&app, 1, ACCOUNT, 100).await;
        let mut pending = Vec::new();
        for seed in [2, 3] {
            let partner = register(&app, partner(seed)).await;
            pending.push(submit(&app, &partner.partner_id, vec![full_weight_item(600_000)]).await);
        }
        let partner = register(&app, partner(4)).await;
        let refused = submit(&app, &partner.partner_id, vec![full_weight_item(0)]).await;
        let claims = [
            auto.claim_id.as_str(),
            pending[0].claim_id.as_str(),
            pending[1].claim_id.as_str(),
            refused.claim_id.as_str(),
        ];
        let expected = [1, 30_000, 0, 0, 1, 30_000, 2, 1];
        assert_eq!(summed(&summary(&app).await), expected);
        assert_eq!(counted(&app, &claims).await, expected);

        for (claim, decision) in [
            (&pending[0], pb::ReviewDecision::Approve),
            (&pending[1], pb::ReviewDecision::Reject),
        ] {
            let approve = decision == pb::ReviewDecision::Approve;
            if approve {
                app.claims()
                    .attach_evidence(pb::AttachEvidenceRequest {
                        request_id: request_id(),
                        claim_id: claim.claim_id.clone(),
                        evidence: Some(sales_ledger()),
                    })
                    .await
                    .expect("attach evidence");
            }
            app.claims()
                .review_claim(pb::ReviewClaimRequest {
                    request_id: request_id(),
                    claim_id: claim.claim_id.clone(),
                    decision: decision as i32,
                    compensation_krw: if approve { 50_000 } else { 0 },
                    reason: "reviewed with the sales records".into(),
                })
                .await
                .expect("review");
        }
        let expected = [2, 80_000, 0, 0, 2, 80_000, 0, 2];
        assert_eq!(summed(&summary(&app).await), expected);
        assert_eq!(counted(&app, &claims).await, expected);

        set_paused(&app, false).await;
        let reviewed = get_claim(&app, &pending[0].claim_id).await;
        for id in [&auto.disbursement_id, &reviewed.disbursement_id] {
            wait_for(&app, id, Paid).await;
        }
        let expected = [2, 80_000, 2, 80_000, 0, 0, 0, 2];
        assert_eq!(summed(&summary(&app).await), expected);
        assert_eq!(counted(&app, &claims).await, expected);
    }
);

on_both_databases!(
    pause_holds_dispatch_back_and_a_queued_payout_can_be_cancelled,
    |app: TestApp| async move {
        for why in ["", "   "] {
            let status = app
                .disbursements()
                .pause_dispatch(pb::PauseDispatchRequest {
                    request_id: request_id(),
                    reason: why.into(),
                })
                .await
                .expect_err("pause without a reason");
            assert_eq!(bad_fields(&status), vec!["reason"]);
        }
        let state = app
            .disbursements()
            .pause_dispatch(pb::PauseDispatchRequest {
                request_id: request_id(),
                reason: "bank maintenance".into(),
            })
            .await
            .expect("pause")
            .into_inner()
            .state
            .expect("state");
        assert!(state.paused);
        assert_eq!(state.reason, "bank maintenance");
        assert_eq!(state.changed_by, "local-dev");
        assert!(state.change_time.is_some());

        let held = approved_claim(&app, 1, ACCOUNT, 100).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let queued = get(&app, &held.disbursement_id).await;
        assert_eq!(queued.status(), Queued);
        assert!(queued.attempts.is_empty(), "{:?}", queued.attempts);
        assert_eq!(queued.idempotency_key, "");
        let s = summary(&app).await;
        let dispatch = s.dispatch.expect("dispatch state");
        assert!(dispatch.paused);
        assert_eq!(dispatch.reason, "bank maintenance");
        assert_eq!(s.queued_count, 1);
        assert_eq!(s.in_flight_count, 1);
        assert_eq!(s.in_flight_krw, 30_000);
        assert_eq!(s.paid_count, 0);

        let status = cancel(&app, &held.disbursement_id, " ")
            .await
            .expect_err("cancel without a reason");
        assert_eq!(bad_fields(&status), vec!["reason"]);
        let cancelled = cancel(
            &app,
            &held.disbursement_id,
            "partner asked to be paid by cheque",
        )
        .await
        .expect("cancel");
        assert_eq!(cancelled.status(), Cancelled);
        assert_eq!(
            transitions(&cancelled),
            vec![(Unspecified, Queued), (Queued, Cancelled)]
        );
        let last = cancelled.history.last().expect("history");
        assert_eq!(last.actor, "local-dev");
        assert_eq!(last.reason, "partner asked to be paid by cheque");
        let status = cancel(&app, &held.disbursement_id, "again")
            .await
            .expect_err("cancel twice");
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert_eq!(reason(&status), "DISBURSEMENT_NOT_CANCELLABLE");

        let state = app
            .disbursements()
            .resume_dispatch(pb::ResumeDispatchRequest {
                request_id: request_id(),
            })
            .await
            .expect("resume")
            .into_inner()
            .state
            .expect("state");
        assert!(!state.paused);

        let paid_claim = approved_claim(&app, 2, ACCOUNT, 100).await;
        let paid = wait_for(&app, &paid_claim.disbursement_id, Paid).await;
        assert_eq!(paid.amount_krw, 30_000);
        let still = get(&app, &held.disbursement_id).await;
        assert_eq!(still, cancelled, "a cancelled payout is never sent");

        let status = cancel(&app, &paid.disbursement_id, "too late")
            .await
            .expect_err("cancel a paid one");
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert_eq!(reason(&status), "DISBURSEMENT_NOT_CANCELLABLE");
        assert_eq!(get(&app, &paid.disbursement_id).await.status(), Paid);

        let s = summary(&app).await;
        assert_eq!(s.approved_count, 2);
        assert_eq!(s.approved_krw, 60_000);
        assert_eq!(s.cancelled_count, 1);
        assert_eq!(s.cancelled_krw, 30_000);
        assert_eq!(s.paid_count, 1);
        assert_eq!(s.paid_krw, 30_000);
        assert_eq!(s.in_flight_count, 0);
        assert!(!s.dispatch.expect("dispatch state").paused);
    }
);

on_both_databases!(
    retry_pays_a_failed_payout_under_a_new_key,
    |app: TestApp| async move {
        let good = approved_claim(&app, 1, ACCOUNT, 100).await;
        let paid = wait_for(&app, &good.disbursement_id, Paid).await;
        let status = retry(&app, &paid.disbursement_id)
            .await
            .expect_err("retry a paid one");
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert_eq!(reason(&status), "DISBURSEMENT_NOT_FAILED");
        assert_eq!(get(&app, &paid.disbursement_id).await, paid);

        let claim = approved_claim(&app, 2, CLOSED_ACCOUNT, 100).await;
        let id = claim.disbursement_id.clone();
        let failed = wait_for(&app, &id, Failed).await;
        assert_eq!(failed.failure_code, "ACCOUNT_CLOSED");
        let mut keys_before: Vec<String> = failed
            .attempts
            .iter()
            .map(|a| a.idempotency_key.clone())
            .collect();
        keys_before.push(failed.idempotency_key.clone());
        keys_before.push(format!("{id}-0"));

        let partner = app
            .partners()
            .get_partner(pb::GetPartnerRequest {
                partner_id: claim.partner_id.clone(),
            })
            .await
            .expect("get partner")
            .into_inner()
            .partner
            .expect("partner");
        let updated = app
            .partners()
            .update_partner_bank_account(pb::UpdatePartnerBankAccountRequest {
                request_id: request_id(),
                partner_id: partner.partner_id.clone(),
                bank_account: Some(pb::BankAccount {
                    bank_code: "004".into(),
                    account_number: "110-123-451234".into(),
                    holder_name: "Kim Minji".into(),
                }),
                etag: partner.etag.clone(),
            })
            .await
            .expect("update account")
            .into_inner()
            .partner
            .expect("partner");
        assert_eq!(
            updated.bank_account.expect("account").account_number,
            "****1234"
        );

        let requeued = retry(&app, &id).await.expect("retry");
        assert_eq!(requeued.disbursement_id, id);
        assert_ne!(requeued.status(), Failed);
        assert_eq!(requeued.failure_code, "");
        let paid = wait_for(&app, &id, Paid).await;
        assert_eq!(paid.amount_krw, 30_000);
        assert_eq!(paid.failure_code, "");
        assert_eq!(paid.account_number, "****1234");
        assert_eq!(paid.idempotency_key, format!("{id}-1"));
        assert!(
            !keys_before.contains(&paid.idempotency_key),
            "{} was used before: {keys_before:?}",
            paid.idempotency_key
        );
        assert_eq!(
            operations(&paid),
            pairs(&[
                (VERIFY, "ACCOUNT_UNUSABLE"),
                (VERIFY, "MATCH"),
                (SUBMIT, "PAID"),
            ])
        );
        assert_eq!(paid.attempts[2].idempotency_key, paid.idempotency_key);
        assert_eq!(
            transitions(&paid),
            vec![
                (Unspecified, Queued),
                (Queued, Failed),
                (Failed, Queued),
                (Queued, Submitted),
                (Submitted, Paid),
            ]
        );
        assert_eq!(paid.history[2].actor, "local-dev");
        crate::events::feed_tells_the_history_of(&app, &paid).await;

        let status = retry(&app, &id).await.expect_err("retry once paid");
        assert_eq!(reason(&status), "DISBURSEMENT_NOT_FAILED");

        let s = summary(&app).await;
        assert_eq!(s.paid_count, 2);
        assert_eq!(s.paid_krw, 60_000);
        assert_eq!(s.failed_count, 0);
    }
);

on_both_databases!(
    list_disbursements_filters_by_status_and_partner,
    |app: TestApp| async move {
        let good = approved_claim(&app, 1, ACCOUNT, 100).await;
        let closed = approved_claim(&app, 2, CLOSED_ACCOUNT, 100).await;
        let foreign = approved_claim(&app, 3, FOREIGN_ACCOUNT, 100).await;
        wait_for(&app, &good.disbursement_id, Paid).await;
        wait_for(&app, &closed.disbursement_id, Failed).await;
        wait_for(&app, &foreign.disbursement_id, Failed).await;

        let filter =
            |status: pb::DisbursementStatus, partner_id: &str| pb::ListDisbursementsRequest {
                status: status as i32,
                partner_id: partner_id.into(),
                ..Default::default()
            };
        let all = sorted(vec![
            good.disbursement_id.clone(),
            closed.disbursement_id.clone(),
            foreign.disbursement_id.clone(),
        ]);
        let cases = [
            (Unspecified, "", all.clone()),
            (
                Failed,
                "",
                sorted(vec![
                    closed.disbursement_id.clone(),
                    foreign.disbursement_id.clone(),
                ]),
            ),
            (Paid, "", vec![good.disbursement_id.clone()]),
            (Queued, "", vec![]),
            (Cancelled, "", vec![]),
            (
                Unspecified,
                closed.partner_id.as_str(),
                vec![closed.disbursement_id.clone()],
            ),
            (
                Failed,
                foreign.partner_id.as_str(),
                vec![foreign.disbursement_id.clone()],
            ),
            (Paid, closed.partner_id.as_str(), vec![]),
        ];
        for (status, partner_id, expected) in cases {
            assert_eq!(
                listed_ids(&app, filter(status, partner_id)).await,
                expected,
                "{status:?} {partner_id}"
            );
        }
        let one = list(&app, filter(Unspecified, &good.partner_id)).await;
        assert_eq!(
            one.disbursements,
            vec![get(&app, &good.disbursement_id).await]
        );

        let first = list(
            &app,
            pb::ListDisbursementsRequest {
                page_size: 2,
                ..Default::default()
            },
        )
        .await;
        assert_eq!(first.disbursements.len(), 2);
        assert!(!first.next_page_token.is_empty());
        let second = list(
            &app,
            pb::ListDisbursementsRequest {
                page_size: 2,
                page_token: first.next_page_token.clone(),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(second.next_page_token, "");
        let paged: Vec<String> = first
            .disbursements
            .iter()
            .chain(&second.disbursements)
            .map(|d| d.disbursement_id.clone())
            .collect();
        assert_eq!(paged, all);

        let status = app
            .disbursements()
            .list_disbursements(pb::ListDisbursementsRequest {
                page_token: "garbage".into(),
                partner_id: "nobody".into(),
                status: 17,
                ..Default::default()
            })
            .await
            .expect_err("bad list request");
        assert_eq!(
            bad_fields(&status),
            vec!["page_token", "status", "partner_id"]
        );
    }
);

on_both_databases!(
    a_paid_payout_keeps_the_account_it_was_paid_to,
    |app: TestApp| async move {
        let claim = approved_claim(&app, 1, ACCOUNT, 100).await;
        let paid = wait_for(&app, &claim.disbursement_id, Paid).await;
        assert_eq!(paid.account_number, "****6789");

        // The partner moves to another account after being paid.
        let partner = app
            .partners()
            .get_partner(pb::GetPartnerRequest {
                partner_id: claim.partner_id.clone(),
            })
            .await
            .expect("get partner")
            .into_inner()
            .partner
            .expect("partner");
        app.partners()
            .update_partner_bank_account(pb::UpdatePartnerBankAccountRequest {
                request_id: request_id(),
                partner_id: partner.partner_id.clone(),
                bank_account: Some(pb::BankAccount {
                    bank_code: "088".into(),
                    account_number: "110-123-451234".into(),
                    holder_name: "Haneul Bakery 1".into(),
                }),
                etag: partner.etag.clone(),
            })
            .await
            .expect("update account");

        // The record of a payout that was made says where the money went: the account the
        // instruction was sent to, not whatever the partner holds today.
        let after = get(&app, &claim.disbursement_id).await;
        assert_eq!(after.status(), Paid);
        assert_eq!(after.account_number, "****6789", "{after:?}");
        assert_eq!(after.bank_code, "004");
        assert_eq!(after.holder_name, "Kim Minji");
        assert_eq!(after, paid);
    }
);

on_both_databases!(
    each_payout_is_made_out_to_its_own_partners_account_as_it_stands_at_filing,
    |app: TestApp| async move {
        set_paused(&app, true).await;
        let banks = ["004", "088", "020", "011"];
        let mut partners = Vec::new();
        for seed in 0..8u64 {
            let mut partner =
                partner_with_account(700 + seed, &format!("110-123-45{}", 1000 + seed));
            partner.bank_account.as_mut().expect("account").bank_code =
                banks[usize::try_from(seed).expect("seed") % banks.len()].into();
            partners.push(register(&app, partner).await);
        }
        // One partner moves to another bank before filing: its payout goes there.
        let moved = app
            .partners()
            .update_partner_bank_account(pb::UpdatePartnerBankAccountRequest {
                request_id: request_id(),
                partner_id: partners[0].partner_id.clone(),
                bank_account: Some(pb::BankAccount {
                    bank_code: "088".into(),
                    account_number: "110-123-452468".into(),
                    holder_name: "Kim Minji".into(),
                }),
                etag: partners[0].etag.clone(),
            })
            .await
            .expect("update account")
            .into_inner()
            .partner
            .expect("partner");
        partners[0] = moved;
        // Filed together, so that they are written together.
        let claims = futures::future::join_all(
            partners
                .iter()
                .map(|p| submit(&app, &p.partner_id, vec![full_weight_item(100)])),
        )
        .await;
        for (partner, claim) in partners.iter().zip(&claims) {
            assert_eq!(claim.status(), pb::ClaimStatus::Approved, "{claim:?}");
            let payout = get(&app, &claim.disbursement_id).await;
            let account = partner.bank_account.clone().expect("account");
            assert_eq!(
                (
                    payout.partner_id.as_str(),
                    payout.claim_id.as_str(),
                    payout.amount_krw,
                    payout.status(),
                ),
                (
                    partner.partner_id.as_str(),
                    claim.claim_id.as_str(),
                    30_000,
                    Queued
                )
            );
            assert_eq!(
                (payout.bank_code, payout.account_number, payout.holder_name),
                (
                    account.bank_code,
                    account.account_number,
                    account.holder_name
                ),
                "the payout of {}",
                partner.partner_id
            );
        }
        assert_eq!(
            get(&app, &claims[0].disbursement_id).await.account_number,
            "****2468"
        );
    }
);
