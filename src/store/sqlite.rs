//! The embedded store: one SQLite file, one process.

use std::str::FromStr;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

// The SQL both databases share, compiled here for this one (and in the other store for
// the other): the same module tree on purpose.
#[allow(clippy::duplicate_mod)]
#[path = "sql/mod.rs"]
#[macro_use]
mod sql;

store! {
    /// SQLite behind the [`Store`](super::Store) trait.
    SqliteStore: sqlx::Sqlite, "sqlite", "./migrations/sqlite";
    /// The statements that lock rows elsewhere, without locks: a writing transaction here holds
    /// the whole database (`BEGIN IMMEDIATE`).
    no_row_locks;
}

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

    /// Writers take the lock up front: a deferred transaction that reads and then writes can
    /// fail with SQLITE_BUSY when another writer got there first.
    async fn begin_write(&self) -> super::Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }
}
