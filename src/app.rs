//! Wiring: from [`Settings`] to a store, the policy, the payments backend, the dispatcher and
//! the gRPC server, with graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::{
    Context, audit::Audit, claims::Claims, disbursements::Disbursements, events::Events,
    partners::Partners,
};
use crate::audit::{AuditDenials, AuditLayer};
use crate::auth::{AuthLayer, Authenticator};
use crate::config::Settings;
use crate::discovery;
use crate::domain::{DEFAULT_POLICY_TOML, Policy};
use crate::keys;
use crate::payments::{Dispatcher, DispatcherConfig, QuietHours, connect_backend};
use crate::proto::payouts::v1::audit_service_server::{self, AuditServiceServer};
use crate::proto::payouts::v1::claim_service_server::{self, ClaimServiceServer};
use crate::proto::payouts::v1::disbursement_service_server::{self, DisbursementServiceServer};
use crate::proto::payouts::v1::event_service_server::{self, EventServiceServer};
use crate::proto::payouts::v1::partner_service_server::{self, PartnerServiceServer};
use crate::readiness::{self, Readiness};
#[cfg(feature = "sandbox")]
use crate::sandbox;
use crate::sealing::PiiCipher;
use crate::store::roles::AppRole;
use crate::store::{Store, postgres, postgres::PgStore, sqlite, sqlite::SqliteStore};

/// The key that seals account numbers: `PAYOUTS_PII_KEY`, else the key file, which local
/// development mode creates.
pub fn pii_cipher(settings: &Settings) -> anyhow::Result<Arc<PiiCipher>> {
    pii_cipher_made(settings, settings.auth.is_none())
}

/// The keys in `PAYOUTS_PII_KEY` or the key file; if `create_if_missing`, a new key file when
/// there is neither.
fn pii_cipher_made(settings: &Settings, create_if_missing: bool) -> anyhow::Result<Arc<PiiCipher>> {
    let from_env = std::env::var("PAYOUTS_PII_KEY").ok();
    let cipher = PiiCipher::from_env_or_file(
        from_env.as_deref(),
        &settings.pii_key_file,
        create_if_missing,
    )
    .with_context(|| {
        format!(
            "account-number key: set PAYOUTS_PII_KEY (base64, 32 bytes) or provide {}",
            settings.pii_key_file.display()
        )
    })?;
    Ok(Arc::new(cipher))
}

/// Opens the database that `database_url` names, and applies the migrations (or, with
/// `migrate` off, checks that they were applied).
async fn open_store_with(
    settings: &Settings,
    cipher: Arc<PiiCipher>,
) -> anyhow::Result<Arc<dyn Store>> {
    let url = &settings.database_url;
    if url.starts_with("postgres") {
        let store = PgStore::connect(url, &settings.pool_settings(), cipher)
            .await
            .context("connecting to PostgreSQL")?;
        if settings.migrate {
            store.migrate().await.context(
                "migrating PostgreSQL (a role that may not change the schema serves with \
                 PAYOUTS_MIGRATE=false, once the owner ran `partner-payouts migrate`)",
            )?;
        } else {
            store.check_migrated().await.context("refusing to start")?;
        }
        Ok(Arc::new(store))
    } else {
        let store = SqliteStore::connect(url, &settings.pool_settings(), cipher)
            .await
            .with_context(|| format!("opening SQLite at {url}"))?;
        if settings.migrate {
            store.migrate().await.context("migrating SQLite")?;
        } else {
            store.check_migrated().await.context("refusing to start")?;
        }
        Ok(Arc::new(store))
    }
}

/// `partner-payouts migrate`: applies the migrations to the database that `database_url`
/// names and, given `app_role` (PostgreSQL only), grants that role what `serve` needs and no
/// more. Needs no account-number key.
pub async fn migrate(settings: &Settings, app_role: Option<&str>) -> anyhow::Result<()> {
    let url = &settings.database_url;
    let app_role = app_role
        .map(AppRole::parse)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    if url.starts_with("postgres") {
        postgres::migrate(url, &settings.pool_settings(), app_role.as_ref())
            .await
            .context("migrating PostgreSQL")
    } else if app_role.is_some() {
        anyhow::bail!("--app-role: SQLite has no database roles; it applies to PostgreSQL only")
    } else {
        sqlite::migrate(url, &settings.pool_settings())
            .await
            .with_context(|| format!("migrating SQLite at {url}"))
    }
}

/// `partner-payouts reseal`: every stored account number sealed again under the first key
/// (see [`keys::reseal`]), `batch` rows per transaction. Never creates a key.
pub async fn reseal(settings: &Settings, batch: u32) -> anyhow::Result<keys::ResealReport> {
    let cipher = pii_cipher_made(settings, false)?;
    let store = open_store_with(settings, cipher.clone()).await?;
    keys::reseal(&*store, &cipher, batch).await
}

/// The policy file named in the settings, or the one that ships.
pub fn load_policy(settings: &Settings) -> anyhow::Result<Policy> {
    let policy = match &settings.policy_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading policy file {}", path.display()))?;
            Policy::from_toml(&text).with_context(|| format!("policy file {}", path.display()))?
        }
        None => Policy::from_toml(DEFAULT_POLICY_TOML).context("the shipped policy")?,
    };
    Ok(policy)
}

/// The services the gRPC server answers, beside health and reflection: what health reports
/// and reflection describes (not the payments backend's contract, which the same descriptor
/// set holds).
const SERVED: [&str; 5] = [
    partner_service_server::SERVICE_NAME,
    claim_service_server::SERVICE_NAME,
    disbursement_service_server::SERVICE_NAME,
    audit_service_server::SERVICE_NAME,
    event_service_server::SERVICE_NAME,
];

/// A built application: bound, not yet serving.
pub struct Application {
    listener: TcpListener,
    /// The admin HTTP port, unless `admin_listen_addr` is empty.
    admin_listener: Option<TcpListener>,
    settings: Settings,
    ctx: Context,
    dispatcher: Dispatcher,
    sandbox: Option<EmbeddedBank>,
    authenticator: Arc<Authenticator>,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        settings.validate()?;
        let policy = Arc::new(load_policy(&settings)?);
        let cipher = pii_cipher(&settings)?;
        let store = open_store_with(&settings, cipher.clone()).await?;
        keys::check(&*store, &cipher)
            .await
            .context("refusing to start")?;
        tracing::info!(
            key_ids = ?cipher.key_ids(),
            "account numbers are sealed under key {}",
            cipher.current_key_id()
        );
        let authenticator = Arc::new(match &settings.auth {
            Some(auth) => Authenticator::from_settings(auth).map_err(|e| anyhow::anyhow!("{e}"))?,
            None => {
                tracing::warn!(
                    "no [auth] settings: LOCAL DEVELOPMENT MODE, every caller is local-dev \
                     with every role (loopback only)"
                );
                Authenticator::local_dev()
            }
        });
        let (backend_url, sandbox) = match &settings.payments_backend_url {
            Some(url) => (url.clone(), None),
            None => {
                let (url, bank) = EmbeddedBank::bind(&settings).await?;
                (url, Some(bank))
            }
        };
        let dispatcher = Dispatcher::new(
            store.clone(),
            connect_backend(&settings.backend_connection(&backend_url))?,
            cipher,
            DispatcherConfig {
                concurrency: settings.dispatch_concurrency,
                batch: settings.dispatch_batch,
                rounds: settings.dispatch_rounds,
                poll: Duration::from_millis(settings.dispatch_poll_ms),
                lease: Duration::from_millis(settings.dispatch_lease_ms),
                quiet_hours: settings
                    .dispatch_quiet_hours
                    .as_deref()
                    .map(QuietHours::parse)
                    .transpose()
                    .map_err(anyhow::Error::msg)?,
                budget_krw: settings.dispatch_budget_krw.map(crate::domain::Krw::new),
                backend_token: settings.payments_backend_token.clone(),
                rate_limit_per_s: settings
                    .dispatch_rate_limit_per_s
                    .and_then(std::num::NonZeroU32::new),
                ..DispatcherConfig::default()
            },
        );
        let listener = TcpListener::bind(settings.listen_addr)
            .await
            .with_context(|| format!("binding {}", settings.listen_addr))?;
        let admin_listener = match settings.admin_listen_addr {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding the admin port {addr}"))?,
            ),
            None => None,
        };
        Ok(Self {
            listener,
            admin_listener,
            settings,
            ctx: Context::new(store, policy),
            dispatcher,
            sandbox,
            authenticator,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Where the admin HTTP port listens, if it does.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// Serves until `shutdown` resolves, then drains: gRPC health and `/readyz` turn
    /// not-serving at once, calls are still answered for `shutdown_grace_ms` (so load
    /// balancers move away first), then the server stops accepting, lets calls in flight
    /// finish, and the dispatcher hands back what it holds.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            listener,
            admin_listener,
            settings,
            ctx,
            dispatcher,
            sandbox,
            authenticator,
        } = self;
        let services = SERVED.to_vec();
        let (health, health_service) = discovery::health_serving(&services).await;
        let (reflection_v1, reflection_v1alpha) = discovery::reflection(&services)?;
        let readiness = Readiness::new(health, services);
        let background = Background::start(
            &settings,
            &ctx,
            (dispatcher, sandbox),
            &authenticator,
            (readiness.clone(), admin_listener),
        );
        // On the signal: not ready at once, calls answered through the grace; then the watch
        // streams of the change feed end (their callers resume on another replica) and the
        // server stops accepting.
        let (shutdown, feed_drain) =
            draining_first(drain(shutdown, readiness, settings.shutdown_grace()));
        let (feed, feed_task) = crate::feed::Feed::spawn(ctx.store.clone(), feed_drain);

        let max = settings.max_message_bytes;

        tracing::info!(addr = %listener.local_addr()?, database = %redact_url(&settings.database_url), "serving");
        let builder = server_builder(&settings)?;
        let incoming = crate::net::Incoming::new(listener, settings.connection_limits());
        let server = builder
            .concurrency_limit_per_connection(settings.max_concurrent_requests)
            // Outermost, so that a call past its deadline is answered DEADLINE_EXCEEDED
            // (before tonic's own timer would answer CANCELLED) and recorded as such within.
            .layer(crate::deadline::DeadlineLayer {
                request_timeout: Duration::from_millis(settings.request_timeout_ms),
            })
            .layer(crate::telemetry::RpcTraceLayer)
            .layer(AuthLayer::with_denial_sink(
                authenticator,
                background.denials.clone(),
            ))
            .layer(AuditLayer::new(ctx.store.clone()))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(
                PartnerServiceServer::new(Partners { ctx: ctx.clone() })
                    .max_decoding_message_size(max),
            )
            .add_service(
                ClaimServiceServer::new(Claims { ctx: ctx.clone() }).max_decoding_message_size(max),
            )
            .add_service(
                DisbursementServiceServer::new(Disbursements { ctx: ctx.clone() })
                    .max_decoding_message_size(max),
            )
            .add_service(
                AuditServiceServer::new(Audit { ctx: ctx.clone() }).max_decoding_message_size(max),
            )
            .add_service(
                EventServiceServer::new(Events { ctx, feed }).max_decoding_message_size(max),
            )
            .serve_with_incoming_shutdown(incoming, shutdown);
        let served = server.await;
        // A reader only: nothing is lost by stopping it where it is (it stopped already
        // unless the server failed).
        feed_task.abort();
        background.stop().await?;
        served?;
        Ok(())
    }
}

/// The server's connection settings: keepalive, maximum age, TLS.
fn server_builder(settings: &Settings) -> anyhow::Result<tonic::transport::Server> {
    let (ping_interval, ping_timeout) = settings.http2_keepalive();
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(ping_interval)
        .http2_keepalive_timeout(Some(ping_timeout));
    if let Some(age) = settings.max_connection_age() {
        // GOAWAY at this age. The grace after it is the connection's own deadline
        // (`net::Connection`): tonic 0.14, given a grace, skips the GOAWAY and only cuts
        // the connection once the grace is over.
        builder = builder.max_connection_age(age);
    }
    if let Some(tls) = &settings.tls {
        builder = builder.tls_config(crate::auth::tls::server_tls_config(tls)?)?;
    }
    Ok(builder)
}

/// `shutdown`, which first tells the receiver it drains: the change feed's watch streams end
/// then, rather than keep the server waiting for them.
fn draining_first(
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (
    impl Future<Output = ()> + Send + 'static,
    watch::Receiver<bool>,
) {
    let (draining, drain) = watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = draining.send(true);
    };
    (shutdown, drain)
}

/// Resolves `grace` after `shutdown` did, readiness off from the start of the wait: the
/// server is told to stop only once load balancers have had the time to move away.
async fn drain(shutdown: impl Future<Output = ()>, readiness: Readiness, grace: Duration) {
    shutdown.await;
    readiness.drain().await;
    tracing::info!(
        grace_ms = grace.as_millis(),
        "draining: not ready; calls are answered until the grace is over"
    );
    tokio::time::sleep(grace).await;
    tracing::info!("grace over: no new connections; finishing the calls in flight");
}

/// What runs beside the gRPC server: the dispatcher, the sweep of refused peers, the writer
/// of denials to the audit log, the database probe that moves readiness, the admin HTTP port
/// and, without a configured backend, the sandbox bank.
struct Background {
    stop: watch::Sender<bool>,
    dispatch: JoinHandle<()>,
    peers: JoinHandle<()>,
    readiness: JoinHandle<()>,
    admin: Option<JoinHandle<std::io::Result<()>>>,
    sandbox: Option<JoinHandle<anyhow::Result<()>>>,
    denials: Arc<AuditDenials>,
}

impl Background {
    fn start(
        settings: &Settings,
        ctx: &Context,
        (dispatcher, sandbox): (Dispatcher, Option<EmbeddedBank>),
        authenticator: &Arc<Authenticator>,
        (readiness, admin_listener): (Readiness, Option<TcpListener>),
    ) -> Self {
        let (stop, stop_rx) = watch::channel(false);
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let sandbox = sandbox.map(|bank| bank.spawn(stopped(stop_rx.clone())));
        let dispatch = tokio::spawn(dispatcher.run(stopped(stop_rx.clone())));
        let peers = tokio::spawn(crate::auth::forget_quiet_peers(
            authenticator.clone(),
            stopped(stop_rx.clone()),
        ));
        let admin = admin_listener.map(|listener| {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "admin HTTP port: /healthz, /readyz, /metrics");
            }
            tokio::spawn(crate::admin::serve(
                listener,
                readiness.clone(),
                stopped(stop_rx.clone()),
            ))
        });
        let readiness = tokio::spawn(readiness::follow_database(
            ctx.store.clone(),
            readiness,
            readiness::Probe {
                interval: settings.database_probe_interval(),
                timeout: settings.pool_settings().acquire_timeout,
            },
            stopped(stop_rx),
        ));
        let denials = Arc::new(AuditDenials::spawn(
            ctx.store.clone(),
            settings
                .auth
                .clone()
                .unwrap_or_default()
                .denial_audit_interval(),
        ));
        Self {
            stop,
            dispatch,
            peers,
            readiness,
            admin,
            sandbox,
            denials,
        }
    }

    /// Once the server stopped accepting: writes the last denials, then stops the dispatcher
    /// after its current work, and the rest.
    async fn stop(self) -> anyhow::Result<()> {
        self.denials.flush().await;
        tracing::info!("server stopped accepting; stopping the dispatcher");
        let _ = self.stop.send(true);
        self.dispatch.await?;
        self.peers.await?;
        self.readiness.await?;
        if let Some(admin) = self.admin {
            admin.await?.context("the admin HTTP port")?;
        }
        if let Some(task) = self.sandbox {
            task.await??;
        }
        Ok(())
    }
}

/// The sandbox bank `serve` starts in process when no payments backend is configured: no
/// money moves. Builds without the `sandbox` feature have none, and `serve` then needs a
/// backend.
#[cfg(feature = "sandbox")]
struct EmbeddedBank {
    listener: TcpListener,
    bank: sandbox::SandboxBank,
}

#[cfg(feature = "sandbox")]
impl EmbeddedBank {
    /// A bank on a loopback port of its own, and the URL to reach it.
    async fn bind(settings: &Settings) -> anyhow::Result<(String, Self)> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let bank = sandbox::SandboxBank::new(sandbox::SandboxConfig {
            settle_delay: Duration::from_millis(settings.sandbox_settle_delay_ms),
            ..sandbox::SandboxConfig::default()
        });
        Ok((url, Self { listener, bank }))
    }

    fn spawn(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> JoinHandle<anyhow::Result<()>> {
        tracing::warn!(
            "payments go to the EMBEDDED SANDBOX BANK at {}: no money moves. \
             Set PAYOUTS_PAYMENTS_BACKEND_URL to pay for real.",
            self.listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default()
        );
        tokio::spawn(sandbox::serve(self.listener, self.bank, shutdown))
    }
}

/// Without the `sandbox` feature there is no bank to start: a value of this type never exists.
#[cfg(not(feature = "sandbox"))]
enum EmbeddedBank {}

#[cfg(not(feature = "sandbox"))]
impl EmbeddedBank {
    async fn bind(_settings: &Settings) -> anyhow::Result<(String, Self)> {
        anyhow::bail!(
            "no payments backend: set PAYOUTS_PAYMENTS_BACKEND_URL (this build has no sandbox \
             bank; it was built without the `sandbox` feature)"
        )
    }

    fn spawn(
        self,
        _shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> JoinHandle<anyhow::Result<()>> {
        match self {}
    }
}

/// A database URL without its password, for logs.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// Whether [`runtime`] runs without tokio's LIFO slot: true in a build with tokio's unstable
/// settings on (`--cfg tokio_unstable`, which `.cargo/config.toml` gives every build of this
/// repository), false where those flags were replaced (a `RUSTFLAGS` of one's own replaces
/// them): `serve` then says so at start.
pub const LIFO_SLOT_OFF: bool = cfg!(tokio_unstable);

/// The service's runtime: tokio's multi-threaded scheduler with all its drivers, and without
/// its LIFO slot ([`LIFO_SLOT_OFF`]).
///
/// The LIFO slot runs the task that the running task woke last right after it, ahead of the
/// tasks already queued. When a batch of calls is answered, each call's stream task, as it
/// sends its response, wakes its connection's task; with the LIFO slot that connection task
/// runs at once and writes that single response: one HTTP/2 flush and one `writev` per call,
/// each also waking the caller to read it. Without the slot the connection's task runs after
/// the calls answered with it and writes their responses together. Measured with 64 callers
/// from a separate process (BENCHMARKS.md): writes per database batch 7.8 to 3, the service's
/// CPU per RegisterPartner 15-33% lower, and 6-29% more calls per second.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    builder.build()
}

/// Resolves on SIGTERM or ctrl-c.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutdown requested");
}

#[cfg(test)]
mod tests {
    /// The build's flags give the runtime its setting: without them `serve` would write its
    /// answers one call at a time (see [`super::runtime`]).
    #[test]
    // The constant is the build's flags: a build without them should fail this test, not
    // fail to compile the others (a `const` assertion).
    #[allow(clippy::assertions_on_constants)]
    fn the_service_runtime_is_multi_threaded_without_a_lifo_slot() {
        assert!(
            super::LIFO_SLOT_OFF,
            "built without `--cfg tokio_unstable` (.cargo/config.toml)"
        );
        let runtime = super::runtime().expect("a runtime");
        assert_eq!(
            runtime.handle().runtime_flavor(),
            tokio::runtime::RuntimeFlavor::MultiThread
        );
    }
}
