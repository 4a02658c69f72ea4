//! What one database declares for the SQL both share: [`store!`].

/// Declares, in the module that includes this module tree, a store over one database:
///
/// - `$store`, the store: a pool of `$db` connections and the cipher of account numbers;
/// - `MIGRATOR`, its migrations, from the directory `$migrations`;
/// - `Db`, `SqlStore` and `DB_SYSTEM` (`$system`, as traces name the database), as the
///   shared SQL names them;
/// - `dialect`, the statements that lock rows. With `row_locks: $lock, $skip`, `$lock` ends
///   a select that holds its rows until commit and `$skip` follows it where the select
///   passes over rows another transaction holds; with `no_row_locks` nothing does (a writing
///   transaction holds the whole database).
macro_rules! store {
    (
        $(#[$doc:meta])* $store:ident: $db:ty, $system:literal, $migrations:literal;
        $(#[$locks_doc:meta])* no_row_locks;
    ) => {
        store! {
            $(#[$doc])* $store: $db, $system, $migrations;
            $(#[$locks_doc])* row_locks: "", "";
        }
    };
    (
        $(#[$doc:meta])* $store:ident: $db:ty, $system:literal, $migrations:literal;
        $(#[$locks_doc:meta])* row_locks: $lock:literal, $skip:literal;
    ) => {
        $(#[$doc])*
        #[derive(Clone)]
        pub struct $store {
            pool: sqlx::Pool<$db>,
            cipher: std::sync::Arc<crate::sealing::PiiCipher>,
        }

        static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!($migrations);

        type Db = $db;
        type SqlStore = $store;
        const DB_SYSTEM: &str = $system;

        $(#[$locks_doc])*
        mod dialect {
            pub const LOCK_PARTNER: &str =
                concat!("SELECT partner_id FROM partners WHERE partner_id = $1", $lock);
            pub const LOCK_CLAIM: &str =
                concat!("SELECT claim_id FROM claims WHERE claim_id = $1", $lock);
            pub const LOCK_DISBURSEMENT: &str = concat!(
                "SELECT disbursement_id FROM disbursements WHERE disbursement_id = $1",
                $lock
            );
            pub const LOCK_DISPATCH_CONTROL: &str =
                concat!("SELECT id FROM dispatch_control WHERE id = 1", $lock);
            /// The tail of a select of partners by id that locks them, in id order.
            pub const IN_PARTNER_ORDER_LOCKED: &str = concat!(" ORDER BY partner_id", $lock);
            pub const LEASE_DUE: &str = concat!(
                "UPDATE outbox SET lease_until = $1 WHERE disbursement_id IN (",
                "SELECT disbursement_id FROM outbox WHERE due_time <= $2 AND lease_until <= $2 ",
                "ORDER BY due_time LIMIT $3",
                $lock,
                $skip,
                ") RETURNING disbursement_id"
            );
        }
    };
}
