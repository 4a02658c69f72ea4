//! Property tests for the domain rules: identifiers, the compensation policy, the text and
//! times callers send, and who may review, retry or cancel what.

use partner_payouts::api::convert::{
    MAX_TIMESTAMP_SECONDS, MIN_TIMESTAMP_SECONDS, parse_timestamp,
};
use partner_payouts::domain::text::{self, MAX_REASON_CHARS, Reason};
use partner_payouts::domain::{
    AccountChange, AccountNumber, AffectedService, BusinessRegistrationNumber, ClaimStatus,
    ContactEmail, DEFAULT_POLICY_TOML, DisbursementStatus, Evidence, EvidenceKind, FourEyes, Krw,
    LossItem, MAX_WEEK_SALES_KRW, OurPayout, PersonOrBusinessName, Policy, Refusal, Reopening,
    ReviewDecision, ReviewRefused, Reviewed, SettlementLine, SettlementStatus, Tier, UnderReview,
    judge, may_cancel, may_retry, review,
};
use proptest::prelude::*;

fn valid_brn() -> impl Strategy<Value = String> {
    (proptest::array::uniform9(0u32..10)).prop_map(|nine| {
        let check = BusinessRegistrationNumber::check_digit(nine);
        nine.iter()
            .chain(std::iter::once(&check))
            .map(|d| char::from_digit(*d, 10).expect("digit"))
            .collect()
    })
}

/// Names whose letters may differ from another's only in case: ASCII and Hangul, and the
/// letters whose lowercase is another script's (the Kelvin sign is a `k`) or longer (`İ`).
fn name_like() -> impl Strategy<Value = String> {
    "[aAbBkK \u{212A}\u{130}i\u{307}\u{3A3}\u{3C3}\u{3C2}\u{DF}S\u{AC00}\u{D30C}]{1,12}"
}

proptest! {
    #[test]
    fn names_are_the_same_exactly_when_their_lowercased_characters_are(a in name_like(), b in name_like(), same in any::<bool>()) {
        fn folded(s: &str) -> Vec<char> {
            s.chars().flat_map(char::to_lowercase).collect()
        }
        // Often the same text, or the same but for case, so that both outcomes are tried.
        let b = if same { a.to_uppercase() } else { b };
        let (Ok(x), Ok(y)) = (PersonOrBusinessName::parse(&a), PersonOrBusinessName::parse(&b)) else {
            return Ok(());
        };
        let expected = folded(x.as_str()) == folded(y.as_str());
        prop_assert_eq!(x.same_as(&y), expected, "{:?} and {:?}", x.as_str(), y.as_str());
        prop_assert_eq!(y.same_as(&x), expected);
        prop_assert!(x.same_as(&x));
    }

    #[test]
    fn valid_registration_numbers_round_trip(digits in valid_brn()) {
        let parsed = BusinessRegistrationNumber::parse(&digits).expect("valid");
        prop_assert_eq!(parsed.as_str(), digits.as_str());
        let hyphenated = parsed.hyphenated();
        prop_assert_eq!(BusinessRegistrationNumber::parse(&hyphenated).expect("hyphenated"), parsed);
    }

    #[test]
    fn synthetic_numbers_are_valid_and_distinct_per_serial(serial in 0u64..100_000_000) {
        let made = BusinessRegistrationNumber::from_serial(serial);
        prop_assert_eq!(BusinessRegistrationNumber::parse(made.as_str()).expect("valid"), made.clone());
        prop_assert_ne!(BusinessRegistrationNumber::from_serial(serial + 1), made);
    }

    #[test]
    fn every_single_digit_change_is_rejected(digits in valid_brn(), pos in 0usize..10, delta in 1u32..10) {
        let mut bytes = digits.into_bytes();
        let d = u32::from(bytes[pos] - b'0');
        bytes[pos] = b'0' + u8::try_from((d + delta) % 10).expect("digit");
        let changed = String::from_utf8(bytes).expect("ascii");
        prop_assert!(BusinessRegistrationNumber::parse(&changed).is_err(), "{}", changed);
    }

    #[test]
    fn registration_numbers_of_other_shapes_are_rejected(s in "\\PC{0,14}") {
        let digits: String = s.chars().filter(|c| *c != '-').collect();
        if digits.len() != 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            prop_assert!(BusinessRegistrationNumber::parse(&s).is_err());
        }
    }

    #[test]
    fn account_numbers_keep_their_digits_and_show_only_four(digits in "[0-9]{10,16}", hyphens in proptest::collection::vec(1usize..9, 0..3)) {
        let mut formatted = digits.clone();
        for at in hyphens {
            if at < formatted.len() {
                formatted.insert(at, '-');
            }
        }
        let account = AccountNumber::parse(&formatted).expect("valid");
        prop_assert_eq!(account.expose(), digits.as_str());
        prop_assert_eq!(account.masked(), format!("****{}", &digits[digits.len() - 4..]));
        let shown = format!("{account:?}");
        prop_assert!(!shown.contains(&digits[..digits.len() - 4]));
    }

    #[test]
    fn account_numbers_of_wrong_length_are_rejected(digits in "[0-9]{0,9}|[0-9]{17,20}") {
        prop_assert!(AccountNumber::parse(&digits).is_err());
    }
}

fn policy() -> Policy {
    Policy::from_toml(DEFAULT_POLICY_TOML).expect("shipped policy")
}

fn sales() -> impl Strategy<Value = i64> {
    prop_oneof![0..=2_000_000i64, 0..=MAX_WEEK_SALES_KRW]
}

/// At most one item per service, in arbitrary order.
fn items() -> impl Strategy<Value = Vec<LossItem>> {
    proptest::sample::subsequence(AffectedService::ALL.to_vec(), 1..=8)
        .prop_flat_map(|services| {
            let n = services.len();
            (
                Just(services),
                proptest::collection::vec((sales(), sales()), n),
            )
        })
        .prop_map(|(services, sales)| {
            services
                .into_iter()
                .zip(sales)
                .map(|(service, (baseline, outage))| {
                    LossItem::parse(service, baseline, outage).expect("in range")
                })
                .collect()
        })
        .prop_shuffle()
}

proptest! {
    #[test]
    fn compensation_is_never_negative_nor_above_the_cap(items in items()) {
        let p = policy();
        let d = p.decide(&items);
        prop_assert!(d.compensation_krw >= Krw::ZERO);
        prop_assert!(d.compensation_krw <= p.review_cap_krw.max(p.tiers.upper_compensation_krw));
        prop_assert!(d.recognized_loss_krw >= 0);
        prop_assert!(d.recognized_loss_krw <= d.reported_loss_krw);
        let expected_status = match d.tier {
            Tier::NotEligible => ClaimStatus::Rejected,
            Tier::Lower | Tier::Upper => ClaimStatus::Approved,
            Tier::Review => ClaimStatus::PendingReview,
        };
        prop_assert_eq!(d.status, expected_status);
    }

    #[test]
    fn the_order_of_items_does_not_matter(items in items()) {
        let p = policy();
        let mut reversed = items.clone();
        reversed.reverse();
        let (a, b) = (p.decide(&items), p.decide(&reversed));
        prop_assert_eq!(a.recognized_loss_krw, b.recognized_loss_krw);
        prop_assert_eq!(a.compensation_krw, b.compensation_krw);
        prop_assert_eq!(a.tier, b.tier);
    }

    #[test]
    fn more_loss_never_pays_less_within_the_automatic_tiers(
        items in items(), which in any::<proptest::sample::Index>(), extra in 0..=1_000_000i64
    ) {
        let p = policy();
        let before = p.decide(&items);
        let mut more = items.clone();
        let i = which.index(more.len());
        more[i].baseline_week_sales_krw = (more[i].baseline_week_sales_krw + extra).min(MAX_WEEK_SALES_KRW);
        let after = p.decide(&more);
        prop_assert!(after.recognized_loss_krw >= before.recognized_loss_krw);
        if after.tier != Tier::Review {
            prop_assert!(after.compensation_krw >= before.compensation_krw);
        }
    }

    #[test]
    fn recognised_loss_is_the_exact_integer_rule(items in items()) {
        let p = policy();
        let d = p.decide(&items);
        let mut sum: i128 = 0;
        for item in &items {
            let f = p.factors(item.service);
            let alt = if f.alternative_available { f.alternative_factor_bps } else { 10_000 };
            sum += i128::from(item.loss_krw())
                * i128::from(f.operating_margin_bps)
                * i128::from(f.kakao_share_bps)
                * i128::from(alt);
        }
        prop_assert_eq!(i128::from(d.recognized_loss_krw), sum / 1_000_000_000_000);
        prop_assert_eq!(d.breakdown.len(), items.len());
    }
}

#[test]
fn largest_inputs_do_not_overflow() {
    let p = policy();
    let items: Vec<LossItem> = AffectedService::ALL
        .iter()
        .map(|s| LossItem::parse(*s, MAX_WEEK_SALES_KRW, 0).expect("in range"))
        .collect();
    let d = p.decide(&items);
    assert_eq!(d.reported_loss_krw, 8 * MAX_WEEK_SALES_KRW);
    assert_eq!(d.tier, Tier::Review);
    assert!(LossItem::parse(AffectedService::Other, MAX_WEEK_SALES_KRW + 1, 0).is_err());
    assert!(LossItem::parse(AffectedService::Other, 0, -1).is_err());
}

#[test]
fn known_registration_numbers() {
    for valid in ["116-82-00276", "134-86-72683", "1168200276"] {
        assert!(BusinessRegistrationNumber::parse(valid).is_ok(), "{valid}");
    }
    for invalid in [
        "116-82-00277",
        "116820027",
        "11682002760",
        "116-8200276",
        "abc-de-fghij",
        "",
    ] {
        assert!(
            BusinessRegistrationNumber::parse(invalid).is_err(),
            "{invalid}"
        );
    }
}

/// C0 controls, DEL and C1 controls.
fn control() -> impl Strategy<Value = char> {
    prop_oneof![0u32..0x20, Just(0x7F), 0x80u32..0xA0]
        .prop_map(|u| char::from_u32(u).expect("a scalar value"))
}

fn bidi_control() -> impl Strategy<Value = char> {
    prop_oneof![0x202Au32..=0x202E, 0x2066u32..=0x2069]
        .prop_map(|u| char::from_u32(u).expect("a scalar value"))
}

/// Characters that show nothing, and whitespace.
fn blank() -> impl Strategy<Value = char> {
    proptest::sample::select(vec![
        ' ',
        '\u{A0}',
        '\u{3000}',
        '\u{AD}',
        '\u{200B}',
        '\u{200C}',
        '\u{200D}',
        '\u{200E}',
        '\u{2060}',
        '\u{2063}',
        '\u{FEFF}',
        '\u{115F}',
        '\u{1160}',
        '\u{3164}',
        '\u{FFA0}',
        '\u{FE0F}',
        '\u{E0041}',
        '\u{2800}',
        '\u{180E}',
    ])
}

/// A name a person or business really has: Hangul or Latin letters, digits, a few marks.
fn real_name() -> impl Strategy<Value = String> {
    "[가-힣A-Za-z0-9][가-힣A-Za-z0-9 .&'()-]{0,98}"
}

const SHA256: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

fn evidence_uri(uri: &str) -> Result<String, String> {
    Evidence::parse(EvidenceKind::SalesLossProof, uri, SHA256)
        .map(|e| e.uri)
        .map_err(|(field, why)| format!("{field}: {why}"))
}

proptest! {
    #[test]
    fn real_names_are_kept_as_written(name in real_name()) {
        let parsed = PersonOrBusinessName::parse(&name).expect("a real name");
        prop_assert_eq!(parsed.as_str(), name.trim());
    }

    #[test]
    fn names_with_a_control_or_bidi_character_are_refused(
        before in real_name(),
        c in prop_oneof![control(), bidi_control()],
        after in "[가-힣a-z]{1,10}",
    ) {
        let name = format!("{before}{c}{after}");
        prop_assert!(PersonOrBusinessName::parse(&name).is_err(), "{:?}", name);
    }

    #[test]
    fn names_that_show_nothing_are_refused(blanks in proptest::collection::vec(blank(), 1..12)) {
        let name: String = blanks.into_iter().collect();
        prop_assert!(PersonOrBusinessName::parse(&name).is_err(), "{:?}", name);
        prop_assert!(Reason::parse(&name).is_err(), "{:?}", name);
    }

    #[test]
    fn a_visible_character_among_invisible_ones_makes_a_name(
        blanks in proptest::collection::vec(blank(), 0..5),
        name in "[가-힣A-Za-z0-9][가-힣A-Za-z0-9 .&'()-]{0,80}",
    ) {
        let mut text: String = blanks.into_iter().collect();
        text.push_str(&name);
        prop_assert!(PersonOrBusinessName::parse(&text).is_ok(), "{:?}", text);
    }

    #[test]
    fn nothing_with_a_control_character_passes_any_text_check(
        before in "[a-z0-9]{1,10}",
        c in control(),
        after in "[a-z0-9]{1,10}",
    ) {
        let raw = format!("{before}{c}{after}");
        prop_assert!(PersonOrBusinessName::parse(&raw).is_err());
        prop_assert!(Reason::parse(&raw).is_err());
        prop_assert!(text::required_line(&raw, 100).is_err());
        prop_assert!(text::optional_line(&raw, 100).is_err());
        let email = format!("\"{raw}\"@example.com");
        prop_assert!(ContactEmail::parse(&email).is_err());
        let uri = format!("s3://bucket/{raw}");
        prop_assert!(evidence_uri(&uri).is_err());
        prop_assert!(SettlementLine::parse(&raw, 1, SettlementStatus::Settled, 0).is_err());
    }

    #[test]
    fn reasons_are_kept_up_to_the_cap_and_refused_past_it(
        word in "[가-힣a-z]{1,8}",
        chars in 1usize..=MAX_REASON_CHARS + 50,
    ) {
        let reason: String = word.chars().cycle().take(chars).collect();
        let parsed = Reason::parse(&reason);
        if chars <= MAX_REASON_CHARS {
            let parsed = parsed.expect("within the cap");
            prop_assert_eq!(parsed.as_str(), reason.as_str());
        } else {
            prop_assert!(parsed.is_err());
        }
    }

    #[test]
    fn evidence_is_kept_on_https_s3_and_gs_only(
        scheme in "[a-zA-Z][a-zA-Z0-9+.-]{0,8}",
        host in "[a-z0-9][a-z0-9.-]{0,20}",
        path in "(/[A-Za-z0-9._~%-]{0,12}){0,4}",
    ) {
        let uri = format!("{scheme}://{host}{path}");
        let kept = ["https", "s3", "gs"].iter().any(|s| s.eq_ignore_ascii_case(&scheme));
        prop_assert_eq!(evidence_uri(&uri).is_ok(), kept, "{}", uri);
        if kept {
            prop_assert_eq!(evidence_uri(&uri).expect("kept"), uri);
        }
    }

    #[test]
    fn timestamps_in_range_become_microseconds(
        seconds in MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS,
        nanos in 0i32..1_000_000_000,
    ) {
        let micros = parse_timestamp(&prost_types::Timestamp { seconds, nanos }).expect("in range");
        prop_assert_eq!(micros.div_euclid(1_000_000), seconds);
        prop_assert_eq!(micros.rem_euclid(1_000_000), i64::from(nanos / 1_000));
    }

    #[test]
    fn timestamps_out_of_range_are_refused(
        seconds in prop_oneof![i64::MIN..MIN_TIMESTAMP_SECONDS, MAX_TIMESTAMP_SECONDS + 1..=i64::MAX],
        nanos in prop_oneof![i32::MIN..0, 1_000_000_000i32..=i32::MAX, 0i32..1_000_000_000],
    ) {
        let out_of_range = prost_types::Timestamp { seconds, nanos };
        prop_assert!(parse_timestamp(&out_of_range).is_err());
        let valid_seconds = seconds.clamp(MIN_TIMESTAMP_SECONDS, MAX_TIMESTAMP_SECONDS);
        let bad = parse_timestamp(&prost_types::Timestamp { seconds: valid_seconds, nanos });
        prop_assert_eq!(bad.is_err(), !(0..1_000_000_000).contains(&nanos));
    }
}

fn claim_status() -> impl Strategy<Value = ClaimStatus> {
    proptest::sample::select(vec![
        ClaimStatus::Approved,
        ClaimStatus::PendingReview,
        ClaimStatus::Rejected,
    ])
}

fn disbursement_status() -> impl Strategy<Value = DisbursementStatus> {
    proptest::sample::select(DisbursementStatus::ALL.to_vec())
}

/// A few principals, so that the same one often acts twice; `local-dev` among them.
fn principal() -> impl Strategy<Value = &'static str> {
    proptest::sample::select(vec!["alice", "bob", "local-dev"])
}

fn review_decision() -> impl Strategy<Value = ReviewDecision> {
    prop_oneof![
        (1i64..=50_000).prop_map(|won| ReviewDecision::Approve {
            compensation_krw: Krw::new(won)
        }),
        Just(ReviewDecision::Reject),
    ]
}

proptest! {
    #[test]
    fn a_review_is_applied_only_by_another_principal_to_a_pending_claim_with_proof(
        status in claim_status(),
        submitted_by in principal(),
        reviewer in principal(),
        evidence_count in 0usize..3,
        decision in review_decision(),
    ) {
        let claim = UnderReview { status, submitted_by, evidence_count };
        let got = review(claim, reviewer, decision);
        let own = submitted_by == reviewer && reviewer != "local-dev";
        let approving = matches!(decision, ReviewDecision::Approve { .. });
        if own {
            prop_assert_eq!(got, Err(Refusal::SamePrincipal(FourEyes::ReviewOwnClaim)));
        } else if status != ClaimStatus::PendingReview {
            prop_assert_eq!(got, Err(Refusal::Review(ReviewRefused::NotPendingReview(status))));
        } else if approving && evidence_count == 0 {
            prop_assert_eq!(got, Err(Refusal::Review(ReviewRefused::EvidenceRequired)));
        } else {
            let expected = match decision {
                ReviewDecision::Approve { compensation_krw } => Reviewed {
                    status: ClaimStatus::Approved,
                    compensation_krw,
                },
                ReviewDecision::Reject => Reviewed { status: ClaimStatus::Rejected, compensation_krw: Krw::ZERO },
            };
            prop_assert_eq!(got, Ok(expected));
        }
    }

    #[test]
    fn an_approval_pays_from_one_won_up_to_the_review_cap(
        amount in prop_oneof![-2i64..=60_000, Just(i64::MIN), Just(i64::MAX)],
        cap in 1i64..=60_000,
    ) {
        let approved = ReviewDecision::approve(amount, cap);
        prop_assert_eq!(approved.is_ok(), amount >= 1 && amount <= cap);
        if let Ok(decision) = approved {
            prop_assert_eq!(decision, ReviewDecision::Approve { compensation_krw: Krw::new(amount) });
        }
        prop_assert_eq!(ReviewDecision::reject(amount).is_ok(), amount == 0);
    }

    #[test]
    fn only_a_failed_payout_is_retried_and_not_by_who_changed_its_account_since(
        status in disbursement_status(),
        create_time in 0i64..1_000,
        change in proptest::option::of((principal(), 0i64..1_000)),
        actor in principal(),
    ) {
        let account_change = change.map(|(changed_by, change_time)| AccountChange { changed_by, change_time });
        let got = may_retry(status, create_time, account_change, actor);
        let own_change = change.is_some_and(|(by, at)| at >= create_time && by == actor && by != "local-dev");
        if own_change {
            prop_assert_eq!(got, Err(Refusal::SamePrincipal(FourEyes::RetryAfterOwnAccountChange)));
        } else if status == DisbursementStatus::Failed {
            prop_assert_eq!(got, Ok(()));
        } else {
            prop_assert_eq!(got, Err(Refusal::NotRetryable(status)));
        }
    }

    #[test]
    fn only_a_queued_payout_is_cancelled(status in disbursement_status()) {
        let got = may_cancel(status);
        if status == DisbursementStatus::Queued {
            prop_assert_eq!(got, Ok(()));
        } else {
            prop_assert_eq!(got, Err(Refusal::NotCancellable(status)));
        }
    }

    #[test]
    fn a_report_line_matches_only_a_payout_paid_here_for_the_same_amount_under_its_key(
        their_status in proptest::sample::select(SettlementStatus::ALL.to_vec()),
        their_amount in 1i64..=3,
        ours in proptest::option::of((disbursement_status(), 1i64..=3, any::<bool>())),
    ) {
        let line = SettlementLine::parse("key-1", their_amount, their_status, 0).expect("valid line");
        let ours = ours.map(|(status, amount_krw, current_key)| OurPayout {
            status,
            amount_krw: Krw::new(amount_krw),
            failure_code: None,
            current_key,
        });
        let id = ours.map(|_| partner_payouts::domain::DisbursementId::from_uuid(uuid::Uuid::from_u128(1)));
        let verdict = judge(&line, ours.as_ref());
        let reopens = their_status == SettlementStatus::Returned
            && ours.is_some_and(|o| o.current_key && o.status == DisbursementStatus::Paid);
        prop_assert_eq!(verdict.reopen, reopens);
        let agrees = their_status == SettlementStatus::Settled
            && ours.is_some_and(|o| {
                o.current_key && o.status == DisbursementStatus::Paid && o.amount_krw == Krw::new(their_amount)
            });
        let reopening = if reopens { Reopening::Done } else { Reopening::NotAsked };
        let mismatch = verdict.into_mismatch(&line, id, ours.as_ref(), reopening);
        prop_assert_eq!(mismatch.is_none(), agrees);
        if let Some(m) = mismatch {
            prop_assert_eq!(m.idempotency_key.as_str(), "key-1");
            prop_assert_eq!(m.disbursement_id, id);
            prop_assert_eq!(m.their_amount_krw, Krw::new(their_amount));
            prop_assert_eq!(m.our_amount_krw, ours.map_or(Krw::ZERO, |o| o.amount_krw));
            prop_assert_eq!(m.reopened, reopens);
            let status_after = if reopens { Some(DisbursementStatus::Failed) } else { ours.map(|o| o.status) };
            prop_assert_eq!(m.status, status_after);
        }
    }
}
