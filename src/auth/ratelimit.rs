//! Rate limiting: a token bucket (GCRA) per caller name, and one per peer address for the
//! calls the auth layer refuses.
//!
//! Principal names come from the settings, a small fixed set, so that keyed state never grows
//! with traffic. Peer addresses are whatever connects: their state is swept of quiet peers
//! periodically ([`KeyedRateLimiter::forget_quiet`]), so it holds only recent refusers.

use std::fmt;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
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

/// One token bucket per key: a principal name ([`PrincipalRateLimiter`]) or a peer address
/// ([`PeerRateLimiter`]).
pub struct KeyedRateLimiter<K: Hash + Eq + Clone> {
    limit: RateLimit,
    limiter: DefaultKeyedRateLimiter<K>,
}

/// One bucket per principal name.
pub type PrincipalRateLimiter = KeyedRateLimiter<Arc<str>>;

/// One bucket per peer address, taken from by every call the auth layer refuses (unknown
/// credentials, a missing role, a principal over its own limit), so that a flood of refused
/// calls from one address is answered `RESOURCE_EXHAUSTED` instead of being authenticated,
/// logged and audited call by call. Allowed calls never take from it: a good principal behind
/// the same address (a NAT, a sidecar) keeps working.
pub type PeerRateLimiter = KeyedRateLimiter<PeerKey>;

impl<K: Hash + Eq + Clone> fmt::Debug for KeyedRateLimiter<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedRateLimiter")
            .field("limit", &self.limit)
            .field("keys", &self.limiter.len())
            .finish()
    }
}

impl<K: Hash + Eq + Clone> KeyedRateLimiter<K> {
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

    /// Takes one call from `key`'s bucket, or says how long until one is available.
    pub fn check(&self, key: &K) -> Result<(), Duration> {
        self.limiter.check_key(key).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.limiter.clock().now());
            // Never advise retrying "now": clients would spin.
            wait.max(Duration::from_millis(1))
        })
    }

    /// Drops the buckets of keys that have been quiet long enough to be full again (which is
    /// what a new bucket is), so the state holds only keys seen lately.
    pub fn forget_quiet(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Keys with a bucket (an estimate while calls are being checked).
    pub fn keys(&self) -> usize {
        self.limiter.len()
    }
}

/// The bucket a peer address takes from: an IPv4 address (also when written as IPv4-mapped
/// IPv6), or an IPv6 address's /64, since one host commonly holds a whole /64 and could
/// otherwise take a fresh bucket for every call. Calls from an unknown address share one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerKey(IpAddr);

impl From<Option<IpAddr>> for PeerKey {
    fn from(peer: Option<IpAddr>) -> Self {
        Self(match peer.map(|ip| ip.to_canonical()) {
            None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Some(IpAddr::V4(v4)) => IpAddr::V4(v4),
            Some(IpAddr::V6(v6)) => {
                IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !u128::from(u64::MAX)))
            }
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
    fn each_peer_address_has_its_own_bucket_whatever_its_port() {
        let limiter = PeerRateLimiter::new(RateLimit::new(1, Some(3)));
        let a: IpAddr = "192.0.2.7".parse().expect("ip");
        let b: IpAddr = "192.0.2.8".parse().expect("ip");
        for _ in 0..3 {
            assert!(limiter.check(&PeerKey::from(Some(a))).is_ok());
        }
        let wait = limiter
            .check(&PeerKey::from(Some(a)))
            .expect_err("burst used up");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        // The same host written as IPv4-mapped IPv6 is the same peer.
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().expect("ip");
        assert!(limiter.check(&PeerKey::from(Some(mapped))).is_err());
        assert!(
            limiter.check(&PeerKey::from(Some(b))).is_ok(),
            "b is not slowed by a"
        );
        assert_eq!(limiter.keys(), 2);
    }

    #[test]
    fn an_ipv6_peer_is_limited_by_its_64_prefix() {
        let limiter = PeerRateLimiter::new(RateLimit::new(1, Some(1)));
        let one: IpAddr = "2001:db8:1:2::1".parse().expect("ip");
        let same_64: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("ip");
        let other_64: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert!(limiter.check(&PeerKey::from(Some(one))).is_ok());
        assert!(limiter.check(&PeerKey::from(Some(same_64))).is_err());
        assert!(limiter.check(&PeerKey::from(Some(other_64))).is_ok());
    }

    #[test]
    fn unknown_addresses_share_one_bucket() {
        let limiter = PeerRateLimiter::new(RateLimit::new(1, Some(1)));
        assert!(limiter.check(&PeerKey::from(None)).is_ok());
        assert!(limiter.check(&PeerKey::from(None)).is_err());
    }

    #[test]
    fn quiet_peers_are_forgotten() {
        // Ten a second, no burst: a bucket is full again 100 ms after its last call.
        let limiter = PeerRateLimiter::new(RateLimit::new(10, Some(1)));
        for i in 0..500u32 {
            let ip = IpAddr::V4(Ipv4Addr::from_bits(0x0a00_0000 | i));
            assert!(limiter.check(&PeerKey::from(Some(ip))).is_ok());
        }
        assert_eq!(limiter.keys(), 500);
        std::thread::sleep(Duration::from_millis(250));
        let busy: IpAddr = "10.1.0.1".parse().expect("ip");
        assert!(limiter.check(&PeerKey::from(Some(busy))).is_ok());
        limiter.forget_quiet();
        // Only the peer whose bucket is not full again is kept.
        assert_eq!(limiter.keys(), 1);
    }

    #[test]
    fn zero_is_raised_to_one_and_burst_defaults_to_the_rate() {
        let l = RateLimit::new(0, Some(0));
        assert_eq!(l.per_second.get(), 1);
        assert_eq!(l.burst.get(), 1);
        assert_eq!(RateLimit::new(200, None).burst.get(), 200);
    }
}
