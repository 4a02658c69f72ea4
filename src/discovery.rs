//! What every gRPC server of ours answers beside its own services: gRPC health and server
//! reflection (v1 and v1alpha) over the descriptor set built from `proto/`.

use anyhow::Context as _;
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

/// Reflection, v1 and v1alpha. `advertised: None` advertises every service of the descriptor
/// set; `Some(names)` only those (with health and reflection itself), for a server that does
/// not answer the rest.
pub fn reflection(
    advertised: Option<&[&str]>,
) -> anyhow::Result<(
    v1::server_reflection_server::ServerReflectionServer<
        impl v1::server_reflection_server::ServerReflection,
    >,
    v1alpha::server_reflection_server::ServerReflectionServer<
        impl v1alpha::server_reflection_server::ServerReflection,
    >,
)> {
    let builder = |own_service: &str| {
        let mut builder = Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        if let Some(names) = advertised {
            let always = [tonic_health::pb::health_server::SERVICE_NAME, own_service];
            for name in names.iter().chain(&always) {
                builder = builder.with_service_name(*name);
            }
        }
        builder
    };
    let v1 = builder(v1::server_reflection_server::SERVICE_NAME)
        .build_v1()
        .context("building the reflection service (v1)")?;
    let v1alpha = builder(v1alpha::server_reflection_server::SERVICE_NAME)
        .build_v1alpha()
        .context("building the reflection service (v1alpha)")?;
    Ok((v1, v1alpha))
}
