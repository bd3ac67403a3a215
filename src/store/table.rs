//! Layer 4: the host's table of channels, generic over what it holds.
//!
//! The host reaches its channels through an `ArcSwap` snapshot of a list of
//! fixed-size chunks; each chunk entry is an atomic pointer holding a
//! `Weak<T>` turned raw. A channel's first call CASes an empty entry
//! (reserved), then publishes the channel's weak reference in it (a CAS
//! from reserved, so racing first calls publish once: `engine/channel.rs`
//! `enter_table`); a channel that never runs a call never touches the
//! table. Only appending a chunk (every `CHUNK` channels) or compacting
//! replaces the snapshot.
//! Dropping a channel (its last handle and last call gone) clears its entry
//! and hands the table's weak reference to **crossbeam-epoch** (`defer`):
//! a sweeper that loaded the raw pointer inside a pinned epoch may still
//! `upgrade` it, because the weak count it relies on is released only after
//! every such pin has ended.
//!
//! A sweeper therefore does `pin → load entry → upgrade → unpin` and only
//! then sweeps the channel while holding a strong `Arc`. No pin is ever held
//! while user code runs: a cancel callback that blocks for an hour stalls
//! neither epoch reclamation nor other sweeps. Callback storage itself lives
//! in the slot, whose memory is kept alive by that `Arc`; which thread may
//! touch it is decided by the state word (`state.rs`).

use core::mem::ManuallyDrop;
use core::ptr::{self, NonNull};

use crate::sync::{epoch, Arc, ArcSwap, AtomicPtr, AtomicUsize, Ordering, Weak};

/// Entries per table chunk.
#[cfg(not(loom))]
const CHUNK: usize = 64;
#[cfg(loom)]
const CHUNK: usize = 2;

/// A fixed block of channel-table entries. Each entry is null, [`reserved`],
/// or a `Weak<T>` made raw by `Weak::into_raw`. Aligned so that a
/// [`TableEntry`] packs its chunk's address and its index into one word.
#[repr(align(64))]
pub(crate) struct TableChunk<T> {
    entries: [AtomicPtr<T>; CHUNK],
    /// Entries reserved or published, plus reservers at work in this chunk;
    /// [`CLOSED`] once compaction removed the chunk (nobody reserves in it
    /// again). A walk skips chunks with nothing live.
    live: AtomicUsize,
}

/// `TableChunk::live` of a chunk removed by compaction.
const CLOSED: usize = usize::MAX;

/// Marks an entry taken by a channel's first call that has not stored its
/// channel yet. Never dereferenced.
fn reserved<T>() -> *mut T {
    NonNull::<T>::dangling().as_ptr()
}

impl<T> TableChunk<T> {
    fn new() -> Self {
        Self {
            entries: core::array::from_fn(|_| AtomicPtr::new(ptr::null_mut())),
            live: AtomicUsize::new(0),
        }
    }

    /// Announces a reserver (or keeps a reserved entry counted); fails on a
    /// closed chunk.
    ///
    /// Ordering: SeqCst: the increment precedes the reserver's entry CAS,
    /// publication and `SeqCst` re-check of the host state, so a sweep that
    /// follows an abort in the `SeqCst` order and reads `live` sees it (R4),
    /// and compaction's `0 → CLOSED` CAS fails against it.
    fn enter(&self) -> bool {
        let mut cur = self.live.load(Ordering::SeqCst);
        loop {
            if cur == CLOSED {
                return false;
            }
            match self
                .live
                .compare_exchange_weak(cur, cur + 1, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Undoes [`TableChunk::enter`] (the reserver found no free entry, or a
    /// reserved entry was retired).
    fn leave(&self) {
        // Ordering: SeqCst, as in `enter`.
        self.live.fetch_sub(1, Ordering::SeqCst);
    }

    /// Whether a walk must look at the entries. Ordering: SeqCst (`enter`).
    fn has_live(&self) -> bool {
        !matches!(self.live.load(Ordering::SeqCst), 0 | CLOSED)
    }
}

/// Where a channel sits in the host's table: a chunk and an index, packed
/// into one tagged pointer ([`TableEntry::pack`]: the index in the chunk
/// address's low bits, provenance kept) so that a channel can take its
/// entry with one CAS (`engine/channel.rs`).
///
/// No reference count on the chunk (it would be a line shared by the
/// chunk's 64 channels): a reserved or published entry keeps its chunk's
/// `live` count above zero, so compaction never removes the chunk from the
/// table, and the holder keeps the table alive (a channel holds its host's
/// store). Hence the `unsafe` methods: their contract is that one.
pub(crate) struct TableEntry<T> {
    chunk: NonNull<TableChunk<T>>,
    index: usize,
}

impl<T> Clone for TableEntry<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for TableEntry<T> {}

impl<T: Send + Sync + 'static> TableEntry<T> {
    /// The entry as one non-null tagged pointer.
    pub(crate) fn pack(self) -> *mut TableChunk<T> {
        const { assert!(CHUNK <= core::mem::align_of::<TableChunk<()>>()) };
        let index = self.index;
        self.chunk.as_ptr().map_addr(|a| a | index)
    }

    /// The entry `pack` made, or `None` for null. Only address arithmetic:
    /// using the entry is what needs its contract (the `unsafe` methods).
    pub(crate) fn unpack(packed: *mut TableChunk<T>) -> Option<Self> {
        let low = core::mem::align_of::<TableChunk<T>>() - 1;
        let chunk = NonNull::new(packed.map_addr(|a| a & !low))?;
        Some(Self {
            chunk,
            index: packed.addr() & low,
        })
    }

    /// # Safety
    /// See the type's docs: the entry is reserved or published (not
    /// retired), and its table is alive.
    unsafe fn chunk(&self) -> &TableChunk<T> {
        // SAFETY: per the contract the chunk is still in the live table.
        unsafe { self.chunk.as_ref() }
    }

    /// Stores the channel's weak reference in its reserved entry, unless
    /// somebody did already (two first calls of a channel racing): `false`
    /// then. Wait-free.
    ///
    /// # Safety
    /// As [`TableEntry::chunk`].
    pub(crate) unsafe fn publish_once(&self, channel: &Arc<T>) -> bool {
        let raw = Weak::into_raw(Arc::downgrade(channel)).cast_mut();
        // SAFETY: per our contract.
        let entry = &unsafe { self.chunk() }.entries[self.index];
        // Ordering: SeqCst. Its release part lets a sweeper's load see an
        // initialised pointer; as a SeqCst write it precedes the publisher's
        // SeqCst claim and re-check of the host state (and, through the
        // channel's `REGISTERED` bit, every other first call's), so a sweep
        // that follows an abort in the SeqCst order finds every channel with
        // a call that slipped past it (R4).
        match entry.compare_exchange(reserved::<T>(), raw, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) => true,
            Err(_published) => {
                // SAFETY: from `Weak::into_raw` just above, never shared.
                drop(unsafe { Weak::from_raw(raw) });
                false
            }
        }
    }

    /// Clears the entry and retires the table's weak reference through the
    /// epoch (see the module docs). Called when the stored value drops, or
    /// by a first call that lost the race to give its channel an entry (a
    /// reserved entry: nothing to defer).
    ///
    /// # Safety
    /// As [`TableEntry::chunk`]; called once per reservation.
    pub(crate) unsafe fn retire(&self) {
        // SAFETY: per our contract.
        let chunk = unsafe { self.chunk() };
        let raw = chunk.entries[self.index].swap(ptr::null_mut(), Ordering::AcqRel);
        if raw.is_null() {
            return;
        }
        chunk.leave();
        if raw == reserved::<T>() {
            return;
        }
        // SAFETY: `raw` came from `Weak::into_raw` in `publish_once`, and the swap
        // above removed it from the table, so this is its only owner.
        let weak = unsafe { Weak::from_raw(raw) };
        let guard = epoch::pin();
        // Sweepers that loaded `raw` before the swap are pinned; the weak
        // count (which keeps the allocation alive for their `upgrade`) is
        // dropped only once they have all unpinned.
        guard.defer(move || drop(weak));
    }
}

/// The host's table of channels. See the module docs.
pub(crate) struct ChannelTable<T> {
    chunks: ArcSwap<Vec<Arc<TableChunk<T>>>>,
    /// The chunk where the last reservation succeeded: the next scan starts
    /// there (and wraps), so opening many channels stays linear overall.
    cursor: AtomicUsize,
}

impl<T: Send + Sync + 'static> ChannelTable<T> {
    pub(crate) fn new() -> Self {
        Self {
            chunks: ArcSwap::from_pointee(Vec::new()),
            cursor: AtomicUsize::new(0),
        }
    }

    /// Reserves an entry for a new channel.
    pub(crate) fn reserve(&self) -> TableEntry<T> {
        loop {
            // A guard, not a clone: no RMW on the snapshot's shared count.
            let chunks = self.chunks.load();
            let n = chunks.len();
            // Ordering: Relaxed; the cursor is only where to start looking.
            let start = self.cursor.load(Ordering::Relaxed).min(n);
            for pos in (start..n).chain(0..start) {
                let chunk = &chunks[pos];
                if !chunk.enter() {
                    continue; // compacted away
                }
                for (index, entry) in chunk.entries.iter().enumerate() {
                    // Ordering: the Relaxed load only skips taken entries;
                    // the CAS decides (AcqRel: ordered after the retire that
                    // emptied the entry, before our publish).
                    if entry.load(Ordering::Relaxed).is_null()
                        && entry
                            .compare_exchange(
                                ptr::null_mut(),
                                reserved::<T>(),
                                Ordering::AcqRel,
                                Ordering::Relaxed,
                            )
                            .is_ok()
                    {
                        if pos != start {
                            self.cursor.store(pos, Ordering::Relaxed);
                        }
                        return TableEntry {
                            chunk: NonNull::from(&**chunk),
                            index,
                        };
                    }
                }
                chunk.leave();
            }
            // Every entry is taken: append a chunk unless somebody did.
            let seen = chunks.len();
            drop(chunks);
            self.chunks.rcu(|cur| {
                let mut next = Vec::clone(cur);
                if next.len() == seen {
                    next.push(Arc::new(TableChunk::new()));
                }
                next
            });
            self.cursor.store(seen, Ordering::Relaxed);
        }
    }

    /// Calls `f` with every live channel, holding a strong reference and no
    /// epoch pin while `f` runs. Costs what is live (chunks with nothing in
    /// them are skipped with one load), and gives back the table's tail
    /// once at least half of it is empty after a burst (see
    /// [`ChannelTable::compact`]).
    pub(crate) fn for_each(&self, mut f: impl FnMut(&Arc<T>)) {
        let chunks = self.chunks.load_full();
        let mut trailing_empty = 0;
        for chunk in chunks.iter() {
            if !chunk.has_live() {
                trailing_empty += 1;
                continue;
            }
            trailing_empty = 0;
            for entry in chunk.entries.iter() {
                let channel = {
                    let _guard = epoch::pin();
                    // Ordering: SeqCst, pairing with `publish_once` (see there).
                    let raw = entry.load(Ordering::SeqCst);
                    if raw.is_null() || raw == reserved::<T>() {
                        continue;
                    }
                    // SAFETY: `raw` came from `Weak::into_raw` in `publish_once`.
                    // The table's weak reference it stands for is released
                    // only through `guard.defer` in `retire`, after this pin
                    // ends, so the allocation is live; `ManuallyDrop` keeps us
                    // from releasing a weak count we do not own.
                    let weak = ManuallyDrop::new(unsafe { Weak::from_raw(raw) });
                    weak.upgrade()
                };
                if let Some(channel) = channel {
                    f(&channel);
                }
            }
        }
        if trailing_empty >= 2 && trailing_empty * 2 >= chunks.len() {
            drop(chunks);
            self.compact();
        }
    }

    /// Removes empty chunks from the end of the table: closes them from the
    /// last one backwards (`0 → CLOSED`, which fails against any reserver
    /// or live entry), then drops the closed tail from the snapshot. No lock;
    /// a reserver that still holds the old snapshot skips a closed chunk.
    fn compact(&self) {
        let chunks = self.chunks.load_full();
        for chunk in chunks.iter().rev() {
            // Ordering: SeqCst, against `TableChunk::enter`.
            if chunk
                .live
                .compare_exchange(0, CLOSED, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
                && chunk.live.load(Ordering::SeqCst) != CLOSED
            {
                break;
            }
        }
        // Every closed chunk goes, wherever it is (a chunk appended meanwhile
        // may stand behind them): a closed chunk had `live` 0, so no entry
        // names it (and CLOSED is final), and the position is only the
        // reservers' starting hint.
        self.chunks.rcu(|cur| {
            let mut next = Vec::clone(cur);
            next.retain(|c| c.live.load(Ordering::SeqCst) != CLOSED);
            next
        });
    }

    /// Chunks in the table (for tests).
    #[cfg(test)]
    pub(crate) fn chunk_count(&self) -> usize {
        self.chunks.load().len()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn the_table_gives_its_tail_back_after_a_burst() {
        let table = ChannelTable::<u64>::new();
        let values: Vec<_> = (0..20 * CHUNK as u64).map(Arc::new).collect();
        let publish = |v: &Arc<u64>| {
            let e = table.reserve();
            // SAFETY: reserved just now; `table` outlives the entries.
            assert!(unsafe { e.publish_once(v) });
            // SAFETY: as above: published already, so a second try fails.
            assert!(!unsafe { e.publish_once(v) });
            e
        };
        let entries: Vec<_> = values.iter().map(publish).collect();
        assert_eq!(table.chunk_count(), 20);
        let mut seen = 0;
        table.for_each(|_| seen += 1);
        assert_eq!(seen, 20 * CHUNK);
        // Keep the first channel, drop the rest.
        for e in &entries[1..] {
            // SAFETY: published, retired once.
            unsafe { e.retire() };
        }
        let mut seen = 0;
        table.for_each(|_| seen += 1); // skips the empty chunks, compacts
        assert_eq!(seen, 1);
        assert_eq!(table.chunk_count(), 1, "the empty tail was given back");
        // The table still works: new reservations, in old or new chunks,
        // and an entry survives packing.
        let more: Vec<_> = (0..3 * CHUNK)
            .map(|i| {
                let e = publish(&values[i]);
                let back = TableEntry::<u64>::unpack(e.pack()).unwrap();
                assert_eq!((back.chunk, back.index), (e.chunk, e.index));
                back
            })
            .collect();
        let mut seen = 0;
        table.for_each(|_| seen += 1);
        assert_eq!(seen, 1 + 3 * CHUNK);
        for e in more.iter().chain(&entries[..1]) {
            // SAFETY: published, retired once.
            unsafe { e.retire() };
        }
    }
}
