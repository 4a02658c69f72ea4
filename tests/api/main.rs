//! Black-box tests through a real gRPC channel. Every test runs twice: once on SQLite, once on
//! PostgreSQL (a fresh database each time).

mod access;
mod claims;
mod connections;
mod disbursements;
mod dispatch_batch;
mod dispatch_limits;
mod floods;
mod helpers;
mod imports;
mod intake;
mod isolation;
mod partners;
mod reconcile;
mod replay;
mod validation;
