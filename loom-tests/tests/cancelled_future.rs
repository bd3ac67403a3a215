//! loom models: `cancelled()` futures race the cancellation (no lost
//! wake-up).
//!
//! The futures are driven by `loom::future::block_on`, whose waker parks the
//! loom thread: if a wake-up were lost, the thread would never be unparked
//! and loom reports a deadlock. `block_on` may also be woken spuriously;
//! loom explores both branches.
//!
//! * `cancelled_future_vs_abort`: the primary waiter (the slot's
//!   `AtomicWaker`, the loom-visible copy in `src/loom_waker.rs`).
//! * `two_cancelled_futures_vs_fault`: a second future on the same call
//!   waits in the channel's overflow list; both are woken, with the reason.
#![cfg(loom)]

mod common;

use common::{spawn_abort, spawn_fault};

use core::future::Future;
use core::pin::pin;
use core::task::Poll;

use callcancel::{CancelReason, ServiceHost};

#[test]
fn cancelled_future_vs_abort() {
    loom::model(|| {
        let host = ServiceHost::new();
        let call = host.begin_call().unwrap();
        let aborter = spawn_abort(&host);
        let reason = loom::future::block_on(call.cancelled());
        assert_eq!(reason, CancelReason::HostAbort);
        aborter.join().unwrap();
        call.complete();
        assert_eq!(host.in_flight(), 0);
    });
}

#[test]
fn two_cancelled_futures_vs_fault() {
    loom::model(|| {
        let host = ServiceHost::new();
        let channel = host.open_channel().unwrap();
        let call = channel.begin_call().unwrap();
        let faulter = spawn_fault(&channel);
        let (r1, r2) = loom::future::block_on(async {
            let mut first = pin!(call.cancelled());
            let mut second = pin!(call.cancelled());
            let (mut a, mut b) = (None, None);
            core::future::poll_fn(|cx| {
                if a.is_none() {
                    if let Poll::Ready(r) = first.as_mut().poll(cx) {
                        a = Some(r);
                    }
                }
                if b.is_none() {
                    if let Poll::Ready(r) = second.as_mut().poll(cx) {
                        b = Some(r);
                    }
                }
                match (a, b) {
                    (Some(a), Some(b)) => Poll::Ready((a, b)),
                    _ => Poll::Pending,
                }
            })
            .await
        });
        assert_eq!(r1, CancelReason::ChannelFaulted);
        assert_eq!(r2, CancelReason::ChannelFaulted);
        faulter.join().unwrap();
        call.complete();
        assert_eq!(host.in_flight(), 0);
    });
}
