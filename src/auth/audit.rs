//! Writing the audit log: a tower layer that records every mutating call with its principal,
//! resource, request id, outcome and peer, and a [`DenialSink`] that counts the calls refused
//! before they got that far and records them in aggregate.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::Code;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use uuid::Uuid;

use super::{DenialSink, is_mutating, method_rule};
use crate::principal::Principal;
use crate::store::{AuditEvent, Micros, Store, now_micros};

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

/// Writes refused mutating calls to the audit log in aggregate: one entry per peer address,
/// principal (empty when unidentified), method and outcome per interval, whose `count` says how
/// many calls it stands for. The audit log is append-only, so it must grow with the number of
/// distinct refusers, not with the number of calls they make; the request path only bumps a
/// counter.
///
/// The counts are written every interval by a background task, when [`AuditDenials::flush`] is
/// called, and when the sink is dropped.
pub struct AuditDenials {
    writer: Arc<DenialWriter>,
    /// Dropping it tells the task to write what is left and stop.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl AuditDenials {
    /// Distinct (peer, principal, method, outcome) keys held between two writes. Past it, the
    /// calls of new peers are counted without their address, in one entry per principal,
    /// method and outcome, so a flood from many addresses costs neither memory nor log rows.
    pub const MAX_KEYS: usize = 10_000;

    /// Refused calls per write transaction at most.
    const MAX_EVENTS_PER_WRITE: usize = 512;

    /// Starts the task that writes the counts every `interval`; it writes what is left and
    /// ends when the sink is dropped. Must run inside the Tokio runtime.
    pub fn spawn(store: Arc<dyn Store>, interval: Duration) -> Self {
        Self::spawn_with_max_keys(store, interval, Self::MAX_KEYS)
    }

    fn spawn_with_max_keys(store: Arc<dyn Store>, interval: Duration, max_keys: usize) -> Self {
        let writer = Arc::new(DenialWriter {
            tally: Mutex::new(DenialTally::new(max_keys)),
            store,
        });
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task_writer = writer.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticks.tick() => task_writer.flush().await,
                    _ = &mut stop_rx => {
                        task_writer.flush().await;
                        break;
                    }
                }
            }
        });
        Self {
            writer,
            _stop: stop_tx,
        }
    }

    /// Writes the refused calls counted so far, now (e.g. before the server stops).
    pub async fn flush(&self) {
        self.writer.flush().await;
    }
}

impl DenialSink for AuditDenials {
    fn denied(&self, principal: Option<&str>, method: &str, code: Code, peer: Option<SocketAddr>) {
        // Only mutating calls are audited; the key then holds the rule's own path, so the
        // caller's path (any string) never becomes part of the state.
        let Some(rule) = method_rule(method).filter(|r| r.mutating) else {
            return;
        };
        let key = DenialKey {
            peer: peer.map(|p| p.ip().to_canonical()),
            principal: principal.unwrap_or_default().to_owned(),
            method: rule.path,
            code,
        };
        self.writer
            .tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .add(key, 1, now_micros());
    }
}

struct DenialWriter {
    tally: Mutex<DenialTally>,
    store: Arc<dyn Store>,
}

impl DenialWriter {
    async fn flush(&self) {
        let (counted, folded) = self
            .tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if counted.is_empty() {
            return;
        }
        if folded > 0 {
            tracing::warn!(
                calls = folded,
                max_peers = AuditDenials::MAX_KEYS,
                "refused calls came from too many distinct peers: some are audited without \
                 their peer address"
            );
        }
        for chunk in counted.chunks(AuditDenials::MAX_EVENTS_PER_WRITE) {
            let events: Vec<AuditEvent> = chunk.iter().map(|(k, t)| k.event(*t)).collect();
            if let Err(e) = self.store.append_audit(&events).await {
                // Kept for the next write: the counts are only lost if the service stops first.
                let calls: i64 = chunk.iter().map(|(_, t)| t.count).sum();
                tracing::error!(error = %e, calls, "audit log write of refused calls failed");
                let mut tally = self
                    .tally
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                for (key, t) in chunk {
                    tally.add(key.clone(), t.count, t.first);
                }
            }
        }
    }
}

/// Who was refused what: the key refused calls are counted by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct DenialKey {
    /// `None` when the address is unknown, or was left out because too many peers were
    /// refused in one interval.
    peer: Option<IpAddr>,
    /// Empty when the caller could not be identified.
    principal: String,
    method: &'static str,
    code: Code,
}

impl DenialKey {
    /// The audit entry for `tally.count` refused calls, timed at the first of them.
    fn event(&self, tally: Tally) -> AuditEvent {
        AuditEvent {
            audit_event_id: Uuid::now_v7(),
            time: tally.first,
            principal: self.principal.clone(),
            method: self.method.to_owned(),
            resource_id: String::new(),
            request_id: String::new(),
            outcome_code: code_name(self.code),
            peer_address: self.peer.map(|ip| ip.to_string()).unwrap_or_default(),
            count: tally.count,
            replayed: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tally {
    count: i64,
    /// When the first of the calls was refused.
    first: Micros,
}

/// Refused calls counted since the last write, for at most `max_keys` distinct peers' keys.
#[derive(Debug)]
struct DenialTally {
    max_keys: usize,
    counts: HashMap<DenialKey, Tally>,
    /// Calls counted without their peer address since the last write.
    folded: u64,
}

impl DenialTally {
    fn new(max_keys: usize) -> Self {
        Self {
            max_keys,
            counts: HashMap::new(),
            folded: 0,
        }
    }

    fn add(&mut self, mut key: DenialKey, count: i64, first: Micros) {
        // The keys without a peer number at most principals x methods x outcomes, all from
        // fixed sets, so the map stays bounded whatever connects.
        if key.peer.is_some()
            && self.counts.len() >= self.max_keys
            && !self.counts.contains_key(&key)
        {
            key.peer = None;
            self.folded += count.unsigned_abs();
        }
        let tally = self.counts.entry(key).or_insert(Tally { count: 0, first });
        tally.count = tally.count.saturating_add(count);
        tally.first = tally.first.min(first);
    }

    /// Everything counted so far, and how many calls of it were folded; leaves the tally empty.
    fn take(&mut self) -> (Vec<(DenialKey, Tally)>, u64) {
        let counted = std::mem::take(&mut self.counts).into_iter().collect();
        (counted, std::mem::take(&mut self.folded))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sealing::PiiCipher;
    use crate::store::{AuditFilter, Page, sqlite::SqliteStore};

    #[test]
    fn outcome_codes_are_upper_snake_case() {
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::PermissionDenied), "PERMISSION_DENIED");
        assert_eq!(code_name(Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(code_name(Code::Unauthenticated), "UNAUTHENTICATED");
    }

    const REGISTER: &str = "/payouts.v1.PartnerService/RegisterPartner";
    const REVIEW: &str = "/payouts.v1.ClaimService/ReviewClaim";

    fn key(peer: &str, principal: &str, method: &'static str, code: Code) -> DenialKey {
        DenialKey {
            peer: Some(peer.parse().expect("ip")),
            principal: principal.to_owned(),
            method,
            code,
        }
    }

    fn sorted(mut counted: Vec<(DenialKey, Tally)>) -> Vec<(DenialKey, Tally)> {
        counted.sort_by_key(|(k, _)| (k.peer, k.principal.clone(), k.method, k.code as i32));
        counted
    }

    #[test]
    fn refused_calls_are_counted_per_peer_principal_method_and_outcome() {
        let mut tally = DenialTally::new(100);
        let a = key("192.0.2.1", "", REGISTER, Code::Unauthenticated);
        for t in [30, 10, 20] {
            tally.add(a.clone(), 1, t);
        }
        let limited = DenialKey {
            code: Code::ResourceExhausted,
            ..a.clone()
        };
        tally.add(limited.clone(), 5, 40);
        let ops = key("192.0.2.1", "ops", REGISTER, Code::PermissionDenied);
        tally.add(ops.clone(), 1, 50);
        let other_method = key("192.0.2.1", "ops", REVIEW, Code::PermissionDenied);
        tally.add(other_method.clone(), 1, 60);
        let other_peer = key("192.0.2.2", "", REGISTER, Code::Unauthenticated);
        tally.add(other_peer.clone(), 1, 70);

        let (counted, folded) = tally.take();
        assert_eq!(folded, 0);
        assert_eq!(
            sorted(counted),
            sorted(vec![
                (
                    a,
                    Tally {
                        count: 3,
                        first: 10
                    }
                ),
                (
                    limited,
                    Tally {
                        count: 5,
                        first: 40
                    }
                ),
                (
                    ops,
                    Tally {
                        count: 1,
                        first: 50
                    }
                ),
                (
                    other_method,
                    Tally {
                        count: 1,
                        first: 60
                    }
                ),
                (
                    other_peer,
                    Tally {
                        count: 1,
                        first: 70
                    }
                ),
            ])
        );
        let (counted, folded) = tally.take();
        assert!(counted.is_empty(), "taking empties the tally");
        assert_eq!(folded, 0);
    }

    #[test]
    fn past_the_key_limit_new_peers_are_counted_without_their_address() {
        let mut tally = DenialTally::new(3);
        for i in 0..1_000u32 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from_bits(0xc000_0200 + i));
            let key = DenialKey {
                peer: Some(ip),
                principal: String::new(),
                method: REGISTER,
                code: Code::Unauthenticated,
            };
            tally.add(key.clone(), 1, 1);
            // A peer already held keeps being counted under its own address.
            if i < 3 {
                tally.add(key, 1, 2);
            }
        }
        assert!(tally.counts.len() <= 4, "{:?}", tally.counts.len());
        let (counted, folded) = tally.take();
        assert_eq!(folded, 997);
        let total: i64 = counted.iter().map(|(_, t)| t.count).sum();
        assert_eq!(total, 1_003, "no call is lost");
        let addressless: Vec<_> = counted.iter().filter(|(k, _)| k.peer.is_none()).collect();
        assert_eq!(addressless.len(), 1, "{counted:?}");
        assert_eq!(addressless[0].1.count, 997);
        assert!(
            counted
                .iter()
                .filter(|(k, _)| k.peer.is_some())
                .all(|(_, t)| t.count == 2),
            "{counted:?}"
        );
    }

    #[test]
    fn an_entry_names_its_calls_count_outcome_and_peer() {
        let k = key("::ffff:192.0.2.1", "ops", REGISTER, Code::PermissionDenied);
        let k = DenialKey {
            peer: k.peer.map(|ip| ip.to_canonical()),
            ..k
        };
        let event = k.event(Tally {
            count: 1_234,
            first: 99,
        });
        assert_eq!(event.count, 1_234);
        assert_eq!(event.time, 99);
        assert_eq!(event.principal, "ops");
        assert_eq!(event.method, REGISTER);
        assert_eq!(event.outcome_code, "PERMISSION_DENIED");
        assert_eq!(event.peer_address, "192.0.2.1");
        assert!(event.request_id.is_empty() && event.resource_id.is_empty());
        assert!(!event.replayed);
    }

    async fn store(dir: &tempfile::TempDir) -> Arc<dyn Store> {
        let url = format!("sqlite://{}", dir.path().join("audit.db").display());
        let store = SqliteStore::connect(&url, Arc::new(PiiCipher::new(&[7; 32])))
            .await
            .expect("open");
        store.migrate().await.expect("migrate");
        Arc::new(store)
    }

    async fn stored(store: &Arc<dyn Store>) -> Vec<AuditEvent> {
        store
            .list_audit(
                &AuditFilter::default(),
                &Page {
                    after: None,
                    limit: 1000,
                },
            )
            .await
            .expect("list")
    }

    async fn stored_until(store: &Arc<dyn Store>, calls: i64) -> Vec<AuditEvent> {
        for _ in 0..200 {
            let events = stored(store).await;
            if events.iter().map(|e| e.count).sum::<i64>() >= calls {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "{calls} refused calls were not written: {:?}",
            stored(store).await
        );
    }

    fn peer(s: &str) -> Option<SocketAddr> {
        Some(s.parse().expect("addr"))
    }

    #[tokio::test]
    async fn refused_calls_are_written_each_interval_as_one_entry_per_key() {
        let dir = tempfile::tempdir().expect("dir");
        let store = store(&dir).await;
        let sink = AuditDenials::spawn(store.clone(), Duration::from_millis(50));
        for port in 0..500u16 {
            sink.denied(
                None,
                REGISTER,
                Code::Unauthenticated,
                peer(&format!("192.0.2.1:{}", 1000 + port)),
            );
        }
        sink.denied(
            Some("ops"),
            REGISTER,
            Code::PermissionDenied,
            peer("192.0.2.1:1"),
        );
        // Calls that are not mutating are not audited.
        sink.denied(
            None,
            "/payouts.v1.PartnerService/GetPartner",
            Code::Unauthenticated,
            peer("192.0.2.1:1"),
        );
        sink.denied(
            None,
            "/no.such.Service/Method",
            Code::PermissionDenied,
            peer("192.0.2.1:1"),
        );
        let events = stored_until(&store, 501).await;
        assert_eq!(events.len(), 2, "{events:#?}");
        let unauthenticated = events
            .iter()
            .find(|e| e.outcome_code == "UNAUTHENTICATED")
            .expect("entry");
        assert_eq!(unauthenticated.count, 500);
        assert_eq!(unauthenticated.peer_address, "192.0.2.1");
        assert_eq!(unauthenticated.principal, "");
        assert_eq!(unauthenticated.method, REGISTER);

        // The next interval's refusals get entries of their own.
        for _ in 0..3 {
            sink.denied(None, REGISTER, Code::Unauthenticated, peer("192.0.2.1:9"));
        }
        let events = stored_until(&store, 504).await;
        assert_eq!(events.len(), 3, "{events:#?}");
        assert_eq!(events.iter().map(|e| e.count).sum::<i64>(), 504);
    }

    #[tokio::test]
    async fn what_is_left_is_written_on_flush_and_on_drop() {
        let dir = tempfile::tempdir().expect("dir");
        let store = store(&dir).await;
        // An interval no test waits for: only a flush or the drop writes.
        let sink = AuditDenials::spawn(store.clone(), Duration::from_secs(3600));
        // The first tick of an interval is immediate: let it pass.
        tokio::time::sleep(Duration::from_millis(50)).await;
        sink.denied(None, REVIEW, Code::Unauthenticated, peer("192.0.2.3:1"));
        sink.flush().await;
        let events = stored(&store).await;
        assert_eq!(events.len(), 1, "{events:#?}");
        assert_eq!(events[0].count, 1);

        sink.denied(None, REVIEW, Code::Unauthenticated, peer("192.0.2.3:1"));
        sink.denied(None, REVIEW, Code::Unauthenticated, peer("192.0.2.4:1"));
        drop(sink);
        let events = stored_until(&store, 3).await;
        assert_eq!(events.len(), 3, "{events:#?}");
    }

    #[tokio::test]
    async fn a_flood_from_many_peers_is_written_in_bounded_entries() {
        let dir = tempfile::tempdir().expect("dir");
        let store = store(&dir).await;
        let sink = AuditDenials::spawn_with_max_keys(store.clone(), Duration::from_secs(3600), 10);
        tokio::time::sleep(Duration::from_millis(50)).await;
        for i in 0..5_000u32 {
            let ip = std::net::Ipv4Addr::from_bits(0x0a00_0000 + i);
            sink.denied(
                None,
                REGISTER,
                Code::Unauthenticated,
                Some(SocketAddr::from((ip, 1))),
            );
        }
        sink.flush().await;
        let events = stored(&store).await;
        assert_eq!(events.len(), 11, "ten peers and one entry for the rest");
        assert_eq!(events.iter().map(|e| e.count).sum::<i64>(), 5_000);
        let rest = events
            .iter()
            .find(|e| e.peer_address.is_empty())
            .expect("the entry without a peer");
        assert_eq!(rest.count, 4_990);
    }
}
