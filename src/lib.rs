//! partner-payouts: registers business partners hurt by a platform outage, decides their cash
//! compensation under a versioned policy, and pays each approved claim exactly once.
//!
//! - [`domain`]: pure types and rules (registration numbers, accounts, the policy, state machines).
//! - [`store`]: persistence, on PostgreSQL and SQLite.
//! - [`api`]: the gRPC services, translating protos to domain types and errors to statuses.
//! - [`auth`]: who may call what; [`audit`]: the audit log, the one place that writes it.
//! - [`payments`]: the payments-backend client and the dispatcher.
//! - [`feed`]: the change feed on one replica: one reader of the database for every watcher.
//! - [`keys`]: the account-number keys against what is stored: the check before serving, and
//!   the re-sealing of stored values under the first key.
//! - `sandbox` (cargo feature `sandbox`, on by default): the sandbox bank, a fake payments
//!   backend (no money moves) that `serve` starts only when no backend is configured.
//! - [`app`]: wiring everything from [`config::Settings`] into a running server;
//!   [`readiness`]: whether the replica is ready (the database answers, it is not draining),
//!   which gRPC health and [`admin`] (the admin HTTP port: probes and `/metrics`) report.
//!
//! Leaf modules, which import nothing of the crate but [`proto`] and each other:
//! [`principal`] (the caller), [`status`] and [`status_body`] (gRPC statuses), [`deadline`]
//! (every call ends by its deadline), [`sealing`] (account numbers at rest), [`secret`]
//! (settings that never print), [`discovery`] (health and reflection), [`middleware`] (what
//! the tower layers around every call share), [`allocator`] (the process's memory allocator).
//!
//! Imports run one way: `domain` <- `store` <- `api` and `payments`; `auth` stands beside
//! `api`; everything may use the leaf modules; only `app` (and `main`) see all of it.

pub mod admin;
pub mod allocator;
pub mod api;
pub mod app;
pub mod audit;
pub mod auth;
pub mod config;
pub mod deadline;
pub mod discovery;
pub mod domain;
pub mod feed;
pub mod keys;
pub mod middleware;
pub mod net;
pub mod payments;
pub mod principal;
pub mod proto;
pub mod readiness;
#[cfg(feature = "sandbox")]
pub mod sandbox;
pub mod sealing;
pub mod secret;
pub mod status;
pub mod status_body;
pub mod store;
pub mod telemetry;
