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

/// Waits until `disbursement_id` is PAID.
async fn paid(app: &TestApp, disbursement_id: &str) {
    eventually(10, || {
        let id = disbursement_id.to_owned();
        async move {
            (get(app, &id).await.status == pb::DisbursementStatus::Paid as i32).then_some(())
        }
    })
    .await;
}

/// After long enough for the dispatcher's rounds, `disbursement_id` is still QUEUED and no
/// instruction was sent for it (`why`).
async fn held_back(app: &TestApp, disbursement_id: &str, why: &str) {
    tokio::time::sleep(Duration::from_millis(800)).await;
    let held = get(app, disbursement_id).await;
    assert_eq!(held.status, pb::DisbursementStatus::Queued as i32, "{why}");
    assert!(
        !held
            .attempts
            .iter()
            .any(|a| a.operation == "SUBMIT_INSTRUCTION"),
        "no instruction sent {why}: {:?}",
        held.attempts
    );
}

/// A budget of 50,000 KRW pays a 30,000 claim and holds the next one back.
async fn budget_is_never_exceeded(db: Db) {
    let app = spawn_app(db, |s| s.dispatch_budget_krw = Some(50_000)).await;
    let first = register(&app, partner(2)).await;
    let first = submit(&app, &first.partner_id, vec![full_weight_item(100)]).await;
    paid(&app, &first.disbursement_id).await;
    let second = register(&app, partner(3)).await;
    let second = submit(&app, &second.partner_id, vec![full_weight_item(100)]).await;
    held_back(&app, &second.disbursement_id, "past the budget").await;
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

/// A transaction holding the dispatch lock, as a budgeted key assignment elsewhere would.
async fn hold_dispatch_lock(app: &TestApp) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let pool = sqlx::PgPool::connect(&app.database_url)
        .await
        .expect("connect");
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("SELECT id FROM dispatch_control WHERE id = 1 FOR UPDATE")
        .fetch_one(&mut *tx)
        .await
        .expect("lock");
    tx
}

/// The budget is checked one key assignment at a time across replicas, under the dispatch
/// lock: with a budget, a payout waits while another holds it; without one, a payout's key
/// depends on its own row alone and it is paid meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_budget_makes_key_assignments_wait_for_each_other_on_postgres() {
    let free = spawn_app(Db::Postgres, |_| {}).await;
    let held = hold_dispatch_lock(&free).await;
    let p = register(&free, partner(4)).await;
    let claim = submit(&free, &p.partner_id, vec![full_weight_item(100)]).await;
    paid(&free, &claim.disbursement_id).await;
    held.rollback().await.expect("release");

    let budgeted = spawn_app(Db::Postgres, |s| s.dispatch_budget_krw = Some(1_000_000)).await;
    let held = hold_dispatch_lock(&budgeted).await;
    let p = register(&budgeted, partner(5)).await;
    let claim = submit(&budgeted, &p.partner_id, vec![full_weight_item(100)]).await;
    held_back(
        &budgeted,
        &claim.disbursement_id,
        "while the budget check waits",
    )
    .await;
    held.rollback().await.expect("release");
    paid(&budgeted, &claim.disbursement_id).await;
}
