//! The payments backend: its client and the dispatcher that drives disbursements.
//!
//! - `dispatcher`: leases due payouts and drives each to `PAID` or `FAILED`.
//! - `backend`: its calls to the bank, each let through by `flow` first: a window of calls in
//!   flight, the circuit breaker (`breaker`), the rate learned from throttling (`pace`) and
//!   the contractual rate limit.

mod backend;
mod breaker;
pub mod dispatcher;
mod flow;
mod pace;

pub use breaker::BreakerConfig;
pub use dispatcher::{Dispatcher, DispatcherConfig};

use crate::domain::AttemptOutcome;
use crate::proto::payments::v1::InstructionStatus;
use crate::proto::payments::v1::payments_backend_client::PaymentsBackendClient;

/// A client of the payments backend at `url`. Connects on first use, so a backend that is
/// down at start-up only delays dispatch.
pub fn connect_backend(
    url: &str,
    call_timeout: std::time::Duration,
    ca_file: Option<&std::path::Path>,
) -> anyhow::Result<PaymentsBackendClient<tonic::transport::Channel>> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())
        .map_err(|e| anyhow::anyhow!("payments_backend_url {url:?}: {e}"))?
        .timeout(call_timeout)
        .connect_timeout(call_timeout);
    if let Some(ca_file) = ca_file {
        let pem = std::fs::read(ca_file)
            .map_err(|e| anyhow::anyhow!("payments_backend_ca_file {}: {e}", ca_file.display()))?;
        endpoint = endpoint.tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(pem)),
        )?;
    }
    let channel = endpoint.connect_lazy();
    Ok(PaymentsBackendClient::new(channel))
}

/// The outcome an attempt records for the instruction status the bank answered: the status's
/// name without its prefix (`INSTRUCTION_STATUS_PAID` is `PAID`).
impl From<InstructionStatus> for AttemptOutcome {
    fn from(status: InstructionStatus) -> Self {
        match status {
            InstructionStatus::Unspecified => Self::Unspecified,
            InstructionStatus::Accepted => Self::Accepted,
            InstructionStatus::Paid => Self::Paid,
            InstructionStatus::Failed => Self::Failed,
        }
    }
}

/// Bank maintenance hours, e.g. `23:30-00:30 Asia/Seoul`, during which nothing is sent.
#[derive(Debug, Clone, PartialEq)]
pub struct QuietHours {
    start_minute: u16,
    end_minute: u16,
    zone: jiff::tz::TimeZone,
}

impl QuietHours {
    pub fn parse(text: &str) -> Result<Self, String> {
        let usage = || format!("{text:?}: expected HH:MM-HH:MM ZONE, e.g. 23:30-00:30 Asia/Seoul");
        let (range, zone) = text.trim().split_once(' ').ok_or_else(usage)?;
        let (start, end) = range.split_once('-').ok_or_else(usage)?;
        let minute = |hm: &str| -> Result<u16, String> {
            let (h, m) = hm.split_once(':').ok_or_else(usage)?;
            let (h, m): (u16, u16) = (
                h.parse().map_err(|_| usage())?,
                m.parse().map_err(|_| usage())?,
            );
            if h > 23 || m > 59 {
                return Err(usage());
            }
            Ok(h * 60 + m)
        };
        let zone = jiff::tz::TimeZone::get(zone.trim())
            .map_err(|e| format!("{text:?}: unknown time zone: {e}"))?;
        let (start_minute, end_minute) = (minute(start)?, minute(end)?);
        if start_minute == end_minute {
            return Err(format!("{text:?}: start and end are the same"));
        }
        Ok(Self {
            start_minute,
            end_minute,
            zone,
        })
    }

    pub fn contains(&self, at: jiff::Timestamp) -> bool {
        let local = at.to_zoned(self.zone.clone());
        let minute = u16::try_from(local.hour()).unwrap_or(0) * 60
            + u16::try_from(local.minute()).unwrap_or(0);
        if self.start_minute < self.end_minute {
            (self.start_minute..self.end_minute).contains(&minute)
        } else {
            minute >= self.start_minute || minute < self.end_minute
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{AttemptOutcome, InstructionStatus, QuietHours};

    #[test]
    fn an_instruction_status_is_recorded_by_its_name_without_prefix() {
        let known = (0..).map_while(|number| InstructionStatus::try_from(number).ok());
        for status in known {
            let name = status
                .as_str_name()
                .trim_start_matches("INSTRUCTION_STATUS_");
            assert_eq!(AttemptOutcome::from(status).as_str(), name);
        }
    }

    fn at(rfc3339: &str) -> jiff::Timestamp {
        rfc3339.parse().expect("timestamp")
    }

    #[test]
    fn quiet_hours_wrap_midnight_in_their_zone() {
        let q = QuietHours::parse("23:30-00:30 Asia/Seoul").expect("parses");
        // 23:45 KST is 14:45 UTC.
        assert!(q.contains(at("2022-10-20T14:45:00Z")));
        assert!(q.contains(at("2022-10-20T15:15:00Z")));
        assert!(!q.contains(at("2022-10-20T15:30:00Z")));
        assert!(!q.contains(at("2022-10-20T14:29:00Z")));
    }

    #[test]
    fn bad_quiet_hours_are_refused() {
        for bad in [
            "",
            "23:30",
            "25:00-01:00 Asia/Seoul",
            "23:30-00:30 Mars/Base",
            "1:00-1:00 UTC",
        ] {
            assert!(QuietHours::parse(bad).is_err(), "{bad}");
        }
    }
}
