//! The gRPC statuses this service answers with: canonical codes carrying a
//! `google.rpc.ErrorInfo` of the `payouts` domain, a `RetryInfo` where a retry may succeed,
//! and on `INTERNAL` a `RequestInfo` naming the call's trace.

use std::collections::HashMap;
use std::time::Duration;

use prost::Message;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `ErrorInfo` domain of every error this service returns.
pub const ERROR_DOMAIN: &str = "payouts";

/// A status with `ErrorInfo{reason, domain: payouts, metadata}`.
pub fn status_with_reason(
    code: Code,
    reason: &str,
    message: impl Into<String>,
    metadata: &[(&str, String)],
) -> Status {
    let metadata: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata),
    )
}

/// A status a caller may retry as it is: `ErrorInfo{reason, domain: payouts}` and
/// `RetryInfo{retry_delay}`.
pub fn retryable(
    code: Code,
    reason: &str,
    message: impl Into<String>,
    retry_delay: Duration,
) -> Status {
    let millis = retry_delay.as_millis().to_string();
    let mut details = ErrorDetails::with_error_info(
        reason,
        ERROR_DOMAIN,
        [("retry_delay_ms".to_owned(), millis)],
    );
    details.set_retry_info(Some(retry_delay));
    Status::with_error_details(code, message, details)
}

/// `INTERNAL`: a fault of ours, never the caller's. It carries `RequestInfo` whose
/// `request_id` is the call's trace id (when the call is traced), so that an operator finds
/// the trace and the logged error from what the caller saw.
pub fn internal(message: impl std::fmt::Display) -> Status {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let context = tracing::Span::current().context();
    let span = context.span();
    let trace = span.span_context();
    if !trace.is_valid() {
        return Status::internal(message.to_string());
    }
    let trace_id = trace.trace_id().to_string();
    Status::with_error_details(
        Code::Internal,
        format!("{message} (trace {trace_id})"),
        ErrorDetails::with_request_info(trace_id, ""),
    )
}

/// A call's error as a `google.rpc.Status` message, details and all, for a response that
/// reports it in a field (as bulk intake does per row).
pub fn status_message(status: &Status) -> crate::proto::google::rpc::Status {
    // A status made with error details carries them as an encoded google.rpc.Status.
    let mut message =
        crate::proto::google::rpc::Status::decode(status.details()).unwrap_or_default();
    message.code = status.code() as i32;
    message.message = status.message().to_owned();
    message
}

/// The details of a `RESOURCE_EXHAUSTED` status and the retry delay they ask for, checked to
/// be within a second.
#[cfg(test)]
pub(crate) fn exhausted_retry_within_a_second(status: &Status) -> (ErrorDetails, Duration) {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let details = status.get_error_details();
    let retry = details
        .retry_info()
        .and_then(|r| r.retry_delay)
        .expect("retry delay");
    assert!(
        retry > Duration::ZERO && retry <= Duration::from_secs(1),
        "{retry:?}"
    );
    (details, retry)
}
