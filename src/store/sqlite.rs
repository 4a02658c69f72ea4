//! The embedded store: one SQLite file, one process.

use std::str::FromStr;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

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
        cipher: std::sync::Arc<crate::sealing::PiiCipher>,
    ) -> super::Result<Self> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(std::time::Duration::from_secs(10));
        if let Some(dir) = options.get_filename().parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(anyhow::Error::from)?;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
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

sql_store!(
    SqliteStore,
    ::sqlx::Sqlite,
    db_system = "sqlite",
    for_update = "",
    skip_locked = ""
);
