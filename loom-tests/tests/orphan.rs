//! loom model: the last `Channel` handle drops while the channel's last call
//! is in its finishing phase (issue 12 #2). The channel must be disposed by
//! one of the two on every interleaving — not left for a later pass over the
//! host's table. `HostStats::channels` counts channels not yet disposed
//! (mutant `no_duty` leaves it at 1).
#![cfg(loom)]

mod common;

use callcancel::ServiceHost;
use common::Probe;

#[test]
fn last_handle_vs_finishing_free() {
    loom::model(|| {
        let host = ServiceHost::new();
        let channel = host.open_channel().unwrap();
        let call = channel.begin_call().unwrap();
        let p = Probe::new();
        p.register(&call).unwrap();
        let owner = loom::thread::spawn(move || call.complete());
        drop(channel);
        owner.join().unwrap();
        p.assert_settled();
        let stats = host.stats();
        assert_eq!(stats.in_flight, 0);
        assert_eq!(stats.channels, 0, "the orphaned channel was disposed");
    });
}
