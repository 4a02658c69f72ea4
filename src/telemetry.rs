//! Tracing and OpenTelemetry: logs (text or JSON, with trace ids), a SERVER span per RPC that
//! continues the caller's W3C trace, metrics, OTLP export, and context propagation helpers.
//!
//! Export is configured by the standard variables (`OTEL_EXPORTER_OTLP_ENDPOINT`,
//! `OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER`/`_ARG`, `OTEL_RESOURCE_ATTRIBUTES`). Without an
//! endpoint nothing is exported, but spans still carry ids so traces propagate to the backend.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Instant;

use futures::future::BoxFuture;
use opentelemetry::propagation::{Extractor, Injector, TextMapCompositePropagator};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry::{KeyValue, global};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::middleware::{Around, Middleware};

/// The installed providers; [`Telemetry::shutdown`] flushes what is still buffered.
pub struct Telemetry {
    tracer_provider: SdkTracerProvider,
    meter_provider: Option<SdkMeterProvider>,
}

impl Telemetry {
    /// Exports everything still buffered (spans, metrics) and stops the exporters.
    pub fn shutdown(&self) {
        if let Err(e) = self.tracer_provider.force_flush() {
            tracing::warn!(error = %e, "flushing spans");
        }
        if let Some(Err(e)) = self
            .meter_provider
            .as_ref()
            .map(SdkMeterProvider::force_flush)
        {
            tracing::warn!(error = %e, "flushing metrics");
        }
    }
}

fn otlp_endpoint_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty()))
}

fn resource() -> Resource {
    let builder = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_ok() {
        builder.build()
    } else {
        builder.with_service_name("partner-payouts").build()
    }
}

/// Installs logging and OpenTelemetry, writing logs to stderr. `RUST_LOG` filters (default
/// `info`); `log_format` is `text` or `json`.
pub fn init(log_format: &str) -> anyhow::Result<Telemetry> {
    init_with_writer(log_format, std::io::stderr)
}

/// As [`init`], with logs going to `writer`.
pub fn init_with_writer<W>(log_format: &str, writer: W) -> anyhow::Result<Telemetry>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    global::set_text_map_propagator(TextMapCompositePropagator::new(vec![
        Box::new(TraceContextPropagator::new()),
        Box::new(BaggagePropagator::new()),
    ]));
    let mut tracer_builder = SdkTracerProvider::builder().with_resource(resource());
    let mut meter_provider = None;
    if otlp_endpoint_configured() {
        let spans = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()?;
        tracer_builder = tracer_builder.with_batch_exporter(spans);
        let metrics = opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .build()?;
        let meters = SdkMeterProvider::builder()
            .with_resource(resource())
            .with_periodic_exporter(metrics)
            .build();
        global::set_meter_provider(meters.clone());
        meter_provider = Some(meters);
    }
    let tracer_provider = tracer_builder.build();
    global::set_tracer_provider(tracer_provider.clone());
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer_provider.tracer("partner-payouts"))
        .with_tracked_inactivity(false);

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    // A second installation (several apps in one test process) keeps the first.
    let _ = if log_format == "json" {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(writer),
            )
            .try_init()
    } else {
        registry
            .with(tracing_subscriber::fmt::layer().with_writer(writer))
            .try_init()
    };
    Ok(Telemetry {
        tracer_provider,
        meter_provider,
    })
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// Puts the current span's trace context on an outgoing request (`traceparent`, baggage).
pub fn inject_context<T>(request: &mut tonic::Request<T>) {
    let cx = tracing::Span::current().context();
    global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut MetadataInjector(request.metadata_mut()));
    });
}

/// The current span's trace context as W3C headers, to be stored and continued later.
pub fn current_context_headers() -> Option<String> {
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut headers = HashMap::new();
    global::get_text_map_propagator(|p| p.inject_context(&cx, &mut headers));
    serde_json::to_string(&headers).ok()
}

/// Makes `span` a child of the context stored by [`current_context_headers`].
pub fn continue_stored_context(span: &tracing::Span, stored: Option<&str>) {
    let Some(headers) =
        stored.and_then(|s| serde_json::from_str::<HashMap<String, String>>(s).ok())
    else {
        return;
    };
    let parent = global::get_text_map_propagator(|p| p.extract(&headers));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// Names the resources a call touched on the current RPC span.
pub fn record_resource(key: &'static str, id: impl ToString) {
    tracing::Span::current().set_attribute(key, id.to_string());
}

/// The trace id of `span`, for log lines.
pub fn trace_id_of(span: &tracing::Span) -> String {
    span.context().span().span_context().trace_id().to_string()
}

/// Instruments shared by the RPC layer and the dispatcher. Created on first use from the
/// global meter provider (a no-op without an OTLP endpoint).
pub struct Metrics {
    pub rpc_duration: opentelemetry::metrics::Histogram<f64>,
    pub dispatch_attempts: opentelemetry::metrics::Counter<u64>,
    pub dispatch_failures: opentelemetry::metrics::Counter<u64>,
    pub disbursements: opentelemetry::metrics::Gauge<i64>,
    pub outbox_depth: opentelemetry::metrics::Gauge<i64>,
    pub outbox_oldest_due_age: opentelemetry::metrics::Gauge<f64>,
}

pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let meter = global::meter("partner-payouts");
        Metrics {
            rpc_duration: meter
                .f64_histogram("rpc.server.duration")
                .with_unit("ms")
                .with_description("Duration of inbound RPCs")
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
        }
    })
}

/// What became of a call, on its span and in `rpc.server.duration`: recorded once, when its
/// status is known or, if the call is dropped unanswered first, as its deadline tells
/// (`DEADLINE_EXCEEDED` once it has come, else `CANCELLED`: the caller went away).
struct Outcome {
    span: tracing::Span,
    started: Instant,
    method: KeyValue,
    deadline: crate::deadline::Deadline,
    recorded: bool,
}

impl Outcome {
    fn record(mut self, code: tonic::Code) {
        self.write(code);
    }

    fn write(&mut self, code: tonic::Code) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        let code = code as i64;
        self.span.record("rpc.grpc.status_code", code);
        let elapsed_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        if code != 0 {
            self.span.record("otel.status_code", "ERROR");
            tracing::info!(parent: &self.span, code, elapsed_ms, "rpc failed");
        } else {
            tracing::debug!(parent: &self.span, elapsed_ms, "rpc finished");
        }
        metrics().rpc_duration.record(
            elapsed_ms,
            &[
                self.method.clone(),
                KeyValue::new("rpc.grpc.status_code", code),
            ],
        );
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        let code = self.deadline.unanswered();
        self.write(code);
    }
}

/// A tower layer giving every RPC (except health and reflection) a SERVER span named
/// `package.Service/Method`, child of the caller's `traceparent`, and a duration metric.
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcTraceLayer;

impl<S> tower::Layer<S> for RpcTraceLayer {
    type Service = RpcTrace<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Around::new(inner, *self)
    }
}

/// The routes with their calls traced.
pub type RpcTrace<S> = Around<S, RpcTraceLayer>;

impl<S, B> Middleware<S, B> for RpcTraceLayer
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Send,
    S::Future: Send + 'static,
{
    fn call(
        &self,
        inner: &mut S,
        request: http::Request<B>,
    ) -> BoxFuture<'static, Result<S::Response, S::Error>> {
        let path = request.uri().path().trim_start_matches('/').to_owned();
        if path.starts_with("grpc.health.") || path.starts_with("grpc.reflection.") {
            return Box::pin(inner.call(request));
        }
        let (service, method) = path.split_once('/').unwrap_or((path.as_str(), ""));
        let span = tracing::info_span!(
            "rpc",
            otel.name = %path,
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        let parent =
            global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(request.headers())));
        let _ = span.set_parent(parent);
        span.record("trace_id", trace_id_of(&span));
        let outcome = Outcome {
            span: span.clone(),
            started: Instant::now(),
            method: KeyValue::new("rpc.method", path.clone()),
            deadline: crate::deadline::Deadline::of(&request),
            recorded: false,
        };
        let future = {
            let _entered = span.enter();
            inner.call(request)
        };
        Box::pin(async move {
            let result = future.instrument(span).await;
            match result {
                // Failed before answering, or answered with a status in the headers.
                Err(e) => {
                    outcome.record(tonic::Code::Unknown);
                    Err(e)
                }
                Ok(response) => match crate::status_body::status_in(response.headers()) {
                    Some(code) => {
                        outcome.record(code);
                        Ok(response)
                    }
                    // The status comes with the trailers: the span lasts until then, so a
                    // stream's span covers the whole stream and ends with its real status.
                    None => {
                        let deadline = outcome.deadline;
                        Ok(response.map(|body| {
                            tonic::body::Body::new(
                                crate::status_body::StatusBody::new(body, move |code| {
                                    outcome.record(code);
                                })
                                .within(deadline),
                            )
                        }))
                    }
                },
            }
        })
    }
}
