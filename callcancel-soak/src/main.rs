//! Cross-process soak of the `callcancel-tower` `grpc_demo` (issue 16).
//!
//! Starts three demo processes chained by `--next` (A → B → C), drives A
//! with a bounded, seeded random load (see `load.rs`), restarts B
//! gracefully every few seconds on the same port, and checks the
//! invariants of DESIGN.md's demo service from each server's `Stats` RPC
//! and from each final counters line. Exits non-zero on any violation.
//!
//! ```text
//! cargo build --release -p callcancel-tower --example grpc_demo
//! cargo run --release -p callcancel-soak [-- PATH/TO/grpc_demo]
//! ```
//! Environment: `SOAK_SECS` (default 60), `SOAK_SEED` (replay a seed),
//! `SOAK_WORKERS` (default 16), `SOAK_RESTART_SECS` (default 5),
//! `SOAK_DEMO` (the demo binary), `SOAK_STRICT=1` (warnings fail the run).

mod load;
mod proc;
mod proto;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::time::{sleep, timeout, MissedTickBehavior};

use load::{Load, Violations};
use proc::Server;
use proto::{DemoClient, StatsReply};

/// RSS after the run must stay within `RSS_FACTOR` x warm-up + `RSS_SLACK_KIB`.
const RSS_FACTOR: f64 = 1.5;
const RSS_SLACK_KIB: u64 = 8 * 1024;
/// In-flight must be back to 0 within this after the load stops.
const IDLE_BOUND: Duration = Duration::from_secs(5);
/// A server must exit within its close timeout + this after SIGTERM.
const EXIT_SLACK: Duration = Duration::from_secs(3);
/// B's close timeouts, one drawn per incarnation (short ones abort calls
/// still running: HostAbort).
const B_CLOSE_MS: [u64; 4] = [25, 100, 250, 1000];
/// A and C's close timeout.
const CLOSE_MS: u64 = 1000;

struct Cfg {
    secs: u64,
    seed: u64,
    workers: usize,
    restart_every: Duration,
    warmup: Duration,
    demo: PathBuf,
    strict: bool,
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    match v.trim().parse() {
        Ok(n) => Some(n),
        Err(_) => {
            eprintln!("soak: ignoring {name}={v:?} (not a number)");
            None
        }
    }
}

impl Cfg {
    fn from_env() -> Self {
        let secs = env_u64("SOAK_SECS").unwrap_or(60).max(5);
        let seed = env_u64("SOAK_SEED").unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            (t ^ (u64::from(std::process::id()) << 32)) % 1_000_000_000_000
        });
        Self {
            secs,
            seed,
            workers: env_u64("SOAK_WORKERS").unwrap_or(16).clamp(1, 256) as usize,
            restart_every: Duration::from_secs(env_u64("SOAK_RESTART_SECS").unwrap_or(5).max(1)),
            warmup: Duration::from_secs((secs / 6).clamp(2, 30)),
            demo: proc::demo_path(),
            strict: env_u64("SOAK_STRICT").unwrap_or(0) != 0,
        }
    }
}

fn main() -> ExitCode {
    let cfg = Cfg::from_env();
    // The driver stops by itself: a watchdog ends the process (and with it,
    // by the parent-death signal, the demos) long after the planned end.
    let hard_end = Duration::from_secs(cfg.secs + 180);
    std::thread::spawn(move || {
        std::thread::sleep(hard_end);
        eprintln!("soak: FAIL: watchdog: still running after {hard_end:?}");
        std::process::exit(3);
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    // Runs on this (main) thread: every demo is spawned from it.
    let ok = rt.block_on(run(cfg));
    rt.shutdown_timeout(Duration::from_secs(1));
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Invariant checks over one server incarnation's `Stats` replies.
struct Watch {
    name: String,
    last: Option<StatsReply>,
    polls: u64,
}

impl Watch {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            last: None,
            polls: 0,
        }
    }

    /// Checks the counters every snapshot must satisfy, and monotonicity.
    fn check(&mut self, s: StatsReply, v: &Violations, what: &str) {
        let n = &self.name;
        if s.freed > s.started {
            v.add(format!("{n} {what}: freed > started: {}", s.line()));
        }
        if s.in_flight != s.started.saturating_sub(s.freed) {
            v.add(format!(
                "{n} {what}: in_flight != started - freed: {}",
                s.line()
            ));
        }
        if s.cancelled() > s.started {
            v.add(format!(
                "{n} {what}: cancelled (all reasons) {} > started: {}",
                s.cancelled(),
                s.line()
            ));
        }
        if s.completed > s.started {
            v.add(format!("{n} {what}: completed > started: {}", s.line()));
        }
        if let Some(p) = self.last {
            for ((k, new), (_, old)) in s.fields().iter().zip(p.fields().iter()) {
                if *k != "in_flight" && new < old {
                    v.add(format!("{n} {what}: {k} went back from {old} to {new}"));
                }
            }
        }
        self.last = Some(s);
        self.polls += 1;
    }
}

async fn poll_stats(c: &DemoClient) -> Result<StatsReply, String> {
    match timeout(Duration::from_secs(2), c.clone().stats()).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(s)) => Err(format!("Stats: {:?}: {}", s.code(), s.message())),
        Err(_) => Err("Stats: no answer within 2 s".into()),
    }
}

/// One running server with its Stats client and checks.
struct Live {
    proc: Server,
    stats: DemoClient,
    watch: Watch,
    rss_warm: Option<u64>,
    rss_peak: u64,
}

impl Live {
    fn new(proc: Server) -> Self {
        let addr = SocketAddr::from(([127, 0, 0, 1], proc.port));
        Self {
            stats: load::stats_client(addr),
            watch: Watch::new(&proc.name),
            proc,
            rss_warm: None,
            rss_peak: 0,
        }
    }

    async fn poll(&mut self, v: &Violations, what: &str) -> Option<StatsReply> {
        match poll_stats(&self.stats).await {
            Ok(s) => {
                self.watch.check(s, v, what);
                Some(s)
            }
            Err(e) => {
                v.add(format!("{} {what}: {e}", self.proc.name));
                None
            }
        }
    }

    fn sample_rss(&mut self) -> Option<u64> {
        let r = self.proc.rss_kib()?;
        self.rss_peak = self.rss_peak.max(r);
        Some(r)
    }

    /// SIGTERM, exit status 0, final line: started == freed, in_flight 0,
    /// each cancelled call under one reason, not below the last Stats.
    fn stop(&mut self, v: &Violations) -> Incarnation {
        let name = self.proc.name.clone();
        let rss_end = self.sample_rss();
        let lifetime = self.proc.started_at.elapsed();
        let mut inc = Incarnation {
            name: name.clone(),
            close_ms: self.proc.close_timeout_ms,
            lifetime,
            rss_warm: self.rss_warm,
            rss_end,
            exit: None,
            took: None,
            counters: None,
        };
        match self.proc.terminate(EXIT_SLACK) {
            Err(e) => v.add(e),
            Ok(exit) => {
                inc.exit = Some(exit.status.to_string());
                inc.took = Some(exit.took);
                if !exit.status.success() {
                    v.add(format!(
                        "{name}: exit status {} after SIGTERM (line {:?}); stderr: {}",
                        exit.status,
                        exit.line,
                        self.proc.stderr_tail()
                    ));
                }
                match exit.counters {
                    Err(e) => v.add(format!("{name}: final counters line {:?}: {e}", exit.line)),
                    Ok(c) => {
                        if c.started != c.freed || c.in_flight != 0 {
                            v.add(format!(
                                "{name}: final line: started != freed (a call not freed exactly once): {}",
                                c.line()
                            ));
                        }
                        self.watch.check(c, v, "final line");
                        inc.counters = Some(c);
                    }
                }
            }
        }
        inc
    }
}

/// What one server process life left.
struct Incarnation {
    name: String,
    close_ms: u64,
    lifetime: Duration,
    rss_warm: Option<u64>,
    rss_end: Option<u64>,
    exit: Option<String>,
    took: Option<Duration>,
    counters: Option<StatsReply>,
}

fn start(
    cfg: &Cfg,
    name: &str,
    port: u16,
    next: Option<u16>,
    close_ms: u64,
) -> Result<(Server, u32), String> {
    // A restarted B binds the port its predecessor just left: retry a
    // bounded number of times if the demo exits before its first line.
    let mut tries = 0;
    loop {
        match Server::start(&cfg.demo, name, port, next, close_ms) {
            Ok(s) => return Ok((s, tries)),
            Err(e) if e.exited_early && port != 0 && tries < 20 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e.msg),
        }
    }
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("?".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

async fn run(cfg: Cfg) -> bool {
    let t_start = Instant::now();
    println!(
        "soak: seed={} SOAK_SECS={} workers={} restart every {:?} warm-up {:?} demo={}",
        cfg.seed,
        cfg.secs,
        cfg.workers,
        cfg.restart_every,
        cfg.warmup,
        cfg.demo.display()
    );
    if !cfg.demo.exists() {
        eprintln!(
            "soak: FAIL: no demo binary at {} (cargo build --release -p callcancel-tower --example grpc_demo, or pass its path)",
            cfg.demo.display()
        );
        return false;
    }
    let v = Arc::new(Violations::default());
    let mut rng = fastrand::Rng::with_seed(cfg.seed);

    // C, then B --next C, then A --next B.
    let (c, _) = match start(&cfg, "C", 0, None, CLOSE_MS) {
        Ok(s) => s,
        Err(e) => return fail_start(e),
    };
    let c_port = c.port;
    let mut c = Live::new(c);
    let mut b_n = 1;
    let b_close = B_CLOSE_MS[rng.usize(..B_CLOSE_MS.len())];
    let (b, _) = match start(&cfg, "B#1", 0, Some(c_port), b_close) {
        Ok(s) => s,
        Err(e) => return fail_start(e),
    };
    let b_port = b.port;
    let mut b = Live::new(b);
    let (a, _) = match start(&cfg, "A", 0, Some(b_port), CLOSE_MS) {
        Ok(s) => s,
        Err(e) => return fail_start(e),
    };
    let mut a = Live::new(a);
    println!(
        "soak: A pid {} :{} -> B pid {} :{} -> C pid {} :{}",
        a.proc.pid, a.proc.port, b.proc.pid, b_port, c.proc.pid, c_port
    );

    // The load.
    let a_addr = SocketAddr::from(([127, 0, 0, 1], a.proc.port));
    let load = Arc::new(Load::new(a_addr, Arc::clone(&v)));
    let max_iters = cfg.secs * 200;
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..cfg.workers {
        workers.spawn(Arc::clone(&load).worker(rng.u64(..), max_iters));
    }
    let t_load = Instant::now();
    let end = t_load + Duration::from_secs(cfg.secs);
    let mut next_restart = t_load + cfg.restart_every;
    let mut b_lives: Vec<Incarnation> = Vec::new();
    let mut bind_retries = 0;
    let mut interrupted = false;

    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    let mut last_line = Instant::now();
    // Bounded: one pass a second (or slower) until `end`.
    for _ in 0..cfg.secs * 4 + 10 {
        #[cfg(unix)]
        let sig = term.recv();
        #[cfg(not(unix))]
        let sig = std::future::pending::<Option<()>>();
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => { interrupted = true; }
            _ = sig => { interrupted = true; }
        }
        if interrupted {
            v.add("soak interrupted by a signal");
            break;
        }
        if Instant::now() >= end {
            break;
        }
        let mut dead = false;
        for s in [&mut a, &mut b, &mut c] {
            if let Some(st) = s.proc.exited() {
                v.add(format!(
                    "{} exited on its own during the load ({st}); stderr: {}",
                    s.proc.name,
                    s.proc.stderr_tail()
                ));
                dead = true;
            }
        }
        if dead || v.count() > 200 {
            break;
        }
        for s in [&mut a, &mut b, &mut c] {
            s.poll(&v, "Stats").await;
            let rss = s.sample_rss();
            // B lives a few seconds: its warm-up level is taken after 2 s.
            let warm = if s.proc.name.starts_with('B') {
                cfg.warmup.min(Duration::from_secs(2))
            } else {
                cfg.warmup
            };
            if s.rss_warm.is_none() && s.proc.started_at.elapsed() >= warm {
                s.rss_warm = rss;
            }
        }
        if last_line.elapsed() >= Duration::from_secs(10) {
            last_line = Instant::now();
            let w = |s: &Live| s.watch.last.map_or(0, |x| x.started);
            println!(
                "soak: t={:>4}s started A={} B#{}={} C={} violations={}",
                t_load.elapsed().as_secs(),
                w(&a),
                b_n,
                w(&b),
                w(&c),
                v.count()
            );
        }
        if Instant::now() >= next_restart
            && end.saturating_duration_since(Instant::now()) > Duration::from_secs(2)
        {
            // Graceful restart of B on the same port; A's calls through B
            // fail with UNAVAILABLE meanwhile (counted, expected).
            let inc = b.stop(&v);
            println!(
                "soak: t={:.1}s restarted {} (close timeout {} ms): {} in {:?}",
                t_load.elapsed().as_secs_f64(),
                inc.name,
                inc.close_ms,
                inc.exit.as_deref().unwrap_or("no exit"),
                inc.took.unwrap_or_default()
            );
            b_lives.push(inc);
            b_n += 1;
            let close = B_CLOSE_MS[rng.usize(..B_CLOSE_MS.len())];
            match start(&cfg, &format!("B#{b_n}"), b_port, Some(c_port), close) {
                Ok((s, tries)) => {
                    bind_retries += tries;
                    b = Live::new(s);
                }
                Err(e) => {
                    v.add(format!("restart of B failed: {e}"));
                    break;
                }
            }
            let jitter = Duration::from_millis(rng.u64(0..=2000));
            next_restart = Instant::now() + cfg.restart_every + jitter;
        }
    }
    let load_secs = t_load.elapsed();

    // Stop the load; every worker's current scenario is bounded.
    load.stop();
    let joined = timeout(Duration::from_secs(15), async {
        while let Some(r) = workers.join_next().await {
            if let Err(e) = r {
                v.add(format!("load worker: {e}"));
            }
        }
    })
    .await;
    if joined.is_err() {
        v.add("load workers did not stop within 15 s");
        workers.abort_all();
    }

    // In-flight back to 0 on every server.
    let t_idle = Instant::now();
    let mut idle: [Option<StatsReply>; 3] = [None; 3];
    for (i, s) in [&mut a, &mut b, &mut c].into_iter().enumerate() {
        loop {
            let st = s.poll(&v, "after the load").await;
            if st.is_some_and(|x| x.in_flight == 0) {
                idle[i] = st;
                break;
            }
            if t_idle.elapsed() >= IDLE_BOUND {
                v.add(format!(
                    "{}: in_flight not back to 0 within {IDLE_BOUND:?} of the load's end: {}",
                    s.proc.name,
                    st.map_or("no Stats".into(), |x| x.line())
                ));
                break;
            }
            sleep(Duration::from_millis(50)).await;
        }
    }
    let idle_after = t_idle.elapsed();

    // RSS after, against the warm-up level (A and C; B per incarnation).
    let mut rss = BTreeMap::new();
    for s in [&mut a, &mut b, &mut c] {
        rss.insert(s.proc.name.clone(), (s.rss_warm, s.sample_rss()));
    }
    for s in [&a, &c] {
        if let (Some(w), Some(after)) = rss[&s.proc.name] {
            let bound = (w as f64 * RSS_FACTOR) as u64 + RSS_SLACK_KIB;
            if after > bound {
                v.add(format!(
                    "{}: RSS after the run {} > {RSS_FACTOR}x warm-up {} + {} MiB",
                    s.proc.name,
                    mib(Some(after)),
                    mib(Some(w)),
                    RSS_SLACK_KIB / 1024
                ));
            }
        } else {
            v.add(format!("{}: no RSS reading", s.proc.name));
        }
    }

    // Shut down, A first; the final lines must match the idle snapshots
    // (nothing ran after the load stopped).
    let a_exit = a.stop(&v);
    b_lives.push(b.stop(&v));
    let c_exit = c.stop(&v);
    for (inc, snap) in [&a_exit, b_lives.last().unwrap(), &c_exit]
        .into_iter()
        .zip(idle)
    {
        if let (Some(fin), Some(snap)) = (inc.counters, snap) {
            if fin.started != snap.started || fin.cancelled() != snap.cancelled() {
                v.add(format!(
                    "{}: counters moved after the load stopped: idle {} / final {}",
                    inc.name,
                    snap.line(),
                    fin.line()
                ));
            }
        }
    }

    report(
        &cfg,
        &load,
        &a_exit,
        &b_lives,
        &c_exit,
        bind_retries,
        load_secs,
        idle_after,
        t_start,
    );
    let warnings = load.warnings.list();
    if !warnings.is_empty() {
        println!(
            "soak: WARNING: {} status deviation(s) (no invariant broken; SOAK_STRICT=1 fails on them):",
            load.warnings.count()
        );
        for w in warnings.iter().take(10) {
            println!("  - {w}");
        }
        if cfg.strict {
            v.add(format!(
                "{} warning(s) under SOAK_STRICT",
                load.warnings.count()
            ));
        }
    }
    let list = v.list();
    if interrupted || !list.is_empty() {
        println!(
            "soak: FAIL: {} violation(s) (seed {}):",
            v.count(),
            cfg.seed
        );
        for l in &list {
            println!("  - {l}");
        }
        println!(
            "soak: replay with SOAK_SEED={} SOAK_SECS={}",
            cfg.seed, cfg.secs
        );
        false
    } else {
        println!("soak: PASS (seed {})", cfg.seed);
        true
    }
}

fn fail_start(e: String) -> bool {
    eprintln!("soak: FAIL: {e}");
    false
}

#[allow(clippy::too_many_arguments)]
fn report(
    cfg: &Cfg,
    load: &Load,
    a: &Incarnation,
    b: &[Incarnation],
    c: &Incarnation,
    bind_retries: u32,
    load_secs: Duration,
    idle_after: Duration,
    t_start: Instant,
) {
    let issued = load.tally.issued();
    let total: u64 = issued.values().sum();
    println!("---- soak report ----");
    println!(
        "seed {}  load {:.1} s  elapsed {:.1} s  workers {}",
        cfg.seed,
        load_secs.as_secs_f64(),
        t_start.elapsed().as_secs_f64(),
        cfg.workers
    );
    println!(
        "RPCs issued: {total} ({}); fresh connections: {}",
        issued
            .iter()
            .map(|(m, n)| format!("{m:?} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        load.connections.load(std::sync::atomic::Ordering::Relaxed)
    );
    let outcomes = load.tally.outcomes();
    let mut by_code: BTreeMap<&str, u64> = BTreeMap::new();
    for ((_, o), n) in &outcomes {
        *by_code.entry(o.as_str()).or_default() += n;
    }
    println!(
        "outcomes: {}",
        by_code
            .iter()
            .map(|(o, n)| format!("{o} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut by_scen: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for ((s, o), n) in &outcomes {
        by_scen.entry(s).or_default().push(format!("{o} {n}"));
    }
    for (s, list) in by_scen {
        println!("  {s:<16} {}", list.join(", "));
    }
    println!(
        "restarts of B: {} (bind retries {bind_retries}); in-flight 0 everywhere {:.2} s after the load",
        b.len() - 1,
        idle_after.as_secs_f64()
    );
    println!(
        "{:<6} {:>5} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7} {:>8} {:>6}  {:>9} {:>9}  exit",
        "server",
        "close",
        "started",
        "complet",
        "h_abort",
        "ch_flt",
        "call",
        "deadln",
        "freed",
        "refus",
        "RSS warm",
        "RSS end"
    );
    let row = |i: &Incarnation| {
        let c = i.counters.unwrap_or_default();
        println!(
            "{:<6} {:>5} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7} {:>8} {:>6}  {:>9} {:>9}  {} in {:?} (lived {:.1} s)",
            i.name,
            i.close_ms,
            c.started,
            c.completed,
            c.cancelled_host_abort,
            c.cancelled_channel_faulted,
            c.cancelled_call,
            c.cancelled_deadline,
            c.freed,
            c.refused,
            mib(i.rss_warm),
            mib(i.rss_end),
            i.exit.as_deref().unwrap_or("?"),
            i.took.unwrap_or_default(),
            i.lifetime.as_secs_f64()
        );
    };
    row(a);
    for i in b {
        row(i);
    }
    row(c);
    let mut sum = StatsReply::default();
    for i in b {
        if let Some(c) = &i.counters {
            sum.add(c);
        }
    }
    println!("B total: {}", sum.line());
    println!(
        "RSS bound (A, C): after <= {RSS_FACTOR}x warm-up + {} MiB",
        RSS_SLACK_KIB / 1024
    );
}
