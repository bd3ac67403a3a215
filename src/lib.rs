//! # callcancel
//!
//! The *call cancellation* model of the Windows Web Services API (WWSAPI) for
//! a Rust service host, as a lock-free core: a [`ServiceHost`] accepts
//! [`Channel`]s, channels carry [`Call`]s, and while a call runs it may
//! register **one** cancel callback with application state and an optional
//! free-state hook ([`OperationContext::register_for_cancel_with_free`],
//! WWSAPI `WsRegisterOperationForCancel`). Aborting the host cancels every
//! pending call with [`CancelReason::HostAbort`]; faulting a channel cancels
//! its calls with [`CancelReason::ChannelFaulted`].
//!
//! ```
//! use callcancel::{CancelReason, ServiceHost};
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::Arc;
//! use std::time::Duration;
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
//! assert_eq!(host.close(Duration::from_secs(1)), Ok(()));
//! ```
//!
//! # Guarantees
//!
//! * **R1 cancel-once**: a call's cancel callback runs at most once, whatever
//!   races.
//! * **R2 free-once**: a successful registration's state is freed exactly
//!   once; a refused one comes back in the [`RegisterError`] and none of its
//!   callbacks runs.
//! * **R3 free-after-cancel**: the free never starts before the cancel
//!   callback returned; completion does not wait for a running callback —
//!   whoever finishes last frees.
//! * **R4 no lost cancellation**: a call in flight when its channel faults or
//!   its host aborts is cancelled with that reason; if the cancel came first,
//!   the callback runs inside the registration.
//! * **R5 first reason wins**; **R6** nothing runs for a call that completed
//!   uncancelled.
//! * **A1–A4**: see [`ServiceHost::abort`] and [`ServiceHost::close`]. A
//!   panicking cancel callback does not stop a sweep; the first panic is
//!   re-raised from `abort`/`fault` once every call was notified.
//!
//! # How
//!
//! Each call's state is **one atomic word** (`state.rs` in the source draws
//! the state machine), in a slot of its channel's slab that is reused by
//! generation. The host reaches its channels through an `arc-swap` snapshot
//! of a table whose entries are reclaimed through **crossbeam-epoch**; no
//! epoch pin is held while user code runs. `cancelled()` parks on
//! **atomic-waker**. The hot path (`begin_call`, register, complete) is two
//! read-modify-writes on the call's own state word plus two plain stores (a
//! thread re-occupies its leased slot with a store; abort, fault and close
//! pay a process-wide `membarrier` for that instead: see the README's
//! Design section), with no allocation for a state and closures of up to three words, and no
//! reference count: it writes no line shared by every call of the host (nor,
//! in the steady state, by every call of the channel).
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
