//! Claims filed in batches (see [`super::bulk`]).

use std::collections::HashMap;

use sqlx::FromRow as _;
use uuid::Uuid;

use super::bulk::{
    OneRow, Wave, execute, release_request_ids, replays, select_in, take_request_ids, written_whole,
};
use super::{Db, SqlStore, Tx, dialect};
use crate::domain::{Claim, ClaimId, ClaimOutcome, NewClaim, NewEvent, PartnerId};
use crate::store::batch::{BatchSql, Insert, Locked};
use crate::store::events::events_insert;
use crate::store::intake::{
    Answers, BulkResult, RowKey, CLAIM_APPROVED, Filed, PAYEES_LOCKED, PAYEES_SELECT, Payee, Payees,
    audit_insert, claim_if_new, claims_inserts, finish, new_request_ids_insert, waves,
};
use crate::store::prelude::*;
use crate::store::rows::{unexpected, uuid};
use crate::store::{
    BatchAudit, ClaimSubmission, Idempotency, Micros, PartnerRef, Recorded, Render, Result,
    StoreError, Stored, now_micros,
};

impl OneRow<Claim> for ClaimSubmission {
    fn idem(&self) -> &Idempotency {
        &self.idem
    }

    /// Through [`ClaimStore::submit_claim`], the partner resolved first.
    async fn alone(&self, store: &SqlStore, call: Recorded<'_, Claim>) -> Result<Stored<Claim>> {
        let partner_id = match &self.partner {
            PartnerRef::Id(id) => *id,
            PartnerRef::RegistrationNumber(brn) => {
                let found: Option<String> = sqlx::query_scalar(
                    "SELECT partner_id FROM partners WHERE business_registration_number = $1",
                )
                .bind(brn.as_str())
                .fetch_optional(&store.pool)
                .await?;
                // No such partner: the nil id makes `submit_claim` answer NOT_FOUND, after
                // it has looked at the request id as it always does first.
                match found {
                    Some(id) => uuid("partner_id", &id)?,
                    None => PartnerId::from_uuid(Uuid::nil()),
                }
            }
        };
        let claim = NewClaim {
            partner_id,
            ..self.claim.clone()
        };
        store.submit_claim(call, &claim).await
    }
}

/// A partner found by registration number.
#[derive(sqlx::FromRow)]
struct FoundRow {
    partner_id: String,
    business_registration_number: String,
}

/// Resolves each row's partner to its id: a registration number to the id it is registered
/// under, if it is. An id is taken as given: whether its partner exists is read with its
/// payout details, under its lock ([`partners_of`]), and a missing one answered there.
/// Partners are never deleted and their registration numbers never change, so this holds
/// for the whole batch, read before its transaction (a batch of ids reads nothing).
async fn resolve_partners(
    store: &SqlStore,
    rows: &[ClaimSubmission],
) -> BulkResult<Vec<Option<PartnerId>>> {
    let brns: Vec<String> = rows
        .iter()
        .filter_map(|row| match &row.partner {
            PartnerRef::Id(_) => None,
            PartnerRef::RegistrationNumber(brn) => Some(brn.as_str().to_owned()),
        })
        .collect();
    let mut by_brn = HashMap::new();
    if !brns.is_empty() {
        let head = "SELECT partner_id, business_registration_number FROM partners \
                    WHERE business_registration_number";
        let mut conn = store.pool.acquire().await?;
        for row in select_in(&mut conn, head, brns, "").await? {
            let found = FoundRow::from_row(&row)?;
            let id = uuid("partner_id", &found.partner_id)?;
            by_brn.insert(found.business_registration_number, id);
        }
    }
    Ok(rows
        .iter()
        .map(|row| match &row.partner {
            PartnerRef::Id(id) => Some(*id),
            PartnerRef::RegistrationNumber(brn) => by_brn.get(brn.as_str()).copied(),
        })
        .collect())
}

/// Writes `rows` as one batch; `BulkError::Race` when a concurrent writer got in the way (see
/// [`super::bulk::batch_or_row_by_row`]).
pub(super) async fn submit_claims(
    store: &SqlStore,
    rows: &[ClaimSubmission],
    render: Render<'_, Claim>,
    audit: BatchAudit<'_, Claim>,
) -> BulkResult<Vec<Result<Stored<Claim>>>> {
    let mut answers: Answers<Claim> = rows.iter().map(|_| None).collect();
    let now = now_micros();
    let partners = resolve_partners(store, rows).await?;
    let waves = waves(&keys_of(rows, &partners));
    if waves.len() == 1
        && let Some(answers) = submit_whole(store, rows, &partners, render, audit, now).await?
    {
        return Ok(answers);
    }
    let mut tx = store.begin_write().await?;
    // The claim each row files if it is new, made before it is written so that its
    // request id is taken with its response at once.
    let mut candidates = candidates_of(rows, &partners, now);
    // A wave's rows are inserted with the next statement that may: before the next
    // wave looks at the partners' claims, or with the audit entries after the last.
    let mut pending: Vec<Insert<'static>> = Vec::new();
    for wave in waves {
        if !pending.is_empty() {
            let inserts = std::mem::take(&mut pending);
            execute(&mut tx, <Db as BatchSql>::insert_all(inserts)).await?;
        }
        let wave = Wave {
            rows,
            wave: &wave,
            render,
            now,
        };
        pending = wave
            .file(&mut tx, &partners, &mut candidates, &mut answers)
            .await?;
    }
    let answers = finish(answers);
    let entries = audit.events(&answers);
    let mut inserts: Vec<Insert<'_>> = pending;
    inserts.push(audit_insert(&entries));
    execute(&mut tx, <Db as BatchSql>::insert_all(inserts)).await?;
    tx.commit().await?;
    Ok(answers)
}

/// What no two rows of a wave may share: their request, and their partner once resolved.
fn keys_of<'a>(
    rows: &'a [ClaimSubmission],
    partners: &[Option<PartnerId>],
) -> Vec<Vec<RowKey<'a>>> {
    rows.iter()
        .zip(partners)
        .map(|(row, partner)| {
            let mut keys = vec![RowKey::request(&row.idem)];
            keys.extend(partner.map(RowKey::Partner));
            keys
        })
        .collect()
}

/// The claim each row files if it is new (`None`: its partner is not registered).
fn candidates_of(
    rows: &[ClaimSubmission],
    partners: &[Option<PartnerId>],
    now: Micros,
) -> Vec<Option<Claim>> {
    rows.iter()
        .zip(partners)
        .map(|(row, partner)| partner.map(|p| claim_if_new(row, p, now)))
        .collect()
}

/// Writes a batch whose rows share no key in one statement, as if every row were new (its
/// request id unused, its partner registered and without a claim), which is the common
/// case: one round trip instead of a transaction of six. `partners` are the rows' partners,
/// resolved. The statement locks the partners, as the step-by-step transaction does, and
/// copies their payout details as it holds the locks. `None`, with nothing stored, if a row
/// was not new (or the database cannot): the batch must then be written step by step, which
/// answers such rows.
async fn submit_whole(
    store: &SqlStore,
    rows: &[ClaimSubmission],
    partners: &[Option<PartnerId>],
    render: Render<'_, Claim>,
    audit: BatchAudit<'_, Claim>,
    now: Micros,
) -> BulkResult<Option<Vec<Result<Stored<Claim>>>>> {
    if !<Db as BatchSql>::WHOLE {
        return Ok(None);
    }
    let Some(partner_ids) = partners.iter().copied().collect::<Option<Vec<PartnerId>>>() else {
        return Ok(None);
    };
    let filed: Vec<Filed> = candidates_of(rows, partners, now)
        .into_iter()
        .enumerate()
        .map(|(row, claim)| claim.map(|claim| Filed { row, claim }))
        .collect::<Option<_>>()
        .ok_or_else(|| unexpected("a resolved partner has no claim"))?;
    let idems = rows
        .iter()
        .zip(&filed)
        .map(|(row, f)| (&row.idem, Some(render(&f.claim))))
        .collect();
    let answers: Vec<Result<Stored<Claim>>> = filed
        .iter()
        .map(|f| Ok(Stored::Fresh(f.claim.clone())))
        .collect();
    let events: Vec<NewEvent> = filed
        .iter()
        .flat_map(|f| ClaimOutcome::of(&f.claim).filed(&f.claim.submitted_by, CLAIM_APPROVED, now))
        .collect();
    let mut inserts = vec![new_request_ids_insert(idems, now)];
    inserts.extend(claims_inserts(rows, &filed, Payees::Locked, now)?);
    let entries = audit.events(&answers);
    inserts.push(audit_insert(&entries));
    let mut locked_ids: Vec<String> = partner_ids.iter().map(PartnerId::to_string).collect();
    locked_ids.sort();
    let payees = Locked {
        name: PAYEES_LOCKED,
        head: PAYEES_SELECT,
        values: locked_ids,
        tail: dialect::IN_PARTNER_ORDER_LOCKED,
    };
    let Some(statement) =
        <Db as BatchSql>::insert_whole_locking(Some(payees), inserts, events_insert(&events))
    else {
        return Ok(None);
    };
    Ok(written_whole(store, statement).await?.then_some(answers))
}

/// A partner's payout details, by partner id.
#[derive(sqlx::FromRow)]
struct PayeeRow {
    partner_id: String,
    #[sqlx(flatten)]
    payee: Payee,
}

/// A claim filed earlier, by partner id.
#[derive(sqlx::FromRow)]
struct FiledRow {
    partner_id: String,
    claim_id: String,
}

/// Rows of a batch that share no key (request, partner), written together.
impl Wave<'_, ClaimSubmission, Claim> {
    /// Takes the wave's request ids, answers its rows that replay or are refused, and
    /// returns the inserts of its new claims (answered as stored). `partners` are every
    /// row's partner, resolved.
    async fn file(
        &self,
        tx: &mut Tx,
        partners: &[Option<PartnerId>],
        candidates: &mut [Option<Claim>],
        answers: &mut Answers<Claim>,
    ) -> BulkResult<Vec<Insert<'static>>> {
        let (rows, now) = (self.rows, self.now);
        let idems = self.idems(|i| candidates[i].as_ref());
        let taken = take_request_ids(tx, idems, now).await?;
        let (fresh, used) = self.split(&taken);
        replays(tx, &used, answers).await?;

        let mut released = Vec::new();
        let mut filing = Vec::new();
        for i in fresh {
            if partners[i].is_some() {
                filing.push(i);
            } else {
                answers[i] = Some(Err(StoreError::NotFound("partner")));
                released.push(&rows[i].idem);
            }
        }
        let (payees, filed_before) = partners_of(tx, partners, &filing).await?;
        let mut filed: Vec<Filed> = Vec::new();
        for i in filing {
            let row = &rows[i];
            let partner_id = partners[i].ok_or_else(|| unexpected("unresolved partner"))?;
            let refused = if !payees.contains_key(&partner_id) {
                Some(StoreError::NotFound("partner"))
            } else {
                filed_before
                    .get(&partner_id)
                    .map(|&claim_id| StoreError::ClaimAlreadyFiled { claim_id })
            };
            if let Some(refused) = refused {
                answers[i] = Some(Err(refused));
                released.push(&row.idem);
                continue;
            }
            let claim = candidates[i]
                .take()
                .ok_or_else(|| unexpected("a row was written twice"))?;
            filed.push(Filed { row: i, claim });
        }
        release_request_ids(tx, &released).await?;
        let inserts = claims_inserts(rows, &filed, Payees::Read(&payees), now)?;
        for f in &filed {
            let events =
                ClaimOutcome::of(&f.claim).filed(&f.claim.submitted_by, CLAIM_APPROVED, now);
            events.into_iter().for_each(|e| tx.emit(e));
        }
        for f in filed {
            answers[f.row] = Some(Ok(Stored::Fresh(f.claim)));
        }
        Ok(inserts)
    }
}

/// The payout details of the `partners` of rows `filing`, locked (in id order, as every
/// batch does) so that concurrent claims for the same partner wait for this one, as in
/// `submit_claim`; and the claims they filed before.
async fn partners_of(
    tx: &mut Tx,
    partners: &[Option<PartnerId>],
    filing: &[usize],
) -> BulkResult<(HashMap<PartnerId, Payee>, HashMap<PartnerId, ClaimId>)> {
    let mut partner_ids: Vec<String> = filing
        .iter()
        .filter_map(|&i| partners[i].map(|p| p.to_string()))
        .collect();
    partner_ids.sort();
    let mut payees = HashMap::new();
    let mut filed_before = HashMap::new();
    let head = "SELECT partner_id, bank_code, account_sealed, account_last4, holder_name \
                    FROM partners WHERE partner_id";
    let locked = dialect::IN_PARTNER_ORDER_LOCKED;
    for row in select_in(tx, head, partner_ids.clone(), locked).await? {
        let PayeeRow { partner_id, payee } = PayeeRow::from_row(&row)?;
        payees.insert(uuid("partner_id", &partner_id)?, payee);
    }
    let head = "SELECT partner_id, claim_id FROM claims WHERE partner_id";
    for row in select_in(tx, head, partner_ids, "").await? {
        let FiledRow {
            partner_id,
            claim_id,
        } = FiledRow::from_row(&row)?;
        filed_before.insert(
            uuid("partner_id", &partner_id)?,
            uuid("claim_id", &claim_id)?,
        );
    }
    Ok((payees, filed_before))
}
