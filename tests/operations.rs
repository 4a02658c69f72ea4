//! Operating the service: the built `partner-payouts` binary, its admin HTTP port (`/healthz`,
//! `/readyz`, `/metrics`) read over real HTTP, and the drain on SIGTERM seen through real HTTP
//! and gRPC, on both databases.

#[path = "api/helpers.rs"]
#[allow(dead_code)]
mod helpers;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use helpers::{
    Db, fresh_database, full_weight_item, http_get, partner, request_id, test_policy_toml,
};
use partner_payouts::proto::payouts::v1::{
    self as pb, claim_service_client::ClaimServiceClient,
    disbursement_service_client::DisbursementServiceClient,
    partner_service_client::PartnerServiceClient,
};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const BIN: &str = env!("CARGO_BIN_EXE_partner-payouts");
/// `shutdown_grace_ms` of the drained service: long enough to call it meanwhile.
const GRACE: Duration = Duration::from_millis(1_500);
/// How long a child may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// A child process of the built binary, its log in a file, killed when dropped.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(args: &[&str], env: &[(&str, String)], log: PathBuf) -> Self {
        let mut command = Command::new(BIN);
        // Settings come only from what this test sets.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PAYOUTS_") {
                command.env_remove(key);
            }
        }
        let file = std::fs::File::create(&log).expect("child log");
        let child = command
            .args(args)
            .env_remove("OTEL_RESOURCE_ATTRIBUTES")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {BIN}: {e}"));
        Self { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn sigterm(&self) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // SAFETY: signals our own child, which has not been reaped (it is waited for only
        // after this).
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "SIGTERM to {pid}");
    }

    /// Waits up to `timeout` for the child to exit.
    async fn exit_within(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll child") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running after {timeout:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `serve` replica with its gRPC and admin ports.
struct Replica {
    proc: Proc,
    grpc: SocketAddr,
    admin: SocketAddr,
}

/// What every replica of a test shares: its database, key, policy and bank.
struct Cluster {
    dir: tempfile::TempDir,
    database_url: String,
    bank_url: Option<String>,
}

impl Cluster {
    async fn new(db: Db) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let database_url = fresh_database(db, dir.path()).await;
        std::fs::write(dir.path().join("policy.toml"), test_policy_toml()).expect("policy");
        Self {
            dir,
            database_url,
            bank_url: None,
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// A replica, ready (its `/readyz` answers 200), with `env` added to its settings. Its
    /// ports are picked free; should another process take one before the replica binds it, the
    /// replica is started again on others.
    async fn replica(&self, name: &str, env: &[(&str, String)]) -> Replica {
        const TRIES: usize = 5;
        for attempt in 1..=TRIES {
            let mut replica = self.start_replica(name, env);
            match replica.wait_ready().await {
                Ok(()) => return replica,
                Err(log) if attempt < TRIES && log.contains("Address already in use") => {}
                Err(log) => panic!("{log}"),
            }
        }
        unreachable!("the last try returns or panics")
    }

    fn start_replica(&self, name: &str, env: &[(&str, String)]) -> Replica {
        let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let mut settings = vec![
            ("PAYOUTS_LISTEN_ADDR", grpc.to_string()),
            ("PAYOUTS_ADMIN_LISTEN_ADDR", admin.to_string()),
            ("PAYOUTS_DATABASE_URL", self.database_url.clone()),
            ("PAYOUTS_POLICY_FILE", self.path("policy.toml")),
            ("PAYOUTS_PII_KEY_FILE", self.path("pii.key")),
            ("PAYOUTS_DISPATCH_POLL_MS", "20".to_owned()),
            ("PAYOUTS_SHUTDOWN_GRACE_MS", GRACE.as_millis().to_string()),
        ];
        if let Some(bank) = &self.bank_url {
            settings.push(("PAYOUTS_PAYMENTS_BACKEND_URL", bank.clone()));
        }
        settings.extend(env.iter().cloned());
        let log = self.dir.path().join(format!("{name}.log"));
        Replica {
            proc: Proc::spawn(&["serve"], &settings, log),
            grpc,
            admin,
        }
    }

    /// A sandbox bank of its own, answering every call after `latency_ms`.
    fn bank(&mut self, latency_ms: u64) -> Proc {
        let addr = format!("127.0.0.1:{}", free_port());
        self.bank_url = Some(format!("http://{addr}"));
        let latency = latency_ms.to_string();
        let args = ["sandbox-bank", "--listen", &addr, "--latency-ms", &latency];
        Proc::spawn(&args, &[], self.dir.path().join("bank.log"))
    }
}

impl Replica {
    /// Waits until `/readyz` answers 200; `Err` with the log if the process exited first.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.proc.child.try_wait().expect("poll child") {
                return Err(format!(
                    "exited during start-up: {status}; log:\n{}",
                    self.proc.log()
                ));
            }
            if http_get(self.admin, "/readyz")
                .await
                .is_ok_and(|(code, _)| code == 200)
            {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "not ready within {READY_TIMEOUT:?}; log:\n{}",
                self.proc.log()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.grpc))
            .expect("endpoint")
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect to the replica")
    }
}

async fn get_ok(addr: SocketAddr, path: &str) -> (u16, String) {
    http_get(addr, path)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

async fn health(channel: &Channel, service: &str) -> i32 {
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status
}

async fn register(channel: &Channel, seed: u64) -> Result<pb::Partner, tonic::Status> {
    let response = PartnerServiceClient::new(channel.clone())
        .register_partner(pb::RegisterPartnerRequest {
            request_id: request_id(),
            partner: Some(partner(seed)),
        })
        .await?;
    Ok(response.into_inner().partner.expect("partner"))
}

// ---------------------------------------------------------------------------------------------

/// `/metrics` parsed as the Prometheus text format.
async fn scrape(admin: SocketAddr) -> (prometheus_parse::Scrape, String) {
    let (code, text) = get_ok(admin, "/metrics").await;
    assert_eq!(code, 200, "{text}");
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("the Prometheus text format");
    (scrape, text)
}

/// The process's `service.instance.id`, as `/metrics` names its resource.
fn instance_id(scrape: &prometheus_parse::Scrape) -> Option<String> {
    let target = scrape.samples.iter().find(|s| s.metric == "target_info")?;
    target.labels.get("service_instance_id").map(str::to_owned)
}

/// `/metrics`, parsed by a Prometheus text parser, has `rpc.server.call.duration` of the
/// calls made, by service, bare method name and status code, the outbox and disbursement
/// gauges, and the resource's `service.instance.id` as `OTEL_RESOURCE_ATTRIBUTES` set it.
async fn metrics_are_the_prometheus_text_of_the_calls(db: Db) {
    let cluster = Cluster::new(db).await;
    let named = "service.instance.id=replica-7".to_owned();
    let replica = cluster
        .replica("replica", &[("OTEL_RESOURCE_ATTRIBUTES", named)])
        .await;
    let channel = replica.channel().await;
    register(&channel, 1).await.expect("registered");
    let mut bad = partner(2);
    bad.business_registration_number = "123".into();
    let refused = PartnerServiceClient::new(channel.clone())
        .register_partner(pb::RegisterPartnerRequest {
            request_id: request_id(),
            partner: Some(bad),
        })
        .await
        .expect_err("a bad registration number");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    // The gauges are refreshed by the dispatcher (at its start, then every 10 s): wait for
    // its first refresh.
    let gauges = [
        "payouts_outbox_depth",
        "payouts_outbox_oldest_due_age_seconds",
        "payouts_disbursements",
    ];
    let has_gauges = |scrape: &prometheus_parse::Scrape| {
        gauges.iter().all(|gauge| {
            scrape
                .samples
                .iter()
                .any(|s| s.metric == *gauge && matches!(s.value, prometheus_parse::Value::Gauge(_)))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let (scrape, text) = loop {
        let (scrape, text) = scrape(replica.admin).await;
        if has_gauges(&scrape) || Instant::now() > deadline {
            break (scrape, text);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(instance_id(&scrape).as_deref(), Some("replica-7"), "{text}");
    let calls = |status: &str| -> f64 {
        let labels = [
            ("rpc_system", "grpc"),
            ("rpc_service", "payouts.v1.PartnerService"),
            ("rpc_method", "RegisterPartner"),
            ("rpc_grpc_status_code", status),
        ];
        let buckets = histogram(&scrape, "rpc_server_call_duration_seconds", &labels);
        buckets.get("+Inf").copied().unwrap_or(0.0)
    };
    assert_eq!(calls("0"), 1.0, "the registration:\n{text}");
    assert_eq!(calls("3"), 1.0, "the refused registration:\n{text}");
    // The accepted registration was written by one group-commit batch of one row; the refused
    // one never reached a batch.
    let batch = [("rpc_method", "RegisterPartner")];
    let batch_rows = histogram(&scrape, "payouts_group_commit_rows", &batch);
    assert_eq!(
        batch_rows.get("1"),
        Some(&1.0),
        "one batch of 1 row:\n{text}"
    );
    assert_eq!(batch_rows.get("+Inf"), Some(&1.0), "one batch:\n{text}");
    for seconds in [
        "payouts_group_commit_wait_seconds",
        "payouts_group_commit_duration_seconds",
    ] {
        let batches = histogram(&scrape, seconds, &batch);
        assert_eq!(
            batches.get("+Inf"),
            Some(&1.0),
            "{seconds} of one batch:\n{text}"
        );
    }
    for gauge in gauges {
        assert!(
            scrape
                .samples
                .iter()
                .any(|s| s.metric == gauge && matches!(s.value, prometheus_parse::Value::Gauge(_))),
            "{gauge} in:\n{text}"
        );
    }
    let (code, body) = get_ok(replica.admin, "/healthz").await;
    assert_eq!((code, body.as_str()), (200, "ok\n"));
}

/// The cumulative bucket counts of the histogram `metric` over its samples that have every
/// label of `labels`, by upper bound as the text gives it (`1`, `+Inf`).
fn histogram(
    scrape: &prometheus_parse::Scrape,
    metric: &str,
    labels: &[(&str, &str)],
) -> std::collections::BTreeMap<String, f64> {
    let mut counts = std::collections::BTreeMap::new();
    let samples = scrape.samples.iter().filter(|s| {
        s.metric == metric
            && labels
                .iter()
                .all(|(name, value)| s.labels.get(name) == Some(*value))
    });
    for sample in samples {
        let prometheus_parse::Value::Histogram(buckets) = &sample.value else {
            panic!("{metric} is not a histogram: {:?}", sample.value);
        };
        for bucket in buckets {
            let bound = if bucket.less_than.is_infinite() {
                "+Inf".to_owned()
            } else {
                bucket.less_than.to_string()
            };
            *counts.entry(bound).or_insert(0.0) += bucket.count;
        }
    }
    counts
}

on_both_databases!(
    metrics_are_served,
    db = metrics_are_the_prometheus_text_of_the_calls
);

/// SIGTERM: `/readyz` and gRPC health turn not-serving at once, calls are answered through
/// the grace (on open connections and new ones), then the process exits 0.
async fn a_drain_stops_readiness_first_and_answers_through_the_grace(db: Db) {
    let cluster = Cluster::new(db).await;
    let mut replica = cluster.replica("replica", &[]).await;
    let channel = replica.channel().await;
    register(&channel, 1).await.expect("registered");
    assert_eq!(health(&channel, "").await, ServingStatus::Serving as i32);
    // Without OTEL_RESOURCE_ATTRIBUTES, the process names itself.
    let (scrape, text) = scrape(replica.admin).await;
    let instance = instance_id(&scrape).unwrap_or_else(|| panic!("no instance id:\n{text}"));
    uuid::Uuid::parse_str(&instance).expect("a UUID");

    replica.proc.sigterm();
    let signalled = Instant::now();
    loop {
        let (code, body) = get_ok(replica.admin, "/readyz").await;
        if code == 503 {
            assert_eq!(body, "draining\n");
            break;
        }
        assert_eq!(code, 200, "{body}");
        assert!(
            signalled.elapsed() < Duration::from_millis(500),
            "/readyz still 200 {:?} after SIGTERM",
            signalled.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for service in ["", "payouts.v1.PartnerService", "payouts.v1.ClaimService"] {
        while health(&channel, service).await != ServingStatus::NotServing as i32 {
            assert!(
                signalled.elapsed() < Duration::from_millis(500),
                "health of {service:?} still SERVING {:?} after SIGTERM",
                signalled.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // Still answered: on the open connection, and on a new one.
    register(&channel, 2)
        .await
        .expect("answered during the grace");
    let fresh = replica.channel().await;
    register(&fresh, 3)
        .await
        .expect("a new connection during the grace");
    assert_eq!(get_ok(replica.admin, "/healthz").await.0, 200);
    assert!(
        signalled.elapsed() < GRACE,
        "the checks took past the grace ({:?}): the test proves nothing",
        signalled.elapsed()
    );

    let status = replica
        .proc
        .exit_within(GRACE + Duration::from_secs(20))
        .await;
    let exited_after = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "log:\n{}", replica.proc.log());
    assert!(
        exited_after >= GRACE,
        "exited {exited_after:?} after SIGTERM, before the grace was over"
    );
}

on_both_databases!(
    drain,
    db = a_drain_stops_readiness_first_and_answers_through_the_grace
);

/// The rows' lease times in the outbox.
async fn outbox_leases(db: Db, url: &str) -> Vec<i64> {
    use sqlx::Connection as _;
    let query = "SELECT lease_until FROM outbox";
    match db {
        Db::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(url).await.expect("SQLite");
            sqlx::query_scalar(query).fetch_all(&mut conn).await
        }
        Db::Postgres => {
            let mut conn = sqlx::PgConnection::connect(url).await.expect("PostgreSQL");
            sqlx::query_scalar(query).fetch_all(&mut conn).await
        }
    }
    .expect("outbox leases")
}

/// A replica stopped while its dispatcher holds a payout (the bank slow to answer) hands the
/// lease back as it exits: another replica pays it at once, long before the lease would lapse,
/// and the bank applied one instruction.
async fn a_stopped_dispatcher_hands_back_its_leases(db: Db) {
    const LEASE: Duration = Duration::from_secs(60);
    let mut cluster = Cluster::new(db).await;
    let _bank = cluster.bank(3_000);
    let env = [
        ("PAYOUTS_DISPATCH_LEASE_MS", LEASE.as_millis().to_string()),
        ("PAYOUTS_PAYMENTS_TIMEOUT_MS", "10000".to_owned()),
        ("PAYOUTS_SHUTDOWN_GRACE_MS", "200".to_owned()),
    ];
    let mut first = cluster.replica("first", &env).await;
    let channel = first.channel().await;
    let partner = register(&channel, 1).await.expect("registered");
    let claim = ClaimServiceClient::new(channel.clone())
        .submit_claim(pb::SubmitClaimRequest {
            request_id: request_id(),
            partner_id: partner.partner_id,
            items: vec![full_weight_item(100)],
            evidence: vec![],
        })
        .await
        .expect("claim")
        .into_inner()
        .claim
        .expect("claim");
    assert_eq!(claim.status, pb::ClaimStatus::Approved as i32);

    // The first replica takes the payout and waits for the bank.
    let leased = Instant::now();
    loop {
        let leases = outbox_leases(db, &cluster.database_url).await;
        if leases
            .iter()
            .any(|&l| l > partner_payouts::store::now_micros())
        {
            break;
        }
        assert!(leased.elapsed() < Duration::from_secs(10), "{leases:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.proc.sigterm();
    let status = first.proc.exit_within(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", first.proc.log());
    assert!(
        first.proc.log().contains("leases handed back"),
        "log:\n{}",
        first.proc.log()
    );
    assert_eq!(
        outbox_leases(db, &cluster.database_url).await,
        [0],
        "the payout is due again, leased by no one"
    );

    let second = cluster.replica("second", &[]).await;
    let channel = second.channel().await;
    let taken = Instant::now();
    let disbursement_id = claim.disbursement_id;
    loop {
        let disbursement = DisbursementServiceClient::new(channel.clone())
            .get_disbursement(pb::GetDisbursementRequest {
                disbursement_id: disbursement_id.clone(),
            })
            .await
            .expect("disbursement")
            .into_inner()
            .disbursement
            .expect("disbursement");
        if disbursement.status == pb::DisbursementStatus::Paid as i32 {
            break;
        }
        assert!(
            taken.elapsed() < LEASE / 3,
            "not paid {:?} after the second replica started: {disbursement:?}",
            taken.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bank = cluster.bank_url.clone().expect("bank");
    assert_eq!(
        helpers::applied(&bank).await.len(),
        1,
        "one instruction applied"
    );
}

on_both_databases!(
    dispatch_leases_are_handed_back,
    db = a_stopped_dispatcher_hands_back_its_leases
);
