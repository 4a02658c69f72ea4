//! Bulk intake (`ImportPartners`, `ImportClaims`): bidirectional streams of rows, written in
//! batches. Rows are read as they come and gathered into a batch until the stream pauses or
//! the batch is full; each row is validated exactly as its unary call would validate it, and
//! the valid rows of a batch are written in one transaction by the store's batch method. Every
//! row is answered, in order, with what its unary call would have answered.
//!
//! Reading goes on while batches are written, and up to [`IN_FLIGHT`] batches of a stream are
//! written at once (each in its own transaction); answers still go back in row order. Rows of
//! concurrent batches that share a request id or a key wait for each other in the database,
//! and a batch that meets a row committed by another after it looked is redone row by row, so
//! every row gets what its unary call would have answered.
//!
//! Each row's audit entry is written in its batch's transaction.
//!
//! A row the database refuses fails alone: a batch that fails as a whole is written again in
//! parts, down to the rows that fail alone, and its other rows are created and answered as usual.
//!
//! A bad row never stops the stream. A stream that breaks off (or a caller that goes away)
//! stops the import after the batches in hand: each batch's transaction commits or not as a
//! whole, so every row is either stored whole (and replayed when sent again) or not at all.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Status, Streaming};
use tracing::Instrument as _;

use super::{batch_entry, decode_replay};
use crate::audit::{AuditDraft, CallRecord};
use crate::domain::text;
use crate::principal::Principal;
use crate::proto::google::rpc;
use crate::status::status_message;
use crate::store::isolate::write_isolating;
use crate::store::{self, AuditEvent, BatchAudit, Stored};

/// Rows per batch (and per transaction) at most.
pub const MAX_BATCH_ROWS: usize = 500;
/// Batches of one stream written at once. Two keep the database busy (a batch of new rows is
/// one statement); four wrote no faster and held twice the rows in memory.
pub const IN_FLIGHT: usize = 2;
/// A batch closes when no row has come for this long: the caller has sent what it had.
const PAUSE: Duration = Duration::from_millis(2);
/// ... or when its first row has waited this long for company.
const MAX_WAIT: Duration = Duration::from_millis(50);

/// The answers of an import, one per row, as they stream back.
pub type ImportAnswers<T> = ReceiverStream<Result<T, Status>>;

/// A batch write's answers: one per row, in order; `Err` when nothing was stored.
pub type Written<T> = store::Result<Vec<store::Result<Stored<T>>>>;

/// What became of one row.
pub enum RowResult<P> {
    Created(P),
    Replayed(P),
    Rejected(Status),
}

impl<P> RowResult<P> {
    /// The row's result, and (when rejected) the error as the unary call would have returned it.
    pub fn into_parts(self) -> (Option<P>, Option<rpc::Status>) {
        match self {
            Self::Created(p) | Self::Replayed(p) => (Some(p), None),
            Self::Rejected(status) => (None, Some(status_message(&status))),
        }
    }
}

/// One kind of import: how its rows are read, validated, written and answered.
pub trait Import: Send + Sync + 'static {
    type Request: Send + 'static;
    type Response: Send + 'static;
    /// A validated row, as the store's batch method takes it.
    type Row: Send + Sync + 'static;
    /// What the store returns for a fresh row.
    type Value: Send + 'static;
    /// The stored response kept for replays (the unary call's response).
    type Stored: prost::Message + Default;
    /// The row's result as sent back.
    type Proto: Send + Sync + 'static;

    /// The method's path, as the audit log names it.
    const PATH: &'static str;

    fn request_id(request: &Self::Request) -> &str;
    /// Validates a row exactly as the unary call does; the error is what that call returns.
    fn prepare(&self, request: Self::Request, principal: &str) -> Result<Self::Row, Status>;
    /// Writes the rows, and the audit entries `audit` makes, in one transaction.
    fn write<'a>(
        &'a self,
        rows: &'a [Self::Row],
        audit: BatchAudit<'a, Self::Value>,
    ) -> BoxFuture<'a, Written<Self::Value>>;
    fn fresh(value: &Self::Value) -> Self::Proto;
    fn replayed(stored: Self::Stored) -> Option<Self::Proto>;
    /// The id the audit log names for a written or replayed row.
    fn stored_id(stored: &Stored<Self::Value>) -> String;
    fn response(row: i64, result: RowResult<Self::Proto>) -> Self::Response;
}

/// Starts the import of the rows `request` streams; its answers stream back.
pub fn run<I: Import>(
    import: I,
    request: Request<Streaming<I::Request>>,
) -> ImportAnswers<I::Response> {
    let call = CallRecord::of(&request);
    let peer = request
        .remote_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    // Each row is audited as a call of its own by the stream's caller.
    let rows_draft = AuditDraft::new(Principal::of(&request), I::PATH, peer);
    let (tx, rx) = mpsc::channel(MAX_BATCH_ROWS);
    // The work belongs to the call's span, which stays open until the last row is answered.
    let work = drive(import, request.into_inner(), tx, call, rows_draft)
        .instrument(tracing::Span::current());
    tokio::spawn(work);
    ReceiverStream::new(rx)
}

async fn drive<I: Import, S>(
    import: I,
    inbound: S,
    tx: mpsc::Sender<Result<I::Response, Status>>,
    call: CallRecord,
    rows_draft: AuditDraft,
) where
    S: Stream<Item = Result<I::Request, Status>> + Unpin + Send + 'static,
{
    // The reader hands over whole batches, so no row is lost half-read when writing waits.
    let (batches_tx, mut batches) = mpsc::channel(1);
    let reader = tokio::spawn(read(inbound, batches_tx).instrument(tracing::Span::current()));
    let mut writing = FuturesOrdered::new();
    let mut next_row: i64 = 0;
    let mut reading = true;
    let mut failure = None;
    loop {
        tokio::select! {
            biased;
            Some(answers) = writing.next(), if !writing.is_empty() => {
                for answer in answers {
                    if tx.send(Ok(answer)).await.is_err() {
                        // The caller went away. What was written is whole; the rest was not read.
                        tracing::info!(rows = next_row, "import abandoned by the caller");
                        reader.abort();
                        while writing.next().await.is_some() {}
                        return;
                    }
                }
            }
            batch = batches.recv(), if reading && writing.len() < IN_FLIGHT => {
                let Some(batch): Option<Batch<I::Request>> = batch else {
                    reading = false;
                    continue;
                };
                let count = i64::try_from(batch.rows.len()).unwrap_or(i64::MAX);
                if count > 0 {
                    let rows = import_batch(&import, &call, &rows_draft, batch.rows, next_row);
                    writing.push_back(rows);
                    next_row += count;
                }
                if batch.failure.is_some() || batch.ended {
                    // The request stream broke (or a row was too large to read): the rows
                    // before it are answered, and the call ends with the reason.
                    failure = batch.failure;
                    reading = false;
                }
            }
            else => break,
        }
    }
    if let Some(status) = failure {
        let _ = tx.send(Err(status)).await;
    }
}

/// Reads the stream into batches until it ends or breaks.
async fn read<T, S>(mut inbound: S, out: mpsc::Sender<Batch<T>>)
where
    S: Stream<Item = Result<T, Status>> + Unpin,
{
    loop {
        let batch = next_batch(&mut inbound).await;
        let last = batch.ended || batch.failure.is_some();
        if out.send(batch).await.is_err() || last {
            return;
        }
    }
}

struct Batch<T> {
    rows: Vec<T>,
    failure: Option<Status>,
    ended: bool,
}

/// The next rows: the first one to come, then whatever follows until the stream pauses for
/// [`PAUSE`], [`MAX_WAIT`] has passed, or [`MAX_BATCH_ROWS`] are in.
async fn next_batch<T, S>(inbound: &mut S) -> Batch<T>
where
    S: Stream<Item = Result<T, Status>> + Unpin,
{
    let mut batch = Batch {
        rows: Vec::new(),
        failure: None,
        ended: false,
    };
    match inbound.next().await {
        Some(Ok(row)) => batch.rows.push(row),
        Some(Err(status)) => {
            batch.failure = Some(status);
            return batch;
        }
        None => {
            batch.ended = true;
            return batch;
        }
    }
    let deadline = Instant::now() + MAX_WAIT;
    while batch.rows.len() < MAX_BATCH_ROWS {
        let until = (Instant::now() + PAUSE).min(deadline);
        match tokio::time::timeout_at(until, inbound.next()).await {
            Ok(Some(Ok(row))) => batch.rows.push(row),
            Ok(Some(Err(status))) => {
                batch.failure = Some(status);
                break;
            }
            Ok(None) => {
                batch.ended = true;
                break;
            }
            // A pause: write what we have. (`next` loses nothing when dropped unfinished.)
            Err(_) => break,
        }
    }
    batch
}

/// Validates, writes, audits and answers one batch of rows.
async fn import_batch<I: Import>(
    import: &I,
    call: &CallRecord,
    rows_draft: &AuditDraft,
    requests: Vec<I::Request>,
    first_row: i64,
) -> Vec<I::Response> {
    let prepared = prepare_batch(import, requests, rows_draft);
    let (written, refused_audited) = write_valid(import, &prepared).await;
    let Prepared {
        drafts,
        mut results,
        positions,
        ..
    } = prepared;
    // Rows whose entry no write recorded: refused rows whose write failed, and valid rows
    // whose part of the batch failed.
    let mut unaudited: Vec<usize> = if refused_audited {
        Vec::new()
    } else {
        (0..results.len())
            .filter(|i| results[*i].is_some())
            .collect()
    };
    for (&i, answer) in positions.iter().zip(written) {
        results[i] = Some(match answer {
            Ok(Ok(Stored::Fresh(value))) => RowResult::Created(I::fresh(&value)),
            Ok(Ok(Stored::Replayed(bytes))) => match decode_replay::<I::Stored>(&bytes)
                .ok()
                .and_then(I::replayed)
            {
                Some(proto) => RowResult::Replayed(proto),
                None => RowResult::Rejected(crate::status::internal("stored response unreadable")),
            },
            Ok(Err(e)) => RowResult::Rejected(Status::from(e)),
            // Nothing of the row was stored: it fails as its call would.
            Err(e) => {
                unaudited.push(i);
                RowResult::Rejected(Status::from(e))
            }
        });
    }
    let results: Vec<RowResult<I::Proto>> = results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                RowResult::Rejected(crate::status::internal("the row was not answered"))
            })
        })
        .collect();
    if !unaudited.is_empty() {
        unaudited.sort_unstable();
        call.write(failed_entries(&results, &drafts, &unaudited))
            .await;
    }
    (first_row..)
        .zip(results)
        .map(|(row, result)| I::response(row, result))
        .collect()
}

/// A batch's rows, validated: those to write, and those refused before.
struct Prepared<I: Import> {
    /// Each row's audit draft: the row is recorded as its own mutating call (the stream as a
    /// whole is one more entry, written by the audit layer, which names no request or
    /// resource).
    drafts: Vec<AuditDraft>,
    /// Each row's result so far: `None` for a row to be written.
    results: Vec<Option<RowResult<I::Proto>>>,
    /// The rows to write, and where each sits in the batch.
    valid: Vec<I::Row>,
    positions: Vec<usize>,
    /// The audit entries of the rows refused before they reached the store.
    refused: Vec<AuditEvent>,
}

/// Validates each row of a batch as its unary call would; `rows_draft` is the draft of every
/// row's entry, but for its request id.
fn prepare_batch<I: Import>(
    import: &I,
    requests: Vec<I::Request>,
    rows_draft: &AuditDraft,
) -> Prepared<I> {
    let mut prepared = Prepared {
        drafts: Vec::with_capacity(requests.len()),
        results: Vec::with_capacity(requests.len()),
        valid: Vec::new(),
        positions: Vec::new(),
        refused: Vec::new(),
    };
    for (i, request) in requests.into_iter().enumerate() {
        // Kept in the audit log even for a refused row, so escaped and cut short.
        let request_id = text::shown(I::request_id(&request), text::MAX_SHOWN_CHARS);
        let draft = rows_draft.clone().with_request_id(request_id);
        match import.prepare(request, &rows_draft.principal) {
            Ok(row) => {
                prepared.valid.push(row);
                prepared.positions.push(i);
                prepared.results.push(None);
            }
            Err(status) => {
                prepared
                    .refused
                    .push(draft.event(String::new(), status.code()));
                prepared.results.push(Some(RowResult::Rejected(status)));
            }
        }
        prepared.drafts.push(draft);
    }
    prepared
}

/// Writes the valid rows of a batch, each with its audit entry: one answer per valid row, and
/// whether the entries of the refused rows were written too.
///
/// The refused rows' entries go with the first write, which is of every valid row (or of
/// none: then they are written alone). Should it fail, the valid rows are written again in
/// parts, so that a row the database refuses fails alone (see `write_isolating`).
async fn write_valid<I: Import>(
    import: &I,
    prepared: &Prepared<I>,
) -> (Vec<store::Result<store::Result<Stored<I::Value>>>>, bool) {
    let Prepared {
        drafts,
        valid,
        positions,
        refused,
        ..
    } = prepared;
    let row_entry = |i: usize, answer: &store::Result<Stored<I::Value>>| {
        let draft = positions.get(i).and_then(|&p| drafts.get(p))?;
        Some(batch_entry(draft, answer, I::stored_id))
    };
    let refused_audited = AtomicBool::new(false);
    let written = write_isolating(I::PATH, valid.len(), |range: Range<usize>| {
        let first_write = range.len() == valid.len();
        let (offset, rows) = (range.start, &valid[range]);
        let (row_entry, refused, refused_audited) =
            (&row_entry, refused.as_slice(), &refused_audited);
        async move {
            let row = move |i: usize, answer: &store::Result<Stored<I::Value>>| {
                row_entry(offset + i, answer)
            };
            let audit = BatchAudit {
                row: &row,
                refused: if first_write { refused } else { &[] },
            };
            let written = import.write(rows, audit).await;
            if first_write && written.is_ok() {
                refused_audited.store(true, Ordering::Relaxed);
            }
            written
        }
    })
    .await;
    (written, refused_audited.into_inner())
}

/// The entries of the rows `rows` of a batch whose writes failed (so wrote no entries for
/// them), each with the error its row was answered.
fn failed_entries<P>(
    results: &[RowResult<P>],
    drafts: &[AuditDraft],
    rows: &[usize],
) -> Vec<AuditEvent> {
    rows.iter()
        .filter_map(|&i| Some((results.get(i)?, drafts.get(i)?)))
        .map(|(result, draft)| {
            let code = match result {
                RowResult::Created(_) | RowResult::Replayed(_) => tonic::Code::Ok,
                RowResult::Rejected(status) => status.code(),
            };
            draft.event(String::new(), code)
        })
        .collect()
}
