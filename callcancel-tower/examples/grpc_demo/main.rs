//! The callcancel demo gRPC service (`callcancel.demo.Demo`), see DESIGN.md.
//!
//! ```text
//! cargo run -p callcancel-tower --example grpc_demo -- --port 0 [--next HOST:PORT] [--close-timeout-ms 1000]
//! ```
//!
//! Prints `listening on 127.0.0.1:PORT` first; on SIGTERM or Ctrl-C shuts
//! down (begin close, GOAWAY, wait up to the close timeout, abort), prints
//! the counters as `name=value` pairs on one line and exits 0 iff every
//! started call was freed exactly once.

mod demo;

use std::io::Write;
use std::time::{Duration, Instant};

use callcancel_tower::cc::ServiceHost;
use callcancel_tower::Server;
use demo::{Demo, DemoServer};

struct Args {
    port: u16,
    next: Option<String>,
    close_timeout: Duration,
}

fn usage(msg: &str) -> ! {
    eprintln!(
        "grpc_demo: {msg}\nusage: grpc_demo [--port N] [--next HOST:PORT] [--close-timeout-ms N]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        port: 0,
        next: None,
        close_timeout: Duration::from_millis(1000),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--port" => a.port = val().parse().unwrap_or_else(|_| usage("bad --port")),
            "--next" => a.next = Some(val()),
            "--close-timeout-ms" => {
                a.close_timeout = Duration::from_millis(
                    val()
                        .parse()
                        .unwrap_or_else(|_| usage("bad --close-timeout-ms")),
                )
            }
            "-h" | "--help" => usage("help"),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    a
}

async fn signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .init();
    }
    let host = ServiceHost::new();
    let demo = Demo::new(host.clone(), args.next.as_deref());
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port))
        .await
        .unwrap_or_else(|e| usage(&format!("bind: {e}")));
    let port = listener.local_addr().expect("local addr").port();
    // Install the signal handlers before announcing the port.
    let sig = signal();
    println!("listening on 127.0.0.1:{port}");
    std::io::stdout().flush().ok();
    let report = Server::new(host)
        .close_timeout(args.close_timeout)
        .max_pending_accept_reset_streams(demo::MAX_PENDING_ACCEPT_RESET_STREAMS)
        .serve_with_shutdown(listener, DemoServer::new(demo.clone()), sig)
        .await;
    // Free-states may run on a canceller's thread just after the last call
    // left the host: give them a moment.
    let t0 = Instant::now();
    let c = &demo.counters;
    while c.freed.load(std::sync::atomic::Ordering::SeqCst)
        < c.started.load(std::sync::atomic::Ordering::SeqCst)
        && t0.elapsed() < Duration::from_secs(1)
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stats = demo.stats();
    println!("{}", stats.line());
    std::io::stdout().flush().ok();
    eprintln!("grpc_demo: {report:?}");
    let ok = stats.started == stats.freed && stats.in_flight == 0;
    std::process::exit(if ok { 0 } else { 1 })
}
