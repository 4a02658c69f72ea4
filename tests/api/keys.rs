//! The keys that seal account numbers, against what is stored: a replica that lacks a key in use
//! refuses to start and names it; `partner-payouts reseal` moves everything under the first
//! key, also while a replica serves and when run twice, and then the new key alone serves.

use std::path::{Path, PathBuf};
use std::process::Output;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use partner_payouts::app::Application;
use partner_payouts::config::Settings;
use partner_payouts::proto::payouts::v1 as pb;
use partner_payouts::sealing::key_id;

use crate::access::audit_events;

use crate::helpers::*;
use crate::on_both_databases;

use pb::DisbursementStatus::Paid;

pub(crate) type Key = [u8; 32];

/// A fresh random key.
pub(crate) fn new_key() -> Key {
    use sha2::Digest as _;
    sha2::Sha256::digest(uuid::Uuid::now_v7().as_bytes()).into()
}

/// As `PAYOUTS_PII_KEY` takes them: base64, the first seals.
fn key_list(keys: &[Key]) -> String {
    keys.iter()
        .map(|k| BASE64.encode(k))
        .collect::<Vec<_>>()
        .join(",")
}

/// A key file holding `keys`, owner-only.
fn key_file(dir: &Path, name: &str, keys: &[Key]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, key_list(keys).replace(',', "\n")).expect("write the key file");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    path
}

/// The first replica, over a new database (for SQLite a file in `dir`, so that it outlives
/// the replica), with the keys in `key_file`.
async fn first_replica(db: Db, dir: &Path, key_file: PathBuf) -> TestApp {
    let database_url = fresh_database(db, dir).await;
    replica(db, &database_url, &key_file).await
}

/// A replica over `database_url` with the keys in `key_file`.
async fn replica(db: Db, database_url: &str, key_file: &Path) -> TestApp {
    spawn_app_on(db, database_url, key_file).await
}

/// Why a replica over `database_url` with the keys in `key_file` does not start.
async fn refusal(database_url: &str, key_file: &Path) -> String {
    let settings = Settings {
        listen_addr: "127.0.0.1:0".parse().expect("addr"),
        database_url: database_url.to_owned(),
        pii_key_file: key_file.to_owned(),
        ..Settings::default()
    };
    match Application::build(settings).await {
        Ok(_) => panic!("a replica with keys it should lack started"),
        Err(e) => format!("{e:#}"),
    }
}

async fn get_partner(app: &TestApp, partner_id: &str) -> pb::Partner {
    app.partners()
        .get_partner(pb::GetPartnerRequest {
            partner_id: partner_id.into(),
        })
        .await
        .expect("get partner")
        .into_inner()
        .partner
        .expect("partner")
}

/// Gives the partner the account `account_number`.
async fn change_account(app: &TestApp, partner_id: &str, account_number: &str) {
    let partner = get_partner(app, partner_id).await;
    app.partners()
        .update_partner_bank_account(pb::UpdatePartnerBankAccountRequest {
            request_id: request_id(),
            partner_id: partner_id.into(),
            etag: partner.etag,
            bank_account: Some(pb::BankAccount {
                bank_code: "090".into(),
                account_number: account_number.into(),
                holder_name: "Kim Minji".into(),
            }),
        })
        .await
        .expect("change the account");
}

async fn without_the_key_in_use_a_replica_refuses_to_start(db: Db) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (first, other) = (new_key(), new_key());
    let first_only = key_file(dir.path(), "first.key", &[first]);
    let other_only = key_file(dir.path(), "other.key", &[other]);
    let both = key_file(dir.path(), "both.key", &[other, first]);

    // The first replica on an empty database leaves the probe under its key: a replica with
    // another key is refused before any account number is stored.
    let app = first_replica(db, dir.path(), first_only.clone()).await;
    let refused = refusal(&app.database_url, &other_only).await;
    assert!(refused.contains("refusing to start"), "{refused}");
    assert!(refused.contains(&key_id(&first)), "{refused}");

    let partner = register(&app, partner(1)).await;
    let claim = submit(&app, &partner.partner_id, vec![full_weight_item(100)]).await;
    wait_for(&app, &claim.disbursement_id, Paid).await;
    let refused = refusal(&app.database_url, &other_only).await;
    assert!(refused.contains(&key_id(&first)), "{refused}");
    assert!(
        !refused.contains(&BASE64.encode(first)) && !refused.contains(&BASE64.encode(other)),
        "no key material in the refusal: {refused}"
    );

    let database_url = app.database_url.clone();
    app.stop().await;

    // With the stored values' key after its own, a replica starts, reads what is stored, and
    // pays under its own key.
    let rotated = replica(db, &database_url, &both).await;
    let read = get_partner(&rotated, &partner.partner_id).await;
    assert_eq!(
        read.bank_account.expect("account").account_number,
        "****6789"
    );
    let claim = approved_claim(&rotated, 2, ACCOUNT, 100).await;
    wait_for(&rotated, &claim.disbursement_id, Paid).await;
    // Now values under both keys are stored: neither key alone will do.
    for (only, lacks) in [(&first_only, other), (&other_only, first)] {
        let refused = refusal(&database_url, only).await;
        assert!(refused.contains("refusing to start"), "{refused}");
        assert!(refused.contains(&key_id(&lacks)), "{refused}");
    }
    rotated.stop().await;
}

on_both_databases!(
    without_the_key_in_use_a_replica_refuses_to_start_and_names_it,
    db = without_the_key_in_use_a_replica_refuses_to_start
);

/// `partner-payouts reseal` as an operator runs it, with `keys` in `PAYOUTS_PII_KEY` and any
/// other settings in `env`.
pub(crate) async fn reseal_command(
    database_url: &str,
    keys: &[Key],
    env: &[(&str, &str)],
) -> Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_partner-payouts"));
    command
        .args(["reseal", "--batch", "2"])
        .env("PAYOUTS_DATABASE_URL", database_url)
        .env("PAYOUTS_PII_KEY", key_list(keys))
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("reseal task")
        .expect("run partner-payouts reseal");
    assert!(
        output.status.success(),
        "reseal failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The audit entries of re-sealing: (request id, table, count).
async fn reseal_entries(app: &TestApp) -> Vec<(String, String, i64)> {
    audit_events(app, None)
        .await
        .expect("audit log")
        .into_iter()
        .filter(|e| e.principal == "reseal")
        .map(|e| {
            assert_eq!(e.method, "partner-payouts reseal");
            assert_eq!(e.outcome_code, "OK");
            (e.request_id, e.resource_id, e.count)
        })
        .collect()
}

async fn reseal_then_the_new_key_alone(db: Db) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (old, new) = (new_key(), new_key());
    let app = first_replica(db, dir.path(), key_file(dir.path(), "old.key", &[old])).await;
    // Three partners: one paid, one whose payout waits, one whose account changed.
    let paid = approved_claim(&app, 1, ACCOUNT, 100).await;
    wait_for(&app, &paid.disbursement_id, Paid).await;
    set_paused(&app, true).await;
    let waiting = approved_claim(&app, 2, "110-123-452468", 100).await;
    let changed = register(&app, partner(3)).await;
    change_account(&app, &changed.partner_id, "3333-01-2345678").await;
    let database_url = app.database_url.clone();
    app.stop().await;

    let run = reseal_command(&database_url, &[new, old], &[]).await;
    let log = String::from_utf8_lossy(&run.stderr);
    assert!(
        log.contains(&format!("sealed under key {}", key_id(&new))),
        "{log}"
    );
    // Safe to run twice: the second run finds nothing to do.
    let again = reseal_command(&database_url, &[new, old], &[]).await;
    let log = String::from_utf8_lossy(&again.stderr);
    assert!(log.contains("resealed=0"), "{log}");

    let app = replica(db, &database_url, &key_file(dir.path(), "new.key", &[new])).await;
    let read = get_partner(&app, &changed.partner_id).await;
    assert_eq!(
        read.bank_account.expect("account").account_number,
        "****5678"
    );
    set_paused(&app, false).await;
    let paid_after = wait_for(&app, &waiting.disbursement_id, Paid).await;
    assert_eq!(paid_after.account_number, "****2468");
    let claim = approved_claim(&app, 4, ACCOUNT, 100).await;
    wait_for(&app, &claim.disbursement_id, Paid).await;

    // One run wrote entries, a batch each; they count the probe, three partners and two
    // payouts. The second run wrote none.
    let entries = reseal_entries(&app).await;
    let run_ids: std::collections::BTreeSet<&String> = entries.iter().map(|e| &e.0).collect();
    assert_eq!(run_ids.len(), 1, "{entries:?}");
    let counted =
        |table: &str| -> i64 { entries.iter().filter(|e| e.1 == table).map(|e| e.2).sum() };
    assert_eq!(
        [
            counted("pii_key_probe"),
            counted("partners"),
            counted("disbursements")
        ],
        [1, 3, 2],
        "{entries:?}"
    );
    assert!(
        entries.iter().all(|e| e.2 <= 2),
        "batches of 2: {entries:?}"
    );
    app.stop().await;
}

on_both_databases!(
    reseal_then_the_service_starts_with_the_new_key_alone,
    db = reseal_then_the_new_key_alone
);

async fn reseal_while_a_replica_serves(db: Db) {
    const BEFORE: u64 = 12;
    const DURING: u64 = 8;
    const CHANGED: usize = 4;
    let dir = tempfile::tempdir().expect("temp dir");
    let (old, new) = (new_key(), new_key());
    let app = first_replica(db, dir.path(), key_file(dir.path(), "old.key", &[old])).await;
    set_paused(&app, true).await;
    let mut claims = Vec::new();
    for seed in 1..=BEFORE {
        claims.push(approved_claim(&app, seed, ACCOUNT, 100).await);
    }
    let database_url = app.database_url.clone();
    app.stop().await;

    // A replica that seals under the new key serves (and pays) while the old values are
    // re-sealed beneath it.
    let rotated = key_file(dir.path(), "rotated.key", &[new, old]);
    let serving = replica(db, &database_url, &rotated).await;
    let settings = Settings {
        database_url: database_url.clone(),
        pii_key_file: rotated.clone(),
        ..Settings::default()
    };
    // Paying the old payouts, changing old accounts and registering new partners.
    let traffic = async {
        set_paused(&serving, false).await;
        for claim in &claims[..CHANGED] {
            change_account(&serving, &claim.partner_id, "3333-01-2345678").await;
        }
        let mut during = Vec::new();
        for seed in BEFORE + 1..=BEFORE + DURING {
            during.push(approved_claim(&serving, seed, ACCOUNT, 100).await);
        }
        during
    };
    let (report, during) = tokio::join!(partner_payouts::app::reseal(&settings, 3), traffic);
    let report = report.expect("reseal while a replica serves");
    assert_eq!(report.key_id, key_id(&new));
    assert_eq!(report.retired_key_ids, [key_id(&old)]);
    claims.extend(during);
    for claim in &claims {
        wait_for(&serving, &claim.disbursement_id, Paid).await;
    }
    serving.stop().await;

    let app = replica(db, &database_url, &key_file(dir.path(), "new.key", &[new])).await;
    // No change made meanwhile was undone: the changed accounts are the new ones.
    for claim in &claims[..CHANGED] {
        let partner = get_partner(&app, &claim.partner_id).await;
        assert_eq!(
            partner.bank_account.expect("account").account_number,
            "****5678"
        );
    }
    let claim = approved_claim(&app, BEFORE + DURING + 1, ACCOUNT, 100).await;
    wait_for(&app, &claim.disbursement_id, Paid).await;
    let resealed: i64 = reseal_entries(&app).await.iter().map(|e| e.2).sum();
    assert_eq!(
        u64::try_from(resealed).expect("a count"),
        report.resealed,
        "every value re-sealed is counted in the audit log"
    );
    app.stop().await;
}

on_both_databases!(
    reseal_is_safe_while_a_replica_serves,
    db = reseal_while_a_replica_serves
);

/// Holds the payout `disbursement_id` in a transaction of its own, as a dispatch round settling
/// it does, until the returned task ends it after `for_how_long`. On PostgreSQL a row lock; on
/// SQLite, which locks the whole database, its write lock.
async fn hold_payout(
    db: Db,
    database_url: &str,
    disbursement_id: &str,
    for_how_long: std::time::Duration,
) -> tokio::task::JoinHandle<()> {
    match db {
        Db::Postgres => {
            let pool = sqlx::PgPool::connect(database_url).await.expect("connect");
            let mut tx = pool.begin().await.expect("begin");
            sqlx::query("SELECT 1 FROM disbursements WHERE disbursement_id = $1 FOR UPDATE")
                .bind(disbursement_id)
                .fetch_one(&mut *tx)
                .await
                .expect("hold the payout");
            tokio::spawn(async move {
                tokio::time::sleep(for_how_long).await;
                tx.rollback().await.expect("rollback");
            })
        }
        Db::Sqlite => {
            let pool = sqlx::SqlitePool::connect(database_url)
                .await
                .expect("connect");
            let mut tx = pool.begin().await.expect("begin");
            let held = sqlx::query(
                "UPDATE disbursements SET update_time = update_time WHERE disbursement_id = ?1",
            )
            .bind(disbursement_id)
            .execute(&mut *tx)
            .await
            .expect("hold the database");
            assert_eq!(held.rows_affected(), 1);
            tokio::spawn(async move {
                tokio::time::sleep(for_how_long).await;
                tx.rollback().await.expect("rollback");
            })
        }
    }
}

/// A payout another transaction holds for a second, longer than passes right after each other
/// take: re-sealing passes it over (PostgreSQL) or waits for the database (SQLite), goes over
/// it again once it is free, and retires the old key.
async fn reseal_outlasting_a_held_row(db: Db) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (old, new) = (new_key(), new_key());
    let app = first_replica(db, dir.path(), key_file(dir.path(), "old.key", &[old])).await;
    set_paused(&app, true).await;
    let held = approved_claim(&app, 1, ACCOUNT, 100).await;
    approved_claim(&app, 2, ACCOUNT, 100).await;
    let database_url = app.database_url.clone();
    app.stop().await;

    let holder = hold_payout(
        db,
        &database_url,
        &held.disbursement_id,
        std::time::Duration::from_secs(1),
    )
    .await;
    let settings = Settings {
        database_url: database_url.clone(),
        pii_key_file: key_file(dir.path(), "rotated.key", &[new, old]),
        ..Settings::default()
    };
    let report = partner_payouts::app::reseal(&settings, 2)
        .await
        .expect("reseal past a held payout");
    holder.await.expect("the holder");
    assert_eq!(report.retired_key_ids, [key_id(&old)]);
    // Two partners, two payouts and the probe.
    assert_eq!(report.resealed, 5, "{report:?}");
    if db == Db::Postgres {
        assert!(
            report.passes > 1,
            "the held row was passed over: {report:?}"
        );
    }
    // Nothing needs the old key any more.
    let app = replica(db, &database_url, &key_file(dir.path(), "new.key", &[new])).await;
    assert_eq!(
        get(&app, &held.disbursement_id).await.account_number,
        "****6789"
    );
    app.stop().await;
}

on_both_databases!(
    reseal_goes_over_a_held_row_again_once_it_is_free,
    db = reseal_outlasting_a_held_row
);
