//! ClaimService tests.
