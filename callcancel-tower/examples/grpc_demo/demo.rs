//! The demo service `callcancel.demo.Demo` (DESIGN.md, "The demo service"):
//! hand-written prost messages, a hand-written tonic service and client.
//! Included by `main.rs` and by the end-to-end tests, so the tests drive the
//! real service.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use callcancel_tower::cc::{CancelReason, OperationContext, ServiceHost};
use callcancel_tower::{status_for, CurrentCall, Propagate, PropagateLayer};
use http::uri::PathAndQuery;
use tonic::Code;
use tonic::{Request, Response, Status};
use tower::Layer;

/// `message WorkRequest { uint64 millis = 1; }`
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkRequest {
    #[prost(uint64, tag = "1")]
    pub millis: u64,
}

/// `message WorkReply { uint64 call_id = 1; }`
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkReply {
    #[prost(uint64, tag = "1")]
    pub call_id: u64,
}

/// `message StatsRequest {}`
#[derive(Clone, PartialEq, prost::Message)]
pub struct StatsRequest {}

/// `message StatsReply { ... }`
#[derive(Clone, PartialEq, prost::Message)]
pub struct StatsReply {
    #[prost(uint64, tag = "1")]
    pub in_flight: u64,
    #[prost(uint64, tag = "2")]
    pub started: u64,
    #[prost(uint64, tag = "3")]
    pub completed: u64,
    #[prost(uint64, tag = "4")]
    pub cancelled_host_abort: u64,
    #[prost(uint64, tag = "5")]
    pub cancelled_channel_faulted: u64,
    #[prost(uint64, tag = "6")]
    pub cancelled_call: u64,
    #[prost(uint64, tag = "7")]
    pub cancelled_deadline: u64,
    #[prost(uint64, tag = "8")]
    pub freed: u64,
    #[prost(uint64, tag = "9")]
    pub refused: u64,
}

impl StatsReply {
    /// The one-line `name=value` form the demo prints at exit.
    pub fn line(&self) -> String {
        format!(
            "in_flight={} started={} completed={} cancelled_host_abort={} \
             cancelled_channel_faulted={} cancelled_call={} cancelled_deadline={} freed={} refused={}",
            self.in_flight,
            self.started,
            self.completed,
            self.cancelled_host_abort,
            self.cancelled_channel_faulted,
            self.cancelled_call,
            self.cancelled_deadline,
            self.freed,
            self.refused
        )
    }
}

pub const SERVICE: &str = "callcancel.demo.Demo";

/// The demo servers' `max_pending_accept_reset_streams`. A chained demo
/// receives bursts of resets on one connection when an upstream hop's calls
/// are cancelled together (propagation, a client dropping many calls): with
/// hyper's default (20, a rapid-reset guard) such a burst makes the server
/// answer GOAWAY and every other call on that connection fails. Used by
/// `main.rs` and the tests' harness (regression: `tests/demo_regressions.rs`).
pub const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 4096;

/// The demo's counters. `started`: calls begun by Work/Block/Relay (each
/// registers its cancel callback at once); `completed`: those that replied
/// OK; `cancelled_*`: cancel callbacks run, by reason; `freed`: free-states
/// run.
#[derive(Default, Debug)]
pub struct Counters {
    pub started: AtomicU64,
    pub completed: AtomicU64,
    pub host_abort: AtomicU64,
    pub channel_faulted: AtomicU64,
    pub call: AtomicU64,
    pub deadline: AtomicU64,
    pub freed: AtomicU64,
    pub callbacks: AtomicU64,
    next_id: AtomicU64,
}

impl Counters {
    pub fn cancelled(&self, reason: CancelReason) -> u64 {
        match reason {
            CancelReason::HostAbort => self.host_abort.load(SeqCst),
            CancelReason::ChannelFaulted => self.channel_faulted.load(SeqCst),
            CancelReason::CallCancelled => self.call.load(SeqCst),
            CancelReason::DeadlineExceeded => self.deadline.load(SeqCst),
            _ => 0,
        }
    }
}

/// An event only a cancel callback sets early (Mutex + Condvar).
#[derive(Default)]
pub struct Event {
    set: Mutex<bool>,
    cv: Condvar,
}

impl Event {
    pub fn set(&self) {
        *self.set.lock().unwrap() = true;
        self.cv.notify_all();
    }
    /// Waits up to `d`; true if set.
    pub fn wait(&self, d: Duration) -> bool {
        let g = self.set.lock().unwrap();
        let (g, _) = self.cv.wait_timeout_while(g, d, |s| !*s).unwrap();
        *g
    }
}

/// The state of the demo: host, counters, optional downstream.
#[derive(Clone)]
pub struct Demo {
    pub host: ServiceHost,
    pub counters: Arc<Counters>,
    next: Option<DemoClient<Propagate<tonic::transport::Channel>>>,
}

impl Demo {
    /// A demo on `host`; `next` (`HOST:PORT`) is Relay's downstream.
    pub fn new(host: ServiceHost, next: Option<&str>) -> Self {
        let next = next.map(|n| {
            let ch = tonic::transport::Endpoint::from_shared(format!("http://{n}"))
                .expect("--next HOST:PORT")
                .connect_lazy();
            DemoClient::new(PropagateLayer.layer(ch))
        });
        Self {
            host,
            counters: Arc::default(),
            next,
        }
    }

    pub fn stats(&self) -> StatsReply {
        let c = &self.counters;
        let started = c.started.load(SeqCst);
        let freed = c.freed.load(SeqCst);
        StatsReply {
            in_flight: started.saturating_sub(freed),
            started,
            completed: c.completed.load(SeqCst),
            cancelled_host_abort: c.host_abort.load(SeqCst),
            cancelled_channel_faulted: c.channel_faulted.load(SeqCst),
            cancelled_call: c.call.load(SeqCst),
            cancelled_deadline: c.deadline.load(SeqCst),
            freed,
            // RPCs turned away by a closing or aborted host (DESIGN.md),
            // not those of a faulted connection (a request racing its
            // connection's end).
            refused: {
                let st = self.host.stats();
                st.refused.saturating_sub(st.refused_channel_faulted)
            },
        }
    }

    /// Counts the call as started and registers its cancel callback (which
    /// counts the reason and sets `event`) with a free-state counting `freed`.
    fn start(&self, ctx: &OperationContext, event: Option<Arc<Event>>) -> u64 {
        let c = Arc::clone(&self.counters);
        c.started.fetch_add(1, SeqCst);
        let c2 = Arc::clone(&c);
        ctx.register_for_cancel_with_free(
            event,
            move |reason, event| {
                c.callbacks.fetch_add(1, SeqCst);
                match reason {
                    CancelReason::HostAbort => &c.host_abort,
                    CancelReason::ChannelFaulted => &c.channel_faulted,
                    CancelReason::CallCancelled => &c.call,
                    _ => &c.deadline,
                }
                .fetch_add(1, SeqCst);
                if let Some(e) = event {
                    e.set();
                }
            },
            move |_| {
                c2.freed.fetch_add(1, SeqCst);
            },
        )
        .expect("first registration");
        self.counters.next_id.fetch_add(1, SeqCst) + 1
    }

    fn done(&self, ctx: &OperationContext, call_id: u64) -> Result<Response<WorkReply>, Status> {
        if let Some(reason) = ctx.cancel_reason() {
            return Err(status_for(reason));
        }
        self.counters.completed.fetch_add(1, SeqCst);
        Ok(Response::new(WorkReply { call_id }))
    }

    pub async fn work(&self, req: Request<WorkRequest>) -> Result<Response<WorkReply>, Status> {
        let call = current(&req)?;
        let id = self.start(&call, None);
        let sleep = tokio::time::sleep(Duration::from_millis(req.get_ref().millis));
        if let Err(reason) = call.run_until_cancelled(sleep).await {
            return Err(status_for(reason));
        }
        self.done(&call, id)
    }

    pub async fn block(&self, req: Request<WorkRequest>) -> Result<Response<WorkReply>, Status> {
        let call = current(&req)?;
        let event = Arc::new(Event::default());
        let id = self.start(&call, Some(Arc::clone(&event)));
        let millis = req.get_ref().millis;
        let _ =
            tokio::task::spawn_blocking(move || event.wait(Duration::from_millis(millis))).await;
        self.done(&call, id)
    }

    pub async fn relay(&self, req: Request<WorkRequest>) -> Result<Response<WorkReply>, Status> {
        let Some(next) = &self.next else {
            return self.work(req).await;
        };
        let call = current(&req)?;
        let id = self.start(&call, None);
        let mut next = next.clone();
        // The current call is task-local here: the downstream request gets
        // its remaining deadline and is reset if it is cancelled.
        match next
            .relay(WorkRequest {
                millis: req.get_ref().millis,
            })
            .await
        {
            Ok(_) => self.done(&call, id),
            Err(status) => Err(match call.cancel_reason() {
                Some(reason) => status_for(reason),
                // Not expected: `Propagate` holds a downstream result that
                // arrives after our deadline until our timer cancelled us.
                None if call.remaining() == Some(Duration::ZERO) => {
                    status_for(CancelReason::DeadlineExceeded)
                }
                // The downstream deadline (our remaining time) ran out just
                // before ours: say so.
                None if status.code() == Code::DeadlineExceeded => status,
                // Nobody cancelled us: the downstream service or the
                // connection to it failed (e.g. it restarted: CANCELLED,
                // UNKNOWN, or INTERNAL "h2 protocol error" from a connection
                // torn down mid-call). Whatever it said, the hop is what
                // failed: UNAVAILABLE to our client, which may retry.
                None => Status::unavailable(format!(
                    "downstream {:?}: {}",
                    status.code(),
                    status.message()
                )),
            }),
        }
    }
}

fn current<T>(req: &Request<T>) -> Result<CurrentCall, Status> {
    req.extensions()
        .get::<CurrentCall>()
        .cloned()
        .ok_or_else(|| Status::internal("no CurrentCall: serve Demo through CallLayer"))
}

// --- the tonic service, by hand -------------------------------------------

type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// `Demo` as a tonic service (`tower::Service<http::Request<B>>`).
#[derive(Clone)]
pub struct DemoServer {
    demo: Demo,
}

impl DemoServer {
    pub fn new(demo: Demo) -> Self {
        Self { demo }
    }
}

impl tonic::server::NamedService for DemoServer {
    const NAME: &'static str = SERVICE;
}

#[derive(Clone, Copy)]
enum Method {
    Work,
    Block,
    Relay,
}

struct Unary(Demo, Method);

impl tonic::server::UnaryService<WorkRequest> for Unary {
    type Response = WorkReply;
    type Future = BoxFut<Result<Response<WorkReply>, Status>>;
    fn call(&mut self, req: Request<WorkRequest>) -> Self::Future {
        let (demo, m) = (self.0.clone(), self.1);
        Box::pin(async move {
            match m {
                Method::Work => demo.work(req).await,
                Method::Block => demo.block(req).await,
                Method::Relay => demo.relay(req).await,
            }
        })
    }
}

struct StatsSvc(Demo);

impl tonic::server::UnaryService<StatsRequest> for StatsSvc {
    type Response = StatsReply;
    type Future = std::future::Ready<Result<Response<StatsReply>, Status>>;
    fn call(&mut self, _: Request<StatsRequest>) -> Self::Future {
        std::future::ready(Ok(Response::new(self.0.stats())))
    }
}

impl<B> tower::Service<http::Request<B>> for DemoServer
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFut<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let demo = self.demo.clone();
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::default();
            let mut grpc = tonic::server::Grpc::new(codec);
            let m = match req.uri().path() {
                "/callcancel.demo.Demo/Work" => Method::Work,
                "/callcancel.demo.Demo/Block" => Method::Block,
                "/callcancel.demo.Demo/Relay" => Method::Relay,
                "/callcancel.demo.Demo/Stats" => {
                    let codec = tonic_prost::ProstCodec::default();
                    return Ok(tonic::server::Grpc::new(codec)
                        .unary(StatsSvc(demo), req)
                        .await);
                }
                _ => return Ok(Status::unimplemented("no such method").into_http()),
            };
            Ok(grpc.unary(Unary(demo, m), req).await)
        })
    }
}

// --- the client, by hand ----------------------------------------------------

/// A `Demo` client over any tonic transport `T` (a `Channel`, or one wrapped
/// in `PropagateLayer`).
#[derive(Clone)]
pub struct DemoClient<T> {
    inner: tonic::client::Grpc<T>,
}

impl<T> DemoClient<T>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    T::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error:
        Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    pub fn new(transport: T) -> Self {
        Self {
            inner: tonic::client::Grpc::new(transport),
        }
    }

    /// For transports that need absolute URIs (a hyper-util client).
    pub fn with_origin(transport: T, origin: http::Uri) -> Self {
        Self {
            inner: tonic::client::Grpc::with_origin(transport, origin),
        }
    }

    async fn unary<Q, R>(
        &mut self,
        path: &'static str,
        req: impl tonic::IntoRequest<Q>,
    ) -> Result<Response<R>, Status>
    where
        Q: prost::Message + Send + Sync + 'static,
        R: prost::Message + Default + Send + Sync + 'static,
    {
        self.inner
            .ready()
            .await
            .map_err(|e| Status::unavailable(format!("not ready: {}", e.into())))?;
        let codec = tonic_prost::ProstCodec::<Q, R>::default();
        self.inner
            .unary(req.into_request(), PathAndQuery::from_static(path), codec)
            .await
    }

    pub async fn work(
        &mut self,
        req: impl tonic::IntoRequest<WorkRequest>,
    ) -> Result<Response<WorkReply>, Status> {
        self.unary("/callcancel.demo.Demo/Work", req).await
    }
    pub async fn block(
        &mut self,
        req: impl tonic::IntoRequest<WorkRequest>,
    ) -> Result<Response<WorkReply>, Status> {
        self.unary("/callcancel.demo.Demo/Block", req).await
    }
    pub async fn relay(
        &mut self,
        req: impl tonic::IntoRequest<WorkRequest>,
    ) -> Result<Response<WorkReply>, Status> {
        self.unary("/callcancel.demo.Demo/Relay", req).await
    }
    pub async fn stats(&mut self) -> Result<StatsReply, Status> {
        Ok(self
            .unary::<StatsRequest, StatsReply>("/callcancel.demo.Demo/Stats", StatsRequest {})
            .await?
            .into_inner())
    }
}
