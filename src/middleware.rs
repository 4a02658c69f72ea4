//! What the tower layers that work around every call (the RPC span, the audit log) share: each
//! wraps the routes in an [`Around`] holding a clone of itself, whose every call the layer
//! makes, as a [`Middleware`], of the call to the routes.

use std::task::{Context, Poll};

use futures::future::BoxFuture;

/// A layer that works around every call: its [`Middleware::call`] makes the answer to a
/// request of the routes' (`inner`) answer to it.
pub trait Middleware<S, B>: Clone
where
    S: tower::Service<http::Request<B>>,
{
    fn call(
        &self,
        inner: &mut S,
        request: http::Request<B>,
    ) -> BoxFuture<'static, Result<S::Response, S::Error>>;
}

/// The routes (`inner`) with the middleware `M` around them.
#[derive(Debug, Clone)]
pub struct Around<S, M> {
    inner: S,
    middleware: M,
}

impl<S, M> Around<S, M> {
    pub fn new(inner: S, middleware: M) -> Self {
        Self { inner, middleware }
    }
}

impl<S, B, M> tower::Service<http::Request<B>> for Around<S, M>
where
    S: tower::Service<http::Request<B>>,
    M: Middleware<S, B>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        self.middleware.call(&mut self.inner, request)
    }
}
