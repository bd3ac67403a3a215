//! Layer 5: the engine — every protocol step lives here.
//!
//! * `channel.rs`: claim (`begin`), sweep, per-call cancel, registration,
//!   completion, free, release with duties, disposal, the idle census.
//! * `host.rs`: open, abort, close, the idle wait, the last handle's drop.

pub(crate) mod channel;
pub(crate) mod host;
