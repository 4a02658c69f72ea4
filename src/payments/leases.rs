//! The leases a dispatch round holds on its outbox rows: kept while the round runs, and
//! handed back when the replica stops, so that another replica takes the rows at once rather
//! than after the lease lapses.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use super::dispatcher::micros;
use crate::domain::DisbursementId;
use crate::store::{Disbursement, Micros, Store, now_micros};

/// A round's leases: its rows, and when they lapse as last renewed.
pub(super) struct Leases<'a> {
    store: &'a dyn Store,
    ids: Vec<DisbursementId>,
    held_until: AtomicI64,
    lease: Duration,
}

impl<'a> Leases<'a> {
    /// The leases on `leased`, taken until `held_until` for `lease` at a time.
    pub(super) fn new(
        store: &'a dyn Store,
        leased: &[Disbursement],
        held_until: Micros,
        lease: Duration,
    ) -> Self {
        Self {
            store,
            ids: leased.iter().map(|d| d.disbursement_id).collect(),
            held_until: AtomicI64::new(held_until),
            lease,
        }
    }

    /// Renews the leases every third of the lease, for as long as it is polled.
    pub(super) async fn keep(&self) {
        let every = (self.lease / 3).max(Duration::from_millis(10));
        loop {
            tokio::time::sleep(every).await;
            let until = now_micros() + micros(self.lease);
            let held = self.held_until.load(Ordering::Acquire);
            match self.store.renew_leases(&self.ids, held, until).await {
                Ok(_) => self.held_until.store(until, Ordering::Release),
                Err(e) => tracing::warn!(error = %e, "renewing dispatch leases"),
            }
        }
    }

    /// Releases the leases still held (rows the round finished or made due again were
    /// released with them): due again now, for any replica.
    pub(super) async fn hand_back(&self) {
        let held = self.held_until.load(Ordering::Acquire);
        match self.store.renew_leases(&self.ids, held, 0).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(leases = n, "stopping: leases handed back"),
            Err(e) => tracing::warn!(error = %e, "handing back dispatch leases"),
        }
    }
}
