//! A server-streaming call whose client drops the stream after k messages:
//! the response body is dropped early, the call is cancelled with
//! CallCancelled and the producer (a spawned task watching the call) stops.

mod common;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use callcancel_tower::cc::{CancelReason, ServiceHost};
use callcancel_tower::{CallLayer, CurrentCall, Server};
use common::*;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

#[derive(Default)]
struct Producer {
    produced: AtomicU64,
    stopped: Mutex<Option<Option<CancelReason>>>,
}

type Ticks = Pin<Box<dyn tokio_stream::Stream<Item = Result<WorkReply, Status>> + Send>>;

#[derive(Clone)]
struct TickSvc(Arc<Producer>);

impl tonic::server::ServerStreamingService<WorkRequest> for TickSvc {
    type Response = WorkReply;
    type ResponseStream = Ticks;
    type Future = std::future::Ready<Result<Response<Ticks>, Status>>;

    fn call(&mut self, req: Request<WorkRequest>) -> Self::Future {
        let call = req.extensions().get::<CurrentCall>().cloned().unwrap();
        // The producer holds the call: it stays in flight (and its
        // cancellation observable) until the producer stops.
        let every = Duration::from_millis(req.get_ref().millis);
        let p = Arc::clone(&self.0);
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            let call = call; // moved in: dropped when the producer stops
            let mut cancelled = std::pin::pin!(call.cancelled());
            let mut seq = 0;
            let reason = loop {
                tokio::select! {
                    r = &mut cancelled => break Some(r),
                    sent = tx.send(Ok(WorkReply { call_id: seq })) => {
                        if sent.is_err() { break None; }
                        p.produced.fetch_add(1, SeqCst);
                        seq += 1;
                    }
                }
                tokio::select! {
                    r = &mut cancelled => break Some(r),
                    _ = tokio::time::sleep(every) => {}
                }
            };
            *p.stopped.lock().unwrap() = Some(reason);
        });
        std::future::ready(Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_server_stream_stops_its_producer() {
    hard(async {
        let host = ServiceHost::new();
        let producer = Arc::new(Producer::default());
        let p = Arc::clone(&producer);
        let svc = tower::service_fn(move |r: http::Request<hyper::body::Incoming>| {
            let p = Arc::clone(&p);
            async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<
                    WorkReply,
                    WorkRequest,
                >::default());
                Ok::<_, Infallible>(grpc.server_streaming(TickSvc(p), r).await)
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(
            Server::with_layer(CallLayer::new(host.clone())).serve_with_shutdown(
                listener,
                svc,
                async {
                    let _ = rx.await;
                },
            ),
        );
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut grpc = tonic::client::Grpc::new(ch);
        grpc.ready().await.unwrap();
        let mut stream = grpc
            .server_streaming(
                Request::new(WorkRequest { millis: 5 }),
                http::uri::PathAndQuery::from_static("/test.Ticks/Ticks"),
                tonic_prost::ProstCodec::<WorkRequest, WorkReply>::default(),
            )
            .await
            .unwrap()
            .into_inner();
        const K: u64 = 5;
        for i in 0..K {
            let m = stream.next().await.unwrap().unwrap();
            assert_eq!(m.call_id, i);
        }
        assert_eq!(host.in_flight(), 1);
        drop(stream);
        wait_until(Duration::from_secs(5), || {
            producer.stopped.lock().unwrap().is_some()
        })
        .await;
        assert_eq!(
            *producer.stopped.lock().unwrap(),
            Some(Some(CancelReason::CallCancelled))
        );
        let n = producer.produced.load(SeqCst);
        assert!((K..K + 3).contains(&n), "produced {n}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(producer.produced.load(SeqCst), n, "producer still running");
        wait_until(Duration::from_secs(5), || host.in_flight() == 0).await;
        // The connection is still open: its channel stays, with no call.
        let hs = host.stats();
        assert_eq!((hs.channels, hs.in_flight), (1, 0), "{hs:?}");
        assert_eq!(hs.cancelled(CancelReason::CallCancelled), 1, "{hs:?}");
        drop(grpc);
        assert_host_drained(&host).await;
        tx.send(()).unwrap();
        let report = server.await.unwrap();
        assert!(report.graceful, "{report:?}");
    })
    .await
}
