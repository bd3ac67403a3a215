//! Layer 1: the small value types every other layer uses (no protocol).
//!
//! Public: [`CancelReason`], [`HostState`], [`Error`], [`RegisterError`],
//! [`RegisterErrorKind`], [`HostStats`]. Internal: panic capture
//! ([`panic`]), so that user code can panic without tearing a protocol step.

pub(crate) mod error;
pub(crate) mod panic;
pub(crate) mod stats;
