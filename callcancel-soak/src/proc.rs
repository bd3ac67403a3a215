//! The demo server processes: start (and read the first line), RSS,
//! graceful SIGTERM with exit status and final counters line, and a kill on
//! every other exit path (drop guard, and the parent-death signal if the
//! driver itself is killed).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::proto::StatsReply;

/// How long a demo may take to print its first line.
const START_BOUND: Duration = Duration::from_secs(15);
/// Lines of a demo's stderr kept for a failure report.
const STDERR_KEEP: usize = 20;

/// One demo process (one incarnation of a server).
pub struct Server {
    pub name: String,
    pub pid: u32,
    pub port: u16,
    pub close_timeout_ms: u64,
    pub started_at: Instant,
    child: Option<Child>,
    /// stdout lines after the first.
    lines: Receiver<String>,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

/// What a graceful stop left: exit status and the final counters line.
pub struct Exit {
    pub status: ExitStatus,
    pub line: Option<String>,
    pub counters: Result<StatsReply, String>,
    pub took: Duration,
}

/// Why a start failed: `bind` if the demo exited before its first line
/// (its port may still be held: worth a retry).
pub struct StartError {
    pub msg: String,
    pub exited_early: bool,
}

impl Server {
    /// Starts `bin --port PORT [--next 127.0.0.1:NEXT] --close-timeout-ms N`
    /// and waits for `listening on 127.0.0.1:PORT`.
    pub fn start(
        bin: &Path,
        name: &str,
        port: u16,
        next: Option<u16>,
        close_timeout_ms: u64,
    ) -> Result<Server, StartError> {
        let mut cmd = Command::new(bin);
        cmd.arg("--port")
            .arg(port.to_string())
            .arg("--close-timeout-ms")
            .arg(close_timeout_ms.to_string());
        if let Some(n) = next {
            cmd.arg("--next").arg(format!("127.0.0.1:{n}"));
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt;
            // If the driver dies without running its guards (SIGKILL, abort),
            // the kernel kills the demo. The signal follows the *thread* that
            // forked: every spawn happens on the driver's main thread, which
            // lives as long as the driver.
            // SAFETY: prctl is async-signal-safe; nothing else runs here.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().map_err(|e| StartError {
            msg: format!("{name}: spawn {}: {e}", bin.display()),
            exited_early: false,
        })?;
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        std::thread::Builder::new()
            .name(format!("{name}-stdout"))
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })
            .expect("stdout thread");
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        let keep = Arc::clone(&stderr);
        let err = child.stderr.take().expect("piped stderr");
        // SOAK_LOG_DIR: each demo's whole stderr (with RUST_LOG, its tracing)
        // goes to DIR/NAME.log as well.
        let mut log = std::env::var_os("SOAK_LOG_DIR").and_then(|d| {
            let p = Path::new(&d).join(format!("{}.log", name.replace('#', "")));
            std::fs::File::create(p).ok()
        });
        std::thread::Builder::new()
            .name(format!("{name}-stderr"))
            .spawn(move || {
                for line in BufReader::new(err).lines() {
                    let Ok(line) = line else { break };
                    if let Some(f) = log.as_mut() {
                        use std::io::Write;
                        let _ = writeln!(f, "{line}");
                    }
                    let mut k = keep.lock().unwrap();
                    if k.len() == STDERR_KEEP {
                        k.pop_front();
                    }
                    k.push_back(line);
                }
            })
            .expect("stderr thread");
        let mut server = Server {
            name: name.to_string(),
            pid,
            port: 0,
            close_timeout_ms,
            started_at: Instant::now(),
            child: Some(child),
            lines: rx,
            stderr,
        };
        let first = match server.lines.recv_timeout(START_BOUND) {
            Ok(l) => l,
            Err(e) => {
                // Reap it (the guard would kill it anyway) to tell an early
                // exit (port still taken) from a hang.
                let exited = match e {
                    RecvTimeoutError::Disconnected => {
                        server.wait_exit(Duration::from_secs(2)).is_some()
                    }
                    RecvTimeoutError::Timeout => false,
                };
                return Err(StartError {
                    msg: format!(
                        "{name}: no first line within {START_BOUND:?} ({e:?}); stderr: {}",
                        server.stderr_tail()
                    ),
                    exited_early: exited,
                });
            }
        };
        let port_str = first.strip_prefix("listening on 127.0.0.1:");
        match port_str.and_then(|p| p.parse::<u16>().ok()) {
            Some(p) if p != 0 && (port == 0 || p == port) => server.port = p,
            _ => {
                return Err(StartError {
                    msg: format!("{name}: bad first line {first:?} (asked for port {port})"),
                    exited_early: false,
                })
            }
        }
        Ok(server)
    }

    /// `VmRSS` in KiB from `/proc/PID/status`.
    pub fn rss_kib(&self) -> Option<u64> {
        rss_kib(self.pid)
    }

    /// The process's exit status if it exited (reaps it).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(st)) => {
                self.child = None;
                Some(st)
            }
            _ => None,
        }
    }

    /// Waits up to `bound` for the process to exit (polling; called on the
    /// driver's main thread, which does nothing else meanwhile).
    fn wait_exit(&mut self, bound: Duration) -> Option<ExitStatus> {
        let t0 = Instant::now();
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(st)) = child.try_wait() {
                self.child = None;
                return Some(st);
            }
            if t0.elapsed() >= bound {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGTERM, wait for exit (close timeout + `slack`), collect the final
    /// counters line. Err (after a SIGKILL) if it did not exit in time.
    pub fn terminate(&mut self, slack: Duration) -> Result<Exit, String> {
        let t0 = Instant::now();
        // SAFETY: kill(2) on our own, not yet reaped child.
        if self.child.is_some()
            && unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) } != 0
        {
            return Err(format!(
                "{}: kill(SIGTERM): {}",
                self.name,
                std::io::Error::last_os_error()
            ));
        }
        let bound = Duration::from_millis(self.close_timeout_ms) + slack;
        let Some(status) = self.wait_exit(bound) else {
            self.kill();
            return Err(format!(
                "{}: did not exit within {bound:?} of SIGTERM (killed); stderr: {}",
                self.name,
                self.stderr_tail()
            ));
        };
        let took = t0.elapsed();
        // The stdout thread ends at EOF; the final line is the last one.
        let mut line = None;
        let t1 = Instant::now();
        loop {
            match self.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(l) => line = Some(l),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) if t1.elapsed() > Duration::from_secs(3) => break,
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
        let counters = match &line {
            Some(l) => StatsReply::parse_line(l),
            None => Err("no counters line".into()),
        };
        Ok(Exit {
            status,
            line,
            counters,
            took,
        })
    }

    /// SIGKILL and reap, if still running.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn stderr_tail(&self) -> String {
        let k = self.stderr.lock().unwrap();
        if k.is_empty() {
            "(empty)".into()
        } else {
            k.iter().cloned().collect::<Vec<_>>().join(" | ")
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `VmRSS` of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The demo binary: first argument, else `SOAK_DEMO`, else
/// `$CARGO_TARGET_DIR/release/examples/grpc_demo` (or `target/…`).
pub fn demo_path() -> PathBuf {
    if let Some(p) = std::env::args_os().nth(1) {
        return p.into();
    }
    if let Some(p) = std::env::var_os("SOAK_DEMO") {
        return p.into();
    }
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    dir.join("release/examples/grpc_demo")
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_os = "linux")]
    fn reads_own_rss() {
        let kib = super::rss_kib(std::process::id()).expect("VmRSS");
        assert!(kib > 0);
    }
}
