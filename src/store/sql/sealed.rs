//! Sealed account numbers as a whole in SQL: the key probe, the keys in use, re-sealing.

use async_trait::async_trait;
use payouts_macros::store_span;
use sqlx::QueryBuilder;

use super::audit::insert_audit;
use super::{DB_SYSTEM, Db, SqlStore, dialect};
use crate::domain::PartnerId;
use crate::sealing::Sealed;
use crate::store::rows::{unexpected, uuid};
use crate::store::{
    ResealAudit, ResealBatch, ResealPage, Result, SealedKeys, SealedPlace, SealingStore, now_micros,
};

#[async_trait]
impl SealingStore for SqlStore {
    #[store_span]
    async fn sealed_keys(&self) -> Result<SealedKeys> {
        // Two replicas starting at once on a new database: one probe is stored, and both
        // read that one.
        sqlx::query(
            "INSERT INTO pii_key_probe (probe_id, account_sealed, create_time) \
             VALUES ('probe', $1, $2) ON CONFLICT (probe_id) DO NOTHING",
        )
        .bind(self.cipher.seal_probe().encode())
        .bind(now_micros())
        .execute(&self.pool)
        .await?;
        let probe: String = sqlx::query_scalar("SELECT account_sealed FROM pii_key_probe")
            .fetch_one(&self.pool)
            .await?;
        let mut key_ids: Vec<String> = sqlx::query_scalar(dialect::SEALED_KEY_IDS)
            .fetch_all(&self.pool)
            .await?;
        key_ids.sort();
        Ok(SealedKeys { key_ids, probe })
    }

    #[store_span(table = place.table())]
    async fn reseal_batch(
        &self,
        place: SealedPlace,
        page: ResealPage<'_>,
        audit: ResealAudit<'_>,
    ) -> Result<ResealBatch> {
        let (table, id) = (place.table(), place.id_column());
        let mut tx = self.begin_write().await?;
        let mut select = QueryBuilder::<Db>::new(format!(
            "SELECT {id}, {partner}, account_sealed FROM {table} WHERE {id} > ",
            partner = place.partner_column(),
        ));
        select
            .push_bind(page.after)
            .push(" AND account_sealed NOT LIKE ")
            .push_bind(format!("{}:%", self.cipher.current_key_id()))
            .push(format_args!(" ORDER BY {id} LIMIT "))
            .push_bind(i64::from(page.limit))
            .push(dialect::SKIP_LOCKED);
        let rows: Vec<(String, String, String)> =
            select.build_query_as().fetch_all(&mut *tx).await?;
        // Only if unchanged since read: the rows are held (or the database is), so this is
        // the value read; the condition keeps it so should that ever not be the case.
        let update = format!(
            "UPDATE {table} SET account_sealed = $1 WHERE {id} = $2 AND account_sealed = $3"
        );
        let mut batch = ResealBatch {
            resealed: 0,
            last_id: rows.last().map(|(id, _, _)| id.clone()),
        };
        for (row_id, partner_id, stored) in &rows {
            let partner: PartnerId = uuid("partner_id", partner_id)?;
            let resealed = Sealed::decode(stored)
                .and_then(|sealed| self.cipher.reseal(partner, &sealed))
                .map_err(|e| unexpected(format!("{table} {row_id}: account_sealed: {e}")))?;
            batch.resealed += sqlx::query(sqlx::AssertSqlSafe(update.as_str()))
                .bind(resealed.encode())
                .bind(row_id)
                .bind(stored)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        if batch.resealed > 0 {
            insert_audit(&mut tx, &[audit(place, batch.resealed)]).await?;
        }
        tx.commit().await?;
        Ok(batch)
    }
}
