//! Who may read what. Two credentials, never the same value:
//!
//! * the **filters' secret** (`x-abuse-scorer-secret`) guards what the
//!   filters call: `/v1/score`, `/v1/verdicts`, `/v1/events`, `/v1/warm`;
//! * the **operator token** (`Authorization: Bearer`) guards what people and
//!   Prometheus read: `GET /`, `/v1/dashboard`, `/metrics`. Without one,
//!   those answer only to a peer at exactly 127.0.0.1 or ::1 — not all of
//!   127/8: Istio's sidecar hands inbound connections over from 127.0.0.6,
//!   so "loopback" there would mean "anyone in the mesh".
//!
//! Both are compared without an early exit, and neither is ever logged.

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Compares without an early exit, so response time says nothing about how
/// much of a guessed secret was right.
pub fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = given.len() ^ expected.len();
    for (i, e) in expected.iter().enumerate() {
        diff |= usize::from(given.get(i).copied().unwrap_or(0) ^ e);
    }
    diff == 0
}

/// The connection's peer, when the server recorded it (`ConnectInfo`);
/// None otherwise, which no check treats as local.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub Option<SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Peer, Infallible> {
        Ok(Peer(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|ConnectInfo(a)| *a),
        ))
    }
}

impl Peer {
    /// The address quotas are kept per (all unknown peers share one).
    pub fn caller(&self) -> IpAddr {
        self.0
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip())
    }
}

/// Exactly this machine's own loopback address (IPv4, IPv6, or IPv4 mapped
/// into IPv6).
pub fn is_local_peer(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a == Ipv4Addr::LOCALHOST,
        IpAddr::V6(a) => a == Ipv6Addr::LOCALHOST || a.to_ipv4_mapped() == Some(Ipv4Addr::LOCALHOST),
    }
}

/// Why an operator route was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// A token is configured and the request lacks it (401).
    Unauthorized,
    /// No token is configured and the peer is not local (403).
    NotLocal,
}

/// The bearer token of `Authorization`, if the header is one.
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let scheme = value.get(..7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| value.get(7..))
        .flatten()
        .map(<[u8]>::trim_ascii)
}

/// Whether a request may read an operator route.
pub fn operator(token: Option<&str>, headers: &HeaderMap, peer: Peer) -> Result<(), Denied> {
    match token {
        Some(expected) => match bearer(headers) {
            Some(given) if same_secret(given, expected.as_bytes()) => Ok(()),
            _ => Err(Denied::Unauthorized),
        },
        None => match peer.0 {
            Some(a) if is_local_peer(a.ip()) => Ok(()),
            _ => Err(Denied::NotLocal),
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"s3cret", b"s3cret"));
        assert!(!same_secret(b"s3cre", b"s3cret"));
        assert!(!same_secret(b"s3cretX", b"s3cret"));
        assert!(!same_secret(b"", b"s3cret"));
        assert!(!same_secret(b"S3cret", b"s3cret"));
    }

    fn peer(s: &str) -> Peer {
        Peer(Some(s.parse().unwrap()))
    }

    fn auth(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn without_a_token_only_this_machine_reads() {
        let none = HeaderMap::new();
        for local in ["127.0.0.1:5000", "[::1]:5000", "[::ffff:127.0.0.1]:5000"] {
            assert_eq!(operator(None, &none, peer(local)), Ok(()), "{local}");
        }
        for remote in ["127.0.0.6:5000", "10.0.0.7:5000", "[2001:db8::1]:5000", "0.0.0.0:1"] {
            assert_eq!(operator(None, &none, peer(remote)), Err(Denied::NotLocal), "{remote}");
        }
        assert_eq!(operator(None, &none, Peer(None)), Err(Denied::NotLocal), "unknown peer");
    }

    #[test]
    fn with_a_token_everyone_needs_it() {
        let t = Some("tok-123");
        assert_eq!(operator(t, &HeaderMap::new(), peer("127.0.0.1:1")), Err(Denied::Unauthorized));
        assert_eq!(operator(t, &auth("Bearer tok-12"), peer("127.0.0.1:1")), Err(Denied::Unauthorized));
        assert_eq!(operator(t, &auth("Basic tok-123"), peer("127.0.0.1:1")), Err(Denied::Unauthorized));
        assert_eq!(operator(t, &auth("Bearer tok-123"), peer("10.0.0.7:1")), Ok(()));
        assert_eq!(operator(t, &auth("bearer  tok-123 "), Peer(None)), Ok(()));
        assert_eq!(operator(t, &auth("Bearer"), Peer(None)), Err(Denied::Unauthorized));
    }
}
