//! A compensation claim: what was reported, how it was decided, the proof, and the review.

use serde::{Deserialize, Serialize};

use super::{ClaimStatus, Decision, Invalid, LossItem, Tier, text};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvidenceKind {
    SalesLossProof,
    ServiceUseProof,
    BankAccountCopy,
    SmallBusinessCertificate,
}

impl EvidenceKind {
    pub fn key(self) -> &'static str {
        match self {
            Self::SalesLossProof => "sales_loss_proof",
            Self::ServiceUseProof => "service_use_proof",
            Self::BankAccountCopy => "bank_account_copy",
            Self::SmallBusinessCertificate => "small_business_certificate",
        }
    }

    pub fn from_key(key: &str) -> Option<Self> {
        [
            Self::SalesLossProof,
            Self::ServiceUseProof,
            Self::BankAccountCopy,
            Self::SmallBusinessCertificate,
        ]
        .into_iter()
        .find(|k| k.key() == key)
    }
}

/// A document offered as proof: where it is and its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    pub kind: EvidenceKind,
    pub uri: String,
    /// Lower-case hex, 64 characters.
    pub sha256: String,
}

impl Evidence {
    /// The longest URI a piece of evidence may have.
    pub const MAX_URI_CHARS: usize = 2_048;
    /// Where evidence may be kept: HTTPS, Amazon S3 and Google Cloud Storage.
    pub const URI_SCHEMES: [&'static str; 3] = ["https", "s3", "gs"];

    pub fn parse(
        kind: EvidenceKind,
        uri: &str,
        sha256: &str,
    ) -> Result<Self, (&'static str, Invalid)> {
        let uri = Self::parse_uri(uri).map_err(|why| ("uri", why))?;
        let sha256 = sha256.trim().to_ascii_lowercase();
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(("sha256", Invalid::new("must be 64 hexadecimal characters")));
        }
        Ok(Self { kind, uri, sha256 })
    }

    /// `https://host/...`, `s3://bucket/...` or `gs://bucket/...` (scheme in any case), 1 to
    /// 2,048 characters without spaces, control or invisible characters, and without
    /// credentials before the host.
    pub fn parse_uri(input: &str) -> Result<String, Invalid> {
        let uri = input.trim();
        let shape = || {
            Invalid::new(format!(
                "must be a URI of 1 to {} characters without spaces, such as \
                 s3://bucket/key, gs://bucket/object or https://host/path",
                Self::MAX_URI_CHARS
            ))
        };
        if uri.is_empty() || uri.chars().count() > Self::MAX_URI_CHARS {
            return Err(shape());
        }
        if uri
            .chars()
            .any(|c| c.is_whitespace() || text::is_control(c) || text::is_invisible(c))
        {
            return Err(Invalid::new(
                "must not contain spaces, control, invisible or formatting characters",
            ));
        }
        let Some((scheme, rest)) = uri.split_once("://") else {
            return Err(shape());
        };
        if !Self::URI_SCHEMES
            .iter()
            .any(|s| s.eq_ignore_ascii_case(scheme))
        {
            return Err(Invalid::new(
                "must use the https, s3 or gs scheme (where the document is kept)",
            ));
        }
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        if authority.is_empty() {
            return Err(Invalid::new(
                "must name the host or bucket after the scheme",
            ));
        }
        if authority.contains('@') {
            return Err(Invalid::new("must not carry credentials before the host"));
        }
        Ok(uri.to_owned())
    }
}

/// Evidence as stored: with when it was attached and by whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedEvidence {
    pub evidence: Evidence,
    pub attach_time: i64,
    pub attached_by: String,
}

/// At least one item, at most one per service; kept sorted by service so the stored claim
/// does not depend on the order the caller sent.
pub fn check_items(mut items: Vec<LossItem>) -> Result<Vec<LossItem>, Invalid> {
    if items.is_empty() {
        return Err(Invalid::new("at least one loss item is required"));
    }
    items.sort_by_key(|i| i.service);
    if let Some(pair) = items.windows(2).find(|w| w[0].service == w[1].service) {
        return Err(Invalid::new(format!(
            "at most one item per service; {} appears more than once",
            pair[0].service.key()
        )));
    }
    Ok(items)
}

/// A claim to store: the partner, the items and the decision made at submission.
#[derive(Debug, Clone)]
pub struct NewClaim {
    pub partner_id: uuid::Uuid,
    pub items: Vec<LossItem>,
    pub evidence: Vec<Evidence>,
    pub decision: Decision,
    pub submitted_by: String,
    /// The W3C trace context of the submitting call: payment continues its trace.
    pub trace_context: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Claim {
    pub claim_id: uuid::Uuid,
    pub partner_id: uuid::Uuid,
    pub status: ClaimStatus,
    pub items: Vec<LossItem>,
    pub decision: Decision,
    /// What is paid: the tier's amount, or the reviewer's.
    pub compensation_krw: i64,
    pub evidence: Vec<AttachedEvidence>,
    pub submitted_by: String,
    pub reviewed_by: Option<String>,
    pub review_reason: Option<String>,
    pub create_time: i64,
    pub update_time: i64,
    pub disbursement_id: Option<uuid::Uuid>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReviewDecision {
    Approve { compensation_krw: i64 },
    Reject,
}

/// Why a review cannot be applied to a claim as it stands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReviewRefused {
    #[error("only a PENDING_REVIEW claim can be reviewed; this one is {0:?}")]
    NotPendingReview(ClaimStatus),
    #[error("approving needs at least one piece of evidence attached to the claim")]
    EvidenceRequired,
}

/// The four-eyes rule: two actions are by the same principal. Local development mode, where
/// every caller is `local-dev`, is exempt: it has only one principal and runs on loopback only.
pub fn same_principal(first: &str, second: &str) -> bool {
    first == second && first != "local-dev"
}

/// The review rule: only `PENDING_REVIEW` claims; an approval needs evidence. The amount
/// (1..=review cap) is checked on input.
pub fn review(
    status: ClaimStatus,
    evidence_count: usize,
    decision: ReviewDecision,
) -> Result<ClaimStatus, ReviewRefused> {
    if status != ClaimStatus::PendingReview {
        return Err(ReviewRefused::NotPendingReview(status));
    }
    match decision {
        ReviewDecision::Approve { .. } if evidence_count == 0 => {
            Err(ReviewRefused::EvidenceRequired)
        }
        ReviewDecision::Approve { .. } => Ok(ClaimStatus::Approved),
        ReviewDecision::Reject => Ok(ClaimStatus::Rejected),
    }
}

impl Claim {
    pub fn tier(&self) -> Tier {
        self.decision.tier
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn uri_of(uri: &str) -> Result<String, (&'static str, Invalid)> {
        Evidence::parse(EvidenceKind::SalesLossProof, uri, SHA).map(|e| e.uri)
    }

    #[test]
    fn evidence_is_kept_on_https_s3_or_gs() {
        for uri in [
            "https://files.example.com/claims/1.pdf",
            "s3://payouts-evidence/claims/a.pdf",
            "gs://bucket/object",
            "HTTPS://files.example.com/x?y=1#z",
            "S3://bucket",
        ] {
            assert_eq!(uri_of(&format!(" {uri} ")).as_deref(), Ok(uri), "{uri}");
        }
    }

    #[test]
    fn other_schemes_hosts_and_characters_are_refused() {
        for uri in [
            "",
            "javascript:alert(1)",
            "javascript://x/%0aalert(1)",
            "http://files.example.com/1.pdf",
            "file:///etc/passwd",
            "data:text/html,hi",
            "ftp://host/x",
            "s3:/bucket/key",
            "s3://",
            "https:///path",
            "gs://?x",
            "https://user:secret@host/x",
            "s3://bucket/a b",
            "s3://bucket/a\0b",
            "s3://bucket/a\u{85}b",
            "s3://bucket/a\u{202E}fdp.exe",
            "s3://bucket/a\u{200B}",
        ] {
            let bad = uri_of(uri).expect_err(uri);
            assert_eq!(bad.0, "uri", "{uri}");
        }
        let long = format!("s3://bucket/{}", "k".repeat(Evidence::MAX_URI_CHARS));
        assert!(uri_of(&long).is_err());
        let longest = format!("s3://b/{}", "k".repeat(Evidence::MAX_URI_CHARS - 7));
        assert!(uri_of(&longest).is_ok());
    }
}
