//! The production store: PostgreSQL, shared by any number of replicas, which coordinate
//! through row locks (`FOR UPDATE`, `SKIP LOCKED`) and never through each other.

use sqlx::Connection as _;
use sqlx::postgres::PgPoolOptions;

/// A pooled connection idle this long is checked before it is used again.
const IDLE_BEFORE_PING: std::time::Duration = std::time::Duration::from_secs(1);

/// PostgreSQL behind the [`Store`](super::Store) trait.
#[derive(Clone)]
pub struct PgStore {
    pool: sqlx::PgPool,
    cipher: std::sync::Arc<crate::sealing::PiiCipher>,
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

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

    pub async fn migrate(&self) -> super::Result<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    async fn begin_write(&self) -> super::Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        Ok(self.pool.begin().await?)
    }
}

// The SQL both databases share, compiled here for this one (and in the other store for
// the other): the same module tree on purpose.
#[allow(clippy::duplicate_mod)]
#[path = "sql/mod.rs"]
mod sql;

type Db = sqlx::Postgres;
type SqlStore = PgStore;
const DB_SYSTEM: &str = "postgresql";

/// The statements that lock rows: `FOR UPDATE` holds a selected row until commit, and `SKIP
/// LOCKED` passes over rows another replica holds.
mod dialect {
    pub const LOCK_PARTNER: &str =
        "SELECT partner_id FROM partners WHERE partner_id = $1 FOR UPDATE";
    pub const LOCK_CLAIM: &str = "SELECT claim_id FROM claims WHERE claim_id = $1 FOR UPDATE";
    pub const LOCK_DISBURSEMENT: &str =
        "SELECT disbursement_id FROM disbursements WHERE disbursement_id = $1 FOR UPDATE";
    pub const LOCK_DISPATCH_CONTROL: &str =
        "SELECT id FROM dispatch_control WHERE id = 1 FOR UPDATE";
    /// The tail of a select of partners by id that locks them, in id order.
    pub const IN_PARTNER_ORDER_LOCKED: &str = " ORDER BY partner_id FOR UPDATE";
    pub const LEASE_DUE: &str = "UPDATE outbox SET lease_until = $1 WHERE disbursement_id IN (\
         SELECT disbursement_id FROM outbox WHERE due_time <= $2 AND lease_until <= $2 \
         ORDER BY due_time LIMIT $3 FOR UPDATE SKIP LOCKED) RETURNING disbursement_id";
    /// The key id of every sealed value (`<key id>:<ciphertext>`), each once.
    pub const SEALED_KEY_IDS: &str = "SELECT DISTINCT split_part(account_sealed, ':', 1) \
         FROM (SELECT account_sealed FROM partners UNION ALL \
         SELECT account_sealed FROM disbursements UNION ALL \
         SELECT account_sealed FROM pii_key_probe) AS sealed";
    /// The tail of a select of rows to re-seal: rows another transaction holds are passed
    /// over (a later pass finds them), so a re-sealing batch never waits for a lock it could
    /// deadlock on.
    pub const SKIP_LOCKED: &str = " FOR UPDATE SKIP LOCKED";
}
