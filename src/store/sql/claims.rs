//! The claims in SQL.

use async_trait::async_trait;
use payouts_macros::store_span;

use super::bulk::batch_or_row_by_row;
use super::disbursements::create_disbursement;
use super::{Conn, DB_SYSTEM, Db, SqlStore, Tx, after_key, bulk_claims, dialect};
use crate::domain::{
    Claim, ClaimId, ClaimOutcome, ClaimStatus, DisbursementId, Evidence, NewClaim, NewEvent,
    Reviewed, review,
};
use crate::store::rows::{ClaimRow, EvidenceRow, unexpected, uuid};
use crate::store::{
    Attachment, BatchAudit, ClaimFilter, ClaimStore, ClaimSubmission, Micros, Page, Recorded,
    Render, Result, Review, StoreError, Stored, now_micros,
};

const EVIDENCE_OF_CLAIM: &str = "SELECT * FROM evidence WHERE claim_id = $1 ORDER BY seq";

async fn load_claim(conn: &mut Conn, claim_id: ClaimId) -> Result<Option<Claim>> {
    let row: Option<ClaimRow> = sqlx::query_as(
        "SELECT c.*, d.disbursement_id FROM claims c \
         LEFT JOIN disbursements d ON d.claim_id = c.claim_id WHERE c.claim_id = $1",
    )
    .bind(claim_id.to_string())
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let evidence = load_evidence(conn, &row).await?;
    row.with_evidence(evidence).map(Some)
}

async fn load_evidence(conn: &mut Conn, claim: &ClaimRow) -> Result<Vec<EvidenceRow>> {
    Ok(sqlx::query_as(EVIDENCE_OF_CLAIM)
        .bind(&claim.claim_id)
        .fetch_all(&mut *conn)
        .await?)
}

/// The evidence of every claim of a page, read in one statement, by claim id.
async fn evidence_of_page(
    conn: &mut Conn,
    claims: &[ClaimRow],
) -> Result<std::collections::HashMap<String, Vec<EvidenceRow>>> {
    let mut by_claim = std::collections::HashMap::<String, Vec<EvidenceRow>>::new();
    if claims.is_empty() {
        return Ok(by_claim);
    }
    let mut qb = sqlx::QueryBuilder::<Db>::new("SELECT * FROM evidence WHERE claim_id IN (");
    let mut ids = qb.separated(", ");
    for claim in claims {
        ids.push_bind(claim.claim_id.as_str());
    }
    qb.push(") ORDER BY claim_id, seq");
    // One statement per page size: not kept prepared.
    let rows: Vec<EvidenceRow> = qb
        .build_query_as()
        .persistent(false)
        .fetch_all(&mut *conn)
        .await?;
    for row in rows {
        by_claim.entry(row.claim_id.clone()).or_default().push(row);
    }
    Ok(by_claim)
}

/// The claim just written in `tx`, as it now stands.
async fn reload_claim(tx: &mut Tx, claim_id: ClaimId) -> Result<Claim> {
    load_claim(tx, claim_id)
        .await?
        .ok_or(StoreError::NotFound("claim"))
}

/// Locks the claim so that concurrent changes to it see each other.
async fn lock_claim(tx: &mut Tx, claim_id: ClaimId) -> Result<()> {
    sqlx::query(dialect::LOCK_CLAIM)
        .bind(claim_id.to_string())
        .fetch_optional(&mut **tx)
        .await?
        .ok_or(StoreError::NotFound("claim"))?;
    Ok(())
}

async fn insert_evidence(
    tx: &mut Tx,
    claim_id: ClaimId,
    evidence: &Evidence,
    actor: &str,
    now: Micros,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO evidence (claim_id, seq, kind, uri, sha256, attach_time, attached_by) \
         VALUES ($1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM evidence WHERE claim_id = $1), \
         $2, $3, $4, $5, $6)",
    )
    .bind(claim_id.to_string())
    .bind(evidence.kind.key())
    .bind(&evidence.uri)
    .bind(&evidence.sha256)
    .bind(now)
    .bind(actor)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Files `claim` in `tx` (for a partner it has locked, with no claim yet).
async fn insert_claim(tx: &mut Tx, claim: &NewClaim) -> Result<ClaimId> {
    let now = now_micros();
    let claim_id = ClaimId::new();
    let d = &claim.decision;
    let json = |value: serde_json::Result<String>| value.map_err(anyhow::Error::from);
    sqlx::query(
        "INSERT INTO claims (claim_id, partner_id, status, tier, reported_loss_krw, \
         recognized_loss_krw, compensation_krw, policy_version, items, decision, \
         submitted_by, create_time, update_time) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12)",
    )
    .bind(claim_id.to_string())
    .bind(claim.partner_id.to_string())
    .bind(d.status.key())
    .bind(d.tier.key())
    .bind(d.reported_loss_krw)
    .bind(d.recognized_loss_krw)
    .bind(d.compensation_krw.won())
    .bind(&d.policy_version)
    .bind(json(serde_json::to_string(&claim.items))?)
    .bind(json(serde_json::to_string(d))?)
    .bind(&claim.submitted_by)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    for evidence in &claim.evidence {
        insert_evidence(tx, claim_id, evidence, &claim.submitted_by, now).await?;
    }
    let outcome = ClaimOutcome {
        claim_id,
        partner_id: claim.partner_id,
        status: d.status,
        decision: d,
        compensation_krw: d.compensation_krw,
        disbursement_id: (d.status == ClaimStatus::Approved).then(DisbursementId::new),
    };
    tx.emit(NewEvent::claim(&outcome, None, &claim.submitted_by, now));
    if let Some(payout) = outcome.payout() {
        let trace_context = claim.trace_context.as_deref();
        create_disbursement(tx, &payout, &claim.submitted_by, trace_context, now).await?;
    }
    Ok(claim_id)
}

#[async_trait]
impl ClaimStore for SqlStore {
    #[store_span]
    async fn submit_claim(
        &self,
        call: Recorded<'_, Claim>,
        claim: &NewClaim,
    ) -> Result<Stored<Claim>> {
        self.mutate("submit_claim", call, move |mut tx| async move {
            sqlx::query(dialect::LOCK_PARTNER)
                .bind(claim.partner_id.to_string())
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(StoreError::NotFound("partner"))?;
            let existing: Option<String> =
                sqlx::query_scalar("SELECT claim_id FROM claims WHERE partner_id = $1")
                    .bind(claim.partner_id.to_string())
                    .fetch_optional(&mut *tx)
                    .await?;
            if let Some(claim_id) = existing {
                return Err(StoreError::ClaimAlreadyFiled {
                    claim_id: uuid("claim_id", &claim_id)?,
                });
            }
            let claim_id = insert_claim(&mut tx, claim).await?;
            let stored = load_claim(&mut tx, claim_id)
                .await?
                .ok_or_else(|| unexpected("claim vanished"))?;
            Ok((tx, stored))
        })
        .await
    }

    #[store_span]
    async fn attach_evidence(
        &self,
        call: Recorded<'_, Claim>,
        attachment: &Attachment<'_>,
    ) -> Result<Stored<Claim>> {
        let Attachment {
            claim_id,
            evidence,
            attached_by: actor,
        } = *attachment;
        self.mutate("attach_evidence", call, move |mut tx| async move {
            lock_claim(&mut tx, claim_id).await?;
            let now = now_micros();
            insert_evidence(&mut tx, claim_id, evidence, actor, now).await?;
            sqlx::query("UPDATE claims SET update_time = $1 WHERE claim_id = $2")
                .bind(now)
                .bind(claim_id.to_string())
                .execute(&mut *tx)
                .await?;
            let stored = reload_claim(&mut tx, claim_id).await?;
            Ok((tx, stored))
        })
        .await
    }

    #[store_span]
    async fn review_claim(
        &self,
        call: Recorded<'_, Claim>,
        review_of: &Review<'_>,
    ) -> Result<Stored<Claim>> {
        let Review {
            claim_id,
            decision,
            reason,
            reviewer,
            trace_context,
        } = *review_of;
        self.mutate("review_claim", call, move |mut tx| async move {
            lock_claim(&mut tx, claim_id).await?;
            let claim = reload_claim(&mut tx, claim_id).await?;
            let Reviewed {
                status,
                compensation_krw,
            } = review(claim.under_review(), reviewer, decision)?;
            let now = now_micros();
            sqlx::query(
                "UPDATE claims SET status = $1, compensation_krw = $2, reviewed_by = $3, \
             review_reason = $4, update_time = $5 WHERE claim_id = $6",
            )
            .bind(status.key())
            .bind(compensation_krw.won())
            .bind(reviewer)
            .bind(reason)
            .bind(now)
            .bind(claim_id.to_string())
            .execute(&mut *tx)
            .await?;
            let outcome = ClaimOutcome {
                claim_id,
                partner_id: claim.partner_id,
                status,
                decision: &claim.decision,
                compensation_krw,
                disbursement_id: (status == ClaimStatus::Approved).then(DisbursementId::new),
            };
            tx.emit(NewEvent::claim(&outcome, Some(reason), reviewer, now));
            if let Some(payout) = outcome.payout() {
                create_disbursement(&mut tx, &payout, reviewer, trace_context, now).await?;
            }
            let stored = reload_claim(&mut tx, claim_id).await?;
            Ok((tx, stored))
        })
        .await
    }

    #[store_span]
    async fn get_claim(&self, claim_id: ClaimId) -> Result<Option<Claim>> {
        let mut conn = self.pool.acquire().await?;
        load_claim(&mut conn, claim_id).await
    }

    #[store_span]
    async fn list_claims(&self, filter: &ClaimFilter, page: &Page) -> Result<Vec<Claim>> {
        let mut conn = self.pool.acquire().await?;
        let rows: Vec<ClaimRow> = sqlx::query_as(
            "SELECT c.*, d.disbursement_id FROM claims c \
             LEFT JOIN disbursements d ON d.claim_id = c.claim_id \
             WHERE c.claim_id > $1 AND ($2 = '' OR c.status = $2) \
             AND ($3 = '' OR c.tier = $3) AND ($4 = '' OR c.partner_id = $4) \
             ORDER BY c.claim_id LIMIT $5",
        )
        .bind(after_key(page))
        .bind(filter.status.map(|s| s.key()).unwrap_or_default())
        .bind(filter.tier.map(|t| t.key()).unwrap_or_default())
        .bind(filter.partner_id.map(|p| p.to_string()).unwrap_or_default())
        .bind(i64::from(page.limit))
        .fetch_all(&mut *conn)
        .await?;
        let mut evidence = evidence_of_page(&mut conn, &rows).await?;
        rows.into_iter()
            .map(|row| {
                let attached = evidence.remove(&row.claim_id).unwrap_or_default();
                row.with_evidence(attached)
            })
            .collect()
    }

    #[store_span(rows = rows.len())]
    async fn submit_claims(
        &self,
        rows: &[ClaimSubmission],
        render: Render<'_, Claim>,
        audit: BatchAudit<'_, Claim>,
    ) -> Result<Vec<Result<Stored<Claim>>>> {
        let batch = bulk_claims::submit_claims(self, rows, render, audit);
        batch_or_row_by_row(batch, self, rows, render, audit, "submitting").await
    }
}
