//! The `tcp_service` example's server, run in-process on an ephemeral
//! loopback port and driven by real TCP clients.
//!
//! Correctness rests on replies and counters; every timeout here is only a
//! hang guard.

#[path = "../examples/tcp_service/server.rs"]
mod server;

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use callcancel::HostState;
use server::{Client, Exit, Handle, Server, Stats, MAX_CALLS_PER_CONNECTION, MAX_LINE};
use tokio::task::JoinHandle;

/// Only reached when a test is about to fail.
const GUARD: Duration = Duration::from_secs(20);
/// Long enough that a call never finishes by itself during a test.
const FOREVER: &str = "600000";

async fn guard<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(GUARD, fut).await {
        Ok(out) => out,
        Err(_) => panic!("hang guard: {what} took over {GUARD:?}"),
    }
}

async fn start() -> (SocketAddr, Handle, JoinHandle<Exit>) {
    let server = Server::bind(0).await.expect("bind 127.0.0.1:0");
    let addr = server.local_addr();
    assert!(addr.ip().is_loopback(), "{addr}");
    assert_ne!(addr.port(), 0);
    let handle = server.handle();
    (addr, handle, tokio::spawn(server.run()))
}

async fn finish(run: JoinHandle<Exit>) -> Exit {
    guard("server exit", run).await.expect("server panicked")
}

async fn connect(addr: SocketAddr) -> Client {
    guard("connect", Client::connect(addr))
        .await
        .expect("connect")
}

async fn send(client: &mut Client, request: &str) -> u64 {
    client.send(request).await.expect("send")
}

async fn recv(client: &mut Client) -> String {
    guard("a reply", client.recv())
        .await
        .expect("read")
        .expect("a reply, not end of stream")
}

/// Reads until the server closes the connection.
async fn read_to_close(client: &mut Client) -> Vec<String> {
    let mut lines = Vec::new();
    while let Ok(Some(line)) = guard("end of stream", client.recv()).await {
        lines.push(line);
    }
    lines
}

async fn stats(client: &mut Client, other: &mut Vec<String>) -> Stats {
    guard("STATS", client.stats(other)).await.expect("STATS")
}

async fn wait_for(handle: &Handle, what: &str, pred: impl FnMut(&Stats) -> bool) -> Stats {
    guard(what, handle.wait_for(pred)).await
}

/// Every begun call was counted once as completed or cancelled, and freed.
fn assert_balanced(s: &Stats) {
    assert_eq!(s.in_flight, 0, "{s}");
    assert_eq!(
        s.started,
        s.completed + s.cancelled_host_abort + s.cancelled_channel_faulted,
        "{s}"
    );
    assert_eq!(s.freed, s.started, "{s}");
    assert_eq!(s.channels_open, 0, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_of_one_connection_run_concurrently_and_stats_answers_at_once() {
    let (addr, handle, run) = start().await;
    let mut c = connect(addr).await;
    assert_eq!(send(&mut c, &format!("BLOCK {FOREVER}")).await, 1);
    assert_eq!(send(&mut c, &format!("WORK {FOREVER}")).await, 2);
    assert_eq!(send(&mut c, "WORK 0").await, 3);
    let mut other = Vec::new();
    // STATS (id 4) answers while calls 1 and 2 still run.
    let s = stats(&mut c, &mut other).await;
    assert_eq!(s.started, 3, "{s}");
    assert!((2..=3).contains(&s.in_flight), "{s}");
    assert_eq!(s.channels_open, 1, "{s}");
    // Call 3 answers although 1 and 2, begun before it, have not.
    if other.is_empty() {
        other.push(recv(&mut c).await);
    }
    assert_eq!(other, ["DONE 3"]);

    handle.abort();
    assert_eq!(finish(run).await, Exit::Aborted);
    assert_eq!(handle.host_state(), HostState::Closed); // abort, then close
                                                        // Cancelled calls answer nothing; the server closes the connection.
    assert_eq!(read_to_close(&mut c).await, Vec::<String>::new());
    let s = handle.stats();
    assert_balanced(&s);
    assert_eq!((s.completed, s.cancelled_host_abort), (1, 2), "{s}");
    assert_eq!((s.cancelled_channel_faulted, s.callbacks), (0, 2), "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_only_its_own_calls_with_channel_faulted() {
    let (addr, handle, run) = start().await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut c = connect(addr).await;
        send(&mut c, &format!("BLOCK {FOREVER}")).await;
        send(&mut c, &format!("WORK {FOREVER}")).await;
        assert!(stats(&mut c, &mut Vec::new()).await.started >= 2);
        clients.push(c);
    }
    let mut stays = clients.pop().unwrap();
    let resets = clients.pop().unwrap();
    let closes = clients.pop().unwrap();
    let s = handle.stats();
    assert_eq!((s.started, s.in_flight, s.channels_open), (6, 6, 3), "{s}");

    // A client that closes its connection: its two calls, and only they, are
    // cancelled with ChannelFaulted.
    drop(closes);
    let s = wait_for(&handle, "close to fault the channel", |s| {
        s.channels_open == 2 && s.in_flight == 4
    })
    .await;
    assert_eq!(s.cancelled_channel_faulted, 2, "{s}");
    assert_eq!((s.completed, s.cancelled_host_abort), (0, 0), "{s}");
    assert_eq!((s.callbacks, s.freed), (2, 2), "{s}");

    // A client that resets its connection: the same.
    resets.reset().expect("reset");
    let s = wait_for(&handle, "reset to fault the channel", |s| {
        s.channels_open == 1 && s.in_flight == 2
    })
    .await;
    assert_eq!(s.cancelled_channel_faulted, 4, "{s}");
    assert_eq!((s.completed, s.cancelled_host_abort), (0, 0), "{s}");
    assert_eq!((s.callbacks, s.freed), (4, 4), "{s}");

    // The remaining connection is untouched: its calls run, it serves more.
    assert_eq!(send(&mut stays, "WORK 0").await, 4);
    assert_eq!(recv(&mut stays).await, "DONE 4");
    let s = stats(&mut stays, &mut Vec::new()).await;
    assert_eq!((s.in_flight, s.started, s.completed), (2, 7, 1), "{s}");

    // Its calls end only when the host aborts, with HostAbort.
    handle.abort();
    assert_eq!(finish(run).await, Exit::Aborted);
    assert_eq!(read_to_close(&mut stays).await, Vec::<String>::new());
    let s = handle.stats();
    assert_balanced(&s);
    assert_eq!(s.cancelled_channel_faulted, 4, "{s}");
    assert_eq!(s.cancelled_host_abort, 2, "{s}");
    assert_eq!(s.callbacks, 6, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_a_short_timeout_aborts_the_rest_with_host_abort() {
    let (addr, handle, run) = start().await;
    let mut c = connect(addr).await;
    send(&mut c, &format!("BLOCK {FOREVER}")).await;
    send(&mut c, &format!("WORK {FOREVER}")).await;
    send(&mut c, "WORK 0").await;
    assert_eq!(recv(&mut c).await, "DONE 3");

    let t0 = Instant::now();
    let mut operator = connect(addr).await;
    send(&mut operator, "SHUTDOWN 50").await;
    let ok = recv(&mut operator).await;
    assert!(ok.starts_with("OK 1 closing"), "{ok}");

    assert_eq!(finish(run).await, Exit::CloseTimedOut);
    assert!(t0.elapsed() >= Duration::from_millis(50));
    assert_eq!(handle.host_state(), HostState::Closed);
    assert_eq!(read_to_close(&mut c).await, Vec::<String>::new());
    assert_eq!(read_to_close(&mut operator).await, Vec::<String>::new());
    let s = handle.stats();
    assert_balanced(&s);
    assert_eq!((s.started, s.completed), (3, 1), "{s}");
    assert_eq!(s.cancelled_host_abort, 2, "{s}");
    assert_eq!(s.cancelled_channel_faulted, 0, "{s}");
    assert_eq!((s.callbacks, s.refused), (2, 0), "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_once_the_calls_in_flight_finish() {
    let (addr, handle, run) = start().await;
    let mut c = connect(addr).await;
    send(&mut c, "WORK 100").await;
    send(&mut c, "BLOCK 100").await;
    let mut other = Vec::new();
    assert_eq!(stats(&mut c, &mut other).await.started, 2);
    let mut operator = connect(addr).await;
    send(&mut operator, &format!("SHUTDOWN {FOREVER}")).await;
    assert!(recv(&mut operator).await.starts_with("OK 1 closing"));

    // Close waits for both calls; their replies are delivered before the
    // server closes the connection.
    assert_eq!(finish(run).await, Exit::Closed);
    assert_eq!(handle.host_state(), HostState::Closed);
    other.extend(read_to_close(&mut c).await);
    other.sort();
    assert_eq!(other, ["DONE 1", "DONE 2"]);
    let s = handle.stats();
    assert_balanced(&s);
    assert_eq!((s.started, s.completed, s.callbacks), (2, 2, 0), "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closing_host_refuses_new_calls_and_connections() {
    let (addr, handle, run) = start().await;
    let mut c = connect(addr).await;
    send(&mut c, &format!("BLOCK {FOREVER}")).await;
    stats(&mut c, &mut Vec::new()).await;
    let mut operator = connect(addr).await;
    send(&mut operator, &format!("SHUTDOWN {FOREVER}")).await;
    assert!(recv(&mut operator).await.starts_with("OK 1 closing"));
    assert_eq!(handle.host_state(), HostState::Closing);

    // The BLOCK keeps the host closing: new work is refused meanwhile.
    send(&mut c, "WORK 0").await;
    assert_eq!(
        recv(&mut c).await,
        "ERR 3 refused: the service host is closing or closed"
    );
    let mut late = connect(addr).await;
    assert_eq!(
        read_to_close(&mut late).await,
        ["ERR 0 refused: the service host is closing or closed"]
    );
    send(&mut operator, "SHUTDOWN 0").await;
    assert_eq!(
        recv(&mut operator).await,
        "ERR 2 shutdown already in progress"
    );
    let s = stats(&mut c, &mut Vec::new()).await;
    assert_eq!((s.in_flight, s.refused, s.channels_open), (1, 2, 2), "{s}");

    // Ctrl-C while closing: the abort ends the blocked call.
    handle.abort();
    assert_eq!(finish(run).await, Exit::Aborted);
    let s = handle.stats();
    assert_balanced(&s);
    assert_eq!(
        (s.started, s.cancelled_host_abort, s.callbacks),
        (1, 1, 1),
        "{s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_an_err_line_and_leaks_nothing() {
    let (addr, handle, run) = start().await;
    let mut c = connect(addr).await;
    let bad: &[(&[u8], &str)] = &[
        (b"FROB 5", "ERR 1 unknown command \"FROB\""),
        (b"WORK", "ERR 2 missing duration"),
        (b"BLOCK", "ERR 3 missing duration"),
        (b"SHUTDOWN", "ERR 4 missing duration"),
        (b"WORK abc", "ERR 5 bad duration \"abc\""),
        (b"WORK -5", "ERR 6 bad duration \"-5\""),
        (b"BLOCK 1.5", "ERR 7 bad duration \"1.5\""),
        (
            b"WORK 3600001",
            "ERR 8 duration \"3600001\" ms out of range",
        ),
        (
            b"BLOCK 99999999999999999999999",
            "ERR 9 duration \"99999999999999999999999\" ms out of range",
        ),
        (b"SHUTDOWN soon", "ERR 10 bad duration \"soon\""),
        (b"WORK 1 2", "ERR 11 too many arguments"),
        (b"STATS now", "ERR 12 STATS takes no argument"),
        (b"", "ERR 13 empty request"),
        (b"   \t ", "ERR 14 empty request"),
        (b"WORK \xff\xfe", "ERR 15 request is not UTF-8"),
        (
            b"\x00\x01\x02",
            "ERR 16 unknown command \"\\0\\u{1}\\u{2}\"",
        ),
    ];
    for (line, _) in bad {
        let mut bytes = line.to_vec();
        bytes.push(b'\n');
        c.send_raw(&bytes).await.unwrap();
    }
    for (line, want) in bad {
        let got = recv(&mut c).await;
        assert!(
            got.starts_with(want),
            "{:?}: got {got:?}, want {want:?}...",
            String::from_utf8_lossy(line)
        );
    }
    // The connection still serves: lowercase, CRLF and the limits work.
    assert_eq!(send(&mut c, "work 0\r").await, 17);
    assert_eq!(recv(&mut c).await, "DONE 17");
    // A line of exactly MAX_LINE bytes with its newline is accepted.
    let longest = format!("BLOCK{}0\n", " ".repeat(MAX_LINE - 7));
    assert_eq!(longest.len(), MAX_LINE);
    c.send_raw(longest.as_bytes()).await.unwrap();
    assert_eq!(recv(&mut c).await, "DONE 18");
    let s = stats(&mut c, &mut Vec::new()).await;
    assert_eq!((s.started, s.completed, s.refused), (2, 2, 0), "{s}");

    // One byte more: an ERR, then the server closes the connection.
    let too_long = format!("WORK{}0\n", " ".repeat(MAX_LINE - 5));
    assert_eq!(too_long.len(), MAX_LINE + 1);
    c.send_raw(too_long.as_bytes()).await.unwrap();
    let rest = read_to_close(&mut c).await;
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert!(rest[0].starts_with("ERR 20 line too long"), "{rest:?}");

    // A garbage flood with no newline at all: the same.
    let mut flood = connect(addr).await;
    flood.send_raw(&vec![b'x'; 3 * MAX_LINE]).await.unwrap();
    let rest = read_to_close(&mut flood).await;
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert!(rest[0].starts_with("ERR 1 line too long"), "{rest:?}");

    let s = wait_for(&handle, "the connections to close", |s| {
        s.channels_open == 0
    })
    .await;
    assert_balanced(&s);
    assert_eq!((s.started, s.completed, s.callbacks), (2, 2, 0), "{s}");
    handle.abort();
    assert_eq!(finish(run).await, Exit::Aborted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_socket_faults_its_channel() {
    let (addr, handle, run) = start().await;
    let mut c = connect(addr).await;
    send(&mut c, &format!("WORK {FOREVER}")).await;
    send(&mut c, &format!("BLOCK {FOREVER}")).await;
    stats(&mut c, &mut Vec::new()).await;
    // A partial request, then FIN: the fragment is not run.
    c.send_raw(b"WORK 0").await.unwrap();
    c.shutdown_write().await.unwrap();
    // The server cancels the session's calls and closes its side.
    assert_eq!(read_to_close(&mut c).await, Vec::<String>::new());
    let s = wait_for(&handle, "the channel to fault", |s| {
        s.channels_open == 0 && s.in_flight == 0
    })
    .await;
    assert_balanced(&s);
    assert_eq!(s.started, 2, "{s}");
    assert_eq!((s.cancelled_channel_faulted, s.callbacks), (2, 2), "{s}");
    handle.abort();
    assert_eq!(finish(run).await, Exit::Aborted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_has_at_most_max_calls_in_flight() {
    let (addr, handle, run) = start().await;
    let mut c = connect(addr).await;
    let mut batch = String::new();
    for _ in 0..MAX_CALLS_PER_CONNECTION {
        batch.push_str(&format!("WORK {FOREVER}\n"));
    }
    c.send_raw(batch.as_bytes()).await.unwrap();
    let over = send(&mut c, "BLOCK 0").await;
    let reply = recv(&mut c).await;
    assert!(
        reply.starts_with(&format!("ERR {over} too many calls in flight")),
        "{reply}"
    );
    let s = handle.stats();
    assert_eq!(s.started, MAX_CALLS_PER_CONNECTION as u64, "{s}");
    handle.abort();
    assert_eq!(finish(run).await, Exit::Aborted);
    let s = handle.stats();
    assert_balanced(&s);
    assert_eq!(
        s.cancelled_host_abort, MAX_CALLS_PER_CONNECTION as u64,
        "{s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_call_is_lost_under_1000_requests_across_50_connections() {
    const CONNECTIONS: usize = 50;
    const PER_CONNECTION: u64 = 20;
    let t0 = Instant::now();
    let (addr, handle, run) = start().await;
    let mut clients = Vec::new();
    for n in 0..CONNECTIONS {
        clients.push(tokio::spawn(async move {
            let mut c = connect(addr).await;
            // Pipelined in one write: all 20 run concurrently.
            let mut batch = String::new();
            for i in 0..PER_CONNECTION as usize {
                let ms = (n + i) % 4;
                let kind = if (n + i) % 5 == 0 { "BLOCK" } else { "WORK" };
                batch.push_str(&format!("{kind} {ms}\n"));
            }
            c.send_raw(batch.as_bytes()).await.unwrap();
            let mut done = BTreeSet::new();
            for _ in 0..PER_CONNECTION {
                let reply = recv(&mut c).await;
                let id: u64 = reply
                    .strip_prefix("DONE ")
                    .and_then(|id| id.parse().ok())
                    .unwrap_or_else(|| panic!("unexpected reply {reply:?}"));
                assert!(done.insert(id), "DONE {id} twice");
            }
            assert_eq!(done, (1..=PER_CONNECTION).collect());
            c
        }));
    }
    let mut connected = Vec::new();
    for client in clients {
        connected.push(guard("a client", client).await.expect("client panicked"));
    }
    let total = CONNECTIONS as u64 * PER_CONNECTION;
    let s = wait_for(&handle, "the last free", |s| s.in_flight == 0).await;
    assert_eq!(
        (s.started, s.completed, s.freed),
        (total, total, total),
        "{s}"
    );
    assert_eq!(s.channels_open, CONNECTIONS as u64, "{s}");

    let mut operator = connected.pop().unwrap();
    let id = send(&mut operator, "SHUTDOWN 1000").await;
    assert_eq!(id, PER_CONNECTION + 1);
    let ok = recv(&mut operator).await;
    assert!(ok.starts_with(&format!("OK {id} closing")), "{ok}");
    assert_eq!(finish(run).await, Exit::Closed);
    drop(connected);
    let s = handle.stats();
    assert_balanced(&s);
    assert_eq!(
        (s.started, s.completed, s.callbacks),
        (total, total, 0),
        "{s}"
    );
    eprintln!("1000 requests over 50 connections: {:?}", t0.elapsed());
}
