//! A compensation claim: what was reported, how it was decided, the proof, and the review.

use serde::{Deserialize, Serialize};

use super::{
    ClaimId, ClaimStatus, Decision, DisbursementId, FourEyes, Invalid, Krw, LossItem, PartnerId,
    Refusal, Tier, same_principal, text,
};

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
    pub partner_id: PartnerId,
    pub items: Vec<LossItem>,
    pub evidence: Vec<Evidence>,
    pub decision: Decision,
    pub submitted_by: String,
    /// The W3C trace context of the submitting call: payment continues its trace.
    pub trace_context: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Claim {
    pub claim_id: ClaimId,
    pub partner_id: PartnerId,
    pub status: ClaimStatus,
    pub items: Vec<LossItem>,
    pub decision: Decision,
    /// What is paid: the tier's amount, or the reviewer's.
    pub compensation_krw: Krw,
    pub evidence: Vec<AttachedEvidence>,
    pub submitted_by: String,
    /// None until a reviewer decides the claim.
    pub review: Option<ClaimReview>,
    pub create_time: i64,
    pub update_time: i64,
    pub disbursement_id: Option<DisbursementId>,
}

/// Who reviewed a claim, and the reason they gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimReview {
    pub reviewer: String,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReviewDecision {
    Approve { compensation_krw: Krw },
    Reject,
}

impl ReviewDecision {
    /// An approval pays 1 KRW up to the policy's review cap.
    pub fn approve(compensation_krw: i64, review_cap_krw: i64) -> Result<Self, Invalid> {
        if (1..=review_cap_krw).contains(&compensation_krw) {
            Ok(Self::Approve {
                compensation_krw: Krw::new(compensation_krw),
            })
        } else {
            Err(Invalid::new(format!(
                "must be between 1 and the review cap of {review_cap_krw} KRW"
            )))
        }
    }

    /// A rejection pays nothing, and says so.
    pub fn reject(compensation_krw: i64) -> Result<Self, Invalid> {
        if compensation_krw == 0 {
            Ok(Self::Reject)
        } else {
            Err(Invalid::new("must be 0 when rejecting"))
        }
    }
}

/// Why a review cannot be applied to a claim as it stands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReviewRefused {
    #[error("only a PENDING_REVIEW claim can be reviewed; this one is {0:?}")]
    NotPendingReview(ClaimStatus),
    #[error("approving needs at least one piece of evidence attached to the claim")]
    EvidenceRequired,
}

/// What a review rule needs to know of the claim it is applied to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnderReview<'a> {
    pub status: ClaimStatus,
    pub submitted_by: &'a str,
    pub evidence_count: usize,
}

/// What a review makes of a claim: its new status and what it pays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reviewed {
    pub status: ClaimStatus,
    /// The reviewer's amount when approved; 0 when rejected.
    pub compensation_krw: Krw,
}

/// The review rule, in the order a caller is told: another principal than the submitter (four
/// eyes), only a `PENDING_REVIEW` claim, and an approval needs evidence. The amount (1 up to
/// the review cap) is checked on input by [`ReviewDecision::approve`].
pub fn review(
    claim: UnderReview<'_>,
    reviewer: &str,
    decision: ReviewDecision,
) -> Result<Reviewed, Refusal> {
    if same_principal(claim.submitted_by, reviewer) {
        return Err(Refusal::SamePrincipal(FourEyes::ReviewOwnClaim));
    }
    if claim.status != ClaimStatus::PendingReview {
        return Err(ReviewRefused::NotPendingReview(claim.status).into());
    }
    match decision {
        ReviewDecision::Approve { .. } if claim.evidence_count == 0 => {
            Err(ReviewRefused::EvidenceRequired.into())
        }
        ReviewDecision::Approve { compensation_krw } => Ok(Reviewed {
            status: ClaimStatus::Approved,
            compensation_krw,
        }),
        ReviewDecision::Reject => Ok(Reviewed {
            status: ClaimStatus::Rejected,
            compensation_krw: Krw::ZERO,
        }),
    }
}

impl Claim {
    pub fn tier(&self) -> Tier {
        self.decision.tier
    }

    /// The claim as the review rule sees it.
    pub fn under_review(&self) -> UnderReview<'_> {
        UnderReview {
            status: self.status,
            submitted_by: &self.submitted_by,
            evidence_count: self.evidence.len(),
        }
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

    fn pending(submitted_by: &str, evidence_count: usize) -> UnderReview<'_> {
        UnderReview {
            status: ClaimStatus::PendingReview,
            submitted_by,
            evidence_count,
        }
    }

    const APPROVE: ReviewDecision = ReviewDecision::Approve {
        compensation_krw: Krw::new(40_000),
    };

    #[test]
    fn a_reviewer_approves_a_pending_claim_with_evidence_for_the_amount_given() {
        assert_eq!(
            review(pending("clerk", 1), "reviewer", APPROVE),
            Ok(Reviewed {
                status: ClaimStatus::Approved,
                compensation_krw: Krw::new(40_000)
            })
        );
        assert_eq!(
            review(pending("clerk", 0), "reviewer", ReviewDecision::Reject),
            Ok(Reviewed {
                status: ClaimStatus::Rejected,
                compensation_krw: Krw::ZERO
            })
        );
    }

    #[test]
    fn the_submitter_may_not_review_and_is_told_so_first() {
        for claim in [
            pending("clerk", 1),
            pending("clerk", 0),
            UnderReview {
                status: ClaimStatus::Approved,
                ..pending("clerk", 0)
            },
        ] {
            for decision in [APPROVE, ReviewDecision::Reject] {
                assert_eq!(
                    review(claim, "clerk", decision),
                    Err(Refusal::SamePrincipal(FourEyes::ReviewOwnClaim))
                );
            }
        }
        // Local development has one principal, exempt from four eyes.
        assert!(review(pending("local-dev", 1), "local-dev", APPROVE).is_ok());
    }

    #[test]
    fn only_pending_claims_are_reviewed_and_approvals_need_evidence() {
        for status in [ClaimStatus::Approved, ClaimStatus::Rejected] {
            let claim = UnderReview {
                status,
                ..pending("clerk", 3)
            };
            assert_eq!(
                review(claim, "reviewer", ReviewDecision::Reject),
                Err(Refusal::Review(ReviewRefused::NotPendingReview(status)))
            );
        }
        assert_eq!(
            review(pending("clerk", 0), "reviewer", APPROVE),
            Err(Refusal::Review(ReviewRefused::EvidenceRequired))
        );
    }

    #[test]
    fn a_review_approves_up_to_the_cap_and_rejects_for_nothing() {
        assert_eq!(
            ReviewDecision::approve(50_000, 50_000),
            Ok(ReviewDecision::Approve {
                compensation_krw: Krw::new(50_000)
            })
        );
        assert!(ReviewDecision::approve(1, 50_000).is_ok());
        for amount in [0, -1, 50_001, i64::MAX, i64::MIN] {
            let refused = ReviewDecision::approve(amount, 50_000).expect_err("outside the cap");
            assert_eq!(
                refused.0,
                "must be between 1 and the review cap of 50000 KRW"
            );
        }
        assert_eq!(ReviewDecision::reject(0), Ok(ReviewDecision::Reject));
        assert_eq!(
            ReviewDecision::reject(1),
            Err(Invalid::new("must be 0 when rejecting"))
        );
    }
}
