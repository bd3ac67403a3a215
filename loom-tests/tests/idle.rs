//! loom models: waiting for the host to become idle races the last
//! completion (the idle Dekker pair of `host.rs`: no lost notification).
//!
//! loom's `Condvar::wait_timeout` ignores the timeout (it is an untimed
//! wait), so each model waits only where some thread is certain to complete
//! the last call: a lost notification is a deadlock, which loom reports.
//!
//! * `wait_idle_vs_last_completion` (three threads): an abort's callback and
//!   the owner's completion race; whichever finishes last frees and
//!   releases, and `wait_idle` returns only after that (A2: a call counts
//!   until its callback and free-state returned).
//! * `idle_future_vs_last_completion`: the async twin, `idle()`.
//!
//! Bound: `LOOM_MAX_PREEMPTIONS=2` in CI for the three-thread model.
#![cfg(loom)]

mod common;

use std::time::Duration;

use callcancel::{HostState, ServiceHost};
use common::{spawn_abort, Probe};

#[test]
fn wait_idle_vs_last_completion() {
    loom::model(|| {
        let host = ServiceHost::new();
        let channel = host.open_channel().unwrap();
        let call = channel.begin_call().unwrap();
        let p = Probe::new();
        p.register(&call).unwrap();

        let aborter = spawn_abort(&host);
        let owner = loom::thread::spawn(move || call.complete());
        assert!(host.wait_idle(Duration::from_secs(3600)), "A2: idle");
        // Idle means the free-state (whoever ran it) has returned.
        assert_eq!(p.frees(), 1);
        owner.join().unwrap();
        aborter.join().unwrap();
        p.assert_settled();
        drop(channel);
        assert_eq!(host.close(Duration::from_secs(3600)), Ok(()));
        assert_eq!(host.state(), HostState::Closed);
    });
}

#[test]
fn idle_future_vs_last_completion() {
    loom::model(|| {
        let host = ServiceHost::new();
        let call = host.begin_call().unwrap();
        let owner = loom::thread::spawn(move || call.complete());
        loom::future::block_on(host.idle());
        assert_eq!(host.in_flight(), 0);
        owner.join().unwrap();
    });
}
