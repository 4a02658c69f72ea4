//! Authentication, authorization and limits: who may call what, and how often.
//!
//! - [`AuthSettings`] / [`TlsSettings`]: the `[auth]` and `[tls]` tables of the settings file.
//! - [`Authenticator`] + [`AuthLayer`]: one tower layer that names the caller (bearer token or
//!   client certificate), rate-limits it, checks the method's [`Role`] from [`METHOD_RULES`],
//!   and hands handlers a [`Principal`](crate::principal::Principal). Refused calls are
//!   limited per peer address ([`PeerRateLimiter`], swept by [`forget_quiet_peers`]).
//! - [`check_bind`]: local development mode (no `[auth]`) only on a loopback address.
//! - [`tls::server_tls_config`]: server TLS, with mandatory client certificates if configured.
//!
//! Sealing of account numbers at rest is not authentication; it lives in [`crate::sealing`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

mod authenticator;
mod identity;
mod layer;
mod ratelimit;
mod roles;
mod settings;
pub mod tls;

pub use authenticator::{AuthError, Authenticator, Caller};
pub use layer::{AuthLayer, AuthService, DenialSink, IgnoreDenials};
pub use ratelimit::{KeyedRateLimiter, PeerKey, PeerRateLimiter, PrincipalRateLimiter, RateLimit};
pub use roles::{
    METHOD_RULES, MethodRule, RequiredRole, Role, UnknownRole, is_mutating, method_rule,
    required_role,
};
pub use settings::{
    AuthSettings, DEFAULT_DENIAL_AUDIT_INTERVAL_MS, DEFAULT_DENIED_RATE_LIMIT_PER_SECOND,
    DEFAULT_RATE_LIMIT_PER_SECOND, PrincipalSettings, SettingsError, TlsSettings,
};

/// How often [`forget_quiet_peers`] sweeps: the state of refused peers holds at most the
/// peers refused in the last sweep interval and a refill of their budget.
const PEER_SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// Forgets, every few seconds until `stop` resolves, the peers whose budget of refused calls
/// is whole again, so the per-peer state grows with recent refusers only.
pub async fn forget_quiet_peers(authenticator: Arc<Authenticator>, stop: impl Future<Output = ()>) {
    let mut sweeps = tokio::time::interval(PEER_SWEEP_INTERVAL);
    sweeps.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = sweeps.tick() => authenticator.forget_quiet_peers(),
            () = &mut stop => return,
        }
    }
}

/// Refuses to run without authentication anywhere but on a loopback address.
///
/// Without `[auth]` every caller is `local-dev` holding every role: fine on a laptop, a hole
/// anywhere else.
pub fn check_bind(listen_addr: SocketAddr, auth_configured: bool) -> Result<(), String> {
    if auth_configured || listen_addr.ip().to_canonical().is_loopback() {
        return Ok(());
    }
    Err(format!(
        "refusing to listen on {listen_addr} without authentication. With no [auth] section \
         the service runs in local development mode, where every caller is \"local-dev\" with \
         every role, and that is only allowed on a loopback address (127.0.0.1 or [::1]). \
         Either add [[auth.principals]] to the settings file, or listen on loopback \
         (PAYOUTS_LISTEN_ADDR=127.0.0.1:{}).",
        listen_addr.port()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_dev_only_on_loopback() {
        // (address, allowed without authentication)
        for (text, loopback) in [
            ("127.0.0.1:50051", true),
            ("127.8.9.10:1", true),
            ("[::1]:50051", true),
            ("[::ffff:127.0.0.1]:5", true),
            ("0.0.0.0:50051", false),
            ("10.0.0.5:50051", false),
            ("[::]:50051", false),
            ("[2001:db8::1]:443", false),
        ] {
            let addr: SocketAddr = text.parse().expect("addr");
            assert_eq!(check_bind(addr, true), Ok(()), "{text} with auth");
            if loopback {
                assert_eq!(check_bind(addr, false), Ok(()), "{text}");
                continue;
            }
            let msg = check_bind(addr, false).expect_err(text);
            assert!(
                msg.contains(text) || msg.contains(&addr.to_string()),
                "{msg}"
            );
            assert!(msg.contains("[auth]") && msg.contains("loopback"), "{msg}");
        }
    }
}
