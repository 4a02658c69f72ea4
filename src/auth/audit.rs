//! Writing the audit log: a tower layer that records every mutating call with its principal,
//! resource, request id, outcome and peer, and a [`DenialSink`] for the calls refused before
//! they got that far.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Code;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use uuid::Uuid;

use super::{DenialSink, is_mutating};
use crate::api::Principal;
use crate::store::{AuditEvent, Store, now_micros};

tokio::task_local! {
    static NOTES: RefCell<Notes>;
}

/// What a handler learnt about the call while running it.
#[derive(Default)]
struct Notes {
    principal: String,
    method: String,
    peer_address: String,
    request_id: String,
    resource_id: String,
    resource_rank: u8,
    /// The call's entry was written in the call's own transaction.
    audited: bool,
    /// The call was answered with the first response to its request id.
    replayed: bool,
}

/// The audit entry of the call being served, but for its outcome: for a handler that writes
/// the entry in the same transaction as the change it records.
#[derive(Debug, Clone)]
pub struct AuditDraft {
    pub principal: String,
    pub method: String,
    pub peer_address: String,
    pub request_id: String,
}

impl AuditDraft {
    /// The entry, with the resource acted on and the call's outcome.
    pub fn event(&self, resource_id: String, code: Code) -> AuditEvent {
        AuditEvent {
            audit_event_id: Uuid::now_v7(),
            time: now_micros(),
            principal: self.principal.clone(),
            method: self.method.clone(),
            resource_id,
            request_id: self.request_id.clone(),
            outcome_code: code_name(code),
            peer_address: self.peer_address.clone(),
            count: 1,
            replayed: false,
        }
    }
}

/// The draft of the current call's entry; `None` outside an audited call.
pub fn draft() -> Option<AuditDraft> {
    NOTES
        .try_with(|n| {
            let n = n.borrow();
            AuditDraft {
                principal: n.principal.clone(),
                method: n.method.clone(),
                peer_address: n.peer_address.clone(),
                request_id: n.request_id.clone(),
            }
        })
        .ok()
}

/// Notes that the call's entry was written with its change, so the layer writes none.
pub fn note_audited() {
    let _ = NOTES.try_with(|n| n.borrow_mut().audited = true);
}

/// Notes that the call was answered by replaying the first response to its request id
/// (no-op outside an audited call).
pub fn note_replayed() {
    let _ = NOTES.try_with(|n| n.borrow_mut().replayed = true);
}

/// Notes the caller's request id on the call being audited (no-op outside one).
pub fn note_request_id(request_id: &str) {
    let _ = NOTES.try_with(|n| n.borrow_mut().request_id = request_id.trim().to_owned());
}

/// Notes the resource the call acted on; a more specific one (`rank` higher) wins.
pub fn note_resource(rank: u8, id: &str) {
    let _ = NOTES.try_with(|n| {
        let mut n = n.borrow_mut();
        if rank >= n.resource_rank {
            n.resource_rank = rank;
            n.resource_id = id.to_owned();
        }
    });
}

fn peer_of<B>(request: &http::Request<B>) -> Option<SocketAddr> {
    let ext = request.extensions();
    ext.get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|tls| tls.get_ref().remote_addr())
        })
}

/// A gRPC code as the audit log writes it: `PERMISSION_DENIED`.
pub fn code_name(code: Code) -> String {
    format!("{:?}", tonic::Status::new(code, "").code())
        .chars()
        .fold(String::new(), |mut out, c| {
            if c.is_uppercase() && !out.is_empty() {
                out.push('_');
            }
            out.push(c.to_ascii_uppercase());
            out
        })
}

/// Records every mutating call that passed authentication. Sits inside [`super::AuthLayer`].
#[derive(Clone)]
pub struct AuditLayer {
    writer: GroupWriter,
}

impl AuditLayer {
    /// Starts the task that writes the events, so it must run inside the Tokio runtime.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            writer: GroupWriter::spawn(store),
        }
    }
}

/// One event to store, and who waits for it.
type Pending = (AuditEvent, tokio::sync::oneshot::Sender<Result<(), String>>);

/// Writes the events of calls that finish together in one transaction: a commit (an fsync) of
/// its own for every call's audit row would cap the throughput of every mutating method. Each
/// call still waits until its event is stored before it answers, as it always has.
#[derive(Clone)]
struct GroupWriter {
    tx: tokio::sync::mpsc::Sender<Pending>,
}

impl GroupWriter {
    /// Events per transaction at most.
    const MAX_EVENTS: usize = 512;

    fn spawn(store: Arc<dyn Store>) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Pending>(10_000);
        tokio::spawn(async move {
            let mut pending = Vec::with_capacity(Self::MAX_EVENTS);
            // While one batch is written, the next calls' events queue up for the next.
            while rx.recv_many(&mut pending, Self::MAX_EVENTS).await > 0 {
                let (events, waiting): (Vec<AuditEvent>, Vec<_>) = pending.drain(..).unzip();
                let written = store.append_audit(&events).await.map_err(|e| e.to_string());
                for reply in waiting {
                    let _ = reply.send(written.clone());
                }
            }
        });
        Self { tx }
    }

    async fn append(&self, event: AuditEvent) -> Result<(), String> {
        let (reply, written) = tokio::sync::oneshot::channel();
        self.tx
            .send((event, reply))
            .await
            .map_err(|_| "the audit writer has stopped".to_owned())?;
        written
            .await
            .map_err(|_| "the audit writer has stopped".to_owned())?
    }
}

impl<S> tower::Layer<S> for AuditLayer {
    type Service = AuditService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuditService {
            inner,
            writer: self.writer.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuditService<S> {
    inner: S,
    writer: GroupWriter,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for AuditService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Send,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.uri().path().to_owned();
        if !is_mutating(&method) {
            return Box::pin(self.inner.call(request));
        }
        let principal = request
            .extensions()
            .get::<Principal>()
            .map(|p| p.0.clone())
            .unwrap_or_default();
        let peer = peer_of(&request).map(|p| p.to_string()).unwrap_or_default();
        let writer = self.writer.clone();
        let future = self.inner.call(request);
        let notes = Notes {
            principal: principal.clone(),
            method: method.clone(),
            peer_address: peer.clone(),
            ..Notes::default()
        };
        Box::pin(async move {
            let (result, notes) = NOTES
                .scope(RefCell::new(notes), async move {
                    let result = future.await;
                    (result, NOTES.with(RefCell::take))
                })
                .await;
            if notes.audited {
                return result;
            }
            let event = AuditEvent {
                audit_event_id: Uuid::now_v7(),
                time: now_micros(),
                principal,
                method,
                resource_id: notes.resource_id,
                request_id: notes.request_id,
                outcome_code: String::new(),
                peer_address: peer,
                count: 1,
                replayed: notes.replayed,
            };
            let response = match result {
                Err(e) => {
                    record(&writer, event, Code::Unknown).await;
                    return Err(e);
                }
                Ok(response) => response,
            };
            let header_status = crate::status_body::status_in(response.headers());
            match header_status {
                // A stream's outcome is known when it ends: its entry is written then, before
                // the trailers go out.
                None if crate::status_body::streams_responses(&event.method) => {
                    Ok(response.map(|body| {
                        // Stored before the caller sees the stream end, as a unary call's.
                        tonic::body::Body::new(crate::status_body::StatusBody::finishing(
                            body,
                            move |code| Box::pin(async move { record(&writer, event, code).await }),
                        ))
                    }))
                }
                // A unary call's entry is stored before the caller sees the answer.
                status => {
                    record(&writer, event, status.unwrap_or(Code::Ok)).await;
                    Ok(response)
                }
            }
        })
    }
}

/// Stores `event` with the call's outcome `code`; a failure is logged, never the call's.
async fn record(writer: &GroupWriter, mut event: AuditEvent, code: Code) {
    event.outcome_code = code_name(code);
    let method = event.method.clone();
    if let Err(e) = writer.append(event).await {
        tracing::error!(error = %e, method = %method, "audit log write failed");
    }
}

/// Writes refused mutating calls to the audit log from a background task, so a flood of
/// refused calls costs the request path nothing but a channel send.
pub struct AuditDenials {
    tx: tokio::sync::mpsc::Sender<AuditEvent>,
}

impl AuditDenials {
    /// Starts the writer task; it ends when the sink is dropped.
    pub fn spawn(store: Arc<dyn Store>) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<AuditEvent>(10_000);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(256);
            while rx.recv_many(&mut batch, 256).await > 0 {
                if let Err(e) = store.append_audit(&batch).await {
                    tracing::error!(error = %e, lost = batch.len(), "audit log write failed");
                }
                batch.clear();
            }
        });
        Self { tx }
    }
}

impl DenialSink for AuditDenials {
    fn denied(&self, principal: Option<&str>, method: &str, code: Code, peer: Option<SocketAddr>) {
        if !is_mutating(method) {
            return;
        }
        let event = AuditEvent {
            audit_event_id: Uuid::now_v7(),
            time: now_micros(),
            principal: principal.unwrap_or_default().to_owned(),
            method: method.to_owned(),
            resource_id: String::new(),
            request_id: String::new(),
            outcome_code: code_name(code),
            peer_address: peer.map(|p| p.to_string()).unwrap_or_default(),
            count: 1,
            replayed: false,
        };
        if self.tx.try_send(event).is_err() {
            tracing::warn!(method, "audit queue full: a refused call was not recorded");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::code_name;
    use tonic::Code;

    #[test]
    fn outcome_codes_are_upper_snake_case() {
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::PermissionDenied), "PERMISSION_DENIED");
        assert_eq!(code_name(Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(code_name(Code::Unauthenticated), "UNAUTHENTICATED");
    }
}
