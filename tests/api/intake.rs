//! The policy's intake window: claims outside it are refused, and nothing is stored.

use partner_payouts::proto::payouts::v1 as pb;
use tonic::Code;

use crate::helpers::*;
use crate::on_both_databases;

async fn claims_outside_the_window_are_refused(db: Db) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("closed.toml");
    let policy = test_policy_toml().replace(
        "review_cap_krw = 50000",
        "review_cap_krw = 50000\nintake_open_time = \"2022-10-19T00:00:00+09:00\"\nintake_close_time = \"2023-03-31T23:59:59+09:00\"",
    );
    std::fs::write(&path, policy).expect("write policy");
    let app = spawn_app(db, |s| s.policy_file = Some(path)).await;
    let p = register(&app, partner(1)).await;
    let status = app
        .claims()
        .submit_claim(pb::SubmitClaimRequest {
            request_id: request_id(),
            partner_id: p.partner_id.clone(),
            items: vec![full_weight_item(100)],
            evidence: vec![],
        })
        .await
        .expect_err("intake closed");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason(&status), "INTAKE_CLOSED");
    let policy = app
        .claims()
        .get_policy(pb::GetPolicyRequest {})
        .await
        .expect("policy")
        .into_inner()
        .policy
        .expect("policy");
    assert_eq!(
        policy.intake_close_time.map(|t| t.seconds),
        Some(1_680_274_799),
        "2023-03-31T23:59:59+09:00"
    );
    let listed = app
        .claims()
        .list_claims(pb::ListClaimsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(listed.claims.is_empty());
}

on_both_databases!(
    claims_outside_the_window_are_refused,
    db = claims_outside_the_window_are_refused
);

#[tokio::test]
async fn a_malformed_policy_stops_start_up_naming_the_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        test_policy_toml().replace("kakao_share_bps = 9000", "kakao_share_bps = \"ninety\""),
    )
    .expect("write policy");
    let settings = partner_payouts::config::Settings {
        listen_addr: "127.0.0.1:0".parse().expect("addr"),
        database_url: format!("sqlite://{}", dir.path().join("db.sqlite").display()),
        pii_key_file: dir.path().join("pii.key"),
        policy_file: Some(path),
        ..Default::default()
    };
    let Err(error) = partner_payouts::app::Application::build(settings).await else {
        panic!("a malformed policy must stop start-up");
    };
    let message = format!("{error:#}");
    assert!(message.contains("kakao_share_bps"), "{message}");
}
