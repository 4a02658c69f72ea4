//! The tower layer that records every mutating call that passed authentication: its
//! principal, method, peer, request id, resource and outcome.

use std::sync::Arc;

use futures::future::BoxFuture;
use tonic::Code;

use super::writer::GroupWriter;
use super::{AuditDraft, CallRecord};
use crate::auth::is_mutating;
use crate::deadline::Deadline;
use crate::middleware::{Around, Middleware};
use crate::principal::Principal;
use crate::status_body::{StatusBody, status_in, streams_responses};
use crate::store::Store;

/// Records every mutating call that passed authentication. Sits inside
/// [`AuthLayer`](crate::auth::AuthLayer), which names the caller.
#[derive(Clone)]
pub struct AuditLayer {
    writer: GroupWriter,
}

impl AuditLayer {
    /// Starts the task that writes the entries, so it must run inside the Tokio runtime.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            writer: GroupWriter::spawn(store),
        }
    }
}

impl<S> tower::Layer<S> for AuditLayer {
    type Service = AuditedService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Around::new(inner, self.clone())
    }
}

/// The routes with [`AuditLayer`] around them: each mutating call is handed a [`CallRecord`]
/// in the request's extensions, and the call's entry is written before the caller sees its
/// answer.
pub type AuditedService<S> = Around<S, AuditLayer>;

impl<S, B> Middleware<S, B> for AuditLayer
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Send,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    fn call(
        &self,
        inner: &mut S,
        mut request: http::Request<B>,
    ) -> BoxFuture<'static, Result<S::Response, S::Error>> {
        let method = request.uri().path().to_owned();
        if !is_mutating(&method) {
            return Box::pin(inner.call(request));
        }
        let principal = request
            .extensions()
            .get::<Principal>()
            .map(|p| p.0.clone())
            .unwrap_or_default();
        let peer = crate::net::peer_addr(&request)
            .map(crate::net::peer_text)
            .unwrap_or_default();
        let call = CallRecord::new(
            AuditDraft::new(principal, method, peer),
            self.writer.clone(),
        );
        request.extensions_mut().insert(call.clone());
        let writer = self.writer.clone();
        let deadline = Deadline::of(&request);
        let unanswered = Unanswered {
            call: Some(call.clone()),
            writer: writer.clone(),
            deadline,
        };
        let future = inner.call(request);
        Box::pin(async move {
            let result = future.await;
            unanswered.answered();
            let Some(entry) = call.entry() else {
                return result;
            };
            let response = match result {
                Err(e) => {
                    writer.record(vec![entry.close(Code::Unknown)]).await;
                    return Err(e);
                }
                Ok(response) => response,
            };
            match status_in(response.headers()) {
                // A stream's outcome is known when it ends: its entry is written then, before
                // the trailers go out.
                None if streams_responses(entry.method()) => Ok(response.map(|body| {
                    tonic::body::Body::new(
                        StatusBody::finishing(body, move |code| {
                            Box::pin(async move { writer.record(vec![entry.close(code)]).await })
                        })
                        .within(deadline),
                    )
                })),
                // The database did not take the call: its entry would wait as long to be
                // refused. It is written when it can be (or its loss logged), without holding
                // the answer.
                Some(Code::Unavailable) => {
                    tokio::spawn(async move {
                        writer.record(vec![entry.close(Code::Unavailable)]).await;
                    });
                    Ok(response)
                }
                // A unary call's entry is stored before the caller sees the answer.
                status => {
                    writer
                        .record(vec![entry.close(status.unwrap_or(Code::Ok))])
                        .await;
                    Ok(response)
                }
            }
        })
    }
}

/// The entry of a call dropped before it was answered (its deadline came, or its caller went
/// away): written on a task of its own, since nobody waits for the call any more.
struct Unanswered {
    /// `None` once the call was answered.
    call: Option<CallRecord>,
    writer: GroupWriter,
    deadline: Deadline,
}

impl Unanswered {
    fn answered(mut self) {
        self.call = None;
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        let Some(entry) = self.call.take().and_then(|call| call.entry()) else {
            return;
        };
        let event = entry.close(self.deadline.unanswered());
        let writer = self.writer.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { writer.record(vec![event]).await });
        }
    }
}
