//! The sandbox bank served on a real socket and called through generated clients.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::{Code, IntoRequest, Request, Status};

use super::bank::TRACEPARENT;
use super::{
    ACCOUNT_CLOSED, HOLDER_MISMATCH, SandboxBank, SandboxConfig, UNKNOWN_HOLDER_NAME, serve,
};
use crate::proto::payments::v1::payments_backend_client::PaymentsBackendClient;
use crate::proto::payments::v1::sandbox_ledger_client::SandboxLedgerClient;
use crate::proto::payments::v1::{
    AppliedInstruction, GetInstructionRequest, Instruction, InstructionStatus, ListAppliedRequest,
    SubmitInstructionRequest, VerifyAccountHolderRequest, VerifyAccountHolderResponse,
    payments_backend_server, sandbox_ledger_server,
};

const TRACEPARENT_A: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACEPARENT_B: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// A bank served on a real socket, shut down when dropped.
pub(super) struct Running {
    addr: SocketAddr,
    pub(super) backend: PaymentsBackendClient<Channel>,
    pub(super) ledger: SandboxLedgerClient<Channel>,
    _shutdown: oneshot::Sender<()>,
}

pub(super) async fn start(config: SandboxConfig) -> Running {
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

pub(super) fn submission(
    key: &str,
    amount_krw: i64,
    account_number: &str,
) -> SubmitInstructionRequest {
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

pub(super) fn verification(account_number: &str) -> VerifyAccountHolderRequest {
    VerifyAccountHolderRequest {
        bank_code: "088".to_owned(),
        account_number: account_number.to_owned(),
        expected_holder_name: "김민수".to_owned(),
    }
}

pub(super) async fn submit(
    running: &mut Running,
    request: impl IntoRequest<SubmitInstructionRequest>,
) -> Result<Instruction, Status> {
    Ok(running
        .backend
        .submit_instruction(request)
        .await?
        .into_inner()
        .instruction
        .unwrap())
}

pub(super) async fn verify(
    running: &mut Running,
    request: VerifyAccountHolderRequest,
) -> Result<VerifyAccountHolderResponse, Status> {
    Ok(running
        .backend
        .verify_account_holder(request)
        .await?
        .into_inner())
}

pub(super) async fn get(running: &mut Running, key: &str) -> Result<Instruction, Status> {
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

pub(super) async fn ledger(running: &mut Running) -> Vec<AppliedInstruction> {
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

    let first = submit(
        &mut bank,
        with_traceparent(submission("k-1", 30_000, "110-123-456789"), TRACEPARENT_A),
    )
    .await
    .unwrap();
    let second = submit(
        &mut bank,
        with_traceparent(submission("k-1", 30_000, "110123456789"), TRACEPARENT_B),
    )
    .await
    .unwrap();

    assert_eq!(first, second);
    let instruction = first;
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

    let closed = verify(&mut bank, verification("3333-0000")).await.unwrap();
    assert!(closed.matches);
    assert_eq!(closed.failure_code, ACCOUNT_CLOSED);

    let foreign = verify(&mut bank, verification("3333-9999")).await.unwrap();
    assert!(!foreign.matches);
    assert_eq!(foreign.holder_name, UNKNOWN_HOLDER_NAME);
    assert!(foreign.failure_code.is_empty());

    let fine = verify(&mut bank, verification("3333-1234")).await.unwrap();
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
    let status = verify(&mut bank, verification("")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("account_number"));
    let status = verify(
        &mut bank,
        VerifyAccountHolderRequest {
            bank_code: String::new(),
            ..verification("1234")
        },
    )
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
