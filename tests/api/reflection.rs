//! gRPC reflection, through a reflection client as grpcurl uses it, shows what each server
//! answers: the service's port its `payouts.v1` services and how to call them, the sandbox
//! bank's port its own; neither describes the other's.

use std::collections::BTreeSet;

use prost::Message as _;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::{ErrorResponse, ServerReflectionRequest};
use tonic_reflection::pb::v1alpha;

use crate::database_faults::health;
use crate::dispatch_bank::own_bank;
use crate::helpers::*;
use crate::on_both_databases;

const PAYOUTS_SERVICES: [&str; 5] = [
    "payouts.v1.PartnerService",
    "payouts.v1.ClaimService",
    "payouts.v1.DisbursementService",
    "payouts.v1.AuditService",
    "payouts.v1.EventService",
];
const BANK_SERVICES: [&str; 2] = ["payments.v1.PaymentsBackend", "payments.v1.SandboxLedger"];
/// What every server of ours answers beside its own services.
const BESIDE: [&str; 2] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
];

/// One reflection request's answer; Err: the code of the status or error it was answered.
async fn ask(channel: &Channel, request: MessageRequest) -> Result<MessageResponse, i32> {
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let answer = ServerReflectionClient::new(channel.clone())
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection answers")
        .into_inner()
        .message()
        .await;
    match answer {
        Ok(Some(response)) => match response.message_response.expect("a message") {
            MessageResponse::ErrorResponse(ErrorResponse { error_code, .. }) => Err(error_code),
            message => Ok(message),
        },
        Ok(None) => panic!("no reflection response"),
        Err(status) => Err(status.code() as i32),
    }
}

/// The services the server lists.
async fn listed(channel: &Channel) -> BTreeSet<String> {
    match ask(channel, MessageRequest::ListServices(String::new())).await {
        Ok(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("not a list of services: {other:?}"),
    }
}

/// The files a client needs to call `symbol`, fetched as grpcurl's `describe` fetches them:
/// the file defining it, then each file imported by name. Err: the server's error code.
async fn files_for(channel: &Channel, symbol: &str) -> Result<BTreeSet<String>, i32> {
    let mut files = BTreeSet::new();
    let mut asking = vec![MessageRequest::FileContainingSymbol(symbol.into())];
    while let Some(request) = asking.pop() {
        let answer = match ask(channel, request).await? {
            MessageResponse::FileDescriptorResponse(answer) => answer,
            other => panic!("not a file descriptor: {other:?}"),
        };
        for encoded in answer.file_descriptor_proto {
            let file = prost_types::FileDescriptorProto::decode(encoded.as_slice())
                .expect("a file descriptor");
            for import in &file.dependency {
                if !files.contains(import) {
                    asking.push(MessageRequest::FileByFilename(import.clone()));
                }
            }
            files.insert(file.name().to_owned());
        }
    }
    Ok(files)
}

/// Checks that `channel`'s server lists exactly `own` and [`BESIDE`], describes each of `own`
/// with every file it imports, and knows nothing of `foreign`.
async fn shows_only(channel: &Channel, own: &[&str], foreign: &[&str], foreign_file: &str) {
    let expected: BTreeSet<String> = own.iter().chain(&BESIDE).map(|s| s.to_string()).collect();
    assert_eq!(listed(channel).await, expected);
    for service in own {
        let files = files_for(channel, service)
            .await
            .unwrap_or_else(|code| panic!("{service} is not described (error {code})"));
        assert!(
            !files.iter().any(|f| f == foreign_file),
            "{service}: {files:?}"
        );
    }
    let not_found = tonic::Code::NotFound as i32;
    for symbol in foreign {
        assert_eq!(files_for(channel, symbol).await, Err(not_found), "{symbol}");
    }
    let by_name = ask(channel, MessageRequest::FileByFilename(foreign_file.into())).await;
    assert_eq!(by_name.err(), Some(not_found), "{foreign_file}");
}

on_both_databases!(
    the_service_shows_its_payouts_services_only,
    |app: TestApp| async move {
        shows_only(
            &app.channel,
            &PAYOUTS_SERVICES,
            &[
                "payments.v1.PaymentsBackend",
                "payments.v1.SandboxLedger",
                "payments.v1.SubmitInstructionRequest",
            ],
            "payments/v1/payments.proto",
        )
        .await;

        // What is listed is served: health reports the server and each service SERVING.
        let statuses = health(&app).await;
        assert!(
            statuses.iter().all(|s| *s == ServingStatus::Serving),
            "{statuses:?}"
        );
        // What `grpcurl describe` needs of the error details and timestamps comes along.
        let files = files_for(&app.channel, "payouts.v1.PartnerService")
            .await
            .expect("described");
        for needed in ["google/rpc/status.proto", "google/protobuf/timestamp.proto"] {
            assert!(files.contains(needed), "{needed}: {files:?}");
        }

        // Clients that speak only v1alpha see the same services.
        let request = v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
            ),
        };
        let answer =
            v1alpha::server_reflection_client::ServerReflectionClient::new(app.channel.clone())
                .server_reflection_info(tokio_stream::iter([request]))
                .await
                .expect("v1alpha reflection answers")
                .into_inner()
                .message()
                .await
                .expect("a response")
                .and_then(|r| r.message_response);
        let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
            answer
        else {
            panic!("not a list of services: {answer:?}");
        };
        let names: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
        let expected: BTreeSet<String> = PAYOUTS_SERVICES
            .iter()
            .chain(&[
                "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection",
            ])
            .map(|s| s.to_string())
            .collect();
        assert_eq!(names, expected);
        app.stop().await;
    }
);

#[tokio::test]
async fn the_sandbox_bank_shows_its_own_services_only() {
    let bank_url = own_bank(Default::default()).await;
    let channel = Channel::from_shared(bank_url)
        .expect("url")
        .connect()
        .await
        .expect("connect to the bank");
    shows_only(
        &channel,
        &BANK_SERVICES,
        &PAYOUTS_SERVICES,
        "payouts/v1/partner.proto",
    )
    .await;
}
