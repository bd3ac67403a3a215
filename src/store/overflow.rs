//! Layer 3: a channel's list of secondary waiters.
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

use crate::sync::{lock, Mutex};

#[derive(Default)]
struct Lists {
    next_id: u64,
    by_slot: HashMap<usize, Vec<(u64, Waker)>>,
}

/// See the module docs.
#[derive(Default)]
pub(crate) struct Overflow {
    lists: Mutex<Lists>,
}

impl Overflow {
    /// Parks (or re-parks) waiter `id` of the slot at `slot`; assigns an id
    /// on first use.
    pub(crate) fn park(&self, slot: usize, id: &mut Option<u64>, waker: &Waker) {
        let fresh = waker.clone();
        let replaced = {
            let mut lists = lock(&self.lists);
            let key = *id.get_or_insert_with(|| {
                lists.next_id += 1;
                lists.next_id
            });
            let list = lists.by_slot.entry(slot).or_default();
            match list.iter_mut().find(|(i, _)| *i == key) {
                Some((_, w)) => Some(core::mem::replace(w, fresh)),
                None => {
                    list.push((key, fresh));
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
                .position(|(i, _)| *i == id)
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
    pub(crate) fn take(&self, slot: usize) -> Vec<(u64, Waker)> {
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
