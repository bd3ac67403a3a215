//! The small public value types: reasons, host states and errors.

use core::fmt;

/// Why a call was cancelled (WWSAPI `WS_SERVICE_CANCEL_REASON`).
///
/// The first reason decided for a call wins (R5): `cancel_reason()`, the cancel
/// callback and `cancelled().await` always agree.
///
/// ```
/// use callcancel::CancelReason;
/// assert_eq!(CancelReason::HostAbort.to_string(), "host aborted");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CancelReason {
    /// The service host is being aborted (`WS_SERVICE_HOST_ABORT`).
    HostAbort,
    /// The call's channel faulted (`WS_SERVICE_CHANNEL_FAULTED`).
    ChannelFaulted,
    /// The call alone was cancelled: [`OperationContext::cancel`](crate::OperationContext::cancel)
    /// or a [`Canceller`](crate::Canceller) (its client reset the stream, the
    /// application gave up on it, or the call upstream of it was cancelled).
    CallCancelled,
    /// The call's deadline passed (a call begun with
    /// `begin_call_with_deadline`).
    DeadlineExceeded,
}

impl fmt::Display for CancelReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CancelReason::HostAbort => "host aborted",
            CancelReason::ChannelFaulted => "channel faulted",
            CancelReason::CallCancelled => "call cancelled",
            CancelReason::DeadlineExceeded => "deadline exceeded",
        })
    }
}

/// The lifecycle state of a [`ServiceHost`](crate::ServiceHost).
///
/// ```text
/// Open ──close()──▶ Closing ──(idle)──▶ Closed
///   │                  │ abort() or close timeout    ▲
///   └──abort()──▶ Aborted ──close() once idle────────┘
/// ```
/// `Closed` is final. Reading the state gives a snapshot that may be stale as
/// soon as it returns (as WWSAPI's `WS_SERVICE_PROPERTY_HOST_STATE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HostState {
    /// Accepting channels and calls.
    Open,
    /// `close()` is waiting for in-flight calls; new channels and calls are
    /// refused with [`Error::HostClosed`].
    Closing,
    /// `abort()` ran (or `close()` timed out); new work is refused with
    /// [`Error::HostAborted`]; in-flight calls are still counted until they
    /// complete (A2).
    Aborted,
    /// Closed after every call completed. Final.
    Closed,
}

/// Errors of the host and channel operations.
///
/// ```
/// use callcancel::{Error, ServiceHost};
/// let host = ServiceHost::new();
/// host.abort();
/// assert_eq!(host.open_channel().unwrap_err(), Error::HostAborted);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Error {
    /// The host was aborted (`WS_E_OPERATION_ABORTED`).
    HostAborted,
    /// The host is closing or closed.
    HostClosed,
    /// The channel faulted (`WS_E_OBJECT_FAULTED`).
    ChannelFaulted,
    /// `close()` reached its deadline with calls still in flight; they were
    /// aborted (`WS_E_OPERATION_TIMED_OUT`).
    Timeout,
    /// `close` was called from inside a cancel callback or free-state of a
    /// call of the same host: that call cannot finish while its callback
    /// waits for it, so `close` started the close (new work is refused) and
    /// returned at once instead of waiting (A3).
    WouldDeadlock,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Error::HostAborted => "the service host was aborted",
            Error::HostClosed => "the service host is closing or closed",
            Error::ChannelFaulted => "the channel faulted",
            Error::Timeout => "timed out waiting for in-flight calls; they were aborted",
            Error::WouldDeadlock => {
                "close was called from a callback of a call of the same host; it did not wait"
            }
        })
    }
}

impl std::error::Error for Error {}

/// Why a registration was refused. Part of [`RegisterError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RegisterErrorKind {
    /// The call already has a cancel callback: only the first registration
    /// succeeds (WWSAPI: "setting the cancel callback multiple times will
    /// fail").
    AlreadyRegistered,
}

/// A refused registration: says why, and hands the state back.
///
/// Neither callback of a refused registration ever runs (R2); the state is
/// the caller's again. Like `std::sync::mpsc::SendError`, `Debug` and
/// `Display` never print the state, so they exist for every `S`.
///
/// ```
/// use callcancel::{RegisterErrorKind, ServiceHost};
/// let host = ServiceHost::new();
/// let call = host.begin_call().unwrap();
/// call.register_for_cancel(1u32, |_, _| {}).unwrap();
/// let err = call.register_for_cancel(2u32, |_, _| {}).unwrap_err();
/// assert_eq!(err.kind(), RegisterErrorKind::AlreadyRegistered);
/// assert_eq!(err.into_state(), 2);
/// ```
pub struct RegisterError<S> {
    kind: RegisterErrorKind,
    state: S,
}

impl<S> RegisterError<S> {
    pub(crate) fn new(kind: RegisterErrorKind, state: S) -> Self {
        Self { kind, state }
    }

    /// Why the registration was refused.
    pub fn kind(&self) -> RegisterErrorKind {
        self.kind
    }

    /// Gives the state back to the caller.
    pub fn into_state(self) -> S {
        self.state
    }
}

impl<S> fmt::Debug for RegisterError<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegisterError")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl<S> fmt::Display for RegisterError<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            RegisterErrorKind::AlreadyRegistered => {
                f.write_str("a cancel callback is already registered for this call")
            }
        }
    }
}

impl<S> std::error::Error for RegisterError<S> {}
