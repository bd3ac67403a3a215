//! The [`Idle`] future of [`ServiceHost::idle`](crate::ServiceHost::idle).

use core::fmt;
use core::future::Future;
use core::pin::Pin;
use core::task::{Context, Poll};

use crate::engine::host::HostShared;
use crate::sync::Arc;

/// The future of [`ServiceHost::idle`](crate::ServiceHost::idle): resolves
/// once no call of the host is in flight. Woken by the freer of the last
/// call (it never polls in a loop: issue 12 #4).
#[must_use = "futures do nothing unless polled"]
pub struct Idle {
    host: Arc<HostShared>,
    /// Announced in the host's idle-waiter count.
    announced: bool,
    /// Our parked waker's id, once parked.
    id: Option<u64>,
}

impl Idle {
    pub(crate) fn new(host: Arc<HostShared>) -> Self {
        Self {
            host,
            announced: false,
            id: None,
        }
    }

    fn leave(&mut self) {
        let core = &self.host.core;
        if let Some(id) = self.id.take() {
            core.unpark_idle(id);
        }
        if core::mem::take(&mut self.announced) {
            core.withdraw_idle_waiter();
        }
    }
}

impl Future for Idle {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let core = Arc::clone(&this.host.core);
        if !this.announced {
            core.announce_idle_waiter();
            this.announced = true;
        }
        loop {
            let epoch = core.idle_epoch();
            if this.host.census_for_wait() == 0 {
                this.leave();
                return Poll::Ready(());
            }
            if core.park_idle(&mut this.id, epoch, cx.waker()) {
                return Poll::Pending;
            }
            // A freer notified since our census: look again.
        }
    }
}

impl Drop for Idle {
    fn drop(&mut self) {
        self.leave();
    }
}

impl fmt::Debug for Idle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idle").finish_non_exhaustive()
    }
}
