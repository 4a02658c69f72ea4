//! Deadlines: a call ends by its caller's deadline (`grpc-timeout`), and its answer comes by
//! `request_timeout_ms`; past either it is answered `DEADLINE_EXCEEDED`.
//!
//! tonic keeps a timer of its own on both and, when it fires, answers `CANCELLED` and drops
//! the call: the layers that record a call (its span, its duration metric, its audit entry)
//! would never learn what became of it. [`DeadlineLayer`] wraps every layer of ours and
//! answers first: its timer is set in the same step as tonic's, just before it, for the same
//! time. The layers within read the call's [`Deadline`] from the request's extensions and,
//! when the call they serve is dropped unanswered, record `DEADLINE_EXCEEDED` if its deadline
//! had come and `CANCELLED` (the caller went away) if not.
//!
//! `request_timeout_ms` bounds the time to the answer: all of a unary call, but not the
//! messages of a stream (an import runs as long as its caller lets it). The caller's deadline
//! bounds the whole call, to a stream's last message.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::future::BoxFuture;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tonic::{Code, Status};

use crate::status::status_with_reason;

/// A call dropped unanswered this close to its deadline is taken to be past it: a caller that
/// keeps the same deadline cancels the call when it passes by the caller's clock, which
/// started before the request left, so its cancellation reaches us about when our own timer
/// fires, a little before or after. A tenth of the time the call had, at most this.
const CANCELLATION_SLACK: Duration = Duration::from_millis(100);

/// One limit on a call: when it comes, and what sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limit {
    at: Instant,
    slack: Duration,
    set_by: SetBy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SetBy {
    /// The caller's `grpc-timeout`.
    Caller,
    /// The service's `request_timeout_ms`.
    Service,
}

impl Limit {
    fn after(start: Instant, timeout: Duration, set_by: SetBy) -> Option<Self> {
        Some(Self {
            at: start.checked_add(timeout)?,
            slack: (timeout / 10).min(CANCELLATION_SLACK),
            set_by,
        })
    }

    fn has_come(&self) -> bool {
        Instant::now() + self.slack >= self.at
    }

    fn exceeded(&self) -> Status {
        let (limit, message) = match self.set_by {
            SetBy::Caller => (
                "grpc-timeout",
                "the caller's deadline (grpc-timeout) passed",
            ),
            SetBy::Service => (
                "request_timeout_ms",
                "the call took longer than the service allows (request_timeout_ms)",
            ),
        };
        status_with_reason(
            Code::DeadlineExceeded,
            "DEADLINE_EXCEEDED",
            message,
            &[("limit", limit.to_owned())],
        )
    }
}

/// When a call must be answered, and when it must end; in the request's extensions for the
/// layers within [`DeadlineLayer`]. The default has no limits (a call served without the
/// layer).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deadline {
    /// The earlier of the caller's deadline and `request_timeout_ms`.
    answer: Option<Limit>,
    /// The caller's deadline.
    call: Option<Limit>,
}

impl Deadline {
    /// The limits of a call that arrived at `start` with `grpc-timeout` header `caller`.
    pub fn new(start: Instant, caller: Option<Duration>, request_timeout: Duration) -> Self {
        let call = caller.and_then(|t| Limit::after(start, t, SetBy::Caller));
        let service = Limit::after(start, request_timeout, SetBy::Service);
        let answer = match (call, service) {
            (Some(c), Some(s)) => Some(if c.at <= s.at { c } else { s }),
            (c, s) => c.or(s),
        };
        Self { answer, call }
    }

    /// The deadline of the call `request` belongs to.
    pub fn of<B>(request: &http::Request<B>) -> Self {
        request
            .extensions()
            .get::<Deadline>()
            .copied()
            .unwrap_or_default()
    }

    /// What became of a call dropped before it was answered.
    pub fn unanswered(&self) -> Code {
        outcome(self.answer)
    }

    /// What became of a stream dropped before its end.
    pub fn unfinished(&self) -> Code {
        outcome(self.call)
    }
}

fn outcome(limit: Option<Limit>) -> Code {
    match limit {
        Some(limit) if limit.has_come() => Code::DeadlineExceeded,
        _ => Code::Cancelled,
    }
}

/// The time a `grpc-timeout` header gives: at most 8 digits and a unit (`H`, `M`, `S`, `m`,
/// `u`, `n`), as gRPC over HTTP/2 defines it. Anything else is no deadline, as tonic reads it.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let digits = value.get(..value.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match &value[digits.len()..] {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Answers `DEADLINE_EXCEEDED` past a call's [`Deadline`], which it puts in the request's
/// extensions. The outermost of the service's layers.
#[derive(Debug, Clone, Copy)]
pub struct DeadlineLayer {
    pub request_timeout: Duration,
}

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadlined<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Deadlined {
            inner,
            request_timeout: self.request_timeout,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Deadlined<S> {
    inner: S,
    request_timeout: Duration,
}

impl<S, B> tower::Service<http::Request<B>> for Deadlined<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let caller = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        let deadline = Deadline::new(Instant::now(), caller, self.request_timeout);
        request.extensions_mut().insert(deadline);
        let answered = self.inner.call(request);
        Box::pin(async move {
            let Some(limit) = deadline.answer else {
                return answered.await;
            };
            let response = match tokio::time::timeout_at(limit.at, answered).await {
                Ok(answered) => answered?,
                // The call, dropped here, is recorded by the layers within.
                Err(_) => return Ok(limit.exceeded().into_http()),
            };
            let streaming = crate::status_body::status_in(response.headers()).is_none();
            Ok(match deadline.call {
                Some(limit) if streaming => {
                    response.map(|body| tonic::body::Body::new(DeadlineBody::new(body, limit)))
                }
                _ => response,
            })
        })
    }
}

/// A response body that ends with `DEADLINE_EXCEEDED` trailers when the caller's deadline
/// comes before its own end; what it wrapped is dropped then.
struct DeadlineBody<B> {
    inner: Option<B>,
    limit: Limit,
    timer: Pin<Box<Sleep>>,
}

impl<B> DeadlineBody<B> {
    fn new(inner: B, limit: Limit) -> Self {
        Self {
            inner: Some(inner),
            limit,
            timer: Box::pin(tokio::time::sleep_until(limit.at)),
        }
    }
}

impl<B> Body for DeadlineBody<B>
where
    B: Body<Error = Status> + Unpin,
{
    type Data = B::Data;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, Status>>> {
        let this = self.get_mut();
        let Some(inner) = &mut this.inner else {
            return Poll::Ready(None);
        };
        if let Poll::Ready(frame) = Pin::new(inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        ready!(this.timer.as_mut().poll(cx));
        // Dropped past the deadline: the layers within record DEADLINE_EXCEEDED.
        this.inner = None;
        let answer = this.limit.exceeded().into_http::<()>();
        let mut trailers = http::HeaderMap::new();
        for (name, value) in answer.headers() {
            if name.as_str().starts_with("grpc-") {
                trailers.insert(name.clone(), value.clone());
            }
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_grpc_timeout_as_grpc_writes_it() {
        let cases = [
            ("1H", Some(Duration::from_secs(3600))),
            ("2M", Some(Duration::from_secs(120))),
            ("3S", Some(Duration::from_secs(3))),
            ("250m", Some(Duration::from_millis(250))),
            ("99999999u", Some(Duration::from_micros(99_999_999))),
            ("7n", Some(Duration::from_nanos(7))),
            ("", None),
            ("m", None),
            ("100", None),
            ("100x", None),
            ("123456789m", None),
            ("-5m", None),
            ("1.5S", None),
        ];
        for (value, expected) in cases {
            assert_eq!(parse_grpc_timeout(value), expected, "{value:?}");
        }
    }

    #[test]
    fn the_earlier_limit_bounds_the_answer_and_the_callers_the_call() {
        let start = Instant::now();
        let d = Deadline::new(start, Some(Duration::from_secs(5)), Duration::from_secs(30));
        assert_eq!(d.answer.map(|l| l.set_by), Some(SetBy::Caller));
        let d = Deadline::new(start, Some(Duration::from_secs(60)), Duration::from_secs(1));
        assert_eq!(d.answer.map(|l| l.set_by), Some(SetBy::Service));
        assert_eq!(d.call.map(|l| l.at), Some(start + Duration::from_secs(60)));
        assert_eq!(Deadline::default().unanswered(), Code::Cancelled);
    }

    /// The deadline of a call that arrived `ago` with a caller's deadline of 2 s.
    fn arrived(ago: Duration) -> Deadline {
        Deadline::new(
            Instant::now() - ago,
            Some(Duration::from_secs(2)),
            Duration::from_secs(30),
        )
    }

    #[test]
    fn a_call_dropped_at_its_deadline_exceeded_it_and_one_dropped_early_was_cancelled() {
        let d = arrived(Duration::ZERO);
        assert_eq!(d.unanswered(), Code::Cancelled);
        assert_eq!(d.unfinished(), Code::Cancelled);
        let d = arrived(Duration::from_millis(1_500));
        assert_eq!(d.unanswered(), Code::Cancelled, "half a second early");
        // The caller's own timer, started before the request left, fired a little earlier.
        let d = arrived(Duration::from_millis(1_950));
        assert_eq!(d.unanswered(), Code::DeadlineExceeded);
        assert_eq!(d.unfinished(), Code::DeadlineExceeded);
        let d = Deadline::new(
            Instant::now() - Duration::from_secs(1),
            None,
            Duration::from_secs(1),
        );
        assert_eq!(d.unanswered(), Code::DeadlineExceeded);
        assert_eq!(
            d.unfinished(),
            Code::Cancelled,
            "request_timeout_ms does not end a stream"
        );
    }
}
