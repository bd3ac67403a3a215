//! The load generator: a bounded number of worker tasks, each a seeded
//! random walk over the scenarios below, against server A.
//!
//! * `plain` / `deadline` / `expired` / `cancel` / `deadline+cancel`: one
//!   Work, Block or Relay RPC (0–200 ms) on one of a few shared connections,
//!   with a random `grpc-timeout` (some already expired: 0–1 ms) and/or a
//!   client-side cancel (the future dropped after 0–200 ms).
//! * `conn-drop`: a fresh connection, 2–10 calls on it, all dropped with the
//!   connection after 0–150 ms.
//! * `socket-kill`: a fresh connection whose socket is shut down
//!   (`shutdown(2)`, no RST_STREAM first) after 0–150 ms with 2–10 calls in
//!   flight; the calls' answers are awaited.
//! * `burst`: 10–80 concurrent calls on one of two burst connections, all
//!   dropped at once after 2–40 ms (a burst of stream resets).
//!
//! Every awaited client future is wrapped in a hard timeout: its deadline
//! + 2 s, or the longest call + 2 s; a hit is a violation.

use std::collections::BTreeMap;
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tokio::task::JoinSet;
use tokio::time::{sleep, timeout};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use crate::proto::{DemoClient, Method, WorkReply, WorkRequest};

/// The longest call (Work/Block/Relay `millis`).
pub const MAX_MS: u64 = 200;
/// Slack of the hard timeout over the deadline or the longest call.
pub const SLACK: Duration = Duration::from_secs(2);
/// Bound on opening a fresh connection to A.
const CONNECT_BOUND: Duration = Duration::from_secs(2);
/// Shared connections to A.
const SHARED: usize = 4;

/// Violations found anywhere in the run (the first ones kept verbatim).
#[derive(Default)]
pub struct Violations {
    list: Mutex<Vec<String>>,
    count: AtomicU64,
    quiet: bool,
}

impl Violations {
    /// A list that prints nothing as it grows.
    pub fn quiet() -> Self {
        Self {
            quiet: true,
            ..Self::default()
        }
    }

    pub fn add(&self, msg: impl Into<String>) {
        let msg = msg.into();
        let n = self.count.fetch_add(1, Relaxed);
        if n < 3 && !self.quiet {
            eprintln!("soak: VIOLATION: {msg}");
        }
        let mut l = self.list.lock().unwrap();
        if l.len() < 50 {
            l.push(msg);
        }
    }
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }
    pub fn list(&self) -> Vec<String> {
        self.list.lock().unwrap().clone()
    }
}

/// Outcomes by (scenario, outcome) and RPCs issued by method.
#[derive(Default)]
pub struct Tally {
    outcomes: Mutex<BTreeMap<(&'static str, String), u64>>,
    issued: Mutex<BTreeMap<Method, u64>>,
}

impl Tally {
    fn issue(&self, m: Method) {
        *self.issued.lock().unwrap().entry(m).or_default() += 1;
    }
    fn count(&self, scenario: &'static str, outcome: &str, n: u64) {
        if n > 0 {
            *self
                .outcomes
                .lock()
                .unwrap()
                .entry((scenario, outcome.to_string()))
                .or_default() += n;
        }
    }
    pub fn outcomes(&self) -> BTreeMap<(&'static str, String), u64> {
        self.outcomes.lock().unwrap().clone()
    }
    pub fn issued(&self) -> BTreeMap<Method, u64> {
        self.issued.lock().unwrap().clone()
    }
}

/// Outcome label of a client-dropped call.
pub const DROPPED: &str = "client-dropped";

/// The error chain under a status (`: a: b`), empty if none.
fn sources(s: &Status) -> String {
    let mut out = String::new();
    let mut e = std::error::Error::source(s);
    let mut n = 0;
    while let Some(err) = e {
        if n == 8 {
            break;
        }
        out.push_str(&format!(": {err}"));
        e = err.source();
        n += 1;
    }
    out
}

fn label(r: &Result<WorkReply, Status>) -> String {
    match r {
        Ok(_) => "Ok".into(),
        Err(s) => format!("{:?}", s.code()),
    }
}

/// The load against A.
pub struct Load {
    addr: SocketAddr,
    t0: Instant,
    /// Deviations of status semantics that break no invariant of the
    /// demo's (see `finish`): reported, fatal only with `SOAK_STRICT=1`.
    pub warnings: Violations,
    shared: Vec<DemoClient>,
    /// Bursts of resets go on connections of their own: a burst may trip
    /// A's HTTP/2 rapid-reset defence (hyper's pending-accept reset limit),
    /// which closes the connection with every call on it.
    bursts: Vec<DemoClient>,
    pub tally: Tally,
    pub violations: Arc<Violations>,
    stop: AtomicBool,
    /// Connections opened (fresh ones; the shared ones not counted).
    pub connections: AtomicU64,
}

/// One finished call, as a task hands it back.
struct Done {
    method: Method,
    millis: u64,
    elapsed: Duration,
    /// None: the hard timeout hit.
    result: Option<Result<WorkReply, Status>>,
    bound: Duration,
}

fn hard_bound(deadline_ms: Option<u64>) -> Duration {
    Duration::from_millis(deadline_ms.unwrap_or(MAX_MS)) + SLACK
}

async fn call(
    mut client: DemoClient,
    method: Method,
    millis: u64,
    deadline_ms: Option<u64>,
) -> Result<WorkReply, Status> {
    let mut req = Request::new(WorkRequest { millis });
    if let Some(d) = deadline_ms {
        req.set_timeout(Duration::from_millis(d));
    }
    client.call(method, req).await
}

/// A call with its hard timeout, as a spawnable future.
async fn bounded_call(
    client: DemoClient,
    method: Method,
    millis: u64,
    deadline_ms: Option<u64>,
) -> Done {
    let bound = hard_bound(deadline_ms);
    let t0 = Instant::now();
    let result = timeout(bound, call(client, method, millis, deadline_ms))
        .await
        .ok();
    Done {
        method,
        millis,
        elapsed: t0.elapsed(),
        result,
        bound,
    }
}

impl Load {
    pub fn new(addr: SocketAddr, violations: Arc<Violations>) -> Self {
        let shared = (0..SHARED)
            .map(|_| DemoClient::new(endpoint(addr).connect_lazy()))
            .collect();
        let bursts = (0..2)
            .map(|_| DemoClient::new(endpoint(addr).connect_lazy()))
            .collect();
        Self {
            addr,
            bursts,
            t0: Instant::now(),
            warnings: Violations::quiet(),
            shared,
            tally: Tally::default(),
            violations,
            stop: AtomicBool::new(false),
            connections: AtomicU64::new(0),
        }
    }

    pub fn stop(&self) {
        self.stop.store(true, Relaxed);
    }

    /// One worker: at most `max_iters` scenarios, until `stop()`.
    pub async fn worker(self: Arc<Self>, seed: u64, max_iters: u64) {
        let mut rng = fastrand::Rng::with_seed(seed);
        for _ in 0..max_iters {
            if self.stop.load(Relaxed) {
                break;
            }
            match rng.u32(0..100) {
                0..80 => self.single(&mut rng).await,
                80..89 => self.conn_drop(&mut rng).await,
                89..97 => self.socket_kill(&mut rng).await,
                _ => self.burst(&mut rng).await,
            }
            sleep(Duration::from_millis(rng.u64(0..=10))).await;
        }
    }

    fn method(rng: &mut fastrand::Rng) -> Method {
        match rng.u32(0..100) {
            0..35 => Method::Work,
            35..60 => Method::Block,
            _ => Method::Relay,
        }
    }

    fn shared(&self, rng: &mut fastrand::Rng) -> DemoClient {
        self.shared[rng.usize(..self.shared.len())].clone()
    }

    /// Records a finished call; `strict`: a plain call (no deadline, no
    /// cancel, on a shared connection) must answer OK unless it is a Relay
    /// (B may be restarting: UNAVAILABLE).
    fn finish(&self, scenario: &'static str, d: Done, strict: bool) {
        let Some(result) = d.result else {
            self.tally.count(scenario, "HARD-TIMEOUT", 1);
            self.violations.add(format!(
                "{scenario}: {:?}({} ms) unanswered after its hard bound {:?}",
                d.method, d.millis, d.bound
            ));
            return;
        };
        self.tally.count(scenario, &label(&result), 1);
        match &result {
            Ok(_) if d.elapsed < Duration::from_millis(d.millis) => {
                self.violations.add(format!(
                    "{scenario}: {:?}({} ms) answered OK after only {:?}",
                    d.method, d.millis, d.elapsed
                ));
            }
            // A Relay through a B that is restarting: B's connection closes
            // under a request A's client had queued or sent; tonic maps
            // hyper's "canceled" to CANCELLED and the demo's Relay passes
            // the downstream status through although nobody cancelled.
            // A Relay whose A -> B connection was closed under it by B's
            // HTTP/2 rapid-reset defence (GOAWAY ENHANCE_YOUR_CALM), tripped
            // by A propagating a burst of client cancels as RST_STREAMs on
            // that one connection: A passes the transport error through.
            Err(s)
                if strict
                    && d.method == Method::Relay
                    && matches!(s.code(), Code::Unknown | Code::ResourceExhausted) =>
            {
                self.warnings.add(format!(
                    "t={:.1}s {scenario}: Relay({} ms) without deadline or cancel answered {:?} (A -> B connection lost): {:?}{}",
                    self.t0.elapsed().as_secs_f64(),
                    d.millis,
                    s.code(),
                    s.message(),
                    sources(s)
                ));
            }
            Err(s) if strict && d.method == Method::Relay && s.code() == Code::Cancelled => {
                self.warnings.add(format!(
                    "t={:.1}s {scenario}: Relay({} ms) without deadline or cancel answered CANCELLED: {:?}{}",
                    self.t0.elapsed().as_secs_f64(),
                    d.millis,
                    s.message(),
                    sources(s)
                ));
            }
            Err(s) if strict && (d.method != Method::Relay || s.code() != Code::Unavailable) => {
                self.violations.add(format!(
                    "t={:.1}s {scenario}: {:?}({} ms) without deadline or cancel answered {:?}: {}{}",
                    self.t0.elapsed().as_secs_f64(),
                    d.method,
                    d.millis,
                    s.code(),
                    s.message(),
                    sources(s)
                ));
            }
            _ => {}
        }
    }

    async fn single(&self, rng: &mut fastrand::Rng) {
        let method = Self::method(rng);
        let millis = rng.u64(0..=MAX_MS);
        let deadline = match rng.u32(0..100) {
            0..12 => Some(rng.u64(0..=1)),
            12..37 => Some(rng.u64(2..=300)),
            _ => None,
        };
        let cancel = (rng.u32(0..100) < 20).then(|| rng.u64(0..=MAX_MS));
        let scenario = match (deadline, cancel) {
            (None, None) => "plain",
            (Some(d), None) if d <= 1 => "expired",
            (Some(_), None) => "deadline",
            (None, Some(_)) => "cancel",
            (Some(_), Some(_)) => "deadline+cancel",
        };
        self.tally.issue(method);
        let fut = bounded_call(self.shared(rng), method, millis, deadline);
        match cancel {
            None => self.finish(scenario, fut.await, scenario == "plain"),
            Some(c) => match timeout(Duration::from_millis(c), fut).await {
                Ok(done) => self.finish(scenario, done, false),
                Err(_) => self.tally.count(scenario, DROPPED, 1),
            },
        }
    }

    /// Spawns `k` calls on `client`.
    fn spawn_calls(
        &self,
        rng: &mut fastrand::Rng,
        client: &DemoClient,
        k: usize,
        min_ms: u64,
    ) -> JoinSet<Done> {
        let mut set = JoinSet::new();
        for _ in 0..k {
            let method = Self::method(rng);
            let millis = rng.u64(min_ms..=MAX_MS);
            self.tally.issue(method);
            set.spawn(bounded_call(client.clone(), method, millis, None));
        }
        set
    }

    /// Records the calls that finished, drops the rest (aborting their tasks
    /// drops their futures: a stream reset each).
    fn drop_rest(&self, scenario: &'static str, mut set: JoinSet<Done>) {
        while let Some(r) = set.try_join_next() {
            match r {
                Ok(d) => self.finish(scenario, d, false),
                Err(e) => self.violations.add(format!("{scenario}: call task: {e}")),
            }
        }
        self.tally.count(scenario, DROPPED, set.len() as u64);
        drop(set);
    }

    async fn conn_drop(&self, rng: &mut fastrand::Rng) {
        let ch = match timeout(CONNECT_BOUND, endpoint(self.addr).connect()).await {
            Ok(Ok(ch)) => ch,
            e => {
                self.violations
                    .add(format!("conn-drop: cannot connect to A: {e:?}"));
                return;
            }
        };
        self.connections.fetch_add(1, Relaxed);
        let client = DemoClient::new(ch);
        let k = rng.usize(2..=10);
        let set = self.spawn_calls(rng, &client, k, 0);
        drop(client);
        sleep(Duration::from_millis(rng.u64(0..=150))).await;
        self.drop_rest("conn-drop", set);
    }

    async fn socket_kill(&self, rng: &mut fastrand::Rng) {
        let socket: Arc<Mutex<Option<std::net::TcpStream>>> = Arc::default();
        let keep = Arc::clone(&socket);
        let addr = self.addr;
        let connector = tower::service_fn(move |_: http::Uri| {
            let keep = Arc::clone(&keep);
            async move {
                let s = tokio::net::TcpStream::connect(addr).await?;
                let s = s.into_std()?; // non-blocking
                *keep.lock().unwrap() = Some(s.try_clone()?);
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::TcpStream::from_std(s)?))
            }
        });
        let ch = match timeout(
            CONNECT_BOUND,
            endpoint(self.addr).connect_with_connector(connector),
        )
        .await
        {
            Ok(Ok(ch)) => ch,
            e => {
                self.violations
                    .add(format!("socket-kill: cannot connect to A: {e:?}"));
                return;
            }
        };
        self.connections.fetch_add(1, Relaxed);
        let client = DemoClient::new(ch);
        let k = rng.usize(2..=10);
        let mut set = self.spawn_calls(rng, &client, k, 0);
        sleep(Duration::from_millis(rng.u64(0..=150))).await;
        if let Some(s) = socket.lock().unwrap().take() {
            let _ = s.shutdown(Shutdown::Both);
        }
        // Every call task carries its own hard timeout.
        while let Some(r) = set.join_next().await {
            match r {
                Ok(d) => self.finish("socket-kill", d, false),
                Err(e) => self.violations.add(format!("socket-kill: call task: {e}")),
            }
        }
    }

    async fn burst(&self, rng: &mut fastrand::Rng) {
        let client = self.bursts[rng.usize(..self.bursts.len())].clone();
        let k = rng.usize(10..=80);
        let set = self.spawn_calls(rng, &client, k, 50);
        sleep(Duration::from_millis(rng.u64(2..=40))).await;
        self.drop_rest("burst", set);
    }
}

pub fn endpoint(addr: SocketAddr) -> Endpoint {
    Endpoint::from_shared(format!("http://{addr}")).expect("endpoint URI")
}

/// A `Stats` client on its own connection.
pub fn stats_client(addr: SocketAddr) -> DemoClient {
    DemoClient::new(lazy(addr))
}

fn lazy(addr: SocketAddr) -> Channel {
    endpoint(addr).connect_lazy()
}
