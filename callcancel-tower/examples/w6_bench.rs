//! W6: tonic unary RPCs over loopback through the integration layer
//! (`Server`: `CallIo` + `CallLayer`, a call per request) versus the same
//! service on a bare hyper-util accept loop, in the same run, interleaved
//! rounds.
//!
//! ```text
//! cargo run --release -p callcancel-tower --example w6_bench -- [ROUNDS] [ROUND_MS] [CONCURRENCY]
//! ```
//! Defaults: 6 rounds of 1000 ms per mode, 32 concurrent RPCs.

#[path = "grpc_demo/demo.rs"]
mod demo;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use callcancel_tower::cc::ServiceHost;
use callcancel_tower::Server;
use demo::{Demo, DemoClient, DemoServer};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;

async fn bare_server(svc: DemoServer) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        loop {
            let (s, _) = listener.accept().await.unwrap();
            let _ = s.set_nodelay(true);
            let conn = builder
                .serve_connection(TokioIo::new(s), TowerToHyperService::new(svc.clone()))
                .into_owned();
            tokio::spawn(conn);
        }
    });
    addr
}

async fn layered_server(svc: DemoServer, host: ServiceHost) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(Server::new(host).serve_with_shutdown(listener, svc, std::future::pending()));
    addr
}

/// One round: `conc` tasks issue Stats RPCs for `dur`; returns RPCs/s and
/// the latencies (ns).
async fn round(addr: SocketAddr, dur: Duration, conc: usize) -> (f64, Vec<u64>) {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let t0 = Instant::now();
    let end = t0 + dur;
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let mut c = DemoClient::new(ch.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < end {
                let s = Instant::now();
                c.stats().await.expect("rpc");
                lat.push(s.elapsed().as_nanos() as u64);
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let secs = t0.elapsed().as_secs_f64();
    (all.len() as f64 / secs, all)
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p) as usize] as f64 / 1000.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let a: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|s| s.parse().ok())
        .collect();
    let rounds = *a.first().unwrap_or(&6) as usize;
    let dur = Duration::from_millis(*a.get(1).unwrap_or(&1000));
    let conc = *a.get(2).unwrap_or(&32) as usize;
    let host = ServiceHost::new();
    let demo = Demo::new(host.clone(), None);
    let with = layered_server(DemoServer::new(demo.clone()), host.clone()).await;
    let without = bare_server(DemoServer::new(demo)).await;
    // Warm-up.
    round(with, dur / 4, conc).await;
    round(without, dur / 4, conc).await;
    let (mut tw, mut tb, mut lw, mut lb) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..rounds {
        // Alternate which goes first.
        let order = if i % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for layered in order {
            let (tput, lat) = round(if layered { with } else { without }, dur, conc).await;
            if layered {
                tw.push(tput);
                lw.extend(lat);
            } else {
                tb.push(tput);
                lb.extend(lat);
            }
        }
    }
    lw.sort_unstable();
    lb.sort_unstable();
    let (mw, mb) = (median(tw.clone()), median(tb.clone()));
    println!("W6: tonic unary (Stats) over loopback, {rounds} interleaved rounds x {dur:?}, {conc} concurrent");
    println!(
        "  with layer:    {mw:>9.0} rpc/s (median of rounds)  p50 {:>7.1} us  p99 {:>7.1} us",
        pct(&lw, 0.5),
        pct(&lw, 0.99)
    );
    println!(
        "  without layer: {mb:>9.0} rpc/s (median of rounds)  p50 {:>7.1} us  p99 {:>7.1} us",
        pct(&lb, 0.5),
        pct(&lb, 0.99)
    );
    println!(
        "  ratios: throughput {:.3} (target >= 0.95), p50 {:.3}, p99 {:.3} (target <= 1.05)",
        mw / mb,
        pct(&lw, 0.5) / pct(&lb, 0.5),
        pct(&lw, 0.99) / pct(&lb, 0.99)
    );
    println!(
        "  rounds with:    {:?}",
        tw.iter().map(|x| *x as u64).collect::<Vec<_>>()
    );
    println!(
        "  rounds without: {:?}",
        tb.iter().map(|x| *x as u64).collect::<Vec<_>>()
    );
    assert_eq!(host.in_flight(), 0);
}
