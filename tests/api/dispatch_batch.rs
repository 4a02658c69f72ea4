//! The dispatcher works on a batch at a time: rows that verify, rows the bank refuses, rows
//! whose calls fail for a while, all leased and recorded together, each ending in the state,
//! attempts and history it would have had alone. The bank is the sandbox behind a wrapper that
//! refuses chosen calls once.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use partner_payouts::proto::payments::v1::{
    self as bank, payments_backend_server::PaymentsBackend,
    payments_backend_server::PaymentsBackendServer, sandbox_ledger_client::SandboxLedgerClient,
    sandbox_ledger_server::SandboxLedgerServer,
};
use partner_payouts::proto::payouts::v1 as pb;
use partner_payouts::sandbox::{SandboxBank, SandboxConfig};
use tonic::{Request, Response, Status};

use crate::helpers::*;
use crate::on_both_databases;

use pb::DisbursementStatus::{Failed, Paid, Queued, Submitted, Unspecified};

const VERIFY: &str = "VERIFY_ACCOUNT_HOLDER";
const SUBMIT: &str = "SUBMIT_INSTRUCTION";
const LOOKUP: &str = "GET_INSTRUCTION";

/// Accounts whose first holder check, or first instruction, the bank refuses as unavailable.
const FLAKY_VERIFY_SUFFIX: &str = "1111";
const FLAKY_SUBMIT_SUFFIX: &str = "2222";

/// The sandbox bank, refusing the first holder check of accounts ending in
/// [`FLAKY_VERIFY_SUFFIX`] and the first submission to accounts ending in
/// [`FLAKY_SUBMIT_SUFFIX`], before anything is applied.
#[derive(Clone)]
struct FlakyBank {
    bank: SandboxBank,
    refused: Arc<Mutex<HashSet<String>>>,
}

impl FlakyBank {
    /// True the first time `what` is asked about an account ending in `suffix`.
    fn refuse_once(&self, what: &str, account_number: &str, suffix: &str) -> bool {
        account_number.ends_with(suffix)
            && self
                .refused
                .lock()
                .expect("lock")
                .insert(format!("{what}:{account_number}"))
    }
}

#[tonic::async_trait]
impl PaymentsBackend for FlakyBank {
    async fn verify_account_holder(
        &self,
        request: Request<bank::VerifyAccountHolderRequest>,
    ) -> Result<Response<bank::VerifyAccountHolderResponse>, Status> {
        if self.refuse_once(
            "verify",
            &request.get_ref().account_number,
            FLAKY_VERIFY_SUFFIX,
        ) {
            return Err(Status::unavailable("try again"));
        }
        self.bank.verify_account_holder(request).await
    }

    async fn submit_instruction(
        &self,
        request: Request<bank::SubmitInstructionRequest>,
    ) -> Result<Response<bank::SubmitInstructionResponse>, Status> {
        if self.refuse_once(
            "submit",
            &request.get_ref().account_number,
            FLAKY_SUBMIT_SUFFIX,
        ) {
            return Err(Status::unavailable("try again"));
        }
        self.bank.submit_instruction(request).await
    }

    async fn get_instruction(
        &self,
        request: Request<bank::GetInstructionRequest>,
    ) -> Result<Response<bank::GetInstructionResponse>, Status> {
        self.bank.get_instruction(request).await
    }
}

/// Serves a [`FlakyBank`] on 127.0.0.1; returns its URL.
async fn flaky_bank() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let bank = FlakyBank {
        bank: SandboxBank::new(SandboxConfig::default()),
        refused: Arc::default(),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(PaymentsBackendServer::new(bank.clone()))
            .add_service(SandboxLedgerServer::new(bank.bank))
            .serve_with_incoming(partner_payouts::net::incoming(listener)),
    );
    format!("http://{addr}")
}

pub(crate) async fn set_paused(app: &TestApp, paused: bool) {
    let mut client = app.disbursements();
    if paused {
        client
            .pause_dispatch(pb::PauseDispatchRequest {
                request_id: request_id(),
                reason: "filling a batch".into(),
            })
            .await
            .expect("pause");
    } else {
        client
            .resume_dispatch(pb::ResumeDispatchRequest {
                request_id: request_id(),
            })
            .await
            .expect("resume");
    }
}

fn operations(d: &pb::Disbursement) -> Vec<(&str, &str)> {
    d.attempts
        .iter()
        .map(|a| (a.operation.as_str(), a.outcome.as_str()))
        .collect()
}

fn transitions(d: &pb::Disbursement) -> Vec<(pb::DisbursementStatus, pb::DisbursementStatus)> {
    d.history
        .iter()
        .map(|h| (h.from_status(), h.to_status()))
        .collect()
}

async fn summary(app: &TestApp) -> pb::GetProgramSummaryResponse {
    app.disbursements()
        .get_program_summary(pb::GetProgramSummaryRequest {})
        .await
        .expect("summary")
        .into_inner()
}

async fn applied(bank_url: &str) -> Vec<bank::AppliedInstruction> {
    SandboxLedgerClient::connect(bank_url.to_owned())
        .await
        .expect("ledger")
        .list_applied(bank::ListAppliedRequest {})
        .await
        .expect("list applied")
        .into_inner()
        .instructions
}

/// Whether the store keeps the disbursement's holder as verified (not part of the API).
async fn holder_verified(app: &TestApp, disbursement_id: &str) -> bool {
    const SQL: &str = "SELECT holder_verified FROM disbursements WHERE disbursement_id = $1";
    match app.db {
        Db::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&app.database_url)
                .await
                .expect("open the database");
            sqlx::query_scalar(SQL)
                .bind(disbursement_id)
                .fetch_one(&pool)
                .await
                .expect("read holder_verified")
        }
        Db::Postgres => {
            let pool = sqlx::PgPool::connect(&app.database_url)
                .await
                .expect("open the database");
            sqlx::query_scalar(SQL)
                .bind(disbursement_id)
                .fetch_one(&pool)
                .await
                .expect("read holder_verified")
        }
    }
}

/// Six payouts queued while dispatch is paused go out in one batch once it resumes.
async fn a_mixed_batch_ends_each_payout_as_alone(db: Db) {
    let bank_url = flaky_bank().await;
    let url = bank_url.clone();
    let app = spawn_app(db, move |s| s.payments_backend_url = Some(url)).await;
    set_paused(&app, true).await;
    let good = approved_claim(&app, 1, ACCOUNT, 100).await;
    let closed = approved_claim(&app, 2, "110-123-450000", 100).await;
    let foreign = approved_claim(&app, 3, "110-123-459999", 100).await;
    let flaky_verify = approved_claim(&app, 4, "110-123-451111", 100).await;
    let flaky_submit = approved_claim(&app, 5, "110-123-452222", 100).await;
    let other = approved_claim(&app, 6, "110-123-453456", 400_000).await;
    set_paused(&app, false).await;

    for (claim, account) in [(&good, "****6789"), (&other, "****3456")] {
        let paid = wait_for(&app, &claim.disbursement_id, Paid).await;
        assert_eq!(operations(&paid), vec![(VERIFY, "MATCH"), (SUBMIT, "PAID")]);
        assert_eq!(paid.attempts[1].idempotency_key, paid.idempotency_key);
        assert_eq!(paid.idempotency_key, format!("{}-0", claim.disbursement_id));
        assert_eq!(
            transitions(&paid),
            vec![
                (Unspecified, Queued),
                (Queued, Submitted),
                (Submitted, Paid)
            ]
        );
        assert_eq!(paid.history[1].actor, "dispatcher");
        assert_eq!(
            paid.history[1].reason,
            "instruction key stored before sending"
        );
        assert_eq!(paid.history[2].reason, "backend reports paid");
        assert_eq!(paid.account_number, account);
    }

    for (claim, code, outcome) in [
        (&closed, "ACCOUNT_CLOSED", "ACCOUNT_UNUSABLE"),
        (&foreign, "HOLDER_MISMATCH", "MISMATCH"),
    ] {
        let failed = wait_for(&app, &claim.disbursement_id, Failed).await;
        assert_eq!(failed.failure_code, code);
        assert!(!failed.failure_message.is_empty(), "{failed:?}");
        assert_eq!(operations(&failed), vec![(VERIFY, outcome)]);
        assert_eq!(failed.attempts[0].code, code);
        assert_eq!(failed.idempotency_key, "", "no key for a refused account");
        assert_eq!(
            transitions(&failed),
            vec![(Unspecified, Queued), (Queued, Failed)]
        );
        assert_eq!(failed.history[1].actor, "dispatcher");
        assert_eq!(failed.history[1].reason, code);
    }

    // A refused holder check backs off and is asked again; only then is a key made.
    let paid = wait_for(&app, &flaky_verify.disbursement_id, Paid).await;
    assert_eq!(
        operations(&paid),
        vec![(VERIFY, "ERROR"), (VERIFY, "MATCH"), (SUBMIT, "PAID")]
    );
    assert_eq!(paid.attempts[0].code, "Unavailable");
    assert_eq!(
        transitions(&paid),
        vec![
            (Unspecified, Queued),
            (Queued, Submitted),
            (Submitted, Paid)
        ]
    );

    // A refused instruction is looked up under its stored key, then sent again under it.
    let paid = wait_for(&app, &flaky_submit.disbursement_id, Paid).await;
    assert_eq!(
        operations(&paid),
        vec![
            (VERIFY, "MATCH"),
            (SUBMIT, "ERROR"),
            (LOOKUP, "NOT_FOUND"),
            (SUBMIT, "PAID")
        ]
    );
    let key = format!("{}-0", flaky_submit.disbursement_id);
    assert_eq!(paid.idempotency_key, key);
    assert!(paid.attempts[1..].iter().all(|a| a.idempotency_key == key));
    assert_eq!(
        transitions(&paid),
        vec![
            (Unspecified, Queued),
            (Queued, Submitted),
            (Submitted, Paid)
        ]
    );

    let s = summary(&app).await;
    assert_eq!((s.paid_count, s.paid_krw), (4, 30_000 * 3 + 50_000));
    assert_eq!((s.failed_count, s.failed_krw), (2, 60_000));
    assert_eq!(s.in_flight_count, 0);

    // The bank applied one instruction per paid payout, each under its own key, once.
    let ledger = applied(&bank_url).await;
    let mut keys: Vec<&str> = ledger.iter().map(|i| i.idempotency_key.as_str()).collect();
    keys.sort_unstable();
    let mut expected: Vec<String> = [&good, &other, &flaky_verify, &flaky_submit]
        .iter()
        .map(|c| format!("{}-0", c.disbursement_id))
        .collect();
    expected.sort_unstable();
    assert_eq!(keys, expected);
    assert!(ledger.iter().all(|i| i.submissions == 1), "{ledger:?}");
    app.stop().await;
}

/// Three 30,000 KRW payouts in one batch under a 70,000 KRW budget: the keys made earlier in
/// the batch count, so two are paid and the third waits, never sent.
async fn the_budget_counts_the_batch(db: Db) {
    let app = spawn_app(db, |s| s.dispatch_budget_krw = Some(70_000)).await;
    set_paused(&app, true).await;
    let mut ids = Vec::new();
    for seed in 1..=3 {
        ids.push(
            approved_claim(&app, seed, ACCOUNT, 100)
                .await
                .disbursement_id,
        );
    }
    set_paused(&app, false).await;
    let held = eventually(10, || {
        let (app, ids) = (&app, &ids);
        async move {
            let mut paid = 0;
            let mut held = Vec::new();
            for id in ids {
                let d = get(app, id).await;
                match d.status() {
                    Paid => paid += 1,
                    Queued if d.attempts.iter().any(|a| a.operation == VERIFY) => held.push(d),
                    _ => {}
                }
            }
            (paid == 2 && held.len() == 1).then(|| held.remove(0))
        }
    })
    .await;
    assert_eq!(operations(&held), vec![(VERIFY, "MATCH")]);
    assert_eq!(held.idempotency_key, "");
    assert!(
        holder_verified(&app, &held.disbursement_id).await,
        "the check is kept for when the budget allows"
    );
    assert_eq!(transitions(&held), vec![(Unspecified, Queued)]);
    let s = summary(&app).await;
    assert_eq!((s.paid_count, s.paid_krw), (2, 60_000));
    assert_eq!((s.queued_count, s.in_flight_count), (1, 1));
    app.stop().await;
}

on_both_databases!(
    a_mixed_batch_ends_each_payout_as_alone,
    db = a_mixed_batch_ends_each_payout_as_alone
);

on_both_databases!(
    the_budget_counts_the_batch,
    db = the_budget_counts_the_batch
);
