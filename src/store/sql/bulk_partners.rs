//! Partners registered in batches (see [`super::bulk`]).

use uuid::Uuid;

use super::bulk::{
    OneRow, Wave, execute, release_request_ids, replays, take_request_ids_and_look_up,
    written_whole,
};
use super::{Db, SqlStore, Tx};
use crate::domain::{NewEvent, NewPartner, Partner, PartnerId};
use crate::store::batch::{BatchSql, Insert, Lookup};
use crate::store::events::events_insert;
use crate::store::intake::{
    Answers, BulkResult, RowKey, audit_insert, finish, new_request_ids_insert, partners_insert,
    waves,
};
use crate::store::prelude::*;
use crate::store::rows::unexpected;
use crate::store::{
    BatchAudit, Idempotency, Micros, Recorded, Render, Result, StoreError, Stored, now_micros,
};

/// A row as it will be stored if it is new: the partner and its sealed account number.
type Candidate = Option<(Partner, String)>;

impl OneRow<Partner> for (Idempotency, NewPartner) {
    fn idem(&self) -> &Idempotency {
        &self.0
    }

    /// Through [`PartnerStore::register_partner`].
    async fn alone(
        &self,
        store: &SqlStore,
        call: Recorded<'_, Partner>,
    ) -> Result<Stored<Partner>> {
        store.register_partner(call, &self.1).await
    }
}

/// Writes `rows` as one batch; `BulkError::Race` when a concurrent writer got in the way (see
/// [`super::bulk::batch_or_row_by_row`]).
pub(super) async fn register_partners(
    store: &SqlStore,
    rows: &[(Idempotency, NewPartner)],
    render: Render<'_, Partner>,
    audit: BatchAudit<'_, Partner>,
) -> BulkResult<Vec<Result<Stored<Partner>>>> {
    let mut answers: Answers<Partner> = rows.iter().map(|_| None).collect();
    let keys: Vec<[RowKey<'_>; 2]> = rows
        .iter()
        .map(|(idem, p)| {
            [
                RowKey::request(idem),
                RowKey::Registration(p.profile.business_registration_number.as_str()),
            ]
        })
        .collect();
    // Each row as it will be stored if it is new, and the response it will give: made
    // before the transaction, so the request id is taken with its response at once.
    let now = now_micros();
    let mut candidates: Vec<Candidate> = rows
        .iter()
        .map(|(_, partner)| {
            let partner_id = PartnerId::new();
            let sealed = store
                .cipher
                .seal(partner_id, partner.bank_account.account_number.expose())
                .encode();
            Some((partner.registered(partner_id, now), sealed))
        })
        .collect();
    let waves = waves(&keys);
    if waves.len() == 1
        && let Some(answers) = register_whole(store, rows, &mut candidates, render, audit, now).await?
    {
        return Ok(answers);
    }
    let mut tx = store.begin_write().await?;
    // A wave's partners are inserted with the next statement that may: before the next
    // wave looks up registration numbers, or with the audit entries after the last.
    let mut pending: Option<Insert<'static>> = None;
    for wave in waves {
        if let Some(insert) = pending.take() {
            execute(&mut tx, <Db as BatchSql>::insert_all(vec![insert])).await?;
        }
        let wave = Wave {
            rows,
            wave: &wave,
            render,
            now,
        };
        pending = Some(
            wave.register(&mut tx, &mut candidates, &mut answers)
                .await?,
        );
    }
    let answers = finish(answers);
    let entries = audit.events(&answers);
    let mut inserts: Vec<Insert<'_>> = pending.into_iter().collect();
    inserts.push(audit_insert(&entries));
    execute(&mut tx, <Db as BatchSql>::insert_all(inserts)).await?;
    tx.commit().await?;
    Ok(answers)
}

/// Rows of a batch that share no key (request, registration number), written together.
impl Wave<'_, (Idempotency, NewPartner), Partner> {
    /// Takes the wave's request ids, answers its rows that replay or whose number is taken,
    /// and returns the insert of its new partners (answered as stored).
    async fn register(
        &self,
        tx: &mut Tx,
        candidates: &mut [Candidate],
        answers: &mut Answers<Partner>,
    ) -> BulkResult<Insert<'static>> {
        let (rows, wave, now) = (self.rows, self.wave, self.now);
        let idems = self.idems(|i| candidates[i].as_ref().map(|(p, _)| p));
        let lookup = Lookup {
            table: "partners",
            key: "business_registration_number",
            value: "partner_id",
            values: wave
                .iter()
                .map(|&i| {
                    rows[i]
                        .1
                        .profile
                        .business_registration_number
                        .as_str()
                        .to_owned()
                })
                .collect(),
        };
        let (taken, registered) = take_request_ids_and_look_up(tx, idems, now, lookup).await?;
        let (fresh, used) = self.split(&taken);
        replays(tx, &used, answers).await?;

        let mut released = Vec::new();
        let mut created: Vec<(usize, Partner, String)> = Vec::new();
        for i in fresh {
            let (idem, partner) = &rows[i];
            let brn = partner.profile.business_registration_number.as_str();
            if let Some(partner_id) = registered.get(brn) {
                let partner_id = Uuid::parse_str(partner_id)
                    .map(PartnerId::from_uuid)
                    .map_err(|_| unexpected("a partner id is not a UUID"))?;
                answers[i] = Some(Err(StoreError::PartnerAlreadyRegistered { partner_id }));
                released.push(idem);
                continue;
            }
            let (partner, sealed) = candidates[i]
                .take()
                .ok_or_else(|| unexpected("a row was written twice"))?;
            created.push((i, partner, sealed));
        }
        release_request_ids(tx, &released).await?;
        let insert = partners_insert(
            rows,
            &created
                .iter()
                .map(|(i, partner, sealed)| (*i, partner, sealed.as_str()))
                .collect::<Vec<_>>(),
            now,
        );
        for (i, partner, _) in &created {
            tx.emit(registered_event(&rows[*i].0, partner, now));
        }
        // It is written with the next statement, after these partners are answered.
        let insert = insert.into_owned();
        for (i, partner, _) in created {
            answers[i] = Some(Ok(Stored::Fresh(partner)));
        }
        Ok(insert)
    }
}

/// Writes a batch whose rows share no key in one statement, as if every row were new
/// (its request id unused, its registration number not yet registered), which is the
/// common case: one round trip instead of a transaction of four. `None`, with nothing
/// stored and `candidates` as they were, if a row was not new (or the database cannot): the
/// batch must then be written step by step, which answers such rows.
///
/// Each candidate partner moves into its answer for the statement and, if the statement
/// is not written, back: a registration's partner is not copied to be answered.
async fn register_whole(
    store: &SqlStore,
    rows: &[(Idempotency, NewPartner)],
    candidates: &mut [Candidate],
    render: Render<'_, Partner>,
    audit: BatchAudit<'_, Partner>,
    now: Micros,
) -> BulkResult<Option<Vec<Result<Stored<Partner>>>>> {
    if !<Db as BatchSql>::WHOLE || candidates.iter().any(Option::is_none) {
        return Ok(None);
    }
    let (mut answers, sealed): (Vec<Result<Stored<Partner>>>, Vec<String>) = candidates
        .iter_mut()
        .filter_map(Option::take)
        .map(|(partner, sealed)| (Ok(Stored::Fresh(partner)), sealed))
        .unzip();
    let written = write_whole(store, rows, &answers, &sealed, render, audit, now).await?;
    if written {
        return Ok(Some(answers));
    }
    for ((candidate, answer), sealed) in candidates.iter_mut().zip(answers.drain(..)).zip(sealed) {
        if let Ok(Stored::Fresh(partner)) = answer {
            *candidate = Some((partner, sealed));
        }
    }
    Ok(None)
}

/// [`register_whole`]'s statement, for `answers` (each a fresh partner, row by row) with
/// their sealed account numbers: whether it was written.
async fn write_whole(
    store: &SqlStore,
    rows: &[(Idempotency, NewPartner)],
    answers: &[Result<Stored<Partner>>],
    sealed: &[String],
    render: Render<'_, Partner>,
    audit: BatchAudit<'_, Partner>,
    now: Micros,
) -> BulkResult<bool> {
    let Some(created) = answers
        .iter()
        .zip(sealed)
        .enumerate()
        .map(|(i, (answer, sealed))| match answer {
            Ok(Stored::Fresh(partner)) => Some((i, partner, sealed.as_str())),
            _ => None,
        })
        .collect::<Option<Vec<(usize, &Partner, &str)>>>()
    else {
        return Err(unexpected("a row to register whole is not a fresh partner").into());
    };
    let idems = rows
        .iter()
        .zip(&created)
        .map(|((idem, _), (_, partner, _))| (idem, Some(render(partner))))
        .collect();
    // A number registered before fails the statement on its key (`NOT_NEW`).
    let partners = partners_insert(rows, &created, now);
    let events: Vec<NewEvent> = created
        .iter()
        .map(|(i, partner, _)| registered_event(&rows[*i].0, partner, now))
        .collect();
    let Some(statement) = <Db as BatchSql>::insert_whole(
        vec![
            new_request_ids_insert(idems, now),
            partners,
            audit_insert(&audit.events(answers)),
        ],
        events_insert(&events),
    ) else {
        return Ok(false);
    };
    written_whole(store, statement).await
}

/// The feed event of `partner`, registered by the caller of `idem`.
fn registered_event(idem: &Idempotency, partner: &Partner, now: Micros) -> NewEvent {
    NewEvent::partner(
        partner.partner_id,
        &partner.bank_account,
        false,
        &idem.principal,
        now,
    )
}
