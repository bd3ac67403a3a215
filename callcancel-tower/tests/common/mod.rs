//! Shared test harness: the real demo service on 127.0.0.1 ephemeral ports.
#![allow(dead_code)]

#[path = "../../examples/grpc_demo/demo.rs"]
pub mod demo;

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use callcancel_tower::cc::ServiceHost;
use callcancel_tower::{CallLayer, Server, ShutdownReport};
pub use demo::*;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Every test body runs under this hard timeout.
pub const HARD: Duration = Duration::from_secs(30);

pub struct TestServer {
    pub addr: SocketAddr,
    pub demo: Demo,
    pub host: ServiceHost,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<ShutdownReport>>,
}

impl TestServer {
    pub async fn start(close_timeout: Duration, next: Option<SocketAddr>) -> Self {
        Self::start_with(close_timeout, next, |l| l).await
    }

    pub async fn start_with(
        close_timeout: Duration,
        next: Option<SocketAddr>,
        layer: impl FnOnce(CallLayer) -> CallLayer,
    ) -> Self {
        let host = ServiceHost::new();
        let next = next.map(|a| a.to_string());
        let demo = Demo::new(host.clone(), next.as_deref());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        let server = Server::with_layer(layer(CallLayer::new(host.clone())))
            .close_timeout(close_timeout)
            .abort_grace(Duration::from_millis(300))
            .drain_grace(Duration::from_millis(300))
            .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS);
        let svc = DemoServer::new(demo.clone());
        let task = tokio::spawn(server.serve_with_shutdown(listener, svc, async {
            let _ = rx.await;
        }));
        Self {
            addr,
            demo,
            host,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn client(&self) -> DemoClient<tonic::transport::Channel> {
        DemoClient::new(self.channel().await)
    }

    pub fn counters(&self) -> &Counters {
        &self.demo.counters
    }

    pub fn stats(&self) -> StatsReply {
        self.demo.stats()
    }

    /// Starts the shutdown and returns its report.
    pub async fn shutdown(&mut self) -> ShutdownReport {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.take().expect("shut down once").await.unwrap()
    }

    /// Signals shutdown without waiting.
    pub fn begin_shutdown(&mut self) -> JoinHandle<ShutdownReport> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.take().expect("shut down once")
    }

    /// No connection's channel and no call left on the host (bounded wait):
    /// call once every client of this server is dropped.
    pub async fn assert_drained(&self) {
        assert_host_drained(&self.host).await;
    }

    /// Every started call was freed (waits a bounded time for it).
    pub async fn assert_all_freed(&self) {
        let c = self.counters();
        wait_until(Duration::from_secs(5), || {
            c.freed.load(std::sync::atomic::Ordering::SeqCst)
                == c.started.load(std::sync::atomic::Ordering::SeqCst)
        })
        .await;
        let s = self.stats();
        assert_eq!(s.started, s.freed, "{}", s.line());
        assert!(
            s.cancelled_call
                + s.cancelled_deadline
                + s.cancelled_channel_faulted
                + s.cancelled_host_abort
                <= s.started
        );
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
        self.host.abort();
    }
}

/// The host's channels (connections) and calls are all gone: waits (bounded)
/// until `stats().channels == 0` and `stats().in_flight == 0`.
pub async fn assert_host_drained(host: &ServiceHost) {
    let t0 = Instant::now();
    loop {
        let st = host.stats();
        if st.channels == 0 && st.in_flight == 0 {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "host not drained: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Polls `cond` every 5 ms until it holds; panics after `limit`.
pub async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < limit,
            "condition not reached within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Runs a test body under the hard timeout.
pub async fn hard<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(HARD, f)
        .await
        .expect("test hit its hard timeout")
}

/// A hyper-util HTTP/2 client (no local grpc-timeout enforcement, unlike a
/// tonic `Channel`): what the server sees is exactly what the test sends.
pub type HyperClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    tonic::body::Body,
>;

pub fn hyper_client() -> HyperClient {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A TCP proxy in front of `target`; `kill()` drops every proxied
/// connection at once (both sides), i.e. a client disconnect without any
/// HTTP/2 RST_STREAM first.
pub struct Proxy {
    pub addr: SocketAddr,
    tasks: std::sync::Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tasks = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let t2 = tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut a, _)) = listener.accept().await {
                let t = tokio::spawn(async move {
                    if let Ok(mut b) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                    }
                });
                t2.lock().unwrap().push(t);
            }
        });
        Self {
            addr,
            tasks,
            accept,
        }
    }

    pub fn kill(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.kill();
    }
}
