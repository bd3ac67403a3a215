//! loom model: a `CancelWatch` future re-polled while its call completes and
//! the slot is reused by the next call (issue 12 #1).
//!
//! A watch may outlive its call; before the fix its future could become the
//! slot's primary waiter and, re-polled across the reuse, overwrite the *new*
//! call's primary waker, so the new call's `cancelled()` was never woken
//! (a lost wake-up: loom reports the `block_on` deadlock). Watches now always
//! park in the channel's overflow list (mutant `watch_primary` restores the
//! bug).
#![cfg(loom)]

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Waker};

use callcancel::{CancelReason, ServiceHost};

#[test]
fn watch_repolled_across_slot_reuse() {
    loom::model(|| {
        let host = ServiceHost::new();
        let channel = host.open_channel().unwrap();
        let first = channel.begin_call().unwrap();
        // Occupy the segment's other slot: the second call below must reuse
        // the first one's slot.
        let filler = channel.begin_call().unwrap();
        let watch = first.watch();
        let poller = loom::thread::spawn(move || {
            let mut fut = pin!(watch.cancelled());
            let mut cx = Context::from_waker(Waker::noop());
            // A first poll parks; a second (a spurious re-poll) may land
            // after the call completed and the slot serves the next call.
            if fut.as_mut().poll(&mut cx).is_pending() {
                let _ = fut.as_mut().poll(&mut cx);
            }
        });
        first.complete();
        let second = channel.begin_call().unwrap();
        let faulter = {
            let channel = channel.clone();
            loom::thread::spawn(move || {
                loom::thread::yield_now();
                channel.fault();
            })
        };
        // The new call's own waiter must be woken by the fault.
        let reason = loom::future::block_on(second.cancelled());
        assert_eq!(reason, CancelReason::ChannelFaulted);
        poller.join().unwrap();
        faulter.join().unwrap();
        second.complete();
        drop(filler);
        assert_eq!(host.in_flight(), 0);
    });
}
