//! Who may change the schema: `partner-payouts migrate` (no account-number key) as the role
//! that owns it, and replicas that serve as an app role it granted what `serve` needs and no
//! more, so that the audit log and the status history cannot be changed or removed by the
//! role that serves calls.

use std::process::Output;

use base64::Engine as _;
use partner_payouts::app::Application;
use partner_payouts::config::Settings;
use partner_payouts::proto::payouts::v1 as pb;
use partner_payouts::store::roles::{APP_GRANTS, APPEND_ONLY, Privilege, granted};
use sqlx::Connection as _;

use crate::access::audit_events;
use crate::helpers::*;
use crate::keys::{Key, new_key, reseal_command};
use crate::on_both_databases;
use crate::reconcile::{line, reconcile, report};

/// `partner-payouts migrate ARGS` on `database_url`, with no account-number key anywhere.
async fn migrate_command(database_url: &str, key_file: &std::path::Path, args: &[&str]) -> Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_partner-payouts"));
    command
        .arg("migrate")
        .args(args)
        .env("PAYOUTS_DATABASE_URL", database_url)
        .env("PAYOUTS_PII_KEY_FILE", key_file)
        .env_remove("PAYOUTS_PII_KEY")
        .env("NO_COLOR", "1");
    tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("migrate task")
        .expect("run partner-payouts migrate")
}

fn succeeded(output: &Output) {
    assert!(
        output.status.success(),
        "migrate failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Why the service over `database_url`, not migrating it itself, does not start.
async fn refusal_without_migrating(database_url: &str, dir: &std::path::Path) -> String {
    let settings = Settings {
        listen_addr: "127.0.0.1:0".parse().expect("addr"),
        database_url: database_url.to_owned(),
        migrate: false,
        pii_key_file: dir.join("pii.key"),
        ..Settings::default()
    };
    match Application::build(settings).await {
        Ok(_) => panic!("a service started on a database nobody migrated"),
        Err(e) => format!("{e:#}"),
    }
}

async fn migrate_needs_no_key_and_serve_may_leave_it_to_migrate(db: Db) {
    let dir = tempfile::tempdir().expect("temp dir");
    let database_url = fresh_database(db, dir.path()).await;
    let refused = refusal_without_migrating(&database_url, dir.path()).await;
    assert!(refused.contains("partner-payouts migrate"), "{refused}");

    let key_file = dir.path().join("no-such.key");
    succeeded(&migrate_command(&database_url, &key_file, &[]).await);
    succeeded(&migrate_command(&database_url, &key_file, &[]).await);
    assert!(!key_file.exists(), "migrate made an account-number key");
    if db == Db::Sqlite {
        let refused = migrate_command(&database_url, &key_file, &["--app-role", "app"]).await;
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success());
        assert!(
            stderr.contains("--app-role") && stderr.contains("SQLite"),
            "{stderr}"
        );
    }

    // A replica that leaves migrating to `migrate` serves (on PostgreSQL as the app role).
    let app = spawn_app_in(db, dir, database_url, |s| s.migrate = false).await;
    register(&app, partner(1)).await;
}

on_both_databases!(
    migrate_needs_no_key_and_serve_may_leave_it_to_migrate,
    db = migrate_needs_no_key_and_serve_may_leave_it_to_migrate
);

/// A role of this test's own, which `migrate --app-role` creates.
fn new_role() -> String {
    // The random end of a UUIDv7.
    format!(
        "payouts_test_role_{}",
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    )
}

/// A connection to `database_url` as `role`.
async fn connect_as(database_url: &str, role: &str) -> sqlx::PgConnection {
    sqlx::PgConnection::connect(&as_role(database_url, role))
        .await
        .unwrap_or_else(|e| panic!("connect as {role}: {e}"))
}

/// The SQLSTATE `statement` fails with, run by `conn`.
async fn refused(conn: &mut sqlx::PgConnection, statement: &str) -> String {
    match sqlx::query(sqlx::AssertSqlSafe(statement.to_owned()))
        .execute(&mut *conn)
        .await
    {
        Ok(_) => panic!("allowed: {statement}"),
        Err(sqlx::Error::Database(e)) => e.code().expect("a SQLSTATE").into_owned(),
        Err(e) => panic!("{statement}: {e}"),
    }
}

/// Everything serve's calls write, once each: a paid payout (status history and attempts),
/// the audit log, a reconciliation.
async fn serve_writes_everything(app: &TestApp) {
    let claim = approved_claim(app, 7, ACCOUNT, 100).await;
    let paid = wait_for(app, &claim.disbursement_id, pb::DisbursementStatus::Paid).await;
    set_paused(app, true).await;
    set_paused(app, false).await;
    let settled = line(
        &paid.idempotency_key,
        paid.amount_krw,
        pb::SettlementStatus::Settled,
    );
    let reconciled = reconcile(app, report(&request_id(), now(), &[settled], 1))
        .await
        .expect("reconcile as the app role");
    assert_eq!(reconciled.summary.matched_count, 1);
    let audited = audit_events(app, None).await.expect("audit log");
    assert!(audited.len() >= 4, "{audited:?}");
}

fn now() -> prost_types::Timestamp {
    prost_types::Timestamp::from(std::time::SystemTime::now())
}

/// (superuser, owned objects, owns the database) of `role` in the database of `conn`.
async fn what_it_owns(conn: &mut sqlx::PgConnection, role: &str) -> (bool, i64, bool) {
    sqlx::query_as(
        "SELECT r.rolsuper, \
                (SELECT count(*) FROM pg_shdepend d JOIN pg_database db ON db.oid = d.dbid \
                 WHERE db.datname = current_database() AND d.deptype = 'o' AND d.refobjid = r.oid), \
                (SELECT datdba = r.oid FROM pg_database WHERE datname = current_database()) \
         FROM pg_roles r WHERE rolname = $1",
    )
    .bind(role)
    .fetch_one(conn)
    .await
    .expect("the role")
}

/// Every table of the schema, and whether `role` has each privilege on it.
async fn privileges(conn: &mut sqlx::PgConnection, role: &str) -> Vec<(String, String, bool)> {
    let keywords: Vec<&str> = Privilege::ALL.iter().map(|p| p.keyword()).collect();
    sqlx::query_as(
        "SELECT c.relname::text, p.privilege, has_table_privilege($1::text::name, c.oid, p.privilege) \
         FROM pg_class c CROSS JOIN unnest($2::text[]) AS p(privilege) \
         WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r'",
    )
    .bind(role)
    .bind(&keywords)
    .fetch_all(conn)
    .await
    .expect("privileges")
}

/// The key the service sealed under, from the key file local development mode made.
fn key_in_file(path: &std::path::Path) -> Key {
    let text = std::fs::read_to_string(path).expect("the key file");
    let line = text
        .lines()
        .find(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .expect("a key in the key file");
    base64::engine::general_purpose::STANDARD
        .decode(line.trim())
        .expect("base64")
        .try_into()
        .expect("32 bytes")
}

/// `reseal` as `role`, from `old` to a new key: the one partner is sealed under the new key.
async fn reseals_as(owner: &mut sqlx::PgConnection, owner_url: &str, role: &str, old: Key) {
    let new = new_key();
    let as_app = as_role(owner_url, role);
    reseal_command(&as_app, &[new, old], &[("PAYOUTS_MIGRATE", "false")]).await;
    let (resealed,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM partners WHERE account_sealed LIKE $1 || ':%'")
            .bind(partner_payouts::sealing::key_id(&new))
            .fetch_one(owner)
            .await
            .expect("partners");
    assert_eq!(resealed, 1);
}

/// `role` has exactly APP_GRANTS on every table, each of which APP_GRANTS names, and owns
/// nothing.
async fn granted_exactly(owner: &mut sqlx::PgConnection, role: &str) {
    for (table, privilege, has) in privileges(owner, role).await {
        assert!(
            APP_GRANTS.iter().any(|(t, _)| *t == table),
            "table {table} has no entry in store::roles::APP_GRANTS: say what serve may do to it"
        );
        let expected = granted(&table).iter().any(|p| p.keyword() == privilege);
        assert_eq!(has, expected, "{role}: {privilege} on {table}");
    }
    assert_eq!(what_it_owns(owner, role).await, (false, 0, false));
}

/// The audit log and the status history can be neither changed nor removed by `app`'s role:
/// PostgreSQL refuses for want of privileges (42501), before any trigger could be asked.
async fn history_is_out_of_reach(app: &mut sqlx::PgConnection) {
    for table in APPEND_ONLY {
        for statement in [
            format!("DELETE FROM {table}"),
            format!("UPDATE {table} SET time = time"),
            format!("TRUNCATE {table}"),
            format!("ALTER TABLE {table} DISABLE TRIGGER ALL"),
            format!("ALTER TABLE {table} ADD COLUMN note TEXT"),
            format!("DROP TABLE {table}"),
        ] {
            assert_eq!(refused(app, &statement).await, "42501", "{statement}");
        }
    }
    assert_eq!(
        refused(app, "DROP FUNCTION refuse_change() CASCADE").await,
        "42501"
    );
}

/// Roles that could do more than serve are refused by `migrate --app-role`: the owner itself,
/// and `role` once it owns a table.
async fn powerful_roles_are_refused(owner: &mut sqlx::PgConnection, owner_url: &str, role: &str) {
    let key_file = std::path::Path::new("no-such.key");
    let (itself,): (String,) = sqlx::query_as("SELECT current_user::text")
        .fetch_one(&mut *owner)
        .await
        .expect("current user");
    let stray = format!("CREATE TABLE stray (id INT); ALTER TABLE stray OWNER TO {role}");
    sqlx::raw_sql(sqlx::AssertSqlSafe(stray))
        .execute(&mut *owner)
        .await
        .expect("a table the role owns");
    for (other, why) in [
        (itself.as_str(), "name another role"),
        (role, "owns 1 object"),
    ] {
        let output = migrate_command(owner_url, key_file, &["--app-role", other]).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains(why),
            "{other}: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_role_serves_owns_nothing_and_cannot_change_the_histories() {
    let dir = tempfile::tempdir().expect("temp dir");
    let owner_url = fresh_postgres_database().await;
    let role = new_role();
    let key_file = dir.path().join("no-such.key");
    // Created by the first run; the second finds it and grants the same again.
    for _ in 0..2 {
        succeeded(&migrate_command(&owner_url, &key_file, &["--app-role", &role]).await);
    }
    let mut owner = sqlx::PgConnection::connect(&owner_url)
        .await
        .expect("owner");
    let password = format!("ALTER ROLE {role} PASSWORD '{role}'");
    sqlx::query(sqlx::AssertSqlSafe(password))
        .execute(&mut owner)
        .await
        .expect("a password, for servers that ask");

    let app = spawn_app_in(Db::Postgres, dir, owner_url.clone(), |s| {
        s.database_url = as_role(&owner_url, &role);
        s.migrate = false;
    })
    .await;
    serve_writes_everything(&app).await;
    let old_key = key_in_file(&app.pii_key_file);
    app.stop().await;
    reseals_as(&mut owner, &owner_url, &role, old_key).await;
    granted_exactly(&mut owner, &role).await;
    let mut as_app = connect_as(&owner_url, &role).await;
    history_is_out_of_reach(&mut as_app).await;

    // Grants lost (as for a table a later migration adds) come back when migrate runs again.
    let revoke = format!("REVOKE ALL ON claims FROM {role}");
    sqlx::query(sqlx::AssertSqlSafe(revoke))
        .execute(&mut owner)
        .await
        .expect("revoke");
    let select = "SELECT count(*) FROM claims";
    assert_eq!(refused(&mut as_app, select).await, "42501");
    succeeded(&migrate_command(&owner_url, &key_file, &["--app-role", &role]).await);
    sqlx::query(select)
        .execute(&mut as_app)
        .await
        .expect("granted again");

    powerful_roles_are_refused(&mut owner, &owner_url, &role).await;
    drop(as_app);
    let drop_role = format!("DROP OWNED BY {role}; DROP ROLE {role}");
    sqlx::raw_sql(sqlx::AssertSqlSafe(drop_role))
        .execute(&mut owner)
        .await
        .expect("drop the test's role");
}
