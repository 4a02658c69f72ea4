//! Code generated from `proto/`, and the descriptor set that reflection serves.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

use std::fmt;

pub mod payouts {
    pub mod v1 {
        tonic::include_proto!("payouts.v1");
    }
}

pub mod payments {
    pub mod v1 {
        tonic::include_proto!("payments.v1");
    }
}

pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

/// Every file of our API (and the google.rpc error details), for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("descriptor");

/// What may be shown of an account number: its last 4 digits.
pub fn mask_account_number(account_number: &str) -> String {
    let digits: Vec<char> = account_number
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    let last4: String = digits[digits.len().saturating_sub(4)..].iter().collect();
    format!("****{last4}")
}

impl fmt::Debug for payouts::v1::BankAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BankAccount")
            .field("bank_code", &self.bank_code)
            .field("account_number", &mask_account_number(&self.account_number))
            .field("holder_name", &self.holder_name)
            .finish()
    }
}

impl fmt::Debug for payments::v1::VerifyAccountHolderRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyAccountHolderRequest")
            .field("bank_code", &self.bank_code)
            .field("account_number", &mask_account_number(&self.account_number))
            .field("expected_holder_name", &self.expected_holder_name)
            .finish()
    }
}

impl fmt::Debug for payments::v1::SubmitInstructionRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubmitInstructionRequest")
            .field("idempotency_key", &self.idempotency_key)
            .field("amount_krw", &self.amount_krw)
            .field("bank_code", &self.bank_code)
            .field("account_number", &mask_account_number(&self.account_number))
            .field("holder_name", &self.holder_name)
            .field("memo", &self.memo)
            .finish()
    }
}
