//! Layer 4: a channel's slab of call slots ([`Slab`]).
//!
//! Each channel (and each host-scope shard) owns a slab of [`CallSlot`]s in
//! segments of doubling size: segment `k` holds `BASE << k` slots. Segments
//! are allocated on demand and published with a CAS on a fixed array of
//! pointers. `begin_call` takes a free slot with one CAS on the slot's own
//! state word (no shared bitmap, no shared counter): each thread remembers
//! the slot of segment 0 it released last (a thread-local hint), so the
//! steady state reuses one hot slot per thread and writes nothing shared,
//! even with several threads on one channel (P5); a channel-wide hint, moved
//! only by the slow scan, serves threads new to the channel.
//!
//! # Memory follows the live load
//!
//! After a burst, segments above the first are given back: a census or a
//! sweep that finds the top segment entirely free while the calls in flight
//! would fit in a quarter of the segments below it marks each of its slots
//! `RETIRED` (a CAS that fails against any claimer), unpublishes it and puts
//! it on the slab's retired list. Its memory is freed once no **walk** is in
//! progress: every code that reaches slots without occupying one — scans,
//! sweeps, censuses, and the holders of slot pointers that outlive their call
//! (`Canceller`, `CancelWatch`, the timer's entries) — holds a [`Walk`] (a
//! count on the slab, never a lock) and re-validates its pointer against the
//! published segment (`Slab::revalidate`). A segment allocated again later
//! starts its slots above every generation the old one used
//! (`gen_floor`), so a stale holder can never match a new call even at the
//! same address. Calls themselves need no walk: an occupied slot is never
//! retired, and the thread hint only names slots of segment 0, which lives as
//! long as the slab. Sweeps and censuses therefore cost what the slab holds
//! now, not its high-water mark.
//!
//! # What a connection pays (W1)
//!
//! Segment 0 and the segment directory are one allocation (the **first
//! block**), made by the first `begin_call` and aligned by hand
//! (`store/segment.rs`). A `segments` word counts the segments that may be
//! published (a bound, raised before any slot of a new segment is claimed,
//! lowered by the retirer of the top one): scans look no further, and while
//! it is at most 1 — every channel that never had more than `BASE` calls in
//! flight — a scan reaches segment 0 only, which is never freed, and so
//! needs no walk (no RMW on the walk count). A cold `claim` tries segment 0
//! before taking a walk for the others.
//!
use core::ptr::{self, NonNull};

use crate::slot::CallSlot;
use crate::store::segment;
use crate::sync::{
    exclusive_ptr, exclusive_usize, lock, AtomicPtr, AtomicU64, AtomicUsize, Mutex, Ordering,
};

/// Slots in a slab's first segment.
#[cfg(not(loom))]
const BASE: usize = 8;
#[cfg(loom)]
const BASE: usize = 2;
/// Segments per slab: capacity `BASE * (2^SEGMENTS - 1)`.
#[cfg(not(loom))]
const SEGMENTS: usize = 32;
/// Under loom every segment-pointer load is a scheduling point: 4 segments
/// (30 slots) are plenty for the models and keep them within loom's branch
/// limit.
#[cfg(loom)]
const SEGMENTS: usize = 4;

/// Allocates segment `k` (`k >= 1`) with its slots at generation `gen`.
///
/// A plain `Box` (64-byte aligned by the allocator): segments above the
/// first are grown by bursts, rarely, and hold at least 16 slots, so the
/// allocator's aligned path costs little per slot, and their footprint stays
/// exactly 64 B per slot (P3). The first block, allocated per connection, is
/// aligned by hand instead (`store/segment.rs`).
fn alloc_segment(k: usize, gen: u64) -> NonNull<CallSlot> {
    debug_assert!(k >= 1);
    let fresh: Box<[CallSlot]> = (0..segment_len(k))
        .map(|_| CallSlot::at_generation(gen))
        .collect();
    NonNull::from(Box::leak(fresh)).cast()
}

/// Frees segment `k` made by [`alloc_segment`].
///
/// # Safety
/// `p` came from `alloc_segment(k, ..)`, is not freed yet, and nobody can
/// reach it any more.
unsafe fn free_segment(p: NonNull<CallSlot>, k: usize) {
    // SAFETY: per the contract, a leaked boxed slice of `segment_len(k)`.
    drop(unsafe { Box::from_raw(ptr::slice_from_raw_parts_mut(p.as_ptr(), segment_len(k))) });
}

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

/// Takes `n` fresh ids from the process-wide counter: the first, or
/// `NO_SLAB_ID` once they ran out.
fn reserve_slab_ids(n: usize) -> usize {
    use core::sync::atomic::Ordering as O;
    NEXT_SLAB_ID
        .fetch_update(O::Relaxed, O::Relaxed, |v| {
            v.checked_add(n).filter(|&end| end < NO_SLAB_ID)
        })
        .unwrap_or(NO_SLAB_ID)
}

/// Ids a thread takes from the process-wide counter at a time, so that
/// threads opening channels do not all write one cache line.
#[cfg(not(loom))]
const SLAB_ID_BLOCK: usize = 256;

#[cfg(not(loom))]
std::thread_local! {
    /// This thread's block of slab ids: (next, end).
    static SLAB_IDS: core::cell::Cell<(usize, usize)> = const { core::cell::Cell::new((0, 0)) };
}

#[cfg(not(loom))]
fn next_slab_id() -> usize {
    SLAB_IDS
        .try_with(|ids| {
            let (next, end) = ids.get();
            if next < end {
                ids.set((next + 1, end));
                return next;
            }
            let first = reserve_slab_ids(SLAB_ID_BLOCK);
            if first == NO_SLAB_ID {
                return NO_SLAB_ID;
            }
            ids.set((first + 1, first + SLAB_ID_BLOCK));
            first
        })
        // The thread is exiting: take one id directly.
        .unwrap_or_else(|_| reserve_slab_ids(1))
}

#[cfg(loom)]
fn next_slab_id() -> usize {
    reserve_slab_ids(1)
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

/// Segment 0 and the segment pointers of a slab, allocated together by the
/// first claim (an idle channel that never ran a call pays for none of it:
/// W4). `segments[0]` points at `slots` from before the block is published
/// to its end.
#[repr(C)]
struct FirstBlock {
    slots: [CallSlot; BASE],
    segments: [AtomicPtr<CallSlot>; SEGMENTS],
}

/// One spare first block per thread (not under loom, whose executions
/// would see each other's): a slab dropped on this thread leaves its first
/// block here if every slot in it is clean, and the next first claim on this
/// thread takes it, so a short connection allocates, initialises and frees
/// no segment (W1). A recycled slot continues its own generations, exactly
/// as if the next call of the old slab had taken it; nobody can reach it
/// through the old slab any more (its channel is gone).
#[cfg(not(loom))]
mod spare {
    use super::{segment, FirstBlock};
    use core::cell::Cell;
    use core::ptr::{self, NonNull};

    struct Spare(Cell<*mut FirstBlock>);

    impl Drop for Spare {
        fn drop(&mut self) {
            if let Some(block) = NonNull::new(self.0.get()) {
                // SAFETY: a spare block came from `alloc_array(1, ..)` and
                // is owned by this cell alone.
                unsafe { segment::free_array(block, 1) };
            }
        }
    }

    std::thread_local! {
        static SPARE: Spare = const { Spare(Cell::new(ptr::null_mut())) };
    }

    /// This thread's spare block, if any (now the caller's).
    pub(super) fn take() -> Option<NonNull<FirstBlock>> {
        SPARE
            .try_with(|s| NonNull::new(s.0.replace(ptr::null_mut())))
            .ok()
            .flatten()
    }

    /// Keeps `block` as this thread's spare; hands it back if there is one
    /// already (or the thread is exiting).
    pub(super) fn put(block: NonNull<FirstBlock>) -> Result<(), NonNull<FirstBlock>> {
        let kept = SPARE.try_with(|s| {
            let empty = s.0.get().is_null();
            if empty {
                s.0.set(block.as_ptr());
            }
            empty
        });
        match kept {
            Ok(true) => Ok(()),
            _ => Err(block),
        }
    }
}

#[cfg(loom)]
mod spare {
    use super::FirstBlock;
    use core::ptr::NonNull;

    pub(super) fn take() -> Option<NonNull<FirstBlock>> {
        None
    }

    pub(super) fn put(block: NonNull<FirstBlock>) -> Result<(), NonNull<FirstBlock>> {
        Err(block)
    }
}

impl FirstBlock {
    /// Whether the block may serve another slab: every slot free with no
    /// flag and nothing registered. Only on a block nobody else can reach.
    fn is_clean(&mut self) -> bool {
        self.slots.iter_mut().all(|slot| {
            // Ordering: Relaxed; the caller has exclusive access.
            slot.state.load(Ordering::Relaxed).is_clean_free() && !slot.has_registration()
        })
    }

    /// Readies an unreachable clean block for another slab: no segment
    /// above the first, no leftover waker.
    fn reset_for_reuse(&mut self, bound: usize) {
        for seg in self.segments.iter().take(bound).skip(1) {
            // Ordering: Relaxed; exclusive access (the next slab publishes
            // the block with a SeqCst CAS).
            seg.store(ptr::null_mut(), Ordering::Relaxed);
        }
        for slot in &mut self.slots {
            slot.clear_waker();
        }
    }
}

/// A channel's slab of call slots. See the module docs.
pub(crate) struct Slab {
    /// Null until the first claim; then fixed for the slab's life (made by
    /// `segment::alloc_array`).
    dir: AtomicPtr<FirstBlock>,
    /// A bound on the published segments: every published segment `k` has
    /// `k < segments` by the time one of its slots is claimed. Raised (a
    /// `fetch_max`) by whoever obtains a segment from `grow`, before it
    /// claims a slot there; lowered by the retirer of the top segment, after
    /// every slot of it was marked `RETIRED` (a CAS from `k + 1` to `k`,
    /// which fails if a grower raised it meanwhile).
    segments: AtomicUsize,
    /// Where a thread new to this channel starts looking: moved only by the
    /// slow scan (threads that know the channel use their thread-local hint).
    hint: AtomicUsize,
    /// Unique per slab, for the thread-local hint (which loom builds lack).
    #[cfg_attr(loom, allow(dead_code))]
    id: usize,
    /// Walks in progress (see [`Walk`]).
    walkers: AtomicUsize,
    /// Segments unpublished and waiting for no walk to be in progress:
    /// (segment index, pointer). Touched only when giving memory back.
    retired: Mutex<Vec<(usize, RetiredPtr)>>,
    /// `retired.len()`, readable without the lock.
    retired_count: AtomicUsize,
    /// The first generation of slots in a segment allocated from now on.
    gen_floor: AtomicU64,
}

/// A retired segment's pointer (owned by the retired list).
struct RetiredPtr(NonNull<CallSlot>);

// SAFETY: the pointer owns a boxed slice of `CallSlot`s, which are `Send`.
unsafe impl Send for RetiredPtr {}

/// A walk over a slab's slots in progress: while any *counted* walk is, no
/// retired segment is freed. A count, never a lock: a walk may run user
/// code (a sweep runs callbacks) and only delays giving memory back.
///
/// A walk also fixes the bound of its scan (`bound`, from the `segments`
/// word). [`Slab::scan`] makes an uncounted walk when that bound is at most
/// 1: it reaches segment 0 only, which lives as long as the slab.
pub(crate) struct Walk<'a> {
    slab: &'a Slab,
    /// Whether this walk holds a count on `walkers`.
    counted: bool,
    /// Segments this walk's scans look at: `0..bound`.
    bound: usize,
}

impl Walk<'_> {
    /// Keeps this (counted) walk's count without its borrow of the slab:
    /// for a holder that also keeps the slab alive by a strong reference to
    /// its channel (an owner handing its free over, `engine/channel.rs`).
    /// End it with [`Slab::end_detached_walk`].
    pub(crate) fn detach(self) {
        debug_assert!(self.counted, "only a counted walk keeps segments");
        core::mem::forget(self);
    }
}

impl Drop for Walk<'_> {
    fn drop(&mut self) {
        if !self.counted {
            return;
        }
        let slab = self.slab;
        // Ordering: SeqCst, pairing with the retirer's `retired_count`
        // increment and `walkers` load (a Dekker pair: either it sees our
        // exit, or we see its segment).
        if slab.walkers.fetch_sub(1, Ordering::SeqCst) == 1 {
            crate::sync::dekker_fence();
            if slab.retired_count.load(Ordering::SeqCst) != 0 {
                slab.free_retired();
            }
        }
    }
}

impl Slab {
    pub(crate) fn new() -> Self {
        Self {
            dir: AtomicPtr::new(ptr::null_mut()),
            segments: AtomicUsize::new(0),
            hint: AtomicUsize::new(0),
            id: next_slab_id(),
            walkers: AtomicUsize::new(0),
            retired: Mutex::new(Vec::new()),
            retired_count: AtomicUsize::new(0),
            gen_floor: AtomicU64::new(0),
        }
    }

    /// The first block (segment 0 and the directory), once the first claim
    /// made it.
    ///
    /// Ordering: SeqCst (at least Acquire, pairing with the publishing CAS
    /// in `dir_or_init`; SeqCst for sweeps, as `segment` explains).
    #[inline]
    fn dir(&self) -> Option<&FirstBlock> {
        let d = self.dir.load(Ordering::SeqCst);
        // SAFETY: published by `dir_or_init` from `segment::alloc_array`,
        // freed only in `Drop` (`&mut self`).
        (!d.is_null()).then(|| unsafe { &*d })
    }

    /// The first block, allocating it if needed.
    fn dir_or_init(&self) -> &FirstBlock {
        if let Some(d) = self.dir() {
            return d;
        }
        let fresh = spare::take().unwrap_or_else(|| {
            // Ordering: Acquire, as in `grow`.
            let gen = self.gen_floor.load(Ordering::Acquire);
            segment::alloc_array(1, |_| FirstBlock {
                slots: core::array::from_fn(|_| CallSlot::at_generation(gen)),
                segments: core::array::from_fn(|_| AtomicPtr::new(ptr::null_mut())),
            })
        });
        // SAFETY: just allocated, not shared yet.
        let block = unsafe { fresh.as_ref() };
        // Ordering: Relaxed; the publishing CAS below releases it.
        block.segments[0].store(block.slots.as_ptr().cast_mut(), Ordering::Relaxed);
        // Ordering: SeqCst (release part: publishes the initialised block).
        if self
            .dir
            .compare_exchange(
                ptr::null_mut(),
                fresh.as_ptr(),
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_err()
        {
            // A spare again (or freed): never published.
            if let Err(fresh) = spare::put(fresh) {
                // SAFETY: from `alloc_array(1, ..)` (directly or as a
                // spare), never published.
                unsafe { segment::free_array(fresh, 1) };
            }
        }
        self.dir().expect("published just now")
    }

    /// The bound on published segments (see `segments`).
    ///
    /// Ordering: SeqCst: a sweep's read follows its flag RMW in the `SeqCst`
    /// order, and a claimer's raise precedes its `SeqCst` `try_occupy`, so a
    /// sweep that reads a bound below a claimer's segment comes before that
    /// claim, whose re-check then sees the flag (R4).
    #[inline]
    fn segment_bound(&self) -> usize {
        self.segments.load(Ordering::SeqCst)
    }

    /// Raises the bound to cover segment `k`, before a slot of it is
    /// claimed (see `segment_bound`).
    #[inline]
    fn cover(&self, k: usize) {
        // Mutant (ci/mutants.sh): never raise the bound.
        if cfg!(callcancel_mutant = "no_cover") {
            return;
        }
        if self.segment_bound() <= k {
            // Ordering: SeqCst, see `segment_bound`.
            self.segments.fetch_max(k + 1, Ordering::SeqCst);
        }
    }

    /// Segment `k`'s pointer cell, if the directory exists.
    #[inline]
    fn seg_cell(&self, k: usize) -> Option<&AtomicPtr<CallSlot>> {
        self.dir().map(|d| &d.segments[k])
    }

    /// Segment `k`'s pointer (null if unpublished or no directory yet).
    #[inline]
    fn seg_ptr(&self, k: usize, order: Ordering) -> *mut CallSlot {
        self.seg_cell(k).map_or(ptr::null_mut(), |c| c.load(order))
    }

    /// Whether no segment was ever grown (no call ever ran here).
    #[inline]
    pub(crate) fn never_used(&self) -> bool {
        self.dir().is_none()
    }

    /// Starts a counted walk (see [`Walk`]): what a holder of a slot
    /// reference past segment 0 needs, and scans that may reach any segment.
    ///
    /// Ordering: SeqCst: the increment precedes every segment load of the
    /// walk, so a retirer that unpublishes a segment and then reads
    /// `walkers` as zero knows no walk can still see it.
    #[inline]
    pub(crate) fn walk(&self) -> Walk<'_> {
        self.walkers.fetch_add(1, Ordering::SeqCst);
        crate::sync::dekker_fence();
        Walk {
            slab: self,
            counted: true,
            bound: self.segment_bound(),
        }
    }

    /// Ends a walk that was [`Walk::detach`]ed from this slab (freeing
    /// retired segments if it was the last walk).
    pub(crate) fn end_detached_walk(&self) {
        drop(Walk {
            slab: self,
            counted: true,
            bound: 0,
        });
    }

    /// Starts a scan of every slot a call may occupy now: sweeps, censuses
    /// and disposal. Uncounted (no RMW) while at most segment 0 may be
    /// published: segment 0 lives as long as the slab.
    #[inline]
    pub(crate) fn scan(&self) -> Walk<'_> {
        let bound = self.segment_bound();
        if bound <= 1 {
            return Walk {
                slab: self,
                counted: false,
                bound,
            };
        }
        self.walk()
    }

    /// Frees the retired segments if no walk is in progress. Every entry of
    /// the list was unpublished before it was pushed (under the lock), so a
    /// zero read of `walkers` here (`SeqCst`, under the same lock) comes
    /// after that unpublication: no walk that could have seen it remains.
    fn free_retired(&self) {
        let taken = {
            let mut retired = lock(&self.retired);
            crate::sync::dekker_fence();
            if self.walkers.load(Ordering::SeqCst) != 0 {
                return;
            }
            // Ordering: SeqCst, see `Walk::drop`.
            self.retired_count.store(0, Ordering::SeqCst);
            core::mem::take(&mut *retired)
        };
        for (k, p) in taken {
            // SAFETY: made by `alloc_segment(k, ..)` and published by
            // `grow`, unpublished by `retire`, and no walk can reach it any
            // more (see above).
            unsafe { free_segment(p.0, k) };
        }
    }

    /// Where `slot` lives: (segment index, segment base, offset in the
    /// segment), if it is one of this slab's published slots. Address
    /// arithmetic only.
    pub(crate) fn locate_slot(&self, slot: &CallSlot) -> Option<(usize, *const CallSlot, usize)> {
        // The slot is occupied by the caller's call (or under the caller's
        // walk): its segment is below the bound.
        self.locate_addr(ptr::from_ref(slot) as usize)
    }

    /// As [`Slab::locate_slot`], for an address (never dereferenced): the
    /// segment below the bound that holds it now, if any.
    fn locate_addr(&self, addr: usize) -> Option<(usize, *const CallSlot, usize)> {
        (0..self.segment_bound().min(SEGMENTS)).find_map(|k| {
            let base = self.seg_ptr(k, Ordering::Acquire);
            if base.is_null() {
                return None;
            }
            let off = addr.checked_sub(base as usize)? / core::mem::size_of::<CallSlot>();
            (off < segment_len(k)).then_some((k, base.cast_const(), off))
        })
    }

    /// Segment `k`'s current base, if it is still at address `base`, so
    /// that slot `off` of it may be reached during `walk` *through the
    /// returned pointer* (its provenance is the live allocation's; a pointer
    /// kept from before may name a freed one at the same address). If the
    /// segment was given back and another allocated at the same address,
    /// its slots' generations start above every old one: the holder's
    /// generation check fails, as for a reused slot.
    #[inline]
    pub(crate) fn revalidate(
        &self,
        _walk: &Walk<'_>,
        k: usize,
        base: usize,
    ) -> Option<NonNull<CallSlot>> {
        debug_assert!(_walk.counted, "a slot past segment 0 needs a counted walk");
        // Ordering: SeqCst, after the walk's increment (see `walk`).
        let cur = self.seg_ptr(k, Ordering::SeqCst);
        NonNull::new(cur).filter(|p| p.as_ptr() as usize == base)
    }

    /// The published segment `k`, if any.
    ///
    /// Ordering: at least Acquire, pairing with the publishing CAS in `grow`
    /// so the slots' initialisation is visible. Sweeps pass `SeqCst`: the
    /// publication is `SeqCst` and precedes the claimer's `SeqCst`
    /// `try_occupy`, so a sweep that follows the abort/fault flag in the
    /// `SeqCst` order sees every segment a surviving call lives in (R4).
    #[inline]
    fn segment(&self, k: usize, order: Ordering) -> Option<&[CallSlot]> {
        let p = self.seg_ptr(k, order);
        if p.is_null() {
            return None;
        }
        // SAFETY: `p` was published by `grow` from a boxed slice of exactly
        // `segment_len(k)` initialised slots. Segment 0 is freed only in
        // `Drop` (`&mut self`); a higher one only once no walk is in
        // progress after it was unpublished, and callers of `segment` for
        // k > 0 hold a walk (or read segment 0 only).
        Some(unsafe { core::slice::from_raw_parts(p, segment_len(k)) })
    }

    /// Segment 0, allocating the first block if needed, with the bound
    /// raised to cover it. Needs no walk: segment 0 lives as long as the
    /// slab.
    fn first_segment(&self) -> &[CallSlot] {
        let block = self.dir_or_init();
        self.cover(0);
        &block.slots
    }

    /// Segment `k`, allocating and publishing it if needed, with the bound
    /// raised to cover it: the caller may claim its slots. For `k >= 1` the
    /// caller holds a counted walk (`_walk`): the segment may be retired
    /// (and unpublished) right after it is published, and its memory then
    /// lives until the walk ends; its slots are `RETIRED`, so claims there
    /// fail and the caller moves on.
    fn grow<'a>(&'a self, _walk: &Walk<'a>, k: usize) -> &'a [CallSlot] {
        if k == 0 {
            return self.first_segment();
        }
        if let Some(seg) = self.segment(k, Ordering::Acquire) {
            self.cover(k);
            return seg;
        }
        // Ordering: Acquire, pairing with the retirer's SeqCst `fetch_max`
        // (which precedes its unpublication, which our null load read).
        let gen = self.gen_floor.load(Ordering::Acquire);
        let fresh = alloc_segment(k, gen);
        // Ordering: SeqCst (release part: publishes the initialised slots;
        // SeqCst part: see `segment`).
        let published = match self.dir_or_init().segments[k].compare_exchange(
            ptr::null_mut(),
            fresh.as_ptr(),
            Ordering::SeqCst,
            Ordering::Acquire,
        ) {
            Ok(_) => fresh.as_ptr(),
            Err(winner) => {
                // SAFETY: `fresh` came from `alloc_segment(k, ..)` just
                // above and was never published.
                unsafe { free_segment(fresh, k) };
                winner
            }
        };
        self.cover(k);
        #[cfg(all(test, not(loom)))]
        tests::after_grow(self);
        // Not a reload: a census may have retired and unpublished the
        // segment already (review finding: the reload then found nothing).
        // SAFETY: `published` is a segment of `segment_len(k)` initialised
        // slots that was published after the caller's walk began, so it is
        // freed (if retired) only after that walk ends, after our use.
        unsafe { core::slice::from_raw_parts(published, segment_len(k)) }
    }

    /// Slot `index`, if its segment is published. Callers hold a walk.
    #[cfg(test)]
    fn slot(&self, index: usize) -> Option<&CallSlot> {
        let (k, off) = locate(index);
        // Ordering: SeqCst, as sweeps and censuses need (see `segment`).
        self.segment(k, Ordering::SeqCst).map(|seg| &seg[off])
    }

    /// Takes a free slot with a `SeqCst` CAS (see `state.rs`).
    ///
    /// Tries the hint (this thread's last released slot here, else the
    /// channel's), then scans the published segments from the hint onwards,
    /// wrapping around, and grows the slab only when every slot is taken.
    /// Releases move this thread's hint to the released slot, so a steady
    /// state finds a free slot at once even with thousands of calls in
    /// flight.
    #[inline]
    pub(crate) fn claim(&self) -> NonNull<CallSlot> {
        if let Some(slot) = thread_hint(self) {
            if slot.state.try_occupy().is_some() {
                return NonNull::from(slot);
            }
        }
        self.claim_cold()
    }

    /// `claim` without a usable thread hint: segment 0 from the channel's
    /// hint (no walk: it lives as long as the slab), then a scan of the
    /// others from the hint under a walk, then growth.
    #[cold]
    #[inline(never)]
    fn claim_cold(&self) -> NonNull<CallSlot> {
        // Ordering: Relaxed for the channel hint everywhere: it only picks
        // where to start; `try_occupy` decides.
        let hint = self.hint.load(Ordering::Relaxed);
        if hint < BASE {
            let seg0 = self.first_segment();
            for index in (hint..BASE).chain(0..hint) {
                if seg0[index].state.try_occupy().is_some() {
                    if index != hint {
                        self.hint.store(index + 1, Ordering::Relaxed);
                    }
                    return NonNull::from(&seg0[index]);
                }
            }
        }
        let walk = self.walk();
        let bound = Self::index_bound(&walk);
        let start = if (BASE..bound).contains(&hint) {
            hint
        } else {
            BASE.min(bound)
        };
        // Segment 0 was just scanned if the hint was in it.
        let wrap_from = if hint < BASE { BASE.min(start) } else { 0 };
        for index in (start..bound).chain(wrap_from..start) {
            if let Some(slot) = self.try_claim_at(index) {
                if index != hint {
                    // Point the next claim past us: the slot we took is busy.
                    self.hint.store(index + 1, Ordering::Relaxed);
                }
                return slot;
            }
        }
        // Every published slot was taken: publish more segments (and fill
        // any segment given back meanwhile), in order.
        for k in 0..SEGMENTS {
            let seg = self.grow(&walk, k);
            if let Some((off, slot)) = seg
                .iter()
                .enumerate()
                .find(|(_, s)| s.state.try_occupy().is_some())
            {
                self.hint
                    .store(BASE * ((1 << k) - 1) + off + 1, Ordering::Relaxed);
                return NonNull::from(slot);
            }
        }
        panic!(
            "callcancel: more than {} calls in flight on one channel",
            BASE * ((1 << SEGMENTS) - 1)
        );
    }

    /// Claims slot `index` if its segment is published and the slot free.
    /// Raises the bound first: the walk's bound may be older than a retire
    /// and regrow of this segment (see `segment_bound`).
    fn try_claim_at(&self, index: usize) -> Option<NonNull<CallSlot>> {
        let (k, off) = locate(index);
        let seg = self.segment(k, Ordering::SeqCst)?;
        self.cover(k);
        let slot = &seg[off];
        slot.state.try_occupy()?;
        Some(NonNull::from(slot))
    }

    /// One past the highest slot index a scan under `walk` looks at.
    /// Segments below it may be unpublished (given back, or not grown yet):
    /// `slot` skips them.
    fn index_bound(walk: &Walk<'_>) -> usize {
        BASE * ((1 << walk.bound.min(SEGMENTS)) - 1)
    }

    /// Remembers a released slot for the next `claim`, if it is in segment
    /// 0 (which lives as long as the slab; higher segments may be given
    /// back, and the hint is used without a walk).
    ///
    /// The hint is kept per thread (for the channel the thread used last), so
    /// threads sharing a channel each come back to their own slot instead of
    /// fighting over one; the channel-wide hint serves threads new to it.
    #[inline]
    pub(crate) fn note_released(&self, slot: &CallSlot) {
        // Ordering: Relaxed: segment 0 is published before any of its slots
        // was claimed by this thread, and never unpublished.
        let base0 = self.seg_ptr(0, Ordering::Relaxed) as usize;
        let off = (ptr::from_ref(slot) as usize).wrapping_sub(base0);
        if off < BASE * core::mem::size_of::<CallSlot>() {
            set_thread_hint(self, slot);
        }
    }

    /// Every slot of every published segment below the walk's bound.
    pub(crate) fn for_each_slot(&self, walk: &Walk<'_>, mut f: impl FnMut(&CallSlot)) {
        for k in 0..walk.bound.min(SEGMENTS) {
            // Ordering: SeqCst (see `segment`); unpublished segments (given
            // back, or not yet grown) are skipped, not an end.
            if let Some(seg) = self.segment(k, Ordering::SeqCst) {
                seg.iter().for_each(&mut f);
            }
        }
    }

    /// The first slot, looking from index `start` (a freer's own slot)
    /// onwards and wrapping around, for which `f` returns `true`, during
    /// `walk`. Starting at the caller's slot makes tearing down many calls
    /// of an orphaned channel cost about one look each, not a scan each.
    pub(crate) fn find_slot_from<'a>(
        &'a self,
        walk: &'a Walk<'a>,
        start: Option<usize>,
        mut f: impl FnMut(&CallSlot) -> bool,
    ) -> Option<&'a CallSlot> {
        let bound = Self::index_bound(walk);
        let start = start.unwrap_or(0);
        let start = if start < bound { start } else { 0 };
        self.find_in(start, bound, &mut f)
            .or_else(|| self.find_in(0, start, &mut f))
    }

    /// The first slot of indices `from..to` (published segments only) for
    /// which `f` returns `true`, a segment at a time. The caller holds a
    /// walk whose bound covers `to`.
    fn find_in(
        &self,
        from: usize,
        to: usize,
        f: &mut impl FnMut(&CallSlot) -> bool,
    ) -> Option<&CallSlot> {
        let mut i = from;
        while i < to {
            let (k, off) = locate(i);
            let end = to.min(BASE * ((1 << (k + 1)) - 1));
            // Ordering: SeqCst, as sweeps need (see `segment`).
            if let Some(seg) = self.segment(k, Ordering::SeqCst) {
                if let Some(slot) = seg[off..off + (end - i)].iter().find(|s| f(s)) {
                    return Some(slot);
                }
            }
            i = end;
        }
        None
    }

    /// The index of the slot at `slot` (a freer's start hint for a later
    /// scan), if its segment is still published: address arithmetic only,
    /// so the slot may have been released (and its segment given back)
    /// since.
    pub(crate) fn index_hint(&self, slot: *const CallSlot) -> Option<usize> {
        let (k, _, off) = self.locate_addr(slot as usize)?;
        Some(BASE * ((1 << k) - 1) + off)
    }

    /// Occupied slots: calls in flight, including those whose cancel
    /// callback or free-state is still running. Gives back the top segments
    /// if the load allows (see the module docs).
    pub(crate) fn census(&self) -> Census {
        let walk = self.scan();
        let mut c = Census::default();
        // Ordering: SeqCst: a census that follows an abort or close in the
        // SeqCst order sees every call that slipped past it (R4).
        self.for_each_slot(&walk, |slot| {
            c.occupied += usize::from(slot.state.load(Ordering::SeqCst).is_occupied());
        });
        self.shrink(&walk, c.occupied);
        c
    }

    /// Gives back the top segments while the calls in flight (`occupied`,
    /// as a walk just counted them) would fit in a quarter of the segments
    /// below. Never segment 0. The memory is freed once no walk is in
    /// progress (at the latest when `walk` ends).
    pub(crate) fn shrink(&self, walk: &Walk<'_>, occupied: usize) {
        if !walk.counted {
            return; // segment 0 at most: nothing to give back
        }
        // One generation of retired segments at a time: while an earlier
        // one still waits for the walks to end (a walk can last as long as
        // a callback), retiring more could pile segments up.
        // Ordering: SeqCst, as in `Walk::drop`.
        if self.retired_count.load(Ordering::SeqCst) != 0 {
            return;
        }
        loop {
            let Some(k) = (1..self.segment_bound().min(SEGMENTS))
                .rev()
                .find(|&k| !self.seg_ptr(k, Ordering::SeqCst).is_null())
            else {
                return;
            };
            let below = BASE * ((1 << k) - 1);
            if occupied * 4 > below || !self.retire(walk, k) {
                return;
            }
        }
    }

    /// Retires segment `k` if every slot of it is free: marks them
    /// `RETIRED`, unpublishes it and puts it on the retired list.
    fn retire(&self, _walk: &Walk<'_>, k: usize) -> bool {
        let Some(seg) = self.segment(k, Ordering::SeqCst) else {
            return false;
        };
        let p = NonNull::from(seg).cast::<CallSlot>();
        let mut max_gen = 0;
        for (i, slot) in seg.iter().enumerate() {
            if !slot.state.try_retire() {
                seg[..i].iter().for_each(|s| s.state.unretire());
                return false;
            }
            max_gen = max_gen.max(slot.state.load(Ordering::Relaxed).generation());
        }
        // Ordering: SeqCst, before the unpublication a grower's null load
        // reads (it then allocates above every old generation).
        self.gen_floor.fetch_max(max_gen + 1, Ordering::SeqCst);
        // No slot of segment `k` can be claimed any more (all `RETIRED`):
        // lower the bound, unless a grower raised it meanwhile (it then
        // covers a segment above `k`). Before the unpublication: a grower
        // that finds `k` unpublished and publishes it again reads the bound
        // after this, and raises it.
        // Ordering: SeqCst, see `segment_bound`.
        let _ = self
            .segments
            .compare_exchange(k + 1, k, Ordering::SeqCst, Ordering::SeqCst);
        // Ordering: SeqCst CAS: only the retirer that unpublishes owns it
        // (two censuses may race for the same segment).
        if self.dir_or_init().segments[k]
            .compare_exchange(
                p.as_ptr(),
                ptr::null_mut(),
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_err()
        {
            return false;
        }
        {
            let mut retired = lock(&self.retired);
            retired.push((k, RetiredPtr(p)));
            // Ordering: SeqCst, see `Walk::drop`.
            self.retired_count.store(retired.len(), Ordering::SeqCst);
        }
        // Our own walk is in progress: the memory goes when the last walk
        // ends (`Walk::drop`, which sees the count).
        true
    }

    /// Segments currently published (for tests and benches).
    #[cfg(test)]
    pub(crate) fn published_segments(&self) -> usize {
        (0..SEGMENTS)
            .filter(|&k| !self.seg_ptr(k, Ordering::SeqCst).is_null())
            .count()
    }
}

/// A slot pointer held past its call (a `Canceller`, a `CancelWatch`, a
/// timer entry): the slot and where its segment was, so that it is only
/// dereferenced while that segment is still the published one.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SlotRef {
    /// The slot (dereferenced directly only in segment 0, which lives as
    /// long as the slab; else recomputed from the live segment).
    slot: NonNull<CallSlot>,
    k: usize,
    /// The segment's address when the reference was taken (compared only).
    base: usize,
    /// The slot's index within its segment.
    off: usize,
}

impl SlotRef {
    /// For a slot of `slab` that the caller's call occupies.
    pub(crate) fn new(slab: &Slab, slot: &CallSlot) -> Self {
        let (k, base, off) = slab
            .locate_slot(slot)
            .expect("an occupied slot's segment is published");
        Self {
            slot: NonNull::from(slot),
            k,
            base: base as usize,
            off,
        }
    }

    /// The address (for overflow keys): never dereferenced here.
    pub(crate) fn addr(&self) -> NonNull<CallSlot> {
        self.slot
    }

    /// Runs `f` on the slot if its segment is still published (always for
    /// segment 0); `None` if the segment was given back (its call is long
    /// finished). The caller keeps `slab` alive.
    #[inline]
    pub(crate) fn with<R>(&self, slab: &Slab, f: impl FnOnce(&CallSlot) -> R) -> Option<R> {
        if self.k == 0 {
            // SAFETY: segment 0 lives as long as the slab, which the caller
            // keeps alive.
            return Some(f(unsafe { self.slot.as_ref() }));
        }
        let walk = slab.walk();
        let base = slab.revalidate(&walk, self.k, self.base)?;
        // SAFETY: the segment is published (so `off` is within its
        // `segment_len(k)` slots) and our walk keeps it from being freed
        // until `walk` drops, after `f`; the pointer is derived from the live
        // segment's, not from the one we kept.
        Some(f(unsafe { base.add(self.off).as_ref() }))
    }
}

// SAFETY: the pointers are dereferenced only through `with`, under the
// slab's walk protocol; `CallSlot` is `Sync`.
unsafe impl Send for SlotRef {}
// SAFETY: as above.
unsafe impl Sync for SlotRef {}

/// Counts from [`Slab::census`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Census {
    pub(crate) occupied: usize,
}

impl Drop for Slab {
    fn drop(&mut self) {
        // `&mut self`: no walk is in progress, and every read below is a
        // plain load (`exclusive_usize`).
        if exclusive_usize(&self.retired_count) != 0 {
            for (k, p) in core::mem::take(&mut *lock(&self.retired)) {
                // SAFETY: as in `free_retired`.
                unsafe { free_segment(p.0, k) };
            }
        }
        let Some(mut block) = NonNull::new(exclusive_ptr(&self.dir)) else {
            return;
        };
        // Every published segment is below the bound: a retirer lowers it
        // only after marking the segment's slots `RETIRED`, and before
        // unpublishing it (always successfully: nobody else can replace a
        // published pointer), and every grower raises it.
        let bound = exclusive_usize(&self.segments).min(SEGMENTS);
        // SAFETY: published by `dir_or_init`; `&mut self`: nobody else
        // reaches the block any more.
        let first = unsafe { block.as_mut() };
        #[cfg(not(loom))]
        debug_assert!(first.segments[bound.max(1)..]
            .iter()
            .all(|p| p.load(Ordering::Relaxed).is_null()));
        for (k, seg) in first.segments.iter().enumerate().take(bound).skip(1) {
            if let Some(p) = NonNull::new(exclusive_ptr(seg)) {
                // SAFETY: published by `grow` from `alloc_segment(k, ..)`,
                // and `&mut self`: no other user.
                unsafe { free_segment(p, k) };
            }
        }
        if first.is_clean() {
            first.reset_for_reuse(bound);
            if spare::put(block).is_ok() {
                return;
            }
        }
        // SAFETY: made by `dir_or_init` with `alloc_array(1, ..)`; segment 0
        // (its `slots`) goes with it; not kept as a spare.
        unsafe { segment::free_array(block, 1) };
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::cell::RefCell;

    type Hook = Box<dyn FnMut(&Slab)>;

    std::thread_local! {
        /// Runs in `grow` right after a segment above the first was
        /// published and covered (a test's window for a racing census).
        static AFTER_GROW: RefCell<Option<Hook>> = RefCell::new(None);
    }

    pub(super) fn after_grow(slab: &Slab) {
        let hook = AFTER_GROW.with(|h| h.borrow_mut().take());
        if let Some(mut hook) = hook {
            hook(slab);
        }
    }

    fn finish(slab: &Slab, p: NonNull<CallSlot>) {
        // SAFETY: the slab is alive and the slot is ours.
        let slot = unsafe { p.as_ref() };
        let crate::state::Completion::OwnerFrees { prev } = slot.state.complete() else {
            panic!("nothing claimed")
        };
        let _ = slot.state.release(prev.with_completed());
        slab.note_released(slot);
    }

    /// Review finding: a census retires a segment between its growth and
    /// the claim in it. The claimer used to reload the segment pointer and
    /// panic ("segment was just published"); it now claims elsewhere.
    #[test]
    fn a_segment_retired_right_after_its_growth_is_skipped() {
        let slab = Slab::new();
        let seg0: Vec<_> = (0..BASE).map(|_| slab.claim()).collect();
        let seg0_addrs: Vec<usize> = seg0.iter().map(|p| p.as_ptr() as usize).collect();
        AFTER_GROW.with(|h| {
            *h.borrow_mut() = Some(Box::new(move |slab: &Slab| {
                // Segment 0's calls complete, and a census finds the new
                // segment 1 entirely free: it retires it.
                for &a in &seg0_addrs {
                    finish(slab, NonNull::new(a as *mut CallSlot).unwrap());
                }
                assert_eq!(slab.census().occupied, 0);
            }))
        });
        let p = slab.claim();
        // SAFETY: the slab is alive and the slot is ours.
        let slot = unsafe { p.as_ref() };
        assert!(slot.state.load(Ordering::Relaxed).is_occupied());
        assert_eq!(slab.census().occupied, 1);
        finish(&slab, p);
        assert_eq!(slab.census().occupied, 0);
    }

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
        assert_eq!(slab.published_segments(), 3, "no shrink while busy");
        let mut indices: Vec<_> = held.iter().map(|c| c.as_ptr() as usize).collect();
        indices.push(a.as_ptr() as usize);
        indices.sort_unstable();
        indices.dedup();
        assert_eq!(indices.len(), 3 * BASE + 1, "a slot was handed out twice");
        // SAFETY: the slab is alive and the slot is ours.
        let slot = unsafe { a.as_ref() };
        let crate::state::Completion::OwnerFrees { prev } = slot.state.complete() else {
            panic!("nothing claimed")
        };
        let _ = slot.state.release(prev.with_completed());
        slab.note_released(slot);
        let again = slab.claim();
        assert_eq!(again, a);
        assert_eq!(slot.state.load(Ordering::Relaxed).generation(), gen_a + 1);
    }

    /// Issue 13 (W1): a dropped slab leaves its clean first block to the
    /// next slab of this thread, whose slots continue their generations.
    #[test]
    fn a_dropped_slab_leaves_its_first_block_to_the_next() {
        let free_spare = || {
            if let Some(block) = spare::take() {
                // SAFETY: a spare came from `alloc_array(1, ..)`; taken, ours.
                unsafe { segment::free_array(block, 1) };
                true
            } else {
                false
            }
        };
        free_spare();
        let first = Slab::new();
        let a = first.claim();
        // SAFETY: as above.
        let gen = unsafe { a.as_ref() }
            .state
            .load(Ordering::Relaxed)
            .generation();
        finish(&first, a);
        // A burst above segment 0, gone again: segment 0 alone is kept.
        let burst: Vec<_> = (0..3 * BASE).map(|_| first.claim()).collect();
        burst.into_iter().for_each(|p| finish(&first, p));
        drop(first);
        let second = Slab::new();
        let b = second.claim();
        assert_eq!(b, a, "the spare block's first slot");
        // SAFETY: as above.
        let slot = unsafe { b.as_ref() };
        assert!(slot.state.load(Ordering::Relaxed).generation() > gen);
        assert_eq!(second.published_segments(), 1, "no segment above the first");
        finish(&second, b);
        drop(second);
        assert!(free_spare(), "kept again");
    }

    /// Issue 13: after a burst, the segments above the first are given
    /// back (once no walk is in progress), a stale slot reference of a
    /// given-back segment is refused, and a segment grown again starts
    /// above every old generation.
    #[test]
    fn a_burst_gives_its_segments_back() {
        let slab = Slab::new();
        let mut held: Vec<_> = (0..100 * BASE).map(|_| slab.claim()).collect();
        let segs = slab.published_segments();
        assert!(segs >= 7, "{segs} segments for {} calls", 100 * BASE);
        // A reference to a slot in the top segment, as a Canceller keeps it.
        // SAFETY: the slab is alive and the slot is ours.
        let last = unsafe { held.last().unwrap().as_ref() };
        let stale = SlotRef::new(&slab, last);
        let stale_gen = last.state.load(Ordering::Relaxed).generation();
        assert_eq!(
            stale.with(&slab, |s| s.state.load(Ordering::Relaxed).generation()),
            Some(stale_gen)
        );
        for p in held.drain(..) {
            // SAFETY: as above.
            let slot = unsafe { p.as_ref() };
            let crate::state::Completion::OwnerFrees { prev } = slot.state.complete() else {
                panic!("nothing claimed")
            };
            let _ = slot.state.release(prev.with_completed());
        }
        assert_eq!(slab.census().occupied, 0);
        assert_eq!(slab.published_segments(), 1, "only segment 0 is kept");
        assert_eq!(slab.segment_bound(), 1, "scans are back to segment 0");
        assert_eq!(
            slab.retired_count.load(Ordering::SeqCst),
            0,
            "freed: no walk left"
        );
        assert_eq!(
            stale.with(&slab, |_| ()),
            None,
            "a stale reference is refused"
        );
        // Grow again: the new slots start above the old generations.
        let again: Vec<_> = (0..100 * BASE).map(|_| slab.claim()).collect();
        // SAFETY: as above.
        let top = unsafe { again.last().unwrap().as_ref() };
        let g = top.state.load(Ordering::Relaxed).generation();
        assert!(g > stale_gen || slab.locate_slot(top).unwrap().0 == 0);
        if let Some(gen) = stale.with(&slab, |s| s.state.load(Ordering::Relaxed).generation()) {
            assert_ne!(gen, stale_gen, "same address, never the same generation");
        }
        assert_eq!(slab.census().occupied, 100 * BASE);
    }
}
