//! Bulk intake through the wire: `ImportPartners` and `ImportClaims` answer every row in order
//! as its unary call would (created, replayed, or rejected with the same error details), a
//! stream cut short leaves only whole rows, and concurrent unary calls share commits.

use std::collections::{BTreeMap, BTreeSet};

use partner_payouts::proto::google::rpc;
use partner_payouts::proto::payouts::v1::{
    self as pb, audit_service_client::AuditServiceClient, import_claims_request,
};
use prost::Message as _;
use tonic::Code;
use tonic_types::StatusExt as _;

use crate::helpers::*;
use crate::on_both_databases;

use pb::import_claims_response::Outcome as ClaimOutcome;
use pb::import_partners_response::Outcome as PartnerOutcome;

pub(crate) async fn import_partners(
    app: &TestApp,
    rows: Vec<pb::ImportPartnersRequest>,
) -> Vec<pb::ImportPartnersResponse> {
    let mut answers = app
        .partners()
        .import_partners(tokio_stream::iter(rows))
        .await
        .expect("import partners")
        .into_inner();
    let mut out = Vec::new();
    while let Some(answer) = answers.message().await.expect("answer") {
        out.push(answer);
    }
    out
}

pub(crate) async fn import_claims(
    app: &TestApp,
    rows: Vec<pb::ImportClaimsRequest>,
) -> Vec<pb::ImportClaimsResponse> {
    let mut answers = app
        .claims()
        .import_claims(tokio_stream::iter(rows))
        .await
        .expect("import claims")
        .into_inner();
    let mut out = Vec::new();
    while let Some(answer) = answers.message().await.expect("answer") {
        out.push(answer);
    }
    out
}

pub(crate) fn partner_row(request_id: &str, partner: pb::Partner) -> pb::ImportPartnersRequest {
    pb::ImportPartnersRequest {
        request_id: request_id.into(),
        partner: Some(partner),
    }
}

pub(crate) fn claim_row(
    partner: import_claims_request::Partner,
    items: Vec<pb::LossItem>,
) -> pb::ImportClaimsRequest {
    pb::ImportClaimsRequest {
        request_id: request_id(),
        partner: Some(partner),
        items,
        evidence: vec![],
    }
}

pub(crate) fn by_id(partner_id: &str) -> import_claims_request::Partner {
    import_claims_request::Partner::PartnerId(partner_id.into())
}

fn by_number(brn: &str) -> import_claims_request::Partner {
    import_claims_request::Partner::BusinessRegistrationNumber(brn.into())
}

/// A rejected row's error as the `tonic::Status` a unary call would have failed with.
pub(crate) fn row_error(error: Option<&rpc::Status>) -> tonic::Status {
    let error = error.expect("a rejected row carries its error");
    tonic::Status::with_details(
        Code::from(error.code),
        error.message.clone(),
        error.encode_to_vec().into(),
    )
}

pub(crate) async fn all_partners(app: &TestApp) -> Vec<pb::Partner> {
    let mut partners = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = app
            .partners()
            .list_partners(pb::ListPartnersRequest {
                page_size: 1000,
                page_token,
                ..Default::default()
            })
            .await
            .expect("list partners")
            .into_inner();
        partners.extend(page.partners);
        if page.next_page_token.is_empty() {
            return partners;
        }
        page_token = page.next_page_token;
    }
}

pub(crate) async fn get_partner(app: &TestApp, partner_id: &str) -> pb::Partner {
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

/// RegisterPartner with the request id given: the partner it answers.
async fn register_as(app: &TestApp, request_id: &str, partner: pb::Partner) -> pb::Partner {
    app.partners()
        .register_partner(pb::RegisterPartnerRequest {
            request_id: request_id.into(),
            partner: Some(partner),
        })
        .await
        .expect("register")
        .into_inner()
        .partner
        .expect("partner")
}

/// The first 1,000 entries of the audit log.
pub(crate) async fn audit_log(app: &TestApp) -> Vec<pb::AuditEvent> {
    AuditServiceClient::new(app.channel.clone())
        .list_audit_events(pb::ListAuditEventsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("audit log")
        .into_inner()
        .audit_events
}

// Rows that share no key are first written as one all-or-nothing statement; when one of them
// turns out not to be new, nothing of that attempt may stay, and the rows are answered one by
// one.
on_both_databases!(
    a_batch_with_one_row_not_new_is_answered_row_by_row,
    |app: TestApp| async move {
        let first = request_id();
        let registered = register_as(&app, &first, partner(1)).await;
        use PartnerOutcome::{Created, Rejected, Replayed};

        // A replayed row among new ones.
        let (a, b) = (request_id(), request_id());
        let answers = import_partners(
            &app,
            vec![
                partner_row(&a, partner(20)),
                partner_row(&first, partner(1)),
                partner_row(&b, partner(21)),
            ],
        )
        .await;
        let outcomes: Vec<PartnerOutcome> = answers.iter().map(|a| a.outcome()).collect();
        assert_eq!(outcomes, [Created, Replayed, Created], "{answers:#?}");
        assert_eq!(answers[1].partner.as_ref(), Some(&registered));
        let created_a = answers[0].partner.clone().expect("row 0 partner");

        // An already registered number among new ones.
        let (c, d, e) = (request_id(), request_id(), request_id());
        let answers = import_partners(
            &app,
            vec![
                partner_row(&c, partner(22)),
                partner_row(&d, partner(1)),
                partner_row(&e, partner(23)),
            ],
        )
        .await;
        let outcomes: Vec<PartnerOutcome> = answers.iter().map(|a| a.outcome()).collect();
        assert_eq!(outcomes, [Created, Rejected, Created], "{answers:#?}");
        let duplicate = row_error(answers[1].error.as_ref());
        assert_eq!(reason(&duplicate), "PARTNER_ALREADY_REGISTERED");
        let info = duplicate.get_details_error_info().expect("info");
        assert_eq!(
            info.metadata.get("partner_id"),
            Some(&registered.partner_id)
        );

        // Each partner once, and each new row's request id replays its own answer.
        let mut stored: Vec<String> = all_partners(&app)
            .await
            .into_iter()
            .map(|p| p.business_registration_number)
            .collect();
        stored.sort();
        let mut expected: Vec<String> = [1, 20, 21, 22, 23].map(brn).to_vec();
        expected.sort();
        assert_eq!(stored, expected);
        assert_eq!(register_as(&app, &a, partner(20)).await, created_a);
        // The refused row's request id was given back: it may be used again.
        let retried = register_as(&app, &d, partner(24)).await;
        assert_eq!(retried.business_registration_number, brn(24));

        // One audit entry per row, none left from the first attempt.
        let events = audit_log(&app).await;
        let mut audited: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for event in events
            .iter()
            .filter(|e| e.method == "/payouts.v1.PartnerService/ImportPartners")
            .filter(|e| !e.request_id.is_empty())
        {
            audited
                .entry(event.request_id.clone())
                .or_default()
                .push(event.outcome_code.clone());
        }
        let expected: BTreeMap<String, Vec<String>> = [
            (a, "OK"),
            (first, "OK"),
            (b, "OK"),
            (c, "OK"),
            (d, "ALREADY_EXISTS"),
            (e, "OK"),
        ]
        .into_iter()
        .map(|(id, code)| (id, vec![code.to_owned()]))
        .collect();
        assert_eq!(audited, expected);
    }
);

on_both_databases!(
    import_partners_answers_every_row_in_order,
    |app: TestApp| async move {
        let registered = register(&app, partner(1)).await;
        // A unary call whose request id an import row then repeats.
        let unary_id = request_id();
        let unary = register_as(&app, &unary_id, partner(2)).await;

        let mut blank_name = partner(3);
        blank_name.legal_name = "   ".into();
        let first_id = request_id();
        let eleventh_id = request_id();
        let rows = vec![
            partner_row(&first_id, partner(10)),
            partner_row(&request_id(), blank_name),
            partner_row(&request_id(), partner(1)),
            partner_row(&unary_id, partner(2)),
            partner_row(&eleventh_id, partner(11)),
            // The same number as row 0, in the same batch.
            partner_row(&request_id(), partner(10)),
            // Row 0 again, as a retry would send it.
            partner_row(&first_id, partner(10)),
            // Row 4's request id with another body.
            partner_row(&eleventh_id, partner(12)),
            partner_row("not-a-uuid", partner(13)),
        ];
        let answers = import_partners(&app, rows).await;
        assert_eq!(answers.len(), 9, "{answers:#?}");
        for (i, answer) in (0..).zip(&answers) {
            assert_eq!(answer.row, i, "{answers:#?}");
        }
        let outcomes: Vec<PartnerOutcome> = answers.iter().map(|a| a.outcome()).collect();
        use PartnerOutcome::{Created, Rejected, Replayed};
        assert_eq!(
            outcomes,
            [
                Created, Rejected, Rejected, Replayed, Created, Rejected, Replayed, Rejected,
                Rejected
            ]
        );

        let created = answers[0].partner.clone().expect("row 0 partner");
        assert_eq!(created.business_registration_number, brn(10));
        assert_eq!(
            created
                .bank_account
                .as_ref()
                .expect("account")
                .account_number,
            "****6789"
        );
        assert_eq!(get_partner(&app, &created.partner_id).await, created);
        assert!(answers[0].error.is_none());

        // Rejected exactly as RegisterPartner would reject it.
        let invalid = row_error(answers[1].error.as_ref());
        assert_eq!(bad_fields(&invalid), ["partner.legal_name"]);
        assert!(answers[1].partner.is_none());

        let duplicate = row_error(answers[2].error.as_ref());
        assert_eq!(duplicate.code(), Code::AlreadyExists);
        assert_eq!(reason(&duplicate), "PARTNER_ALREADY_REGISTERED");
        let info = duplicate.get_details_error_info().expect("info");
        assert_eq!(
            info.metadata.get("partner_id"),
            Some(&registered.partner_id)
        );

        // A row repeating a unary call replays it, and vice versa below.
        assert_eq!(answers[3].partner.as_ref(), Some(&unary));

        let within = row_error(answers[5].error.as_ref());
        assert_eq!(reason(&within), "PARTNER_ALREADY_REGISTERED");
        let info = within.get_details_error_info().expect("info");
        assert_eq!(info.metadata.get("partner_id"), Some(&created.partner_id));

        assert_eq!(answers[6].partner.as_ref(), Some(&created));

        let reused = row_error(answers[7].error.as_ref());
        assert_eq!(reused.code(), Code::FailedPrecondition);
        assert_eq!(reason(&reused), "REQUEST_ID_REUSED");

        assert_eq!(
            bad_fields(&row_error(answers[8].error.as_ref())),
            ["request_id"]
        );

        let stored: BTreeSet<String> = all_partners(&app)
            .await
            .into_iter()
            .map(|p| p.business_registration_number)
            .collect();
        assert_eq!(stored, [1, 2, 10, 11].map(brn).into_iter().collect());

        // RegisterPartner with an imported row's request id and body replays the row.
        assert_eq!(register_as(&app, &first_id, partner(10)).await, created);

        // Every row is in the audit log as a call of its own, with its request id and outcome.
        let events = audit_log(&app).await;
        let rows: Vec<&pb::AuditEvent> = events
            .iter()
            .filter(|e| e.method == "/payouts.v1.PartnerService/ImportPartners")
            .filter(|e| !e.request_id.is_empty())
            .collect();
        assert_eq!(rows.len(), 9, "{events:#?}");
        let first = rows
            .iter()
            .find(|e| e.request_id == first_id && e.outcome_code == "OK")
            .expect("row 0 audited");
        assert_eq!(first.resource_id, created.partner_id);
        assert!(
            rows.iter()
                .any(|e| e.request_id == eleventh_id && e.outcome_code == "FAILED_PRECONDITION"),
            "{rows:#?}"
        );
        assert!(!format!("{events:?}").contains("456789"));
    }
);

on_both_databases!(
    import_claims_by_number_and_by_id,
    |app: TestApp| async move {
        let a = register(&app, partner(1)).await;
        let b = register(&app, partner(2)).await;
        let hyphenated = {
            let n = brn(1);
            format!("{}-{}-{}", &n[..3], &n[3..5], &n[5..])
        };
        let evidence = pb::Evidence {
            kind: pb::EvidenceKind::SalesLossProof as i32,
            uri: "s3://payouts-evidence/claims/b.pdf".into(),
            sha256: "ab".repeat(32),
            attach_time: None,
        };
        let mut with_evidence = claim_row(by_id(&b.partner_id), vec![full_weight_item(600_000)]);
        with_evidence.evidence = vec![evidence];
        let mut unnamed = claim_row(by_id(""), vec![full_weight_item(1_000)]);
        unnamed.partner = None;
        let rows = vec![
            claim_row(by_number(&hyphenated), vec![full_weight_item(1_000)]),
            with_evidence.clone(),
            claim_row(by_number(&brn(99)), vec![full_weight_item(1_000)]),
            claim_row(
                by_id(&uuid::Uuid::now_v7().to_string()),
                vec![full_weight_item(1_000)],
            ),
            unnamed,
            // Partner a again, by id: row 0 filed its one claim.
            claim_row(by_id(&a.partner_id), vec![full_weight_item(2_000)]),
            claim_row(by_number("123"), vec![full_weight_item(1_000)]),
            claim_row(by_number(&brn(2)), vec![]),
        ];
        let answers = import_claims(&app, rows).await;
        assert_eq!(answers.len(), 8, "{answers:#?}");
        for (i, answer) in (0..).zip(&answers) {
            assert_eq!(answer.row, i);
        }
        use ClaimOutcome::{Created, Rejected};
        let outcomes: Vec<ClaimOutcome> = answers.iter().map(|a| a.outcome()).collect();
        assert_eq!(
            outcomes,
            [
                Created, Created, Rejected, Rejected, Rejected, Rejected, Rejected, Rejected
            ]
        );

        let approved = answers[0].claim.clone().expect("row 0 claim");
        assert_eq!(approved.partner_id, a.partner_id);
        assert_eq!(approved.status(), pb::ClaimStatus::Approved);
        assert_eq!(approved.compensation_krw, 30_000);
        assert_eq!(approved.submitted_by, "local-dev");
        assert!(!approved.disbursement_id.is_empty());
        // What the import answered is what was stored.
        assert_eq!(get_claim(&app, &approved.claim_id).await, approved);

        let pending = answers[1].claim.clone().expect("row 1 claim");
        assert_eq!(pending.partner_id, b.partner_id);
        assert_eq!(pending.status(), pb::ClaimStatus::PendingReview);
        assert_eq!(pending.evidence.len(), 1);
        assert_eq!(pending.disbursement_id, "");
        assert_eq!(get_claim(&app, &pending.claim_id).await, pending);

        for i in [2, 3] {
            let missing = row_error(answers[i].error.as_ref());
            assert_eq!(missing.code(), Code::NotFound, "row {i}");
            assert_eq!(reason(&missing), "PARTNER_NOT_FOUND", "row {i}");
        }
        assert_eq!(
            bad_fields(&row_error(answers[4].error.as_ref())),
            ["partner_id"]
        );
        let second = row_error(answers[5].error.as_ref());
        assert_eq!(second.code(), Code::AlreadyExists);
        assert_eq!(reason(&second), "CLAIM_ALREADY_FILED");
        let info = second.get_details_error_info().expect("info");
        assert_eq!(info.metadata.get("claim_id"), Some(&approved.claim_id));
        assert_eq!(
            bad_fields(&row_error(answers[6].error.as_ref())),
            ["business_registration_number"]
        );
        assert_eq!(bad_fields(&row_error(answers[7].error.as_ref())), ["items"]);

        // A row that named its partner by id is a SubmitClaim call: each replays the other.
        let replay = app
            .claims()
            .submit_claim(pb::SubmitClaimRequest {
                request_id: with_evidence.request_id.clone(),
                partner_id: b.partner_id.clone(),
                items: with_evidence.items.clone(),
                evidence: with_evidence.evidence.clone(),
            })
            .await
            .expect("replay")
            .into_inner()
            .claim;
        assert_eq!(replay.as_ref(), Some(&pending));
        let again = import_claims(&app, vec![with_evidence]).await;
        assert_eq!(again[0].outcome(), ClaimOutcome::Replayed);
        assert_eq!(again[0].claim.as_ref(), Some(&pending));

        let disbursements = app
            .disbursements()
            .list_disbursements(pb::ListDisbursementsRequest::default())
            .await
            .expect("list disbursements")
            .into_inner()
            .disbursements;
        assert_eq!(disbursements.len(), 1, "one per approved claim");
        assert_eq!(disbursements[0].claim_id, approved.claim_id);
        assert_eq!(disbursements[0].amount_krw, 30_000);
    }
);

const CUT_ROWS: u64 = 1200;

on_both_databases!(
    a_cut_stream_leaves_only_whole_rows,
    |app: TestApp| async move {
        let rows: Vec<pb::ImportPartnersRequest> = (0..CUT_ROWS)
            .map(|seed| partner_row(&request_id(), partner(1000 + seed)))
            .collect();
        let (tx, rx) = tokio::sync::mpsc::channel(4096);
        let mut answers = app
            .partners()
            .import_partners(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("import starts")
            .into_inner();
        for row in &rows[..5] {
            tx.send(row.clone()).await.expect("send");
        }
        for i in 0..5 {
            let answer = answers.message().await.expect("answer").expect("a row");
            assert_eq!(answer.row, i);
            assert_eq!(answer.outcome(), PartnerOutcome::Created);
        }
        for row in &rows[5..] {
            tx.send(row.clone()).await.expect("send");
        }
        // Gone without a word: the call is reset, not half-closed.
        drop(answers);
        drop(tx);

        // Whatever was stored is whole: every partner reads back complete.
        let expected: BTreeMap<String, pb::Partner> = rows
            .iter()
            .map(|r| {
                let p = r.partner.clone().expect("partner");
                (p.business_registration_number.clone(), p)
            })
            .collect();
        let stored = eventually(10, || async {
            // Let the batch in hand finish: the count stops changing.
            let before = all_partners(&app).await.len();
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            let after = all_partners(&app).await;
            (after.len() == before).then_some(after)
        })
        .await;
        assert!(stored.len() >= 5, "{}", stored.len());
        for p in &stored {
            let sent = &expected[&p.business_registration_number];
            let read = get_partner(&app, &p.partner_id).await;
            assert_eq!(&read, p);
            assert_eq!(read.legal_name, sent.legal_name);
            assert_eq!(read.representative_name, sent.representative_name);
            assert_eq!(read.contact_email, sent.contact_email);
            assert_eq!(read.affected_services, sent.affected_services);
            let account = read.bank_account.expect("account");
            assert_eq!(account.account_number, "****6789");
            assert_eq!(account.bank_code, "004");
            assert!(!read.etag.is_empty());
        }

        // Sending everything again: the stored rows replay, the rest are created.
        let answers = import_partners(&app, rows.clone()).await;
        assert_eq!(answers.len(), rows.len());
        let mut replayed = BTreeSet::new();
        for (i, answer) in (0..).zip(&answers) {
            assert_eq!(answer.row, i);
            let p = answer.partner.clone().expect("partner");
            match answer.outcome() {
                PartnerOutcome::Replayed => {
                    replayed.insert(p.partner_id);
                }
                PartnerOutcome::Created => {}
                other => panic!("row {i}: {other:?} {:?}", answer.error),
            }
        }
        // (A superset only if a batch of the cut call committed after the snapshot.)
        let stored_ids: BTreeSet<String> = stored.into_iter().map(|p| p.partner_id).collect();
        assert!(stored_ids.is_subset(&replayed), "every stored row replays");
        assert_eq!(all_partners(&app).await.len(), rows.len());
    }
);

on_both_databases!(
    concurrent_unary_registrations_share_commits,
    |app: TestApp| async move {
        let answers = futures::future::join_all((0..64).map(|seed| {
            let mut client = app.partners();
            async move {
                client
                    .register_partner(pb::RegisterPartnerRequest {
                        request_id: request_id(),
                        partner: Some(partner(100 + seed)),
                    })
                    .await
            }
        }))
        .await;
        let ids: BTreeSet<String> = answers
            .into_iter()
            .map(|a| {
                a.expect("registered")
                    .into_inner()
                    .partner
                    .expect("partner")
                    .partner_id
            })
            .collect();
        assert_eq!(ids.len(), 64, "distinct ids");
        assert_eq!(all_partners(&app).await.len(), 64);

        // The same number from eight calls at once: one registers it, the others are told who.
        let answers = futures::future::join_all((0..8).map(|_| {
            let mut client = app.partners();
            async move {
                client
                    .register_partner(pb::RegisterPartnerRequest {
                        request_id: request_id(),
                        partner: Some(partner(7)),
                    })
                    .await
            }
        }))
        .await;
        let winners: Vec<pb::Partner> = answers
            .iter()
            .filter_map(|a| a.as_ref().ok())
            .map(|r| r.get_ref().partner.clone().expect("partner"))
            .collect();
        assert_eq!(winners.len(), 1, "{answers:?}");
        for answer in &answers {
            if let Err(status) = answer {
                assert_eq!(reason(status), "PARTNER_ALREADY_REGISTERED");
                let info = status.get_details_error_info().expect("info");
                assert_eq!(
                    info.metadata.get("partner_id"),
                    Some(&winners[0].partner_id)
                );
            }
        }
    }
);

on_both_databases!(imported_claims_are_paid, |app: TestApp| async move {
    let partners = import_partners(
        &app,
        (1..=3)
            .map(|seed| partner_row(&request_id(), partner(seed)))
            .collect(),
    )
    .await;
    assert!(
        partners
            .iter()
            .all(|p| p.outcome() == PartnerOutcome::Created),
        "{partners:#?}"
    );
    let rows = (1..=3)
        .map(|seed| claim_row(by_number(&brn(seed)), vec![full_weight_item(400_000)]))
        .collect();
    let claims = import_claims(&app, rows).await;
    for answer in &claims {
        assert_eq!(answer.outcome(), ClaimOutcome::Created, "{answer:?}");
        let claim = answer.claim.as_ref().expect("claim");
        assert_eq!(claim.status(), pb::ClaimStatus::Approved);
        assert_eq!(claim.compensation_krw, 50_000);
        let paid = eventually(20, || {
            let mut client = app.disbursements();
            let id = claim.disbursement_id.clone();
            async move {
                let d = client
                    .get_disbursement(pb::GetDisbursementRequest {
                        disbursement_id: id,
                    })
                    .await
                    .expect("get disbursement")
                    .into_inner()
                    .disbursement
                    .expect("disbursement");
                (d.status() == pb::DisbursementStatus::Paid).then_some(d)
            }
        })
        .await;
        assert_eq!(paid.claim_id, claim.claim_id);
        assert_eq!(paid.partner_id, claim.partner_id);
        assert_eq!(paid.amount_krw, 50_000);
        assert_eq!(paid.account_number, "****6789");
        let first = paid.history.first().expect("history");
        assert_eq!(first.to_status(), pb::DisbursementStatus::Queued);
        assert_eq!(first.actor, "local-dev");
        assert_eq!(first.reason, "claim approved");
        crate::events::feed_tells_the_history_of(&app, &paid).await;
    }
});

on_both_databases!(
    concurrent_imports_register_each_partner_once,
    |app: TestApp| async move {
        // The same partners under different request ids, from two streams at once (one in
        // reverse order): each is registered once, and the other row names the winner.
        let seeds: Vec<u64> = (0..300).map(|s| 5000 + s).collect();
        let forward: Vec<_> = seeds
            .iter()
            .map(|s| partner_row(&request_id(), partner(*s)))
            .collect();
        let backward: Vec<_> = seeds
            .iter()
            .rev()
            .map(|s| partner_row(&request_id(), partner(*s)))
            .collect();
        let (a, b) = tokio::join!(
            import_partners(&app, forward),
            import_partners(&app, backward)
        );
        let mut by_brn: BTreeMap<String, Vec<&pb::ImportPartnersResponse>> = BTreeMap::new();
        for (answers, order) in [(&a, "forward"), (&b, "backward")] {
            assert_eq!(answers.len(), seeds.len(), "{order}");
            for answer in answers {
                let brn = match &answer.partner {
                    Some(p) => p.business_registration_number.clone(),
                    None => {
                        let status = row_error(answer.error.as_ref());
                        assert_eq!(reason(&status), "PARTNER_ALREADY_REGISTERED", "{status:?}");
                        let seed = if order == "forward" {
                            seeds[usize::try_from(answer.row).expect("row")]
                        } else {
                            seeds[seeds.len() - 1 - usize::try_from(answer.row).expect("row")]
                        };
                        brn(seed)
                    }
                };
                by_brn.entry(brn).or_default().push(answer);
            }
        }
        assert_eq!(by_brn.len(), seeds.len());
        for (brn, answers) in &by_brn {
            let created: Vec<_> = answers
                .iter()
                .filter(|a| a.outcome() == PartnerOutcome::Created)
                .collect();
            assert_eq!(created.len(), 1, "{brn}: {answers:#?}");
            let winner = &created[0].partner.as_ref().expect("partner").partner_id;
            let loser = answers
                .iter()
                .find(|a| a.outcome() == PartnerOutcome::Rejected)
                .expect("the other row is refused");
            let status = row_error(loser.error.as_ref());
            let info = status.get_details_error_info().expect("info");
            assert_eq!(info.metadata.get("partner_id"), Some(winner), "{brn}");
        }
        assert_eq!(all_partners(&app).await.len(), seeds.len());

        // The same rows (same request ids) from two streams at once: each row is created by
        // one stream and replayed to the other.
        let rows: Vec<_> = (0..300)
            .map(|s| partner_row(&request_id(), partner(7000 + s)))
            .collect();
        let (a, b) = tokio::join!(
            import_partners(&app, rows.clone()),
            import_partners(&app, rows.clone())
        );
        for (x, y) in a.iter().zip(&b) {
            let mut outcomes = [x.outcome(), y.outcome()];
            outcomes.sort_by_key(|o| *o as i32);
            assert_eq!(
                outcomes,
                [PartnerOutcome::Created, PartnerOutcome::Replayed],
                "{x:?} {y:?}"
            );
            assert_eq!(x.partner, y.partner);
        }
        assert_eq!(all_partners(&app).await.len(), 600);
    }
);

on_both_databases!(
    an_oversized_row_ends_the_import_after_the_rows_before_it,
    |app: TestApp| async move {
        // A message over the size limit cannot be read, so nothing after it can be either: the
        // rows before it are answered (and stored), then the call fails with OUT_OF_RANGE.
        let mut huge = partner(2);
        huge.legal_name = "x".repeat(2 * 1024 * 1024);
        let rows = vec![
            partner_row(&request_id(), partner(1)),
            partner_row(&request_id(), huge),
            partner_row(&request_id(), partner(3)),
        ];
        let mut answers = app
            .partners()
            .import_partners(tokio_stream::iter(rows))
            .await
            .expect("import starts")
            .into_inner();
        let first = answers.message().await.expect("row 0").expect("an answer");
        assert_eq!(first.outcome(), PartnerOutcome::Created);
        let status = answers
            .message()
            .await
            .expect_err("the oversized row ends the call");
        assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
        let stored: Vec<String> = all_partners(&app)
            .await
            .into_iter()
            .map(|p| p.business_registration_number)
            .collect();
        assert_eq!(stored, [brn(1)]);

        // The stream's own audit entry has the stream's outcome, known only at its end.
        let entry = eventually(10, || async {
            audit_log(&app).await.into_iter().find(|e| {
                e.method == "/payouts.v1.PartnerService/ImportPartners" && e.request_id.is_empty()
            })
        })
        .await;
        assert_eq!(entry.outcome_code, "OUT_OF_RANGE", "{entry:?}");
    }
);

on_both_databases!(
    rows_of_one_stream_see_earlier_batches,
    |app: TestApp| async move {
        // Enough rows for several batches written at once: a later row that repeats an earlier
        // row's registration number, or its request id and body, is answered as if the rows
        // had come one at a time, whichever batch each landed in.
        let count = 2_000;
        let ids: Vec<String> = (0..count).map(|_| request_id()).collect();
        let mut rows: Vec<_> = (0..count)
            .map(|i| partner_row(&ids[i], partner(20_000 + i as u64)))
            .collect();
        rows.push(partner_row(&request_id(), partner(20_005)));
        rows.push(partner_row(&ids[7], partner(20_007)));
        let answers = import_partners(&app, rows).await;
        assert_eq!(answers.len(), count + 2);
        for (i, answer) in answers.iter().enumerate() {
            assert_eq!(answer.row, i as i64);
        }
        assert!(
            answers[..count]
                .iter()
                .all(|a| a.outcome() == PartnerOutcome::Created)
        );
        let repeated = &answers[count];
        assert_eq!(repeated.outcome(), PartnerOutcome::Rejected, "{repeated:?}");
        let status = row_error(repeated.error.as_ref());
        let info = status.get_details_error_info().expect("info");
        assert_eq!(
            info.metadata.get("partner_id"),
            answers[5].partner.as_ref().map(|p| &p.partner_id)
        );
        let replayed = &answers[count + 1];
        assert_eq!(replayed.outcome(), PartnerOutcome::Replayed, "{replayed:?}");
        assert_eq!(replayed.partner, answers[7].partner);
        assert_eq!(all_partners(&app).await.len(), count);
    }
);
