//! The embedded store: one SQLite file, one process.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use super::PoolSettings;

/// SQLite behind the [`Store`](super::Store) trait.
#[derive(Clone)]
pub struct SqliteStore {
    pool: sqlx::SqlitePool,
    cipher: std::sync::Arc<crate::sealing::PiiCipher>,
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

impl SqliteStore {
    /// Opens (creating if missing) the database at `url`, e.g. `sqlite://./data/payouts.db`.
    pub async fn connect(
        url: &str,
        pool: &PoolSettings,
        cipher: std::sync::Arc<crate::sealing::PiiCipher>,
    ) -> super::Result<Self> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            // A writer waits this long for another's lock, then fails UNAVAILABLE.
            .busy_timeout(pool.busy_timeout);
        if let Some(dir) = options.get_filename().parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(anyhow::Error::from)?;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            // Connections here are held while waiting for the write lock: waiting for one is
            // waiting for the lock, as long as a writer would.
            .acquire_timeout(pool.acquire_timeout.max(pool.busy_timeout))
            .connect_with(options)
            .await?;
        Ok(Self { pool, cipher })
    }

    pub async fn migrate(&self) -> super::Result<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// Writers take the lock up front: a deferred transaction that reads and then writes can
    /// fail with SQLITE_BUSY when another writer got there first.
    async fn begin_write(&self) -> super::Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }
}

#[async_trait::async_trait]
impl super::ProbeStore for SqliteStore {
    /// A file has no network to lose: a statement through the pool says whether it still
    /// opens and reads.
    async fn probe(&self, within: Duration) -> super::Result<()> {
        tokio::time::timeout(within, sqlx::query("SELECT 1").execute(&self.pool))
            .await
            .unwrap_or_else(|_| Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()))?;
        Ok(())
    }
}

// The SQL both databases share, compiled here for this one (and in the other store for
// the other): the same module tree on purpose.
#[allow(clippy::duplicate_mod)]
#[path = "sql/mod.rs"]
mod sql;

type Db = sqlx::Sqlite;
type SqlStore = SqliteStore;
const DB_SYSTEM: &str = "sqlite";

/// The statements that lock rows elsewhere, without locks: a writing transaction here holds
/// the whole database (`BEGIN IMMEDIATE`).
mod dialect {
    pub const LOCK_PARTNER: &str = "SELECT partner_id FROM partners WHERE partner_id = $1";
    pub const LOCK_CLAIM: &str = "SELECT claim_id FROM claims WHERE claim_id = $1";
    pub const LOCK_DISBURSEMENT: &str =
        "SELECT disbursement_id FROM disbursements WHERE disbursement_id = $1";
    pub const LOCK_DISPATCH_CONTROL: &str = "SELECT id FROM dispatch_control WHERE id = 1";
    /// The tail of a select of partners by id, in id order.
    pub const IN_PARTNER_ORDER_LOCKED: &str = " ORDER BY partner_id";
    pub const LEASE_DUE: &str = "UPDATE outbox SET lease_until = $1 WHERE disbursement_id IN (\
         SELECT disbursement_id FROM outbox WHERE due_time <= $2 AND lease_until <= $2 \
         ORDER BY due_time LIMIT $3) RETURNING disbursement_id";
    /// The key id of every sealed value (`<key id>:<ciphertext>`), each once.
    pub const SEALED_KEY_IDS: &str = "SELECT DISTINCT \
         substr(account_sealed, 1, instr(account_sealed, ':') - 1) \
         FROM (SELECT account_sealed FROM partners UNION ALL \
         SELECT account_sealed FROM disbursements UNION ALL \
         SELECT account_sealed FROM pii_key_probe)";
    /// The tail of a select of rows to re-seal; the writing transaction holds the database.
    pub const SKIP_LOCKED: &str = "";
}
