//! The connection to the payments backend: kept alive between payouts, and to a bank that
//! requires mutual TLS, paid through when the service presents its client certificate
//! (`payments_backend_client_cert_file` / `_key_file`), closed when it does not.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use partner_payouts::proto::payments::v1::{
    self as bank, payments_backend_server::PaymentsBackendServer,
    sandbox_ledger_client::SandboxLedgerClient, sandbox_ledger_server::SandboxLedgerServer,
};
use partner_payouts::proto::payouts::v1 as pb;
use partner_payouts::sandbox::{self, SandboxBank, SandboxConfig};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::certs::TestCa;
use crate::helpers::*;
use crate::on_both_databases;

/// The sandbox bank behind mutual TLS, its ledger on a plaintext port of its own for the test
/// to read, and the certificates to reach it.
struct MutualTlsBank {
    url: String,
    ledger_url: String,
    _dir: tempfile::TempDir,
    ca_file: PathBuf,
    /// A client certificate the bank's CA signed: (certificate, key).
    client: (PathBuf, PathBuf),
}

impl MutualTlsBank {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = TestCa::new("bank test CA");
        let server = ca.server();
        let ca_file = ca.write(dir.path(), "bank-ca");
        let client = ca.client("partner-payouts").write(dir.path(), "client");
        let sandbox = SandboxBank::new(SandboxConfig::default());

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!(
            "https://localhost:{}",
            listener.local_addr().expect("addr").port()
        );
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(&server.cert_pem, &server.key_pem))
            .client_ca_root(Certificate::from_pem(&ca.pem));
        tokio::spawn(
            Server::builder()
                .tls_config(tls)
                .expect("server TLS")
                .add_service(PaymentsBackendServer::new(sandbox.clone()))
                .serve_with_incoming(partner_payouts::net::incoming(listener)),
        );

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let ledger_url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(
            Server::builder()
                .add_service(SandboxLedgerServer::new(sandbox))
                .serve_with_incoming(partner_payouts::net::incoming(listener)),
        );
        Self {
            url,
            ledger_url,
            _dir: dir,
            ca_file,
            client,
        }
    }

    async fn applied(&self) -> Vec<bank::AppliedInstruction> {
        SandboxLedgerClient::connect(self.ledger_url.clone())
            .await
            .expect("ledger")
            .list_applied(bank::ListAppliedRequest {})
            .await
            .expect("list applied")
            .into_inner()
            .instructions
    }
}

async fn paid_with_a_client_certificate_and_refused_without(db: Db) {
    let bank = MutualTlsBank::start().await;
    let (url, ca_file, (cert, key)) = (bank.url.clone(), bank.ca_file.clone(), bank.client.clone());
    let app = spawn_app(db, move |s| {
        s.payments_backend_url = Some(url);
        s.payments_backend_ca_file = Some(ca_file);
        s.payments_backend_client_cert_file = Some(cert);
        s.payments_backend_client_key_file = Some(key);
    })
    .await;
    let claim = approved_claim(&app, 1, ACCOUNT, 100).await;
    let paid = wait_for(&app, &claim.disbursement_id, pb::DisbursementStatus::Paid).await;
    assert_eq!(paid.account_number, "****6789");
    let applied = bank.applied().await;
    assert_eq!(applied.len(), 1, "{applied:?}");
    assert_eq!(applied[0].account_last4, "6789");
    app.stop().await;

    // The same bank, without the certificate: the connection fails, so the holder is never
    // verified, nothing is applied, and the payout waits, QUEUED, its attempts recording the
    // failed calls.
    let (url, ca_file) = (bank.url.clone(), bank.ca_file.clone());
    let app = spawn_app(db, move |s| {
        s.payments_backend_url = Some(url);
        s.payments_backend_ca_file = Some(ca_file);
    })
    .await;
    let claim = approved_claim(&app, 2, ACCOUNT, 100).await;
    let refused = eventually(10, || async {
        let d = get(&app, &claim.disbursement_id).await;
        (!d.attempts.is_empty()).then_some(d)
    })
    .await;
    assert_eq!(
        refused.status(),
        pb::DisbursementStatus::Queued,
        "{refused:?}"
    );
    assert!(
        refused
            .attempts
            .iter()
            .all(|a| a.operation == "VERIFY_ACCOUNT_HOLDER" && a.outcome == "ERROR"),
        "{:?}",
        refused.attempts
    );
    assert_eq!(bank.applied().await.len(), 1, "nothing more was applied");
}

on_both_databases!(
    a_bank_that_requires_mutual_tls_is_paid_with_a_client_certificate_and_refused_without,
    db = paid_with_a_client_certificate_and_refused_without
);

/// Counts the HTTP/2 PING frames (not their acknowledgements) a client sends, in the bytes it
/// sends after its connection preface.
struct PingCounter {
    preface_left: usize,
    header: Vec<u8>,
    payload_left: usize,
    pings: u32,
}

impl PingCounter {
    fn new() -> Self {
        Self {
            preface_left: 24,
            header: Vec::with_capacity(9),
            payload_left: 0,
            pings: 0,
        }
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let skip = if self.preface_left > 0 {
                &mut self.preface_left
            } else {
                &mut self.payload_left
            };
            if *skip > 0 {
                let n = (*skip).min(bytes.len());
                *skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (9 - self.header.len()).min(bytes.len());
            self.header.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if let [a, b, c, kind, flags, _, _, _, _] = self.header[..] {
                self.payload_left = u32::from_be_bytes([0, a, b, c]) as usize;
                self.pings += u32::from(kind == 0x6 && flags & 0x1 == 0);
                self.header.clear();
            }
        }
    }
}

/// A relay to `target` that counts the connections made through it and the pings their
/// clients send.
async fn ping_counting_relay(target: SocketAddr) -> (SocketAddr, Arc<Mutex<(u32, u32)>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
    let addr = listener.local_addr().expect("relay address");
    let seen: Arc<Mutex<(u32, u32)>> = Arc::default();
    let counts = seen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            counts.lock().expect("lock").0 += 1;
            let service = TcpStream::connect(target).await.expect("relay connect");
            let (mut from_client, mut to_client) = client.into_split();
            let (mut from_service, mut to_service) = service.into_split();
            tokio::spawn(async move { tokio::io::copy(&mut from_service, &mut to_client).await });
            let counts = counts.clone();
            tokio::spawn(async move {
                let (mut buf, mut pings) = (vec![0; 16 * 1024], PingCounter::new());
                while let Ok(n @ 1..) = from_client.read(&mut buf).await {
                    pings.feed(&buf[..n]);
                    counts.lock().expect("lock").1 = pings.pings;
                    if to_service.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, seen)
}

async fn kept_alive_between_payouts(db: Db) {
    const KEEPALIVE_MS: u64 = 200;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let bank_addr = listener.local_addr().expect("addr");
    tokio::spawn(sandbox::serve(
        listener,
        SandboxBank::new(SandboxConfig::default()),
        std::future::pending(),
    ));
    let (relay, seen) = ping_counting_relay(bank_addr).await;
    let app = spawn_app(db, move |s| {
        s.payments_backend_url = Some(format!("http://{relay}"));
        s.payments_backend_keepalive_ms = KEEPALIVE_MS;
        s.tcp_keepalive_ms = 7_000;
    })
    .await;
    let claim = approved_claim(&app, 1, ACCOUNT, 100).await;
    wait_for(&app, &claim.disbursement_id, pb::DisbursementStatus::Paid).await;
    let pings_when_paid = seen.lock().expect("lock").1;

    // Nothing to pay now: the connection is kept, and pinged while quiet.
    tokio::time::sleep(Duration::from_millis(KEEPALIVE_MS * 10)).await;
    let (connections, pings) = *seen.lock().expect("lock");
    assert_eq!(connections, 1, "the client kept its one connection");
    assert!(
        pings >= pings_when_paid + 3,
        "{pings} pings, {pings_when_paid} of them before the payout was paid"
    );
    #[cfg(target_os = "linux")]
    {
        let sockets = crate::lifetimes::established_sockets(relay.port(), false);
        assert_eq!(sockets.len(), 1, "{sockets:?}");
        let (timer, when) = sockets[0];
        assert_eq!(
            timer,
            crate::lifetimes::KEEPALIVE_TIMER,
            "TCP keepalive is on"
        );
        assert!(
            when <= 700,
            "fires in {when} hundredths of a second: not ours"
        );
    }
}

on_both_databases!(
    the_connection_to_the_backend_is_kept_alive_between_payouts,
    db = kept_alive_between_payouts
);
