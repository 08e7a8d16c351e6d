//! Operator allow entries: an address or prefix, an API key (by its fleet
//! hash) or a user-agent tag that no filter of the fleet judges until the
//! entry expires. Each has an author and a note; every answer of
//! `/v1/verdicts` carries all those in force (at most
//! [`MAX_ALLOW_ENTRIES`]), and an Envoy replaces its list with it.
//!
//! What an operator posts is checked here: the kind, the value's shape (a
//! prefix no wider than /16 in IPv4 or /32 in IPv6 — wider would switch the
//! filter off for a large part of the internet), an expiry between one
//! second and 90 days, bounded author and note. A raw API key is hashed
//! here with the fleet's key, exactly as the filters hash it, and never kept.

use abuse_engine::hash::KeyedHasher;
use abuse_engine::wire::AllowEntry;
pub use abuse_engine::wire::MAX_ALLOW_ENTRIES;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

pub const MIN_TTL_S: u64 = 1;
pub const MAX_TTL_S: u64 = 90 * 24 * 60 * 60;
pub const MAX_NOTE: usize = 256;
pub const MAX_AUTHOR: usize = 64;
/// Longest raw credential the scorer hashes for an operator.
pub const MAX_RAW_VALUE: usize = 4096;
pub const MIN_PREFIX_V4: u8 = 16;
pub const MIN_PREFIX_V6: u8 = 32;

/// The engine's hash domains (`engine/src/engine/mod.rs`): the fleet names
/// a session / API key with `DOMAIN_SESSION`, a username with
/// `DOMAIN_USERNAME` (the engine's own constants: they cannot drift).
pub use abuse_engine::engine::{DOMAIN_SESSION, DOMAIN_USERNAME};

/// An operator's request to allow something (`POST /v1/allow`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAllow {
    pub kind: String,
    pub value: String,
    /// How long it lasts (1 s to 90 days; default 1 day).
    #[serde(default)]
    pub ttl_s: Option<u64>,
    #[serde(default)]
    pub note: String,
    /// Who asks (else the `x-abuse-operator` header, else "operator").
    #[serde(default)]
    pub author: Option<String>,
}

/// An allow entry as kept and listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AllowRecord {
    pub id: String,
    pub kind: String,
    pub value: String,
    pub until_ms: u64,
    pub author: String,
    pub note: String,
    pub created_ms: u64,
}

impl AllowRecord {
    pub fn entry(&self) -> AllowEntry {
        AllowEntry {
            id: self.id.clone(),
            kind: self.kind.clone(),
            value: self.value.clone(),
            until_ms: self.until_ms,
        }
    }

    pub fn in_force(&self, at_ms: u64) -> bool {
        self.created_ms <= at_ms && self.until_ms > at_ms
    }

    /// Whether it covers a client at `address` with user-agent tag `agent`
    /// and credential hash `key` (an API key's).
    pub fn covers(&self, address: &str, agent: Option<&str>, key: Option<&str>) -> bool {
        match self.kind.as_str() {
            "cidr" => address.parse::<IpAddr>().is_ok_and(|a| in_prefix(&self.value, a)),
            "agent" => agent == Some(self.value.as_str()),
            "api_key" => key == Some(self.value.as_str()),
            _ => false,
        }
    }
}

/// Whether `address` lies in `prefix` (`ip` or `ip/len`, as [`parse_cidr`] writes it).
pub fn in_prefix(prefix: &str, address: IpAddr) -> bool {
    let Ok((net, len)) = parse_prefix(prefix) else {
        return false;
    };
    match (net, address) {
        (IpAddr::V4(n), IpAddr::V4(a)) => mask4(u32::from(a), len) == u32::from(n),
        (IpAddr::V6(n), IpAddr::V6(a)) => mask6(u128::from(a), len) == u128::from(n),
        _ => false,
    }
}

/// `a` with all but its first `len` bits cleared (`checked_shl` is None
/// for a shift of 32: a /0 keeps nothing).
fn mask4(a: u32, len: u8) -> u32 {
    a & u32::MAX.checked_shl(32 - u32::from(len.min(32))).unwrap_or(0)
}

fn mask6(a: u128, len: u8) -> u128 {
    a & u128::MAX.checked_shl(128 - u32::from(len.min(128))).unwrap_or(0)
}

fn parse_prefix(s: &str) -> Result<(IpAddr, u8), String> {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip, Some(len)),
        None => (s, None),
    };
    let ip: IpAddr = ip.trim().parse().map_err(|_| format!("`{}` is not an IP address", ip.trim()))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        Some(l) => l
            .trim()
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("prefix length must be 0-{max}"))?,
        None => max,
    };
    Ok((ip, len))
}

/// A checked, canonical prefix: the network (host bits cleared) and its
/// length, or the bare address for a full-length one.
pub fn parse_cidr(s: &str) -> Result<String, String> {
    let (ip, len) = parse_prefix(s)?;
    match ip {
        IpAddr::V4(a) => {
            if len < MIN_PREFIX_V4 {
                return Err(format!("an IPv4 prefix must be /{MIN_PREFIX_V4} or narrower"));
            }
            let net = std::net::Ipv4Addr::from(mask4(u32::from(a), len));
            Ok(if len == 32 { net.to_string() } else { format!("{net}/{len}") })
        }
        IpAddr::V6(a) => {
            if len < MIN_PREFIX_V6 {
                return Err(format!("an IPv6 prefix must be /{MIN_PREFIX_V6} or narrower"));
            }
            let net = std::net::Ipv6Addr::from(mask6(u128::from(a), len));
            Ok(if len == 128 { net.to_string() } else { format!("{net}/{len}") })
        }
    }
}

fn is_hex(s: &str, digits: usize) -> bool {
    s.len() == digits && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Bounded, printable free text (a note, an author).
pub fn check_text(s: &str, max: usize, what: &str) -> Result<String, String> {
    let s = s.trim();
    if s.len() > max {
        return Err(format!("`{what}` longer than {max} bytes"));
    }
    if s.chars().any(char::is_control) {
        return Err(format!("`{what}` has control characters"));
    }
    Ok(s.to_string())
}

/// The fleet's names for what an operator types: a credential hashed as
/// the filters hash it, a username normalised and hashed as the login
/// detector does. A 16-hex-digit value is taken as a hash already.
pub struct FleetNames {
    hasher: KeyedHasher,
}

impl FleetNames {
    /// `secret`: the filters' secret (the scorer's), from which every
    /// filter of the fleet derives the same key.
    pub fn new(secret: Option<&str>) -> FleetNames {
        // The filters hash with the configured scorer secret; without one
        // they use a per-process key nobody can reproduce.
        FleetNames { hasher: KeyedHasher::from_secret(secret.unwrap_or("")) }
    }

    /// `prefix` is what the filter puts before the raw value (`key`,
    /// `cookie`, `sub`, `bearer`).
    pub fn credential(&self, prefix: &str, value: &str) -> Result<String, String> {
        let v = value.trim();
        if is_hex(v, 16) {
            return Ok(v.to_ascii_lowercase());
        }
        if v.is_empty() || v.len() > MAX_RAW_VALUE {
            return Err(format!("a credential must be 1-{MAX_RAW_VALUE} bytes"));
        }
        Ok(format!("{:016x}", self.hasher.key(DOMAIN_SESSION, format!("{prefix}:{v}").as_bytes())))
    }

    pub fn username(&self, value: &str) -> Result<String, String> {
        let v = value.trim();
        if is_hex(v, 16) {
            return Ok(v.to_ascii_lowercase());
        }
        if v.is_empty() || v.len() > MAX_RAW_VALUE {
            return Err(format!("a username must be 1-{MAX_RAW_VALUE} bytes"));
        }
        // The login detector's own normalisation (trim, lower case, length cap).
        let body = serde_json::json!({ "u": v }).to_string();
        let name = abuse_engine::detectors::login::extract_username(body.as_bytes(), "u")
            .ok_or_else(|| "the username is empty".to_string())?;
        Ok(format!("{:016x}", self.hasher.key(DOMAIN_USERNAME, name.as_bytes())))
    }
}

/// A checked allow entry, `id` and times filled in.
pub fn build(
    new: &NewAllow,
    author: &str,
    names: &FleetNames,
    id: String,
    now_ms: u64,
) -> Result<AllowRecord, String> {
    let value = match new.kind.as_str() {
        "cidr" => parse_cidr(&new.value)?,
        "api_key" => names.credential("key", &new.value)?,
        "agent" => {
            let v = new.value.trim().to_ascii_lowercase();
            if !is_hex(&v, 8) {
                return Err("an `agent` value is a user-agent tag: 8 hex digits".into());
            }
            v
        }
        other => {
            return Err(format!(
                "unknown `kind` {:?}: cidr, api_key or agent",
                other.chars().take(32).collect::<String>()
            ))
        }
    };
    let ttl_s = new.ttl_s.unwrap_or(86_400);
    if !(MIN_TTL_S..=MAX_TTL_S).contains(&ttl_s) {
        return Err(format!("`ttl_s` must be {MIN_TTL_S}-{MAX_TTL_S} (up to 90 days)"));
    }
    let author = check_text(new.author.as_deref().unwrap_or(author), MAX_AUTHOR, "author")?;
    Ok(AllowRecord {
        id,
        kind: new.kind.clone(),
        value,
        until_ms: now_ms.saturating_add(ttl_s.saturating_mul(1000)),
        author: if author.is_empty() { "operator".into() } else { author },
        note: check_text(&new.note, MAX_NOTE, "note")?,
        created_ms: now_ms,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn new(kind: &str, value: &str) -> NewAllow {
        NewAllow { kind: kind.into(), value: value.into(), ttl_s: Some(3600), note: "partner".into(), author: None }
    }

    #[test]
    fn prefixes_are_checked_and_canonical() {
        assert_eq!(parse_cidr("203.0.113.77/24").unwrap(), "203.0.113.0/24");
        assert_eq!(parse_cidr("203.0.113.7").unwrap(), "203.0.113.7");
        assert_eq!(parse_cidr("2001:db8::1/48").unwrap(), "2001:db8::/48");
        assert!(parse_cidr("0.0.0.0/0").unwrap_err().contains("/16"));
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("not-an-ip").is_err());
        assert!(parse_cidr("1.2.3.4/x").is_err());
        assert!(in_prefix("203.0.113.0/24", "203.0.113.200".parse().unwrap()));
        assert!(!in_prefix("203.0.113.0/24", "203.0.114.1".parse().unwrap()));
        assert!(in_prefix("203.0.113.7", "203.0.113.7".parse().unwrap()));
        assert!(!in_prefix("2001:db8::/48", "203.0.113.7".parse().unwrap()));
        assert!(in_prefix("2001:db8::/48", "2001:db8:0:1::5".parse().unwrap()));
    }

    #[test]
    fn entries_are_validated() {
        let names = FleetNames::new(Some("s"));
        let t = 1_700_000_000_000;
        let ok = build(&new("cidr", "198.51.100.0/24"), "alice", &names, "x1".into(), t).unwrap();
        assert_eq!((ok.until_ms, ok.author.as_str()), (t + 3_600_000, "alice"));
        assert!(ok.covers("198.51.100.9", None, None) && !ok.covers("198.51.101.9", None, None));
        let key = build(&new("api_key", "partner-key-123"), "a", &names, "x2".into(), t).unwrap();
        assert_eq!(key.value.len(), 16);
        assert!(!key.value.contains("partner"), "a raw key is never kept");
        assert_eq!(key.value, names.credential("key", "partner-key-123").unwrap());
        assert_eq!(build(&new("agent", "1A2B3C4D"), "a", &names, "x3".into(), t).unwrap().value, "1a2b3c4d");
        for (kind, value) in [("agent", "xyz"), ("ip", "1.2.3.4"), ("cidr", "10.0.0.0/8"), ("api_key", "")] {
            assert!(build(&new(kind, value), "a", &names, "x".into(), t).is_err(), "{kind} {value}");
        }
        for ttl in [0, MAX_TTL_S + 1] {
            let n = NewAllow { ttl_s: Some(ttl), ..new("agent", "1a2b3c4d") };
            assert!(build(&n, "a", &names, "x".into(), t).unwrap_err().contains("ttl_s"));
        }
        let long = NewAllow { note: "n".repeat(300), ..new("agent", "1a2b3c4d") };
        assert!(build(&long, "a", &names, "x".into(), t).unwrap_err().contains("note"));
    }

    #[test]
    fn operators_search_by_what_the_filters_hash() {
        let names = FleetNames::new(Some("fleet-secret"));
        let h = KeyedHasher::from_secret("fleet-secret");
        assert_eq!(names.credential("cookie", "abc").unwrap(), format!("{:016x}", h.key(DOMAIN_SESSION, b"cookie:abc")));
        assert_eq!(names.username("  Alice ").unwrap(), format!("{:016x}", h.key(DOMAIN_USERNAME, b"alice")));
        assert_eq!(names.username("00112233AABBCCDD").unwrap(), "00112233aabbccdd", "a hash is taken as is");
    }
}
