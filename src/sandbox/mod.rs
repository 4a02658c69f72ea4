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
//!
//! The bank stands apart from the service: `serve` starts one in process only when no
//! payments backend is configured, and `partner-payouts sandbox-bank` runs one on its own.
//! It speaks the `payments.v1` contract like any bank; nothing in [`crate::payments`] knows
//! about it.
//!
//! It is compiled under the cargo feature `sandbox`, on by default so that `cargo run` needs
//! no set-up and the tests (which pay into it) build as they are. A production binary can
//! leave it out with `--no-default-features`: there is then no fake bank to pay into by
//! mistake, and `serve` refuses to start without `PAYOUTS_PAYMENTS_BACKEND_URL`.
//!
//! - `bank`: [`SandboxBank`] and its `payments.v1.PaymentsBackend` service.
//! - `ledger`: what it applied, and the `payments.v1.SandboxLedger` service that lists it.
//! - `account`: account numbers and the failures their last digits trigger.
//! - `faults`: the seeded draws of injected faults.
//! - `traffic`: what every call goes through first (latency, the rate limit, an outage) and
//!   the counts `payments.v1.SandboxLedger/GetStats` answers.

mod account;
mod bank;
mod faults;
mod ledger;
#[cfg(test)]
mod tests;
mod traffic;
#[cfg(test)]
mod traffic_tests;

use std::num::NonZeroU32;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;

pub use account::{
    ACCOUNT_CLOSED, CLOSED_ACCOUNT_SUFFIX, FOREIGN_HOLDER_SUFFIX, HOLDER_MISMATCH,
    UNKNOWN_HOLDER_NAME,
};
pub use bank::SandboxBank;

use crate::proto::payments::v1::payments_backend_server::{self, PaymentsBackendServer};
use crate::proto::payments::v1::sandbox_ledger_server::{self, SandboxLedgerServer};

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
    /// How long every `PaymentsBackend` call takes to be answered, whatever the answer.
    pub latency: Duration,
    /// `PaymentsBackend` calls per second the bank takes, all methods together (see
    /// [`rate_limit_burst`]); a call over it is answered `RESOURCE_EXHAUSTED` with a
    /// `RetryInfo` and nothing is applied. `None`: no limit.
    pub rate_limit_per_s: Option<NonZeroU32>,
    /// A time when the bank is down: every call is answered `UNAVAILABLE`.
    pub outage: Option<Outage>,
}

/// A window of unavailability, timed from the bank's first `PaymentsBackend` call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outage {
    /// From the first call to the start of the outage.
    pub after: Duration,
    /// How long the outage lasts.
    pub lasting: Duration,
}

/// Calls the rate limit lets through back to back after a quiet spell: a tenth of a
/// second's worth (at least one). A real bank's gateway allows some burst; a small one keeps
/// a client that ignores the limit from hiding behind it for long.
pub fn rate_limit_burst(per_second: NonZeroU32) -> NonZeroU32 {
    NonZeroU32::new(per_second.get() / 10).unwrap_or(NonZeroU32::MIN)
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            settle_delay: Duration::ZERO,
            unavailable_per_mille: 0,
            late_reply_per_mille: 0,
            late_reply_delay: Duration::from_secs(5),
            seed: 0,
            latency: Duration::ZERO,
            rate_limit_per_s: None,
            outage: None,
        }
    }
}

/// Serves the bank (`PaymentsBackend` and `SandboxLedger`), gRPC health and reflection on
/// `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    bank: SandboxBank,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let own_services = [
        payments_backend_server::SERVICE_NAME,
        sandbox_ledger_server::SERVICE_NAME,
    ];
    let (_health_reporter, health_service) = crate::discovery::health_serving(&own_services).await;
    // Reflection advertises only what this server answers; the descriptor set also holds the
    // `payouts.v1` services, which the sandbox does not serve.
    let (reflection_v1, reflection_v1alpha) = crate::discovery::reflection(&own_services)?;

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
