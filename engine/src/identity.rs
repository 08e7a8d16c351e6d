//! Who is this client? The address comes from the connection's peer, or from
//! `X-Forwarded-For` — but only when the peer is a proxy we were told to
//! trust, and only the entry that proxy appended. Anything malformed falls
//! back to the peer: a client must never be able to pick its own identity.
//!
//! API keys, session cookies and JWT subjects are extra identities carried
//! for detectors and logs. They are chosen by the client, so per-client state
//! is keyed on the address, never on them.

use crate::validate::{parse_cidr, ConfigError};
use serde::Deserialize;
use base64::Engine as _;
use ipnet::IpNet;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

// ---- configuration (`client`) ----

/// How a client is identified.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct ClientConfig {
    /// CIDRs of proxies/load balancers whose `X-Forwarded-For` is believed.
    /// Empty (the default) means XFF is never believed.
    pub trusted_proxies: Vec<String>,
    /// How many proxies append to XFF in front of Envoy: the client is the
    /// `trusted_hops`-th address from the right.
    pub trusted_hops: u32,
    pub forwarded_for_header: String,
    /// IPv6 clients are grouped by this prefix length (a /64 is one subscriber).
    pub ipv6_prefix_len: u8,
    /// Header carrying an API key, if the API uses one.
    pub api_key_header: Option<String>,
    /// Name of the session cookie, if the API uses one.
    pub session_cookie: Option<String>,
    /// Claim of the `Authorization: Bearer` JWT naming the subject — decoded,
    /// NOT verified: for logs only. It never names a session nor lifts a
    /// limit; the bearer token itself is the session (a forged token is its
    /// own session, never its claimed subject's). See `verified_subject_header`.
    pub jwt_claim: Option<String>,
    /// Header that Envoy's `header_mutation` filter, placed after
    /// `jwt_authn` and before this one, fills with the *verified* subject
    /// (`%DYNAMIC_METADATA(envoy.filters.http.jwt_authn:jwt_payload:sub)%`,
    /// after a `remove` of any copy the client sent). Its subject is the
    /// session, and an accepted credential. Only set it with that filter.
    pub verified_subject_header: Option<String>,
    /// Response header by which the upstream says it accepted the request's
    /// credential (session cookie, API key or bearer token), e.g. the demo
    /// API's `x-api-credential: valid`. An accepted credential lifts its
    /// client from the `anonymous_only` limits; an invented one never does.
    pub accepted_credential_header: Option<String>,
    /// A client is its address *and* its user agent: the people behind one
    /// office or carrier NAT are judged apart, so one of them abusing the
    /// API is stopped without stopping the others.
    pub key_by_user_agent: bool,
    /// With `key_by_user_agent`: an identity (address + user agent) becomes a
    /// client of its own only once it comes back, a request at least this
    /// many seconds after its first. Until then its requests are judged with
    /// every other new identity of the address, as one client: the
    /// address's *pool*. A user agent seen once is not a person, so rotating
    /// the string buys no budget.
    pub returning_after_s: u32,
    /// The pool's rate limits are the per-client limits times
    /// (`pool_budget` + one per eight returning identities seen at the
    /// address in the last two minutes, at most `max_crowd` counted): a real
    /// crowd behind one NAT earns room for its newcomers, invented strings
    /// earn none. Over that budget the pool is boxed for `penalty.duration_s`
    /// (its returning identities are not).
    pub pool_budget: u32,
    pub max_crowd: u32,
    /// The pool of new identities spans the IPv4 prefix of this length
    /// (32, the default: per address; 24: addresses rotating within a /24
    /// share one pool — but so do the neighbours of a /24, and attempts the
    /// pool refuses are no longer seen by the login endpoint's recognition).
    /// IPv6 clients are already grouped by `ipv6_prefix_len` (a /64).
    pub pool_prefix_v4: u8,
    /// Header that Envoy's `header_mutation` filter, placed before this
    /// one, fills with the direct peer's address and the request's start time
    /// (value `%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT% %START_TIME(%s%3f)%
    /// %TLS_JA4_FINGERPRINT%`, append_action OVERWRITE_IF_EXISTS_OR_ADD):
    /// read in the header map instead of two host calls (`source.address`,
    /// the clock). Only set it when that filter is in place, or a client
    /// could name its own address. Unset: the host calls.
    pub facts_header: Option<String>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            trusted_proxies: Vec::new(),
            trusted_hops: 1,
            forwarded_for_header: "x-forwarded-for".to_string(),
            ipv6_prefix_len: 64,
            api_key_header: None,
            session_cookie: None,
            jwt_claim: None,
            verified_subject_header: None,
            accepted_credential_header: None,
            key_by_user_agent: true,
            returning_after_s: 2,
            pool_budget: 4,
            max_crowd: 64,
            pool_prefix_v4: 32,
            facts_header: None,
        }
    }
}


/// Longest header value we look into; longer ones are ignored, not truncated.
pub const MAX_HEADER_LEN: usize = 8192;
/// Longest identity value kept (API key, cookie value, JWT claim).
pub const MAX_IDENTITY_LEN: usize = 256;

/// The address a client is counted under: IPv4 as is, IPv6 cut to the
/// configured prefix (one subscriber usually owns a whole /64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientAddr {
    Ip(IpAddr),
    /// The peer address could not be read (e.g. a Unix socket): all such
    /// requests share one key rather than getting a fresh one each.
    Unknown,
}

impl ClientAddr {
    /// The address's IPv4 prefix of `len` bits (IPv6 and unknown as they are).
    pub fn v4_prefix(&self, len: u8) -> ClientAddr {
        match self {
            ClientAddr::Ip(IpAddr::V4(v4)) => {
                let mask = u32::MAX.checked_shl(32u32.saturating_sub(u32::from(len.min(32)))).unwrap_or(0);
                ClientAddr::Ip(IpAddr::V4((u32::from(*v4) & mask).into()))
            }
            other => *other,
        }
    }

    /// Bytes hashed into the client key.
    pub fn key_bytes(&self) -> [u8; 17] {
        let mut out = [0u8; 17];
        match self {
            ClientAddr::Ip(IpAddr::V4(v4)) => {
                out[0] = 4;
                out[1..5].copy_from_slice(&v4.octets());
            }
            ClientAddr::Ip(IpAddr::V6(v6)) => {
                out[0] = 6;
                out[1..17].copy_from_slice(&v6.octets());
            }
            ClientAddr::Unknown => {}
        }
        out
    }
}

impl std::fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientAddr::Ip(ip) => write!(f, "{ip}"),
            ClientAddr::Unknown => write!(f, "unknown"),
        }
    }
}

/// A stable 32-bit tag of a user agent (FNV-1a): part of the client key
/// when `client.key_by_user_agent` is on, and shown next to the address in
/// logs and scorer questions (`203.0.113.7#1f2e3d4c`) so that every Envoy of
/// a fleet names the same client alike. Table placement still goes through
/// the seeded hash of address and tag, so a chosen agent cannot aim at a shard.
pub fn agent_tag(user_agent: &str) -> u32 {
    user_agent.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

/// The tag naming an address's pool of new identities in labels (`addr#pool`).
pub const POOL_TAG: &str = "pool";

/// `addr` or `addr#tag`: how a client is named to the scorer and in fleet verdicts.
pub fn client_label(addr: ClientAddr, agent: Option<u32>) -> String {
    match agent {
        Some(tag) => format!("{addr}#{tag:08x}"),
        None => addr.to_string(),
    }
}

/// How a verdict names its client: the identity, or its address's pool.
pub fn verdict_label(addr: ClientAddr, agent: Option<u32>, pool: bool) -> String {
    if pool {
        format!("{addr}#{POOL_TAG}")
    } else {
        client_label(addr, agent)
    }
}

/// Everything known about who sent a request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientIdentity {
    pub addr: Option<ClientAddr>,
    pub api_key: Option<String>,
    pub session: Option<String>,
    /// The unverified JWT claim (`client.jwt_claim`): for logs only.
    pub subject: Option<String>,
    /// The subject `jwt_authn` verified (`client.verified_subject_header`).
    pub verified_subject: Option<String>,
    /// The `Authorization: Bearer` token itself, as a session of its own.
    pub bearer: Option<String>,
}

impl ClientIdentity {
    pub fn addr(&self) -> ClientAddr {
        self.addr.unwrap_or(ClientAddr::Unknown)
    }
}

/// Raw request facts the identity is derived from (all optional).
#[derive(Debug, Clone, Copy, Default)]
pub struct IdentityInput<'a> {
    /// Envoy's `source.address`: `ip:port` or `[ipv6]:port`.
    pub peer: Option<&'a [u8]>,
    pub forwarded_for: Option<&'a [u8]>,
    pub api_key: Option<&'a [u8]>,
    pub cookie: Option<&'a [u8]>,
    pub authorization: Option<&'a [u8]>,
    /// The `client.verified_subject_header`'s value.
    pub verified_subject: Option<&'a [u8]>,
}

/// The compiled identity part of the configuration.
#[derive(Debug, Clone)]
pub struct IdentityPolicy {
    trusted_proxies: Vec<IpNet>,
    trusted_hops: usize,
    ipv6_prefix_len: u8,
    pub forwarded_for_header: String,
    pub api_key_header: Option<String>,
    pub session_cookie: Option<String>,
    pub jwt_claim: Option<String>,
    pub verified_subject_header: Option<String>,
    pub accepted_credential_header: Option<String>,
}

impl IdentityPolicy {
    pub fn new(config: &ClientConfig) -> Result<IdentityPolicy, ConfigError> {
        let mut trusted_proxies = Vec::with_capacity(config.trusted_proxies.len());
        for (i, text) in config.trusted_proxies.iter().enumerate() {
            trusted_proxies.push(parse_cidr(text).map_err(|problem| ConfigError {
                key: format!("client.trusted_proxies[{i}]"),
                problem,
            })?);
        }
        Ok(IdentityPolicy {
            trusted_proxies,
            trusted_hops: usize::try_from(config.trusted_hops).unwrap_or(1).max(1),
            ipv6_prefix_len: config.ipv6_prefix_len,
            forwarded_for_header: config.forwarded_for_header.clone(),
            api_key_header: config.api_key_header.clone(),
            session_cookie: config.session_cookie.clone(),
            jwt_claim: config.jwt_claim.clone(),
            verified_subject_header: config.verified_subject_header.clone(),
            accepted_credential_header: config.accepted_credential_header.clone(),
        })
    }

    /// Whether XFF is read at all (saves a header read when nothing is trusted).
    pub fn reads_forwarded_for(&self) -> bool {
        !self.trusted_proxies.is_empty()
    }

    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }

    /// The peer address, then, if the peer is trusted, the XFF entry it vouches for.
    pub fn client_addr(&self, peer: Option<&[u8]>, forwarded_for: Option<&[u8]>) -> ClientAddr {
        let Some(peer_ip) = peer.and_then(parse_peer) else {
            return ClientAddr::Unknown;
        };
        let ip = if self.is_trusted_proxy(peer_ip) {
            forwarded_for
                .and_then(|xff| forwarded_client(xff, self.trusted_hops))
                .unwrap_or(peer_ip)
        } else {
            peer_ip
        };
        ClientAddr::Ip(self.group(ip))
    }

    pub fn identify(&self, input: &IdentityInput<'_>) -> ClientIdentity {
        ClientIdentity {
            addr: Some(self.client_addr(input.peer, input.forwarded_for)),
            api_key: input.api_key.and_then(clean_token),
            session: match (&self.session_cookie, input.cookie) {
                (Some(name), Some(cookie)) => cookie_value(cookie, name),
                _ => None,
            },
            subject: match (&self.jwt_claim, input.authorization) {
                (Some(claim), Some(auth)) => jwt_claim(auth, claim),
                _ => None,
            },
            verified_subject: match (&self.verified_subject_header, input.verified_subject) {
                (Some(_), Some(v)) => clean_token(v).filter(|s| s != "-"),
                _ => None,
            },
            bearer: input.authorization.and_then(bearer_token),
        }
    }

    fn group(&self, ip: IpAddr) -> IpAddr {
        match canonical(ip) {
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                let keep = u32::from(self.ipv6_prefix_len.min(128));
                let mask = u128::MAX.checked_shl(128u32.saturating_sub(keep)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(bits & mask))
            }
            v4 => v4,
        }
    }
}

/// IPv4-mapped IPv6 (`::ffff:1.2.3.4`) is the same client as `1.2.3.4`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Parses `ip:port`, `[ipv6]:port` or a bare address.
pub fn parse_peer(raw: &[u8]) -> Option<IpAddr> {
    if raw.len() > 64 {
        return None;
    }
    let text = std::str::from_utf8(raw).ok()?.trim();
    if let Ok(sock) = text.parse::<SocketAddr>() {
        return Some(canonical(sock.ip()));
    }
    let bare = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')).unwrap_or(text);
    bare.parse::<IpAddr>().ok().map(canonical)
}

/// The `hops`-th address from the right of an XFF list, or None when the
/// list is too short or that entry is not an address.
pub fn forwarded_client(xff: &[u8], hops: usize) -> Option<IpAddr> {
    if xff.len() > MAX_HEADER_LEN {
        return None;
    }
    let text = std::str::from_utf8(xff).ok()?;
    let entry = text.rsplit(',').nth(hops.checked_sub(1)?)?;
    parse_peer(entry.trim().as_bytes())
}

fn clean_token(raw: &[u8]) -> Option<String> {
    if raw.is_empty() || raw.len() > MAX_IDENTITY_LEN {
        return None;
    }
    let text = std::str::from_utf8(raw).ok()?.trim();
    if text.is_empty() || text.chars().any(|c| c.is_control()) {
        return None;
    }
    Some(text.to_string())
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie_value(header: &[u8], name: &str) -> Option<String> {
    if header.len() > MAX_HEADER_LEN {
        return None;
    }
    let text = std::str::from_utf8(header).ok()?;
    text.split(';').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        if k.trim() == name {
            clean_token(v.trim().trim_matches('"').as_bytes())
        } else {
            None
        }
    })
}

/// The token of an `Authorization: Bearer` header (at most 4 KiB).
pub fn bearer_token(authorization: &[u8]) -> Option<String> {
    if authorization.len() > 4096 {
        return None;
    }
    let text = std::str::from_utf8(authorization).ok()?.trim();
    let (scheme, token) = text.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && !token.chars().any(|c| c.is_control()))
        .then(|| token.to_string())
}

/// The claim `claim` of a `Bearer` JWT, decoded but NOT verified: it names a
/// subject for correlation, it proves nothing.
pub fn jwt_claim(authorization: &[u8], claim: &str) -> Option<String> {
    if authorization.len() > MAX_HEADER_LEN {
        return None;
    }
    let text = std::str::from_utf8(authorization).ok()?.trim();
    let (scheme, token) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut parts = token.trim().split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    match value.get(claim)? {
        serde_json::Value::String(s) => clean_token(s.as_bytes()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(trusted: &[&str], hops: u32) -> IdentityPolicy {
        IdentityPolicy::new(&ClientConfig {
            trusted_proxies: trusted.iter().map(|s| s.to_string()).collect(),
            trusted_hops: hops,
            session_cookie: Some("sid".into()),
            jwt_claim: Some("sub".into()),
            ..ClientConfig::default()
        })
        .unwrap()
    }

    fn ip(s: &str) -> ClientAddr {
        ClientAddr::Ip(s.parse().unwrap())
    }

    #[test]
    fn peer_addresses_drop_the_port() {
        assert_eq!(parse_peer(b"10.1.2.3:5555"), Some("10.1.2.3".parse().unwrap()));
        assert_eq!(parse_peer(b"[2001:db8::1]:443"), Some("2001:db8::1".parse().unwrap()));
        assert_eq!(parse_peer(b"2001:db8::1"), Some("2001:db8::1".parse().unwrap()));
        assert_eq!(parse_peer(b"[::ffff:1.2.3.4]:80"), Some("1.2.3.4".parse().unwrap()));
        assert_eq!(parse_peer(b"/var/run/sock"), None);
        assert_eq!(parse_peer(b"\xff\xfe"), None);
        assert_eq!(parse_peer(b""), None);
    }

    #[test]
    fn ipv6_clients_are_grouped_by_prefix() {
        let p = policy(&[], 1);
        assert_eq!(
            p.client_addr(Some(b"[2001:db8:1:2:aaaa::1]:1"), None),
            ip("2001:db8:1:2::")
        );
        assert_eq!(
            p.client_addr(Some(b"[2001:db8:1:2:bbbb::9]:1"), None),
            p.client_addr(Some(b"[2001:db8:1:2:aaaa::1]:1"), None)
        );
    }

    #[test]
    fn xff_is_ignored_from_untrusted_peers() {
        let p = policy(&["10.0.0.0/8"], 1);
        // A spoofed header from the internet changes nothing.
        assert_eq!(p.client_addr(Some(b"203.0.113.9:1234"), Some(b"1.1.1.1")), ip("203.0.113.9"));
        let none = policy(&[], 1);
        assert_eq!(none.client_addr(Some(b"10.0.0.1:1"), Some(b"1.1.1.1")), ip("10.0.0.1"));
    }

    #[test]
    fn xff_from_trusted_peers_takes_the_vouched_entry() {
        let p = policy(&["10.0.0.0/8", "::1"], 1);
        // The client prepended a fake entry; the proxy appended the real one.
        assert_eq!(
            p.client_addr(Some(b"10.0.0.1:1"), Some(b"6.6.6.6, 198.51.100.7")),
            ip("198.51.100.7")
        );
        assert_eq!(p.client_addr(Some(b"[::1]:1"), Some(b"198.51.100.8")), ip("198.51.100.8"));
        let two = policy(&["10.0.0.0/8"], 2);
        assert_eq!(
            two.client_addr(Some(b"10.0.0.1:1"), Some(b"6.6.6.6, 198.51.100.7, 10.9.9.9")),
            ip("198.51.100.7")
        );
        // Too few entries for two hops: the header is not trusted.
        assert_eq!(two.client_addr(Some(b"10.0.0.1:1"), Some(b"198.51.100.7")), ip("10.0.0.1"));
    }

    #[test]
    fn garbage_xff_falls_back_to_the_peer() {
        let p = policy(&["10.0.0.0/8"], 1);
        for bad in [&b""[..], b",", b"not-an-ip", b"1.2.3.4, ", b"\xff\xff", b"999.1.1.1", b"[::1"] {
            assert_eq!(p.client_addr(Some(b"10.0.0.1:1"), Some(bad)), ip("10.0.0.1"), "{bad:?}");
        }
        let huge = vec![b'1'; MAX_HEADER_LEN + 1];
        assert_eq!(p.client_addr(Some(b"10.0.0.1:1"), Some(&huge)), ip("10.0.0.1"));
        assert_eq!(p.client_addr(Some(b"10.0.0.1:1"), Some(b"1.2.3.4:80")), ip("1.2.3.4"));
    }

    #[test]
    fn unreadable_peer_is_unknown() {
        let p = policy(&["10.0.0.0/8"], 1);
        assert_eq!(p.client_addr(None, Some(b"1.2.3.4")), ClientAddr::Unknown);
        assert_eq!(p.client_addr(Some(b"garbage"), Some(b"1.2.3.4")), ClientAddr::Unknown);
    }

    #[test]
    fn cookies_and_jwts() {
        assert_eq!(cookie_value(b"a=1; sid=abc123; b=2", "sid"), Some("abc123".into()));
        assert_eq!(cookie_value(b"a=1;sid=\"q\"", "sid"), Some("q".into()));
        assert_eq!(cookie_value(b"sidx=1", "sid"), None);
        assert_eq!(cookie_value(b"sid=", "sid"), None);
        // {"sub":"alice","n":1}
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"sub":"alice","n":7}"#);
        let auth = format!("Bearer eyJhbGciOiJIUzI1NiJ9.{payload}.sig");
        assert_eq!(jwt_claim(auth.as_bytes(), "sub"), Some("alice".into()));
        assert_eq!(jwt_claim(auth.as_bytes(), "n"), Some("7".into()));
        assert_eq!(jwt_claim(auth.as_bytes(), "missing"), None);
        assert_eq!(jwt_claim(b"Basic abc", "sub"), None);
        assert_eq!(jwt_claim(b"Bearer a.!!!.c", "sub"), None);
        assert_eq!(jwt_claim(b"Bearer onlyone", "sub"), None);
        assert_eq!(jwt_claim(b"Bearer a.b.c.d", "sub"), None);
    }

    #[test]
    fn identify_collects_everything() {
        let p = policy(&[], 1);
        let id = p.identify(&IdentityInput {
            peer: Some(b"192.0.2.1:9"),
            api_key: Some(b" key-1 "),
            cookie: Some(b"sid=s1"),
            ..IdentityInput::default()
        });
        assert_eq!(id.addr(), ip("192.0.2.1"));
        assert_eq!(id.api_key.as_deref(), Some("key-1"));
        assert_eq!(id.session.as_deref(), Some("s1"));
        assert_eq!(id.subject, None);
    }

    proptest! {
        /// Whatever a client puts in XFF, an untrusted peer stays itself and a
        /// trusted peer yields either itself or an address actually in the header.
        #[test]
        fn arbitrary_xff_never_panics_nor_escapes(xff in proptest::collection::vec(any::<u8>(), 0..300)) {
            let p = policy(&["10.0.0.0/8"], 1);
            prop_assert_eq!(p.client_addr(Some(b"203.0.113.1:1"), Some(&xff)), ip("203.0.113.1"));
            let got = p.client_addr(Some(b"10.0.0.1:1"), Some(&xff));
            if got != ip("10.0.0.1") {
                let text = String::from_utf8_lossy(&xff);
                prop_assert!(matches!(got, ClientAddr::Ip(_)));
                let a = got.to_string();
                prop_assert!(text.contains(&a) || text.contains("::ffff:") || text.contains('['));
            }
            let _ = jwt_claim(&xff, "sub");
            let _ = cookie_value(&xff, "sid");
        }
    }
}
