//! An accept loop for tower services (tonic routes, axum routers, any
//! `Service<Request<Incoming>>`): connections are channels, requests are
//! calls, and shutdown has a deadline.

use std::convert::Infallible;
use std::future::Future;
use std::time::{Duration, Instant};

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tower_layer::Layer;
use tower_service::Service;

use crate::cc::ServiceHost;
use crate::conn::CallIo;
use crate::layer::CallLayer;
use crate::BoxError;

/// What [`Server::serve_with_shutdown`] saw while shutting down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// The host became idle within the close timeout (no abort needed).
    pub graceful: bool,
    /// The host was aborted at the close timeout.
    pub aborted: bool,
    /// The host was idle when `serve_with_shutdown` returned.
    pub idle: bool,
    /// Connection tasks still running at the end, dropped.
    pub connections_dropped: usize,
}

/// Serves a tower service over TCP (HTTP/1 and HTTP/2, via hyper-util's
/// `auto::Builder`), each connection a channel of the host and each request
/// a call ([`CallLayer`]).
///
/// ```no_run
/// # async fn run(routes: tonic::service::Routes) -> std::io::Result<()> {
/// use callcancel_tower::{cc::ServiceHost, Server};
/// use std::time::Duration;
/// let host = ServiceHost::new();
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let report = Server::new(host)
///     .close_timeout(Duration::from_secs(5))
///     .serve_with_shutdown(listener, routes, async {
///         let _ = tokio::signal::ctrl_c().await;
///     })
///     .await;
/// println!("{report:?}");
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Server {
    layer: CallLayer,
    close_timeout: Duration,
    abort_grace: Duration,
    drain_grace: Duration,
    max_pending_accept_reset_streams: Option<usize>,
}

impl Server {
    /// A server for `host` with a plain [`CallLayer`], a close timeout of 1 s,
    /// an abort grace of 500 ms and a drain grace of 500 ms.
    pub fn new(host: ServiceHost) -> Self {
        Self::with_layer(CallLayer::new(host))
    }

    /// A server using `layer` (e.g. with a default timeout).
    pub fn with_layer(layer: CallLayer) -> Self {
        Self {
            layer,
            close_timeout: Duration::from_secs(1),
            abort_grace: Duration::from_millis(500),
            drain_grace: Duration::from_millis(500),
            max_pending_accept_reset_streams: None,
        }
    }

    /// HTTP/2: how many streams a client may reset before the server has
    /// accepted them, before the connection is closed with
    /// `ENHANCE_YOUR_CALM` (hyper's rapid-reset guard; its default is 20).
    /// A server downstream of services that propagate cancellation (an
    /// upstream call cancelled with many calls relayed on one connection
    /// resets them all at once) may need more; `None` keeps hyper's default.
    pub fn max_pending_accept_reset_streams(mut self, max: impl Into<Option<usize>>) -> Self {
        self.max_pending_accept_reset_streams = max.into();
        self
    }

    /// How long shutdown waits for in-flight calls before aborting the host.
    pub fn close_timeout(mut self, d: Duration) -> Self {
        self.close_timeout = d;
        self
    }

    /// How long shutdown waits, after the abort, for calls to complete.
    pub fn abort_grace(mut self, d: Duration) -> Self {
        self.abort_grace = d;
        self
    }

    /// How long connections get, once calls are done, to send their last
    /// responses and close before their tasks are dropped.
    pub fn drain_grace(mut self, d: Duration) -> Self {
        self.drain_grace = d;
        self
    }

    /// The host.
    pub fn host(&self) -> &ServiceHost {
        self.layer.host()
    }

    /// Accepts connections on `listener` and serves `service` on them until
    /// `signal` resolves, then shuts down:
    ///
    /// 1. stops accepting (drops the listener);
    /// 2. `host.begin_close()`: new calls are refused (UNAVAILABLE / 503);
    /// 3. GOAWAY / connection close to every connection (hyper-util
    ///    `GracefulShutdown`);
    /// 4. waits for the host to be idle, up to the close timeout
    ///    (`host.close_async(close_timeout)`);
    /// 5. else the host is aborted (calls cancelled with `HostAbort`) and
    ///    shutdown waits for idle again, up to the abort grace;
    /// 6. waits for connections to finish, up to the drain grace, and drops
    ///    those still running (their channels fault).
    ///
    /// Returns within close timeout + abort grace + drain grace (plus
    /// scheduling) even if a handler ignores cancellation.
    pub async fn serve_with_shutdown<S, B, F>(
        self,
        listener: TcpListener,
        service: S,
        signal: F,
    ) -> ShutdownReport
    where
        S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
        F: Future<Output = ()>,
    {
        let host = self.host().clone();
        let mut builder = auto::Builder::new(TokioExecutor::new());
        if let Some(max) = self.max_pending_accept_reset_streams {
            builder.http2().max_pending_accept_reset_streams(max);
        }
        let graceful = GracefulShutdown::new();
        let mut conns = JoinSet::new();
        tokio::pin!(signal);
        loop {
            tokio::select! {
                _ = &mut signal => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                accepted = listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            tracing::warn!(target: "callcancel", error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let channel = match host.open_channel() {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::debug!(target: "callcancel", %peer, error = %e, "connection refused");
                            continue;
                        }
                    };
                    let svc = self.layer.for_channel(channel.clone()).layer(service.clone());
                    let io = TokioIo::new(CallIo::new(stream, channel));
                    let conn = builder
                        .serve_connection(io, TowerToHyperService::new(svc))
                        .into_owned();
                    let conn = graceful.watch(conn);
                    conns.spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::trace!(target: "callcancel", %peer, error = %e, "connection error");
                        }
                    });
                }
            }
        }
        drop(listener);
        let t0 = Instant::now();
        host.begin_close();
        let mut goaway = tokio::spawn(graceful.shutdown());
        // Waits for idle up to the close timeout, on the core's own timer;
        // at the timeout it aborts the host (HostAbort) and says so.
        let graceful_idle = host.close_async(self.close_timeout).await.is_ok();
        let mut aborted = false;
        let mut idle = graceful_idle;
        if !graceful_idle {
            aborted = true;
            tracing::warn!(target: "callcancel", in_flight = host.in_flight(),
                timeout_ms = self.close_timeout.as_millis() as u64,
                "shutdown: close timeout passed, host aborted");
            idle = tokio::time::timeout(self.abort_grace, host.idle())
                .await
                .is_ok();
            if !idle {
                tracing::warn!(target: "callcancel", in_flight = host.in_flight(),
                    "shutdown: calls still in flight after the abort; dropping their connections");
            }
        }
        let remaining = self.drain_grace;
        let _ = tokio::time::timeout(remaining, async {
            let _ = (&mut goaway).await;
            while conns.join_next().await.is_some() {}
        })
        .await;
        goaway.abort();
        let connections_dropped = conns.len();
        conns.abort_all();
        while conns.join_next().await.is_some() {}
        if idle {
            let _ = host.close(Duration::ZERO);
        }
        tracing::debug!(target: "callcancel", elapsed_ms = t0.elapsed().as_millis() as u64,
            graceful_idle, aborted, connections_dropped, "shutdown done");
        ShutdownReport {
            graceful: graceful_idle,
            aborted,
            idle: idle || host.in_flight() == 0,
            connections_dropped,
        }
    }
}
