//! The registries that let a canceller find every in-flight call.
//!
//! # Per-channel slab ([`Slab`])
//!
//! Each channel (and each host-scope shard) owns a slab of [`CallSlot`]s in
//! segments of doubling size: segment `k` holds `BASE << k` slots. Segments
//! are allocated on demand, published with a CAS on a fixed array of
//! pointers, and freed only when the slab is dropped, so a slot's address is
//! stable for the life of its channel. `begin_call` takes a free slot with
//! one CAS on the slot's own state word (no shared bitmap, no shared counter):
//! each thread remembers the slot it released last (a thread-local hint), so
//! the steady state reuses one hot slot per thread and writes nothing shared,
//! even with several threads on one channel (P5); a channel-wide hint, moved
//! only by the slow scan, serves threads new to the channel. A sweep (fault or
//! abort) walks every slot of every published segment: linear in capacity,
//! which is at most twice the channel's peak concurrency plus the (at most
//! eight) leased slots below.
//!
//! # Leased slots
//!
//! The first `LEASES` (8) threads that begin calls each hold a lease tag `t`
//! (given back when the thread exits). Slot `t` of a slab's first segment is
//! that tag's lease slot: the first time the holder finds it free it takes it
//! with a CAS that also sets `LEASED`, and from then on nobody else claims it,
//! so the holder re-occupies it with a plain store (`occupy_leased`). Leases
//! are on only where the asymmetric fence of `sync::asym` is (Linux
//! `membarrier`, or loom and miri, which use full fences): the plain store
//! needs it for the R4 handshake (`state.rs`). A slab thus has at most eight
//! reserved slots; a leased slot whose tag no live thread holds waits for the
//! tag's next holder.
//!
//! # Host channel table ([`ChannelTable`])
//!
//! The host reaches its channels through an `ArcSwap` snapshot of a list of
//! fixed-size chunks; each chunk entry is an atomic pointer holding a
//! `Weak<ChannelShared>` turned raw. Opening a channel CASes an empty entry;
//! only appending a chunk (every `CHUNK` channels) replaces the snapshot.
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

use crate::channel::ChannelShared;
use crate::slot::CallSlot;
use crate::sync::{epoch, Arc, ArcSwap, AtomicPtr, AtomicUsize, Ordering, Weak};

/// Slots in a slab's first segment.
#[cfg(not(loom))]
const BASE: usize = 8;
#[cfg(loom)]
const BASE: usize = 2;
/// Segments per slab: capacity `BASE * (2^SEGMENTS - 1)`.
const SEGMENTS: usize = 32;

/// Segment index and offset of slot `index`.
fn locate(index: usize) -> (usize, usize) {
    let k = (usize::BITS - 1 - (index / BASE + 1).leading_zeros()) as usize;
    (k, index - BASE * ((1 << k) - 1))
}

fn segment_len(k: usize) -> usize {
    BASE << k
}

#[cfg(not(loom))]
std::thread_local! {
    /// (slab id, slot) of the slot this thread released last.
    static THREAD_HINT: core::cell::Cell<(usize, *const CallSlot)> =
        const { core::cell::Cell::new((0, ptr::null())) };
}

/// Slab ids: unique for the life of the process (never reused, so a thread
/// hint naming a dropped slab can never match a live one). Not a
/// synchronising atomic, so plain `core` even under loom.
static NEXT_SLAB_ID: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(1);

/// The id of every slab made after the ids ran out (2^32 slabs on a 32-bit
/// target; never on 64-bit): such slabs share it and never use the thread
/// hint, so a stale hint can never name a live slab's slot.
#[cfg_attr(loom, allow(dead_code))]
const NO_SLAB_ID: usize = usize::MAX;

fn next_slab_id() -> usize {
    use core::sync::atomic::Ordering as O;
    NEXT_SLAB_ID
        .fetch_update(O::Relaxed, O::Relaxed, |v| v.checked_add(1))
        .unwrap_or(NO_SLAB_ID)
}

/// This thread's last released slot in `slab`, if its last release was there.
/// Only a hint: a slot taken since merely fails `try_occupy`.
///
/// Not under loom: a std thread-local outlives loom's executions, and a hint
/// left by one execution would make the next one take a different path,
/// which loom's replay cannot handle. Models use the channel-wide hint.
#[cfg(loom)]
fn thread_hint(_slab: &Slab) -> Option<&CallSlot> {
    None
}

#[cfg(loom)]
fn set_thread_hint(_slab: &Slab, _slot: &CallSlot) {}

#[cfg(not(loom))]
#[inline]
fn thread_hint(slab: &Slab) -> Option<&CallSlot> {
    let (id, slot) = THREAD_HINT.try_with(core::cell::Cell::get).ok()?;
    if id != slab.id || slab.id == NO_SLAB_ID {
        return None;
    }
    // SAFETY: ids are never reused, so the hint was left by a release on
    // this very slab; its slots live until the slab is dropped, and the
    // caller borrows the slab.
    Some(unsafe { &*slot })
}

#[cfg(not(loom))]
#[inline]
fn set_thread_hint(slab: &Slab, slot: &CallSlot) {
    if slab.id != NO_SLAB_ID {
        let _ = THREAD_HINT.try_with(|h| h.set((slab.id, ptr::from_ref(slot))));
    }
}

/// Lease tags. A live thread holds at most one tag `t < LEASES` (the first
/// `LEASES` threads that begin a call get one; a tag returns to the pool when
/// its thread exits). Slot `t` of the first segment of every slab is the
/// tag's *lease slot*: the tag's holder takes it with a CAS that also sets
/// `LEASED`, and from then on it is reserved for whichever live thread holds
/// tag `t`: other claimers skip it, and its holder occupies it with a plain
/// store (`CallState::occupy_leased`), saving the one atomic
/// read-modify-write of `begin_call`. A thread owns at most one lease slot
/// per channel, so at most `LEASES` slots of a slab are reserved.
const LEASES: usize = BASE;

/// Bit `t` set: tag `t` is held by a live thread. A std atomic: it only
/// hands out tags (under loom, inside a per-execution lazy static).
type TagPool = core::sync::atomic::AtomicUsize;

fn take_tag(pool: &TagPool) -> Option<usize> {
    use core::sync::atomic::Ordering as O;
    let mut cur = pool.load(O::Relaxed);
    loop {
        let free = !cur & ((1 << LEASES) - 1);
        if free == 0 {
            return None;
        }
        let tag = free.trailing_zeros() as usize;
        // Ordering: Acquire, pairing with `give_back_tag`: a new holder
        // comes after everything the previous holder of the tag did.
        match pool.compare_exchange_weak(cur, cur | 1 << tag, O::Acquire, O::Relaxed) {
            Ok(_) => return Some(tag),
            Err(actual) => cur = actual,
        }
    }
}

#[cfg(not(loom))]
fn give_back_tag(pool: &TagPool, tag: usize) {
    pool.fetch_and(!(1 << tag), core::sync::atomic::Ordering::Release);
}

#[cfg(not(loom))]
static TAGS: TagPool = TagPool::new(0);

#[cfg(not(loom))]
const TAG_UNASSIGNED: u8 = u8::MAX;
#[cfg(not(loom))]
const TAG_NONE: u8 = u8::MAX - 1;

#[cfg(not(loom))]
std::thread_local! {
    /// This thread's lease tag, `TAG_UNASSIGNED` or `TAG_NONE`.
    static LEASE_TAG: core::cell::Cell<u8> = const { core::cell::Cell::new(TAG_UNASSIGNED) };
    /// Gives the tag back when the thread exits.
    static LEASE_GUARD: LeaseGuard = const { LeaseGuard };
}

#[cfg(not(loom))]
struct LeaseGuard;

#[cfg(not(loom))]
impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let _ = LEASE_TAG.try_with(|t| {
            let tag = usize::from(t.replace(TAG_NONE));
            if tag < LEASES {
                give_back_tag(&TAGS, tag);
            }
        });
    }
}

/// This thread's lease tag, if it holds one (assigned on first use).
#[cfg(not(loom))]
#[inline]
fn lease_tag() -> Option<usize> {
    let tag = LEASE_TAG.try_with(core::cell::Cell::get).ok()?;
    if usize::from(tag) < LEASES {
        Some(usize::from(tag))
    } else if tag == TAG_UNASSIGNED {
        assign_lease_tag()
    } else {
        None
    }
}

#[cfg(not(loom))]
#[cold]
#[inline(never)]
fn assign_lease_tag() -> Option<usize> {
    // Register the guard first: a thread whose thread-locals are being torn
    // down gets no tag (it could not give it back).
    let tag = match LEASE_GUARD.try_with(|_| ()) {
        Ok(()) => take_tag(&TAGS),
        Err(_) => None,
    };
    let _ = LEASE_TAG.try_with(|t| {
        t.set(tag.map_or(TAG_NONE, |t| t as u8));
    });
    tag
}

#[cfg(loom)]
loom::lazy_static! {
    static ref TAGS: TagPool = TagPool::new(0);
}

/// Under loom a tag is never given back: the pool lives for one execution
/// (and loom's lazy statics are gone when thread-locals drop).
#[cfg(loom)]
struct LoomLease(Option<usize>);

#[cfg(loom)]
loom::thread_local! {
    static LEASE: LoomLease = LoomLease(take_tag(&TAGS));
}

/// Under loom the tag lives in a loom thread-local (fresh in every
/// execution), so models run the leased path.
#[cfg(loom)]
fn lease_tag() -> Option<usize> {
    LEASE.try_with(|l| l.0).ok().flatten()
}

/// A channel's slab of call slots. See the module docs.
pub(crate) struct Slab {
    segments: [AtomicPtr<CallSlot>; SEGMENTS],
    /// Where a thread new to this channel starts looking: moved only by the
    /// slow scan (threads that know the channel use their thread-local hint).
    hint: AtomicUsize,
    /// Unique per slab, for the thread-local hint (which loom builds lack).
    #[cfg_attr(loom, allow(dead_code))]
    id: usize,
}

impl Slab {
    pub(crate) fn new() -> Self {
        Self {
            segments: core::array::from_fn(|_| AtomicPtr::new(ptr::null_mut())),
            hint: AtomicUsize::new(0),
            id: next_slab_id(),
        }
    }

    /// The published segment `k`, if any.
    ///
    /// Ordering: at least Acquire, pairing with the publishing CAS in `grow`
    /// so the slots' initialisation is visible. Sweeps pass `SeqCst`: the
    /// publication is `SeqCst` and precedes the claimer's `SeqCst`
    /// `try_occupy`, so a sweep that follows the abort/fault flag in the
    /// `SeqCst` order sees every segment a surviving call lives in (R4). A
    /// leased claim loads segment 0 (Acquire) before its `asym::light`
    /// fence, and the sweeper's heavy side comes between its flag and this
    /// load, so the same holds for the leased path (the fence rules of the
    /// `SeqCst` order, with membarrier standing in for the claimer's fence).
    #[inline]
    fn segment(&self, k: usize, order: Ordering) -> Option<&[CallSlot]> {
        let p = self.segments[k].load(order);
        if p.is_null() {
            return None;
        }
        // SAFETY: `p` was published by `grow` from a boxed slice of exactly
        // `segment_len(k)` initialised slots and is freed only in `Drop`,
        // which needs `&mut self`.
        Some(unsafe { core::slice::from_raw_parts(p, segment_len(k)) })
    }

    /// Segment `k`, allocating and publishing it if needed.
    fn grow(&self, k: usize) -> &[CallSlot] {
        if let Some(seg) = self.segment(k, Ordering::Acquire) {
            return seg;
        }
        let fresh: Box<[CallSlot]> = (0..segment_len(k)).map(|_| CallSlot::new()).collect();
        let fresh = Box::into_raw(fresh).cast::<CallSlot>();
        // Ordering: SeqCst (release part: publishes the initialised slots;
        // SeqCst part: see `segment`).
        if let Err(_winner) = self.segments[k].compare_exchange(
            ptr::null_mut(),
            fresh,
            Ordering::SeqCst,
            Ordering::Acquire,
        ) {
            // SAFETY: `fresh` came from `Box::into_raw` just above and was
            // never published.
            drop(unsafe { Box::from_raw(ptr::slice_from_raw_parts_mut(fresh, segment_len(k))) });
        }
        self.segment(k, Ordering::Acquire)
            .expect("segment was just published")
    }

    fn slot(&self, index: usize) -> Option<&CallSlot> {
        let (k, off) = locate(index);
        self.segment(k, Ordering::Acquire).map(|seg| &seg[off])
    }

    /// Takes a free slot: this thread's lease slot if it is free (a plain
    /// store), else with a `SeqCst` CAS (see `state.rs`).
    ///
    /// Tries the lease slot, then the hint (this thread's last released slot
    /// here, else the channel's), then scans the published segments from the hint
    /// onwards, wrapping around, and grows the slab only when every slot is
    /// taken. Releases move this thread's hint to the released slot, so a
    /// steady state finds a free slot at once even with thousands of calls in
    /// flight.
    #[inline]
    pub(crate) fn claim(&self) -> NonNull<CallSlot> {
        if let Some(slot) = self.lease_slot() {
            // A plain store: the caller's `sync::asym::light` fence before
            // its flag re-check completes the R4 pair (`state.rs`).
            if slot.state.occupy_leased().is_some() || slot.state.try_occupy_and_lease().is_some() {
                return NonNull::from(slot);
            }
        }
        if let Some(slot) = thread_hint(self) {
            if slot.state.try_occupy().is_some() {
                return NonNull::from(slot);
            }
        }
        self.claim_cold()
    }

    /// This thread's lease slot here, if leases are on and it holds a tag.
    #[inline]
    fn lease_slot(&self) -> Option<&CallSlot> {
        if !crate::sync::asym::leases_enabled() {
            return None;
        }
        let tag = lease_tag()?;
        self.segment(0, Ordering::Acquire).map(|seg| &seg[tag])
    }

    /// `claim` without a usable thread hint: the channel's hint, then a scan
    /// from it, then growth.
    #[cold]
    #[inline(never)]
    fn claim_cold(&self) -> NonNull<CallSlot> {
        // Ordering: Relaxed for the channel hint everywhere: it only picks
        // where to start; `try_occupy` decides.
        let hint = self.hint.load(Ordering::Relaxed);
        let capacity = self.published_capacity();
        let start = if hint < capacity { hint } else { 0 };
        for index in (start..capacity).chain(0..start) {
            if let Some(slot) = self.try_claim_at(index) {
                if index != hint {
                    // Point the next claim past us: the slot we took is busy.
                    self.hint.store(index + 1, Ordering::Relaxed);
                }
                return slot;
            }
        }
        // Every published slot was taken: publish more segments.
        let mut index = capacity;
        for k in 0..SEGMENTS {
            let seg = self.grow(k);
            if index >= BASE * ((1 << (k + 1)) - 1) {
                continue;
            }
            let (_, first) = locate(index);
            for (off, slot) in seg.iter().enumerate().skip(first) {
                if slot.state.try_occupy().is_some() {
                    let index = BASE * ((1 << k) - 1) + off;
                    self.hint.store(index + 1, Ordering::Relaxed);
                    return NonNull::from(slot);
                }
            }
            index = BASE * ((1 << (k + 1)) - 1);
        }
        panic!("callcancel: more than {index} calls in flight on one channel");
    }

    fn try_claim_at(&self, index: usize) -> Option<NonNull<CallSlot>> {
        let slot = self.slot(index)?;
        slot.state.try_occupy()?;
        Some(NonNull::from(slot))
    }

    /// Slots in the published segments (segments are published in order).
    fn published_capacity(&self) -> usize {
        let mut k = 0;
        while k < SEGMENTS && self.segment(k, Ordering::Acquire).is_some() {
            k += 1;
        }
        BASE * ((1 << k) - 1)
    }

    /// Remembers a released slot for the next `claim`.
    ///
    /// The hint is kept per thread (for the channel the thread used last), so
    /// threads sharing a channel each come back to their own slot instead of
    /// fighting over one; the channel-wide hint serves threads new to it.
    #[inline]
    pub(crate) fn note_released(&self, slot: &CallSlot) {
        set_thread_hint(self, slot);
    }

    /// Every slot of every published segment.
    pub(crate) fn for_each_slot(&self, mut f: impl FnMut(&CallSlot)) {
        for k in 0..SEGMENTS {
            match self.segment(k, Ordering::SeqCst) {
                Some(seg) => seg.iter().for_each(&mut f),
                None => break,
            }
        }
    }

    /// Whether any slot is occupied, looking from `start` onwards (wrapping)
    /// and stopping at the first occupied slot. A freer of an orphaned
    /// channel starts at its own slot, so tearing down many calls costs about
    /// one look each rather than a scan each (`SeqCst`: the census side of
    /// the disposal handshake, see `ChannelShared`).
    pub(crate) fn any_occupied_from(&self, start: Option<&CallSlot>) -> bool {
        let capacity = self.published_capacity();
        let start = start.and_then(|s| self.index_of(s)).unwrap_or(0);
        let start = if start < capacity { start } else { 0 };
        (start..capacity).chain(0..start).any(|i| {
            self.slot(i)
                .is_some_and(|slot| slot.state.load(Ordering::SeqCst).is_occupied())
        })
    }

    /// The index of `slot`, if it is one of this slab's.
    fn index_of(&self, slot: &CallSlot) -> Option<usize> {
        let addr = ptr::from_ref(slot) as usize;
        (0..SEGMENTS)
            .map_while(|k| Some((k, self.segment(k, Ordering::Acquire)?)))
            .find_map(|(k, seg)| {
                let base = seg.as_ptr() as usize;
                let off = addr.checked_sub(base)? / core::mem::size_of::<CallSlot>();
                (off < seg.len()).then(|| BASE * ((1 << k) - 1) + off)
            })
    }

    /// Occupied slots (calls in flight, including those whose cancel
    /// callback or free-state is still running), and how many of those are
    /// in their finishing phase (`Snapshot::is_finishing`).
    pub(crate) fn census(&self) -> Census {
        let mut c = Census::default();
        // Ordering: SeqCst, the waiter side of the idle Dekker pair (see
        // host.rs).
        self.for_each_slot(|slot| {
            let s = slot.state.load(Ordering::SeqCst);
            c.occupied += usize::from(s.is_occupied());
            c.finishing += usize::from(s.is_finishing());
        });
        c
    }
}

/// Counts from [`Slab::census`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Census {
    pub(crate) occupied: usize,
    pub(crate) finishing: usize,
}

impl core::ops::AddAssign for Census {
    fn add_assign(&mut self, other: Self) {
        self.occupied += other.occupied;
        self.finishing += other.finishing;
    }
}

impl Drop for Slab {
    fn drop(&mut self) {
        for (k, seg) in self.segments.iter().enumerate() {
            let p = seg.swap(ptr::null_mut(), Ordering::Acquire);
            if !p.is_null() {
                // SAFETY: published by `grow` from a boxed slice of
                // `segment_len(k)` slots; `&mut self` means no other user.
                drop(unsafe { Box::from_raw(ptr::slice_from_raw_parts_mut(p, segment_len(k))) });
            }
        }
    }
}

/// Entries per table chunk.
#[cfg(not(loom))]
const CHUNK: usize = 64;
#[cfg(loom)]
const CHUNK: usize = 2;

/// A fixed block of channel-table entries. Each entry is null, [`reserved`],
/// or a `Weak<ChannelShared>` made raw by `Weak::into_raw`.
pub(crate) struct TableChunk {
    entries: [AtomicPtr<ChannelShared>; CHUNK],
}

/// Marks an entry taken by an `open_channel` that has not stored its channel
/// yet. Never dereferenced.
fn reserved() -> *mut ChannelShared {
    NonNull::<ChannelShared>::dangling().as_ptr()
}

impl TableChunk {
    fn new() -> Self {
        Self {
            entries: core::array::from_fn(|_| AtomicPtr::new(ptr::null_mut())),
        }
    }
}

/// Where a channel sits in the host's table; dropping the channel clears it.
pub(crate) struct TableEntry {
    chunk: Arc<TableChunk>,
    index: usize,
}

impl TableEntry {
    /// Stores the channel's weak reference in its reserved entry.
    pub(crate) fn publish(&self, channel: &Arc<ChannelShared>) {
        let raw = Weak::into_raw(Arc::downgrade(channel)).cast_mut();
        // Ordering: SeqCst. Its release part lets a sweeper's load see an
        // initialised pointer; as a SeqCst write it precedes `open_channel`'s
        // SeqCst re-check of the host state, so a sweep that follows an abort
        // in the SeqCst order finds every channel opened before it (R4).
        let prev = self.chunk.entries[self.index].swap(raw, Ordering::SeqCst);
        debug_assert_eq!(prev, reserved());
    }

    /// Clears the entry and retires the table's weak reference through the
    /// epoch (see the module docs). Called from `ChannelShared::drop`.
    pub(crate) fn retire(&self) {
        let raw = self.chunk.entries[self.index].swap(ptr::null_mut(), Ordering::AcqRel);
        if raw.is_null() || raw == reserved() {
            return;
        }
        // SAFETY: `raw` came from `Weak::into_raw` in `publish`, and the swap
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
pub(crate) struct ChannelTable {
    chunks: ArcSwap<Vec<Arc<TableChunk>>>,
    /// The chunk where the last reservation succeeded: the next scan starts
    /// there (and wraps), so opening many channels stays linear overall.
    cursor: AtomicUsize,
}

impl ChannelTable {
    pub(crate) fn new() -> Self {
        Self {
            chunks: ArcSwap::from_pointee(Vec::new()),
            cursor: AtomicUsize::new(0),
        }
    }

    /// Reserves an entry for a new channel.
    pub(crate) fn reserve(&self) -> TableEntry {
        loop {
            let chunks = self.chunks.load_full();
            let n = chunks.len();
            // Ordering: Relaxed; the cursor is only where to start looking.
            let start = self.cursor.load(Ordering::Relaxed).min(n);
            for pos in (start..n).chain(0..start) {
                let chunk = &chunks[pos];
                for (index, entry) in chunk.entries.iter().enumerate() {
                    // Ordering: the Relaxed load only skips taken entries;
                    // the CAS decides (AcqRel: ordered after the retire that
                    // emptied the entry, before our publish).
                    if entry.load(Ordering::Relaxed).is_null()
                        && entry
                            .compare_exchange(
                                ptr::null_mut(),
                                reserved(),
                                Ordering::AcqRel,
                                Ordering::Relaxed,
                            )
                            .is_ok()
                    {
                        if pos != start {
                            self.cursor.store(pos, Ordering::Relaxed);
                        }
                        return TableEntry {
                            chunk: Arc::clone(chunk),
                            index,
                        };
                    }
                }
            }
            // Every entry is taken: append a chunk unless somebody did.
            let seen = chunks.len();
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
    /// epoch pin while `f` runs.
    pub(crate) fn for_each(&self, mut f: impl FnMut(&Arc<ChannelShared>)) {
        let chunks = self.chunks.load_full();
        for chunk in chunks.iter() {
            for entry in chunk.entries.iter() {
                let channel = {
                    let _guard = epoch::pin();
                    // Ordering: SeqCst, pairing with `publish` (see there).
                    let raw = entry.load(Ordering::SeqCst);
                    if raw.is_null() || raw == reserved() {
                        continue;
                    }
                    // SAFETY: `raw` came from `Weak::into_raw` in `publish`.
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
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn locate_maps_indices_onto_doubling_segments() {
        let mut expect = Vec::new();
        for k in 0..4 {
            for off in 0..segment_len(k) {
                expect.push((k, off));
            }
        }
        for (i, want) in expect.into_iter().enumerate() {
            assert_eq!(locate(i), want, "index {i}");
        }
    }

    #[test]
    fn claim_reuses_the_released_slot_and_grows_when_full() {
        let slab = Slab::new();
        let a = slab.claim();
        assert_eq!(a, NonNull::from(slab.slot(0).unwrap()));
        // SAFETY: the slab is alive and the slot is ours.
        let gen_a = unsafe { a.as_ref() }
            .state
            .load(Ordering::Relaxed)
            .generation();
        let mut held = Vec::new();
        for _ in 0..3 * BASE {
            held.push(slab.claim());
        }
        assert_eq!(slab.census().occupied, 3 * BASE + 1);
        let mut indices: Vec<_> = held.iter().map(|c| c.as_ptr() as usize).collect();
        indices.push(a.as_ptr() as usize);
        indices.sort_unstable();
        indices.dedup();
        assert_eq!(indices.len(), 3 * BASE + 1, "a slot was handed out twice");
        // SAFETY: the slab is alive and the slot is ours.
        let slot = unsafe { a.as_ref() };
        assert!(matches!(
            slot.state.complete(),
            crate::state::Completion::OwnerFrees { .. }
        ));
        slot.state.release();
        slab.note_released(slot);
        let again = slab.claim();
        assert_eq!(again, a);
        assert_eq!(slot.state.load(Ordering::Relaxed).generation(), gen_a + 1);
    }

    #[test]
    fn a_threads_second_call_reuses_its_leased_slot() {
        if !crate::sync::asym::leases_enabled() || lease_tag().is_none() {
            // No membarrier here (or every tag is held): nothing to lease.
            return;
        }
        let slab = Slab::new();
        let tag = lease_tag().unwrap();
        // First call: may land anywhere (the lease slot needs segment 0).
        let first = slab.claim();
        // SAFETY: the slab is alive and the slot is ours.
        let first = unsafe { first.as_ref() };
        assert!(matches!(
            first.state.complete(),
            crate::state::Completion::OwnerFrees { .. }
        ));
        first.state.release();
        let lease = &slab.segment(0, Ordering::Acquire).unwrap()[tag];
        // Now segment 0 exists: the next call takes the lease slot and leases it.
        let second = slab.claim();
        assert_eq!(second, NonNull::from(lease));
        assert!(lease.state.load(Ordering::Relaxed).is_leased());
        // Another claimer (no lease) skips it while it is free.
        assert!(matches!(
            lease.state.complete(),
            crate::state::Completion::OwnerFrees { .. }
        ));
        lease.state.release();
        let snap = lease.state.load(Ordering::Relaxed);
        assert!(
            snap.is_leased() && !snap.is_occupied(),
            "release keeps the lease"
        );
        assert!(
            lease.state.try_occupy().is_none(),
            "claimers skip a leased slot"
        );
        // Its holder takes it again with a plain store.
        let third = slab.claim();
        assert_eq!(third, NonNull::from(lease));
        assert!(lease.state.load(Ordering::Relaxed).is_occupied());
    }
}
