//! Deadlines: a call past its caller's deadline (`grpc-timeout`) or past `request_timeout_ms`
//! is answered `DEADLINE_EXCEEDED`, not `CANCELLED`, and audited with that outcome; a retry
//! with the same request id replays what the call stored, or runs it now, never twice.

use std::time::{Duration, Instant};

use partner_payouts::config::Settings;
use partner_payouts::proto::payouts::v1 as pb;
use sqlx::Connection as _;
use tonic::Code;
use tonic_types::StatusExt as _;

use crate::access::audit_events;
use crate::helpers::*;
use crate::on_both_databases;

/// A transaction of the test's own holding the lock a new or changed partner needs: on
/// SQLite the database's write lock, on PostgreSQL the partners table's (reads go on).
pub(crate) enum WriteLock {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

impl WriteLock {
    pub(crate) async fn take(app: &TestApp) -> Self {
        match app.db {
            Db::Sqlite => {
                let mut conn = sqlx::SqliteConnection::connect(&app.database_url)
                    .await
                    .expect("connect to the SQLite file");
                sqlx::raw_sql("BEGIN IMMEDIATE")
                    .execute(&mut conn)
                    .await
                    .expect("take the write lock");
                Self::Sqlite(conn)
            }
            Db::Postgres => {
                let mut conn = sqlx::PgConnection::connect(&app.database_url)
                    .await
                    .expect("connect to PostgreSQL");
                sqlx::raw_sql("BEGIN; LOCK TABLE partners IN EXCLUSIVE MODE")
                    .execute(&mut conn)
                    .await
                    .expect("lock the partners table");
                Self::Postgres(conn)
            }
        }
    }

    pub(crate) async fn release(self) {
        match self {
            Self::Sqlite(mut conn) => sqlx::raw_sql("ROLLBACK").execute(&mut conn).await.map(drop),
            Self::Postgres(mut conn) => {
                sqlx::raw_sql("ROLLBACK").execute(&mut conn).await.map(drop)
            }
        }
        .expect("release the lock");
    }
}

/// The entries the audit log holds for `request_id`, once one of them has `outcome`.
async fn audited(app: &TestApp, request_id: &str, outcome: &str) -> Vec<pb::AuditEvent> {
    eventually(15, || async {
        let events: Vec<pb::AuditEvent> = audit_events(app, None)
            .await
            .ok()?
            .into_iter()
            .filter(|e| e.request_id == request_id)
            .collect();
        events
            .iter()
            .any(|e| e.outcome_code == outcome)
            .then_some(events)
    })
    .await
}

/// The partners registered under business registration number `brn`.
pub(crate) async fn partners_numbered(app: &TestApp, brn: &str) -> Vec<pb::Partner> {
    app.partners()
        .list_partners(pb::ListPartnersRequest {
            business_registration_number: brn.into(),
            ..Default::default()
        })
        .await
        .expect("list partners")
        .into_inner()
        .partners
}

/// The limit a `DEADLINE_EXCEEDED` names: `grpc-timeout` or `request_timeout_ms`.
fn limit(status: &tonic::Status) -> String {
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(reason(status), "DEADLINE_EXCEEDED");
    let info = status.get_details_error_info().expect("ErrorInfo");
    info.metadata.get("limit").cloned().unwrap_or_default()
}

const REQUEST_TIMEOUT: Duration = Duration::from_millis(1_000);

on_both_databases!(
    a_call_past_request_timeout_is_deadline_exceeded_and_its_retry_replays_it,
    settings = |s: &mut Settings| {
        s.request_timeout_ms = REQUEST_TIMEOUT.as_millis() as u64;
    },
    |app: TestApp| async move {
        let request = pb::RegisterPartnerRequest {
            request_id: request_id(),
            partner: Some(partner(1)),
        };
        let lock = WriteLock::take(&app).await;
        let started = Instant::now();
        let status = app
            .partners()
            .register_partner(request.clone())
            .await
            .expect_err("the partners are locked past the call's time");
        let took = started.elapsed();
        assert_eq!(limit(&status), "request_timeout_ms");
        assert!(
            took >= REQUEST_TIMEOUT - Duration::from_millis(50) && took < Duration::from_secs(10),
            "answered after {took:?}"
        );
        eprintln!("measured: request_timeout_ms 1000 answered DEADLINE_EXCEEDED after {took:?}");
        lock.release().await;

        // The shared commit the call joined still writes its row, with the request id: the
        // retry gets that partner back, and there is one.
        let brn = brn(1);
        let stored = eventually(15, || async {
            partners_numbered(&app, &brn).await.into_iter().next()
        })
        .await;
        let retried = app
            .partners()
            .register_partner(request.clone())
            .await
            .expect("the retry is answered")
            .into_inner()
            .partner
            .expect("partner");
        assert_eq!(retried.partner_id, stored.partner_id);
        assert_eq!(partners_numbered(&app, &brn).await.len(), 1);

        let events = audited(&app, &request.request_id, "DEADLINE_EXCEEDED").await;
        assert!(
            events.iter().any(|e| e.outcome_code == "OK" && e.replayed),
            "the retry is audited as a replay: {events:?}"
        );
    }
);

on_both_databases!(
    a_call_past_the_callers_deadline_is_deadline_exceeded_and_stores_nothing,
    |app: TestApp| async move {
        let registered = register(&app, partner(2)).await;
        let update = pb::UpdatePartnerBankAccountRequest {
            request_id: request_id(),
            partner_id: registered.partner_id.clone(),
            bank_account: Some(pb::BankAccount {
                bank_code: "088".into(),
                account_number: "100-234-567890".into(),
                holder_name: "Kim Minji".into(),
            }),
            etag: registered.etag.clone(),
        };
        let lock = WriteLock::take(&app).await;
        let mut call = tonic::Request::new(update.clone());
        call.set_timeout(Duration::from_millis(500));
        let started = Instant::now();
        let status = app
            .partners_leaving_deadlines()
            .update_partner_bank_account(call)
            .await
            .expect_err("the partner is locked past the caller's deadline");
        let took = started.elapsed();
        assert_eq!(limit(&status), "grpc-timeout");
        assert!(took < Duration::from_secs(10), "answered after {took:?}");
        eprintln!("measured: grpc-timeout 500m answered DEADLINE_EXCEEDED after {took:?}");
        lock.release().await;

        // The transaction cut at the deadline stored nothing: the retry runs the change, once.
        let updated = app
            .partners()
            .update_partner_bank_account(update.clone())
            .await
            .expect("the retry runs")
            .into_inner()
            .partner
            .expect("partner");
        assert_ne!(updated.etag, registered.etag);
        let again = app
            .partners()
            .update_partner_bank_account(update.clone())
            .await
            .expect("a second retry replays")
            .into_inner()
            .partner
            .expect("partner");
        assert_eq!(again.etag, updated.etag, "one change, whatever the retries");
        audited(&app, &update.request_id, "DEADLINE_EXCEEDED").await;
    }
);

on_both_databases!(
    a_stream_past_the_callers_deadline_ends_deadline_exceeded,
    |app: TestApp| async move {
        let row = pb::ImportPartnersRequest {
            request_id: request_id(),
            partner: Some(partner(3)),
        };
        // One row, then a caller that neither sends more nor ends its stream.
        let rows =
            futures::StreamExt::chain(futures::stream::iter(vec![row]), futures::stream::pending());
        let mut call = tonic::Request::new(rows);
        call.set_timeout(Duration::from_millis(800));
        let started = Instant::now();
        let mut client = app.partners_leaving_deadlines();
        let answered = async {
            let mut answers = client.import_partners(call).await?.into_inner();
            while answers.message().await?.is_some() {}
            Ok::<(), tonic::Status>(())
        };
        let ended = tokio::time::timeout(Duration::from_secs(15), answered)
            .await
            .expect("the service ends the stream at its deadline")
            .expect_err("the stream outlives its deadline");
        let took = started.elapsed();
        assert_eq!(limit(&ended), "grpc-timeout");
        assert!(took < Duration::from_secs(10), "ended after {took:?}");
        // The call's own entry says how it ended (its row's, that the row was stored).
        eventually(15, || async {
            audit_events(&app, None).await.ok()?.into_iter().find(|e| {
                e.method.ends_with("/ImportPartners") && e.outcome_code == "DEADLINE_EXCEEDED"
            })
        })
        .await;
    }
);
