//! Black-box tests through a real gRPC channel. Every test runs twice: once on SQLite, once on
//! PostgreSQL (a fresh database each time).

mod access;
mod claims;
mod disbursements;
mod dispatch_batch;
mod dispatch_limits;
mod helpers;
mod imports;
mod intake;
mod isolation;
mod partners;
mod reconcile;
