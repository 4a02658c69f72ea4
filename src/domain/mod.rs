//! Pure types and rules of the programme: no I/O, nothing of ours imported.
//!
//! Every type here is made through a `parse` constructor, so once a value exists it is valid.

pub mod attempt;
pub mod claim;
pub mod disbursement;
pub mod event;
pub mod ids;
pub mod money;
pub mod partner;
pub mod policy;
pub mod refusal;
pub mod settlement;
pub mod text;

pub use attempt::*;
pub use claim::*;
pub use disbursement::*;
pub use event::*;
pub use ids::{ClaimId, DisbursementId, PartnerId};
pub use money::Krw;
pub use partner::*;
pub use policy::*;
pub use refusal::*;
pub use settlement::*;

/// Why a value was refused, in words a caller can act on. The API layer adds the field name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

impl Invalid {
    pub fn new(description: impl Into<String>) -> Self {
        Self(description.into())
    }
}
