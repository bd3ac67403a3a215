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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_every_unit_and_rejects_junk() {
        assert_eq!(parse_grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout(b"2M"), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_grpc_timeout(b"99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
        assert_eq!(parse_grpc_timeout(b"7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout(b"0n"), Some(Duration::ZERO));
        for bad in [
            &b""[..],
            b"S",
            b"1",
            b"123456789n",
            b"+1S",
            b"1s",
            b"1 S",
            b"1\xffS",
            b"\xff",
            b"1SS",
        ] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn format_round_trips_and_never_shortens() {
        for d in [
            Duration::ZERO,
            Duration::from_nanos(1),
            Duration::from_nanos(99_999_999),
            Duration::from_nanos(100_000_001),
            Duration::from_millis(1500),
            Duration::from_secs(30),
            Duration::from_secs(86_400 * 365),
            Duration::MAX,
        ] {
            let v = format_grpc_timeout(d);
            let back = parse_grpc_timeout(v.as_bytes()).unwrap();
            assert!(
                back >= d.min(Duration::from_secs(99_999_999 * 3600)),
                "{d:?} -> {v:?}"
            );
            assert!(v.len() <= 9);
        }
    }
}
