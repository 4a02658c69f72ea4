//! Domain values to protos and back. Parsing from protos lives with each service, where the
//! field names are known.

use crate::domain::{
    self, AffectedService, BreakdownLine, Claim, ClaimStatus, Decision, DisbursementStatus,
    EvidenceKind, LossItem, Partner, Policy, Tier,
};
use crate::proto::payouts::v1 as pb;
use crate::store::{self, Micros};

pub fn timestamp(micros: Micros) -> Option<prost_types::Timestamp> {
    if micros == 0 {
        return None;
    }
    Some(prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1_000).unwrap_or(0),
    })
}

/// The first second a protobuf `Timestamp` may hold: 0001-01-01T00:00:00Z.
pub const MIN_TIMESTAMP_SECONDS: i64 = -62_135_596_800;
/// The last second a protobuf `Timestamp` may hold: 9999-12-31T23:59:59Z.
pub const MAX_TIMESTAMP_SECONDS: i64 = 253_402_300_799;

/// Unix microseconds of a timestamp in a request (nanoseconds below a microsecond dropped). It
/// must be a valid protobuf timestamp: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z,
/// with nanos 0 to 999,999,999.
pub fn parse_timestamp(t: &prost_types::Timestamp) -> Result<Micros, domain::Invalid> {
    let prost_types::Timestamp { seconds, nanos } = *t;
    if !(MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS).contains(&seconds) {
        return Err(domain::Invalid::new(
            "must be between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z",
        ));
    }
    if !(0..=999_999_999).contains(&nanos) {
        return Err(domain::Invalid::new("nanos must be 0 to 999,999,999"));
    }
    // In range, so this cannot overflow: |seconds| < 2^38.
    Ok(seconds * 1_000_000 + i64::from(nanos / 1_000))
}

pub fn affected_service(service: AffectedService) -> pb::AffectedService {
    match service {
        AffectedService::KakaotalkChannel => pb::AffectedService::KakaotalkChannel,
        AffectedService::OrderAlerts => pb::AffectedService::OrderAlerts,
        AffectedService::KakaoPay => pb::AffectedService::KakaoPay,
        AffectedService::GiftShop => pb::AffectedService::GiftShop,
        AffectedService::KakaoT => pb::AffectedService::KakaoT,
        AffectedService::KakaoMap => pb::AffectedService::KakaoMap,
        AffectedService::KakaoLogin => pb::AffectedService::KakaoLogin,
        AffectedService::Other => pb::AffectedService::Other,
    }
}

pub fn parse_affected_service(raw: i32) -> Result<AffectedService, domain::Invalid> {
    match pb::AffectedService::try_from(raw) {
        Ok(pb::AffectedService::KakaotalkChannel) => Ok(AffectedService::KakaotalkChannel),
        Ok(pb::AffectedService::OrderAlerts) => Ok(AffectedService::OrderAlerts),
        Ok(pb::AffectedService::KakaoPay) => Ok(AffectedService::KakaoPay),
        Ok(pb::AffectedService::GiftShop) => Ok(AffectedService::GiftShop),
        Ok(pb::AffectedService::KakaoT) => Ok(AffectedService::KakaoT),
        Ok(pb::AffectedService::KakaoMap) => Ok(AffectedService::KakaoMap),
        Ok(pb::AffectedService::KakaoLogin) => Ok(AffectedService::KakaoLogin),
        Ok(pb::AffectedService::Other) => Ok(AffectedService::Other),
        Ok(pb::AffectedService::Unspecified) | Err(_) => Err(domain::Invalid::new(
            "must be an AffectedService other than AFFECTED_SERVICE_UNSPECIFIED",
        )),
    }
}

pub fn claim_status(status: ClaimStatus) -> pb::ClaimStatus {
    match status {
        ClaimStatus::Approved => pb::ClaimStatus::Approved,
        ClaimStatus::PendingReview => pb::ClaimStatus::PendingReview,
        ClaimStatus::Rejected => pb::ClaimStatus::Rejected,
    }
}

/// A list filter on an enum whose every value (in `all`) `to_proto` shows: UNSPECIFIED (0)
/// means "any", and a number that stands for none of them is not a `what`.
fn parse_filter<T: Copy, P: Into<i32>>(
    raw: i32,
    all: &[T],
    to_proto: fn(T) -> P,
    what: &str,
) -> Result<Option<T>, domain::Invalid> {
    if raw == 0 {
        return Ok(None);
    }
    let found = all.iter().copied().find(|&v| to_proto(v).into() == raw);
    found
        .map(Some)
        .ok_or_else(|| domain::Invalid::new(format!("is not a {what}")))
}

pub fn parse_claim_status_filter(raw: i32) -> Result<Option<ClaimStatus>, domain::Invalid> {
    parse_filter(raw, &ClaimStatus::ALL, claim_status, "ClaimStatus")
}

pub fn tier(tier: Tier) -> pb::CompensationTier {
    match tier {
        Tier::NotEligible => pb::CompensationTier::NotEligible,
        Tier::Lower => pb::CompensationTier::Lower,
        Tier::Upper => pb::CompensationTier::Upper,
        Tier::Review => pb::CompensationTier::Review,
    }
}

pub fn parse_tier_filter(raw: i32) -> Result<Option<Tier>, domain::Invalid> {
    parse_filter(raw, &Tier::ALL, tier, "CompensationTier")
}

pub fn evidence_kind(kind: EvidenceKind) -> pb::EvidenceKind {
    match kind {
        EvidenceKind::SalesLossProof => pb::EvidenceKind::SalesLossProof,
        EvidenceKind::ServiceUseProof => pb::EvidenceKind::ServiceUseProof,
        EvidenceKind::BankAccountCopy => pb::EvidenceKind::BankAccountCopy,
        EvidenceKind::SmallBusinessCertificate => pb::EvidenceKind::SmallBusinessCertificate,
    }
}

pub fn parse_evidence_kind(raw: i32) -> Result<EvidenceKind, domain::Invalid> {
    match pb::EvidenceKind::try_from(raw) {
        Ok(pb::EvidenceKind::SalesLossProof) => Ok(EvidenceKind::SalesLossProof),
        Ok(pb::EvidenceKind::ServiceUseProof) => Ok(EvidenceKind::ServiceUseProof),
        Ok(pb::EvidenceKind::BankAccountCopy) => Ok(EvidenceKind::BankAccountCopy),
        Ok(pb::EvidenceKind::SmallBusinessCertificate) => {
            Ok(EvidenceKind::SmallBusinessCertificate)
        }
        Ok(pb::EvidenceKind::Unspecified) | Err(_) => Err(domain::Invalid::new(
            "must be an EvidenceKind other than EVIDENCE_KIND_UNSPECIFIED",
        )),
    }
}

pub fn disbursement_status(status: DisbursementStatus) -> pb::DisbursementStatus {
    match status {
        DisbursementStatus::Queued => pb::DisbursementStatus::Queued,
        DisbursementStatus::Submitted => pb::DisbursementStatus::Submitted,
        DisbursementStatus::Paid => pb::DisbursementStatus::Paid,
        DisbursementStatus::Failed => pb::DisbursementStatus::Failed,
        DisbursementStatus::Cancelled => pb::DisbursementStatus::Cancelled,
    }
}

pub fn parse_disbursement_status_filter(
    raw: i32,
) -> Result<Option<DisbursementStatus>, domain::Invalid> {
    let all = &DisbursementStatus::ALL;
    parse_filter(raw, all, disbursement_status, "DisbursementStatus")
}

pub fn partner(p: &Partner) -> pb::Partner {
    let d = &p.profile;
    pb::Partner {
        partner_id: p.partner_id.to_string(),
        business_registration_number: d.business_registration_number.as_str().to_owned(),
        legal_name: d.legal_name.as_str().to_owned(),
        representative_name: d.representative_name.as_str().to_owned(),
        affected_services: d
            .affected_services
            .iter()
            .map(|s| affected_service(*s) as i32)
            .collect(),
        bank_account: Some(pb::BankAccount {
            bank_code: p.bank_account.bank_code.as_str().to_owned(),
            account_number: p.bank_account.masked(),
            holder_name: p.bank_account.holder_name.as_str().to_owned(),
        }),
        contact_email: d.contact_email.as_str().to_owned(),
        create_time: timestamp(p.create_time),
        update_time: timestamp(p.update_time),
        etag: p.etag(),
    }
}

pub fn loss_item(item: &LossItem) -> pb::LossItem {
    pb::LossItem {
        service: affected_service(item.service) as i32,
        baseline_week_sales_krw: item.baseline_week_sales_krw,
        outage_week_sales_krw: item.outage_week_sales_krw,
    }
}

fn to_i32(bps: i64) -> i32 {
    // Factors are validated to 0..=10000 when the policy loads.
    i32::try_from(bps).unwrap_or(i32::MAX)
}

pub fn breakdown(line: &BreakdownLine) -> pb::BreakdownLine {
    pb::BreakdownLine {
        service: affected_service(line.service) as i32,
        loss_krw: line.loss_krw,
        operating_margin_bps: to_i32(line.operating_margin_bps),
        kakao_share_bps: to_i32(line.kakao_share_bps),
        alternative_factor_bps: to_i32(line.alternative_factor_bps),
        recognized_loss_krw: line.recognized_loss_krw,
    }
}

pub fn decision(d: &Decision) -> pb::CompensationDecision {
    pb::CompensationDecision {
        reported_loss_krw: d.reported_loss_krw,
        recognized_loss_krw: d.recognized_loss_krw,
        tier: tier(d.tier) as i32,
        compensation_krw: d.compensation_krw.won(),
        policy_version: d.policy_version.clone(),
        breakdown: d.breakdown.iter().map(breakdown).collect(),
        status: claim_status(d.status) as i32,
    }
}

pub fn claim(c: &Claim) -> pb::Claim {
    pb::Claim {
        claim_id: c.claim_id.to_string(),
        partner_id: c.partner_id.to_string(),
        status: claim_status(c.status) as i32,
        items: c.items.iter().map(loss_item).collect(),
        reported_loss_krw: c.decision.reported_loss_krw,
        recognized_loss_krw: c.decision.recognized_loss_krw,
        tier: tier(c.decision.tier) as i32,
        compensation_krw: c.compensation_krw.won(),
        policy_version: c.decision.policy_version.clone(),
        breakdown: c.decision.breakdown.iter().map(breakdown).collect(),
        evidence: c
            .evidence
            .iter()
            .map(|e| pb::Evidence {
                kind: evidence_kind(e.evidence.kind) as i32,
                uri: e.evidence.uri.clone(),
                sha256: e.evidence.sha256.clone(),
                attach_time: timestamp(e.attach_time),
            })
            .collect(),
        submitted_by: c.submitted_by.clone(),
        reviewed_by: c
            .review
            .as_ref()
            .map(|r| r.reviewer.clone())
            .unwrap_or_default(),
        review_reason: c
            .review
            .as_ref()
            .map(|r| r.reason.clone())
            .unwrap_or_default(),
        create_time: timestamp(c.create_time),
        update_time: timestamp(c.update_time),
        disbursement_id: c.disbursement_id.map(|d| d.to_string()).unwrap_or_default(),
    }
}

fn jiff_timestamp(t: Option<jiff::Timestamp>) -> Option<prost_types::Timestamp> {
    t.and_then(|t| timestamp(t.as_microsecond()))
}

pub fn policy(p: &Policy) -> pb::Policy {
    pb::Policy {
        version: p.version.clone(),
        description: p.description.clone(),
        lower_tier_max_recognized_loss_krw: p.tiers.lower_max_recognized_loss_krw,
        lower_tier_compensation_krw: p.tiers.lower_compensation_krw.won(),
        upper_tier_max_recognized_loss_krw: p.tiers.upper_max_recognized_loss_krw,
        upper_tier_compensation_krw: p.tiers.upper_compensation_krw.won(),
        review_cap_krw: p.review_cap_krw.won(),
        intake_open_time: jiff_timestamp(p.intake_open_time),
        intake_close_time: jiff_timestamp(p.intake_close_time),
        services: AffectedService::ALL
            .iter()
            .map(|s| {
                let f = p.factors(*s);
                pb::ServiceFactors {
                    service: affected_service(*s) as i32,
                    operating_margin_bps: to_i32(f.operating_margin_bps),
                    kakao_share_bps: to_i32(f.kakao_share_bps),
                    alternative_available: f.alternative_available,
                    alternative_factor_bps: to_i32(f.alternative_factor_bps),
                }
            })
            .collect(),
    }
}

pub fn dispatch_state(s: &store::DispatchState) -> pb::DispatchState {
    pb::DispatchState {
        paused: s.paused,
        reason: s.reason.clone(),
        changed_by: s.changed_by.clone(),
        change_time: timestamp(s.change_time),
    }
}

pub fn disbursement(d: &store::Disbursement) -> pb::Disbursement {
    pb::Disbursement {
        disbursement_id: d.disbursement_id.to_string(),
        claim_id: d.claim_id.to_string(),
        partner_id: d.partner_id.to_string(),
        amount_krw: d.amount_krw.won(),
        status: disbursement_status(d.status) as i32,
        attempts: d
            .attempts
            .iter()
            .map(|a| pb::DispatchAttempt {
                operation: a.operation.as_str().to_owned(),
                idempotency_key: a.idempotency_key.clone(),
                outcome: a.outcome.as_str().to_owned(),
                code: a.code.clone(),
                message: a.message.clone(),
                time: timestamp(a.time),
            })
            .collect(),
        failure_code: d.failure_code.clone().unwrap_or_default(),
        failure_message: d.failure_message.clone().unwrap_or_default(),
        create_time: timestamp(d.create_time),
        update_time: timestamp(d.update_time),
        idempotency_key: d.idempotency_key.clone().unwrap_or_default(),
        bank_code: d.account.bank_code.as_str().to_owned(),
        account_number: d.account.masked(),
        holder_name: d.account.holder_name.as_str().to_owned(),
        history: d
            .history
            .iter()
            .map(|h| pb::StatusChange {
                from_status: h
                    .from_status
                    .map_or(pb::DisbursementStatus::Unspecified, disbursement_status)
                    as i32,
                to_status: disbursement_status(h.to_status) as i32,
                actor: h.actor.clone(),
                reason: h.reason.clone(),
                time: timestamp(h.time),
            })
            .collect(),
    }
}

// Finance: export and reconciliation.

pub fn exported_disbursement(d: &store::ExportedDisbursement) -> pb::ExportedDisbursement {
    pb::ExportedDisbursement {
        disbursement_id: d.disbursement_id.to_string(),
        claim_id: d.claim_id.to_string(),
        partner_id: d.partner_id.to_string(),
        business_registration_number: d.business_registration_number.as_str().to_owned(),
        legal_name: d.legal_name.as_str().to_owned(),
        representative_name: d.representative_name.as_str().to_owned(),
        amount_krw: d.amount_krw.won(),
        status: disbursement_status(d.status) as i32,
        bank_code: d.account.bank_code.as_str().to_owned(),
        account_number: d.account.masked(),
        holder_name: d.account.holder_name.as_str().to_owned(),
        idempotency_key: d.idempotency_key.clone().unwrap_or_default(),
        paid_time: d.paid_time.and_then(timestamp),
        policy_version: d.policy_version.clone(),
        failure_code: d.failure_code.clone().unwrap_or_default(),
        create_time: timestamp(d.create_time),
        update_time: timestamp(d.update_time),
    }
}

pub fn parse_settlement_status(raw: i32) -> Result<domain::SettlementStatus, domain::Invalid> {
    match pb::SettlementStatus::try_from(raw) {
        Ok(pb::SettlementStatus::Settled) => Ok(domain::SettlementStatus::Settled),
        Ok(pb::SettlementStatus::Returned) => Ok(domain::SettlementStatus::Returned),
        Ok(pb::SettlementStatus::Unspecified) | Err(_) => Err(domain::Invalid::new(
            "must be SETTLEMENT_STATUS_SETTLED or SETTLEMENT_STATUS_RETURNED",
        )),
    }
}

pub fn mismatch_kind(kind: domain::MismatchKind) -> pb::MismatchKind {
    match kind {
        domain::MismatchKind::PaidThereNotHere => pb::MismatchKind::PaidThereNotHere,
        domain::MismatchKind::PaidHereNotThere => pb::MismatchKind::PaidHereNotThere,
        domain::MismatchKind::AmountDiffers => pb::MismatchKind::AmountDiffers,
        domain::MismatchKind::Returned => pb::MismatchKind::Returned,
    }
}

pub fn settlement_mismatch(m: &domain::SettlementMismatch) -> pb::SettlementMismatch {
    pb::SettlementMismatch {
        idempotency_key: m.idempotency_key.clone(),
        disbursement_id: m
            .disbursement_id
            .map(|id| id.to_string())
            .unwrap_or_default(),
        kind: mismatch_kind(m.kind) as i32,
        our_amount_krw: m.our_amount_krw.won(),
        their_amount_krw: m.their_amount_krw.won(),
        detail: m.detail.clone(),
        reopened: m.reopened,
        status: m
            .status
            .map_or(pb::DisbursementStatus::Unspecified, disbursement_status)
            as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(seconds: i64, nanos: i32) -> prost_types::Timestamp {
        prost_types::Timestamp { seconds, nanos }
    }

    #[test]
    fn request_timestamps_must_be_valid_protobuf_timestamps() {
        assert_eq!(parse_timestamp(&ts(0, 0)), Ok(0));
        assert_eq!(parse_timestamp(&ts(-1, 999_999_999)), Ok(-1));
        assert_eq!(parse_timestamp(&ts(1, 1_999)), Ok(1_000_001));
        assert_eq!(
            parse_timestamp(&ts(MIN_TIMESTAMP_SECONDS, 0)),
            Ok(MIN_TIMESTAMP_SECONDS * 1_000_000)
        );
        assert_eq!(
            parse_timestamp(&ts(MAX_TIMESTAMP_SECONDS, 999_999_999)),
            Ok(MAX_TIMESTAMP_SECONDS * 1_000_000 + 999_999)
        );
        for bad in [
            ts(MIN_TIMESTAMP_SECONDS - 1, 0),
            ts(MAX_TIMESTAMP_SECONDS + 1, 0),
            ts(i64::MAX, 0),
            ts(i64::MIN, 0),
            ts(0, -1),
            ts(0, 1_000_000_000),
            ts(0, i32::MIN),
        ] {
            assert!(parse_timestamp(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_bounds_are_the_first_and_last_second_of_years_1_to_9999() {
        let days_since_1970 = |d: jiff::civil::Date| {
            let span = d.since(jiff::civil::date(1970, 1, 1)).expect("in range");
            i64::from(span.get_days())
        };
        assert_eq!(
            days_since_1970(jiff::civil::date(1, 1, 1)) * 86_400,
            MIN_TIMESTAMP_SECONDS
        );
        assert_eq!(
            days_since_1970(jiff::civil::date(9999, 12, 31)) * 86_400 + 86_399,
            MAX_TIMESTAMP_SECONDS
        );
    }
}

#[cfg(test)]
mod filter_tests {
    use super::*;

    #[test]
    fn a_list_filter_is_any_value_of_its_enum_or_none() {
        assert_eq!(parse_claim_status_filter(0), Ok(None));
        for status in ClaimStatus::ALL {
            let raw = claim_status(status) as i32;
            assert_eq!(parse_claim_status_filter(raw), Ok(Some(status)));
        }
        for t in Tier::ALL {
            assert_eq!(parse_tier_filter(tier(t) as i32), Ok(Some(t)));
        }
        for status in DisbursementStatus::ALL {
            let raw = disbursement_status(status) as i32;
            assert_eq!(parse_disbursement_status_filter(raw), Ok(Some(status)));
        }
        let refused = parse_tier_filter(99).expect_err("no such tier");
        assert_eq!(refused.0, "is not a CompensationTier");
        assert!(parse_disbursement_status_filter(-1).is_err());
    }
}
