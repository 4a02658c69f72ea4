//! Money: whole Korean won. The won has no minor unit in use, so an amount is an integer
//! count of won; sums and products are checked, and products are taken in `i128` so they
//! cannot wrap before the check.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An amount of whole KRW (may be negative only where a difference is meant). Stored and read
/// (policy files, a claim's decision) as the bare number of won.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Krw(i64);

impl Krw {
    pub const ZERO: Krw = Krw(0);

    pub const fn new(won: i64) -> Self {
        Self(won)
    }

    /// The amount in won.
    pub const fn won(self) -> i64 {
        self.0
    }

    pub fn checked_add(self, other: Krw) -> Option<Krw> {
        self.0.checked_add(other.0).map(Krw)
    }

    pub fn checked_sub(self, other: Krw) -> Option<Krw> {
        self.0.checked_sub(other.0).map(Krw)
    }

    /// `self × n`, or None past the range of `i64` won.
    pub fn checked_mul(self, n: i64) -> Option<Krw> {
        i64::try_from(i128::from(self.0) * i128::from(n))
            .ok()
            .map(Krw)
    }

    /// The sum of `amounts`, or None past the range of `i64` won.
    pub fn checked_sum(amounts: impl IntoIterator<Item = Krw>) -> Option<Krw> {
        let total: i128 = amounts.into_iter().map(|k| i128::from(k.0)).sum();
        i64::try_from(total).ok().map(Krw)
    }

    pub const fn is_positive(self) -> bool {
        self.0 > 0
    }
}

impl From<Krw> for i64 {
    fn from(amount: Krw) -> Self {
        amount.0
    }
}

impl fmt::Display for Krw {
    /// `30,000 KRW`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digits = self.0.unsigned_abs().to_string();
        let mut grouped = String::with_capacity(digits.len() + digits.len() / 3);
        for (i, d) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                grouped.push(',');
            }
            grouped.push(d);
        }
        let sign = if self.0 < 0 { "-" } else { "" };
        write!(f, "{sign}{grouped} KRW")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn sums_are_exact_or_refused(a in any::<i64>(), b in any::<i64>()) {
            let exact = i128::from(a) + i128::from(b);
            match Krw::new(a).checked_add(Krw::new(b)) {
                Some(sum) => prop_assert_eq!(i128::from(sum.won()), exact),
                None => prop_assert!(i64::try_from(exact).is_err()),
            }
            prop_assert_eq!(
                Krw::checked_sum([Krw::new(a), Krw::new(b)]),
                Krw::new(a).checked_add(Krw::new(b))
            );
        }

        #[test]
        fn products_are_exact_or_refused(a in any::<i64>(), n in any::<i64>()) {
            let exact = i128::from(a) * i128::from(n);
            match Krw::new(a).checked_mul(n) {
                Some(p) => prop_assert_eq!(i128::from(p.won()), exact),
                None => prop_assert!(i64::try_from(exact).is_err()),
            }
        }

        #[test]
        fn differences_are_exact_or_refused(a in any::<i64>(), b in any::<i64>()) {
            let exact = i128::from(a) - i128::from(b);
            match Krw::new(a).checked_sub(Krw::new(b)) {
                Some(d) => prop_assert_eq!(i128::from(d.won()), exact),
                None => prop_assert!(i64::try_from(exact).is_err()),
            }
        }
    }

    #[test]
    fn amounts_are_written_with_thousands_separators() {
        assert_eq!(Krw::new(30_000).to_string(), "30,000 KRW");
        assert_eq!(Krw::new(3_153_480_000).to_string(), "3,153,480,000 KRW");
        assert_eq!(Krw::new(999).to_string(), "999 KRW");
        assert_eq!(Krw::new(-50_000).to_string(), "-50,000 KRW");
        assert_eq!(Krw::ZERO.to_string(), "0 KRW");
        assert_eq!(
            Krw::new(i64::MIN).to_string(),
            "-9,223,372,036,854,775,808 KRW"
        );
    }

    #[test]
    fn the_sum_of_many_large_amounts_is_checked() {
        let many = std::iter::repeat_n(Krw::new(i64::MAX / 2), 3);
        assert_eq!(Krw::checked_sum(many), None);
        assert_eq!(
            Krw::checked_sum([Krw::new(30_000), Krw::new(50_000)]),
            Some(Krw::new(80_000))
        );
    }
}
