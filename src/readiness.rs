//! Whether this replica can serve: every `database_probe_interval_ms` the database is asked
//! for one cheap round trip ([`ProbeStore::probe`]), and gRPC health follows the answer. The
//! overall service (`""`) and each of `services` turn `NOT_SERVING` on the first probe that
//! fails (or gets no answer within `database_acquire_timeout_ms`, as long as a call would
//! wait) and `SERVING` again on the first that succeeds: a load balancer stops sending calls
//! that could only fail `UNAVAILABLE`, and sends them again without a restart.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::store::Store;

/// How the probe runs.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    /// From the start of one probe to the start of the next.
    pub interval: Duration,
    /// A probe with no answer by then has failed.
    pub timeout: Duration,
}

/// Probes `store` until `stop` resolves, setting the health of `""` and of each of `services`
/// on every change. The service starts `SERVING`: it has just opened and migrated the store.
pub async fn follow_database(
    store: Arc<dyn Store>,
    reporter: HealthReporter,
    services: Vec<&'static str>,
    probe: Probe,
    stop: impl Future<Output = ()>,
) {
    let mut stop = std::pin::pin!(stop);
    let mut ticks = tokio::time::interval(probe.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut serving = true;
    loop {
        let next = async {
            ticks.tick().await;
            store.probe(probe.timeout).await
        };
        let probed = tokio::select! {
            () = &mut stop => return,
            probed = next => probed,
        };
        if probed.is_ok() == serving {
            continue;
        }
        serving = probed.is_ok();
        let status = match probed {
            Ok(()) => {
                tracing::info!("the database answers again: serving");
                ServingStatus::Serving
            }
            Err(e) => {
                tracing::warn!(error = %e, "the database does not answer: not serving");
                ServingStatus::NotServing
            }
        };
        for name in std::iter::once("").chain(services.iter().copied()) {
            reporter.set_service_status(name, status).await;
        }
    }
}
