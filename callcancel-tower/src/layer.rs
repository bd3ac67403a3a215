//! Requests are calls: [`CallLayer`], [`CallService`], [`CurrentCall`] and the
//! response body wrapper [`CallBody`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::task::futures::TaskLocalFuture;
use tower_layer::Layer;
use tower_service::Service;

use crate::cc::{Call, Channel, Error, OperationContext, ServiceHost};
use crate::status::GRPC_UNAVAILABLE;
use crate::timeout::{parse_grpc_timeout, GRPC_TIMEOUT};

tokio::task_local! {
    static CURRENT: Option<CurrentCall>;
}

type InsertInfo = Arc<dyn Fn(&mut http::Extensions) + Send + Sync>;

/// The channel of the connection a request came on, as a request extension
/// (or as axum's `ConnectInfo<ConnectionChannel>`).
///
/// [`Server`](crate::Server) bakes the channel into each connection's
/// [`CallService`] instead; this extension is for stacks that insert
/// per-connection data themselves: tonic's `Server` (through
/// [`CallIo`](crate::CallIo)'s `Connected` implementation and
/// `CallIncoming`, feature `tonic-server`) and `axum::serve` (through
/// `CallListener`, feature `axum`).
#[derive(Clone)]
pub struct ConnectionChannel {
    channel: Channel,
    info: Option<InsertInfo>,
}

impl ConnectionChannel {
    /// The connection's `channel`.
    pub fn new(channel: Channel) -> Self {
        Self {
            channel,
            info: None,
        }
    }

    /// The connection's `channel`, and connect info of the transport (e.g.
    /// tonic's `TcpConnectInfo`) that [`CallService`] inserts into each
    /// request's extensions, where the stack would have put it.
    pub fn with_info<I: Clone + Send + Sync + 'static>(channel: Channel, info: I) -> Self {
        Self {
            channel,
            info: Some(Arc::new(move |ext: &mut http::Extensions| {
                ext.insert(info.clone());
            })),
        }
    }

    /// The connection's channel.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }
}

impl fmt::Debug for ConnectionChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionChannel")
            .field("channel", &self.channel)
            .field("info", &self.info.is_some())
            .finish()
    }
}

/// The connection's channel among a request's extensions, if any.
fn connection_channel(ext: &http::Extensions) -> Option<&ConnectionChannel> {
    let found = ext.get::<ConnectionChannel>();
    #[cfg(feature = "axum")]
    let found = found.or_else(|| {
        ext.get::<axum::extract::ConnectInfo<ConnectionChannel>>()
            .map(|c| &c.0)
    });
    found
}

struct CallCell {
    call: Call,
    uri: Uri,
}

impl Drop for CallCell {
    fn drop(&mut self) {
        if let Some(reason) = self.call.cancel_reason() {
            tracing::debug!(target: "callcancel", %reason, path = self.uri.path(), "call cancelled");
        }
        // `call` drops next: the call completes.
    }
}

/// The call a request runs as: a cheap clonable handle (an `Arc`), found in
/// the request's extensions and as the task-local current call while the
/// handler future is polled ([`CurrentCall::current`]).
///
/// Derefs to the call's [`OperationContext`]: `register_for_cancel`,
/// `cancelled()`, `run_until_cancelled`, `watch()`, `canceller()`,
/// `cancel()`, `deadline()`.
///
/// **The call completes when the response (with its body) is done and every
/// `CurrentCall` clone is dropped.** Work spawned for the request that holds
/// a clone keeps the call in flight until it ends; hold a
/// [`watch`](OperationContext::watch) or a
/// [`canceller`](OperationContext::canceller) instead to observe or cancel
/// without extending the call.
#[derive(Clone)]
pub struct CurrentCall {
    cell: Arc<CallCell>,
}

impl fmt::Debug for CurrentCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CurrentCall")
            .field("path", &self.cell.uri.path())
            .field("context", self.cell.call.context())
            .finish()
    }
}

impl std::ops::Deref for CurrentCall {
    type Target = OperationContext;
    fn deref(&self) -> &OperationContext {
        self.cell.call.context()
    }
}

impl CurrentCall {
    /// Wraps a call begun elsewhere (for tests, or for a server of your own).
    pub fn new(call: Call, uri: Uri) -> Self {
        Self {
            cell: Arc::new(CallCell { call, uri }),
        }
    }

    /// The call the current task is serving: set while a [`CallService`]
    /// polls its handler future, or inside [`CurrentCall::scope`]; `None`
    /// elsewhere and inside [`detached`].
    pub fn current() -> Option<CurrentCall> {
        CURRENT.try_with(Clone::clone).ok().flatten()
    }

    /// Runs `fut` with this call as the task-local current call: use it for
    /// tasks a handler spawns, so their outgoing requests propagate this
    /// call's deadline and cancellation.
    pub fn scope<F: Future>(&self, fut: F) -> TaskLocalFuture<Option<CurrentCall>, F> {
        CURRENT.scope(Some(self.clone()), fut)
    }

    /// The request's URI (the gRPC method's path).
    pub fn uri(&self) -> &Uri {
        &self.cell.uri
    }

    /// Time left until the call's deadline (zero once passed), if it has one.
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline()
            .map(|d| d.saturating_duration_since(Instant::now()))
    }
}

/// Runs `fut` with no current call: outgoing requests made inside carry
/// neither the deadline nor the cancellation of the call being served (a
/// detached call). See also the [`Detached`](crate::Detached) request
/// extension.
pub fn detached<F: Future>(fut: F) -> TaskLocalFuture<Option<CurrentCall>, F> {
    CURRENT.scope(None, fut)
}

#[derive(Clone, Debug)]
struct Config {
    host: ServiceHost,
    default_timeout: Option<Duration>,
    max_timeout: Option<Duration>,
}

/// A tower [`Layer`] that runs each request as a callcancel call.
///
/// Per request, the [`CallService`]:
/// * begins a call on the connection's [`Channel`] (the one given to
///   [`CallLayer::for_channel`], else a [`ConnectionChannel`] request
///   extension, else a host-scope call), with a deadline: the smaller of the
///   request's `grpc-timeout` (ignored if malformed, see
///   [`parse_grpc_timeout`](crate::parse_grpc_timeout)) and
///   [`default_timeout`](CallLayer::default_timeout) if set — `max_timeout`
///   caps it;
/// * refuses the request if the host or channel refuses the call: gRPC
///   requests (`content-type: application/grpc*`) get a trailers-only
///   `UNAVAILABLE` (HTTP 200, `grpc-status: 14`), others HTTP 503;
/// * inserts a [`CurrentCall`] into the request extensions and sets it as the
///   task-local current call while the inner future is polled;
/// * completes the call when the response and its body are done
///   ([`CallBody`]), or when the inner service fails;
/// * if the response future or the body is dropped before that (client reset
///   or disconnect), cancels the call with `CallCancelled` first, then
///   completes it.
#[derive(Clone, Debug)]
pub struct CallLayer {
    cfg: Arc<Config>,
    channel: Option<Channel>,
}

impl CallLayer {
    /// A layer beginning calls on `host` (or on the connection channels of
    /// `host`), with no default deadline.
    pub fn new(host: ServiceHost) -> Self {
        Self {
            cfg: Arc::new(Config {
                host,
                default_timeout: None,
                max_timeout: None,
            }),
            channel: None,
        }
    }

    /// A deadline for requests without (a valid) `grpc-timeout`; with one,
    /// the smaller of the two applies.
    pub fn default_timeout(mut self, timeout: Duration) -> Self {
        Arc::make_mut(&mut self.cfg).default_timeout = Some(timeout);
        self
    }

    /// An upper bound on any request's deadline, whatever its `grpc-timeout`.
    pub fn max_timeout(mut self, timeout: Duration) -> Self {
        Arc::make_mut(&mut self.cfg).max_timeout = Some(timeout);
        self
    }

    /// The same layer, beginning calls on `channel` (one connection's).
    pub fn for_channel(&self, channel: Channel) -> Self {
        Self {
            cfg: Arc::clone(&self.cfg),
            channel: Some(channel),
        }
    }

    /// The host calls are begun on.
    pub fn host(&self) -> &ServiceHost {
        &self.cfg.host
    }
}

impl<S> Layer<S> for CallLayer {
    type Service = CallService<S>;
    fn layer(&self, inner: S) -> CallService<S> {
        CallService {
            inner,
            cfg: Arc::clone(&self.cfg),
            channel: self.channel.clone(),
        }
    }
}

/// The service of [`CallLayer`].
#[derive(Clone, Debug)]
pub struct CallService<S> {
    inner: S,
    cfg: Arc<Config>,
    channel: Option<Channel>,
}

fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

fn min_opt(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for CallService<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    type Response = Response<CallBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        let header = req
            .headers()
            .get(GRPC_TIMEOUT)
            .and_then(|v| parse_grpc_timeout(v.as_bytes()));
        let timeout = min_opt(
            min_opt(header, self.cfg.default_timeout),
            self.cfg.max_timeout,
        );
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut insert_info = None;
        let begun = {
            let channel = match &self.channel {
                Some(c) => Some(c),
                None => connection_channel(req.extensions()).map(|c| {
                    insert_info.clone_from(&c.info);
                    &c.channel
                }),
            };
            match (channel, deadline) {
                (Some(c), Some(d)) => c.begin_call_with_deadline(d),
                (Some(c), None) => c.begin_call(),
                (None, Some(d)) => self.cfg.host.begin_call_with_deadline(d),
                (None, None) => self.cfg.host.begin_call(),
            }
        };
        if let Some(insert) = insert_info {
            insert(req.extensions_mut());
        }
        let call = match begun {
            Ok(call) => call,
            Err(e) => {
                tracing::debug!(target: "callcancel", error = %e, path = req.uri().path(), "call refused");
                return ResponseFuture {
                    guard: None,
                    state: State::Refused {
                        resp: Some(refused_response(is_grpc(&req), e)),
                    },
                };
            }
        };
        let current = CurrentCall::new(call, req.uri().clone());
        req.extensions_mut().insert(current.clone());
        let guard = Guard::new(current.clone());
        ResponseFuture {
            guard: Some(guard),
            state: State::Running {
                fut: CURRENT.scope(Some(current), self.inner.call(req)),
            },
        }
    }
}

fn refused_response(grpc: bool, e: Error) -> Response<()> {
    let mut resp = Response::new(());
    if grpc {
        let h = resp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from(GRPC_UNAVAILABLE));
        if let Ok(v) = HeaderValue::from_str(&e.to_string()) {
            h.insert("grpc-message", v);
        }
    } else {
        *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    }
    resp
}

/// Cancels the call (`CallCancelled`) if dropped while armed; drops its
/// handle either way (the last handle completes the call).
struct Guard {
    call: CurrentCall,
    done: AtomicBool,
}

impl Guard {
    fn new(call: CurrentCall) -> Self {
        Self {
            call,
            done: AtomicBool::new(false),
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // Ordering: Relaxed; the flag is only ever read by the guard's owner.
        if !self.done.load(Ordering::Relaxed) && self.call.cancel() {
            tracing::debug!(target: "callcancel", path = self.call.uri().path(),
                "response dropped before it was sent: call cancelled");
        }
    }
}

pin_project! {
    /// The response future of [`CallService`].
    pub struct ResponseFuture<F> {
        // Declared first: dropped (cancelling the call) before the handler
        // future, so the handler's drop code already sees the call cancelled.
        guard: Option<Guard>,
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Running { #[pin] fut: TaskLocalFuture<Option<CurrentCall>, F> },
        Refused { resp: Option<Response<()>> },
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<CallBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.state.project() {
            StateProj::Running { fut } => match fut.poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(resp)) => {
                    let guard = this.guard.take();
                    Poll::Ready(Ok(resp.map(|b| CallBody {
                        inner: Some(b),
                        guard,
                    })))
                }
                Poll::Ready(Err(e)) => {
                    if let Some(g) = this.guard.take() {
                        g.done.store(true, Ordering::Relaxed);
                    }
                    Poll::Ready(Err(e))
                }
            },
            StateProj::Refused { resp } => {
                let resp = resp.take().expect("polled after completion");
                Poll::Ready(Ok(resp.map(|()| CallBody::empty())))
            }
        }
    }
}

pin_project! {
    /// A response body that completes its request's call once it has been
    /// read to the end (or its trailers were read), and cancels the call
    /// (`CallCancelled`) if dropped before that.
    pub struct CallBody<B> {
        // Declared first: a body dropped early cancels the call before the
        // handler's body (and what it holds) is dropped.
        guard: Option<Guard>,
        #[pin]
        inner: Option<B>,
    }
}

impl<B> CallBody<B> {
    /// An empty body, tied to no call (used for refused requests).
    pub fn empty() -> Self {
        Self {
            inner: None,
            guard: None,
        }
    }
}

impl<B> fmt::Debug for CallBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallBody")
            .field("call", &self.guard.as_ref().map(|g| &g.call))
            .finish()
    }
}

impl<B: Body> Body for CallBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            return Poll::Ready(None);
        };
        let r = inner.poll_frame(cx);
        let finished = match &r {
            Poll::Pending => false,
            Poll::Ready(Some(Ok(frame))) => frame.is_trailers(),
            // An error ends the body: the stream failed, not the client.
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => true,
        };
        if finished {
            if let Some(g) = this.guard.take() {
                g.done.store(true, Ordering::Relaxed);
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.as_ref().is_none_or(Body::is_end_stream);
        if end {
            if let Some(g) = &self.guard {
                g.done.store(true, Ordering::Relaxed);
            }
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}
