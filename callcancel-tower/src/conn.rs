//! Connections are channels: [`CallIo`] faults its connection's channel when
//! the connection ends.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::cc::Channel;

/// Faults a channel when dropped (and on demand); logs the first fault.
#[derive(Debug)]
pub struct FaultOnDrop {
    channel: Channel,
}

impl FaultOnDrop {
    /// Guards `channel`.
    pub fn new(channel: Channel) -> Self {
        Self { channel }
    }

    /// The guarded channel.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Faults the channel now (idempotent), logging `why` the first time.
    pub fn fault(&self, why: &'static str) {
        if !self.channel.is_faulted() {
            let in_flight = self.channel.in_flight();
            self.channel.fault();
            tracing::debug!(target: "callcancel", why, in_flight, "connection ended: channel faulted");
        }
    }
}

impl Drop for FaultOnDrop {
    fn drop(&mut self) {
        self.fault("connection dropped");
    }
}

pin_project! {
    /// An accepted connection's IO, tied to the connection's [`Channel`].
    ///
    /// The channel is faulted (its calls cancelled with `ChannelFaulted`)
    /// when the connection ends, whichever way: a read of EOF, a read or
    /// write error, or the IO being dropped (the connection task finished,
    /// failed, or was dropped). EOF counts as the end: the HTTP/2 client is
    /// gone, and hyper's HTTP/1 server does not serve half-closed
    /// connections by default either.
    #[derive(Debug)]
    pub struct CallIo<T> {
        #[pin]
        io: T,
        guard: FaultOnDrop,
    }
}

impl<T> CallIo<T> {
    /// Wraps `io`, the connection `channel` stands for.
    pub fn new(io: T, channel: Channel) -> Self {
        Self {
            io,
            guard: FaultOnDrop::new(channel),
        }
    }

    /// The connection's channel.
    pub fn channel(&self) -> &Channel {
        self.guard.channel()
    }

    /// The wrapped IO.
    pub fn get_ref(&self) -> &T {
        &self.io
    }
}

fn check<T>(guard: &FaultOnDrop, r: &Poll<io::Result<T>>, why: &'static str) {
    if let Poll::Ready(Err(_)) = r {
        guard.fault(why);
    }
}

impl<T: AsyncRead> AsyncRead for CallIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let wanted = buf.remaining() > 0;
        let r = this.io.poll_read(cx, buf);
        match &r {
            Poll::Ready(Ok(())) if wanted && buf.filled().len() == before => {
                this.guard.fault("eof")
            }
            _ => check(this.guard, &r, "read error"),
        }
        r
    }
}

impl<T: AsyncWrite> AsyncWrite for CallIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.io.poll_write(cx, b);
        check(this.guard, &r, "write error");
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.io.poll_write_vectored(cx, bufs);
        check(this.guard, &r, "write error");
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let r = this.io.poll_flush(cx);
        check(this.guard, &r, "write error");
        r
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let r = this.io.poll_shutdown(cx);
        check(this.guard, &r, "shutdown error");
        r
    }
}
