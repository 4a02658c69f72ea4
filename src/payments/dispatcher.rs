//! The dispatcher: takes due outbox rows a batch at a time and drives each disbursement to
//! `PAID` or `FAILED`, sending every instruction under a key stored before it is sent.
//!
//! Per disbursement: verify the account holder once; store the instruction key and move to
//! `SUBMITTED`; send. A transient failure backs off and retries under the same key; an unknown
//! outcome (timeout) is resolved by looking the key up; `ACCEPTED` is polled until final. A new
//! key is only made by `RetryDisbursement`, after the backend failed the previous one for good.
//!
//! A round works on a leased batch with three transactions, however large the batch:
//! 1. lease up to `batch` due rows and read their disbursements;
//! 2. verify the holders that need it (backend calls, as many at a time as the flow allows);
//! 3. record those checks, fail the accounts the bank refused, and store the instruction keys
//!    of the rest (one transaction, committed before anything is sent);
//! 4. send the instructions, or look up those already sent;
//! 5. record the answers: `PAID` and `FAILED` rows end, the others are due again later.
//!
//! Every backend call first waits for the flow shared by the rounds (`payments/flow.rs`): room
//! in the window of calls in flight, the circuit breaker, the rate learned from the bank's
//! throttling, the contractual rate limit. A call the breaker holds back, or the bank
//! throttles, fails nothing: the payout is due again when the bank may take it, under the same
//! key, and no failure is counted towards its back-off.
//!
//! If a transaction fails, nothing is lost: the rows' leases lapse and they are taken again,
//! keys already stored are reused. Each disbursement's backend calls happen in its own span,
//! which continues the trace of the call that approved it.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use opentelemetry::KeyValue;
use rand::Rng as _;
use tokio::sync::watch;
use tonic::Code;
use tonic::transport::Channel;
use tracing::Instrument as _;

use super::QuietHours;
use super::backend::{Backend, CallError};
use super::breaker::BreakerConfig;
use super::flow::FlowConfig;
use super::leases::Leases;
use crate::domain::{
    AttemptOperation, AttemptOutcome, DisbursementId, DisbursementStatus, Krw, failure,
};
use crate::proto::payments::v1::{
    self as pb, InstructionStatus, payments_backend_client::PaymentsBackendClient,
};
use crate::sealing::{PiiCipher, Sealed};
use crate::secret::Secret;
use crate::store::{
    Attempt, Disbursement, DispatchOutcome, DispatchRecord, DispatchTerms, KeyAssignment, Micros,
    Requeue, Store, StoreError, now_micros,
};

#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    /// Calls to the backend in flight at once.
    pub concurrency: usize,
    /// Disbursements one round leases and works on.
    pub batch: usize,
    /// Rounds in progress at once, each on its own batch: one waits for the backend while
    /// another writes to the database.
    pub rounds: usize,
    /// How often to look for due rows when there were none.
    pub poll: Duration,
    /// How long a taken row is ours before another replica may take it. A round that runs
    /// longer renews its leases every third of this.
    pub lease: Duration,
    /// When an `ACCEPTED` instruction is looked up again.
    pub accepted_poll: Duration,
    pub quiet_hours: Option<QuietHours>,
    pub budget_krw: Option<Krw>,
    /// Sent to the backend as `authorization: Bearer ...`.
    pub backend_token: Option<Secret>,
    /// The first back-off after a transient failure; doubles up to `max_backoff`.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// A contractual limit on backend calls per second, never exceeded.
    pub rate_limit_per_s: Option<NonZeroU32>,
    /// When the backend counts as down, and how it is probed.
    pub breaker: BreakerConfig,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        Self {
            concurrency: 16,
            batch: 512,
            rounds: 3,
            poll: Duration::from_millis(200),
            lease: Duration::from_secs(30),
            accepted_poll: Duration::from_millis(500),
            quiet_hours: None,
            budget_krw: None,
            backend_token: None,
            base_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(300),
            rate_limit_per_s: None,
            breaker: BreakerConfig::default(),
        }
    }
}

pub struct Dispatcher {
    store: Arc<dyn Store>,
    /// Its calls, shared by the rounds in progress.
    backend: Backend,
    /// Opens the sealed account number: the only place it is ever decrypted.
    cipher: Arc<PiiCipher>,
    config: DispatcherConfig,
}

/// How often the outbox and status gauges are refreshed.
const OBSERVE_EVERY: Duration = Duration::from_secs(10);
const VERIFY: AttemptOperation = AttemptOperation::VerifyHolder;
const SUBMIT: AttemptOperation = AttemptOperation::SubmitInstruction;
const LOOKUP: AttemptOperation = AttemptOperation::GetInstruction;

pub(super) fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// One leased disbursement in a round, with the span its backend calls happen in.
struct Leased {
    d: Disbursement,
    span: tracing::Span,
}

/// What a disbursement's backend calls came to in one phase of a round.
#[derive(Default)]
struct Step {
    /// The calls made, in order.
    attempts: Vec<Attempt>,
    next: Next,
}

/// What becomes of a disbursement after a phase of its round.
#[derive(Default)]
enum Next {
    /// The holder matches: store the key and send.
    #[default]
    Send,
    Finish(DispatchOutcome),
    Requeue(Requeue),
    /// Nothing more this round; the lease lapses and the row is taken again.
    Leave,
}

impl Step {
    fn then(mut self, next: Next) -> Self {
        self.next = next;
        self
    }
}

impl Dispatcher {
    pub fn new(
        store: Arc<dyn Store>,
        backend: PaymentsBackendClient<Channel>,
        cipher: Arc<PiiCipher>,
        config: DispatcherConfig,
    ) -> Self {
        let flow = FlowConfig {
            concurrency: config.concurrency,
            rate_limit_per_s: config.rate_limit_per_s,
            breaker: config.breaker,
        };
        Self {
            store,
            backend: Backend::new(backend, config.backend_token.clone(), flow),
            cipher,
            config,
        }
    }

    /// Runs until `shutdown` resolves. A round in progress then finishes its backend calls in
    /// flight and records them, sends nothing more, and hands its leases back, so that
    /// another replica takes the rest at once rather than after `lease`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let (stop, stopping) = watch::channel(false);
        let mut rounds = FuturesUnordered::new();
        let mut observed: Option<std::time::Instant> = None;
        loop {
            if observed.is_none_or(|at| at.elapsed() >= OBSERVE_EVERY) {
                observed = Some(std::time::Instant::now());
                if let Err(e) = self.observe().await {
                    tracing::warn!(error = %e, "reading outbox metrics");
                }
            }
            while rounds.len() < self.config.rounds.max(1) {
                rounds.push(self.round_then_rest(stopping.clone()));
            }
            tokio::select! {
                () = &mut shutdown => break,
                Some(()) = rounds.next() => {}
            }
        }
        let _ = stop.send(true);
        while rounds.next().await.is_some() {}
        tracing::info!("dispatcher stopped");
    }

    /// One round; when it found nothing to do, a pause of `poll` (cut short by `stopping`).
    async fn round_then_rest(&self, mut stopping: watch::Receiver<bool>) {
        let worked = match self.round(&stopping).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "dispatch round failed");
                0
            }
        };
        if worked == 0 {
            tokio::select! {
                _ = stopping.wait_for(|stop| *stop) => {}
                () = tokio::time::sleep(self.config.poll) => {}
            }
        }
    }

    /// Takes a batch of what is due and works on it; returns how many disbursements it took.
    /// Once `stopping`, it sends nothing more and hands back its leases.
    async fn round(&self, stopping: &watch::Receiver<bool>) -> Result<usize, StoreError> {
        if let Some(quiet) = &self.config.quiet_hours
            && quiet.contains(jiff::Timestamp::now())
        {
            return Ok(0);
        }
        let now = now_micros();
        let lease_until = now + micros(self.config.lease);
        let limit = u32::try_from(self.config.batch.max(1)).unwrap_or(u32::MAX);
        let leased = self.store.lease_batch(now, lease_until, limit).await?;
        let n = leased.len();
        if n == 0 {
            return Ok(0);
        }
        let leases = Leases::new(&*self.store, &leased, lease_until, self.config.lease);
        let rows = leased.into_iter().map(Self::leased).collect();
        let worked = tokio::select! {
            result = self.work(rows, stopping) => result,
            () = leases.keep() => Ok(()),
        };
        if *stopping.borrow() {
            leases.hand_back().await;
        }
        worked.map(|()| n)
    }

    /// A leased disbursement in a span that continues the trace of the approving call.
    fn leased(d: Disbursement) -> Leased {
        let span = tracing::info_span!(
            "dispatch",
            otel.name = "dispatch disbursement",
            payouts.disbursement_id = %d.disbursement_id,
            status = d.status.key(),
        );
        crate::telemetry::continue_stored_context(&span, d.trace_context.as_deref());
        Leased { d, span }
    }

    /// Steps 2 to 5 of a round (see the module's documentation). Once `stopping`, after the
    /// checks in flight: records them, and neither stores keys nor sends.
    async fn work(
        &self,
        rows: Vec<Leased>,
        stopping: &watch::Receiver<bool>,
    ) -> Result<(), StoreError> {
        // 2. Verify the holders not yet verified.
        let checks = self.verify_holders(&rows).await;
        let stopped = *stopping.borrow();

        // 3. Record the checks and store the keys of what is to be sent, in one transaction.
        let mut record = DispatchRecord::default();
        for (row, check) in rows.iter().zip(checks) {
            let id = row.d.disbursement_id;
            let to_send = match check {
                None => row.d.status == DisbursementStatus::Queued,
                Some(step) => {
                    let verified = self.add_step(&mut record, row, step);
                    if verified {
                        record.verified.push(id);
                    }
                    verified
                }
            };
            if to_send && !stopped {
                record.assign_keys.push(id);
            }
        }
        let keys = self.store_record(&record).await?;
        if stopped {
            return Ok(());
        }
        let key_of = record.assign_keys.iter().copied().zip(keys).collect();

        // 4. Send the instructions, or look up those sent before.
        let sends = self.send_or_look_up(&rows, key_of).await;

        // 5. Record the answers, in one transaction.
        let mut record = DispatchRecord::default();
        for (row, step) in rows.iter().zip(sends) {
            if let Some(step) = step {
                self.add_step(&mut record, row, step);
            }
        }
        self.store_record(&record).await?;
        Ok(())
    }

    /// Asks the bank about the holders of the queued rows not yet verified; `None` for the
    /// other rows.
    async fn verify_holders(&self, rows: &[Leased]) -> Vec<Option<Step>> {
        futures::future::join_all(rows.iter().map(|row| async move {
            let needs_check = row.d.status == DisbursementStatus::Queued && !row.d.holder_verified;
            if needs_check {
                Some(self.verify(&row.d).instrument(row.span.clone()).await)
            } else {
                None
            }
        }))
        .await
    }

    /// Sends each row whose key was stored, or looks up what was sent before; `None` for a
    /// row with nothing to send (cancelled meanwhile, or settled by its check).
    async fn send_or_look_up(
        &self,
        rows: &[Leased],
        mut key_of: HashMap<DisbursementId, KeyAssignment>,
    ) -> Vec<Option<Step>> {
        futures::future::join_all(rows.iter().map(|row| {
            let key = key_of.remove(&row.d.disbursement_id);
            self.send_step(&row.d, key).instrument(row.span.clone())
        }))
        .await
    }

    async fn send_step(&self, d: &Disbursement, key: Option<KeyAssignment>) -> Option<Step> {
        let step = match (d.status, key) {
            (DisbursementStatus::Submitted, _) => match d.idempotency_key.as_deref() {
                Some(key) => self.look_up(d, key).await,
                None => {
                    tracing::warn!(
                        disbursement_id = %d.disbursement_id,
                        "submitted disbursement has no instruction key"
                    );
                    Step::default().then(Next::Leave)
                }
            },
            (_, Some(KeyAssignment::Key(key))) => self.submit(d, &key).await,
            (_, Some(KeyAssignment::OverBudget)) => {
                tracing::warn!(
                    disbursement_id = %d.disbursement_id,
                    amount_krw = d.amount_krw.won(),
                    "held back: paying it would pass the programme budget"
                );
                self.later(self.config.max_backoff)
            }
            // Cancelled meanwhile, or settled in step 3.
            (_, Some(KeyAssignment::Gone) | None) => return None,
        };
        Some(step)
    }

    /// Adds a step's calls to `record`, and the end of the row's round if the step ended it;
    /// answers whether the step says to send.
    fn add_step(&self, record: &mut DispatchRecord, row: &Leased, step: Step) -> bool {
        let id = row.d.disbursement_id;
        record
            .attempts
            .extend(step.attempts.into_iter().map(|a| (id, a)));
        match step.next {
            Next::Send => return true,
            Next::Finish(outcome) => {
                self.count_failure(row, &outcome);
                record.finished.push((id, outcome));
            }
            Next::Requeue(when) => record.requeued.push((id, when)),
            Next::Leave => {}
        }
        false
    }

    /// Stores what a phase came to in one transaction (none if it came to nothing); answers
    /// the keys assigned, in the order of `record.assign_keys`.
    async fn store_record(
        &self,
        record: &DispatchRecord,
    ) -> Result<Vec<KeyAssignment>, StoreError> {
        if record_is_empty(record) {
            return Ok(Vec::new());
        }
        let terms = DispatchTerms {
            budget_krw: self.config.budget_krw,
            back_off: &self.back_off(),
            now: now_micros(),
        };
        self.store.record_dispatch(record, &terms).await
    }

    /// Records the outbox and disbursement gauges, all of them once both reads are done, so
    /// that a scrape never finds some of them refreshed and others not yet there.
    pub async fn observe(&self) -> Result<(), StoreError> {
        let m = crate::telemetry::metrics();
        let (depth, oldest) = self.store.outbox_stats().await?;
        let summary = self.store.program_summary().await?;
        m.outbox_depth.record(depth, &[]);
        let age = oldest.map_or(0.0, |due| ((now_micros() - due).max(0) as f64) / 1e6);
        m.outbox_oldest_due_age.record(age, &[]);
        for (status, bucket) in [
            (DisbursementStatus::Queued, summary.queued),
            (DisbursementStatus::Submitted, summary.submitted),
            (DisbursementStatus::Paid, summary.paid),
            (DisbursementStatus::Failed, summary.failed),
            (DisbursementStatus::Cancelled, summary.cancelled),
        ] {
            m.disbursements
                .record(bucket.count, &[KeyValue::new("status", status.key())]);
        }
        Ok(())
    }

    /// A backend call as recorded, counted in `payouts.dispatch.attempts`.
    fn attempt(
        operation: AttemptOperation,
        key: &str,
        outcome: AttemptOutcome,
        code: &str,
        message: &str,
    ) -> Attempt {
        crate::telemetry::metrics().dispatch_attempts.add(
            1,
            &[
                KeyValue::new("operation", operation.as_str()),
                KeyValue::new("outcome", outcome.as_str()),
            ],
        );
        Attempt {
            operation,
            idempotency_key: key.to_owned(),
            outcome,
            code: code.to_owned(),
            message: message.to_owned(),
            time: now_micros(),
        }
    }

    /// A call that brought no answer: recorded after `attempts` if it was sent, and the
    /// disbursement due again: after a back-off that counts a failure, or (held back by the
    /// breaker, or throttled) when the bank may take it, counting none.
    fn call_failed(
        operation: AttemptOperation,
        key: &str,
        error: &CallError,
        mut attempts: Vec<Attempt>,
    ) -> Step {
        if let Some(status) = error.status() {
            attempts.push(Self::attempt(
                operation,
                key,
                AttemptOutcome::Error,
                &code_name(status.code()),
                status.message(),
            ));
        }
        let when = error.due_in().map_or(Requeue::BackOff, |delay| {
            Requeue::At(now_micros() + micros(delay))
        });
        Step {
            attempts,
            next: Next::Requeue(when),
        }
    }

    /// Logs and counts a disbursement that ends `FAILED`.
    fn count_failure(&self, row: &Leased, outcome: &DispatchOutcome) {
        if let DispatchOutcome::Failed { code, .. } = outcome {
            row.span.in_scope(|| {
                tracing::info!(disbursement_id = %row.d.disbursement_id, code, "disbursement failed");
            });
            crate::telemetry::metrics()
                .dispatch_failures
                .add(1, &[KeyValue::new("code", code.clone())]);
        }
    }

    /// The due time after a transient failure: exponential in the failures so far, with
    /// jitter, capped.
    fn back_off(&self) -> impl Fn(u32) -> Micros + Send + Sync + use<> {
        let (base, max) = (self.config.base_backoff, self.config.max_backoff);
        move |failures: u32| {
            let exp = base.saturating_mul(1 << failures.min(20)).min(max);
            now_micros() + micros(rand::rng().random_range(exp / 2..=exp))
        }
    }

    /// Due again after `delay`, without counting a failure.
    fn later(&self, delay: Duration) -> Step {
        Step::default().then(Next::Requeue(Requeue::At(now_micros() + micros(delay))))
    }

    /// The full account number, opened from its sealed form just before it is sent.
    fn account_number(&self, d: &Disbursement) -> Option<String> {
        let opened = Sealed::decode(&d.sealed_account)
            .and_then(|sealed| self.cipher.open(d.partner_id, &sealed));
        match opened {
            Ok(number) => Some(number),
            Err(e) => {
                // Left for the lease to lapse, as a failed step: a key configured later opens it.
                tracing::warn!(
                    disbursement_id = %d.disbursement_id,
                    error = %e,
                    "cannot open the account number (is the key that sealed it configured?)"
                );
                None
            }
        }
    }

    /// Asks the bank whether the account is the expected holder's and can take payouts.
    async fn verify(&self, d: &Disbursement) -> Step {
        let Some(account_number) = self.account_number(d) else {
            return Step::default().then(Next::Leave);
        };
        let request = pb::VerifyAccountHolderRequest {
            bank_code: d.account.bank_code.as_str().to_owned(),
            account_number,
            expected_holder_name: d.account.holder_name.as_str().to_owned(),
        };
        let result = self
            .backend
            .call("VerifyAccountHolder", request, |mut c, r| async move {
                c.verify_account_holder(r).await
            })
            .await;
        match result {
            Ok(response) => {
                let r = response.into_inner();
                if !r.failure_code.is_empty() {
                    let message = "the bank reports the account cannot take payouts";
                    let unusable = AttemptOutcome::AccountUnusable;
                    return Self::holder_refused(unusable, &r.failure_code, message);
                }
                if !r.matches {
                    let message =
                        "the bank's account holder is not the partner or its representative";
                    let mismatch = AttemptOutcome::Mismatch;
                    return Self::holder_refused(mismatch, failure::HOLDER_MISMATCH, message);
                }
                Step {
                    attempts: vec![Self::attempt(VERIFY, "", AttemptOutcome::Match, "", "")],
                    next: Next::Send,
                }
            }
            Err(error) => Self::call_failed(VERIFY, "", &error, Vec::new()),
        }
    }

    /// A holder check the bank answered against paying: recorded with `outcome` and `code`,
    /// and the disbursement `FAILED` with `code`.
    fn holder_refused(outcome: AttemptOutcome, code: &str, message: &str) -> Step {
        Step {
            attempts: vec![Self::attempt(VERIFY, "", outcome, code, "")],
            next: Next::Finish(DispatchOutcome::Failed {
                code: code.to_owned(),
                message: message.to_owned(),
            }),
        }
    }

    /// Sends the instruction under `key`, which is stored.
    async fn submit(&self, d: &Disbursement, key: &str) -> Step {
        self.submit_after(d, key, Vec::new()).await
    }

    async fn submit_after(&self, d: &Disbursement, key: &str, attempts: Vec<Attempt>) -> Step {
        let Some(account_number) = self.account_number(d) else {
            return Step {
                attempts,
                next: Next::Leave,
            };
        };
        let request = pb::SubmitInstructionRequest {
            idempotency_key: key.to_owned(),
            amount_krw: d.amount_krw.won(),
            bank_code: d.account.bank_code.as_str().to_owned(),
            account_number,
            holder_name: d.account.holder_name.as_str().to_owned(),
            memo: format!("outage compensation, claim {}", d.claim_id),
        };
        let sent = self
            .backend
            .call("SubmitInstruction", request, |mut c, r| async move {
                c.submit_instruction(r).await
            })
            .await;
        // A failed call: unavailable, not applied; a timeout or anything else, maybe applied.
        // Either way the next round looks the key up before sending again under the same key.
        self.settle(
            SUBMIT,
            key,
            sent.map(|r| r.into_inner().instruction),
            attempts,
        )
    }

    /// Asks what became of the instruction sent under `key`; sends it if the bank has none.
    async fn look_up(&self, d: &Disbursement, key: &str) -> Step {
        let request = pb::GetInstructionRequest {
            idempotency_key: key.to_owned(),
        };
        let found = self
            .backend
            .call("GetInstruction", request, |mut c, r| async move {
                c.get_instruction(r).await
            })
            .await;
        match found.map(|r| r.into_inner().instruction) {
            Err(CallError::Status(status)) if status.code() == Code::NotFound => {
                let attempts = vec![Self::attempt(LOOKUP, key, AttemptOutcome::NotFound, "", "")];
                self.submit_after(d, key, attempts).await
            }
            answer => self.settle(LOOKUP, key, answer, Vec::new()),
        }
    }

    /// What the bank's answer about the instruction under `key` means for the disbursement:
    /// the instruction's status, or (the call failed) a retry as [`Self::call_failed`] says.
    fn settle(
        &self,
        operation: AttemptOperation,
        key: &str,
        answer: Result<Option<pb::Instruction>, CallError>,
        mut attempts: Vec<Attempt>,
    ) -> Step {
        let instruction = match answer {
            Ok(instruction) => instruction.unwrap_or_default(),
            Err(error) => return Self::call_failed(operation, key, &error, attempts),
        };
        let status = InstructionStatus::try_from(instruction.status)
            .unwrap_or(InstructionStatus::Unspecified);
        attempts.push(Self::attempt(
            operation,
            key,
            status.into(),
            &instruction.failure_code,
            &instruction.failure_message,
        ));
        let next = match status {
            InstructionStatus::Paid => Next::Finish(DispatchOutcome::Paid),
            InstructionStatus::Failed => {
                let code = if instruction.failure_code.is_empty() {
                    "BACKEND_FAILED"
                } else {
                    &instruction.failure_code
                };
                Next::Finish(DispatchOutcome::Failed {
                    code: code.to_owned(),
                    message: instruction.failure_message.clone(),
                })
            }
            InstructionStatus::Accepted => self.later(self.config.accepted_poll).next,
            InstructionStatus::Unspecified => Next::Requeue(Requeue::BackOff),
        };
        Step { attempts, next }
    }
}

fn record_is_empty(record: &DispatchRecord) -> bool {
    record.attempts.is_empty()
        && record.verified.is_empty()
        && record.finished.is_empty()
        && record.requeued.is_empty()
        && record.assign_keys.is_empty()
}

fn code_name(code: Code) -> String {
    format!("{code:?}")
}
