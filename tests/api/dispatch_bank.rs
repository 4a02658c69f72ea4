//! The dispatcher against a bank that throttles, one that goes down for a while, and under a
//! contractual rate limit: each a sandbox bank of the test's own, reached over gRPC, with its
//! counts read from `SandboxLedger/GetStats` and what it applied from its ledger.
//!
//! The figures (3,000 payouts against 300 calls/s, a 15 s outage during 1,000 payouts)
//! are measured by `cargo bench --bench load -- throttled-bank` and `-- outage`; here the
//! same ratios are checked on smaller runs, so that the suite stays quick on both databases.

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use partner_payouts::proto::payments::v1 as bank;
use partner_payouts::proto::payouts::v1 as pb;
use partner_payouts::sandbox::{Outage, SandboxConfig};

use crate::helpers::*;
use crate::on_both_databases;

/// A sandbox bank served on 127.0.0.1 for the rest of the test; its URL.
pub(crate) async fn own_bank(config: SandboxConfig) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let bank = partner_payouts::sandbox::SandboxBank::new(config);
    tokio::spawn(partner_payouts::sandbox::serve(
        listener,
        bank,
        std::future::pending(),
    ));
    url
}

async fn stats(bank_url: &str) -> bank::GetStatsResponse {
    bank_ledger(bank_url)
        .await
        .get_stats(bank::GetStatsRequest {})
        .await
        .expect("bank stats")
        .into_inner()
}

/// Calls the bank took (answered), as opposed to those it throttled or refused as down.
fn accepted(stats: &bank::GetStatsResponse) -> i64 {
    stats.calls_total - stats.throttled_total - stats.unavailable_total
}

/// `count` partners and their approved 30,000 KRW claims, imported while dispatch is paused.
async fn queue_payouts(app: &TestApp, count: u64) {
    set_paused(app, true).await;
    let partners = (1..=count).map(|seed| pb::ImportPartnersRequest {
        request_id: request_id(),
        partner: Some(partner(seed)),
    });
    let mut rows = app
        .partners()
        .import_partners(futures::stream::iter(partners))
        .await
        .expect("import partners")
        .into_inner();
    while let Some(row) = rows.message().await.expect("partner row") {
        let created = pb::import_partners_response::Outcome::Created;
        assert_eq!(row.outcome(), created, "{row:?}");
    }
    let claims = (1..=count).map(|seed| pb::ImportClaimsRequest {
        request_id: request_id(),
        partner: Some(pb::import_claims_request::Partner::BusinessRegistrationNumber(brn(seed))),
        items: vec![full_weight_item(100)],
        evidence: vec![],
    });
    let mut rows = app
        .claims()
        .import_claims(futures::stream::iter(claims))
        .await
        .expect("import claims")
        .into_inner();
    while let Some(row) = rows.message().await.expect("claim row") {
        let created = pb::import_claims_response::Outcome::Created;
        assert_eq!(row.outcome(), created, "{row:?}");
    }
}

/// Resumes dispatch and waits (up to `secs`) until `count` payouts are PAID; the time taken.
async fn pay_all(app: &TestApp, count: i64, secs: u64) -> Duration {
    set_paused(app, false).await;
    let started = Instant::now();
    let s = eventually(secs, || async {
        let s = summary(app).await;
        (s.paid_count == count || s.failed_count > 0).then_some(s)
    })
    .await;
    let elapsed = started.elapsed();
    assert_eq!((s.paid_count, s.failed_count), (count, 0), "{s:?}");
    assert_eq!(s.paid_krw, 30_000 * count);
    elapsed
}

/// The bank applied exactly one instruction per payout, each submitted once.
async fn applied_once_each(bank_url: &str, count: usize) {
    let applied = applied(bank_url).await;
    assert_eq!(applied.len(), count);
    let repeated: Vec<_> = applied.iter().filter(|a| a.submissions != 1).collect();
    assert!(repeated.is_empty(), "applied more than once: {repeated:?}");
    assert!(applied.iter().all(|a| a.amount_krw == 30_000));
}

/// The bank's limit, in calls per second, and its latency.
const BANK_RATE: u32 = 300;
const BANK_LATENCY: Duration = Duration::from_millis(20);
/// Payouts in the throttled run: two calls each at least, about four seconds of the bank's
/// limit.
const THROTTLED_PAYOUTS: u64 = 600;
/// The issue asks for at least 85% of the bank's limit over the whole run; the check allows
/// the run's fixed costs on a loaded machine (the first lease, the last transaction, the
/// polling of this test) on top of that.
const LIMIT_SHARE: f64 = 0.85;
const FIXED_COSTS: Duration = Duration::from_millis(1_500);

/// Against a bank taking 300 calls/s that answers in 20 ms, the payouts go out at close to the
/// bank's limit, and at most a tenth of the calls are throttled; every payout is paid once.
async fn a_throttled_bank_is_run_at_its_limit(db: Db) {
    let bank_url = own_bank(SandboxConfig {
        latency: BANK_LATENCY,
        rate_limit_per_s: NonZeroU32::new(BANK_RATE),
        ..SandboxConfig::default()
    })
    .await;
    let url = bank_url.clone();
    let app = spawn_app(db, |s| s.payments_backend_url = Some(url)).await;
    queue_payouts(&app, THROTTLED_PAYOUTS).await;
    let count = i64::try_from(THROTTLED_PAYOUTS).expect("count");
    let elapsed = pay_all(&app, count, 120).await;

    let s = stats(&bank_url).await;
    let needed = Duration::from_secs_f64(accepted(&s) as f64 / f64::from(BANK_RATE));
    let ratio = needed.as_secs_f64() / elapsed.as_secs_f64();
    println!(
        "{db:?}: {count} payouts in {elapsed:.2?}; bank calls {} (throttled {}, accepted {}), \
         which need {needed:.2?} at {BANK_RATE}/s: {ratio:.2} of the limit",
        s.calls_total,
        s.throttled_total,
        accepted(&s)
    );
    assert!(accepted(&s) >= 2 * count, "{s:?}");
    assert!(
        s.throttled_total * 10 <= s.calls_total,
        "more than a tenth of the calls throttled: {s:?}"
    );
    assert!(
        elapsed <= needed.div_f64(LIMIT_SHARE) + FIXED_COSTS,
        "{elapsed:?} for calls that need {needed:?} at the bank's limit"
    );
    applied_once_each(&bank_url, usize::try_from(count).expect("count")).await;
    app.stop().await;
}

/// Payouts in the outage run, and the outage: from a second after the bank's first call, for
/// five seconds.
const OUTAGE_PAYOUTS: u64 = 1_000;
const OUTAGE: Outage = Outage {
    after: Duration::from_secs(1),
    lasting: Duration::from_secs(5),
};
/// The refused calls allowed: those in flight when the bank went down, the failures in a row
/// that open the breaker, and one probe at a time; far below what backing off payout by payout
/// would send (hundreds a second for 1,000 payouts).
const MOST_REFUSED: i64 = 100;

/// The bank goes down for five seconds in the middle of 1,000 payouts: the dispatcher stops
/// calling it after a few failures, probes one call at a time, and once the bank answers pays
/// every payout, each applied once.
async fn an_outage_is_waited_out(db: Db) {
    let bank_url = own_bank(SandboxConfig {
        latency: BANK_LATENCY,
        outage: Some(OUTAGE),
        ..SandboxConfig::default()
    })
    .await;
    let url = bank_url.clone();
    let app = spawn_app(db, |s| s.payments_backend_url = Some(url)).await;
    queue_payouts(&app, OUTAGE_PAYOUTS).await;
    let count = i64::try_from(OUTAGE_PAYOUTS).expect("count");
    let elapsed = pay_all(&app, count, 120).await;

    let s = stats(&bank_url).await;
    println!(
        "{db:?}: {count} payouts through a {:?} outage in {elapsed:.2?}; bank calls {}, \
         refused as down {}",
        OUTAGE.lasting, s.calls_total, s.unavailable_total
    );
    assert!(
        s.unavailable_total > 0,
        "the outage fell during the payouts"
    );
    assert!(
        elapsed > OUTAGE.after + OUTAGE.lasting,
        "paid before the bank was back"
    );
    assert!(
        s.unavailable_total <= MOST_REFUSED,
        "{} calls refused during the outage",
        s.unavailable_total
    );
    applied_once_each(&bank_url, usize::try_from(count).expect("count")).await;
    app.stop().await;
}

/// The contractual limit, in calls per second, and the payouts sent under it.
const CONTRACT_RATE: u32 = 40;
const CONTRACT_PAYOUTS: u64 = 40;

/// Under `dispatch_rate_limit_per_s`, the dispatcher never calls faster than the contract
/// allows, though the bank would take more: its calls are spread over at least
/// (calls - 1) / rate seconds.
async fn a_contractual_rate_limit_is_kept(db: Db) {
    let bank_url = own_bank(SandboxConfig::default()).await;
    let url = bank_url.clone();
    let app = spawn_app(db, |s| {
        s.payments_backend_url = Some(url);
        s.dispatch_rate_limit_per_s = Some(CONTRACT_RATE);
    })
    .await;
    queue_payouts(&app, CONTRACT_PAYOUTS).await;
    let count = i64::try_from(CONTRACT_PAYOUTS).expect("count");
    let elapsed = pay_all(&app, count, 60).await;
    let s = stats(&bank_url).await;
    assert!(s.calls_total >= 2 * count, "{s:?}");
    let shortest = Duration::from_secs_f64((s.calls_total - 1) as f64 / f64::from(CONTRACT_RATE));
    assert!(
        elapsed >= shortest,
        "{} calls in {elapsed:?}: faster than {CONTRACT_RATE}/s",
        s.calls_total
    );
    applied_once_each(&bank_url, usize::try_from(count).expect("count")).await;
    app.stop().await;
}

on_both_databases!(
    a_throttled_bank_is_run_at_its_limit,
    db = a_throttled_bank_is_run_at_its_limit
);

on_both_databases!(an_outage_is_waited_out, db = an_outage_is_waited_out);

on_both_databases!(
    a_contractual_rate_limit_is_kept,
    db = a_contractual_rate_limit_is_kept
);

#[test]
fn a_contractual_rate_of_zero_is_refused() {
    let settings = partner_payouts::config::Settings {
        dispatch_rate_limit_per_s: Some(0),
        ..partner_payouts::config::Settings::default()
    };
    let message = format!("{:#}", settings.validate().expect_err("zero"));
    assert!(message.contains("dispatch_rate_limit_per_s"), "{message}");
}
