//! The gRPC statuses this service answers with: canonical codes carrying a
//! `google.rpc.ErrorInfo` of the `payouts` domain.

use std::collections::HashMap;

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
