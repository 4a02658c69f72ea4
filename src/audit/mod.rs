//! The audit log: the one place that makes its entries and writes them.
//!
//! - [`AuditDraft`]: who called which method, from where, with which request id. Every entry
//!   is made from one, here and nowhere else ([`AuditDraft::opened`], [`AuditDraft::event`]).
//! - [`CallRecord`]: what a handler learns about its mutating call (its request id, the
//!   resource it acted on, a replay, an entry already written with its rows). The
//!   [`AuditLayer`] puts one in each such request's extensions; handlers take it from there
//!   and hand it on to whatever notes something.
//! - [`AuditLayer`]: the tower layer that writes the entry of every mutating call that passed
//!   authentication, before the caller sees the answer (a stream's, before its trailers).
//! - [`AuditDenials`]: the [`DenialSink`](crate::auth::DenialSink) that records refused calls
//!   in aggregate.

use tonic::Code;
use uuid::Uuid;

use crate::store::{AuditEvent, Micros, now_micros};

mod call;
mod denials;
mod layer;
mod writer;

pub use call::{CallRecord, Resource};
pub use denials::AuditDenials;
pub use layer::{AuditLayer, AuditedService};

/// The audit entry of a call, but for what became of it: who called which method, from
/// where, with which request id (empty when it had none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditDraft {
    pub principal: String,
    pub method: String,
    pub peer_address: String,
    pub request_id: String,
}

impl AuditDraft {
    pub fn new(
        principal: impl Into<String>,
        method: impl Into<String>,
        peer_address: impl Into<String>,
    ) -> Self {
        Self {
            principal: principal.into(),
            method: method.into(),
            peer_address: peer_address.into(),
            request_id: String::new(),
        }
    }

    pub fn with_request_id(self, request_id: impl Into<String>) -> Self {
        Self {
            request_id: request_id.into(),
            ..self
        }
    }

    /// The entry of one call that acted on `resource_id` (empty: none), made now; its
    /// outcome is given when known ([`OpenEntry::close`]).
    pub fn opened(&self, resource_id: String) -> OpenEntry {
        OpenEntry(AuditEvent {
            audit_event_id: Uuid::now_v7(),
            time: now_micros(),
            principal: self.principal.clone(),
            method: self.method.clone(),
            resource_id,
            request_id: self.request_id.clone(),
            outcome_code: String::new(),
            peer_address: self.peer_address.clone(),
            count: 1,
            replayed: false,
        })
    }

    /// The entry of one call, with the resource it acted on and its outcome.
    pub fn event(&self, resource_id: String, code: Code) -> AuditEvent {
        self.opened(resource_id).close(code)
    }
}

/// An audit entry whose outcome is not known yet (a stream's, until it ends).
#[derive(Debug, Clone)]
pub struct OpenEntry(AuditEvent);

impl OpenEntry {
    /// Says whether the call was answered with the first response to its request id.
    pub fn replayed(mut self, replayed: bool) -> Self {
        self.0.replayed = replayed;
        self
    }

    /// Makes the entry stand for `count` calls, the first of them at `first`.
    pub fn calls(mut self, count: i64, first: Micros) -> Self {
        self.0.count = count;
        self.0.time = first;
        self
    }

    /// The entry, with the call's outcome.
    pub fn close(mut self, code: Code) -> AuditEvent {
        self.0.outcome_code = code_name(code);
        self.0
    }

    /// The method the entry records.
    pub fn method(&self) -> &str {
        &self.0.method
    }
}

/// A gRPC code as the audit log writes it: `PERMISSION_DENIED`.
pub fn code_name(code: Code) -> String {
    code_str(code).to_owned()
}

fn code_str(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_is_named_as_its_variant_in_upper_snake_case() {
        for n in 0..=16 {
            let code = Code::from_i32(n);
            let snake = format!("{code:?}")
                .chars()
                .fold(String::new(), |mut out, c| {
                    if c.is_uppercase() && !out.is_empty() {
                        out.push('_');
                    }
                    out.push(c.to_ascii_uppercase());
                    out
                });
            assert_eq!(code_name(code), snake, "code {n}");
        }
        assert_eq!(
            Code::from_i32(17),
            Code::Unknown,
            "a code beyond 16 was added"
        );
    }

    #[test]
    fn outcome_codes_are_upper_snake_case() {
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::PermissionDenied), "PERMISSION_DENIED");
        assert_eq!(code_name(Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(code_name(Code::Unauthenticated), "UNAUTHENTICATED");
    }

    #[test]
    fn an_entry_is_one_call_of_its_draft_until_told_otherwise() {
        let draft = AuditDraft::new("ops", "/payouts.v1.ClaimService/ReviewClaim", "192.0.2.1:9")
            .with_request_id("r-1");
        let event = draft.event("c-1".to_owned(), Code::Ok);
        assert_eq!(event.principal, "ops");
        assert_eq!(event.method, "/payouts.v1.ClaimService/ReviewClaim");
        assert_eq!(event.peer_address, "192.0.2.1:9");
        assert_eq!(event.request_id, "r-1");
        assert_eq!(event.resource_id, "c-1");
        assert_eq!(event.outcome_code, "OK");
        assert_eq!(event.count, 1);
        assert!(!event.replayed);

        let replayed = draft
            .opened(String::new())
            .replayed(true)
            .close(Code::NotFound);
        assert!(replayed.replayed);
        assert_eq!(replayed.outcome_code, "NOT_FOUND");

        let many = draft.opened(String::new()).calls(7, 42).close(Code::Ok);
        assert_eq!((many.count, many.time), (7, 42));
    }
}
