//! axum behind callcancel-tower: an HTTP/1.1 client that disconnects while
//! its request runs faults its connection's channel, and the handler's call
//! is cancelled with `ChannelFaulted`.
//!
//! ```text
//! cargo run -p callcancel-tower --example axum_disconnect            # serve on 127.0.0.1:3000
//! cargo run -p callcancel-tower --example axum_disconnect -- --demo  # self-check, exits 0 on success
//! ```

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use callcancel_tower::cc::{CancelReason, ServiceHost};
use callcancel_tower::{http_status_for, CurrentCall, Server};
use tokio::io::AsyncWriteExt;

/// Cancel callbacks run, by reason: HostAbort, ChannelFaulted, CallCancelled, DeadlineExceeded.
#[derive(Default)]
struct Seen([AtomicU64; 4]);

/// `GET /sleep/{ms}`: sleeps, cancellably; answers 200, or the status of
/// the cancel reason (499 for a client gone, 504 for a deadline, 503 for a
/// host abort) if anyone is still there to read it.
async fn sleep(
    State(seen): State<Arc<Seen>>,
    Extension(call): Extension<CurrentCall>,
    Path(ms): Path<u64>,
) -> Result<String, StatusCode> {
    call.register_for_cancel(seen, |reason, seen| {
        let i = match reason {
            CancelReason::HostAbort => 0,
            CancelReason::ChannelFaulted => 1,
            CancelReason::CallCancelled => 2,
            _ => 3,
        };
        seen.0[i].fetch_add(1, SeqCst);
    })
    .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    call.run_until_cancelled(tokio::time::sleep(Duration::from_millis(ms)))
        .await
        .map_err(http_status_for)?;
    Ok(format!("slept {ms} ms\n"))
}

#[tokio::main]
async fn main() {
    let demo = std::env::args().any(|a| a == "--demo");
    let host = ServiceHost::new();
    let seen = Arc::new(Seen::default());
    let app = Router::new()
        .route("/sleep/{ms}", get(sleep))
        .with_state(Arc::clone(&seen));
    let port = if demo { 0 } else { 3000 };
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    println!("listening on {addr}");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server =
        tokio::spawn(
            Server::new(host.clone()).serve_with_shutdown(listener, app, async move {
                if demo {
                    let _ = stopped.await;
                } else {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }),
        );
    if demo {
        // An HTTP/1.1 request, then the client goes away mid-request.
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /sleep/10000 HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let t0 = std::time::Instant::now();
        while host.in_flight() == 0 && t0.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(tcp);
        while seen.0[1].load(SeqCst) == 0 && t0.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let counts: Vec<u64> = seen.0.iter().map(|c| c.load(SeqCst)).collect();
        println!("cancel callbacks [host_abort, channel_faulted, call, deadline] = {counts:?}");
        let _ = stop.send(());
    }
    let report = server.await.unwrap();
    println!("{report:?}, in flight {}", host.in_flight());
    if demo {
        let ok =
            seen.0[1].load(SeqCst) == 1 && seen.0.iter().map(|c| c.load(SeqCst)).sum::<u64>() == 1;
        std::process::exit(if ok && host.in_flight() == 0 { 0 } else { 1 });
    }
}
