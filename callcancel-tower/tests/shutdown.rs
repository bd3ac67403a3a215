//! Shutdown with a deadline: calls that finish in time, calls cancelled by
//! the abort, a handler that ignores cancellation, new calls refused.

mod common;

use std::convert::Infallible;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use callcancel_tower::cc::ServiceHost;
use callcancel_tower::{CallLayer, Server};
use common::*;
use http_body_util::BodyExt;
use tonic::Code;
use tower::Service;

fn req(millis: u64) -> tonic::Request<WorkRequest> {
    tonic::Request::new(WorkRequest { millis })
}

/// Close timeout 400 ms: a 100 ms call finishes OK, a Block of 10 s is
/// cancelled with HostAbort at the timeout, a handler that ignores
/// cancellation (sleeps 60 s) does not hold the server: it returns within
/// timeout + grace; new connections are refused after the signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_then_aborts_and_returns_in_bounded_time() {
    hard(async {
        let host = ServiceHost::new();
        let demo = Demo::new(host.clone(), None);
        let demo_svc = DemoServer::new(demo.clone());
        // "/ignore/..." sleeps 60 s whatever happens, then answers as Work.
        let svc = tower::service_fn(move |r: http::Request<hyper::body::Incoming>| {
            let mut d = demo_svc.clone();
            async move {
                if r.uri().path().starts_with("/ignore") {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
                Ok::<_, Infallible>(d.call(r).await.unwrap())
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = Server::with_layer(CallLayer::new(host.clone()))
            .close_timeout(Duration::from_millis(400))
            .abort_grace(Duration::from_millis(200))
            .drain_grace(Duration::from_millis(200));
        let task = tokio::spawn(server.serve_with_shutdown(listener, svc, async {
            let _ = rx.await;
        }));
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut c1 = DemoClient::new(ch.clone());
        let quick = tokio::spawn(async move { c1.work(req(150)).await });
        let mut c2 = DemoClient::new(ch.clone());
        let long = tokio::spawn(async move { c2.block(req(10_000)).await });
        // The ignoring handler, via a raw hyper request.
        let hc = hyper_client();
        let ignoring = tokio::spawn(async move {
            let r = http::Request::post(format!("http://{addr}/ignore"))
                .header("content-type", "application/grpc")
                .body(tonic::body::Body::empty())
                .unwrap();
            hc.request(r).await
        });
        wait_until(Duration::from_secs(5), || {
            demo.counters.started.load(SeqCst) == 2 && host.in_flight() == 3
        })
        .await;
        let t0 = Instant::now();
        tx.send(()).unwrap();
        // New connections are refused once the listener is gone.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let refused = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await;
        assert!(
            refused.is_err(),
            "a new connection was accepted during shutdown"
        );
        let report = task.await.unwrap();
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(400),
            "returned before the close timeout: {took:?}"
        );
        assert!(
            took < Duration::from_millis(400 + 200 + 200 + 700),
            "shutdown took {took:?}"
        );
        assert!(!report.graceful && report.aborted, "{report:?}");
        assert!(quick.await.unwrap().is_ok());
        let long = long.await.unwrap().unwrap_err();
        assert_eq!(long.code(), Code::Unavailable, "{long:?}");
        let _ = ignoring.await;
        wait_until(Duration::from_secs(5), || {
            demo.counters.freed.load(SeqCst) == 2
        })
        .await;
        let st = demo.stats();
        assert_eq!(
            (st.started, st.completed, st.cancelled_host_abort, st.freed),
            (2, 1, 1, 2),
            "{}",
            st.line()
        );
        // Shutdown dropped every connection: no channel, no call left (the
        // ignoring handler's call ended with its connection task).
        drop(ch);
        assert_host_drained(&host).await;
    })
    .await
}

/// A closing host refuses new calls: gRPC → trailers-only UNAVAILABLE
/// (HTTP 200, grpc-status 14), plain HTTP → 503; a graceful shutdown with
/// nothing in flight returns at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_host_refuses_calls() {
    hard(async {
        let mut s = TestServer::start(Duration::from_secs(2), None).await;
        let mut c = s.client().await;
        assert!(c.work(req(1)).await.is_ok());
        // Connect the raw client first: a closing host refuses new
        // connections (they are closed at once), calls on open ones get a
        // status.
        let hc = hyper_client();
        let origin: http::Uri = s.url().parse().unwrap();
        let mut raw = DemoClient::with_origin(hc.clone(), origin);
        assert!(raw.work(req(1)).await.is_ok());
        s.host.begin_close();
        let st = c.work(req(1)).await.unwrap_err();
        assert_eq!(st.code(), Code::Unavailable, "{st:?}");
        // Raw: a grpc request gets HTTP 200 + grpc-status 14 in the headers.
        let r = http::Request::post(format!("{}/callcancel.demo.Demo/Work", s.url()))
            .header("content-type", "application/grpc")
            .body(tonic::body::Body::empty())
            .unwrap();
        let resp = hc.request(r).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["grpc-status"], "14");
        // A plain HTTP request gets 503.
        let r = http::Request::get(format!("{}/", s.url()))
            .body(tonic::body::Body::empty())
            .unwrap();
        let resp = hc.request(r).await.unwrap();
        assert_eq!(resp.status(), 503);
        let _ = resp.into_body().collect().await;
        assert!(s.stats().refused >= 3, "{}", s.stats().line());
        let t0 = Instant::now();
        let report = s.shutdown().await;
        assert!(
            report.graceful && !report.aborted && report.idle,
            "{report:?}"
        );
        assert!(t0.elapsed() < Duration::from_secs(1));
        s.assert_all_freed().await;
    })
    .await
}
