//! Who is calling: a bearer token or a client certificate, checked against the configured
//! principals (or everyone is `local-dev` in local development mode).

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use http::header::AUTHORIZATION;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::identity::{PeerCertificate, SubjectPattern};
use super::ratelimit::{PeerRateLimiter, PrincipalRateLimiter, RateLimit};
use super::roles::Role;
use super::settings::{AuthSettings, SettingsError};
use crate::principal::Principal;

/// An authenticated caller: its name and roles.
#[derive(Clone, PartialEq, Eq)]
pub struct Caller {
    name: Arc<str>,
    roles: u8,
}

impl Caller {
    fn new(name: &str, roles: &[Role]) -> Self {
        Self {
            name: Arc::from(name),
            roles: roles.iter().fold(0, |bits, r| bits | r.bit()),
        }
    }

    /// The principal's name, as in the settings (or `local-dev`).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn has_role(&self, role: Role) -> bool {
        self.roles & role.bit() != 0
    }

    pub fn roles(&self) -> Vec<Role> {
        Role::ALL
            .into_iter()
            .filter(|r| self.has_role(*r))
            .collect()
    }

    pub(crate) fn key(&self) -> &Arc<str> {
        &self.name
    }
}

impl fmt::Debug for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Caller")
            .field("name", &self.name)
            .field("roles", &self.roles())
            .finish()
    }
}

/// Why a caller could not be identified. The messages never include credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "no credentials: send `authorization: Bearer <token>` or connect with a client certificate"
    )]
    MissingCredentials,
    #[error("the authorization header must be exactly one `Bearer <token>`")]
    MalformedAuthorization,
    #[error("the bearer token is not recognised")]
    UnknownToken,
    #[error("the client certificate names no configured principal")]
    UnknownCertificate,
    #[error("the client certificate names more than one configured principal")]
    AmbiguousCertificate,
}

struct Known {
    caller: Caller,
    token_sha256: Option<[u8; 32]>,
    subject: Option<SubjectPattern>,
}

enum Mode {
    LocalDev(Caller),
    Configured(Vec<Known>),
}

/// Identifies callers and holds their rate limits. Build it once at start-up and share it.
pub struct Authenticator {
    mode: Mode,
    limiter: Option<PrincipalRateLimiter>,
    /// Refused calls per peer address: on in every mode, since anyone who can connect can
    /// make calls that are refused.
    refused: PeerRateLimiter,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Authenticator");
        match &self.mode {
            Mode::LocalDev(_) => d.field("mode", &"local-dev"),
            Mode::Configured(known) => d.field(
                "principals",
                &known.iter().map(|k| k.caller.name()).collect::<Vec<_>>(),
            ),
        };
        d.field("rate_limit", &self.limiter.as_ref().map(|l| l.limit()))
            .field("denied_rate_limit", &self.refused.limit())
            .finish()
    }
}

impl Authenticator {
    /// From a validated `[auth]` table, rate limited as it says.
    pub fn from_settings(settings: &AuthSettings) -> Result<Self, SettingsError> {
        let valid = settings.validated()?;
        let known = valid
            .into_iter()
            .map(|p| Known {
                caller: Caller::new(&p.name, &p.roles),
                token_sha256: p.token_sha256,
                subject: p
                    .client_cert_subject
                    .as_deref()
                    .and_then(|s| SubjectPattern::parse(s).ok()),
            })
            .collect();
        Ok(Self {
            mode: Mode::Configured(known),
            limiter: Some(PrincipalRateLimiter::new(RateLimit::new(
                settings.rate_limit_per_second,
                settings.rate_limit_burst,
            ))),
            refused: PeerRateLimiter::new(settings.denied_rate_limit()),
        })
    }

    /// Local development mode: every caller is `local-dev` with every role; no rate limit,
    /// so tests and scripts on a laptop are never throttled. Refused calls (unknown methods)
    /// are still limited per peer, as by default.
    pub fn local_dev() -> Self {
        Self {
            mode: Mode::LocalDev(Caller::new(Principal::LOCAL_DEV, &Role::ALL)),
            limiter: None,
            refused: PeerRateLimiter::new(AuthSettings::default().denied_rate_limit()),
        }
    }

    /// Replaces the rate limit (or removes it with `None`).
    pub fn with_rate_limit(mut self, limit: Option<RateLimit>) -> Self {
        self.limiter = limit.map(PrincipalRateLimiter::new);
        self
    }

    /// Replaces the limit of refused calls per peer address.
    pub fn with_denied_rate_limit(mut self, limit: RateLimit) -> Self {
        self.refused = PeerRateLimiter::new(limit);
        self
    }

    pub fn is_local_dev(&self) -> bool {
        matches!(self.mode, Mode::LocalDev(_))
    }

    /// Names the caller from the request headers and the TLS peer's leaf certificate (DER).
    ///
    /// A bearer token, when sent, decides alone: an unknown token is refused even if the
    /// certificate would have named someone, so a caller never silently acts as another.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        peer_certificate: Option<&[u8]>,
    ) -> Result<Caller, AuthError> {
        let known = match &self.mode {
            Mode::LocalDev(caller) => return Ok(caller.clone()),
            Mode::Configured(known) => known,
        };
        let mut values = headers.get_all(AUTHORIZATION).iter();
        if let Some(value) = values.next() {
            if values.next().is_some() {
                return Err(AuthError::MalformedAuthorization);
            }
            let token = bearer_token(value.as_bytes()).ok_or(AuthError::MalformedAuthorization)?;
            let digest: [u8; 32] = Sha256::digest(token).into();
            // Compare against every entry, in constant time each, so timing says nothing
            // about which or how many hashes share a prefix with the presented one.
            let mut found = None;
            for k in known {
                if let Some(expected) = &k.token_sha256
                    && bool::from(expected.ct_eq(&digest))
                {
                    found = Some(&k.caller);
                }
            }
            return found.cloned().ok_or(AuthError::UnknownToken);
        }
        let Some(der) = peer_certificate else {
            return Err(AuthError::MissingCredentials);
        };
        let cert = PeerCertificate::from_der(der).ok_or(AuthError::UnknownCertificate)?;
        let mut matching = known
            .iter()
            .filter(|k| k.subject.as_ref().is_some_and(|s| s.matches(&cert)));
        match (matching.next(), matching.next()) {
            (Some(k), None) => Ok(k.caller.clone()),
            (None, _) => Err(AuthError::UnknownCertificate),
            (Some(_), Some(_)) => Err(AuthError::AmbiguousCertificate),
        }
    }

    /// Takes one call from the caller's budget, or says how long to wait.
    pub fn check_rate(&self, caller: &Caller) -> Result<(), Duration> {
        match &self.limiter {
            Some(limiter) => limiter.check(caller.key()),
            None => Ok(()),
        }
    }

    /// Takes one refused call from the budget of the peer address that made it, or says how
    /// long until the peer's refused calls are answered as such again.
    pub fn check_refused_rate(&self, peer: Option<IpAddr>) -> Result<(), Duration> {
        self.refused.check(&peer.into())
    }

    /// Forgets the peers refused long enough ago that their budget is whole again; call it
    /// periodically so that the state holds only recent refusers.
    pub fn forget_quiet_peers(&self) {
        self.refused.forget_quiet();
    }
}

/// The token of `Bearer <token>` (scheme case-insensitive), if that is what `value` is.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && !token.contains(' '))
        .then_some(token.as_bytes())
}

#[cfg(test)]
impl Authenticator {
    /// Two principals under the default limits: `claims-intake` (registrar; token
    /// `intake-token`, certificate `CN=claims-intake`) and `ops` (viewer and payments; token
    /// `ops-token`, certificate `ops.payouts.internal`).
    pub(crate) fn for_test() -> Self {
        use crate::auth::settings::PrincipalSettings;
        let principals = vec![
            PrincipalSettings::for_test(
                "claims-intake",
                &["registrar"],
                Some("intake-token"),
                Some("CN=claims-intake"),
            ),
            PrincipalSettings::for_test(
                "ops",
                &["viewer", "payments"],
                Some("ops-token"),
                Some("ops.payouts.internal"),
            ),
        ];
        Self::from_settings(&AuthSettings {
            principals,
            ..AuthSettings::default()
        })
        .expect("valid")
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

    use super::*;

    fn sha(token: &str) -> String {
        hex::encode(Sha256::digest(token.as_bytes()))
    }

    fn bearer(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(value).expect("ascii"));
        h
    }

    fn cert_der(cn: &str, sans: &[&str]) -> Vec<u8> {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .expect("params");
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().expect("key");
        params.self_signed(&key).expect("cert").der().to_vec()
    }

    #[test]
    fn tokens_name_their_principal() {
        let a = Authenticator::for_test();
        let c = a
            .authenticate(&bearer("Bearer intake-token"), None)
            .expect("known");
        assert_eq!(c.name(), "claims-intake");
        assert_eq!(c.roles(), vec![Role::Registrar]);
        let c = a
            .authenticate(&bearer("bearer   ops-token "), None)
            .expect("scheme is case-insensitive");
        assert_eq!(c.name(), "ops");
        assert!(c.has_role(Role::Viewer) && c.has_role(Role::Payments));
        assert!(!c.has_role(Role::Registrar));
    }

    #[test]
    fn bad_or_missing_tokens_are_refused() {
        let a = Authenticator::for_test();
        // The hash itself is not a token.
        let hash = format!("Bearer {}", sha("intake-token"));
        for (header, refused) in [
            ("Bearer nope", AuthError::UnknownToken),
            ("Basic aW50YWtlLXRva2Vu", AuthError::MalformedAuthorization),
            ("intake-token", AuthError::MalformedAuthorization),
            ("Bearer ", AuthError::MalformedAuthorization),
            (hash.as_str(), AuthError::UnknownToken),
        ] {
            assert_eq!(
                a.authenticate(&bearer(header), None),
                Err(refused),
                "{header}"
            );
        }
        let mut two = bearer("Bearer intake-token");
        two.append(AUTHORIZATION, HeaderValue::from_static("Bearer ops-token"));
        assert_eq!(
            a.authenticate(&two, None),
            Err(AuthError::MalformedAuthorization)
        );
        assert_eq!(
            a.authenticate(&HeaderMap::new(), None),
            Err(AuthError::MissingCredentials)
        );
    }

    #[test]
    fn certificates_name_their_principal_by_subject_or_san() {
        let a = Authenticator::for_test();
        let c = a
            .authenticate(&HeaderMap::new(), Some(&cert_der("claims-intake", &[])))
            .expect("by subject");
        assert_eq!(c.name(), "claims-intake");
        let c = a
            .authenticate(
                &HeaderMap::new(),
                Some(&cert_der("anything", &["ops.payouts.internal"])),
            )
            .expect("by SAN");
        assert_eq!(c.name(), "ops");
        assert_eq!(
            a.authenticate(&HeaderMap::new(), Some(&cert_der("stranger", &[]))),
            Err(AuthError::UnknownCertificate)
        );
        assert_eq!(
            a.authenticate(
                &HeaderMap::new(),
                Some(&cert_der("claims-intake", &["ops.payouts.internal"]))
            ),
            Err(AuthError::AmbiguousCertificate)
        );
        assert_eq!(
            a.authenticate(&HeaderMap::new(), Some(b"junk")),
            Err(AuthError::UnknownCertificate)
        );
    }

    #[test]
    fn a_token_decides_over_a_certificate() {
        let a = Authenticator::for_test();
        let cert = cert_der("claims-intake", &[]);
        let c = a
            .authenticate(&bearer("Bearer ops-token"), Some(&cert))
            .expect("token");
        assert_eq!(c.name(), "ops");
        assert_eq!(
            a.authenticate(&bearer("Bearer wrong"), Some(&cert)),
            Err(AuthError::UnknownToken)
        );
    }

    #[test]
    fn local_dev_is_everyone_with_every_role() {
        let a = Authenticator::local_dev();
        assert!(a.is_local_dev());
        let c = a.authenticate(&HeaderMap::new(), None).expect("anyone");
        assert_eq!(c.name(), "local-dev");
        assert_eq!(c.roles(), Role::ALL.to_vec());
        for _ in 0..1000 {
            assert!(a.check_rate(&c).is_ok(), "local-dev is not rate limited");
        }
    }

    #[test]
    fn debug_shows_names_not_hashes() {
        let shown = format!("{:?}", Authenticator::for_test());
        assert!(shown.contains("claims-intake"), "{shown}");
        assert!(!shown.contains(&sha("intake-token")), "{shown}");
    }
}
