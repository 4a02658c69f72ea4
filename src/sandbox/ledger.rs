//! What the sandbox bank applied, one entry per idempotency key, and the
//! `payments.v1.SandboxLedger` service that lists it (and counts the calls) for tests and
//! benchmarks.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tonic::{Request, Response, Status};

use super::SandboxBank;
use super::account::{ACCOUNT_CLOSED, AccountNumber, HOLDER_MISMATCH};
use crate::proto::payments::v1::sandbox_ledger_server::SandboxLedger;
use crate::proto::payments::v1::{
    AppliedInstruction, GetStatsRequest, GetStatsResponse, Instruction, InstructionStatus,
    ListAppliedRequest, ListAppliedResponse,
};

/// The applied instructions by idempotency key. A BTreeMap so that the ledger lists in key
/// order without sorting.
#[derive(Default)]
pub(super) struct Ledger {
    applied: BTreeMap<String, Applied>,
}

/// A submission that passed validation, as the ledger applies it.
pub(super) struct Submission<'a> {
    pub(super) amount_krw: i64,
    pub(super) bank_code: &'a str,
    pub(super) account: &'a AccountNumber,
    /// The W3C trace context the submission came with, kept from the first one only.
    pub(super) traceparent: String,
}

/// The idempotency key is already applied to a different amount or account.
pub(super) struct KeyReused;

/// One applied instruction. Keeps only the last 4 digits of the account, plus a fingerprint
/// of the whole number so that a reused key can be told apart from a repeat.
struct Applied {
    amount_krw: i64,
    bank_code: String,
    account_last4: String,
    account_fingerprint: u64,
    outcome: Outcome,
    /// Submissions answered with this instruction; conflicting reuses and calls refused as
    /// unavailable are not counted.
    submissions: i64,
    traceparent: String,
}

enum Outcome {
    /// Accepted; `PAID` from `settles_at` on. `None` when the delay is too long to
    /// represent, which means never.
    Accepted { settles_at: Option<Instant> },
    Failed {
        code: &'static str,
        message: &'static str,
    },
}

impl Outcome {
    /// What the bank does with an instruction to `account` received at `now`.
    fn of(account: &AccountNumber, now: Instant, settle_delay: Duration) -> Self {
        if account.is_closed() {
            Outcome::Failed {
                code: ACCOUNT_CLOSED,
                message: "the account is closed",
            }
        } else if account.has_foreign_holder() {
            Outcome::Failed {
                code: HOLDER_MISMATCH,
                message: "the account holder is not the expected holder",
            }
        } else {
            Outcome::Accepted {
                settles_at: now.checked_add(settle_delay),
            }
        }
    }
}

impl Ledger {
    /// Applies `submission` under `key` unless the key is already applied, and answers with
    /// the instruction as it stands at `now` and whether this was its first submission.
    pub(super) fn apply(
        &mut self,
        key: &str,
        submission: Submission<'_>,
        settle_delay: Duration,
        now: Instant,
    ) -> Result<(Instruction, bool), KeyReused> {
        let fingerprint = submission.account.fingerprint(submission.bank_code);
        let first = !self.applied.contains_key(key);
        let applied = self
            .applied
            .entry(key.to_owned())
            .or_insert_with(|| Applied {
                amount_krw: submission.amount_krw,
                bank_code: submission.bank_code.to_owned(),
                account_last4: submission.account.last4(),
                account_fingerprint: fingerprint,
                outcome: Outcome::of(submission.account, now, settle_delay),
                submissions: 0,
                traceparent: submission.traceparent,
            });
        if applied.amount_krw != submission.amount_krw || applied.account_fingerprint != fingerprint
        {
            return Err(KeyReused);
        }
        applied.submissions += 1;
        Ok((applied.to_instruction(key, now), first))
    }

    /// The instruction applied under `key`, as it stands at `now`.
    pub(super) fn get(&self, key: &str, now: Instant) -> Option<Instruction> {
        self.applied
            .get(key)
            .map(|applied| applied.to_instruction(key, now))
    }

    pub(super) fn len(&self) -> usize {
        self.applied.len()
    }

    fn list(&self, now: Instant) -> Vec<AppliedInstruction> {
        self.applied
            .iter()
            .map(|(key, applied)| applied.to_applied(key, now))
            .collect()
    }
}

impl Applied {
    fn status(&self, now: Instant) -> InstructionStatus {
        match self.outcome {
            Outcome::Accepted {
                settles_at: Some(at),
            } if now >= at => InstructionStatus::Paid,
            Outcome::Accepted { .. } => InstructionStatus::Accepted,
            Outcome::Failed { .. } => InstructionStatus::Failed,
        }
    }

    fn to_instruction(&self, idempotency_key: &str, now: Instant) -> Instruction {
        let (failure_code, failure_message) = match self.outcome {
            Outcome::Failed { code, message } => (code.to_owned(), message.to_owned()),
            Outcome::Accepted { .. } => (String::new(), String::new()),
        };
        Instruction {
            idempotency_key: idempotency_key.to_owned(),
            amount_krw: self.amount_krw,
            bank_code: self.bank_code.clone(),
            account_last4: self.account_last4.clone(),
            status: self.status(now) as i32,
            failure_code,
            failure_message,
        }
    }

    fn to_applied(&self, idempotency_key: &str, now: Instant) -> AppliedInstruction {
        AppliedInstruction {
            idempotency_key: idempotency_key.to_owned(),
            amount_krw: self.amount_krw,
            account_last4: self.account_last4.clone(),
            status: self.status(now) as i32,
            submissions: self.submissions,
            traceparent: self.traceparent.clone(),
        }
    }
}

#[tonic::async_trait]
impl SandboxLedger for SandboxBank {
    async fn list_applied(
        &self,
        _request: Request<ListAppliedRequest>,
    ) -> Result<Response<ListAppliedResponse>, Status> {
        let now = Instant::now();
        let instructions = self.lock().ledger.list(now);
        Ok(Response::new(ListAppliedResponse { instructions }))
    }

    async fn get_stats(
        &self,
        _request: Request<GetStatsRequest>,
    ) -> Result<Response<GetStatsResponse>, Status> {
        Ok(Response::new(self.traffic.stats()))
    }
}
