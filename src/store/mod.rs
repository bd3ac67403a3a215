//! Layer 4: the structures the engine works on — slabs of slots, the host's
//! channel table (generic: it imports no channel type), the host core
//! (state word, idle wake-up, counters) and the overflow waiter lists.

pub(crate) mod host_core;
pub(crate) mod overflow;
pub(crate) mod slab;
pub(crate) mod table;
