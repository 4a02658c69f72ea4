//! Writes the entries of allowed calls that no transaction of theirs recorded: concurrent
//! calls' entries share one transaction.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::store::{AuditEvent, Store};

/// Entries to store, and who waits for them.
type Pending = (Vec<AuditEvent>, oneshot::Sender<Result<(), String>>);

/// Writes the entries of calls that finish together in one transaction: a commit (an fsync) of
/// its own for every call's audit row would cap the throughput of every mutating method. Each
/// call still waits until its entry is stored before it answers.
#[derive(Clone)]
pub(super) struct GroupWriter {
    tx: mpsc::Sender<Pending>,
}

impl GroupWriter {
    /// Calls whose entries share a transaction at most.
    const MAX_CALLS: usize = 512;

    /// Starts the task that writes the entries; it must run inside the Tokio runtime, and
    /// ends when the last handle is dropped.
    pub(super) fn spawn(store: Arc<dyn Store>) -> Self {
        let (tx, mut rx) = mpsc::channel::<Pending>(10_000);
        tokio::spawn(async move {
            let mut pending = Vec::with_capacity(Self::MAX_CALLS);
            // While one batch is written, the next calls' entries queue up for the next.
            while rx.recv_many(&mut pending, Self::MAX_CALLS).await > 0 {
                let (events, waiting): (Vec<Vec<AuditEvent>>, Vec<_>) = pending.drain(..).unzip();
                let events: Vec<AuditEvent> = events.into_iter().flatten().collect();
                let written = store.append_audit(&events).await.map_err(|e| e.to_string());
                for reply in waiting {
                    let _ = reply.send(written.clone());
                }
            }
        });
        Self { tx }
    }

    async fn append(&self, events: Vec<AuditEvent>) -> Result<(), String> {
        let (reply, written) = oneshot::channel();
        self.tx
            .send((events, reply))
            .await
            .map_err(|_| "the audit writer has stopped".to_owned())?;
        written
            .await
            .map_err(|_| "the audit writer has stopped".to_owned())?
    }

    /// Stores `events` and waits until they are; a failure is logged, never the call's.
    pub(super) async fn record(&self, events: Vec<AuditEvent>) {
        let Some(method) = events.first().map(|e| e.method.clone()) else {
            return;
        };
        let count = events.len();
        if let Err(e) = self.append(events).await {
            tracing::error!(error = %e, method = %method, lost = count, "audit log write failed");
        }
    }
}
