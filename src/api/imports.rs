//! Bulk intake (`ImportPartners`, `ImportClaims`): bidirectional streams of rows, written in
//! batches. Rows are read as they come and gathered into a batch until the stream pauses or
//! the batch is full; each row is validated exactly as its unary call would validate it, and
//! the valid rows of a batch are written in one transaction by the store's batch method. Every
//! row is answered, in order, with what its unary call would have answered.
//!
//! A bad row never stops the stream. A stream that breaks off (or a caller that goes away)
//! stops the import after the batch in hand: that batch's transaction commits or not as a
//! whole, so every row is either stored whole (and replayed when sent again) or not at all.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Status, Streaming};
use tracing::Instrument as _;
use uuid::Uuid;

use super::{Principal, decode_replay, status_message};
use crate::proto::google::rpc;
use crate::store::{self, AuditEvent, Store, Stored, now_micros};

/// Rows per batch (and per transaction) at most.
pub const MAX_BATCH_ROWS: usize = 500;
/// A batch closes when no row has come for this long: the caller has sent what it had.
const PAUSE: Duration = Duration::from_millis(2);
/// ... or when its first row has waited this long for company.
const MAX_WAIT: Duration = Duration::from_millis(50);

/// The response stream of an import.
pub type ResponseStream<T> = ReceiverStream<Result<T, Status>>;

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

    fn store(&self) -> &Arc<dyn Store>;
    fn request_id(request: &Self::Request) -> &str;
    /// Validates a row exactly as the unary call does; the error is what that call returns.
    fn prepare(&self, request: Self::Request, principal: &str) -> Result<Self::Row, Status>;
    fn write<'a>(&'a self, rows: &'a [Self::Row]) -> BoxFuture<'a, Written<Self::Value>>;
    fn fresh(value: &Self::Value) -> Self::Proto;
    fn replayed(stored: Self::Stored) -> Option<Self::Proto>;
    /// The id the audit log names for a written row.
    fn resource_id(proto: &Self::Proto) -> String;
    fn response(row: i64, result: RowResult<Self::Proto>) -> Self::Response;
}

/// Starts the import of the rows `request` streams; its answers stream back.
pub fn run<I: Import>(
    import: I,
    request: Request<Streaming<I::Request>>,
) -> ResponseStream<I::Response> {
    let principal = Principal::of(&request);
    let peer = request
        .remote_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let (tx, rx) = mpsc::channel(MAX_BATCH_ROWS);
    // The work belongs to the call's span, which stays open until the last row is answered.
    let work = drive(import, request.into_inner(), tx, principal, peer)
        .instrument(tracing::Span::current());
    tokio::spawn(work);
    ReceiverStream::new(rx)
}

async fn drive<I: Import, S>(
    import: I,
    mut inbound: S,
    tx: mpsc::Sender<Result<I::Response, Status>>,
    principal: String,
    peer: String,
) where
    S: Stream<Item = Result<I::Request, Status>> + Unpin,
{
    let mut next_row: i64 = 0;
    loop {
        let batch = next_batch(&mut inbound).await;
        let count = i64::try_from(batch.rows.len()).unwrap_or(i64::MAX);
        if count > 0 {
            let answers = import_batch(&import, batch.rows, next_row, &principal, &peer).await;
            next_row += count;
            for answer in answers {
                if tx.send(Ok(answer)).await.is_err() {
                    // The caller went away. What was written is whole; the rest was not read.
                    tracing::info!(rows = next_row, "import abandoned by the caller");
                    return;
                }
            }
        }
        if let Some(status) = batch.failure {
            // The request stream broke (or a row was too large to read): the rows before it
            // are answered, and the call ends with the reason.
            let _ = tx.send(Err(status)).await;
            return;
        }
        if batch.ended {
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
    requests: Vec<I::Request>,
    first_row: i64,
    principal: &str,
    peer: &str,
) -> Vec<I::Response> {
    let mut results: Vec<Option<RowResult<I::Proto>>> = Vec::with_capacity(requests.len());
    let mut request_ids = Vec::with_capacity(requests.len());
    let mut valid = Vec::new();
    let mut positions = Vec::new();
    for (i, request) in requests.into_iter().enumerate() {
        request_ids.push(I::request_id(&request).trim().to_owned());
        match import.prepare(request, principal) {
            Ok(row) => {
                valid.push(row);
                positions.push(i);
                results.push(None);
            }
            Err(status) => results.push(Some(RowResult::Rejected(status))),
        }
    }
    if !valid.is_empty() {
        match import.write(&valid).await {
            Ok(answers) => {
                for (&i, answer) in positions.iter().zip(answers) {
                    results[i] = Some(match answer {
                        Ok(Stored::Fresh(value)) => RowResult::Created(I::fresh(&value)),
                        Ok(Stored::Replayed(bytes)) => match decode_replay::<I::Stored>(&bytes)
                            .ok()
                            .and_then(I::replayed)
                        {
                            Some(proto) => RowResult::Replayed(proto),
                            None => {
                                RowResult::Rejected(Status::internal("stored response unreadable"))
                            }
                        },
                        Err(e) => RowResult::Rejected(Status::from(e)),
                    });
                }
            }
            Err(e) => {
                // Nothing of the batch was stored: each of its rows fails as its call would.
                let status = Status::from(e);
                for &i in &positions {
                    results[i] = Some(RowResult::Rejected(status.clone()));
                }
            }
        }
    }
    let results: Vec<RowResult<I::Proto>> = results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| RowResult::Rejected(Status::internal("the row was not answered")))
        })
        .collect();
    audit(import, &results, &request_ids, principal, peer).await;
    (first_row..)
        .zip(results)
        .map(|(row, result)| I::response(row, result))
        .collect()
}

/// Records every row in the audit log as its own mutating call: the stream as a whole is one
/// entry (written by the audit layer when it starts), which names no request or resource.
async fn audit<I: Import>(
    import: &I,
    results: &[RowResult<I::Proto>],
    request_ids: &[String],
    principal: &str,
    peer: &str,
) {
    let time = now_micros();
    let events: Vec<AuditEvent> = results
        .iter()
        .zip(request_ids)
        .map(|(result, request_id)| {
            let (resource_id, code) = match result {
                RowResult::Created(p) | RowResult::Replayed(p) => {
                    (I::resource_id(p), tonic::Code::Ok)
                }
                RowResult::Rejected(status) => (String::new(), status.code()),
            };
            AuditEvent {
                audit_event_id: Uuid::now_v7(),
                time,
                principal: principal.to_owned(),
                method: I::PATH.to_owned(),
                resource_id,
                request_id: request_id.clone(),
                outcome_code: crate::auth::audit::code_name(code),
                peer_address: peer.to_owned(),
            }
        })
        .collect();
    if let Err(e) = import.store().append_audit(&events).await {
        tracing::error!(error = %e, method = I::PATH, lost = events.len(), "audit log write failed");
    }
}
