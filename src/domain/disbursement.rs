//! A disbursement's life: `QUEUED -> SUBMITTED -> PAID`, or `FAILED{code}` / `CANCELLED`.

use serde::{Deserialize, Serialize};

use super::{FourEyes, Refusal, same_principal};

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

/// The last change of the account a partner is paid into: who made it, and when (Unix
/// microseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccountChange<'a> {
    pub changed_by: &'a str,
    pub change_time: i64,
}

/// Whether `actor` may retry a disbursement made at `create_time` that stands at `status`:
/// not the principal who changed the partner's account since (four eyes, told first), and
/// only a `FAILED` one (a retry puts it back in the queue).
pub fn may_retry(
    status: DisbursementStatus,
    create_time: i64,
    account_change: Option<AccountChange<'_>>,
    actor: &str,
) -> Result<(), Refusal> {
    if let Some(change) = account_change
        && change.change_time >= create_time
        && same_principal(change.changed_by, actor)
    {
        return Err(Refusal::SamePrincipal(FourEyes::RetryAfterOwnAccountChange));
    }
    if !status.can_become(DisbursementStatus::Queued) {
        return Err(Refusal::NotRetryable(status));
    }
    Ok(())
}

/// Whether a disbursement at `status` may be cancelled: only while `QUEUED`, before any
/// instruction reached the backend.
pub fn may_cancel(status: DisbursementStatus) -> Result<(), Refusal> {
    if status.can_become(DisbursementStatus::Cancelled) {
        Ok(())
    } else {
        Err(Refusal::NotCancellable(status))
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
    use super::*;

    const CREATED: i64 = 1_000;

    fn changed_by(who: &str, change_time: i64) -> Option<AccountChange<'_>> {
        Some(AccountChange {
            changed_by: who,
            change_time,
        })
    }

    #[test]
    fn only_failed_disbursements_are_retried() {
        assert_eq!(may_retry(Failed, CREATED, None, "ops"), Ok(()));
        for status in [Queued, Submitted, Paid, Cancelled] {
            assert_eq!(
                may_retry(status, CREATED, None, "ops"),
                Err(Refusal::NotRetryable(status))
            );
        }
    }

    #[test]
    fn who_changed_the_account_since_the_payout_was_made_may_not_retry_it() {
        let refused = Err(Refusal::SamePrincipal(FourEyes::RetryAfterOwnAccountChange));
        assert_eq!(
            may_retry(Failed, CREATED, changed_by("ops", CREATED), "ops"),
            refused
        );
        assert_eq!(
            may_retry(Failed, CREATED, changed_by("ops", CREATED + 1), "ops"),
            refused
        );
        // Four eyes is told before the status.
        assert_eq!(
            may_retry(Paid, CREATED, changed_by("ops", CREATED), "ops"),
            refused
        );
        // A change before the payout was made, or by someone else, is no bar.
        assert_eq!(
            may_retry(Failed, CREATED, changed_by("ops", CREATED - 1), "ops"),
            Ok(())
        );
        assert_eq!(
            may_retry(Failed, CREATED, changed_by("other", CREATED), "ops"),
            Ok(())
        );
        assert_eq!(
            may_retry(
                Failed,
                CREATED,
                changed_by("local-dev", CREATED),
                "local-dev"
            ),
            Ok(())
        );
    }

    #[test]
    fn only_queued_disbursements_are_cancelled() {
        assert_eq!(may_cancel(Queued), Ok(()));
        for status in [Submitted, Paid, Failed, Cancelled] {
            assert_eq!(may_cancel(status), Err(Refusal::NotCancellable(status)));
        }
    }

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
