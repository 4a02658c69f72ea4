//! What every gRPC server of ours answers beside its own services: gRPC health and server
//! reflection (v1 and v1alpha) over the descriptor set built from `proto/`.

use std::collections::BTreeSet;

use anyhow::Context as _;
use prost::Message as _;
use prost_types::{FileDescriptorProto, FileDescriptorSet};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tonic_reflection::pb::{v1, v1alpha};
use tonic_reflection::server::Builder;

/// A health service that reports each of `services` (full gRPC names) as SERVING, and the
/// reporter that can change that.
pub async fn health_serving(
    services: &[&str],
) -> (
    HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    let (reporter, service) = tonic_health::server::health_reporter();
    for name in services {
        reporter
            .set_service_status(*name, ServingStatus::Serving)
            .await;
    }
    (reporter, service)
}

/// Reflection, v1 and v1alpha, of what a server answers: `served` (full gRPC names), with
/// health and reflection itself. Only the proto files that define them, and the files those
/// import, are described: a client finds no service, message or method the server does not
/// answer, even when it asks for one by name.
pub fn reflection(
    served: &[&str],
) -> anyhow::Result<(
    v1::server_reflection_server::ServerReflectionServer<
        impl v1::server_reflection_server::ServerReflection,
    >,
    v1alpha::server_reflection_server::ServerReflectionServer<
        impl v1alpha::server_reflection_server::ServerReflection,
    >,
)> {
    let described = described_files(crate::proto::FILE_DESCRIPTOR_SET, served)?;
    let builder = |own_service: &str| {
        let always = [tonic_health::pb::health_server::SERVICE_NAME, own_service];
        served.iter().chain(&always).fold(
            Builder::configure()
                .register_file_descriptor_set(described.clone())
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
            |builder, name| builder.with_service_name(*name),
        )
    };
    let v1 = builder(v1::server_reflection_server::SERVICE_NAME)
        .build_v1()
        .context("building the reflection service (v1)")?;
    let v1alpha = builder(v1alpha::server_reflection_server::SERVICE_NAME)
        .build_v1alpha()
        .context("building the reflection service (v1alpha)")?;
    Ok((v1, v1alpha))
}

/// The files of the encoded descriptor set `encoded` that define one of `services`, and every
/// file they import, directly or not.
fn described_files(encoded: &[u8], services: &[&str]) -> anyhow::Result<FileDescriptorSet> {
    let set = FileDescriptorSet::decode(encoded).context("decoding the descriptor set")?;
    let defines = |file: &FileDescriptorProto, service: &str| {
        file.service
            .iter()
            .any(|s| format!("{}.{}", file.package(), s.name()) == service)
    };
    let mut wanted: Vec<String> = Vec::new();
    for service in services {
        let file = set
            .file
            .iter()
            .find(|file| defines(file, service))
            .with_context(|| format!("no proto file defines {service}"))?;
        wanted.push(file.name().to_owned());
    }
    let mut kept: BTreeSet<String> = BTreeSet::new();
    while let Some(name) = wanted.pop() {
        if !kept.insert(name.clone()) {
            continue;
        }
        let file = set
            .file
            .iter()
            .find(|file| file.name() == name)
            .with_context(|| format!("the descriptor set lacks {name}"))?;
        wanted.extend(file.dependency.iter().cloned());
    }
    Ok(FileDescriptorSet {
        file: set
            .file
            .into_iter()
            .filter(|file| kept.contains(file.name()))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn described(services: &[&str]) -> BTreeSet<String> {
        described_files(crate::proto::FILE_DESCRIPTOR_SET, services)
            .expect("described")
            .file
            .iter()
            .map(|f| f.name().to_owned())
            .collect()
    }

    #[test]
    fn a_server_is_described_by_the_files_of_its_services_and_their_imports() {
        let payouts = described(&[
            "payouts.v1.PartnerService",
            "payouts.v1.ClaimService",
            "payouts.v1.DisbursementService",
            "payouts.v1.AuditService",
        ]);
        let expected: BTreeSet<String> = [
            "google/protobuf/any.proto",
            "google/protobuf/timestamp.proto",
            "google/rpc/status.proto",
            "payouts/v1/audit.proto",
            "payouts/v1/claim.proto",
            "payouts/v1/common.proto",
            "payouts/v1/disbursement.proto",
            "payouts/v1/partner.proto",
        ]
        .map(String::from)
        .into();
        assert_eq!(payouts, expected);
        let bank = described(&["payments.v1.PaymentsBackend", "payments.v1.SandboxLedger"]);
        assert_eq!(bank, ["payments/v1/payments.proto".to_owned()].into());
        assert!(
            described_files(crate::proto::FILE_DESCRIPTOR_SET, &["payouts.v1.Nothing"]).is_err()
        );
    }

    #[test]
    fn reflection_builds_for_each_server() {
        reflection(&["payouts.v1.PartnerService", "payouts.v1.AuditService"]).expect("payouts");
        reflection(&["payments.v1.PaymentsBackend"]).expect("payments");
    }
}
