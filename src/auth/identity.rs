//! Naming a caller from its client certificate: the subject DN or a SAN DNS name.
//!
//! Matching is structural (attribute by attribute), not on formatted strings, so a certificate
//! whose common name contains `", O=..."` cannot pass for a different distinguished name.

use std::fmt;

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::objects::{oid_registry, oid2abbrev};
use x509_parser::prelude::FromDer;

/// A configured `client_cert_subject`.
#[derive(Debug, Clone)]
pub(crate) enum SubjectPattern {
    /// `CN=claims-intake, O=Payouts`: the subject's attributes, in order (either direction).
    Dn(Vec<(String, String)>),
    /// `claims-intake.payouts.internal`: one of the certificate's SAN DNS names.
    DnsName(String),
}

impl PartialEq for SubjectPattern {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Dn(a), Self::Dn(b)) => a == b || a.iter().eq(b.iter().rev()),
            (Self::DnsName(a), Self::DnsName(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for SubjectPattern {}

impl fmt::Display for SubjectPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dn(pairs) => {
                let parts: Vec<String> = pairs.iter().map(|(t, v)| format!("{t}={v}")).collect();
                f.write_str(&parts.join(", "))
            }
            Self::DnsName(name) => f.write_str(name),
        }
    }
}

impl SubjectPattern {
    /// Parses `TYPE=value, TYPE=value` (`\,` escapes a comma in a value), or a bare DNS name.
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.contains('=') {
            let mut pairs = Vec::new();
            for part in split_unescaped(s) {
                let Some((attr, value)) = part.split_once('=') else {
                    return Err(format!(
                        "expected TYPE=value pairs like CN=claims-intake; {part:?} has no '='"
                    ));
                };
                let attr = attr.trim();
                let value = unescape(value.trim());
                if attr.is_empty() || value.is_empty() {
                    return Err(format!(
                        "expected TYPE=value pairs like CN=claims-intake; {part:?} is incomplete"
                    ));
                }
                pairs.push((attr.to_ascii_uppercase(), value));
            }
            Ok(Self::Dn(pairs))
        } else if s.is_empty()
            || s.chars()
                .any(|c| c.is_whitespace() || matches!(c, ',' | '/' | '@' | ':'))
        {
            Err(format!(
                "{s:?} is neither a distinguished name (CN=...) nor a DNS name"
            ))
        } else {
            Ok(Self::DnsName(s.to_ascii_lowercase()))
        }
    }

    /// Whether `cert` is what this pattern names.
    pub(crate) fn matches(&self, cert: &PeerCertificate) -> bool {
        match self {
            Self::Dn(pairs) => {
                let same = |a: &(String, String), b: &(String, Option<String>)| {
                    a.0 == b.0 && b.1.as_deref() == Some(a.1.as_str())
                };
                let n = pairs.len();
                n == cert.subject.len()
                    && (pairs.iter().zip(&cert.subject).all(|(a, b)| same(a, b))
                        || pairs
                            .iter()
                            .zip(cert.subject.iter().rev())
                            .all(|(a, b)| same(a, b)))
            }
            Self::DnsName(name) => cert.dns_names.iter().any(|d| d == name),
        }
    }
}

/// Splits on commas and pluses that are not escaped with a backslash.
fn split_unescaped(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            ',' | '+' => {
                parts.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(s[start..].trim());
    parts
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                out.push(next);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The parts of a client certificate that can name a principal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PeerCertificate {
    /// Subject attributes in certificate order, as (abbreviation, value); a value that is not
    /// a string is `None` and matches nothing.
    pub subject: Vec<(String, Option<String>)>,
    /// SAN DNS names, lowercased.
    pub dns_names: Vec<String>,
}

impl PeerCertificate {
    /// Reads a DER certificate; `None` if it does not parse.
    pub(crate) fn from_der(der: &[u8]) -> Option<Self> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let registry = oid_registry();
        let subject = cert
            .subject()
            .iter_rdn()
            .flat_map(|rdn| rdn.iter())
            .map(|attr| {
                let name = oid2abbrev(attr.attr_type(), registry)
                    .map_or_else(|_| attr.attr_type().to_id_string(), str::to_owned);
                (
                    name.to_ascii_uppercase(),
                    attr.as_str().ok().map(str::to_owned),
                )
            })
            .collect();
        let dns_names = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                    _ => None,
                })
                .collect(),
            // A malformed or duplicated SAN extension names nobody.
            _ => Vec::new(),
        };
        Some(Self { subject, dns_names })
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

    use super::*;

    fn cert(dn: &[(DnType, &str)], sans: &[&str]) -> PeerCertificate {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .expect("params");
        params.distinguished_name = DistinguishedName::new();
        for (t, v) in dn {
            params.distinguished_name.push(t.clone(), *v);
        }
        let key = KeyPair::generate().expect("key");
        let der = params.self_signed(&key).expect("cert").der().to_vec();
        PeerCertificate::from_der(&der).expect("parses")
    }

    fn pattern(s: &str) -> SubjectPattern {
        SubjectPattern::parse(s).expect("pattern")
    }

    /// Which of `patterns` match `c`, in order.
    fn matching<const N: usize>(c: &PeerCertificate, patterns: [&str; N]) -> [bool; N] {
        patterns.map(|p| pattern(p).matches(c))
    }

    #[test]
    fn common_name_matches_exactly() {
        let c = cert(&[(DnType::CommonName, "claims-intake")], &[]);
        assert_eq!(
            matching(
                &c,
                [
                    "CN=claims-intake",
                    "cn = claims-intake",
                    "CN=claims-intake2",
                    "CN=Claims-Intake",
                    "CN=claims-intake, O=Payouts",
                ]
            ),
            [true, true, false, false, false]
        );
    }

    #[test]
    fn multi_attribute_names_match_in_either_order() {
        let c = cert(
            &[
                (DnType::CountryName, "KR"),
                (DnType::OrganizationName, "Payouts"),
                (DnType::CommonName, "claims-intake"),
            ],
            &[],
        );
        assert_eq!(
            matching(
                &c,
                [
                    "C=KR, O=Payouts, CN=claims-intake",
                    "CN=claims-intake,O=Payouts,C=KR",
                    "CN=claims-intake",
                    "O=Payouts, C=KR, CN=claims-intake",
                ]
            ),
            [true, true, false, false]
        );
    }

    #[test]
    fn a_comma_inside_a_value_cannot_forge_another_name() {
        let c = cert(&[(DnType::CommonName, "claims-intake, O=Payouts")], &[]);
        assert_eq!(
            matching(
                &c,
                [
                    "CN=claims-intake, O=Payouts",
                    r"CN=claims-intake\, O=Payouts",
                ]
            ),
            [false, true]
        );
    }

    #[test]
    fn dns_names_match_the_san() {
        let c = cert(
            &[(DnType::CommonName, "whatever")],
            &["ops.payouts.internal", "other.example"],
        );
        assert_eq!(
            matching(
                &c,
                [
                    "ops.payouts.internal",
                    "OPS.payouts.internal",
                    "payouts.internal",
                    // The CN is not a SAN.
                    "whatever",
                ]
            ),
            [true, true, false, false]
        );
    }

    #[test]
    fn malformed_patterns_are_refused() {
        assert!(SubjectPattern::parse("CN=a, O").is_err());
        assert!(SubjectPattern::parse("CN=").is_err());
        assert!(SubjectPattern::parse("two words").is_err());
        assert!(SubjectPattern::parse("").is_err());
        assert_eq!(pattern("CN=a, O=b"), pattern("O=b,CN=a"));
        assert_ne!(pattern("CN=a"), pattern("a"));
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert_eq!(PeerCertificate::from_der(b"not a certificate"), None);
    }
}
