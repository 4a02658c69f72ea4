//! The service's instruments and where they go: OTLP (with an endpoint) and the Prometheus
//! text of the admin port's `/metrics`, both readers of one meter provider, so both see the
//! same instruments.

use std::sync::OnceLock;

use opentelemetry::global;
use opentelemetry::metrics::{Counter, Gauge, Histogram};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;

/// Instruments shared by the RPC layer and the dispatcher. Created on first use from the
/// global meter provider (a no-op when neither OTLP nor `/metrics` reads them).
pub struct Metrics {
    /// `rpc.server.call.duration`, in seconds.
    pub rpc_duration: Histogram<f64>,
    pub dispatch_attempts: Counter<u64>,
    pub dispatch_failures: Counter<u64>,
    pub disbursements: Gauge<i64>,
    pub outbox_depth: Gauge<i64>,
    pub outbox_oldest_due_age: Gauge<f64>,
    /// `payouts.group_commit.rows`: the calls each group-commit batch wrote, by method.
    pub group_commit_rows: Histogram<u64>,
    /// `payouts.group_commit.wait`, in seconds: how long a batch's first call waited in the
    /// queue before its batch was taken, by method.
    pub group_commit_wait: Histogram<f64>,
    /// `payouts.group_commit.duration`, in seconds: from a batch taken to its calls answered
    /// (its statements and commit), by method.
    pub group_commit_duration: Histogram<f64>,
}

/// The bucket boundaries OpenTelemetry's semantic conventions recommend for
/// `rpc.server.call.duration`, in seconds.
const RPC_DURATION_BOUNDARIES: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// Rows per group-commit batch: powers of two up to the batch's limit
/// (`api::group_commit::MAX_ROWS`).
const BATCH_ROWS_BOUNDARIES: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// A batch's wait and its write, in seconds: finer than a call's, since a batch is a part of
/// one call's time.
const BATCH_SECONDS_BOUNDARIES: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024,
];

pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let meter = global::meter("partner-payouts");
        Metrics {
            rpc_duration: meter
                .f64_histogram("rpc.server.call.duration")
                .with_unit("s")
                .with_description("Duration of inbound RPCs")
                .with_boundaries(RPC_DURATION_BOUNDARIES.to_vec())
                .build(),
            dispatch_attempts: meter
                .u64_counter("payouts.dispatch.attempts")
                .with_description("Calls to the payments backend, by operation and outcome")
                .build(),
            dispatch_failures: meter
                .u64_counter("payouts.dispatch.failures")
                .with_description("Disbursements that ended FAILED, by code")
                .build(),
            disbursements: meter
                .i64_gauge("payouts.disbursements")
                .with_description("Disbursements by status")
                .build(),
            outbox_depth: meter
                .i64_gauge("payouts.outbox.depth")
                .with_description("Outbox rows waiting for the dispatcher")
                .build(),
            outbox_oldest_due_age: meter
                .f64_gauge("payouts.outbox.oldest_due_age")
                .with_unit("s")
                .with_description("How long the oldest due outbox row has waited")
                .build(),
            group_commit_rows: meter
                .u64_histogram("payouts.group_commit.rows")
                .with_description("Calls written by each group-commit batch, by method")
                .with_boundaries(BATCH_ROWS_BOUNDARIES.to_vec())
                .build(),
            group_commit_wait: meter
                .f64_histogram("payouts.group_commit.wait")
                .with_unit("s")
                .with_description(
                    "How long each group-commit batch's first call waited for its batch",
                )
                .with_boundaries(BATCH_SECONDS_BOUNDARIES.to_vec())
                .build(),
            group_commit_duration: meter
                .f64_histogram("payouts.group_commit.duration")
                .with_unit("s")
                .with_description("Time to write each group-commit batch and answer its calls")
                .with_boundaries(BATCH_SECONDS_BOUNDARIES.to_vec())
                .build(),
        }
    })
}

/// The registry `/metrics` reads, once the Prometheus reader is installed.
static PROMETHEUS: OnceLock<prometheus::Registry> = OnceLock::new();

/// A meter provider with the readers asked for (OTLP, Prometheus), installed as the global
/// one; None (instruments stay no-ops) when neither is.
pub(super) fn install(
    resource: &Resource,
    otlp: bool,
    prometheus: bool,
) -> anyhow::Result<Option<SdkMeterProvider>> {
    if !otlp && !prometheus {
        return Ok(None);
    }
    let mut builder = SdkMeterProvider::builder().with_resource(resource.clone());
    if otlp {
        let exporter = opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .build()?;
        builder = builder.with_periodic_exporter(exporter);
    }
    if prometheus {
        let registry = PROMETHEUS.get_or_init(prometheus::Registry::new).clone();
        let reader = opentelemetry_prometheus::exporter()
            .with_registry(registry)
            .build()?;
        builder = builder.with_reader(reader);
    }
    let provider = builder.build();
    global::set_meter_provider(provider.clone());
    Ok(Some(provider))
}

/// Every instrument in the Prometheus text format (0.0.4); None when this process installed
/// no Prometheus reader.
pub fn prometheus_text() -> Option<String> {
    use prometheus::Encoder as _;
    let registry = PROMETHEUS.get()?;
    let mut text = Vec::new();
    if let Err(e) = prometheus::TextEncoder::new().encode(&registry.gather(), &mut text) {
        tracing::warn!(error = %e, "encoding the metrics");
        return None;
    }
    String::from_utf8(text).ok()
}
