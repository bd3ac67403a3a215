//! `ServiceHost::close_async`: `close` without blocking a thread.

use core::future::Future;
use std::time::{Duration, Instant};

use crate::engine::deadline::Sleep;
use crate::engine::host::HostShared;
use crate::store::host_core::CLOSED;
use crate::sync::Arc;
use crate::wait::idle::Idle;
use crate::Error;

/// Refuse new work, await idle up to `timeout`, then abort and report
/// `Timeout` (see `ServiceHost::close_async`).
pub(crate) async fn close_async(host: Arc<HostShared>, timeout: Duration) -> Result<(), Error> {
    if host.begin_close() == CLOSED {
        return Ok(());
    }
    let mut idle = core::pin::pin!(Idle::new(Arc::clone(&host)));
    let mut sleep = core::pin::pin!(Sleep::until(Instant::now().checked_add(timeout)));
    let became_idle = core::future::poll_fn(|cx| {
        if idle.as_mut().poll(cx).is_ready() {
            return core::task::Poll::Ready(true);
        }
        sleep.as_mut().poll(cx).map(|()| false)
    })
    .await;
    if became_idle {
        host.mark_closed();
        Ok(())
    } else {
        host.abort();
        Err(Error::Timeout)
    }
}
