//! Floods of refused calls, on both databases: past its budget of refused calls a peer
//! address is answered `RESOURCE_EXHAUSTED` with a retry delay, the audit log records the
//! flood in a few counted entries instead of one row per call, and a good principal calling
//! from the same address is neither limited nor audited in aggregate.

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use partner_payouts::auth::AuthSettings;
use partner_payouts::config::Settings;
use partner_payouts::proto::payouts::v1 as pb;
use tonic::Code;
use tonic_types::StatusExt;

use crate::access::{r#as, audit_events, auth_settings, authed, token, write_pii_key};
use crate::helpers::*;
use crate::on_both_databases;

const REGISTER: &str = "/payouts.v1.PartnerService/RegisterPartner";
/// A well-formed bearer token that no principal was given.
const BAD_TOKEN: &str = "a-token-nobody-was-given";
const FLOOD: usize = 2_000;
/// How often the test service writes refused calls to the audit log: short, so the tests
/// need not wait long, but long enough that a flood of a few seconds spans few intervals.
const DENIAL_AUDIT_INTERVAL: Duration = Duration::from_secs(1);

/// Settings of the service with `[auth]`, the default per-peer limit of refused calls, and a
/// short audit interval for them.
fn guarded(s: &mut Settings) {
    let defaults = AuthSettings::default();
    let mut auth = auth_settings(None);
    auth.denied_rate_limit_per_second = defaults.denied_rate_limit_per_second;
    auth.denied_rate_limit_burst = defaults.denied_rate_limit_burst;
    auth.denial_audit_interval_ms =
        u64::try_from(DENIAL_AUDIT_INTERVAL.as_millis()).expect("small");
    s.auth = Some(auth);
    write_pii_key(&s.pii_key_file);
}

/// RegisterPartner with a token nobody was given.
async fn register_with_bad_token(app: &TestApp, seed: u64) -> tonic::Status {
    app.partners()
        .register_partner(authed(
            Some(BAD_TOKEN),
            pb::RegisterPartnerRequest {
                request_id: request_id(),
                partner: Some(partner(seed)),
            },
        ))
        .await
        .expect_err("a bad token is refused")
}

/// Checks a refusal past the peer's budget, and returns the retry delay it advises.
fn assert_peer_limited(status: &tonic::Status) -> Duration {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "RATE_LIMITED");
    assert_eq!(info.domain, "payouts");
    assert_eq!(
        info.metadata.get("peer").map(String::as_str),
        Some("127.0.0.1")
    );
    assert!(!status.message().contains(BAD_TOKEN), "{status:?}");
    let delay = status
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .expect("RetryInfo with a delay");
    // The default budget refills one refused call every 50 ms.
    assert!(
        delay > Duration::ZERO && delay <= Duration::from_millis(50),
        "{delay:?}"
    );
    delay
}

/// The refused RegisterPartner calls of unidentified callers in the audit log, once their
/// counts add up to `calls`.
async fn refused_entries(app: &TestApp, calls: i64) -> Vec<pb::AuditEvent> {
    let auditor = token("auditor");
    eventually(10, || async {
        let events = audit_events(app, Some(&auditor))
            .await
            .expect("the auditor lists the audit log");
        let refused: Vec<pb::AuditEvent> = events
            .into_iter()
            .filter(|e| e.method == REGISTER && e.principal.is_empty())
            .collect();
        (refused.iter().map(|e| e.count).sum::<i64>() >= calls).then_some(refused)
    })
    .await
}

/// 2,000 calls with a bad token from one client: the first ones (the burst, and what refills
/// while the flood lasts) are UNAUTHENTICATED, then the peer is answered RESOURCE_EXHAUSTED with RetryInfo; the audit
/// log holds a handful of entries whose counts add up to exactly 2,000, split as the answers
/// were. After the advised delay the peer is answered as before.
async fn a_flood_of_bad_tokens_is_limited_and_audited_in_aggregate(app: TestApp) {
    let started = Instant::now();
    let answers: Vec<tonic::Status> = futures::stream::iter(0..FLOOD)
        .map(|i| {
            let app = &app;
            async move { register_with_bad_token(app, 1_000 + i as u64).await }
        })
        .buffered(16)
        .collect()
        .await;
    let elapsed = started.elapsed();

    // The budget: a burst, then a refill at the sustained rate while the flood lasts.
    let budget = AuthSettings::default().denied_rate_limit();
    let most = f64::from(budget.burst.get())
        + f64::from(budget.per_second.get()) * elapsed.as_secs_f64()
        + 1.0;
    let unauthenticated = answers
        .iter()
        .filter(|s| s.code() == Code::Unauthenticated)
        .count();
    assert!(
        unauthenticated >= budget.burst.get() as usize && (unauthenticated as f64) <= most,
        "{unauthenticated} of {FLOOD} answered UNAUTHENTICATED in {elapsed:?}"
    );
    let limited: Vec<&tonic::Status> = answers
        .iter()
        .filter(|s| s.code() != Code::Unauthenticated)
        .collect();
    assert!(!limited.is_empty(), "nothing limited in {elapsed:?}");
    let mut delay = Duration::ZERO;
    for status in &limited {
        delay = assert_peer_limited(status);
    }

    // The audit log: a few entries per interval, not a row per call.
    let entries = refused_entries(&app, FLOOD as i64).await;
    let total: i64 = entries.iter().map(|e| e.count).sum();
    assert_eq!(total, FLOOD as i64, "{entries:#?}");
    let counted = |code: &str| -> i64 {
        entries
            .iter()
            .filter(|e| e.outcome_code == code)
            .map(|e| e.count)
            .sum()
    };
    assert_eq!(counted("UNAUTHENTICATED"), unauthenticated as i64);
    assert_eq!(counted("RESOURCE_EXHAUSTED"), limited.len() as i64);
    // At most one entry per outcome per interval the flood was written in.
    let intervals = elapsed.as_millis() / DENIAL_AUDIT_INTERVAL.as_millis() + 2;
    assert!(
        entries.len() as u128 <= 2 * intervals && entries.len() < FLOOD / 10,
        "{} entries for a flood of {elapsed:?}: {entries:#?}",
        entries.len()
    );
    for e in &entries {
        assert_eq!(e.peer_address, "127.0.0.1", "{e:?}");
        assert!(e.request_id.is_empty() && e.resource_id.is_empty(), "{e:?}");
        assert!(
            e.outcome_code == "UNAUTHENTICATED" || e.outcome_code == "RESOURCE_EXHAUSTED",
            "{e:?}"
        );
    }
    // Nobody was registered.
    let partners = app
        .partners()
        .list_partners(r#as("viewer", pb::ListPartnersRequest::default()))
        .await
        .expect("list partners")
        .into_inner()
        .partners;
    assert!(partners.is_empty(), "{partners:?}");

    // After the delay it advised, the peer's refused calls are answered as such again.
    tokio::time::sleep(delay + Duration::from_millis(20)).await;
    let status = register_with_bad_token(&app, 1).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

on_both_databases!(
    a_flood_of_bad_tokens_is_limited_and_audited_in_aggregate,
    settings = guarded,
    a_flood_of_bad_tokens_is_limited_and_audited_in_aggregate
);

/// While its address is over the budget of refused calls, a good principal on the same
/// address (the same connection, even) is answered and audited call by call.
async fn a_good_principal_behind_a_flooding_address_is_not_limited(app: TestApp) {
    // Use up the address's budget of refused calls.
    let probe = || async {
        app.partners()
            .get_partner(authed(
                Some(BAD_TOKEN),
                pb::GetPartnerRequest {
                    partner_id: uuid::Uuid::now_v7().to_string(),
                },
            ))
            .await
            .expect_err("a bad token is refused")
    };
    let mut request_ids = Vec::new();
    for seed in 0..3 {
        // Refused calls until the address is over its budget (it refills as time passes)...
        let mut refused = 0;
        loop {
            let status = probe().await;
            refused += 1;
            if status.code() == Code::ResourceExhausted {
                assert_peer_limited(&status);
                break;
            }
            assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
            assert!(refused <= 200, "the address was never limited");
        }
        // ...then the good principal's call goes through.
        let request_id = request_id();
        app.partners()
            .register_partner(r#as(
                "registrar",
                pb::RegisterPartnerRequest {
                    request_id: request_id.clone(),
                    partner: Some(partner(seed)),
                },
            ))
            .await
            .expect("an allowed call from a limited address");
        request_ids.push(request_id);
    }

    // Each allowed call has an entry of its own.
    let auditor = token("auditor");
    let events = eventually(10, || async {
        let events = audit_events(&app, Some(&auditor)).await.expect("audit log");
        request_ids
            .iter()
            .all(|rid| events.iter().any(|e| &e.request_id == rid))
            .then_some(events)
    })
    .await;
    for rid in &request_ids {
        let of_call: Vec<_> = events.iter().filter(|e| &e.request_id == rid).collect();
        assert_eq!(of_call.len(), 1, "{events:#?}");
        let e = of_call[0];
        assert_eq!(e.count, 1, "{e:?}");
        assert_eq!(e.principal, "registrar");
        assert_eq!(e.method, REGISTER);
        assert_eq!(e.outcome_code, "OK");
        assert!(e.peer_address.starts_with("127.0.0.1:"), "{e:?}");
    }
    // The probes were not mutating calls: none of them is in the audit log.
    assert!(
        events.iter().all(|e| !e.method.ends_with("/GetPartner")),
        "{events:#?}"
    );
}

on_both_databases!(
    a_good_principal_behind_a_flooding_address_is_not_limited,
    settings = guarded,
    a_good_principal_behind_a_flooding_address_is_not_limited
);
