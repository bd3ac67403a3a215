//! tonic's own `Server` with one channel per connection: `CallIncoming`
//! around tonic's `TcpIncoming`, `CallLayer` as a server layer, and the
//! connect info (`CallIo`'s `Connected`) carrying each connection's channel.

mod common;

use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use callcancel_tower::cc::{CancelReason, ServiceHost};
use callcancel_tower::{CallIncoming, CallLayer};
use common::*;
use tonic::transport::server::{TcpConnectInfo, TcpIncoming};

fn req(millis: u64) -> tonic::Request<WorkRequest> {
    tonic::Request::new(WorkRequest { millis })
}

/// A client reset (RST_STREAM) cancels exactly that call with
/// CallCancelled; its sibling on the same connection finishes OK; the
/// connection is one channel, gone once the client is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tonic_server_client_reset_cancels_only_that_call() {
    hard(async {
        let host = ServiceHost::new();
        let demo = Demo::new(host.clone(), None);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = CallIncoming::new(host.clone(), TcpIncoming::from(listener));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // Behind CallLayer, the transport's own connect info is still there
        // (tonic's `Request::remote_addr` reads it).
        let peers = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&peers);
        let stack = tower::ServiceBuilder::new()
            .layer(CallLayer::new(host.clone()))
            .map_request(move |r: http::Request<tonic::body::Body>| {
                let peer = r
                    .extensions()
                    .get::<TcpConnectInfo>()
                    .and_then(|i| i.remote_addr());
                seen.lock().unwrap().push(peer);
                r
            });
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .layer(stack)
                .add_routes(tonic::service::Routes::new(DemoServer::new(demo.clone())))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                }),
        );
        let client = DemoClient::new(
            tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
        let mut a = client.clone();
        let victim = tokio::spawn(async move { a.work(req(10_000)).await });
        let mut b = client.clone();
        let sibling = tokio::spawn(async move { b.work(req(300)).await });
        wait_until(Duration::from_secs(5), || {
            demo.counters.started.load(SeqCst) == 2
        })
        .await;
        // Both calls are on the connection's channel, not host-scope.
        let hs = host.stats();
        assert_eq!((hs.channels, hs.in_flight), (1, 2), "{hs:?}");
        victim.abort();
        wait_until(Duration::from_secs(5), || {
            demo.counters.call.load(SeqCst) == 1
        })
        .await;
        let r = sibling.await.unwrap();
        assert!(r.is_ok(), "{r:?}");
        wait_until(Duration::from_secs(5), || {
            demo.counters.freed.load(SeqCst) == 2
        })
        .await;
        let st = demo.stats();
        assert_eq!(
            (
                st.cancelled_call,
                st.cancelled_channel_faulted,
                st.cancelled_deadline,
                st.cancelled_host_abort,
                st.completed
            ),
            (1, 0, 0, 0, 1),
            "{}",
            st.line()
        );
        let hs = host.stats();
        assert_eq!((hs.channels, hs.in_flight), (1, 0), "{hs:?}");
        assert_eq!(hs.cancelled(CancelReason::CallCancelled), 1, "{hs:?}");
        drop(client);
        assert_host_drained(&host).await;
        let peers = peers.lock().unwrap().clone();
        assert_eq!(peers.len(), 2);
        assert!(
            peers
                .iter()
                .all(|p| p.is_some_and(|a| a.ip().is_loopback())),
            "{peers:?}"
        );
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    })
    .await
}
