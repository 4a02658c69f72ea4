//! What tracing export costs: RegisterPartner throughput and latency with OTLP export on
//! (to an in-process collector that accepts and drops) and off, in separate processes.
//!
//! `cargo bench --bench trace_overhead -- off` and `cargo bench --bench trace_overhead -- on`;
//! `PAYOUTS_BENCH_DATABASE_URL` chooses the database (default: a temporary SQLite file),
//! `PAYOUTS_BENCH_CALLS` and `PAYOUTS_BENCH_CONCURRENCY` the load (2000 calls, 16 at once).

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
    metrics_service_server::{MetricsService, MetricsServiceServer},
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use partner_payouts::app::Application;
use partner_payouts::config::Settings;
use partner_payouts::domain::BusinessRegistrationNumber;
use partner_payouts::proto::payouts::v1::{
    self as pb, partner_service_client::PartnerServiceClient,
};

struct Sink;

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        _request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Sink {
    async fn export(
        &self,
        _request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn brn(n: u64) -> String {
    BusinessRegistrationNumber::from_serial(n)
        .as_str()
        .to_owned()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `cargo test --all-targets` runs bench binaries without `--bench`: nothing to measure then.
    if !std::env::args().any(|a| a == "--bench") {
        println!("trace_overhead: run it with `cargo bench --bench trace_overhead -- on|off`");
        return Ok(());
    }
    let export = std::env::args().skip(1).any(|a| a == "on");
    let calls: u64 = env_or("PAYOUTS_BENCH_CALLS", 2000);
    let concurrency: usize = env_or("PAYOUTS_BENCH_CONCURRENCY", 16);
    if export {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(Sink))
                .add_service(MetricsServiceServer::new(Sink))
                .serve_with_incoming(partner_payouts::net::incoming(listener)),
        );
        // SAFETY: set before anything else runs or reads the environment.
        unsafe { std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}")) };
    } else {
        // SAFETY: as above.
        unsafe { std::env::remove_var("OTEL_EXPORTER_OTLP_ENDPOINT") };
    }
    // SAFETY: as above; only warnings, so logging does not dominate the measurement.
    unsafe { std::env::set_var("RUST_LOG", "warn") };
    // As `serve` runs by default: every instrument also kept for the admin port's /metrics.
    let exposition = partner_payouts::telemetry::Exposition { prometheus: true };
    let telemetry = partner_payouts::telemetry::init("text", exposition)?;

    let dir = tempfile::tempdir()?;
    let database_url = std::env::var("PAYOUTS_BENCH_DATABASE_URL")
        .unwrap_or_else(|_| format!("sqlite://{}", dir.path().join("bench.db").display()));
    let app = Application::build(Settings {
        listen_addr: "127.0.0.1:0".parse()?,
        admin_listen_addr: None,
        database_url: database_url.clone(),
        pii_key_file: dir.path().join("pii.key"),
        ..Settings::default()
    })
    .await?;
    let addr = app.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async {
        let _ = stopped.await;
    }));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;

    // A run id keeps registration numbers fresh when the database is reused.
    let base = u64::from(std::process::id()) * 1_000_000;
    let mut latencies: Vec<Duration> = Vec::with_capacity(usize::try_from(calls)?);
    let started = Instant::now();
    let mut errors = 0u64;
    let mut results = futures::stream::iter(0..calls)
        .map(|i| {
            let mut client = PartnerServiceClient::new(channel.clone());
            async move {
                let request = pb::RegisterPartnerRequest {
                    request_id: uuid::Uuid::now_v7().to_string(),
                    partner: Some(pb::Partner {
                        business_registration_number: brn(base + i),
                        legal_name: format!("Bench Shop {i}"),
                        representative_name: "Kim Minji".into(),
                        affected_services: vec![pb::AffectedService::KakaoPay as i32],
                        bank_account: Some(pb::BankAccount {
                            bank_code: "004".into(),
                            account_number: format!("1101{:08}", i % 100_000_000),
                            holder_name: "Kim Minji".into(),
                        }),
                        contact_email: "bench@example.com".into(),
                        ..Default::default()
                    }),
                };
                let t = Instant::now();
                let ok = client.register_partner(request).await.is_ok();
                (t.elapsed(), ok)
            }
        })
        .buffer_unordered(concurrency);
    while let Some((latency, ok)) = results.next().await {
        latencies.push(latency);
        errors += u64::from(!ok);
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let pct = |p: f64| {
        let index = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        latencies[index].as_secs_f64() * 1000.0
    };
    println!(
        "export={} database={} calls={calls} concurrency={concurrency} errors={errors} \
         throughput_per_s={:.0} p50_ms={:.2} p99_ms={:.2}",
        if export { "on" } else { "off" },
        database_url.split(':').next().unwrap_or(""),
        calls as f64 / elapsed.as_secs_f64(),
        pct(0.50),
        pct(0.99),
    );
    let _ = stop.send(());
    server.await??;
    telemetry.shutdown();
    Ok(())
}
