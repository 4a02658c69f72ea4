//! A disbursement's life: `QUEUED -> SUBMITTED -> PAID`, or `FAILED{code}` / `CANCELLED`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DisbursementStatus {
    Queued,
    Submitted,
    Paid,
    Failed,
    Cancelled,
}

impl DisbursementStatus {
    pub const ALL: [DisbursementStatus; 5] = [
        Self::Queued,
        Self::Submitted,
        Self::Paid,
        Self::Failed,
        Self::Cancelled,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Submitted => "submitted",
            Self::Paid => "paid",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn from_key(key: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.key() == key)
    }

    /// The transitions a disbursement may make. `PAID -> FAILED` is a payout the bank returned.
    pub fn can_become(self, next: Self) -> bool {
        use DisbursementStatus::*;
        matches!(
            (self, next),
            (Queued, Submitted)
                | (Queued, Failed)
                | (Queued, Cancelled)
                | (Submitted, Paid)
                | (Submitted, Failed)
                | (Failed, Queued)
                | (Paid, Failed)
        )
    }
}

/// Failure codes a disbursement can end with.
pub mod failure {
    pub const HOLDER_MISMATCH: &str = "HOLDER_MISMATCH";
    pub const ACCOUNT_CLOSED: &str = "ACCOUNT_CLOSED";
    pub const INVALID_ACCOUNT: &str = "INVALID_ACCOUNT";
    pub const RETURNED: &str = "RETURNED";
}

#[cfg(test)]
mod tests {
    use super::DisbursementStatus::*;

    #[test]
    fn paid_and_cancelled_are_final_except_a_return() {
        for next in super::DisbursementStatus::ALL {
            assert!(!Cancelled.can_become(next));
            assert_eq!(Paid.can_become(next), next == Failed);
        }
    }

    #[test]
    fn submitted_cannot_be_cancelled_or_requeued() {
        assert!(!Submitted.can_become(Cancelled));
        assert!(!Submitted.can_become(Queued));
        assert!(Queued.can_become(Cancelled));
    }
}
