//! loom model: a call registers its cancel callback while another thread
//! faults its channel.
//!
//! Rules: R1 (the callback runs once), R2 (the state is freed once, at
//! completion), R3 (never while the callback runs), R4 (the call was in
//! flight across the fault, so it is cancelled with `ChannelFaulted`, inline
//! in the registration if the fault came first).
#![cfg(loom)]

mod common;

use callcancel::{CancelReason, Error, ServiceHost};
use common::{spawn_fault, Probe};

#[test]
fn register_vs_channel_fault() {
    loom::model(|| {
        let host = ServiceHost::new();
        let channel = host.open_channel().unwrap();
        let call = channel.begin_call().unwrap();
        let p = Probe::new();

        let faulter = spawn_fault(&channel);
        p.register(&call).unwrap();
        faulter.join().unwrap();

        assert_eq!(p.cancels(), 1, "R1/R4: exactly one cancel");
        assert_eq!(p.reason(), Some(CancelReason::ChannelFaulted));
        assert_eq!(call.cancel_reason(), Some(CancelReason::ChannelFaulted));
        assert_eq!(p.frees(), 0, "R2: freed only at completion");
        assert_eq!(channel.begin_call().unwrap_err(), Error::ChannelFaulted);
        call.complete();
        p.assert_settled();
        assert_eq!(host.in_flight(), 0);
    });
}
