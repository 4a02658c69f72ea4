//! Connections that never start, go idle, or come by the thousand: closed in time, refused past
//! `max_connections`, and never at the cost of a real client. What happens to a connection does
//! not depend on the database, so these run on SQLite only.
//!
//! Waits are bounded by [`BOUND`], far above every timeout set here, so a connection the service
//! never closes fails the test rather than hanging it. Where a close must come from a timer, the
//! test also checks it did not come before the timer could fire.

use std::net::SocketAddr;
use std::time::Duration;

use partner_payouts::app::Application;
use partner_payouts::auth::TlsSettings;
use partner_payouts::config::Settings;
use partner_payouts::proto::payouts::v1::{
    self as pb, claim_service_client::ClaimServiceClient,
    partner_service_client::PartnerServiceClient,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::certs::TestCa;
use crate::helpers::*;

/// The longest any wait here may take before the test fails.
pub(crate) const BOUND: Duration = Duration::from_secs(10);
/// Every HTTP/2 client's first 24 bytes.
pub(crate) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame: with the preface, a complete client handshake.
pub(crate) const EMPTY_SETTINGS: [u8; 9] = [0, 0, 0, 0x4, 0, 0, 0, 0, 0];

pub(crate) async fn spawn(tweak: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app(Db::Sqlite, tweak).await
}

pub(crate) fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// Everything the service sends until it closes the connection.
pub(crate) async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    let mut buf = [0; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return received,
            Ok(n) => received.extend_from_slice(&buf[..n]),
        }
    }
}

/// Waits for the service to close `stream`; what it sent first, and how long after `since`.
pub(crate) async fn closed_by_service(
    stream: &mut TcpStream,
    since: Instant,
) -> (Vec<u8>, Duration) {
    let received = timeout(BOUND, read_until_closed(stream))
        .await
        .expect("the service closes the connection");
    (received, since.elapsed())
}

/// Whether `received` begins with a SETTINGS frame: the service took the connection as HTTP/2.
pub(crate) fn starts_with_settings(received: &[u8]) -> bool {
    received.len() >= 9 && received[3] == 0x4
}

/// A raw connection the service has accepted and started serving (it sent its SETTINGS).
async fn served_connection(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut header = [0; 9];
    timeout(BOUND, stream.read_exact(&mut header))
        .await
        .expect("the service answers a new connection")
        .expect("the service's first frame");
    assert!(starts_with_settings(&header), "{header:?}");
    stream
}

pub(crate) async fn get_policy(channel: &Channel) -> Result<(), tonic::Status> {
    ClaimServiceClient::new(channel.clone())
        .get_policy(pb::GetPolicyRequest {})
        .await
        .map(|_| ())
}

/// A real client on a new connection: connects and makes a call.
pub(crate) async fn answered(addr: SocketAddr) -> Result<(), String> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    get_policy(&channel).await.map_err(|e| format!("call: {e}"))
}

/// A relay for exactly one TCP connection to `target` (it accepts no second one, so a client
/// behind it cannot reconnect unnoticed). The task ends when the connection does: true if the
/// service closed it while the client still held its end.
async fn relay(target: SocketAddr) -> (SocketAddr, JoinHandle<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
    let addr = listener.local_addr().expect("relay address");
    let task = tokio::spawn(async move {
        let (client, _) = listener.accept().await.expect("relay accept");
        drop(listener);
        let service = TcpStream::connect(target).await.expect("relay connect");
        pipe(client, service).await
    });
    (addr, task)
}

/// Copies between `client` and `service`, both ways, until the service's side ends: true if
/// it ended first, while the client still held its end.
pub(crate) async fn pipe(client: TcpStream, service: TcpStream) -> bool {
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_service, mut to_service) = service.into_split();
    let upstream =
        tokio::spawn(async move { tokio::io::copy(&mut from_client, &mut to_service).await });
    let _ = tokio::io::copy(&mut from_service, &mut to_client).await;
    let service_first = !upstream.is_finished();
    upstream.abort();
    service_first
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_is_closed_after_the_handshake_timeout() {
    let app = spawn(|s| s.handshake_timeout_ms = 300).await;
    let start = Instant::now();
    let mut silent = TcpStream::connect(app.addr).await.expect("connect");
    let (received, after) = closed_by_service(&mut silent, start).await;
    assert!(
        starts_with_settings(&received),
        "served first: {received:?}"
    );
    assert!(after >= millis(300), "closed after {after:?}");
    answered(app.addr).await.expect("a real client is answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_only_the_preface_is_closed_after_the_handshake_timeout() {
    let app = spawn(|s| s.handshake_timeout_ms = 300).await;
    let start = Instant::now();
    let mut preface_only = TcpStream::connect(app.addr).await.expect("connect");
    preface_only.write_all(PREFACE).await.expect("write");
    let (received, after) = closed_by_service(&mut preface_only, start).await;
    assert!(
        starts_with_settings(&received),
        "served first: {received:?}"
    );
    assert!(after >= millis(300), "closed after {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_handshake_then_silence_is_closed_after_the_idle_timeout() {
    let app = spawn(|s| {
        s.handshake_timeout_ms = 300;
        s.idle_timeout_ms = 1_500;
    })
    .await;
    let start = Instant::now();
    let mut quiet = TcpStream::connect(app.addr).await.expect("connect");
    quiet.write_all(PREFACE).await.expect("write");
    quiet.write_all(&EMPTY_SETTINGS).await.expect("write");
    let (received, after) = closed_by_service(&mut quiet, start).await;
    assert!(
        starts_with_settings(&received),
        "served first: {received:?}"
    );
    assert!(
        after >= millis(1_500),
        "closed after {after:?}: before the idle timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_making_calls_keeps_its_connection_and_is_closed_once_idle() {
    let app = spawn(|s| {
        s.handshake_timeout_ms = 200;
        s.idle_timeout_ms = 1_500;
    })
    .await;
    let (relay_addr, connection_ended) = relay(app.addr).await;
    let channel = Endpoint::from_shared(format!("http://{relay_addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect through the relay");
    // Four calls 600 ms apart, on the relay's one connection: it outlives the handshake
    // timeout and the idle timeout because each call comes within the idle timeout of the last.
    for call in 0..4 {
        if call > 0 {
            tokio::time::sleep(millis(600)).await;
        }
        get_policy(&channel)
            .await
            .unwrap_or_else(|e| panic!("call {call} on the first connection: {e}"));
    }
    let quiet_since = Instant::now();
    let service_closed = timeout(BOUND, connection_ended)
        .await
        .expect("the idle connection is closed")
        .expect("relay");
    assert!(
        service_closed,
        "the client closed the connection, not the service"
    );
    let after = quiet_since.elapsed();
    // The service's own last write came a little before the client saw the answer.
    assert!(
        after >= millis(1_300),
        "closed {after:?} after the last call"
    );
    assert!(
        get_policy(&channel).await.is_err(),
        "the closed connection was the channel's only one"
    );
    answered(app.addr)
        .await
        .expect("a new client is answered on a fresh connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_keeps_sending_outlives_the_idle_timeout() {
    let app = spawn(|s| {
        s.handshake_timeout_ms = 200;
        s.idle_timeout_ms = 1_000;
    })
    .await;
    let channel = Endpoint::from_shared(format!("http://{}", app.addr))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    // Six rows 400 ms apart: 2 s of one call, twice the idle timeout.
    let rows = futures::stream::unfold(0u64, |row| async move {
        if row == 6 {
            return None;
        }
        if row > 0 {
            tokio::time::sleep(millis(400)).await;
        }
        let request = pb::ImportPartnersRequest {
            request_id: request_id(),
            partner: Some(partner(7_000 + row)),
        };
        Some((request, row + 1))
    });
    let mut answers = PartnerServiceClient::new(channel)
        .import_partners(rows)
        .await
        .expect("import starts")
        .into_inner();
    let mut created = 0;
    while let Some(answer) = answers.message().await.expect("the stream is not cut") {
        assert_eq!(
            answer.outcome(),
            pb::import_partners_response::Outcome::Created,
            "{answer:?}"
        );
        created += 1;
    }
    assert_eq!(created, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_new_ones_are_refused_at_once_until_some_close() {
    const MAX: usize = 4;
    let app = spawn(|s| {
        s.max_connections = MAX;
        s.handshake_timeout_ms = 60_000;
    })
    .await;
    // The test app's own channel holds one connection; raw ones take the rest.
    let mut held = Vec::new();
    for _ in 1..MAX {
        held.push(served_connection(app.addr).await);
    }

    let mut refused = TcpStream::connect(app.addr).await.expect("connect");
    let received = timeout(Duration::from_secs(1), read_until_closed(&mut refused))
        .await
        .expect("a connection past the limit is closed within a second");
    assert!(received.is_empty(), "it was never served: {received:?}");
    assert!(
        answered(app.addr).await.is_err(),
        "a client past the limit is refused"
    );
    get_policy(&app.channel)
        .await
        .expect("open connections are still served");

    held.truncate(1); // two of the three close
    eventually(10, || async { answered(app.addr).await.ok() }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_connections_do_not_keep_a_real_client_waiting() {
    const IDLE: usize = 1_000;
    let app = spawn(|s| {
        s.max_connections = 2 * IDLE;
        s.handshake_timeout_ms = 60_000;
    })
    .await;
    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        idle.push(served_connection(app.addr).await);
    }
    timeout(BOUND, answered(app.addr))
        .await
        .expect("answered in time")
        .expect("a real client is answered");
    get_policy(&app.channel)
        .await
        .expect("the established client too");
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_tls_silence_is_cut_at_the_handshake_timeout_and_a_client_is_not() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = TestCa::new("connections test CA");
    let (cert_file, key_file) = ca.server().write(dir.path(), "server");
    let settings = Settings {
        listen_addr: "127.0.0.1:0".parse().expect("addr"),
        admin_listen_addr: None,
        database_url: format!("sqlite://{}", dir.path().join("payouts.db").display()),
        pii_key_file: dir.path().join("pii.key"),
        tls: Some(TlsSettings {
            cert_file,
            key_file,
            client_ca_file: None,
        }),
        handshake_timeout_ms: 300,
        idle_timeout_ms: 1_500,
        ..Settings::default()
    };
    let application = Application::build(settings).await.expect("app builds");
    let addr = application.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(application.run_until(async {
        let _ = stopped.await;
    }));

    // No ClientHello: cut at the handshake timeout, having been sent nothing.
    let start = Instant::now();
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    let (received, after) = closed_by_service(&mut silent, start).await;
    assert!(received.is_empty(), "{received:?}");
    assert!(after >= millis(300), "closed after {after:?}");

    // A TLS client on one connection outlives the handshake timeout.
    let (relay_addr, connection_ended) = relay(addr).await;
    let channel = Endpoint::from_shared(format!("https://{relay_addr}"))
        .expect("endpoint")
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&ca.pem))
                .domain_name("localhost"),
        )
        .expect("client TLS")
        .connect()
        .await
        .expect("connect over TLS");
    get_policy(&channel).await.expect("first call over TLS");
    tokio::time::sleep(millis(600)).await;
    get_policy(&channel)
        .await
        .expect("the same connection, past the handshake timeout");
    let service_closed = timeout(BOUND, connection_ended)
        .await
        .expect("the idle TLS connection is closed")
        .expect("relay");
    assert!(
        service_closed,
        "the client closed the connection, not the service"
    );

    let _ = stop.send(());
    server
        .await
        .expect("server task")
        .expect("server ran cleanly");
}
