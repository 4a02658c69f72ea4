//! Tracing and OpenTelemetry: logs (text or JSON, with trace ids: `logs`), a SERVER span per
//! RPC that continues the caller's W3C trace (`rpc`), metrics (`metrics`), OTLP export, and
//! context propagation helpers.
//!
//! Export is configured by the standard variables (`OTEL_EXPORTER_OTLP_ENDPOINT`,
//! `OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER`/`_ARG`, `OTEL_RESOURCE_ATTRIBUTES`). Without an
//! endpoint nothing is exported, but spans still carry ids so traces propagate to the backend;
//! and unless `OTEL_TRACES_SAMPLER` says otherwise, only the traces a caller sampled are
//! recorded ([`unexported_sampler`]): a trace that starts here would be recorded for no one.

mod logs;
mod metrics;
mod rpc;

pub use metrics::{Metrics, metrics, prometheus_text};
pub use rpc::{RpcTrace, RpcTraceLayer, is_server_error};

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapCompositePropagator};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry::{Key, KeyValue, global};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The installed providers; [`Telemetry::shutdown`] flushes what is still buffered.
pub struct Telemetry {
    tracer_provider: SdkTracerProvider,
    meter_provider: Option<SdkMeterProvider>,
}

impl Telemetry {
    /// Exports everything still buffered (spans, metrics).
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

/// The process as telemetry names it: `service.name` (`partner-payouts` unless
/// `OTEL_SERVICE_NAME` says otherwise) and `service.instance.id` (new for every process unless
/// `OTEL_RESOURCE_ATTRIBUTES` gives one), beside what the environment adds.
fn resource() -> Resource {
    const INSTANCE_ID: Key = Key::from_static_str("service.instance.id");
    let detected = Resource::builder().build();
    let mut builder = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        builder = builder.with_service_name("partner-payouts");
    }
    if detected.get(&INSTANCE_ID).is_none() {
        builder =
            builder.with_attribute(KeyValue::new(INSTANCE_ID, uuid::Uuid::now_v7().to_string()));
    }
    builder.build()
}

/// Where metrics go besides OTLP (which the `OTEL_*` variables configure).
#[derive(Debug, Clone, Copy, Default)]
pub struct Exposition {
    /// Keep every instrument for `/metrics` ([`prometheus_text`]).
    pub prometheus: bool,
}

/// Installs logging and OpenTelemetry, writing logs to stderr. `RUST_LOG` filters (default
/// `info`); `log_format` is `text` or `json`.
pub fn init(log_format: &str, exposition: Exposition) -> anyhow::Result<Telemetry> {
    init_with_writer(log_format, exposition, std::io::stderr)
}

/// As [`init`], with logs going to `writer`.
pub fn init_with_writer<W>(
    log_format: &str,
    exposition: Exposition,
    writer: W,
) -> anyhow::Result<Telemetry>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let propagator = propagator();
    let _ = PROPAGATED_HEADERS.set(propagated_headers(&propagator));
    global::set_text_map_propagator(propagator);
    let resource = resource();
    let otlp = otlp_endpoint_configured();
    let mut tracer_builder = SdkTracerProvider::builder().with_resource(resource.clone());
    if otlp {
        let spans = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()?;
        tracer_builder = tracer_builder.with_batch_exporter(spans);
    } else if std::env::var_os("OTEL_TRACES_SAMPLER").is_none() {
        tracer_builder = tracer_builder.with_sampler(unexported_sampler());
    }
    let meter_provider = metrics::install(&resource, otlp, exposition.prometheus)?;
    let tracer_provider = tracer_builder.build();
    global::set_tracer_provider(tracer_provider.clone());
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer_provider.tracer("partner-payouts"))
        .with_tracked_inactivity(false)
        // Nothing reads the ambient OpenTelemetry context (`Context::current`): propagation
        // and logs take a span's own context. Activating it on every poll of every call's
        // future only cost time.
        .with_context_activation(false)
        // The thread, module and source line that opened a span: the same few values on
        // every span, computed for each one. The RPC conventions' attributes stay.
        .with_threads(false)
        .with_location(false)
        .with_target(false);

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    // A second installation (several apps in one test process) keeps the first.
    let _ = if log_format == "json" {
        registry.with(logs::json_layer(writer)).try_init()
    } else {
        registry.with(logs::text_layer(writer)).try_init()
    };
    Ok(Telemetry {
        tracer_provider,
        meter_provider,
    })
}

/// W3C trace context and baggage, read from and written to every call's headers.
fn propagator() -> TextMapCompositePropagator {
    TextMapCompositePropagator::new(vec![
        Box::new(TraceContextPropagator::new()),
        Box::new(BaggagePropagator::new()),
    ])
}

/// The sampler when no span is exported: a caller's sampled trace is continued as sampled (so
/// the bank, and whatever else the call reaches, still sees the caller's decision), a trace
/// that starts here is not sampled. Either way each span has its ids, for the logs and for
/// propagation; an unsampled one records no attributes and is not assembled at its end.
fn unexported_sampler() -> Sampler {
    Sampler::ParentBased(Box::new(Sampler::AlwaysOff))
}

pub(crate) struct HeaderExtractor<'a>(&'a http::HeaderMap);

/// The headers the installed propagator reads, as [`init`] installed it.
static PROPAGATED_HEADERS: std::sync::OnceLock<Vec<http::HeaderName>> = std::sync::OnceLock::new();

fn propagated_headers(
    propagator: &impl opentelemetry::propagation::TextMapPropagator,
) -> Vec<http::HeaderName> {
    propagator
        .fields()
        .filter_map(|name| http::HeaderName::from_bytes(name.as_bytes()).ok())
        .collect()
}

/// Whether `headers` carry anything the propagator would read (a caller's trace, baggage):
/// when they do not, extracting from them gives the empty context, and a call's span is a
/// root without it. Before [`init`] (nothing known of the propagator), always.
pub(crate) fn carries_context(headers: &http::HeaderMap) -> bool {
    PROPAGATED_HEADERS
        .get()
        .is_none_or(|names| names.iter().any(|name| headers.contains_key(name)))
}

/// The headers the propagators read on every call, as names made once: looking a header up
/// by a `&str` parses the name first.
static TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
static TRACESTATE: http::HeaderName = http::HeaderName::from_static("tracestate");
static BAGGAGE: http::HeaderName = http::HeaderName::from_static("baggage");

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let value = match key {
            "traceparent" => self.0.get(&TRACEPARENT),
            "tracestate" => self.0.get(&TRACESTATE),
            "baggage" => self.0.get(&BAGGAGE),
            other => self.0.get(other),
        };
        value.and_then(|v| v.to_str().ok())
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
    let mut headers = JsonHeaders(Vec::with_capacity(128));
    global::get_text_map_propagator(|p| p.inject_context(&cx, &mut headers));
    headers.finish()
}

/// Headers written straight into one JSON object, as the propagators set them: what a map of
/// them serializes to, without the map. A key set twice is read back as its last value, as
/// the map would have kept it.
struct JsonHeaders(Vec<u8>);

impl Injector for JsonHeaders {
    fn set(&mut self, key: &str, value: String) {
        self.0.push(if self.0.is_empty() { b'{' } else { b',' });
        // Strings serialize into a Vec without fail.
        let _ = serde_json::to_writer(&mut self.0, key);
        self.0.push(b':');
        let _ = serde_json::to_writer(&mut self.0, &value);
    }
}

impl JsonHeaders {
    fn finish(mut self) -> Option<String> {
        if self.0.is_empty() {
            self.0.push(b'{');
        }
        self.0.push(b'}');
        String::from_utf8(self.0).ok()
    }
}

/// Names the resources a call touched on the current RPC span, looked up once.
pub fn record_resources<'a>(resources: impl IntoIterator<Item = (&'static str, &'a str)>) {
    let span = tracing::Span::current();
    for (key, id) in resources {
        span.set_attribute(key, id.to_owned());
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_written_as_json_read_back_as_the_map_they_were_set_into() {
        let pairs = [
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("tracestate", ""),
            ("baggage", "note=\"quoted\" \\ 파트너,\u{1}"),
            ("tracestate", "vendor=2"),
        ];
        let mut headers = JsonHeaders(Vec::new());
        let mut map = HashMap::new();
        for (key, value) in pairs {
            headers.set(key, value.to_owned());
            map.insert(key.to_owned(), value.to_owned());
        }
        let json = headers.finish().expect("utf-8");
        let read: HashMap<String, String> = serde_json::from_str(&json).expect("JSON");
        assert_eq!(read, map);
        assert_eq!(JsonHeaders(Vec::new()).finish().as_deref(), Some("{}"));
    }

    #[test]
    fn the_extractor_reads_the_propagators_headers_and_any_other() {
        let mut headers = http::HeaderMap::new();
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        headers.insert("traceparent", parent.parse().expect("a header value"));
        headers.insert("tracestate", "vendor=1".parse().expect("a header value"));
        headers.insert("baggage", "tenant=kakao".parse().expect("a header value"));
        headers.insert("x-other", "other".parse().expect("a header value"));
        let extractor = HeaderExtractor(&headers);
        assert_eq!(extractor.get("traceparent"), Some(parent));
        assert_eq!(extractor.get("tracestate"), Some("vendor=1"));
        assert_eq!(extractor.get("baggage"), Some("tenant=kakao"));
        assert_eq!(extractor.get("x-other"), Some("other"));
        assert_eq!(extractor.get("x-missing"), None);
        assert_eq!(
            HeaderExtractor(&http::HeaderMap::new()).get("traceparent"),
            None
        );
    }

    #[test]
    fn without_export_only_a_caller_sampled_trace_is_recorded_and_every_span_has_ids() {
        use opentelemetry::trace::{
            Span as _, SpanContext, TraceFlags, TraceState, Tracer as _, TracerProvider as _,
        };
        let provider = SdkTracerProvider::builder()
            .with_sampler(unexported_sampler())
            .build();
        let tracer = provider.tracer("test");

        let root = tracer.start("root");
        let sc = root.span_context();
        assert!(sc.is_valid(), "a root span still has ids");
        assert!(!sc.is_sampled());
        assert!(!root.is_recording());

        for (flags, sampled) in [(TraceFlags::SAMPLED, true), (TraceFlags::default(), false)] {
            let caller = SpanContext::new(
                opentelemetry::TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736")
                    .expect("trace id"),
                opentelemetry::SpanId::from_hex("00f067aa0ba902b7").expect("span id"),
                flags,
                true,
                TraceState::default(),
            );
            let cx = opentelemetry::Context::new().with_remote_span_context(caller);
            let child = tracer.start_with_context("child", &cx);
            let sc = child.span_context();
            assert_eq!(
                sc.trace_id().to_string(),
                "4bf92f3577b34da6a3ce929d0e0e4736"
            );
            assert_eq!(sc.is_sampled(), sampled, "the caller's decision is kept");
            assert_eq!(child.is_recording(), sampled);
        }
    }

    #[test]
    fn a_call_carries_context_when_it_has_a_header_the_propagators_read() {
        let names = propagated_headers(&propagator());
        for name in ["traceparent", "tracestate", "baggage"] {
            assert!(names.iter().any(|n| n == name), "{name}");
        }
        let _ = PROPAGATED_HEADERS.set(names);
        let with = |name: &'static str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(name, "x".parse().expect("a header value"));
            headers
        };
        assert!(carries_context(&with("traceparent")));
        assert!(carries_context(&with("baggage")));
        assert!(!carries_context(&with("x-other")));
        assert!(!carries_context(&http::HeaderMap::new()));
    }

    #[test]
    fn the_w3c_propagator_continues_a_caller_trace_through_the_extractor() {
        let mut headers = http::HeaderMap::new();
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        headers.insert("traceparent", parent.parse().expect("a header value"));
        let propagator = opentelemetry_sdk::propagation::TraceContextPropagator::new();
        let cx = opentelemetry::propagation::TextMapPropagator::extract(
            &propagator,
            &HeaderExtractor(&headers),
        );
        let span = cx.span();
        let sc = span.span_context();
        assert!(sc.is_valid());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
    }
}
