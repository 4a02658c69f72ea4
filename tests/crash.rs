//! Crash tests: the built `partner-payouts` binary pays 1,000 approved claims through a sandbox
//! bank running as its own process, while the service is SIGKILLed at random moments and
//! restarted. Afterwards every disbursement is `PAID` and the bank applied exactly one
//! instruction per disbursement, for the same KRW total.
//!
//! Three scenarios: SQLite with a well-behaved bank; SQLite with the bank's fault injection
//! on; three replicas sharing one PostgreSQL, one of them killed and restarted while the
//! other two keep running.
//!
//! The kill moments come from a seeded generator; set `CRASH_SEED` to replay a run. A failing
//! run prints the tail of every child's log and keeps its temporary directory.

use std::collections::{HashMap, HashSet};
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use partner_payouts::proto::payments::v1::{
    self as bank, sandbox_ledger_client::SandboxLedgerClient,
};
use partner_payouts::proto::payouts::v1::{
    self as pb, claim_service_client::ClaimServiceClient,
    disbursement_service_client::DisbursementServiceClient,
    partner_service_client::PartnerServiceClient,
};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const BIN: &str = env!("CARGO_BIN_EXE_partner-payouts");

/// Approved claims to pay in each scenario.
const CLAIMS: u64 = 1_000;
/// A recognised loss of 100 KRW is in the first tier: 30,000 KRW each.
const LOSS_KRW: i64 = 100;
const COMPENSATION_KRW: i64 = 30_000;
const TOTAL_KRW: i64 = COMPENSATION_KRW * CLAIMS as i64;
/// Registrations and submissions in flight while seeding.
const SEED_CONCURRENCY: usize = 32;
/// SIGKILLs per scenario, each 50-400 ms after the previous (re)start.
const KILLS: usize = 6;
/// How long a child may take to answer its health check.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the last kill may take to heal. A killed replica's leased outbox rows are only
/// taken again once their lease (set short by each scenario) has lapsed.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(150);
/// Responses carry up to 1,000 disbursements with their attempts and history.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Shared with the black-box suite.

#[path = "api/helpers.rs"]
#[allow(dead_code)]
mod helpers;

use helpers::{
    Db, fresh_database, full_weight_item, partner_with_account, postgres_admin_url, request_id,
    test_policy_toml,
};

/// Drops a PostgreSQL database made by [`fresh_database`]; best effort.
async fn drop_postgres_database(url: &str) {
    use sqlx::Connection as _;
    let Some((_, name)) = url.rsplit_once('/') else {
        return;
    };
    if let Ok(mut conn) = sqlx::PgConnection::connect(&postgres_admin_url()).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut conn)
        .await;
    }
}

// ---------------------------------------------------------------------------------------------
// Child processes.

/// A port that was free a moment ago. Another process may take it before the child binds it;
/// [`Proc::start`] notices (the child exits) and tries another.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sandbox,
    Service,
}

/// One child process of the built binary, restartable on the same port, SIGKILLed on drop.
struct Proc {
    name: String,
    kind: Kind,
    /// Flags after the subcommand.
    args: Vec<String>,
    /// `PAYOUTS_*` settings (the listen address is added from `port`).
    env: Vec<(String, String)>,
    log: PathBuf,
    port: u16,
    child: Option<Child>,
    starts: u32,
    channel: Option<Channel>,
}

impl Proc {
    fn new(name: &str, kind: Kind, dir: &Path) -> Self {
        Self {
            name: name.to_owned(),
            kind,
            args: Vec::new(),
            env: Vec::new(),
            log: dir.join(format!("{name}.log")),
            port: free_port(),
            child: None,
            starts: 0,
            channel: None,
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// Starts the child without waiting for it.
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open child log");
        writeln!(
            log,
            "===== {} start #{} on {} =====",
            self.name,
            self.starts,
            self.addr()
        )
        .expect("write child log");
        let mut command = Command::new(BIN);
        // Settings come only from what this test sets.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PAYOUTS_") {
                command.env_remove(key);
            }
        }
        match self.kind {
            Kind::Sandbox => {
                command.arg("sandbox-bank").arg("--listen").arg(self.addr());
            }
            Kind::Service => {
                command
                    .arg("serve")
                    .env("PAYOUTS_LISTEN_ADDR", self.addr())
                    // Replicas side by side: no admin port each.
                    .env("PAYOUTS_ADMIN_LISTEN_ADDR", "");
            }
        }
        command
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} ({BIN}): {e}", self.name));
        self.child = Some(child);
        self.channel = None;
    }

    /// The child's exit status, if it has exited.
    fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().expect("poll child"))
    }

    /// SIGKILL (what `Child::kill` sends on unix) and reap.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.channel = None;
    }

    /// Waits until the child answers its health check; `Err` if it exited first.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let service = match self.kind {
            Kind::Sandbox => "payments.v1.SandboxLedger",
            Kind::Service => "payouts.v1.DisbursementService",
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.exited() {
                self.child = None;
                return Err(format!("{} exited during start-up: {status}", self.name));
            }
            assert!(
                Instant::now() < deadline,
                "{} did not become ready within {READY_TIMEOUT:?}; see {}",
                self.name,
                self.log.display()
            );
            if let Ok(channel) = connect(&self.url(), Duration::from_millis(250)).await {
                let healthy = HealthClient::new(channel.clone())
                    .check(HealthCheckRequest {
                        service: service.into(),
                    })
                    .await
                    .is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32);
                // Whoever answered, it must be our child that still runs (another process
                // may hold the port we picked).
                if healthy && self.exited().is_none() {
                    self.channel = Some(channel);
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Starts the child and waits for it; on the same port if it can, else on a new one.
    async fn start(&mut self) {
        for _ in 0..5 {
            self.spawn();
            match self.wait_ready().await {
                Ok(()) => return,
                Err(why) => {
                    eprintln!("[{}] {why}; retrying on another port", self.name);
                    self.port = free_port();
                }
            }
        }
        panic!(
            "{} failed to start 5 times; see {}",
            self.name,
            self.log.display()
        );
    }

    fn channel(&self) -> Channel {
        self.channel
            .clone()
            .unwrap_or_else(|| panic!("{} is not running", self.name))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn connect(url: &str, timeout: Duration) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(url.to_owned())
        .expect("endpoint")
        .connect_timeout(timeout)
        .timeout(Duration::from_secs(30))
        .connect()
        .await
}

fn partners(ch: &Channel) -> PartnerServiceClient<Channel> {
    PartnerServiceClient::new(ch.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES)
}

fn claims(ch: &Channel) -> ClaimServiceClient<Channel> {
    ClaimServiceClient::new(ch.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES)
}

fn disbursements(ch: &Channel) -> DisbursementServiceClient<Channel> {
    DisbursementServiceClient::new(ch.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES)
}

async fn summary(ch: &Channel) -> Result<pb::GetProgramSummaryResponse, tonic::Status> {
    disbursements(ch)
        .get_program_summary(pb::GetProgramSummaryRequest {})
        .await
        .map(tonic::Response::into_inner)
}

// ---------------------------------------------------------------------------------------------
// Scenarios.

struct Scenario {
    label: &'static str,
    db: Db,
    /// Service replicas; replica 0 is the one killed.
    replicas: usize,
    sandbox_args: &'static [&'static str],
    service_env: &'static [(&'static str, &'static str)],
}

/// The children of one scenario and their directory. On a panic it prints each child's log
/// tail and keeps the directory.
struct Cluster {
    label: &'static str,
    dir: Option<tempfile::TempDir>,
    sandbox: Proc,
    services: Vec<Proc>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for service in &mut self.services {
            service.kill();
        }
        self.sandbox.kill();
        if std::thread::panicking() {
            for log in
                std::iter::once(&self.sandbox.log).chain(self.services.iter().map(|s| &s.log))
            {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(40)..];
                eprintln!(
                    "----- [{}] last {} lines of {} -----\n{}",
                    self.label,
                    tail.len(),
                    log.display(),
                    tail.join("\n")
                );
            }
            if let Some(dir) = self.dir.take() {
                eprintln!("[{}] kept {}", self.label, dir.keep().display());
            }
        }
    }
}

fn kill_seed() -> u64 {
    match std::env::var("CRASH_SEED") {
        Ok(s) => s.parse().expect("CRASH_SEED is a u64"),
        Err(_) => rand::rng().random(),
    }
}

/// What the final check saw, for the log.
#[derive(Debug, Default)]
struct Verified {
    /// `SubmitInstruction` calls the bank answered with an applied instruction, over all keys.
    submissions: i64,
    /// Keys submitted more than once (a resend under the same key after a crash or a timeout).
    resubmitted_keys: usize,
    /// Disbursements whose key was looked up (`GET_INSTRUCTION`): an unknown outcome resolved.
    looked_up: usize,
    /// Disbursements whose look-up found nothing, then sent under the stored key: a crash
    /// struck between storing the key and sending.
    not_found_then_sent: usize,
    /// Disbursements with at least one failed backend call recorded.
    with_errors: usize,
    /// Applied instructions that arrived with a W3C `traceparent`.
    with_traceparent: usize,
    attempts: usize,
}

async fn run(scenario: Scenario) {
    let started = Instant::now();
    let label = scenario.label;
    let log = |msg: String| eprintln!("[{label} {:>6.1}s] {msg}", started.elapsed().as_secs_f64());
    let seed = kill_seed();
    log(format!(
        "kill seed {seed} (CRASH_SEED={seed} replays the kill moments)"
    ));

    let dir = tempfile::tempdir().expect("temp dir");
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, test_policy_toml()).expect("write policy");
    let database_url = fresh_database(scenario.db, dir.path()).await;

    let mut sandbox = Proc::new("sandbox", Kind::Sandbox, dir.path());
    sandbox.args = scenario
        .sandbox_args
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    sandbox.start().await;
    let backend_url = sandbox.url();

    let services = (0..scenario.replicas)
        .map(|i| {
            let mut p = Proc::new(&format!("service-{i}"), Kind::Service, dir.path());
            p.env = [
                ("PAYOUTS_DATABASE_URL", database_url.as_str()),
                ("PAYOUTS_PAYMENTS_BACKEND_URL", backend_url.as_str()),
                ("PAYOUTS_POLICY_FILE", policy.to_str().expect("utf-8 path")),
                ("PAYOUTS_DISPATCH_POLL_MS", "20"),
                ("PAYOUTS_DATABASE_MAX_CONNECTIONS", "8"),
                // Short leases so a killed replica's work is taken over within seconds.
                ("PAYOUTS_PAYMENTS_TIMEOUT_MS", "1000"),
                ("PAYOUTS_DISPATCH_LEASE_MS", "3000"),
                // Every replica must open what the others sealed.
                (
                    "PAYOUTS_PII_KEY",
                    "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
                ),
            ]
            .iter()
            .chain(scenario.service_env)
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
            p
        })
        .collect();
    let mut cluster = Cluster {
        label,
        dir: Some(dir),
        sandbox,
        services,
    };

    // All replicas start at once (they migrate the same fresh database concurrently).
    for service in &mut cluster.services {
        service.spawn();
    }
    for service in &mut cluster.services {
        if let Err(why) = service.wait_ready().await {
            panic!("{why}; see {}", service.log.display());
        }
    }
    log(format!(
        "sandbox on {} and {} replica(s) on {} up",
        cluster.sandbox.addr(),
        cluster.services.len(),
        cluster
            .services
            .iter()
            .map(Proc::addr)
            .collect::<Vec<_>>()
            .join(", ")
    ));

    // Hold dispatch back while the claims go in, so that all of them are paid under crashes.
    let first = cluster.services[0].channel();
    let paused = disbursements(&first)
        .pause_dispatch(pb::PauseDispatchRequest {
            request_id: request_id(),
            reason: "crash test: seeding".into(),
        })
        .await
        .expect("pause dispatch")
        .into_inner();
    assert!(paused.state.is_some_and(|s| s.paused), "dispatch paused");

    let channels: Vec<Channel> = cluster.services.iter().map(Proc::channel).collect();
    seed_claims(&channels).await;
    let before = summary(&first).await.expect("summary after seeding");
    assert_eq!(
        (
            before.approved_count,
            before.approved_krw,
            before.queued_count,
            before.paid_count
        ),
        (CLAIMS as i64, TOTAL_KRW, CLAIMS as i64, 0),
        "after seeding with dispatch paused: {before:?}"
    );
    log(format!("{CLAIMS} claims approved, {TOTAL_KRW} KRW queued"));

    disbursements(&first)
        .resume_dispatch(pb::ResumeDispatchRequest {
            request_id: request_id(),
        })
        .await
        .expect("resume dispatch");
    log("dispatch resumed".into());

    // Kill replica 0 at random moments; the others (if any) keep running.
    let mut rng = StdRng::seed_from_u64(seed);
    let observer = cluster.services.len() - 1;
    for k in 1..=KILLS {
        let wait = Duration::from_millis(rng.random_range(50..=400));
        tokio::time::sleep(wait).await;
        let at = summary(&cluster.services[observer].channel()).await.ok();
        cluster.services[0].kill();
        let killed_at = Instant::now();
        if let Some(at) = &at {
            assert!(
                at.in_flight_count > 0,
                "kill #{k} came after dispatch had finished: {at:?}"
            );
        }
        cluster.services[0].start().await;
        log(format!(
            "SIGKILL #{k} of service-0 {}ms after its start, with {}; back in {}ms",
            wait.as_millis(),
            at.map_or("(no summary)".to_owned(), |s| format!(
                "{} paid, {} queued, {} submitted",
                s.paid_count, s.queued_count, s.submitted_count
            )),
            killed_at.elapsed().as_millis()
        ));
    }

    // Let it heal: leases of the killed replica lapse and other replicas (or its successor)
    // take the rows over.
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut last_report = Instant::now();
    let done = loop {
        for service in &mut cluster.services {
            if let Some(status) = service.exited() {
                panic!("{} exited on its own: {status}", service.name);
            }
        }
        if let Ok(s) = summary(&cluster.services[observer].channel()).await {
            assert_eq!(
                (s.failed_count, s.cancelled_count),
                (0, 0),
                "nothing may fail or be cancelled: {s:?}"
            );
            if s.paid_count == CLAIMS as i64 {
                break s;
            }
            if last_report.elapsed() > Duration::from_secs(10) {
                log(format!(
                    "waiting: {} paid, {} queued, {} submitted",
                    s.paid_count, s.queued_count, s.submitted_count
                ));
                last_report = Instant::now();
            }
        }
        if Instant::now() >= deadline {
            let stuck: Vec<pb::Disbursement> =
                list_all_disbursements(&cluster.services[observer].channel())
                    .await
                    .into_iter()
                    .filter(|d| d.status != pb::DisbursementStatus::Paid as i32)
                    .collect();
            for d in stuck.iter().take(5) {
                eprintln!("[{label}] not paid: {d:?}");
            }
            panic!(
                "{} disbursements not paid within {SETTLE_TIMEOUT:?} of the last kill",
                stuck.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    log(format!(
        "all {} paid ({} KRW)",
        done.paid_count, done.paid_krw
    ));

    // Every replica reads the same programme.
    for service in &cluster.services {
        let s = summary(&service.channel()).await.expect("summary");
        assert_eq!(
            (s.paid_count, s.paid_krw, s.in_flight_count),
            (CLAIMS as i64, TOTAL_KRW, 0),
            "{} sees {s:?}",
            service.name
        );
    }

    let all = list_all_disbursements(&cluster.services[observer].channel()).await;
    // Nothing may reach the bank after this point: stop the services before reading its ledger.
    for service in &mut cluster.services {
        service.kill();
    }
    let ledger = SandboxLedgerClient::new(cluster.sandbox.channel())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .list_applied(bank::ListAppliedRequest {})
        .await
        .expect("list applied")
        .into_inner()
        .instructions;
    let verified = verify(&done, &all, &ledger);
    log(format!("verified: {verified:?}"));
    log(format!(
        "service-0 started {} times; scenario took {:.1}s",
        cluster.services[0].starts,
        started.elapsed().as_secs_f64()
    ));

    drop(cluster);
    if scenario.db == Db::Postgres {
        drop_postgres_database(&database_url).await;
    }
}

/// Registers `CLAIMS` partners and submits one claim each (30,000 KRW, approved at once),
/// spreading the calls over `channels`.
async fn seed_claims(channels: &[Channel]) {
    let results: Vec<()> = futures::stream::iter(0..CLAIMS)
        .map(|i| {
            let ch = channels[usize::try_from(i).expect("index") % channels.len()].clone();
            async move {
                // Last 4 digits seed+1: never the sandbox's closed (0000) or foreign (9999) ones.
                let account = format!("110-{:03}-50{:04}", i % 1000, i + 1);
                let partner = partners(&ch)
                    .register_partner(pb::RegisterPartnerRequest {
                        request_id: request_id(),
                        partner: Some(partner_with_account(i, &account)),
                    })
                    .await
                    .unwrap_or_else(|e| panic!("register partner {i}: {e:?}"))
                    .into_inner()
                    .partner
                    .expect("partner in response");
                let claim = claims(&ch)
                    .submit_claim(pb::SubmitClaimRequest {
                        request_id: request_id(),
                        partner_id: partner.partner_id,
                        items: vec![full_weight_item(LOSS_KRW)],
                        evidence: vec![],
                    })
                    .await
                    .unwrap_or_else(|e| panic!("submit claim {i}: {e:?}"))
                    .into_inner()
                    .claim
                    .expect("claim in response");
                assert_eq!(
                    (claim.status, claim.compensation_krw),
                    (pb::ClaimStatus::Approved as i32, COMPENSATION_KRW),
                    "claim {i}: {claim:?}"
                );
            }
        })
        .buffer_unordered(SEED_CONCURRENCY)
        .collect()
        .await;
    assert_eq!(results.len(), usize::try_from(CLAIMS).expect("count"));
}

async fn list_all_disbursements(ch: &Channel) -> Vec<pb::Disbursement> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = disbursements(ch)
            .list_disbursements(pb::ListDisbursementsRequest {
                page_size: 1000,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .expect("list disbursements")
            .into_inner();
        all.extend(page.disbursements);
        if page.next_page_token.is_empty() {
            return all;
        }
        page_token = page.next_page_token;
    }
}

/// Every disbursement `PAID` under exactly one key, and the bank applied exactly those keys,
/// once each, for the same amounts.
fn verify(
    summary: &pb::GetProgramSummaryResponse,
    all: &[pb::Disbursement],
    ledger: &[bank::AppliedInstruction],
) -> Verified {
    assert_eq!(
        (
            summary.approved_count,
            summary.approved_krw,
            summary.paid_count,
            summary.paid_krw,
            summary.in_flight_count,
            summary.failed_count,
            summary.cancelled_count,
        ),
        (CLAIMS as i64, TOTAL_KRW, CLAIMS as i64, TOTAL_KRW, 0, 0, 0),
        "programme summary: {summary:?}"
    );
    assert_eq!(
        all.len(),
        all_count(),
        "ListDisbursements returns every disbursement"
    );

    let mut v = Verified::default();
    let mut by_key: HashMap<&str, &pb::Disbursement> = HashMap::new();
    let mut ids = HashSet::new();
    for d in all {
        assert!(
            ids.insert(&d.disbursement_id),
            "listed twice: {}",
            d.disbursement_id
        );
        assert_eq!(
            (d.status, d.amount_krw),
            (pb::DisbursementStatus::Paid as i32, COMPENSATION_KRW),
            "disbursement {} ({}): {:?}",
            d.disbursement_id,
            d.failure_code,
            d.attempts
        );
        assert!(
            !d.idempotency_key.is_empty(),
            "paid without an instruction key: {d:?}"
        );
        assert!(
            by_key.insert(&d.idempotency_key, d).is_none(),
            "two disbursements share key {}",
            d.idempotency_key
        );
        // Only ever one instruction per disbursement: every key it sent or looked up is its own.
        for a in &d.attempts {
            assert!(
                a.idempotency_key.is_empty() || a.idempotency_key == d.idempotency_key,
                "disbursement {} used a second key {} (its key is {})",
                d.disbursement_id,
                a.idempotency_key,
                d.idempotency_key
            );
        }
        v.attempts += d.attempts.len();
        if d.attempts.iter().any(|a| a.operation == "GET_INSTRUCTION") {
            v.looked_up += 1;
        }
        if d.attempts.iter().any(|a| a.outcome == "NOT_FOUND") {
            v.not_found_then_sent += 1;
        }
        if d.attempts.iter().any(|a| a.outcome == "ERROR") {
            v.with_errors += 1;
        }
    }

    assert_eq!(
        ledger.len(),
        all_count(),
        "the bank applied {} instructions for {} disbursements",
        ledger.len(),
        all.len()
    );
    let mut applied_keys = HashSet::new();
    let mut applied_krw = 0i64;
    for i in ledger {
        assert!(
            applied_keys.insert(&i.idempotency_key),
            "the bank lists key {} twice",
            i.idempotency_key
        );
        let d = by_key.get(i.idempotency_key.as_str()).unwrap_or_else(|| {
            panic!(
                "the bank applied {} under key {}, which no disbursement holds: {i:?}",
                i.amount_krw, i.idempotency_key
            )
        });
        assert_eq!(
            (i.status, i.amount_krw),
            (bank::InstructionStatus::Paid as i32, d.amount_krw),
            "instruction {i:?} for disbursement {}",
            d.disbursement_id
        );
        assert!(
            d.account_number.ends_with(&i.account_last4),
            "instruction {} paid into ****{}, the disbursement's account is {}",
            i.idempotency_key,
            i.account_last4,
            d.account_number
        );
        assert!(i.submissions >= 1, "{i:?}");
        v.submissions += i.submissions;
        if !i.traceparent.is_empty() {
            v.with_traceparent += 1;
        }
        if i.submissions > 1 {
            v.resubmitted_keys += 1;
        }
        applied_krw += i.amount_krw;
    }
    assert_eq!(
        applied_krw, summary.paid_krw,
        "KRW applied by the bank vs paid"
    );
    assert_eq!(applied_krw, TOTAL_KRW);
    v
}

fn all_count() -> usize {
    usize::try_from(CLAIMS).expect("count")
}

/// One service on SQLite, a bank that always answers at once; SIGKILLed and restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_service_killed_at_random_pays_each_claim_once() {
    run(Scenario {
        label: "sqlite",
        db: Db::Sqlite,
        replicas: 1,
        sandbox_args: &[],
        service_env: &[],
    })
    .await;
}

/// The same with the bank refusing 10% of calls and answering 5% of submissions after the
/// service's 500 ms deadline (applied, outcome unknown to the caller).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_service_killed_at_random_with_bank_faults_pays_each_claim_once() {
    run(Scenario {
        label: "sqlite+faults",
        db: Db::Sqlite,
        replicas: 1,
        sandbox_args: &[
            "--unavailable-per-mille",
            "100",
            "--late-reply-per-mille",
            "50",
            "--late-reply-delay-ms",
            "1500",
            "--seed",
            "42",
        ],
        service_env: &[("PAYOUTS_PAYMENTS_TIMEOUT_MS", "500")],
    })
    .await;
}

/// Three replicas on one PostgreSQL database; replica 0 is SIGKILLed and restarted, the other
/// two keep running. The bank settles each payout 5 s after accepting it: three replicas pay
/// 1,000 claims in well under a second otherwise, before the kills are done. Fails (does not
/// skip) without PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_three_replicas_one_killed_at_random_pays_each_claim_once() {
    run(Scenario {
        label: "postgres x3",
        db: Db::Postgres,
        replicas: 3,
        sandbox_args: &["--settle-delay-ms", "5000"],
        service_env: &[],
    })
    .await;
}
