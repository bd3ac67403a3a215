//! Layer 3: a channel's slab of call slots ([`Slab`]).
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
//! which is at most twice the channel's peak concurrency .
//!
use core::ptr::{self, NonNull};

use crate::slot::CallSlot;
use crate::sync::{AtomicPtr, AtomicUsize, Ordering};

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
    /// `SeqCst` order sees every segment a surviving call lives in (R4).
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

    /// The first slot, looking from `start` (a freer's own slot) onwards
    /// and wrapping around, for which `f` returns `true`. Starting at the
    /// caller's slot makes tearing down many calls of an orphaned channel
    /// cost about one look each, not a scan each.
    pub(crate) fn find_slot_from(
        &self,
        start: Option<&CallSlot>,
        mut f: impl FnMut(&CallSlot) -> bool,
    ) -> Option<&CallSlot> {
        let capacity = self.published_capacity();
        let start = start.and_then(|s| self.index_of(s)).unwrap_or(0);
        let start = if start < capacity { start } else { 0 };
        (start..capacity)
            .chain(0..start)
            .filter_map(|i| self.slot(i))
            .find(|s| f(s))
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

    /// Occupied slots: calls in flight, including those whose cancel
    /// callback or free-state is still running.
    pub(crate) fn census(&self) -> Census {
        let mut c = Census::default();
        // Ordering: SeqCst: a census that follows an abort or close in the
        // SeqCst order sees every call that slipped past it (R4).
        self.for_each_slot(|slot| {
            c.occupied += usize::from(slot.state.load(Ordering::SeqCst).is_occupied());
        });
        c
    }
}

/// Counts from [`Slab::census`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Census {
    pub(crate) occupied: usize,
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
        let crate::state::Completion::OwnerFrees { prev } = slot.state.complete() else {
            panic!("nothing claimed")
        };
        let _ = slot.state.release(prev.with_completed());
        slab.note_released(slot);
        let again = slab.claim();
        assert_eq!(again, a);
        assert_eq!(slot.state.load(Ordering::Relaxed).generation(), gen_a + 1);
    }
}
