//! Scenarios against a sandbox bank that behaves like a real one under load:
//!
//! - `throttled-bank`: the bank takes `--bank-rate` calls/s (default 300) and answers in
//!   `--bank-latency-ms` (default 20). Reports the payout throughput as a ratio to the bank's
//!   limit: the time the accepted calls need at that limit over the time taken, and the share
//!   of calls throttled.
//! - `outage`: the bank (same latency, no rate limit unless `--bank-rate` is given) is down from
//!   `--outage-after-ms` (default 2000) after its first call for `--outage-ms` (default 15000).
//!   Reports the calls refused as down.
//!
//! Both queue `--count` approved claims with dispatch paused, then resume it and time until
//! every payout is PAID, and check the bank applied one instruction each, once.

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use partner_payouts::proto::payments::v1::{
    GetStatsRequest, sandbox_ledger_client::SandboxLedgerClient,
};
use partner_payouts::proto::payouts::v1::{
    self as pb, disbursement_service_client::DisbursementServiceClient,
};
use partner_payouts::sandbox::{Outage, SandboxConfig};

use super::{Clients, Options, import_claims, import_partners, report_sandbox, wait_until_paid};

/// The scenarios of this module.
pub const SCENARIOS: [&str; 2] = ["throttled-bank", "outage"];

/// The bank the scenario runs against (the default one for the other scenarios).
pub fn sandbox_config(o: &Options) -> SandboxConfig {
    let ms = Duration::from_millis;
    let default_rate = (o.scenario == "throttled-bank").then_some(300);
    let latency = if SCENARIOS.contains(&o.scenario.as_str()) {
        o.bank_latency_ms.unwrap_or(20)
    } else {
        o.bank_latency_ms.unwrap_or(0)
    };
    SandboxConfig {
        latency: ms(latency),
        rate_limit_per_s: o.bank_rate.or(default_rate).and_then(NonZeroU32::new),
        outage: (o.scenario == "outage").then(|| Outage {
            after: ms(o.outage_after_ms.unwrap_or(2_000)),
            lasting: ms(o.outage_ms.unwrap_or(15_000)),
        }),
        ..SandboxConfig::default()
    }
}

async fn set_paused(clients: &Clients, paused: bool) -> anyhow::Result<()> {
    let mut client = DisbursementServiceClient::new(clients.pick(0));
    let request_id = uuid::Uuid::now_v7().to_string();
    if paused {
        let reason = "queueing the benchmark's payouts".to_owned();
        client
            .pause_dispatch(pb::PauseDispatchRequest { request_id, reason })
            .await?;
    } else {
        client
            .resume_dispatch(pb::ResumeDispatchRequest { request_id })
            .await?;
    }
    Ok(())
}

/// Runs the scenario on the service behind `clients`, paying into the bank at `bank_addr`.
pub async fn run(
    o: &Options,
    clients: &Clients,
    bank_addr: std::net::SocketAddr,
    base: u64,
) -> anyhow::Result<()> {
    let config = sandbox_config(o);
    set_paused(clients, true).await?;
    let partners = import_partners(clients, base, o.count, o.streams).await?;
    let claims = import_claims(clients, base, o.count, o.streams).await?;
    println!(
        "queued {} payouts (partners {partners:?}, claims {claims:?})",
        o.count
    );
    set_paused(clients, false).await?;
    let started = Instant::now();
    let paid = wait_until_paid(&clients.pick(0), o.count).await?;
    let elapsed = started.elapsed();
    let stats = SandboxLedgerClient::connect(format!("http://{bank_addr}"))
        .await?
        .get_stats(GetStatsRequest {})
        .await?
        .into_inner();
    let accepted = stats.calls_total - stats.throttled_total - stats.unavailable_total;
    println!(
        "{}: {} payouts PAID in {:.2}s (failed {}); bank: latency {:?}, limit {:?}/s, outage \
         {:?}; calls {} = accepted {} + throttled {} ({:.1}%) + refused as down {}",
        o.scenario,
        paid.paid_count,
        elapsed.as_secs_f64(),
        paid.failed_count,
        config.latency,
        config.rate_limit_per_s,
        config.outage,
        stats.calls_total,
        accepted,
        stats.throttled_total,
        100.0 * stats.throttled_total as f64 / stats.calls_total.max(1) as f64,
        stats.unavailable_total,
    );
    if let Some(limit) = config.rate_limit_per_s {
        let needed = accepted as f64 / f64::from(limit.get());
        println!(
            "{}: the accepted calls need {needed:.2}s at {limit}/s: throughput {:.3} of the \
             bank's limit ({:.1} payouts/s)",
            o.scenario,
            needed / elapsed.as_secs_f64(),
            paid.paid_count as f64 / elapsed.as_secs_f64(),
        );
    }
    report_sandbox(Some(bank_addr)).await
}
