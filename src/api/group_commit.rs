//! Group commit for the unary intake calls: concurrent `RegisterPartner` and `SubmitClaim`
//! calls share one transaction, so durable throughput is not one commit (one fsync) per call.
//!
//! A call hands its validated row to a [`Batcher`] and waits for its own answer. The
//! batcher's task takes every row waiting (up to [`MAX_ROWS`]) and writes them with the
//! store's batch method, which answers each row exactly as the one-row method would have. While
//! a batch is being written, new rows queue and form the next one: batches grow with load, and
//! a lone call is written at once rather than after a wait.
//!
//! Each call's audit entry is written in the batch's transaction, with its row.
//!
//! A row the database refuses fails only its own call: a batch that fails as a whole is
//! written again in halves down to the rows that fail alone ([`write_isolating`]), each part
//! in its own transaction with its rows' audit entries.
//!
//! A batch that cannot reach the database fails every call in it `Unavailable`, and so are
//! the calls that were waiting meanwhile, at once: they would otherwise each wait a turn of
//! their own (as long again) to find the same.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use futures::FutureExt as _;
use futures::future::BoxFuture;
use opentelemetry::KeyValue;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument as _;

use crate::audit::{AuditDraft, CallRecord};
use crate::domain::{Claim, NewPartner, Partner};
use crate::store::isolate::write_isolating;
use crate::store::{
    self, AuditEvent, BatchAudit, ClaimSubmission, Idempotency, Store, StoreError, Stored,
};

/// Rows per transaction at most.
pub const MAX_ROWS: usize = 256;
/// Calls that may wait for a batch; beyond that, callers wait to join the queue.
const QUEUE: usize = 4096;

type Answer<T> = store::Result<Stored<T>>;

/// Writes one batch (or part of one) in one transaction, with the audit entries of the calls
/// that have a draft (`drafts[i]` is row `i`'s): one answer per row, in order.
pub type WriteBatch<R, T> = Arc<
    dyn for<'a> Fn(
            &'a [R],
            &'a [Option<AuditDraft>],
        ) -> BoxFuture<'a, store::Result<Vec<Answer<T>>>>
        + Send
        + Sync,
>;

/// A [`WriteBatch`] from a closure (which states the lifetimes a closure cannot).
fn write_batch_with<R, T, F>(write: F) -> WriteBatch<R, T>
where
    F: for<'a> Fn(
            &'a [R],
            &'a [Option<AuditDraft>],
        ) -> BoxFuture<'a, store::Result<Vec<Answer<T>>>>
        + Send
        + Sync
        + 'static,
{
    Arc::new(write)
}

struct Job<R, T> {
    row: R,
    /// The caller's audit entry, to be written with its row.
    audit: Option<AuditDraft>,
    /// The caller's span: the batch's span continues the first caller's trace and links the
    /// others, so each call's trace still shows the database work done for it.
    span: tracing::Span,
    /// The answer, and whether the caller's audit entry was written with it.
    reply: oneshot::Sender<(Answer<T>, bool)>,
    queued: Instant,
}

/// Queues rows of one kind and writes them in shared transactions.
pub struct Batcher<R, T> {
    tx: mpsc::Sender<Job<R, T>>,
}

impl<R: Send + Sync + 'static, T: Send + 'static> Batcher<R, T> {
    /// Starts the task that writes the batches; it ends when the batcher is dropped.
    pub fn spawn(name: &'static str, write: WriteBatch<R, T>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(name, rx, write));
        Self { tx }
    }

    /// Writes `row` with whatever other rows are waiting, and returns its own answer. The
    /// entry of `call` is written with the row (and the record told so).
    pub async fn submit(&self, row: R, call: &CallRecord) -> Answer<T> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            row,
            audit: call.draft(),
            span: tracing::Span::current(),
            reply,
            queued: Instant::now(),
        };
        self.tx.send(job).await.map_err(|_| stopped())?;
        let (answer, audited) = answer.await.map_err(|_| unanswered())?;
        if audited {
            call.audited();
        }
        answer
    }
}

fn stopped() -> StoreError {
    StoreError::Unexpected(anyhow::anyhow!("the group-commit task has stopped"))
}

fn unanswered() -> StoreError {
    StoreError::Unexpected(anyhow::anyhow!(
        "the batch writing the call ended without answering it"
    ))
}

/// Writes the batches, one at a time: rows that come while a batch is written form the next,
/// bigger, batch. (Measured with 64 callers: one beat two and four on both databases; SQLite
/// takes one writer at a time anyway, and makes the others sleep-wait for its lock. Measured
/// again with a registration batch as one statement, from a separate client process: one gave
/// 11,400-12,400 calls/s, two gave 10,300-11,000 with PostgreSQL spending 40% more CPU per
/// call, on smaller batches that queue for the feed's lock. With a claim batch as one
/// statement too: two gave 5,200-5,700 claims/s against 6,100-6,900 for one; two with only one
/// batch executing at a time, the next one prepared meanwhile, gave 5,200-5,600. Measured
/// again on a runtime without the LIFO slot, in pairs on a machine whose speed drifted: two,
/// the second batch started once as many calls wait as the first holds, gave a median of
/// 1.07x the claims per second of one, some pairs lower, and 0.95-1.05x for registrations.
/// Measured again with each batch's commit overlapped by the next batch's statement (the
/// statement in an explicit transaction, the next one sent on another connection once it had
/// executed): PostgreSQL waited 2.7 ms between claim statements instead of 4.2 ms, but the
/// batches were smaller and each row cost it more; claims/s moved +2% and +5%, registrations
/// -2% and -12%.)
async fn run<R: Send + Sync + 'static, T: Send + 'static>(
    name: &'static str,
    mut rx: mpsc::Receiver<Job<R, T>>,
    write: WriteBatch<R, T>,
) {
    // When a batch last found the database out of reach.
    let mut unreachable: Option<Instant> = None;
    // Each batch is written here, in this task, not in one spawned for it: when a batch is
    // answered, the rows that came meanwhile are taken and their statement sent in the same
    // turn, before the callers just answered run. A batch in a task of its own, and this
    // loop woken by its end, each waited behind those callers for a worker: between two claim
    // batches (6.4 ms each) the database waited 3.1 ms for the next, 2.3 ms since.
    loop {
        let mut batch = Vec::with_capacity(MAX_ROWS);
        if rx.recv_many(&mut batch, MAX_ROWS).await == 0 {
            return;
        }
        if let Some(at) = unreachable {
            batch = answer_waiting(batch, at);
            if batch.is_empty() {
                continue;
            }
        }
        // A batch that panics fails its own calls (their answers are dropped), not the
        // batcher: the rows after it are still written.
        let found_unreachable = AssertUnwindSafe(write_batch(name, batch, &write))
            .catch_unwind()
            .await;
        if found_unreachable.unwrap_or(false) {
            unreachable = Some(Instant::now());
        }
    }
}

/// Answers `Unavailable` the calls that were queued before a batch found the database out of
/// reach at `unreachable_at`; returns the others.
fn answer_waiting<R, T>(jobs: Vec<Job<R, T>>, unreachable_at: Instant) -> Vec<Job<R, T>> {
    let (waited, fresh): (Vec<_>, Vec<_>) = jobs
        .into_iter()
        .partition(|job| job.queued <= unreachable_at);
    for job in waited {
        let answer = Err(StoreError::Unavailable(anyhow::anyhow!(
            "the database was out of reach while the call waited for its turn"
        )));
        let _ = job.reply.send((answer, false));
    }
    fresh
}

/// Writes a batch and answers its calls; true when every call failed for want of the
/// database.
async fn write_batch<R, T>(
    name: &'static str,
    jobs: Vec<Job<R, T>>,
    write: &WriteBatch<R, T>,
) -> bool {
    let span = tracing::info_span!(
        parent: &jobs[0].span,
        "group_commit",
        payouts.method = name,
        payouts.rows = jobs.len()
    );
    for job in &jobs[1..] {
        span.follows_from(&job.span);
    }
    let count = jobs.len();
    let taken = Instant::now();
    // Jobs are in queue order: the first waited longest.
    let waited = taken.saturating_duration_since(jobs[0].queued);
    let mut rows = Vec::with_capacity(count);
    let mut drafts = Vec::with_capacity(count);
    let mut replies = Vec::with_capacity(count);
    for job in jobs {
        replies.push((job.reply, job.audit.is_some()));
        rows.push(job.row);
        drafts.push(job.audit);
    }
    let answers = write_isolating(name, count, |range: std::ops::Range<usize>| {
        write(&rows[range.clone()], &drafts[range])
    })
    .instrument(span)
    .await;
    let unreachable = !answers.is_empty()
        && answers
            .iter()
            .all(|a| matches!(a, Err(StoreError::Unavailable(_))));
    for ((reply, audited), answer) in replies.into_iter().zip(answers) {
        let sent = match answer {
            // Written (or refused by the store) with the other rows of its part of the batch,
            // and audited with them.
            Ok(answer) => (answer, audited),
            // Nothing of the row was stored, nor audited; the caller gets the error (and logs
            // it), and the audit layer records the failed call.
            Err(e) => (Err(e), false),
        };
        // A caller that gave up no longer listens; its row is written all the same.
        let _ = reply.send(sent);
    }
    let metrics = crate::telemetry::metrics();
    let method = [KeyValue::new("rpc.method", name)];
    metrics.group_commit_rows.record(count as u64, &method);
    metrics
        .group_commit_wait
        .record(waited.as_secs_f64(), &method);
    metrics
        .group_commit_duration
        .record(taken.elapsed().as_secs_f64(), &method);
    unreachable
}

/// The batchers of the two unary intake calls.
pub struct GroupCommit {
    pub partners: Batcher<(Idempotency, NewPartner), Partner>,
    pub claims: Batcher<ClaimSubmission, Claim>,
}

/// The audit entry of row `i` of a batch of calls, from its draft and its answer.
fn entry<T>(
    drafts: &[Option<AuditDraft>],
    i: usize,
    answer: &Answer<T>,
    resource: impl Fn(&Stored<T>) -> String,
) -> Option<AuditEvent> {
    let draft = drafts.get(i)?.as_ref()?;
    Some(super::batch_entry(draft, answer, resource))
}

/// One batch of calls written by a store method: each row with its audit entry.
type StoreBatch<R, T> = for<'a> fn(
    &'a dyn Store,
    &'a [R],
    BatchAudit<'a, T>,
) -> BoxFuture<'a, store::Result<Vec<Answer<T>>>>;

/// A batcher whose batches `write` stores, each call audited under its `resource` id.
fn audited_batcher<R, T>(
    name: &'static str,
    store: Arc<dyn Store>,
    resource: fn(&Stored<T>) -> String,
    write: StoreBatch<R, T>,
) -> Batcher<R, T>
where
    R: Send + Sync + 'static,
    T: Send + Sync + 'static,
{
    Batcher::spawn(
        name,
        write_batch_with(move |rows: &[R], drafts: &[Option<AuditDraft>]| {
            let store = store.clone();
            Box::pin(async move {
                let row = |i: usize, answer: &Answer<T>| entry(drafts, i, answer, resource);
                let audit = BatchAudit {
                    row: &row,
                    refused: &[],
                };
                write(&*store, rows, audit).await
            }) as BoxFuture<'_, _>
        }),
    )
}

impl GroupCommit {
    pub fn spawn(store: Arc<dyn Store>) -> Self {
        Self {
            partners: audited_batcher(
                "RegisterPartner",
                store.clone(),
                super::partners::registered_id,
                |store, rows, audit| {
                    store.register_partners(rows, &super::partners::render_registered, audit)
                },
            ),
            claims: audited_batcher(
                "SubmitClaim",
                store,
                super::claims::submitted_id,
                |store, rows, audit| {
                    store.submit_claims(rows, &super::claims::render_submitted, audit)
                },
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Doubles each row; a batch holding row 0 panics.
    fn doubling() -> WriteBatch<u32, u32> {
        write_batch_with(|rows: &[u32], _: &[Option<AuditDraft>]| {
            Box::pin(async move {
                if rows.contains(&0) {
                    panic!("a batch with row 0");
                }
                Ok(rows.iter().map(|&r| Ok(Stored::Fresh(r * 2))).collect())
            }) as BoxFuture<'_, _>
        })
    }

    #[tokio::test]
    async fn a_batch_that_panics_fails_its_own_calls_and_the_next_batch_is_written() {
        let batcher = Batcher::spawn("test", doubling());
        let call = CallRecord::default();
        let failed = batcher.submit(0, &call).await;
        assert!(
            matches!(&failed, Err(StoreError::Unexpected(e)) if e.to_string().contains("without answering")),
            "{failed:?}"
        );
        let written = batcher.submit(21, &call).await;
        assert!(matches!(written, Ok(Stored::Fresh(42))), "{written:?}");
    }
}
