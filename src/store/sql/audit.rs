//! The audit log: entries appended (calls finishing together, refused calls in aggregate) and
//! listed; [`insert_audit`] also writes a call's entry in the transaction of its rows.

use async_trait::async_trait;
use payouts_macros::store_span;

use super::{DB_SYSTEM, Db, SqlStore, Tx, after_key, execute_pieces, since, until};
use crate::store::batch::BatchSql;
use crate::store::intake::audit_insert;
use crate::store::rows::AuditRow;
use crate::store::{AuditEvent, AuditFilter, AuditStore, Page, Result, retry_contention};

/// Appends audit log entries in the caller's transaction.
pub(super) async fn insert_audit(tx: &mut Tx, events: &[AuditEvent]) -> Result<()> {
    let statements = <Db as BatchSql>::insert_all(vec![audit_insert(events)]);
    Ok(execute_pieces(tx, statements).await?)
}

#[async_trait]
impl AuditStore for SqlStore {
    #[store_span]
    async fn append_audit(&self, events: &[AuditEvent]) -> Result<()> {
        retry_contention("append_audit", move || async move {
            let mut tx = Tx::plain(self.pool.begin().await?);
            // Events come in batches (calls finishing together, refused calls).
            insert_audit(&mut tx, events).await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    #[store_span]
    async fn list_audit(&self, filter: &AuditFilter, page: &Page) -> Result<Vec<AuditEvent>> {
        let rows: Vec<AuditRow> = sqlx::query_as(
            "SELECT * FROM audit_events WHERE audit_event_id > $1 \
             AND ($2 = '' OR principal = $2) AND ($3 = '' OR resource_id = $3) \
             AND time >= $4 AND time < $5 ORDER BY audit_event_id LIMIT $6",
        )
        .bind(after_key(page))
        .bind(filter.principal.clone().unwrap_or_default())
        .bind(filter.resource_id.clone().unwrap_or_default())
        .bind(since(filter.start_time))
        .bind(until(filter.end_time))
        .bind(i64::from(page.limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(AuditEvent::try_from).collect()
    }
}
