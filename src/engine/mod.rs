//! Layer 5: the engine — every protocol step lives here.
//!
//! * `channel.rs`: claim (`begin`), sweep, per-call cancel, registration,
//!   completion, free, release with duties, disposal, the idle census.
//! * `host.rs`: open, abort, close, the idle wait, the last handle's drop.
//! * `deadline.rs`: arming, disarming and expiring call deadlines; the
//!   runtime-agnostic sleep of `close_async`.

pub(crate) mod channel;
pub(crate) mod deadline;
pub(crate) mod host;
