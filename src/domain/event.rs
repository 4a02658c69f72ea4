//! The change feed's events: one for every state change a consumer may act on, carrying what
//! it needs to act without asking again (and never more of an account number than its last 4
//! digits).

use serde::{Deserialize, Serialize};

use super::{
    AccountOnFile, Claim, ClaimId, ClaimStatus, Decision, DisbursementId, DisbursementStatus, Krw,
    PartnerId, Tier,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    PartnerRegistered,
    PartnerBankAccountChanged,
    ClaimDecided,
    ClaimReviewed,
    DisbursementStatusChanged,
}

impl EventType {
    pub const ALL: [EventType; 5] = [
        Self::PartnerRegistered,
        Self::PartnerBankAccountChanged,
        Self::ClaimDecided,
        Self::ClaimReviewed,
        Self::DisbursementStatusChanged,
    ];

    /// How the type is stored.
    pub fn key(self) -> &'static str {
        match self {
            Self::PartnerRegistered => "partner_registered",
            Self::PartnerBankAccountChanged => "partner_bank_account_changed",
            Self::ClaimDecided => "claim_decided",
            Self::ClaimReviewed => "claim_reviewed",
            Self::DisbursementStatusChanged => "disbursement_status_changed",
        }
    }

    pub fn from_key(key: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.key() == key)
    }
}

/// What changed, by kind of event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventDetail {
    /// A partner's payout account, as registered or changed.
    Partner {
        bank_code: String,
        account_last4: String,
    },
    /// A claim's decision, or its review.
    Claim {
        status: ClaimStatus,
        tier: Tier,
        recognized_loss_krw: i64,
        compensation_krw: Krw,
        policy_version: String,
        reason: String,
    },
    /// A disbursement's move from one status to another (`from` None: it was created).
    Disbursement {
        from_status: Option<DisbursementStatus>,
        to_status: DisbursementStatus,
        amount_krw: Krw,
        failure_code: Option<String>,
        reason: String,
    },
}

/// An event as the change that makes it writes it, before the feed gives it its sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub event_type: EventType,
    /// Unix microseconds.
    pub time: i64,
    pub actor: String,
    pub partner_id: PartnerId,
    pub claim_id: Option<ClaimId>,
    pub disbursement_id: Option<DisbursementId>,
    pub detail: EventDetail,
}

impl NewEvent {
    /// A partner registered (`changed: false`) or its bank account replaced (`true`).
    pub fn partner(
        partner_id: PartnerId,
        account: &AccountOnFile,
        changed: bool,
        actor: &str,
        time: i64,
    ) -> Self {
        Self {
            event_type: if changed {
                EventType::PartnerBankAccountChanged
            } else {
                EventType::PartnerRegistered
            },
            time,
            actor: actor.to_owned(),
            partner_id,
            claim_id: None,
            disbursement_id: None,
            detail: EventDetail::Partner {
                bank_code: account.bank_code.as_str().to_owned(),
                account_last4: account.account_last4.clone(),
            },
        }
    }

    /// A claim decided when submitted, or (with the reviewer's `reason`) reviewed.
    pub fn claim(
        outcome: &ClaimOutcome<'_>,
        review_reason: Option<&str>,
        actor: &str,
        time: i64,
    ) -> Self {
        Self {
            event_type: if review_reason.is_some() {
                EventType::ClaimReviewed
            } else {
                EventType::ClaimDecided
            },
            time,
            actor: actor.to_owned(),
            partner_id: outcome.partner_id,
            claim_id: Some(outcome.claim_id),
            disbursement_id: outcome.disbursement_id,
            detail: EventDetail::Claim {
                status: outcome.status,
                tier: outcome.decision.tier,
                recognized_loss_krw: outcome.decision.recognized_loss_krw,
                compensation_krw: if outcome.status == ClaimStatus::Approved {
                    outcome.compensation_krw
                } else {
                    Krw::ZERO
                },
                policy_version: outcome.decision.policy_version.clone(),
                reason: review_reason.unwrap_or_default().to_owned(),
            },
        }
    }
}

/// Where a claim stands after its decision or review: what its event tells.
#[derive(Debug, Clone, Copy)]
pub struct ClaimOutcome<'a> {
    pub claim_id: ClaimId,
    pub partner_id: PartnerId,
    pub status: ClaimStatus,
    pub decision: &'a Decision,
    pub compensation_krw: Krw,
    /// The payout an approval made.
    pub disbursement_id: Option<DisbursementId>,
}

impl<'a> ClaimOutcome<'a> {
    /// A claim as it stands.
    pub fn of(claim: &'a Claim) -> Self {
        Self {
            claim_id: claim.claim_id,
            partner_id: claim.partner_id,
            status: claim.status,
            decision: &claim.decision,
            compensation_krw: claim.compensation_krw,
            disbursement_id: claim.disbursement_id,
        }
    }

    /// The events of a claim filed now: its decision and, if it approved a payout, the
    /// payout's creation (`QUEUED`, `reason` as its history tells it).
    pub fn filed(&self, actor: &str, reason: &str, time: i64) -> Vec<NewEvent> {
        let decided = NewEvent::claim(self, None, actor, time);
        let queued = self.payout().map(|payout| {
            payout.status_changed(StatusMove {
                from: None,
                to: DisbursementStatus::Queued,
                failure_code: None,
                actor,
                reason,
                time,
            })
        });
        std::iter::once(decided).chain(queued).collect()
    }

    /// The payout an approval makes, if it made one.
    pub fn payout(&self) -> Option<PayoutRef> {
        self.disbursement_id.map(|disbursement_id| PayoutRef {
            disbursement_id,
            claim_id: self.claim_id,
            partner_id: self.partner_id,
            amount_krw: self.compensation_krw,
        })
    }
}

/// Who a disbursement belongs to and what it pays, for its status events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayoutRef {
    pub disbursement_id: DisbursementId,
    pub claim_id: ClaimId,
    pub partner_id: PartnerId,
    pub amount_krw: Krw,
}

/// One move of a disbursement's status, as its event tells it.
#[derive(Debug, Clone, Copy)]
pub struct StatusMove<'a> {
    pub from: Option<DisbursementStatus>,
    pub to: DisbursementStatus,
    pub failure_code: Option<&'a str>,
    pub actor: &'a str,
    pub reason: &'a str,
    pub time: i64,
}

impl PayoutRef {
    pub fn status_changed(&self, change: StatusMove<'_>) -> NewEvent {
        NewEvent {
            event_type: EventType::DisbursementStatusChanged,
            time: change.time,
            actor: change.actor.to_owned(),
            partner_id: self.partner_id,
            claim_id: Some(self.claim_id),
            disbursement_id: Some(self.disbursement_id),
            detail: EventDetail::Disbursement {
                from_status: change.from,
                to_status: change.to,
                amount_krw: self.amount_krw,
                failure_code: change.failure_code.map(str::to_owned),
                reason: change.reason.to_owned(),
            },
        }
    }
}

/// An event as the feed keeps it: its place (`sequence`, taken in commit order) and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeEvent {
    pub sequence: i64,
    pub event_id: uuid::Uuid,
    pub event: NewEvent,
}

/// What a reader of the feed asks for: every event, or only some types, or one partner's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Empty: every type.
    pub types: Vec<EventType>,
    pub partner_id: Option<PartnerId>,
}

impl EventFilter {
    pub fn matches(&self, event: &NewEvent) -> bool {
        (self.types.is_empty() || self.types.contains(&event.event_type))
            && self.partner_id.is_none_or(|p| p == event.partner_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_is_stored_under_a_key_it_is_read_back_from() {
        for t in EventType::ALL {
            assert_eq!(EventType::from_key(t.key()), Some(t));
        }
        assert_eq!(EventType::from_key("claim_approved"), None);
    }

    #[test]
    fn a_filter_keeps_the_types_and_the_partner_asked_for() {
        let partner_id = PartnerId::new();
        let payout = PayoutRef {
            disbursement_id: DisbursementId::new(),
            claim_id: ClaimId::new(),
            partner_id,
            amount_krw: Krw::new(30_000),
        };
        let event = payout.status_changed(StatusMove {
            from: Some(DisbursementStatus::Submitted),
            to: DisbursementStatus::Paid,
            failure_code: None,
            actor: "dispatcher",
            reason: "",
            time: 1,
        });
        assert!(EventFilter::default().matches(&event));
        let of = |types: Vec<EventType>, partner_id| EventFilter { types, partner_id };
        assert!(of(vec![EventType::DisbursementStatusChanged], Some(partner_id)).matches(&event));
        assert!(!of(vec![EventType::ClaimDecided], None).matches(&event));
        assert!(!of(vec![], Some(PartnerId::new())).matches(&event));
    }
}
