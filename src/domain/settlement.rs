//! Reconciliation against the payments backend's settlement report: what a report line says,
//! how it compares with our record of the payout, and whether the payout must be reopened.
//!
//! The backend is the record of what was paid (design: "Paying exactly once"), so every
//! disagreement is reported; the only one acted on is a return, which reopens the payout as
//! `FAILED{RETURNED}` so that it can be paid again under a new key.

use super::{DisbursementId, DisbursementStatus, Invalid, Krw, failure, text};

/// The longest idempotency key a report line may carry (ours are 38 characters).
pub const MAX_SETTLEMENT_KEY_LEN: usize = 200;

/// What the backend's report says became of an instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SettlementStatus {
    /// The money reached the account.
    Settled,
    /// The money came back after the instruction looked paid (closed account, ...).
    Returned,
}

impl SettlementStatus {
    pub const ALL: [SettlementStatus; 2] = [Self::Settled, Self::Returned];

    pub fn key(self) -> &'static str {
        match self {
            Self::Settled => "settled",
            Self::Returned => "returned",
        }
    }

    pub fn from_key(key: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.key() == key)
    }
}

/// One line of a settlement report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettlementLine {
    pub idempotency_key: String,
    pub amount_krw: Krw,
    pub status: SettlementStatus,
    /// Unix microseconds; 0 when the report gives no time.
    pub settled_time: i64,
}

impl SettlementLine {
    /// A valid line, or every field that is not (`idempotency_key`, `amount_krw`).
    pub fn parse(
        idempotency_key: &str,
        amount_krw: i64,
        status: SettlementStatus,
        settled_time: i64,
    ) -> Result<Self, Vec<(&'static str, Invalid)>> {
        let mut bad = Vec::new();
        let key = idempotency_key.trim();
        if key.is_empty() {
            bad.push(("idempotency_key", Invalid::new("is required")));
        } else if key.chars().count() > MAX_SETTLEMENT_KEY_LEN {
            bad.push((
                "idempotency_key",
                Invalid::new(format!(
                    "must be at most {MAX_SETTLEMENT_KEY_LEN} characters"
                )),
            ));
        } else if key
            .chars()
            .any(|c| c.is_whitespace() || text::is_control(c) || text::is_invisible(c))
        {
            bad.push((
                "idempotency_key",
                Invalid::new(
                    "must not contain spaces, control, invisible or formatting characters",
                ),
            ));
        }
        // KRW has no minor unit and a settlement moves money: a positive whole number of won.
        if amount_krw <= 0 {
            bad.push((
                "amount_krw",
                Invalid::new("must be a positive amount of won"),
            ));
        }
        if !bad.is_empty() {
            return Err(bad);
        }
        Ok(Self {
            idempotency_key: key.to_owned(),
            amount_krw: Krw::new(amount_krw),
            status,
            settled_time,
        })
    }
}

/// How a report and our records disagree about one payout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MismatchKind {
    /// The report has a key we do not know, or whose disbursement is not `PAID` here.
    PaidThereNotHere,
    /// A disbursement paid here before the report's cut-off is not in the report.
    PaidHereNotThere,
    /// Paid on both sides, for different amounts.
    AmountDiffers,
    /// The backend paid and then returned the money.
    Returned,
}

/// What we hold for the disbursement that used a report line's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OurPayout<'a> {
    pub status: DisbursementStatus,
    pub amount_krw: Krw,
    pub failure_code: Option<&'a str>,
    /// The key is the disbursement's current instruction key, not one it used before a retry
    /// replaced it.
    pub current_key: bool,
}

/// The judgement on one report line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// `None`: the line agrees with our records.
    pub mismatch: Option<(MismatchKind, String)>,
    /// Move the disbursement `PAID -> FAILED{RETURNED}`.
    pub reopen: bool,
}

impl Verdict {
    fn agrees() -> Self {
        Self {
            mismatch: None,
            reopen: false,
        }
    }

    fn mismatch(kind: MismatchKind, detail: impl Into<String>) -> Self {
        Self {
            mismatch: Some((kind, detail.into())),
            reopen: false,
        }
    }
}

fn shown(status: DisbursementStatus) -> String {
    status.key().to_uppercase()
}

/// Compares one report line with the disbursement that used its key (`None`: no disbursement
/// ever did). Pure, so that reconciling the same report twice judges it the same way, except
/// that a payout the first run reopened is then reported as already reopened.
pub fn judge(line: &SettlementLine, ours: Option<&OurPayout<'_>>) -> Verdict {
    use DisbursementStatus::{Failed, Paid};
    use MismatchKind::{AmountDiffers, PaidThereNotHere, Returned};
    let Some(ours) = ours else {
        let what = match line.status {
            SettlementStatus::Settled => "settled",
            SettlementStatus::Returned => "paid and returned",
        };
        return Verdict::mismatch(
            PaidThereNotHere,
            format!("the backend {what} an instruction under a key none of our disbursements used"),
        );
    };
    let returned_here = ours.status == Failed && ours.failure_code == Some(failure::RETURNED);
    match (line.status, ours.current_key) {
        // A retry replaces the key only after the backend failed the instruction for good or
        // returned it, so money settled under an earlier key may have been paid twice.
        (SettlementStatus::Settled, false) => Verdict::mismatch(
            PaidThereNotHere,
            format!(
                "the backend settled an earlier instruction of this disbursement, which was \
                 replaced by a retry (now {}): the partner may have been paid twice",
                shown(ours.status)
            ),
        ),
        (SettlementStatus::Returned, false) => Verdict::mismatch(
            Returned,
            format!(
                "already reopened and retried, so this key is no longer its instruction's \
                 (now {})",
                shown(ours.status)
            ),
        ),
        (SettlementStatus::Settled, true) if ours.status == Paid => {
            if ours.amount_krw == line.amount_krw {
                Verdict::agrees()
            } else {
                Verdict::mismatch(
                    AmountDiffers,
                    format!(
                        "paid {} KRW here, settled {} KRW there",
                        ours.amount_krw.won(),
                        line.amount_krw.won()
                    ),
                )
            }
        }
        (SettlementStatus::Settled, true) if returned_here => Verdict::mismatch(
            PaidThereNotHere,
            "settled there, but recorded here as returned (FAILED RETURNED)",
        ),
        (SettlementStatus::Settled, true) => Verdict::mismatch(
            PaidThereNotHere,
            format!("settled there, but {} here", shown(ours.status)),
        ),
        (SettlementStatus::Returned, true) if ours.status == Paid => Verdict {
            mismatch: Some((
                Returned,
                "the bank returned the payout: reopened as FAILED RETURNED, retry it to pay again"
                    .to_owned(),
            )),
            reopen: true,
        },
        (SettlementStatus::Returned, true) if returned_here => Verdict::mismatch(
            Returned,
            "already reopened as FAILED RETURNED by an earlier reconciliation",
        ),
        (SettlementStatus::Returned, true) => Verdict::mismatch(
            Returned,
            format!(
                "returned there, but {} here: nothing was reopened",
                shown(ours.status)
            ),
        ),
    }
}

/// One disagreement found by a reconciliation, as reported to the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettlementMismatch {
    pub idempotency_key: String,
    /// The disbursement that used the key, if any did.
    pub disbursement_id: Option<DisbursementId>,
    pub kind: MismatchKind,
    /// 0 when no disbursement of ours used the key.
    pub our_amount_krw: Krw,
    /// 0 when the report does not have the key.
    pub their_amount_krw: Krw,
    pub detail: String,
    /// This reconciliation moved the disbursement `PAID -> FAILED{RETURNED}`.
    pub reopened: bool,
    /// The disbursement's status once this line was reconciled.
    pub status: Option<DisbursementStatus>,
}

/// What became of the reopening a [`Verdict`] asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reopening {
    /// The verdict asked for none.
    NotAsked,
    /// The payout moved `PAID -> FAILED{RETURNED}`.
    Done,
    /// The payout was no longer `PAID` when the conditional update ran.
    StatusChanged,
}

impl Verdict {
    /// The disagreement to report for `line` once any reopening was tried, or `None` when the
    /// line agrees with our records. `ours` and `disbursement_id` are the payout that used the
    /// line's key, as [`judge`] saw it.
    pub fn into_mismatch(
        self,
        line: &SettlementLine,
        disbursement_id: Option<DisbursementId>,
        ours: Option<&OurPayout<'_>>,
        reopening: Reopening,
    ) -> Option<SettlementMismatch> {
        let (kind, detail) = self.mismatch?;
        let (detail, status) = match reopening {
            Reopening::NotAsked => (detail, ours.map(|o| o.status)),
            Reopening::Done => (detail, Some(DisbursementStatus::Failed)),
            Reopening::StatusChanged => (
                "returned there, but its status changed here while reconciling: nothing was \
                 reopened; reconcile again"
                    .to_owned(),
                ours.map(|o| o.status),
            ),
        };
        Some(SettlementMismatch {
            idempotency_key: line.idempotency_key.clone(),
            disbursement_id,
            kind,
            our_amount_krw: ours.map_or(Krw::ZERO, |o| o.amount_krw),
            their_amount_krw: line.amount_krw,
            detail,
            reopened: reopening == Reopening::Done,
            status,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::DisbursementStatus::*;
    use super::*;

    fn line(status: SettlementStatus, amount_krw: i64) -> SettlementLine {
        SettlementLine::parse("k-0", amount_krw, status, 0).expect("valid line")
    }

    fn ours(status: DisbursementStatus, code: Option<&str>, current_key: bool) -> OurPayout<'_> {
        OurPayout {
            status,
            amount_krw: Krw::new(30_000),
            failure_code: code,
            current_key,
        }
    }

    fn kind(v: &Verdict) -> Option<MismatchKind> {
        v.mismatch.as_ref().map(|(k, _)| *k)
    }

    #[test]
    fn a_settled_line_agrees_only_with_a_paid_payout_of_the_same_amount() {
        let settled = line(SettlementStatus::Settled, 30_000);
        assert_eq!(
            judge(&settled, Some(&ours(Paid, None, true))),
            Verdict::agrees()
        );
        let v = judge(
            &line(SettlementStatus::Settled, 50_000),
            Some(&ours(Paid, None, true)),
        );
        assert_eq!(kind(&v), Some(MismatchKind::AmountDiffers));
        assert!(!v.reopen);
        for status in [Queued, Submitted, Failed, Cancelled] {
            let v = judge(&settled, Some(&ours(status, None, true)));
            assert_eq!(kind(&v), Some(MismatchKind::PaidThereNotHere), "{status:?}");
            assert!(!v.reopen);
        }
        let v = judge(&settled, None);
        assert_eq!(kind(&v), Some(MismatchKind::PaidThereNotHere));
        let v = judge(&settled, Some(&ours(Paid, None, false)));
        assert_eq!(kind(&v), Some(MismatchKind::PaidThereNotHere));
        assert!(v.mismatch.expect("mismatch").1.contains("paid twice"));
    }

    #[test]
    fn only_a_paid_payout_under_its_current_key_is_reopened_by_a_return() {
        let returned = line(SettlementStatus::Returned, 30_000);
        let v = judge(&returned, Some(&ours(Paid, None, true)));
        assert_eq!(kind(&v), Some(MismatchKind::Returned));
        assert!(v.reopen);
        // Reconciling the same report again: already reopened, or already retried.
        for again in [
            ours(Failed, Some(failure::RETURNED), true),
            ours(Queued, None, false),
            ours(Paid, None, false),
        ] {
            let v = judge(&returned, Some(&again));
            assert_eq!(kind(&v), Some(MismatchKind::Returned), "{again:?}");
            assert!(!v.reopen, "{again:?}");
            assert!(
                v.mismatch.expect("mismatch").1.contains("already reopened"),
                "{again:?}"
            );
        }
        for status in [Queued, Submitted, Cancelled] {
            let v = judge(&returned, Some(&ours(status, None, true)));
            assert_eq!(kind(&v), Some(MismatchKind::Returned));
            assert!(!v.reopen, "{status:?}");
        }
        let v = judge(&returned, None);
        assert_eq!(kind(&v), Some(MismatchKind::PaidThereNotHere));
        assert!(!v.reopen);
    }

    #[test]
    fn a_reported_mismatch_carries_both_sides_and_what_reconciling_did() {
        let id = DisbursementId::from_uuid(uuid::Uuid::from_u128(7));
        let settled = line(SettlementStatus::Settled, 30_000);
        let paid = ours(Paid, None, true);
        let agrees = judge(&settled, Some(&paid));
        assert_eq!(
            agrees.into_mismatch(&settled, Some(id), Some(&paid), Reopening::NotAsked),
            None
        );

        let other = line(SettlementStatus::Settled, 50_000);
        let m = judge(&other, Some(&paid))
            .into_mismatch(&other, Some(id), Some(&paid), Reopening::NotAsked)
            .expect("amounts differ");
        assert_eq!(m.kind, MismatchKind::AmountDiffers);
        assert_eq!(
            (m.our_amount_krw, m.their_amount_krw),
            (Krw::new(30_000), Krw::new(50_000))
        );
        assert_eq!(
            (m.disbursement_id, m.status, m.reopened),
            (Some(id), Some(Paid), false)
        );
        assert_eq!(m.idempotency_key, "k-0");

        let unknown = judge(&settled, None)
            .into_mismatch(&settled, None, None, Reopening::NotAsked)
            .expect("unknown key");
        assert_eq!((unknown.our_amount_krw, unknown.status), (Krw::ZERO, None));

        let returned = line(SettlementStatus::Returned, 30_000);
        let verdict = judge(&returned, Some(&paid));
        let done = verdict
            .clone()
            .into_mismatch(&returned, Some(id), Some(&paid), Reopening::Done)
            .expect("returned");
        assert_eq!((done.reopened, done.status), (true, Some(Failed)));
        assert_eq!(Some(done.detail), verdict.mismatch.clone().map(|(_, d)| d));
        let raced = verdict
            .into_mismatch(&returned, Some(id), Some(&paid), Reopening::StatusChanged)
            .expect("returned");
        assert_eq!((raced.reopened, raced.status), (false, Some(Paid)));
        assert!(raced.detail.contains("reconcile again"), "{}", raced.detail);
    }

    #[test]
    fn lines_need_a_key_and_a_positive_amount() {
        let bad = SettlementLine::parse(" ", 0, SettlementStatus::Settled, 0).expect_err("bad");
        let fields: Vec<_> = bad.iter().map(|(f, _)| *f).collect();
        assert_eq!(fields, ["idempotency_key", "amount_krw"]);
        let long = "k".repeat(MAX_SETTLEMENT_KEY_LEN + 1);
        assert!(SettlementLine::parse(&long, 1, SettlementStatus::Settled, 0).is_err());
        for key in ["k\0", "k 1", "k\u{7F}", "\u{202E}k", "k\u{200B}"] {
            let bad = SettlementLine::parse(key, 1, SettlementStatus::Settled, 0).expect_err(key);
            assert_eq!(bad[0].0, "idempotency_key", "{key:?}");
        }
        let longest = "가".repeat(MAX_SETTLEMENT_KEY_LEN);
        assert!(SettlementLine::parse(&longest, 1, SettlementStatus::Settled, 0).is_ok());
        let ok = SettlementLine::parse(" k-1 ", 1, SettlementStatus::Returned, 5).expect("ok");
        assert_eq!(ok.idempotency_key, "k-1");
        for s in SettlementStatus::ALL {
            assert_eq!(SettlementStatus::from_key(s.key()), Some(s));
        }
    }
}
