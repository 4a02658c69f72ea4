//! The tower layer that authenticates, rate-limits and authorizes every call in one place,
//! before any handler runs.
//!
//! Per request: identify the caller ([`Authenticator`]), take one call from its rate budget,
//! look up the method's role ([`required_role`]), then either pass the request on with
//! [`Principal`] and [`Caller`] in its extensions, or answer with a gRPC status. The
//! `authorization` header is removed before the request goes further, so no later layer,
//! span or handler can log the token.
//!
//! Every refusal also takes one call from the budget of the peer address that made it; past
//! that budget the peer's refused calls are answered `RESOURCE_EXHAUSTED` with a retry delay,
//! so a flood of bad tokens costs a hash and a counter per call. Allowed calls never touch the
//! peer's budget: a good principal behind the same address keeps working.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::{Either, Ready, ready};
use http::header::AUTHORIZATION;
use tonic::Code;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic_types::{ErrorDetails, StatusExt};
use tower::{Layer, Service};

use super::authenticator::{Authenticator, Caller};
use super::roles::{RequiredRole, required_role};
use crate::principal::Principal;
use crate::status::{ERROR_DOMAIN, status_with_reason};

/// Told about every refused call, e.g. to write it to the audit log.
///
/// Called on the request path: implementations must not block (hand the event to a bounded
/// channel or spawn a task), and should bound their own cost, since anyone who can connect
/// can make calls that are refused.
pub trait DenialSink: Send + Sync + 'static {
    /// `principal` is `None` when the caller could not be identified; `method` is the HTTP/2
    /// path (`/payouts.v1.PartnerService/RegisterPartner`); `peer` is the remote address.
    fn denied(&self, principal: Option<&str>, method: &str, code: Code, peer: Option<SocketAddr>);
}

/// A [`DenialSink`] that does nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct IgnoreDenials;

impl DenialSink for IgnoreDenials {
    fn denied(&self, _: Option<&str>, _: &str, _: Code, _: Option<SocketAddr>) {}
}

struct Shared {
    authenticator: Arc<Authenticator>,
    sink: Arc<dyn DenialSink>,
}

/// Authentication and authorization for `tonic::transport::Server::builder().layer(...)`.
#[derive(Clone)]
pub struct AuthLayer {
    shared: Arc<Shared>,
}

impl fmt::Debug for AuthLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthLayer")
            .field("authenticator", &self.shared.authenticator)
            .finish_non_exhaustive()
    }
}

impl AuthLayer {
    /// Refused calls are only logged; see [`AuthLayer::with_denial_sink`].
    pub fn new(authenticator: Arc<Authenticator>) -> Self {
        Self::with_denial_sink(authenticator, Arc::new(IgnoreDenials))
    }

    /// Refused calls are also reported to `sink`.
    pub fn with_denial_sink(authenticator: Arc<Authenticator>, sink: Arc<dyn DenialSink>) -> Self {
        Self {
            shared: Arc::new(Shared {
                authenticator,
                sink,
            }),
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps around the routes.
#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> fmt::Debug for AuthService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthService").finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for AuthService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: Default,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Self::Response, Self::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        match self.shared.admit(&mut request) {
            Ok(()) => Either::Right(self.inner.call(request)),
            Err(status) => Either::Left(ready(Ok(status.into_http()))),
        }
    }
}

impl Shared {
    fn admit<B>(&self, request: &mut http::Request<B>) -> Result<(), tonic::Status> {
        // The path outlives the headers' changes below without a copy: a URI's clone shares
        // its bytes.
        let uri = request.uri().clone();
        let path = uri.path();
        let peer = crate::net::peer_addr(request);
        let certs = request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(TlsConnectInfo::peer_certs);
        let leaf = certs.as_deref().and_then(|c| c.first()).map(AsRef::as_ref);

        let identified = self.authenticator.authenticate(request.headers(), leaf);
        request.headers_mut().remove(AUTHORIZATION);

        let required = required_role(path);
        let caller = match (required, identified) {
            // Probes and `grpcurl describe` work without credentials; a caller that did
            // identify itself is still named.
            (Some(RequiredRole::Open), identified) => {
                if let Ok(caller) = identified {
                    insert(request, caller);
                }
                return Ok(());
            }
            (_, Err(e)) => {
                return Err(self.deny(
                    None,
                    path,
                    peer,
                    status_with_reason(
                        Code::Unauthenticated,
                        "UNAUTHENTICATED",
                        e.to_string(),
                        &[],
                    ),
                ));
            }
            (_, Ok(caller)) => caller,
        };
        if let Err(wait) = self.authenticator.check_rate(&caller) {
            let status = rate_limited(Limited::Principal(caller.name()), wait);
            return Err(self.deny(Some(&caller), path, peer, status));
        }
        match required {
            Some(RequiredRole::Role(role)) if caller.has_role(role) => {
                insert(request, caller);
                Ok(())
            }
            Some(RequiredRole::Role(role)) => {
                let status = status_with_reason(
                    Code::PermissionDenied,
                    "ROLE_REQUIRED",
                    format!(
                        "principal {:?} lacks the role {:?} that {} needs",
                        caller.name(),
                        role.as_str(),
                        path.trim_start_matches('/')
                    ),
                    &[
                        ("role", role.as_str().to_owned()),
                        ("principal", caller.name().to_owned()),
                        ("method", path.trim_start_matches('/').to_owned()),
                    ],
                );
                Err(self.deny(Some(&caller), path, peer, status))
            }
            _ => {
                let status = status_with_reason(
                    Code::PermissionDenied,
                    "METHOD_NOT_PERMITTED",
                    format!(
                        "no access rule allows {}; every method needs one in auth::METHOD_RULES",
                        path.trim_start_matches('/')
                    ),
                    &[("method", path.trim_start_matches('/').to_owned())],
                );
                Err(self.deny(Some(&caller), path, peer, status))
            }
        }
    }

    /// Answers a refused call with `status`, or with `RESOURCE_EXHAUSTED` once its peer
    /// address is past its budget of refused calls, and reports what it answered.
    fn deny(
        &self,
        caller: Option<&Caller>,
        path: &str,
        peer: Option<SocketAddr>,
        status: tonic::Status,
    ) -> tonic::Status {
        let principal = caller.map(Caller::name);
        let ip = peer.map(|p| p.ip());
        macro_rules! refused {
            ($level:ident, $message:literal) => {
                tracing::event!(
                    tracing::Level::$level,
                    principal,
                    method = path,
                    code = ?status.code(),
                    peer = peer.map(tracing::field::display),
                    $message
                )
            };
        }
        let status = match self.authenticator.check_refused_rate(ip) {
            Ok(()) => {
                refused!(INFO, "call refused");
                status
            }
            // A flood is logged by its aggregated audit entries, not line by line.
            Err(wait) => {
                refused!(
                    DEBUG,
                    "call refused: the peer is over its limit of refused calls"
                );
                rate_limited(Limited::Peer(ip), wait)
            }
        };
        self.sink.denied(principal, path, status.code(), peer);
        status
    }
}

fn insert<B>(request: &mut http::Request<B>, caller: Caller) {
    request
        .extensions_mut()
        .insert(Principal(caller.name().to_owned()));
    request.extensions_mut().insert(caller);
}

/// Whose budget a call is over.
enum Limited<'a> {
    /// A principal's budget of calls.
    Principal(&'a str),
    /// A peer address's budget of refused calls (`None`: the address is unknown).
    Peer(Option<IpAddr>),
}

/// `RESOURCE_EXHAUSTED` with `ErrorInfo{RATE_LIMITED}` and `RetryInfo{retry_delay}`.
fn rate_limited(limited: Limited<'_>, wait: Duration) -> tonic::Status {
    let millis = wait.as_millis().max(1);
    let (key, value, message) = match limited {
        Limited::Principal(name) => (
            "principal",
            name.to_owned(),
            format!("principal {name:?} is over its rate limit; retry in {millis} ms"),
        ),
        Limited::Peer(ip) => {
            let ip = ip.map(|ip| ip.to_string()).unwrap_or_default();
            let message =
                format!("too many refused calls from peer address {ip:?}; retry in {millis} ms");
            ("peer", ip, message)
        }
    };
    let mut details = ErrorDetails::with_error_info(
        "RATE_LIMITED",
        ERROR_DOMAIN,
        [
            (key.to_owned(), value),
            ("retry_delay_ms".to_owned(), millis.to_string()),
        ],
    );
    details.set_retry_info(Some(wait));
    tonic::Status::with_error_details(Code::ResourceExhausted, message, details)
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Mutex;

    use http::{HeaderValue, Request, Response};
    use tonic::body::Body;
    use tower::ServiceExt;

    use super::*;
    use crate::auth::ratelimit::RateLimit;
    use crate::status::exhausted_retry_within_a_second;

    /// Answers 200 with the principal it saw, and whether the token reached it.
    fn inner()
    -> impl Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future = impl Send>
    + Clone {
        tower::service_fn(|req: Request<Body>| async move {
            let mut res = Response::new(Body::empty());
            if let Some(p) = req.extensions().get::<Principal>() {
                res.headers_mut()
                    .insert("x-principal", HeaderValue::from_str(&p.0).expect("ascii"));
            }
            if req.headers().contains_key(AUTHORIZATION) {
                res.headers_mut()
                    .insert("x-saw-token", HeaderValue::from_static("yes"));
            }
            Ok::<_, Infallible>(res)
        })
    }

    #[derive(Default)]
    struct Recorded(Mutex<Vec<(Option<String>, String, Code)>>);

    impl DenialSink for Recorded {
        fn denied(&self, principal: Option<&str>, method: &str, code: Code, _: Option<SocketAddr>) {
            self.0.lock().expect("not poisoned").push((
                principal.map(str::to_owned),
                method.to_owned(),
                code,
            ));
        }
    }

    /// The details of a `RESOURCE_EXHAUSTED` status of reason `RATE_LIMITED`, checked to ask
    /// for a retry within a second.
    fn rate_limited(status: Option<tonic::Status>) -> ErrorDetails {
        let (details, _) = exhausted_retry_within_a_second(&status.expect("limited"));
        assert_eq!(details.error_info().expect("info").reason, "RATE_LIMITED");
        details
    }

    async fn call(
        layer: &AuthLayer,
        path: &str,
        token: Option<&str>,
    ) -> (Option<String>, Option<tonic::Status>, bool) {
        call_from(layer, path, token, None).await
    }

    /// As [`call`], over a connection from `peer`.
    async fn call_from(
        layer: &AuthLayer,
        path: &str,
        token: Option<&str>,
        peer: Option<SocketAddr>,
    ) -> (Option<String>, Option<tonic::Status>, bool) {
        let mut req = Request::builder().uri(format!("http://localhost{path}"));
        if let Some(t) = token {
            req = req.header(AUTHORIZATION, format!("Bearer {t}"));
        }
        let mut req = req.body(Body::empty()).expect("request");
        if let Some(peer) = peer {
            req.extensions_mut().insert(TcpConnectInfo {
                local_addr: None,
                remote_addr: Some(peer),
            });
        }
        let res = layer.layer(inner()).oneshot(req).await.expect("infallible");
        let principal = res
            .headers()
            .get("x-principal")
            .map(|v| v.to_str().expect("ascii").to_owned());
        let saw_token = res.headers().contains_key("x-saw-token");
        (
            principal,
            tonic::Status::from_header_map(res.headers()),
            saw_token,
        )
    }

    const REGISTER: &str = "/payouts.v1.PartnerService/RegisterPartner";
    const GET: &str = "/payouts.v1.PartnerService/GetPartner";

    #[tokio::test]
    async fn a_token_with_the_role_reaches_the_handler_as_its_principal() {
        let layer = AuthLayer::new(Arc::new(Authenticator::for_test()));
        let (principal, status, saw_token) = call(&layer, REGISTER, Some("intake-token")).await;
        assert_eq!(principal.as_deref(), Some("claims-intake"));
        assert!(status.is_none(), "{status:?}");
        assert!(!saw_token, "the authorization header is removed");
    }

    #[tokio::test]
    async fn missing_or_unknown_tokens_are_unauthenticated() {
        let sink = Arc::new(Recorded::default());
        let layer = AuthLayer::with_denial_sink(Arc::new(Authenticator::for_test()), sink.clone());
        for token in [None, Some("wrong-token")] {
            let (principal, status, _) = call(&layer, REGISTER, token).await;
            assert_eq!(principal, None);
            let status = status.expect("refused");
            assert_eq!(status.code(), Code::Unauthenticated);
            let info = status.get_details_error_info().expect("error info");
            assert_eq!(info.reason, "UNAUTHENTICATED");
            assert_eq!(info.domain, "payouts");
            assert!(!status.message().contains("wrong-token"), "{status:?}");
        }
        let recorded = sink.0.lock().expect("not poisoned").clone();
        assert_eq!(
            recorded,
            vec![
                (None, REGISTER.to_owned(), Code::Unauthenticated),
                (None, REGISTER.to_owned(), Code::Unauthenticated),
            ]
        );
    }

    #[tokio::test]
    async fn a_valid_token_without_the_role_is_permission_denied() {
        let sink = Arc::new(Recorded::default());
        let layer = AuthLayer::with_denial_sink(Arc::new(Authenticator::for_test()), sink.clone());
        let (principal, status, _) = call(&layer, REGISTER, Some("ops-token")).await;
        assert_eq!(principal, None);
        let status = status.expect("refused");
        assert_eq!(status.code(), Code::PermissionDenied);
        let info = status.get_details_error_info().expect("error info");
        assert_eq!(info.reason, "ROLE_REQUIRED");
        assert_eq!(
            info.metadata.get("role").map(String::as_str),
            Some("registrar")
        );
        assert_eq!(
            sink.0.lock().expect("not poisoned").as_slice(),
            &[(
                Some("ops".to_owned()),
                REGISTER.to_owned(),
                Code::PermissionDenied
            )]
        );
        let (principal, status, _) = call(&layer, GET, Some("ops-token")).await;
        assert_eq!(principal.as_deref(), Some("ops"));
        assert!(status.is_none());
    }

    #[tokio::test]
    async fn unknown_methods_are_denied_even_to_local_dev() {
        let layer = AuthLayer::new(Arc::new(Authenticator::local_dev()));
        let (_, status, _) = call(&layer, "/payouts.v1.PartnerService/DeleteAll", None).await;
        let status = status.expect("refused");
        assert_eq!(status.code(), Code::PermissionDenied);
        assert_eq!(
            status.get_details_error_info().expect("info").reason,
            "METHOD_NOT_PERMITTED"
        );
    }

    #[tokio::test]
    async fn local_dev_lets_everyone_in_as_local_dev() {
        let layer = AuthLayer::new(Arc::new(Authenticator::local_dev()));
        for path in [REGISTER, GET, "/payouts.v1.ClaimService/ReviewClaim"] {
            let (principal, status, _) = call(&layer, path, None).await;
            assert_eq!(principal.as_deref(), Some("local-dev"), "{path}");
            assert!(status.is_none());
        }
        let (principal, _, saw_token) = call(&layer, GET, Some("anything")).await;
        assert_eq!(principal.as_deref(), Some("local-dev"));
        assert!(!saw_token);
    }

    #[tokio::test]
    async fn health_and_reflection_need_no_credentials() {
        let layer = AuthLayer::new(Arc::new(Authenticator::for_test()));
        for path in [
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        ] {
            let (principal, status, _) = call(&layer, path, None).await;
            assert_eq!(principal, None);
            assert!(status.is_none(), "{path}: {status:?}");
            let (principal, status, _) = call(&layer, path, Some("wrong")).await;
            assert_eq!(principal, None);
            assert!(status.is_none(), "{path}: {status:?}");
        }
        let (principal, _, _) =
            call(&layer, "/grpc.health.v1.Health/Check", Some("ops-token")).await;
        assert_eq!(principal.as_deref(), Some("ops"));
    }

    #[tokio::test]
    async fn over_the_rate_limit_is_resource_exhausted_with_a_retry_delay() {
        let authenticator =
            Authenticator::for_test().with_rate_limit(Some(RateLimit::new(1, Some(2))));
        let sink = Arc::new(Recorded::default());
        let layer = AuthLayer::with_denial_sink(Arc::new(authenticator), sink.clone());
        for _ in 0..2 {
            let (_, status, _) = call(&layer, GET, Some("ops-token")).await;
            assert!(status.is_none());
        }
        let (principal, status, _) = call(&layer, GET, Some("ops-token")).await;
        assert_eq!(principal, None);
        rate_limited(status);
        assert_eq!(
            sink.0.lock().expect("not poisoned").last().cloned(),
            Some((
                Some("ops".to_owned()),
                GET.to_owned(),
                Code::ResourceExhausted
            ))
        );
        // Another principal has its own budget.
        let (_, status, _) = call(&layer, REGISTER, Some("intake-token")).await;
        assert!(status.is_none());
    }

    #[tokio::test]
    async fn refused_calls_past_the_peer_budget_are_resource_exhausted() {
        let authenticator =
            Authenticator::for_test().with_denied_rate_limit(RateLimit::new(1, Some(3)));
        let sink = Arc::new(Recorded::default());
        let layer = AuthLayer::with_denial_sink(Arc::new(authenticator), sink.clone());
        let flooder: SocketAddr = "192.0.2.10:40001".parse().expect("addr");
        for _ in 0..3 {
            let (_, status, _) = call_from(&layer, REGISTER, Some("wrong"), Some(flooder)).await;
            assert_eq!(status.expect("refused").code(), Code::Unauthenticated);
        }
        // Another connection from the same address shares the budget.
        let same_host: SocketAddr = "192.0.2.10:40002".parse().expect("addr");
        for (peer, token) in [(flooder, Some("wrong")), (same_host, None)] {
            let (_, status, _) = call_from(&layer, REGISTER, token, Some(peer)).await;
            let details = rate_limited(status);
            let info = details.error_info().expect("info");
            assert_eq!(
                info.metadata.get("peer").map(String::as_str),
                Some("192.0.2.10")
            );
        }
        // A known principal's refusal from that address is limited too...
        let (_, status, _) = call_from(&layer, REGISTER, Some("ops-token"), Some(flooder)).await;
        assert_eq!(status.expect("limited").code(), Code::ResourceExhausted);
        // ...but its allowed calls are not, and do not take from the peer's budget.
        for _ in 0..5 {
            let (principal, status, _) =
                call_from(&layer, GET, Some("ops-token"), Some(flooder)).await;
            assert_eq!(principal.as_deref(), Some("ops"));
            assert!(status.is_none(), "{status:?}");
        }
        // Another address has its own budget.
        let other: SocketAddr = "192.0.2.11:40001".parse().expect("addr");
        let (_, status, _) = call_from(&layer, REGISTER, Some("wrong"), Some(other)).await;
        assert_eq!(status.expect("refused").code(), Code::Unauthenticated);

        // The sink is told what each call was answered.
        let codes: Vec<Code> = sink
            .0
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|(_, _, code)| *code)
            .collect();
        assert_eq!(
            codes,
            [
                [Code::Unauthenticated; 3].as_slice(),
                &[Code::ResourceExhausted; 3],
                &[Code::Unauthenticated],
            ]
            .concat()
        );
    }

    #[tokio::test]
    async fn a_principal_over_its_own_limit_also_spends_the_peer_budget() {
        let authenticator = Authenticator::for_test()
            .with_rate_limit(Some(RateLimit::new(1, Some(1))))
            .with_denied_rate_limit(RateLimit::new(1, Some(2)));
        let layer = AuthLayer::new(Arc::new(authenticator));
        let peer: SocketAddr = "192.0.2.20:5000".parse().expect("addr");
        let (_, status, _) = call_from(&layer, GET, Some("ops-token"), Some(peer)).await;
        assert!(status.is_none());
        let mut metadata_keys = Vec::new();
        for _ in 0..3 {
            let (_, status, _) = call_from(&layer, GET, Some("ops-token"), Some(peer)).await;
            let status = status.expect("limited");
            assert_eq!(status.code(), Code::ResourceExhausted);
            let info = status.get_details_error_info().expect("info");
            metadata_keys.push(if info.metadata.contains_key("peer") {
                "peer"
            } else {
                "principal"
            });
        }
        assert_eq!(metadata_keys, ["principal", "principal", "peer"]);
    }
}
