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

/// `Debug` for a message that carries an account number, which it shows masked; the other
/// fields are listed in the message's order.
macro_rules! debug_masking_account_number {
    ($($message:path => $name:literal { $($before:ident,)* @account_number $(, $after:ident)* })+) => {$(
        impl fmt::Debug for $message {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct($name)
                    $(.field(stringify!($before), &self.$before))*
                    .field("account_number", &mask_account_number(&self.account_number))
                    $(.field(stringify!($after), &self.$after))*
                    .finish()
            }
        }
    )+};
}

debug_masking_account_number! {
    payouts::v1::BankAccount => "BankAccount" {
        bank_code, @account_number, holder_name
    }
    payments::v1::VerifyAccountHolderRequest => "VerifyAccountHolderRequest" {
        bank_code, @account_number, expected_holder_name
    }
    payments::v1::SubmitInstructionRequest => "SubmitInstructionRequest" {
        idempotency_key, amount_krw, bank_code, @account_number, holder_name, memo
    }
}
