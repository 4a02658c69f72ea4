//! The dispatcher's calls to the payments backend: each let through by the [`Flow`] (window,
//! circuit breaker, learned pace, contractual limit), then made in a CLIENT span whose context
//! travels with the request.

use std::time::{Duration, Instant};

use tonic::Code;
use tonic::transport::Channel;
use tracing::Instrument as _;

use super::flow::{Flow, FlowConfig, Outcome};
use crate::proto::payments::v1::payments_backend_client::PaymentsBackendClient;
use crate::secret::Secret;

pub struct Backend {
    client: PaymentsBackendClient<Channel>,
    /// Sent as `authorization: Bearer ...`.
    token: Option<Secret>,
    flow: Flow,
}

/// A call that brought no answer to act on.
#[derive(Debug)]
pub enum CallError {
    /// Not sent: the bank failed several calls in a row, and calls are held back until then.
    Refused { until: Instant },
    /// The bank (or the transport) answered with this status.
    Status(tonic::Status),
}

impl CallError {
    /// When a payout whose call ended so is due again without counting a failure: after the
    /// breaker's wait, or the retry delay of a throttled call (nothing was applied). `None`:
    /// the call failed, and the payout backs off.
    pub fn due_in(&self) -> Option<Duration> {
        match self {
            Self::Refused { until } => Some(until.saturating_duration_since(Instant::now())),
            Self::Status(status) => match Outcome::of_status(status) {
                Outcome::Throttled { retry_after } => Some(retry_after),
                Outcome::Accepted | Outcome::Failed { .. } => None,
            },
        }
    }

    /// The status code as recorded with the attempt; `None` if nothing was sent.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            Self::Refused { .. } => None,
            Self::Status(status) => Some(status),
        }
    }
}

impl Backend {
    pub fn new(
        client: PaymentsBackendClient<Channel>,
        token: Option<Secret>,
        flow: FlowConfig,
    ) -> Self {
        Self {
            client,
            token,
            flow: Flow::new(flow),
        }
    }

    /// One call to the backend, once the flow lets it go, in a CLIENT span.
    pub async fn call<Req, Resp, Fut>(
        &self,
        method: &'static str,
        message: Req,
        send: impl FnOnce(PaymentsBackendClient<Channel>, tonic::Request<Req>) -> Fut,
    ) -> Result<tonic::Response<Resp>, CallError>
    where
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let admission = self
            .flow
            .admit()
            .await
            .map_err(|until| CallError::Refused { until })?;
        let span = tracing::info_span!(
            "backend call",
            otel.name = format!("payments.v1.PaymentsBackend/{method}"),
            otel.kind = "client",
            rpc.system = "grpc",
            rpc.service = "payments.v1.PaymentsBackend",
            rpc.method = method,
            rpc.grpc.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let result = async {
            let mut request = tonic::Request::new(message);
            crate::telemetry::inject_context(&mut request);
            if let Some(token) = &self.token {
                match format!("Bearer {}", token.expose()).parse() {
                    Ok(value) => {
                        request.metadata_mut().insert("authorization", value);
                    }
                    Err(_) => tracing::warn!("payments_backend_token is not a valid header value"),
                }
            }
            let result = send(self.client.clone(), request).await;
            let code = result.as_ref().map_or_else(|s| s.code(), |_| Code::Ok);
            let span = tracing::Span::current();
            span.record("rpc.grpc.status_code", code as i64);
            if code != Code::Ok {
                span.record("otel.status_code", "ERROR");
            }
            result
        }
        .instrument(span)
        .await;
        admission.finish(Outcome::of(&result));
        result.map_err(CallError::Status)
    }
}
