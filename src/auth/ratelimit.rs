//! Per-principal rate limiting: a token bucket (GCRA) per caller name.
//!
//! Keys are principal names from the settings, a small fixed set, so the keyed state never
//! grows with traffic.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// How fast one principal may call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Sustained calls per second.
    pub per_second: NonZeroU32,
    /// Calls allowed back to back after a quiet period.
    pub burst: NonZeroU32,
}

impl RateLimit {
    /// `per_second` sustained, bursts of `burst` (at least 1 each; zero is raised to 1).
    pub fn new(per_second: u32, burst: Option<u32>) -> Self {
        let per_second = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
        let burst = burst.and_then(NonZeroU32::new).unwrap_or(per_second);
        Self { per_second, burst }
    }
}

/// One bucket per principal name.
pub struct PrincipalRateLimiter {
    limit: RateLimit,
    limiter: DefaultKeyedRateLimiter<Arc<str>>,
}

impl fmt::Debug for PrincipalRateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrincipalRateLimiter")
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl PrincipalRateLimiter {
    pub fn new(limit: RateLimit) -> Self {
        let quota = Quota::per_second(limit.per_second).allow_burst(limit.burst);
        Self {
            limit,
            limiter: RateLimiter::keyed(quota),
        }
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Takes one call from `principal`'s bucket, or says how long until one is available.
    pub fn check(&self, principal: &Arc<str>) -> Result<(), Duration> {
        self.limiter.check_key(principal).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.limiter.clock().now());
            // Never advise retrying "now": clients would spin.
            wait.max(Duration::from_millis(1))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_principal_has_its_own_bucket() {
        let limiter = PrincipalRateLimiter::new(RateLimit::new(1, Some(2)));
        let a: Arc<str> = Arc::from("a");
        let b: Arc<str> = Arc::from("b");
        assert!(limiter.check(&a).is_ok());
        assert!(limiter.check(&a).is_ok());
        let wait = limiter.check(&a).expect_err("burst used up");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(limiter.check(&b).is_ok(), "b is not slowed by a");
    }

    #[test]
    fn zero_is_raised_to_one_and_burst_defaults_to_the_rate() {
        let l = RateLimit::new(0, Some(0));
        assert_eq!(l.per_second.get(), 1);
        assert_eq!(l.burst.get(), 1);
        assert_eq!(RateLimit::new(200, None).burst.get(), 200);
    }
}
