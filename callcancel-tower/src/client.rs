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
/// `tonic::Status` instead (see `status_for`, feature `tonic`), which
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
///   `status_for`) when the call is cancelled, for any
///   reason, before or while the response or its body arrive; the request
///   future and body are dropped, which resets the HTTP/2 stream
///   (RST_STREAM(CANCEL)); over HTTP/1 it closes the connection;
/// * if its response (or error) arrives once the call's deadline has passed,
///   fails with `DEADLINE_EXCEEDED` when the core's timer has cancelled the
///   call (within the core's timer bound): a tonic `Channel` that enforces
///   the propagated `grpc-timeout` itself, or a downstream answering
///   DEADLINE_EXCEEDED at the same instant, cannot let the handler finish
///   the call before its own deadline cancels it.
///
/// Requests with the [`Detached`] extension, made inside
/// [`detached`](crate::detached), or made with no current call, pass
/// through untouched.
///
/// The current call is read when the request is handed to the service
/// (`Service::call`). tonic clients do that when their future is first
/// polled; when calling a tower service by hand inside
/// [`detached`](crate::detached) or [`CurrentCall::scope`], call it inside
/// the scoped future (`detached(async { svc.call(req).await })`), not in
/// the argument.
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
                deadline: None,
                held: None,
                fut: Some(self.inner.call(req)),
            };
        };
        if let Some(reason) = call.cancel_reason() {
            return PropagateFuture::failed(reason);
        }
        if let Some(deadline) = call.deadline() {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return PropagateFuture::failed(CancelReason::DeadlineExceeded);
            }
            let own = req
                .headers()
                .get(GRPC_TIMEOUT)
                .and_then(|v| parse_grpc_timeout(v.as_bytes()));
            let t = own.map_or(remaining, |o| o.min(remaining));
            req.headers_mut()
                .insert(GRPC_TIMEOUT, format_grpc_timeout(t));
        }
        let deadline = call.deadline();
        let watch = call.watch();
        // Only the watch goes along: the outgoing request must not keep the
        // incoming call in flight.
        drop(call);
        PropagateFuture {
            state: Some(Ok(watch.cancelled())),
            deadline,
            held: None,
            fut: Some(self.inner.call(req)),
        }
    }
}

pin_project! {
    /// The response future of [`Propagate`].
    pub struct PropagateFuture<F>
    where
        F: Future,
    {
        // Ok(watch): propagating; Err(Some(reason)): fail at once (the
        // request was never handed to the inner service); Err(None): pass
        // through.
        state: Option<Result<WatchCancelled, Option<CancelReason>>>,
        // The current call's deadline, if it has one.
        deadline: Option<Instant>,
        // The inner result, held once the deadline passed until the core's
        // timer has cancelled the call.
        held: Option<F::Output>,
        #[pin]
        fut: Option<F>,
    }
}

impl<F: Future> PropagateFuture<F> {
    fn failed(reason: CancelReason) -> Self {
        Self {
            state: Some(Err(Some(reason))),
            deadline: None,
            held: None,
            fut: None,
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
        let mut this = self.project();
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
        let r = match this.held.take() {
            Some(r) => r,
            None => match this
                .fut
                .as_mut()
                .as_pin_mut()
                .expect("polled after completion")
                .poll(cx)
            {
                Poll::Pending => {
                    *this.state = Some(watching.ok_or(None));
                    return Poll::Pending;
                }
                Poll::Ready(r) => r,
            },
        };
        if watching.is_some() && this.deadline.is_some_and(|d| Instant::now() >= d) {
            // The call's deadline has passed and the core's timer is about
            // to cancel it (a tonic `Channel` enforcing the propagated
            // `grpc-timeout` locally, or a downstream answering
            // DEADLINE_EXCEEDED, got there first): wait for that, so the
            // call is cancelled before its handler can finish it.
            *this.held = Some(r);
            *this.state = Some(watching.ok_or(None));
            this.fut.set(None);
            return Poll::Pending;
        }
        Poll::Ready(
            r.map(|resp| {
                resp.map(|inner| PropagateBody {
                    inner,
                    watch: watching,
                })
            })
            .map_err(Into::into),
        )
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cc::ServiceHost;
    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    type Seen = Arc<Mutex<Vec<Option<String>>>>;

    /// One request in `call`'s scope must fail; with the `tonic` feature,
    /// with the gRPC status code named `code`.
    async fn fails_with<S>(call: &CurrentCall, svc: &mut S, code: &str)
    where
        S: Service<Request<()>, Error = BoxError>,
        S::Response: std::fmt::Debug,
    {
        let e = call
            .scope(async { svc.call(Request::new(())).await })
            .await
            .unwrap_err();
        #[cfg(feature = "tonic")]
        assert_eq!(
            format!("{:?}", e.downcast_ref::<tonic::Status>().unwrap().code()),
            code
        );
        let _ = (e, code);
    }

    /// A mock transport recording each request's grpc-timeout.
    type MockFn = Box<
        dyn FnMut(Request<()>) -> std::future::Ready<Result<Response<String>, Infallible>> + Send,
    >;

    fn mock(seen: Seen) -> Propagate<Fn_<MockFn>> {
        Propagate::new(tower_util_fn(Box::new(move |req: Request<()>| {
            let v = req
                .headers()
                .get(GRPC_TIMEOUT)
                .map(|v| v.to_str().unwrap().to_owned());
            seen.lock().unwrap().push(v);
            std::future::ready(Ok::<_, Infallible>(Response::new(String::new())))
        })))
    }

    struct Fn_<F>(F);
    fn tower_util_fn<F>(f: F) -> Fn_<F> {
        Fn_(f)
    }
    impl<F, Fut> Service<Request<()>> for Fn_<F>
    where
        F: FnMut(Request<()>) -> Fut,
        Fut: Future<Output = Result<Response<String>, Infallible>>,
    {
        type Response = Response<String>;
        type Error = Infallible;
        type Future = Fut;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, r: Request<()>) -> Fut {
            (self.0)(r)
        }
    }

    fn ms(v: &Option<String>) -> u128 {
        let v = v.as_deref().expect("grpc-timeout set");
        parse_grpc_timeout(v.as_bytes()).unwrap().as_millis()
    }

    #[tokio::test]
    async fn sets_remaining_deadline_keeps_smaller_and_respects_opt_outs() {
        let seen = Seen::default();
        let mut svc = mock(seen.clone());
        let host = ServiceHost::new();
        let deadline = Instant::now() + Duration::from_millis(500);
        let call = CurrentCall::new(
            host.begin_call_with_deadline(deadline).unwrap(),
            http::Uri::from_static("/x"),
        );
        // No current call: untouched.
        svc.call(Request::new(())).await.unwrap();
        call.scope(async {
            svc.call(Request::new(())).await.unwrap();
            let mut r = Request::new(());
            r.headers_mut()
                .insert(GRPC_TIMEOUT, http::HeaderValue::from_static("100m"));
            svc.call(r).await.unwrap();
            let mut r = Request::new(());
            r.headers_mut()
                .insert(GRPC_TIMEOUT, http::HeaderValue::from_static("9S"));
            svc.call(r).await.unwrap();
            let mut r = Request::new(());
            r.extensions_mut().insert(Detached);
            svc.call(r).await.unwrap();
            crate::detached(async { svc.call(Request::new(())).await })
                .await
                .unwrap();
        })
        .await;
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 6);
        assert_eq!(seen[0], None);
        assert!((400..=500).contains(&ms(&seen[1])), "{seen:?}");
        assert_eq!(ms(&seen[2]), 100);
        assert!((400..=500).contains(&ms(&seen[3])), "{seen:?}");
        assert_eq!((&seen[4], &seen[5]), (&None, &None));
    }

    #[tokio::test]
    async fn cancelled_or_expired_call_fails_without_sending() {
        let seen = Seen::default();
        let mut svc = mock(seen.clone());
        let host = ServiceHost::new();
        let past = host.begin_call_with_deadline(Instant::now()).unwrap();
        let cancelled = host.begin_call().unwrap();
        assert!(cancelled.cancel());
        // The expected status code (with the `tonic` feature), by name.
        for (call, code) in [(past, "DeadlineExceeded"), (cancelled, "Cancelled")] {
            let call = CurrentCall::new(call, http::Uri::from_static("/x"));
            fails_with(&call, &mut svc, code).await;
        }
        assert!(seen.lock().unwrap().is_empty());
    }

    /// A response that arrives after the call's deadline (a transport timing
    /// the propagated `grpc-timeout` out itself) is held until the core's
    /// timer cancelled the call: the request fails with DeadlineExceeded and
    /// the call is cancelled with it, never finished first.
    #[tokio::test]
    async fn result_after_the_deadline_waits_for_the_cancel() {
        let host = ServiceHost::new();
        let deadline = Instant::now() + Duration::from_millis(20);
        let call = CurrentCall::new(
            host.begin_call_with_deadline(deadline).unwrap(),
            http::Uri::from_static("/x"),
        );
        // The transport answers exactly at the deadline (before or after the
        // core's timer: either way the result must be the cancellation).
        let mut svc = Propagate::new(tower_util_fn(move |_req: Request<()>| async move {
            tokio::time::sleep_until(deadline.into()).await;
            Ok::<_, Infallible>(Response::new(String::new()))
        }));
        fails_with(&call, &mut svc, "DeadlineExceeded").await;
        assert_eq!(
            call.cancel_reason(),
            Some(crate::cc::CancelReason::DeadlineExceeded)
        );
    }
}
