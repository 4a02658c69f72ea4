//! The schema a store needs: the migrations `partner-payouts migrate` applies (and `serve`,
//! unless `migrate` is off), and the check a `serve` that does not apply them makes before it
//! takes a call.

use std::collections::HashMap;

use anyhow::Context as _;
use sqlx::migrate::{Migrate, Migrator};

/// Fails unless every migration of `migrator` was applied to the database of `conn`, as it
/// is now. Migrations the database has beyond them (a newer release migrated it) are fine:
/// a release only ever adds to the schema.
pub(super) async fn check_applied<C>(migrator: &Migrator, conn: &mut C) -> anyhow::Result<()>
where
    C: Migrate + ?Sized,
{
    let applied = conn
        .list_applied_migrations(&migrator.table_name)
        .await
        .context(
            "reading which migrations were applied (has `partner-payouts migrate` run on this \
             database?)",
        )?;
    let applied: HashMap<i64, _> = applied
        .into_iter()
        .map(|m| (m.version, m.checksum))
        .collect();
    if let Some(version) = conn.dirty_version(&migrator.table_name).await? {
        anyhow::bail!(
            "migration {version} failed part-way: fix the database, then run `partner-payouts \
             migrate`"
        );
    }
    let mut missing = Vec::new();
    for migration in migrator
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
    {
        match applied.get(&migration.version) {
            None => missing.push(format!("{} ({})", migration.version, migration.description)),
            Some(checksum) if *checksum != migration.checksum => anyhow::bail!(
                "migration {} ({}) was applied in another form than this release's",
                migration.version,
                migration.description
            ),
            Some(_) => {}
        }
    }
    if !missing.is_empty() {
        anyhow::bail!(
            "the database lacks migrations {}: run `partner-payouts migrate` (as the role that \
             owns the schema) before serving with migrate = false",
            missing.join(", ")
        );
    }
    Ok(())
}
