//! Layer 4: what a host's channels keep alive — its core (state word,
//! counters, idle wake-ups) and its table of channels — in one allocation,
//! behind the one `Arc` every channel holds anyway.
//!
//! The table used to live beside the core, in the host's handles' shared
//! state: a channel could not reach it after open, and its table entry held
//! the chunk by a reference count of its own. Here a channel reaches the
//! table for as long as it lives, so it takes its entry lazily, with its
//! first call (`engine/channel.rs`), and the entry needs no count.

use core::ops::Deref;

use crate::store::host_core::HostCore;
use crate::store::table::ChannelTable;

/// A host's core and channel table (generic over the channel type: the
/// store layer names no engine type).
pub(crate) struct HostStore<T> {
    pub(crate) core: HostCore,
    pub(crate) table: ChannelTable<T>,
}

impl<T: Send + Sync + 'static> HostStore<T> {
    pub(crate) fn new() -> Self {
        Self {
            core: HostCore::new(),
            table: ChannelTable::new(),
        }
    }
}

impl<T> Deref for HostStore<T> {
    type Target = HostCore;

    fn deref(&self) -> &HostCore {
        &self.core
    }
}
