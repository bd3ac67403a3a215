//! Layer 4: a channel's list of secondary waiters.
//!
//! The first `cancelled()` future of a call parks in the call's slot (its
//! `AtomicWaker`); every other future of that call — and every
//! [`CancelWatch`](crate::CancelWatch) future, which may outlive the call and
//! so must never touch the slot's waker (issue 12 #1) — parks here, keyed by
//! the slot's address. Waking a slot's waiters removes exactly that slot's
//! list (no re-partition of the channel's waiters: issue 12 #7). Wakers are
//! cloned before and dropped after the mutex is held: no user code runs
//! under it (issue 12 #8).

use core::task::Waker;
use std::collections::HashMap;

use crate::sync::{lock, Arc, AtomicU8, Mutex, Ordering};
use crate::value::stats::{reason_from_code, reason_to_code};
use crate::CancelReason;

/// Where a canceller leaves the reason for a parked watch future, which may
/// only poll again after its call completed (R5: it must still report the
/// reason the callback got). 0 = nothing decided for it.
#[derive(Debug, Default)]
pub(crate) struct Outcome(AtomicU8);

impl Outcome {
    /// The reason a canceller left, if any. Ordering: Acquire, pairing with
    /// `set`'s Release (which precedes the wake).
    pub(crate) fn get(&self) -> Option<CancelReason> {
        reason_from_code(self.0.load(Ordering::Acquire))
    }

    fn set(&self, reason: CancelReason) {
        // Ordering: Release, see `get`.
        self.0.store(reason_to_code(reason), Ordering::Release);
    }
}

/// A parked waiter.
pub(crate) struct Entry {
    id: u64,
    /// The generation of the call it waits for.
    generation: u64,
    waker: Waker,
    outcome: Option<Arc<Outcome>>,
}

impl Entry {
    /// Leaves `reason` for the waiter if it waits for generation
    /// `generation` (another generation's waiter is only woken: it polls
    /// again and parks again), then wakes it.
    pub(crate) fn wake(self, generation: u64, reason: Option<CancelReason>) {
        if let (Some(o), Some(r)) = (&self.outcome, reason) {
            if self.generation == generation {
                o.set(r);
            }
        }
        self.waker.wake();
    }
}

#[derive(Default)]
struct Lists {
    next_id: u64,
    by_slot: HashMap<usize, Vec<Entry>>,
}

/// See the module docs.
#[derive(Default)]
pub(crate) struct Overflow {
    lists: Mutex<Lists>,
}

impl Overflow {
    /// Parks (or re-parks) waiter `id` of generation `generation` of the
    /// slot at `slot`; assigns an id on first use.
    pub(crate) fn park(
        &self,
        slot: usize,
        generation: u64,
        id: &mut Option<u64>,
        waker: &Waker,
        outcome: Option<&Arc<Outcome>>,
    ) {
        let fresh = waker.clone();
        let outcome = outcome.map(Arc::clone);
        let replaced = {
            let mut lists = lock(&self.lists);
            let key = *id.get_or_insert_with(|| {
                lists.next_id += 1;
                lists.next_id
            });
            let list = lists.by_slot.entry(slot).or_default();
            match list.iter_mut().find(|e| e.id == key) {
                Some(e) => Some(core::mem::replace(&mut e.waker, fresh)),
                None => {
                    list.push(Entry {
                        id: key,
                        generation,
                        waker: fresh,
                        outcome,
                    });
                    None
                }
            }
        };
        drop(replaced);
    }

    /// Removes waiter `id` of `slot`, if it is still parked.
    pub(crate) fn unpark(&self, slot: usize, id: u64) {
        let removed = {
            let mut lists = lock(&self.lists);
            let Some(list) = lists.by_slot.get_mut(&slot) else {
                return;
            };
            let removed = list
                .iter()
                .position(|e| e.id == id)
                .map(|pos| list.swap_remove(pos));
            if list.is_empty() {
                lists.by_slot.remove(&slot);
                shrink(&mut lists);
            }
            removed
        };
        drop(removed);
    }

    /// Takes every waiter of `slot` (to be woken by the caller, outside the
    /// lock).
    pub(crate) fn take(&self, slot: usize) -> Vec<Entry> {
        let mut lists = lock(&self.lists);
        let taken = lists.by_slot.remove(&slot).unwrap_or_default();
        shrink(&mut lists);
        taken
    }

    /// Waiters parked (for tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        lock(&self.lists).by_slot.values().map(Vec::len).sum()
    }
}

/// Memory follows the live load: give back the map's table after a burst.
fn shrink(lists: &mut Lists) {
    if lists.by_slot.capacity() > 64 && lists.by_slot.len() * 8 < lists.by_slot.capacity() {
        lists.by_slot.shrink_to_fit();
    }
}
