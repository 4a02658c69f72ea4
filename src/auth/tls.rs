//! The server's TLS configuration from the `[tls]` table: its certificate, and, with
//! `client_ca_file`, mandatory client certificates (mutual TLS).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use x509_parser::pem::Pem;

use super::settings::TlsSettings;

/// How long a client may take over the handshake, so idle connections cannot pile up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the PEM files and checks they make a working configuration now, so a bad file stops
/// start-up with a message naming it rather than failing the first connection.
pub fn server_tls_config(settings: &TlsSettings) -> anyhow::Result<ServerTlsConfig> {
    let cert = read_certificates(&settings.cert_file, "tls.cert_file")?;
    let key = std::fs::read(&settings.key_file)
        .with_context(|| format!("tls.key_file: reading {}", settings.key_file.display()))?;
    let has_key = Pem::iter_from_buffer(&key)
        .filter_map(Result::ok)
        .any(|pem| pem.label.ends_with("PRIVATE KEY"));
    if !has_key {
        bail!(
            "tls.key_file: {} holds no PEM private key",
            settings.key_file.display()
        );
    }
    let mut config = ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key))
        .timeout(HANDSHAKE_TIMEOUT);
    if let Some(ca_file) = &settings.client_ca_file {
        let ca = read_certificates(ca_file, "tls.client_ca_file")?;
        config = config
            .client_ca_root(Certificate::from_pem(ca))
            .client_auth_optional(false);
    }
    tonic::transport::Server::builder()
        .tls_config(config.clone())
        .map_err(|e| {
            anyhow::anyhow!(
                "tls: {} with {}{}: {}",
                settings.cert_file.display(),
                settings.key_file.display(),
                settings
                    .client_ca_file
                    .as_ref()
                    .map(|ca| format!(" and client CA {}", ca.display()))
                    .unwrap_or_default(),
                error_chain(&e)
            )
        })?;
    Ok(config)
}

/// The file's bytes, if it holds at least one PEM certificate and every one parses.
fn read_certificates(path: &Path, key: &str) -> anyhow::Result<Vec<u8>> {
    let bytes =
        std::fs::read(path).with_context(|| format!("{key}: reading {}", path.display()))?;
    let mut found = 0;
    for pem in Pem::iter_from_buffer(&bytes) {
        let pem = pem.map_err(|e| anyhow::anyhow!("{key}: {} is not PEM: {e}", path.display()))?;
        if pem.label == "CERTIFICATE" {
            pem.parse_x509().map_err(|e| {
                anyhow::anyhow!(
                    "{key}: {} holds a certificate that does not parse: {e}",
                    path.display()
                )
            })?;
            found += 1;
        }
    }
    if found == 0 {
        bail!("{key}: {} holds no PEM certificate", path.display());
    }
    Ok(bytes)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    //! Mutual TLS end to end: a real tonic server behind [`AuthLayer`], real handshakes.

    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::sync::Arc;

    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    use tokio::net::TcpListener;
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::transport::{Channel, ClientTlsConfig};
    use tonic::{Code, Request, Response, Status};
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_types::StatusExt as _;

    use super::*;
    use crate::auth::{AuthLayer, AuthSettings, Authenticator, PrincipalSettings};
    use crate::principal::Principal;
    use crate::proto::payouts::v1::partner_service_client::PartnerServiceClient;
    use crate::proto::payouts::v1::partner_service_server::{PartnerService, PartnerServiceServer};
    use crate::proto::payouts::v1::{self as pb};

    struct Ca {
        pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("key");
        let pem = params.self_signed(&key).expect("ca").pem();
        Ca {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// (certificate PEM, key PEM) for `cn`, signed by `ca`.
    fn leaf(ca: &Ca, cn: &str, sans: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .expect("params");
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &ca.issuer).expect("leaf");
        (cert.pem(), key.serialize_pem())
    }

    /// (certificate PEM, key PEM) of a server at `localhost` named `cn`, signed by `ca`.
    fn server(ca: &Ca, cn: &str) -> (String, String) {
        leaf(ca, cn, &["localhost"], ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A `PartnerService` of the methods `answered`; the methods listed after `unimplemented`
    /// (each with its request and response) answer UNIMPLEMENTED.
    macro_rules! partner_service {
        (
            $service:ty { $($answered:tt)* }
            unimplemented { $($method:ident($request:ty) -> $response:ty;)* }
        ) => {
            #[tonic::async_trait]
            impl PartnerService for $service {
                $($answered)*

                $(async fn $method(
                    &self,
                    _: Request<$request>,
                ) -> Result<Response<$response>, Status> {
                    Err(Status::unimplemented("test"))
                })*
            }
        };
    }

    /// Only `GetPartner` answers, with the principal it saw as the legal name.
    struct EchoPartners;

    partner_service! {
        EchoPartners {
            type ImportPartnersStream =
                tokio_stream::Empty<Result<pb::ImportPartnersResponse, Status>>;

            async fn get_partner(
                &self,
                request: Request<pb::GetPartnerRequest>,
            ) -> Result<Response<pb::GetPartnerResponse>, Status> {
                Ok(Response::new(pb::GetPartnerResponse {
                    partner: Some(pb::Partner {
                        legal_name: Principal::of(&request),
                        ..Default::default()
                    }),
                }))
            }
        }
        unimplemented {
            register_partner(pb::RegisterPartnerRequest) -> pb::RegisterPartnerResponse;
            list_partners(pb::ListPartnersRequest) -> pb::ListPartnersResponse;
            update_partner_bank_account(pb::UpdatePartnerBankAccountRequest)
                -> pb::UpdatePartnerBankAccountResponse;
            import_partners(tonic::Streaming<pb::ImportPartnersRequest>)
                -> Self::ImportPartnersStream;
        }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        addr: SocketAddr,
        ca: Ca,
        settings: TlsSettings,
    }

    async fn serve() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, text: &str| -> PathBuf {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write");
            path
        };
        let ca = ca("payouts clients CA");
        let (server_cert, server_key) = server(&ca, "payouts server");
        let settings = TlsSettings {
            cert_file: write("server.pem", &server_cert),
            key_file: write("server.key", &server_key),
            client_ca_file: Some(write("clients-ca.pem", &ca.pem)),
        };
        let auth = AuthSettings {
            principals: vec![
                PrincipalSettings::for_test(
                    "claims-intake",
                    &["registrar"],
                    None,
                    Some("CN=claims-intake"),
                ),
                PrincipalSettings::for_test(
                    "ops-viewer",
                    &["viewer"],
                    None,
                    Some("ops-viewer.payouts.internal"),
                ),
            ],
            ..AuthSettings::default()
        };
        auth.validate_with_tls(Some(&settings)).expect("valid");
        let authenticator = Arc::new(Authenticator::from_settings(&auth).expect("valid"));
        let (_, health) = tonic_health::server::health_reporter();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tonic::transport::Server::builder()
            .tls_config(server_tls_config(&settings).expect("tls config"))
            .expect("tls")
            .layer(AuthLayer::new(authenticator))
            .add_service(health)
            .add_service(PartnerServiceServer::new(EchoPartners))
            .serve_with_incoming(TcpListenerStream::new(listener));
        tokio::spawn(server);
        Fixture {
            _dir: dir,
            addr,
            ca,
            settings,
        }
    }

    async fn channel(f: &Fixture, identity: Option<(String, String)>) -> Result<Channel, Status> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&f.ca.pem))
            .domain_name("localhost");
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        Channel::from_shared(format!("https://{}", f.addr))
            .expect("uri")
            .tls_config(tls)
            .expect("client tls")
            .connect()
            .await
            .map_err(|e| Status::unavailable(error_chain(&e)))
    }

    async fn get_partner(
        f: &Fixture,
        identity: Option<(String, String)>,
    ) -> Result<String, Status> {
        let channel = channel(f, identity).await?;
        let response = PartnerServiceClient::new(channel)
            .get_partner(pb::GetPartnerRequest::default())
            .await?;
        Ok(response.into_inner().partner.unwrap_or_default().legal_name)
    }

    fn client(f: &Fixture, cn: &str, sans: &[&str]) -> (String, String) {
        leaf(&f.ca, cn, sans, ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// `GetPartner` on a fresh server, by a client whose certificate (from the server's
    /// client CA) names `cn`: refused with `code`.
    async fn refused_as(cn: &str, code: Code) -> Status {
        let f = serve().await;
        let err = get_partner(&f, Some(client(&f, cn, &[])))
            .await
            .expect_err(cn);
        assert_eq!(err.code(), code, "{err:?}");
        err
    }

    #[tokio::test]
    async fn without_a_client_certificate_the_handshake_is_refused() {
        let f = serve().await;
        let err = get_partner(&f, None).await.expect_err("refused");
        // Refused by TLS, before any gRPC status of ours could be sent.
        assert!(err.get_details_error_info().is_none(), "{err:?}");
        assert!(
            format!("{err:?}").contains("CertificateRequired"),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_certificate_from_another_ca_is_refused() {
        let f = serve().await;
        let stranger = ca("someone else's CA");
        let identity = leaf(
            &stranger,
            "claims-intake",
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let err = get_partner(&f, Some(identity)).await.expect_err("refused");
        assert!(err.get_details_error_info().is_none(), "{err:?}");
        assert!(format!("{err:?}").contains("UnknownCA"), "{err:?}");
    }

    #[tokio::test]
    async fn a_valid_certificate_without_the_role_is_permission_denied() {
        // A registrar cannot read.
        let err = refused_as("claims-intake", Code::PermissionDenied).await;
        assert_eq!(
            err.get_details_error_info().expect("error info").reason,
            "ROLE_REQUIRED"
        );
    }

    #[tokio::test]
    async fn a_valid_certificate_unknown_to_the_settings_is_unauthenticated() {
        // No such principal.
        refused_as("intruder", Code::Unauthenticated).await;
    }

    #[tokio::test]
    async fn a_valid_certificate_with_the_role_reaches_the_handler_as_its_principal() {
        let f = serve().await;
        let identity = client(&f, "anything", &["ops-viewer.payouts.internal"]);
        let name = get_partner(&f, Some(identity.clone()))
            .await
            .expect("allowed");
        assert_eq!(name, "ops-viewer");

        // Health needs no role, only the (mandatory) certificate.
        let channel = channel(&f, Some(client(&f, "claims-intake", &[])))
            .await
            .expect("connects");
        let health = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health");
        assert_eq!(health.into_inner().status, 1, "SERVING");
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = TlsSettings {
            cert_file: dir.path().join("nope.pem"),
            key_file: dir.path().join("nope.key"),
            client_ca_file: None,
        };
        let err = format!("{:#}", server_tls_config(&missing).expect_err("missing"));
        assert!(
            err.contains("tls.cert_file") && err.contains("nope.pem"),
            "{err}"
        );

        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "hello").expect("write");
        let err = format!(
            "{:#}",
            server_tls_config(&TlsSettings {
                cert_file: junk.clone(),
                ..missing.clone()
            })
            .expect_err("junk")
        );
        assert!(err.contains("no PEM certificate"), "{err}");

        let ca = ca("ca");
        let (cert, _) = server(&ca, "server");
        let (_, other_key) = server(&ca, "other");
        let cert_file = dir.path().join("server.pem");
        let key_file = dir.path().join("server.key");
        std::fs::write(&cert_file, cert).expect("write");
        std::fs::write(&key_file, "not a key").expect("write");
        let settings = TlsSettings {
            cert_file,
            key_file: key_file.clone(),
            client_ca_file: None,
        };
        let err = format!("{:#}", server_tls_config(&settings).expect_err("no key"));
        assert!(
            err.contains("tls.key_file") && err.contains("no PEM private key"),
            "{err}"
        );

        std::fs::write(&key_file, other_key).expect("write");
        let err = format!("{:#}", server_tls_config(&settings).expect_err("mismatch"));
        assert!(
            err.contains("server.pem") && err.contains("server.key"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn fixture_settings_load() {
        let f = serve().await;
        server_tls_config(&f.settings).expect("loads");
    }
}
