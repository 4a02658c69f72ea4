//! The `[auth]` and `[tls]` tables of the settings file, and their validation.
//!
//! ```toml
//! [tls]                                # optional
//! cert_file = "server.pem"
//! key_file = "server.key"
//! client_ca_file = "clients-ca.pem"    # present => client certificates required
//!
//! [auth]                               # absent => local development mode (loopback only)
//! rate_limit_per_second = 200
//! rate_limit_burst = 400
//! denied_rate_limit_per_second = 20     # refused calls, per peer address
//! denied_rate_limit_burst = 40
//! denial_audit_interval_ms = 10000      # refused calls are audited in aggregate per interval
//!
//! [[auth.principals]]
//! name = "claims-intake"
//! roles = ["registrar"]
//! token_sha256 = "9f86d0..."           # and/or
//! client_cert_subject = "CN=claims-intake"
//! ```

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::identity::SubjectPattern;
use super::ratelimit::RateLimit;
use super::roles::Role;
use crate::principal::Principal;

/// Calls per second each principal may make, unless the settings say otherwise.
pub const DEFAULT_RATE_LIMIT_PER_SECOND: u32 = 200;

/// Refused calls per second each peer address may make before they are answered
/// `RESOURCE_EXHAUSTED`, unless the settings say otherwise. A client that is refused now and
/// then (a token being rotated, a missing role) never comes near it; a flood passes it at once.
pub const DEFAULT_DENIED_RATE_LIMIT_PER_SECOND: u32 = 20;

/// How often refused calls are written to the audit log, one entry per peer, principal,
/// method and outcome, unless the settings say otherwise.
pub const DEFAULT_DENIAL_AUDIT_INTERVAL_MS: u64 = 10_000;

fn default_rate_limit_per_second() -> u32 {
    DEFAULT_RATE_LIMIT_PER_SECOND
}

fn default_denied_rate_limit_per_second() -> u32 {
    DEFAULT_DENIED_RATE_LIMIT_PER_SECOND
}

fn default_denial_audit_interval_ms() -> u64 {
    DEFAULT_DENIAL_AUDIT_INTERVAL_MS
}

/// The `[auth]` table. Its presence turns local development mode off.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// Who may call, and with which roles.
    #[serde(default)]
    pub principals: Vec<PrincipalSettings>,
    /// Sustained calls per second allowed to each principal.
    #[serde(default = "default_rate_limit_per_second")]
    pub rate_limit_per_second: u32,
    /// Calls a principal may make at once after being idle; unset: `rate_limit_per_second`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_burst: Option<u32>,
    /// Sustained refused calls per second allowed to each peer address (an IPv6 peer: its
    /// /64); past it the peer's refused calls are answered `RESOURCE_EXHAUSTED`. Allowed calls
    /// are never counted or limited by it.
    #[serde(default = "default_denied_rate_limit_per_second")]
    pub denied_rate_limit_per_second: u32,
    /// Refused calls a peer may make at once; unset: twice `denied_rate_limit_per_second`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denied_rate_limit_burst: Option<u32>,
    /// Refused calls are written to the audit log every this many milliseconds, one entry per
    /// peer address, principal, method and outcome, with the number of calls it stands for.
    #[serde(default = "default_denial_audit_interval_ms")]
    pub denial_audit_interval_ms: u64,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            principals: Vec::new(),
            rate_limit_per_second: DEFAULT_RATE_LIMIT_PER_SECOND,
            rate_limit_burst: None,
            denied_rate_limit_per_second: DEFAULT_DENIED_RATE_LIMIT_PER_SECOND,
            denied_rate_limit_burst: None,
            denial_audit_interval_ms: DEFAULT_DENIAL_AUDIT_INTERVAL_MS,
        }
    }
}

impl fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthSettings")
            .field("principals", &self.principals)
            .field("rate_limit_per_second", &self.rate_limit_per_second)
            .field("rate_limit_burst", &self.rate_limit_burst)
            .field(
                "denied_rate_limit_per_second",
                &self.denied_rate_limit_per_second,
            )
            .field("denied_rate_limit_burst", &self.denied_rate_limit_burst)
            .field("denial_audit_interval_ms", &self.denial_audit_interval_ms)
            .finish()
    }
}

/// One `[[auth.principals]]` entry: a caller, its roles, and how it proves who it is.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalSettings {
    /// The name recorded in the audit log and seen by handlers as [`Principal`].
    pub name: String,
    /// Role names: `registrar`, `reviewer`, `payments`, `viewer`, `auditor`.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Lowercase or uppercase hex SHA-256 of the bearer token (never the token itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
    /// The client certificate's subject DN (`CN=claims-intake`, `CN=x, O=y`, in either order),
    /// or, if it has no `=`, a DNS name in the certificate's subject alternative names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_subject: Option<String>,
}

// Someone may paste a raw token where its hash belongs; keep whatever is there out of logs.
impl fmt::Debug for PrincipalSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrincipalSettings")
            .field("name", &self.name)
            .field("roles", &self.roles)
            .field(
                "token_sha256",
                &self.token_sha256.as_ref().map(|_| "<redacted>"),
            )
            .field("client_cert_subject", &self.client_cert_subject)
            .finish()
    }
}

/// The `[tls]` table: the server's certificate, and optionally the CA that signs client
/// certificates (which makes presenting one mandatory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM: the server certificate, then any intermediates.
    pub cert_file: PathBuf,
    /// PEM: the server's private key.
    pub key_file: PathBuf,
    /// PEM: the CA(s) whose client certificates are accepted. Present: mutual TLS, required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
}

/// Everything wrong with the `[auth]`/`[tls]` settings, one problem per entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("settings: {}", .0.join("; "))]
pub struct SettingsError(pub Vec<String>);

/// A principal entry after validation.
#[derive(Clone)]
pub(crate) struct ValidPrincipal {
    pub name: String,
    pub roles: Vec<Role>,
    pub token_sha256: Option<[u8; 32]>,
    pub client_cert_subject: Option<String>,
}

impl AuthSettings {
    /// How many refused calls each peer address may make.
    pub fn denied_rate_limit(&self) -> RateLimit {
        let burst = self
            .denied_rate_limit_burst
            .unwrap_or(self.denied_rate_limit_per_second.saturating_mul(2));
        RateLimit::new(self.denied_rate_limit_per_second, Some(burst))
    }

    /// How often refused calls are written to the audit log.
    pub fn denial_audit_interval(&self) -> Duration {
        Duration::from_millis(self.denial_audit_interval_ms.max(1))
    }

    /// Checks every entry; the error names each bad principal and key.
    pub fn validate(&self) -> Result<(), SettingsError> {
        self.validated().map(|_| ())
    }

    /// Checks the `[auth]` table together with `[tls]`: principals identified by certificate
    /// need `tls.client_ca_file`, or they could never authenticate.
    pub fn validate_with_tls(&self, tls: Option<&TlsSettings>) -> Result<(), SettingsError> {
        let mut problems = match self.validated() {
            Ok(_) => Vec::new(),
            Err(SettingsError(p)) => p,
        };
        let mutual_tls = tls.is_some_and(|t| t.client_ca_file.is_some());
        if !mutual_tls {
            for p in &self.principals {
                if p.client_cert_subject.is_some() {
                    problems.push(format!(
                        "auth.principals {:?}: client_cert_subject needs tls.client_ca_file \
                         (client certificates are only asked for with mutual TLS)",
                        p.name
                    ));
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(SettingsError(problems))
        }
    }

    pub(crate) fn validated(&self) -> Result<Vec<ValidPrincipal>, SettingsError> {
        let mut problems = self.limit_problems();
        if self.principals.is_empty() {
            problems.push(
                "auth.principals is empty: with an [auth] table nobody could call the service; \
                 add [[auth.principals]] entries, or remove [auth] for local development"
                    .to_owned(),
            );
        }
        let mut valid = Vec::with_capacity(self.principals.len());
        for i in 0..self.principals.len() {
            let before = problems.len();
            let principal = self.validated_principal(i, &mut problems);
            if problems.len() == before {
                valid.push(principal);
            }
        }
        if problems.is_empty() {
            Ok(valid)
        } else {
            Err(SettingsError(problems))
        }
    }

    /// What is wrong with the rate limits and the denial audit interval.
    fn limit_problems(&self) -> Vec<String> {
        [
            ("rate_limit_per_second", self.rate_limit_per_second == 0),
            ("rate_limit_burst", self.rate_limit_burst == Some(0)),
            (
                "denied_rate_limit_per_second",
                self.denied_rate_limit_per_second == 0,
            ),
            (
                "denied_rate_limit_burst",
                self.denied_rate_limit_burst == Some(0),
            ),
            (
                "denial_audit_interval_ms",
                self.denial_audit_interval_ms == 0,
            ),
        ]
        .into_iter()
        .filter(|(_, zero)| *zero)
        .map(|(key, _)| format!("auth.{key} must be at least 1"))
        .collect()
    }

    /// The `i`th principal entry as validated; what is wrong with it goes to `problems`,
    /// checked against the entries before it for names, tokens and subjects used twice.
    fn validated_principal(&self, i: usize, problems: &mut Vec<String>) -> ValidPrincipal {
        let p = &self.principals[i];
        let earlier = &self.principals[..i];
        let who = if p.name.trim().is_empty() {
            format!("auth.principals[{i}]")
        } else {
            format!("auth.principals {:?}", p.name)
        };
        if let Some(problem) = name_problem(&p.name, earlier) {
            problems.push(format!("{who}: {problem}"));
        }
        let roles = parse_roles(&p.roles, &who, problems);
        let token_sha256 = p
            .token_sha256
            .as_deref()
            .and_then(|hex| parse_token_digest(hex, earlier, &who, problems));
        let client_cert_subject = p
            .client_cert_subject
            .as_deref()
            .and_then(|subject| parse_subject(subject, earlier, &who, problems));
        if p.token_sha256.is_none() && p.client_cert_subject.is_none() {
            problems.push(format!(
                "{who}: set token_sha256 or client_cert_subject (or both); without either \
                 the principal cannot authenticate"
            ));
        }
        ValidPrincipal {
            name: p.name.clone(),
            roles,
            token_sha256,
            client_cert_subject,
        }
    }
}

/// What is wrong with a principal's name, given the entries before it.
fn name_problem(name: &str, earlier: &[PrincipalSettings]) -> Option<String> {
    if name.trim().is_empty() {
        Some("name must not be empty".to_owned())
    } else if name != name.trim() {
        Some("name must not start or end with whitespace".to_owned())
    } else if [Principal::LOCAL_DEV, Principal::RESEAL].contains(&name) {
        Some(format!(
            "name {name:?} is reserved (local development mode, `partner-payouts reseal`)"
        ))
    } else if earlier.iter().any(|q| q.name == name) {
        Some("name is used by more than one principal".to_owned())
    } else {
        None
    }
}

/// The roles named, each once, in the order first named.
fn parse_roles(names: &[String], who: &str, problems: &mut Vec<String>) -> Vec<Role> {
    if names.is_empty() {
        problems.push(format!(
            "{who}: roles must name at least one of registrar, reviewer, payments, viewer, \
             auditor"
        ));
    }
    let mut roles = Vec::new();
    for r in names {
        match r.parse::<Role>() {
            Ok(role) if !roles.contains(&role) => roles.push(role),
            Ok(_) => {}
            Err(e) => problems.push(format!("{who}: roles: {e}")),
        }
    }
    roles
}

/// The token digest of a principal; `None` if it is malformed. One used by an earlier entry
/// is a problem, but still the digest.
fn parse_token_digest(
    hex: &str,
    earlier: &[PrincipalSettings],
    who: &str,
    problems: &mut Vec<String>,
) -> Option<[u8; 32]> {
    let Some(digest) = parse_sha256_hex(hex) else {
        // The value is not echoed: it may be the token itself, pasted by mistake.
        problems.push(format!(
            "{who}: token_sha256 must be 64 hexadecimal digits, the SHA-256 of the token \
             (e.g. `printf %s \"$TOKEN\" | sha256sum`), not the token"
        ));
        return None;
    };
    let taken = earlier.iter().any(|q| {
        q.token_sha256
            .as_deref()
            .and_then(parse_sha256_hex)
            .is_some_and(|d| d == digest)
    });
    if taken {
        problems.push(format!(
            "{who}: token_sha256 is the same as another principal's; each token must name one \
             principal"
        ));
    }
    Some(digest)
}

/// The client-certificate subject of a principal; `None` if it is empty or malformed. One
/// used by an earlier entry is a problem, but still the subject.
fn parse_subject(
    subject: &str,
    earlier: &[PrincipalSettings],
    who: &str,
    problems: &mut Vec<String>,
) -> Option<String> {
    if subject.trim().is_empty() {
        problems.push(format!("{who}: client_cert_subject must not be empty"));
        return None;
    }
    let pattern = match SubjectPattern::parse(subject) {
        Ok(pattern) => pattern,
        Err(e) => {
            problems.push(format!("{who}: client_cert_subject: {e}"));
            return None;
        }
    };
    let taken = earlier.iter().any(|q| {
        q.client_cert_subject
            .as_deref()
            .and_then(|t| SubjectPattern::parse(t).ok())
            .is_some_and(|other| other == pattern)
    });
    if taken {
        problems.push(format!(
            "{who}: client_cert_subject is the same as another principal's; each certificate \
             must name one principal"
        ));
    }
    Some(subject.to_owned())
}

#[cfg(test)]
impl PrincipalSettings {
    /// A principal entry for tests; `token`, if any, is stored as its SHA-256.
    pub(crate) fn for_test(
        name: &str,
        roles: &[&str],
        token: Option<&str>,
        client_cert_subject: Option<&str>,
    ) -> Self {
        use sha2::Digest as _;
        Self {
            name: name.into(),
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
            token_sha256: token.map(|t| hex::encode(sha2::Sha256::digest(t.as_bytes()))),
            client_cert_subject: client_cert_subject.map(str::to_owned),
        }
    }
}

/// 32 bytes from 64 hex digits, or `None`.
fn parse_sha256_hex(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH_OF_TEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn principal(name: &str, roles: &[&str]) -> PrincipalSettings {
        let p = PrincipalSettings::for_test(name, roles, Some("test"), None);
        assert_eq!(p.token_sha256.as_deref(), Some(HASH_OF_TEST));
        p
    }

    fn settings(principals: Vec<PrincipalSettings>) -> AuthSettings {
        AuthSettings {
            principals,
            ..AuthSettings::default()
        }
    }

    fn problems(s: &AuthSettings) -> String {
        s.validate().expect_err("invalid").to_string()
    }

    #[test]
    fn parses_the_documented_shape() {
        #[derive(Deserialize)]
        struct File {
            tls: Option<TlsSettings>,
            auth: Option<AuthSettings>,
        }
        let file: File = toml::from_str(
            r#"
            [tls]
            cert_file = "server.pem"
            key_file = "server.key"
            client_ca_file = "clients-ca.pem"

            [[auth.principals]]
            name = "claims-intake"
            roles = ["registrar"]
            token_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
            client_cert_subject = "CN=claims-intake"

            [[auth.principals]]
            name = "ops"
            roles = ["viewer", "payments"]
            client_cert_subject = "ops.payouts.internal"
            "#,
        )
        .expect("parses");
        let tls = file.tls.expect("tls");
        assert_eq!(tls.client_ca_file, Some(PathBuf::from("clients-ca.pem")));
        let auth = file.auth.expect("auth");
        assert_eq!(auth.rate_limit_per_second, DEFAULT_RATE_LIMIT_PER_SECOND);
        assert_eq!(auth.rate_limit_burst, None);
        let denied = auth.denied_rate_limit();
        assert_eq!(
            denied.per_second.get(),
            DEFAULT_DENIED_RATE_LIMIT_PER_SECOND
        );
        assert_eq!(denied.burst.get(), 2 * DEFAULT_DENIED_RATE_LIMIT_PER_SECOND);
        assert_eq!(
            auth.denial_audit_interval(),
            Duration::from_millis(DEFAULT_DENIAL_AUDIT_INTERVAL_MS)
        );
        assert_eq!(auth.principals.len(), 2);
        auth.validate_with_tls(Some(&tls)).expect("valid");
        let valid = auth.validated().expect("valid");
        assert_eq!(valid[1].roles, vec![Role::Viewer, Role::Payments]);
    }

    /// An `[auth]` table as a settings file has it: the keys `top`, then one principal, "x", a
    /// viewer, whose credential is the line `credential`.
    fn auth_file(top: &str, credential: &str) -> Result<AuthSettings, toml::de::Error> {
        toml::from_str(&format!(
            "{top}\n[[principals]]\nname = \"x\"\nroles = [\"viewer\"]\n{credential}\n"
        ))
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = auth_file("", r#"token_sha265 = "00""#).expect_err("typo");
        assert!(err.to_string().contains("token_sha265"), "{err}");
    }

    #[test]
    fn unknown_role_names_the_principal_and_the_key() {
        let msg = problems(&settings(vec![principal("claims-intake", &["admin"])]));
        assert!(
            msg.contains(r#"auth.principals "claims-intake": roles: unknown role "admin""#),
            "{msg}"
        );
        assert!(
            msg.contains("registrar, reviewer, payments, viewer, auditor"),
            "{msg}"
        );
    }

    #[test]
    fn malformed_sha256_names_the_principal_and_the_key_but_not_the_value() {
        let mut p = principal("claims-intake", &["registrar"]);
        p.token_sha256 = Some("s3cr3t-token-pasted-here".into());
        let msg = problems(&settings(vec![p]));
        assert!(
            msg.contains(r#"auth.principals "claims-intake": token_sha256 must be 64 hex"#),
            "{msg}"
        );
        assert!(!msg.contains("s3cr3t"), "{msg}");
        let mut p = principal("claims-intake", &["registrar"]);
        p.token_sha256 = Some("zz".repeat(32));
        assert!(problems(&settings(vec![p])).contains("token_sha256"));
        let mut p = principal("claims-intake", &["registrar"]);
        p.token_sha256 = Some(HASH_OF_TEST.to_uppercase());
        settings(vec![p]).validate().expect("uppercase hex is fine");
    }

    #[test]
    fn a_principal_needs_a_token_or_a_subject() {
        let mut p = principal("claims-intake", &["registrar"]);
        p.token_sha256 = None;
        let msg = problems(&settings(vec![p]));
        assert!(
            msg.contains(
                r#"auth.principals "claims-intake": set token_sha256 or client_cert_subject"#
            ),
            "{msg}"
        );
    }

    #[test]
    fn names_roles_and_credentials_must_be_unambiguous() {
        let mut other = principal("claims-intake", &["viewer"]);
        other.token_sha256 = Some(HASH_OF_TEST.to_uppercase());
        let msg = problems(&settings(vec![
            principal("claims-intake", &["registrar"]),
            other,
        ]));
        assert!(
            msg.contains("name is used by more than one principal"),
            "{msg}"
        );
        assert!(msg.contains("token_sha256 is the same as another"), "{msg}");

        let mut a = principal("a", &["viewer"]);
        a.client_cert_subject = Some("CN=a, O=Payouts".into());
        let mut b = principal("b", &["viewer"]);
        b.token_sha256 = None;
        b.client_cert_subject = Some("O=Payouts,CN=a".into());
        let msg = problems(&settings(vec![a, b]));
        assert!(
            msg.contains(r#"auth.principals "b": client_cert_subject is the same"#),
            "{msg}"
        );

        let msg = problems(&settings(vec![principal("", &["viewer"])]));
        assert!(
            msg.contains("auth.principals[0]: name must not be empty"),
            "{msg}"
        );
        for reserved in ["local-dev", "reseal"] {
            let msg = problems(&settings(vec![principal(reserved, &["viewer"])]));
            assert!(msg.contains("reserved"), "{msg}");
        }
        let msg = problems(&settings(vec![principal("x", &[])]));
        assert!(
            msg.contains(r#"auth.principals "x": roles must name"#),
            "{msg}"
        );
        let msg = problems(&settings(vec![]));
        assert!(msg.contains("auth.principals is empty"), "{msg}");
    }

    #[test]
    fn rate_limits_must_be_positive() {
        let mut s = settings(vec![principal("x", &["viewer"])]);
        s.rate_limit_per_second = 0;
        s.rate_limit_burst = Some(0);
        s.denied_rate_limit_per_second = 0;
        s.denied_rate_limit_burst = Some(0);
        s.denial_audit_interval_ms = 0;
        let msg = problems(&s);
        assert!(msg.contains("auth.rate_limit_per_second"), "{msg}");
        assert!(msg.contains("auth.rate_limit_burst"), "{msg}");
        assert!(msg.contains("auth.denied_rate_limit_per_second"), "{msg}");
        assert!(msg.contains("auth.denied_rate_limit_burst"), "{msg}");
        assert!(msg.contains("auth.denial_audit_interval_ms"), "{msg}");
    }

    #[test]
    fn the_denied_rate_limit_and_audit_interval_are_read_from_the_file() {
        let top = "denied_rate_limit_per_second = 5\n\
                   denied_rate_limit_burst = 7\n\
                   denial_audit_interval_ms = 250";
        let auth = auth_file(top, &format!("token_sha256 = \"{HASH_OF_TEST}\"")).expect("parses");
        auth.validate().expect("valid");
        assert_eq!(auth.denied_rate_limit(), RateLimit::new(5, Some(7)));
        assert_eq!(auth.denial_audit_interval(), Duration::from_millis(250));
    }

    #[test]
    fn certificate_principals_need_mutual_tls() {
        let mut p = principal("claims-intake", &["registrar"]);
        p.client_cert_subject = Some("CN=claims-intake".into());
        let s = settings(vec![p]);
        let msg = s.validate_with_tls(None).expect_err("no tls").to_string();
        assert!(
            msg.contains(
                r#"auth.principals "claims-intake": client_cert_subject needs tls.client_ca_file"#
            ),
            "{msg}"
        );
        let server_only = TlsSettings {
            cert_file: "s.pem".into(),
            key_file: "s.key".into(),
            client_ca_file: None,
        };
        assert!(s.validate_with_tls(Some(&server_only)).is_err());
        let mutual = TlsSettings {
            client_ca_file: Some("ca.pem".into()),
            ..server_only
        };
        s.validate_with_tls(Some(&mutual)).expect("valid");
    }

    #[test]
    fn debug_hides_token_hashes() {
        let s = settings(vec![principal("x", &["viewer"])]);
        let shown = format!("{s:?}");
        assert!(!shown.contains(HASH_OF_TEST), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }
}
