//! End to end: real tonic clients against the demo service served by
//! `callcancel_tower::Server` on 127.0.0.1 (connections are channels,
//! requests are calls).

mod common;

use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use callcancel_tower::cc::CancelReason;
use common::*;
use tonic::Code;

fn req(millis: u64) -> tonic::Request<WorkRequest> {
    tonic::Request::new(WorkRequest { millis })
}

/// A client dropping its RPC future (RST_STREAM) cancels exactly that call
/// with CallCancelled; a sibling call on the same connection finishes OK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset_cancels_only_that_call() {
    hard(async {
        let s = TestServer::start(Duration::from_secs(1), None).await;
        let client = s.client().await; // one connection
        let mut a = client.clone();
        let victim = tokio::spawn(async move { a.work(req(10_000)).await });
        let mut b = client.clone();
        let sibling = tokio::spawn(async move { b.work(req(300)).await });
        wait_until(Duration::from_secs(5), || {
            s.counters().started.load(SeqCst) == 2
        })
        .await;
        victim.abort();
        wait_until(Duration::from_secs(5), || {
            s.counters().call.load(SeqCst) == 1
        })
        .await;
        let r = sibling.await.unwrap();
        assert!(r.is_ok(), "{r:?}");
        s.assert_all_freed().await;
        let st = s.stats();
        assert_eq!(
            (
                st.cancelled_call,
                st.cancelled_channel_faulted,
                st.cancelled_deadline,
                st.cancelled_host_abort
            ),
            (1, 0, 0, 0),
            "{}",
            st.line()
        );
        assert_eq!(st.completed, 1);
        assert_eq!(s.host.in_flight(), 0);
        // The connection is still open: one channel, nothing in flight.
        let hs = s.host.stats();
        assert_eq!((hs.channels, hs.in_flight), (1, 0), "{hs:?}");
        assert_eq!(hs.cancelled(CancelReason::CallCancelled), 1, "{hs:?}");
        drop(client);
        s.assert_drained().await;
    })
    .await
}

/// A connection dropped (no RST_STREAM: the TCP connection dies) cancels
/// every call of that connection with ChannelFaulted and no other call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_cancels_every_call_of_the_connection() {
    hard(async {
        let s = TestServer::start(Duration::from_secs(1), None).await;
        let proxy = Proxy::start(s.addr).await;
        let via = DemoClient::new(
            tonic::transport::Endpoint::from_shared(format!("http://{}", proxy.addr))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
        let mut victims = Vec::new();
        for i in 0..3 {
            let mut c = via.clone();
            victims.push(tokio::spawn(async move {
                if i == 2 {
                    c.block(req(10_000)).await
                } else {
                    c.work(req(10_000)).await
                }
            }));
        }
        let mut other = s.client().await;
        let survivor = tokio::spawn(async move { other.work(req(400)).await });
        wait_until(Duration::from_secs(5), || {
            s.counters().started.load(SeqCst) == 4
        })
        .await;
        proxy.kill();
        wait_until(Duration::from_secs(5), || {
            s.counters().channel_faulted.load(SeqCst) == 3
        })
        .await;
        for v in victims {
            let r = v.await.unwrap();
            assert!(r.is_err());
        }
        assert!(survivor.await.unwrap().is_ok());
        s.assert_all_freed().await;
        let st = s.stats();
        assert_eq!(
            (
                st.cancelled_channel_faulted,
                st.cancelled_call,
                st.completed
            ),
            (3, 0, 1),
            "{}",
            st.line()
        );
        assert_eq!(s.host.in_flight(), 0);
        assert_eq!(s.host.stats().cancelled(CancelReason::ChannelFaulted), 3);
        drop((via, proxy));
        s.assert_drained().await;
    })
    .await
}

/// `grpc-timeout` becomes the call's deadline: the call is cancelled with
/// DeadlineExceeded, not before the deadline, and the client gets
/// DEADLINE_EXCEEDED from the server (a hyper-util client: no local timer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_timeout_deadline_cancels_with_deadline_exceeded() {
    hard(async {
        let s = TestServer::start(Duration::from_secs(1), None).await;
        let origin: http::Uri = s.url().parse().unwrap();
        let mut c = DemoClient::with_origin(hyper_client(), origin);
        for (method, deadline_ms) in [("work", 150u64), ("block", 120)] {
            let mut r = req(5_000);
            r.metadata_mut()
                .insert("grpc-timeout", format!("{deadline_ms}m").parse().unwrap());
            let t0 = Instant::now();
            let res = if method == "work" {
                c.work(r).await
            } else {
                c.block(r).await
            };
            let took = t0.elapsed();
            let st = res.unwrap_err();
            assert_eq!(st.code(), Code::DeadlineExceeded, "{method}: {st:?}");
            assert!(
                took >= Duration::from_millis(deadline_ms),
                "{method} answered after {took:?}"
            );
            assert!(
                took < Duration::from_millis(deadline_ms + 2_000),
                "{method} answered after {took:?}"
            );
        }
        s.assert_all_freed().await;
        let st = s.stats();
        assert_eq!(
            (
                st.cancelled_deadline,
                st.cancelled_call,
                st.cancelled_channel_faulted
            ),
            (2, 0, 0),
            "{}",
            st.line()
        );
        assert_eq!(s.host.stats().cancelled(CancelReason::DeadlineExceeded), 2);
        drop(c);
        s.assert_drained().await;
    })
    .await
}

/// Malformed `grpc-timeout` values are ignored (no deadline, no panic);
/// valid ones in every unit work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_grpc_timeout_values_are_ignored() {
    hard(async {
        let s = TestServer::start(Duration::from_secs(1), None).await;
        let origin: http::Uri = s.url().parse().unwrap();
        let mut c = DemoClient::with_origin(hyper_client(), origin);
        for bad in [
            "",
            "m",
            "1",
            "123456789m",
            "-5m",
            "5x",
            "1.5S",
            "99999999999999999999H",
            " 5m",
            "5 m",
            "٣m",
            "0x10m",
        ] {
            let mut r = req(1);
            if let Ok(v) = bad.parse() {
                r.metadata_mut().insert("grpc-timeout", v);
            }
            let res = c.work(r).await;
            assert!(res.is_ok(), "grpc-timeout {bad:?}: {res:?}");
        }
        for good in ["99999999H", "1M", "10S", "1000m", "1000000u", "1000000000n"] {
            let mut r = req(1);
            r.metadata_mut()
                .insert("grpc-timeout", good.parse().unwrap());
            assert!(c.work(r).await.is_ok(), "{good}");
        }
        let mut r = req(1000);
        r.metadata_mut()
            .insert("grpc-timeout", "0n".parse().unwrap());
        assert_eq!(c.work(r).await.unwrap_err().code(), Code::DeadlineExceeded);
        s.assert_all_freed().await;
        assert_eq!(s.stats().cancelled_deadline, 1);
        drop(c);
        s.assert_drained().await;
    })
    .await
}

/// Opening and dropping connections (with and without calls, and raw TCP
/// connections that never speak HTTP) leaves the host with no channel,
/// nothing in flight and every call freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_churn_leaves_nothing_in_flight() {
    hard(async {
        let s = TestServer::start(Duration::from_secs(1), None).await;
        for i in 0..40u64 {
            let mut c = s.client().await;
            if i % 2 == 0 {
                assert!(c.work(req(0)).await.is_ok());
            } else {
                let t = tokio::spawn(async move { c.work(req(5_000)).await });
                tokio::time::sleep(Duration::from_millis(2)).await;
                t.abort();
            }
        }
        // Raw TCP connections that never speak HTTP.
        for _ in 0..20 {
            let c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
            drop(c);
        }
        s.assert_drained().await;
        s.assert_all_freed().await;
        assert_eq!(s.stats().in_flight, 0);
        let hs = s.host.stats();
        assert_eq!((hs.channels, hs.in_flight), (0, 0), "{hs:?}");
        // An aborted RPC may reach the server after its connection hit EOF:
        // its channel is faulted and refuses the call.
        assert!(hs.refused <= 20, "{hs:?}");
        // Each aborted RPC whose handler started was cancelled (a reset or
        // its connection's end, whichever came first); the core may count a
        // few more (calls begun whose handler never ran), at most one per
        // aborted RPC, and nothing else.
        let st = s.stats();
        assert_eq!(st.completed, 20, "{}", st.line());
        assert_eq!(
            st.cancelled_call + st.cancelled_channel_faulted,
            st.started - 20,
            "{}",
            st.line()
        );
        let core =
            hs.cancelled(CancelReason::CallCancelled) + hs.cancelled(CancelReason::ChannelFaulted);
        assert!(
            (st.started - 20..=20).contains(&core),
            "{hs:?} {}",
            st.line()
        );
    })
    .await
}
