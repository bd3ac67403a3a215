//! HTTP/1.1 through axum: a client that disconnects mid-request faults its
//! connection's channel (ChannelFaulted), other connections' calls finish;
//! HTTP statuses follow the cancel reason.

mod common;

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Extension, Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use callcancel_tower::cc::{CancelReason, ServiceHost};
use callcancel_tower::{
    http_status_for, CallLayer, CallListener, ConnectionChannel, CurrentCall, Server,
};
use common::{assert_host_drained, hard, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Default)]
struct Seen {
    faulted: AtomicU64,
    other: AtomicU64,
}

async fn sleep(
    State(seen): State<Arc<Seen>>,
    Extension(call): Extension<CurrentCall>,
    Path(ms): Path<u64>,
) -> Result<String, StatusCode> {
    call.register_for_cancel(seen, |reason, seen| {
        match reason {
            CancelReason::ChannelFaulted => &seen.faulted,
            _ => &seen.other,
        }
        .fetch_add(1, SeqCst);
    })
    .unwrap();
    call.run_until_cancelled(tokio::time::sleep(Duration::from_millis(ms)))
        .await
        .map_err(http_status_for)?;
    Ok("done".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_disconnect_faults_the_channel() {
    hard(async {
        let host = ServiceHost::new();
        let seen = Arc::new(Seen::default());
        let app = Router::new()
            .route("/sleep/{ms}", get(sleep))
            .with_state(Arc::clone(&seen));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(
            Server::with_layer(
                CallLayer::new(host.clone()).default_timeout(Duration::from_secs(20)),
            )
            .serve_with_shutdown(listener, app, async move {
                let _ = stopped.await;
            }),
        );
        let mut gone = tokio::net::TcpStream::connect(addr).await.unwrap();
        gone.write_all(b"GET /sleep/10000 HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut stays = tokio::net::TcpStream::connect(addr).await.unwrap();
        stays
            .write_all(b"GET /sleep/300 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        wait_until(Duration::from_secs(5), || host.in_flight() == 2).await;
        drop(gone);
        wait_until(Duration::from_secs(5), || seen.faulted.load(SeqCst) == 1).await;
        let mut resp = String::new();
        stays.read_to_string(&mut resp).await.unwrap();
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert_eq!(seen.other.load(SeqCst), 0);
        wait_until(Duration::from_secs(5), || host.in_flight() == 0).await;
        // Both connections are gone (one dropped, one closed after its
        // response): no channel is left.
        drop(stays);
        assert_host_drained(&host).await;
        assert_eq!(host.stats().cancelled(CancelReason::ChannelFaulted), 1);
        // The status a deadline maps to.
        let _ = stop.send(());
        assert!(server.await.unwrap().graceful);
        assert_eq!(http_status_for(CancelReason::DeadlineExceeded), 504);
    })
    .await
}

/// `axum::serve` with `CallListener`: each connection is a channel (found
/// through axum's connect info), a disconnect faults it, axum's
/// `ConnectInfo<SocketAddr>` still works, and no channel is left after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_serve_with_call_listener() {
    hard(async {
        let host = ServiceHost::new();
        let seen = Arc::new(Seen::default());
        let app = Router::new()
            .route("/sleep/{ms}", get(sleep))
            .route(
                "/peer",
                get(
                    |ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>| async move {
                        peer.ip().to_string()
                    },
                ),
            )
            .with_state(Arc::clone(&seen))
            .layer(CallLayer::new(host.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serve = axum::serve(
            CallListener::new(host.clone(), listener),
            app.into_make_service_with_connect_info::<ConnectionChannel>(),
        );
        let server = tokio::spawn(async move { serve.await });
        let mut gone = tokio::net::TcpStream::connect(addr).await.unwrap();
        gone.write_all(b"GET /sleep/10000 HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut stays = tokio::net::TcpStream::connect(addr).await.unwrap();
        stays
            .write_all(b"GET /peer HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut resp = String::new();
        stays.read_to_string(&mut resp).await.unwrap();
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert!(resp.ends_with("127.0.0.1"), "{resp}");
        wait_until(Duration::from_secs(5), || host.in_flight() == 1).await;
        // Two connections were channels (the closed one may be gone already).
        assert!(host.stats().channels >= 1);
        drop(gone);
        wait_until(Duration::from_secs(5), || seen.faulted.load(SeqCst) == 1).await;
        assert_eq!(seen.other.load(SeqCst), 0);
        drop(stays);
        assert_host_drained(&host).await;
        let hs = host.stats();
        assert_eq!(hs.cancelled(CancelReason::ChannelFaulted), 1, "{hs:?}");
        assert_eq!(hs.refused, 0, "{hs:?}");
        server.abort();
    })
    .await
}
