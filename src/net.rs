//! Accepting gRPC connections: Nagle off and, for the public server, at most `max_connections`
//! open at once, each closed when its client does not complete the HTTP/2 handshake in time or
//! then goes idle. Without these limits a client that opens connections and sends nothing holds
//! a file descriptor each, forever, until the process can open no more and every new caller
//! times out.

use std::future::Future as _;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming, TlsConnectInfo};

/// The connections `listener` accepts, with Nagle's algorithm off. tonic does not apply its
/// `tcp_nodelay` setting to a listener it is handed, and with Nagle on, a small answer written
/// while the caller's acknowledgement of the previous one is delayed waits for it: about 40 ms.
///
/// No limits apply: for servers only this process calls (the sandbox bank, test doubles). The
/// service itself accepts through [`Incoming`].
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// How long a connection may take to start and to sit idle, and how many may be open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// From accept until the client has completed the handshake (see [`Connection`]).
    pub handshake_timeout: Duration,
    /// After the handshake, the longest a connection may go without reading or writing a byte.
    pub idle_timeout: Duration,
    /// Connections open at once; past it, new ones are closed as soon as they are accepted.
    pub max_connections: usize,
    /// TLS is applied above these connections, so the HTTP/2 handshake is not visible in their
    /// bytes; the TLS handshake stands for it.
    pub tls: bool,
}

/// At most one log line per this interval for events that a flood repeats.
const LOG_INTERVAL: Duration = Duration::from_secs(1);
/// How long to stop accepting after the listener itself failed (e.g. no file descriptors
/// left): the pending connection stays queued, so retrying at once would only spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// File descriptors the process needs besides client connections: database pool, the
/// payments backend, logs, the listener.
const FILE_HEADROOM: u64 = 256;

/// The service's accepted connections, as a stream for tonic's `serve_with_incoming`.
pub struct Incoming {
    listener: TcpListener,
    limits: ConnectionLimits,
    open: Arc<Semaphore>,
    reports: Arc<Reports>,
    backoff: Option<Pin<Box<Sleep>>>,
}

impl Incoming {
    pub fn new(listener: TcpListener, limits: ConnectionLimits) -> Self {
        warn_if_over_open_file_limit(limits.max_connections);
        Self {
            listener,
            limits,
            open: Arc::new(Semaphore::new(
                limits.max_connections.min(Semaphore::MAX_PERMITS),
            )),
            reports: Arc::new(Reports::default()),
            backoff: None,
        }
    }
}

impl Stream for Incoming {
    type Item = io::Result<Connection<TcpStream>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(backoff) = &mut this.backoff {
                ready!(backoff.as_mut().poll(cx));
                this.backoff = None;
            }
            match ready!(this.listener.poll_accept(cx)) {
                Ok((stream, peer)) => {
                    let Ok(permit) = this.open.clone().try_acquire_owned() else {
                        // Closed at once, so the client fails fast instead of waiting for a
                        // handshake that would never come.
                        drop(stream);
                        if let Some(refused) = this.reports.refused.hit() {
                            tracing::warn!(
                                max_connections = this.limits.max_connections,
                                refused,
                                %peer,
                                "refusing connections: max_connections are open"
                            );
                        }
                        continue;
                    };
                    if let Err(error) = stream.set_nodelay(true) {
                        tracing::debug!(%peer, %error, "could not turn Nagle's algorithm off");
                    }
                    return Poll::Ready(Some(Ok(Connection::new(
                        stream,
                        Some(peer),
                        &this.limits,
                        Some(permit),
                        this.reports.clone(),
                    ))));
                }
                // The client gave up before it was accepted: nothing to do.
                Err(error) if is_connection_error(&error) => {}
                Err(error) => {
                    if let Some(failures) = this.reports.accept_failed.hit() {
                        tracing::error!(%error, failures, "accepting connections failed");
                    }
                    this.backoff = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                }
            }
        }
    }
}

fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
    )
}

/// Counters behind the log lines a flood would otherwise repeat once per connection.
#[derive(Default)]
struct Reports {
    refused: Throttle,
    accept_failed: Throttle,
    handshake_timed_out: Throttle,
}

/// Counts events and lets one report through per [`LOG_INTERVAL`], with the count since the
/// last one.
#[derive(Default)]
struct Throttle(Mutex<(Option<std::time::Instant>, u64)>);

impl Throttle {
    fn hit(&self) -> Option<u64> {
        let mut state = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let (last, count) = &mut *state;
        *count += 1;
        let now = std::time::Instant::now();
        if last.is_some_and(|last| now.duration_since(last) < LOG_INTERVAL) {
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(count))
    }
}

/// Warns (once per process) when `max_connections` client connections could use up the
/// process's open-file limit: past it, accepting fails and new callers wait for nothing.
fn warn_if_over_open_file_limit(max_connections: usize) {
    static CHECKED: std::sync::Once = std::sync::Once::new();
    CHECKED.call_once(|| {
        let Some(limit) = open_file_limit() else {
            return;
        };
        let wanted = u64::try_from(max_connections)
            .unwrap_or(u64::MAX)
            .saturating_add(FILE_HEADROOM);
        if wanted > limit {
            tracing::warn!(
                max_connections,
                open_file_limit = limit,
                "max_connections is too high for the open-file limit (RLIMIT_NOFILE): raise \
                 the limit (ulimit -n) or lower max_connections, else connections fail once \
                 the process runs out of file descriptors"
            );
        }
    });
}

/// The soft limit on open files, if the platform has one.
#[cfg(unix)]
fn open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given, which lives for the call.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    if rc != 0 || limit.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    // `rlim_t` is `u64` on most targets, but not all.
    #[allow(clippy::useless_conversion)]
    u64::try_from(limit.rlim_cur).ok()
}

#[cfg(not(unix))]
fn open_file_limit() -> Option<u64> {
    None
}

/// One accepted connection: the stream, with a deadline that closes it.
///
/// Until the client has completed the handshake, the deadline is `handshake_timeout` after
/// accept and nothing moves it, so a client that trickles bytes gains nothing. In plaintext the
/// handshake is complete once the client has sent the HTTP/2 connection preface and its first
/// frame (a SETTINGS frame) whole. Under TLS those bytes are encrypted below us; tonic asks a
/// connection for its peer address (`Connected::connect_info`) only once its TLS handshake is
/// done, so that marks the handshake complete, and a client that then sends nothing is closed as
/// idle.
///
/// After the handshake the deadline is `idle_timeout` after the last byte read or written, so a
/// client making calls, a stream still sending, or a response still being written keeps the
/// connection open. At the deadline reads and writes fail, the HTTP/2 connection ends and the
/// socket is closed. The permit it holds (see [`Incoming`]) is released when it is dropped.
pub struct Connection<S> {
    io: S,
    peer: Option<SocketAddr>,
    phase: Phase,
    tls_handshake_done: AtomicBool,
    deadline: Pin<Box<Sleep>>,
    last_activity: Instant,
    idle_timeout: Duration,
    handshake_timeout: Duration,
    closed: bool,
    reports: Arc<Reports>,
    _permit: Option<OwnedSemaphorePermit>,
}

enum Phase {
    /// Plaintext: waiting for the client's preface and first frame.
    Preface(Preface),
    /// TLS: waiting for tonic to finish the TLS handshake.
    Tls,
    Established,
}

impl<S> Connection<S> {
    fn new(
        io: S,
        peer: Option<SocketAddr>,
        limits: &ConnectionLimits,
        permit: Option<OwnedSemaphorePermit>,
        reports: Arc<Reports>,
    ) -> Self {
        let now = Instant::now();
        Self {
            io,
            peer,
            phase: if limits.tls {
                Phase::Tls
            } else {
                Phase::Preface(Preface::default())
            },
            tls_handshake_done: AtomicBool::new(false),
            deadline: Box::pin(tokio::time::sleep_until(now + limits.handshake_timeout)),
            last_activity: now,
            idle_timeout: limits.idle_timeout,
            handshake_timeout: limits.handshake_timeout,
            closed: false,
            reports,
            _permit: permit,
        }
    }

    /// The stream underneath.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    fn establish(&mut self) {
        self.phase = Phase::Established;
        self.last_activity = Instant::now();
        let due = self.last_activity + self.idle_timeout;
        self.deadline.as_mut().reset(due);
    }

    /// Fails once the deadline has passed, else arranges for the task to be woken at it (so a
    /// connection waiting on a read or a write is woken to fail).
    fn check_deadline(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.closed {
            return Err(timed_out());
        }
        if matches!(self.phase, Phase::Tls) && self.tls_handshake_done.load(Ordering::Acquire) {
            self.establish();
        }
        loop {
            if self.deadline.as_mut().poll(cx).is_pending() {
                return Ok(());
            }
            if matches!(self.phase, Phase::Established) {
                // Activity moves the idle deadline lazily: only now is it looked at.
                let due = self.last_activity + self.idle_timeout;
                if due > Instant::now() {
                    self.deadline.as_mut().reset(due);
                    continue;
                }
                tracing::debug!(
                    peer = self.peer.map(tracing::field::display),
                    idle_timeout = ?self.idle_timeout,
                    "closing an idle connection"
                );
            } else if let Some(closed) = self.reports.handshake_timed_out.hit() {
                tracing::info!(
                    peer = self.peer.map(tracing::field::display),
                    closed,
                    handshake_timeout = ?self.handshake_timeout,
                    "closed connections that did not complete the handshake in time"
                );
            }
            self.closed = true;
            return Err(timed_out());
        }
    }

    fn on_read(&mut self, bytes: &[u8]) {
        match &mut self.phase {
            Phase::Preface(preface) => {
                if preface.feed(bytes) {
                    self.establish();
                }
            }
            Phase::Tls => {}
            Phase::Established => self.last_activity = Instant::now(),
        }
    }

    fn on_written(&mut self, written: usize) {
        if written > 0 && matches!(self.phase, Phase::Established) {
            self.last_activity = Instant::now();
        }
    }
}

fn timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "connection closed: handshake not completed in time, or idle",
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for Connection<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_deadline(cx)?;
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        let read = &buf.filled()[before..];
        if !read.is_empty() {
            this.on_read(read);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> Connection<S> {
    /// One write to the connection, under its deadline, that counts as activity.
    fn write_with(
        &mut self,
        cx: &mut Context<'_>,
        write: impl FnOnce(Pin<&mut S>, &mut Context<'_>) -> Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        self.check_deadline(cx)?;
        let written = ready!(write(Pin::new(&mut self.io), cx))?;
        self.on_written(written);
        Poll::Ready(Ok(written))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Connection<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .write_with(cx, |io, cx| io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .write_with(cx, |io, cx| io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The remote address of the connection a request came on, plain or TLS.
pub fn peer_addr<B>(request: &http::Request<B>) -> Option<SocketAddr> {
    let ext = request.extensions();
    ext.get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|tls| tls.get_ref().remote_addr())
        })
}

/// The peer address reaches the auth and audit layers as it would from a bare `TcpStream`.
impl<S: Connected> Connected for Connection<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tls_handshake_done.store(true, Ordering::Release);
        self.io.connect_info()
    }
}

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`, which every HTTP/2 client sends first.
const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;

/// How much of the client's preface and first frame has arrived. The bytes themselves are
/// hyper's to check: one that is not HTTP/2 is refused there at once.
#[derive(Default)]
struct Preface {
    seen: usize,
    header: [u8; FRAME_HEADER_LEN],
    /// Preface, frame header and payload, once the header has told the payload's length.
    total: Option<usize>,
}

impl Preface {
    /// Takes the next bytes read; true once the preface and the first frame are whole.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        for (i, &byte) in bytes.iter().enumerate() {
            if self.total.is_some() {
                self.seen += bytes.len() - i;
                break;
            }
            if let Some(at) = self.seen.checked_sub(PREFACE_LEN) {
                self.header[at] = byte;
                if at == FRAME_HEADER_LEN - 1 {
                    let [a, b, c, ..] = self.header;
                    let payload = u32::from_be_bytes([0, a, b, c]) as usize;
                    self.total = Some(PREFACE_LEN + FRAME_HEADER_LEN + payload);
                }
            }
            self.seen += 1;
        }
        self.total.is_some_and(|total| self.seen >= total)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};
    use tokio_stream::StreamExt as _;

    use super::*;

    const PREFACE: &[u8; PREFACE_LEN] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    // Real time, kept short: the timers under test are tokio's own.
    const HANDSHAKE: Duration = Duration::from_millis(200);
    const IDLE: Duration = Duration::from_millis(1_000);

    /// The preface, then a SETTINGS frame with one setting (6 bytes of payload).
    fn client_handshake() -> Vec<u8> {
        let mut bytes = PREFACE.to_vec();
        bytes.extend_from_slice(&[0, 0, 6, 0x4, 0, 0, 0, 0, 0]);
        bytes.extend_from_slice(&[0, 0x3, 0, 0, 0, 100]);
        bytes
    }

    fn limits(tls: bool) -> ConnectionLimits {
        ConnectionLimits {
            handshake_timeout: HANDSHAKE,
            idle_timeout: IDLE,
            max_connections: 10,
            tls,
        }
    }

    /// (the client's end, the server's end wrapped)
    fn pair(tls: bool) -> (DuplexStream, Connection<DuplexStream>) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let connection = Connection::new(
            server,
            None,
            &limits(tls),
            None,
            Arc::new(Reports::default()),
        );
        (client, connection)
    }

    /// Reads until the connection fails, as it must at its deadline; how long that took.
    async fn fails_after(connection: &mut Connection<DuplexStream>, since: Instant) -> Duration {
        let mut buf = [0; 64];
        loop {
            match connection.read(&mut buf).await {
                Ok(0) => panic!("the client closed first"),
                Ok(_) => {}
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
                    return since.elapsed();
                }
            }
        }
    }

    #[test]
    fn the_preface_and_first_frame_complete_the_handshake_however_split() {
        let bytes = client_handshake();
        for split in 0..=bytes.len() {
            let mut preface = Preface::default();
            let done_first = preface.feed(&bytes[..split]);
            assert_eq!(done_first, split == bytes.len(), "split at {split}");
            assert!(preface.feed(&bytes[split..]), "split at {split}");
        }
        let mut byte_by_byte = Preface::default();
        let done: Vec<bool> = bytes.iter().map(|b| byte_by_byte.feed(&[*b])).collect();
        assert_eq!(done.iter().position(|d| *d), Some(bytes.len() - 1));
    }

    #[test]
    fn the_preface_alone_or_a_partial_frame_does_not_complete_it() {
        let bytes = client_handshake();
        assert!(!Preface::default().feed(PREFACE));
        assert!(!Preface::default().feed(&bytes[..bytes.len() - 1]));
        let mut empty_settings = Preface::default();
        assert!(empty_settings.feed(&[PREFACE.as_slice(), &[0, 0, 0, 4, 0, 0, 0, 0, 0]].concat()));
    }

    #[tokio::test]
    async fn a_silent_client_is_cut_at_the_handshake_timeout() {
        let start = Instant::now();
        let (_client, mut connection) = pair(false);
        assert!(fails_after(&mut connection, start).await >= HANDSHAKE);
        let mut buf = [0; 8];
        assert!(connection.read(&mut buf).await.is_err(), "stays closed");
        assert!(connection.write(b"x").await.is_err(), "stays closed");
    }

    #[tokio::test]
    async fn trickled_bytes_do_not_move_the_handshake_deadline() {
        const EVERY: Duration = Duration::from_millis(100);
        let start = Instant::now();
        let (mut client, mut connection) = pair(false);
        tokio::spawn(async move {
            for byte in PREFACE {
                if client.write_all(&[*byte]).await.is_err() {
                    return;
                }
                tokio::time::sleep(EVERY).await;
            }
            std::future::pending::<()>().await;
        });
        let after = fails_after(&mut connection, start).await;
        // Had each byte moved it, the deadline would fall after the last one.
        assert!(after >= HANDSHAKE, "{after:?}");
        assert!(after < EVERY * 24, "{after:?}");
    }

    /// Writes `message` on one end and reads it on the other.
    async fn pass(
        from: &mut (impl AsyncWrite + Unpin),
        to: &mut (impl AsyncRead + Unpin),
        message: &[u8],
    ) {
        from.write_all(message).await.expect("write");
        let mut got = vec![0; message.len()];
        to.read_exact(&mut got).await.expect("read");
        assert_eq!(got, message);
    }

    #[tokio::test]
    async fn after_the_handshake_only_idleness_closes_the_connection() {
        let (mut client, mut connection) = pair(false);
        let handshake = client_handshake();
        client.write_all(&handshake).await.expect("write");
        let mut buf = vec![0; handshake.len()];
        connection
            .read_exact(&mut buf)
            .await
            .expect("handshake read");
        // Traffic one way, then the other, each well within the idle timeout, outlasts it.
        for _ in 0..3 {
            tokio::time::sleep(IDLE * 3 / 10).await;
            pass(&mut client, &mut connection, b"ping").await;
            tokio::time::sleep(IDLE * 3 / 10).await;
            pass(&mut connection, &mut client, b"pong").await;
        }
        let quiet_since = Instant::now();
        assert!(fails_after(&mut connection, quiet_since).await >= IDLE);
    }

    #[tokio::test]
    async fn under_tls_the_finished_tls_handshake_counts() {
        let (_client, mut connection) = pair(true);
        tokio::time::sleep(HANDSHAKE / 2).await;
        let () = connection.connect_info();
        let established = Instant::now();
        let after = fails_after(&mut connection, established).await;
        assert!(after >= IDLE, "cut at {after:?}, before the idle timeout");

        let start = Instant::now();
        let (_client, mut never_finished) = pair(true);
        let after = fails_after(&mut never_finished, start).await;
        assert!(after >= HANDSHAKE && after < IDLE, "{after:?}");
    }

    #[tokio::test]
    async fn accepted_connections_have_nagle_off() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let mut incoming = super::incoming(listener);
        let _caller = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let accepted = incoming
            .next()
            .await
            .expect("a connection")
            .expect("accepted");
        assert!(accepted.nodelay().expect("nodelay"));
    }

    #[tokio::test]
    async fn past_max_connections_new_ones_are_closed_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let mut incoming = Incoming::new(
            listener,
            ConnectionLimits {
                max_connections: 2,
                ..limits(false)
            },
        );
        let mut accepted = Vec::new();
        let mut callers = Vec::new();
        for _ in 0..2 {
            callers.push(TcpStream::connect(addr).await.expect("connect"));
            let connection = incoming.next().await.expect("a connection").expect("ok");
            assert!(connection.get_ref().nodelay().expect("nodelay"));
            assert_eq!(
                connection.connect_info().remote_addr(),
                Some(callers.last().expect("caller").local_addr().expect("addr"))
            );
            accepted.push(connection);
        }

        // The third is accepted and closed inside the stream, which yields nothing for it.
        let mut refused = TcpStream::connect(addr).await.expect("connect");
        let nothing = tokio::time::timeout(Duration::from_millis(200), incoming.next()).await;
        assert!(nothing.is_err(), "a connection past the limit was yielded");
        let mut buf = [0; 8];
        let read = refused.read(&mut buf).await;
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

        // Closing one makes room.
        drop(accepted.pop());
        let _next = TcpStream::connect(addr).await.expect("connect");
        let connection = incoming.next().await.expect("a connection").expect("ok");
        assert!(connection.get_ref().nodelay().expect("nodelay"));
    }
}
