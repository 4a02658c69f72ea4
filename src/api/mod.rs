//! The gRPC services: proto in, domain types (which validate) to the store, proto out.
//! Handlers are thin; errors become canonical codes with `google.rpc` details.

use std::sync::Arc;

use base64::Engine as _;
use prost::Message;
use sha2::{Digest, Sha256};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use uuid::Uuid;

use crate::audit::{AuditDraft, CallRecord, Resource};
use crate::domain::{Invalid, Policy};
use crate::status::{internal, retryable, status_with_reason};
use crate::store::{self, AuditEvent, Idempotency, Page, Store, StoreError, Stored};
use operation::Changed;

pub mod audit;
pub mod claims;
pub mod convert;
pub mod disbursements;
pub mod events;
pub mod finance;
pub mod group_commit;
pub mod imports;
pub mod listing;
pub mod operation;
pub mod partners;

/// What every service handler needs.
#[derive(Clone)]
pub struct Context {
    pub store: Arc<dyn Store>,
    pub policy: Arc<Policy>,
    /// Where unary RegisterPartner and SubmitClaim calls go, to share commits.
    pub intake: Arc<group_commit::GroupCommit>,
}

impl Context {
    /// Also starts the group-commit tasks, so it must run inside the Tokio runtime.
    pub fn new(store: Arc<dyn Store>, policy: Arc<Policy>) -> Self {
        let intake = Arc::new(group_commit::GroupCommit::spawn(store.clone()));
        Self {
            store,
            policy,
            intake,
        }
    }
}

/// The path of a request field (`partner.bank_account.bank_code`, `items[2].service`), as
/// [`Violations::check`] takes it.
pub trait FieldPath {
    fn path(self) -> String;
}

impl FieldPath for &str {
    fn path(self) -> String {
        self.to_owned()
    }
}

impl FieldPath for String {
    fn path(self) -> String {
        self
    }
}

impl FieldPath for std::fmt::Arguments<'_> {
    fn path(self) -> String {
        self.to_string()
    }
}

/// Collects every bad field of a request, so one error names them all.
#[derive(Default)]
pub struct Violations(Vec<(String, String)>);

impl Violations {
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push((field.into(), description.into()));
    }

    /// Keeps a parsed value, or records why it was refused under `field`. A field path
    /// made of parts is best given as `format_args!`: it is then written out only for a
    /// refused value, not for every good one.
    pub fn check<T>(&mut self, field: impl FieldPath, parsed: Result<T, Invalid>) -> Option<T> {
        parsed.map_err(|e| self.add(field.path(), e.0)).ok()
    }

    pub fn request_id(&mut self, raw: &str) -> Option<Uuid> {
        self.check(
            "request_id",
            Uuid::parse_str(raw.trim())
                .ok()
                .filter(|id| !id.is_nil())
                .ok_or_else(|| Invalid::new("must be a UUID chosen by the caller")),
        )
    }

    /// The id in `raw` (a `PartnerId`, `ClaimId`, ... as the caller expects), or why not under
    /// `field`.
    pub fn id<T: From<Uuid>>(&mut self, field: &str, raw: &str) -> Option<T> {
        self.check(
            field,
            Uuid::parse_str(raw.trim())
                .map(T::from)
                .map_err(|_| Invalid::new("must be a UUID")),
        )
    }

    /// An optional id filter: empty means none.
    pub fn optional_id<T: From<Uuid>>(&mut self, field: &str, raw: &str) -> Option<T> {
        if raw.is_empty() {
            return None;
        }
        self.id(field, raw)
    }

    /// `INVALID_ARGUMENT` with a `BadRequest` naming every field, if any was bad.
    pub fn finish(self) -> Result<(), Status> {
        if self.0.is_empty() {
            return Ok(());
        }
        let message = self
            .0
            .iter()
            .map(|(f, d)| format!("{f}: {d}"))
            .collect::<Vec<_>>()
            .join("; ");
        let mut details = ErrorDetails::new();
        for (field, description) in self.0 {
            details.add_bad_request_violation(field, description);
        }
        Err(Status::with_error_details(
            Code::InvalidArgument,
            message,
            details,
        ))
    }
}

/// When a call the database could not take may be tried again: about when a pool that lost
/// its connections has made new ones, or the health probe has looked again.
pub const DATABASE_RETRY_DELAY: std::time::Duration = std::time::Duration::from_secs(1);
/// When a call whose transaction lost to contention (after the service's own retries) may be
/// tried again.
pub const CONTENTION_RETRY_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

/// The code [`Status::from`] gives a store error, without making the status.
pub fn code_of(e: &StoreError) -> Code {
    match e {
        StoreError::NotFound(_) => Code::NotFound,
        StoreError::PartnerAlreadyRegistered { .. } | StoreError::ClaimAlreadyFiled { .. } => {
            Code::AlreadyExists
        }
        StoreError::RequestIdReused | StoreError::Review(_) | StoreError::Precondition { .. } => {
            Code::FailedPrecondition
        }
        StoreError::EtagMismatch { .. } => Code::Aborted,
        StoreError::InvalidField { .. } => Code::InvalidArgument,
        StoreError::SamePrincipal(_) => Code::PermissionDenied,
        StoreError::Unavailable(_) => Code::Unavailable,
        StoreError::Contention(_) => Code::Aborted,
        StoreError::Unexpected(_) => Code::Internal,
    }
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => status_with_reason(
                Code::NotFound,
                &format!("{}_NOT_FOUND", what.to_uppercase()),
                format!("{what} not found"),
                &[],
            ),
            StoreError::PartnerAlreadyRegistered { partner_id } => status_with_reason(
                Code::AlreadyExists,
                "PARTNER_ALREADY_REGISTERED",
                e.to_string(),
                &[("partner_id", partner_id.to_string())],
            ),
            StoreError::ClaimAlreadyFiled { claim_id } => status_with_reason(
                Code::AlreadyExists,
                "CLAIM_ALREADY_FILED",
                e.to_string(),
                &[("claim_id", claim_id.to_string())],
            ),
            StoreError::RequestIdReused => status_with_reason(
                Code::FailedPrecondition,
                "REQUEST_ID_REUSED",
                e.to_string(),
                &[],
            ),
            StoreError::EtagMismatch { ref current } => status_with_reason(
                Code::Aborted,
                "ETAG_MISMATCH",
                "the partner changed since this etag was read; read it again and retry",
                &[("current_etag", current.clone())],
            ),
            StoreError::InvalidField { field, description } => {
                let mut v = Violations::default();
                v.add(field, description);
                v.finish().expect_err("one violation")
            }
            StoreError::Review(ref refused) => {
                let reason = match refused {
                    crate::domain::ReviewRefused::NotPendingReview(_) => "CLAIM_NOT_PENDING_REVIEW",
                    crate::domain::ReviewRefused::EvidenceRequired => "EVIDENCE_REQUIRED",
                };
                status_with_reason(Code::FailedPrecondition, reason, e.to_string(), &[])
            }
            StoreError::SamePrincipal(_) => {
                status_with_reason(Code::PermissionDenied, "SAME_PRINCIPAL", e.to_string(), &[])
            }
            StoreError::Precondition { reason, message } => {
                status_with_reason(Code::FailedPrecondition, reason, message, &[])
            }
            StoreError::Unavailable(error) => {
                // The health probe warns once of the outage; each call's own failure is
                // logged with its span.
                tracing::debug!(error = format!("{error:#}"), "database unavailable");
                retryable(
                    Code::Unavailable,
                    "DATABASE_UNAVAILABLE",
                    "the database is unavailable; retry later (a mutating call with the same \
                     request_id)",
                    DATABASE_RETRY_DELAY,
                )
            }
            StoreError::Contention(error) => {
                tracing::warn!(error = format!("{error:#}"), "database contention");
                retryable(
                    Code::Aborted,
                    "DATABASE_CONTENTION",
                    "the database rolled the transaction back for contention, every time it \
                     was tried; retry (a mutating call with the same request_id)",
                    CONTENTION_RETRY_DELAY,
                )
            }
            StoreError::Unexpected(error) => {
                tracing::error!(error = format!("{error:#}"), "store failure");
                internal("internal error; it has been logged")
            }
        }
    }
}

/// Names on the current RPC span, and in the call's audit entry, what the call touched: ids
/// left empty (a claim not yet paid has no disbursement) are skipped.
pub fn record_touched(call: &CallRecord, touched: &[(Resource, &str)]) {
    let touched = touched.iter().filter(|(_, id)| !id.is_empty());
    crate::telemetry::record_resources(touched.clone().map(|&(resource, id)| {
        let key = match resource {
            Resource::Partner => "payouts.partner_id",
            Resource::Disbursement => "payouts.disbursement_id",
            Resource::Claim => "payouts.claim_id",
        };
        (key, id)
    }));
    for &(resource, id) in touched {
        call.touched(resource, id);
    }
}

/// The audit entry of a call written in a batch (a shared commit, an import), from its draft
/// and what the batch answered it; `resource` names what a stored answer acted on.
pub fn batch_entry<T>(
    draft: &AuditDraft,
    answer: &store::Result<Stored<T>>,
    resource: impl Fn(&Stored<T>) -> String,
) -> AuditEvent {
    match answer {
        Ok(stored) => draft
            .opened(resource(stored))
            .replayed(matches!(stored, Stored::Replayed(_)))
            .close(Code::Ok),
        Err(e) => draft.event(String::new(), code_of(e)),
    }
}

/// The id the audit log names for an answer a batch stored: the fresh value's (see
/// [`Changed`]), or the one `named` reads from the first call's response, replayed.
pub fn stored_id<T: Changed, R: Message + Default>(
    stored: &Stored<T>,
    named: impl FnOnce(R) -> Option<String>,
) -> String {
    match stored {
        Stored::Fresh(value) => value.resource_id(),
        Stored::Replayed(bytes) => decode_replay(bytes)
            .ok()
            .and_then(named)
            .unwrap_or_default(),
    }
}

/// A digest of the request without its `request_id`: the same id must come with the same body.
pub fn fingerprint<M: Message>(request: &M) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    // Lower-case hex, as stored fingerprints are, pushed into a string of its size
    // (`hex::encode` builds its string through a character iterator, at several times the cost).
    let digest = Sha256::digest(request.encode_to_vec());
    let mut hex = String::with_capacity(2 * digest.len());
    for byte in digest {
        hex.push(char::from(DIGITS[usize::from(byte >> 4)]));
        hex.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    hex
}

/// The idempotency record of `principal`'s call: a request id is its sender's, so the same id
/// from another principal is another request.
pub fn idempotency(
    principal: &str,
    request_id: Uuid,
    method: &'static str,
    body: &impl Message,
) -> Idempotency {
    Idempotency {
        principal: principal.to_owned(),
        request_id,
        method,
        fingerprint: fingerprint(body),
    }
}

/// One mutating call through the store, shaped once: its request id and its audit entry are
/// recorded with its rows in one transaction ([`Mutation::recorded`]), and its answer is the
/// fresh result or the first call's response replayed ([`Mutation::answer`]). The audit layer
/// writes the entries of calls that stored nothing (refused, failed, replayed).
pub struct Mutation<T, R> {
    call: CallRecord,
    idem: Idempotency,
    audited: bool,
    to_proto: fn(&T) -> R,
    render: Box<store::RenderFn<'static, T>>,
    entry: Box<store::AuditFn<'static, T>>,
}

impl<T: 'static, R: Message + Default + 'static> Mutation<T, R> {
    /// `resource` names what a fresh result acted on in its audit entry (the most specific
    /// resource, as `record_touched` ranks them); `to_proto` makes the response.
    pub fn new(
        call: &CallRecord,
        idem: Idempotency,
        resource: fn(&T) -> String,
        to_proto: fn(&T) -> R,
    ) -> Self {
        let draft = call.draft();
        Self {
            call: call.clone(),
            idem,
            audited: draft.is_some(),
            to_proto,
            render: Box::new(move |value| to_proto(value).encode_to_vec()),
            entry: Box::new(move |value| Some(draft.as_ref()?.event(resource(value), Code::Ok))),
        }
    }

    /// What the store records beside the call's rows.
    pub fn recorded(&self) -> store::Recorded<'_, T> {
        store::Recorded::audited(&self.idem, &*self.render, &*self.entry)
    }

    /// The call's answer once `write` (the store call, given [`Mutation::recorded`]) is done;
    /// tells the audit layer the entry was written with the rows, if it was.
    pub async fn answer(
        &self,
        write: impl Future<Output = store::Result<Stored<T>>>,
    ) -> Result<tonic::Response<R>, Status> {
        let stored = write.await?;
        if self.audited && matches!(stored, Stored::Fresh(_)) {
            self.call.audited();
        }
        respond(&self.call, stored, self.to_proto)
    }
}

/// The response of a mutating call: made now, or the first call's, replayed (which the
/// call's audit entry then says).
pub fn respond<T, R: Message + Default>(
    call: &CallRecord,
    stored: Stored<T>,
    to_proto: impl Fn(&T) -> R,
) -> Result<tonic::Response<R>, Status> {
    match stored {
        Stored::Fresh(value) => Ok(tonic::Response::new(to_proto(&value))),
        Stored::Replayed(bytes) => {
            call.replayed();
            decode_replay(&bytes).map(tonic::Response::new)
        }
    }
}

/// What a get call asks for: the id in the request's `field` (`INVALID_ARGUMENT` naming the
/// field when it is not one), and what `get` finds under it in the store (`NOT_FOUND` naming
/// `what` when there is nothing).
pub async fn found<Id: From<Uuid>, T, F>(
    field: &str,
    raw: &str,
    what: &'static str,
    get: impl FnOnce(Id) -> F,
) -> Result<T, Status>
where
    F: Future<Output = store::Result<Option<T>>>,
{
    let mut v = Violations::default();
    let id = v.id(field, raw);
    v.finish()?;
    let found = get(id.ok_or_else(missing)?).await?;
    found.ok_or_else(|| StoreError::NotFound(what).into())
}

/// The error of a handler whose checks passed without giving it every value (a bug).
pub fn missing() -> Status {
    crate::status::internal("validation passed without values")
}

/// A response kept for replays, read back.
pub fn decode_replay<R: Message + Default>(bytes: &[u8]) -> Result<R, Status> {
    R::decode(bytes).map_err(|e| internal(format!("stored response unreadable: {e}")))
}

pub const DEFAULT_PAGE_SIZE: u32 = 50;
pub const MAX_PAGE_SIZE: u32 = 1000;

/// `page_size` (default 50, at most 1000) and the opaque `page_token` of a list call.
pub fn page(v: &mut Violations, page_size: i32, page_token: &str) -> Page {
    let limit = match page_size {
        0 => DEFAULT_PAGE_SIZE,
        n if n < 0 => {
            v.add("page_size", "must not be negative");
            DEFAULT_PAGE_SIZE
        }
        n => (n.unsigned_abs()).min(MAX_PAGE_SIZE),
    };
    let after = if page_token.is_empty() {
        None
    } else {
        v.check(
            "page_token",
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(page_token)
                .ok()
                .and_then(|b| Uuid::from_slice(&b).ok())
                .ok_or_else(|| Invalid::new("is not a token this service gave out")),
        )
    };
    Page { after, limit }
}

/// The token for the page after `last`, if the page was full.
pub fn next_page_token(page: &Page, returned: usize, last: Option<impl Into<Uuid>>) -> String {
    match last.map(Into::into) {
        Some(id) if returned == page.limit as usize => {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id.as_bytes())
        }
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ClaimStatus, ReviewRefused};
    use crate::proto::payouts::v1 as pb;

    /// Fingerprints already stored with request ids are compared with new ones: the form
    /// must not change.
    #[test]
    fn a_fingerprint_is_the_lower_case_hex_sha256_of_the_encoded_request() {
        let request = pb::RegisterPartnerRequest {
            request_id: String::new(),
            partner: Some(pb::Partner {
                legal_name: "카카오 가게".into(),
                affected_services: vec![1, 2],
                ..pb::Partner::default()
            }),
        };
        let printed = fingerprint(&request);
        assert_eq!(
            printed,
            hex::encode(Sha256::digest(request.encode_to_vec()))
        );
        assert_eq!(printed.len(), 64);
        assert!(
            printed
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_eq!(
            fingerprint(&pb::RegisterPartnerRequest::default()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn code_of_is_the_code_of_the_status_a_store_error_becomes() {
        let errors = || {
            vec![
                StoreError::NotFound("partner"),
                StoreError::PartnerAlreadyRegistered {
                    partner_id: Uuid::nil().into(),
                },
                StoreError::ClaimAlreadyFiled {
                    claim_id: Uuid::nil().into(),
                },
                StoreError::RequestIdReused,
                StoreError::EtagMismatch {
                    current: "1".into(),
                },
                StoreError::Review(ReviewRefused::EvidenceRequired),
                StoreError::Review(ReviewRefused::NotPendingReview(ClaimStatus::Approved)),
                StoreError::InvalidField {
                    field: "f",
                    description: "bad".into(),
                },
                StoreError::SamePrincipal("x"),
                StoreError::Precondition {
                    reason: "R",
                    message: "m".into(),
                },
                StoreError::Unavailable(anyhow::anyhow!("connection refused")),
                StoreError::Contention(anyhow::anyhow!("40P01")),
                StoreError::Unexpected(anyhow::anyhow!("boom")),
            ]
        };
        for (e, again) in errors().into_iter().zip(errors()) {
            let code = code_of(&e);
            assert_eq!(code, Status::from(again).code(), "{e:?}");
        }
    }
}
