//! Layer 5: the async layer — futures over the engine. Runtime-agnostic:
//! they park wakers, never spawn.

pub(crate) mod cancel;
pub(crate) mod close;
pub(crate) mod idle;
