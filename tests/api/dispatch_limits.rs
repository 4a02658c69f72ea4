//! What holds dispatch back: bank maintenance hours and the programme budget.

use std::time::Duration;

use partner_payouts::proto::payouts::v1 as pb;

use crate::helpers::*;
use crate::on_both_databases;

/// Quiet hours covering now: approved claims wait in QUEUED and nothing is sent.
async fn quiet_hours_hold_dispatch(db: Db) {
    let now = jiff::Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC);
    let start = now
        .checked_sub(jiff::SignedDuration::from_mins(30))
        .expect("time");
    let end = now
        .checked_add(jiff::SignedDuration::from_mins(90))
        .expect("time");
    let window = format!(
        "{:02}:{:02}-{:02}:{:02} UTC",
        start.hour(),
        start.minute(),
        end.hour(),
        end.minute()
    );
    let app = spawn_app(db, |s| s.dispatch_quiet_hours = Some(window)).await;
    let p = register(&app, partner(1)).await;
    let claim = submit(&app, &p.partner_id, vec![full_weight_item(100)]).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let d = get(&app, &claim.disbursement_id).await;
    assert_eq!(d.status, pb::DisbursementStatus::Queued as i32);
    assert!(d.attempts.is_empty(), "nothing was sent: {:?}", d.attempts);
}

/// A budget of 50,000 KRW pays a 30,000 claim and holds the next one back.
async fn budget_is_never_exceeded(db: Db) {
    let app = spawn_app(db, |s| s.dispatch_budget_krw = Some(50_000)).await;
    let first = register(&app, partner(2)).await;
    let first = submit(&app, &first.partner_id, vec![full_weight_item(100)]).await;
    eventually(10, || {
        let app = &app;
        let id = first.disbursement_id.clone();
        async move {
            (get(app, &id).await.status == pb::DisbursementStatus::Paid as i32)
                .then_some(())
        }
    })
    .await;
    let second = register(&app, partner(3)).await;
    let second = submit(&app, &second.partner_id, vec![full_weight_item(100)]).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let held = get(&app, &second.disbursement_id).await;
    assert_eq!(held.status, pb::DisbursementStatus::Queued as i32);
    assert!(
        !held
            .attempts
            .iter()
            .any(|a| a.operation == "SUBMIT_INSTRUCTION"),
        "no instruction sent past the budget"
    );
    let summary = app
        .disbursements()
        .get_program_summary(pb::GetProgramSummaryRequest {})
        .await
        .expect("summary")
        .into_inner();
    assert_eq!(summary.paid_krw, 30_000);
    assert_eq!(summary.in_flight_count, 1);
}

on_both_databases!(quiet_hours_hold_dispatch, db = quiet_hours_hold_dispatch);

on_both_databases!(budget_is_never_exceeded, db = budget_is_never_exceeded);
