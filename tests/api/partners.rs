//! PartnerService through the wire: registration, validation, idempotency, listing, etags.

use partner_payouts::proto::payouts::v1 as pb;
use tonic::Code;

use crate::helpers::*;
use crate::on_both_databases;

on_both_databases!(
    registers_and_reads_back_a_partner,
    |app: TestApp| async move {
        let mut input = partner(1);
        input.business_registration_number = "116-82-00276".into();
        let created = register(&app, input).await;
        assert_eq!(created.business_registration_number, "1168200276");
        assert_eq!(created.legal_name, "Haneul Bakery 1");
        assert!(uuid::Uuid::parse_str(&created.partner_id).is_ok());
        let account = created.bank_account.clone().expect("account");
        assert_eq!(account.account_number, "****6789");
        assert_eq!(account.bank_code, "004");
        assert!(!created.etag.is_empty());
        assert!(created.create_time.is_some());

        let fetched = app
            .partners()
            .get_partner(pb::GetPartnerRequest {
                partner_id: created.partner_id.clone(),
            })
            .await
            .expect("get")
            .into_inner()
            .partner
            .expect("partner");
        assert_eq!(fetched, created);
    }
);

on_both_databases!(
    invalid_partner_names_every_bad_field,
    |app: TestApp| async move {
        let request = pb::RegisterPartnerRequest {
            request_id: "not-a-uuid".into(),
            partner: Some(pb::Partner {
                business_registration_number: "116-82-00277".into(),
                legal_name: "   ".into(),
                representative_name: "x".repeat(101),
                affected_services: vec![0],
                bank_account: Some(pb::BankAccount {
                    bank_code: "999".into(),
                    account_number: "12-34".into(),
                    holder_name: "Someone".into(),
                }),
                contact_email: "not an email".into(),
                ..Default::default()
            }),
        };
        let status = app
            .partners()
            .register_partner(request)
            .await
            .expect_err("refused");
        let mut fields = bad_fields(&status);
        fields.sort();
        assert_eq!(
            fields,
            [
                "partner.affected_services[0]",
                "partner.bank_account.account_number",
                "partner.bank_account.bank_code",
                "partner.business_registration_number",
                "partner.contact_email",
                "partner.legal_name",
                "partner.representative_name",
                "request_id",
            ]
        );
        let listed = app
            .partners()
            .list_partners(pb::ListPartnersRequest::default())
            .await
            .expect("list")
            .into_inner();
        assert!(listed.partners.is_empty(), "nothing stored");
    }
);

on_both_databases!(
    holder_must_be_business_or_representative,
    |app: TestApp| async move {
        let mut input = partner(2);
        input.bank_account.as_mut().expect("account").holder_name = "Somebody Else".into();
        let status = app
            .partners()
            .register_partner(pb::RegisterPartnerRequest {
                request_id: request_id(),
                partner: Some(input.clone()),
            })
            .await
            .expect_err("refused");
        assert_eq!(bad_fields(&status), ["partner.bank_account.holder_name"]);
        assert!(!status.message().contains("456789"), "{}", status.message());

        // The legal name, in another case, is accepted.
        input.bank_account.as_mut().expect("account").holder_name = "HANEUL BAKERY 2".into();
        register(&app, input).await;
    }
);

on_both_databases!(
    duplicate_registration_number_names_the_partner,
    |app: TestApp| async move {
        let first = register(&app, partner(3)).await;
        let mut again = partner(3);
        again.legal_name = "Another Name".into();
        again.bank_account.as_mut().expect("account").holder_name = "Kim Minji".into();
        let status = app
            .partners()
            .register_partner(pb::RegisterPartnerRequest {
                request_id: request_id(),
                partner: Some(again),
            })
            .await
            .expect_err("duplicate");
        assert_eq!(status.code(), Code::AlreadyExists);
        assert_eq!(reason(&status), "PARTNER_ALREADY_REGISTERED");
        use tonic_types::StatusExt;
        let info = status.get_details_error_info().expect("info");
        assert_eq!(info.metadata.get("partner_id"), Some(&first.partner_id));
    }
);

on_both_databases!(request_id_replays_or_refuses, |app: TestApp| async move {
    let id = request_id();
    let call = |p: pb::Partner| {
        let mut client = app.partners();
        let id = id.clone();
        async move {
            client
                .register_partner(pb::RegisterPartnerRequest {
                    request_id: id,
                    partner: Some(p),
                })
                .await
        }
    };
    let first = call(partner(4)).await.expect("first").into_inner();
    let replay = call(partner(4)).await.expect("replay").into_inner();
    assert_eq!(
        first, replay,
        "same id + same body returns the first response"
    );

    let status = call(partner(5)).await.expect_err("different body");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason(&status), "REQUEST_ID_REUSED");
    let listed = app
        .partners()
        .list_partners(pb::ListPartnersRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.partners.len(), 1);
});

on_both_databases!(lists_in_pages_and_filters, |app: TestApp| async move {
    let mut ids = Vec::new();
    for seed in 10..15 {
        ids.push(register(&app, partner(seed)).await.partner_id);
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = app
            .partners()
            .list_partners(pb::ListPartnersRequest {
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        assert!(page.partners.len() <= 2);
        seen.extend(page.partners.into_iter().map(|p| p.partner_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ids, "every partner once, in creation order");

    let by_brn = app
        .partners()
        .list_partners(pb::ListPartnersRequest {
            business_registration_number: {
                let b = brn(12);
                format!("{}-{}-{}", &b[..3], &b[3..5], &b[5..])
            },
            ..Default::default()
        })
        .await
        .expect("filter")
        .into_inner();
    assert_eq!(by_brn.partners.len(), 1);
    assert_eq!(by_brn.partners[0].partner_id, ids[2]);

    for (size, token, field) in [(-1, "", "page_size"), (0, "garbage!", "page_token")] {
        let status = app
            .partners()
            .list_partners(pb::ListPartnersRequest {
                page_size: size,
                page_token: token.into(),
                ..Default::default()
            })
            .await
            .expect_err("bad page");
        assert_eq!(bad_fields(&status), [field]);
    }
});

on_both_databases!(
    bank_account_update_needs_the_current_etag,
    |app: TestApp| async move {
        let created = register(&app, partner(20)).await;
        let update = |etag: String, account: &str| pb::UpdatePartnerBankAccountRequest {
            request_id: request_id(),
            partner_id: created.partner_id.clone(),
            bank_account: Some(pb::BankAccount {
                bank_code: "090".into(),
                account_number: account.into(),
                holder_name: "Haneul Bakery 20".into(),
            }),
            etag,
        };
        let updated = app
            .partners()
            .update_partner_bank_account(update(created.etag.clone(), "3333-01-2345678"))
            .await
            .expect("update")
            .into_inner()
            .partner
            .expect("partner");
        let account = updated.bank_account.expect("account");
        assert_eq!(account.bank_code, "090");
        assert_eq!(account.account_number, "****5678");
        assert_ne!(updated.etag, created.etag);

        let stale = app
            .partners()
            .update_partner_bank_account(update(created.etag.clone(), "3333-01-7654321"))
            .await
            .expect_err("stale etag");
        assert_eq!(stale.code(), Code::Aborted);

        let unknown = app
            .partners()
            .update_partner_bank_account(pb::UpdatePartnerBankAccountRequest {
                partner_id: uuid::Uuid::now_v7().to_string(),
                ..update(updated.etag.clone(), "3333-01-7654321")
            })
            .await
            .expect_err("unknown");
        assert_eq!(unknown.code(), Code::NotFound);

        let fetched = app
            .partners()
            .get_partner(pb::GetPartnerRequest {
                partner_id: created.partner_id.clone(),
            })
            .await
            .expect("get")
            .into_inner()
            .partner
            .expect("partner");
        assert_eq!(
            fetched.bank_account.expect("account").account_number,
            "****5678"
        );
    }
);

on_both_databases!(unknown_and_malformed_ids, |app: TestApp| async move {
    let missing = app
        .partners()
        .get_partner(pb::GetPartnerRequest {
            partner_id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .expect_err("missing");
    assert_eq!(missing.code(), Code::NotFound);
    let malformed = app
        .partners()
        .get_partner(pb::GetPartnerRequest {
            partner_id: "42".into(),
        })
        .await
        .expect_err("malformed");
    assert_eq!(bad_fields(&malformed), ["partner_id"]);
});

on_both_databases!(registration_survives_a_restart, |app: TestApp| async move {
    let id = request_id();
    let request = pb::RegisterPartnerRequest {
        request_id: id,
        partner: Some(partner(30)),
    };
    let first = app
        .partners()
        .register_partner(request.clone())
        .await
        .expect("first")
        .into_inner();
    let url = app.database_url.clone();
    let db = app.db;
    // Same database, new process state: the request id is still remembered.
    let again = spawn_app_on(db, &url, &app.pii_key_file).await;
    let replay = again
        .partners()
        .register_partner(request)
        .await
        .expect("replay")
        .into_inner();
    assert_eq!(first, replay);
    drop(app);
});

on_both_databases!(oversized_messages_are_refused, |app: TestApp| async move {
    let mut input = partner(40);
    input.legal_name = "x".repeat(2 * 1024 * 1024);
    let status = app
        .partners()
        .register_partner(pb::RegisterPartnerRequest {
            request_id: request_id(),
            partner: Some(input),
        })
        .await
        .expect_err("too large");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
});

#[tokio::test]
async fn graceful_shutdown_finishes_cleanly() {
    let app = spawn_app(Db::Sqlite, |_| {}).await;
    register(&app, partner(50)).await;
    app.stop().await;
}

/// What `grpcurl -plaintext ADDR list` asks: the services, through reflection, without protos.
#[tokio::test]
async fn reflection_and_health_answer_without_proto_files() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let app = spawn_app(Db::Sqlite, |_| {}).await;
    let mut client = ServerReflectionClient::new(app.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection")
        .into_inner();
    let response = responses
        .message()
        .await
        .expect("stream")
        .expect("one answer");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer: {response:?}");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    for expected in [
        "grpc.health.v1.Health",
        "payouts.v1.ClaimService",
        "payouts.v1.DisbursementService",
        "payouts.v1.PartnerService",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }

    let mut health = tonic_health::pb::health_client::HealthClient::new(app.channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "payouts.v1.PartnerService".into(),
        })
        .await
        .expect("health")
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}
