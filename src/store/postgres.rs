//! The production store: PostgreSQL, shared by any number of replicas, which coordinate
//! through row locks (`FOR UPDATE`, `SKIP LOCKED`) and never through each other.

use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::BoxStream;
use sqlx::Connection as _;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};

use super::PoolSettings;

use super::held::{Held, IDLE_BEFORE_PING};

/// PostgreSQL behind the [`Store`](super::Store) trait.
#[derive(Clone)]
pub struct PgStore {
    pool: sqlx::PgPool,
    /// Connections kept between whole-batch statements (see [`Held`]).
    held: Arc<Held<sqlx::Postgres>>,
    cipher: Arc<crate::sealing::PiiCipher>,
    /// The health probe's own connection, made again after a failed probe.
    probe: Arc<tokio::sync::Mutex<Option<PgConnection>>>,
    options: PgConnectOptions,
    /// Told of every commit with feed events (`sql/events.rs`), to wake this replica's feed.
    committed: Arc<tokio::sync::watch::Sender<u64>>,
}

pub(super) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

impl PgStore {
    pub async fn connect(
        url: &str,
        pool: &PoolSettings,
        cipher: Arc<crate::sealing::PiiCipher>,
    ) -> super::Result<Self> {
        let (pool, options) = connect_pool(url, pool).await?;
        Ok(Self {
            pool,
            held: Arc::default(),
            cipher,
            probe: Arc::default(),
            options,
            committed: Arc::new(tokio::sync::watch::Sender::new(0)),
        })
    }

    /// The pool, for tests that look at what a store's own connections did.
    #[cfg(test)]
    pub(crate) fn pool(&self) -> &sqlx::PgPool {
        &self.pool
    }

    /// The database's name, as its spans give it (`db.namespace`).
    fn db_namespace(&self) -> &str {
        self.options.get_database().unwrap_or("postgres")
    }

    async fn begin_transaction(&self) -> super::Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        Ok(self.pool.begin().await?)
    }

    /// Yields on every local commit with feed events and on every `NOTIFY` of the feed's
    /// channel from any replica; the listening connection is made again when lost.
    async fn listen_commits(&self) -> super::Result<BoxStream<'static, ()>> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        listener.listen(super::events::FEED_CHANNEL).await?;
        let remote = futures::stream::unfold(listener, |mut listener| async move {
            if let Err(e) = listener.recv().await {
                tracing::warn!(error = %e, "the change feed's listening connection failed; polling until it is back");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Some(((), listener))
        });
        Ok(futures::stream::select(super::events::local_commits(&self.committed), remote).boxed())
    }
}

/// Applies the migrations to the database at `url` and, given `app_role`, grants that role
/// what `serve` needs and no more ([`super::roles`]). Needs no account-number key.
pub async fn migrate(
    url: &str,
    pool: &PoolSettings,
    app_role: Option<&super::roles::AppRole>,
) -> anyhow::Result<()> {
    let (pool, _) = connect_pool(url, pool).await?;
    MIGRATOR.run(&pool).await.map_err(super::StoreError::from)?;
    if let Some(role) = app_role {
        super::roles::grant(&pool, role).await?;
    }
    pool.close().await;
    Ok(())
}

/// A pool of connections to `url`, once PostgreSQL takes them.
async fn connect_pool(
    url: &str,
    pool: &PoolSettings,
) -> super::Result<(sqlx::PgPool, PgConnectOptions)> {
    let options = PgConnectOptions::from_str(url)?;
    let pool = PgPoolOptions::new()
        .max_connections(pool.max_connections)
        // Waiting longer for a connection than a caller would for an answer only holds
        // the caller: past it the call is answered UNAVAILABLE, to be retried.
        .acquire_timeout(pool.acquire_timeout)
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
        .connect_lazy_with(options.clone());
    wait_for_database(&pool).await?;
    Ok((pool, options))
}

/// How long the service waits at start for PostgreSQL to take connections: the two are often
/// started together. (Calls wait only the acquire timeout.)
const STARTUP_WAIT: Duration = Duration::from_secs(30);

/// Waits until `pool` has a connection, while PostgreSQL is unavailable and for at most
/// [`STARTUP_WAIT`]; any other failure (a wrong password, no such database) at once.
async fn wait_for_database(pool: &sqlx::PgPool) -> super::Result<()> {
    let started = tokio::time::Instant::now();
    loop {
        match pool.acquire().await.map_err(super::StoreError::from) {
            Ok(_) => return Ok(()),
            Err(super::StoreError::Unavailable(e)) if started.elapsed() < STARTUP_WAIT => {
                tracing::warn!(error = %e, "waiting for PostgreSQL to take connections");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

#[async_trait::async_trait]
impl super::ProbeStore for PgStore {
    async fn probe(&self, within: Duration) -> super::Result<()> {
        let mut held = self.probe.lock().await;
        let probed = super::within(within, async {
            let conn = match held.as_mut() {
                Some(conn) => conn,
                None => held.insert(PgConnection::connect_with(&self.options).await?),
            };
            conn.ping().await
        })
        .await;
        if probed.is_err() {
            // Broken, or in the middle of a round trip that never came back.
            *held = None;
        }
        Ok(probed?)
    }
}

// Rows are locked with `FOR UPDATE` until commit; `SKIP LOCKED` passes over rows another
// replica holds.
store_sql! {
    db: sqlx::Postgres,
    store: PgStore,
    system: "postgresql",
    for_update: " FOR UPDATE",
    skip_locked: " FOR UPDATE SKIP LOCKED",
    /// The key id of every sealed value (`<key id>:<ciphertext>`), each once.
    pub const SEALED_KEY_IDS: &str = "SELECT DISTINCT split_part(account_sealed, ':', 1) \
         FROM (SELECT account_sealed FROM partners UNION ALL \
         SELECT account_sealed FROM disbursements UNION ALL \
         SELECT account_sealed FROM pii_key_probe) AS sealed";
    /// Folds the rows of `program_totals` into one per status: the rows it deletes are exactly
    /// those it sums, so a writer's rows committed meanwhile, or a fold running beside it,
    /// change nothing of the totals.
    pub const FOLD_PROGRAM_TOTALS: Option<&str> = Some(
        "WITH folded AS (DELETE FROM program_totals RETURNING kind, status, n, krw) \
         INSERT INTO program_totals (kind, status, n, krw) \
         SELECT kind, status, SUM(n), SUM(krw) FROM folded GROUP BY kind, status",
    );
}
