//! One accepted connection under its deadlines: the handshake, idleness, and the end of its
//! life past `max_connection_age` and its grace.

use std::future::Future as _;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};
use tonic::transport::server::Connected;

use super::{ConnectionLimits, Reports};

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
/// socket is closed. The permit it holds (see [`Incoming`](super::Incoming)) is released when it
/// is dropped.
///
/// Whatever it does, a connection ends `max_age` after accept (see [`ConnectionLimits`]): by
/// then the server has asked the client to go (GOAWAY at `max_connection_age`), and what is
/// still open has had its grace.
pub struct Connection<S> {
    io: S,
    peer: Option<SocketAddr>,
    phase: Phase,
    tls_handshake_done: AtomicBool,
    deadline: Pin<Box<Sleep>>,
    last_activity: Instant,
    idle_timeout: Duration,
    handshake_timeout: Duration,
    /// When the connection ends whatever it is doing: `max_age` after accept.
    end_of_life: Option<Instant>,
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
    pub(super) fn new(
        io: S,
        peer: Option<SocketAddr>,
        limits: &ConnectionLimits,
        permit: Option<OwnedSemaphorePermit>,
        reports: Arc<Reports>,
    ) -> Self {
        let now = Instant::now();
        let end_of_life = limits.max_age.map(|age| now + age);
        let handshake_due = now + limits.handshake_timeout;
        Self {
            io,
            peer,
            phase: if limits.tls {
                Phase::Tls
            } else {
                Phase::Preface(Preface::default())
            },
            tls_handshake_done: AtomicBool::new(false),
            deadline: Box::pin(tokio::time::sleep_until(capped(handshake_due, end_of_life))),
            last_activity: now,
            idle_timeout: limits.idle_timeout,
            handshake_timeout: limits.handshake_timeout,
            end_of_life,
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
        let due = capped(self.last_activity + self.idle_timeout, self.end_of_life);
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
            if self.end_of_life.is_some_and(|end| end <= Instant::now()) {
                tracing::debug!(
                    peer = self.peer.map(tracing::field::display),
                    "closing a connection past max_connection_age and its grace"
                );
            } else if matches!(self.phase, Phase::Established) {
                // Activity moves the idle deadline lazily: only now is it looked at.
                let due = self.last_activity + self.idle_timeout;
                if due > Instant::now() {
                    self.deadline.as_mut().reset(capped(due, self.end_of_life));
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

/// `due`, or the end of the connection's life if that comes first.
fn capped(due: Instant, end_of_life: Option<Instant>) -> Instant {
    end_of_life.map_or(due, |end| due.min(end))
}

fn timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "connection closed: handshake not completed in time, idle, or past its maximum age",
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
            max_age: None,
            tcp_keepalive: None,
        }
    }

    /// (the client's end, the server's end wrapped)
    fn pair(tls: bool) -> (DuplexStream, Connection<DuplexStream>) {
        pair_under(&limits(tls))
    }

    fn pair_under(limits: &ConnectionLimits) -> (DuplexStream, Connection<DuplexStream>) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let connection = Connection::new(server, None, limits, None, Arc::new(Reports::default()));
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
    async fn a_busy_connection_still_ends_at_its_maximum_age() {
        const MAX_AGE: Duration = Duration::from_millis(1_500);
        let start = Instant::now();
        let (mut client, mut connection) = pair_under(&ConnectionLimits {
            max_age: Some(MAX_AGE),
            ..limits(false)
        });
        client.write_all(&client_handshake()).await.expect("write");
        // Traffic every tenth of the idle timeout: never idle.
        let talker = tokio::spawn(async move {
            while client.write_all(b"ping").await.is_ok() {
                tokio::time::sleep(IDLE / 10).await;
            }
        });
        let after = fails_after(&mut connection, start).await;
        assert!(after >= MAX_AGE, "cut at {after:?}, before its maximum age");
        assert!(
            after < MAX_AGE + IDLE,
            "cut at {after:?}, long after its maximum age"
        );
        talker.abort();
    }
}
