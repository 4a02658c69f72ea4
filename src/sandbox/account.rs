//! Account numbers as the sandbox bank reads them, and the failures their last digits trigger.

use std::hash::{DefaultHasher, Hash, Hasher};

use tonic::Status;

use crate::proto::mask_account_number;

/// Accounts ending in these digits are closed.
pub const CLOSED_ACCOUNT_SUFFIX: &str = "0000";
/// Accounts ending in these digits are held by someone other than the expected holder.
pub const FOREIGN_HOLDER_SUFFIX: &str = "9999";
/// The holder name the bank reports for [`FOREIGN_HOLDER_SUFFIX`] accounts.
pub const UNKNOWN_HOLDER_NAME: &str = "UNKNOWN HOLDER";
/// Failure code for closed accounts.
pub const ACCOUNT_CLOSED: &str = "ACCOUNT_CLOSED";
/// Failure code for instructions whose holder is not the expected one.
pub const HOLDER_MISMATCH: &str = "HOLDER_MISMATCH";

/// An account number reduced to its digits, which is what banks compare: hyphens and spaces
/// are formatting.
pub(super) struct AccountNumber {
    digits: String,
}

impl AccountNumber {
    pub(super) fn parse(raw: &str) -> Result<Self, Status> {
        let raw = raw.trim();
        if raw.is_empty() {
            return Err(Status::invalid_argument("account_number is required"));
        }
        // The number itself stays out of the message: errors end up in logs.
        if !raw
            .chars()
            .all(|c| c.is_ascii_digit() || c == '-' || c == ' ')
        {
            return Err(Status::invalid_argument(
                "account_number must contain only digits and hyphens",
            ));
        }
        let digits: String = raw.chars().filter(char::is_ascii_digit).collect();
        if digits.is_empty() {
            return Err(Status::invalid_argument("account_number has no digits"));
        }
        Ok(Self { digits })
    }

    pub(super) fn last4(&self) -> String {
        self.digits[self.digits.len().saturating_sub(4)..].to_owned()
    }

    pub(super) fn is_closed(&self) -> bool {
        self.digits.ends_with(CLOSED_ACCOUNT_SUFFIX)
    }

    pub(super) fn has_foreign_holder(&self) -> bool {
        self.digits.ends_with(FOREIGN_HOLDER_SUFFIX)
    }

    pub(super) fn fingerprint(&self, bank_code: &str) -> u64 {
        let mut hasher = DefaultHasher::new();
        bank_code.hash(&mut hasher);
        self.digits.hash(&mut hasher);
        hasher.finish()
    }

    pub(super) fn masked(&self) -> String {
        mask_account_number(&self.digits)
    }
}

pub(super) fn validate_bank_code(bank_code: &str) -> Result<(), Status> {
    if bank_code.is_empty() {
        return Err(Status::invalid_argument("bank_code is required"));
    }
    if bank_code.len() != 3 || !bank_code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Status::invalid_argument(
            "bank_code must be a 3-digit KFTC code",
        ));
    }
    Ok(())
}

pub(super) fn validate_idempotency_key(key: &str) -> Result<(), Status> {
    if key.trim().is_empty() {
        return Err(Status::invalid_argument("idempotency_key is required"));
    }
    Ok(())
}
