//! One call to the payments backend on behalf of a disbursement: which call it was and what
//! came of it. Both are stored with the attempt and shown to callers as the same text, so
//! [`AttemptOperation::as_str`] and [`AttemptOutcome::as_str`] are part of the public contract.

use super::Invalid;

/// `ALL`, `as_str`, `parse` (exact) and `Display` for an enum stored as text: each variant and
/// its stored name, once.
macro_rules! stored_names {
    ($name:ident, $what:literal, { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $name {
            pub const ALL: [$name; [$($text),+].len()] = [$(Self::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }

            pub fn parse(input: &str) -> Result<Self, Invalid> {
                Self::ALL
                    .into_iter()
                    .find(|value| value.as_str() == input)
                    .ok_or_else(|| Invalid::new(format!(concat!("not ", $what, ": {:?}"), input)))
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

/// The backend call an attempt made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttemptOperation {
    /// Is the account the expected holder's, and can it take payouts?
    VerifyHolder,
    /// Send the instruction under its stored idempotency key.
    SubmitInstruction,
    /// Ask what became of the instruction sent under a key (an unknown outcome, or polling).
    GetInstruction,
}

stored_names!(AttemptOperation, "a dispatch operation", {
    VerifyHolder => "VERIFY_ACCOUNT_HOLDER",
    SubmitInstruction => "SUBMIT_INSTRUCTION",
    GetInstruction => "GET_INSTRUCTION",
});

/// What came of an attempt. A failed call is `Error`, with the gRPC code beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttemptOutcome {
    /// The holder check found the expected holder.
    Match,
    /// The holder check found someone else.
    Mismatch,
    /// The bank says the account cannot take payouts (closed, ...), with its failure code.
    AccountUnusable,
    /// The call failed (unavailable, deadline, ...): nothing is known of its effect.
    Error,
    /// The bank has no instruction under the key looked up.
    NotFound,
    /// The instruction was taken and settles later.
    Accepted,
    /// The instruction was paid.
    Paid,
    /// The instruction failed for good: a new one needs a new key.
    Failed,
    /// The bank answered with an instruction status we do not know.
    Unspecified,
}

stored_names!(AttemptOutcome, "a dispatch outcome", {
    Match => "MATCH",
    Mismatch => "MISMATCH",
    AccountUnusable => "ACCOUNT_UNUSABLE",
    Error => "ERROR",
    NotFound => "NOT_FOUND",
    Accepted => "ACCEPTED",
    Paid => "PAID",
    Failed => "FAILED",
    Unspecified => "UNSPECIFIED",
});

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn operations_keep_their_stored_names() {
        let names: Vec<_> = AttemptOperation::ALL.map(AttemptOperation::as_str).into();
        assert_eq!(
            names,
            [
                "VERIFY_ACCOUNT_HOLDER",
                "SUBMIT_INSTRUCTION",
                "GET_INSTRUCTION"
            ]
        );
    }

    #[test]
    fn outcomes_keep_their_stored_names() {
        let names: Vec<_> = AttemptOutcome::ALL.map(AttemptOutcome::as_str).into();
        assert_eq!(
            names,
            [
                "MATCH",
                "MISMATCH",
                "ACCOUNT_UNUSABLE",
                "ERROR",
                "NOT_FOUND",
                "ACCEPTED",
                "PAID",
                "FAILED",
                "UNSPECIFIED"
            ]
        );
    }

    #[test]
    fn parsing_is_exact() {
        for input in ["match", " MATCH", "MATCH ", "Verify_Account_Holder", ""] {
            assert!(AttemptOutcome::parse(input).is_err(), "{input:?}");
            assert!(AttemptOperation::parse(input).is_err(), "{input:?}");
        }
    }

    proptest! {
        #[test]
        fn operations_round_trip(op in proptest::sample::select(AttemptOperation::ALL.to_vec())) {
            prop_assert_eq!(AttemptOperation::parse(op.as_str()), Ok(op));
            prop_assert_eq!(op.to_string(), op.as_str());
        }

        #[test]
        fn outcomes_round_trip(outcome in proptest::sample::select(AttemptOutcome::ALL.to_vec())) {
            prop_assert_eq!(AttemptOutcome::parse(outcome.as_str()), Ok(outcome));
            prop_assert_eq!(outcome.to_string(), outcome.as_str());
        }

        #[test]
        fn other_text_is_neither(input in "[A-Z_]{0,24}") {
            let known = |s: &str| {
                AttemptOperation::ALL.iter().any(|op| op.as_str() == s)
                    || AttemptOutcome::ALL.iter().any(|o| o.as_str() == s)
            };
            prop_assume!(!known(&input));
            prop_assert!(AttemptOperation::parse(&input).is_err());
            prop_assert!(AttemptOutcome::parse(&input).is_err());
        }
    }
}
