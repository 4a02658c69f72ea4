//! Sealed account numbers as a whole: which keys the stored values need, and their re-sealing
//! under the current key when keys rotate. Rows are sealed one at a time by the aggregates
//! that write them; this is about all of them at once.

use async_trait::async_trait;

use super::{AuditEvent, Result};

/// Where account numbers are kept sealed, each bound to a partner id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealedPlace {
    /// The key probe (see [`crate::sealing::PiiCipher::seal_probe`]): one row.
    Probe,
    /// A partner's account.
    Partners,
    /// The account a payout goes to: the partner's at approval (or at its last retry).
    Disbursements,
}

impl SealedPlace {
    pub const ALL: [Self; 3] = [Self::Probe, Self::Partners, Self::Disbursements];

    /// The table that holds its values, as the audit log names it.
    pub fn table(self) -> &'static str {
        match self {
            Self::Probe => "pii_key_probe",
            Self::Partners => "partners",
            Self::Disbursements => "disbursements",
        }
    }

    /// The column that names a row; rows are re-sealed in its order.
    pub(crate) fn id_column(self) -> &'static str {
        match self {
            Self::Probe => "probe_id",
            Self::Partners => "partner_id",
            Self::Disbursements => "disbursement_id",
        }
    }

    /// The partner id a row's value is bound to, as SQL.
    pub(crate) fn partner_column(self) -> &'static str {
        match self {
            // `PROBE_PARTNER`: the nil id.
            Self::Probe => "'00000000-0000-0000-0000-000000000000'",
            Self::Partners | Self::Disbursements => "partner_id",
        }
    }
}

/// What the stored values need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedKeys {
    /// Every key id a stored value (the probe's included) is sealed under, each once, sorted.
    pub key_ids: Vec<String>,
    /// The key probe as stored (`Sealed::encode`d).
    pub probe: String,
}

/// Up to `limit` rows after `after` (in id order; "" for the first).
#[derive(Debug, Clone, Copy)]
pub struct ResealPage<'a> {
    pub after: &'a str,
    pub limit: u32,
}

/// What one batch of re-sealing did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResealBatch {
    /// Values re-sealed.
    pub resealed: u64,
    /// The id of the last row looked at: where the next batch starts. None: no more rows.
    pub last_id: Option<String>,
}

/// Makes the audit entry of a batch that re-sealed `n` values in a place.
pub type ResealAudit<'a> = &'a (dyn Fn(SealedPlace, u64) -> AuditEvent + Send + Sync);

/// The keys of sealed account numbers, across every place they are kept.
#[async_trait]
pub trait SealingStore {
    /// Stores the key probe, sealed under the current key, unless there is one; then answers
    /// which keys the stored values are sealed under, and the probe.
    async fn sealed_keys(&self) -> Result<SealedKeys>;
    /// Re-seals under the current key the values of `place` on `page` that are sealed under
    /// another, in one transaction with the batch's audit entry (`audit`, when any was
    /// re-sealed). The rows are held from the moment they are read, a row another transaction
    /// holds is passed over (a later pass finds it), and a value is only ever replaced by
    /// itself sealed anew: serving replicas and a concurrent run lose no change.
    async fn reseal_batch(
        &self,
        place: SealedPlace,
        page: ResealPage<'_>,
        audit: ResealAudit<'_>,
    ) -> Result<ResealBatch>;
}
