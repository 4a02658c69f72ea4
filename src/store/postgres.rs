//! The production store: PostgreSQL, shared by any number of replicas, which coordinate
//! through row locks (`FOR UPDATE`, `SKIP LOCKED`) and never through each other.

use sqlx::postgres::PgPoolOptions;

/// PostgreSQL behind the [`Store`](super::Store) trait.
#[derive(Clone)]
pub struct PgStore {
    pool: sqlx::PgPool,
    cipher: std::sync::Arc<crate::auth::crypto::PiiCipher>,
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

impl PgStore {
    pub async fn connect(
        url: &str,
        max_connections: u32,
        cipher: std::sync::Arc<crate::auth::crypto::PiiCipher>,
    ) -> super::Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .connect(url)
            .await?;
        Ok(Self { pool, cipher })
    }

    pub async fn migrate(&self) -> super::Result<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    async fn begin_write(&self) -> super::Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        Ok(self.pool.begin().await?)
    }
}

sql_store!(
    PgStore,
    ::sqlx::Postgres,
    db_system = "postgresql",
    for_update = " FOR UPDATE",
    skip_locked = " FOR UPDATE SKIP LOCKED"
);
