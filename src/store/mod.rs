//! Layer 4: the structures the engine works on — slabs of slots, the host's
//! channel table (generic: it imports no channel type), the host core
//! (state word, idle wake-up, counters), the overflow waiter lists, and the
//! deadline timer (a sharded hashed wheel, generic over its entries).

pub(crate) mod host_core;
pub(crate) mod host_store;
pub(crate) mod overflow;
pub(crate) mod segment;
pub(crate) mod slab;
pub(crate) mod table;
pub(crate) mod timer;
