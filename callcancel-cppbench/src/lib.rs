//! Bench-only peer for callcancel's P1 target: libstdc++'s
//! `std::stop_callback` construct + destroy, driven from Rust.
//!
//! `build.rs` compiles the C++ side when the machine has a C++20 compiler;
//! otherwise [`StopSource::new`] answers `None` and the bench skips the
//! peer.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

#[cfg(callcancel_cpp)]
mod ffi {
    use core::ffi::c_void;
    extern "C" {
        pub fn callcancel_cpp_source_new() -> *mut c_void;
        pub fn callcancel_cpp_source_free(source: *mut c_void);
        pub fn callcancel_cpp_lifecycles(source: *mut c_void, n: u64);
    }
}

/// A `std::stop_source` (not stopped), owned from Rust.
pub struct StopSource {
    #[cfg(callcancel_cpp)]
    raw: core::ptr::NonNull<core::ffi::c_void>,
}

impl StopSource {
    /// A new source, or `None` if the C++ side was not built.
    pub fn new() -> Option<Self> {
        #[cfg(callcancel_cpp)]
        {
            // SAFETY: returns a fresh `new std::stop_source()` (or throws,
            // which aborts: operator new does not return null).
            let raw = unsafe { ffi::callcancel_cpp_source_new() };
            core::ptr::NonNull::new(raw).map(|raw| Self { raw })
        }
        #[cfg(not(callcancel_cpp))]
        {
            None
        }
    }

    /// Registers and deregisters `n` capturing callbacks on this source's
    /// token, one after another (the loop runs in C++).
    pub fn lifecycles(&self, n: u64) {
        #[cfg(callcancel_cpp)]
        // SAFETY: `raw` is our live `std::stop_source`; the C++ side only
        // reads it (takes a token) and is not called concurrently with
        // `Drop`, which needs `&mut self`.
        unsafe {
            ffi::callcancel_cpp_lifecycles(self.raw.as_ptr(), n)
        };
        #[cfg(not(callcancel_cpp))]
        let _ = n;
    }
}

impl Drop for StopSource {
    fn drop(&mut self) {
        #[cfg(callcancel_cpp)]
        // SAFETY: `raw` came from `callcancel_cpp_source_new` and is freed
        // once, here.
        unsafe {
            ffi::callcancel_cpp_source_free(self.raw.as_ptr())
        };
    }
}

#[cfg(test)]
mod tests {
    /// Built (a C++20 compiler was found): a source exists, and registers,
    /// deregisters and frees without fault. Not built: `None`.
    #[test]
    fn a_source_exists_exactly_when_the_cpp_side_was_built() {
        let source = super::StopSource::new();
        assert_eq!(source.is_some(), cfg!(callcancel_cpp));
        if let Some(source) = source {
            source.lifecycles(1000);
        }
    }
}
