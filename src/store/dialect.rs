//! What a store declares of its database for the SQL both databases share (`sql/mod.rs`):
//! its `Db`, `SqlStore`, `DB_SYSTEM`, and the `dialect` statements that lock rows, written
//! once with the lock clauses as the database takes them.

/// Includes the shared SQL module tree in the store that invokes it, for the database `db`,
/// the store type `store` and its trace name `system`. `for_update` ends a select that locks
/// the rows it reads until commit, `skip_locked` one that passes over rows another
/// transaction holds; the items that follow join `dialect` as they are.
macro_rules! store_sql {
    (
        db: $db:ty,
        store: $store:ty,
        system: $system:literal,
        for_update: $for_update:literal,
        skip_locked: $skip_locked:literal,
        $($item:item)*
    ) => {
        // The SQL both databases share, compiled here for this one (and in the other store
        // for the other): the same module tree on purpose.
        #[allow(clippy::duplicate_mod)]
        #[path = "sql/mod.rs"]
        mod sql;

        type Db = $db;
        type SqlStore = $store;
        const DB_SYSTEM: &str = $system;

        /// The statements whose row locks differ between the databases.
        mod dialect {
            pub const LOCK_PARTNER: &str = concat!(
                "SELECT partner_id FROM partners WHERE partner_id = $1",
                $for_update
            );
            pub const LOCK_CLAIM: &str =
                concat!("SELECT claim_id FROM claims WHERE claim_id = $1", $for_update);
            pub const LOCK_DISBURSEMENT: &str = concat!(
                "SELECT disbursement_id FROM disbursements WHERE disbursement_id = $1",
                $for_update
            );
            pub const LOCK_DISPATCH_CONTROL: &str =
                concat!("SELECT id FROM dispatch_control WHERE id = 1", $for_update);
            /// The tail of a select of partners by id that locks them, in id order.
            pub const IN_PARTNER_ORDER_LOCKED: &str = concat!(" ORDER BY partner_id", $for_update);
            pub const LEASE_DUE: &str = concat!(
                "UPDATE outbox SET lease_until = $1 WHERE disbursement_id IN (\
                 SELECT disbursement_id FROM outbox WHERE due_time <= $2 AND lease_until <= $2 \
                 ORDER BY due_time LIMIT $3",
                $skip_locked,
                ") RETURNING disbursement_id"
            );
            /// The tail of a select of rows to re-seal: rows another transaction holds are
            /// passed over where the database can (a later pass finds them), so a re-sealing
            /// batch never waits for a lock it could deadlock on.
            pub const SKIP_LOCKED: &str = $skip_locked;
            $($item)*
        }
    };
}
