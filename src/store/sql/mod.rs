//! The SQL both databases share, written once as ordinary code and compiled once per
//! database: `postgres.rs` and `sqlite.rs` each include this module tree (`store_sql!`) with
//! their own `Db` (the sqlx database), `SqlStore` (their store type, with `pool`, `cipher`
//! and `begin_write`), `DB_SYSTEM` (as traces name the database) and `dialect` (the few
//! whole statements whose row locks differ).
//!
//! One file per aggregate implements its store trait; rows are read into `FromRow` structs
//! ([`rows`]) and turned into domain types outside the SQL; every mutating call takes its
//! request id, runs, keeps its response and writes its audit entry the same way
//! ([`idempotency`]).

use super::{DB_SYSTEM, Db, SqlStore, dialect};
use crate::store::batch::BatchSql;
use crate::store::rows::unexpected;
use crate::store::{Micros, Page};

mod audit;
mod bulk;
mod bulk_claims;
mod bulk_partners;
mod claims;
mod disbursements;
mod dispatch;
mod events;
mod idempotency;
mod partners;
mod sealed;
mod settlement;

impl SqlStore {
    /// Applies this release's migrations.
    pub async fn migrate(&self) -> crate::store::Result<()> {
        super::MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// Fails unless this release's migrations were all applied (by `partner-payouts migrate`).
    pub async fn check_migrated(&self) -> anyhow::Result<()> {
        let mut conn = self.pool.acquire().await?;
        crate::store::schema::check_applied(&super::MIGRATOR, &mut *conn).await
    }
}

type Conn = <Db as sqlx::Database>::Connection;
pub(super) use events::Tx;
type DbRow = <Db as sqlx::Database>::Row;

/// The statements one batch statement is cut into ([`BatchSql`]), run in order.
type Pieces = Vec<sqlx::QueryBuilder<Db>>;

/// Runs `pieces` in `tx`, prepared where the database keeps them.
async fn execute_pieces(tx: &mut Tx, pieces: Pieces) -> sqlx::Result<()> {
    for mut qb in pieces {
        qb.build()
            .persistent(<Db as BatchSql>::PREPARED)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Runs `pieces` in `tx`, prepared where the database keeps them; returns the rows they
/// answered, in order.
async fn fetch_pieces(tx: &mut Tx, pieces: Pieces) -> sqlx::Result<Vec<DbRow>> {
    let mut rows = Vec::new();
    for mut qb in pieces {
        rows.extend(
            qb.build()
                .persistent(<Db as BatchSql>::PREPARED)
                .fetch_all(&mut **tx)
                .await?,
        );
    }
    Ok(rows)
}

fn after_key(page: &Page) -> String {
    page.after.map(|id| id.to_string()).unwrap_or_default()
}

/// The lower end of an optional time window, as the statements compare it.
fn since(time: Option<Micros>) -> Micros {
    time.unwrap_or(i64::MIN)
}

/// The upper end of an optional time window, as the statements compare it.
fn until(time: Option<Micros>) -> Micros {
    time.unwrap_or(i64::MAX)
}
