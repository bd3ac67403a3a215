//! [`HostStats`]: a snapshot of a host's counters.

use crate::CancelReason;

/// A snapshot of a [`ServiceHost`](crate::ServiceHost)'s counters, from
/// [`ServiceHost::stats`](crate::ServiceHost::stats).
///
/// Counters are counted off the hot path (a begin, register and complete
/// that nobody cancels touches none of them). A sweep (`fault`, `abort`)
/// counts its cancellations once, when it is done with its channel: a
/// snapshot taken while a sweep runs (also from inside one of its
/// callbacks) may not include them yet.
/// Counters only grow, with one exception: a call that a sweep marked while
/// its own `begin_call` was refusing it (it never reached the user) is
/// counted by the sweep and taken back by the refusal, in either order, so
/// a snapshot in between may show one more, or one fewer, than before.
///
/// ```
/// use callcancel::{CancelReason, ServiceHost};
/// let host = ServiceHost::new();
/// let call = host.begin_call().unwrap();
/// assert!(call.cancel());
/// let stats = host.stats();
/// assert_eq!(stats.cancelled(CancelReason::CallCancelled), 1);
/// assert_eq!(stats.in_flight, 1);
/// drop(call);
/// let channel = host.open_channel().unwrap();
/// channel.fault();
/// assert!(channel.begin_call().is_err());
/// host.abort();
/// assert!(host.begin_call().is_err());
/// let stats = host.stats();
/// assert_eq!((stats.refused, stats.refused_channel_faulted), (2, 1));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostStats {
    /// Calls in flight when the snapshot was taken (as
    /// [`ServiceHost::in_flight`](crate::ServiceHost::in_flight)).
    pub in_flight: usize,
    /// `begin_call`s and `open_channel`s turned away (host aborted, closing
    /// or closed; channel faulted).
    pub refused: u64,
    /// Of `refused`, the `begin_call`s turned away because their channel
    /// was faulted (so `refused - refused_channel_faulted` is what the host
    /// itself, aborted, closing or closed, turned away).
    pub refused_channel_faulted: u64,
    /// Channels not yet disposed of: open ones, and ones whose handles are
    /// gone but whose calls are still finishing (host-scope shards are not
    /// counted). Returns to zero once every channel was dropped and its
    /// calls completed.
    pub channels: usize,
    pub(crate) cancelled: [u64; 4],
}

impl HostStats {
    /// Calls cancelled with `reason`, whether or not the call had registered
    /// a callback. Counted after the deciding RMW: by `cancel()` and a
    /// deadline right after it, by a sweep when it is done with the
    /// channel (one count per sweep, not per call). A snapshot taken in
    /// between, even by a thread that already sees `cancel_reason()`, may
    /// not include it yet.
    pub fn cancelled(&self, reason: CancelReason) -> u64 {
        self.cancelled[reason_index(reason)]
    }
}

/// The index of `reason` in per-reason arrays.
pub(crate) fn reason_index(reason: CancelReason) -> usize {
    match reason {
        CancelReason::HostAbort => 0,
        CancelReason::ChannelFaulted => 1,
        CancelReason::CallCancelled => 2,
        CancelReason::DeadlineExceeded => 3,
    }
}

/// `reason` as a nonzero byte (0 = none), for atomics.
pub(crate) fn reason_to_code(reason: CancelReason) -> u8 {
    reason_index(reason) as u8 + 1
}

/// The inverse of [`reason_to_code`].
pub(crate) fn reason_from_code(code: u8) -> Option<CancelReason> {
    Some(match code {
        1 => CancelReason::HostAbort,
        2 => CancelReason::ChannelFaulted,
        3 => CancelReason::CallCancelled,
        4 => CancelReason::DeadlineExceeded,
        _ => return None,
    })
}
