//! The SERVER span of every RPC and its `rpc.server.call.duration`, by OpenTelemetry's RPC
//! conventions.
//!
//! The metric's attribute sets are made once per method and status code (see [`MethodTable`])
//! and read by reference on every call: a call allocates nothing for its metric.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Instant;

use futures::future::BoxFuture;
use opentelemetry::{KeyValue, global};
use prost::Message as _;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::{HeaderExtractor, metrics};
use crate::middleware::{Around, Middleware};

/// gRPC status codes: 0 (`OK`) to 16 (`UNAUTHENTICATED`).
const CODES: usize = 17;

/// Whether a call answered `code` failed on the server's side: only those make the span's
/// status ERROR. A caller's bad input, a missing row or a refused permission leave it unset.
pub fn is_server_error(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Unknown | DeadlineExceeded | Unimplemented | Internal | Unavailable | DataLoss
    )
}

/// A method's names and its metric attributes, one set per status code.
struct MethodAttributes {
    service: &'static str,
    method: &'static str,
    by_code: [[KeyValue; 4]; CODES],
}

impl MethodAttributes {
    fn new(service: &'static str, method: &'static str) -> Self {
        Self {
            service,
            method,
            by_code: std::array::from_fn(|code| {
                [
                    KeyValue::new("rpc.system", "grpc"),
                    KeyValue::new("rpc.service", service),
                    KeyValue::new("rpc.method", method),
                    KeyValue::new("rpc.grpc.status_code", code as i64),
                ]
            }),
        }
    }

    fn for_code(&self, code: tonic::Code) -> &[KeyValue] {
        let i = (code as usize).min(CODES - 1);
        &self.by_code[i]
    }
}

/// Every method of the services in the descriptor set, by path (`payouts.v1.X/Method`), and
/// `_OTHER` for a path that names none (the conventions' value, which keeps the metric's
/// series bounded whatever a caller sends).
struct MethodTable {
    by_path: HashMap<&'static str, MethodAttributes>,
    other: MethodAttributes,
}

impl MethodTable {
    fn get() -> &'static Self {
        static TABLE: OnceLock<MethodTable> = OnceLock::new();
        TABLE.get_or_init(|| {
            let set = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET)
                .unwrap_or_default();
            let mut by_path = HashMap::new();
            for file in &set.file {
                for service in &file.service {
                    let full: &'static str =
                        format!("{}.{}", file.package(), service.name()).leak();
                    for method in &service.method {
                        let name: &'static str = method.name().to_owned().leak();
                        let path: &'static str = format!("{full}/{name}").leak();
                        by_path.insert(path, MethodAttributes::new(full, name));
                    }
                }
            }
            MethodTable {
                by_path,
                other: MethodAttributes::new("_OTHER", "_OTHER"),
            }
        })
    }

    fn method(&self, path: &str) -> &MethodAttributes {
        self.by_path.get(path).unwrap_or(&self.other)
    }
}

/// What became of a call, on its span and in `rpc.server.call.duration`: recorded once, when
/// its status is known or, if the call is dropped unanswered first, as its deadline tells
/// (`DEADLINE_EXCEEDED` once it has come, else `CANCELLED`: the caller went away).
struct Outcome {
    span: tracing::Span,
    started: Instant,
    method: &'static MethodAttributes,
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
        let elapsed = self.started.elapsed().as_secs_f64();
        self.span.record("rpc.grpc.status_code", code as i64);
        if is_server_error(code) {
            self.span.record("otel.status_code", "ERROR");
        }
        if code == tonic::Code::Ok {
            tracing::debug!(parent: &self.span, elapsed_s = elapsed, "rpc finished");
        } else {
            let code = code as i64;
            tracing::info!(parent: &self.span, code, elapsed_s = elapsed, "rpc failed");
        }
        metrics()
            .rpc_duration
            .record(elapsed, self.method.for_code(code));
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

/// The SERVER span of a call to `method`, with what the request tells of both ends.
fn server_span<B>(
    method: &MethodAttributes,
    path: &str,
    request: &http::Request<B>,
) -> tracing::Span {
    let authority = request.uri().authority();
    // Written once as text: both the log and the trace layer take it as it is, where a
    // displayed value would be formatted by each.
    let peer = crate::net::peer_addr(request).map(|p| crate::net::ip_text(p.ip()));
    // A root among the spans: its parent is the caller's trace, if it sent one.
    tracing::info_span!(
        parent: None,
        "rpc",
        otel.name = path,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = method.service,
        rpc.method = method.method,
        rpc.grpc.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        server.address = authority.map(http::uri::Authority::host),
        // An i64: the OpenTelemetry layer records unsigned integers as text.
        server.port = authority
            .and_then(http::uri::Authority::port_u16)
            .map(i64::from),
        network.peer.address = peer.as_deref(),
    )
}

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
        let path = request.uri().path().trim_start_matches('/');
        if path.starts_with("grpc.health.") || path.starts_with("grpc.reflection.") {
            return Box::pin(inner.call(request));
        }
        let method = MethodTable::get().method(path);
        let span = server_span(method, path, &request);
        if super::carries_context(request.headers()) {
            let parent =
                global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(request.headers())));
            let _ = span.set_parent(parent);
        }
        let outcome = Outcome {
            span: span.clone(),
            started: Instant::now(),
            method,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_server_faults_make_a_span_an_error() {
        use tonic::Code::*;
        let errors: Vec<tonic::Code> = (0..CODES as i32)
            .map(tonic::Code::from_i32)
            .filter(|c| is_server_error(*c))
            .collect();
        assert_eq!(
            errors,
            [
                Unknown,
                DeadlineExceeded,
                Unimplemented,
                Internal,
                Unavailable,
                DataLoss
            ]
        );
    }

    #[test]
    fn each_method_has_its_bare_name_and_an_unknown_path_is_other() {
        let table = MethodTable::get();
        let m = table.method("payouts.v1.PartnerService/RegisterPartner");
        assert_eq!(
            (m.service, m.method),
            ("payouts.v1.PartnerService", "RegisterPartner")
        );
        let attributes = m.for_code(tonic::Code::InvalidArgument);
        assert_eq!(
            attributes[2],
            KeyValue::new("rpc.method", "RegisterPartner")
        );
        assert_eq!(attributes[3], KeyValue::new("rpc.grpc.status_code", 3_i64));
        let other = table.method("payouts.v1.PartnerService/NoSuchMethod");
        assert_eq!((other.service, other.method), ("_OTHER", "_OTHER"));
    }
}
