//! Connections kept between whole-batch statements, so that one backend writes a busy
//! batcher's batches one after another.
//!
//! The pool hands out the connection idle longest and takes each one back through a task of
//! its own that pings it first. Consecutive batches then run on different backends, and a
//! batcher that wants the connection it has just released waits for that round trip. A
//! connection here goes back to this list as soon as its statement is answered, and the next
//! batch takes the one used last. PostgreSQL's CPU per registration was 8-31% lower so in
//! six pairs of runs of seven (BENCHMARKS.md).
//!
//! What the pool guarantees still holds: a connection idle for [`IDLE_BEFORE_PING`] is not
//! reused from here but given back to the pool, which checks it before anyone uses it again;
//! one held for [`HELD_AT_MOST`] goes back too, so the pool's lifetime limit still applies;
//! and one whose statement failed other than by the database's own refusal is given back,
//! never kept. The connections here count against the pool's size: at most [`HOLD`].

use std::sync::Mutex;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::{Database, Pool};
use tokio::time::Instant;

/// A connection idle this long is checked by the pool before it is used again (as the
/// pool's own `before_acquire` does).
pub(crate) const IDLE_BEFORE_PING: Duration = Duration::from_secs(1);

/// A connection goes back to the pool after this long here, however busy.
const HELD_AT_MOST: Duration = Duration::from_secs(60);

/// At most this many connections wait here: one for each batcher or import stream writing
/// at once; more go back to the pool.
const HOLD: usize = 4;

/// See the module's documentation.
pub(crate) struct Held<DB: Database> {
    idle: Mutex<Vec<Idle<DB>>>,
    /// A connection idle this long goes back to the pool ([`IDLE_BEFORE_PING`]).
    ping_after: Duration,
    /// A connection held this long goes back to the pool ([`HELD_AT_MOST`]).
    at_most: Duration,
}

struct Idle<DB: Database> {
    conn: PoolConnection<DB>,
    /// When the pool gave it.
    since: Instant,
    /// When its last statement was answered.
    used: Instant,
}

/// A connection taken from [`Held`]: given back with [`Held::keep`] after a statement that
/// left it sound, or dropped (back to the pool) after any other.
pub(crate) struct Lease<DB: Database> {
    pub(crate) conn: PoolConnection<DB>,
    since: Instant,
}

impl<DB: Database> Default for Held<DB> {
    fn default() -> Self {
        Self::new(IDLE_BEFORE_PING, HELD_AT_MOST)
    }
}

impl<DB: Database> Held<DB> {
    fn new(ping_after: Duration, at_most: Duration) -> Self {
        Self {
            idle: Mutex::new(Vec::with_capacity(HOLD + 1)),
            ping_after,
            at_most,
        }
    }

    /// The connection used last, if it is fresh; else one from `pool`. Connections here that
    /// are no longer fresh go back to the pool.
    pub(crate) async fn take(&self, pool: &Pool<DB>) -> sqlx::Result<Lease<DB>> {
        let now = Instant::now();
        let (fresh, stale) = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let stale: Vec<Idle<DB>> = idle.extract_if(.., |held| !self.fresh(held, now)).collect();
            (idle.pop(), stale)
        };
        // Dropped outside the lock: each goes back to the pool, which checks it.
        drop(stale);
        match fresh {
            Some(held) => Ok(Lease {
                conn: held.conn,
                since: held.since,
            }),
            None => Ok(Lease {
                conn: pool.acquire().await?,
                since: Instant::now(),
            }),
        }
    }

    /// Keeps `lease` for the next statement; past [`HOLD`] the one used longest ago goes
    /// back to the pool.
    pub(crate) fn keep(&self, lease: Lease<DB>) {
        let held = Idle {
            conn: lease.conn,
            since: lease.since,
            used: Instant::now(),
        };
        let surplus = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            idle.push(held);
            (idle.len() > HOLD).then(|| idle.remove(0))
        };
        drop(surplus);
    }

    fn fresh(&self, held: &Idle<DB>, now: Instant) -> bool {
        now.duration_since(held.used) < self.ping_after
            && now.duration_since(held.since) < self.at_most
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use sqlx::sqlite::SqlitePoolOptions;
    use sqlx::{Sqlite, SqlitePool};

    use super::*;

    /// An in-memory SQLite pool that counts the connections it hands out through itself:
    /// opened, or checked before reuse. (A mark in a temporary table tells them apart.)
    fn pool() -> (SqlitePool, Arc<AtomicUsize>) {
        let handed = Arc::new(AtomicUsize::new(0));
        let (opened, checked) = (handed.clone(), handed.clone());
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .after_connect(move |_, _| {
                opened.fetch_add(1, Ordering::SeqCst);
                Box::pin(async { Ok(()) })
            })
            .before_acquire(move |_, _| {
                checked.fetch_add(1, Ordering::SeqCst);
                Box::pin(async { Ok(true) })
            })
            .connect_lazy("sqlite::memory:")
            .expect("pool");
        (pool, handed)
    }

    /// Marks the lease's connection with `name`, in a table only it sees.
    async fn mark(lease: &mut Lease<Sqlite>, name: &str) {
        sqlx::query("CREATE TEMP TABLE mark (name TEXT)")
            .execute(&mut *lease.conn)
            .await
            .expect("mark");
        sqlx::query("INSERT INTO mark VALUES ($1)")
            .bind(name)
            .execute(&mut *lease.conn)
            .await
            .expect("mark");
    }

    /// The mark of the lease's connection, if it has one.
    async fn marked(lease: &mut Lease<Sqlite>) -> Option<String> {
        sqlx::query_scalar("SELECT name FROM mark")
            .fetch_one(&mut *lease.conn)
            .await
            .ok()
    }

    /// Keeps `lease`, waits `quiet` and takes a connection again: it must be the second the
    /// pool handed out, and `lease` must no longer be kept.
    async fn second_from_the_pool_after(
        held: &Held<Sqlite>,
        pool: &SqlitePool,
        lease: Lease<Sqlite>,
        quiet: Duration,
        handed: &AtomicUsize,
    ) {
        held.keep(lease);
        tokio::time::sleep(quiet).await;
        let _taken = held.take(pool).await.expect("take");
        assert_eq!(handed.load(Ordering::SeqCst), 2, "taken through the pool");
        assert_eq!(len(held), 0, "the one kept before is no longer");
    }

    fn len<DB: Database>(held: &Held<DB>) -> usize {
        held.idle.lock().expect("lock").len()
    }

    #[tokio::test]
    async fn the_connection_used_last_is_taken_again_without_the_pool() {
        let (pool, handed) = pool();
        let held = Held::<Sqlite>::default();
        let mut first = held.take(&pool).await.expect("take");
        let mut second = held.take(&pool).await.expect("take");
        assert_eq!(handed.load(Ordering::SeqCst), 2, "both from the pool");
        mark(&mut first, "first").await;
        mark(&mut second, "second").await;
        held.keep(first);
        held.keep(second);
        let mut again = held.take(&pool).await.expect("take");
        assert_eq!(
            marked(&mut again).await.as_deref(),
            Some("second"),
            "the one kept last"
        );
        assert_eq!(handed.load(Ordering::SeqCst), 2, "not through the pool");
        assert_eq!(len(&held), 1);
    }

    #[tokio::test]
    async fn a_connection_idle_past_the_ping_goes_back_to_the_pool_which_checks_it() {
        let (pool, handed) = pool();
        let held = Held::<Sqlite>::new(Duration::from_millis(100), HELD_AT_MOST);
        let mut lease = held.take(&pool).await.expect("take");
        mark(&mut lease, "idle").await;
        let quiet = Duration::from_millis(150);
        second_from_the_pool_after(&held, &pool, lease, quiet, &handed).await;
    }

    #[tokio::test]
    async fn a_connection_held_past_its_limit_goes_back_however_busy() {
        let (pool, handed) = pool();
        let held = Held::<Sqlite>::new(Duration::from_secs(60), Duration::from_secs(1));
        let mut lease = held.take(&pool).await.expect("take");
        mark(&mut lease, "busy").await;
        // In use every few milliseconds, never idle long enough to be checked.
        for _ in 0..3 {
            held.keep(lease);
            tokio::time::sleep(Duration::from_millis(10)).await;
            lease = held.take(&pool).await.expect("take");
        }
        assert_eq!(
            marked(&mut lease).await.as_deref(),
            Some("busy"),
            "the same so far"
        );
        assert_eq!(handed.load(Ordering::SeqCst), 1);
        let quiet = Duration::from_millis(1_100);
        second_from_the_pool_after(&held, &pool, lease, quiet, &handed).await;
    }

    #[tokio::test]
    async fn no_more_connections_are_kept_than_writers_at_once() {
        let (pool, _) = pool();
        let held = Held::<Sqlite>::default();
        let mut leases = Vec::new();
        for _ in 0..HOLD + 2 {
            leases.push(held.take(&pool).await.expect("take"));
        }
        for lease in leases {
            held.keep(lease);
        }
        assert_eq!(len(&held), HOLD);
    }
}
