//! The keys that seal account numbers, held against what is stored: the check a replica makes
//! before it serves, and `partner-payouts reseal`, which moves every stored value under the
//! first key so that older keys can be retired.
//!
//! A replica that cannot open what is stored must not serve: it would take payouts it cannot
//! pay, and they would go from replica to replica. So a replica starts only if it holds every
//! key a stored value is sealed under, and its key of that id opens the key probe (a known
//! value the first replica on a database stored under its first key: on an empty database it
//! stands for the account numbers to come).
//!
//! Re-sealing goes through every place account numbers are kept, a batch at a time in id
//! order. A batch is one transaction: the values it re-seals, each only if unchanged since it
//! was read, and one audit entry (see [`reseal`] for why one per batch). Replicas keep serving
//! meanwhile; a run can be repeated, and finds nothing left to do.

use anyhow::Context as _;
use tonic::Code;
use uuid::Uuid;

use crate::audit::AuditDraft;
use crate::principal::Principal;
use crate::sealing::{PiiCipher, Sealed};
use crate::store::{AuditEvent, ResealAudit, ResealPage, SealedKeys, SealedPlace, Store};

/// The method the audit log names for a re-sealing batch.
pub const RESEAL_METHOD: &str = "partner-payouts reseal";

/// Passes over everything before a run gives up on values that stay under another key.
///
/// A pass leaves values behind for two reasons. A row another transaction held was passed
/// over rather than waited for (a dispatch round settling payouts holds them until it commits;
/// see `SKIP_LOCKED`): a later pass finds it free. Or a replica still seals under another key:
/// every later pass finds new values, and the run gives up and says so.
const MAX_PASSES: u32 = 8;
/// The pause before the second pass, doubled before each one after it (50 ms to 3.2 s, 6.35 s
/// over all eight): enough for the transactions that held rows to have ended. Passes right
/// after each other ran inside one such transaction, and gave up on rows only held.
const FIRST_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

/// Whether `cipher` opens everything stored: every key id in use is loaded, and the loaded key
/// of the probe's id opens it. Stores the probe first if there is none. The error names the
/// key ids that are missing.
pub async fn check(store: &dyn Store, cipher: &PiiCipher) -> anyhow::Result<SealedKeys> {
    let sealed = store
        .sealed_keys()
        .await
        .context("reading which keys seal the stored account numbers")?;
    let missing = cipher.missing_keys(sealed.key_ids.iter().map(String::as_str));
    if !missing.is_empty() {
        anyhow::bail!(
            "stored account numbers are sealed under key id {}, which this replica does not \
             have (it has {}): add that key to PAYOUTS_PII_KEY or the key file, after the key \
             that seals",
            missing.join(", "),
            cipher.key_ids().join(", ")
        );
    }
    let probe = Sealed::decode(&sealed.probe).context("the stored key probe is malformed")?;
    cipher.open_probe(&probe).map_err(|e| {
        anyhow::anyhow!(
            "this replica's key {} does not open the key probe ({e}): it is not the key of that \
             id that sealed the stored account numbers",
            probe.key_id
        )
    })?;
    Ok(sealed)
}

/// What a run of [`reseal`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResealReport {
    /// The key every stored value is now sealed under: the first one loaded.
    pub key_id: String,
    /// Key ids values were sealed under before the run and are not any more.
    pub retired_key_ids: Vec<String>,
    /// Values re-sealed.
    pub resealed: u64,
    /// Passes over everything: one, unless values under another key appeared or were held
    /// meanwhile.
    pub passes: u32,
}

/// Re-seals every stored account number (and the probe) under the current key, `batch` rows
/// per transaction, until none is sealed under another. Refuses to start, like a replica,
/// when a key in use is not loaded.
///
/// Each batch that re-seals anything writes one audit entry in its own transaction, by the
/// `reseal` principal, naming the table, with the run's id as its request id and the values it
/// re-sealed as its count. Per batch rather than per run, because an entry in the transaction
/// of its changes is never missing for a change that was made, even if the run stops midway
/// (an entry for the whole run would be written before the work, claiming what may not
/// happen, or after it, and be lost with an interrupted run); and per batch rather than per
/// value, because re-sealing changes no account number, only the key around it, and the log
/// should not grow by a row per partner for it.
pub async fn reseal(
    store: &dyn Store,
    cipher: &PiiCipher,
    batch: u32,
) -> anyhow::Result<ResealReport> {
    let before = check(store, cipher)
        .await
        .context("cannot re-seal the stored account numbers")?;
    let current = cipher.current_key_id().to_owned();
    let run_id = Uuid::now_v7().to_string();
    let audit = |place: SealedPlace, resealed: u64| -> AuditEvent {
        AuditEvent {
            count: i64::try_from(resealed).unwrap_or(i64::MAX),
            ..AuditDraft::new(Principal::RESEAL, RESEAL_METHOD, "")
                .with_request_id(run_id.clone())
                .event(place.table().to_owned(), Code::Ok)
        }
    };
    let mut report = ResealReport {
        key_id: current.clone(),
        ..ResealReport::default()
    };
    let mut pause = FIRST_PAUSE;
    while report.passes < MAX_PASSES {
        if report.passes > 0 {
            tokio::time::sleep(pause).await;
            pause *= 2;
        }
        report.passes += 1;
        for place in SealedPlace::ALL {
            report.resealed += reseal_place(store, place, batch, &audit).await?;
        }
        let after = store.sealed_keys().await?;
        if after.key_ids == [current.as_str()] {
            report.retired_key_ids = before.key_ids;
            report.retired_key_ids.retain(|id| *id != current);
            return Ok(report);
        }
        tracing::info!(
            pass = report.passes,
            key_ids = ?after.key_ids,
            "values under other keys were written or held meanwhile; going over them again"
        );
    }
    let after = store.sealed_keys().await?;
    anyhow::bail!(
        "after {MAX_PASSES} passes, {:.2} s apart in all, stored account numbers are still sealed under \
         key id {}: a replica still seals under it, or holds their rows for that long. Put key \
         {current} first on every replica, then run reseal again",
        (FIRST_PAUSE * (2u32.pow(MAX_PASSES - 1) - 1)).as_secs_f64(),
        after
            .key_ids
            .iter()
            .filter(|id| **id != current)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// One pass over `place`, a batch at a time; how many values it re-sealed.
async fn reseal_place(
    store: &dyn Store,
    place: SealedPlace,
    batch: u32,
    audit: ResealAudit<'_>,
) -> anyhow::Result<u64> {
    let mut resealed = 0;
    let mut after = String::new();
    loop {
        let page = ResealPage {
            after: &after,
            limit: batch,
        };
        let done = store
            .reseal_batch(place, page, audit)
            .await
            .with_context(|| format!("re-sealing {} after {after:?}", place.table()))?;
        resealed += done.resealed;
        let Some(last_id) = done.last_id else {
            break;
        };
        after = last_id;
    }
    tracing::info!(table = place.table(), resealed, "re-sealed");
    Ok(resealed)
}
