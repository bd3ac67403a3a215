//! Mapping cancel reasons to gRPC and HTTP statuses.

use http::StatusCode;

use crate::cc::CancelReason;

/// gRPC status code `CANCELLED`.
pub const GRPC_CANCELLED: i32 = 1;
/// gRPC status code `DEADLINE_EXCEEDED`.
pub const GRPC_DEADLINE_EXCEEDED: i32 = 4;
/// gRPC status code `UNAVAILABLE`.
pub const GRPC_UNAVAILABLE: i32 = 14;

/// The gRPC status code for a cancel reason: `HostAbort` → UNAVAILABLE (14);
/// `ChannelFaulted`, `CallCancelled` → CANCELLED (1); `DeadlineExceeded` →
/// DEADLINE_EXCEEDED (4).
pub fn grpc_code_for(reason: CancelReason) -> i32 {
    match reason {
        CancelReason::HostAbort => GRPC_UNAVAILABLE,
        CancelReason::DeadlineExceeded => GRPC_DEADLINE_EXCEEDED,
        _ => GRPC_CANCELLED,
    }
}

/// The HTTP status for a cancel reason: `HostAbort` → 503;
/// `ChannelFaulted`, `CallCancelled` → 499 (client closed request);
/// `DeadlineExceeded` → 504.
///
/// ```
/// use callcancel_tower::{cc::CancelReason, http_status_for};
/// assert_eq!(http_status_for(CancelReason::CallCancelled).as_u16(), 499);
/// ```
pub fn http_status_for(reason: CancelReason) -> StatusCode {
    match reason {
        CancelReason::HostAbort => StatusCode::SERVICE_UNAVAILABLE,
        CancelReason::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::from_u16(499).expect("499 is a valid status"),
    }
}

/// The `tonic::Status` for a cancel reason (codes as [`grpc_code_for`]; the
/// message names the reason).
///
/// ```
/// use callcancel_tower::{cc::CancelReason, status_for};
/// assert_eq!(status_for(CancelReason::DeadlineExceeded).code(), tonic::Code::DeadlineExceeded);
/// ```
#[cfg(feature = "tonic")]
pub fn status_for(reason: CancelReason) -> tonic::Status {
    tonic::Status::new(tonic::Code::from(grpc_code_for(reason)), reason.to_string())
}
