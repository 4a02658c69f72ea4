//! The sandbox bank itself: its shared state and the `payments.v1.PaymentsBackend` service.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use super::SandboxConfig;
use super::account::{
    ACCOUNT_CLOSED, AccountNumber, UNKNOWN_HOLDER_NAME, validate_bank_code,
    validate_idempotency_key,
};
use super::faults::{Faults, unavailable};
use super::ledger::{KeyReused, Ledger, Submission};
use super::traffic::Traffic;
use crate::proto::payments::v1::payments_backend_server::PaymentsBackend;
use crate::proto::payments::v1::{
    GetInstructionRequest, GetInstructionResponse, SubmitInstructionRequest,
    SubmitInstructionResponse, VerifyAccountHolderRequest, VerifyAccountHolderResponse,
};

/// The W3C trace-context header recorded with the first submission of each key.
pub(super) const TRACEPARENT: &str = "traceparent";

/// The in-memory bank. Clones share the same ledger, so one clone can serve
/// `PaymentsBackend` and another `SandboxLedger`.
#[derive(Clone)]
pub struct SandboxBank {
    config: Arc<SandboxConfig>,
    state: Arc<Mutex<State>>,
    pub(super) traffic: Arc<Traffic>,
}

/// The fault draws and the ledger under one lock: a call's draws and what it applies happen
/// together, so the faults follow the sequence of calls.
pub(super) struct State {
    pub(super) faults: Faults,
    pub(super) ledger: Ledger,
}

impl SandboxBank {
    /// A bank with an empty ledger.
    pub fn new(config: SandboxConfig) -> Self {
        let faults = Faults::new(&config);
        Self {
            traffic: Arc::new(Traffic::new(&config)),
            config: Arc::new(config),
            state: Arc::new(Mutex::new(State {
                faults,
                ledger: Ledger::default(),
            })),
        }
    }

    /// The configuration this bank runs with.
    pub fn config(&self) -> &SandboxConfig {
        &self.config
    }

    // A panic while holding the lock leaves the ledger consistent (every update is a single
    // insert or increment), so a poisoned lock is still usable.
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for SandboxBank {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SandboxBank")
            .field("config", &self.config)
            .field("applied", &self.lock().ledger.len())
            .finish_non_exhaustive()
    }
}

fn traceparent(metadata: &MetadataMap) -> String {
    metadata
        .get(TRACEPARENT)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// What the bank says of `account` when asked whether it is held by `expected_holder_name`.
fn holder_check(
    account: &AccountNumber,
    expected_holder_name: String,
) -> VerifyAccountHolderResponse {
    if account.has_foreign_holder() {
        VerifyAccountHolderResponse {
            matches: false,
            holder_name: UNKNOWN_HOLDER_NAME.to_owned(),
            failure_code: String::new(),
        }
    } else if account.is_closed() {
        VerifyAccountHolderResponse {
            matches: true,
            holder_name: expected_holder_name,
            failure_code: ACCOUNT_CLOSED.to_owned(),
        }
    } else {
        VerifyAccountHolderResponse {
            matches: true,
            holder_name: expected_holder_name,
            failure_code: String::new(),
        }
    }
}

#[tonic::async_trait]
impl PaymentsBackend for SandboxBank {
    async fn verify_account_holder(
        &self,
        request: Request<VerifyAccountHolderRequest>,
    ) -> Result<Response<VerifyAccountHolderResponse>, Status> {
        self.traffic.admit().await?;
        let request = request.into_inner();
        validate_bank_code(&request.bank_code)?;
        let account = AccountNumber::parse(&request.account_number)?;
        if request.expected_holder_name.trim().is_empty() {
            return Err(Status::invalid_argument("expected_holder_name is required"));
        }
        if self.lock().faults.unavailable() {
            tracing::debug!(account = %account.masked(), "holder check refused: unavailable");
            return Err(self.traffic.unavailable(unavailable()));
        }

        let response = holder_check(&account, request.expected_holder_name);
        tracing::debug!(
            bank_code = %request.bank_code,
            account = %account.masked(),
            matches = response.matches,
            failure_code = %response.failure_code,
            "holder checked",
        );
        Ok(Response::new(response))
    }

    async fn submit_instruction(
        &self,
        request: Request<SubmitInstructionRequest>,
    ) -> Result<Response<SubmitInstructionResponse>, Status> {
        self.traffic.admit().await?;
        let traceparent = traceparent(request.metadata());
        let request = request.into_inner();
        validate_idempotency_key(&request.idempotency_key)?;
        if request.amount_krw <= 0 {
            return Err(Status::invalid_argument("amount_krw must be positive"));
        }
        validate_bank_code(&request.bank_code)?;
        let account = AccountNumber::parse(&request.account_number)?;
        let key = request.idempotency_key;
        let submission = Submission {
            amount_krw: request.amount_krw,
            bank_code: &request.bank_code,
            account: &account,
            traceparent,
        };

        let (applied, late) = {
            let mut state = self.lock();
            if state.faults.unavailable() {
                drop(state);
                tracing::debug!(idempotency_key = %key, "submission refused: unavailable");
                return Err(self.traffic.unavailable(unavailable()));
            }
            let late = state.faults.late_reply();
            let applied =
                state
                    .ledger
                    .apply(&key, submission, self.config.settle_delay, Instant::now());
            (applied, late)
        };
        let (instruction, first) = match applied {
            Ok(applied) => applied,
            Err(KeyReused) => {
                tracing::warn!(
                    idempotency_key = %key,
                    "idempotency key reused with a different instruction",
                );
                return Err(Status::failed_precondition(
                    "idempotency key reused with a different instruction",
                ));
            }
        };

        tracing::info!(
            idempotency_key = %key,
            amount_krw = instruction.amount_krw,
            bank_code = %instruction.bank_code,
            account = %account.masked(),
            status = ?instruction.status(),
            failure_code = %instruction.failure_code,
            repeat = !first,
            "instruction {}",
            if first { "applied" } else { "repeated" },
        );
        if late {
            tracing::debug!(
                idempotency_key = %key,
                delay = ?self.config.late_reply_delay,
                "answering late",
            );
            tokio::time::sleep(self.config.late_reply_delay).await;
        }
        Ok(Response::new(SubmitInstructionResponse {
            instruction: Some(instruction),
        }))
    }

    async fn get_instruction(
        &self,
        request: Request<GetInstructionRequest>,
    ) -> Result<Response<GetInstructionResponse>, Status> {
        self.traffic.admit().await?;
        let key = request.into_inner().idempotency_key;
        validate_idempotency_key(&key)?;
        let instruction = {
            let mut state = self.lock();
            if state.faults.unavailable() {
                drop(state);
                tracing::debug!(idempotency_key = %key, "look-up refused: unavailable");
                return Err(self.traffic.unavailable(unavailable()));
            }
            state.ledger.get(&key, Instant::now())
        };
        match instruction {
            Some(instruction) => Ok(Response::new(GetInstructionResponse {
                instruction: Some(instruction),
            })),
            None => Err(Status::not_found(format!(
                "no instruction under idempotency key {key}"
            ))),
        }
    }
}
