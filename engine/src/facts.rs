//! The request's facts from one header: the peer address and the request's
//! start time, written by Envoy's native `header_mutation` filter placed
//! before this one (`client.facts_header`).
//!
//! Why: on V8 every host call that returns data costs two crossings (`make
//! bench-hostcalls`); `source.address` and the clock are two such calls per
//! request, while the header map is read anyway. Envoy fills the header
//! from its formatter with [`FACTS_HEADER_VALUE`] and overwrites any copy
//! the client sent (`append_action: OVERWRITE_IF_EXISTS_OR_ADD`), so the
//! client cannot choose what is read here.
//!
//! Value: `<peer address> <start time, epoch ms> [<TLS JA4 fingerprint>]`,
//! space-separated (none of the three contains a space; JA4 is empty on a
//! plaintext listener). A value that does not parse is ignored: the host
//! then falls back to `source.address` and the clock.

/// The `header_mutation` value that produces the facts header.
/// The *direct* peer: with `use_remote_address` unset, Envoy's
/// `%DOWNSTREAM_REMOTE_ADDRESS%` is the last `X-Forwarded-For` entry, which a
/// client writes; the filter applies `client.trusted_proxies` to the real peer.
pub const FACTS_HEADER_VALUE: &str = "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT% %START_TIME(%s%3f)% %TLS_JA4_FINGERPRINT%";

/// Longest value read (an IPv6 address, 13 digits, a 36-character JA4).
const MAX_LEN: usize = 160;

/// What the facts header says. Borrowed from the header value: no copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts<'a> {
    /// The peer address, without port (as `source.address` would give it, minus the port).
    pub peer: &'a [u8],
    /// When Envoy started the request, ms since the epoch.
    pub start_ms: u64,
    /// The TLS JA4 fingerprint, when the connection was TLS.
    pub ja4: Option<&'a [u8]>,
}

impl<'a> Facts<'a> {
    /// Parses a facts header value; None when it is not one.
    pub fn parse(value: &'a [u8]) -> Option<Facts<'a>> {
        if value.len() > MAX_LEN {
            return None;
        }
        let mut parts = value.split(|&b| b == b' ');
        let peer = parts.next().filter(|p| !p.is_empty() && p.len() <= 64)?;
        let start_ms = parse_ms(parts.next()?)?;
        let ja4 = parts.next().filter(|j| !j.is_empty() && j.len() <= 64 && j != b"-");
        Some(Facts { peer, start_ms, ja4 })
    }
}

/// Epoch milliseconds: digits only, or `seconds.millis` (`%START_TIME(%s.%3f)%`).
fn parse_ms(text: &[u8]) -> Option<u64> {
    if text.is_empty() || text.len() > 20 {
        return None;
    }
    let mut ms: u64 = 0;
    let mut fraction_digits: Option<u32> = None;
    for &b in text {
        match b {
            b'0'..=b'9' => {
                if fraction_digits.is_some_and(|d| d >= 3) {
                    continue; // finer than a millisecond: dropped
                }
                ms = ms.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
                if let Some(d) = fraction_digits.as_mut() {
                    *d += 1;
                }
            }
            b'.' if fraction_digits.is_none() => fraction_digits = Some(0),
            _ => return None,
        }
    }
    match fraction_digits {
        None => Some(ms),
        Some(d) => ms.checked_mul(10u64.pow(3 - d.min(3))),
    }
    .filter(|&ms| ms > 0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn what_envoy_writes() {
        // As Envoy 1.40 wrote it on a plaintext listener (JA4 empty).
        let f = Facts::parse(b"127.0.0.1 1796129374533 ").unwrap();
        assert_eq!((f.peer, f.start_ms, f.ja4), (&b"127.0.0.1"[..], 1_796_129_374_533, None));
        let f = Facts::parse(b"2001:db8::1 1796129374533 t13d1516h2_8daaf6152771_02713d6af862").unwrap();
        assert_eq!(f.peer, b"2001:db8::1");
        assert_eq!(f.ja4, Some(&b"t13d1516h2_8daaf6152771_02713d6af862"[..]));
    }

    #[test]
    fn seconds_with_millis() {
        assert_eq!(Facts::parse(b"10.0.0.1 1796129374.533").unwrap().start_ms, 1_796_129_374_533);
        assert_eq!(Facts::parse(b"10.0.0.1 1796129374.5").unwrap().start_ms, 1_796_129_374_500);
        assert_eq!(Facts::parse(b"10.0.0.1 1796129374.533999").unwrap().start_ms, 1_796_129_374_533);
    }

    #[test]
    fn not_facts() {
        for bad in [&b""[..], b"10.0.0.1", b"10.0.0.1 ", b" 123", b"10.0.0.1 12a", b"10.0.0.1 0",
                    b"10.0.0.1 99999999999999999999999", b"10.0.0.1 1.2.3"] {
            assert_eq!(Facts::parse(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(Facts::parse(&[b'1'; 200]), None);
    }

    proptest! {
        #[test]
        fn any_bytes_parse_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Facts::parse(&bytes);
        }
    }
}
