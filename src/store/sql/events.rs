//! The change feed in SQL: the writing transaction ([`Tx`]) that carries the events of its
//! change and inserts them as its last statement before it commits, and the feed read back.

use std::ops::{Deref, DerefMut};

use async_trait::async_trait;
use futures::stream::BoxStream;
use payouts_macros::store_span;

use super::{Conn, DB_SYSTEM, Db, SqlStore, execute_pieces};
use crate::domain::{ChangeEvent, EventFilter, NewEvent};
use crate::store::Result;
use crate::store::batch::BatchSql;
use crate::store::events::{EventRow, EventStore, events_insert};

/// A writing transaction and the feed events of what it changes. Statements run on it as on
/// the connection it derefs to; [`Tx::commit`] inserts the events last, then commits, so an
/// event is stored exactly when its change is.
pub(crate) struct Tx {
    inner: sqlx::Transaction<'static, Db>,
    events: Vec<NewEvent>,
    /// Told of every commit that wrote events, to wake this replica's feed at once.
    committed: Option<std::sync::Arc<tokio::sync::watch::Sender<u64>>>,
}

impl Deref for Tx {
    type Target = Conn;

    fn deref(&self) -> &Conn {
        &self.inner
    }
}

impl DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut Conn {
        &mut self.inner
    }
}

impl Tx {
    /// A transaction whose commits no feed hears of (one that writes no event).
    pub(super) fn plain(inner: sqlx::Transaction<'static, Db>) -> Self {
        Self {
            inner,
            events: Vec::new(),
            committed: None,
        }
    }

    /// Adds `event` to what this transaction writes when it commits.
    pub(super) fn emit(&mut self, event: NewEvent) {
        self.events.push(event);
    }

    /// Inserts the transaction's events (on PostgreSQL under the feed's lock, which commit
    /// releases: the sequence is taken in commit order; see [`BatchSql::insert_whole`]) and
    /// commits.
    pub(super) async fn commit(mut self) -> Result<()> {
        let events = std::mem::take(&mut self.events);
        for chunk in events.chunks(EVENTS_PER_STATEMENT) {
            let insert = events_insert(chunk);
            if <Db as BatchSql>::WHOLE {
                // One statement takes the lock, inserts and notifies.
                if let Some(mut statement) = <Db as BatchSql>::insert_whole(Vec::new(), insert) {
                    statement
                        .build()
                        .persistent(true)
                        .execute(&mut *self.inner)
                        .await?;
                }
            } else {
                let pieces = <Db as BatchSql>::insert_all(vec![insert]);
                execute_pieces(&mut self, pieces).await?;
            }
        }
        self.inner.commit().await?;
        if let (false, Some(committed)) = (events.is_empty(), &self.committed) {
            told(committed);
        }
        Ok(())
    }
}

/// Tells this replica's feed that a transaction with events has committed.
fn told(committed: &tokio::sync::watch::Sender<u64>) {
    committed.send_modify(|n| *n = n.wrapping_add(1));
}

/// Events one insert statement carries at most (a large import writes several).
const EVENTS_PER_STATEMENT: usize = 2_000;

impl SqlStore {
    /// Tells this replica's feed of a commit with events made outside a [`Tx`] (a statement
    /// that is its own transaction, from [`BatchSql::insert_whole`]).
    pub(super) fn feed_committed(&self) {
        told(&self.committed);
    }

    /// Begins a writing transaction whose events this replica's feed hears of.
    pub(super) async fn begin_write(&self) -> Result<Tx> {
        Ok(Tx {
            inner: self.begin_transaction().await?,
            events: Vec::new(),
            committed: Some(self.committed.clone()),
        })
    }
}

#[async_trait]
impl EventStore for SqlStore {
    #[store_span]
    async fn list_events(
        &self,
        filter: &EventFilter,
        after: i64,
        limit: u32,
    ) -> Result<Vec<ChangeEvent>> {
        let mut qb = sqlx::QueryBuilder::<Db>::new("SELECT * FROM change_events WHERE sequence > ");
        qb.push_bind(after);
        if let Some(partner_id) = filter.partner_id {
            qb.push(" AND partner_id = ")
                .push_bind(partner_id.to_string());
        }
        if !filter.types.is_empty() {
            qb.push(" AND event_type IN (");
            let mut types = qb.separated(", ");
            for t in &filter.types {
                types.push_bind(t.key());
            }
            qb.push(")");
        }
        qb.push(" ORDER BY sequence LIMIT ")
            .push_bind(i64::from(limit));
        let rows: Vec<EventRow> = qb.build_query_as().fetch_all(&self.pool).await?;
        rows.into_iter().map(ChangeEvent::try_from).collect()
    }

    #[store_span]
    async fn latest_sequence(&self) -> Result<i64> {
        let latest: Option<i64> = sqlx::query_scalar("SELECT MAX(sequence) FROM change_events")
            .fetch_one(&self.pool)
            .await?;
        Ok(latest.unwrap_or(0))
    }

    async fn commit_signals(&self) -> Result<BoxStream<'static, ()>> {
        self.listen_commits().await
    }
}
