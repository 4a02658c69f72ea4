//! Accepting gRPC connections: Nagle off and, for the public server, TCP keepalive on and at
//! most `max_connections` open at once, each closed when its client does not complete the
//! HTTP/2 handshake in time, then goes idle, or outlives its maximum age and grace
//! ([`Connection`]). Without these limits a client that opens connections and sends nothing
//! holds a file descriptor each, forever, until the process can open no more and every new
//! caller times out.

use std::future::Future as _;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Sleep;
use tokio_stream::Stream;
use tonic::transport::server::{TcpConnectInfo, TcpIncoming, TlsConnectInfo};

mod connection;

pub use connection::Connection;

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
    /// How long after accept a connection is closed whatever it is doing: its maximum age
    /// (when the server sends GOAWAY) and the grace after it. None: never.
    pub max_age: Option<Duration>,
    /// Idle time before the kernel probes a connection's peer (TCP keepalive), and between
    /// probes. None: off.
    pub tcp_keepalive: Option<Duration>,
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
                    if let Some(idle) = this.limits.tcp_keepalive
                        && let Err(error) = set_tcp_keepalive(&stream, idle)
                    {
                        tracing::debug!(%peer, %error, "could not turn TCP keepalive on");
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

/// TCP keepalive on `stream`: the kernel probes a peer it has heard nothing from for `idle`,
/// then every `idle`, so a peer that vanished (or a middlebox that forgot the connection) is
/// noticed, and middleboxes see traffic on a quiet connection. tonic does not apply its own
/// `tcp_keepalive` setting to a listener it is handed.
pub fn set_tcp_keepalive(stream: &TcpStream, idle: Duration) -> io::Result<()> {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(idle);
    socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive)
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

/// `addr` as text, as `addr.to_string()` writes it. An IPv4 peer's is written digit by digit:
/// every mutating call records its peer, and the standard formatter goes through the
/// formatting machinery for each octet, at about twenty times the cost.
pub fn peer_text(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(v4) => {
            let mut text = String::with_capacity(21);
            push_ipv4(&mut text, *v4.ip());
            text.push(':');
            text.push_str(itoa::Buffer::new().format(v4.port()));
            text
        }
        SocketAddr::V6(_) => addr.to_string(),
    }
}

/// `ip` as text, as `ip.to_string()` writes it (see [`peer_text`]).
pub fn ip_text(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let mut text = String::with_capacity(15);
            push_ipv4(&mut text, v4);
            text
        }
        std::net::IpAddr::V6(_) => ip.to_string(),
    }
}

fn push_ipv4(text: &mut String, ip: std::net::Ipv4Addr) {
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            text.push('.');
        }
        text.push_str(itoa::Buffer::new().format(octet));
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt as _;
    use tokio_stream::StreamExt as _;
    use tonic::transport::server::Connected as _;

    use super::*;

    const KEEPALIVE: Duration = Duration::from_secs(7);

    proptest::proptest! {
        /// Peer addresses read as the standard formatter writes them.
        #[test]
        fn peer_text_is_what_to_string_writes(
            octets in proptest::prelude::any::<[u8; 4]>(),
            segments in proptest::prelude::any::<[u16; 8]>(),
            port in proptest::prelude::any::<u16>(),
        ) {
            let v4 = SocketAddr::from((octets, port));
            proptest::prop_assert_eq!(peer_text(v4), v4.to_string());
            proptest::prop_assert_eq!(ip_text(v4.ip()), v4.ip().to_string());
            let v6 = SocketAddr::from((segments, port));
            proptest::prop_assert_eq!(peer_text(v6), v6.to_string());
            proptest::prop_assert_eq!(ip_text(v6.ip()), v6.ip().to_string());
        }
    }

    #[test]
    fn peer_text_of_the_edges() {
        for (addr, text) in [
            ("0.0.0.0:0", "0.0.0.0:0"),
            ("255.255.255.255:65535", "255.255.255.255:65535"),
            ("10.0.100.9:50051", "10.0.100.9:50051"),
        ] {
            let addr: SocketAddr = addr.parse().expect("an address");
            assert_eq!(peer_text(addr), text);
        }
    }

    fn limits() -> ConnectionLimits {
        ConnectionLimits {
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(10),
            max_connections: 10,
            tls: false,
            max_age: None,
            tcp_keepalive: Some(KEEPALIVE),
        }
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
                ..limits()
            },
        );
        let mut accepted = Vec::new();
        let mut callers = Vec::new();
        for _ in 0..2 {
            callers.push(TcpStream::connect(addr).await.expect("connect"));
            let connection = incoming.next().await.expect("a connection").expect("ok");
            let socket = socket2::SockRef::from(connection.get_ref());
            assert!(socket.tcp_nodelay().expect("nodelay"));
            assert!(
                socket.keepalive().expect("keepalive"),
                "TCP keepalive is on"
            );
            assert_eq!(socket.tcp_keepalive_time().expect("time"), KEEPALIVE);
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
