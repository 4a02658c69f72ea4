//! The PostgreSQL role replicas serve as, apart from the role that owns the schema:
//! `partner-payouts migrate --app-role ROLE` grants ROLE what `serve` (and `reseal`) needs
//! and no more. ROLE owns nothing, so it can neither alter a table nor drop or disable the
//! triggers that keep the histories and the audit log append-only; DELETE, UPDATE and
//! TRUNCATE of those are not granted to it.
//!
//! Every run revokes what ROLE held on the schema's tables and grants [`APP_GRANTS`] again,
//! in one transaction, so replicas serving meanwhile see the old grants or the new. Tables a
//! later migration adds are ROLE's once `migrate --app-role ROLE` has run again.

use std::collections::BTreeSet;

use anyhow::Context as _;
use sqlx::PgPool;

/// What the role that serves may do to each table of the schema; a table not listed is
/// granted nothing. The histories and the audit log ([`APPEND_ONLY`]) are read and appended
/// to, never changed.
pub const APP_GRANTS: &[(&str, &[Privilege])] = {
    use Privilege::{Delete, Insert, Select, Update};
    &[
        // `serve` with `migrate = false` checks that the schema is current.
        ("_sqlx_migrations", &[Select]),
        ("partners", &[Select, Insert, Update]),
        // A request id taken by a batch row that is then refused is given back.
        ("idempotency", &[Select, Insert, Update, Delete]),
        ("claims", &[Select, Insert, Update]),
        ("evidence", &[Select, Insert]),
        ("disbursements", &[Select, Insert, Update]),
        ("disbursement_attempts", &[Select, Insert]),
        ("disbursement_events", &[Select, Insert]),
        // A payout's row leaves the outbox once it is settled or cancelled.
        ("outbox", &[Select, Insert, Update, Delete]),
        ("dispatch_control", &[Select, Update]),
        ("audit_events", &[Select, Insert]),
        ("settlement_runs", &[Select, Insert, Update]),
        ("settlement_lines", &[Select, Insert]),
        // `reseal` seals the probe again under the first key.
        ("pii_key_probe", &[Select, Insert, Update]),
        // The change feed: appended to with each change, read by the watchers.
        ("change_events", &[Select, Insert]),
        // The programme's figures: added to by the triggers of the statements that change
        // claims and disbursements, folded (rows deleted, their sum inserted) by readers.
        ("program_totals", &[Select, Insert, Delete]),
    ]
};

/// The tables whose rows, once written, stand: the audit log, each payout's status history
/// and attempts, and the change feed.
pub const APPEND_ONLY: &[&str] = &[
    "audit_events",
    "disbursement_events",
    "disbursement_attempts",
    "change_events",
];

/// A table privilege of PostgreSQL's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Privilege {
    Select,
    Insert,
    Update,
    Delete,
    Truncate,
    References,
    Trigger,
}

impl Privilege {
    pub const ALL: [Privilege; 7] = [
        Self::Select,
        Self::Insert,
        Self::Update,
        Self::Delete,
        Self::Truncate,
        Self::References,
        Self::Trigger,
    ];

    pub fn keyword(self) -> &'static str {
        match self {
            Self::Select => "SELECT",
            Self::Insert => "INSERT",
            Self::Update => "UPDATE",
            Self::Delete => "DELETE",
            Self::Truncate => "TRUNCATE",
            Self::References => "REFERENCES",
            Self::Trigger => "TRIGGER",
        }
    }
}

/// What the role that serves is granted on `table`: nothing if it is not in [`APP_GRANTS`].
pub fn granted(table: &str) -> &'static [Privilege] {
    APP_GRANTS
        .iter()
        .find(|(name, _)| *name == table)
        .map_or(&[], |(_, privileges)| privileges)
}

/// The name of the role replicas serve as, checked before it is written into any statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppRole(String);

impl AppRole {
    pub fn parse(name: &str) -> Result<Self, String> {
        if name.is_empty() || name.len() > 63 {
            return Err("--app-role: a role name is 1 to 63 bytes long".into());
        }
        if name.chars().any(char::is_control) {
            return Err("--app-role: a role name has no control characters".into());
        }
        let lower = name.to_ascii_lowercase();
        if lower.starts_with("pg_")
            || [
                "public",
                "none",
                "current_user",
                "current_role",
                "session_user",
            ]
            .contains(&lower.as_str())
        {
            return Err(format!(
                "--app-role: {name:?} is reserved by PostgreSQL; name a role of your own"
            ));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn name(&self) -> &str {
        &self.0
    }
}

/// Serialises runs of `grant` on one database (they revoke and grant the same rows).
const GRANT_LOCK: i64 = 0x7061_796f_7574_7301;

/// Grants `role` what [`APP_GRANTS`] lists on the tables of the current schema, and nothing
/// else there, creating the role (LOGIN, no password) if it does not exist. Refuses a role
/// that could do more whatever it is granted: a superuser, one that may create roles, the
/// role running this or one that is a member of it, one that owns anything in the database.
pub async fn grant(pool: &PgPool, role: &AppRole) -> anyhow::Result<()> {
    let (quoted, schema): (String, String) =
        sqlx::query_as("SELECT quote_ident($1), quote_ident(current_schema())")
            .bind(role.name())
            .fetch_one(pool)
            .await?;
    create_if_missing(pool, role, &quoted).await?;
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(GRANT_LOCK)
        .execute(&mut *tx)
        .await?;
    refuse_powerful(&mut tx, role).await?;
    for statement in [
        format!("REVOKE ALL ON ALL TABLES IN SCHEMA {schema} FROM {quoted}"),
        format!("REVOKE ALL ON ALL SEQUENCES IN SCHEMA {schema} FROM {quoted}"),
    ] {
        execute(&mut tx, statement).await?;
    }
    let (has_usage,): (bool,) =
        sqlx::query_as("SELECT has_schema_privilege($1::text::name, current_schema(), 'USAGE')")
            .bind(role.name())
            .fetch_one(&mut *tx)
            .await?;
    if !has_usage {
        execute(
            &mut tx,
            format!("GRANT USAGE ON SCHEMA {schema} TO {quoted}"),
        )
        .await?;
    }
    let present = tables(&mut tx).await?;
    for (table, privileges) in APP_GRANTS.iter().filter(|(t, _)| present.contains(*t)) {
        let list: Vec<_> = privileges.iter().map(|p| p.keyword()).collect();
        let statement = format!(
            "GRANT {} ON TABLE {schema}.{table} TO {quoted}",
            list.join(", ")
        );
        execute(&mut tx, statement).await?;
    }
    check_effective(&mut tx, role).await?;
    tx.commit().await?;
    tracing::info!(
        role = role.name(),
        tables = present.len(),
        "the role may serve: it reads and writes what serve needs, owns nothing, and may \
         neither change nor remove the audit log and the status history"
    );
    Ok(())
}

type Tx = sqlx::Transaction<'static, sqlx::Postgres>;

async fn execute(tx: &mut Tx, statement: String) -> anyhow::Result<()> {
    sqlx::query(sqlx::AssertSqlSafe(statement.clone()))
        .execute(&mut **tx)
        .await
        .with_context(|| statement)?;
    Ok(())
}

/// The tables (and views) of the current schema.
async fn tables(tx: &mut Tx) -> anyhow::Result<BTreeSet<String>> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT relname::text FROM pg_class \
         WHERE relnamespace = current_schema()::regnamespace AND relkind IN ('r', 'p', 'v', 'm', 'f')",
    )
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.into_iter().map(|(t,)| t).collect())
}

async fn create_if_missing(pool: &PgPool, role: &AppRole, quoted: &str) -> anyhow::Result<()> {
    let (exists,): (bool,) =
        sqlx::query_as("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
            .bind(role.name())
            .fetch_one(pool)
            .await?;
    if exists {
        return Ok(());
    }
    let created = sqlx::query(sqlx::AssertSqlSafe(format!("CREATE ROLE {quoted} LOGIN")))
        .execute(pool)
        .await;
    match created {
        Ok(_) => {
            tracing::info!(
                role = role.name(),
                "created the role (LOGIN, no password): give it a password (ALTER ROLE .. \
                 PASSWORD) or another way to authenticate"
            );
            Ok(())
        }
        // Another run created it meanwhile.
        Err(sqlx::Error::Database(e)) if matches!(e.code().as_deref(), Some("42710" | "23505")) => {
            Ok(())
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!(
            "role {} does not exist and could not be created: create it (CREATE ROLE .. LOGIN) \
             or run migrate as a role that may create roles",
            role.name()
        ))),
    }
}

/// Refuses a role that grants could not hold back.
async fn refuse_powerful(tx: &mut Tx, role: &AppRole) -> anyhow::Result<()> {
    let (superuser, createrole, is_us, member_of_us, owns, owns_database): (
        bool,
        bool,
        bool,
        bool,
        i64,
        bool,
    ) = sqlx::query_as(
        "SELECT r.rolsuper, r.rolcreaterole, r.rolname = current_user, \
                pg_has_role(r.oid, current_user::text::name, 'MEMBER'), \
                (SELECT count(*) FROM pg_shdepend d JOIN pg_database db ON db.oid = d.dbid \
                 WHERE db.datname = current_database() AND d.deptype = 'o' \
                   AND d.refclassid = 'pg_authid'::regclass AND d.refobjid = r.oid), \
                (SELECT datdba = r.oid FROM pg_database WHERE datname = current_database()) \
         FROM pg_roles r WHERE r.rolname = $1",
    )
    .bind(role.name())
    .fetch_one(&mut **tx)
    .await?;
    let name = role.name();
    let why = if superuser {
        "is a superuser"
    } else if createrole {
        "may create roles (and so grant itself others)"
    } else if is_us {
        "is the role running migrate, which owns the schema"
    } else if member_of_us {
        "is a member of the role running migrate, which owns the schema"
    } else if owns_database {
        "owns the database"
    } else if owns > 0 {
        return Err(anyhow::anyhow!(
            "--app-role {name} owns {owns} object(s) in this database, so it could alter them: \
             give them to the owner first (as a superuser: REASSIGN OWNED BY {name} TO <owner>)"
        ));
    } else {
        return Ok(());
    };
    anyhow::bail!("--app-role {name} {why}: it could do more than serve; name another role")
}

/// Fails unless what `role` may do to each table of the schema is exactly what
/// [`APP_GRANTS`] gives it, and it owns none: a grant to PUBLIC, or to a role it belongs to
/// (`pg_write_all_data`, say), would give it more.
async fn check_effective(tx: &mut Tx, role: &AppRole) -> anyhow::Result<()> {
    let keywords: Vec<&str> = Privilege::ALL.iter().map(|p| p.keyword()).collect();
    let rows: Vec<(String, String, bool, bool)> = sqlx::query_as(
        "SELECT c.relname::text, p.privilege, \
                has_table_privilege($1::text::name, c.oid, p.privilege), \
                pg_has_role($1::text::name, c.relowner, 'MEMBER') \
         FROM pg_class c CROSS JOIN unnest($2::text[]) AS p(privilege) \
         WHERE c.relnamespace = current_schema()::regnamespace \
           AND c.relkind IN ('r', 'p', 'v', 'm', 'f')",
    )
    .bind(role.name())
    .bind(&keywords)
    .fetch_all(&mut **tx)
    .await?;
    let mut excess = BTreeSet::new();
    for (table, privilege, has, owns) in rows {
        if owns {
            anyhow::bail!(
                "--app-role {} owns (or may act as the owner of) table {table}",
                role.name()
            );
        }
        let expected = granted(&table).iter().any(|p| p.keyword() == privilege);
        if has && !expected {
            excess.insert(format!("{privilege} on {table}"));
        }
    }
    if !excess.is_empty() {
        anyhow::bail!(
            "--app-role {} would still have {} through PUBLIC or a role it belongs to: revoke \
             that first",
            role.name(),
            excess.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_histories_and_the_audit_log_are_only_read_and_appended_to() {
        for table in APPEND_ONLY {
            assert_eq!(
                granted(table),
                &[Privilege::Select, Privilege::Insert],
                "{table}"
            );
        }
        assert!(
            APP_GRANTS
                .iter()
                .all(|(_, p)| !p.contains(&Privilege::Truncate)
                    && !p.contains(&Privilege::References)
                    && !p.contains(&Privilege::Trigger)),
            "serve truncates nothing, and needs neither REFERENCES nor TRIGGER"
        );
    }

    #[test]
    fn reserved_and_malformed_role_names_are_refused() {
        assert_eq!(AppRole::parse("payouts_app").unwrap().name(), "payouts_app");
        assert!(
            AppRole::parse("Payouts \"App\"").is_ok(),
            "quoted when used"
        );
        for bad in [
            "",
            "pg_monitor",
            "PUBLIC",
            "current_user",
            "a\nb",
            &"x".repeat(64),
        ] {
            let refused = AppRole::parse(bad).expect_err(bad);
            assert!(refused.starts_with("--app-role"), "{refused}");
        }
    }
}
