//! The callcancel types this crate works with: a re-export of the core's
//! (v2) API, so `callcancel_tower::cc::ServiceHost` and
//! `callcancel::ServiceHost` are the same type.
//!
//! Every request is one [`Call`] on its connection's [`Channel`], begun with
//! [`Channel::begin_call_with_deadline`] when a deadline applies (the core's
//! timer cancels it with [`CancelReason::DeadlineExceeded`]), cancelled
//! with [`OperationContext::cancel`] (`CallCancelled`) when the response is
//! dropped early; a connection's end faults its channel (`ChannelFaulted`).

pub use callcancel::{
    Call, CancelReason, CancelWatch, Cancelled, Canceller, Channel, Error, HostState, HostStats,
    Idle, OperationContext, RegisterError, RegisterErrorKind, ServiceHost, WatchCancelled,
};
