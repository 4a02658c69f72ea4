//! The load generator: drives the service through real gRPC calls and reports throughput,
//! latency percentiles (HDR histogram) and errors by status code.
//!
//! ```text
//! cargo bench --bench load -- SCENARIO [--count N] [--concurrency C | --rate PER_S]
//!                                     [--streams S] [--connections K] [--database-url URL]
//!                                     [--target http://HOST:PORT | --in-process]
//!                                     [--bank-rate N] [--bank-latency-ms MS]
//!                                     [--outage-after-ms A] [--outage-ms B]
//!                                     [--pause-payouts] [--hold-ms MS]
//! ```
//! Scenarios: `register` (unary RegisterPartner), `claims` (unary SubmitClaim, partners
//! registered first), `import` (N partners through one ImportPartners stream), `e2e` (N partners
//! and N claims through ImportPartners and ImportClaims, until every payout is PAID at the
//! sandbox, then checks the sandbox applied exactly one instruction each), `floor`
//! (RegisterPartner answered by a bare tonic server: the transport's own cost, `load/floor.rs`;
//! `--hold-ms MS` answers the calls held every MS ms together, as group commit does).
//! `--streams S` (default 1) splits the rows of an import over S streams sent at once, as a
//! payments team loading one file from several workers would. Calls go over `--connections K`
//! channels, each its own HTTP/2 connection (default 8), taking them in turn, as K client
//! processes would.
//!
//! Closed loop (`--concurrency`, default 64): C callers, each sending as soon as its last call
//! returned. Open loop (`--rate`): calls start on a fixed schedule whatever the service does,
//! and each latency is measured from its scheduled start, which corrects for coordinated
//! omission. Without `--target` the generator starts the service as its clients meet it: the
//! `partner-payouts` binary of the same build, `serve` in a process of its own, paying into
//! `partner-payouts sandbox-bank` (settling at once) in a third; `--in-process` runs both in
//! this process instead. The database is `--database-url` (default: a fresh PostgreSQL
//! database on PAYOUTS_TEST_POSTGRES_URL's server; `sqlite` for a temporary SQLite file).
//! Each measured phase ends with the CPU each side spent per call: the service, PostgreSQL
//! (every `postgres` process), the generator, the bank, the rest, and the idle time of all
//! cores; and with the write-ahead log the PostgreSQL server wrote per call, which does not
//! depend on the machine's speed.
//!
//! The `e2e` run has a watcher of the change feed attached from the start (`load/feed.rs`): it
//! reports the events per second one watcher receives and each event's lag from its change;
//! `--watchers N` adds N more watchers (one reader of the database serves them all).
//!
//! `claims --pause-payouts` pauses the dispatcher (PauseDispatch) while the claims are filed,
//! so the figure is SubmitClaim's own, without the payouts each approved claim starts; they are
//! resumed after the measured phase.
//!
//! `throttled-bank` and `outage` pay N claims into a bank that throttles or goes down for a
//! while (see `load/bank.rs`); they run the service in process.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use hdrhistogram::Histogram;
use partner_payouts::app::Application;
use partner_payouts::config::Settings;
use partner_payouts::domain::BusinessRegistrationNumber;
use partner_payouts::proto::payments::v1::{
    ListAppliedRequest, sandbox_ledger_client::SandboxLedgerClient,
};
use partner_payouts::proto::payouts::v1::{
    self as pb, claim_service_client::ClaimServiceClient,
    disbursement_service_client::DisbursementServiceClient,
    partner_service_client::PartnerServiceClient,
};
use partner_payouts::sandbox;
use tokio::sync::Mutex;

#[path = "load/bank.rs"]
mod bank;
#[path = "load/feed.rs"]
mod feed;
#[path = "load/floor.rs"]
mod floor;
#[path = "load/process.rs"]
mod process;

use process::CpuSample;

/// The service runs in this process: the same allocator as the `partner-payouts` binary.
#[global_allocator]
static ALLOCATOR: partner_payouts::allocator::MiMalloc = partner_payouts::allocator::MiMalloc;

#[derive(Debug, Clone)]
struct Options {
    scenario: String,
    count: u64,
    concurrency: usize,
    rate: Option<f64>,
    streams: u64,
    connections: usize,
    database_url: Option<String>,
    target: Option<String>,
    in_process: bool,
    bank_rate: Option<u32>,
    bank_latency_ms: Option<u64>,
    outage_after_ms: Option<u64>,
    outage_ms: Option<u64>,
    /// e2e: watchers of the change feed besides the one measured.
    watchers: u64,
    /// claims: the dispatcher paused while the claims are filed.
    pause_payouts: bool,
    /// floor: calls held and answered together every this many ms (0: each at once).
    hold_ms: u64,
}

fn options() -> anyhow::Result<Options> {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let mut o = Options {
        scenario: String::new(),
        count: 10_000,
        concurrency: 64,
        rate: None,
        streams: 1,
        connections: 8,
        database_url: None,
        target: None,
        in_process: false,
        bank_rate: None,
        bank_latency_ms: None,
        outage_after_ms: None,
        outage_ms: None,
        watchers: 0,
        pause_payouts: false,
        hold_ms: 0,
    };
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{arg} needs a value"))
        };
        match arg.as_str() {
            "--count" => o.count = value()?.parse()?,
            "--concurrency" => o.concurrency = value()?.parse()?,
            "--rate" => o.rate = Some(value()?.parse()?),
            "--streams" => o.streams = value()?.parse::<u64>()?.max(1),
            "--connections" => o.connections = value()?.parse::<usize>()?.max(1),
            "--database-url" => o.database_url = Some(value()?),
            "--target" => o.target = Some(value()?),
            "--in-process" => o.in_process = true,
            "--bank-rate" => o.bank_rate = Some(value()?.parse()?),
            "--bank-latency-ms" => o.bank_latency_ms = Some(value()?.parse()?),
            "--outage-after-ms" => o.outage_after_ms = Some(value()?.parse()?),
            "--outage-ms" => o.outage_ms = Some(value()?.parse()?),
            "--watchers" => o.watchers = value()?.parse()?,
            "--pause-payouts" => o.pause_payouts = true,
            "--hold-ms" => o.hold_ms = value()?.parse()?,
            s if !s.starts_with('-') && o.scenario.is_empty() => o.scenario = s.to_owned(),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let scenario = o.scenario.as_str();
    if !["register", "claims", "import", "e2e", "floor"].contains(&scenario)
        && !bank::SCENARIOS.contains(&scenario)
    {
        anyhow::bail!(
            "scenario must be register, claims, import, e2e, floor, throttled-bank or outage"
        );
    }
    if scenario == "floor" && (o.target.is_some() || o.in_process) {
        anyhow::bail!("floor runs a bare server of its own: no --target or --in-process");
    }
    if bank::SCENARIOS.contains(&scenario) && o.target.is_some() {
        anyhow::bail!("{scenario} runs the service in process, with its own bank: no --target");
    }
    if o.in_process && o.target.is_some() {
        anyhow::bail!("--in-process and --target exclude each other");
    }
    o.in_process |= bank::SCENARIOS.contains(&scenario);
    Ok(o)
}

fn brn(n: u64) -> String {
    BusinessRegistrationNumber::from_serial(n)
        .as_str()
        .to_owned()
}

fn partner(n: u64) -> pb::Partner {
    pb::Partner {
        business_registration_number: brn(n),
        legal_name: format!("Load Shop {n}"),
        representative_name: "Kim Minji".into(),
        affected_services: vec![pb::AffectedService::KakaotalkChannel as i32],
        bank_account: Some(pb::BankAccount {
            bank_code: "004".into(),
            // Ends in 1: the sandbox keeps accounts ending 0000 and 9999 for failures.
            account_number: format!("1101{:07}1", n % 10_000_000),
            holder_name: "Kim Minji".into(),
        }),
        contact_email: "load@example.com".into(),
        ..Default::default()
    }
}

/// A claim that is approved at once (30,000 KRW under the shipped policy).
fn claim(partner_id: String) -> pb::SubmitClaimRequest {
    pb::SubmitClaimRequest {
        request_id: uuid::Uuid::now_v7().to_string(),
        partner_id,
        items: vec![pb::LossItem {
            service: pb::AffectedService::KakaotalkChannel as i32,
            baseline_week_sales_krw: 2_500_000,
            outage_week_sales_krw: 900_000,
        }],
        evidence: vec![],
    }
}

/// Rows `first..first+count` of `0..total` cut into `streams` contiguous shares.
fn shares(total: u64, streams: u64) -> Vec<std::ops::Range<u64>> {
    let per = total.div_ceil(streams);
    (0..streams)
        .map(|s| (s * per).min(total)..((s + 1) * per).min(total))
        .filter(|r| !r.is_empty())
        .collect()
}

/// Imports `count` partners over `streams` streams at once; returns the rows by outcome.
async fn import_partners(
    clients: &Clients,
    base: u64,
    count: u64,
    streams: u64,
) -> anyhow::Result<BTreeMap<i32, u64>> {
    let imports = (0..).zip(shares(count, streams)).map(|(s, range)| {
        let mut client = PartnerServiceClient::new(clients.pick(s));
        async move {
            let rows = range.map(move |i| pb::ImportPartnersRequest {
                request_id: uuid::Uuid::now_v7().to_string(),
                partner: Some(partner(base + i)),
            });
            let mut responses = client
                .import_partners(futures::stream::iter(rows))
                .await?
                .into_inner();
            let mut outcomes = BTreeMap::<i32, u64>::new();
            while let Some(row) = responses.message().await? {
                *outcomes.entry(row.outcome).or_default() += 1;
            }
            anyhow::Ok(outcomes)
        }
    });
    merge(futures::future::try_join_all(imports).await?)
}

/// Imports a claim for each of the `count` partners, naming them by registration number.
async fn import_claims(
    clients: &Clients,
    base: u64,
    count: u64,
    streams: u64,
) -> anyhow::Result<BTreeMap<i32, u64>> {
    let imports = (0..).zip(shares(count, streams)).map(|(s, range)| {
        let mut client = ClaimServiceClient::new(clients.pick(s));
        async move {
            let rows = range.map(move |i| {
                let c = claim(String::new());
                pb::ImportClaimsRequest {
                    request_id: c.request_id,
                    partner: Some(
                        pb::import_claims_request::Partner::BusinessRegistrationNumber(brn(
                            base + i
                        )),
                    ),
                    items: c.items,
                    evidence: c.evidence,
                }
            });
            let mut responses = client
                .import_claims(futures::stream::iter(rows))
                .await?
                .into_inner();
            let mut outcomes = BTreeMap::<i32, u64>::new();
            while let Some(row) = responses.message().await? {
                *outcomes.entry(row.outcome).or_default() += 1;
            }
            anyhow::Ok(outcomes)
        }
    });
    merge(futures::future::try_join_all(imports).await?)
}

fn merge(parts: Vec<BTreeMap<i32, u64>>) -> anyhow::Result<BTreeMap<i32, u64>> {
    let mut all = BTreeMap::new();
    for part in parts {
        for (outcome, n) in part {
            *all.entry(outcome).or_default() += n;
        }
    }
    Ok(all)
}

struct Report {
    latencies: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    elapsed: Duration,
    calls: u64,
}

impl Report {
    fn print(&self, label: &str) {
        let h = &self.latencies;
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "{label}: calls={} elapsed_s={:.2} throughput_per_s={:.0} p50_ms={:.2} p90_ms={:.2} \
             p99_ms={:.2} p99.9_ms={:.2} max_ms={:.2} errors={:?}",
            self.calls,
            self.elapsed.as_secs_f64(),
            self.calls as f64 / self.elapsed.as_secs_f64(),
            ms(0.50),
            ms(0.90),
            ms(0.99),
            ms(0.999),
            h.max() as f64 / 1000.0,
            self.errors
        );
    }
}

/// `o.count` RegisterPartner calls over `clients`, each registering partner `base + i`.
async fn drive_registrations(o: &Options, clients: Clients, base: u64) -> Report {
    drive(o, move |i| {
        let mut client = PartnerServiceClient::new(clients.pick(i));
        async move {
            client
                .register_partner(pb::RegisterPartnerRequest {
                    request_id: uuid::Uuid::now_v7().to_string(),
                    partner: Some(partner(base + i)),
                })
                .await
                .map(drop)
        }
    })
    .await
}

/// Runs `call(i)` for i in 0..count, closed or open loop, and measures each call.
async fn drive<F, Fut>(o: &Options, call: F) -> Report
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), tonic::Status>> + Send,
{
    let latencies = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("histogram"),
    ));
    let errors = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let started = Instant::now();
    let record = {
        let latencies = latencies.clone();
        let errors = errors.clone();
        move |since: Instant, result: Result<(), tonic::Status>| {
            let latencies = latencies.clone();
            let errors = errors.clone();
            async move {
                let micros = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
                latencies.lock().await.saturating_record(micros.max(1));
                if let Err(status) = result {
                    *errors
                        .lock()
                        .await
                        .entry(format!("{:?}", status.code()))
                        .or_default() += 1;
                }
            }
        }
    };
    match o.rate {
        None => {
            let next = Arc::new(AtomicU64::new(0));
            let workers = (0..o.concurrency).map(|_| {
                let (next, call, record) = (next.clone(), call.clone(), record.clone());
                let count = o.count;
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count {
                            break;
                        }
                        let t = Instant::now();
                        let result = call(i).await;
                        record(t, result).await;
                    }
                })
            });
            futures::future::join_all(workers).await;
        }
        Some(rate) => {
            use futures::FutureExt as _;
            let interval = Duration::from_secs_f64(1.0 / rate);
            // Each call is started at its time (at once if that has passed), whatever the
            // calls before it are doing; only the calls in flight exist as tasks.
            let mut running = futures::stream::FuturesUnordered::new();
            for i in 0..o.count {
                let (call, record) = (call.clone(), record.clone());
                // Measured from the scheduled start: coordinated omission corrected.
                let scheduled = started + interval.mul_f64(i as f64);
                tokio::time::sleep_until(scheduled.into()).await;
                running.push(tokio::spawn(async move {
                    let result = call(i).await;
                    record(scheduled, result).await;
                }));
                while let Some(Some(_)) = running.next().now_or_never() {}
            }
            while running.next().await.is_some() {}
        }
    }
    let elapsed = started.elapsed();
    let latencies = latencies.lock().await.clone();
    let errors = errors.lock().await.clone();
    Report {
        latencies,
        errors,
        elapsed,
        calls: o.count,
    }
}

/// `connections` channels to `target`, each its own HTTP/2 connection, as `connections` client
/// processes would have: calls and streams are spread over them in turn.
async fn connect(target: &str, connections: usize) -> anyhow::Result<Clients> {
    let endpoint = tonic::transport::Endpoint::from_shared(target.to_owned())?;
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections.max(1) {
        channels.push(endpoint.connect().await?);
    }
    Ok(Clients(Arc::new(channels)))
}

/// The generator's channels to the service.
#[derive(Clone)]
struct Clients(Arc<Vec<tonic::transport::Channel>>);

impl Clients {
    /// The channel of call (or stream) `i`.
    fn pick(&self, i: u64) -> tonic::transport::Channel {
        let n = u64::try_from(self.0.len()).expect("a few channels");
        self.0[usize::try_from(i % n).expect("a channel index")].clone()
    }
}

fn admin_postgres_url() -> String {
    std::env::var("PAYOUTS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Where the PostgreSQL server's write-ahead log stands, in bytes (None where it cannot be
/// read, or the service writes to SQLite). Between two readings: the WAL the whole server
/// wrote, which depends on the rows and indexes written, not on the machine's speed, so runs
/// can be compared when timings cannot.
async fn wal_position(o: &Options) -> Option<u64> {
    use sqlx::Connection as _;
    if o.database_url
        .as_deref()
        .is_some_and(|url| url.starts_with("sqlite"))
    {
        return None;
    }
    let mut conn = sqlx::PgConnection::connect(&admin_postgres_url())
        .await
        .ok()?;
    let bytes: i64 = sqlx::query_scalar("SELECT (pg_current_wal_lsn() - '0/0')::bigint")
        .fetch_one(&mut conn)
        .await
        .ok()?;
    u64::try_from(bytes).ok()
}

/// Prints the WAL written per call between two [`wal_position`]s.
fn report_wal(before: Option<u64>, after: Option<u64>, calls: u64) {
    if let (Some(before), Some(after)) = (before, after) {
        let bytes = after.saturating_sub(before);
        println!(
            "postgres wal per call: {:.0} bytes (the whole server's, {bytes} bytes in all)",
            bytes as f64 / calls.max(1) as f64
        );
    }
}

/// A new database on the admin URL's server: its URL and its name.
async fn fresh_postgres_database() -> anyhow::Result<(String, String)> {
    use sqlx::Connection as _;
    let admin = admin_postgres_url();
    let mut conn = sqlx::PgConnection::connect(&admin).await?;
    let name = format!("payouts_bench_{}", uuid::Uuid::now_v7().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await?;
    let (base, _) = admin.rsplit_once('/').expect("URL has a database");
    Ok((format!("{base}/{name}"), name))
}

/// Drops the database the run made (a 105,116-row run leaves the better part of a gigabyte).
async fn drop_postgres_database(name: &str) -> anyhow::Result<()> {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(&admin_postgres_url()).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut conn)
    .await?;
    Ok(())
}

/// Polls the programme summary until `count` payouts are PAID (or one failed).
async fn wait_until_paid(
    channel: &tonic::transport::Channel,
    count: u64,
) -> anyhow::Result<pb::GetProgramSummaryResponse> {
    let mut summary = DisbursementServiceClient::new(channel.clone());
    loop {
        let s = summary
            .get_program_summary(pb::GetProgramSummaryRequest {})
            .await?
            .into_inner();
        if s.paid_count >= i64::try_from(count)? || s.failed_count > 0 {
            return Ok(s);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the sandbox bank applied: one instruction per payout, each submitted once.
async fn report_sandbox(bank_addr: Option<std::net::SocketAddr>) -> anyhow::Result<()> {
    let Some(addr) = bank_addr else {
        return Ok(());
    };
    let applied = SandboxLedgerClient::connect(format!("http://{addr}"))
        .await?
        .max_decoding_message_size(256 * 1024 * 1024)
        .list_applied(ListAppliedRequest {})
        .await?
        .into_inner()
        .instructions;
    let once = applied.iter().all(|a| a.submissions == 1);
    println!(
        "sandbox: {} instructions applied, each submitted once: {once}, {} KRW",
        applied.len(),
        applied.iter().map(|a| a.amount_krw).sum::<i64>()
    );
    Ok(())
}

/// Peak resident memory of this process (service and load generator together, when the
/// service runs in process), in MiB.
fn peak_rss_mib() -> Option<f64> {
    peak_rss_mib_of("self")
}

/// Peak resident memory of process `pid` (a number, or `self`), in MiB.
fn peak_rss_mib_of(pid: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn main() -> anyhow::Result<()> {
    // The `floor` scenario's bare server: this binary again, in a process of its own.
    if let Some((listen, hold_ms)) = floor::server_args() {
        return floor::serve(&listen, hold_ms);
    }
    // `cargo test --all-targets` runs bench binaries without `--bench`: nothing to measure then.
    if !std::env::args().any(|a| a == "--bench") {
        println!("load: run it with `cargo bench --bench load -- SCENARIO`");
        return Ok(());
    }
    let o = options()?;
    // In process, the service runs on the runtime `serve` gives it; a client of its own keeps
    // tokio's defaults, as a client of the service's would.
    let runtime = if o.in_process {
        partner_payouts::app::runtime()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
    };
    runtime.block_on(run(o))
}

async fn run(o: Options) -> anyhow::Result<()> {
    if o.scenario == "floor" {
        println!("scenario floor with {} calls", o.count);
        return floor::run(&o, 0).await;
    }
    let dir = tempfile::tempdir()?;
    let mut bank_addr = None;
    let mut made_database = None;
    let mut spawned = None;
    let (clients, server) = match &o.target {
        Some(target) => (connect(target, o.connections).await?, None),
        None => {
            let database_url = match o.database_url.as_deref() {
                None => {
                    let (url, name) = fresh_postgres_database().await?;
                    made_database = Some(name);
                    url
                }
                Some("sqlite") => format!("sqlite://{}", dir.path().join("load.db").display()),
                Some(url) => url.to_owned(),
            };
            if !o.in_process {
                let s =
                    process::spawn(&database_url, dir.path(), &bank::sandbox_config(&o)).await?;
                println!(
                    "service in a process of its own (pid {}) on {}, bank in another (pid {}), \
                     database {}",
                    s.service_pid(),
                    s.target,
                    s.bank_pid(),
                    database_url.split(':').next().unwrap_or("")
                );
                bank_addr = Some(s.bank_addr);
                let clients = connect(&s.target, o.connections).await?;
                spawned = Some(s);
                (clients, None)
            } else {
                let bank_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                let addr = bank_listener.local_addr()?;
                bank_addr = Some(addr);
                tokio::spawn(sandbox::serve(
                    bank_listener,
                    sandbox::SandboxBank::new(bank::sandbox_config(&o)),
                    std::future::pending(),
                ));
                let app = Application::build(Settings {
                    listen_addr: "127.0.0.1:0".parse()?,
                    admin_listen_addr: None,
                    database_url: database_url.clone(),
                    database_max_connections: 32,
                    pii_key_file: dir.path().join("pii.key"),
                    payments_backend_url: Some(format!("http://{addr}")),
                    max_concurrent_requests: 1024,
                    dispatch_concurrency: std::env::var("PAYOUTS_DISPATCH_CONCURRENCY")
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(Settings::default().dispatch_concurrency),
                    ..Settings::default()
                })
                .await?;
                let listen = app.local_addr();
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                let server = tokio::spawn(app.run_until(async {
                    let _ = stopped.await;
                }));
                println!(
                    "service in process on {listen}, database {}",
                    database_url.split(':').next().unwrap_or("")
                );
                (
                    connect(&format!("http://{listen}"), o.connections).await?,
                    Some((stop, server)),
                )
            }
        }
    };
    let pids = spawned
        .as_ref()
        .map(|s: &process::Spawned| (s.service_pid(), s.bank_pid()));
    let sample = move || CpuSample::take(pids.map(|p| p.0), pids.map(|p| p.1));
    let separate = o.target.is_some() || !o.in_process;
    // Fresh registration numbers per run, so a reused database takes them too.
    let base = (u64::from(std::process::id()) % 900) * 1_000_000;
    let mode = o
        .rate
        .map_or(format!("closed loop, {} callers", o.concurrency), |r| {
            format!("open loop, {r}/s")
        });
    if bank::SCENARIOS.contains(&o.scenario.as_str()) {
        println!("scenario {} with {} payouts", o.scenario, o.count);
    } else {
        println!("scenario {} with {} calls, {mode}", o.scenario, o.count);
    }

    match o.scenario.as_str() {
        "register" => {
            let clients = clients.clone();
            let wal = wal_position(&o).await;
            let before = sample();
            let report = drive_registrations(&o, clients, base).await;
            report.print("register");
            before.report(&sample(), o.count, separate);
            report_wal(wal, wal_position(&o).await, o.count);
        }
        "import" | "e2e" => {
            let wal = wal_position(&o).await;
            let before = sample();
            // Per row: partner registered, claim decided, payout queued, submitted, paid.
            let watcher = (o.scenario == "e2e").then(|| feed::spawn(clients.pick(0), 5 * o.count));
            // Others following the feed all along (`--watchers N`), over the same connections.
            let others: Vec<_> = (0..o.watchers)
                .map(|i| feed::spawn(clients.pick(i + 1), 5 * o.count))
                .collect();
            let started = Instant::now();
            let outcomes = import_partners(&clients, base, o.count, o.streams).await?;
            let elapsed = started.elapsed();
            println!(
                "import partners: rows={} streams={} elapsed_s={:.2} rows_per_s={:.0} \
                 outcomes={outcomes:?}",
                o.count,
                o.streams,
                elapsed.as_secs_f64(),
                o.count as f64 / elapsed.as_secs_f64()
            );
            if o.scenario == "import" {
                before.report(&sample(), o.count, separate);
                report_wal(wal, wal_position(&o).await, o.count);
            }
            if o.scenario == "e2e" {
                let claims_started = Instant::now();
                let outcomes = import_claims(&clients, base, o.count, o.streams).await?;
                let elapsed = claims_started.elapsed();
                println!(
                    "import claims: rows={} streams={} elapsed_s={:.2} rows_per_s={:.0} \
                     outcomes={outcomes:?}",
                    o.count,
                    o.streams,
                    elapsed.as_secs_f64(),
                    o.count as f64 / elapsed.as_secs_f64()
                );
                let paid = wait_until_paid(&clients.pick(0), o.count).await?;
                println!(
                    "e2e: {} partners and claims imported, decided and paid in {:.2}s; \
                     paid_count={} paid_krw={} failed={}",
                    o.count,
                    started.elapsed().as_secs_f64(),
                    paid.paid_count,
                    paid.paid_krw,
                    paid.failed_count
                );
                print!("per claim paid: ");
                before.report(&sample(), o.count, separate);
                report_wal(wal, wal_position(&o).await, o.count);
                // Before the check below downloads the sandbox's whole ledger in one message.
                if let Some(mib) = peak_rss_mib().filter(|_| !separate) {
                    println!(
                        "peak resident memory until every payout was PAID (service, load \
                         generator and sandbox): {mib:.1} MiB"
                    );
                }
                report_sandbox(bank_addr).await?;
            }
            if let Some(watcher) = watcher {
                match tokio::time::timeout(Duration::from_secs(120), watcher).await {
                    Ok(watched) => watched??.print(),
                    Err(_) => println!("feed watcher: not every event arrived within 120 s"),
                }
            }
            let mut complete = 0;
            for other in others {
                if let Ok(Ok(Ok(w))) = tokio::time::timeout(Duration::from_secs(60), other).await {
                    complete += u64::from(w.in_order && w.events == 5 * o.count);
                }
            }
            if o.watchers > 0 {
                println!(
                    "other feed watchers: {complete} of {} received every event in order",
                    o.watchers
                );
            }
        }
        "throttled-bank" | "outage" => {
            let bank_addr = bank_addr.expect("the bank runs in process");
            bank::run(&o, &clients, bank_addr, base).await?;
        }
        "claims" => {
            let started = Instant::now();
            let ids: Vec<String> = futures::stream::iter(0..o.count)
                .map(|i| {
                    let mut client = PartnerServiceClient::new(clients.pick(i));
                    // On the runtime's workers, as the measured calls are.
                    tokio::spawn(async move {
                        client
                            .register_partner(pb::RegisterPartnerRequest {
                                request_id: uuid::Uuid::now_v7().to_string(),
                                partner: Some(partner(base + i)),
                            })
                            .await
                            .map(|r| r.into_inner().partner.expect("partner").partner_id)
                    })
                })
                .buffer_unordered(o.concurrency)
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<Result<Result<_, _>, _>>()??;
            println!(
                "registered {} partners in {:.2}s",
                ids.len(),
                started.elapsed().as_secs_f64()
            );
            let ids = Arc::new(ids);
            let mut dispatch = DisbursementServiceClient::new(clients.pick(0));
            if o.pause_payouts {
                dispatch
                    .pause_dispatch(pb::PauseDispatchRequest {
                        request_id: uuid::Uuid::now_v7().to_string(),
                        reason: "measuring SubmitClaim alone".into(),
                    })
                    .await?;
            }
            let calls = clients.clone();
            let wal = wal_position(&o).await;
            let before = sample();
            let report = drive(&o, move |i| {
                let mut client = ClaimServiceClient::new(calls.pick(i));
                let partner_id = ids[usize::try_from(i).expect("index")].clone();
                async move { client.submit_claim(claim(partner_id)).await.map(drop) }
            })
            .await;
            report.print(if o.pause_payouts {
                "claims (payouts paused)"
            } else {
                "claims"
            });
            before.report(&sample(), o.count, separate);
            report_wal(wal, wal_position(&o).await, o.count);
            if o.pause_payouts {
                dispatch
                    .resume_dispatch(pb::ResumeDispatchRequest {
                        request_id: uuid::Uuid::now_v7().to_string(),
                    })
                    .await?;
            }
        }
        _ => unreachable!("checked in options()"),
    }
    if let Some(mib) = pids.and_then(|(service, _)| peak_rss_mib_of(&service.to_string())) {
        println!("peak resident memory of the service process: {mib:.1} MiB");
    }
    if let Some(mib) = peak_rss_mib() {
        let what = if separate {
            "the load generator"
        } else {
            "service and load generator"
        };
        println!("peak resident memory ({what}, with the sandbox ledger check): {mib:.1} MiB");
    }
    if let Some((stop, server)) = server {
        let _ = stop.send(());
        server.await??;
    }
    if let Some(spawned) = spawned {
        spawned.stop()?;
    }
    if let Some(name) = made_database {
        drop_postgres_database(&name).await?;
    }
    Ok(())
}
