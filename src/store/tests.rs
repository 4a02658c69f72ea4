//! The store on both databases: a batch and its audit entries are stored together or not at
//! all, on the batch path and on the row-by-row path a batch falls back to.

use std::sync::Arc;

use uuid::Uuid;

use super::postgres::PgStore;
use super::prelude::*;
use super::sqlite::SqliteStore;
use super::{
    AuditEvent, AuditFilter, AuditRow, BatchAudit, ClaimSubmission, Idempotency, Page,
    PartnerFilter, PartnerRef, Result, StoreError, Stored,
};
use crate::domain::{
    AffectedService, BankAccount, BankCode, BusinessRegistrationNumber, ContactEmail,
    DEFAULT_POLICY_TOML, Krw, LossItem, NewClaim, NewPartner, PartnerId, PartnerProfile,
    PersonOrBusinessName, Policy,
};
use crate::sealing::PiiCipher;

fn cipher() -> Arc<PiiCipher> {
    Arc::new(PiiCipher::new(&[7; 32]))
}

/// A fresh, migrated store of each database (the SQLite one in `dir`).
async fn stores(dir: &tempfile::TempDir) -> Vec<(&'static str, Arc<dyn Store>)> {
    let sqlite = SqliteStore::migrated_in(dir).await;
    let (postgres, _) = migrated_postgres().await;
    vec![
        ("sqlite", Arc::new(sqlite)),
        ("postgres", Arc::new(postgres)),
    ]
}

/// A migrated PostgreSQL store over a database of its own, and that database's URL.
async fn migrated_postgres() -> (PgStore, String) {
    let url = fresh_postgres().await;
    let postgres = postgres_store(&url, 4).await;
    postgres.migrate().await.expect("migrate postgres");
    (postgres, url)
}

/// A store over the PostgreSQL database at `url`, with at most `max_connections`.
async fn postgres_store(url: &str, max_connections: u32) -> PgStore {
    PgStore::connect(
        url,
        &super::PoolSettings {
            max_connections,
            ..Default::default()
        },
        cipher(),
    )
    .await
    .expect("postgres")
}

/// The URL of a new, empty PostgreSQL database of its own.
async fn fresh_postgres() -> String {
    use sqlx::Connection as _;
    let admin = std::env::var("PAYOUTS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL is required and not reachable at {admin}: {e}"));
    let name = format!("payouts_test_{}", Uuid::now_v7().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create test database");
    let (base, _) = admin.rsplit_once('/').expect("URL has a database");
    format!("{base}/{name}")
}

/// Every text column an index of PostgreSQL's holds compares byte by byte (collation "C",
/// migration 0008), whatever the database's own collation: an index added later on a text
/// column must say so too.
#[tokio::test]
async fn every_indexed_text_column_compares_byte_by_byte_on_postgres() {
    use sqlx::Connection as _;
    let (_store, url) = migrated_postgres().await;
    let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
    let columns: Vec<(String, String)> = sqlx::query_as(
        "SELECT DISTINCT c.relname || '.' || a.attname, co.collname \
         FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY (i.indkey) \
         JOIN pg_collation co ON co.oid = a.attcollation \
         WHERE n.nspname = current_schema() AND a.atttypid = 'text'::regtype \
         ORDER BY 1",
    )
    .fetch_all(&mut conn)
    .await
    .expect("read the indexed text columns");
    // The check would pass on an empty list: the keys the intake writes are among them.
    for key in [
        "partners.partner_id",
        "partners.business_registration_number",
        "idempotency.request_id",
        "claims.claim_id",
        "disbursements.disbursement_id",
        "audit_events.audit_event_id",
        "change_events.event_id",
    ] {
        assert!(
            columns.iter().any(|(c, _)| c == key),
            "{key} is not indexed"
        );
    }
    let other: Vec<&(String, String)> = columns.iter().filter(|(_, co)| co != "C").collect();
    assert!(
        other.is_empty(),
        "indexed text columns not in \"C\": {other:?}"
    );
}

/// A disbursement's idempotency key is unique once given (migration 0009): two disbursements
/// cannot share one, any number may have none yet, and a lookup by key goes through the index.
#[tokio::test]
async fn a_disbursement_key_is_unique_once_given_and_found_through_its_index_on_postgres() {
    use sqlx::Connection as _;
    let (_store, url) = migrated_postgres().await;
    let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
    // Rows of this table alone: its references are not what is tested here.
    sqlx::query("SET session_replication_role = replica")
        .execute(&mut conn)
        .await
        .expect("set replication role");
    let insert = |id: &'static str, key: Option<&'static str>| {
        sqlx::query(
            "INSERT INTO disbursements (disbursement_id, claim_id, partner_id, amount_krw, \
             status, bank_code, account_sealed, account_last4, holder_name, idempotency_key, \
             create_time, update_time) \
             VALUES ($1, $1, 'p', 30000, 'QUEUED', '004', 's', '6789', 'Kim', $2, 1, 1)",
        )
        .bind(id)
        .bind(key)
    };
    for (id, key) in [("d1", None), ("d2", None), ("d3", Some("k-1"))] {
        insert(id, key)
            .execute(&mut conn)
            .await
            .expect("a new key, or none");
    }
    let refused = insert("d4", Some("k-1"))
        .execute(&mut conn)
        .await
        .expect_err("a key given twice");
    assert_eq!(
        refused
            .as_database_error()
            .and_then(|e| e.code())
            .as_deref(),
        Some("23505"),
        "{refused}"
    );
    sqlx::query("SET enable_seqscan = off")
        .execute(&mut conn)
        .await
        .expect("set enable_seqscan");
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN SELECT disbursement_id FROM disbursements WHERE idempotency_key = $1",
    )
    .bind("k-1")
    .fetch_all(&mut conn)
    .await
    .expect("explain");
    assert!(
        plan.iter()
            .any(|line| line.contains("disbursements_by_idempotency_key")),
        "{plan:?}"
    );
}

/// The dispatcher's lease is planned for the outbox as it is at each lease. A plan kept from
/// a connection's first leases, made while the outbox was empty, reads the whole outbox at
/// every lease once a backlog has built up.
#[tokio::test]
async fn a_lease_reads_only_what_it_leases_after_a_backlog_builds_up_on_postgres() {
    use sqlx::Connection as _;
    let (_migrated, url) = migrated_postgres().await;
    // One connection, so that every lease below runs on the same one.
    let store = postgres_store(&url, 1).await;
    let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
    // How the outbox was read so far: rows read by sequential scans, and scans of any kind.
    async fn reads(conn: &mut sqlx::PgConnection) -> (i64, i64) {
        sqlx::query_as(
            "SELECT seq_tup_read, seq_scan + COALESCE(idx_scan, 0) \
             FROM pg_stat_user_tables WHERE relname = 'outbox'",
        )
        .fetch_one(conn)
        .await
        .expect("outbox statistics")
    }
    // A connection's counts reach the statistics when it is next idle after this.
    let flush = async |store: &PgStore| {
        sqlx::query("SELECT pg_stat_force_next_flush()")
            .execute(store.pool())
            .await
            .expect("flush");
    };
    async fn counted_beyond(conn: &mut sqlx::PgConnection, scans: i64) -> (i64, i64) {
        for _ in 0..100 {
            let now = reads(conn).await;
            if now.1 > scans {
                return now;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("the outbox's scans were never counted beyond {scans}");
    }

    let now = super::now_micros();
    let until = now + 60_000_000;
    // More leases than PostgreSQL plans one by one before it settles on a generic plan for a
    // statement kept prepared.
    for _ in 0..8 {
        let leased = store.lease_batch(now, until, 100).await.expect("lease");
        assert!(leased.is_empty(), "{leased:?}");
    }
    flush(&store).await;
    let before = counted_beyond(&mut conn, 0).await;

    // A backlog of outbox rows alone (what they name is not what is tested here).
    sqlx::query("SET session_replication_role = replica")
        .execute(&mut conn)
        .await
        .expect("set replication role");
    sqlx::query(
        "INSERT INTO outbox (disbursement_id, due_time) \
         SELECT 'd-' || g, $1 FROM generate_series(1, 50000) AS g",
    )
    .bind(now - 1)
    .execute(&mut conn)
    .await
    .expect("a backlog");

    store.lease_batch(now, until, 100).await.expect("lease");
    flush(&store).await;
    let after = counted_beyond(&mut conn, before.1).await;
    let leased: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE lease_until = $1")
        .bind(until)
        .fetch_one(&mut conn)
        .await
        .expect("leased rows");
    assert_eq!(leased, 100);
    assert_eq!(
        after.0 - before.0,
        0,
        "the lease read the backlog by sequential scan: {before:?} -> {after:?}"
    );
}

/// A disbursement's events and attempts are keyed by their disbursement (migration 0011): one
/// index each for its history (the primary key, `(disbursement_id, id)`), the history read
/// through it in order, and the rows written before the migration kept.
#[tokio::test]
async fn a_disbursements_history_is_keyed_by_it_and_kept_across_the_migration_on_postgres() {
    let url = fresh_postgres().await;
    let pool = sqlx::PgPool::connect(&url).await.expect("connect");
    super::postgres::MIGRATOR
        .run_to(10, &pool)
        .await
        .expect("the release before");
    let mut conn = pool.acquire().await.expect("connection");
    // Rows of these tables alone: their references are not what is tested here.
    sqlx::query("SET session_replication_role = replica")
        .execute(&mut *conn)
        .await
        .expect("set replication role");
    for (disbursement, to) in [
        ("d2", "QUEUED"),
        ("d1", "QUEUED"),
        ("d2", "SENDING"),
        ("d1", "SENDING"),
        ("d1", "PAID"),
    ] {
        sqlx::query(
            "INSERT INTO disbursement_events (disbursement_id, to_status, actor, reason, time) \
             VALUES ($1, $2, 'dispatcher', 'r', 1)",
        )
        .bind(disbursement)
        .bind(to)
        .execute(&mut *conn)
        .await
        .expect("event");
        sqlx::query(
            "INSERT INTO disbursement_attempts (disbursement_id, operation, idempotency_key, \
             outcome, code, message, time) VALUES ($1, 'SUBMIT', $2, 'ACCEPTED', '', '', 1)",
        )
        .bind(disbursement)
        .bind(format!("{disbursement}-{to}"))
        .execute(&mut *conn)
        .await
        .expect("attempt");
    }
    drop(conn);
    super::postgres::MIGRATOR.run(&pool).await.expect("migrate");

    let indexes = async |table: &str| -> Vec<(String, String)> {
        sqlx::query_as(
            "SELECT indexname::text, indexdef FROM pg_indexes \
             WHERE schemaname = current_schema() AND tablename = $1 ORDER BY indexname",
        )
        .bind(table)
        .fetch_all(&pool)
        .await
        .expect("indexes")
    };
    let events = indexes("disbursement_events").await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].0, "disbursement_events_pkey");
    assert!(events[0].1.contains("(disbursement_id, id)"), "{events:?}");
    let attempts = indexes("disbursement_attempts").await;
    let names: Vec<&str> = attempts.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        ["disbursement_attempts_by_key", "disbursement_attempts_pkey"],
        "{attempts:?}"
    );
    assert!(
        attempts[1].1.contains("(disbursement_id, id)"),
        "{attempts:?}"
    );

    for (table, column) in [
        ("disbursement_events", "to_status"),
        ("disbursement_attempts", "idempotency_key"),
    ] {
        let history: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT {column} FROM {table} WHERE disbursement_id = $1 ORDER BY id"
        )))
        .bind("d1")
        .fetch_all(&pool)
        .await
        .expect("history");
        let expected: Vec<String> = match table {
            "disbursement_events" => vec!["QUEUED".into(), "SENDING".into(), "PAID".into()],
            _ => vec!["d1-QUEUED".into(), "d1-SENDING".into(), "d1-PAID".into()],
        };
        assert_eq!(history, expected, "{table}");
        let mut conn = pool.acquire().await.expect("connection");
        sqlx::query("SET enable_seqscan = off")
            .execute(&mut *conn)
            .await
            .expect("set enable_seqscan");
        let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "EXPLAIN SELECT * FROM {table} WHERE disbursement_id = $1 ORDER BY id"
        )))
        .bind("d1")
        .fetch_all(&mut *conn)
        .await
        .expect("explain");
        assert!(
            plan.iter()
                .any(|line| line.contains(&format!("{table}_pkey"))),
            "{plan:?}"
        );
        assert!(!plan.iter().any(|line| line.contains("Sort")), "{plan:?}");
    }
}

fn idem(method: &'static str) -> Idempotency {
    Idempotency {
        principal: "ops".into(),
        request_id: Uuid::now_v7(),
        method,
        fingerprint: "f".into(),
    }
}

/// A valid partner whose registration number ends in `n`.
fn partner(n: u32) -> NewPartner {
    // The check digit of a registration number makes only some numbers valid: find one.
    let brn = (0..10)
        .find_map(|d| BusinessRegistrationNumber::parse(&format!("11682{n:04}{d}")).ok())
        .expect("a valid registration number");
    let name = PersonOrBusinessName::parse("Kim Minji").expect("name");
    NewPartner {
        profile: PartnerProfile {
            business_registration_number: brn,
            legal_name: PersonOrBusinessName::parse("Haneul Bakery").expect("name"),
            representative_name: name.clone(),
            affected_services: vec![AffectedService::KakaotalkChannel],
            contact_email: ContactEmail::parse("owner@haneul.example").expect("email"),
        },
        bank_account: BankAccount {
            bank_code: BankCode::parse("004").expect("bank"),
            account_number: crate::domain::AccountNumber::parse("110-123-456789").expect("no"),
            holder_name: name,
        },
    }
}

fn entry(id: Uuid, resource_id: String, outcome_code: &str) -> AuditEvent {
    AuditEvent {
        audit_event_id: id,
        time: 1,
        principal: "ops".into(),
        method: "/payouts.v1.PartnerService/RegisterPartner".into(),
        resource_id,
        request_id: String::new(),
        outcome_code: outcome_code.into(),
        peer_address: String::new(),
        count: 1,
        replayed: false,
    }
}

async fn audit_log(store: &Arc<dyn Store>) -> Vec<AuditEvent> {
    let page = Page::first(1000);
    store
        .list_audit(&AuditFilter::default(), &page)
        .await
        .expect("audit log")
}

/// `rows` registered as one batch, each row's audit entry made by `row` (`None`: none).
async fn register_batch(
    store: &Arc<dyn Store>,
    rows: &[(Idempotency, NewPartner)],
    row: AuditRow<'_, crate::domain::Partner>,
) -> Result<Vec<Result<Stored<crate::domain::Partner>>>> {
    let audit = BatchAudit { row, refused: &[] };
    store.register_partners(rows, &|_| Vec::new(), audit).await
}

/// No audit entry for any row.
fn unaudited(_: usize, _: &Result<Stored<crate::domain::Partner>>) -> Option<AuditEvent> {
    None
}

#[tokio::test]
async fn rows_written_one_by_one_after_a_failed_batch_each_have_their_entry() {
    let dir = tempfile::tempdir().expect("dir");
    for (db, store) in stores(&dir).await {
        // Every stored row's entry has the same id: the batch's insert of its entries fails
        // on the duplicate (as a concurrent writer's would), and the batch is written again
        // row by row, where the second row's entry cannot be stored, nor so its row.
        let shared = Uuid::now_v7();
        let rows = vec![
            (idem("RegisterPartner"), partner(1)),
            (idem("RegisterPartner"), partner(2)),
        ];
        let row = |_: usize, answer: &Result<Stored<crate::domain::Partner>>| {
            Some(match answer {
                Ok(Stored::Fresh(p)) => entry(shared, p.partner_id.to_string(), "OK"),
                _ => entry(Uuid::now_v7(), String::new(), "INTERNAL"),
            })
        };
        let answers = register_batch(&store, &rows, &row)
            .await
            .unwrap_or_else(|e| panic!("{db}: the batch answers row by row: {e}"));
        let Ok(Stored::Fresh(first)) = &answers[0] else {
            panic!("{db}: the first row is stored: {:?}", answers[0]);
        };
        assert!(answers[1].is_err(), "{db}: {:?}", answers[1]);
        let partners = store
            .list_partners(&PartnerFilter::default(), &Page::first(10))
            .await
            .expect("partners");
        assert_eq!(
            partners.iter().map(|p| p.partner_id).collect::<Vec<_>>(),
            vec![first.partner_id],
            "{db}: only the first row is stored"
        );
        let log = audit_log(&store).await;
        let stored_entry = log.iter().find(|e| e.audit_event_id == shared);
        assert_eq!(
            stored_entry.map(|e| e.resource_id.clone()),
            Some(first.partner_id.to_string()),
            "{db}: the stored row has its entry: {log:?}"
        );
        assert_eq!(log.len(), 2, "{db}: and the refused row its own: {log:?}");
        assert_eq!(log[1].outcome_code, "INTERNAL", "{db}");
    }
}

#[tokio::test]
async fn a_batch_with_a_taken_number_answers_its_new_rows_as_stored() {
    // The batch is first tried as one statement, as if every row were new; the taken number
    // fails it, and the rows are written again step by step with the partners made for them.
    let dir = tempfile::tempdir().expect("dir");
    for (db, store) in stores(&dir).await {
        let taken = store
            .register_partner(
                super::Recorded::unaudited(&idem("RegisterPartner"), &|_| Vec::new()),
                &partner(7),
            )
            .await;
        let Ok(Stored::Fresh(taken)) = taken else {
            panic!("{db}: the first registration is stored: {taken:?}");
        };
        let rows = vec![
            (idem("RegisterPartner"), partner(8)),
            (idem("RegisterPartner"), partner(7)),
            (idem("RegisterPartner"), partner(9)),
        ];
        let answers = register_batch(&store, &rows, &unaudited)
            .await
            .unwrap_or_else(|e| panic!("{db}: the batch is answered: {e}"));
        assert!(
            matches!(
                &answers[1],
                Err(StoreError::PartnerAlreadyRegistered { partner_id })
                    if *partner_id == taken.partner_id
            ),
            "{db}: {:?}",
            answers[1]
        );
        for i in [0, 2] {
            let Ok(Stored::Fresh(answered)) = &answers[i] else {
                panic!("{db}: row {i} is stored: {:?}", answers[i]);
            };
            assert_eq!(answered.profile, rows[i].1.profile, "{db}: row {i}");
            let stored = store
                .get_partner(answered.partner_id)
                .await
                .expect("read")
                .unwrap_or_else(|| panic!("{db}: row {i}'s partner is stored"));
            assert_eq!(&stored, answered, "{db}: row {i} is answered as stored");
        }
    }
}

#[tokio::test]
async fn a_batch_that_fails_stores_no_row_and_no_entry() {
    let dir = tempfile::tempdir().expect("dir");
    let policy = Policy::from_toml(DEFAULT_POLICY_TOML).expect("policy");
    for (db, store) in stores(&dir).await {
        let mut partners = Vec::new();
        for n in [3, 4] {
            let one = idem("RegisterPartner");
            let call = super::Recorded::unaudited(&one, &|_| Vec::new());
            match store.register_partner(call, &partner(n)).await {
                Ok(Stored::Fresh(p)) => partners.push(p.partner_id),
                other => panic!("{db}: register: {other:?}"),
            }
        }
        let items =
            vec![LossItem::parse(AffectedService::KakaotalkChannel, 400_000, 0).expect("item")];
        let claim = |partner_id: PartnerId, compensation_krw: i64| {
            let mut decision = policy.decide(&items);
            decision.compensation_krw = Krw::new(compensation_krw);
            ClaimSubmission {
                idem: idem("SubmitClaim"),
                partner: PartnerRef::Id(partner_id),
                claim: NewClaim {
                    partner_id,
                    items: items.clone(),
                    evidence: Vec::new(),
                    decision,
                    submitted_by: "ops".into(),
                    trace_context: None,
                },
            }
        };
        // The second row breaks a check of the database: the whole batch fails.
        let rows = vec![claim(partners[0], 30_000), claim(partners[1], -1)];
        let row = |_: usize, _: &Result<Stored<crate::domain::Claim>>| {
            Some(entry(Uuid::now_v7(), String::new(), "OK"))
        };
        let audit = BatchAudit {
            row: &row,
            refused: &[],
        };
        let answer = store.submit_claims(&rows, &|_| Vec::new(), audit).await;
        assert!(answer.is_err(), "{db}: {answer:?}");
        for partner_id in &partners {
            let filter = crate::store::ClaimFilter {
                partner_id: Some(*partner_id),
                ..Default::default()
            };
            let claims = store
                .list_claims(&filter, &Page::first(10))
                .await
                .expect("claims");
            assert!(claims.is_empty(), "{db}: no claim is stored: {claims:?}");
        }
        assert_eq!(audit_log(&store).await, Vec::new(), "{db}: nor any entry");
    }
}

/// A batch written as one statement inserts every row as new, without `ON CONFLICT`: a row
/// that is not new fails the statement on its key, which must read as "not written whole"
/// (the batch then goes step by step, which answers such rows), while any other unique
/// violation stays an error. Each case is made on PostgreSQL's own tables by copying a stored
/// row with only the other keys changed.
#[tokio::test]
async fn a_row_not_new_fails_a_whole_statement_on_a_key_read_as_not_written_whole() {
    use sqlx::Connection as _;
    let (store, url) = migrated_postgres().await;
    let policy = Policy::from_toml(DEFAULT_POLICY_TOML).expect("policy");
    let one = idem("RegisterPartner");
    let call = super::Recorded::unaudited(&one, &|_| Vec::new());
    let Ok(Stored::Fresh(registered)) = store.register_partner(call, &partner(5)).await else {
        panic!("the partner is registered");
    };
    let items = vec![LossItem::parse(AffectedService::KakaotalkChannel, 400_000, 0).expect("item")];
    let submission = ClaimSubmission {
        idem: idem("SubmitClaim"),
        partner: PartnerRef::Id(registered.partner_id),
        claim: NewClaim {
            partner_id: registered.partner_id,
            items: items.clone(),
            evidence: Vec::new(),
            decision: policy.decide(&items),
            submitted_by: "ops".into(),
            trace_context: None,
        },
    };
    let row = |_: usize, _: &Result<Stored<crate::domain::Claim>>| {
        Some(entry(Uuid::now_v7(), String::new(), "OK"))
    };
    let audit = BatchAudit {
        row: &row,
        refused: &[],
    };
    let filed = store
        .submit_claims(&[submission], &|_| Vec::new(), audit)
        .await
        .expect("the claim is filed");
    assert!(matches!(filed[..], [Ok(Stored::Fresh(_))]), "{filed:?}");

    let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
    // (table, the change that leaves only the key under test shared, whether it is read as
    // a row not new)
    let cases = [
        ("idempotency", "", true),
        ("partners", "UPDATE copied SET partner_id = 'another'", true),
        ("claims", "UPDATE copied SET claim_id = 'another'", true),
        ("audit_events", "", false),
        (
            "partners",
            "UPDATE copied SET business_registration_number = 'another'",
            false,
        ),
    ];
    for (table, change, not_new) in cases {
        let mut tx = conn.begin().await.expect("begin");
        let copy =
            format!("CREATE TEMP TABLE copied ON COMMIT DROP AS SELECT * FROM {table} LIMIT 1");
        sqlx::raw_sql(sqlx::AssertSqlSafe(copy))
            .execute(&mut *tx)
            .await
            .expect("copy");
        if !change.is_empty() {
            sqlx::raw_sql(sqlx::AssertSqlSafe(change))
                .execute(&mut *tx)
                .await
                .expect("change");
        }
        let insert = format!("INSERT INTO {table} SELECT * FROM copied");
        let error = sqlx::raw_sql(sqlx::AssertSqlSafe(insert))
            .execute(&mut *tx)
            .await
            .expect_err("the copy shares a key");
        let sqlx::Error::Database(e) = &error else {
            panic!("{table}: a database error: {error}");
        };
        assert!(e.is_unique_violation(), "{table} ({change}): {e}");
        assert_eq!(
            crate::store::batch::not_written_whole(&**e),
            not_new,
            "{table} ({change}): {e} on {:?}",
            e.constraint()
        );
        tx.rollback().await.expect("rollback");
    }
}

/// The spans opened while it is the default subscriber: each one's name and fields.
#[derive(Clone, Default)]
struct Opened(Arc<std::sync::Mutex<Vec<(String, Fields)>>>);

#[derive(Debug, Default)]
struct Fields(Vec<(String, String)>);

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.push((field.name().to_owned(), value.to_owned()));
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Opened {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _: &tracing::span::Id,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        let name = attrs.metadata().name().to_owned();
        self.0.lock().expect("lock").push((name, fields));
    }
}

#[tokio::test]
async fn every_store_call_is_a_client_span_named_after_its_method() {
    use tracing_subscriber::layer::SubscriberExt as _;
    let dir = tempfile::tempdir().expect("dir");
    for (db, store) in stores(&dir).await {
        let opened = Opened::default();
        let _default =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(opened.clone()));
        let rows = vec![(idem("RegisterPartner"), partner(5))];
        register_batch(&store, &rows, &unaudited)
            .await
            .expect("registered");
        store.get_partner(PartnerId::new()).await.expect("read");
        let opened = opened.0.lock().expect("lock");
        let fields = |name: &str| {
            let found = opened.iter().find(|(n, _)| n == name);
            let (_, fields) = found.unwrap_or_else(|| panic!("{db}: no span {name}: {opened:?}"));
            fields.0.clone()
        };
        let system = if db == "postgres" { "postgresql" } else { db };
        // The database's name: each test makes its own on PostgreSQL.
        let namespace = if db == "postgres" {
            let mut named = fields("store.get_partner").into_iter();
            let namespace = named.find(|(k, _)| k == "db.namespace").map(|(_, v)| v);
            let namespace = namespace.unwrap_or_default();
            assert!(namespace.starts_with("payouts_test_"), "{namespace}");
            namespace
        } else {
            "main".to_owned()
        };
        let namespace = namespace.as_str();
        let client = |operation: &str, extra: &[(&str, &str)]| {
            let mut expected = vec![
                ("otel.kind", "client"),
                ("db.system.name", system),
                ("db.operation.name", operation),
                ("db.namespace", namespace),
            ];
            expected.extend(extra);
            let owned = |(k, v): &(&str, &str)| (k.to_string(), v.to_string());
            expected.iter().map(owned).collect::<Vec<_>>()
        };
        assert_eq!(
            fields("store.get_partner"),
            client("get_partner", &[]),
            "{db}"
        );
        assert_eq!(
            fields("store.register_partners"),
            client("register_partners", &[("rows", "1")]),
            "{db}: with the fields the method adds"
        );
    }
}

/// Rows as a release before the programme totals wrote them: three partners, their claims
/// (approved, pending review, rejected) and the approved one's disbursement, paid.
const ROWS_BEFORE_TOTALS: &str = "
    INSERT INTO partners (partner_id, business_registration_number, legal_name,
        representative_name, affected_services, bank_code, account_sealed, account_last4,
        holder_name, account_changed_by, account_change_time, contact_email, create_time,
        update_time, version)
    VALUES ('p1', '1', 'A', 'A', '[]', '004', 'k:x', '0001', 'A', 'a', 0, 'a@example.com', 0, 0, 1),
           ('p2', '2', 'B', 'B', '[]', '004', 'k:x', '0002', 'B', 'a', 0, 'b@example.com', 0, 0, 1),
           ('p3', '3', 'C', 'C', '[]', '004', 'k:x', '0003', 'C', 'a', 0, 'c@example.com', 0, 0, 1);
    INSERT INTO claims (claim_id, partner_id, status, tier, reported_loss_krw,
        recognized_loss_krw, compensation_krw, policy_version, items, decision, submitted_by,
        create_time, update_time)
    VALUES ('c1', 'p1', 'approved', 'small', 100, 100, 30000, 'v', '[]', '{}', 'a', 0, 0),
           ('c2', 'p2', 'pending_review', 'review', 600000, 600000, 0, 'v', '[]', '{}', 'a', 0, 0),
           ('c3', 'p3', 'rejected', 'none', 0, 0, 0, 'v', '[]', '{}', 'a', 0, 0);
    INSERT INTO disbursements (disbursement_id, claim_id, partner_id, amount_krw, status,
        bank_code, account_sealed, account_last4, holder_name, create_time, update_time)
    VALUES ('d1', 'c1', 'p1', 30000, 'paid', '004', 'k:x', '0001', 'A', 0, 0);
";

/// Writes after the totals were added, each with the summary's figures after it: approved
/// (count, KRW), paid (count, KRW), failed (count, KRW), pending review, rejected.
const WRITES_AND_FIGURES: &[(&str, [i64; 8])] = &[
    ("", [1, 30_000, 1, 30_000, 0, 0, 1, 1]),
    (
        "UPDATE disbursements SET status = 'failed'",
        [1, 30_000, 0, 0, 1, 30_000, 1, 1],
    ),
    (
        "UPDATE claims SET status = 'approved' WHERE claim_id = 'c2';
         INSERT INTO disbursements (disbursement_id, claim_id, partner_id, amount_krw, status,
             bank_code, account_sealed, account_last4, holder_name, create_time, update_time)
         VALUES ('d2', 'c2', 'p2', 50000, 'paid', '004', 'k:x', '0002', 'B', 1, 1)",
        [2, 80_000, 1, 50_000, 1, 30_000, 0, 1],
    ),
    // Neither status nor amount moved.
    (
        "UPDATE disbursements SET update_time = 7; UPDATE claims SET update_time = 7",
        [2, 80_000, 1, 50_000, 1, 30_000, 0, 1],
    ),
    (
        "UPDATE disbursements SET amount_krw = 40000 WHERE disbursement_id = 'd2'",
        [2, 70_000, 1, 40_000, 1, 30_000, 0, 1],
    ),
    (
        "DELETE FROM disbursements WHERE disbursement_id = 'd2'",
        [1, 30_000, 0, 0, 1, 30_000, 0, 1],
    ),
];

fn figures(s: &super::ProgramSummary) -> [i64; 8] {
    [
        s.approved.count,
        s.approved.krw.won(),
        s.paid.count,
        s.paid.krw.won(),
        s.failed.count,
        s.failed.krw.won(),
        s.pending_review_count,
        s.rejected_count,
    ]
}

/// The summary's figures after each of [`WRITES_AND_FIGURES`], then after many statements
/// that each move a status and back; `rows` counts `program_totals`' rows.
async fn totals_follow_the_writes<F, R>(db: &str, store: &dyn Store, run: F, rows: R)
where
    F: AsyncFn(&str),
    R: AsyncFn() -> i64,
{
    for (write, expected) in WRITES_AND_FIGURES {
        if !write.is_empty() {
            run(write).await;
        }
        let summary = store.program_summary().await.expect("summary");
        assert_eq!(&figures(&summary), expected, "{db}: after {write:?}");
    }
    let expected = WRITES_AND_FIGURES.last().expect("figures").1;
    for _ in 0..200 {
        run("UPDATE disbursements SET status = 'paid' WHERE disbursement_id = 'd1'").await;
        run("UPDATE disbursements SET status = 'failed' WHERE disbursement_id = 'd1'").await;
    }
    let summary = store.program_summary().await.expect("summary");
    assert_eq!(figures(&summary), expected, "{db}: after 400 moves");
    // That read found more rows than a summary sums before folding them: one per status now.
    assert!(rows().await <= 5, "{db}: {} rows of totals", rows().await);
    let summary = store.program_summary().await.expect("summary");
    assert_eq!(figures(&summary), expected, "{db}: after the fold");
}

/// Applies `migrator`'s migrations up to `before` to `pool`, writes [`ROWS_BEFORE_TOTALS`],
/// applies the rest, and checks [`totals_follow_the_writes`] on the store `open` makes.
macro_rules! totals_from_the_release_before {
    ($db:literal, $pool:expr, $migrator:expr, $before:literal, $open:expr) => {{
        let pool = $pool;
        $migrator
            .run_to($before, &pool)
            .await
            .expect("the release before");
        sqlx::raw_sql(ROWS_BEFORE_TOTALS)
            .execute(&pool)
            .await
            .expect("rows");
        $migrator.run(&pool).await.expect("migrate");
        let store = $open.await.expect("open");
        let run = async |sql: &str| {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                .execute(&pool)
                .await
                .expect("write");
        };
        let rows = async || -> i64 {
            sqlx::query_scalar("SELECT COUNT(*) FROM program_totals")
                .fetch_one(&pool)
                .await
                .expect("count")
        };
        totals_follow_the_writes($db, &store, run, rows).await;
    }};
}

#[tokio::test]
async fn the_programme_totals_start_from_the_rows_written_before_and_follow_every_write() {
    use std::str::FromStr as _;
    let dir = tempfile::tempdir().expect("dir");
    let url = format!("sqlite://{}", dir.path().join("totals.db").display());
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(&url)
        .expect("url")
        .create_if_missing(true);
    totals_from_the_release_before!(
        "sqlite",
        sqlx::SqlitePool::connect_with(options).await.expect("open"),
        super::sqlite::MIGRATOR,
        7,
        SqliteStore::connect(&url, &Default::default(), cipher())
    );
    let url = fresh_postgres().await;
    totals_from_the_release_before!(
        "postgres",
        sqlx::PgPool::connect(&url).await.expect("connect"),
        super::postgres::MIGRATOR,
        9,
        PgStore::connect(&url, &Default::default(), cipher())
    );
}
