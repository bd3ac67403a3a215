//! # callcancel
//!
//! The *call cancellation* model of the Windows Web Services API (WWSAPI) for
//! a Rust service host, as a lock-free core: a [`ServiceHost`] accepts
//! [`Channel`]s, channels carry [`Call`]s, and while a call runs it may
//! register **one** cancel callback with application state and an optional
//! free-state hook ([`OperationContext::register_for_cancel_with_free`],
//! WWSAPI `WsRegisterOperationForCancel`). A call is cancelled for one of
//! four [`CancelReason`]s: its host was aborted (`HostAbort`), its channel
//! faulted (`ChannelFaulted`: the client went away), it alone was cancelled
//! (`CallCancelled`: a stream reset, or the call upstream of it was
//! cancelled) or its deadline passed (`DeadlineExceeded`).
//!
//! ```
//! use callcancel::{CancelReason, ServiceHost};
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::{mpsc, Arc};
//! use std::time::{Duration, Instant};
//!
//! let host = ServiceHost::new();
//! let channel = host.open_channel().unwrap();
//! let frees = Arc::new(AtomicUsize::new(0));
//!
//! let call = channel.begin_call().unwrap();
//! let f = Arc::clone(&frees);
//! call.register_for_cancel_with_free(
//!     String::from("request 7"),
//!     |reason, state| println!("{state}: cancelled ({reason})"),
//!     move |_state| {
//!         f.fetch_add(1, Ordering::SeqCst);
//!     },
//! )
//! .unwrap();
//!
//! channel.fault(); // the callback runs now, with ChannelFaulted
//! assert_eq!(call.cancel_reason(), Some(CancelReason::ChannelFaulted));
//! call.complete(); // the state is freed now, exactly once
//! assert_eq!(frees.load(Ordering::SeqCst), 1);
//!
//! // A call with a deadline: the crate's timer cancels it, never early.
//! let other = host.open_channel().unwrap();
//! let at = Instant::now() + Duration::from_millis(10);
//! let call = other.begin_call_with_deadline(at).unwrap();
//! let (tx, rx) = mpsc::channel();
//! call.register_for_cancel(tx, |reason, tx| tx.send(reason).unwrap()).unwrap();
//! assert_eq!(rx.recv().unwrap(), CancelReason::DeadlineExceeded);
//! drop(call);
//! assert_eq!(host.close(Duration::from_secs(1)), Ok(()));
//! ```
//!
//! # Guarantees
//!
//! * **R1 cancel-once**: a call's cancel callback runs at most once, whatever
//!   races.
//! * **R2 free-once**: a successful registration's state is freed exactly
//!   once (also when a callback or a drop panics); a refused one comes back
//!   in the [`RegisterError`] and none of its callbacks runs.
//! * **R3 free-after-cancel**: the free never starts before the cancel
//!   callback returned; completion does not wait for a running callback —
//!   whoever finishes last frees.
//! * **R4 no lost cancellation**: a call in flight when its channel faults,
//!   its host aborts, it is cancelled or its deadline passes is cancelled
//!   with that reason; if the cancel came first, the callback runs inside
//!   the registration.
//! * **R5 first reason wins**; **R6** nothing runs for a call that completed
//!   uncancelled.
//! * **R7 deadlines**: `DeadlineExceeded` is decided no earlier than the
//!   deadline, by the crate's own timer thread (started with the first
//!   deadline); a call that completes first leaves nothing in the timer.
//! * **A1–A4**: see [`ServiceHost::abort`] and [`ServiceHost::close`]. A
//!   panicking cancel callback does not stop a sweep; the first panic is
//!   re-raised from `abort`/`fault`/`cancel` once every call was notified
//!   (a callback run by the timer thread that panics is caught and dropped
//!   there). **A5**: dropping the last `ServiceHost` of an unclosed host
//!   aborts it.
//!
//! # How: the layers
//!
//! Every import points down; `ci/check_layers.py` (run by CI) fails on a
//! cycle or an upward import.
//!
//! ```text
//!  7 face    call.rs  channel.rs  host.rs         public types: delegation and docs only
//!  6 async   wait/cancel.rs  wait/idle.rs  wait/close.rs    futures over the engine
//!  5 engine  engine/channel.rs  engine/host.rs  engine/deadline.rs   every protocol step
//!  4 store   store/slab.rs (+ store/segment.rs)  store/table.rs  store/host_core.rs  store/overflow.rs  store/timer.rs
//!  3 slot    slot.rs         the state word, the callback cell and the waker of one call
//!  2 word    state.rs        the per-call state word: bits, state machine, transitions
//!  1 values  value/error.rs  value/panic.rs  value/stats.rs
//!  0 seam    sync.rs (+ loom_waker.rs)   std or loom, in one place
//! ```
//!
//! Where each rule is decided:
//!
//! | rule | decided in |
//! |---|---|
//! | R1 | `state.rs`: `CallState::request_cancel` (one CAS sets `CANCELLED`, and `CLAIMED` if registered) and `publish_registration` (`RunInline`) |
//! | R2, R3 | `state.rs`: `complete` / `finish_cancel` decide the freer, or, after a sweep's batched finish, `take_free` (`engine/channel.rs`: `ChannelShared::settle` and `complete`); `slot.rs`: `free_registration` (panic-safe) |
//! | R4 | `engine/channel.rs`: `ChannelShared::begin` (CAS, then `SeqCst` re-check) against `fault` / `engine/host.rs` `abort` (flag, then sweep); `state.rs`: `publish_registration`; `store/slab.rs`: `Slab::cover` (a claimer raises the `segments` bound a sweep scans below, before its claim); `engine/channel.rs`: `ChannelShared::enter_table` (a channel's first call publishes it in the host's table before its claim) |
//! | R5 | `state.rs`: the reason bits are written once, by the deciding CAS |
//! | R6 | `state.rs`: `request_cancel` skips `COMPLETED` and other generations |
//! | R7 | `engine/deadline.rs` (arm; disarm before completion; expiry decides through `decide_cancel` on the timer thread, a claimed callback runs on the `runners` pool); `store/timer.rs` (never early) |
//! | A1 | `engine/channel.rs`: `ChannelShared::sweep` (a losing sweeper waits for `STARTED`, set in the claim of a canceller that runs the callback at once, and takes over a callback claimed without it that did not start: `ChannelShared::await_started`, `CallState::try_start`) |
//! | A2 | `engine/host.rs`: `wait_idle_until`; `store/host_core.rs`: idle epoch; `state.rs`: `request_duty` / `release` (`DUTY`) |
//! | A3 | `store/host_core.rs`: `UserCode` / `running_for` (waits from a callback answer at once); no lock held across user code |
//! | A4 | `value/panic.rs`: `FirstPanic`; every user call site catches |
//! | A5 | `engine/host.rs`: `HostShared::drop_handle` (the last `ServiceHost` handle) |
//! | memory follows the load | `store/slab.rs`: `Slab::shrink` / `retire` / `Walk` / `SlotRef`, the `segments` bound (scans cost what is published); `store/table.rs`: `ChannelTable::compact` |
//! | a connection's fixed cost (W1, W3) | `store/slab.rs`: the first block (segment 0 + directory, one hand-aligned allocation: `store/segment.rs`; one spare per thread), `Slab::scan` (no walk while only segment 0 can be published) |
//!
//! Each call's state is **one atomic word** (`state.rs` draws the state
//! machine), in a slot of its channel's slab that is reused by generation.
//! The host reaches its channels through an `arc-swap` snapshot of a table
//! whose entries are released at once when no walk reads the table (a walker
//! count and a limbo for the rare overlap: `store/table.rs`); no walker is
//! announced while user code runs. `cancelled()` parks on **atomic-waker**. The
//! hot path (`begin_call`, register, complete) is four read-modify-writes on
//! the call's own state word (claim, register, complete, release), with no
//! allocation for a state and closures of up to three words, and no
//! reference count: it writes no line shared by every call of the host (nor,
//! in the steady state, by every call of the channel). `fault`, `cancel`
//! and deadline expiry cost what they touch: no lock shared by the host and
//! no process-wide barrier.
//!
//! # Memory ordering
//!
//! Everything the canceller did before deciding the cancellation is visible
//! to code that observes it through `is_cancelled()`, `cancel_reason()` or
//! `cancelled()`; everything the cancel callback did is visible to the
//! free-state.
//!
//! # Loom
//!
//! Built with `RUSTFLAGS="--cfg loom"`, the crate's atomics, cells and locks
//! are loom's, so a service can model-check its own use of callcancel.
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]
#![doc(test(attr(deny(warnings))))]

// Layer 0: the synchronisation seam.
#[cfg(loom)]
mod loom_waker;
mod sync;
// Layer 1: value types.
mod value;
// Layer 2: the state word.
mod state;
// Layer 3: the slot.
mod slot;
// Layer 4: slabs, the channel table, the host core, waiter lists.
mod store;
// Layer 5: the engine.
mod engine;
// Layer 6: the async layer.
mod wait;
// Layer 7: the public face.
mod call;
mod channel;
mod host;

pub use call::{Call, Cancelled, Canceller, OperationContext};
pub use channel::Channel;
pub use host::ServiceHost;
pub use value::error::{CancelReason, Error, HostState, RegisterError, RegisterErrorKind};
pub use value::stats::HostStats;
pub use wait::cancel::{CancelWatch, WatchCancelled};
pub use wait::idle::Idle;

/// Under `--cfg loom` only: expires every deadline due by `now` on the
/// calling (model) thread, since loom builds start no timer thread. Returns
/// how many entries expired.
#[cfg(loom)]
#[doc(hidden)]
pub fn loom_expire_deadlines(now: std::time::Instant) -> usize {
    engine::deadline::timer().run_expired(now)
}

/// Under `--cfg loom` only: table references of dropped channels still
/// parked in `host`'s table limbo (`store/table.rs`); zero once no walk of
/// the table is under way.
#[cfg(loom)]
#[doc(hidden)]
pub fn loom_parked_table_refs(host: &ServiceHost) -> usize {
    host.parked_table_refs()
}
