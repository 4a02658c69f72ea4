//! The partners in SQL.

use async_trait::async_trait;
use payouts_macros::store_span;

use super::bulk::batch_or_row_by_row;
use super::{Conn, DB_SYSTEM, SqlStore, after_key, bulk_partners, dialect};
use crate::domain::{AccountOnFile, NewEvent, NewPartner, Partner, PartnerId};
use crate::store::rows::{PartnerRow, services_key, uuid};
use crate::store::{
    AccountUpdate, BatchAudit, Idempotency, Page, PartnerFilter, PartnerStore, Recorded, Render,
    Result, StoreError, Stored, now_micros,
};

const PARTNER_BY_NUMBER: &str =
    "SELECT partner_id FROM partners WHERE business_registration_number = $1";

pub(super) async fn load_partner(
    conn: &mut Conn,
    partner_id: PartnerId,
) -> Result<Option<Partner>> {
    let row: Option<PartnerRow> = sqlx::query_as("SELECT * FROM partners WHERE partner_id = $1")
        .bind(partner_id.to_string())
        .fetch_optional(&mut *conn)
        .await?;
    row.map(Partner::try_from).transpose()
}

/// The answer to registering a number another partner has.
fn already_registered(partner_id: &str) -> Result<StoreError> {
    Ok(StoreError::PartnerAlreadyRegistered {
        partner_id: uuid("partner_id", partner_id)?,
    })
}

#[async_trait]
impl PartnerStore for SqlStore {
    #[store_span]
    async fn register_partner(
        &self,
        call: Recorded<'_, Partner>,
        partner: &NewPartner,
    ) -> Result<Stored<Partner>> {
        let actor = call.idem.principal.as_str();
        self.mutate("register_partner", call, move |mut tx| async move {
            let brn = partner.profile.business_registration_number.as_str();
            let existing: Option<String> = sqlx::query_scalar(PARTNER_BY_NUMBER)
                .bind(brn)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(partner_id) = existing {
                return Err(already_registered(&partner_id)?);
            }
            let now = now_micros();
            let partner_id = PartnerId::new();
            let created = partner.registered(partner_id, now);
            let account = &partner.bank_account;
            let profile = &partner.profile;
            let sealed = self
                .cipher
                .seal(partner_id, account.account_number.expose());
            let inserted = sqlx::query(
                "INSERT INTO partners (partner_id, business_registration_number, legal_name, \
             representative_name, affected_services, bank_code, account_sealed, \
             account_last4, holder_name, account_changed_by, account_change_time, \
             contact_email, create_time, update_time, version) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, '', 0, $10, $11, $11, 1)",
            )
            .bind(partner_id.to_string())
            .bind(brn)
            .bind(profile.legal_name.as_str())
            .bind(profile.representative_name.as_str())
            .bind(services_key(&profile.affected_services))
            .bind(account.bank_code.as_str())
            .bind(sealed.encode())
            .bind(account.account_number.last4())
            .bind(account.holder_name.as_str())
            .bind(profile.contact_email.as_str())
            .bind(now)
            .execute(&mut *tx)
            .await;
            if let Err(sqlx::Error::Database(e)) = &inserted
                && e.is_unique_violation()
            {
                // Another request registered the same number between our check and insert.
                drop(tx);
                let partner_id: String = sqlx::query_scalar(PARTNER_BY_NUMBER)
                    .bind(brn)
                    .fetch_one(&self.pool)
                    .await?;
                return Err(already_registered(&partner_id)?);
            }
            inserted?;
            tx.emit(NewEvent::partner(
                partner_id,
                &created.bank_account,
                false,
                actor,
                now,
            ));
            Ok((tx, created))
        })
        .await
    }

    #[store_span]
    async fn get_partner(&self, partner_id: PartnerId) -> Result<Option<Partner>> {
        let mut conn = self.pool.acquire().await?;
        load_partner(&mut conn, partner_id).await
    }

    #[store_span]
    async fn list_partners(&self, filter: &PartnerFilter, page: &Page) -> Result<Vec<Partner>> {
        let rows: Vec<PartnerRow> = sqlx::query_as(
            "SELECT * FROM partners WHERE partner_id > $1 \
             AND ($2 = '' OR business_registration_number = $2) \
             ORDER BY partner_id LIMIT $3",
        )
        .bind(after_key(page))
        .bind(
            filter
                .business_registration_number
                .as_ref()
                .map(|b| b.as_str().to_owned())
                .unwrap_or_default(),
        )
        .bind(i64::from(page.limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(Partner::try_from).collect()
    }

    #[store_span]
    async fn update_bank_account(
        &self,
        call: Recorded<'_, Partner>,
        update: &AccountUpdate<'_>,
    ) -> Result<Stored<Partner>> {
        let AccountUpdate {
            partner_id,
            account,
            etag,
            actor,
        } = *update;
        self.mutate("update_bank_account", call, move |mut tx| async move {
            sqlx::query(dialect::LOCK_PARTNER)
                .bind(partner_id.to_string())
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(StoreError::NotFound("partner"))?;
            let mut partner = load_partner(&mut tx, partner_id)
                .await?
                .ok_or(StoreError::NotFound("partner"))?;
            if partner.etag() != etag {
                return Err(StoreError::EtagMismatch {
                    current: partner.etag(),
                });
            }
            account
                .check_holder(
                    &partner.profile.legal_name,
                    &partner.profile.representative_name,
                )
                .map_err(|e| StoreError::InvalidField {
                    field: "bank_account.holder_name",
                    description: e.to_string(),
                })?;
            let now = now_micros();
            sqlx::query(
                "UPDATE partners SET bank_code = $1, account_sealed = $2, account_last4 = $3, \
             holder_name = $4, account_changed_by = $5, account_change_time = $6, \
             update_time = $6, version = version + 1 WHERE partner_id = $7",
            )
            .bind(account.bank_code.as_str())
            .bind(
                self.cipher
                    .seal(partner_id, account.account_number.expose())
                    .encode(),
            )
            .bind(account.account_number.last4())
            .bind(account.holder_name.as_str())
            .bind(actor)
            .bind(now)
            .bind(partner_id.to_string())
            .execute(&mut *tx)
            .await?;
            partner.bank_account = AccountOnFile::from(account);
            partner.update_time = now;
            partner.version += 1;
            tx.emit(NewEvent::partner(
                partner_id,
                &partner.bank_account,
                true,
                actor,
                now,
            ));
            Ok((tx, partner))
        })
        .await
    }

    #[store_span(rows = rows.len())]
    async fn register_partners(
        &self,
        rows: &[(Idempotency, NewPartner)],
        render: Render<'_, Partner>,
        audit: BatchAudit<'_, Partner>,
    ) -> Result<Vec<Result<Stored<Partner>>>> {
        let batch = bulk_partners::register_partners(self, rows, render, audit);
        batch_or_row_by_row(batch, self, rows, render, audit, "registering").await
    }
}
