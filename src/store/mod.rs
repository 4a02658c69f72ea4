//! Persistence behind one trait, [`Store`], implemented for PostgreSQL ([`postgres`]) and
//! SQLite ([`sqlite`]). Every mutating operation is one transaction that also records the
//! caller's `request_id`, so a repeated request replays its first response.

use async_trait::async_trait;
use uuid::Uuid;

use crate::domain::{
    AccountOnFile, BankAccount, BusinessRegistrationNumber, Claim, ClaimStatus, DisbursementStatus,
    Evidence, NewClaim, NewPartner, Partner, ReviewDecision, ReviewRefused, Tier,
};

#[macro_use]
mod sql;
pub mod postgres;
pub mod sqlite;

/// Unix microseconds: how every time is stored.
pub type Micros = i64;

pub fn now_micros() -> Micros {
    jiff::Timestamp::now().as_microsecond()
}

/// The caller's request id, the method and a digest of the rest of the request.
#[derive(Debug, Clone)]
pub struct Idempotency {
    pub request_id: Uuid,
    pub method: &'static str,
    pub fingerprint: String,
}

/// Turns a fresh result into the response bytes kept for replays.
pub type Render<'a, T> = &'a (dyn Fn(&T) -> Vec<u8> + Send + Sync);

/// A mutating call's result: done now, or the response of the first call with this request id.
#[derive(Debug)]
pub enum Stored<T> {
    Fresh(T),
    Replayed(Vec<u8>),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("a partner with this business registration number is already registered")]
    PartnerAlreadyRegistered { partner_id: Uuid },
    #[error("this partner has already filed a claim")]
    ClaimAlreadyFiled { claim_id: Uuid },
    #[error("request_id was already used with a different request")]
    RequestIdReused,
    #[error("etag does not match the partner's current etag {current}")]
    EtagMismatch { current: String },
    #[error(transparent)]
    Review(#[from] ReviewRefused),
    #[error("{field}: {description}")]
    InvalidField {
        field: &'static str,
        description: String,
    },
    #[error("the same principal may not {0}")]
    SamePrincipal(&'static str),
    #[error("{message}")]
    Precondition {
        reason: &'static str,
        message: String,
    },
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        Self::Unexpected(e.into())
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        Self::Unexpected(e.into())
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// One page: rows after `after` (ids sort by creation time), at most `limit`.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub after: Option<Uuid>,
    pub limit: u32,
}

#[derive(Debug, Clone, Default)]
pub struct PartnerFilter {
    pub business_registration_number: Option<BusinessRegistrationNumber>,
}

#[derive(Debug, Clone, Default)]
pub struct ClaimFilter {
    pub status: Option<ClaimStatus>,
    pub tier: Option<Tier>,
    pub partner_id: Option<Uuid>,
}

#[derive(Debug, Clone, Default)]
pub struct DisbursementFilter {
    pub status: Option<DisbursementStatus>,
    pub partner_id: Option<Uuid>,
}

/// One entry of the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    pub audit_event_id: Uuid,
    pub time: Micros,
    pub principal: String,
    pub method: String,
    pub resource_id: String,
    pub request_id: String,
    pub outcome_code: String,
    pub peer_address: String,
}

#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub principal: Option<String>,
    pub resource_id: Option<String>,
    pub start_time: Option<Micros>,
    pub end_time: Option<Micros>,
}

/// A reviewer's decision on a claim.
#[derive(Debug, Clone)]
pub struct Review<'a> {
    pub decision: ReviewDecision,
    pub reason: &'a str,
    pub reviewer: &'a str,
    /// The W3C trace context of the reviewing call: payment continues its trace.
    pub trace_context: Option<&'a str>,
}

/// One call to the payments backend, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub operation: String,
    pub idempotency_key: String,
    pub outcome: String,
    pub code: String,
    pub message: String,
    pub time: Micros,
}

/// One change of a disbursement's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusChange {
    pub from_status: Option<DisbursementStatus>,
    pub to_status: DisbursementStatus,
    pub actor: String,
    pub reason: String,
    pub time: Micros,
}

#[derive(Debug, Clone)]
pub struct Disbursement {
    pub disbursement_id: Uuid,
    pub claim_id: Uuid,
    pub partner_id: Uuid,
    pub amount_krw: i64,
    pub status: DisbursementStatus,
    pub failure_code: Option<String>,
    pub failure_message: Option<String>,
    pub idempotency_key: Option<String>,
    pub key_seq: i64,
    pub holder_verified: bool,
    /// Where the payout goes. The full number is only in `sealed_account`, for the dispatcher.
    pub account: AccountOnFile,
    pub sealed_account: String,
    pub create_time: Micros,
    pub update_time: Micros,
    pub attempts: Vec<Attempt>,
    pub history: Vec<StatusChange>,
    /// W3C trace context of the call that approved the claim.
    pub trace_context: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DispatchState {
    pub paused: bool,
    pub reason: String,
    pub changed_by: String,
    pub change_time: Micros,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CountKrw {
    pub count: i64,
    pub krw: i64,
}

#[derive(Debug, Clone, Default)]
pub struct ProgramSummary {
    pub approved: CountKrw,
    pub queued: CountKrw,
    pub submitted: CountKrw,
    pub paid: CountKrw,
    pub failed: CountKrw,
    pub cancelled: CountKrw,
    pub pending_review_count: i64,
    pub rejected_count: i64,
    pub dispatch: DispatchState,
}

/// How a dispatcher's step on a disbursement ended, to be recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DispatchOutcome {
    Paid,
    Failed { code: String, message: String },
}

/// The result of asking to make the instruction's key and move to `SUBMITTED`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyAssignment {
    /// The key to send under (new, or the one already made).
    Key(String),
    /// Sending would pass the programme budget; the disbursement stays `QUEUED`.
    OverBudget,
    /// The disbursement is no longer `QUEUED`/`SUBMITTED` (cancelled meanwhile).
    Gone,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    // Partners.
    async fn register_partner(
        &self,
        idem: &Idempotency,
        partner: &NewPartner,
        render: Render<'_, Partner>,
    ) -> Result<Stored<Partner>>;
    async fn get_partner(&self, partner_id: Uuid) -> Result<Option<Partner>>;
    async fn list_partners(&self, filter: &PartnerFilter, page: &Page) -> Result<Vec<Partner>>;
    async fn update_bank_account(
        &self,
        idem: &Idempotency,
        partner_id: Uuid,
        account: &BankAccount,
        etag: &str,
        actor: &str,
        render: Render<'_, Partner>,
    ) -> Result<Stored<Partner>>;

    // Claims.
    async fn submit_claim(
        &self,
        idem: &Idempotency,
        claim: &NewClaim,
        render: Render<'_, Claim>,
    ) -> Result<Stored<Claim>>;
    async fn attach_evidence(
        &self,
        idem: &Idempotency,
        claim_id: Uuid,
        evidence: &Evidence,
        actor: &str,
        render: Render<'_, Claim>,
    ) -> Result<Stored<Claim>>;
    async fn review_claim(
        &self,
        idem: &Idempotency,
        claim_id: Uuid,
        review: &Review<'_>,
        render: Render<'_, Claim>,
    ) -> Result<Stored<Claim>>;
    async fn get_claim(&self, claim_id: Uuid) -> Result<Option<Claim>>;
    async fn list_claims(&self, filter: &ClaimFilter, page: &Page) -> Result<Vec<Claim>>;

    // Disbursements.
    async fn get_disbursement(&self, disbursement_id: Uuid) -> Result<Option<Disbursement>>;
    async fn list_disbursements(
        &self,
        filter: &DisbursementFilter,
        page: &Page,
    ) -> Result<Vec<Disbursement>>;
    async fn retry_disbursement(
        &self,
        idem: &Idempotency,
        disbursement_id: Uuid,
        actor: &str,
        render: Render<'_, Disbursement>,
    ) -> Result<Stored<Disbursement>>;
    async fn cancel_disbursement(
        &self,
        idem: &Idempotency,
        disbursement_id: Uuid,
        actor: &str,
        reason: &str,
        render: Render<'_, Disbursement>,
    ) -> Result<Stored<Disbursement>>;
    async fn set_dispatch_paused(
        &self,
        idem: &Idempotency,
        paused: bool,
        actor: &str,
        reason: &str,
        render: Render<'_, DispatchState>,
    ) -> Result<Stored<DispatchState>>;
    async fn program_summary(&self) -> Result<ProgramSummary>;

    // The audit log.
    async fn append_audit(&self, events: &[AuditEvent]) -> Result<()>;
    async fn list_audit(&self, filter: &AuditFilter, page: &Page) -> Result<Vec<AuditEvent>>;

    /// Outbox rows, and the due time of the oldest (None when empty).
    async fn outbox_stats(&self) -> Result<(i64, Option<Micros>)>;

    // The dispatcher.
    /// Leases up to `limit` due outbox rows until `lease_until`; none while dispatch is paused.
    async fn lease_due(&self, now: Micros, lease_until: Micros, limit: u32) -> Result<Vec<Uuid>>;
    async fn record_attempt(&self, disbursement_id: Uuid, attempt: &Attempt) -> Result<()>;
    async fn mark_holder_verified(&self, disbursement_id: Uuid) -> Result<()>;
    /// Makes (or returns) the instruction key and moves `QUEUED -> SUBMITTED`, within `budget_krw`.
    async fn assign_key(
        &self,
        disbursement_id: Uuid,
        budget_krw: Option<i64>,
        now: Micros,
    ) -> Result<KeyAssignment>;
    /// Ends the disbursement's dispatch: `PAID`, or `FAILED` with a code; removes its outbox row.
    async fn finish_dispatch(
        &self,
        disbursement_id: Uuid,
        outcome: &DispatchOutcome,
        now: Micros,
    ) -> Result<()>;
    /// Releases the lease and makes the row due again at `due_time(failures so far)`, counting
    /// one more failure first if `failed`.
    async fn reschedule(
        &self,
        disbursement_id: Uuid,
        failed: bool,
        due_time: &(dyn Fn(u32) -> Micros + Send + Sync),
    ) -> Result<()>;
}
