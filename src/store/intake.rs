//! Bulk intake planned without the database: the waves a batch is written in, and the
//! multi-row inserts of its rows (partners; claims with their evidence, disbursements,
//! history and outbox rows; request ids; audit entries), in the form [`crate::store::batch`]
//! turns into each database's statements.
//!
//! Each row must get exactly what the one-row method would have answered had the rows come
//! one at a time, in order: rows that share a request id, registration number or partner with
//! an earlier row of the batch wait for a later *wave* of the same transaction, so they see
//! what that row did.

use std::borrow::Cow;
use std::collections::HashMap;

use super::batch::{Column, Insert};
use super::rows::{services_key, unexpected};
use super::{AuditEvent, ClaimSubmission, Idempotency, Micros, Result, StoreError, Stored};
use crate::domain::ids::uuid_text;
use crate::domain::{
    AttachedEvidence, BankAccount, Claim, ClaimId, ClaimStatus, DisbursementId, DisbursementStatus,
    NewPartner, Partner, PartnerId, PartnerProfile,
};

/// Why a batch could not be written as a batch.
pub(crate) enum BulkError {
    /// A concurrent writer got in between (or PostgreSQL broke a deadlock with us):
    /// redo the batch row by row.
    Race,
    Store(StoreError),
}

impl From<sqlx::Error> for BulkError {
    fn from(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &e {
            // 40P01: deadlock detected; 40001: serialization failure.
            if db.is_unique_violation() || matches!(db.code().as_deref(), Some("40P01" | "40001")) {
                return Self::Race;
            }
        }
        Self::Store(e.into())
    }
}

impl From<StoreError> for BulkError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Contention(_) => Self::Race,
            e => Self::Store(e),
        }
    }
}

pub(crate) type BulkResult<T> = std::result::Result<T, BulkError>;

/// What the batch answered each row; `None` until its wave decides it.
pub(crate) type Answers<T> = Vec<Option<Result<Stored<T>>>>;

pub(crate) fn finish<T>(answers: Answers<T>) -> Vec<Result<Stored<T>>> {
    answers
        .into_iter()
        .map(|a| a.unwrap_or_else(|| Err(unexpected("a row of the batch was not answered"))))
        .collect()
}

/// What rows of a batch may have in common, so that a later row must see what an earlier one
/// wrote: compared as they are, with nothing formatted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum RowKey<'a> {
    /// A request: its id and the principal that sent it (the idempotency record's key).
    Request(uuid::Uuid, &'a str),
    /// A business registration number.
    Registration(&'a str),
    /// A registered partner.
    Partner(PartnerId),
}

impl<'a> RowKey<'a> {
    pub(crate) fn request(idem: &'a Idempotency) -> Self {
        Self::Request(idem.request_id, &idem.principal)
    }
}

/// Splits rows into waves. A row goes one wave after the last earlier row that shares
/// any of its keys, so the rows of one wave never interfere, and a later wave sees
/// what the earlier ones wrote, in row order.
pub(crate) fn waves<K: std::hash::Hash + Eq, R: AsRef<[K]>>(keys: &[R]) -> Vec<Vec<usize>> {
    // A batch's keys are few and short-lived, so a fast hasher (seeded per process) serves.
    let mut last_wave: HashMap<&K, usize, foldhash::fast::RandomState> =
        HashMap::with_capacity_and_hasher(2 * keys.len(), Default::default());
    let mut waves: Vec<Vec<usize>> = Vec::new();
    for (row, row_keys) in keys.iter().enumerate() {
        let row_keys = row_keys.as_ref();
        let wave = row_keys
            .iter()
            .filter_map(|k| last_wave.get(k).map(|w| w + 1))
            .max()
            .unwrap_or(0);
        for k in row_keys {
            last_wave.insert(k, wave);
        }
        if waves.len() == wave {
            waves.push(Vec::new());
        }
        waves[wave].push(row);
    }
    waves
}

/// A text column of `f` of each item: borrowed where `f` gives a `&str` that outlives the
/// batch, owned where it makes a `String`.
pub(crate) fn text_column<'a, T, S: Into<Cow<'a, str>>>(
    items: impl IntoIterator<Item = T>,
    f: impl Fn(T) -> S,
) -> Column<'a> {
    Column::Text(items.into_iter().map(|item| f(item).into()).collect())
}

/// The insert of audit log entries.
pub(crate) fn audit_insert(events: &[AuditEvent]) -> Insert<'_> {
    Insert {
        head: "INSERT INTO audit_events (audit_event_id, time, principal, method, \
               resource_id, request_id, outcome_code, peer_address, count, replayed)",
        columns: vec![
            text_column(events, |e| uuid_text(e.audit_event_id)),
            Column::BigInt(events.iter().map(|e| e.time).collect()),
            text_column(events, |e| e.principal.as_str()),
            text_column(events, |e| e.method.as_str()),
            text_column(events, |e| e.resource_id.as_str()),
            text_column(events, |e| e.request_id.as_str()),
            text_column(events, |e| e.outcome_code.as_str()),
            text_column(events, |e| e.peer_address.as_str()),
            Column::BigInt(events.iter().map(|e| e.count).collect()),
            Column::Bool(events.iter().map(|e| e.replayed).collect()),
        ],
        tail: "",
    }
}

/// A row's request as the batch statements name it: its request id and its principal
/// (the idempotency record's key), as [`REQUEST_KEY`] returns it.
pub(crate) fn request_key(idem: &Idempotency) -> String {
    format!("{}/{}", idem.request_id, idem.principal)
}

/// [`request_key`] in SQL, on the idempotency table. A request id (a UUID) has no `/`,
/// so the key is unambiguous whatever the principal's name.
pub(crate) const REQUEST_KEY: &str = "request_id || '/' || principal";

/// The insert that takes request ids, each with the response its row will give if it
/// is written; in a fixed order (by principal, then request id), so two batches
/// sharing requests cannot deadlock on them.
pub(crate) fn request_ids_insert<'a>(
    idems: Vec<(&'a Idempotency, Option<Vec<u8>>)>,
    now: Micros,
) -> Insert<'a> {
    let mut sorted = idems;
    sorted
        .sort_by(|(a, _), (b, _)| (&a.principal, a.request_id).cmp(&(&b.principal, b.request_id)));
    let n = sorted.len();
    let (idems, responses): (Vec<&Idempotency>, Vec<Option<Vec<u8>>>) = sorted.into_iter().unzip();
    Insert {
        head: "INSERT INTO idempotency \
               (request_id, principal, method, fingerprint, response, create_time)",
        columns: vec![
            text_column(&idems, |i| uuid_text(i.request_id)),
            text_column(idems.iter().copied(), |i| i.principal.as_str()),
            text_column(idems.iter().copied(), |i| i.method),
            text_column(idems.iter().copied(), |i| i.fingerprint.as_str()),
            Column::NullableBytes(responses),
            Column::BigInt(vec![now; n]),
        ],
        tail: " ON CONFLICT (request_id, principal) DO NOTHING",
    }
}

/// [`request_ids_insert`] for a statement that expects every request to be new
/// ([`crate::store::batch::BatchSql::insert_whole`]): a plain insert, so that a request id
/// used before fails the statement on its key ([`crate::store::batch::NOT_NEW`]) instead
/// of being skipped. PostgreSQL inserts such rows without the speculative insertion that
/// `ON CONFLICT` costs each row.
pub(crate) fn new_request_ids_insert<'a>(
    idems: Vec<(&'a Idempotency, Option<Vec<u8>>)>,
    now: Micros,
) -> Insert<'a> {
    Insert {
        tail: "",
        ..request_ids_insert(idems, now)
    }
}

/// The insert of a wave's new partners: the same columns and values as
/// `register_partner`.
pub(crate) fn partners_insert<'a>(
    rows: &'a [(Idempotency, NewPartner)],
    created: &[(usize, &'a Partner, &'a str)],
    now: Micros,
) -> Insert<'a> {
    let n = created.len();
    let profiles: Vec<&PartnerProfile> = created.iter().map(|(_, p, _)| &p.profile).collect();
    let accounts: Vec<&BankAccount> = created
        .iter()
        .map(|(i, _, _)| &rows[*i].1.bank_account)
        .collect();
    Insert {
        head: "INSERT INTO partners (partner_id, business_registration_number, legal_name, \
               representative_name, affected_services, bank_code, account_sealed, \
               account_last4, holder_name, account_changed_by, account_change_time, \
               contact_email, create_time, update_time, version)",
        columns: vec![
            text_column(created, |(_, p, _)| p.partner_id.text()),
            text_column(profiles.iter().copied(), |p| {
                p.business_registration_number.as_str()
            }),
            text_column(profiles.iter().copied(), |p| p.legal_name.as_str()),
            text_column(profiles.iter().copied(), |p| p.representative_name.as_str()),
            text_column(&profiles, |p| services_key(&p.affected_services)),
            text_column(accounts.iter().copied(), |a| a.bank_code.as_str()),
            text_column(created, |(_, _, sealed)| *sealed),
            text_column(accounts.iter().copied(), |a| a.account_number.last4()),
            text_column(accounts.iter().copied(), |a| a.holder_name.as_str()),
            Column::Text(vec![Cow::Borrowed(""); n]),
            Column::BigInt(vec![0; n]),
            text_column(profiles.iter().copied(), |p| p.contact_email.as_str()),
            Column::BigInt(vec![now; n]),
            Column::BigInt(vec![now; n]),
            Column::BigInt(vec![1; n]),
        ],
        tail: "",
    }
}

/// Where a partner's payout goes, as the approving transaction copies it.
#[derive(sqlx::FromRow)]
pub(crate) struct Payee {
    pub bank_code: String,
    pub account_sealed: String,
    pub account_last4: String,
    pub holder_name: String,
}

/// Where the disbursements of a batch of claims take their payout details from.
#[derive(Clone, Copy)]
pub(crate) enum Payees<'a> {
    /// Read (and locked) before, by partner id: a claim whose partner is missing has none.
    Read(&'a HashMap<PartnerId, Payee>),
    /// Locked by the statement that writes the claims, as its `WITH` clause
    /// [`PAYEES_LOCKED`]: a claim whose partner is missing is not written.
    Locked,
}

/// The `WITH` clause of [`Payees::Locked`]: each partner's payout details, the partners
/// locked in the order of their ids, as `submit_claim` locks one. (The inserts' tails name it
/// as written here.)
pub(crate) const PAYEES_LOCKED: &str = "payees";
/// The select of [`PAYEES_LOCKED`], up to its partner id (see [`super::batch::Locked`]).
pub(crate) const PAYEES_SELECT: &str = "SELECT partner_id, bank_code, account_sealed, \
     account_last4, holder_name FROM partners WHERE partner_id";

/// One claim being filed by the batch.
pub(crate) struct Filed {
    pub row: usize,
    pub claim: Claim,
}

/// The claim a row files if it is new: what `load_claim` would read back after
/// `submit_claim`.
pub(crate) fn claim_if_new(row: &ClaimSubmission, partner_id: PartnerId, now: Micros) -> Claim {
    let d = &row.claim.decision;
    let submitted_by = &row.claim.submitted_by;
    Claim {
        claim_id: ClaimId::new(),
        partner_id,
        status: d.status,
        items: row.claim.items.clone(),
        decision: d.clone(),
        compensation_krw: d.compensation_krw,
        evidence: row
            .claim
            .evidence
            .iter()
            .map(|e| AttachedEvidence {
                evidence: e.clone(),
                attach_time: now,
                attached_by: submitted_by.clone(),
            })
            .collect(),
        submitted_by: submitted_by.clone(),
        review: None,
        create_time: now,
        update_time: now,
        disbursement_id: (d.status == ClaimStatus::Approved).then(DisbursementId::new),
    }
}

/// The reason of a payout's first history entry.
pub(crate) const CLAIM_APPROVED: &str = "claim approved";

/// The rows `submit_claim` writes, for every claim of a wave: the claims, their
/// evidence, and for approved ones the disbursement, its first history entry and its
/// outbox row (the inserts, in that order).
pub(crate) fn claims_inserts(
    rows: &[ClaimSubmission],
    filed: &[Filed],
    payees: Payees<'_>,
    now: Micros,
) -> BulkResult<Vec<Insert<'static>>> {
    if filed.is_empty() {
        return Ok(Vec::new());
    }
    let claims: Vec<&Claim> = filed.iter().map(|f| &f.claim).collect();
    let mut inserts = Vec::with_capacity(5);
    let mut claims_insert = claim_insert(&claims, now)?;
    if let Payees::Locked = payees {
        // The partner is the claim's second column. A partner not registered makes the
        // statement store fewer claims than it has, which fails it whole; a claim filed
        // before for it fails it on the partner's key ([`crate::store::batch::NOT_NEW`]).
        claims_insert.tail = " AS u(claim_id, partner_id) \
            WHERE partner_id IN (SELECT partner_id FROM payees)";
    }
    inserts.push(claims_insert);
    inserts.push(evidence_insert(&claims, now));
    inserts.extend(disbursement_inserts(rows, filed, payees, now));
    Ok(inserts)
}

fn claim_insert(claims: &[&Claim], now: Micros) -> BulkResult<Insert<'static>> {
    let json =
        |value: serde_json::Result<String>| value.map_err(|e| StoreError::Unexpected(e.into()));
    let (mut items, mut decisions) = (Vec::new(), Vec::new());
    for c in claims {
        items.push(json(serde_json::to_string(&c.items))?);
        decisions.push(json(serde_json::to_string(&c.decision))?);
    }
    let n = claims.len();
    let krw = |f: fn(&Claim) -> i64| Column::BigInt(claims.iter().map(|c| f(c)).collect());
    Ok(Insert {
        head: "INSERT INTO claims (claim_id, partner_id, status, tier, reported_loss_krw, \
         recognized_loss_krw, compensation_krw, policy_version, items, decision, \
         submitted_by, create_time, update_time)",
        columns: vec![
            text_column(claims, |c| c.claim_id.text()),
            text_column(claims, |c| c.partner_id.text()),
            text_column(claims, |c| c.decision.status.key()),
            text_column(claims, |c| c.decision.tier.key()),
            krw(|c| c.decision.reported_loss_krw),
            krw(|c| c.decision.recognized_loss_krw),
            krw(|c| c.decision.compensation_krw.won()),
            text_column(claims, |c| c.decision.policy_version.clone()),
            Column::owned_text(items),
            Column::owned_text(decisions),
            text_column(claims, |c| c.submitted_by.clone()),
            Column::BigInt(vec![now; n]),
            Column::BigInt(vec![now; n]),
        ],
        tail: "",
    })
}

fn evidence_insert(claims: &[&Claim], now: Micros) -> Insert<'static> {
    let evidence: Vec<(&Claim, i32, &AttachedEvidence)> = claims
        .iter()
        .flat_map(|c| (1..).zip(&c.evidence).map(move |(seq, e)| (*c, seq, e)))
        .collect();
    let ne = evidence.len();
    Insert {
        head: "INSERT INTO evidence (claim_id, seq, kind, uri, sha256, attach_time, attached_by)",
        columns: vec![
            text_column(&evidence, |(c, _, _)| c.claim_id.text()),
            Column::Int(evidence.iter().map(|(_, seq, _)| *seq).collect()),
            text_column(&evidence, |(_, _, e)| e.evidence.kind.key()),
            text_column(&evidence, |(_, _, e)| e.evidence.uri.clone()),
            text_column(&evidence, |(_, _, e)| e.evidence.sha256.clone()),
            Column::BigInt(vec![now; ne]),
            text_column(&evidence, |(_, _, e)| e.attached_by.clone()),
        ],
        tail: "",
    }
}

/// Approval and disbursement are one, as in `create_disbursement`: the disbursements of the
/// approved claims, their first history entries and their outbox rows.
fn disbursement_inserts(
    rows: &[ClaimSubmission],
    filed: &[Filed],
    payees: Payees<'_>,
    now: Micros,
) -> [Insert<'static>; 3] {
    let approved: Vec<(&Filed, String, Option<&Payee>)> = filed
        .iter()
        .filter_map(|f| {
            let id = f.claim.disbursement_id?.text();
            match payees {
                Payees::Read(read) => read.get(&f.claim.partner_id).map(|p| (f, id, Some(p))),
                Payees::Locked => Some((f, id, None)),
            }
        })
        .collect();
    let na = approved.len();
    let ids = text_column(&approved, |(_, id, _)| id.clone());
    let queued = || Column::Text(vec![Cow::Borrowed(DisbursementStatus::Queued.key()); na]);
    // The partner first: where the payout details are joined (`USING (partner_id)`), they
    // follow the columns given, in the order of the payees' select.
    let mut columns = vec![
        text_column(&approved, |(f, _, _)| f.claim.partner_id.text()),
        ids.clone(),
        text_column(&approved, |(f, _, _)| f.claim.claim_id.text()),
        Column::BigInt(
            approved
                .iter()
                .map(|(f, _, _)| f.claim.compensation_krw.won())
                .collect(),
        ),
        queued(),
        Column::NullableText(
            approved
                .iter()
                .map(|(f, _, _)| rows[f.row].claim.trace_context.clone().map(Cow::Owned))
                .collect(),
        ),
        Column::BigInt(vec![now; na]),
        Column::BigInt(vec![now; na]),
    ];
    let tail = match payees {
        Payees::Read(_) => {
            let payee = |f: fn(&Payee) -> &String| {
                Column::Text(
                    approved
                        .iter()
                        .filter_map(|(_, _, p)| p.map(|p| Cow::Owned(f(p).clone())))
                        .collect(),
                )
            };
            columns.extend([
                payee(|p| &p.bank_code),
                payee(|p| &p.account_sealed),
                payee(|p| &p.account_last4),
                payee(|p| &p.holder_name),
            ]);
            ""
        }
        Payees::Locked => " AS u(partner_id) JOIN payees USING (partner_id)",
    };
    let disbursements = Insert {
        head: "INSERT INTO disbursements (partner_id, disbursement_id, claim_id, amount_krw, \
         status, trace_context, create_time, update_time, \
         bank_code, account_sealed, account_last4, holder_name)",
        columns,
        tail,
    };
    let history = Insert {
        head: "INSERT INTO disbursement_events (disbursement_id, from_status, to_status, \
         actor, reason, time)",
        columns: vec![
            ids.clone(),
            Column::NullableText(vec![None; na]),
            queued(),
            text_column(&approved, |(f, _, _)| f.claim.submitted_by.clone()),
            Column::Text(vec![Cow::Borrowed(CLAIM_APPROVED); na]),
            Column::BigInt(vec![now; na]),
        ],
        tail: "",
    };
    let outbox = Insert {
        head: "INSERT INTO outbox (disbursement_id, due_time)",
        columns: vec![ids, Column::BigInt(vec![now; na])],
        tail: "",
    };
    [disbursements, history, outbox]
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A row's keys from small numbers, so rows often share one.
    fn keys_of(row: &[(u8, u8)]) -> Vec<RowKey<'static>> {
        row.iter()
            .map(|&(kind, n)| match kind % 3 {
                0 => RowKey::Request(uuid::Uuid::from_u128(u128::from(n % 4)), "p"),
                1 => RowKey::Registration(["1", "2", "3"][usize::from(n % 3)]),
                _ => RowKey::Partner(PartnerId::from_uuid(uuid::Uuid::from_u128(u128::from(
                    n % 3,
                )))),
            })
            .collect()
    }

    proptest! {
        /// Every row is in exactly one wave, in order; rows of a wave share no key; and a row
        /// goes exactly one wave after the last earlier row it shares a key with.
        #[test]
        fn a_row_waits_exactly_for_the_earlier_rows_it_shares_a_key_with(
            rows in proptest::collection::vec(
                proptest::collection::vec((any::<u8>(), any::<u8>()), 0..3),
                0..24,
            ),
        ) {
            let keys: Vec<Vec<RowKey<'static>>> = rows.iter().map(|r| keys_of(r)).collect();
            let waves = waves(&keys);
            let mut wave_of = vec![None; keys.len()];
            for (w, wave) in waves.iter().enumerate() {
                prop_assert!(!wave.is_empty());
                prop_assert!(wave.windows(2).all(|p| p[0] < p[1]));
                for &row in wave {
                    prop_assert_eq!(wave_of[row].replace(w), None);
                }
            }
            for (row, row_keys) in keys.iter().enumerate() {
                let expected = (0..row)
                    .filter(|&earlier| keys[earlier].iter().any(|k| row_keys.contains(k)))
                    .filter_map(|earlier| wave_of[earlier])
                    .map(|w| w + 1)
                    .max()
                    .unwrap_or(0);
                prop_assert_eq!(wave_of[row], Some(expected));
            }
        }
    }

    #[test]
    fn keys_of_one_kind_only_match_their_own_kind() {
        let id = uuid::Uuid::from_u128(7);
        let keys = [
            vec![RowKey::Request(id, "a")],
            vec![RowKey::Request(id, "b")],
            vec![RowKey::Partner(PartnerId::from_uuid(id))],
            vec![RowKey::Registration("1234567891")],
            vec![RowKey::Request(id, "a")],
        ];
        assert_eq!(waves(&keys), vec![vec![0, 1, 2, 3], vec![4]]);
    }
}
