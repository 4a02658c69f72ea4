//! partner-payouts: registers business partners hurt by a platform outage, decides their cash
//! compensation under a versioned policy, and pays each approved claim exactly once.
//!
//! - [`domain`]: pure types and rules (registration numbers, accounts, the policy, state machines).
//! - [`store`]: persistence behind one trait, on PostgreSQL and SQLite.
//! - [`api`]: the gRPC services, translating protos to domain types and errors to statuses.
//! - [`auth`]: who may call what; [`audit`]: the audit log, the one place that writes it.
//! - [`payments`]: the payments-backend client and the dispatcher.
//! - [`sandbox`]: the sandbox bank, a fake payments backend (no money moves) that `serve`
//!   starts only when no backend is configured.
//! - [`app`]: wiring everything from [`config::Settings`] into a running server.

pub mod api;
pub mod app;
pub mod audit;
pub mod auth;
pub mod config;
pub mod domain;
pub mod net;
pub mod payments;
pub mod proto;
pub mod sandbox;
pub mod status_body;
pub mod store;
pub mod telemetry;
