//! Regression tests for the two demo bugs the 30-minute soak found
//! (`callcancel-soak`, issue 16):
//!
//! 1. A plain Relay (no deadline, no cancel) answered INTERNAL ("h2 protocol
//!    error") when its downstream hop restarted: the relay passed the
//!    downstream's transport error through. A hop that failed is
//!    UNAVAILABLE to the caller, whatever the downstream said.
//! 2. A burst of client cancels on one connection (an upstream hop's calls
//!    cancelled together and propagated as RST_STREAMs) made the server
//!    answer GOAWAY (hyper's rapid-reset guard, 20 pending-accept resets by
//!    default), failing every other call on that connection. The demo sets
//!    `MAX_PENDING_ACCEPT_RESET_STREAMS`.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use common::*;
use http::{HeaderValue, Request, Response};
use prost::Message;
use tokio::net::{TcpListener, TcpStream};
use tonic::Code;

/// A fake downstream: every request is answered at once with a trailers-only
/// gRPC response of status `code` and message `msg`.
async fn failing_downstream(code: Code, msg: &'static str) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let svc = hyper::service::service_fn(
                move |_req: Request<hyper::body::Incoming>| async move {
                    let mut rsp = Response::new(http_body_util::Empty::<bytes::Bytes>::new());
                    let h = rsp.headers_mut();
                    h.insert("content-type", HeaderValue::from_static("application/grpc"));
                    h.insert("grpc-status", HeaderValue::from(code as i32));
                    h.insert("grpc-message", HeaderValue::from_static(msg));
                    Ok::<_, Infallible>(rsp)
                },
            );
            tokio::spawn(async move {
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_maps_a_failed_downstream_to_unavailable() {
    hard(async {
        for (code, msg) in [
            (Code::Internal, "h2 protocol error"),
            (Code::Unknown, "transport error"),
            (Code::Cancelled, "operation was canceled"),
            (Code::Unavailable, "shutting down"),
        ] {
            let down = failing_downstream(code, msg).await;
            let a = TestServer::start(Duration::from_secs(1), Some(down)).await;
            let mut client = a.client().await;
            let status = client
                .relay(tonic::Request::new(WorkRequest { millis: 10 }))
                .await
                .expect_err("the downstream failed");
            assert_eq!(
                status.code(),
                Code::Unavailable,
                "downstream {code:?} became {status:?}"
            );
            assert!(status.message().contains(msg), "{status:?}");
            // A's own call was not cancelled: it freed it, with no reason.
            a.assert_all_freed().await;
            let st = a.stats();
            assert_eq!(st.started, 1, "{}", st.line());
            assert_eq!(
                st.cancelled_call
                    + st.cancelled_deadline
                    + st.cancelled_channel_faulted
                    + st.cancelled_host_abort,
                0,
                "{}",
                st.line()
            );
        }
    })
    .await;
}

/// One gRPC request frame: the 5-byte prefix and the message.
fn grpc_frame(msg: &impl Message) -> bytes::Bytes {
    let body = msg.encode_to_vec();
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(0);
    out.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
    out.extend_from_slice(&body);
    out.into()
}

fn grpc_request(addr: std::net::SocketAddr, method: &str) -> Request<()> {
    Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/callcancel.demo.Demo/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_burst_does_not_fail_other_calls_on_the_connection() {
    const BURST: usize = 1000;
    hard(async {
        let a = TestServer::start(Duration::from_secs(1), None).await;
        let tcp = TcpStream::connect(a.addr).await.unwrap();
        let (h2, conn) = h2::client::Builder::new()
            .max_concurrent_reset_streams(BURST * 2)
            .handshake::<_, bytes::Bytes>(tcp)
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        let mut h2 = h2.ready().await.unwrap();

        // A call that outlives the burst, on the same connection.
        let (long, mut body) = h2
            .send_request(grpc_request(a.addr, "Work"), false)
            .unwrap();
        body.send_data(grpc_frame(&WorkRequest { millis: 500 }), true)
            .unwrap();
        wait_until(Duration::from_secs(5), || {
            a.counters()
                .started
                .load(std::sync::atomic::Ordering::SeqCst)
                == 1
        })
        .await;

        // The burst: each stream's HEADERS and RST_STREAM(CANCEL) leave in
        // the same write, before the server accepted the stream.
        for _ in 0..BURST {
            h2 = h2.ready().await.unwrap();
            let (_rsp, mut stream) = h2
                .send_request(grpc_request(a.addr, "Block"), false)
                .unwrap();
            stream.send_reset(h2::Reason::CANCEL);
        }

        // The long call still completes OK: the connection was not torn down.
        let rsp = long.await.expect("the long call's response headers");
        assert_eq!(rsp.status(), 200);
        let mut body = rsp.into_body();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.expect("the long call's body");
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        let trailers = body
            .trailers()
            .await
            .expect("the long call's trailers")
            .expect("trailers");
        assert_eq!(
            trailers.get("grpc-status").map(HeaderValue::as_bytes),
            Some(&b"0"[..]),
            "{trailers:?}"
        );
        assert_eq!(
            a.counters()
                .completed
                .load(std::sync::atomic::Ordering::SeqCst),
            1
        );
        drop(h2);
        conn.abort();
    })
    .await;
}
