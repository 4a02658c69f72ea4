//! DisbursementService tests.
