//! The compensation policy: per-service factors, tiers and the review cap, and the rule that
//! turns reported sales into a decision. Integer arithmetic only, rounded down once.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{AffectedService, Invalid, Krw};

/// Basis points in one whole.
pub const BPS: i64 = 10_000;
/// The largest sales figure a claim may report for one week, in KRW.
pub const MAX_WEEK_SALES_KRW: i64 = 1_000_000_000_000;

/// How one service's sales loss counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceFactors {
    pub operating_margin_bps: i64,
    pub kakao_share_bps: i64,
    pub alternative_available: bool,
    /// Applied only where an alternative was available.
    pub alternative_factor_bps: i64,
}

impl ServiceFactors {
    /// The alternative factor actually applied: 10000 where no alternative existed.
    pub fn effective_alternative_bps(&self) -> i64 {
        if self.alternative_available {
            self.alternative_factor_bps
        } else {
            BPS
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tiers {
    pub lower_max_recognized_loss_krw: i64,
    pub lower_compensation_krw: Krw,
    pub upper_max_recognized_loss_krw: i64,
    pub upper_compensation_krw: Krw,
}

/// A policy file, as read. [`Policy::from_toml`] validates it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub version: String,
    #[serde(default)]
    pub description: String,
    pub tiers: Tiers,
    #[serde(default = "default_review_cap")]
    pub review_cap_krw: Krw,
    /// RFC 3339; absent: open.
    #[serde(default)]
    pub intake_open_time: Option<jiff::Timestamp>,
    #[serde(default)]
    pub intake_close_time: Option<jiff::Timestamp>,
    /// Keyed by [`AffectedService::key`]; every service must be present.
    pub services: BTreeMap<String, ServiceFactors>,
}

fn default_review_cap() -> Krw {
    Krw::new(50_000)
}

/// One reported item: the sales of one service in the baseline and the outage week.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LossItem {
    pub service: AffectedService,
    pub baseline_week_sales_krw: i64,
    pub outage_week_sales_krw: i64,
}

impl LossItem {
    pub fn parse(
        service: AffectedService,
        baseline_week_sales_krw: i64,
        outage_week_sales_krw: i64,
    ) -> Result<Self, (&'static str, Invalid)> {
        let range = 0..=MAX_WEEK_SALES_KRW;
        if !range.contains(&baseline_week_sales_krw) {
            return Err(("baseline_week_sales_krw", out_of_range()));
        }
        if !range.contains(&outage_week_sales_krw) {
            return Err(("outage_week_sales_krw", out_of_range()));
        }
        Ok(Self {
            service,
            baseline_week_sales_krw,
            outage_week_sales_krw,
        })
    }

    /// `max(0, baseline - outage)`.
    pub fn loss_krw(&self) -> i64 {
        (self.baseline_week_sales_krw - self.outage_week_sales_krw).max(0)
    }
}

fn out_of_range() -> Invalid {
    Invalid::new(format!("must be between 0 and {MAX_WEEK_SALES_KRW} KRW"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    NotEligible,
    Lower,
    Upper,
    Review,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClaimStatus {
    Approved,
    PendingReview,
    Rejected,
}

impl Tier {
    pub const ALL: [Tier; 4] = [Self::NotEligible, Self::Lower, Self::Upper, Self::Review];

    pub fn key(self) -> &'static str {
        match self {
            Self::NotEligible => "not_eligible",
            Self::Lower => "lower",
            Self::Upper => "upper",
            Self::Review => "review",
        }
    }

    pub fn from_key(key: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.key() == key)
    }
}

impl ClaimStatus {
    pub const ALL: [ClaimStatus; 3] = [Self::Approved, Self::PendingReview, Self::Rejected];

    pub fn key(self) -> &'static str {
        match self {
            Self::Approved => "approved",
            Self::PendingReview => "pending_review",
            Self::Rejected => "rejected",
        }
    }

    pub fn from_key(key: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.key() == key)
    }
}

/// How one item counted, kept with the claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakdownLine {
    pub service: AffectedService,
    pub loss_krw: i64,
    pub operating_margin_bps: i64,
    pub kakao_share_bps: i64,
    pub alternative_factor_bps: i64,
    /// This line alone, rounded down.
    pub recognized_loss_krw: i64,
}

/// The policy's answer for a set of items, with everything that decided it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub reported_loss_krw: i64,
    pub recognized_loss_krw: i64,
    pub tier: Tier,
    pub compensation_krw: Krw,
    pub status: ClaimStatus,
    pub policy_version: String,
    pub breakdown: Vec<BreakdownLine>,
}

impl Policy {
    /// Reads and checks a policy file; errors name the offending key.
    pub fn from_toml(text: &str) -> Result<Self, Invalid> {
        let policy: Policy =
            toml::from_str(text).map_err(|e| Invalid::new(format!("policy file: {e}")))?;
        policy.validate()?;
        Ok(policy)
    }

    fn validate(&self) -> Result<(), Invalid> {
        let bad = |key: String, why: &str| Err(Invalid::new(format!("policy key `{key}` {why}")));
        if self.version.trim().is_empty() {
            return bad("version".into(), "must not be empty");
        }
        let t = &self.tiers;
        if t.lower_max_recognized_loss_krw < 1 {
            return bad(
                "tiers.lower_max_recognized_loss_krw".into(),
                "must be at least 1",
            );
        }
        if t.upper_max_recognized_loss_krw <= t.lower_max_recognized_loss_krw {
            return bad(
                "tiers.upper_max_recognized_loss_krw".into(),
                "must be above tiers.lower_max_recognized_loss_krw",
            );
        }
        if !t.lower_compensation_krw.is_positive() {
            return bad("tiers.lower_compensation_krw".into(), "must be at least 1");
        }
        if t.upper_compensation_krw < t.lower_compensation_krw {
            return bad(
                "tiers.upper_compensation_krw".into(),
                "must be at least tiers.lower_compensation_krw",
            );
        }
        if !self.review_cap_krw.is_positive() {
            return bad("review_cap_krw".into(), "must be at least 1");
        }
        if let (Some(open), Some(close)) = (self.intake_open_time, self.intake_close_time)
            && close <= open
        {
            return bad("intake_close_time".into(), "must be after intake_open_time");
        }
        for key in self.services.keys() {
            if AffectedService::from_key(key).is_none() {
                return bad(format!("services.{key}"), "is not a known service");
            }
        }
        for service in AffectedService::ALL {
            let Some(f) = self.services.get(service.key()) else {
                return bad(format!("services.{}", service.key()), "is missing");
            };
            for (name, value) in [
                ("operating_margin_bps", f.operating_margin_bps),
                ("kakao_share_bps", f.kakao_share_bps),
                ("alternative_factor_bps", f.alternative_factor_bps),
            ] {
                if !(0..=BPS).contains(&value) {
                    return bad(
                        format!("services.{}.{name}", service.key()),
                        "must be between 0 and 10000",
                    );
                }
            }
        }
        Ok(())
    }

    pub fn factors(&self, service: AffectedService) -> &ServiceFactors {
        // validate() guarantees every service is present.
        &self.services[service.key()]
    }

    /// Whether a claim may be filed at `now`.
    pub fn intake_open_at(&self, now: jiff::Timestamp) -> bool {
        self.intake_open_time.is_none_or(|open| now >= open)
            && self.intake_close_time.is_none_or(|close| now < close)
    }

    /// Decides a claim. Items must be valid [`LossItem`]s.
    pub fn decide(&self, items: &[LossItem]) -> Decision {
        let mut reported: i128 = 0;
        let mut weighted: i128 = 0;
        let scale = i128::from(BPS).pow(3);
        let mut breakdown = Vec::with_capacity(items.len());
        for item in items {
            let f = self.factors(item.service);
            let loss = i128::from(item.loss_krw());
            let alt = f.effective_alternative_bps();
            let line = loss
                * i128::from(f.operating_margin_bps)
                * i128::from(f.kakao_share_bps)
                * i128::from(alt);
            reported += loss;
            weighted += line;
            breakdown.push(BreakdownLine {
                service: item.service,
                loss_krw: item.loss_krw(),
                operating_margin_bps: f.operating_margin_bps,
                kakao_share_bps: f.kakao_share_bps,
                alternative_factor_bps: alt,
                recognized_loss_krw: to_krw(line / scale),
            });
        }
        let recognized = to_krw(weighted / scale);
        let t = &self.tiers;
        let (tier, compensation_krw, status) = if recognized == 0 {
            (Tier::NotEligible, Krw::ZERO, ClaimStatus::Rejected)
        } else if recognized <= t.lower_max_recognized_loss_krw {
            (Tier::Lower, t.lower_compensation_krw, ClaimStatus::Approved)
        } else if recognized <= t.upper_max_recognized_loss_krw {
            (Tier::Upper, t.upper_compensation_krw, ClaimStatus::Approved)
        } else {
            (Tier::Review, Krw::ZERO, ClaimStatus::PendingReview)
        };
        Decision {
            reported_loss_krw: to_krw(reported),
            recognized_loss_krw: recognized,
            tier,
            compensation_krw,
            status,
            policy_version: self.version.clone(),
            breakdown,
        }
    }
}

/// Items are bounded (at most one per service, each at most [`MAX_WEEK_SALES_KRW`]), so every
/// sum fits in an i64; saturate rather than wrap should that bound ever change.
fn to_krw(value: i128) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// The policy that ships with the service.
pub const DEFAULT_POLICY_TOML: &str = include_str!("../../policy/default.toml");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_loads() {
        let policy = Policy::from_toml(DEFAULT_POLICY_TOML).expect("default policy is valid");
        assert_eq!(policy.review_cap_krw, Krw::new(50_000));
    }

    #[test]
    fn malformed_policy_names_the_key() {
        let text = DEFAULT_POLICY_TOML.replace("kakao_share_bps = 9000", "kakao_share_bps = 90000");
        let err = Policy::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("kakao_share_bps"), "{err}");
        let text = format!("{DEFAULT_POLICY_TOML}\nsurprise = 1\n");
        let err = Policy::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("surprise"), "{err}");
    }
}
