//! Propagation across hops: outgoing requests made while serving a call carry
//! its remaining deadline and are cancelled with it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::cc::{CancelReason, WatchCancelled};
use crate::layer::CurrentCall;
use crate::timeout::{format_grpc_timeout, parse_grpc_timeout, GRPC_TIMEOUT};
use crate::BoxError;

/// A request extension that opts one outgoing request out of propagation:
/// it carries no deadline of the current call and is not cancelled with it
/// (a detached call). [`detached`](crate::detached) does the same for
/// everything inside a future.
#[derive(Clone, Copy, Debug, Default)]
pub struct Detached;

/// The error of an outgoing request cancelled because the call it was made
/// for was cancelled (or its deadline passed before it was sent).
///
/// With the `tonic` feature the [`Propagate`] service returns a
/// `tonic::Status` instead (see [`status_for`](crate::status_for)), which
/// tonic clients report as is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cancelled(pub CancelReason);

impl fmt::Display for Cancelled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "outgoing request cancelled: upstream {}", self.0)
    }
}

impl std::error::Error for Cancelled {}

fn cancel_error(reason: CancelReason) -> BoxError {
    #[cfg(feature = "tonic")]
    {
        Box::new(crate::status::status_for(reason))
    }
    #[cfg(not(feature = "tonic"))]
    {
        Box::new(Cancelled(reason))
    }
}

/// A client-side tower [`Layer`] propagating the current call (see
/// [`CurrentCall::current`]) to outgoing HTTP requests: works for a
/// `tonic::transport::Channel` and a hyper-util client.
///
/// While a call is being served, each outgoing request
/// * gets `grpc-timeout` = the call's remaining time (or the request's own
///   `grpc-timeout` if that is smaller); if the deadline has already passed,
///   the request is not sent and fails with `DEADLINE_EXCEEDED`;
/// * fails at once with the call's status (see
///   [`status_for`](crate::status_for)) when the call is cancelled, for any
///   reason, before or while the response or its body arrive; the request
///   future and body are dropped, which resets the HTTP/2 stream
///   (RST_STREAM(CANCEL)); over HTTP/1 it closes the connection.
///
/// Requests with the [`Detached`] extension, made inside
/// [`detached`](crate::detached), or made with no current call, pass
/// through untouched.
#[derive(Clone, Copy, Debug, Default)]
pub struct PropagateLayer;

impl PropagateLayer {
    /// The layer.
    pub fn new() -> Self {
        Self
    }
}

impl<S> Layer<S> for PropagateLayer {
    type Service = Propagate<S>;
    fn layer(&self, inner: S) -> Propagate<S> {
        Propagate { inner }
    }
}

/// The service of [`PropagateLayer`].
#[derive(Clone, Debug)]
pub struct Propagate<S> {
    inner: S,
}

impl<S> Propagate<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S, B, RB> Service<Request<B>> for Propagate<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<PropagateBody<RB>>;
    type Error = BoxError;
    type Future = PropagateFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let current = if req.extensions().get::<Detached>().is_some() {
            None
        } else {
            CurrentCall::current()
        };
        let Some(call) = current else {
            return PropagateFuture {
                state: Some(Err(None)),
                fut: self.inner.call(req),
            };
        };
        if let Some(reason) = call.cancel_reason() {
            return PropagateFuture::failed(reason, self.inner.call(req));
        }
        if let Some(deadline) = call.deadline() {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return PropagateFuture::failed(
                    CancelReason::DeadlineExceeded,
                    self.inner.call(req),
                );
            }
            let own = req
                .headers()
                .get(GRPC_TIMEOUT)
                .and_then(|v| parse_grpc_timeout(v.as_bytes()));
            let t = own.map_or(remaining, |o| o.min(remaining));
            req.headers_mut()
                .insert(GRPC_TIMEOUT, format_grpc_timeout(t));
        }
        let watch = call.watch();
        // Only the watch goes along: the outgoing request must not keep the
        // incoming call in flight.
        drop(call);
        PropagateFuture {
            state: Some(Ok(watch.cancelled())),
            fut: self.inner.call(req),
        }
    }
}

pin_project! {
    /// The response future of [`Propagate`].
    pub struct PropagateFuture<F> {
        // Ok(watch): propagating; Err(Some(reason)): fail without polling
        // `fut` (it is dropped unpolled); Err(None): pass through.
        state: Option<Result<WatchCancelled, Option<CancelReason>>>,
        #[pin]
        fut: F,
    }
}

impl<F> PropagateFuture<F> {
    fn failed(reason: CancelReason, fut: F) -> Self {
        Self {
            state: Some(Err(Some(reason))),
            fut,
        }
    }
}

impl<F, RB, E> Future for PropagateFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<PropagateBody<RB>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut watching = None;
        match this.state.take() {
            Some(Err(Some(reason))) => return Poll::Ready(Err(cancel_error(reason))),
            Some(Ok(mut w)) => match Pin::new(&mut w).poll(cx) {
                Poll::Ready(Some(reason)) => {
                    tracing::debug!(target: "callcancel", %reason, "outgoing request cancelled");
                    return Poll::Ready(Err(cancel_error(reason)));
                }
                Poll::Ready(None) => {}
                Poll::Pending => watching = Some(w),
            },
            _ => {}
        }
        match this.fut.poll(cx) {
            Poll::Pending => {
                *this.state = Some(watching.ok_or(None));
                Poll::Pending
            }
            Poll::Ready(r) => Poll::Ready(
                r.map(|resp| {
                    resp.map(|inner| PropagateBody {
                        inner,
                        watch: watching,
                    })
                })
                .map_err(Into::into),
            ),
        }
    }
}

pin_project! {
    /// A response body of [`Propagate`]: fails (and is to be dropped) when
    /// the call it was made for is cancelled.
    pub struct PropagateBody<B> {
        #[pin]
        inner: B,
        watch: Option<WatchCancelled>,
    }
}

impl<B> fmt::Debug for PropagateBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PropagateBody")
            .field("watching", &self.watch.is_some())
            .finish()
    }
}

impl<B> Body for PropagateBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, BoxError>>> {
        let this = self.project();
        if let Some(w) = this.watch {
            match Pin::new(w).poll(cx) {
                Poll::Ready(Some(reason)) => {
                    *this.watch = None;
                    tracing::debug!(target: "callcancel", %reason, "outgoing response body cancelled");
                    return Poll::Ready(Some(Err(cancel_error(reason))));
                }
                Poll::Ready(None) => *this.watch = None,
                Poll::Pending => {}
            }
        }
        this.inner
            .poll_frame(cx)
            .map(|o| o.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
