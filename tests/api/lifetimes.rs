//! Connections kept alive and retired: the service pings quiet clients and closes those that
//! stop answering, keeps TCP keepalive on, and sends a connection away at its maximum age (its
//! client reconnects without a failed call) and cuts it once the grace is over. Like
//! `connections`, these do not depend on the database and run on SQLite only.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use partner_payouts::proto::payouts::v1::{
    self as pb, partner_service_client::PartnerServiceClient,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout, timeout_at};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use crate::connections::{BOUND, EMPTY_SETTINGS, PREFACE, get_policy, millis, pipe, spawn};
use crate::helpers::*;

const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const ACK: u8 = 0x1;

/// One HTTP/2 frame on stream 0: its type, flags and payload.
struct Frame {
    kind: u8,
    flags: u8,
    payload: Vec<u8>,
}

async fn read_frame(stream: &mut TcpStream) -> Option<Frame> {
    let mut header = [0; 9];
    stream.read_exact(&mut header).await.ok()?;
    let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    let mut payload = vec![0; length];
    stream.read_exact(&mut payload).await.ok()?;
    Some(Frame {
        kind: header[3],
        flags: header[4],
        payload,
    })
}

async fn write_frame(stream: &mut TcpStream, kind: u8, flags: u8, payload: &[u8]) {
    let length = u32::try_from(payload.len())
        .expect("a small frame")
        .to_be_bytes();
    let mut frame = vec![length[1], length[2], length[3], kind, flags, 0, 0, 0, 0];
    frame.extend_from_slice(payload);
    stream.write_all(&frame).await.expect("write a frame");
}

/// A raw HTTP/2 connection: our preface and SETTINGS sent, the service's SETTINGS
/// acknowledged. Also when it was opened: the service cannot have started timing the
/// connection before then (it may have before the handshake ends here).
async fn raw_http2(addr: SocketAddr) -> (TcpStream, Instant) {
    let opened = Instant::now();
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(PREFACE).await.expect("write");
    stream.write_all(&EMPTY_SETTINGS).await.expect("write");
    let settings = timeout(BOUND, read_frame(&mut stream))
        .await
        .expect("the service answers")
        .expect("its first frame");
    assert_eq!(settings.kind, SETTINGS);
    write_frame(&mut stream, SETTINGS, ACK, &[]).await;
    (stream, opened)
}

/// What a raw client saw of the service's pings.
#[derive(Debug, Default)]
struct Pinged {
    pings: u32,
    first_ping: Option<Instant>,
    /// When the service closed the connection, if it did.
    closed: Option<Instant>,
}

/// Reads what the service sends until it closes the connection or `until`; answers its pings
/// if `answer`.
async fn listen(stream: &mut TcpStream, answer: bool, until: Instant) -> Pinged {
    let mut seen = Pinged::default();
    while let Ok(frame) = timeout_at(until, read_frame(stream)).await {
        let Some(frame) = frame else {
            seen.closed = Some(Instant::now());
            break;
        };
        if frame.kind == PING && frame.flags & ACK == 0 {
            seen.pings += 1;
            seen.first_ping.get_or_insert_with(Instant::now);
            if answer {
                write_frame(stream, PING, ACK, &frame.payload).await;
            }
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_clients_are_pinged_and_one_that_stops_answering_is_closed() {
    const IDLE_MS: u64 = 3_000;
    const PING_INTERVAL_MS: u64 = 200;
    const PING_TIMEOUT_MS: u64 = 300;
    let app = spawn(|s| {
        s.http2_keepalive_interval_ms = PING_INTERVAL_MS;
        s.http2_keepalive_timeout_ms = PING_TIMEOUT_MS;
        s.idle_timeout_ms = IDLE_MS;
    })
    .await;
    let (mut answering, _) = raw_http2(app.addr).await;
    let (mut silent, silent_since) = raw_http2(app.addr).await;
    let until = Instant::now() + millis(IDLE_MS * 3 / 2);
    let (answered, unanswered) = tokio::join!(
        listen(&mut answering, true, until),
        listen(&mut silent, false, Instant::now() + BOUND),
    );

    // Pings and their answers are traffic: a client that answers is never idle.
    assert_eq!(
        answered.closed, None,
        "a client that answers pings was closed"
    );
    assert!(answered.pings >= 5, "{answered:?}");

    let first_ping = unanswered.first_ping.expect("the silent client was pinged");
    let closed = unanswered.closed.expect("the silent client was closed");
    let after = closed - silent_since;
    assert!(
        after >= millis(PING_INTERVAL_MS + PING_TIMEOUT_MS),
        "closed {after:?} after the connection was opened: before a ping could go unanswered"
    );
    // Idleness would close it only IDLE_MS after the service's last write (a ping).
    let after_ping = closed - first_ping;
    assert!(
        after_ping < millis(IDLE_MS),
        "closed {after_ping:?} after the first ping: not by the ping timeout"
    );
    get_policy(&app.channel)
        .await
        .expect("the test's own client, which answers pings, is served");
}

/// The kernel's keepalive timer, as `/proc/net/tcp` shows it.
pub(crate) const KEEPALIVE_TIMER: u8 = 2;

/// Each established IPv4 TCP socket whose local (or, unless `local`, remote) port is `port`:
/// the kernel's timer on it, and when that fires, in hundredths of a second.
#[cfg(target_os = "linux")]
pub(crate) fn established_sockets(port: u16, local: bool) -> Vec<(u8, u64)> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let port_of = |address: &str| {
        let (_, port) = address.split_once(':').expect("address:port");
        u16::from_str_radix(port, 16).expect("a port")
    };
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let address = if local { fields[1] } else { fields[2] };
            (port_of(address) == port && fields[3] == "01").then(|| {
                let (timer, when) = fields[5].split_once(':').expect("tr:tm->when");
                (
                    u8::from_str_radix(timer, 16).expect("a timer"),
                    u64::from_str_radix(when, 16).expect("a time"),
                )
            })
        })
        .collect()
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_connections_have_tcp_keepalive_on() {
    const KEEPALIVE_MS: u64 = 7_000;
    let app = spawn(|s| s.tcp_keepalive_ms = KEEPALIVE_MS).await;
    get_policy(&app.channel).await.expect("a call");
    let port = app.addr.port();
    let service_side = eventually(10, || async {
        let sockets = established_sockets(port, true);
        (!sockets.is_empty() && sockets.iter().all(|(timer, _)| *timer == KEEPALIVE_TIMER))
            .then_some(sockets)
    })
    .await;
    for (_, when) in service_side {
        assert!(
            when <= KEEPALIVE_MS / 10,
            "the keepalive timer fires in {when} hundredths of a second: not ours"
        );
    }
    // The test client sets no keepalive: the check tells the two apart.
    let client_side = established_sockets(port, false);
    assert!(!client_side.is_empty());
    assert!(
        client_side
            .iter()
            .all(|(timer, _)| *timer != KEEPALIVE_TIMER),
        "{client_side:?}"
    );
}

/// One connection through [`relay_all`]: when it was opened, and when it ended.
#[derive(Debug, Clone, Copy)]
struct Relayed {
    opened: Instant,
    closed: Option<Instant>,
}

/// A relay to `target` for any number of connections, and what became of each.
async fn relay_all(target: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<Relayed>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
    let addr = listener.local_addr().expect("relay address");
    let log: Arc<Mutex<Vec<Relayed>>> = Arc::default();
    let relayed = log.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let service = TcpStream::connect(target).await.expect("relay connect");
            let index = {
                let mut log = relayed.lock().expect("lock");
                log.push(Relayed {
                    opened: Instant::now(),
                    closed: None,
                });
                log.len() - 1
            };
            let relayed = relayed.clone();
            tokio::spawn(async move {
                pipe(client, service).await;
                relayed.lock().expect("lock")[index].closed = Some(Instant::now());
            });
        }
    });
    (addr, log)
}

async fn channel_to(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect")
}

/// Calls a client lost to GOAWAYs: none, but for a tonic client's one call per GOAWAY that
/// reaches its connection between the GOAWAY and the connection's end. hyper drops such a
/// request unsent (`CANCELLED`, "connection closed") and the client reconnects; with no call
/// running the window is a round trip, with one running it lasts until that call ends. A
/// request sent just before the GOAWAY arrives is refused by it instead: the server's GOAWAY
/// names the last stream it takes, and the client's HTTP/2 fails the later one with the
/// GOAWAY's own error (`INTERNAL`, from `NO_ERROR`), the server having never seen it.
fn assert_only_dropped_at_goaway(failed: &[tonic::Status], goaways: usize) {
    assert!(
        failed.len() <= goaways
            && failed
                .iter()
                .all(|status| status.code() == Code::Cancelled || refused_by_goaway(status)),
        "{failed:?} after {goaways} GOAWAY"
    );
}

/// Whether the call failed because the server's GOAWAY left its stream out.
fn refused_by_goaway(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if let Some(h2) = error.downcast_ref::<h2::Error>() {
            return status.code() == Code::Internal
                && h2.is_go_away()
                && h2.is_remote()
                && h2.reason() == Some(h2::Reason::NO_ERROR);
        }
        source = error.source();
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_past_its_maximum_age_is_sent_away_and_its_client_reconnects() {
    const AGE_MS: u64 = 1_000;
    const GRACE_MS: u64 = 5_000;
    let app = spawn(|s| {
        s.max_connection_age_ms = AGE_MS;
        s.max_connection_age_grace_ms = GRACE_MS;
    })
    .await;
    let (relay_addr, log) = relay_all(app.addr).await;
    let channel = channel_to(relay_addr).await;
    let start = Instant::now();
    let (mut calls, mut failed) = (0, Vec::new());
    while start.elapsed() < millis(AGE_MS * 7 / 2) {
        if let Err(status) = get_policy(&channel).await {
            failed.push(status);
        }
        calls += 1;
        tokio::time::sleep(millis(100)).await;
    }
    let log = log.lock().expect("lock").clone();
    assert!(log.len() >= 2, "{calls} calls on one connection: {log:?}");
    assert_only_dropped_at_goaway(&failed, log.len() - 1);
    let first = log[0];
    let lived = first.closed.expect("the first connection ended") - first.opened;
    assert!(
        lived >= millis(AGE_MS),
        "the first connection ended after {lived:?}: before its maximum age"
    );
    // With no call running, it goes at the GOAWAY, not at the end of the grace.
    assert!(
        lived < millis(AGE_MS + GRACE_MS),
        "the first connection lived {lived:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_running_at_the_maximum_age_has_the_grace_then_its_connection_is_cut() {
    const AGE_MS: u64 = 1_000;
    const GRACE_MS: u64 = 3_000;
    let app = spawn(|s| {
        s.max_connection_age_ms = AGE_MS;
        s.max_connection_age_grace_ms = GRACE_MS;
        s.idle_timeout_ms = 60_000;
    })
    .await;
    let (relay_addr, log) = relay_all(app.addr).await;
    let start = Instant::now();
    let channel = channel_to(relay_addr).await;
    // An import that sends one row, then neither another nor its end.
    let row = pb::ImportPartnersRequest {
        request_id: request_id(),
        partner: Some(partner(9_100)),
    };
    let rows = futures::StreamExt::chain(futures::stream::iter([row]), futures::stream::pending());
    let mut answers = PartnerServiceClient::new(channel.clone())
        .import_partners(rows)
        .await
        .expect("the import starts")
        .into_inner();
    let first = answers.message().await.expect("an answer").expect("a row");
    assert_eq!(
        first.outcome(),
        pb::import_partners_response::Outcome::Created
    );

    // Past the GOAWAY, calls go on a new connection while the import holds the old one.
    let deadline = Instant::now() + BOUND;
    let mut failed = Vec::new();
    while log.lock().expect("lock").len() < 2 {
        assert!(Instant::now() < deadline, "the client never reconnected");
        if let Err(status) = get_policy(&channel).await {
            failed.push(status);
        }
        tokio::time::sleep(millis(50)).await;
    }
    assert_only_dropped_at_goaway(&failed, 1);
    assert_eq!(
        log.lock().expect("lock")[0].closed,
        None,
        "the import's connection is still open, in its grace"
    );

    let cut = timeout(BOUND, answers.message())
        .await
        .expect("the import ends");
    assert!(cut.is_err(), "the import ended without error: {cut:?}");
    let after = start.elapsed();
    assert!(
        after >= millis(AGE_MS + GRACE_MS),
        "cut {after:?} after it began: before its maximum age and grace were over"
    );
    get_policy(&channel)
        .await
        .expect("the client goes on, on its new connection");
}
