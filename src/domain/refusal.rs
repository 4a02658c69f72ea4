//! Why a rule refuses an action on a claim or a disbursement as it stands, and the four-eyes
//! rule that several of them share.

use super::{DisbursementStatus, ReviewRefused};

/// An action the four-eyes rule keeps from the principal who did the step before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FourEyes {
    /// Reviewing a claim the same principal submitted.
    ReviewOwnClaim,
    /// Retrying a payout after the same principal changed the account it goes to.
    RetryAfterOwnAccountChange,
}

impl FourEyes {
    /// The action refused, as it completes "the same principal may not ...".
    pub fn action(self) -> &'static str {
        match self {
            Self::ReviewOwnClaim => "review a claim it submitted",
            Self::RetryAfterOwnAccountChange => {
                "retry a payout after changing the account it goes to"
            }
        }
    }
}

/// The four-eyes rule: two actions are by the same principal. Local development mode, where
/// every caller is `local-dev`, is exempt: it has only one principal and runs on loopback only.
pub fn same_principal(first: &str, second: &str) -> bool {
    first == second && first != "local-dev"
}

/// A rule of the programme refuses the action; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the same principal may not {}", .0.action())]
    SamePrincipal(FourEyes),
    #[error(transparent)]
    Review(#[from] ReviewRefused),
    #[error("only a FAILED disbursement can be retried; this one is {}", shown(*.0))]
    NotRetryable(DisbursementStatus),
    #[error("only a QUEUED disbursement can be cancelled; this one is {}", shown(*.0))]
    NotCancellable(DisbursementStatus),
}

fn shown(status: DisbursementStatus) -> String {
    status.key().to_uppercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_two_distinct_real_principals_pass_the_four_eyes_rule() {
        assert!(same_principal("alice", "alice"));
        assert!(!same_principal("alice", "bob"));
        assert!(!same_principal("local-dev", "local-dev"));
    }

    #[test]
    fn refusals_say_what_was_refused() {
        assert_eq!(
            Refusal::SamePrincipal(FourEyes::ReviewOwnClaim).to_string(),
            "the same principal may not review a claim it submitted"
        );
        assert_eq!(
            Refusal::NotRetryable(DisbursementStatus::Paid).to_string(),
            "only a FAILED disbursement can be retried; this one is PAID"
        );
        assert_eq!(
            Refusal::NotCancellable(DisbursementStatus::Submitted).to_string(),
            "only a QUEUED disbursement can be cancelled; this one is SUBMITTED"
        );
    }
}
