//! Property tests for the domain rules: identifiers, the compensation policy, and the text and
//! times callers send.

use partner_payouts::api::convert::{
    MAX_TIMESTAMP_SECONDS, MIN_TIMESTAMP_SECONDS, parse_timestamp,
};
use partner_payouts::domain::text::{self, MAX_REASON_CHARS, Reason};
use partner_payouts::domain::{
    AccountNumber, AffectedService, BusinessRegistrationNumber, ClaimStatus, ContactEmail,
    DEFAULT_POLICY_TOML, Evidence, EvidenceKind, LossItem, MAX_WEEK_SALES_KRW,
    PersonOrBusinessName, Policy, SettlementLine, SettlementStatus, Tier,
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

proptest! {
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
        prop_assert!(d.compensation_krw >= 0);
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
