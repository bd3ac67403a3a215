//! Propagation across hops: a chain of three demo servers A → B → C (Relay
//! with `--next`), unwound end to end by a client cancel, a client deadline
//! and an abort of A; a detached outgoing call survives its caller's cancel.

mod common;

use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use callcancel_tower::cc::{CancelReason, ServiceHost};
use callcancel_tower::{detached, CurrentCall, Detached, PropagateLayer};
use common::*;
use tonic::Code;
use tower::Layer;

fn req(millis: u64) -> tonic::Request<WorkRequest> {
    tonic::Request::new(WorkRequest { millis })
}

struct Chain {
    a: TestServer,
    b: TestServer,
    c: TestServer,
}

impl Chain {
    async fn start() -> Self {
        let c = TestServer::start(Duration::from_secs(1), None).await;
        let b = TestServer::start(Duration::from_secs(1), Some(c.addr)).await;
        let a = TestServer::start(Duration::from_secs(1), Some(b.addr)).await;
        Self { a, b, c }
    }

    fn servers(&self) -> [&TestServer; 3] {
        [&self.a, &self.b, &self.c]
    }

    /// Waits until the relay reached C (every hop started its call).
    async fn wait_started(&self) {
        wait_until(Duration::from_secs(5), || {
            self.servers()
                .iter()
                .all(|s| s.counters().started.load(SeqCst) == 1)
        })
        .await;
    }

    /// Every hop cancelled its call once, with a reason in `allowed`
    /// (A with `first`), and freed it; none completed OK.
    async fn wait_unwound(&self, first: CancelReason, allowed: &[CancelReason]) {
        wait_until(Duration::from_secs(5), || {
            self.servers()
                .iter()
                .all(|s| s.counters().callbacks.load(SeqCst) == 1)
        })
        .await;
        assert_eq!(
            self.a.counters().cancelled(first),
            1,
            "A: {}",
            self.a.stats().line()
        );
        for s in [&self.b, &self.c] {
            let n: u64 = allowed.iter().map(|r| s.counters().cancelled(*r)).sum();
            assert_eq!(n, 1, "{}", s.stats().line());
        }
        self.wait_freed().await;
    }

    /// Every hop's call ended (freed), none completed OK, each callback ran
    /// at most once.
    async fn wait_freed(&self) {
        for s in self.servers() {
            s.assert_all_freed().await;
            let st = s.stats();
            assert_eq!(st.completed, 0, "{}", st.line());
            assert!(s.counters().callbacks.load(SeqCst) <= 1, "{}", st.line());
            wait_until(Duration::from_secs(5), || s.host.in_flight() == 0).await;
            assert_eq!(s.host.stats().in_flight, 0);
        }
    }

    /// Shuts the hops down in order (A's downstream connection goes with
    /// B's shutdown, and so on): then no hop has a channel or a call left.
    async fn finish(mut self) {
        for s in [&mut self.a, &mut self.b, &mut self.c] {
            s.shutdown().await;
            s.assert_drained().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cancel_unwinds_the_chain() {
    hard(async {
        let ch = Chain::start().await;
        // Keep a handle: the connection must outlive the aborted RPC (else
        // the disconnect races the reset and A sees ChannelFaulted).
        let client = ch.a.client().await;
        let mut c = client.clone();
        let t = tokio::spawn(async move { c.relay(req(10_000)).await });
        ch.wait_started().await;
        t.abort();
        ch.wait_unwound(CancelReason::CallCancelled, &[CancelReason::CallCancelled])
            .await;
        drop(client);
        ch.finish().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_deadline_unwinds_the_chain() {
    hard(async {
        let ch = Chain::start().await;
        let origin: http::Uri = ch.a.url().parse().unwrap();
        let mut client = DemoClient::with_origin(hyper_client(), origin);
        let mut r = req(10_000);
        r.metadata_mut()
            .insert("grpc-timeout", "300m".parse().unwrap());
        let t0 = Instant::now();
        let st = client.relay(r).await.unwrap_err();
        assert!(t0.elapsed() >= Duration::from_millis(300));
        assert_eq!(st.code(), Code::DeadlineExceeded, "{st:?}");
        // B and C got A's remaining time as their own grpc-timeout (never
        // shorter), so A's deadline passes first. What the core guarantees
        // and the test checks: every hop's call is cancelled exactly once,
        // A's with DeadlineExceeded (its timer), B's and C's with
        // DeadlineExceeded (their own timer) or CallCancelled (the upstream
        // reset their stream first); none completes OK; every call is freed
        // within a bound (C would run 10 s otherwise). A tonic client that
        // enforces the propagated grpc-timeout itself cannot let a hop
        // finish first: `Propagate` holds a result that arrives after the
        // deadline until the hop's own timer has cancelled its call.
        ch.wait_unwound(
            CancelReason::DeadlineExceeded,
            &[CancelReason::DeadlineExceeded, CancelReason::CallCancelled],
        )
        .await;
        for s in ch.servers() {
            let c = s.counters();
            assert_eq!(
                (c.host_abort.load(SeqCst), c.channel_faulted.load(SeqCst)),
                (0, 0),
                "{}",
                s.stats().line()
            );
            // The core counted the same decisions.
            let hs = s.host.stats();
            assert_eq!(
                hs.cancelled(CancelReason::DeadlineExceeded)
                    + hs.cancelled(CancelReason::CallCancelled),
                1,
                "{hs:?}"
            );
        }
        assert!(
            t0.elapsed() < Duration::from_millis(300 + 1_000),
            "{:?}",
            t0.elapsed()
        );
        drop(client);
        ch.finish().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_of_the_first_server_unwinds_the_chain() {
    hard(async {
        let ch = Chain::start().await;
        let mut client = ch.a.client().await;
        let t = tokio::spawn(async move { client.relay(req(10_000)).await });
        ch.wait_started().await;
        ch.a.host.abort();
        let st = t.await.unwrap().unwrap_err();
        assert_eq!(st.code(), Code::Unavailable, "{st:?}");
        ch.wait_unwound(CancelReason::HostAbort, &[CancelReason::CallCancelled])
            .await;
        ch.finish().await;
    })
    .await
}

/// Outgoing calls made while serving a call: an attached one is reset when
/// the call is cancelled, detached ones (the `Detached` extension, the
/// `detached` scope) run to completion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_calls_survive_their_callers_cancel() {
    hard(async {
        let s = TestServer::start(Duration::from_secs(1), None).await;
        let client = DemoClient::new(PropagateLayer.layer(s.channel().await));
        let host = ServiceHost::new();
        let cur = CurrentCall::new(
            host.begin_call().unwrap(),
            http::Uri::from_static("/upstream"),
        );
        let canceller = cur.canceller();
        let (mut c1, mut c2, mut c3) = (client.clone(), client.clone(), client.clone());
        let (attached, by_scope, by_ext, _) = cur
            .scope(async move {
                let mut r3 = req(300);
                r3.extensions_mut().insert(Detached);
                tokio::join!(
                    c1.work(req(300)),
                    detached(c2.work(req(300))),
                    c3.work(r3),
                    async {
                        tokio::time::sleep(Duration::from_millis(80)).await;
                        assert!(canceller.cancel());
                    }
                )
            })
            .await;
        assert_eq!(attached.unwrap_err().code(), Code::Cancelled);
        assert!(by_scope.is_ok(), "{by_scope:?}");
        assert!(by_ext.is_ok(), "{by_ext:?}");
        assert_eq!(cur.cancel_reason(), Some(CancelReason::CallCancelled));
        s.assert_all_freed().await;
        let st = s.stats();
        assert_eq!((st.cancelled_call, st.completed), (1, 2), "{}", st.line());
    })
    .await
}
