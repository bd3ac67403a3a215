//! The TCP service behind `examples/tcp_service`: a callcancel [`ServiceHost`]
//! served over a line protocol on loopback, with tokio.
//!
//! The example's `main` and the integration test `tests/tcp_service.rs` both
//! include this file, so the test drives the real server.
//!
//! # Mapping
//!
//! * one accepted connection = one [`Channel`](callcancel::Channel);
//! * one request line = one [`Call`], begun on the connection's reader task
//!   (so a call is in flight as soon as the next line is read) and run as its
//!   own task: the calls of one connection run concurrently and their replies
//!   come in completion order, tagged with the call id;
//! * the client closing, half-closing or resetting its connection (a read of
//!   EOF or an error), a failed write, or a request line that is too long
//!   faults that channel: its pending calls are cancelled with
//!   [`CancelReason::ChannelFaulted`], other connections are untouched;
//! * `SHUTDOWN <ms>` runs [`ServiceHost::close`] on its own thread (close
//!   blocks; tokio's blocking pool may be busy with `BLOCK` calls); at the
//!   deadline the host aborts the rest ([`CancelReason::HostAbort`]);
//! * [`Handle::abort`] (the example calls it on Ctrl-C / SIGTERM) aborts the
//!   host;
//! * either way [`Server::run`] stops accepting, waits for the host to be
//!   idle ([`ServiceHost::idle`]), lets each connection send the replies of
//!   calls that finished, closes the connections and returns.
//!
//! # Protocol
//!
//! Requests are lines of at most [`MAX_LINE`] bytes including the `\n` (a
//! trailing `\r` is ignored; commands are case-insensitive). Every line gets
//! a call id: its line number on the connection, from 1. Replies are lines:
//!
//! | request        | reply                                                    |
//! |----------------|----------------------------------------------------------|
//! | `WORK <ms>`    | `DONE <id>` after up to `<ms>` ms; nothing if cancelled  |
//! | `BLOCK <ms>`   | the same, the wait on a blocking thread                  |
//! | `STATS`        | `STATS <id> in_flight=.. started=.. ...` at once         |
//! | `SHUTDOWN <ms>`| `OK <id> closing ...` once the host refuses new work     |
//! | anything else  | `ERR <id> <why>`                                         |
//!
//! `<ms>` is decimal digits, at most [`MAX_DURATION_MS`] (one hour). A call
//! the host refuses (closing, aborted) answers `ERR <id> refused: <error>`; a
//! connection the host refuses gets `ERR 0 refused: <error>` and is closed.
//! A line longer than [`MAX_LINE`] gets `ERR <id> line too long ...` and the
//! connection is closed. A connection may have at most
//! [`MAX_CALLS_PER_CONNECTION`] calls in flight.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use callcancel::{Call, CancelReason, Channel, Error, HostState, ServiceHost};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;

/// Longest request line, in bytes, counting its `\n`.
pub const MAX_LINE: usize = 4096;
/// Longest duration `WORK`, `BLOCK` and `SHUTDOWN` accept: one hour.
pub const MAX_DURATION_MS: u64 = 3_600_000;
/// Calls one connection may have in flight; more get `ERR`.
pub const MAX_CALLS_PER_CONNECTION: usize = 256;
/// Replies queued for one connection's writer before senders wait.
const REPLY_QUEUE: usize = 64;
/// [`Handle::wait_for`] re-checks at least this often (`in_flight` drops
/// inside the library, with no event of ours).
const RECHECK: Duration = Duration::from_millis(10);
/// How long a connection closed for a too-long line keeps reading (and
/// discarding) so that its `ERR` reply is not lost to a reset.
const LINGER: Duration = Duration::from_secs(1);
/// Once the host is idle at exit, how long connections get to send their
/// last replies before they are dropped (a client that does not read).
const DRAIN_GRACE: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------

/// A snapshot of the server's counters, as `STATS` reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Calls in flight on the host ([`ServiceHost::in_flight`]).
    pub in_flight: u64,
    /// Calls begun.
    pub started: u64,
    /// Calls whose work finished (they answered `DONE`).
    pub completed: u64,
    /// Calls whose work was cancelled with [`CancelReason::HostAbort`].
    pub cancelled_host_abort: u64,
    /// Calls whose work was cancelled with [`CancelReason::ChannelFaulted`].
    pub cancelled_channel_faulted: u64,
    /// Free-state callbacks run (one per begun call, R2).
    pub freed: u64,
    /// Cancel callbacks run.
    pub callbacks: u64,
    /// Calls and connections the host refused (closing or aborted).
    pub refused: u64,
    /// Connections with an open channel.
    pub channels_open: u64,
}

impl Stats {
    const KEYS: [&'static str; 9] = [
        "in_flight",
        "started",
        "completed",
        "cancelled_host_abort",
        "cancelled_channel_faulted",
        "freed",
        "callbacks",
        "refused",
        "channels_open",
    ];

    fn values(&self) -> [u64; 9] {
        [
            self.in_flight,
            self.started,
            self.completed,
            self.cancelled_host_abort,
            self.cancelled_channel_faulted,
            self.freed,
            self.callbacks,
            self.refused,
            self.channels_open,
        ]
    }

    /// `(key, value)` pairs in `STATS` order.
    pub fn pairs(&self) -> impl Iterator<Item = (&'static str, u64)> {
        Self::KEYS.into_iter().zip(self.values())
    }

    /// Parses the `key=value` pairs of a `STATS` reply (the part after the
    /// id). Every key must be present; unknown keys are ignored.
    pub fn parse(pairs: &str) -> Option<Stats> {
        let mut found = [None; 9];
        for pair in pairs.split_ascii_whitespace() {
            let (key, value) = pair.split_once('=')?;
            if let Some(i) = Self::KEYS.iter().position(|k| *k == key) {
                found[i] = Some(value.parse().ok()?);
            }
        }
        let [in_flight, started, completed, cancelled_host_abort, cancelled_channel_faulted, freed, callbacks, refused, channels_open] =
            found;
        Some(Stats {
            in_flight: in_flight?,
            started: started?,
            completed: completed?,
            cancelled_host_abort: cancelled_host_abort?,
            cancelled_channel_faulted: cancelled_channel_faulted?,
            freed: freed?,
            callbacks: callbacks?,
            refused: refused?,
            channels_open: channels_open?,
        })
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (key, value)) in self.pairs().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{key}={value}")?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct Counters {
    started: AtomicU64,
    completed: AtomicU64,
    cancelled_host_abort: AtomicU64,
    cancelled_channel_faulted: AtomicU64,
    freed: AtomicU64,
    callbacks: AtomicU64,
    refused: AtomicU64,
    channels_open: AtomicU64,
}

/// How [`Server::run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// `SHUTDOWN`: every call finished before the timeout; the host is closed.
    Closed,
    /// `SHUTDOWN`: the timeout passed; the remaining calls were aborted.
    CloseTimedOut,
    /// [`Handle::abort`] (Ctrl-C / SIGTERM): every call was aborted.
    Aborted,
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Exit::Closed => "closed: every call finished within the shutdown timeout",
            Exit::CloseTimedOut => "close timed out: the remaining calls were aborted (HostAbort)",
            Exit::Aborted => "aborted: every pending call was cancelled (HostAbort)",
        })
    }
}

struct Shared {
    host: ServiceHost,
    counters: Counters,
    /// Notified whenever a counter changes.
    changed: Notify,
    /// Set once the server should stop: it then exits as soon as it is idle.
    stop: watch::Sender<Option<Exit>>,
    /// Set once the host is idle at exit: connections stop reading, send
    /// their last replies and close.
    drain: watch::Sender<bool>,
    shutdown_requested: AtomicBool,
}

impl Shared {
    fn bump(&self, counter: &AtomicU64) {
        counter.fetch_add(1, SeqCst);
        self.changed.notify_waiters();
    }

    fn stats(&self) -> Stats {
        let c = &self.counters;
        Stats {
            in_flight: self.host.in_flight() as u64,
            started: c.started.load(SeqCst),
            completed: c.completed.load(SeqCst),
            cancelled_host_abort: c.cancelled_host_abort.load(SeqCst),
            cancelled_channel_faulted: c.cancelled_channel_faulted.load(SeqCst),
            freed: c.freed.load(SeqCst),
            callbacks: c.callbacks.load(SeqCst),
            refused: c.refused.load(SeqCst),
            channels_open: c.channels_open.load(SeqCst),
        }
    }

    /// Counts how a call's work ended. Called before the call completes, so
    /// an idle host has every outcome counted.
    fn record(&self, outcome: Result<(), CancelReason>) {
        let c = &self.counters;
        self.bump(match outcome {
            Ok(()) => &c.completed,
            Err(CancelReason::HostAbort) => &c.cancelled_host_abort,
            Err(CancelReason::ChannelFaulted) => &c.cancelled_channel_faulted,
            // `CancelReason` is non-exhaustive; a new reason is a bug here.
            Err(other) => panic!("unexpected cancel reason {other:?}"),
        });
    }

    fn stop(&self, exit: Exit) {
        self.stop.send_if_modified(|stop| {
            let first = stop.is_none();
            if first {
                *stop = Some(exit);
            }
            first
        });
    }
}

/// Counts a connection's channel as open while it lives.
struct ChannelOpen(Arc<Shared>);

impl ChannelOpen {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.bump(&shared.counters.channels_open);
        Self(Arc::clone(shared))
    }
}

impl Drop for ChannelOpen {
    fn drop(&mut self) {
        self.0.counters.channels_open.fetch_sub(1, SeqCst);
        self.0.changed.notify_waiters();
    }
}

// ---------------------------------------------------------------------------
// Server and handle
// ---------------------------------------------------------------------------

/// A bound, not yet running server.
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
}

/// Watches and stops a server from outside; cheap to clone.
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

impl Server {
    /// Binds `127.0.0.1:port` (`0` picks a free port). Loopback only.
    pub async fn bind(port: u16) -> io::Result<Server> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await?;
        let (stop, _) = watch::channel(None);
        let (drain, _) = watch::channel(false);
        Ok(Server {
            listener,
            shared: Arc::new(Shared {
                host: ServiceHost::new(),
                counters: Counters::default(),
                changed: Notify::new(),
                stop,
                drain,
                shutdown_requested: AtomicBool::new(false),
            }),
        })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// A handle for stats and abort.
    pub fn handle(&self) -> Handle {
        Handle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Accepts connections until a `SHUTDOWN` finished or [`Handle::abort`]
    /// was called, then waits for the host to be idle, lets every
    /// connection send its last replies and close, and returns how it ended.
    ///
    /// # Panics
    ///
    /// Re-raises a panic of a connection or call task (there should be none:
    /// the test relies on that).
    pub async fn run(self) -> Exit {
        let Server { listener, shared } = self;
        let mut stop = shared.stop.subscribe();
        let mut connections = JoinSet::new();
        let exit = loop {
            tokio::select! {
                stopped = async { stop.wait_for(Option::is_some).await.map(|exit| *exit) } => {
                    let exit = stopped.expect("the sender lives in `shared`");
                    break exit.expect("waited for Some");
                }
                accepted = listener.accept() => match accepted {
                    Ok((stream, _peer)) => {
                        connections.spawn(serve_connection(Arc::clone(&shared), stream));
                    }
                    Err(e) => {
                        // E.g. out of file descriptors: back off, keep serving.
                        eprintln!("tcp_service: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                Some(done) = connections.join_next(), if !connections.is_empty() => {
                    propagate_panic(done);
                }
            }
        };
        drop(listener);
        // A2: the host counts every call until it completed.
        shared.host.idle().await;
        // WWSAPI's order: abort, then close. The host is idle, so this does
        // not block: an aborted host becomes Closed too.
        let _ = shared.host.close(Duration::ZERO);
        // Idle: no call of any connection is alive. The connections stop
        // reading, flush the replies of calls that finished, and close.
        shared.drain.send_replace(true);
        let drained = tokio::time::timeout(DRAIN_GRACE, async {
            while let Some(done) = connections.join_next().await {
                propagate_panic(done);
            }
        })
        .await;
        if drained.is_err() {
            connections.abort_all();
            while let Some(done) = connections.join_next().await {
                propagate_panic(done);
            }
        }
        exit
    }
}

impl Handle {
    /// The current counters.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// The host's state.
    pub fn host_state(&self) -> HostState {
        self.shared.host.state()
    }

    /// Aborts the host: every pending call is cancelled with `HostAbort`, new
    /// work is refused, and [`Server::run`] returns once the host is idle.
    pub fn abort(&self) {
        self.shared.stop(Exit::Aborted);
        self.shared.host.abort();
    }

    /// Waits until `pred` holds for the counters and returns them. Wrap it in
    /// a timeout: it waits forever if `pred` never holds.
    pub async fn wait_for(&self, mut pred: impl FnMut(&Stats) -> bool) -> Stats {
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let stats = self.shared.stats();
            if pred(&stats) {
                return stats;
            }
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep(RECHECK) => {}
            }
        }
    }
}

fn propagate_panic(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

// ---------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------

enum ReadLine {
    /// A whole line is in the buffer, without its `\n` (or `\r\n`).
    Line,
    /// [`MAX_LINE`] bytes came without a `\n`.
    TooLong,
    /// End of stream (a partial last line is dropped).
    Eof,
}

async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> io::Result<ReadLine> {
    buf.clear();
    let n = (&mut *r)
        .take(MAX_LINE as u64)
        .read_until(b'\n', buf)
        .await?;
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        Ok(ReadLine::Line)
    } else if n == MAX_LINE {
        Ok(ReadLine::TooLong)
    } else {
        Ok(ReadLine::Eof)
    }
}

async fn write_replies(wr: OwnedWriteHalf, mut rx: mpsc::Receiver<String>) {
    let mut w = BufWriter::new(wr);
    while let Some(mut line) = rx.recv().await {
        loop {
            line.push('\n');
            if w.write_all(line.as_bytes()).await.is_err() {
                return;
            }
            match rx.try_recv() {
                Ok(next) => line = next,
                Err(_) => break,
            }
        }
        if w.flush().await.is_err() {
            return;
        }
    }
    // Every sender is gone: flush and send FIN.
    let _ = w.shutdown().await;
}

/// One connection's reader side: parses lines and begins calls.
struct Connection {
    shared: Arc<Shared>,
    channel: Channel,
    replies: mpsc::Sender<String>,
    calls: JoinSet<()>,
}

/// What the reader does after a request.
enum Next {
    Continue,
    /// The reply queue is closed (the writer failed): stop reading.
    Stop,
}

async fn serve_connection(shared: Arc<Shared>, stream: TcpStream) {
    let mut drain = shared.drain.subscribe();
    let _ = stream.set_nodelay(true);
    let (rd, mut wr) = stream.into_split();
    let channel = match shared.host.open_channel() {
        Ok(channel) => channel,
        Err(e) => {
            shared.bump(&shared.counters.refused);
            let _ = wr
                .write_all(format!("ERR 0 refused: {e}\n").as_bytes())
                .await;
            let _ = wr.shutdown().await;
            return;
        }
    };
    let open = ChannelOpen::new(&shared);
    let (replies, rx) = mpsc::channel(REPLY_QUEUE);
    let mut writer = tokio::spawn(write_replies(wr, rx));
    let mut writer_done = false;
    let mut conn = Connection {
        shared,
        channel,
        replies,
        calls: JoinSet::new(),
    };
    let mut reader = BufReader::new(rd);
    let mut line = Vec::with_capacity(128);
    let mut id = 0u64;
    let mut linger = false;
    let mut draining = false;
    loop {
        let read = tokio::select! {
            read = read_line(&mut reader, &mut line) => read,
            _ = async { drain.wait_for(|d| *d).await.map(drop) } => {
                // The server is exiting and the host is idle.
                draining = true;
                break;
            }
            _ = &mut writer => {
                // A write failed: the client is gone.
                writer_done = true;
                break;
            }
        };
        match read {
            Ok(ReadLine::Line) => {
                id += 1;
                if let Next::Stop = conn.handle(id, &line).await {
                    break;
                }
            }
            Ok(ReadLine::TooLong) => {
                id += 1;
                let _ = conn
                    .replies
                    .send(format!(
                        "ERR {id} line too long (max {MAX_LINE} bytes with its newline); closing"
                    ))
                    .await;
                linger = true;
                break;
            }
            // EOF (close or half-close) or an error (reset).
            Ok(ReadLine::Eof) | Err(_) => break,
        }
    }
    if !draining {
        // The session is over: cancel what it left running (ChannelFaulted).
        conn.channel.fault();
    }
    while let Some(done) = conn.calls.join_next().await {
        propagate_panic(done);
    }
    drop(conn);
    if !writer_done {
        // Sends what is queued, then FIN.
        let _ = writer.await;
    }
    drop(open);
    if linger {
        // Read and drop what the client still sends (up to LINGER, 1 MiB, or
        // the server's exit), so that closing does not reset the connection
        // before the client read the `ERR`.
        let discard = async {
            let mut sink = [0u8; 4096];
            let mut left = 1usize << 20;
            while let Ok(n @ 1..) = reader.read(&mut sink).await {
                left = left.saturating_sub(n);
                if left == 0 {
                    break;
                }
            }
        };
        tokio::select! {
            _ = tokio::time::timeout(LINGER, discard) => {}
            _ = async { drain.wait_for(|d| *d).await.map(drop) } => {}
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Work,
    Block,
}

impl Connection {
    async fn reply(&self, line: String) -> Next {
        match self.replies.send(line).await {
            Ok(()) => Next::Continue,
            Err(_) => Next::Stop,
        }
    }

    async fn handle(&mut self, id: u64, line: &[u8]) -> Next {
        let Ok(text) = std::str::from_utf8(line) else {
            return self.reply(format!("ERR {id} request is not UTF-8")).await;
        };
        let mut words = text.split_ascii_whitespace();
        let Some(command) = words.next() else {
            return self.reply(format!("ERR {id} empty request")).await;
        };
        let arg = words.next();
        let extra = words.next();
        let is = |name: &str| command.eq_ignore_ascii_case(name);
        if is("WORK") || is("BLOCK") {
            let kind = if is("WORK") { Kind::Work } else { Kind::Block };
            match parse_ms(arg, extra) {
                Ok(ms) => self.start_call(id, kind, ms).await,
                Err(why) => self.reply(format!("ERR {id} {why}")).await,
            }
        } else if is("STATS") {
            if arg.is_some() {
                return self
                    .reply(format!("ERR {id} STATS takes no argument"))
                    .await;
            }
            let stats = self.shared.stats();
            self.reply(format!("STATS {id} {stats}")).await
        } else if is("SHUTDOWN") {
            match parse_ms(arg, extra) {
                Ok(ms) => self.shutdown(id, ms).await,
                Err(why) => self.reply(format!("ERR {id} {why}")).await,
            }
        } else {
            let command = quote(command);
            self.reply(format!(
                "ERR {id} unknown command {command} (want WORK, BLOCK, STATS or SHUTDOWN)"
            ))
            .await
        }
    }

    async fn start_call(&mut self, id: u64, kind: Kind, ms: Duration) -> Next {
        while let Some(done) = self.calls.try_join_next() {
            propagate_panic(done);
        }
        if self.calls.len() >= MAX_CALLS_PER_CONNECTION {
            return self
                .reply(format!(
                    "ERR {id} too many calls in flight on this connection (max {MAX_CALLS_PER_CONNECTION})"
                ))
                .await;
        }
        let call = match self.channel.begin_call() {
            Ok(call) => call,
            Err(e) => {
                self.shared.bump(&self.shared.counters.refused);
                return self.reply(format!("ERR {id} refused: {e}")).await;
            }
        };
        self.shared.bump(&self.shared.counters.started);
        let shared = Arc::clone(&self.shared);
        let replies = self.replies.clone();
        match kind {
            Kind::Work => self.calls.spawn(work(shared, call, ms, id, replies)),
            Kind::Block => self.calls.spawn(block(shared, call, ms, id, replies)),
        };
        Next::Continue
    }

    async fn shutdown(&mut self, id: u64, timeout: Duration) -> Next {
        if self.shared.shutdown_requested.swap(true, SeqCst) {
            return self
                .reply(format!("ERR {id} shutdown already in progress"))
                .await;
        }
        // Refuse new work now, so a client that reads `OK` knows later
        // requests are refused; `close` below then waits for the rest.
        self.shared.host.begin_close();
        let shared = Arc::clone(&self.shared);
        // `close` blocks until idle or the deadline: give it its own thread
        // rather than tokio's blocking pool, which `BLOCK` calls may fill.
        let spawned = std::thread::Builder::new()
            .name("tcp_service-close".into())
            .spawn(move || {
                let exit = match shared.host.close(timeout) {
                    Ok(()) => Exit::Closed,
                    Err(Error::Timeout) => Exit::CloseTimedOut,
                    Err(_) => Exit::Aborted,
                };
                shared.stop(exit);
            });
        if let Err(e) = spawned {
            self.shared.shutdown_requested.store(false, SeqCst);
            return self.reply(format!("ERR {id} cannot shut down: {e}")).await;
        }
        let ms = timeout.as_millis();
        self.reply(format!(
            "OK {id} closing: waiting up to {ms} ms for calls in flight, then aborting them"
        ))
        .await
    }
}

/// Parses the one `<ms>` argument of `WORK`, `BLOCK` and `SHUTDOWN`.
fn parse_ms(arg: Option<&str>, extra: Option<&str>) -> Result<Duration, String> {
    let Some(arg) = arg else {
        return Err("missing duration in milliseconds".into());
    };
    if extra.is_some() {
        return Err("too many arguments (want one duration in milliseconds)".into());
    }
    if !arg.bytes().all(|b| b.is_ascii_digit()) {
        let arg = quote(arg);
        return Err(format!(
            "bad duration {arg}: want milliseconds 0..={MAX_DURATION_MS}"
        ));
    }
    match arg.parse::<u64>() {
        Ok(ms) if ms <= MAX_DURATION_MS => Ok(Duration::from_millis(ms)),
        _ => {
            let arg = quote(arg);
            Err(format!(
                "duration {arg} ms out of range (max {MAX_DURATION_MS})"
            ))
        }
    }
}

/// Quotes client text for an `ERR` line, cut to a sane length.
fn quote(s: &str) -> String {
    const MAX: usize = 32;
    match s.char_indices().nth(MAX) {
        Some((end, _)) => format!("{:?}...", &s[..end]),
        None => format!("{s:?}"),
    }
}

// ---------------------------------------------------------------------------
// The calls
// ---------------------------------------------------------------------------

/// `WORK <ms>`: an async sleep raced against the call's cancellation, with a
/// registered cancel callback whose state's free is counted.
async fn work(
    shared: Arc<Shared>,
    call: Call,
    ms: Duration,
    id: u64,
    replies: mpsc::Sender<String>,
) {
    call.register_for_cancel_with_free(
        Arc::clone(&shared),
        |_reason, shared: &Arc<Shared>| shared.bump(&shared.counters.callbacks),
        |shared: Arc<Shared>| shared.bump(&shared.counters.freed),
    )
    .unwrap_or_else(|_| unreachable!("the first registration of a call succeeds"));
    let outcome = call.run_until_cancelled(tokio::time::sleep(ms)).await;
    shared.record(outcome);
    call.complete(); // the state is freed here, or by the canceller (R3)
    shared.changed.notify_waiters();
    if outcome.is_ok() {
        let _ = replies.send(format!("DONE {id}")).await;
    }
}

/// The BlockingServiceExample's event: set by the cancel callback.
#[derive(Default)]
struct Event {
    set: Mutex<Option<CancelReason>>,
    cv: Condvar,
}

impl Event {
    fn signal(&self, reason: CancelReason) {
        let mut set = self.set.lock().unwrap_or_else(PoisonError::into_inner);
        set.get_or_insert(reason);
        self.cv.notify_all();
    }

    /// Waits until signalled (`Err(reason)`) or `timeout` passes (`Ok`).
    fn wait(&self, timeout: Duration) -> Result<(), CancelReason> {
        let deadline = Instant::now() + timeout;
        let mut set = self.set.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(reason) = *set {
                return Err(reason);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(());
            }
            set = self
                .cv
                .wait_timeout(set, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// `BLOCK <ms>`: the work waits on a blocking thread, on an event that only
/// the cancel callback (or the timeout) wakes.
async fn block(
    shared: Arc<Shared>,
    call: Call,
    ms: Duration,
    id: u64,
    replies: mpsc::Sender<String>,
) {
    let s = Arc::clone(&shared);
    let blocking = tokio::task::spawn_blocking(move || {
        let event = Arc::new(Event::default());
        let (on_cancel, on_free) = (Arc::clone(&s), Arc::clone(&s));
        call.register_for_cancel_with_free(
            Arc::clone(&event),
            move |reason, event: &Arc<Event>| {
                event.signal(reason);
                on_cancel.bump(&on_cancel.counters.callbacks);
            },
            move |_event| on_free.bump(&on_free.counters.freed),
        )
        .unwrap_or_else(|_| unreachable!("the first registration of a call succeeds"));
        // If the call was cancelled before it registered, the callback has
        // already run inside the registration (R4): `wait` returns at once.
        let outcome = event.wait(ms);
        s.record(outcome);
        call.complete();
        s.changed.notify_waiters();
        outcome
    });
    match blocking.await {
        Ok(Ok(())) => {
            let _ = replies.send(format!("DONE {id}")).await;
        }
        Ok(Err(_cancelled)) => {}
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_runtime_shutting_down) => {}
    }
}

// ---------------------------------------------------------------------------
// A line client, for the demo and the tests
// ---------------------------------------------------------------------------

/// A client of the protocol that counts the lines it sends, so that it knows
/// each request's call id.
pub struct Client {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    sent: u64,
}

impl Client {
    /// Connects to the server.
    pub async fn connect(addr: SocketAddr) -> io::Result<Client> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (rd, wr) = stream.into_split();
        Ok(Client {
            reader: BufReader::new(rd),
            writer: wr,
            sent: 0,
        })
    }

    /// Sends one request line (`\n` appended); returns its call id.
    pub async fn send(&mut self, request: &str) -> io::Result<u64> {
        self.send_raw(format!("{request}\n").as_bytes()).await?;
        Ok(self.sent)
    }

    /// Sends raw bytes; every `\n` in them counts as a request.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.writer.write_all(bytes).await?;
        self.sent += bytes.iter().filter(|&&b| b == b'\n').count() as u64;
        Ok(())
    }

    /// The next reply line, or `None` at end of stream.
    pub async fn recv(&mut self) -> io::Result<Option<String>> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).await? == 0 {
            return Ok(None);
        }
        Ok(Some(line.trim_end().to_owned()))
    }

    /// Sends `STATS` and reads replies up to its answer; the other replies
    /// read meanwhile are appended to `other`.
    pub async fn stats(&mut self, other: &mut Vec<String>) -> io::Result<Stats> {
        let id = self.send("STATS").await?;
        let prefix = format!("STATS {id} ");
        loop {
            let Some(line) = self.recv().await? else {
                return Err(io::ErrorKind::UnexpectedEof.into());
            };
            match line.strip_prefix(&prefix) {
                Some(pairs) => {
                    return Stats::parse(pairs)
                        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, line.clone()))
                }
                None => other.push(line),
            }
        }
    }

    /// Half-closes: sends FIN, keeps reading.
    #[allow(dead_code)] // the tests use it; the demo does not
    pub async fn shutdown_write(&mut self) -> io::Result<()> {
        self.writer.shutdown().await
    }

    /// Resets the connection (RST instead of FIN).
    pub fn reset(self) -> io::Result<()> {
        let stream = self
            .reader
            .into_inner()
            .reunite(self.writer)
            .map_err(|e| io::Error::other(e.to_string()))?;
        stream.set_zero_linger()?;
        drop(stream);
        Ok(())
    }
}
