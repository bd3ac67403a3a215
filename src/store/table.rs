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
//! and releases the table's weak reference **at once** when no walk is
//! reading the table, which is the usual case: a walk (an abort, a census,
//! `in_flight`) announces itself in the table's `walkers` count around each
//! `load entry → upgrade`, and a retirer that clears an entry and then
//! finds a walker announced parks the weak reference in the table's
//! `limbo` instead; whoever next finds no walker (the last walker leaving,
//! or the retirer looking again) drops the parked ones. (This replaced
//! crossbeam-epoch, whose deferred frees cost a connection ~60 ns in W1:
//! BENCHMARKS.md.)
//!
//! A walker therefore does `announce → load entry → upgrade → leave` and
//! only then sweeps the channel while holding a strong `Arc`. No walker is
//! announced while user code runs: a cancel callback that blocks for an
//! hour delays nobody's reclamation but the weak references retired during
//! the few instructions of some walker's `load → upgrade`. Callback storage
//! itself lives in the slot, whose memory is kept alive by that `Arc`;
//! which thread may touch it is decided by the state word (`state.rs`).
//!
//! # The reclamation handshake (a Dekker pair on `walkers`)
//!
//! ```text
//!  walker:   walkers += 1 (SeqCst) ─▶ load entry (SeqCst) ─▶ upgrade ─▶ walkers -= 1 (SeqCst) ─▶ load limbo flag (SeqCst)
//!  retirer:  swap entry → null (SeqCst) ─▶ load walkers (SeqCst): 0 → drop the weak now
//!                                                          else → park it in limbo, set the flag (SeqCst), load walkers again
//! ```
//!
//! In the single `SeqCst` order, a walker that can still see the raw
//! pointer (its load precedes the swap) announced itself before the swap,
//! so a retirer that reads `walkers == 0` after its swap knows no walker
//! holds the pointer. A parked reference is dropped only by a thread that
//! reads `walkers == 0` *under the limbo lock* (`ChannelTable::drain`):
//! every parked reference was swapped out before it was parked, so every
//! walker that could have loaded it was announced then and has left since.
//! The flag makes the last walker to leave (or the retirer's second look)
//! drain: the retirer stores it before its second look, the walker reads it
//! after its decrement, so one of the two sees the other.

use core::mem::ManuallyDrop;
use core::ptr::{self, NonNull};

use crate::store::host_core::Padded;
use crate::sync::{lock, Arc, ArcSwap, AtomicBool, AtomicPtr, AtomicUsize, Mutex, Ordering, Weak};

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

    /// Clears the entry and releases the table's weak reference, at once
    /// unless a walk may be reading it (then it is parked in the table's
    /// limbo: see the module docs). Called when the stored value drops, or
    /// by a first call that lost the race to give its channel an entry (a
    /// reserved entry: nothing to release).
    ///
    /// # Safety
    /// As [`TableEntry::chunk`], and `table` is the entry's table; called
    /// once per reservation.
    pub(crate) unsafe fn retire(&self, table: &ChannelTable<T>) {
        // SAFETY: per our contract.
        let chunk = unsafe { self.chunk() };
        // Ordering: SeqCst, the retirer's first half of the reclamation
        // handshake (module docs): a walker whose load still returns `raw`
        // announced itself before this swap. (Its acquire part also orders
        // a later reservation of the entry after our clearing.)
        let raw = chunk.entries[self.index].swap(ptr::null_mut(), Ordering::SeqCst);
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
        table.release(weak);
    }
}

/// The host's table of channels. See the module docs.
pub(crate) struct ChannelTable<T> {
    chunks: ArcSwap<Vec<Arc<TableChunk<T>>>>,
    /// The chunk where the last reservation succeeded: the next scan starts
    /// there (and wraps), so opening many channels stays linear overall.
    cursor: AtomicUsize,
    /// Walkers announced (from `announce` to leaving: around an entry's
    /// load and upgrade, module docs). On a line of its own: a walk writes
    /// it twice per live entry, while every connection's first call reads
    /// `chunks` and `cursor` and every retire reads this.
    walkers: Padded<AtomicUsize>,
    /// Weak references retired while a walker was announced.
    limbo: Mutex<Vec<Weak<T>>>,
    /// Whether `limbo` may hold something: read by a walker leaving.
    parked: AtomicBool,
    /// Under loom: the addresses whose weak reference was released.
    #[cfg(loom)]
    released: Mutex<Vec<usize>>,
}

/// A walker's announcement, from [`ChannelTable::announce`] until dropped
/// (also on unwinding).
struct Walker<'a, T: Send + Sync + 'static> {
    table: &'a ChannelTable<T>,
}

impl<T: Send + Sync + 'static> Drop for Walker<'_, T> {
    fn drop(&mut self) {
        let table = self.table;
        // Ordering: SeqCst, the walker's second half of the handshake: our
        // decrement precedes our read of `parked`; a retirer sets `parked`
        // before it reads `walkers` again (module docs).
        let last = table.walkers.0.fetch_sub(1, Ordering::SeqCst) == 1;
        crate::sync::dekker_fence();
        if last && table.parked.load(Ordering::SeqCst) {
            table.drain();
        }
    }
}

impl<T: Send + Sync + 'static> ChannelTable<T> {
    pub(crate) fn new() -> Self {
        Self {
            chunks: ArcSwap::from_pointee(Vec::new()),
            cursor: AtomicUsize::new(0),
            walkers: Padded(AtomicUsize::new(0)),
            limbo: Mutex::new(Vec::new()),
            parked: AtomicBool::new(false),
            #[cfg(loom)]
            released: Mutex::new(Vec::new()),
        }
    }

    /// Announces a walker until the guard drops.
    fn announce(&self) -> Walker<'_, T> {
        // Ordering: SeqCst: precedes the walker's entry load (module docs).
        self.walkers.0.fetch_add(1, Ordering::SeqCst);
        crate::sync::dekker_fence();
        Walker { table: self }
    }

    /// Releases a retired weak reference (its entry already cleared): now,
    /// if no walker is announced, else through the limbo.
    fn release(&self, weak: Weak<T>) {
        crate::sync::dekker_fence();
        // Ordering: SeqCst, after the entry's swap (module docs).
        // Mutant (ci/mutants.sh): release without looking for walkers.
        if self.walkers.0.load(Ordering::SeqCst) == 0
            || cfg!(callcancel_mutant = "retire_ignores_walkers")
        {
            self.drop_weak(weak);
            return;
        }
        {
            let mut limbo = lock(&self.limbo);
            limbo.push(weak);
            // Ordering: SeqCst: precedes our second look at `walkers`; a
            // walker reads it after its decrement.
            self.parked.store(true, Ordering::SeqCst);
        }
        crate::sync::dekker_fence();
        // Ordering: SeqCst (module docs).
        // Mutant (ci/mutants.sh): no second look (a parked reference may
        // stay parked after the last walker left).
        if self.walkers.0.load(Ordering::SeqCst) == 0
            && !cfg!(callcancel_mutant = "retire_no_second_look")
        {
            self.drain();
        }
    }

    /// Drops the parked weak references if no walker is announced: decided
    /// under the limbo lock, so that nothing parked after a walker
    /// announced itself is dropped while it may still read it.
    fn drain(&self) {
        let parked = {
            let mut limbo = lock(&self.limbo);
            // Ordering: SeqCst: every parked reference was swapped out of
            // its entry before it was parked (under this lock), so a walker
            // that may hold one was announced then; zero here means all
            // such walkers have left.
            if self.walkers.0.load(Ordering::SeqCst) != 0 {
                return; // the last of them drains when it leaves
            }
            // Ordering: SeqCst, and under the lock the retirers park under:
            // a retirer that parks after us sets the flag again (and looks
            // at `walkers` again); a walker that reads `false` here leaves
            // nothing behind, since everything parked so far is ours.
            self.parked.store(false, Ordering::SeqCst);
            core::mem::take(&mut *limbo)
        };
        // Outside the lock: a weak drop may free a channel's allocation.
        parked.into_iter().for_each(|weak| self.drop_weak(weak));
    }

    /// Gives up a weak reference the table no longer names. Under loom it
    /// is recorded and leaked instead (no address is reused within a
    /// model), so that a walker can assert it never upgrades a released
    /// one ([`ChannelTable::check_live`]): loom does not see `Arc`/`Weak`.
    fn drop_weak(&self, weak: Weak<T>) {
        #[cfg(loom)]
        {
            lock(&self.released).push(weak.as_ptr() as usize);
            core::mem::forget(weak);
        }
        #[cfg(not(loom))]
        drop(weak);
    }

    /// Under loom: a walker's raw pointer, loaded while announced, has not
    /// been released (checked before and after its upgrade).
    #[cfg(loom)]
    fn check_live(&self, raw: *const T) {
        assert!(
            !lock(&self.released).contains(&(raw as usize)),
            "a walker read a channel whose table reference was released"
        );
    }

    /// Weak references parked in the limbo (for tests and loom models).
    #[cfg(any(test, loom))]
    pub(crate) fn parked_count(&self) -> usize {
        lock(&self.limbo).len()
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
    /// walker announced while `f` runs. Costs what is live (chunks with nothing in
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
                // Ordering: SeqCst, pairing with `publish_once` (see there):
                // an empty entry is skipped without announcing (the load
                // below, once announced, is the one that counts).
                let seen = entry.load(Ordering::SeqCst);
                if seen.is_null() || seen == reserved::<T>() {
                    continue;
                }
                let channel = {
                    let _walker = self.announce();
                    // Ordering: SeqCst, pairing with `publish_once` (see
                    // there) and with `retire`'s swap (module docs).
                    let raw = entry.load(Ordering::SeqCst);
                    if raw.is_null() || raw == reserved::<T>() {
                        continue;
                    }
                    // SAFETY: `raw` came from `Weak::into_raw` in `publish_once`.
                    // The table's weak reference it stands for is released
                    // only by a thread that finds no walker announced after
                    // clearing the entry (`retire`, `drain`), and we were
                    // announced before our load saw it, so the allocation
                    // is live until `_walker` drops; `ManuallyDrop` keeps us
                    // from releasing a weak count we do not own.
                    let weak = ManuallyDrop::new(unsafe { Weak::from_raw(raw) });
                    #[cfg(loom)]
                    self.check_live(raw);
                    let strong = weak.upgrade();
                    #[cfg(loom)]
                    self.check_live(raw);
                    strong
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
            unsafe { e.retire(&table) };
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
            unsafe { e.retire(&table) };
        }
    }

    #[test]
    fn a_reference_retired_during_a_walk_waits_for_the_walkers() {
        let table = ChannelTable::<u64>::new();
        let v = Arc::new(7u64);
        let publish = || {
            let e = table.reserve();
            // SAFETY: reserved just now; `table` outlives the entry.
            assert!(unsafe { e.publish_once(&v) });
            e
        };

        // No walker: released at once.
        let e = publish();
        assert_eq!(Arc::weak_count(&v), 1);
        // SAFETY: published, retired once.
        unsafe { e.retire(&table) };
        assert_eq!(Arc::weak_count(&v), 0);
        assert_eq!(table.parked_count(), 0);

        // Two walkers announced: parked until the last one leaves.
        let e = publish();
        let (w1, w2) = (table.announce(), table.announce());
        // SAFETY: as above.
        unsafe { e.retire(&table) };
        assert_eq!((table.parked_count(), Arc::weak_count(&v)), (1, 1));
        drop(w1);
        assert_eq!((table.parked_count(), Arc::weak_count(&v)), (1, 1));
        drop(w2);
        assert_eq!((table.parked_count(), Arc::weak_count(&v)), (0, 0));

        // A walker that came after the retire keeps it parked too (the
        // drain decides under the lock, from the count it sees there),
        // and the last to leave drains.
        let e = publish();
        let w1 = table.announce();
        // SAFETY: as above.
        unsafe { e.retire(&table) };
        let w2 = table.announce();
        drop(w1);
        assert_eq!((table.parked_count(), Arc::weak_count(&v)), (1, 1));
        drop(w2);
        assert_eq!((table.parked_count(), Arc::weak_count(&v)), (0, 0));

        // A walk itself leaves nothing announced or parked.
        let e = publish();
        let mut seen = 0;
        table.for_each(|c| seen += **c);
        assert_eq!(seen, 7);
        assert_eq!(table.walkers.0.load(Ordering::SeqCst), 0);
        // SAFETY: as above.
        unsafe { e.retire(&table) };
        assert_eq!(Arc::weak_count(&v), 0);
    }
}
