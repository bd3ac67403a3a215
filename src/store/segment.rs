//! Layer 4: heap arrays aligned to a cache line by hand (a slab's first
//! block: segment 0 and the segment directory, allocated per connection).
//!
//! `CallSlot` is `#[repr(align(64))]`, so that two calls never share a
//! line. A `Box<[CallSlot]>` asks the global allocator for 64-byte
//! alignment, which glibc serves through `posix_memalign`: that path skips
//! the thread cache, and the chunk it frees misses it too, so the next
//! aligned request splits and consolidates the heap again. Measured with
//! `ci/callgrind.sh`'s `churn-callcancel-1` (W1: a segment is allocated and
//! freed per connection): about 1 300 instructions of `_int_memalign`,
//! `_int_malloc` and `_int_free` per connection, against about 100 for a
//! cached `malloc` + `free` of the same size.
//!
//! [`alloc_array`] instead asks for 16-byte alignment and `align` more
//! bytes, rounds the address up to `align` (at least 16 bytes past the
//! allocation's start, since both are multiples of 16) and keeps the
//! allocation's own pointer in the word just below the array, where
//! [`free_array`] finds it.

use core::alloc::Layout;
use core::mem::{align_of, size_of};
use core::ptr::NonNull;

/// The alignment asked of the allocator: what every allocator gives cheaply.
const REQUEST_ALIGN: usize = 16;

/// The layout asked of the allocator for `len` values of `T`.
fn request<T>(len: usize) -> Layout {
    const {
        assert!(align_of::<T>() >= REQUEST_ALIGN && align_of::<T>().is_power_of_two());
    }
    let bytes = size_of::<T>()
        .checked_mul(len)
        .and_then(|b| b.checked_add(align_of::<T>()))
        .expect("segment size overflows usize");
    Layout::from_size_align(bytes, REQUEST_ALIGN).expect("segment layout")
}

/// Allocates `len` values made by `init(i)`, aligned to `align_of::<T>()`.
/// `init` must not panic (the memory would leak; nothing unsound).
pub(crate) fn alloc_array<T>(len: usize, mut init: impl FnMut(usize) -> T) -> NonNull<T> {
    assert!(len > 0, "an empty segment");
    let layout = request::<T>(len);
    // SAFETY: `layout` has a non-zero size (`len > 0`, plus the padding).
    let raw = unsafe { std::alloc::alloc(layout) };
    if raw.is_null() {
        std::alloc::handle_alloc_error(layout);
    }
    let pad = align_of::<T>() - (raw as usize % align_of::<T>());
    // SAFETY: `pad <= align_of::<T>()`, within the `align_of::<T>()` extra
    // bytes of the allocation; the result keeps `raw`'s provenance.
    let first = unsafe { raw.add(pad) }.cast::<T>();
    // SAFETY: `raw` and `align_of::<T>()` are multiples of 16, so `pad` is
    // one too and at least 16: the word below `first` lies within the
    // allocation, at or past `raw`, aligned for a pointer.
    unsafe { first.cast::<*mut u8>().sub(1).write(raw) };
    for i in 0..len {
        // SAFETY: `first + i` is within the `len * size_of::<T>()` bytes
        // past `first` (the allocation has `pad + len * size_of::<T>()`
        // bytes from `raw` on) and aligned for `T`.
        unsafe { first.add(i).write(init(i)) };
    }
    // SAFETY: derived from a non-null allocation by an in-bounds offset.
    unsafe { NonNull::new_unchecked(first) }
}

/// Drops the `len` values of an array from [`alloc_array`] and frees it.
///
/// # Safety
/// `first` came from `alloc_array::<T>(len, ..)` with this `len`, was not
/// freed yet, and nobody uses the values any more.
pub(crate) unsafe fn free_array<T>(first: NonNull<T>, len: usize) {
    let first = first.as_ptr();
    // SAFETY: per the contract the `len` values are initialised and ours.
    unsafe { core::ptr::drop_in_place(core::ptr::slice_from_raw_parts_mut(first, len)) };
    // SAFETY: `alloc_array` wrote the allocation's pointer in the word below
    // `first`.
    let raw = unsafe { first.cast::<*mut u8>().sub(1).read() };
    // SAFETY: `raw` came from `alloc` with this very layout.
    unsafe { std::alloc::dealloc(raw, request::<T>(len)) };
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[repr(align(64))]
    struct Line(usize, &'static AtomicUsize);

    impl Drop for Line {
        fn drop(&mut self) {
            self.1.fetch_add(self.0, Ordering::Relaxed);
        }
    }

    #[test]
    fn arrays_are_aligned_initialised_and_dropped_once() {
        static DROPPED: AtomicUsize = AtomicUsize::new(0);
        for len in [1, 2, 8, 31, 64] {
            DROPPED.store(0, Ordering::Relaxed);
            let p = alloc_array(len, |i| Line(i + 1, &DROPPED));
            assert_eq!(p.as_ptr() as usize % 64, 0, "len {len}");
            for i in 0..len {
                // SAFETY: initialised above, still ours.
                assert_eq!(unsafe { p.add(i).as_ref() }.0, i + 1);
            }
            // SAFETY: from `alloc_array` with this `len`, freed once.
            unsafe { free_array(p, len) };
            assert_eq!(DROPPED.load(Ordering::Relaxed), len * (len + 1) / 2);
        }
    }
}
