//! A business partner: registration number, names, payout account, contact.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{Invalid, text};

/// Serde reads each of these text types through its `parse` (`try_from = "String"`), so a
/// stored or received value is checked as a caller's would be, and writes it as its text.
macro_rules! string_conversions {
    ($($name:ident),+ $(,)?) => {$(
        impl TryFrom<String> for $name {
            type Error = Invalid;
            fn try_from(value: String) -> Result<Self, Invalid> {
                Self::parse(&value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> Self {
                value.0
            }
        }
    )+};
}

string_conversions!(
    BusinessRegistrationNumber,
    BankCode,
    AccountNumber,
    PersonOrBusinessName,
    ContactEmail,
);

/// 사업자등록번호: 10 digits, the last a check digit. Stored and shown without hyphens.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BusinessRegistrationNumber(String);

const BRN_WEIGHTS: [u32; 9] = [1, 3, 7, 1, 3, 7, 1, 3, 5];

impl BusinessRegistrationNumber {
    /// Accepts `XXX-XX-XXXXX` or ten plain digits.
    pub fn parse(input: &str) -> Result<Self, Invalid> {
        let input = input.trim();
        let hyphenated =
            input.len() == 12 && input.as_bytes()[3] == b'-' && input.as_bytes()[6] == b'-';
        let digits: String = if hyphenated {
            input.chars().filter(|c| *c != '-').collect()
        } else {
            input.to_owned()
        };
        if digits.len() != 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Invalid::new(
                "must be 10 digits, written XXX-XX-XXXXX or without hyphens",
            ));
        }
        let d: Vec<u32> = digits.bytes().map(|b| u32::from(b - b'0')).collect();
        if Self::check_digit(d[..9].try_into().expect("nine digits")) != d[9] {
            return Err(Invalid::new("check digit does not match"));
        }
        Ok(Self(digits))
    }

    /// The check digit of the first nine digits, as the National Tax Service computes it.
    pub fn check_digit(first_nine: [u32; 9]) -> u32 {
        let weighted: u32 = first_nine.iter().zip(BRN_WEIGHTS).map(|(d, w)| d * w).sum();
        let sum = weighted + first_nine[8] * 5 / 10;
        (10 - sum % 10) % 10
    }

    /// A valid number made from `serial` (its last nine digits, the first never 0) and the
    /// check digit: synthetic partners for tests and load generation.
    pub fn from_serial(serial: u64) -> Self {
        let mut first_nine = [0u32; 9];
        let mut rest = serial;
        for d in first_nine.iter_mut().rev() {
            *d = u32::try_from(rest % 10).expect("a decimal digit");
            rest /= 10;
        }
        first_nine[0] = 1 + first_nine[0] % 9;
        let check = Self::check_digit(first_nine);
        Self(
            first_nine
                .iter()
                .chain(std::iter::once(&check))
                .map(|d| char::from_digit(*d, 10).expect("a decimal digit"))
                .collect(),
        )
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `XXX-XX-XXXXX`.
    pub fn hyphenated(&self) -> String {
        format!("{}-{}-{}", &self.0[..3], &self.0[3..5], &self.0[5..])
    }
}

impl fmt::Debug for BusinessRegistrationNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hyphenated())
    }
}

/// The KFTC codes of the banks that take payouts, with their names.
pub const BANKS: &[(&str, &str)] = &[
    ("002", "KDB"),
    ("003", "IBK"),
    ("004", "KB Kookmin"),
    ("007", "Suhyup"),
    ("011", "NH"),
    ("012", "local Nonghyup"),
    ("020", "Woori"),
    ("023", "SC First"),
    ("027", "Citi"),
    ("031", "Daegu (iM)"),
    ("032", "Busan"),
    ("034", "Gwangju"),
    ("035", "Jeju"),
    ("037", "Jeonbuk"),
    ("039", "Kyongnam"),
    ("045", "MG Saemaul"),
    ("048", "Shinhyup"),
    ("071", "Post Office"),
    ("081", "Hana"),
    ("088", "Shinhan"),
    ("089", "K Bank"),
    ("090", "Kakao Bank"),
    ("092", "Toss Bank"),
];

/// A 3-digit KFTC bank code from [`BANKS`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BankCode(String);

impl BankCode {
    pub fn parse(input: &str) -> Result<Self, Invalid> {
        let code = input.trim();
        if BANKS.iter().any(|(c, _)| *c == code) {
            Ok(Self(code.to_owned()))
        } else {
            Err(Invalid::new(
                "must be a 3-digit KFTC bank code of a participating bank, e.g. 004",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An account number: 10 to 16 digits. Debug shows only the last 4.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AccountNumber(String);

impl AccountNumber {
    /// Hyphens and spaces are formatting and are removed.
    pub fn parse(input: &str) -> Result<Self, Invalid> {
        let digits: String = input.chars().filter(|c| *c != '-' && *c != ' ').collect();
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Invalid::new(
                "must contain only digits (hyphens and spaces allowed)",
            ));
        }
        if !(10..=16).contains(&digits.len()) {
            return Err(Invalid::new("must have 10 to 16 digits"));
        }
        Ok(Self(digits))
    }

    /// The full number: only for the instruction sent to the payments backend.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn last4(&self) -> &str {
        &self.0[self.0.len() - 4..]
    }

    /// `****1234`: what responses, logs and errors show.
    pub fn masked(&self) -> String {
        masked(self.last4())
    }
}

/// The version in quotes: `"3"`.
fn etag_of(version: i64) -> String {
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(version);
    let mut etag = String::with_capacity(digits.len() + 2);
    etag.push('"');
    etag.push_str(digits);
    etag.push('"');
    etag
}

/// `****` and the last digits: an account number as it may be shown.
fn masked(last4: &str) -> String {
    let mut shown = String::with_capacity(4 + last4.len());
    shown.push_str("****");
    shown.push_str(last4);
    shown
}

impl fmt::Debug for AccountNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

/// A legal, representative or account-holder name: trimmed, 1 to 100 characters, something
/// visible (not only invisible or format characters), no control characters and no
/// bidirectional embedding, override or isolate characters (which make a name read as another).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PersonOrBusinessName(String);

impl PersonOrBusinessName {
    pub const MAX_CHARS: usize = 100;

    pub fn parse(input: &str) -> Result<Self, Invalid> {
        let name = Self::from_stored(input)?;
        if name.0.chars().any(text::is_bidi_control) {
            return Err(Invalid::new(
                "must not contain bidirectional embedding, override or isolate characters \
                 (U+202A to U+202E, U+2066 to U+2069)",
            ));
        }
        if !text::has_visible(&name.0) {
            return Err(Invalid::new(
                "must contain visible characters, not only invisible or formatting ones",
            ));
        }
        Ok(name)
    }

    /// A name read back from storage, under the rules it was first stored by: trimmed, 1 to
    /// 100 characters, no control characters. Names stored before [`Self::parse`] refused
    /// invisible and bidirectional characters stay readable.
    pub fn from_stored(input: &str) -> Result<Self, Invalid> {
        let name = input.trim();
        let len = name.chars().count();
        if len == 0 {
            return Err(Invalid::new("must not be empty"));
        }
        if len > Self::MAX_CHARS {
            return Err(Invalid::new("must be at most 100 characters"));
        }
        text::check_no_controls(name)?;
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Names are compared with Latin letters case-folded ("ACME Shop" = "acme shop").
    pub fn same_as(&self, other: &Self) -> bool {
        let (a, b) = (self.0.as_str(), other.0.as_str());
        // The same text, or ASCII text equal but for case, without folding char by char.
        if a == b || (a.is_ascii() && b.is_ascii()) {
            return a.eq_ignore_ascii_case(b);
        }
        folded_equal(a, b)
    }
}

/// A contact e-mail address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ContactEmail(String);

impl ContactEmail {
    pub fn parse(input: &str) -> Result<Self, Invalid> {
        // The address grammar takes any non-ASCII character in a quoted local part.
        if input
            .trim()
            .chars()
            .any(|c| text::is_control(c) || text::is_invisible(c))
        {
            return Err(Invalid::new(
                "must not contain control, invisible or formatting characters",
            ));
        }
        Self::from_stored(input)
    }

    /// An address read back from storage, under the rules it was first stored by (before
    /// [`Self::parse`] refused control and invisible characters).
    pub fn from_stored(input: &str) -> Result<Self, Invalid> {
        let email = input.trim();
        if email.len() > 254 {
            return Err(Invalid::new("must be at most 254 characters"));
        }
        match email.parse::<email_address::EmailAddress>() {
            Ok(_) if email.contains('.') => Ok(Self(email.to_owned())),
            _ => Err(Invalid::new(
                "must be an e-mail address such as owner@example.com",
            )),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `a` and `b` equal once every character is lowercased.
fn folded_equal(a: &str, b: &str) -> bool {
    fn fold(s: &str) -> impl Iterator<Item = char> + '_ {
        s.chars().flat_map(char::to_lowercase)
    }
    fold(a).eq(fold(b))
}

/// A Kakao service through which sales were lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AffectedService {
    KakaotalkChannel,
    OrderAlerts,
    KakaoPay,
    GiftShop,
    KakaoT,
    KakaoMap,
    KakaoLogin,
    Other,
}

impl AffectedService {
    pub const ALL: [AffectedService; 8] = [
        Self::KakaotalkChannel,
        Self::OrderAlerts,
        Self::KakaoPay,
        Self::GiftShop,
        Self::KakaoT,
        Self::KakaoMap,
        Self::KakaoLogin,
        Self::Other,
    ];

    /// The name used in policy files and storage.
    pub fn key(self) -> &'static str {
        match self {
            Self::KakaotalkChannel => "kakaotalk_channel",
            Self::OrderAlerts => "order_alerts",
            Self::KakaoPay => "kakao_pay",
            Self::GiftShop => "gift_shop",
            Self::KakaoT => "kakao_t",
            Self::KakaoMap => "kakao_map",
            Self::KakaoLogin => "kakao_login",
            Self::Other => "other",
        }
    }

    pub fn from_key(key: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.key() == key)
    }
}

/// The account a partner is paid into. It is in the business's or the representative's name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BankAccount {
    pub bank_code: BankCode,
    pub account_number: AccountNumber,
    pub holder_name: PersonOrBusinessName,
}

impl BankAccount {
    /// The holder must be the business itself or its representative.
    pub fn check_holder(
        &self,
        legal_name: &PersonOrBusinessName,
        representative_name: &PersonOrBusinessName,
    ) -> Result<(), Invalid> {
        if self.holder_name.same_as(legal_name) || self.holder_name.same_as(representative_name) {
            Ok(())
        } else {
            Err(Invalid::new(
                "must be the partner's legal name or its representative's name",
            ))
        }
    }
}

/// A payout account as kept on file: the number itself is stored sealed, so all that can be
/// shown of it is its last 4 digits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountOnFile {
    pub bank_code: BankCode,
    pub account_last4: String,
    pub holder_name: PersonOrBusinessName,
}

impl AccountOnFile {
    /// `****1234`.
    pub fn masked(&self) -> String {
        masked(&self.account_last4)
    }
}

impl From<&BankAccount> for AccountOnFile {
    fn from(account: &BankAccount) -> Self {
        Self {
            bank_code: account.bank_code.clone(),
            account_last4: account.account_number.last4().to_owned(),
            holder_name: account.holder_name.clone(),
        }
    }
}

/// Who a partner is: everything but the payout account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartnerProfile {
    pub business_registration_number: BusinessRegistrationNumber,
    pub legal_name: PersonOrBusinessName,
    pub representative_name: PersonOrBusinessName,
    /// Sorted, without repeats.
    pub affected_services: Vec<AffectedService>,
    pub contact_email: ContactEmail,
}

/// A partner as registered, before the store gives it an id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPartner {
    pub profile: PartnerProfile,
    pub bank_account: BankAccount,
}

impl NewPartner {
    /// The partner as first stored under `partner_id` at `now` (Unix microseconds).
    pub fn registered(&self, partner_id: super::PartnerId, now: i64) -> Partner {
        Partner {
            partner_id,
            profile: self.profile.clone(),
            bank_account: AccountOnFile::from(&self.bank_account),
            create_time: now,
            update_time: now,
            version: 1,
        }
    }
}

/// A registered partner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partner {
    pub partner_id: super::PartnerId,
    pub profile: PartnerProfile,
    pub bank_account: AccountOnFile,
    /// Unix microseconds.
    pub create_time: i64,
    pub update_time: i64,
    /// Bumped on every change; the etag is made from it.
    pub version: i64,
}

impl Partner {
    pub fn etag(&self) -> String {
        etag_of(self.version)
    }
}

#[cfg(test)]
mod shown {
    use super::*;

    #[test]
    fn an_etag_is_the_version_in_quotes_and_a_mask_keeps_the_last_digits() {
        for version in [0, 1, 9, 10, 12_345, -1, i64::MAX, i64::MIN] {
            assert_eq!(etag_of(version), format!("\"{version}\""));
        }
        assert_eq!(masked("6789"), "****6789");
    }
}
