//! A process-wide, sharded hashed timing wheel: expires call deadlines.
//!
//! The module is generic over what an entry carries ([`Expiry`]) and imports
//! nothing from the engine; the engine keeps one `Timer` in a `static`
//! (through `LazyLock`/`OnceLock`, since [`Timer::new`] reads the clock and
//! the CPU count).
//!
//! # Structure
//!
//! ```text
//!  Timer ─┬─ base: Instant (time 0; taken in `new`, i.e. at first use)
//!         ├─ hint: AtomicUsize ── a lower bound on the earliest pending
//!         │                       deadline, in µs (NO_WAKE: nothing to wake for)
//!         ├─ driver thread "callcancel-timer" (spawned by the first `arm`)
//!         └─ shards[n], n = available_parallelism().next_power_of_two() ≤ 64,
//!            one per cache line pair, picked by `sync::thread_shard`:
//!
//!            Mutex<Wheel> ──┬─ slots: Vec<Slot>   (slab, reused by generation)
//!                           │    Slot { at: u64, prev: u32, next: u32,
//!                           │           gen: u32, entry: Option<E> }
//!                           ├─ heads[4096]: u32 ──▶ slot ⇄ slot ⇄ slot   (bucket (at/1ms) % 4096,
//!                           │                        intrusive doubly-linked, by index)
//!                           ├─ bucket_min[4096]: u64  lower bound of each bucket's `at`
//!                           ├─ occupied: 4096-bit bitmap of non-empty buckets
//!                           ├─ free: u32 ──▶ free slot ⇄ free slot   (doubly linked too,
//!                           │                 so a free tail slot can be popped in O(1))
//!                           ├─ cursor: u64   every entry with at ≤ cursor was taken
//!                           └─ next_lb: u64  lower bound of the shard's earliest `at`
//! ```
//!
//! * **Time**: an entry stores its deadline exactly, as `at` = nanoseconds
//!   since `base` (the entry's 1 ms tick is `at / 1 ms`, so it need not be
//!   stored). A sweep at `now` takes the
//!   entries with `at <= now - base` only: an entry never fires early, and
//!   since the driver sleeps until the earliest `at` (to the microsecond)
//!   rather than to a tick edge, it is not late by the tick's rounding
//!   either. A deadline 584 years or more after `base` saturates to
//!   [`NEVER`] and never fires; it can still be disarmed.
//! * **Buckets**: 4096 of 1 ms (one turn is 4.096 s). An entry lives in
//!   bucket `(at / 1 ms) % 4096` whatever its turn; a sweep walks a bucket only if its
//!   `bucket_min` is due and leaves the entries of later turns in place (so
//!   a sweep costs what expires plus the not-yet-due entries of the buckets
//!   it walks).
//! * **Keys** ([`TimerKey`], a nonzero `u64`): `gen:32 | shard:6 | index:26`.
//!   A slot's generation is bumped every time it is freed, so a stale key
//!   never matches a reused slot (unless that one slot was reused exactly
//!   2^32 times in between). Slots popped off the tail leave their next
//!   generation in the shard's `gen_floor`, which a slot created later at
//!   any index starts from.
//! * **Memory**: 24 bytes of bookkeeping per entry beside `Option<E>` (32
//!   bytes in all for a pointer-sized `E` with a niche). Freed slots at the
//!   tail of the slab are popped, and the slab's capacity halves whenever
//!   its length falls under a quarter of it (down to [`MIN_SLOTS`]), so a
//!   burst's storage is returned as it drains. Holes in the middle stay (the
//!   free list reuses them first). The bucket arrays (48 KiB) are allocated
//!   when a shard is first used and kept.
//!
//! # Arm, disarm, expire
//!
//! `arm` and `disarm` take one shard lock and do O(1) work (amortised, for
//! the slab's growth and shrinking); no lock or RMW is shared by all shards
//! except `hint`, which `arm` only *reads* unless its deadline is earlier
//! than every pending one. The driver (or [`Timer::run_expired`]) locks each
//! shard in turn, unlinks the due entries, calls [`Expiry::take`] on each
//! (under the lock, so a racing `disarm` either removed the entry before or
//! finds its generation gone after) and, with no lock held, calls
//! [`Expiry::fire`] on each.
//!
//! # How the driver sleeps (the `hint` protocol)
//!
//! The driver parks with no timeout when `hint == NO_WAKE` and otherwise
//! until `hint` microseconds after `base`. A sweep (`Timer::sweep`):
//!
//! 1. stores `NO_WAKE` into `hint`;
//! 2. locks each shard, takes its due entries and reads (or recomputes) the
//!    shard's lower bound `next_lb`;
//! 3. `fetch_min`s the smallest bound into `hint`;
//! 4. (driver only) reads `hint` and parks accordingly.
//!
//! An `arm` due at `t` inserts under the shard lock, then lowers `hint` to
//! `t` (`fetch_min`) and, if that RMW read a value `> t`, unparks the driver.
//! Why no entry is overslept: take a sweep whose step 2 locked the entry's
//! shard *before* the arm did. Then its step-1 store happens-before the
//! arm's RMW (through the shard mutex), so the RMW comes later in `hint`'s
//! modification order. Between that store and the driver's read in step 4
//! only `fetch_min`s follow (from arms, and from step 3), so the first of
//! them to bring `hint` to `<= t` is either step 3 (which the step-4 read
//! then sees, being later in program order) or an arm's, which read a value
//! `> t` and unparks: the unpark either happens-before the step-4 read (via
//! the token a previous park consumed; then the read sees it) or makes the
//! coming park return at once, and the next sweep finds the entry. If the
//! sweep locked the shard *after* the arm, it saw the entry in step 2.
//! Foreign sweepers ([`Timer::run_expired`] from other threads) also unpark
//! the driver when their step 3 lowers `hint`, because their step 1 may
//! have hidden a bound from a driver that is about to park.
//!
//! Only one location is involved and the only data exchanged (the entries)
//! goes through the shard mutexes, so every access to `hint` is `Relaxed`:
//! the argument above uses coherence of `hint` plus the happens-before that
//! the mutexes and `unpark`→`park` give, never an ordering of `hint` itself.
//! The driver thread's handle sits in a `OnceLock` that the driver fills
//! *before* its first sweep, so an `arm` that finds it empty finds its entry
//! swept by that first sweep (same argument, with the `OnceLock` write in
//! place of step 1).
//!
//! A shard's `next_lb` is kept as a lower bound (lowered by `arm`, never
//! raised by `disarm`), and recomputed only after a sweep took something
//! from the shard: the recomputation scans the occupied-bucket bitmap from
//! the cursor and stops at the first bucket that cannot beat the best bound
//! found, using `bucket_min` to skip buckets of later turns. With entries
//! pending the driver thus wakes at the earliest pending deadline (plus at
//! most one wake for a disarmed entry's stale bound), and a sweep walks only
//! the buckets of the ticks since the previous one (at most one turn).
//!
//! # Panics
//!
//! A panicking [`Expiry::fire`] (user code) is caught; the other entries of
//! the batch still fire, and the payloads are dropped once the whole batch
//! has fired, each drop guarded again (a payload whose destructor panics is
//! leaked rather than allowed to unwind the driver). A panicking
//! [`Expiry::take`] (a bug: it runs no user code) is caught too: its entry
//! was unlinked before the call, so the wheel stays consistent and the
//! entry is simply lost. Poisoned shard mutexes are recovered
//! (`sync::lock`): no user code runs under them.
//!
//! # Loom
//!
//! Under `--cfg loom` no driver thread is ever started (`arm` does not spawn
//! one and no unpark is attempted); models call [`Timer::run_expired`] to
//! expire entries by hand. Shards use loom's mutexes; `hint` and the start
//! flag are loom atomics.

use std::any::Any;
use std::num::NonZeroU64;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use crate::sync::{lock, thread_shard, AtomicU8, AtomicUsize, Mutex, Ordering};

/// What a timer entry carries.
pub(crate) trait Expiry: Send + 'static {
    /// What `take` hands to `fire`.
    type Fired: Send;
    /// Runs under the entry's shard lock when the entry expires: while it
    /// runs, no `disarm` of this entry can complete (so the engine can e.g.
    /// take a strong reference on something the entry points at, which is
    /// alive as long as the entry is in the wheel). Must be quick, must not
    /// call back into the timer, no user code.
    fn take(self) -> Self::Fired;
    /// Runs with no timer lock held, on the driver thread (or the thread
    /// calling [`Timer::run_expired`]). May run arbitrary code, may panic
    /// (caught), may call `arm`/`disarm`.
    fn fire(fired: Self::Fired);
    /// Runs after each batch of `fire`s (no lock held): lets the engine hand
    /// on what the batch collected in one step.
    fn batch_done() {}
}

/// A caught panic payload.
type Payload = Box<dyn Any + Send + 'static>;

/// Nanoseconds per tick (the width of a bucket).
const TICK_NS: u64 = 1_000_000;
/// One tick as a `Duration`.
#[cfg_attr(loom, allow(dead_code))]
const TICK: Duration = Duration::from_millis(1);
/// Nanoseconds per unit of `hint` (microseconds: a `usize` of them lasts 71
/// minutes even on 32-bit targets).
const HINT_NS: u64 = 1_000;
const BUCKET_BITS: u32 = 12;
const BUCKETS: usize = 1 << BUCKET_BITS;
const BUCKET_MASK: usize = BUCKETS - 1;
/// "No slot" in the u32 links.
const NIL: u32 = u32::MAX;
const INDEX_BITS: u32 = 26;
const SHARD_BITS: u32 = 6;
const MAX_SHARDS: usize = 1 << SHARD_BITS;
/// Slots per shard the key can address.
const MAX_SLOTS: usize = 1 << INDEX_BITS;
/// The slab never shrinks below this capacity (no malloc churn when a shard
/// keeps going from empty to one entry and back).
const MIN_SLOTS: usize = 64;
/// The saturated deadline (584 years after `base` or later): never due.
const NEVER: u64 = u64::MAX;
/// `hint`: nothing pending that can ever fire; park without timeout.
const NO_WAKE: usize = usize::MAX;
/// `hint`: a bound too large for a `usize` of microseconds (32-bit targets
/// only, after 71 minutes): the driver re-sweeps every tick instead of
/// sleeping until it.
const FAR_WAKE: usize = usize::MAX - 1;

/// Identifies one armed entry; `gen:32 | shard:6 | index:26`, nonzero
/// because generations start at 1 and skip 0.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct TimerKey(NonZeroU64);

impl TimerKey {
    fn new(gen: u32, shard: usize, index: u32) -> Self {
        debug_assert!(gen != 0 && shard < MAX_SHARDS && (index as usize) < MAX_SLOTS);
        let raw = (u64::from(gen) << 32) | ((shard as u64) << INDEX_BITS) | u64::from(index);
        match NonZeroU64::new(raw) {
            Some(k) => Self(k),
            None => unreachable!("generation 0 is never issued"),
        }
    }

    /// The raw key, e.g. to keep it in an atomic word; never 0.
    #[cfg(test)]
    pub(crate) fn to_raw(self) -> u64 {
        self.0.get()
    }

    /// The key `to_raw` returned (None for 0).
    #[cfg(test)]
    pub(crate) fn from_raw(raw: u64) -> Option<Self> {
        NonZeroU64::new(raw).map(Self)
    }

    fn gen(self) -> u32 {
        (self.0.get() >> 32) as u32
    }

    fn shard(self) -> usize {
        ((self.0.get() >> INDEX_BITS) as usize) & (MAX_SHARDS - 1)
    }

    fn index(self) -> u32 {
        (self.0.get() as u32) & (MAX_SLOTS as u32 - 1)
    }
}

fn next_gen(gen: u32) -> u32 {
    if gen == u32::MAX {
        1
    } else {
        gen + 1
    }
}

/// The bucket of a deadline `at` (nanoseconds since `base`).
fn bucket_of(at: u64) -> usize {
    ((at / TICK_NS) as usize) & BUCKET_MASK
}

/// One slab slot: 24 bytes of bookkeeping plus `Option<E>`.
struct Slot<E> {
    /// The entry's deadline, in nanoseconds since `base` (meaningless
    /// while free); its bucket is `at / 1 ms % 4096`.
    at: u64,
    /// Bucket list links while occupied, free list links while free.
    prev: u32,
    next: u32,
    /// The generation of the current (or, while free, the next) occupant.
    gen: u32,
    entry: Option<E>,
}

/// One shard's wheel; always accessed under its shard mutex.
struct Wheel<E> {
    slots: Vec<Slot<E>>,
    /// Head of the free list (doubly linked through `prev`/`next`).
    free: u32,
    /// Occupied slots.
    len: usize,
    /// Bucket heads; empty until the shard's first `insert`.
    heads: Box<[u32]>,
    /// Per bucket, a lower bound of its entries' `at` (`NEVER` if empty):
    /// lowered by `insert`, exact after a sweep walked the bucket.
    bucket_min: Box<[u64]>,
    /// Bit `b` set iff bucket `b` is non-empty.
    occupied: Box<[u64]>,
    /// Every entry with `at <= cursor` has been taken (nanoseconds since
    /// `base`); `insert` refuses such deadlines (they have passed).
    cursor: u64,
    /// A lower bound of the earliest `at` in the shard (`NEVER` if none).
    next_lb: u64,
    /// The generation new slots (pushed at the tail) start with: at least
    /// the next generation of every slot popped off the tail.
    gen_floor: u32,
}

impl<E: Expiry> Wheel<E> {
    fn new() -> Self {
        Self {
            slots: Vec::new(),
            free: NIL,
            len: 0,
            heads: Box::new([]),
            bucket_min: Box::new([]),
            occupied: Box::new([]),
            cursor: 0,
            next_lb: NEVER,
            gen_floor: 1,
        }
    }

    /// Inserts `entry` due at `at`; `Err(entry)` if a sweep passed `at`.
    fn insert(&mut self, at: u64, entry: E) -> Result<(u32, u32), E> {
        if at <= self.cursor {
            return Err(entry);
        }
        if self.heads.is_empty() {
            self.heads = vec![NIL; BUCKETS].into_boxed_slice();
            self.bucket_min = vec![NEVER; BUCKETS].into_boxed_slice();
            self.occupied = vec![0; BUCKETS / 64].into_boxed_slice();
        }
        let idx = if self.free != NIL {
            let idx = self.free;
            self.free_unlink(idx);
            idx
        } else {
            let idx = self.slots.len();
            assert!(
                idx < MAX_SLOTS,
                "callcancel timer: more than 2^26 entries armed in one shard"
            );
            self.slots.push(Slot {
                at: 0,
                prev: NIL,
                next: NIL,
                gen: self.gen_floor,
                entry: None,
            });
            idx as u32
        };
        let b = bucket_of(at);
        let head = self.heads[b];
        let slot = &mut self.slots[idx as usize];
        slot.at = at;
        slot.prev = NIL;
        slot.next = head;
        slot.entry = Some(entry);
        let gen = slot.gen;
        if head != NIL {
            self.slots[head as usize].prev = idx;
        } else {
            self.occupied[b / 64] |= 1 << (b % 64);
        }
        self.heads[b] = idx;
        self.bucket_min[b] = self.bucket_min[b].min(at);
        self.next_lb = self.next_lb.min(at);
        self.len += 1;
        Ok((idx, gen))
    }

    /// Removes the entry at `idx` if it is occupied by generation `gen`.
    fn remove_if(&mut self, idx: u32, gen: u32) -> Option<E> {
        let slot = self.slots.get(idx as usize)?;
        if slot.gen != gen || slot.entry.is_none() {
            return None;
        }
        self.remove(idx)
    }

    /// Unlinks the occupied slot `idx` from its bucket and frees it.
    fn remove(&mut self, idx: u32) -> Option<E> {
        let slot = &mut self.slots[idx as usize];
        let entry = slot.entry.take()?;
        let (prev, next, b) = (slot.prev, slot.next, bucket_of(slot.at));
        slot.gen = next_gen(slot.gen);
        if prev != NIL {
            self.slots[prev as usize].next = next;
        } else {
            self.heads[b] = next;
        }
        if next != NIL {
            self.slots[next as usize].prev = prev;
        }
        if self.heads[b] == NIL {
            self.occupied[b / 64] &= !(1 << (b % 64));
            self.bucket_min[b] = NEVER;
        }
        self.len -= 1;
        self.free_push(idx);
        self.trim();
        Some(entry)
    }

    fn free_push(&mut self, idx: u32) {
        let head = self.free;
        let slot = &mut self.slots[idx as usize];
        slot.prev = NIL;
        slot.next = head;
        if head != NIL {
            self.slots[head as usize].prev = idx;
        }
        self.free = idx;
    }

    fn free_unlink(&mut self, idx: u32) {
        let (prev, next) = {
            let slot = &self.slots[idx as usize];
            (slot.prev, slot.next)
        };
        if prev != NIL {
            self.slots[prev as usize].next = next;
        } else {
            self.free = next;
        }
        if next != NIL {
            self.slots[next as usize].prev = prev;
        }
    }

    /// Pops free slots off the tail and gives capacity back once the slab is
    /// under a quarter full. Amortised O(1): a slot is popped once per push,
    /// and a shrink to twice the length is only repeated after the length
    /// halved again.
    fn trim(&mut self) {
        while let Some(last) = self.slots.last() {
            if last.entry.is_some() {
                break;
            }
            let idx = (self.slots.len() - 1) as u32;
            self.gen_floor = self.gen_floor.max(last.gen);
            self.free_unlink(idx);
            self.slots.pop();
        }
        let cap = self.slots.capacity();
        if cap > MIN_SLOTS && self.slots.len() * 4 < cap {
            self.slots.shrink_to((self.slots.len() * 2).max(MIN_SLOTS));
        }
    }

    /// The smallest `d` in `from..limit` (`limit <= BUCKETS`) such that
    /// bucket `(start + d) % BUCKETS` is non-empty.
    fn next_occupied(&self, start: usize, mut d: usize, limit: usize) -> Option<usize> {
        while d < limit {
            let b = (start + d) & BUCKET_MASK;
            // Buckets b.. to the end of this word are d.. in order: BUCKETS
            // is a multiple of 64, so the wrap-around falls on a word edge.
            let word = self.occupied[b / 64] >> (b % 64);
            if word != 0 {
                let found = d + word.trailing_zeros() as usize;
                return (found < limit).then_some(found);
            }
            d += 64 - b % 64;
        }
        None
    }

    /// Takes every entry with `at <= now` (pushing `take`'s results onto
    /// `out`), advances the cursor to `now` and returns the shard's lower
    /// bound. Walks the buckets of ticks `cursor / 1 ms ..= now / 1 ms` (the
    /// first one again: the previous sweep may have left entries of it that
    /// were due later in that tick), at most one turn.
    fn sweep(&mut self, now: u64, out: &mut Vec<E::Fired>, panics: &mut Vec<Payload>) -> u64 {
        if now <= self.cursor {
            return self.next_lb;
        }
        if self.next_lb > now {
            // Nothing due (the bound is a lower bound): just move on.
            self.cursor = now;
            return self.next_lb;
        }
        let first = self.cursor / TICK_NS;
        let start = (first as usize) & BUCKET_MASK;
        let span = (now / TICK_NS - first + 1).min(BUCKETS as u64) as usize;
        let mut d = 0;
        while let Some(found) = self.next_occupied(start, d, span) {
            let b = (start + found) & BUCKET_MASK;
            if self.bucket_min[b] <= now {
                self.expire_bucket(b, now, out, panics);
            }
            d = found + 1;
        }
        self.cursor = now;
        self.next_lb = self.scan_next();
        self.next_lb
    }

    fn expire_bucket(
        &mut self,
        b: usize,
        now: u64,
        out: &mut Vec<E::Fired>,
        panics: &mut Vec<Payload>,
    ) {
        let mut idx = self.heads[b];
        let mut later = NEVER;
        while idx != NIL {
            let slot = &self.slots[idx as usize];
            let (next, at) = (slot.next, slot.at);
            if at <= now {
                // `remove` pops only free slots, so `next` (occupied) stays.
                if let Some(entry) = self.remove(idx) {
                    match catch_unwind(AssertUnwindSafe(move || entry.take())) {
                        Ok(fired) => out.push(fired),
                        Err(p) => panics.push(p),
                    }
                }
            } else {
                later = later.min(at);
            }
            idx = next;
        }
        if self.heads[b] != NIL {
            self.bucket_min[b] = later;
        }
    }

    /// The earliest `at` an entry of this shard can have: the first
    /// occupied bucket from the cursor's tick on, refined by `bucket_min`
    /// for buckets whose entries belong to later turns.
    fn scan_next(&self) -> u64 {
        if self.len == 0 {
            return NEVER;
        }
        let first = self.cursor / TICK_NS;
        let start = (first as usize) & BUCKET_MASK;
        let mut best = NEVER;
        let mut d = 0;
        while let Some(found) = self.next_occupied(start, d, BUCKETS) {
            // Every entry here has `at > cursor` and lies in a tick
            // congruent to `first + found`: so `at >= from`.
            let from = if found == 0 {
                self.cursor + 1
            } else {
                (first + found as u64).saturating_mul(TICK_NS)
            };
            if from >= best {
                break;
            }
            let b = (start + found) & BUCKET_MASK;
            best = best.min(from.max(self.bucket_min[b]));
            d = found + 1;
        }
        best
    }
}

/// One shard on its own cache lines (128: adjacent-line prefetch).
#[repr(align(128))]
struct Shard<E>(Mutex<Wheel<E>>);

/// The timing wheel; see the module docs.
pub(crate) struct Timer<E: Expiry> {
    shards: Box<[Shard<E>]>,
    /// Time 0 of every `at`, `cursor` and `hint`.
    base: Instant,
    /// A lower bound of the earliest pending deadline in microseconds since
    /// `base`, or `NO_WAKE`/`FAR_WAKE`
    /// (the protocol is in the module docs).
    hint: AtomicUsize,
    /// 0 until the first `arm` started the driver.
    #[cfg_attr(loom, allow(dead_code))]
    started: AtomicU8,
    /// The driver thread, filled by the driver itself before its first sweep.
    #[cfg(not(loom))]
    driver: std::sync::OnceLock<std::thread::Thread>,
}

impl<E: Expiry> Timer<E> {
    /// A timer with `available_parallelism().next_power_of_two()` shards
    /// (at most 64; 2 under loom). Starts no thread.
    pub(crate) fn new() -> Self {
        #[cfg(loom)]
        let n = 2;
        #[cfg(not(loom))]
        let n = std::thread::available_parallelism().map_or(8, |n| n.get());
        Self::with_shards(n)
    }

    /// A timer with `n` shards (rounded up to a power of two, 1..=64).
    pub(crate) fn with_shards(n: usize) -> Self {
        let n = n.clamp(1, MAX_SHARDS).next_power_of_two();
        Self {
            shards: (0..n).map(|_| Shard(Mutex::new(Wheel::new()))).collect(),
            base: Instant::now(),
            hint: AtomicUsize::new(NO_WAKE),
            started: AtomicU8::new(0),
            #[cfg(not(loom))]
            driver: std::sync::OnceLock::new(),
        }
    }

    /// Arms an entry firing at or after `deadline`. Returns `Err(entry)` if
    /// `deadline` has passed already (the caller fires it itself,
    /// synchronously). Starts the driver thread on first use (never before;
    /// never under loom). Panics only if the driver thread cannot be
    /// spawned or a shard holds 2^26 entries.
    pub(crate) fn arm(&'static self, deadline: Instant, entry: E) -> Result<TimerKey, E> {
        if deadline <= Instant::now() {
            return Err(entry);
        }
        let at = self.nanos(deadline);
        self.start_driver();
        let shard = thread_shard(self.shards.len());
        let (index, gen) = lock(&self.shards[shard].0).insert(at, entry)?;
        self.lower_hint(at, true);
        Ok(TimerKey::new(gen, shard, index))
    }

    /// Removes an armed entry; `Some(entry)` if it was still armed, `None`
    /// if it already expired (was taken) or the key is stale. O(1).
    pub(crate) fn disarm(&self, key: TimerKey) -> Option<E> {
        let shard = self.shards.get(key.shard())?;
        // The shard's bound and `hint` stay as they are: a lower bound stays
        // one when an entry leaves (at most one early wake-up).
        lock(&shard.0).remove_if(key.index(), key.gen())
    }

    /// Entries armed and not yet expired or disarmed (for tests/stats; locks
    /// each shard in turn, so it is exact only when nobody arms or expires).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn pending(&self) -> usize {
        self.shards.iter().map(|s| lock(&s.0).len).sum()
    }

    /// Expires every entry due at `now` (takes them under their shard locks,
    /// then fires them with no lock held, on this thread); returns how many
    /// fired. The driver's own step; models and tests may call it by hand.
    /// `now` must not be later than `Instant::now()`, or entries fire early.
    #[cfg_attr(not(any(test, loom)), allow(dead_code))]
    pub(crate) fn run_expired(&self, now: Instant) -> usize {
        self.sweep(now, true, &mut Vec::new())
    }

    /// The capacity (in slots) of all shards' slabs.
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.shards
            .iter()
            .map(|s| lock(&s.0).slots.capacity())
            .sum()
    }

    /// `t - base` in nanoseconds (0 before `base`), saturating at `NEVER`.
    fn nanos(&self, t: Instant) -> u64 {
        let nanos = t.saturating_duration_since(self.base).as_nanos();
        u64::try_from(nanos).unwrap_or(NEVER)
    }

    /// Lowers `hint` to `at` (rounded down to microseconds); if it was
    /// higher and `wake`, unparks the driver (module docs: "How the driver
    /// sleeps").
    fn lower_hint(&self, at: u64, wake: bool) {
        if at == NEVER {
            return;
        }
        let h = usize::try_from(at / HINT_NS).map_or(FAR_WAKE, |h| h.min(FAR_WAKE));
        // Ordering: Relaxed (both): only `hint`'s modification order matters
        // (module docs). The load skips the shared RMW in the common case of
        // a deadline later than the earliest pending one; it can only read
        // a value that is no later in the modification order than the one
        // the RMW would read, and values only go down between two sweeps'
        // `NO_WAKE` stores, so "load <= h" implies "RMW would read <= h".
        if self.hint.load(Ordering::Relaxed) > h
            && self.hint.fetch_min(h, Ordering::Relaxed) > h
            && wake
        {
            self.wake_driver();
        }
    }

    fn wake_driver(&self) {
        #[cfg(not(loom))]
        if let Some(driver) = self.driver.get() {
            driver.unpark();
        }
    }

    /// One sweep over all shards at `now` (module docs, steps 1–3), then the
    /// batch fires; `buf` is the (empty) buffer for the batch.
    fn sweep(&self, now: Instant, wake: bool, buf: &mut Vec<E::Fired>) -> usize {
        // Below `NEVER`, so a saturated entry never fires.
        let now = self.nanos(now).min(NEVER - 1);
        // Ordering: Relaxed; step 1 of the protocol. It is ordered before
        // the shard locks below by program order, and those locks order it
        // before any arm that locks a shard after this sweep did.
        self.hint.store(NO_WAKE, Ordering::Relaxed);
        let mut panics = Vec::new();
        let mut next = NEVER;
        for shard in self.shards.iter() {
            let bound = lock(&shard.0).sweep(now, buf, &mut panics);
            next = next.min(bound);
        }
        self.lower_hint(next, wake);
        let fired = buf.len();
        for f in buf.drain(..) {
            if let Err(p) = catch_unwind(AssertUnwindSafe(move || E::fire(f))) {
                panics.push(p);
            }
        }
        if fired > 0 {
            if let Err(p) = catch_unwind(AssertUnwindSafe(E::batch_done)) {
                panics.push(p);
            }
        }
        // The payloads go last, after every entry of the batch fired: their
        // destructors are user code too, and a panic in one must neither
        // unwind the driver nor delay the batch.
        for p in panics {
            if let Err(again) = catch_unwind(AssertUnwindSafe(move || drop(p))) {
                std::mem::forget(again);
            }
        }
        fired
    }

    #[cfg(loom)]
    fn start_driver(&'static self) {}

    #[cfg(not(loom))]
    fn start_driver(&'static self) {
        // Ordering: Relaxed (both): the flag publishes nothing; it only
        // elects the one `arm` that spawns (spawning synchronises with the
        // new thread, and `driver` is a `OnceLock`).
        if self.started.load(Ordering::Relaxed) != 0
            || self
                .started
                .compare_exchange(0, 1, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("callcancel-timer".into())
            .spawn(move || self.drive());
        if let Err(e) = spawned {
            // Ordering: Relaxed, as above: a later `arm` tries again.
            self.started.store(0, Ordering::Relaxed);
            panic!("callcancel: cannot start the timer thread: {e}");
        }
    }

    /// The driver thread: sweep, then park until the earliest pending
    /// deadline (no timeout if none).
    #[cfg(not(loom))]
    fn drive(&'static self) {
        let _ = self.driver.set(std::thread::current());
        let mut buf = Vec::new();
        loop {
            self.sweep(Instant::now(), false, &mut buf);
            if buf.capacity() > 1024 {
                buf = Vec::new();
            }
            // Ordering: Relaxed: step 4 of the protocol (module docs).
            match self.hint.load(Ordering::Relaxed) {
                NO_WAKE => std::thread::park(),
                FAR_WAKE => std::thread::park_timeout(TICK),
                h => {
                    let due = Duration::from_micros(h as u64);
                    let elapsed = Instant::now().saturating_duration_since(self.base);
                    if due > elapsed {
                        std::thread::park_timeout(due - elapsed);
                    }
                }
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::sync::Arc;
    use std::sync::atomic::AtomicUsize as StdAtomicUsize;

    /// One fired entry: (id, deadline, when it fired).
    type Log = Arc<std::sync::Mutex<Vec<(usize, Instant, Instant)>>>;

    struct Rec {
        id: usize,
        deadline: Instant,
        log: Log,
        panic: bool,
    }

    impl Expiry for Rec {
        type Fired = Rec;
        fn take(self) -> Rec {
            self
        }
        fn fire(r: Rec) {
            let now = Instant::now();
            r.log.lock().unwrap().push((r.id, r.deadline, now));
            if r.panic {
                panic!("test: fire panics (expected)");
            }
        }
    }

    fn leak<E: Expiry>(t: Timer<E>) -> &'static Timer<E> {
        Box::leak(Box::new(t))
    }

    fn rec(id: usize, deadline: Instant, log: &Log) -> Rec {
        Rec {
            id,
            deadline,
            log: Arc::clone(log),
            panic: false,
        }
    }

    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// xorshift64*: deterministic test randomness.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Arms entry `id` due `margin` from now, doubling the margin while the
    /// timer refuses the deadline as past or behind its wheel's cursor (a
    /// refused arm arms and logs nothing). Natively the first try is taken; under miri the emulated
    /// clock jumps ahead whenever every thread is blocked or asleep, so a
    /// fixed few-ms margin may be gone before `arm` reads the clock.
    fn arm_within(
        t: &'static Timer<Rec>,
        id: usize,
        log: &Log,
        margin: Duration,
    ) -> (TimerKey, Instant) {
        let mut margin = margin;
        loop {
            let d = Instant::now() + margin;
            if let Ok(k) = t.arm(d, rec(id, d, log)) {
                return (k, d);
            }
            margin *= 2;
            assert!(
                margin < Duration::from_secs(3600),
                "entry {id}: every deadline refused (past, or behind the wheel's cursor)"
            );
        }
    }

    #[test]
    fn slot_bookkeeping_is_24_bytes() {
        assert_eq!(size_of::<Slot<Box<u8>>>(), 32);
        assert_eq!(
            size_of::<Slot<Box<u8>>>() - size_of::<Option<Box<u8>>>(),
            24
        );
        assert_eq!(size_of::<Option<TimerKey>>(), 8);
    }

    #[test]
    fn never_early_random_deadlines() {
        let t = leak(Timer::new());
        let log = Log::default();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let start = Instant::now();
        for id in 0..1000 {
            let d = Instant::now() + Duration::from_micros(100 + rng.below(50_000));
            t.arm(d, rec(id, d, &log)).ok().expect("future deadline");
        }
        wait_until("1000 fires", || log.lock().unwrap().len() == 1000);
        assert!(start.elapsed() < Duration::from_secs(2));
        let log = log.lock().unwrap();
        for &(id, deadline, fired) in log.iter() {
            assert!(fired >= deadline, "entry {id} fired early");
        }
        let mut ids: Vec<_> = log.iter().map(|r| r.0).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 1000);
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn disarm_before_and_after_expiry() {
        let t = leak(Timer::new());
        let log = Log::default();
        // Disarmed before its deadline. Should the clock pass the deadline
        // first (miri's can jump: `arm_within`), the entry must have fired,
        // never early; then again with a wider margin.
        let mut margin = ms(50);
        let d1 = loop {
            let (k, d) = arm_within(t, 1, &log, margin);
            if let Some(e) = t.disarm(k) {
                assert_eq!(e.id, 1);
                assert_eq!(t.disarm(k).map(|e| e.id), None);
                break d;
            }
            wait_until("entry 1, not disarmed in time", || {
                !log.lock().unwrap().is_empty()
            });
            let fired = log.lock().unwrap().pop().expect("entry 1 fired");
            assert!(fired.0 == 1 && fired.2 >= fired.1, "fired early: {fired:?}");
            margin *= 2;
        };
        assert_eq!(t.pending(), 0);

        let (k2, _) = arm_within(t, 2, &log, ms(5));
        wait_until("entry 2", || !log.lock().unwrap().is_empty());
        assert_eq!(t.disarm(k2).map(|e| e.id), None, "already fired");
        // Past entry 1's deadline, with time for the driver to have fired it.
        std::thread::sleep(d1.saturating_duration_since(Instant::now()) + ms(10));
        let ids: Vec<_> = log.lock().unwrap().iter().map(|r| r.0).collect();
        assert_eq!(ids, vec![2], "the disarmed entry never fires");
    }

    #[test]
    fn stale_key_does_not_remove_reused_slot() {
        let t = leak(Timer::with_shards(1));
        let log = Log::default();
        let d = Instant::now() + Duration::from_secs(3600);
        let a = t.arm(d, rec(1, d, &log)).ok().unwrap();
        assert_eq!(t.disarm(a).map(|e| e.id), Some(1));
        let b = t.arm(d, rec(2, d, &log)).ok().unwrap();
        assert_eq!(
            (a.shard(), a.index()),
            (b.shard(), b.index()),
            "slot reused"
        );
        assert_ne!(a, b);
        assert_eq!(t.disarm(a).map(|e| e.id), None);
        assert_eq!(t.pending(), 1);
        // The same after an expiry: the fired entry's key is stale too.
        let (c, _) = arm_within(t, 3, &log, ms(2));
        wait_until("entry 3", || !log.lock().unwrap().is_empty());
        let e = t.arm(d, rec(4, d, &log)).ok().unwrap();
        assert_eq!(t.disarm(c).map(|e| e.id), None);
        assert_eq!(t.pending(), 2);
        assert_eq!(t.disarm(b).map(|e| e.id), Some(2));
        assert_eq!(t.disarm(e).map(|e| e.id), Some(4));
        assert_eq!(t.pending(), 0);
        // Keys round-trip and a key of a shard that does not exist is stale.
        assert_eq!(TimerKey::from_raw(b.to_raw()), Some(b));
        assert_eq!(TimerKey::from_raw(0), None);
        let bogus = TimerKey::new(1, MAX_SHARDS - 1, 0);
        assert!(t.disarm(bogus).is_none());
    }

    #[test]
    fn past_deadline_is_refused_and_starts_nothing() {
        let t = leak(Timer::<Rec>::new());
        let log = Log::default();
        let now = Instant::now();
        assert!(t.arm(now, rec(1, now, &log)).is_err());
        let past = now.checked_sub(ms(10)).unwrap_or(now);
        let Err(e) = t.arm(past, rec(2, past, &log)) else {
            panic!("past deadline armed");
        };
        assert_eq!(e.id, 2);
        assert_eq!(
            t.started.load(Ordering::Relaxed),
            0,
            "no thread before a real arm"
        );
        assert!(t.driver.get().is_none());
        let d = Instant::now() + ms(1);
        t.arm(d, rec(3, d, &log)).ok().unwrap();
        assert_eq!(t.started.load(Ordering::Relaxed), 1);
        wait_until("entry 3", || log.lock().unwrap().len() == 1);
        assert_eq!(t.driver.get().unwrap().name(), Some("callcancel-timer"));
    }

    #[test]
    fn far_future_and_overflowing_deadlines() {
        let t = leak(Timer::new());
        let log = Log::default();
        let century = Instant::now() + Duration::from_secs(100 * 365 * 86_400);
        let k = t.arm(century, rec(1, century, &log)).ok().unwrap();
        assert_eq!(t.pending(), 1);
        assert_eq!(t.run_expired(Instant::now()), 0);
        assert_eq!(t.disarm(k).map(|e| e.id), Some(1));
        assert_eq!(t.pending(), 0);
        // A deadline whose nanoseconds do not fit a u64 saturates.
        let huge = [1u64 << 62, 1 << 60, 1 << 55]
            .into_iter()
            .find_map(|s| Instant::now().checked_add(Duration::from_secs(s)))
            .expect("some huge Instant");
        let k = t.arm(huge, rec(2, huge, &log)).ok().unwrap();
        assert_eq!(t.pending(), 1);
        assert_eq!(t.run_expired(Instant::now()), 0);
        std::thread::sleep(ms(3));
        assert_eq!(t.disarm(k).map(|e| e.id), Some(2));
        assert_eq!(t.pending(), 0);
        assert!(log.lock().unwrap().is_empty());
        assert_eq!(t.nanos(huge), NEVER, "2^55 s overflow u64 ns");
    }

    #[test]
    fn hundred_thousand_same_deadline() {
        let t = leak(Timer::new());
        let count = Arc::new(StdAtomicUsize::new(0));
        let early = Arc::new(StdAtomicUsize::new(0));
        struct Count(Instant, Arc<StdAtomicUsize>, Arc<StdAtomicUsize>);
        impl Expiry for Count {
            type Fired = Count;
            fn take(self) -> Count {
                self
            }
            fn fire(c: Count) {
                if Instant::now() < c.0 {
                    c.2.fetch_add(1, Ordering::Relaxed);
                }
                c.1.fetch_add(1, Ordering::Relaxed);
            }
        }
        // 20 ms in release; debug builds arm 10^5 entries more slowly.
        let d = Instant::now()
            + if cfg!(debug_assertions) {
                ms(300)
            } else {
                ms(20)
            };
        let mut armed = 0;
        for _ in 0..100_000 {
            let c = Count(d, Arc::clone(&count), Arc::clone(&early));
            match t.arm(d, c) {
                Ok(_) => armed += 1,
                // A slow machine: the caller fires a refused entry itself.
                Err(c) => Count::fire(c.take()),
            }
        }
        assert!(armed > 0);
        wait_until("10^5 fires", || count.load(Ordering::Relaxed) == 100_000);
        assert!(d.elapsed() < Duration::from_secs(2));
        assert_eq!(early.load(Ordering::Relaxed), 0);
        assert_eq!(t.pending(), 0);
        assert!(t.capacity() <= t.shards.len() * MIN_SLOTS);
    }

    #[test]
    fn panicking_fire_does_not_stop_others() {
        let t = leak(Timer::new());
        let log = Log::default();
        let d = Instant::now() + ms(5);
        for id in 0..10 {
            let mut r = rec(id, d, &log);
            r.panic = id % 3 == 1;
            assert!(t.arm(d, r).is_ok());
        }
        wait_until("10 fires", || log.lock().unwrap().len() == 10);
        // The driver survived.
        let d = Instant::now() + ms(5);
        assert!(t.arm(d, rec(10, d, &log)).is_ok());
        wait_until("the 11th fire", || log.lock().unwrap().len() == 11);
        // And by hand, on this thread.
        let t2 = Timer::with_shards(1);
        let d = Instant::now() + ms(1);
        for id in 0..4 {
            let mut r = rec(id, d, &log);
            r.panic = id == 0;
            lock(&t2.shards[0].0).insert(t2.nanos(d), r).ok().unwrap();
        }
        std::thread::sleep(ms(3));
        assert_eq!(t2.run_expired(Instant::now()), 4);
        assert_eq!(t2.pending(), 0);
    }

    #[test]
    fn fire_may_rearm() {
        struct Again(&'static Timer<Again>, u32, Arc<StdAtomicUsize>);
        impl Expiry for Again {
            type Fired = Again;
            fn take(self) -> Again {
                self
            }
            fn fire(a: Again) {
                a.2.fetch_add(1, Ordering::Relaxed);
                if a.1 > 0 {
                    let (timer, n) = (a.0, a.1 - 1);
                    let d = Instant::now() + ms(1);
                    // Disarm from inside a fire too.
                    let k = timer.arm(d + ms(100), Again(timer, 0, Arc::clone(&a.2)));
                    assert!(timer.disarm(k.ok().unwrap()).is_some());
                    assert!(timer.arm(d, Again(timer, n, a.2)).is_ok());
                }
            }
        }
        let t = leak(Timer::new());
        let n = Arc::new(StdAtomicUsize::new(0));
        assert!(t
            .arm(Instant::now() + ms(1), Again(t, 9, Arc::clone(&n)))
            .is_ok());
        wait_until("10 chained fires", || n.load(Ordering::Relaxed) == 10);
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn earlier_deadline_wakes_sleeping_driver() {
        let t = leak(Timer::new());
        let log = Log::default();
        let late = Instant::now() + Duration::from_secs(30);
        let k = t.arm(late, rec(1, late, &log)).ok().unwrap();
        std::thread::sleep(ms(20)); // the driver now sleeps until `late`
        let soon = Instant::now() + ms(10);
        assert!(t.arm(soon, rec(2, soon, &log)).is_ok());
        wait_until("entry 2", || log.lock().unwrap().len() == 1);
        assert!(soon.elapsed() < Duration::from_secs(2));
        assert!(t.disarm(k).is_some());
    }

    #[test]
    fn concurrent_arm_disarm_counts_exact() {
        let t = leak(Timer::new());
        let log = Log::default();
        let threads: Vec<_> = (0..4)
            .map(|th| {
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    let mut rng = Rng(0x1234_5678 + th as u64);
                    let (mut armed, mut refused, mut disarmed) = (0, 0, Vec::new());
                    let mut keys = Vec::new();
                    for i in 0..10_000 {
                        let id = th * 10_000 + i;
                        let d = Instant::now() + Duration::from_micros(rng.below(20_000));
                        match t.arm(d, rec(id, d, &log)) {
                            Ok(k) => {
                                armed += 1;
                                keys.push(k);
                            }
                            Err(_) => refused += 1,
                        }
                        if rng.below(2) == 0 {
                            if let Some(k) = keys.pop() {
                                if let Some(e) = t.disarm(k) {
                                    disarmed.push(e.id);
                                }
                            }
                        }
                    }
                    for k in keys {
                        if let Some(e) = t.disarm(k) {
                            disarmed.push(e.id);
                        }
                    }
                    (armed, refused, disarmed)
                })
            })
            .collect();
        let (mut armed, mut refused, mut disarmed) = (0, 0, Vec::new());
        for h in threads {
            let (a, r, d) = h.join().unwrap();
            armed += a;
            refused += r;
            disarmed.extend(d);
        }
        assert_eq!(armed + refused, 40_000);
        wait_until("all expired", || t.pending() == 0);
        std::thread::sleep(ms(5));
        let log = log.lock().unwrap();
        assert_eq!(log.len() + disarmed.len(), armed);
        let mut ids: Vec<_> = log.iter().map(|r| r.0).chain(disarmed).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), armed, "each entry fired or was disarmed, once");
        assert!(log.iter().all(|&(_, deadline, fired)| fired >= deadline));
    }

    #[test]
    fn storage_shrinks_after_burst() {
        let t = leak(Timer::new());
        let log = Log::default();
        let d = Instant::now() + Duration::from_secs(3600);
        let keys: Vec<_> = (0..100_000)
            .map(|id| t.arm(d, rec(id, d, &log)).ok().unwrap())
            .collect();
        assert!(t.capacity() >= 100_000);
        // In arming order: the slab's tail empties last, so the storage
        // comes back at the end.
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(t.disarm(*k).map(|e| e.id), Some(i));
        }
        assert_eq!(t.pending(), 0);
        assert!(
            t.capacity() <= t.shards.len() * MIN_SLOTS,
            "{}",
            t.capacity()
        );
        // In reverse order the tail empties first: it shrinks on the way.
        let keys: Vec<_> = (0..100_000)
            .map(|id| t.arm(d, rec(id, d, &log)).ok().unwrap())
            .collect();
        for (i, k) in keys.into_iter().enumerate().rev() {
            assert!(t.disarm(k).is_some());
            if i == 10_000 {
                assert!(t.capacity() < 50_000, "shrinks while draining");
            }
        }
        assert_eq!(t.pending(), 0);
        assert!(t.capacity() <= t.shards.len() * MIN_SLOTS);
    }

    #[test]
    fn wheel_skips_entries_of_later_turns() {
        let t = Timer::<Rec>::with_shards(1);
        let log = Log::default();
        let mut w = lock(&t.shards[0].0);
        let d = Instant::now();
        let (turn, at0) = (BUCKETS as u64 * TICK_NS, 10 * TICK_NS + 500);
        // Same bucket, three turns.
        for (id, at) in [(0, at0), (1, at0 + turn), (2, at0 + 2 * turn)] {
            w.insert(at, rec(id, d, &log)).ok().unwrap();
        }
        let (mut out, mut p) = (Vec::new(), Vec::new());
        assert_eq!(w.sweep(9 * TICK_NS, &mut out, &mut p), at0);
        assert_eq!(
            w.sweep(at0 - 1, &mut out, &mut p),
            at0,
            "same tick, not due"
        );
        assert!(out.is_empty());
        assert_eq!(w.sweep(at0, &mut out, &mut p), at0 + turn);
        assert_eq!(out.len(), 1);
        // A long sleep: all buckets once, only the due entry taken.
        assert_eq!(
            w.sweep(20 * TICK_NS + turn, &mut out, &mut p),
            at0 + 2 * turn
        );
        assert_eq!(out.iter().map(|r| r.id).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(w.len, 1);
        assert!(
            w.insert(20 * TICK_NS, rec(9, d, &log)).is_err(),
            "swept: refused"
        );
        // Two entries in the cursor's own tick, the later one left behind.
        let now = 30 * TICK_NS + turn;
        w.sweep(now, &mut out, &mut p);
        w.insert(now + 10, rec(3, d, &log)).ok().unwrap();
        w.insert(now + 20, rec(4, d, &log)).ok().unwrap();
        assert_eq!(w.sweep(now + 15, &mut out, &mut p), now + 20);
        assert_eq!(w.sweep(now + 20, &mut out, &mut p), at0 + 2 * turn);
        assert_eq!(
            out.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![0, 1, 3, 4]
        );
        assert!(p.is_empty());
    }

    /// Lateness (fire time - deadline) over 1000 entries with 10^5 others
    /// pending an hour out. Run by hand:
    /// `cargo test --release --lib timer::tests::lateness -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn lateness() {
        let t = leak(Timer::new());
        let log = Log::default();
        let far = Instant::now() + Duration::from_secs(3600);
        let arm_start = Instant::now();
        let keys: Vec<_> = (0..100_000)
            .map(|id| t.arm(far, rec(id, far, &log)).ok().unwrap())
            .collect();
        let arm_ns = arm_start.elapsed().as_nanos() / 100_000;
        let mut rng = Rng(42);
        for id in 0..1000 {
            let d = Instant::now() + Duration::from_micros(1000 + rng.below(1_000_000));
            assert!(t.arm(d, rec(id, d, &log)).is_ok());
            std::thread::sleep(Duration::from_micros(rng.below(1000)));
        }
        wait_until("1000 fires", || log.lock().unwrap().len() == 1000);
        let mut late: Vec<u128> = log
            .lock()
            .unwrap()
            .iter()
            .map(|&(_, d, f)| (f - d).as_micros())
            .collect();
        late.sort_unstable();
        let dis_start = Instant::now();
        for k in keys {
            assert!(t.disarm(k).is_some());
        }
        let dis_ns = dis_start.elapsed().as_nanos() / 100_000;
        println!(
            "lateness us: p50 {} p90 {} p99 {} max {}; arm {arm_ns} ns, disarm {dis_ns} ns (10^5, one thread)",
            late[500], late[900], late[990], late[999]
        );
        // The floor on this machine right now: how late a plain sleep is.
        let mut floor: Vec<u128> = (0..1000)
            .map(|_| {
                let d = Instant::now() + Duration::from_micros(rng.below(1000));
                std::thread::sleep(d.saturating_duration_since(Instant::now()));
                (Instant::now() - d).as_micros()
            })
            .collect();
        floor.sort_unstable();
        println!(
            "thread::sleep lateness us: p50 {} p90 {} p99 {} max {}",
            floor[500], floor[900], floor[990], floor[999]
        );
    }
}
