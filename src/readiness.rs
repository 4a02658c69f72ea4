//! Whether this replica can serve: [`Readiness`], which gRPC health and the admin port's
//! `/readyz` both report. It is ready while the database answers and the replica is not
//! draining.
//!
//! Every `database_probe_interval_ms` the database is asked for one cheap round trip
//! ([`ProbeStore::probe`]). The overall service (`""`) and each served service turn
//! `NOT_SERVING` on the first probe that fails (or gets no answer within
//! `database_acquire_timeout_ms`, as long as a call would wait) and `SERVING` again on the
//! first that succeeds: a load balancer stops sending calls that could only fail
//! `UNAVAILABLE`, and sends them again without a restart. Once draining (SIGTERM), they stay
//! `NOT_SERVING`.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// Whether the replica is ready, shared by gRPC health and `/readyz`. It starts ready: the
/// store has just been opened and migrated.
#[derive(Clone)]
pub struct Readiness {
    inner: Arc<Inner>,
}

struct Inner {
    database_answers: AtomicBool,
    draining: AtomicBool,
    health: HealthReporter,
    services: Vec<&'static str>,
    /// Held while the health statuses are written, so that the last change is the one shown.
    publishing: tokio::sync::Mutex<()>,
}

impl Readiness {
    /// Readiness that sets the gRPC health of `""` and of each of `services` through `health`.
    pub fn new(health: HealthReporter, services: Vec<&'static str>) -> Self {
        Self {
            inner: Arc::new(Inner {
                database_answers: AtomicBool::new(true),
                draining: AtomicBool::new(false),
                health,
                services,
                publishing: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// The database answers and the replica is not draining.
    pub fn is_ready(&self) -> bool {
        self.inner.database_answers.load(Ordering::Acquire)
            && !self.inner.draining.load(Ordering::Acquire)
    }

    /// Whether the replica is draining (shutting down).
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    /// The replica is shutting down: not ready from now on, whatever the database does.
    pub async fn drain(&self) {
        self.inner.draining.store(true, Ordering::Release);
        self.publish().await;
    }

    async fn set_database_answers(&self, answers: bool) {
        self.inner
            .database_answers
            .store(answers, Ordering::Release);
        self.publish().await;
    }

    /// Writes the gRPC health of every service as readiness now is.
    async fn publish(&self) {
        let _one_at_a_time = self.inner.publishing.lock().await;
        let status = if self.is_ready() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for name in std::iter::once("").chain(self.inner.services.iter().copied()) {
            self.inner.health.set_service_status(name, status).await;
        }
    }
}

/// Probes `store` until `stop` resolves, telling `readiness` on every change.
pub async fn follow_database(
    store: Arc<dyn Store>,
    readiness: Readiness,
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
        match probed {
            Ok(()) => tracing::info!("the database answers again: serving"),
            Err(e) => tracing::warn!(error = %e, "the database does not answer: not serving"),
        }
        readiness.set_database_answers(serving).await;
    }
}
