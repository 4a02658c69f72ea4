//! Finance through the wire: `ExportDisbursements` (every field the finance team books from,
//! account numbers masked, filters, paging) and `ReconcileSettlements` (each kind of mismatch
//! in a planted settlement report, a returned payout reopened once and paid again under a new
//! key, reports refused before anything changes).

use std::time::Duration;

use futures::StreamExt as _;
use partner_payouts::proto::payouts::v1 as pb;
use tonic::Code;

use crate::helpers::*;
use crate::on_both_databases;

use pb::DisbursementStatus::{Cancelled, Failed, Paid, Queued, Submitted};
use pb::MismatchKind::{AmountDiffers, PaidHereNotThere, PaidThereNotHere, Returned};
use pb::reconcile_settlements_response::Item;

/// Sandbox account that is closed: its payout fails before any instruction is made.
const CLOSED_ACCOUNT: &str = "110-123-450000";

pub(crate) async fn paid(app: &TestApp, seed: u64, loss_krw: i64) -> pb::Disbursement {
    let claim = approved_claim(app, seed, ACCOUNT, loss_krw).await;
    wait_for(app, &claim.disbursement_id, Paid).await
}

async fn export(
    app: &TestApp,
    request: pb::ExportDisbursementsRequest,
) -> Result<Vec<pb::ExportDisbursementsResponse>, tonic::Status> {
    let mut stream = app
        .disbursements()
        .export_disbursements(request)
        .await?
        .into_inner();
    let mut pages = Vec::new();
    while let Some(page) = stream.message().await? {
        pages.push(page);
    }
    Ok(pages)
}

async fn exported(
    app: &TestApp,
    request: pb::ExportDisbursementsRequest,
) -> Vec<pb::ExportedDisbursement> {
    export(app, request)
        .await
        .expect("export")
        .into_iter()
        .flat_map(|p| p.disbursements)
        .collect()
}

fn by_status(status: pb::DisbursementStatus) -> pb::ExportDisbursementsRequest {
    pb::ExportDisbursementsRequest {
        status: status as i32,
        ..Default::default()
    }
}

fn ids(rows: &[pb::ExportedDisbursement]) -> Vec<String> {
    rows.iter().map(|r| r.disbursement_id.clone()).collect()
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

fn micros(t: &prost_types::Timestamp) -> i64 {
    t.seconds * 1_000_000 + i64::from(t.nanos) / 1_000
}

pub(crate) fn timestamp(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1_000).expect("nanos"),
    }
}

pub(crate) fn now() -> prost_types::Timestamp {
    timestamp(jiff::Timestamp::now().as_microsecond())
}

/// The digits of the test account no response may show: all but the last 4.
fn hidden_digits() -> Vec<String> {
    let digits: String = ACCOUNT.chars().filter(char::is_ascii_digit).collect();
    vec![digits.clone(), digits[digits.len() - 5..].to_owned()]
}

fn assert_no_account_number(what: &str) {
    for needle in hidden_digits() {
        assert!(!what.contains(&needle), "{needle} shown in {what}");
    }
}

on_both_databases!(
    export_streams_what_finance_books_with_masked_accounts,
    |app: TestApp| async move {
        let first = approved_claim(&app, 1, ACCOUNT, 100).await;
        let second = approved_claim(&app, 2, ACCOUNT, 400_000).await;
        let closed = approved_claim(&app, 3, CLOSED_ACCOUNT, 100).await;
        let first_paid = wait_for(&app, &first.disbursement_id, Paid).await;
        wait_for(&app, &second.disbursement_id, Paid).await;
        let failed = wait_for(&app, &closed.disbursement_id, Failed).await;

        let all = exported(&app, pb::ExportDisbursementsRequest::default()).await;
        assert_eq!(
            ids(&all),
            sorted(vec![
                first.disbursement_id.clone(),
                second.disbursement_id.clone(),
                closed.disbursement_id.clone(),
            ])
        );
        let row = all
            .iter()
            .find(|r| r.disbursement_id == first.disbursement_id)
            .expect("first row");
        let became_paid = first_paid
            .history
            .iter()
            .find(|h| h.to_status() == Paid)
            .and_then(|h| h.time)
            .expect("PAID in the history");
        assert_eq!(
            row,
            &pb::ExportedDisbursement {
                disbursement_id: first.disbursement_id.clone(),
                claim_id: first.claim_id.clone(),
                partner_id: first.partner_id.clone(),
                business_registration_number: brn(1),
                legal_name: "Haneul Bakery 1".into(),
                representative_name: "Kim Minji".into(),
                amount_krw: 30_000,
                status: Paid as i32,
                bank_code: "004".into(),
                account_number: "****6789".into(),
                holder_name: "Kim Minji".into(),
                idempotency_key: format!("{}-0", first.disbursement_id),
                paid_time: Some(became_paid),
                policy_version: first.policy_version.clone(),
                failure_code: String::new(),
                create_time: first_paid.create_time,
                update_time: first_paid.update_time,
            }
        );
        assert!(!row.policy_version.is_empty());
        let failed_row = all
            .iter()
            .find(|r| r.disbursement_id == closed.disbursement_id)
            .expect("failed row");
        assert_eq!(failed_row.status(), Failed);
        assert_eq!(failed_row.failure_code, "ACCOUNT_CLOSED");
        assert_eq!(failed_row.paid_time, None);
        assert_eq!(failed_row.idempotency_key, "");
        assert_eq!(failed_row.account_number, "****0000");
        assert_eq!(failed_row.update_time, failed.update_time);
        // Not in a field, not in a debug print, not in the bytes on the wire.
        assert_no_account_number(&format!("{all:?}"));
        let pages = export(&app, pb::ExportDisbursementsRequest::default())
            .await
            .expect("export");
        for page in &pages {
            assert_no_account_number(&String::from_utf8_lossy(&prost::Message::encode_to_vec(
                page,
            )));
        }

        let mut paid_ids = vec![
            first.disbursement_id.clone(),
            second.disbursement_id.clone(),
        ];
        paid_ids.sort();
        assert_eq!(ids(&exported(&app, by_status(Paid)).await), paid_ids);
        assert_eq!(
            ids(&exported(&app, by_status(Failed)).await),
            vec![closed.disbursement_id.clone()]
        );
        for status in [Queued, Submitted, Cancelled] {
            let none = export(&app, by_status(status)).await.expect("export");
            assert!(none.is_empty(), "{status:?}: {none:?}");
        }

        // The window is on the time of the last status change: for PAID, when it was paid.
        let paid_rows = exported(&app, by_status(Paid)).await;
        let paid_at: Vec<i64> = paid_rows
            .iter()
            .map(|r| micros(r.paid_time.as_ref().expect("paid_time")))
            .collect();
        for (r, t) in paid_rows.iter().zip(&paid_at) {
            assert_eq!(r.update_time.as_ref().map(micros), Some(*t), "{r:?}");
        }
        let first_at = micros(&became_paid);
        let (earliest, latest) = (paid_at[0].min(paid_at[1]), paid_at[0].max(paid_at[1]));
        let window = |start: Option<i64>, end: Option<i64>| pb::ExportDisbursementsRequest {
            status: Paid as i32,
            start_time: start.map(timestamp),
            end_time: end.map(timestamp),
        };
        assert!(
            ids(&exported(&app, window(Some(first_at), Some(first_at + 1))).await)
                .contains(&first.disbursement_id)
        );
        assert!(
            exported(&app, window(None, Some(earliest)))
                .await
                .is_empty(),
            "end_time is exclusive"
        );
        assert!(
            exported(&app, window(Some(latest + 1), None))
                .await
                .is_empty()
        );
        assert_eq!(
            ids(&exported(&app, window(Some(earliest), Some(latest + 1))).await),
            paid_ids
        );
        let paid_at = first_at;

        let status = export(
            &app,
            pb::ExportDisbursementsRequest {
                status: 17,
                start_time: Some(timestamp(paid_at)),
                end_time: Some(timestamp(paid_at)),
            },
        )
        .await
        .expect_err("bad export request");
        assert_eq!(bad_fields(&status), vec!["status", "end_time"]);
    }
);

on_both_databases!(
    export_and_reconciliation_page_through_more_than_one_store_page,
    |app: TestApp| async move {
        // Held QUEUED, so that nothing moves (or changes update_time) while the export runs.
        app.disbursements()
            .pause_dispatch(pb::PauseDispatchRequest {
                request_id: request_id(),
                reason: "export test".into(),
            })
            .await
            .expect("pause");
        let made: Vec<String> = futures::stream::iter(0..501u64)
            .map(|seed| {
                let app = &app;
                async move {
                    approved_claim(app, 1000 + seed, ACCOUNT, 100)
                        .await
                        .disbursement_id
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        let pages = export(&app, pb::ExportDisbursementsRequest::default())
            .await
            .expect("export");
        let sizes: Vec<usize> = pages.iter().map(|p| p.disbursements.len()).collect();
        assert_eq!(sizes, vec![500, 1]);
        let rows: Vec<_> = pages.into_iter().flat_map(|p| p.disbursements).collect();
        assert_eq!(ids(&rows), sorted(made), "each once, in id order");
        assert!(rows.iter().all(|r| r.status() == Queued));

        // Reconciliation pages too: 1,100 lines the backend alone knows, and 501 payouts the
        // report lacks.
        app.disbursements()
            .resume_dispatch(pb::ResumeDispatchRequest {
                request_id: request_id(),
            })
            .await
            .expect("resume");
        eventually(60, || async {
            let s = app
                .disbursements()
                .get_program_summary(pb::GetProgramSummaryRequest {})
                .await
                .expect("summary")
                .into_inner();
            (s.paid_count == 501).then_some(())
        })
        .await;
        let lines: Vec<_> = (0..1100)
            .map(|i| {
                line(
                    &format!("theirs-{i:04}"),
                    1_000,
                    pb::SettlementStatus::Settled,
                )
            })
            .collect();
        let run = reconcile(&app, report(&request_id(), now(), &lines, 700))
            .await
            .expect("reconcile");
        assert_eq!(
            run.summary,
            pb::ReconciliationSummary {
                line_count: 1100,
                matched_count: 0,
                mismatch_count: 1601,
                reopened_count: 0,
            }
        );
        let count =
            |kind: pb::MismatchKind| run.mismatches.iter().filter(|m| m.kind() == kind).count();
        assert_eq!(count(PaidThereNotHere), 1100);
        assert_eq!(count(PaidHereNotThere), 501);
        let mut missing: Vec<String> = run
            .mismatches
            .iter()
            .filter(|m| m.kind() == PaidHereNotThere)
            .map(|m| m.disbursement_id.clone())
            .collect();
        missing.sort();
        missing.dedup();
        assert_eq!(missing, ids(&rows));
    }
);

pub(crate) fn line(key: &str, amount_krw: i64, status: pb::SettlementStatus) -> pb::SettlementLine {
    pb::SettlementLine {
        idempotency_key: key.into(),
        amount_krw,
        status: status as i32,
        settled_time: Some(now()),
    }
}

/// A report sent as a header message with the first `split` lines, then one message with the
/// rest.
pub(crate) fn report(
    request_id: &str,
    cutoff_time: prost_types::Timestamp,
    lines: &[pb::SettlementLine],
    split: usize,
) -> Vec<pb::ReconcileSettlementsRequest> {
    let (head, tail) = lines.split_at(split.min(lines.len()));
    let mut messages = vec![pb::ReconcileSettlementsRequest {
        request_id: request_id.into(),
        cutoff_time: Some(cutoff_time),
        lines: head.to_vec(),
    }];
    if !tail.is_empty() {
        messages.push(pb::ReconcileSettlementsRequest {
            lines: tail.to_vec(),
            ..Default::default()
        });
    }
    messages
}

pub(crate) struct Reconciled {
    pub(crate) mismatches: Vec<pb::SettlementMismatch>,
    pub(crate) summary: pb::ReconciliationSummary,
}

impl Reconciled {
    pub(crate) fn of(&self, key: &str) -> Vec<&pb::SettlementMismatch> {
        self.mismatches
            .iter()
            .filter(|m| m.idempotency_key == key)
            .collect()
    }

    pub(crate) fn one(&self, key: &str) -> &pb::SettlementMismatch {
        let found = self.of(key);
        assert_eq!(found.len(), 1, "{key}: {:#?}", self.mismatches);
        found[0]
    }
}

pub(crate) async fn reconcile(
    app: &TestApp,
    messages: Vec<pb::ReconcileSettlementsRequest>,
) -> Result<Reconciled, tonic::Status> {
    let mut stream = app
        .disbursements()
        .reconcile_settlements(tokio_stream::iter(messages))
        .await?
        .into_inner();
    let mut mismatches = Vec::new();
    let mut summary = None;
    while let Some(message) = stream.message().await? {
        assert!(summary.is_none(), "the summary comes last");
        match message.item.expect("an item") {
            Item::Mismatch(m) => mismatches.push(m),
            Item::Summary(s) => summary = Some(s),
        }
    }
    Ok(Reconciled {
        mismatches,
        summary: summary.expect("a summary"),
    })
}

fn transitions(d: &pb::Disbursement) -> Vec<(pb::DisbursementStatus, pb::DisbursementStatus)> {
    d.history
        .iter()
        .map(|h| (h.from_status(), h.to_status()))
        .collect()
}

fn returns(d: &pb::Disbursement) -> usize {
    transitions(d)
        .iter()
        .filter(|t| **t == (Paid, Failed))
        .count()
}

on_both_databases!(
    reconciliation_reports_each_mismatch_and_reopens_a_return_once,
    |app: TestApp| async move {
        let matched = paid(&app, 1, 100).await;
        let missing = paid(&app, 2, 100).await;
        let differs = paid(&app, 3, 100).await;
        let returned = paid(&app, 4, 400_000).await;
        let closed = approved_claim(&app, 5, CLOSED_ACCOUNT, 100).await;
        let closed = wait_for(&app, &closed.disbursement_id, Failed).await;
        // Paid here only after the cut-off: not expected in the report.
        let cutoff = now();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let late = paid(&app, 6, 100).await;

        let unknown_key = "backend-only-7f3a";
        let lines = vec![
            line(
                &matched.idempotency_key,
                30_000,
                pb::SettlementStatus::Settled,
            ),
            line(
                &differs.idempotency_key,
                31_000,
                pb::SettlementStatus::Settled,
            ),
            line(
                &returned.idempotency_key,
                50_000,
                pb::SettlementStatus::Returned,
            ),
            line(unknown_key, 10_000, pb::SettlementStatus::Settled),
            // Settled there although it failed here (before any instruction, even).
            line(
                &format!("{}-0", closed.disbursement_id),
                30_000,
                pb::SettlementStatus::Settled,
            ),
        ];
        let first_run = request_id();
        let run = reconcile(&app, report(&first_run, cutoff, &lines, 2))
            .await
            .expect("reconcile");
        assert_eq!(
            run.summary,
            pb::ReconciliationSummary {
                line_count: 5,
                matched_count: 1,
                mismatch_count: 5,
                reopened_count: 1,
            }
        );
        assert_eq!(run.mismatches.len(), 5, "{:#?}", run.mismatches);
        assert!(run.of(&matched.idempotency_key).is_empty());
        assert!(
            run.of(&late.idempotency_key).is_empty(),
            "paid after the cut-off"
        );

        let m = run.one(&missing.idempotency_key);
        assert_eq!(m.kind(), PaidHereNotThere);
        assert_eq!(m.disbursement_id, missing.disbursement_id);
        assert_eq!((m.our_amount_krw, m.their_amount_krw), (30_000, 0));
        assert_eq!(m.status(), Paid);

        let m = run.one(&differs.idempotency_key);
        assert_eq!(m.kind(), AmountDiffers);
        assert_eq!(m.disbursement_id, differs.disbursement_id);
        assert_eq!((m.our_amount_krw, m.their_amount_krw), (30_000, 31_000));
        assert!(!m.reopened);

        let m = run.one(unknown_key);
        assert_eq!(m.kind(), PaidThereNotHere);
        assert_eq!(m.disbursement_id, "");
        assert_eq!((m.our_amount_krw, m.their_amount_krw), (0, 10_000));

        let m = run.one(&format!("{}-0", closed.disbursement_id));
        assert_eq!(m.kind(), PaidThereNotHere);
        assert_eq!(
            m.disbursement_id, "",
            "no instruction was ever made under it"
        );

        let m = run.one(&returned.idempotency_key);
        assert_eq!(m.kind(), Returned);
        assert_eq!(m.disbursement_id, returned.disbursement_id);
        assert_eq!((m.our_amount_krw, m.their_amount_krw), (50_000, 50_000));
        assert!(m.reopened);
        assert_eq!(m.status(), Failed);
        assert!(!m.detail.is_empty());
        assert_no_account_number(&format!("{:?}", run.mismatches));

        // The return reopened the payout, in its history, as the caller, naming the report.
        let reopened = get(&app, &returned.disbursement_id).await;
        assert_eq!(reopened.status(), Failed);
        assert_eq!(reopened.failure_code, "RETURNED");
        assert_eq!(returns(&reopened), 1);
        let last = reopened.history.last().expect("history");
        assert_eq!((last.from_status(), last.to_status()), (Paid, Failed));
        assert_eq!(last.actor, "local-dev");
        assert!(last.reason.contains(&first_run), "{last:?}");
        crate::events::feed_tells_the_history_of(&app, &reopened).await;
        for other in [&matched, &missing, &differs, &late] {
            assert_eq!(&get(&app, &other.disbursement_id).await, other);
        }
        assert_eq!(get(&app, &closed.disbursement_id).await, closed);

        // The same report again: nothing changes, the return shows as already reopened.
        let again = reconcile(&app, report(&request_id(), cutoff, &lines, 5))
            .await
            .expect("reconcile again");
        assert_eq!(again.summary.reopened_count, 0);
        assert_eq!(again.summary.mismatch_count, 5);
        let m = again.one(&returned.idempotency_key);
        assert_eq!(m.kind(), Returned);
        assert!(!m.reopened);
        assert!(m.detail.contains("already reopened"), "{m:?}");
        assert_eq!(get(&app, &returned.disbursement_id).await, reopened);

        // Retrying pays it again under a new key.
        let requeued = app
            .disbursements()
            .retry_disbursement(pb::RetryDisbursementRequest {
                request_id: request_id(),
                disbursement_id: returned.disbursement_id.clone(),
            })
            .await
            .expect("retry")
            .into_inner()
            .disbursement
            .expect("disbursement");
        assert_eq!(requeued.failure_code, "");
        let repaid = wait_for(&app, &returned.disbursement_id, Paid).await;
        assert_eq!(
            repaid.idempotency_key,
            format!("{}-1", returned.disbursement_id)
        );
        assert_ne!(repaid.idempotency_key, returned.idempotency_key);
        assert_eq!(
            transitions(&repaid)[2..],
            [
                (Submitted, Paid),
                (Paid, Failed),
                (Failed, Queued),
                (Queued, Submitted),
                (Submitted, Paid)
            ]
        );

        // The first run's request id again, with its report: the returned key is now an
        // earlier one of a payout paid again (after the cut-off), so nothing is reopened.
        let third = reconcile(&app, report(&first_run, cutoff, &lines, 1))
            .await
            .expect("the same request id with the same report runs again");
        assert_eq!(third.summary.reopened_count, 0);
        let m = third.one(&returned.idempotency_key);
        assert_eq!(m.kind(), Returned);
        assert!(!m.reopened);
        assert!(m.detail.contains("already reopened"), "{m:?}");
        assert!(
            third.of(&repaid.idempotency_key).is_empty(),
            "{third:?}",
            third = third.mismatches
        );
        let after = get(&app, &returned.disbursement_id).await;
        assert_eq!(after, repaid);
        assert_eq!(returns(&after), 1);

        // The export shows the payout as paid again, under its new key.
        let row = exported(&app, by_status(Paid))
            .await
            .into_iter()
            .find(|r| r.disbursement_id == returned.disbursement_id)
            .expect("repaid row");
        assert_eq!(row.idempotency_key, repaid.idempotency_key);
        assert_eq!(row.failure_code, "");
        let s = app
            .disbursements()
            .get_program_summary(pb::GetProgramSummaryRequest {})
            .await
            .expect("summary")
            .into_inner();
        assert_eq!(s.paid_count, 5);
        assert_eq!(s.failed_count, 1);
    }
);

on_both_databases!(
    a_bad_report_is_refused_before_anything_changes,
    |app: TestApp| async move {
        let kept = paid(&app, 1, 100).await;
        let returned = |key: &str| line(key, 30_000, pb::SettlementStatus::Returned);

        // The header: request id and cut-off, in the first message.
        let status = reconcile(&app, vec![])
            .await
            .err()
            .expect("an empty stream");
        assert_eq!(bad_fields(&status), vec!["request_id", "cutoff_time"]);
        let mut no_cutoff = report(&request_id(), now(), &[], 0);
        no_cutoff[0].cutoff_time = None;
        let status = reconcile(&app, no_cutoff).await.err().expect("no cut-off");
        assert_eq!(bad_fields(&status), vec!["cutoff_time"]);
        let tomorrow = timestamp(jiff::Timestamp::now().as_microsecond() + 86_400_000_000);
        let status = reconcile(&app, report(&request_id(), tomorrow, &[], 0))
            .await
            .err()
            .expect("a cut-off in the future");
        assert_eq!(bad_fields(&status), vec!["cutoff_time"]);

        // Bad lines, in the first message or a later one.
        let bad = vec![
            returned(&kept.idempotency_key),
            line("", 30_000, pb::SettlementStatus::Settled),
            line("k-2", 0, pb::SettlementStatus::Unspecified),
        ];
        let status = reconcile(&app, report(&request_id(), now(), &bad, 3))
            .await
            .err()
            .expect("bad lines");
        assert_eq!(
            bad_fields(&status),
            vec![
                "lines[1].idempotency_key",
                "lines[2].status",
                "lines[2].amount_krw"
            ]
        );
        let status = reconcile(&app, report(&request_id(), now(), &bad, 1))
            .await
            .err()
            .expect("bad lines later");
        assert_eq!(
            bad_fields(&status),
            vec![
                "lines[0].idempotency_key",
                "lines[1].status",
                "lines[1].amount_krw"
            ]
        );

        // A key listed twice, across messages.
        let twice = vec![
            returned(&kept.idempotency_key),
            line("k-1", 30_000, pb::SettlementStatus::Settled),
            returned(&kept.idempotency_key),
        ];
        let status = reconcile(&app, report(&request_id(), now(), &twice, 2))
            .await
            .err()
            .expect("a key twice");
        assert_eq!(bad_fields(&status), vec!["lines"]);
        assert!(
            status.message().contains(&kept.idempotency_key),
            "{status:?}"
        );

        // ... also when the two lines are staged in different batches (of 500).
        let mut far_apart = vec![returned(&kept.idempotency_key)];
        far_apart.extend(
            (0..500).map(|i| line(&format!("filler-{i}"), 1_000, pb::SettlementStatus::Settled)),
        );
        far_apart.push(returned(&kept.idempotency_key));
        let status = reconcile(&app, report(&request_id(), now(), &far_apart, 300))
            .await
            .err()
            .expect("a key twice, 501 lines apart");
        assert_eq!(bad_fields(&status), vec!["lines"]);
        assert!(
            status.message().contains(&kept.idempotency_key),
            "{status:?}"
        );

        // A later message naming another run.
        let mut other = report(&request_id(), now(), &[returned(&kept.idempotency_key)], 0);
        other[1].request_id = request_id();
        let status = reconcile(&app, other)
            .await
            .err()
            .expect("another request id");
        assert_eq!(bad_fields(&status), vec!["request_id"]);

        // A request id another call used, or a run's id with another report.
        let used = request_id();
        app.disbursements()
            .pause_dispatch(pb::PauseDispatchRequest {
                request_id: used.clone(),
                reason: "reusing its request id".into(),
            })
            .await
            .expect("pause");
        let status = reconcile(&app, report(&used, now(), &[], 0))
            .await
            .err()
            .expect("a used request id");
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert_eq!(reason(&status), "REQUEST_ID_REUSED");
        let run = request_id();
        let cutoff = now();
        let first = reconcile(&app, report(&run, cutoff, &[], 0))
            .await
            .expect("an empty report");
        assert_eq!(first.summary.line_count, 0);
        assert_eq!(
            first.one(&kept.idempotency_key).kind(),
            PaidHereNotThere,
            "paused dispatch does not matter: it was paid before"
        );
        let status = reconcile(
            &app,
            report(&run, cutoff, &[returned(&kept.idempotency_key)], 1),
        )
        .await
        .err()
        .expect("the same request id with another report");
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert_eq!(reason(&status), "REQUEST_ID_REUSED");

        // None of it reopened the payout the refused reports returned.
        assert_eq!(get(&app, &kept.disbursement_id).await, kept);
    }
);
