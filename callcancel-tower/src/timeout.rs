//! The `grpc-timeout` header (gRPC over HTTP/2 spec): `TimeoutValue TimeoutUnit`,
//! at most 8 ASCII digits, unit one of `H M S m u n`.

use std::time::Duration;

use http::HeaderValue;

/// The `grpc-timeout` header name.
pub const GRPC_TIMEOUT: &str = "grpc-timeout";

/// Parses a `grpc-timeout` value: 1 to 8 ASCII digits then one unit of `H`
/// (hours), `M` (minutes), `S`, `m` (ms), `u` (µs), `n` (ns).
///
/// Anything else (empty, a 9th digit, a sign, spaces, an unknown unit,
/// non-ASCII) gives `None`: the layer then ignores the header and uses its
/// configured default deadline, as tonic does. Never panics.
///
/// ```
/// use callcancel_tower::parse_grpc_timeout;
/// use std::time::Duration;
/// assert_eq!(parse_grpc_timeout(b"30S"), Some(Duration::from_secs(30)));
/// assert_eq!(parse_grpc_timeout(b"100m"), Some(Duration::from_millis(100)));
/// assert_eq!(parse_grpc_timeout(b"123456789S"), None);
/// assert_eq!(parse_grpc_timeout(b"-1S"), None);
/// ```
pub fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // At most 8 digits: fits a u64 with room for the multiplications below.
    let n = digits
        .iter()
        .fold(0u64, |a, d| a * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Formats `d` as a `grpc-timeout` value with the finest unit whose value
/// fits 8 digits, rounding up (so the peer never sees a shorter deadline
/// than the remaining one, except for sub-nanosecond rounding).
///
/// ```
/// use callcancel_tower::format_grpc_timeout;
/// use std::time::Duration;
/// assert_eq!(format_grpc_timeout(Duration::from_millis(1500)), "1500000u");
/// assert_eq!(format_grpc_timeout(Duration::from_secs(3600 * 24)), "86400000m");
/// ```
pub fn format_grpc_timeout(d: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let nanos = d.as_nanos();
    let units: [(u128, char); 6] = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    for (per, unit) in units {
        let v = nanos.div_ceil(per);
        if v <= MAX {
            return HeaderValue::from_str(&format!("{v}{unit}")).expect("ascii");
        }
    }
    HeaderValue::from_static("99999999H")
}
