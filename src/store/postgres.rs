//! The production store: PostgreSQL, shared by any number of replicas, which coordinate
//! through row locks (`FOR UPDATE`, `SKIP LOCKED`) and never through each other.

use sqlx::Connection as _;
use sqlx::postgres::PgPoolOptions;

/// A pooled connection idle this long is checked before it is used again.
const IDLE_BEFORE_PING: std::time::Duration = std::time::Duration::from_secs(1);

// The SQL both databases share, compiled here for this one (and in the other store for
// the other): the same module tree on purpose.
#[allow(clippy::duplicate_mod)]
#[path = "sql/mod.rs"]
#[macro_use]
mod sql;

store! {
    /// PostgreSQL behind the [`Store`](super::Store) trait.
    PgStore: sqlx::Postgres, "postgresql", "./migrations/postgres";
    /// The statements that lock rows: `FOR UPDATE` holds a selected row until commit, and `SKIP
    /// LOCKED` passes over rows another replica holds.
    row_locks: " FOR UPDATE", " SKIP LOCKED";
}

impl PgStore {
    pub async fn connect(
        url: &str,
        max_connections: u32,
        cipher: std::sync::Arc<crate::sealing::PiiCipher>,
    ) -> super::Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            // A connection in steady use is not pinged before each transaction (a round
            // trip each, 0.3 ms under load); one idle for a while is, and is replaced if it
            // broke meanwhile.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= IDLE_BEFORE_PING {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .connect(url)
            .await?;
        Ok(Self { pool, cipher })
    }

    async fn begin_write(&self) -> super::Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        Ok(self.pool.begin().await?)
    }
}
