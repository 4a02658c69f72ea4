//! `spawn_app`: the service on port 0 over a fresh database, and clients to call it.

use std::time::Duration;

use partner_payouts::app::Application;
use partner_payouts::config::Settings;
use partner_payouts::domain::BusinessRegistrationNumber;
use partner_payouts::proto::payments::v1::{
    self as bank, sandbox_ledger_client::SandboxLedgerClient,
};
use partner_payouts::proto::payouts::v1::{
    self as pb, claim_service_client::ClaimServiceClient,
    disbursement_service_client::DisbursementServiceClient,
    partner_service_client::PartnerServiceClient,
};
use tonic::transport::Channel;
use tonic_types::StatusExt;

/// The one way to run a test on both databases: as `$name::sqlite` and `$name::postgres`,
/// each on a fresh database.
///
/// - `on_both_databases!(name, |app: TestApp| async move { … })`: on the test service;
/// - `on_both_databases!(name, settings = |s: &mut Settings| …, |app: TestApp| async move { … })`:
///   on the test service with changed settings;
/// - `on_both_databases!(name, db = some_test)`: `some_test(Db)` sets up what it needs itself
///   (several services, a bank of its own, …) on the database it is given.
#[macro_export]
macro_rules! on_both_databases {
    ($name:ident, db = $test:expr $(,)?) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                ($test)($crate::helpers::Db::Sqlite).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                ($test)($crate::helpers::Db::Postgres).await;
            }
        }
    };
    ($name:ident, settings = $tweak:expr, $body:expr $(,)?) => {
        $crate::on_both_databases!(
            $name,
            db = |db| async move {
                let app = $crate::helpers::spawn_app(db, $tweak).await;
                ($body)(app).await;
            }
        );
    };
    ($name:ident, $body:expr $(,)?) => {
        $crate::on_both_databases!($name, settings = |_| {}, $body);
    };
}

/// A channel that leaves deadlines to the server ([`TestApp::partners_leaving_deadlines`]).
pub type Unhurried = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    tonic::body::Body,
>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

pub struct TestApp {
    pub channel: Channel,
    /// Where the service listens.
    pub addr: std::net::SocketAddr,
    /// Where its admin HTTP port listens, when a test turned it on.
    pub admin_addr: Option<std::net::SocketAddr>,
    pub db: Db,
    pub database_url: String,
    pub pii_key_file: std::path::PathBuf,
    _dir: tempfile::TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    pub fn partners(&self) -> PartnerServiceClient<Channel> {
        PartnerServiceClient::new(self.channel.clone())
    }
    pub fn claims(&self) -> ClaimServiceClient<Channel> {
        ClaimServiceClient::new(self.channel.clone())
    }
    pub fn disbursements(&self) -> DisbursementServiceClient<Channel> {
        DisbursementServiceClient::new(self.channel.clone())
    }

    /// A client of the partner service that sends each call's deadline (`grpc-timeout`, set
    /// with [`tonic::Request::set_timeout`]) and leaves it to the service. tonic's own channel
    /// keeps the deadline too and answers `CANCELLED` itself when it passes, so what the
    /// service answered would never be seen.
    pub fn partners_leaving_deadlines(&self) -> PartnerServiceClient<Unhurried> {
        let channel =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .http2_only(true)
                .build_http();
        let origin = format!("http://{}", self.addr).parse().expect("origin");
        PartnerServiceClient::with_origin(channel, origin)
    }

    /// Stops serving at once, without draining, as a replica that dies: the server's task is
    /// aborted (the tasks it started beside the server may run on a little).
    pub fn kill(mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server
                .await
                .expect("server task")
                .expect("server ran cleanly");
        }
    }
}

/// `GET path` over HTTP/1.1 on a connection of its own: the status code and the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no header end: {response:?}")))?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status: {head:?}")))?;
    Ok((code, body.to_owned()))
}

/// The PostgreSQL server tests use; it must be running (CI starts it).
pub fn postgres_admin_url() -> String {
    std::env::var("PAYOUTS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A new, empty PostgreSQL database; panics if the server cannot be reached.
pub async fn fresh_postgres_database() -> String {
    use sqlx::Connection as _;
    let admin = postgres_admin_url();
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| {
            panic!("PostgreSQL is required for these tests and is not reachable at {admin}: {e}")
        });
    let name = format!("payouts_test_{}", uuid::Uuid::now_v7().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create test database");
    let (base, _) = admin.rsplit_once('/').expect("URL has a database");
    format!("{base}/{name}")
}

/// A new, empty database of kind `db`: a file in `dir` for SQLite, a database of its own on
/// the test server for PostgreSQL.
pub async fn fresh_database(db: Db, dir: &std::path::Path) -> String {
    match db {
        Db::Sqlite => format!("sqlite://{}", dir.join("payouts.db").display()),
        Db::Postgres => fresh_postgres_database().await,
    }
}

/// The service on 127.0.0.1:0 with a fresh database; `tweak` may change the settings.
pub async fn spawn_app(db: Db, tweak: impl FnOnce(&mut Settings)) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let database_url = fresh_database(db, dir.path()).await;
    spawn_app_in(db, dir, database_url, tweak).await
}

/// The service on 127.0.0.1:0 over `database_url` (of kind `db`), its files in `dir`;
/// `tweak` may change the settings (the app's `database_url` stays the one given, for the
/// test to reach the database directly). On PostgreSQL the service serves as [`APP_ROLE`],
/// as production replicas do, unless `tweak` leaves migrating to the service.
pub async fn spawn_app_in(
    db: Db,
    dir: tempfile::TempDir,
    database_url: String,
    tweak: impl FnOnce(&mut Settings),
) -> TestApp {
    let mut settings = Settings {
        listen_addr: "127.0.0.1:0".parse().expect("addr"),
        // Tests of the admin port and the drain run the binary (tests/operations.rs).
        admin_listen_addr: None,
        shutdown_grace_ms: 0,
        database_url: database_url.clone(),
        database_max_connections: 5,
        policy_file: Some(write_test_policy(dir.path())),
        pii_key_file: dir.path().join("pii.key"),
        dispatch_poll_ms: 20,
        ..Settings::default()
    };
    tweak(&mut settings);
    if db == Db::Postgres && settings.migrate {
        serve_as_app_role(&mut settings).await;
    }
    let pii_key_file = settings.pii_key_file.clone();
    let application = Application::build(settings).await.expect("app builds");
    let addr = application.local_addr();
    let admin_addr = application.admin_addr();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(application.run_until(async {
        let _ = rx.await;
    }));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to the service");
    TestApp {
        channel,
        addr,
        admin_addr,
        db,
        database_url,
        pii_key_file,
        _dir: dir,
        shutdown: Some(tx),
        server: Some(server),
    }
}

/// The role the service serves as in the PostgreSQL half of the tests: what
/// `partner-payouts migrate --app-role` grants it, and nothing more, is all it may do.
pub const APP_ROLE: &str = "payouts_test_app";

/// Migrates the database of `settings.database_url` as its owner, granting [`APP_ROLE`] what
/// `serve` needs, and has the service connect as that role, checking the schema rather than
/// migrating it.
async fn serve_as_app_role(settings: &mut Settings) {
    static ROLE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    ROLE.get_or_init(|| create_role(APP_ROLE)).await;
    partner_payouts::app::migrate(settings, Some(APP_ROLE))
        .await
        .expect("migrate, granting the app role");
    settings.database_url = as_role(&settings.database_url, APP_ROLE);
    settings.migrate = false;
}

/// Creates the login role `role` on the test server, its password its name (the URLs of
/// [`as_role`] carry it), unless it exists.
pub async fn create_role(role: &str) {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(&postgres_admin_url())
        .await
        .expect("connect to the test server");
    let create = format!("CREATE ROLE {role} LOGIN PASSWORD '{role}'");
    match sqlx::query(sqlx::AssertSqlSafe(create))
        .execute(&mut conn)
        .await
    {
        Ok(_) => {}
        // It exists: made by an earlier run, or by another test meanwhile.
        Err(sqlx::Error::Database(e)) if matches!(e.code().as_deref(), Some("42710" | "23505")) => {
        }
        Err(e) => panic!("create role {role}: {e}"),
    }
}

/// A PostgreSQL URL with `role` (its password its name) as the user.
pub fn as_role(url: &str, role: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let host = rest.split_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{role}:{role}@{host}")
}

/// A second service over an existing database (as after a restart).
pub async fn spawn_app_on(db: Db, database_url: &str, pii_key_file: &std::path::Path) -> TestApp {
    let url = database_url.to_owned();
    let key = pii_key_file.to_owned();
    let mut app = spawn_app(db, |s| {
        s.database_url = url;
        s.pii_key_file = key;
    })
    .await;
    app.database_url = database_url.to_owned();
    app
}

/// The shipped policy, except that `other` counts its loss in full (every factor 100%), so a
/// test can put a recognised loss exactly where it wants it.
pub fn test_policy_toml() -> String {
    let shipped = partner_payouts::domain::DEFAULT_POLICY_TOML;
    let start = shipped
        .find("[services.other]")
        .expect("shipped policy has other");
    format!(
        "{}[services.other]\noperating_margin_bps = 10000\nkakao_share_bps = 10000\nalternative_available = false\nalternative_factor_bps = 10000\n",
        &shipped[..start]
    )
}

fn write_test_policy(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("policy.toml");
    std::fs::write(&path, test_policy_toml()).expect("write policy");
    path
}

pub fn request_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Valid registration numbers: nine digits from `seed`, and the right check digit.
pub fn brn(seed: u64) -> String {
    BusinessRegistrationNumber::from_serial(seed)
        .as_str()
        .to_owned()
}

pub const ACCOUNT: &str = "110-123-456789";

pub fn partner(seed: u64) -> pb::Partner {
    partner_with_account(seed, ACCOUNT)
}

pub fn partner_with_account(seed: u64, account_number: &str) -> pb::Partner {
    pb::Partner {
        business_registration_number: brn(seed),
        legal_name: format!("Haneul Bakery {seed}"),
        representative_name: "Kim Minji".into(),
        affected_services: vec![pb::AffectedService::KakaotalkChannel as i32],
        bank_account: Some(pb::BankAccount {
            bank_code: "004".into(),
            account_number: account_number.into(),
            holder_name: "Kim Minji".into(),
        }),
        contact_email: "owner@haneul.example".into(),
        ..Default::default()
    }
}

pub async fn register(app: &TestApp, partner: pb::Partner) -> pb::Partner {
    app.partners()
        .register_partner(pb::RegisterPartnerRequest {
            request_id: request_id(),
            partner: Some(partner),
        })
        .await
        .expect("register partner")
        .into_inner()
        .partner
        .expect("partner in response")
}

/// One loss item of the test policy's full-weight service: recognised loss = `loss_krw`.
pub fn full_weight_item(loss_krw: i64) -> pb::LossItem {
    pb::LossItem {
        service: pb::AffectedService::Other as i32,
        baseline_week_sales_krw: loss_krw + 1_000_000,
        outage_week_sales_krw: 1_000_000,
    }
}

pub async fn submit(app: &TestApp, partner_id: &str, items: Vec<pb::LossItem>) -> pb::Claim {
    app.claims()
        .submit_claim(pb::SubmitClaimRequest {
            request_id: request_id(),
            partner_id: partner_id.into(),
            items,
            evidence: vec![],
        })
        .await
        .expect("submit claim")
        .into_inner()
        .claim
        .expect("claim in response")
}

/// The fields a `BadRequest` names.
pub fn bad_fields(status: &tonic::Status) -> Vec<String> {
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    status
        .get_details_bad_request()
        .expect("BadRequest details")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}

/// The `ErrorInfo` reason of a status, checking its domain.
pub fn reason(status: &tonic::Status) -> String {
    let info = status.get_details_error_info().expect("ErrorInfo details");
    assert_eq!(info.domain, "payouts");
    info.reason
}

/// Polls `check` until it returns Some, for up to `secs` seconds.
pub async fn eventually<T, F, Fut>(secs: u64, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached in {secs}s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn get_claim(app: &TestApp, claim_id: &str) -> pb::Claim {
    app.claims()
        .get_claim(pb::GetClaimRequest {
            claim_id: claim_id.into(),
        })
        .await
        .expect("get claim")
        .into_inner()
        .claim
        .expect("claim in response")
}

pub async fn get(app: &TestApp, disbursement_id: &str) -> pb::Disbursement {
    app.disbursements()
        .get_disbursement(pb::GetDisbursementRequest {
            disbursement_id: disbursement_id.into(),
        })
        .await
        .expect("get disbursement")
        .into_inner()
        .disbursement
        .expect("disbursement in response")
}

/// Polls until the disbursement is in `status` (for up to 10 s).
pub async fn wait_for(
    app: &TestApp,
    disbursement_id: &str,
    status: pb::DisbursementStatus,
) -> pb::Disbursement {
    eventually(10, || async {
        let d = get(app, disbursement_id).await;
        (d.status() == status).then_some(d)
    })
    .await
}

/// Registers a partner with `account_number` and files an approved claim (recognised loss
/// `loss_krw`); returns the claim.
pub async fn approved_claim(
    app: &TestApp,
    seed: u64,
    account_number: &str,
    loss_krw: i64,
) -> pb::Claim {
    let partner = register(app, partner_with_account(seed, account_number)).await;
    let claim = submit(app, &partner.partner_id, vec![full_weight_item(loss_krw)]).await;
    assert_eq!(claim.status(), pb::ClaimStatus::Approved, "{claim:?}");
    assert!(!claim.disbursement_id.is_empty(), "{claim:?}");
    claim
}

/// A sales ledger offered as proof, as a reviewer needs one to approve a claim.
pub fn sales_ledger() -> pb::Evidence {
    pb::Evidence {
        kind: pb::EvidenceKind::SalesLossProof as i32,
        uri: "s3://payouts-evidence/claims/sales-ledger.pdf".into(),
        sha256: "ab".repeat(32),
        attach_time: None,
    }
}

/// Pauses or resumes dispatch, e.g. to queue payouts that then go out together.
pub async fn set_paused(app: &TestApp, paused: bool) {
    let mut client = app.disbursements();
    if paused {
        let request = pb::PauseDispatchRequest {
            request_id: request_id(),
            reason: "queueing payouts".into(),
        };
        client.pause_dispatch(request).await.expect("pause");
    } else {
        let request = pb::ResumeDispatchRequest {
            request_id: request_id(),
        };
        client.resume_dispatch(request).await.expect("resume");
    }
}

pub async fn summary(app: &TestApp) -> pb::GetProgramSummaryResponse {
    app.disbursements()
        .get_program_summary(pb::GetProgramSummaryRequest {})
        .await
        .expect("summary")
        .into_inner()
}

/// The sandbox bank at `bank_url`'s ledger.
pub async fn bank_ledger(bank_url: &str) -> SandboxLedgerClient<Channel> {
    SandboxLedgerClient::connect(bank_url.to_owned())
        .await
        .expect("bank ledger")
        .max_decoding_message_size(64 * 1024 * 1024)
}

/// What the sandbox bank at `bank_url` applied.
pub async fn applied(bank_url: &str) -> Vec<bank::AppliedInstruction> {
    bank_ledger(bank_url)
        .await
        .list_applied(bank::ListAppliedRequest {})
        .await
        .expect("list applied")
        .into_inner()
        .instructions
}
