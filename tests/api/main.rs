//! Black-box tests through a real gRPC channel. A test runs on both databases through
//! [`on_both_databases!`]: as `name::sqlite` and `name::postgres`, each on a fresh database.

mod access;
mod backend;
mod certs;
mod claims;
mod connections;
mod database_faults;
mod deadlines;
mod disbursements;
mod dispatch_bank;
mod dispatch_batch;
mod dispatch_limits;
mod environment;
mod events;
mod floods;
mod helpers;
mod imports;
mod intake;
mod isolation;
mod keys;
mod lifetimes;
mod partners;
mod proxy;
mod reconcile;
mod reflection;
mod replay;
mod roles;
mod validation;
