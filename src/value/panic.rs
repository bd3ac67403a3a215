//! Catching user code's panics so a protocol step always completes (A4).

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};

/// A panic payload caught from user code.
pub(crate) type Panic = Box<dyn Any + Send + 'static>;

/// Runs user code, catching a panic so the caller can finish its protocol
/// step first (A4).
#[inline]
pub(crate) fn catch(f: impl FnOnce()) -> Option<Panic> {
    panic::catch_unwind(AssertUnwindSafe(f)).err()
}

/// Drops a panic payload that is not kept; a payload whose own drop
/// panics is forgotten instead (leaked), so that the protocol step that
/// caught it still completes: a sweep never unwinds with its batch of
/// callbacks unsettled (pair 2b), nor a freer before its release.
#[cold]
fn drop_quietly(p: Panic) {
    if let Some(again) = catch(move || drop(p)) {
        core::mem::forget(again);
    }
}

/// The first panic caught during a sweep; later ones are dropped (A4).
#[derive(Default)]
pub(crate) struct FirstPanic(Option<Panic>);

impl FirstPanic {
    #[inline]
    pub(crate) fn record(&mut self, p: Option<Panic>) {
        if let Some(p) = p {
            if self.0.is_none() {
                self.0 = Some(p);
            } else {
                drop_quietly(p);
            }
        }
    }

    pub(crate) fn into_inner(self) -> Option<Panic> {
        self.0
    }

    /// Re-raises the recorded panic, if any, once the sweep is over.
    pub(crate) fn resume(self) {
        if let Some(p) = self.0 {
            panic::resume_unwind(p);
        }
    }

    /// As [`FirstPanic::resume`], but only when this thread is not already
    /// unwinding (from a `Drop`: a second panic would abort the process).
    pub(crate) fn resume_unless_panicking(self) {
        if let Some(p) = self.0 {
            if !std::thread::panicking() {
                panic::resume_unwind(p);
            }
        }
    }
}
