//! The `partner-payouts` command: `serve` (default), `migrate`, `reseal`, `sandbox-bank`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
#[cfg(feature = "sandbox")]
use partner_payouts::sandbox;
use partner_payouts::{app, config::Settings, telemetry};

/// mimalloc, version 2 (see `allocator`).
#[global_allocator]
static ALLOCATOR: partner_payouts::allocator::MiMalloc = partner_payouts::allocator::MiMalloc;

#[derive(Parser)]
#[command(
    version,
    about = "Pays outage compensation to business partners, exactly once."
)]
struct Cli {
    /// Settings file (TOML); PAYOUTS_* environment variables override it.
    #[arg(long, global = true, env = "PAYOUTS_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gRPC API and dispatch payouts (the default).
    Serve,
    /// Apply the database migrations and exit (as the role that owns the schema; no
    /// account-number key is needed).
    Migrate {
        /// Also grant this PostgreSQL role what `serve` needs and no more (created, LOGIN
        /// without a password, if missing). Run again after an upgrade: tables a new
        /// migration adds are granted then.
        #[arg(long, value_name = "ROLE")]
        app_role: Option<String>,
    },
    /// Re-seal every stored account number under the first key, then exit. Safe while
    /// replicas serve, and to run again.
    Reseal {
        /// Rows re-sealed per transaction.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        batch: u32,
    },
    /// Run the sandbox bank (a fake payments backend; no money moves) on its own.
    #[cfg(feature = "sandbox")]
    SandboxBank(SandboxArgs),
}

/// The sandbox bank's address and behaviour.
#[cfg(feature = "sandbox")]
#[derive(clap::Args)]
struct SandboxArgs {
    #[arg(long, default_value = "127.0.0.1:50061")]
    listen: std::net::SocketAddr,
    /// Milliseconds before an accepted instruction settles as paid.
    #[arg(long, default_value_t = 0)]
    settle_delay_ms: u64,
    /// Share of calls answered UNAVAILABLE without being applied, per mille.
    #[arg(long, default_value_t = 0)]
    unavailable_per_mille: u32,
    /// Share of instructions applied and then answered too late, per mille.
    #[arg(long, default_value_t = 0)]
    late_reply_per_mille: u32,
    /// Milliseconds a late reply waits.
    #[arg(long, default_value_t = 10_000)]
    late_reply_delay_ms: u64,
    /// Seed of the fault injection, for reproducible runs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Milliseconds every call takes to be answered.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Calls per second taken (bursts of a tenth of that); over it, calls are answered
    /// RESOURCE_EXHAUSTED with a RetryInfo and nothing is applied.
    #[arg(long)]
    rate_limit_per_s: Option<std::num::NonZeroU32>,
    /// Milliseconds from the first call to an outage (with --outage-ms).
    #[arg(long, requires = "outage_ms")]
    outage_after_ms: Option<u64>,
    /// Milliseconds of the outage: every call is answered UNAVAILABLE.
    #[arg(long, requires = "outage_after_ms")]
    outage_ms: Option<u64>,
}

#[cfg(feature = "sandbox")]
impl SandboxArgs {
    fn config(&self) -> sandbox::SandboxConfig {
        let ms = std::time::Duration::from_millis;
        sandbox::SandboxConfig {
            settle_delay: ms(self.settle_delay_ms),
            unavailable_per_mille: self.unavailable_per_mille,
            late_reply_per_mille: self.late_reply_per_mille,
            late_reply_delay: ms(self.late_reply_delay_ms),
            seed: self.seed,
            latency: ms(self.latency_ms),
            rate_limit_per_s: self.rate_limit_per_s,
            outage: self
                .outage_after_ms
                .zip(self.outage_ms)
                .map(|(after, lasting)| sandbox::Outage {
                    after: ms(after),
                    lasting: ms(lasting),
                }),
        }
    }
}

fn main() -> anyhow::Result<()> {
    app::runtime()?.block_on(run_command())
}

async fn run_command() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load(cli.config.as_deref())?;
    let command = cli.command.unwrap_or(Command::Serve);
    // `/metrics` is served by `serve`'s admin port: instruments are kept only when it is on.
    let exposition = telemetry::Exposition {
        prometheus: matches!(command, Command::Serve) && settings.admin_listen_addr.is_some(),
    };
    let telemetry = telemetry::init(&settings.log_format, exposition)?;
    if !app::LIFO_SLOT_OFF {
        tracing::warn!(
            "built without `--cfg tokio_unstable`: the runtime keeps its LIFO slot, and \
             answers are written one call at a time (see `app::runtime`)"
        );
    }
    let result = run(command, settings).await;
    telemetry.shutdown();
    result
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::Serve => {
            let application = app::Application::build(settings).await?;
            application.run_until(app::shutdown_signal()).await
        }
        Command::Migrate { app_role } => {
            app::migrate(&settings, app_role.as_deref()).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Reseal { batch } => {
            let report = app::reseal(&settings, batch).await?;
            tracing::info!(
                resealed = report.resealed,
                passes = report.passes,
                retired_key_ids = ?report.retired_key_ids,
                "every stored account number is sealed under key {}; keys no longer in use \
                 may be removed",
                report.key_id
            );
            Ok(())
        }
        #[cfg(feature = "sandbox")]
        Command::SandboxBank(args) => {
            let bank = sandbox::SandboxBank::new(args.config());
            let listener = tokio::net::TcpListener::bind(args.listen).await?;
            sandbox::serve(listener, bank, app::shutdown_signal()).await
        }
    }
}
