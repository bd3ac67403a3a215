//! A tiny client for the `grpc_demo` example.
//!
//! ```text
//! cargo run -p callcancel-tower --example demo_client -- 127.0.0.1:PORT work|block|relay MILLIS [TIMEOUT_MS]
//! cargo run -p callcancel-tower --example demo_client -- 127.0.0.1:PORT stats
//! ```
//! Prints the reply (or the status) on one line; exits 0 on OK.

#[path = "grpc_demo/demo.rs"]
mod demo;

use std::time::Duration;

use demo::{DemoClient, WorkRequest};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!(
            "usage: demo_client HOST:PORT work|block|relay MILLIS [TIMEOUT_MS] | HOST:PORT stats"
        );
        std::process::exit(2);
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", args[0]))
        .expect("address")
        .connect()
        .await
        .unwrap_or_else(|e| {
            eprintln!("connect: {e}");
            std::process::exit(1)
        });
    let mut client = DemoClient::new(channel);
    let result = match args[1].as_str() {
        "stats" => client.stats().await.map(|s| s.line()),
        m => {
            let millis = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(0);
            let mut req = tonic::Request::new(WorkRequest { millis });
            if let Some(t) = args.get(3).and_then(|s| s.parse().ok()) {
                req.set_timeout(Duration::from_millis(t));
            }
            let r = match m {
                "work" => client.work(req).await,
                "block" => client.block(req).await,
                "relay" => client.relay(req).await,
                _ => {
                    eprintln!("unknown method {m}");
                    std::process::exit(2)
                }
            };
            r.map(|r| format!("ok call_id={}", r.get_ref().call_id))
        }
    };
    match result {
        Ok(line) => println!("{line}"),
        Err(s) => {
            println!("status={:?} message={}", s.code(), s.message());
            std::process::exit(1)
        }
    }
}
