//! Rows as the database returns them (`FromRow`), and their conversions to the domain and
//! store types. Stored text is checked again on the way out: a value the domain would refuse
//! is inconsistent data, never silently passed on.

use uuid::Uuid;

use super::{
    Attempt, AuditEvent, CountKrw, Disbursement, DispatchState, ExportedDisbursement, Micros,
    PaidPayout, Result, StatusChange, StoreError,
};
use crate::domain::{
    AccountOnFile, AffectedService, AttachedEvidence, AttemptOperation, AttemptOutcome, BankCode,
    BusinessRegistrationNumber, Claim, ClaimReview, ClaimStatus, ContactEmail, Decision,
    DisbursementId, DisbursementStatus, Evidence, EvidenceKind, Krw, LossItem, Partner,
    PartnerProfile, PersonOrBusinessName, SettlementLine, SettlementStatus,
};

/// `impl TryFrom<$row> for $value`: the value `$read` makes of a row read from the database,
/// or a [`StoreError`] when the stored data is inconsistent.
macro_rules! stored {
    ($row:ident, $value:ident, |$r:ident| $read:expr) => {
        impl TryFrom<$row> for $value {
            type Error = StoreError;

            fn try_from($r: $row) -> Result<Self> {
                $read
            }
        }
    };
}

pub(crate) fn unexpected(what: impl std::fmt::Display) -> StoreError {
    StoreError::Unexpected(anyhow::anyhow!("stored data is inconsistent: {what}"))
}

pub(crate) fn parsed<T, E: std::fmt::Display>(
    col: &str,
    value: std::result::Result<T, E>,
) -> Result<T> {
    value.map_err(|e| unexpected(format!("{col}: {e}")))
}

/// An id read from its stored text: a bare `Uuid`, or the typed id it names.
pub(crate) fn uuid<T: From<Uuid>>(col: &str, text: &str) -> Result<T> {
    parsed(col, Uuid::parse_str(text)).map(T::from)
}

fn disbursement_status(col: &str, key: &str) -> Result<DisbursementStatus> {
    DisbursementStatus::from_key(key).ok_or_else(|| unexpected(format!("{col}: {key}")))
}

/// How the affected services are stored: their keys, comma-separated.
pub(crate) fn services_key(services: &[AffectedService]) -> String {
    services
        .iter()
        .map(|s| s.key())
        .collect::<Vec<_>>()
        .join(",")
}

/// A partner's registration number, legal name and representative, as stored.
#[derive(sqlx::FromRow)]
pub(crate) struct IdentityRow {
    business_registration_number: String,
    legal_name: String,
    representative_name: String,
}

/// The registration number, legal name and representative of an [`IdentityRow`].
type Identity = (
    BusinessRegistrationNumber,
    PersonOrBusinessName,
    PersonOrBusinessName,
);

stored!(IdentityRow, Identity, |row| Ok((
    parsed(
        "business_registration_number",
        BusinessRegistrationNumber::parse(&row.business_registration_number),
    )?,
    parsed(
        "legal_name",
        PersonOrBusinessName::from_stored(&row.legal_name),
    )?,
    parsed(
        "representative_name",
        PersonOrBusinessName::from_stored(&row.representative_name),
    )?,
)));

/// Where a payout goes, but for the sealed number: the bank, the last 4 digits, the holder.
#[derive(sqlx::FromRow)]
pub(crate) struct AccountRow {
    bank_code: String,
    account_last4: String,
    holder_name: String,
}

stored!(AccountRow, AccountOnFile, |row| Ok(AccountOnFile {
    bank_code: parsed("bank_code", BankCode::parse(&row.bank_code))?,
    account_last4: row.account_last4,
    holder_name: parsed(
        "holder_name",
        PersonOrBusinessName::from_stored(&row.holder_name),
    )?,
}));

#[derive(sqlx::FromRow)]
pub(crate) struct PartnerRow {
    partner_id: String,
    #[sqlx(flatten)]
    identity: IdentityRow,
    affected_services: String,
    #[sqlx(flatten)]
    account: AccountRow,
    contact_email: String,
    create_time: Micros,
    update_time: Micros,
    version: i64,
}

stored!(PartnerRow, Partner, |row| {
    let affected_services = row
        .affected_services
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| AffectedService::from_key(s).ok_or_else(|| unexpected(s)))
        .collect::<Result<Vec<_>>>()?;
    let (business_registration_number, legal_name, representative_name) =
        row.identity.try_into()?;
    Ok(Partner {
        partner_id: uuid("partner_id", &row.partner_id)?,
        profile: PartnerProfile {
            business_registration_number,
            legal_name,
            representative_name,
            affected_services,
            contact_email: parsed(
                "contact_email",
                ContactEmail::from_stored(&row.contact_email),
            )?,
        },
        bank_account: row.account.try_into()?,
        create_time: row.create_time,
        update_time: row.update_time,
        version: row.version,
    })
});

#[derive(sqlx::FromRow)]
pub(crate) struct EvidenceRow {
    pub(crate) claim_id: String,
    kind: String,
    uri: String,
    sha256: String,
    attach_time: Micros,
    attached_by: String,
}

stored!(EvidenceRow, AttachedEvidence, |row| Ok(AttachedEvidence {
    evidence: Evidence {
        kind: EvidenceKind::from_key(&row.kind).ok_or_else(|| unexpected(&row.kind))?,
        uri: row.uri,
        sha256: row.sha256,
    },
    attach_time: row.attach_time,
    attached_by: row.attached_by,
}));

/// A claim with the id of its disbursement, if it has one.
#[derive(sqlx::FromRow)]
pub(crate) struct ClaimRow {
    pub claim_id: String,
    partner_id: String,
    status: String,
    items: String,
    decision: String,
    compensation_krw: i64,
    submitted_by: String,
    reviewed_by: Option<String>,
    review_reason: Option<String>,
    create_time: Micros,
    update_time: Micros,
    disbursement_id: Option<String>,
}

impl ClaimRow {
    /// The claim, with its evidence.
    pub(crate) fn with_evidence(self, evidence: Vec<EvidenceRow>) -> Result<Claim> {
        Ok(Claim {
            claim_id: uuid("claim_id", &self.claim_id)?,
            partner_id: uuid("partner_id", &self.partner_id)?,
            status: ClaimStatus::from_key(&self.status).ok_or_else(|| unexpected(&self.status))?,
            items: parsed("items", serde_json::from_str::<Vec<LossItem>>(&self.items))?,
            decision: parsed("decision", serde_json::from_str::<Decision>(&self.decision))?,
            compensation_krw: Krw::new(self.compensation_krw),
            evidence: evidence
                .into_iter()
                .map(AttachedEvidence::try_from)
                .collect::<Result<_>>()?,
            submitted_by: self.submitted_by,
            review: match (self.reviewed_by, self.review_reason) {
                (Some(reviewer), Some(reason)) => Some(ClaimReview { reviewer, reason }),
                (None, None) => None,
                _ => return Err(unexpected("reviewed_by and review_reason are set apart")),
            },
            create_time: self.create_time,
            update_time: self.update_time,
            disbursement_id: self
                .disbursement_id
                .map(|id| uuid("disbursement_id", &id))
                .transpose()?,
        })
    }
}

/// A disbursement, without its attempts and history.
#[derive(sqlx::FromRow)]
pub(crate) struct DisbursementRow {
    disbursement_id: String,
    claim_id: String,
    partner_id: String,
    amount_krw: i64,
    status: String,
    failure_code: Option<String>,
    failure_message: Option<String>,
    idempotency_key: Option<String>,
    key_seq: i64,
    holder_verified: bool,
    #[sqlx(flatten)]
    account: AccountRow,
    account_sealed: String,
    create_time: Micros,
    update_time: Micros,
    trace_context: Option<String>,
}

stored!(DisbursementRow, Disbursement, |row| Ok(Disbursement {
    disbursement_id: uuid("disbursement_id", &row.disbursement_id)?,
    claim_id: uuid("claim_id", &row.claim_id)?,
    partner_id: uuid("partner_id", &row.partner_id)?,
    amount_krw: Krw::new(row.amount_krw),
    status: disbursement_status("status", &row.status)?,
    failure_code: row.failure_code,
    failure_message: row.failure_message,
    idempotency_key: row.idempotency_key,
    key_seq: row.key_seq,
    holder_verified: row.holder_verified,
    account: row.account.try_into()?,
    sealed_account: row.account_sealed,
    create_time: row.create_time,
    update_time: row.update_time,
    attempts: Vec::new(),
    history: Vec::new(),
    trace_context: row.trace_context,
}));

#[derive(sqlx::FromRow)]
pub(crate) struct AttemptRow {
    operation: String,
    idempotency_key: String,
    outcome: String,
    code: String,
    message: String,
    time: Micros,
}

stored!(AttemptRow, Attempt, |row| Ok(Attempt {
    operation: parsed("operation", AttemptOperation::parse(&row.operation))?,
    idempotency_key: row.idempotency_key,
    outcome: parsed("outcome", AttemptOutcome::parse(&row.outcome))?,
    code: row.code,
    message: row.message,
    time: row.time,
}));

#[derive(sqlx::FromRow)]
pub(crate) struct StatusChangeRow {
    from_status: Option<String>,
    to_status: String,
    actor: String,
    reason: String,
    time: Micros,
}

stored!(StatusChangeRow, StatusChange, |row| Ok(StatusChange {
    from_status: row
        .from_status
        .map(|f| disbursement_status("from_status", &f))
        .transpose()?,
    to_status: disbursement_status("to_status", &row.to_status)?,
    actor: row.actor,
    reason: row.reason,
    time: row.time,
}));

#[derive(sqlx::FromRow)]
pub(crate) struct DispatchStateRow {
    paused: bool,
    reason: String,
    changed_by: String,
    change_time: Micros,
}

impl From<DispatchStateRow> for DispatchState {
    fn from(row: DispatchStateRow) -> Self {
        DispatchState {
            paused: row.paused,
            reason: row.reason,
            changed_by: row.changed_by,
            change_time: row.change_time,
        }
    }
}

/// The kept figures of one status (`program_totals`): for a disbursement status how many and
/// how much, for a claim status how many; `parts` is the number of rows summed.
#[derive(sqlx::FromRow)]
pub(crate) struct ProgramTotalRow {
    pub kind: String,
    pub status: String,
    pub n: i64,
    pub krw: i64,
    pub parts: i64,
}

impl ProgramTotalRow {
    /// The disbursement status and its figures.
    pub(crate) fn bucket(&self) -> Result<(DisbursementStatus, CountKrw)> {
        Ok((
            disbursement_status("status", &self.status)?,
            CountKrw {
                count: self.n,
                krw: Krw::new(self.krw),
            },
        ))
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct AuditRow {
    audit_event_id: String,
    time: Micros,
    principal: String,
    method: String,
    resource_id: String,
    request_id: String,
    outcome_code: String,
    peer_address: String,
    count: i64,
    replayed: bool,
}

stored!(AuditRow, AuditEvent, |row| Ok(AuditEvent {
    audit_event_id: uuid("audit_event_id", &row.audit_event_id)?,
    time: row.time,
    principal: row.principal,
    method: row.method,
    resource_id: row.resource_id,
    request_id: row.request_id,
    outcome_code: row.outcome_code,
    peer_address: row.peer_address,
    count: row.count,
    replayed: row.replayed,
}));

/// A disbursement joined with its partner and claim, for the finance export.
#[derive(sqlx::FromRow)]
pub(crate) struct ExportRow {
    disbursement_id: String,
    claim_id: String,
    partner_id: String,
    amount_krw: i64,
    status: String,
    #[sqlx(flatten)]
    account: AccountRow,
    idempotency_key: Option<String>,
    failure_code: Option<String>,
    create_time: Micros,
    update_time: Micros,
    #[sqlx(flatten)]
    identity: IdentityRow,
    policy_version: String,
    paid_time: Option<Micros>,
}

stored!(ExportRow, ExportedDisbursement, |row| {
    let (business_registration_number, legal_name, representative_name) =
        row.identity.try_into()?;
    Ok(ExportedDisbursement {
        disbursement_id: uuid("disbursement_id", &row.disbursement_id)?,
        claim_id: uuid("claim_id", &row.claim_id)?,
        partner_id: uuid("partner_id", &row.partner_id)?,
        business_registration_number,
        legal_name,
        representative_name,
        amount_krw: Krw::new(row.amount_krw),
        status: disbursement_status("status", &row.status)?,
        account: row.account.try_into()?,
        idempotency_key: row.idempotency_key,
        paid_time: row.paid_time,
        policy_version: row.policy_version,
        failure_code: row.failure_code,
        create_time: row.create_time,
        update_time: row.update_time,
    })
});

#[derive(sqlx::FromRow)]
pub(crate) struct PaidRow {
    disbursement_id: String,
    idempotency_key: Option<String>,
    amount_krw: i64,
    paid_time: Option<Micros>,
}

stored!(PaidRow, PaidPayout, |row| Ok(PaidPayout {
    disbursement_id: uuid("disbursement_id", &row.disbursement_id)?,
    idempotency_key: row
        .idempotency_key
        .ok_or_else(|| unexpected("a PAID disbursement without a key"))?,
    amount_krw: Krw::new(row.amount_krw),
    paid_time: row
        .paid_time
        .ok_or_else(|| unexpected("a PAID disbursement without a PAID event"))?,
}));

/// A staged settlement line with the disbursement that used its key, if any.
#[derive(sqlx::FromRow)]
pub(crate) struct SettlementMatchRow {
    idempotency_key: String,
    their_amount_krw: i64,
    their_status: String,
    settled_time: Micros,
    disbursement_id: Option<String>,
    our_status: Option<String>,
    our_amount_krw: Option<i64>,
    failure_code: Option<String>,
    current_key: Option<String>,
}

/// Our side of a settlement line, as stored: the disbursement that used the line's key.
pub(crate) struct OurSide {
    pub disbursement_id: DisbursementId,
    pub status: DisbursementStatus,
    pub amount_krw: Krw,
    pub failure_code: Option<String>,
    /// The line's key is the disbursement's current key (not one a retry replaced).
    pub current_key: bool,
}

impl SettlementMatchRow {
    /// The report's line, and our side of it.
    pub(crate) fn into_parts(self) -> Result<(SettlementLine, Option<OurSide>)> {
        let status = SettlementStatus::from_key(&self.their_status)
            .ok_or_else(|| unexpected(&self.their_status))?;
        let ours = match self.disbursement_id {
            None => None,
            Some(id) => Some(OurSide {
                disbursement_id: uuid("disbursement_id", &id)?,
                status: disbursement_status(
                    "our_status",
                    self.our_status.as_deref().unwrap_or_default(),
                )?,
                amount_krw: self
                    .our_amount_krw
                    .map(Krw::new)
                    .ok_or_else(|| unexpected("our_amount_krw"))?,
                failure_code: self.failure_code,
                current_key: self.current_key.as_deref() == Some(self.idempotency_key.as_str()),
            }),
        };
        let line = SettlementLine {
            idempotency_key: self.idempotency_key,
            amount_krw: Krw::new(self.their_amount_krw),
            status,
            settled_time: self.settled_time,
        };
        Ok((line, ours))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{DEFAULT_POLICY_TOML, Policy};

    fn claim_row(reviewed_by: Option<&str>, review_reason: Option<&str>) -> ClaimRow {
        let policy = Policy::from_toml(DEFAULT_POLICY_TOML).expect("policy");
        ClaimRow {
            claim_id: Uuid::now_v7().to_string(),
            partner_id: Uuid::now_v7().to_string(),
            status: ClaimStatus::PendingReview.key().to_owned(),
            items: "[]".to_owned(),
            decision: serde_json::to_string(&policy.decide(&[])).expect("decision"),
            compensation_krw: 0,
            submitted_by: "submitter".to_owned(),
            reviewed_by: reviewed_by.map(str::to_owned),
            review_reason: review_reason.map(str::to_owned),
            create_time: 1,
            update_time: 1,
            disbursement_id: None,
        }
    }

    #[test]
    fn a_claims_review_is_read_whole_or_not_at_all() {
        let unreviewed = claim_row(None, None).with_evidence(Vec::new());
        assert_eq!(unreviewed.expect("claim").review, None);
        let reviewed = claim_row(Some("reviewer"), Some("ledger checked"));
        assert_eq!(
            reviewed.with_evidence(Vec::new()).expect("claim").review,
            Some(ClaimReview {
                reviewer: "reviewer".to_owned(),
                reason: "ledger checked".to_owned(),
            })
        );
        for (by, reason) in [(Some("reviewer"), None), (None, Some("ledger checked"))] {
            let half = claim_row(by, reason).with_evidence(Vec::new());
            assert!(
                matches!(half, Err(StoreError::Unexpected(_))),
                "{by:?} {reason:?}"
            );
        }
    }
}
