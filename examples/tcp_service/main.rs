//! A real service on callcancel: a tokio TCP server on loopback where each
//! connection is a `Channel` and each request line is a `Call`.
//!
//! A client that closes or resets its connection faults its channel: its
//! pending calls are cancelled with `ChannelFaulted`, other connections are
//! untouched. `SHUTDOWN <ms>` closes the host gracefully (the rest is aborted
//! at the deadline, `HostAbort`); Ctrl-C or SIGTERM aborts the host, waits for
//! it to be idle, prints the final stats and exits 0. The protocol is in
//! `server.rs`.
//!
//! ```sh
//! cargo run --example tcp_service -- --port 7878   # then: nc 127.0.0.1 7878
//! cargo run --example tcp_service -- --demo        # server and clients in one process
//! ```
//!
//! `--demo` starts the server on a free port and its own clients: some
//! finish, one closes and one resets its connection mid-call, then an
//! operator shuts the host down with a short timeout. It prints a summary
//! table and exits 1 if any count is off.

mod server;

use std::error::Error;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use server::{Client, Exit, Server, Stats};

const USAGE: &str = "usage: tcp_service [--port PORT] [--demo]
  --port PORT  listen on 127.0.0.1:PORT (default 7878; 0 picks a free port)
  --demo       run the server with its own clients on a free port and print a summary";

/// Only a hang detector for the demo; correctness rests on counts.
const DEMO_DEADLINE: Duration = Duration::from_secs(30);

#[tokio::main]
async fn main() -> ExitCode {
    let mut port = 7878u16;
    let mut demo_mode = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => match args.next().map(|p| p.parse()) {
                Some(Ok(p)) => port = p,
                _ => return usage("--port wants a number 0..=65535"),
            },
            "--demo" => demo_mode = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => return usage(&format!("unknown argument {other:?}")),
        }
    }
    let result = if demo_mode {
        match tokio::time::timeout(DEMO_DEADLINE, demo()).await {
            Ok(result) => result,
            Err(_) => Err("the demo hung (deadline passed)".into()),
        }
    } else {
        serve(port).await.map(|()| true)
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("tcp_service: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage(why: &str) -> ExitCode {
    eprintln!("tcp_service: {why}\n{USAGE}");
    ExitCode::from(2)
}

/// Serves until `SHUTDOWN`, Ctrl-C or SIGTERM.
async fn serve(port: u16) -> Result<(), Box<dyn Error>> {
    let server = Server::bind(port).await?;
    println!("listening on {}", server.local_addr());
    let handle = server.handle();
    let mut run = tokio::spawn(server.run());
    let exit = tokio::select! {
        exit = &mut run => exit?,
        signal = shutdown_signal() => {
            println!("{signal}: aborting the host");
            handle.abort();
            run.await?
        }
    };
    println!("{exit}");
    println!("final stats: {}", handle.stats());
    Ok(())
}

/// Resolves with the name of the first of SIGINT (Ctrl-C) and SIGTERM.
async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}

/// One row of the demo's story.
struct Row {
    client: &'static str,
    did: String,
    got: String,
}

/// Reads replies until end of stream.
async fn drain(client: &mut Client) -> Result<Vec<String>, Box<dyn Error>> {
    let mut lines = Vec::new();
    while let Some(line) = client.recv().await? {
        lines.push(line);
    }
    Ok(lines)
}

async fn demo() -> Result<bool, Box<dyn Error>> {
    let t0 = Instant::now();
    let server = Server::bind(0).await?;
    let addr: SocketAddr = server.local_addr();
    println!("listening on {addr}");
    let handle = server.handle();
    let run = tokio::spawn(server.run());
    let mut rows = Vec::new();

    // A: three calls pipelined on one connection; they finish, and the
    // replies come in completion order.
    let mut a = Client::connect(addr).await?;
    for request in ["WORK 300", "BLOCK 150", "WORK 10"] {
        a.send(request).await?;
    }

    // B: two calls that would run for ten minutes, then B closes its
    // connection. STATS first, so both calls are known to be in flight.
    let mut b = Client::connect(addr).await?;
    b.send("WORK 600000").await?;
    b.send("BLOCK 600000").await?;
    b.stats(&mut Vec::new()).await?;
    drop(b);
    // C: one long blocking call, then a reset (RST).
    let mut c = Client::connect(addr).await?;
    c.send("BLOCK 600000").await?;
    c.stats(&mut Vec::new()).await?;
    c.reset()?;
    handle
        .wait_for(|s| s.cancelled_channel_faulted == 3 && s.channels_open == 1)
        .await;
    rows.push(Row {
        client: "B",
        did: "WORK 600000, BLOCK 600000; closes".into(),
        got: "its 2 calls cancelled: channel faulted".into(),
    });
    rows.push(Row {
        client: "C",
        did: "BLOCK 600000; resets (RST)".into(),
        got: "its call cancelled: channel faulted".into(),
    });

    let mut got_a = Vec::new();
    for _ in 0..3 {
        got_a.push(a.recv().await?.ok_or("A: connection closed early")?);
    }
    rows.insert(
        0,
        Row {
            client: "A",
            did: "WORK 300, BLOCK 150, WORK 10 (ids 1-3)".into(),
            got: format!("{} (completion order)", got_a.join(", ")),
        },
    );

    // D: two long calls and a short one, then the operator shuts down with a
    // one-second timeout: the short call finishes, the long ones are aborted.
    let mut d = Client::connect(addr).await?;
    d.send("WORK 600000").await?;
    d.send("BLOCK 600000").await?;
    d.send("WORK 200").await?;
    let mut early = Vec::new();
    d.stats(&mut early).await?;
    let mut operator = Client::connect(addr).await?;
    operator.send("SHUTDOWN 1000").await?;
    let ok = operator.recv().await?.ok_or("operator: no reply")?;
    // After OK the host refuses new calls and connections.
    d.send("WORK 0").await?;
    let mut late = Client::connect(addr).await?;
    let late_reply = drain(&mut late).await?;
    let mut got_d = early;
    got_d.extend(drain(&mut d).await?);
    let exit = run.await?;
    let elapsed = t0.elapsed();
    rows.push(Row {
        client: "D",
        did: "WORK 600000, BLOCK 600000, WORK 200; after OK: WORK 0 (id 5)".into(),
        got: format!("{}; the long calls: aborted (host abort)", got_d.join(", ")),
    });
    rows.push(Row {
        client: "E",
        did: "SHUTDOWN 1000".into(),
        got: ok,
    });
    rows.push(Row {
        client: "F",
        did: "connects after the shutdown began".into(),
        got: late_reply.join(", "),
    });

    // What the clients saw decides what the counters must say. D's short
    // call normally finishes inside the shutdown's second; on a machine too
    // slow for that it is aborted with the long ones.
    let short_done = u64::from(got_d.iter().any(|l| l == "DONE 3"));
    let stats = handle.stats();
    let expected = Stats {
        in_flight: 0,
        started: 9,
        completed: 3 + short_done,
        cancelled_host_abort: 3 - short_done,
        cancelled_channel_faulted: 3,
        freed: 9,
        callbacks: 6 - short_done,
        refused: 2,
        channels_open: 0,
    };
    let mut failures = Vec::new();
    if got_a.iter().filter(|l| l.starts_with("DONE ")).count() != 3 {
        failures.push("A did not get three DONE replies");
    }
    if !got_d.iter().any(|l| l.starts_with("ERR 5 refused: ")) {
        failures.push("D's request after the shutdown was not refused");
    }
    if !late_reply.iter().any(|l| l.starts_with("ERR 0 refused: ")) {
        failures.push("the late connection was not refused");
    }
    if stats != expected {
        failures.push("a count is off");
    }
    if exit != Exit::CloseTimedOut {
        failures.push("the close did not time out");
    }

    println!();
    println!("tcp_service demo: server and six clients on {addr}");
    println!();
    println!("{:<6} {:<62} got", "client", "did");
    for row in &rows {
        println!("{:<6} {:<62} {}", row.client, row.did, row.got);
    }
    println!();
    println!("{:<26} {:>6} {:>9}", "counter", "final", "expected");
    for ((key, value), (_, want)) in stats.pairs().zip(expected.pairs()) {
        let mark = if value == want { "" } else { "  <-- off" };
        println!("{key:<26} {value:>6} {want:>9}{mark}");
    }
    println!();
    println!("server: {exit}; host {:?}", handle.host_state());
    println!("demo took {} ms", elapsed.as_millis());
    for failure in &failures {
        println!("FAILED: {failure}");
    }
    let ok = failures.is_empty();
    if ok {
        println!(
            "all counts match: every call finished or was cancelled once, and every state was freed"
        );
    }
    Ok(ok)
}
