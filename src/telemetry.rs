//! Logging set-up: `tracing` to stderr, as text or one JSON object per line.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `RUST_LOG` filters (default `info`).
pub fn init(log_format: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second call (tests start many apps in one process) keeps the first subscriber.
    let _ = if log_format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
