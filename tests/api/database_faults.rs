//! When the database is lost, slow or contended. PostgreSQL is reached through a proxy of the
//! tests' own ([`DbProxy`]) that cuts connections, resets or holds new ones, delays bytes and
//! restores; contention is made by triggers that roll transactions back with PostgreSQL's own
//! codes. SQLite has no network to lose, but its lock held past the busy timeout answers as a
//! lost database does.
//!
//! The times these tests measure are printed (`--nocapture`) and only bounded generously.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use partner_payouts::config::Settings;
use partner_payouts::proto::payouts::v1 as pb;
use partner_payouts::store::CONTENTION_ATTEMPTS;
use sqlx::Connection as _;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_types::StatusExt as _;

use crate::deadlines::{WriteLock, partners_numbered};
use crate::helpers::*;
use crate::proxy::DbProxy;

/// The services health reports on: the whole server, and each of ours.
const SERVICES: [&str; 6] = [
    "",
    "payouts.v1.PartnerService",
    "payouts.v1.ClaimService",
    "payouts.v1.DisbursementService",
    "payouts.v1.AuditService",
    "payouts.v1.EventService",
];

/// A way for PostgreSQL to go, and what to call it.
type Fault = (&'static str, fn(&DbProxy));

/// PostgreSQL lost (connections cut, new ones reset) and silent (connections cut, new ones
/// accepted and never answered).
const FAULTS: [Fault; 2] = [
    ("lost", DbProxy::lose_database),
    ("silent", DbProxy::silence_database),
];

/// A generous bound on what should take a few seconds, for a loaded machine.
const WITHIN: Duration = Duration::from_secs(15);

/// The service over a fresh PostgreSQL database that it reaches through a proxy.
async fn spawn_behind_proxy(tweak: impl FnOnce(&mut Settings)) -> (TestApp, DbProxy) {
    let dir = tempfile::tempdir().expect("temp dir");
    let direct = fresh_postgres_database().await;
    let proxy = DbProxy::start(&direct).await;
    let through = proxy.url();
    let app = spawn_app_in(Db::Postgres, dir, direct, |s| {
        s.database_url = through;
        tweak(s);
    })
    .await;
    (app, proxy)
}

/// How health reports each of [`SERVICES`].
pub(crate) async fn health(app: &TestApp) -> Vec<ServingStatus> {
    let mut client = HealthClient::new(app.channel.clone());
    let mut statuses = Vec::new();
    for service in SERVICES {
        let status = client
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health answers whatever the database does")
            .into_inner()
            .status();
        statuses.push(status);
    }
    statuses
}

/// Polls until every service reports `wanted`; returns how long that took.
async fn until_health(app: &TestApp, wanted: ServingStatus) -> Duration {
    let started = Instant::now();
    loop {
        let statuses = health(app).await;
        if statuses.iter().all(|s| *s == wanted) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < WITHIN,
            "health still {statuses:?}, not {wanted:?}, after {WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks a status is the retryable `UNAVAILABLE` of a database out of reach.
fn assert_database_unavailable(status: &tonic::Status) {
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason(status), "DATABASE_UNAVAILABLE");
    let retry = status.get_details_retry_info().expect("RetryInfo");
    assert!(retry.retry_delay.is_some_and(|d| !d.is_zero()), "{retry:?}");
}

fn register_request(seed: u64) -> pb::RegisterPartnerRequest {
    pb::RegisterPartnerRequest {
        request_id: request_id(),
        partner: Some(partner(seed)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_database_away_and_back() {
    let (app, proxy) = spawn_behind_proxy(|s| {
        s.admin_listen_addr = Some("127.0.0.1:0".parse().expect("addr"));
    })
    .await;
    let admin = app.admin_addr.expect("the admin port");
    let readyz = || async move { http_get(admin, "/readyz").await.expect("/readyz answers") };
    assert_eq!(readyz().await, (200, "ready\n".to_owned()));
    assert!(
        health(&app)
            .await
            .iter()
            .all(|s| *s == ServingStatus::Serving)
    );
    for (seed, (what, fault)) in (1..).zip(FAULTS) {
        fault(&proxy);
        let down = until_health(&app, ServingStatus::NotServing).await;
        // `/readyz` says the same as gRPC health, and why.
        let not_ready = (503, "the database does not answer\n".to_owned());
        assert_eq!(readyz().await, not_ready, "database {what}");
        proxy.restore();
        let up = until_health(&app, ServingStatus::Serving).await;
        assert_eq!(
            readyz().await,
            (200, "ready\n".to_owned()),
            "database {what}"
        );
        eprintln!(
            "measured: database {what}: NOT_SERVING after {down:?}; SERVING {up:?} after restore"
        );
        // Serving again without a restart.
        register(&app, partner(seed)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_cannot_reach_the_database_fails_fast_and_retryable() {
    let (app, proxy) = spawn_behind_proxy(|_| {}).await;
    let known = register(&app, partner(1)).await;
    for (round, (what, fault)) in (1_u64..).zip(FAULTS) {
        fault(&proxy);
        // Registrations share commits: every caller of a batch that cannot reach the
        // database hears so, and so do the callers waiting behind it.
        let started = Instant::now();
        let calls = (0..6).map(|i| {
            let mut client = app.partners();
            async move {
                let answer = client
                    .register_partner(register_request(round * 10 + i))
                    .await;
                (answer, started.elapsed())
            }
        });
        let mut slowest = Duration::ZERO;
        for (answer, took) in futures::future::join_all(calls).await {
            assert_database_unavailable(&answer.expect_err("no database, no partner"));
            slowest = slowest.max(took);
        }
        let started = Instant::now();
        let read = app
            .partners()
            .get_partner(pb::GetPartnerRequest {
                partner_id: known.partner_id.clone(),
            })
            .await
            .expect_err("no database, no read");
        let read_took = started.elapsed();
        assert_database_unavailable(&read);
        eprintln!(
            "measured: database {what}: 6 concurrent RegisterPartner UNAVAILABLE within \
             {slowest:?}, GetPartner within {read_took:?} (acquire timeout 2 s)"
        );
        assert!(slowest < WITHIN && read_took < WITHIN);
        proxy.restore();
        until_health(&app, ServingStatus::Serving).await;
    }
}

/// The service keeps the connection that wrote a batch for the next one. One that PostgreSQL
/// closed while it waited is not written on again: the first registration and claim after
/// a quiet second are answered `OK`, as when every batch took a connection from the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_while_the_service_was_quiet_fails_no_call() {
    let (app, proxy) = spawn_behind_proxy(|_| {}).await;
    for seed in 1..=3 {
        let before = register(&app, partner(seed)).await;
        submit(&app, &before.partner_id, vec![full_weight_item(100_000)]).await;
        // Every connection to the database closed (as by a restart), new ones taken.
        proxy.cut();
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let after = register(&app, partner(seed + 100)).await;
        let claim = submit(&app, &after.partner_id, vec![full_weight_item(100_000)]).await;
        assert_eq!(claim.partner_id, after.partner_id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_database_answers_late_calls_deadline_exceeded_and_runs_each_once() {
    let (app, proxy) = spawn_behind_proxy(|_| {}).await;
    let request = register_request(1);
    proxy.delay(Duration::from_millis(250));
    let mut call = tonic::Request::new(request.clone());
    call.set_timeout(Duration::from_millis(400));
    let status = app
        .partners_leaving_deadlines()
        .register_partner(call)
        .await
        .expect_err("a transaction of several round trips of 500 ms each");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    // Slow is not down: the probe's round trip is well within its time.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        health(&app)
            .await
            .iter()
            .all(|s| *s == ServingStatus::Serving)
    );
    proxy.restore();
    let retried = eventually(15, || {
        let mut client = app.partners();
        let request = request.clone();
        async move { client.register_partner(request).await.ok() }
    })
    .await
    .into_inner()
    .partner
    .expect("partner");
    let mut db = sqlx::PgConnection::connect(&app.database_url)
        .await
        .expect("db");
    assert_eq!(partner_ids(&mut db, 1).await, [retried.partner_id]);
}

/// Makes the database roll back, with SQLSTATE `code`, the first `times` statements that
/// `event` (`INSERT` or `UPDATE`) a partner row, as PostgreSQL does to a transaction it picks
/// to break a deadlock or a serialization conflict. Returns a connection to count the runs
/// ([`runs`]). The trigger counts as the test's owner role (SECURITY DEFINER), whichever role
/// the service writes as.
async fn contend(app: &TestApp, event: &str, code: &str, times: i64) -> sqlx::PgConnection {
    let mut conn = sqlx::PgConnection::connect(&app.database_url)
        .await
        .expect("db");
    let ddl = format!(
        "CREATE SEQUENCE partner_writes; \
         CREATE OR REPLACE FUNCTION contend() RETURNS trigger LANGUAGE plpgsql \
           SECURITY DEFINER AS $$ BEGIN \
           IF nextval('partner_writes') <= {times} THEN \
             RAISE EXCEPTION 'made to contend' USING ERRCODE = '{code}'; \
           END IF; RETURN NEW; END $$; \
         CREATE TRIGGER contend BEFORE {event} ON partners \
           FOR EACH ROW EXECUTE FUNCTION contend();"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(ddl))
        .execute(&mut conn)
        .await
        .expect("the contention trigger");
    conn
}

/// How many times the contended statement ran.
async fn runs(conn: &mut sqlx::PgConnection) -> i64 {
    let (last, called): (i64, bool) =
        sqlx::query_as("SELECT last_value, is_called FROM partner_writes")
            .fetch_one(&mut *conn)
            .await
            .expect("runs");
    if called { last } else { 0 }
}

async fn partner_ids(conn: &mut sqlx::PgConnection, seed: u64) -> Vec<String> {
    sqlx::query_scalar("SELECT partner_id FROM partners WHERE business_registration_number = $1")
        .bind(brn(seed))
        .fetch_all(&mut *conn)
        .await
        .expect("partners")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contention_is_run_again_inside_the_service() {
    let app = spawn_app(Db::Postgres, |_| {}).await;
    let mut db = contend(&app, "INSERT", "40001", 2).await;
    let created = app
        .partners()
        .register_partner(register_request(1))
        .await
        .expect("run again past two serialization failures")
        .into_inner()
        .partner
        .expect("partner");
    // The shared commit's run, rolled back and written row by row; the row's own run, rolled
    // back and run again.
    assert_eq!(runs(&mut db).await, 3);
    assert_eq!(
        partner_ids(&mut db, 1).await,
        std::slice::from_ref(&created.partner_id)
    );

    sqlx::raw_sql("DROP TRIGGER contend ON partners; DROP SEQUENCE partner_writes")
        .execute(&mut db)
        .await
        .expect("drop the trigger");
    let mut db = contend(&app, "UPDATE", "40P01", 2).await;
    let updated = app
        .partners()
        .update_partner_bank_account(pb::UpdatePartnerBankAccountRequest {
            request_id: request_id(),
            partner_id: created.partner_id.clone(),
            bank_account: Some(pb::BankAccount {
                bank_code: "088".into(),
                account_number: "100-234-567890".into(),
                holder_name: "Kim Minji".into(),
            }),
            etag: created.etag.clone(),
        })
        .await
        .expect("run again past two deadlocks")
        .into_inner()
        .partner
        .expect("partner");
    assert_eq!(runs(&mut db).await, 3);
    let version = |etag: &str| etag.trim_matches('"').parse::<i64>().expect("etag");
    assert_eq!(version(&updated.etag), version(&created.etag) + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contention_past_the_retries_is_aborted_and_stores_nothing() {
    let app = spawn_app(Db::Postgres, |_| {}).await;
    let mut db = contend(&app, "INSERT", "40P01", i64::MAX).await;
    let request = register_request(1);
    let status = app
        .partners()
        .register_partner(request.clone())
        .await
        .expect_err("every run deadlocks");
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert_eq!(reason(&status), "DATABASE_CONTENTION");
    assert!(status.get_details_retry_info().is_some(), "{status:?}");
    assert_eq!(runs(&mut db).await, 1 + i64::from(CONTENTION_ATTEMPTS));
    assert!(partner_ids(&mut db, 1).await.is_empty());

    // Nothing was kept of the request, its id included: the retry runs it, once.
    sqlx::raw_sql("DROP TRIGGER contend ON partners")
        .execute(&mut db)
        .await
        .expect("drop the trigger");
    let created = app
        .partners()
        .register_partner(request)
        .await
        .expect("the retry runs")
        .into_inner()
        .partner
        .expect("partner");
    assert_eq!(partner_ids(&mut db, 1).await, [created.partner_id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_a_lock_held_past_the_busy_timeout_is_unavailable() {
    let app = spawn_app(Db::Sqlite, |s| s.sqlite_busy_timeout_ms = 300).await;
    let request = register_request(1);
    let lock = WriteLock::take(&app).await;
    let started = Instant::now();
    let status = app
        .partners()
        .register_partner(request.clone())
        .await
        .expect_err("another connection holds the write lock");
    let took = started.elapsed();
    assert_database_unavailable(&status);
    assert!(took < WITHIN, "answered after {took:?}");
    eprintln!("measured: SQLite busy timeout 300 ms: UNAVAILABLE after {took:?}");
    lock.release().await;
    register_once(&app, request, 1).await;
}

/// Sends `request` (for partner `seed`) and checks the one partner of that number is its.
async fn register_once(app: &TestApp, request: pb::RegisterPartnerRequest, seed: u64) {
    let created = app
        .partners()
        .register_partner(request)
        .await
        .expect("registered")
        .into_inner()
        .partner
        .expect("partner");
    let listed = partners_numbered(app, &brn(seed)).await;
    let ids: Vec<&str> = listed.iter().map(|p| p.partner_id.as_str()).collect();
    assert_eq!(ids, [created.partner_id.as_str()]);
}

/// What one writer was answered `OK`, and the failures it retried.
#[derive(Default)]
struct Told {
    partners: BTreeSet<(String, String)>,
    claims: BTreeSet<(String, String)>,
    failures: Vec<Code>,
}

/// Sends `call` until it is answered `OK`: every failure must be one a retry with the same
/// request id may cure (the database out of reach, too slow, or contended).
async fn until_ok<T, F, Fut>(mut call: F, failures: &mut Vec<Code>) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let started = Instant::now();
    loop {
        match call().await {
            Ok(answer) => return answer.into_inner(),
            Err(status) => {
                assert!(
                    matches!(
                        status.code(),
                        Code::Unavailable | Code::DeadlineExceeded | Code::Aborted
                    ),
                    "a retry with the same request id was answered {status:?}"
                );
                failures.push(status.code());
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "never answered OK"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Registers partners `first_seed..` and files a claim for each, one after the other, each
/// call retried with its own request id until `OK`, until `stop`.
async fn writer(app: &TestApp, first_seed: u64, stop: tokio::sync::watch::Receiver<bool>) -> Told {
    let mut told = Told::default();
    for seed in first_seed.. {
        if *stop.borrow() {
            break;
        }
        let registration = register_request(seed);
        let partner = until_ok(
            || {
                let mut client = app.partners();
                let request = registration.clone();
                async move { client.register_partner(request).await }
            },
            &mut told.failures,
        )
        .await
        .partner
        .expect("partner");
        let claim = pb::SubmitClaimRequest {
            request_id: request_id(),
            partner_id: partner.partner_id.clone(),
            items: vec![full_weight_item(100)],
            evidence: vec![],
        };
        let claim = until_ok(
            || {
                let mut client = app.claims();
                let request = claim.clone();
                async move { client.submit_claim(request).await }
            },
            &mut told.failures,
        )
        .await
        .claim
        .expect("claim");
        told.partners.insert((
            partner.partner_id.clone(),
            partner.business_registration_number,
        ));
        told.claims.insert((claim.claim_id, partner.partner_id));
    }
    told
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acknowledged_is_lost_when_the_database_goes_and_comes_back_twice() {
    let (app, proxy) = spawn_behind_proxy(|s| s.database_acquire_timeout_ms = 1_000).await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let writers = (0..4_u64).map(|w| writer(&app, w * 100_000 + 1, stopped.clone()));
    let outages = async {
        let pause = || tokio::time::sleep(Duration::from_millis(1_500));
        pause().await;
        proxy.lose_database();
        pause().await;
        proxy.restore();
        pause().await;
        proxy.silence_database();
        pause().await;
        proxy.restore();
        pause().await;
        stop.send(true).expect("writers listen");
    };
    let (told, ()) = tokio::join!(futures::future::join_all(writers), outages);

    let mut partners = BTreeSet::new();
    let mut claims = BTreeSet::new();
    let mut failures = Vec::new();
    for t in told {
        partners.extend(t.partners);
        claims.extend(t.claims);
        failures.extend(t.failures);
    }
    assert!(!failures.is_empty(), "the writers never met the outages");
    let mut db = sqlx::PgConnection::connect(&app.database_url)
        .await
        .expect("db");
    let stored_partners: BTreeSet<(String, String)> =
        sqlx::query_as("SELECT partner_id, business_registration_number FROM partners")
            .fetch_all(&mut db)
            .await
            .expect("partners")
            .into_iter()
            .collect();
    let stored_claims: BTreeSet<(String, String)> =
        sqlx::query_as("SELECT claim_id, partner_id FROM claims")
            .fetch_all(&mut db)
            .await
            .expect("claims")
            .into_iter()
            .collect();
    // Every partner and claim answered OK is stored, and nothing else: no retry made a second.
    assert_eq!(stored_partners, partners);
    assert_eq!(stored_claims, claims);
    eprintln!(
        "measured: {} partners and {} claims acknowledged and stored across two outages; \
         {} failed calls retried ({} UNAVAILABLE)",
        partners.len(),
        claims.len(),
        failures.len(),
        failures.iter().filter(|c| **c == Code::Unavailable).count()
    );
}
