//! Ids that say what they name: a `ClaimId` cannot be passed where a `PartnerId` is meant.
//!
//! Every id is a UUIDv7 (its first bits are its creation time, so ids sort by age), written
//! as the usual 36-character hyphenated text.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(Uuid);

        impl $name {
            /// A new id, ordered after every id made before it.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            pub const fn from_uuid(id: Uuid) -> Self {
                Self(id)
            }

            pub const fn as_uuid(&self) -> Uuid {
                self.0
            }

            /// The id as text: what `to_string` gives, without the formatter.
            pub fn text(&self) -> String {
                uuid_text(self.0)
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl From<Uuid> for $name {
            fn from(id: Uuid) -> Self {
                Self(id)
            }
        }

        impl From<$name> for Uuid {
            fn from(id: $name) -> Self {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

/// `id` as its hyphenated lowercase text, as `Display` writes it, without the formatter (the
/// batch inserts write several per row).
pub fn uuid_text(id: Uuid) -> String {
    id.hyphenated()
        .encode_lower(&mut Uuid::encode_buffer())
        .to_owned()
}

id_type!(
    /// A registered business partner.
    PartnerId
);
id_type!(
    /// A partner's claim for compensation.
    ClaimId
);
id_type!(
    /// The payout of an approved claim.
    DisbursementId
);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn an_id_reads_back_from_its_text(bits in any::<u128>()) {
            let id = ClaimId::from_uuid(Uuid::from_u128(bits));
            prop_assert_eq!(id.to_string().parse::<ClaimId>().unwrap(), id);
            prop_assert_eq!(id.text(), id.to_string());
            prop_assert_eq!(uuid_text(Uuid::from_u128(bits)), Uuid::from_u128(bits).to_string());
            prop_assert_eq!(Uuid::from(id), Uuid::from_u128(bits));
        }
    }

    #[test]
    fn new_ids_sort_by_age() {
        let first = PartnerId::new();
        let second = PartnerId::new();
        assert!(first < second);
        assert_eq!(first.to_string().len(), 36);
    }

    #[test]
    fn text_that_is_not_an_id_is_refused() {
        assert!("not-an-id".parse::<DisbursementId>().is_err());
        assert!("".parse::<PartnerId>().is_err());
    }
}
