//! One call to the payments backend on behalf of a disbursement: which call it was and what
//! came of it. Both are stored with the attempt and shown to callers as the same text, so
//! [`AttemptOperation::as_str`] and [`AttemptOutcome::as_str`] are part of the public contract.

use super::Invalid;

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

impl AttemptOperation {
    pub const ALL: [AttemptOperation; 3] = [
        Self::VerifyHolder,
        Self::SubmitInstruction,
        Self::GetInstruction,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::VerifyHolder => "VERIFY_ACCOUNT_HOLDER",
            Self::SubmitInstruction => "SUBMIT_INSTRUCTION",
            Self::GetInstruction => "GET_INSTRUCTION",
        }
    }

    pub fn parse(input: &str) -> Result<Self, Invalid> {
        Self::ALL
            .into_iter()
            .find(|op| op.as_str() == input)
            .ok_or_else(|| Invalid::new(format!("not a dispatch operation: {input:?}")))
    }
}

impl std::fmt::Display for AttemptOperation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

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

impl AttemptOutcome {
    pub const ALL: [AttemptOutcome; 9] = [
        Self::Match,
        Self::Mismatch,
        Self::AccountUnusable,
        Self::Error,
        Self::NotFound,
        Self::Accepted,
        Self::Paid,
        Self::Failed,
        Self::Unspecified,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Match => "MATCH",
            Self::Mismatch => "MISMATCH",
            Self::AccountUnusable => "ACCOUNT_UNUSABLE",
            Self::Error => "ERROR",
            Self::NotFound => "NOT_FOUND",
            Self::Accepted => "ACCEPTED",
            Self::Paid => "PAID",
            Self::Failed => "FAILED",
            Self::Unspecified => "UNSPECIFIED",
        }
    }

    pub fn parse(input: &str) -> Result<Self, Invalid> {
        Self::ALL
            .into_iter()
            .find(|outcome| outcome.as_str() == input)
            .ok_or_else(|| Invalid::new(format!("not a dispatch outcome: {input:?}")))
    }
}

impl std::fmt::Display for AttemptOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

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
