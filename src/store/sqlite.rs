//! The embedded store: one SQLite file, one process.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use super::PoolSettings;

/// SQLite behind the [`Store`](super::Store) trait.
#[derive(Clone)]
pub struct SqliteStore {
    pool: sqlx::SqlitePool,
    /// Connections kept between whole-batch statements (see [`Held`](super::held::Held));
    /// SQLite writes no batch as one statement, so none is kept.
    held: std::sync::Arc<super::held::Held<sqlx::Sqlite>>,
    cipher: std::sync::Arc<crate::sealing::PiiCipher>,
    /// Told of every commit with feed events (`sql/events.rs`), to wake the feed.
    committed: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
}

pub(super) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

impl SqliteStore {
    /// Opens (creating if missing) the database at `url`, e.g. `sqlite://./data/payouts.db`.
    pub async fn connect(
        url: &str,
        pool: &PoolSettings,
        cipher: std::sync::Arc<crate::sealing::PiiCipher>,
    ) -> super::Result<Self> {
        let pool = open_pool(url, pool).await?;
        Ok(Self {
            pool,
            held: Default::default(),
            cipher,
            committed: std::sync::Arc::new(tokio::sync::watch::Sender::new(0)),
        })
    }

    /// The database as its spans give it (`db.namespace`): `main`, as SQLite names the file a
    /// connection opened (never its path).
    fn db_namespace(&self) -> &'static str {
        "main"
    }

    /// A fresh, migrated store in `dir`, its account numbers sealed under a fixed test key.
    #[cfg(test)]
    pub(crate) async fn migrated_in(dir: &tempfile::TempDir) -> Self {
        let url = format!("sqlite://{}", dir.path().join("payouts.db").display());
        let cipher = std::sync::Arc::new(crate::sealing::PiiCipher::new(&[7; 32]));
        let store = Self::connect(&url, &Default::default(), cipher)
            .await
            .expect("open");
        store.migrate().await.expect("migrate");
        store
    }

    /// Writers take the lock up front: a deferred transaction that reads and then writes can
    /// fail with SQLITE_BUSY when another writer got there first.
    async fn begin_transaction(&self) -> super::Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// Yields on every commit with feed events: one process writes the file.
    async fn listen_commits(&self) -> super::Result<futures::stream::BoxStream<'static, ()>> {
        Ok(super::events::local_commits(&self.committed))
    }
}

/// Applies the migrations to the database at `url` (created if missing). Needs no
/// account-number key.
pub async fn migrate(url: &str, pool: &PoolSettings) -> anyhow::Result<()> {
    let pool = open_pool(url, pool).await?;
    MIGRATOR.run(&pool).await.map_err(super::StoreError::from)?;
    pool.close().await;
    Ok(())
}

/// A pool of connections to the database at `url`, created (with its folder) if missing.
async fn open_pool(url: &str, pool: &PoolSettings) -> super::Result<sqlx::SqlitePool> {
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
    Ok(SqlitePoolOptions::new()
        .max_connections(8)
        // Connections here are held while waiting for the write lock: waiting for one is
        // waiting for the lock, as long as a writer would.
        .acquire_timeout(pool.acquire_timeout.max(pool.busy_timeout))
        .connect_with(options)
        .await?)
}

#[async_trait::async_trait]
impl super::ProbeStore for SqliteStore {
    /// A file has no network to lose: a statement through the pool says whether it still
    /// opens and reads.
    async fn probe(&self, within: Duration) -> super::Result<()> {
        super::within(within, sqlx::query("SELECT 1").execute(&self.pool)).await?;
        Ok(())
    }
}

// Nothing is locked row by row: a writing transaction here holds the whole database
// (`BEGIN IMMEDIATE`).
store_sql! {
    db: sqlx::Sqlite,
    store: SqliteStore,
    system: "sqlite",
    for_update: "",
    skip_locked: "",
    /// The key id of every sealed value (`<key id>:<ciphertext>`), each once.
    pub const SEALED_KEY_IDS: &str = "SELECT DISTINCT \
         substr(account_sealed, 1, instr(account_sealed, ':') - 1) \
         FROM (SELECT account_sealed FROM partners UNION ALL \
         SELECT account_sealed FROM disbursements UNION ALL \
         SELECT account_sealed FROM pii_key_probe)";
    /// `program_totals` has one row per status already (its triggers add to it).
    pub const FOLD_PROGRAM_TOTALS: Option<&str> = None;
}
