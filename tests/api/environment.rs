//! Settings from the environment reach into the `[auth]` and `[tls]` tables
//! (`PAYOUTS_AUTH__PRINCIPALS`, `PAYOUTS_TLS__CERT_FILE`, ...), over what the settings file
//! says, as twelve-factor platforms set them: the service process, started as an operator
//! starts it, is called over TLS.

use std::process::{Child, Command, Stdio};

use partner_payouts::proto::payouts::v1::{self as pb, claim_service_client::ClaimServiceClient};
use sha2::Digest as _;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::access::authed;
use crate::certs::TestCa;
use crate::helpers::*;
use crate::on_both_databases;

/// The service process; killed when dropped.
struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sha256_hex(text: &str) -> String {
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// A TLS channel to the service at `port`, trusting `ca`, once it answers (up to 30 s).
async fn connect_tls(
    port: u16,
    ca: &TestCa,
    service: &mut Service,
    log: &std::path::Path,
) -> Channel {
    let endpoint = Endpoint::from_shared(format!("https://localhost:{port}"))
        .expect("endpoint")
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca.pem)))
        .expect("client TLS");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Some(status) = service.0.try_wait().expect("poll the service") {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            panic!("the service exited ({status}): {log}");
        }
        if let Ok(channel) = endpoint.connect().await {
            return channel;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the service did not answer in 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

async fn auth_and_tls_come_from_the_environment(db: Db) {
    let dir = tempfile::tempdir().expect("temp dir");
    let database_url = fresh_database(db, dir.path()).await;
    let ca = TestCa::new("environment test CA");
    let (cert, key) = ca.server().write(dir.path(), "server");
    // The file's principal, which the environment replaces.
    let config = dir.path().join("payouts.toml");
    std::fs::write(
        &config,
        format!(
            "[auth]\nrate_limit_per_second = 100\n\n[[auth.principals]]\nname = \"from-file\"\n\
             roles = [\"viewer\"]\ntoken_sha256 = \"{}\"\n",
            sha256_hex("file-token")
        ),
    )
    .expect("write the settings file");
    let principals = format!(
        "[{{name = \"from-environment\", roles = [\"viewer\"], token_sha256 = \"{}\"}}]",
        sha256_hex("environment-token")
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let log = dir.path().join("service.log");
    let mut command = Command::new(env!("CARGO_BIN_EXE_partner-payouts"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PAYOUTS_") {
            command.env_remove(key);
        }
    }
    command
        .arg("serve")
        .env("PAYOUTS_CONFIG", &config)
        .env("PAYOUTS_LISTEN_ADDR", format!("127.0.0.1:{port}"))
        // Run on both databases at once: no admin port each.
        .env("PAYOUTS_ADMIN_LISTEN_ADDR", "")
        .env("PAYOUTS_DATABASE_URL", &database_url)
        .env(
            "PAYOUTS_PII_KEY",
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        )
        .env("PAYOUTS_AUTH__PRINCIPALS", principals)
        .env("PAYOUTS_AUTH__RATE_LIMIT_PER_SECOND", "50")
        .env("PAYOUTS_TLS__CERT_FILE", &cert)
        .env("PAYOUTS_TLS__KEY_FILE", &key)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"));
    let mut service = Service(command.spawn().expect("start the service"));
    let channel = connect_tls(port, &ca, &mut service, &log).await;

    let get_policy = |token: Option<&'static str>| {
        let mut claims = ClaimServiceClient::new(channel.clone());
        async move {
            claims
                .get_policy(authed(token, pb::GetPolicyRequest {}))
                .await
                .map(|_| ())
                .map_err(|status| status.code())
        }
    };
    assert_eq!(get_policy(Some("environment-token")).await, Ok(()));
    assert_eq!(
        get_policy(Some("file-token")).await,
        Err(Code::Unauthenticated)
    );
    assert_eq!(get_policy(None).await, Err(Code::Unauthenticated));
}

on_both_databases!(
    auth_and_tls_come_from_the_environment,
    db = auth_and_tls_come_from_the_environment
);
