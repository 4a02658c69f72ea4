//! Batch isolation: a row that passes validation but that the database refuses fails only its
//! own call, never the other rows it shared a statement or transaction with (group commit of
//! unary calls, a batch of an import, a batch of a settlement report being staged).
//!
//! The database is made to refuse marked rows with a trigger created in the test database.

use std::collections::BTreeMap;

use partner_payouts::proto::payouts::v1 as pb;
use sqlx::{AssertSqlSafe, Connection as _};
use tonic::Code;

use crate::helpers::*;
use crate::imports::{
    all_partners, audit_log, by_id, claim_row, get_partner, import_claims, import_partners,
    partner_row, row_error,
};
use crate::on_both_databases;
use crate::reconcile::{line, now, paid, reconcile, report};

use pb::import_claims_response::Outcome as ClaimOutcome;
use pb::import_partners_response::Outcome as PartnerOutcome;

/// The legal name of partners the database refuses to store.
const POISONED_NAME: &str = "Poisoned Row Co";
/// The loss of claims the database refuses to store.
const POISONED_LOSS_KRW: i64 = 77_777;
/// The key of a settlement line the database refuses to stage.
const POISONED_KEY: &str = "poisoned-line";

/// Makes the database refuse, with an error of its own, every row inserted into `table` for
/// which `condition` (on `NEW`) holds.
async fn poison(app: &TestApp, table: &str, condition: &str) {
    let sql = match app.db {
        Db::Postgres => format!(
            "CREATE FUNCTION poison_{table}() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'poisoned row'; END $$; \
             CREATE TRIGGER poison_{table} BEFORE INSERT ON {table} FOR EACH ROW \
             WHEN ({condition}) EXECUTE FUNCTION poison_{table}();"
        ),
        Db::Sqlite => format!(
            "CREATE TRIGGER poison_{table} BEFORE INSERT ON {table} WHEN {condition} \
             BEGIN SELECT RAISE(ABORT, 'poisoned row'); END;"
        ),
    };
    match app.db {
        Db::Postgres => {
            let mut conn = sqlx::PgConnection::connect(&app.database_url)
                .await
                .expect("connect to the test database");
            sqlx::raw_sql(AssertSqlSafe(sql))
                .execute(&mut conn)
                .await
                .expect("create the trigger");
        }
        Db::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(&app.database_url)
                .await
                .expect("connect to the test database");
            sqlx::raw_sql(AssertSqlSafe(sql))
                .execute(&mut conn)
                .await
                .expect("create the trigger");
        }
    }
}

fn poisoned_partner(seed: u64) -> pb::Partner {
    let mut p = partner(seed);
    p.legal_name = POISONED_NAME.into();
    p
}

/// The outcome codes the audit log holds for `method`, by request id, once it holds `calls`
/// of them (the audit entry of a failed call may be written just after its answer).
async fn audited(app: &TestApp, method: &str, calls: usize) -> BTreeMap<String, Vec<String>> {
    eventually(10, || async {
        let mut by_request: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for e in audit_log(app).await {
            if e.method == method && !e.request_id.is_empty() {
                by_request
                    .entry(e.request_id)
                    .or_default()
                    .push(e.outcome_code);
            }
        }
        (by_request.values().map(Vec::len).sum::<usize>() >= calls).then_some(by_request)
    })
    .await
}

/// What each call should have been audited with: `OK`, or `INTERNAL` for the poisoned ones.
fn expected_audit<'a>(
    calls: impl IntoIterator<Item = (&'a String, bool)>,
) -> BTreeMap<String, Vec<String>> {
    calls
        .into_iter()
        .map(|(id, poisoned)| {
            let code = if poisoned { "INTERNAL" } else { "OK" };
            (id.clone(), vec![code.to_owned()])
        })
        .collect()
}

on_both_databases!(
    a_refused_registration_fails_only_its_own_call,
    |app: TestApp| async move {
        poison(
            &app,
            "partners",
            &format!("NEW.legal_name = '{POISONED_NAME}'"),
        )
        .await;
        // Every tenth call is refused by the database; all are sent at once, so they share
        // group commits with the others.
        let calls: Vec<(String, bool)> = (0..100).map(|i| (request_id(), i % 10 == 3)).collect();
        let answers = futures::future::join_all(calls.iter().zip(0..).map(
            |((request_id, poisoned), seed)| {
                let mut client = app.partners();
                let partner = if *poisoned {
                    poisoned_partner(100 + seed)
                } else {
                    partner(100 + seed)
                };
                let request = pb::RegisterPartnerRequest {
                    request_id: request_id.clone(),
                    partner: Some(partner),
                };
                async move { client.register_partner(request).await }
            },
        ))
        .await;

        let mut stored = Vec::new();
        for ((_, poisoned), answer) in calls.iter().zip(answers) {
            if *poisoned {
                let status = answer.expect_err("the database refuses this row");
                assert_eq!(status.code(), Code::Internal, "{status:?}");
            } else {
                let partner = answer
                    .unwrap_or_else(|s| panic!("a good row failed with a poisoned one: {s:?}"))
                    .into_inner()
                    .partner
                    .expect("partner");
                stored.push(partner);
            }
        }
        assert_eq!(stored.len(), 90);
        for partner in &stored {
            assert_eq!(&get_partner(&app, &partner.partner_id).await, partner);
        }
        assert_eq!(all_partners(&app).await.len(), 90);

        let log = audited(&app, "/payouts.v1.PartnerService/RegisterPartner", 100).await;
        assert_eq!(
            log,
            expected_audit(calls.iter().map(|(id, poisoned)| (id, *poisoned)))
        );
    }
);

on_both_databases!(
    a_refused_claim_fails_only_its_own_call,
    |app: TestApp| async move {
        let partners = import_partners(
            &app,
            (0..100)
                .map(|seed| partner_row(&request_id(), partner(100 + seed)))
                .collect(),
        )
        .await;
        let partner_ids: Vec<String> = partners
            .into_iter()
            .map(|a| a.partner.expect("registered").partner_id)
            .collect();
        poison(
            &app,
            "claims",
            &format!("NEW.reported_loss_krw = {POISONED_LOSS_KRW}"),
        )
        .await;
        let calls: Vec<(String, bool)> = (0..100).map(|i| (request_id(), i % 10 == 7)).collect();
        let answers = futures::future::join_all(calls.iter().zip(&partner_ids).map(
            |((request_id, poisoned), partner_id)| {
                let mut client = app.claims();
                let loss = if *poisoned { POISONED_LOSS_KRW } else { 100 };
                let request = pb::SubmitClaimRequest {
                    request_id: request_id.clone(),
                    partner_id: partner_id.clone(),
                    items: vec![full_weight_item(loss)],
                    evidence: vec![],
                };
                async move { client.submit_claim(request).await }
            },
        ))
        .await;

        let mut filed = 0;
        for ((_, poisoned), answer) in calls.iter().zip(answers) {
            if *poisoned {
                let status = answer.expect_err("the database refuses this row");
                assert_eq!(status.code(), Code::Internal, "{status:?}");
            } else {
                let claim = answer
                    .unwrap_or_else(|s| panic!("a good row failed with a poisoned one: {s:?}"))
                    .into_inner()
                    .claim
                    .expect("claim");
                assert_eq!(claim.status(), pb::ClaimStatus::Approved, "{claim:?}");
                assert_eq!(get_claim(&app, &claim.claim_id).await, claim);
                filed += 1;
            }
        }
        assert_eq!(filed, 90);
        let listed = app
            .claims()
            .list_claims(pb::ListClaimsRequest {
                page_size: 1000,
                ..Default::default()
            })
            .await
            .expect("list claims")
            .into_inner()
            .claims;
        assert_eq!(listed.len(), 90);

        let log = audited(&app, "/payouts.v1.ClaimService/SubmitClaim", 100).await;
        assert_eq!(
            log,
            expected_audit(calls.iter().map(|(id, poisoned)| (id, *poisoned)))
        );
    }
);

on_both_databases!(
    an_import_batch_with_a_refused_row_creates_the_others,
    |app: TestApp| async move {
        poison(
            &app,
            "partners",
            &format!("NEW.legal_name = '{POISONED_NAME}'"),
        )
        .await;
        poison(
            &app,
            "claims",
            &format!("NEW.reported_loss_krw = {POISONED_LOSS_KRW}"),
        )
        .await;
        const POISONED_ROW: usize = 13;

        // Partners: 20 rows in one batch, row 13 refused by the database.
        let ids: Vec<String> = (0..20).map(|_| request_id()).collect();
        let rows = ids
            .iter()
            .zip(0..)
            .map(|(id, seed)| {
                if seed == POISONED_ROW as u64 {
                    partner_row(id, poisoned_partner(200 + seed))
                } else {
                    partner_row(id, partner(200 + seed))
                }
            })
            .collect();
        let answers = import_partners(&app, rows).await;
        assert_eq!(answers.len(), 20, "{answers:#?}");
        let mut partner_ids = Vec::new();
        for (i, answer) in answers.iter().enumerate() {
            assert_eq!(answer.row, i as i64, "{answers:#?}");
            if i == POISONED_ROW {
                assert_eq!(answer.outcome(), PartnerOutcome::Rejected, "{answer:?}");
                let status = row_error(answer.error.as_ref());
                assert_eq!(status.code(), Code::Internal, "{status:?}");
                assert!(answer.partner.is_none());
            } else {
                assert_eq!(answer.outcome(), PartnerOutcome::Created, "{answer:?}");
                let created = answer.partner.clone().expect("created partner");
                assert_eq!(get_partner(&app, &created.partner_id).await, created);
                partner_ids.push(created.partner_id);
            }
        }
        assert_eq!(all_partners(&app).await.len(), 19);
        let log = audited(&app, "/payouts.v1.PartnerService/ImportPartners", 20).await;
        assert_eq!(
            log,
            expected_audit(
                ids.iter()
                    .enumerate()
                    .map(|(i, id)| (id, i == POISONED_ROW))
            )
        );

        // Claims for the 19 partners, and one more row: 20 rows, row 13 refused.
        let mut rows: Vec<pb::ImportClaimsRequest> = partner_ids
            .iter()
            .map(|id| claim_row(by_id(id), vec![full_weight_item(100)]))
            .collect();
        let extra = register(&app, partner(300)).await;
        rows.insert(
            POISONED_ROW,
            claim_row(
                by_id(&extra.partner_id),
                vec![full_weight_item(POISONED_LOSS_KRW)],
            ),
        );
        let ids: Vec<String> = rows.iter().map(|r| r.request_id.clone()).collect();
        let answers = import_claims(&app, rows).await;
        assert_eq!(answers.len(), 20, "{answers:#?}");
        for (i, answer) in answers.iter().enumerate() {
            assert_eq!(answer.row, i as i64, "{answers:#?}");
            if i == POISONED_ROW {
                assert_eq!(answer.outcome(), ClaimOutcome::Rejected, "{answer:?}");
                let status = row_error(answer.error.as_ref());
                assert_eq!(status.code(), Code::Internal, "{status:?}");
                assert!(answer.claim.is_none());
            } else {
                assert_eq!(answer.outcome(), ClaimOutcome::Created, "{answer:?}");
                let claim = answer.claim.clone().expect("created claim");
                assert_eq!(claim.status(), pb::ClaimStatus::Approved, "{claim:?}");
                assert_eq!(get_claim(&app, &claim.claim_id).await, claim);
            }
        }
        let log = audited(&app, "/payouts.v1.ClaimService/ImportClaims", 20).await;
        assert_eq!(
            log,
            expected_audit(
                ids.iter()
                    .enumerate()
                    .map(|(i, id)| (id, i == POISONED_ROW))
            )
        );
        // The refused row's request id stores nothing: the same row again is refused again
        // (not replayed), and a good claim for that partner is then filed.
        let again = app
            .claims()
            .submit_claim(pb::SubmitClaimRequest {
                request_id: ids[POISONED_ROW].clone(),
                partner_id: extra.partner_id.clone(),
                items: vec![full_weight_item(POISONED_LOSS_KRW)],
                evidence: vec![],
            })
            .await
            .expect_err("refused again");
        assert_eq!(again.code(), Code::Internal, "{again:?}");
        let claim = submit(&app, &extra.partner_id, vec![full_weight_item(100)]).await;
        assert_eq!(claim.status(), pb::ClaimStatus::Approved, "{claim:?}");
    }
);

on_both_databases!(
    a_settlement_line_the_database_refuses_is_named,
    |app: TestApp| async move {
        let kept = paid(&app, 1, 100).await;
        poison(
            &app,
            "settlement_lines",
            &format!("NEW.idempotency_key = '{POISONED_KEY}'"),
        )
        .await;
        // 601 lines, staged in two batches; the refused one is the report's line 552, the
        // 251st line of the second message.
        let mut lines = vec![line(
            &kept.idempotency_key,
            kept.amount_krw,
            pb::SettlementStatus::Returned,
        )];
        lines.extend(
            (0..600).map(|i| line(&format!("filler-{i}"), 1_000, pb::SettlementStatus::Settled)),
        );
        lines[551].idempotency_key = POISONED_KEY.into();
        let status = reconcile(&app, report(&request_id(), now(), &lines, 301))
            .await
            .err()
            .expect("the report is refused");
        assert_eq!(bad_fields(&status), vec!["lines[250]"], "{status:?}");
        assert!(status.message().contains("line 552"), "{status:?}");
        // Nothing changed: the payout the report returns is still PAID.
        assert_eq!(get(&app, &kept.disbursement_id).await, kept);

        // The report without that line is reconciled in full.
        lines.remove(551);
        let done = reconcile(&app, report(&request_id(), now(), &lines, 301))
            .await
            .expect("the report without the refused line");
        assert_eq!(done.summary.line_count, 600);
        assert_eq!(done.summary.reopened_count, 1);
        assert!(done.one(&kept.idempotency_key).reopened);
        assert_eq!(
            get(&app, &kept.disbursement_id).await.status(),
            pb::DisbursementStatus::Failed
        );
    }
);
