//! # callcancel-tower
//!
//! [callcancel](https://docs.rs/callcancel) for tower, hyper, axum and tonic
//! servers and clients:
//!
//! * **Connections are channels.** [`Server`] (or [`CallIo`] in an accept
//!   loop of your own; `CallIncoming` for tonic's own `Server`, feature
//!   `tonic-server`; `CallListener` for `axum::serve`, feature `axum`)
//!   opens a channel per accepted connection, refuses the connection if the
//!   host refuses, and faults the channel when the connection ends (EOF, IO
//!   error, reset, or the connection task dropped).
//! * **Requests are calls.** [`CallLayer`] begins a call per request on its
//!   connection's channel, with the request's `grpc-timeout` deadline (or a
//!   default), hands it to the handler as [`CurrentCall`] (request extension
//!   and task-local), completes it when the response body is done, and
//!   cancels it with `CallCancelled` when hyper drops the handler or body
//!   early (client reset or disconnect). Refused calls answer UNAVAILABLE /
//!   503.
//! * **Shutdown with a deadline.** [`Server::serve_with_shutdown`]: stop
//!   accepting, begin close, GOAWAY, wait for idle up to a timeout, then
//!   abort the host and return in bounded time.
//! * **Propagation across hops.** [`PropagateLayer`] on a tonic or hyper
//!   client sends the remaining deadline as `grpc-timeout` and resets the
//!   outgoing stream when the current call is cancelled; [`Detached`] and
//!   [`detached`] opt out.
//! * **Status mapping.** `status_for` (feature `tonic`), [`grpc_code_for`],
//!   [`http_status_for`].
//!
//! Tracing events (target `callcancel`): a call cancelled (reason, path), a
//! call refused, a connection's channel faulted, shutdown escalating to abort.
//!
//! See the README for a complete tonic and axum example.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs)]

pub mod cc;
mod client;
mod conn;
mod incoming;
mod layer;
mod server;
mod status;
mod timeout;

pub use client::{Cancelled, Detached, Propagate, PropagateBody, PropagateFuture, PropagateLayer};
pub use conn::{CallIo, FaultOnDrop};
#[cfg(feature = "tonic-server")]
pub use incoming::CallIncoming;
#[cfg(feature = "axum")]
pub use incoming::CallListener;
pub use layer::{
    detached, CallBody, CallLayer, CallService, ConnectionChannel, CurrentCall, ResponseFuture,
};
pub use server::{Server, ShutdownReport};
#[cfg(feature = "tonic")]
pub use status::status_for;
pub use status::{
    grpc_code_for, http_status_for, GRPC_CANCELLED, GRPC_DEADLINE_EXCEEDED, GRPC_UNAVAILABLE,
};
pub use timeout::{format_grpc_timeout, parse_grpc_timeout, GRPC_TIMEOUT};

/// The boxed error type of the HTTP stack.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
