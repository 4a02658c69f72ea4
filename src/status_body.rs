//! A call's final gRPC status, for layers that record it (the RPC span, the audit log).
//!
//! A call that fails before answering carries its status in the response headers. Otherwise
//! the status comes in the trailers, after the last message: for a streaming call that is when
//! the stream ends, which can be long after the headers, and can be an error. [`StatusBody`]
//! wraps such a response body and reports the status once the trailers pass (or, if the body
//! is dropped first, `DEADLINE_EXCEEDED` when the call's deadline had come and `CANCELLED`
//! when the caller went away before it).

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, ready};

use futures::future::BoxFuture;
use http_body::{Body, Frame, SizeHint};
use tonic::Code;

use crate::deadline::Deadline;

/// The status in a header map (`grpc-status`), if there is one.
pub fn status_in(headers: &http::HeaderMap) -> Option<Code> {
    // A name made once: looking one up by `&str` first parses and checks the text, which
    // every call paid three times over (once per layer that reads its status).
    static GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
    headers
        .get(&GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(Code::from_i32)
}

/// Whether the method at `path` (`/package.Service/Method`) streams its responses, as the
/// service's protos declare.
pub fn streams_responses(path: &str) -> bool {
    static STREAMING: OnceLock<HashSet<String>> = OnceLock::new();
    STREAMING
        .get_or_init(|| {
            use prost::Message as _;
            let Ok(set) = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET)
            else {
                return HashSet::new();
            };
            set.file
                .iter()
                .flat_map(|file| {
                    file.service.iter().flat_map(move |service| {
                        service
                            .method
                            .iter()
                            .filter(|m| m.server_streaming())
                            .map(move |m| {
                                format!("/{}.{}/{}", file.package(), service.name(), m.name())
                            })
                    })
                })
                .collect()
        })
        .contains(path)
}

type OnEnd = Box<dyn FnOnce(Code) -> BoxFuture<'static, ()> + Send>;

/// The body's last frame (its trailers, an error, or its end), waiting for `on_end`'s work.
type Held<B> = (
    BoxFuture<'static, ()>,
    Option<Result<Frame<<B as Body>::Data>, <B as Body>::Error>>,
);

/// A response body that calls `on_end` with the call's status when its trailers pass.
pub struct StatusBody<B: Body> {
    inner: B,
    on_end: Option<OnEnd>,
    held: Option<Held<B>>,
    /// Tells a body dropped past its deadline from one its caller left.
    deadline: Deadline,
}

impl<B: Body> StatusBody<B> {
    pub fn new(inner: B, on_end: impl FnOnce(Code) + Send + 'static) -> Self {
        Self::finishing(inner, move |code| {
            on_end(code);
            Box::pin(std::future::ready(()))
        })
    }

    /// As [`new`](Self::new), except that `on_end`'s work is done before the caller gets the
    /// trailers: a caller that has seen its stream end can count on what `on_end` stored. If
    /// the caller goes away first, the work is done all the same, on its own task.
    pub fn finishing(
        inner: B,
        on_end: impl FnOnce(Code) -> BoxFuture<'static, ()> + Send + 'static,
    ) -> Self {
        Self {
            inner,
            on_end: Some(Box::new(on_end)),
            held: None,
            deadline: Deadline::default(),
        }
    }

    /// The body of a call with `deadline`: dropped past it, its status is `DEADLINE_EXCEEDED`.
    pub fn within(mut self, deadline: Deadline) -> Self {
        self.deadline = deadline;
        self
    }
}

impl<B> Body for StatusBody<B>
where
    B: Body + Unpin,
    B::Data: Unpin,
    B::Error: Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        loop {
            if let Some((work, _)) = &mut this.held {
                ready!(work.as_mut().poll(cx));
                let (_, frame) = this.held.take().expect("a held frame");
                return Poll::Ready(frame);
            }
            let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
            let code = match &frame {
                Some(Ok(frame)) => frame
                    .trailers_ref()
                    .map(|trailers| status_in(trailers).unwrap_or(Code::Unknown)),
                Some(Err(_)) => Some(Code::Unknown),
                // Ended without trailers: gRPC always sends them, so something went wrong.
                None => Some(Code::Unknown),
            };
            match code.and_then(|code| this.on_end.take().map(|on_end| on_end(code))) {
                Some(work) => this.held = Some((work, frame)),
                None => return Poll::Ready(frame),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: Body> Drop for StatusBody<B> {
    fn drop(&mut self) {
        // The body was not read to its end: the caller went away, or its deadline came.
        let work = match (self.on_end.take(), self.held.take()) {
            (Some(on_end), _) => on_end(self.deadline.unfinished()),
            (None, Some((work, _))) => work,
            (None, None) => return,
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(work);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use http_body_util::{BodyExt as _, StreamBody};

    use super::*;

    fn trailers(code: &str) -> Frame<Bytes> {
        let mut map = http::HeaderMap::new();
        map.insert("grpc-status", code.parse().expect("header value"));
        Frame::trailers(map)
    }

    async fn status_of(frames: Vec<Frame<Bytes>>, read_all: bool) -> Vec<Code> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let frames: Vec<Result<Frame<Bytes>, Code>> = frames.into_iter().map(Ok).collect();
        let mut b = StatusBody::new(StreamBody::new(futures::stream::iter(frames)), move |c| {
            record.lock().expect("lock").push(c);
        });
        if read_all {
            while b.frame().await.is_some() {}
        } else {
            let _ = b.frame().await;
        }
        drop(b);
        seen.lock().expect("lock").clone()
    }

    #[tokio::test]
    async fn reports_the_status_of_the_trailers_once() {
        let data = || Frame::data(Bytes::from_static(b"x"));
        assert_eq!(
            status_of(vec![data(), trailers("0")], true).await,
            [Code::Ok]
        );
        assert_eq!(
            status_of(vec![data(), data(), trailers("11")], true).await,
            [Code::OutOfRange]
        );
        assert_eq!(status_of(vec![data()], true).await, [Code::Unknown]);
        // Dropped before the end: the caller went away.
        assert_eq!(
            status_of(vec![data(), trailers("0")], false).await,
            [Code::Cancelled]
        );
    }

    #[tokio::test]
    async fn the_trailers_wait_for_the_work_done_at_the_end() {
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        let frames: Vec<Result<Frame<Bytes>, Code>> = vec![Ok(trailers("0"))];
        let mut b = StatusBody::finishing(StreamBody::new(futures::stream::iter(frames)), |code| {
            assert_eq!(code, Code::Ok);
            Box::pin(async move {
                let _ = finished.await;
            })
        });
        let waiting = futures::poll!(b.frame());
        assert!(
            waiting.is_pending(),
            "trailers passed before the work was done"
        );
        done.send(()).expect("send");
        let frame = b.frame().await.expect("a frame").expect("no error");
        assert!(frame.is_trailers());
        assert!(b.frame().await.is_none());
    }

    #[test]
    fn knows_which_methods_stream() {
        assert!(streams_responses(
            "/payouts.v1.PartnerService/ImportPartners"
        ));
        assert!(streams_responses(
            "/payouts.v1.DisbursementService/ExportDisbursements"
        ));
        assert!(!streams_responses(
            "/payouts.v1.PartnerService/RegisterPartner"
        ));
        assert!(!streams_responses("/nope.Service/Method"));
    }
}
