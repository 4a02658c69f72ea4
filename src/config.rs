//! One `Settings` struct: defaults that run out of the box, then a TOML file
//! (`--config FILE` or `PAYOUTS_CONFIG`), then `PAYOUTS_*` environment variables, `__`
//! separating the keys of a table (`PAYOUTS_AUTH__RATE_LIMIT_PER_SECOND`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::net::ConnectionLimits;
use crate::payments::BackendConnection;
use crate::secret::Secret;
use crate::store::PoolSettings;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Where the gRPC server listens.
    pub listen_addr: SocketAddr,
    /// The admin HTTP port (`/healthz`, `/readyz`, `/metrics`), plain HTTP even when gRPC
    /// uses TLS; empty (`PAYOUTS_ADMIN_LISTEN_ADDR=`): none.
    #[serde(with = "optional_addr")]
    pub admin_listen_addr: Option<SocketAddr>,
    /// On SIGTERM, how long calls are still answered after health and `/readyz` turned
    /// not-serving (so load balancers move away first), in milliseconds; then the server stops
    /// accepting and finishes the calls in flight.
    pub shutdown_grace_ms: u64,
    /// `sqlite://...` (embedded) or `postgres://...`.
    pub database_url: String,
    /// Whether `serve` applies the database migrations at start. Replicas that serve as a
    /// role that may not change the schema turn it off: they check instead that the role
    /// owning the schema ran `partner-payouts migrate`.
    pub migrate: bool,
    /// PostgreSQL connections per replica.
    pub database_max_connections: u32,
    /// How long a call waits for a database connection, in milliseconds; then it is answered
    /// `UNAVAILABLE`. The health probe waits as long for its answer.
    pub database_acquire_timeout_ms: u64,
    /// How often the database is probed for the gRPC health status, in milliseconds.
    pub database_probe_interval_ms: u64,
    /// SQLite: how long a writer waits for another's lock, in milliseconds; then its call is
    /// answered `UNAVAILABLE`.
    pub sqlite_busy_timeout_ms: u64,
    /// The payments backend; unset: an embedded sandbox bank (no money moves).
    pub payments_backend_url: Option<String>,
    /// A compensation policy file; unset: the one that ships (`policy/default.toml`).
    pub policy_file: Option<PathBuf>,
    /// Largest request message accepted, in bytes.
    pub max_message_bytes: usize,
    /// Longest a call may run, in milliseconds.
    pub request_timeout_ms: u64,
    /// Calls in progress at once, per connection.
    pub max_concurrent_requests: usize,
    /// How long a new connection has to complete its handshake (TLS, then the HTTP/2 preface
    /// and first SETTINGS frame), in milliseconds; then it is closed.
    pub handshake_timeout_ms: u64,
    /// How long a connection may go without reading or writing a byte before it is closed, in
    /// milliseconds.
    pub idle_timeout_ms: u64,
    /// Client connections open at once; past it, new ones are closed as soon as they are
    /// accepted. Keep it well under the open-file limit (`ulimit -n`).
    pub max_connections: usize,
    /// The server pings (HTTP/2 PING) a client connection it has read nothing from for this
    /// long, in milliseconds; 0: never. Pings and their answers are traffic: a client that
    /// answers is not idle.
    pub http2_keepalive_interval_ms: u64,
    /// How long a ping may go unanswered before the connection is closed, in milliseconds.
    pub http2_keepalive_timeout_ms: u64,
    /// TCP keepalive on client connections and on the connection to the payments backend: the
    /// kernel probes a peer silent for this long, then as often, in milliseconds; 0: off.
    pub tcp_keepalive_ms: u64,
    /// How long a client connection may live, in milliseconds; then the server asks the client
    /// to go (GOAWAY), and it reconnects, perhaps to another replica. 0 (the default): no limit.
    pub max_connection_age_ms: u64,
    /// After `max_connection_age_ms`, how long calls still running on the connection have to
    /// finish before it is closed, in milliseconds.
    pub max_connection_age_grace_ms: u64,
    /// Calls to the payments backend one replica has in flight at once.
    pub dispatch_concurrency: usize,
    /// Disbursements one dispatch round takes and records together.
    pub dispatch_batch: usize,
    /// Dispatch rounds one replica runs at once, each on its own batch.
    pub dispatch_rounds: usize,
    /// How often the dispatcher looks for due work, in milliseconds.
    pub dispatch_poll_ms: u64,
    /// How long a replica owns the disbursements it took, in milliseconds: after a crash,
    /// another replica (or the restarted one) takes them over once this has passed. Must exceed
    /// the longest step (a few backend calls of `payments_timeout_ms` each).
    pub dispatch_lease_ms: u64,
    /// Bank maintenance hours when nothing is sent, e.g. `23:30-00:30 Asia/Seoul`.
    pub dispatch_quiet_hours: Option<String>,
    /// The programme's budget: nothing is sent that would take paid-or-sent past it.
    pub dispatch_budget_krw: Option<i64>,
    /// A contractual limit on calls to the payments backend per second, per replica, never
    /// exceeded (no bursts). Unset: the dispatcher keeps to what the bank accepts, learning
    /// its rate from its throttling.
    pub dispatch_rate_limit_per_s: Option<u32>,
    /// Deadline of each call to the payments backend, in milliseconds.
    pub payments_timeout_ms: u64,
    /// How long the embedded sandbox bank takes to settle an accepted instruction.
    pub sandbox_settle_delay_ms: u64,
    /// `text` or `json` (one object per line).
    pub log_format: String,
    /// Who may call; absent: local development mode (every caller is `local-dev`), which is
    /// only allowed on a loopback address.
    pub auth: Option<crate::auth::AuthSettings>,
    /// Server TLS, and client certificates if `client_ca_file` is set.
    pub tls: Option<crate::auth::TlsSettings>,
    /// The account-number key file, read when `PAYOUTS_PII_KEY` is not set. Created (owner-only)
    /// in local development mode.
    pub pii_key_file: PathBuf,
    /// A bearer token sent to the payments backend.
    pub payments_backend_token: Option<Secret>,
    /// A CA certificate (PEM) to verify the payments backend's TLS certificate (`https://` URLs).
    pub payments_backend_ca_file: Option<PathBuf>,
    /// A client certificate (PEM) presented to a payments backend that requires mutual TLS,
    /// with its private key in `payments_backend_client_key_file`.
    pub payments_backend_client_cert_file: Option<PathBuf>,
    pub payments_backend_client_key_file: Option<PathBuf>,
    /// How often the client pings its connection to the payments backend (HTTP/2 PING), also
    /// between dispatch rounds, in milliseconds; 0: never. A bank whose server forbids pings
    /// that often answers with GOAWAY, and the client reconnects.
    pub payments_backend_keepalive_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            admin_listen_addr: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            shutdown_grace_ms: 5_000,
            database_url: "sqlite://./data/payouts.db".into(),
            migrate: true,
            database_max_connections: 16,
            database_acquire_timeout_ms: 2_000,
            database_probe_interval_ms: 2_000,
            sqlite_busy_timeout_ms: 10_000,
            payments_backend_url: None,
            policy_file: None,
            max_message_bytes: 1024 * 1024,
            request_timeout_ms: 30_000,
            max_concurrent_requests: 256,
            handshake_timeout_ms: 10_000,
            idle_timeout_ms: 300_000,
            max_connections: 10_000,
            http2_keepalive_interval_ms: 60_000,
            http2_keepalive_timeout_ms: 20_000,
            tcp_keepalive_ms: 60_000,
            max_connection_age_ms: 0,
            max_connection_age_grace_ms: 300_000,
            dispatch_concurrency: 16,
            dispatch_batch: 512,
            dispatch_rounds: 3,
            dispatch_poll_ms: 200,
            dispatch_lease_ms: 30_000,
            dispatch_quiet_hours: None,
            dispatch_budget_krw: None,
            dispatch_rate_limit_per_s: None,
            payments_timeout_ms: 5_000,
            sandbox_settle_delay_ms: 0,
            log_format: "text".into(),
            auth: None,
            tls: None,
            pii_key_file: PathBuf::from("./data/pii.key"),
            payments_backend_token: None,
            payments_backend_ca_file: None,
            payments_backend_client_cert_file: None,
            payments_backend_client_key_file: None,
            payments_backend_keepalive_ms: 300_000,
        }
    }
}

impl Settings {
    /// Defaults, then `file` (if given), then `PAYOUTS_*` variables; `__` in a variable's
    /// name reaches into a table (`PAYOUTS_AUTH__RATE_LIMIT_PER_SECOND`, `PAYOUTS_TLS__CERT_FILE`).
    pub fn load(file: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(file) = file {
            if !file.exists() {
                anyhow::bail!("settings file {} does not exist", file.display());
            }
            figment = figment.merge(Toml::file(file));
        }
        let settings: Settings = figment
            .merge(
                Env::prefixed("PAYOUTS_")
                    .ignore(&["CONFIG", "PII_KEY"])
                    .split("__"),
            )
            .extract()
            .map_err(|e| anyhow::anyhow!("settings: {e}"))?;
        settings.validate()?;
        Ok(settings)
    }

    /// The limits on the connections of the gRPC server.
    pub fn connection_limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            handshake_timeout: Duration::from_millis(self.handshake_timeout_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            max_connections: self.max_connections,
            tls: self.tls.is_some(),
            max_age: self
                .max_connection_age()
                .map(|age| age + Duration::from_millis(self.max_connection_age_grace_ms)),
            tcp_keepalive: millis_unless_zero(self.tcp_keepalive_ms),
        }
    }

    /// When the server sends a connection GOAWAY; None: never.
    pub fn max_connection_age(&self) -> Option<Duration> {
        millis_unless_zero(self.max_connection_age_ms)
    }

    /// How the server keeps its client connections alive: (ping interval, ping timeout).
    pub fn http2_keepalive(&self) -> (Option<Duration>, Duration) {
        (
            millis_unless_zero(self.http2_keepalive_interval_ms),
            Duration::from_millis(self.http2_keepalive_timeout_ms),
        )
    }

    /// How to reach the payments backend at `url` (the configured one or the sandbox's).
    pub fn backend_connection(&self, url: &str) -> BackendConnection {
        BackendConnection {
            url: url.to_owned(),
            call_timeout: Duration::from_millis(self.payments_timeout_ms),
            ca_file: self.payments_backend_ca_file.clone(),
            client_identity: self
                .payments_backend_client_cert_file
                .clone()
                .zip(self.payments_backend_client_key_file.clone()),
            keepalive: millis_unless_zero(self.payments_backend_keepalive_ms),
            keepalive_timeout: Duration::from_millis(self.http2_keepalive_timeout_ms),
            tcp_keepalive: millis_unless_zero(self.tcp_keepalive_ms),
        }
    }

    /// How the store holds its database connections.
    pub fn pool_settings(&self) -> PoolSettings {
        PoolSettings {
            max_connections: self.database_max_connections,
            acquire_timeout: Duration::from_millis(self.database_acquire_timeout_ms),
            busy_timeout: Duration::from_millis(self.sqlite_busy_timeout_ms),
        }
    }

    /// How long calls are still answered after SIGTERM turned readiness off.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    /// How often the health probe asks the database.
    pub fn database_probe_interval(&self) -> Duration {
        Duration::from_millis(self.database_probe_interval_ms)
    }

    /// Checks the settings as a whole; [`Settings::load`] and the application both call it.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(self.database_url.starts_with("sqlite:") || self.database_url.starts_with("postgres"))
        {
            anyhow::bail!("settings: database_url must start with sqlite: or postgres://");
        }
        if self.dispatch_lease_ms < 3 * self.payments_timeout_ms {
            anyhow::bail!(
                "settings: dispatch_lease_ms must be at least three times payments_timeout_ms"
            );
        }
        if let Some(auth) = &self.auth {
            auth.validate_with_tls(self.tls.as_ref())
                .map_err(|e| anyhow::anyhow!("settings: {e}"))?;
        }
        crate::auth::check_bind(self.listen_addr, self.auth.is_some())
            .map_err(|e| anyhow::anyhow!("settings: {e}"))?;
        if self.handshake_timeout_ms == 0 || self.idle_timeout_ms == 0 || self.max_connections == 0
        {
            anyhow::bail!(
                "settings: handshake_timeout_ms, idle_timeout_ms and max_connections must be at \
                 least 1"
            );
        }
        if self.http2_keepalive_timeout_ms == 0 {
            anyhow::bail!("settings: http2_keepalive_timeout_ms must be at least 1");
        }
        self.validate_backend_identity()?;
        for (field, value) in [
            (
                "database_max_connections",
                u64::from(self.database_max_connections),
            ),
            (
                "database_acquire_timeout_ms",
                self.database_acquire_timeout_ms,
            ),
            (
                "database_probe_interval_ms",
                self.database_probe_interval_ms,
            ),
            ("sqlite_busy_timeout_ms", self.sqlite_busy_timeout_ms),
        ] {
            if value == 0 {
                anyhow::bail!("settings: {field} must be at least 1");
            }
        }
        if self.dispatch_concurrency == 0 {
            anyhow::bail!("settings: dispatch_concurrency must be at least 1");
        }
        if self.dispatch_batch == 0 || self.dispatch_rounds == 0 {
            anyhow::bail!("settings: dispatch_batch and dispatch_rounds must be at least 1");
        }
        if self.dispatch_rate_limit_per_s == Some(0) {
            anyhow::bail!("settings: dispatch_rate_limit_per_s must be at least 1 (or unset)");
        }
        if self.dispatch_budget_krw.is_some_and(|budget| budget < 0) {
            anyhow::bail!("settings: dispatch_budget_krw must not be negative");
        }
        if let Some(hours) = &self.dispatch_quiet_hours {
            crate::payments::QuietHours::parse(hours)
                .map_err(|e| anyhow::anyhow!("settings: dispatch_quiet_hours: {e}"))?;
        }
        Ok(())
    }

    fn validate_backend_identity(&self) -> anyhow::Result<()> {
        let cert = self.payments_backend_client_cert_file.is_some();
        if cert != self.payments_backend_client_key_file.is_some() {
            anyhow::bail!(
                "settings: payments_backend_client_cert_file and payments_backend_client_key_file \
                 go together: set both or neither"
            );
        }
        if cert && self.payments_backend_ca_file.is_none() {
            anyhow::bail!(
                "settings: payments_backend_client_cert_file needs payments_backend_ca_file, the \
                 CA that signed the backend's certificate"
            );
        }
        if cert
            && !self
                .payments_backend_url
                .as_deref()
                .is_some_and(|url| url.starts_with("https://"))
        {
            anyhow::bail!(
                "settings: payments_backend_client_cert_file needs an https:// \
                 payments_backend_url"
            );
        }
        Ok(())
    }
}

/// An address that may be empty: `""` (or no value) is none.
mod optional_addr {
    use std::net::SocketAddr;

    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(addr: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match addr {
            Some(addr) => s.collect_str(addr),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let text = Option::<String>::deserialize(d)?.unwrap_or_default();
        let text = text.trim();
        if text.is_empty() {
            return Ok(None);
        }
        text.parse().map(Some).map_err(|e| {
            serde::de::Error::custom(format!("admin_listen_addr: {e}: {text:?} (empty: none)"))
        })
    }
}

/// `ms` milliseconds; None for 0, which these settings read as "off".
fn millis_unless_zero(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_backend(tweak: impl FnOnce(&mut Settings)) -> anyhow::Result<()> {
        let mut settings = Settings {
            payments_backend_url: Some("https://bank.example:443".into()),
            payments_backend_ca_file: Some("bank-ca.pem".into()),
            payments_backend_client_cert_file: Some("client.pem".into()),
            payments_backend_client_key_file: Some("client.key".into()),
            ..Settings::default()
        };
        tweak(&mut settings);
        settings.validate()
    }

    #[test]
    fn a_backend_client_certificate_needs_its_key_its_ca_and_https() {
        with_backend(|_| {}).expect("certificate, key, CA and https");
        for (tweak, named) in [
            (
                (|s: &mut Settings| s.payments_backend_client_key_file = None) as fn(&mut _),
                "payments_backend_client_key_file",
            ),
            (
                |s: &mut Settings| s.payments_backend_client_cert_file = None,
                "payments_backend_client_cert_file",
            ),
            (
                |s: &mut Settings| s.payments_backend_ca_file = None,
                "payments_backend_ca_file",
            ),
            (
                |s: &mut Settings| s.payments_backend_url = Some("http://bank.example".into()),
                "https://",
            ),
        ] {
            let refused = with_backend(tweak).expect_err(named).to_string();
            assert!(refused.contains(named), "{refused}");
        }
    }

    #[test]
    // figment's `Jail` decides the closure's error type.
    #[allow(clippy::result_large_err)]
    fn the_admin_port_defaults_to_9464_and_an_empty_address_turns_it_off() {
        figment::Jail::expect_with(|jail| {
            let settings = Settings::load(None).expect("defaults");
            assert_eq!(
                settings.admin_listen_addr,
                Some(SocketAddr::from(([127, 0, 0, 1], 9464)))
            );
            assert_eq!(settings.shutdown_grace(), Duration::from_millis(5_000));
            jail.set_env("PAYOUTS_ADMIN_LISTEN_ADDR", "");
            jail.set_env("PAYOUTS_SHUTDOWN_GRACE_MS", "1500");
            let settings = Settings::load(None).expect("from the environment");
            assert_eq!(settings.admin_listen_addr, None);
            assert_eq!(settings.shutdown_grace_ms, 1_500);
            jail.set_env("PAYOUTS_ADMIN_LISTEN_ADDR", "0.0.0.0:9000");
            let settings = Settings::load(None).expect("an address");
            assert_eq!(
                settings.admin_listen_addr,
                Some("0.0.0.0:9000".parse().unwrap())
            );
            jail.set_env("PAYOUTS_ADMIN_LISTEN_ADDR", "not-an-address");
            let refused = Settings::load(None).expect_err("a bad address").to_string();
            assert!(refused.contains("admin_listen_addr"), "{refused}");
            Ok(())
        });
    }

    #[test]
    fn zero_turns_keepalive_and_the_maximum_age_off() {
        let settings = Settings {
            http2_keepalive_interval_ms: 0,
            tcp_keepalive_ms: 0,
            ..Settings::default()
        };
        assert_eq!(settings.http2_keepalive().0, None);
        let limits = settings.connection_limits();
        assert_eq!((limits.tcp_keepalive, limits.max_age), (None, None));
        assert_eq!(Settings::default().connection_limits().max_age, None);
        let aged = Settings {
            max_connection_age_ms: 1_800_000,
            ..Settings::default()
        };
        assert_eq!(
            aged.connection_limits().max_age,
            Some(Duration::from_millis(1_800_000 + 300_000)),
            "closed at the maximum age and its grace"
        );
        assert!(
            Settings {
                http2_keepalive_timeout_ms: 0,
                ..Settings::default()
            }
            .validate()
            .is_err()
        );
    }
}
