//! What every `PaymentsBackend` call to the sandbox bank goes through before it is looked at,
//! the way a real bank's gateway treats it: it is counted, refused during an outage or over the
//! rate limit, and answered only after the bank's latency. And the counts that
//! `payments.v1.SandboxLedger/GetStats` answers.

use std::num::NonZeroU32;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use governor::clock::Clock as _;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use super::{Outage, SandboxConfig, rate_limit_burst};
use crate::proto::payments::v1::GetStatsResponse;

/// The bank's latency, rate limit and outage, and its counts of calls.
pub(super) struct Traffic {
    latency: Duration,
    limit: Option<(NonZeroU32, DefaultDirectRateLimiter)>,
    outage: Option<Outage>,
    /// When the first call arrived: the outage is timed from it.
    first_call: OnceLock<Instant>,
    calls: AtomicU64,
    throttled: AtomicU64,
    unavailable: AtomicU64,
}

impl Outage {
    /// Whether a call arriving at `now` falls in the outage, the first call having arrived at
    /// `first_call`.
    pub(super) fn covers(&self, first_call: Instant, now: Instant) -> bool {
        let since = now.saturating_duration_since(first_call);
        since >= self.after && since - self.after < self.lasting
    }
}

impl Traffic {
    pub(super) fn new(config: &SandboxConfig) -> Self {
        let limit = config.rate_limit_per_s.map(|per_second| {
            let quota = Quota::per_second(per_second).allow_burst(rate_limit_burst(per_second));
            (per_second, RateLimiter::direct(quota))
        });
        Self {
            latency: config.latency,
            limit,
            outage: config.outage,
            first_call: OnceLock::new(),
            calls: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            unavailable: AtomicU64::new(0),
        }
    }

    /// Takes a call in: counts it, decides on arrival whether the bank is down or the call is
    /// over the rate limit (a refused call takes nothing from the limit), then waits out the
    /// latency, so that every answer, refusals included, takes that long.
    pub(super) async fn admit(&self) -> Result<(), Status> {
        let now = Instant::now();
        let first_call = *self.first_call.get_or_init(|| now);
        self.calls.fetch_add(1, Ordering::Relaxed);
        let verdict = if self
            .outage
            .is_some_and(|outage| outage.covers(first_call, now))
        {
            Err(self.unavailable(Status::unavailable(
                "sandbox bank is down (injected outage)",
            )))
        } else {
            self.within_limit()
        };
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        verdict
    }

    /// Takes one call from the rate limit, or refuses it with the delay until one is free.
    fn within_limit(&self) -> Result<(), Status> {
        let Some((per_second, limiter)) = &self.limit else {
            return Ok(());
        };
        limiter.check().map_err(|not_until| {
            self.throttled.fetch_add(1, Ordering::Relaxed);
            // Never "retry now": a client honouring it would spin.
            let wait = not_until
                .wait_time_from(limiter.clock().now())
                .max(Duration::from_millis(1));
            Status::with_error_details(
                Code::ResourceExhausted,
                format!(
                    "sandbox bank rate limit of {per_second} calls/s reached; retry in {} ms",
                    wait.as_millis()
                ),
                ErrorDetails::with_retry_info(Some(wait)),
            )
        })
    }

    /// Counts a call answered `UNAVAILABLE` (by the outage or an injected fault) and answers
    /// `status`.
    pub(super) fn unavailable(&self, status: Status) -> Status {
        self.unavailable.fetch_add(1, Ordering::Relaxed);
        status
    }

    pub(super) fn stats(&self) -> GetStatsResponse {
        let count = |n: &AtomicU64| i64::try_from(n.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
        GetStatsResponse {
            calls_total: count(&self.calls),
            throttled_total: count(&self.throttled),
            unavailable_total: count(&self.unavailable),
        }
    }
}
