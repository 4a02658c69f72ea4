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
mod leases;
mod pace;

pub use breaker::BreakerConfig;
pub use dispatcher::{Dispatcher, DispatcherConfig};

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::domain::AttemptOutcome;
use crate::proto::payments::v1::InstructionStatus;
use crate::proto::payments::v1::payments_backend_client::PaymentsBackendClient;

/// How the client reaches the payments backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConnection {
    pub url: String,
    /// Deadline of each call, and of connecting.
    pub call_timeout: Duration,
    /// The CA (PEM) that signed an `https://` backend's certificate.
    pub ca_file: Option<PathBuf>,
    /// The client certificate and its private key (PEM files), for a backend that requires
    /// mutual TLS.
    pub client_identity: Option<(PathBuf, PathBuf)>,
    /// How often the connection is pinged, also while no call is in flight; None: never.
    pub keepalive: Option<Duration>,
    /// How long a ping may go unanswered before the connection is dropped and made anew.
    pub keepalive_timeout: Duration,
    /// TCP keepalive on the connection; None: off.
    pub tcp_keepalive: Option<Duration>,
}

/// A client of the payments backend. Connects on first use, so a backend that is down at
/// start-up only delays dispatch; files named in `backend` are read now, so a missing one
/// stops the start.
pub fn connect_backend(
    backend: &BackendConnection,
) -> anyhow::Result<PaymentsBackendClient<tonic::transport::Channel>> {
    let url = &backend.url;
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| anyhow::anyhow!("payments_backend_url {url:?}: {e}"))?
        .timeout(backend.call_timeout)
        .connect_timeout(backend.call_timeout)
        .tcp_keepalive(backend.tcp_keepalive)
        // Between dispatch rounds too: a connection a firewall dropped while quiet would
        // otherwise cost the next round's first calls their deadline.
        .keep_alive_while_idle(true)
        .keep_alive_timeout(backend.keepalive_timeout);
    if let Some(interval) = backend.keepalive {
        endpoint = endpoint.http2_keep_alive_interval(interval);
    }
    if let Some(tls) = client_tls(backend)? {
        endpoint = endpoint.tls_config(tls)?;
    }
    Ok(PaymentsBackendClient::new(endpoint.connect_lazy()))
}

/// TLS towards the backend: its CA, and our certificate where it requires one.
fn client_tls(backend: &BackendConnection) -> anyhow::Result<Option<ClientTlsConfig>> {
    let read = |setting: &str, path: &Path| {
        std::fs::read(path).map_err(|e| anyhow::anyhow!("{setting} {}: {e}", path.display()))
    };
    let Some(ca_file) = &backend.ca_file else {
        return Ok(None);
    };
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(
        "payments_backend_ca_file",
        ca_file,
    )?));
    if let Some((cert_file, key_file)) = &backend.client_identity {
        tls = tls.identity(Identity::from_pem(
            read("payments_backend_client_cert_file", cert_file)?,
            read("payments_backend_client_key_file", key_file)?,
        ));
    }
    Ok(Some(tls))
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
