//! The dispatcher: takes due outbox rows and drives each disbursement to `PAID` or `FAILED`,
//! sending every instruction under a key stored before it is sent.
//!
//! Per disbursement: verify the account holder once; store the instruction key and move to
//! `SUBMITTED`; send. A transient failure backs off and retries under the same key; an unknown
//! outcome (timeout) is resolved by looking the key up; `ACCEPTED` is polled until final. A new
//! key is only made by `RetryDisbursement`, after the backend failed the previous one for good.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use opentelemetry::KeyValue;
use rand::Rng as _;
use tonic::Code;
use tonic::transport::Channel;
use tracing::Instrument as _;
use uuid::Uuid;

use super::QuietHours;
use crate::auth::crypto::{PiiCipher, Sealed};
use crate::domain::{DisbursementStatus, failure};
use crate::proto::payments::v1::{
    self as pb, InstructionStatus, payments_backend_client::PaymentsBackendClient,
};
use crate::store::{
    Attempt, Disbursement, DispatchOutcome, KeyAssignment, Store, StoreError, now_micros,
};

#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    /// Disbursements worked on at once.
    pub concurrency: usize,
    /// How often to look for due rows when there were none.
    pub poll: Duration,
    /// How long a taken row is ours before another replica may take it.
    pub lease: Duration,
    /// When an `ACCEPTED` instruction is looked up again.
    pub accepted_poll: Duration,
    pub quiet_hours: Option<QuietHours>,
    pub budget_krw: Option<i64>,
    /// Sent to the backend as `authorization: Bearer ...`.
    pub backend_token: Option<crate::config::Secret>,
    /// The first back-off after a transient failure; doubles up to `max_backoff`.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        Self {
            concurrency: 16,
            poll: Duration::from_millis(200),
            lease: Duration::from_secs(30),
            accepted_poll: Duration::from_millis(500),
            quiet_hours: None,
            budget_krw: None,
            backend_token: None,
            base_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(300),
        }
    }
}

pub struct Dispatcher {
    store: Arc<dyn Store>,
    backend: PaymentsBackendClient<Channel>,
    /// Opens the sealed account number: the only place it is ever decrypted.
    cipher: Arc<PiiCipher>,
    config: DispatcherConfig,
}

/// How often the outbox and status gauges are refreshed.
const OBSERVE_EVERY: Duration = Duration::from_secs(10);
const VERIFY: &str = "VERIFY_ACCOUNT_HOLDER";
const SUBMIT: &str = "SUBMIT_INSTRUCTION";
const LOOKUP: &str = "GET_INSTRUCTION";

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

impl Dispatcher {
    pub fn new(
        store: Arc<dyn Store>,
        backend: PaymentsBackendClient<Channel>,
        cipher: Arc<PiiCipher>,
        config: DispatcherConfig,
    ) -> Self {
        Self {
            store,
            backend,
            cipher,
            config,
        }
    }

    /// Runs until `shutdown` resolves; work already taken is finished first.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut observed: Option<std::time::Instant> = None;
        loop {
            if observed.is_none_or(|at| at.elapsed() >= OBSERVE_EVERY) {
                observed = Some(std::time::Instant::now());
                if let Err(e) = self.observe().await {
                    tracing::warn!(error = %e, "reading outbox metrics");
                }
            }
            let worked = match self.round().await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "dispatch round failed");
                    0
                }
            };
            if worked > 0 {
                continue;
            }
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(self.config.poll) => {}
            }
        }
        tracing::info!("dispatcher stopped");
    }

    /// Takes what is due and works on it; returns how many disbursements it touched.
    pub async fn round(&self) -> Result<usize, StoreError> {
        if let Some(quiet) = &self.config.quiet_hours
            && quiet.contains(jiff::Timestamp::now())
        {
            return Ok(0);
        }
        let now = now_micros();
        // Take only what can be worked on at once, so a crash strands no more than that.
        let limit = u32::try_from(self.config.concurrency).unwrap_or(u32::MAX);
        let ids = self
            .store
            .lease_due(now, now + micros(self.config.lease), limit)
            .await?;
        let n = ids.len();
        futures::stream::iter(ids)
            .for_each_concurrent(self.config.concurrency, |id| async move {
                if let Err(e) = self.step(id).await {
                    tracing::warn!(disbursement_id = %id, error = %e, "dispatch step failed");
                    // The lease lapses and the row is taken again later.
                }
            })
            .await;
        Ok(n)
    }

    /// Records the outbox and disbursement gauges.
    pub async fn observe(&self) -> Result<(), StoreError> {
        let m = crate::telemetry::metrics();
        let (depth, oldest) = self.store.outbox_stats().await?;
        m.outbox_depth.record(depth, &[]);
        let age = oldest.map_or(0.0, |due| ((now_micros() - due).max(0) as f64) / 1e6);
        m.outbox_oldest_due_age.record(age, &[]);
        let summary = self.store.program_summary().await?;
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

    /// Works on one disbursement, in a span that continues the trace of the approving call.
    async fn step(&self, id: Uuid) -> Result<(), StoreError> {
        let Some(d) = self.store.get_disbursement(id).await? else {
            return Ok(());
        };
        let span = tracing::info_span!(
            "dispatch",
            otel.name = "dispatch disbursement",
            payouts.disbursement_id = %id,
            status = d.status.key(),
            trace_id = tracing::field::Empty,
        );
        crate::telemetry::continue_stored_context(&span, d.trace_context.as_deref());
        span.record("trace_id", crate::telemetry::trace_id_of(&span));
        self.advance(d).instrument(span).await
    }

    async fn advance(&self, d: Disbursement) -> Result<(), StoreError> {
        let id = d.disbursement_id;
        match d.status {
            DisbursementStatus::Queued => self.start(&d).await,
            DisbursementStatus::Submitted => match d.idempotency_key.clone() {
                Some(key) => self.look_up(&d, &key).await,
                None => Err(StoreError::Unexpected(anyhow::anyhow!(
                    "submitted disbursement {id} has no instruction key"
                ))),
            },
            // Final states keep no outbox row; nothing to do.
            DisbursementStatus::Paid
            | DisbursementStatus::Failed
            | DisbursementStatus::Cancelled => Ok(()),
        }
    }

    async fn record(
        &self,
        d: &Disbursement,
        operation: &str,
        key: &str,
        outcome: &str,
        code: &str,
        message: &str,
    ) -> Result<(), StoreError> {
        let attempt = Attempt {
            operation: operation.to_owned(),
            idempotency_key: key.to_owned(),
            outcome: outcome.to_owned(),
            code: code.to_owned(),
            message: message.to_owned(),
            time: now_micros(),
        };
        crate::telemetry::metrics().dispatch_attempts.add(
            1,
            &[
                KeyValue::new("operation", operation.to_owned()),
                KeyValue::new("outcome", outcome.to_owned()),
            ],
        );
        self.store.record_attempt(d.disbursement_id, &attempt).await
    }

    /// One call to the backend in a CLIENT span whose context travels with the request.
    async fn call<Req, Resp, Fut>(
        &self,
        method: &'static str,
        message: Req,
        send: impl FnOnce(PaymentsBackendClient<Channel>, tonic::Request<Req>) -> Fut,
    ) -> Result<tonic::Response<Resp>, tonic::Status>
    where
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let span = tracing::info_span!(
            "backend call",
            otel.name = format!("payments.v1.PaymentsBackend/{method}"),
            otel.kind = "client",
            rpc.system = "grpc",
            rpc.service = "payments.v1.PaymentsBackend",
            rpc.method = method,
            rpc.grpc.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        async {
            let mut request = tonic::Request::new(message);
            crate::telemetry::inject_context(&mut request);
            if let Some(token) = &self.config.backend_token {
                match format!("Bearer {}", token.expose()).parse() {
                    Ok(value) => {
                        request.metadata_mut().insert("authorization", value);
                    }
                    Err(_) => tracing::warn!("payments_backend_token is not a valid header value"),
                }
            }
            let result = send(self.backend.clone(), request).await;
            let code = result.as_ref().map_or_else(|s| s.code(), |_| Code::Ok);
            let span = tracing::Span::current();
            span.record("rpc.grpc.status_code", code as i64);
            if code != Code::Ok {
                span.record("otel.status_code", "ERROR");
            }
            result
        }
        .instrument(span)
        .await
    }

    async fn fail(&self, d: &Disbursement, code: &str, message: &str) -> Result<(), StoreError> {
        tracing::info!(disbursement_id = %d.disbursement_id, code, "disbursement failed");
        crate::telemetry::metrics()
            .dispatch_failures
            .add(1, &[KeyValue::new("code", code.to_owned())]);
        let outcome = DispatchOutcome::Failed {
            code: code.to_owned(),
            message: message.to_owned(),
        };
        self.store
            .finish_dispatch(d.disbursement_id, &outcome, now_micros())
            .await
    }

    /// Backs off after a transient failure: exponential, with jitter, capped.
    async fn back_off(&self, d: &Disbursement) -> Result<(), StoreError> {
        let (base, max) = (self.config.base_backoff, self.config.max_backoff);
        let due = move |failures: u32| {
            let exp = base.saturating_mul(1 << failures.min(20)).min(max);
            now_micros() + micros(rand::rng().random_range(exp / 2..=exp))
        };
        self.store.reschedule(d.disbursement_id, true, &due).await
    }

    /// Makes the row due again after `delay`, without counting a failure.
    async fn later(&self, d: &Disbursement, delay: Duration) -> Result<(), StoreError> {
        let due = move |_| now_micros() + micros(delay);
        self.store.reschedule(d.disbursement_id, false, &due).await
    }

    /// The full account number, opened from its sealed form just before it is sent.
    fn account_number(&self, d: &Disbursement) -> Result<String, StoreError> {
        Sealed::decode(&d.sealed_account)
            .and_then(|sealed| self.cipher.open(d.partner_id, &sealed))
            .map_err(|e| {
                StoreError::Unexpected(anyhow::anyhow!(
                    "cannot open the account number of disbursement {} (is the key that sealed it \
                     configured?): {e}",
                    d.disbursement_id
                ))
            })
    }

    async fn start(&self, d: &Disbursement) -> Result<(), StoreError> {
        if !d.holder_verified {
            let account_number = self.account_number(d)?;
            let request = pb::VerifyAccountHolderRequest {
                bank_code: d.account.bank_code.as_str().to_owned(),
                account_number,
                expected_holder_name: d.account.holder_name.as_str().to_owned(),
            };
            match self
                .call("VerifyAccountHolder", request, |mut c, r| async move {
                    c.verify_account_holder(r).await
                })
                .await
            {
                Ok(response) => {
                    let r = response.into_inner();
                    if !r.failure_code.is_empty() {
                        self.record(d, VERIFY, "", "ACCOUNT_UNUSABLE", &r.failure_code, "")
                            .await?;
                        return self
                            .fail(
                                d,
                                &r.failure_code,
                                "the bank reports the account cannot take payouts",
                            )
                            .await;
                    }
                    if !r.matches {
                        self.record(d, VERIFY, "", "MISMATCH", failure::HOLDER_MISMATCH, "")
                            .await?;
                        return self
                            .fail(
                                d,
                                failure::HOLDER_MISMATCH,
                                "the bank's account holder is not the partner or its representative",
                            )
                            .await;
                    }
                    self.record(d, VERIFY, "", "MATCH", "", "").await?;
                    self.store.mark_holder_verified(d.disbursement_id).await?;
                }
                Err(status) => {
                    self.record(
                        d,
                        VERIFY,
                        "",
                        "ERROR",
                        &code_name(status.code()),
                        status.message(),
                    )
                    .await?;
                    return self.back_off(d).await;
                }
            }
        }
        match self
            .store
            .assign_key(d.disbursement_id, self.config.budget_krw, now_micros())
            .await?
        {
            KeyAssignment::Key(key) => self.submit(d, &key).await,
            KeyAssignment::OverBudget => {
                tracing::warn!(
                    disbursement_id = %d.disbursement_id,
                    amount_krw = d.amount_krw,
                    "held back: paying it would pass the programme budget"
                );
                self.later(d, self.config.max_backoff).await
            }
            KeyAssignment::Gone => Ok(()),
        }
    }

    async fn submit(&self, d: &Disbursement, key: &str) -> Result<(), StoreError> {
        let account_number = self.account_number(d)?;
        let request = pb::SubmitInstructionRequest {
            idempotency_key: key.to_owned(),
            amount_krw: d.amount_krw,
            bank_code: d.account.bank_code.as_str().to_owned(),
            account_number,
            holder_name: d.account.holder_name.as_str().to_owned(),
            memo: format!("outage compensation, claim {}", d.claim_id),
        };
        match self
            .call("SubmitInstruction", request, |mut c, r| async move {
                c.submit_instruction(r).await
            })
            .await
        {
            Ok(response) => {
                let instruction = response.into_inner().instruction.unwrap_or_default();
                self.settle(d, SUBMIT, key, &instruction).await
            }
            Err(status) => {
                // Unavailable: not applied. Timeout or anything else: maybe applied. Either way
                // the next step looks the key up before sending again under the same key.
                self.record(
                    d,
                    SUBMIT,
                    key,
                    "ERROR",
                    &code_name(status.code()),
                    status.message(),
                )
                .await?;
                self.back_off(d).await
            }
        }
    }

    async fn look_up(&self, d: &Disbursement, key: &str) -> Result<(), StoreError> {
        let request = pb::GetInstructionRequest {
            idempotency_key: key.to_owned(),
        };
        match self
            .call("GetInstruction", request, |mut c, r| async move {
                c.get_instruction(r).await
            })
            .await
        {
            Ok(response) => {
                let instruction = response.into_inner().instruction.unwrap_or_default();
                self.settle(d, LOOKUP, key, &instruction).await
            }
            Err(status) if status.code() == Code::NotFound => {
                self.record(d, LOOKUP, key, "NOT_FOUND", "", "").await?;
                self.submit(d, key).await
            }
            Err(status) => {
                self.record(
                    d,
                    LOOKUP,
                    key,
                    "ERROR",
                    &code_name(status.code()),
                    status.message(),
                )
                .await?;
                self.back_off(d).await
            }
        }
    }

    async fn settle(
        &self,
        d: &Disbursement,
        operation: &str,
        key: &str,
        instruction: &pb::Instruction,
    ) -> Result<(), StoreError> {
        let status = InstructionStatus::try_from(instruction.status)
            .unwrap_or(InstructionStatus::Unspecified);
        let outcome = status
            .as_str_name()
            .trim_start_matches("INSTRUCTION_STATUS_");
        self.record(
            d,
            operation,
            key,
            outcome,
            &instruction.failure_code,
            &instruction.failure_message,
        )
        .await?;
        match status {
            InstructionStatus::Paid => {
                self.store
                    .finish_dispatch(d.disbursement_id, &DispatchOutcome::Paid, now_micros())
                    .await
            }
            InstructionStatus::Failed => {
                let code = if instruction.failure_code.is_empty() {
                    "BACKEND_FAILED"
                } else {
                    &instruction.failure_code
                };
                self.fail(d, code, &instruction.failure_message).await
            }
            InstructionStatus::Accepted => self.later(d, self.config.accepted_poll).await,
            InstructionStatus::Unspecified => self.back_off(d).await,
        }
    }
}

fn code_name(code: Code) -> String {
    format!("{code:?}")
}
