//! Persistence: one trait per aggregate ([`PartnerStore`], [`ClaimStore`],
//! [`DisbursementStore`], [`DispatchStore`], [`SettlementStore`], [`AuditStore`],
//! [`EventStore`]: the change feed, written last by every transaction that changes state) and one for
//! the sealed account numbers as a whole ([`SealingStore`]), together
//! [`Store`], implemented for PostgreSQL ([`postgres`]) and SQLite ([`sqlite`]) by the same SQL
//! code. Every mutating operation is one transaction that also records the caller's
//! `request_id` under the caller's principal, so a repeated request from the same principal
//! replays its first response, and writes the call's audit entry with its rows.
//!
//! The store enforces atomicity (a conditional update that finds its row changed answers so);
//! what may happen (who may review, which status may be retried) is decided in `domain`.

use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use crate::domain::{
    AccountOnFile, AttemptOperation, AttemptOutcome, BankAccount, BusinessRegistrationNumber,
    Claim, ClaimId, ClaimStatus, DisbursementId, DisbursementStatus, Evidence, NewClaim,
    NewPartner, Partner, PartnerId, ReviewDecision, Tier,
};
// Finance: export and reconciliation.
use crate::domain::{Krw, PersonOrBusinessName, SettlementLine, SettlementMismatch};

pub mod batch;
#[macro_use]
mod dialect;
mod error;
pub mod events;
mod held;
mod idempotency;
mod intake;
pub mod isolate;
pub mod postgres;
pub mod roles;
mod rows;
mod schema;
mod sealed;
pub mod sqlite;

use error::within;
pub use error::{CONTENTION_ATTEMPTS, Result, StoreError, retry_contention};
pub use events::EventStore;
pub use idempotency::{AuditFn, AuditOf, Idempotency, Recorded, Render, RenderFn};
pub use sealed::{ResealAudit, ResealBatch, ResealPage, SealedKeys, SealedPlace, SealingStore};

/// How a store holds its connections to the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    /// Connections at most (PostgreSQL; SQLite keeps 8).
    pub max_connections: u32,
    /// How long an operation waits for a connection before it fails `Unavailable`.
    pub acquire_timeout: Duration,
    /// SQLite: how long a writer waits for another's lock before it fails `Unavailable`.
    pub busy_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(2),
            busy_timeout: Duration::from_secs(10),
        }
    }
}

/// Unix microseconds: how every time is stored.
pub type Micros = i64;

pub fn now_micros() -> Micros {
    jiff::Timestamp::now().as_microsecond()
}

/// Makes the audit entry for row `i` of a batch from what the batch answered it (`None`: the
/// row is not audited by the batch).
pub type AuditRow<'a, T> =
    &'a (dyn Fn(usize, &Result<Stored<T>>) -> Option<AuditEvent> + Send + Sync);

/// The audit log entries a batch writes in its own transaction, so a stored row is never
/// without its entry (nor an entry without its row).
pub struct BatchAudit<'a, T> {
    pub row: AuditRow<'a, T>,
    /// Entries of rows refused before they reached the store (invalid rows of an import).
    pub refused: &'a [AuditEvent],
}

impl<T> Clone for BatchAudit<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for BatchAudit<'_, T> {}

impl<T> BatchAudit<'_, T> {
    /// The entries for `answers`, the refused rows' first.
    pub fn events(&self, answers: &[Result<Stored<T>>]) -> Vec<AuditEvent> {
        self.refused
            .iter()
            .cloned()
            .chain(
                answers
                    .iter()
                    .enumerate()
                    .filter_map(|(i, a)| (self.row)(i, a)),
            )
            .collect()
    }
}

/// A mutating call's result: done now, or the response of the first call with this request id.
#[derive(Debug)]
pub enum Stored<T> {
    Fresh(T),
    Replayed(Vec<u8>),
}

/// One page: rows after `after` (ids sort by creation time), at most `limit`. The api's
/// page tokens name any kind of row, so a listing's page is over bare ids; a page over one
/// kind of row names it (`Page<DisbursementId>`).
#[derive(Debug, Clone, Default)]
pub struct Page<Id = Uuid> {
    pub after: Option<Id>,
    pub limit: u32,
}

impl<Id> Page<Id> {
    /// The first page, of at most `limit` rows.
    pub fn first(limit: u32) -> Self {
        Self { after: None, limit }
    }
}

#[derive(Debug, Clone, Default)]
pub struct PartnerFilter {
    pub business_registration_number: Option<BusinessRegistrationNumber>,
}

#[derive(Debug, Clone, Default)]
pub struct ClaimFilter {
    pub status: Option<ClaimStatus>,
    pub tier: Option<Tier>,
    pub partner_id: Option<PartnerId>,
}

#[derive(Debug, Clone, Default)]
pub struct DisbursementFilter {
    pub status: Option<DisbursementStatus>,
    pub partner_id: Option<PartnerId>,
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
    /// How many calls the entry stands for: 1, or more for refused calls recorded in
    /// aggregate (one entry per peer, method and outcome per interval).
    pub count: i64,
    /// The call was answered by replaying the first response to its request id.
    pub replayed: bool,
}

#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub principal: Option<String>,
    pub resource_id: Option<String>,
    pub start_time: Option<Micros>,
    pub end_time: Option<Micros>,
}

/// Who asks an operator's change (a cancel, a pause, the reopening of a returned payout),
/// and why; both are kept with the change.
#[derive(Debug, Clone, Copy)]
pub struct OperatorRequest<'a> {
    pub actor: &'a str,
    pub reason: &'a str,
}

/// A partner's new bank account, by whom, against the etag the caller read.
#[derive(Debug, Clone, Copy)]
pub struct AccountUpdate<'a> {
    pub partner_id: PartnerId,
    pub account: &'a BankAccount,
    pub etag: &'a str,
    pub actor: &'a str,
}

/// Evidence attached to a claim, and who attached it.
#[derive(Debug, Clone, Copy)]
pub struct Attachment<'a> {
    pub claim_id: ClaimId,
    pub evidence: &'a Evidence,
    pub attached_by: &'a str,
}

/// What a dispatcher's record is written under: the programme budget the new instruction keys
/// must stay within, the back-off of a [`Requeue::BackOff`] (`back_off(failures so far)` gives
/// the due time) and the time of writing.
#[derive(Clone, Copy)]
pub struct DispatchTerms<'a> {
    pub budget_krw: Option<Krw>,
    pub back_off: &'a (dyn Fn(u32) -> Micros + Send + Sync),
    pub now: Micros,
}

/// A reviewer's decision on a claim.
#[derive(Debug, Clone)]
pub struct Review<'a> {
    pub claim_id: ClaimId,
    pub decision: ReviewDecision,
    pub reason: &'a str,
    pub reviewer: &'a str,
    /// The W3C trace context of the reviewing call: payment continues its trace.
    pub trace_context: Option<&'a str>,
}

/// One call to the payments backend, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub operation: AttemptOperation,
    pub idempotency_key: String,
    pub outcome: AttemptOutcome,
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
    pub disbursement_id: DisbursementId,
    pub claim_id: ClaimId,
    pub partner_id: PartnerId,
    pub amount_krw: Krw,
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
    pub krw: Krw,
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

/// When a leased outbox row is due again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requeue {
    /// After a transient failure: one more failure is counted and the row is due at the
    /// back-off for that many failures.
    BackOff,
    /// At this time, without counting a failure.
    At(Micros),
}

/// What a dispatcher round learnt about a batch of leased disbursements, written in one
/// transaction by [`DispatchStore::record_dispatch`].
#[derive(Debug, Clone, Default)]
pub struct DispatchRecord {
    /// Backend calls, each disbursement's in the order they were made.
    pub attempts: Vec<(DisbursementId, Attempt)>,
    /// Disbursements whose account holder the bank confirmed.
    pub verified: Vec<DisbursementId>,
    /// Disbursements whose dispatch ends (`PAID`, or `FAILED` with a code); their outbox rows
    /// are removed.
    pub finished: Vec<(DisbursementId, DispatchOutcome)>,
    /// Outbox rows released and made due again.
    pub requeued: Vec<(DisbursementId, Requeue)>,
    /// Disbursements to be given their instruction key and moved `QUEUED -> SUBMITTED`, in
    /// this order, while the programme budget allows. One [`KeyAssignment`] is answered for
    /// each.
    pub assign_keys: Vec<DisbursementId>,
}

/// What `ExportDisbursements` selects: a status (None: any) and a window on `update_time`.
#[derive(Debug, Clone, Default)]
pub struct ExportFilter {
    pub status: Option<DisbursementStatus>,
    /// Inclusive.
    pub start_time: Option<Micros>,
    /// Exclusive.
    pub end_time: Option<Micros>,
}

/// A disbursement with what the finance team needs to book it.
#[derive(Debug, Clone)]
pub struct ExportedDisbursement {
    pub disbursement_id: DisbursementId,
    pub claim_id: ClaimId,
    pub partner_id: PartnerId,
    pub business_registration_number: BusinessRegistrationNumber,
    pub legal_name: PersonOrBusinessName,
    pub representative_name: PersonOrBusinessName,
    pub amount_krw: Krw,
    pub status: DisbursementStatus,
    /// The last 4 digits only: the export never opens the sealed number.
    pub account: AccountOnFile,
    pub idempotency_key: Option<String>,
    /// When it last became `PAID`, from its status history.
    pub paid_time: Option<Micros>,
    pub policy_version: String,
    pub failure_code: Option<String>,
    pub create_time: Micros,
    pub update_time: Micros,
}

/// Up to `limit` staged lines of a settlement report after `after_key`, in key order.
#[derive(Debug, Clone, Copy)]
pub struct LinePage<'a> {
    pub after_key: &'a str,
    pub limit: u32,
}

/// What one page of a settlement report came to.
#[derive(Debug, Clone, Default)]
pub struct SettlementPage {
    pub mismatches: Vec<SettlementMismatch>,
    pub lines: i64,
    pub matched: i64,
    pub reopened: i64,
    /// The last key of the page; None when there were no more lines.
    pub last_key: Option<String>,
}

/// A `PAID` disbursement, for reconciliation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaidPayout {
    pub disbursement_id: DisbursementId,
    pub idempotency_key: String,
    pub amount_krw: Krw,
    pub paid_time: Micros,
}

/// What a reconciliation run found, kept with the run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SettlementTotals {
    pub line_count: i64,
    pub matched_count: i64,
    pub mismatch_count: i64,
    pub reopened_count: i64,
}

// Bulk intake.
/// The partner a claim is for: its id, or (in bulk intake) its business registration number.
#[derive(Debug, Clone)]
pub enum PartnerRef {
    Id(PartnerId),
    RegistrationNumber(BusinessRegistrationNumber),
}

/// One row of [`ClaimStore::submit_claims`].
#[derive(Debug, Clone)]
pub struct ClaimSubmission {
    pub idem: Idempotency,
    /// The partner the claim is for; the store resolves it, and ignores `claim.partner_id`.
    pub partner: PartnerRef,
    pub claim: NewClaim,
}

/// The partners: registration, one at a time or in batches, and bank account changes.
#[async_trait]
pub trait PartnerStore {
    async fn register_partner(
        &self,
        call: Recorded<'_, Partner>,
        partner: &NewPartner,
    ) -> Result<Stored<Partner>>;
    async fn get_partner(&self, partner_id: PartnerId) -> Result<Option<Partner>>;
    async fn list_partners(&self, filter: &PartnerFilter, page: &Page) -> Result<Vec<Partner>>;
    async fn update_bank_account(
        &self,
        call: Recorded<'_, Partner>,
        update: &AccountUpdate<'_>,
    ) -> Result<Stored<Partner>>;
    /// Registers a batch of partners in one transaction. Each row is answered, in order, as
    /// [`PartnerStore::register_partner`] would have answered it had the rows come one at a
    /// time; a refused row stores nothing. `Err` means nothing of the batch was stored. The
    /// audit entries `audit` makes are written with the rows (a stored row is never without
    /// its entry).
    async fn register_partners(
        &self,
        rows: &[(Idempotency, NewPartner)],
        render: Render<'_, Partner>,
        audit: BatchAudit<'_, Partner>,
    ) -> Result<Vec<Result<Stored<Partner>>>>;
}

/// The claims: filing (one at a time or in batches), evidence, review.
#[async_trait]
pub trait ClaimStore {
    async fn submit_claim(
        &self,
        call: Recorded<'_, Claim>,
        claim: &NewClaim,
    ) -> Result<Stored<Claim>>;
    async fn attach_evidence(
        &self,
        call: Recorded<'_, Claim>,
        attachment: &Attachment<'_>,
    ) -> Result<Stored<Claim>>;
    async fn review_claim(
        &self,
        call: Recorded<'_, Claim>,
        review: &Review<'_>,
    ) -> Result<Stored<Claim>>;
    async fn get_claim(&self, claim_id: ClaimId) -> Result<Option<Claim>>;
    async fn list_claims(&self, filter: &ClaimFilter, page: &Page) -> Result<Vec<Claim>>;
    /// Files a batch of claims in one transaction (each approved one with its disbursement).
    /// Each row is answered, in order, as [`ClaimStore::submit_claim`] would have answered it
    /// had the rows come one at a time. `Err` means nothing of the batch was stored. The audit
    /// entries `audit` makes are written with the rows.
    async fn submit_claims(
        &self,
        rows: &[ClaimSubmission],
        render: Render<'_, Claim>,
        audit: BatchAudit<'_, Claim>,
    ) -> Result<Vec<Result<Stored<Claim>>>>;
}

/// The disbursements as operators see them: read, retried, cancelled, dispatch paused.
#[async_trait]
pub trait DisbursementStore {
    async fn get_disbursement(
        &self,
        disbursement_id: DisbursementId,
    ) -> Result<Option<Disbursement>>;
    async fn list_disbursements(
        &self,
        filter: &DisbursementFilter,
        page: &Page,
    ) -> Result<Vec<Disbursement>>;
    /// Queues a `FAILED` disbursement again, under a new key.
    async fn retry_disbursement(
        &self,
        call: Recorded<'_, Disbursement>,
        disbursement_id: DisbursementId,
        actor: &str,
    ) -> Result<Stored<Disbursement>>;
    /// Cancels a `QUEUED` disbursement: it leaves the outbox.
    async fn cancel_disbursement(
        &self,
        call: Recorded<'_, Disbursement>,
        disbursement_id: DisbursementId,
        request: &OperatorRequest<'_>,
    ) -> Result<Stored<Disbursement>>;
    /// Pauses or resumes dispatch for every replica.
    async fn set_dispatch_paused(
        &self,
        call: Recorded<'_, DispatchState>,
        paused: bool,
        request: &OperatorRequest<'_>,
    ) -> Result<Stored<DispatchState>>;
    async fn program_summary(&self) -> Result<ProgramSummary>;
}

/// The dispatcher's side of the disbursements: the outbox, a leased batch at a time.
#[async_trait]
pub trait DispatchStore {
    /// Outbox rows, and the due time of the oldest (None when empty).
    async fn outbox_stats(&self) -> Result<(i64, Option<Micros>)>;
    /// Leases up to `limit` due outbox rows until `lease_until` and reads their disbursements
    /// (without attempts and history); none while dispatch is paused.
    async fn lease_batch(
        &self,
        now: Micros,
        lease_until: Micros,
        limit: u32,
    ) -> Result<Vec<Disbursement>>;
    /// Extends to `lease_until` the leases among `disbursement_ids` that are still held until
    /// `held_until` (rows released or taken over meanwhile are left alone); returns how many.
    /// A `lease_until` of 0 hands them back: due at once, for any replica.
    async fn renew_leases(
        &self,
        disbursement_ids: &[DisbursementId],
        held_until: Micros,
        lease_until: Micros,
    ) -> Result<u64>;
    /// Writes `record` in one transaction under `terms`: attempts, verified holders, finished
    /// dispatches (with their history), released rows and instruction keys within the budget,
    /// the batch's keys adding up as they are made. With a budget, keys are made one batch at
    /// a time across replicas (under the `dispatch_control` lock); without one, each key
    /// depends on its own row alone and batches make theirs side by side.
    async fn record_dispatch(
        &self,
        record: &DispatchRecord,
        terms: &DispatchTerms<'_>,
    ) -> Result<Vec<KeyAssignment>>;
}

/// Finance: the export of disbursements and the reconciliation of settlement reports.
#[async_trait]
pub trait SettlementStore {
    /// A page of the disbursements that match `filter`, in id order.
    async fn export_disbursements(
        &self,
        filter: &ExportFilter,
        page: Page<DisbursementId>,
    ) -> Result<Vec<ExportedDisbursement>>;
    /// Starts a reconciliation run named by the caller's `request_id`; returns its run id.
    /// The request id is `actor`'s (the calling principal's): one that `actor` used with
    /// another method is `RequestIdReused`.
    async fn start_settlement_run(
        &self,
        request_id: Uuid,
        cutoff_time: Micros,
        actor: &str,
    ) -> Result<Uuid>;
    /// Stages report lines of a run; a key already in the run's report is `InvalidField`.
    async fn stage_settlement_lines(&self, run_id: Uuid, lines: &[SettlementLine]) -> Result<()>;
    /// Records that the whole report is in. An earlier run by the same actor under the same
    /// request id with another report or cut-off is `RequestIdReused`.
    async fn seal_settlement_report(
        &self,
        run_id: Uuid,
        report_sha256: &str,
        line_count: i64,
    ) -> Result<()>;
    /// Reconciles a page of staged lines in one transaction, reopening returned payouts as
    /// `FAILED{RETURNED}` by `request`'s actor with its reason.
    async fn reconcile_settlement_page(
        &self,
        run_id: Uuid,
        page: LinePage<'_>,
        request: &OperatorRequest<'_>,
    ) -> Result<SettlementPage>;
    /// A page (in id order) of the disbursements that are `PAID`, were paid before
    /// `cutoff_time`, and whose key is not in the run's report.
    async fn paid_missing_from_report(
        &self,
        run_id: Uuid,
        cutoff_time: Micros,
        page: Page<DisbursementId>,
    ) -> Result<Vec<PaidPayout>>;
    async fn finish_settlement_run(&self, run_id: Uuid, totals: &SettlementTotals) -> Result<()>;
}

/// The audit log.
#[async_trait]
pub trait AuditStore {
    async fn append_audit(&self, events: &[AuditEvent]) -> Result<()>;
    async fn list_audit(&self, filter: &AuditFilter, page: &Page) -> Result<Vec<AuditEvent>>;
}

/// Whether the database answers, for the service's health.
#[async_trait]
pub trait ProbeStore {
    /// One cheap round trip to the database, on a connection of its own (a probe never waits
    /// behind the calls for the pool); `Err` when it fails or takes longer than `within`.
    async fn probe(&self, within: Duration) -> Result<()>;
}

/// The whole store, as the service holds it (`Arc<dyn Store>`): every aggregate's trait.
pub trait Store:
    PartnerStore
    + ClaimStore
    + DisbursementStore
    + DispatchStore
    + SettlementStore
    + AuditStore
    + EventStore
    + SealingStore
    + ProbeStore
    + Send
    + Sync
    + 'static
{
}

impl<S> Store for S where
    S: PartnerStore
        + ClaimStore
        + DisbursementStore
        + DispatchStore
        + SettlementStore
        + AuditStore
        + EventStore
        + SealingStore
        + ProbeStore
        + Send
        + Sync
        + 'static
{
}

/// The aggregate traits, for callers of [`Store`]'s methods.
pub mod prelude {
    pub use super::{
        AuditStore, ClaimStore, DisbursementStore, DispatchStore, EventStore, PartnerStore,
        ProbeStore, SealingStore, SettlementStore, Store,
    };
}

#[cfg(test)]
mod tests;
