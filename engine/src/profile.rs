//! An account's profile: where and on what its owner logs in. Learned from
//! successful logins only (a failed attempt never teaches it), kept in the
//! account's record, merged fleet-wide through the scorer.
//!
//! Four small sets — devices (user agent + header-order shape, and JA4
//! when configured), countries, ASNs, networks (the address's /24 or /48) —
//! of [`PROFILE_SLOTS`] entries
//! each, with when each was last seen (seconds): a new entry replaces the
//! one seen longest ago, so the profile follows the owner's new phone and
//! forgets last year's. Plus where and when the last success was, for
//! impossible travel. Layout, [`PROFILE_BYTES`] bytes: 4 × 4 × (value u32 ·
//! last seen s u32) · last_success_ms u64 · last_country u32.

use serde::{Deserialize, Serialize};

use crate::codec::{Reader, Writer};

/// Entries per set.
pub const PROFILE_SLOTS: usize = 4;
pub const PROFILE_BYTES: usize = 4 * PROFILE_SLOTS * 8 + 8 + 4;

/// One remembered value (0 = empty slot) and when it was last seen; on the
/// wire `[value, at_s]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(from = "(u32, u32)", into = "(u32, u32)")]
pub struct Seen {
    pub value: u32,
    pub at_s: u32,
}

impl From<(u32, u32)> for Seen {
    fn from((value, at_s): (u32, u32)) -> Seen {
        Seen { value, at_s }
    }
}

impl From<Seen> for (u32, u32) {
    fn from(s: Seen) -> (u32, u32) {
        (s.value, s.at_s)
    }
}

/// A fixed set of recently seen values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SeenSet(pub [Seen; PROFILE_SLOTS]);

impl SeenSet {
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|s| s.value == 0)
    }

    pub fn contains(&self, value: u32) -> bool {
        value != 0 && self.0.iter().any(|s| s.value == value)
    }

    /// Remembers `value` as seen at `at_s`: refreshes it, or takes the slot
    /// seen longest ago (an empty one first).
    pub fn insert(&mut self, value: u32, at_s: u32) {
        if value == 0 {
            return;
        }
        if let Some(s) = self.0.iter_mut().find(|s| s.value == value) {
            s.at_s = s.at_s.max(at_s);
            return;
        }
        if let Some(oldest) = self.0.iter_mut().min_by_key(|s| (s.value != 0, s.at_s)) {
            if oldest.value == 0 || oldest.at_s <= at_s {
                *oldest = Seen { value, at_s };
            }
        }
    }

    /// The union, keeping the most recently seen.
    pub fn merge(&mut self, other: &SeenSet) {
        for s in other.0 {
            self.insert(s.value, s.at_s);
        }
    }

    fn encode(&self, w: &mut Writer<'_>) {
        for s in self.0 {
            w.u32(s.value);
            w.u32(s.at_s);
        }
    }

    fn decode(r: &mut Reader<'_>) -> SeenSet {
        let mut set = SeenSet::default();
        for s in set.0.iter_mut() {
            *s = Seen { value: r.u32(), at_s: r.u32() };
        }
        set
    }
}

/// What a login looks like, as far as the profile compares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoginPlace {
    /// Device tag (never 0 for a login: see [`device_tag`]).
    pub device: u32,
    /// ISO country code as a number, 0 unknown.
    pub country: u32,
    /// Autonomous system number, 0 unknown.
    pub asn: u32,
    /// The address's network (see [`network_tag`]), 0 unknown.
    pub network: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountProfile {
    pub devices: SeenSet,
    pub countries: SeenSet,
    pub asns: SeenSet,
    pub networks: SeenSet,
    pub last_success_ms: u64,
    pub last_country: u32,
}

impl AccountProfile {
    /// Whether the owner's successful logins are known.
    pub fn is_known(&self) -> bool {
        !self.devices.is_empty()
    }

    /// Whether an attempt looks like the owner: one of its devices, or
    /// one of its networks (the owner's new phone on their home Wi-Fi),
    /// from one of its countries when both are known.
    pub fn looks_like_owner(&self, place: &LoginPlace) -> bool {
        (self.devices.contains(place.device) || self.networks.contains(place.network))
            && (place.country == 0 || self.countries.is_empty() || self.countries.contains(place.country))
    }

    /// Whether an attempt comes from the owner's own place: one of its
    /// devices *and* one of its networks (the address and fingerprint of
    /// its recent successful logins), from one of its countries when both
    /// are known. An API user's script shares its client library with
    /// attacks; its server's network it does not.
    pub fn is_owners_place(&self, place: &LoginPlace) -> bool {
        self.devices.contains(place.device)
            && self.networks.contains(place.network)
            && (place.country == 0 || self.countries.is_empty() || self.countries.contains(place.country))
    }

    /// Learns a successful login.
    pub fn learn(&mut self, place: &LoginPlace, now_ms: u64) {
        let at_s = u32::try_from(now_ms / 1000).unwrap_or(u32::MAX);
        self.devices.insert(place.device.max(1), at_s);
        self.countries.insert(place.country, at_s);
        self.asns.insert(place.asn, at_s);
        self.networks.insert(place.network, at_s);
        if now_ms >= self.last_success_ms {
            self.last_success_ms = now_ms;
            if place.country != 0 {
                self.last_country = place.country;
            }
        }
    }

    /// The union of two Envoys' views of the same account.
    pub fn merge(&mut self, other: &AccountProfile) {
        self.devices.merge(&other.devices);
        self.countries.merge(&other.countries);
        self.asns.merge(&other.asns);
        self.networks.merge(&other.networks);
        if other.last_success_ms > self.last_success_ms {
            self.last_success_ms = other.last_success_ms;
            if other.last_country != 0 {
                self.last_country = other.last_country;
            }
        }
    }

    pub fn encode(&self, w: &mut Writer<'_>) {
        self.devices.encode(w);
        self.countries.encode(w);
        self.asns.encode(w);
        self.networks.encode(w);
        w.u64(self.last_success_ms);
        w.u32(self.last_country);
    }

    pub fn decode(r: &mut Reader<'_>) -> AccountProfile {
        AccountProfile {
            devices: SeenSet::decode(r),
            countries: SeenSet::decode(r),
            asns: SeenSet::decode(r),
            networks: SeenSet::decode(r),
            last_success_ms: r.u64(),
            last_country: r.u32(),
        }
    }
}

/// A login's device: the user agent, the order of the request's header
/// names as the client sent them, and the TLS JA4 fingerprint when the host
/// has one. Never 0. (The exact user agent, version included: a browser's
/// update is a "new device" once, one point, and the owner's own browser
/// stays distinguishable from an attacker's copy of the same family.)
pub fn device_tag(user_agent: &str, header_names: &str, ja4: Option<&str>) -> u32 {
    let mut h = 0x811c_9dc5u32;
    for part in [user_agent, "|", header_names, "|", ja4.unwrap_or("")] {
        h = part.bytes().fold(h, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    }
    h.max(1)
}

/// The network an address is in — its /24 (IPv4) or /48 (IPv6) — as a
/// tag (never 0; 0 for no address): a household, an office, a small ISP pool.
pub fn network_tag(client: &crate::identity::ClientAddr) -> u32 {
    let bytes = client.key_bytes();
    let prefix = match bytes.first() {
        Some(4) => bytes.get(..4),
        Some(6) => bytes.get(..7),
        _ => return 0,
    };
    prefix.unwrap_or_default().iter().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)).max(1)
}

/// A two-letter country code (the GeoIP header) as a number (0: none or malformed).
pub fn country_number(code: Option<&str>) -> u32 {
    code.and_then(country_code).map(|c| u32::from(u16::from_le_bytes(c))).unwrap_or(0)
}

/// An ASN header value (`15169`, or `AS15169`) as a number (0: none).
pub fn asn_number(value: Option<&str>) -> u32 {
    let v = value.unwrap_or("").trim();
    let digits = v.strip_prefix("AS").or_else(|| v.strip_prefix("as")).unwrap_or(v);
    digits.parse().unwrap_or(0)
}

/// A two-letter country code, if the header holds one.
pub fn country_code(header: &str) -> Option<[u8; 2]> {
    let b = header.trim().as_bytes();
    match b {
        [a, c] if a.is_ascii_alphabetic() && c.is_ascii_alphabetic() => {
            Some([a.to_ascii_uppercase(), c.to_ascii_uppercase()])
        }
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn place(device: u32, country: &str, asn: u32) -> LoginPlace {
        LoginPlace { device, country: country_number(Some(country)), asn, network: 0 }
    }

    #[test]
    fn codec_round_trips() {
        let mut p = AccountProfile::default();
        p.learn(&place(7, "GB", 5089), 10_000);
        p.learn(&place(8, "SE", 0), 20_000);
        let mut buf = [0u8; PROFILE_BYTES];
        p.encode(&mut Writer::new(&mut buf));
        assert_eq!(AccountProfile::decode(&mut Reader::new(&buf)), p);
    }

    #[test]
    fn a_set_keeps_the_most_recent_and_forgets_the_oldest() {
        let mut s = SeenSet::default();
        for (v, at) in [(1, 10), (2, 20), (3, 30), (4, 40)] {
            s.insert(v, at);
        }
        s.insert(1, 50);
        s.insert(5, 60);
        assert!(s.contains(1) && s.contains(5) && !s.contains(2), "{s:?}");
        assert!(!s.contains(0), "0 is never a value");
        // An older sighting from a peer never evicts a newer one.
        s.insert(9, 1);
        assert!(!s.contains(9));
    }

    #[test]
    fn the_owner_is_its_device_in_its_countries() {
        let mut p = AccountProfile::default();
        assert!(!p.is_known());
        p.learn(&place(7, "GB", 0), 1_000);
        assert!(p.is_known());
        assert!(p.looks_like_owner(&place(7, "GB", 0)));
        assert!(p.looks_like_owner(&place(7, "", 0)), "country unknown");
        assert!(!p.looks_like_owner(&place(7, "CN", 0)), "the owner's device from another country");
        assert!(!p.looks_like_owner(&place(8, "GB", 0)));
        assert_eq!(p.last_country, country_number(Some("GB")));
    }

    #[test]
    fn a_new_device_on_the_owners_network_looks_like_the_owner() {
        use crate::identity::ClientAddr;
        let home = network_tag(&ClientAddr::Ip("2.125.160.216".parse().unwrap()));
        assert_eq!(home, network_tag(&ClientAddr::Ip("2.125.160.7".parse().unwrap())), "one /24");
        assert_ne!(home, network_tag(&ClientAddr::Ip("2.125.161.7".parse().unwrap())));
        assert_eq!(network_tag(&ClientAddr::Unknown), 0);
        let mut p = AccountProfile::default();
        p.learn(&LoginPlace { network: home, ..place(7, "GB", 0) }, 1_000);
        assert!(p.looks_like_owner(&LoginPlace { network: home, ..place(8, "GB", 0) }), "the new phone at home");
        assert!(!p.looks_like_owner(&LoginPlace { network: 99, ..place(8, "GB", 0) }));
        assert!(!p.looks_like_owner(&LoginPlace { network: home, ..place(8, "CN", 0) }));
    }

    #[test]
    fn merging_two_views_is_their_union_and_the_latest_success() {
        let (mut a, mut b) = (AccountProfile::default(), AccountProfile::default());
        a.learn(&place(7, "GB", 1), 1_000);
        b.learn(&place(8, "SE", 2), 2_000);
        a.merge(&b);
        assert!(a.devices.contains(7) && a.devices.contains(8));
        assert!(a.countries.contains(country_number(Some("SE"))) && a.asns.contains(2));
        assert_eq!((a.last_success_ms, a.last_country), (2_000, country_number(Some("SE"))));
    }

    #[test]
    fn a_device_is_its_browser_its_header_order_and_its_tls() {
        let names = "host,user-agent,accept,accept-language,content-type";
        let chrome = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36";
        assert_eq!(device_tag(chrome, names, None), device_tag(chrome, names, None));
        let updated = chrome.replace("131.0.0.0", "132.0.0.0");
        assert_ne!(device_tag(chrome, names, None), device_tag(&updated, names, None));
        let firefox = "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:133.0) Gecko/20100101 Firefox/133.0";
        assert_ne!(device_tag(chrome, names, None), device_tag(firefox, names, None));
        assert_ne!(device_tag(chrome, names, None), device_tag(chrome, "host,accept,user-agent", None));
        assert_ne!(device_tag(chrome, names, None), device_tag(chrome, names, Some("t13d1516h2_8daaf6152771_02713d6af862")));
    }

    #[test]
    fn codes_parse_or_are_unknown() {
        assert_eq!(country_number(Some("gb")), country_number(Some("GB")));
        assert_eq!(country_number(Some("GBR")), 0);
        assert_eq!(country_number(None), 0);
        assert_eq!(asn_number(Some("AS15169")), 15169);
        assert_eq!(asn_number(Some("15169")), 15169);
        assert_eq!(asn_number(Some("x")), 0);
    }
}
