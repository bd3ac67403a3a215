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
use core::ptr::{self, NonNull};

use crate::slot::CallSlot;
use crate::sync::{lock, AtomicPtr, AtomicU64, AtomicUsize, Mutex, Ordering};

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

/// The segment pointers of a slab, allocated with its first segment (an
/// idle channel that never ran a call pays for none of it: W4).
struct Directory {
    segments: [AtomicPtr<CallSlot>; SEGMENTS],
}

/// A channel's slab of call slots. See the module docs.
pub(crate) struct Slab {
    /// Null until the first segment is grown; then fixed for the slab's
    /// life.
    dir: AtomicPtr<Directory>,
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
struct RetiredPtr(*mut CallSlot);

// SAFETY: the pointer owns a boxed slice of `CallSlot`s, which are `Send`.
unsafe impl Send for RetiredPtr {}

/// A walk over a slab's slots in progress: while any is, no retired segment
/// is freed. A count, never a lock: a walk may run user code (a sweep runs
/// callbacks) and only delays giving memory back.
pub(crate) struct Walk<'a> {
    slab: &'a Slab,
}

impl Drop for Walk<'_> {
    fn drop(&mut self) {
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
            hint: AtomicUsize::new(0),
            id: next_slab_id(),
            walkers: AtomicUsize::new(0),
            retired: Mutex::new(Vec::new()),
            retired_count: AtomicUsize::new(0),
            gen_floor: AtomicU64::new(0),
        }
    }

    /// The segment directory, once the first segment was grown.
    ///
    /// Ordering: SeqCst (at least Acquire, pairing with the publishing CAS
    /// in `dir_or_init`; SeqCst for sweeps, as `segment` explains).
    #[inline]
    fn dir(&self) -> Option<&Directory> {
        let d = self.dir.load(Ordering::SeqCst);
        // SAFETY: published by `dir_or_init` from a `Box`, freed only in
        // `Drop` (`&mut self`).
        (!d.is_null()).then(|| unsafe { &*d })
    }

    /// The directory, allocating it if needed.
    fn dir_or_init(&self) -> &Directory {
        if let Some(d) = self.dir() {
            return d;
        }
        let fresh = Box::into_raw(Box::new(Directory {
            segments: core::array::from_fn(|_| AtomicPtr::new(ptr::null_mut())),
        }));
        // Ordering: SeqCst (release part: publishes the initialised array).
        if self
            .dir
            .compare_exchange(ptr::null_mut(), fresh, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            // SAFETY: never published.
            drop(unsafe { Box::from_raw(fresh) });
        }
        self.dir().expect("published just now")
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

    /// Starts a walk (see [`Walk`]).
    ///
    /// Ordering: SeqCst: the increment precedes every segment load of the
    /// walk, so a retirer that unpublishes a segment and then reads
    /// `walkers` as zero knows no walk can still see it.
    #[inline]
    pub(crate) fn walk(&self) -> Walk<'_> {
        self.walkers.fetch_add(1, Ordering::SeqCst);
        crate::sync::dekker_fence();
        Walk { slab: self }
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
            // SAFETY: published by `grow` from a boxed slice of
            // `segment_len(k)` slots, unpublished by `retire_top`, and no
            // walk can reach it any more (see above).
            drop(unsafe { Box::from_raw(ptr::slice_from_raw_parts_mut(p.0, segment_len(k))) });
        }
    }

    /// Where `slot` lives: (segment index, segment base), if it is one of
    /// this slab's published slots. Address arithmetic only.
    pub(crate) fn locate_slot(&self, slot: &CallSlot) -> Option<(usize, *const CallSlot)> {
        let addr = ptr::from_ref(slot) as usize;
        (0..SEGMENTS).find_map(|k| {
            let base = self.seg_ptr(k, Ordering::Acquire);
            if base.is_null() {
                return None;
            }
            let off = addr.checked_sub(base as usize)? / core::mem::size_of::<CallSlot>();
            (off < segment_len(k)).then_some((k, base.cast_const()))
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
        // Ordering: SeqCst, after the walk's increment (see `walk`).
        let cur = self.seg_ptr(k, Ordering::SeqCst);
        (cur as usize == base).then(|| NonNull::new(cur)).flatten()
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

    /// Segment `k`, allocating and publishing it if needed.
    fn grow(&self, k: usize) -> &[CallSlot] {
        if let Some(seg) = self.segment(k, Ordering::Acquire) {
            return seg;
        }
        // Ordering: Acquire, pairing with the retirer's SeqCst `fetch_max`
        // (which precedes its unpublication, which our null load read).
        let gen = self.gen_floor.load(Ordering::Acquire);
        let fresh: Box<[CallSlot]> = (0..segment_len(k))
            .map(|_| CallSlot::at_generation(gen))
            .collect();
        let fresh = Box::into_raw(fresh).cast::<CallSlot>();
        // Ordering: SeqCst (release part: publishes the initialised slots;
        // SeqCst part: see `segment`).
        if let Err(_winner) = self.dir_or_init().segments[k].compare_exchange(
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

    /// Slot `index`, if its segment is published. Callers hold a walk.
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

    /// `claim` without a usable thread hint: the channel's hint, then a scan
    /// from it, then growth. Holds a walk: it reaches every segment.
    #[cold]
    #[inline(never)]
    fn claim_cold(&self) -> NonNull<CallSlot> {
        let _walk = self.walk();
        // Ordering: Relaxed for the channel hint everywhere: it only picks
        // where to start; `try_occupy` decides.
        let hint = self.hint.load(Ordering::Relaxed);
        let bound = self.index_bound();
        let start = if hint < bound { hint } else { 0 };
        for index in (start..bound).chain(0..start) {
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
            let seg = self.grow(k);
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
            self.index_bound()
        );
    }

    fn try_claim_at(&self, index: usize) -> Option<NonNull<CallSlot>> {
        let slot = self.slot(index)?;
        slot.state.try_occupy()?;
        Some(NonNull::from(slot))
    }

    /// One past the highest index of the highest published segment.
    /// Segments below it may be unpublished (given back): `slot` skips them.
    fn index_bound(&self) -> usize {
        let top = (0..SEGMENTS)
            .rev()
            .find(|&k| !self.seg_ptr(k, Ordering::Acquire).is_null());
        top.map_or(0, |k| BASE * ((1 << (k + 1)) - 1))
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

    /// Every slot of every published segment, during `walk`.
    pub(crate) fn for_each_slot(&self, _walk: &Walk<'_>, mut f: impl FnMut(&CallSlot)) {
        for k in 0..SEGMENTS {
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
        _walk: &'a Walk<'a>,
        start: Option<usize>,
        mut f: impl FnMut(&CallSlot) -> bool,
    ) -> Option<&'a CallSlot> {
        let bound = self.index_bound();
        let start = start.unwrap_or(0);
        let start = if start < bound { start } else { 0 };
        (start..bound)
            .chain(0..start)
            .filter_map(|i| self.slot(i))
            .find(|s| f(s))
    }

    /// The index of a slot the caller occupies (a freer's start hint for a
    /// later scan, taken while the slot is still its own).
    #[inline]
    pub(crate) fn index_hint(&self, slot: &CallSlot) -> Option<usize> {
        self.index_of(slot)
    }

    /// The index of `slot`, if it is one of this slab's published slots.
    /// Address arithmetic only.
    fn index_of(&self, slot: &CallSlot) -> Option<usize> {
        let (k, base) = self.locate_slot(slot)?;
        let off = (ptr::from_ref(slot) as usize - base as usize) / core::mem::size_of::<CallSlot>();
        Some(BASE * ((1 << k) - 1) + off)
    }

    /// Occupied slots: calls in flight, including those whose cancel
    /// callback or free-state is still running. Gives back the top segments
    /// if the load allows (see the module docs).
    pub(crate) fn census(&self) -> Census {
        let walk = self.walk();
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
        // One generation of retired segments at a time: while an earlier
        // one still waits for the walks to end (a walk can last as long as
        // a callback), retiring more could pile segments up.
        // Ordering: SeqCst, as in `Walk::drop`.
        if self.retired_count.load(Ordering::SeqCst) != 0 {
            return;
        }
        loop {
            let Some(k) = (1..SEGMENTS)
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
        let p = seg.as_ptr().cast_mut();
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
        // Ordering: SeqCst CAS: only the retirer that unpublishes owns it
        // (two censuses may race for the same segment).
        if self.dir_or_init().segments[k]
            .compare_exchange(p, ptr::null_mut(), Ordering::SeqCst, Ordering::SeqCst)
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
        let (k, base) = slab
            .locate_slot(slot)
            .expect("an occupied slot's segment is published");
        let off = (ptr::from_ref(slot) as usize - base as usize) / core::mem::size_of::<CallSlot>();
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
        // `&mut self`: no walk is in progress.
        for (k, p) in core::mem::take(&mut *lock(&self.retired)) {
            // SAFETY: as in `free_retired`.
            drop(unsafe { Box::from_raw(ptr::slice_from_raw_parts_mut(p.0, segment_len(k))) });
        }
        let dir = self.dir.swap(ptr::null_mut(), Ordering::Acquire);
        if dir.is_null() {
            return;
        }
        // SAFETY: published by `dir_or_init` from a `Box`; `&mut self`.
        let dir = unsafe { Box::from_raw(dir) };
        for (k, seg) in dir.segments.iter().enumerate() {
            let p = seg.swap(ptr::null_mut(), Ordering::Acquire);
            if !p.is_null() {
                // SAFETY: published by `grow` from a boxed slice of
                // `segment_len(k)` slots; `&mut self` means no other user.
                drop(unsafe { Box::from_raw(ptr::slice_from_raw_parts_mut(p, segment_len(k))) });
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
