//! The sandbox bank's latency, rate limit and outage, served on a real socket, and the counts
//! `GetStats` answers.

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use tonic::Code;

use super::tests::{Running, get, ledger, start, submission, submit, verification, verify};
use super::{Outage, SandboxConfig};
use crate::proto::payments::v1::{GetStatsRequest, GetStatsResponse};
use crate::status::exhausted_retry_within_a_second;

const ACCOUNT: &str = "110123456789";
/// One call a second, bursts of one: whatever the method, the second call within the second
/// is over the limit.
const ONE_CALL_A_SECOND: Option<NonZeroU32> = NonZeroU32::new(1);

async fn stats(bank: &mut Running) -> GetStatsResponse {
    bank.ledger
        .get_stats(GetStatsRequest {})
        .await
        .expect("stats")
        .into_inner()
}

fn counts(stats: &GetStatsResponse) -> (i64, i64, i64) {
    (
        stats.calls_total,
        stats.throttled_total,
        stats.unavailable_total,
    )
}

#[tokio::test]
async fn over_the_rate_limit_a_call_is_throttled_with_a_retry_delay_and_nothing_applied() {
    let mut bank = start(SandboxConfig {
        rate_limit_per_s: ONE_CALL_A_SECOND,
        ..SandboxConfig::default()
    })
    .await;
    verify(&mut bank, verification(ACCOUNT))
        .await
        .expect("the first call is taken");
    let refused = submit(&mut bank, submission("k-1", 30_000, ACCOUNT))
        .await
        .expect_err("over the limit");
    let (_, delay) = exhausted_retry_within_a_second(&refused);
    assert!(ledger(&mut bank).await.is_empty(), "nothing applied");
    let look_up = get(&mut bank, "k-1").await.expect_err("over the limit");
    assert_eq!(look_up.code(), Code::ResourceExhausted);
    assert_eq!(counts(&stats(&mut bank).await), (3, 2, 0));

    // Once the delay has passed, the instruction goes through, once.
    tokio::time::sleep(delay).await;
    submit(&mut bank, submission("k-1", 30_000, ACCOUNT))
        .await
        .expect("taken after the retry delay");
    let applied = ledger(&mut bank).await;
    assert_eq!(applied.len(), 1);
    assert_eq!(applied[0].submissions, 1);
    assert_eq!(counts(&stats(&mut bank).await), (4, 2, 0));
}

#[tokio::test]
async fn every_call_takes_the_latency_refused_or_not() {
    let latency = Duration::from_millis(150);
    let mut bank = start(SandboxConfig {
        latency,
        rate_limit_per_s: ONE_CALL_A_SECOND,
        ..SandboxConfig::default()
    })
    .await;
    for expect_taken in [true, false] {
        let started = Instant::now();
        let answer = verify(&mut bank, verification(ACCOUNT)).await;
        assert!(started.elapsed() >= latency, "{:?}", started.elapsed());
        assert_eq!(answer.is_ok(), expect_taken, "{answer:?}");
    }
}

#[tokio::test]
async fn an_outage_timed_from_the_first_call_refuses_everything_then_ends() {
    let mut bank = start(SandboxConfig {
        outage: Some(Outage {
            after: Duration::from_millis(200),
            lasting: Duration::from_secs(1),
        }),
        ..SandboxConfig::default()
    })
    .await;
    let first_call = Instant::now();
    submit(&mut bank, submission("k-1", 30_000, ACCOUNT))
        .await
        .expect("before the outage");
    tokio::time::sleep_until((first_call + Duration::from_millis(250)).into()).await;
    for key in ["k-1", "k-2"] {
        let refused = submit(&mut bank, submission(key, 30_000, ACCOUNT))
            .await
            .expect_err("during the outage");
        assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    }
    let refused = verify(&mut bank, verification(ACCOUNT)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    tokio::time::sleep_until((first_call + Duration::from_millis(1_300)).into()).await;
    submit(&mut bank, submission("k-2", 30_000, ACCOUNT))
        .await
        .expect("after the outage");

    let applied = ledger(&mut bank).await;
    let submissions: Vec<(&str, i64)> = applied
        .iter()
        .map(|a| (a.idempotency_key.as_str(), a.submissions))
        .collect();
    assert_eq!(
        submissions,
        vec![("k-1", 1), ("k-2", 1)],
        "refused calls apply nothing"
    );
    assert_eq!(counts(&stats(&mut bank).await), (5, 0, 3));
}

#[test]
fn an_outage_covers_its_window_only() {
    let outage = Outage {
        after: Duration::from_millis(100),
        lasting: Duration::from_millis(50),
    };
    let t0 = Instant::now();
    let at = |ms| t0 + Duration::from_millis(ms);
    let covered: Vec<u64> = [0, 99, 100, 149, 150, 1_000]
        .into_iter()
        .filter(|&ms| outage.covers(t0, at(ms)))
        .collect();
    assert_eq!(covered, vec![100, 149]);
    let from_the_start = Outage {
        after: Duration::ZERO,
        ..outage
    };
    assert!(from_the_start.covers(t0, t0), "the first call itself");
}

#[tokio::test]
async fn injected_faults_are_counted_as_unavailable() {
    let mut bank = start(SandboxConfig {
        unavailable_per_mille: 1000,
        ..SandboxConfig::default()
    })
    .await;
    for key in ["k-1", "k-2"] {
        let refused = submit(&mut bank, submission(key, 30_000, ACCOUNT)).await;
        assert_eq!(refused.expect_err("refused").code(), Code::Unavailable);
    }
    verify(&mut bank, verification(ACCOUNT))
        .await
        .expect_err("refused");
    assert_eq!(counts(&stats(&mut bank).await), (3, 0, 3));
}
