//! The sandbox bank: an in-memory payments backend that moves no money, so the service runs
//! and is tested end to end without a real bank.
//!
//! It behaves like the payout APIs described in the domain notes, with a few account numbers
//! that trigger failures on purpose:
//!
//! - an account ending in `0000` is closed: the holder check names the holder but reports
//!   `ACCOUNT_CLOSED`, and an instruction to it fails with `ACCOUNT_CLOSED`;
//! - an account ending in `9999` belongs to somebody else: the holder check never matches,
//!   and an instruction to it fails with `HOLDER_MISMATCH`;
//! - any other account is held by whoever the caller expects, and instructions settle to
//!   `PAID` after [`SandboxConfig::settle_delay`].
//!
//! Each idempotency key is applied once; repeats get the stored instruction back. Faults
//! (unavailability, replies that arrive after the caller gave up) are drawn from a seeded
//! generator so that a failing run can be replayed.

use std::collections::BTreeMap;
use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::net::TcpListener;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::proto::mask_account_number;
use crate::proto::payments::v1::payments_backend_server::{
    self, PaymentsBackend, PaymentsBackendServer,
};
use crate::proto::payments::v1::sandbox_ledger_server::{self, SandboxLedger, SandboxLedgerServer};
use crate::proto::payments::v1::{
    AppliedInstruction, GetInstructionRequest, GetInstructionResponse, Instruction,
    InstructionStatus, ListAppliedRequest, ListAppliedResponse, SubmitInstructionRequest,
    SubmitInstructionResponse, VerifyAccountHolderRequest, VerifyAccountHolderResponse,
};

/// Accounts ending in these digits are closed.
pub const CLOSED_ACCOUNT_SUFFIX: &str = "0000";
/// Accounts ending in these digits are held by someone other than the expected holder.
pub const FOREIGN_HOLDER_SUFFIX: &str = "9999";
/// The holder name the bank reports for [`FOREIGN_HOLDER_SUFFIX`] accounts.
pub const UNKNOWN_HOLDER_NAME: &str = "UNKNOWN HOLDER";
/// Failure code for closed accounts.
pub const ACCOUNT_CLOSED: &str = "ACCOUNT_CLOSED";
/// Failure code for instructions whose holder is not the expected one.
pub const HOLDER_MISMATCH: &str = "HOLDER_MISMATCH";

/// The W3C trace-context header recorded with the first submission of each key.
const TRACEPARENT: &str = "traceparent";

/// How the sandbox bank behaves. The default pays at once and never fails on its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxConfig {
    /// How long an accepted instruction stays `ACCEPTED` before it reads as `PAID`.
    /// Zero means it is `PAID` in the reply to its submission.
    pub settle_delay: Duration,
    /// Chance, in thousandths, that a `VerifyAccountHolder`, `SubmitInstruction` or
    /// `GetInstruction` call is answered `UNAVAILABLE` without anything being applied.
    /// 1000 or more means every call.
    pub unavailable_per_mille: u32,
    /// Chance, in thousandths, that a `SubmitInstruction` that was not refused as unavailable
    /// is applied and then answered only after [`Self::late_reply_delay`]: the caller's
    /// deadline passes with the instruction applied, an unknown outcome for the caller.
    pub late_reply_per_mille: u32,
    /// How long a late reply is held back.
    pub late_reply_delay: Duration,
    /// Seed of the fault generator; the same seed and the same sequence of calls give the
    /// same faults.
    pub seed: u64,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            settle_delay: Duration::ZERO,
            unavailable_per_mille: 0,
            late_reply_per_mille: 0,
            late_reply_delay: Duration::from_secs(5),
            seed: 0,
        }
    }
}

/// The in-memory bank. Clones share the same ledger, so one clone can serve
/// `PaymentsBackend` and another `SandboxLedger`.
#[derive(Clone)]
pub struct SandboxBank {
    config: Arc<SandboxConfig>,
    state: Arc<Mutex<State>>,
}

struct State {
    rng: StdRng,
    // A BTreeMap so that the ledger lists in key order without sorting.
    applied: BTreeMap<String, Applied>,
}

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

/// An account number reduced to its digits, which is what banks compare: hyphens and spaces
/// are formatting.
struct AccountNumber {
    digits: String,
}

impl AccountNumber {
    fn parse(raw: &str) -> Result<Self, Status> {
        let raw = raw.trim();
        if raw.is_empty() {
            return Err(Status::invalid_argument("account_number is required"));
        }
        // The number itself stays out of the message: errors end up in logs.
        if !raw
            .chars()
            .all(|c| c.is_ascii_digit() || c == '-' || c == ' ')
        {
            return Err(Status::invalid_argument(
                "account_number must contain only digits and hyphens",
            ));
        }
        let digits: String = raw.chars().filter(char::is_ascii_digit).collect();
        if digits.is_empty() {
            return Err(Status::invalid_argument("account_number has no digits"));
        }
        Ok(Self { digits })
    }

    fn last4(&self) -> String {
        self.digits[self.digits.len().saturating_sub(4)..].to_owned()
    }

    fn is_closed(&self) -> bool {
        self.digits.ends_with(CLOSED_ACCOUNT_SUFFIX)
    }

    fn has_foreign_holder(&self) -> bool {
        self.digits.ends_with(FOREIGN_HOLDER_SUFFIX)
    }

    fn fingerprint(&self, bank_code: &str) -> u64 {
        let mut hasher = DefaultHasher::new();
        bank_code.hash(&mut hasher);
        self.digits.hash(&mut hasher);
        hasher.finish()
    }

    fn masked(&self) -> String {
        mask_account_number(&self.digits)
    }
}

fn validate_bank_code(bank_code: &str) -> Result<(), Status> {
    if bank_code.is_empty() {
        return Err(Status::invalid_argument("bank_code is required"));
    }
    if bank_code.len() != 3 || !bank_code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Status::invalid_argument(
            "bank_code must be a 3-digit KFTC code",
        ));
    }
    Ok(())
}

fn validate_idempotency_key(key: &str) -> Result<(), Status> {
    if key.trim().is_empty() {
        return Err(Status::invalid_argument("idempotency_key is required"));
    }
    Ok(())
}

fn traceparent(metadata: &MetadataMap) -> String {
    metadata
        .get(TRACEPARENT)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// Draws once per call whatever the odds, so that the sequence of draws, and with it every
/// later fault, depends only on the sequence of calls.
fn roll(rng: &mut StdRng, per_mille: u32) -> bool {
    rng.random_range(0..1000u32) < per_mille
}

fn unavailable() -> Status {
    Status::unavailable("sandbox bank is temporarily unavailable (injected fault)")
}

impl SandboxBank {
    /// A bank with an empty ledger.
    pub fn new(config: SandboxConfig) -> Self {
        let rng = StdRng::seed_from_u64(config.seed);
        Self {
            config: Arc::new(config),
            state: Arc::new(Mutex::new(State {
                rng,
                applied: BTreeMap::new(),
            })),
        }
    }

    /// The configuration this bank runs with.
    pub fn config(&self) -> &SandboxConfig {
        &self.config
    }

    // A panic while holding the lock leaves the ledger consistent (every update is a single
    // insert or increment), so a poisoned lock is still usable.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn roll_unavailable(&self, state: &mut State) -> bool {
        roll(&mut state.rng, self.config.unavailable_per_mille)
    }
}

impl fmt::Debug for SandboxBank {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SandboxBank")
            .field("config", &self.config)
            .field("applied", &self.lock().applied.len())
            .finish_non_exhaustive()
    }
}

#[tonic::async_trait]
impl PaymentsBackend for SandboxBank {
    async fn verify_account_holder(
        &self,
        request: Request<VerifyAccountHolderRequest>,
    ) -> Result<Response<VerifyAccountHolderResponse>, Status> {
        let request = request.into_inner();
        validate_bank_code(&request.bank_code)?;
        let account = AccountNumber::parse(&request.account_number)?;
        if request.expected_holder_name.trim().is_empty() {
            return Err(Status::invalid_argument("expected_holder_name is required"));
        }
        if self.roll_unavailable(&mut self.lock()) {
            tracing::debug!(account = %account.masked(), "holder check refused: unavailable");
            return Err(unavailable());
        }

        let response = if account.has_foreign_holder() {
            VerifyAccountHolderResponse {
                matches: false,
                holder_name: UNKNOWN_HOLDER_NAME.to_owned(),
                failure_code: String::new(),
            }
        } else if account.is_closed() {
            VerifyAccountHolderResponse {
                matches: true,
                holder_name: request.expected_holder_name,
                failure_code: ACCOUNT_CLOSED.to_owned(),
            }
        } else {
            VerifyAccountHolderResponse {
                matches: true,
                holder_name: request.expected_holder_name,
                failure_code: String::new(),
            }
        };
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
        let traceparent = traceparent(request.metadata());
        let request = request.into_inner();
        validate_idempotency_key(&request.idempotency_key)?;
        if request.amount_krw <= 0 {
            return Err(Status::invalid_argument("amount_krw must be positive"));
        }
        validate_bank_code(&request.bank_code)?;
        let account = AccountNumber::parse(&request.account_number)?;
        let fingerprint = account.fingerprint(&request.bank_code);
        let key = request.idempotency_key;

        let (instruction, first, late) = {
            let mut state = self.lock();
            if self.roll_unavailable(&mut state) {
                drop(state);
                tracing::debug!(idempotency_key = %key, "submission refused: unavailable");
                return Err(unavailable());
            }
            let late = roll(&mut state.rng, self.config.late_reply_per_mille);
            let now = Instant::now();
            let first = !state.applied.contains_key(&key);
            let applied = state.applied.entry(key.clone()).or_insert_with(|| {
                let outcome = if account.is_closed() {
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
                        settles_at: now.checked_add(self.config.settle_delay),
                    }
                };
                Applied {
                    amount_krw: request.amount_krw,
                    bank_code: request.bank_code.clone(),
                    account_last4: account.last4(),
                    account_fingerprint: fingerprint,
                    outcome,
                    submissions: 0,
                    traceparent,
                }
            });
            if applied.amount_krw != request.amount_krw
                || applied.account_fingerprint != fingerprint
            {
                drop(state);
                tracing::warn!(idempotency_key = %key, "idempotency key reused with a different instruction");
                return Err(Status::failed_precondition(
                    "idempotency key reused with a different instruction",
                ));
            }
            applied.submissions += 1;
            (applied.to_instruction(&key, now), first, late)
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
            tracing::debug!(idempotency_key = %key, delay = ?self.config.late_reply_delay, "answering late");
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
        let key = request.into_inner().idempotency_key;
        validate_idempotency_key(&key)?;
        let instruction = {
            let mut state = self.lock();
            if self.roll_unavailable(&mut state) {
                drop(state);
                tracing::debug!(idempotency_key = %key, "look-up refused: unavailable");
                return Err(unavailable());
            }
            state
                .applied
                .get(&key)
                .map(|applied| applied.to_instruction(&key, Instant::now()))
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

#[tonic::async_trait]
impl SandboxLedger for SandboxBank {
    async fn list_applied(
        &self,
        _request: Request<ListAppliedRequest>,
    ) -> Result<Response<ListAppliedResponse>, Status> {
        let now = Instant::now();
        let instructions = self
            .lock()
            .applied
            .iter()
            .map(|(key, applied)| applied.to_applied(key, now))
            .collect();
        Ok(Response::new(ListAppliedResponse { instructions }))
    }
}

/// Reflection advertises only what this server answers; the descriptor set also holds the
/// `payouts.v1` services, which the sandbox does not serve.
fn reflection(own_service: &str) -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(payments_backend_server::SERVICE_NAME)
        .with_service_name(sandbox_ledger_server::SERVICE_NAME)
        .with_service_name(tonic_health::pb::health_server::SERVICE_NAME)
        .with_service_name(own_service)
}

/// Serves the bank (`PaymentsBackend` and `SandboxLedger`), gRPC health and reflection on
/// `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    bank: SandboxBank,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<PaymentsBackendServer<SandboxBank>>()
        .await;
    health_reporter
        .set_serving::<SandboxLedgerServer<SandboxBank>>()
        .await;

    let reflection_v1 =
        reflection(tonic_reflection::pb::v1::server_reflection_server::SERVICE_NAME)
            .build_v1()
            .context("building the reflection service (v1)")?;
    let reflection_v1alpha =
        reflection(tonic_reflection::pb::v1alpha::server_reflection_server::SERVICE_NAME)
            .build_v1alpha()
            .context("building the reflection service (v1alpha)")?;

    let addr = listener
        .local_addr()
        .context("reading the sandbox bank's address")?;
    tracing::warn!(%addr, config = ?bank.config(), "SANDBOX BANK listening: no money moves");

    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(PaymentsBackendServer::new(bank.clone()))
        .add_service(SandboxLedgerServer::new(bank))
        .serve_with_incoming_shutdown(crate::net::incoming(listener), shutdown)
        .await
        .context("serving the sandbox bank")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::sync::oneshot;
    use tonic::Code;
    use tonic::transport::Channel;

    use super::*;
    use crate::proto::payments::v1::payments_backend_client::PaymentsBackendClient;
    use crate::proto::payments::v1::sandbox_ledger_client::SandboxLedgerClient;

    const TRACEPARENT_A: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const TRACEPARENT_B: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    /// A bank served on a real socket, shut down when dropped.
    struct Running {
        addr: SocketAddr,
        backend: PaymentsBackendClient<Channel>,
        ledger: SandboxLedgerClient<Channel>,
        _shutdown: oneshot::Sender<()>,
    }

    async fn start(config: SandboxConfig) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, stopped) = oneshot::channel::<()>();
        tokio::spawn(serve(listener, SandboxBank::new(config), async {
            let _ = stopped.await;
        }));
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Running {
            addr,
            backend: PaymentsBackendClient::new(channel.clone()),
            ledger: SandboxLedgerClient::new(channel),
            _shutdown: shutdown,
        }
    }

    fn submission(key: &str, amount_krw: i64, account_number: &str) -> SubmitInstructionRequest {
        SubmitInstructionRequest {
            idempotency_key: key.to_owned(),
            amount_krw,
            bank_code: "088".to_owned(),
            account_number: account_number.to_owned(),
            holder_name: "김민수".to_owned(),
            memo: "1015 compensation".to_owned(),
        }
    }

    fn with_traceparent<T>(message: T, traceparent: &'static str) -> Request<T> {
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert(TRACEPARENT, traceparent.parse().unwrap());
        request
    }

    fn verification(account_number: &str) -> VerifyAccountHolderRequest {
        VerifyAccountHolderRequest {
            bank_code: "088".to_owned(),
            account_number: account_number.to_owned(),
            expected_holder_name: "김민수".to_owned(),
        }
    }

    async fn submit(
        running: &mut Running,
        request: SubmitInstructionRequest,
    ) -> Result<Instruction, Status> {
        Ok(running
            .backend
            .submit_instruction(request)
            .await?
            .into_inner()
            .instruction
            .unwrap())
    }

    async fn get(running: &mut Running, key: &str) -> Result<Instruction, Status> {
        let request = GetInstructionRequest {
            idempotency_key: key.to_owned(),
        };
        Ok(running
            .backend
            .get_instruction(request)
            .await?
            .into_inner()
            .instruction
            .unwrap())
    }

    async fn ledger(running: &mut Running) -> Vec<AppliedInstruction> {
        running
            .ledger
            .list_applied(ListAppliedRequest {})
            .await
            .unwrap()
            .into_inner()
            .instructions
    }

    #[tokio::test]
    async fn a_repeated_key_is_applied_once_and_answered_with_the_first_result() {
        let mut bank = start(SandboxConfig::default()).await;

        let first = bank
            .backend
            .submit_instruction(with_traceparent(
                submission("k-1", 30_000, "110-123-456789"),
                TRACEPARENT_A,
            ))
            .await
            .unwrap()
            .into_inner();
        let second = bank
            .backend
            .submit_instruction(with_traceparent(
                submission("k-1", 30_000, "110123456789"),
                TRACEPARENT_B,
            ))
            .await
            .unwrap()
            .into_inner();

        assert_eq!(first, second);
        let instruction = first.instruction.unwrap();
        assert_eq!(instruction.status(), InstructionStatus::Paid);
        assert_eq!(instruction.account_last4, "6789");
        assert_eq!(instruction.amount_krw, 30_000);
        assert_eq!(
            ledger(&mut bank).await,
            vec![AppliedInstruction {
                idempotency_key: "k-1".to_owned(),
                amount_krw: 30_000,
                account_last4: "6789".to_owned(),
                status: InstructionStatus::Paid as i32,
                submissions: 2,
                traceparent: TRACEPARENT_A.to_owned(),
            }]
        );
        assert_eq!(get(&mut bank, "k-1").await.unwrap(), instruction);
    }

    #[tokio::test]
    async fn closed_and_foreign_accounts_are_refused_and_nothing_is_paid() {
        let mut bank = start(SandboxConfig::default()).await;

        let closed = bank
            .backend
            .verify_account_holder(verification("3333-0000"))
            .await
            .unwrap()
            .into_inner();
        assert!(closed.matches);
        assert_eq!(closed.failure_code, ACCOUNT_CLOSED);

        let foreign = bank
            .backend
            .verify_account_holder(verification("3333-9999"))
            .await
            .unwrap()
            .into_inner();
        assert!(!foreign.matches);
        assert_eq!(foreign.holder_name, UNKNOWN_HOLDER_NAME);
        assert!(foreign.failure_code.is_empty());

        let fine = bank
            .backend
            .verify_account_holder(verification("3333-1234"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            fine,
            VerifyAccountHolderResponse {
                matches: true,
                holder_name: "김민수".to_owned(),
                failure_code: String::new(),
            }
        );

        let closed = submit(&mut bank, submission("closed", 30_000, "3333-0000"))
            .await
            .unwrap();
        assert_eq!(closed.status(), InstructionStatus::Failed);
        assert_eq!(closed.failure_code, ACCOUNT_CLOSED);
        let foreign = submit(&mut bank, submission("foreign", 30_000, "3333-9999"))
            .await
            .unwrap();
        assert_eq!(foreign.status(), InstructionStatus::Failed);
        assert_eq!(foreign.failure_code, HOLDER_MISMATCH);

        assert_eq!(get(&mut bank, "closed").await.unwrap(), closed);
        let statuses: Vec<_> = ledger(&mut bank)
            .await
            .iter()
            .map(|a| (a.idempotency_key.clone(), a.status()))
            .collect();
        assert_eq!(
            statuses,
            vec![
                ("closed".to_owned(), InstructionStatus::Failed),
                ("foreign".to_owned(), InstructionStatus::Failed),
            ]
        );
    }

    #[tokio::test]
    async fn an_accepted_instruction_settles_after_the_delay() {
        let mut bank = start(SandboxConfig {
            settle_delay: Duration::from_millis(300),
            ..SandboxConfig::default()
        })
        .await;

        let submitted = submit(&mut bank, submission("slow", 50_000, "1002-345-678901"))
            .await
            .unwrap();
        assert_eq!(submitted.status(), InstructionStatus::Accepted);
        assert_eq!(
            get(&mut bank, "slow").await.unwrap().status(),
            InstructionStatus::Accepted
        );

        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            get(&mut bank, "slow").await.unwrap().status(),
            InstructionStatus::Paid
        );
        // A repeat after settling reports the current state, not the one first answered.
        let repeated = submit(&mut bank, submission("slow", 50_000, "1002-345-678901"))
            .await
            .unwrap();
        assert_eq!(repeated.status(), InstructionStatus::Paid);
        assert_eq!(ledger(&mut bank).await[0].status(), InstructionStatus::Paid);
    }

    #[tokio::test]
    async fn a_key_reused_for_a_different_instruction_is_refused() {
        let mut bank = start(SandboxConfig::default()).await;
        submit(&mut bank, submission("k", 30_000, "110123456789"))
            .await
            .unwrap();

        let other_amount = submit(&mut bank, submission("k", 50_000, "110123456789"))
            .await
            .unwrap_err();
        assert_eq!(other_amount.code(), Code::FailedPrecondition);
        assert!(other_amount.message().contains("idempotency key reused"));
        let other_account = submit(&mut bank, submission("k", 30_000, "110123456780"))
            .await
            .unwrap_err();
        assert_eq!(other_account.code(), Code::FailedPrecondition);

        let applied = ledger(&mut bank).await;
        assert_eq!(applied.len(), 1);
        assert_eq!(applied[0].amount_krw, 30_000);
        assert_eq!(applied[0].account_last4, "6789");
        assert_eq!(applied[0].submissions, 1);
    }

    #[tokio::test]
    async fn unknown_keys_and_bad_input_are_rejected() {
        let mut bank = start(SandboxConfig::default()).await;
        assert_eq!(
            get(&mut bank, "never-sent").await.unwrap_err().code(),
            Code::NotFound
        );

        let cases = [
            (submission("", 30_000, "110123456789"), "idempotency_key"),
            (submission("k", 0, "110123456789"), "amount_krw"),
            (submission("k", -1, "110123456789"), "amount_krw"),
            (
                SubmitInstructionRequest {
                    bank_code: String::new(),
                    ..submission("k", 1, "110123456789")
                },
                "bank_code",
            ),
            (submission("k", 30_000, ""), "account_number"),
            (submission("k", 30_000, "12ab34"), "account_number"),
        ];
        for (request, field) in cases {
            let status = submit(&mut bank, request).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{field}");
            assert!(
                status.message().contains(field),
                "{field}: {}",
                status.message()
            );
        }
        let status = bank
            .backend
            .verify_account_holder(verification(""))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("account_number"));
        let status = bank
            .backend
            .verify_account_holder(VerifyAccountHolderRequest {
                bank_code: String::new(),
                ..verification("1234")
            })
            .await
            .unwrap_err();
        assert!(status.message().contains("bank_code"));
        assert!(ledger(&mut bank).await.is_empty());
    }

    async fn unavailable_outcomes(seed: u64) -> (Vec<bool>, usize) {
        let mut bank = start(SandboxConfig {
            unavailable_per_mille: 400,
            seed,
            ..SandboxConfig::default()
        })
        .await;
        let mut outcomes = Vec::new();
        for i in 0..40 {
            let outcome = submit(
                &mut bank,
                submission(&format!("k-{i:02}"), 30_000, "110123456789"),
            )
            .await;
            match outcome {
                Ok(_) => outcomes.push(false),
                Err(status) => {
                    assert_eq!(status.code(), Code::Unavailable);
                    outcomes.push(true);
                }
            }
        }
        (outcomes, ledger(&mut bank).await.len())
    }

    #[tokio::test]
    async fn faults_are_reproducible_from_the_seed_and_apply_nothing() {
        let (first, first_applied) = unavailable_outcomes(7).await;
        let (second, second_applied) = unavailable_outcomes(7).await;
        assert_eq!(first, second);
        assert_eq!(first_applied, second_applied);
        assert!(first.contains(&true) && first.contains(&false), "{first:?}");
        assert_eq!(
            first_applied,
            first.iter().filter(|unavailable| !**unavailable).count()
        );
    }

    #[tokio::test]
    async fn a_late_reply_misses_the_deadline_but_the_instruction_is_applied() {
        let mut bank = start(SandboxConfig {
            late_reply_per_mille: 1000,
            late_reply_delay: Duration::from_secs(3),
            ..SandboxConfig::default()
        })
        .await;

        let mut request = Request::new(submission("late", 30_000, "110123456789"));
        request.set_timeout(Duration::from_millis(200));
        let started = Instant::now();
        let status = bank.backend.submit_instruction(request).await.unwrap_err();
        assert!(
            matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
            "{status:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));

        let applied = ledger(&mut bank).await;
        assert_eq!(applied.len(), 1);
        assert_eq!(applied[0].idempotency_key, "late");
        assert_eq!(applied[0].submissions, 1);
        assert_eq!(applied[0].status(), InstructionStatus::Paid);
        // Looking the key up is how the caller resolves the unknown outcome.
        assert_eq!(
            get(&mut bank, "late").await.unwrap().status(),
            InstructionStatus::Paid
        );
    }

    #[tokio::test]
    async fn health_and_reflection_are_served() {
        use tonic_health::pb::HealthCheckRequest;
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::health_client::HealthClient;
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

        let bank = start(SandboxConfig::default()).await;
        let channel = Channel::from_shared(format!("http://{}", bank.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();

        let mut health = HealthClient::new(channel.clone());
        for service in [
            payments_backend_server::SERVICE_NAME,
            sandbox_ledger_server::SERVICE_NAME,
        ] {
            let response = health
                .check(HealthCheckRequest {
                    service: service.to_owned(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(response.status(), ServingStatus::Serving, "{service}");
        }

        let mut reflection = ServerReflectionClient::new(channel);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = reflection
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let response = responses.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
            panic!("unexpected reflection response: {response:?}");
        };
        let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
        assert!(
            names.iter().any(|n| n == "payments.v1.PaymentsBackend"),
            "{names:?}"
        );
        assert!(
            names.iter().any(|n| n == "payments.v1.SandboxLedger"),
            "{names:?}"
        );
        assert!(
            !names.iter().any(|n| n.starts_with("payouts.")),
            "{names:?}"
        );
    }
}
