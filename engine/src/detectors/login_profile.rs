//! Account takeover with valid credentials: a login compared with its
//! account's profile (see [`crate::profile`]).
//!
//! What it counts: per account, the devices, countries and ASNs of its
//! successful logins and where the last one was. Over what: the profile's
//! memory (four of each, most recent kept). What happens: each login gets a
//! risk with reasons — a new country, a new network in a known country, a
//! new device, impossible travel since the last success, a takeover-prone
//! source (VPN, Tor, hosting, proxy), failures on the account from other
//! clients just before — that goes to the application in the login-risk
//! header (so it can ask for a second factor), to the access log, and to
//! the stats. By default that is all (`tag`): a real owner on holiday is
//! told apart by the application's step-up, never locked out. An operator
//! can refuse a login with a reason set to `block`, or with all the reasons
//! of one of `block_when`'s combinations.
//!
//! A new account (no profile yet) is never risky for lacking one.
//!
//! Scenario, in short:
//! - counts: devices, countries, ASNs of an account's successful logins; where the last one was;
//! - grouped by: account;
//! - over: the profile's memory (four of each); `min_travel_s`;
//! - over the threshold: a risk with reasons for the application (login-risk header); `account_takeover` refusal only for reasons or `block_when` combinations set to `block`.

use serde::Deserialize;
use std::collections::BTreeMap;

use crate::account::AccountRecord;
use crate::policy::DetectorAction;
use crate::validate::{check_finite_range, check_header_name, check_range, err, ConfigError};
use crate::profile::LoginPlace;

/// The reasons, in the header's order, with their points.
pub const REASONS: [(ProfileReason, &str, u32); 6] = [
    (ProfileReason::NewCountry, "new_country", 3),
    (ProfileReason::ImpossibleTravel, "impossible_travel", 2),
    (ProfileReason::AnonymousSource, "anonymous_source", 2),
    (ProfileReason::FailuresElsewhere, "failures_elsewhere", 2),
    (ProfileReason::NewNetwork, "new_network", 1),
    (ProfileReason::NewDevice, "new_device", 1),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProfileReason {
    /// A country none of the account's successful logins came from.
    NewCountry,
    /// Another country than the last success, sooner than travel allows.
    ImpossibleTravel,
    /// A VPN, Tor, hosting or proxy address (the GeoIP filter's flags).
    AnonymousSource,
    /// Failed logins on the account from other clients in the window.
    FailuresElsewhere,
    /// A new ASN in one of the account's countries (a new country already
    /// implies a new network: not counted twice).
    NewNetwork,
    /// A device (user-agent family + header order, + JA4) never seen on a success.
    NewDevice,
}

impl ProfileReason {
    fn bit(self) -> u8 {
        1 << (self as u8)
    }

    pub fn name(self) -> &'static str {
        REASONS.iter().find(|(r, _, _)| *r == self).map_or("", |(_, n, _)| n)
    }

    fn from_name(name: &str) -> Option<ProfileReason> {
        REASONS.iter().find(|(_, n, _)| *n == name).map(|(r, _, _)| *r)
    }
}

/// `account_takeover.profile`: comparing each login with its account's profile.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct LoginProfileConfig {
    pub enabled: bool,
    /// A success in another country less than this after the last one is impossible travel.
    pub min_travel_s: u32,
    /// Failures on the account from other clients (stuffing window) that make `failures_elsewhere`.
    pub failures_elsewhere_min: u32,
    /// Points for `medium` (new_country 3, impossible_travel 2,
    /// anonymous_source 2, failures_elsewhere 2, new_network 1, new_device 1).
    pub medium_at: u32,
    /// Points for `high`: a new country with a new device, by default.
    pub high_at: u32,
    /// Per reason: `tag` (default: told to the application, counted),
    /// `block` (the login is refused), `monitor` (counted only, not told).
    pub actions: BTreeMap<String, DetectorAction>,
    /// Refuse a login that has every reason of one of these lists, e.g.
    /// `[["new_country", "new_device", "anonymous_source"]]`.
    pub block_when: Vec<Vec<String>>,
    /// Risk added to a client whose login is refused.
    pub weight: f32,
    /// A request header carrying the TLS JA4 fingerprint (set by Envoy's
    /// header_mutation filter from `%TLS_JA4_FINGERPRINT%`): part of the device.
    pub ja4_header: Option<String>,
}

impl Default for LoginProfileConfig {
    fn default() -> Self {
        LoginProfileConfig {
            enabled: true,
            min_travel_s: 3600,
            failures_elsewhere_min: 3,
            medium_at: 2,
            high_at: 4,
            actions: BTreeMap::new(),
            block_when: Vec::new(),
            weight: 100.0,
            ja4_header: None,
        }
    }
}

pub const MAX_BLOCK_WHEN: usize = 16;

impl LoginProfileConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_range("account_takeover.profile.min_travel_s", self.min_travel_s, 1, 86_400 * 7)?;
        check_range(
            "account_takeover.profile.failures_elsewhere_min",
            self.failures_elsewhere_min,
            1,
            100_000,
        )?;
        check_range("account_takeover.profile.medium_at", self.medium_at, 1, 100)?;
        check_range("account_takeover.profile.high_at", self.high_at, self.medium_at, 100)?;
        check_finite_range("account_takeover.profile.weight", self.weight, 0.0, 10_000.0)?;
        for (name, action) in &self.actions {
            let key = format!("account_takeover.profile.actions.{name}");
            if ProfileReason::from_name(name).is_none() {
                return Err(err(&key, format!("unknown reason; one of {}", reason_names())));
            }
            if *action == DetectorAction::Shed {
                return Err(err(&key, "one of tag, block, monitor"));
            }
        }
        if self.block_when.len() > MAX_BLOCK_WHEN {
            return Err(err("account_takeover.profile.block_when", format!("at most {MAX_BLOCK_WHEN} combinations")));
        }
        for (i, combo) in self.block_when.iter().enumerate() {
            if combo.is_empty() || combo.len() > REASONS.len() {
                return Err(err(format!("account_takeover.profile.block_when[{i}]"), "1 to 6 reasons"));
            }
            for (j, name) in combo.iter().enumerate() {
                if ProfileReason::from_name(name).is_none() {
                    return Err(err(
                        format!("account_takeover.profile.block_when[{i}][{j}]"),
                        format!("unknown reason; one of {}", reason_names()),
                    ));
                }
            }
        }
        if let Some(h) = &self.ja4_header {
            check_header_name("account_takeover.profile.ja4_header", h)?;
        }
        Ok(())
    }
}

fn reason_names() -> String {
    REASONS.iter().map(|(_, n, _)| *n).collect::<Vec<_>>().join(", ")
}

/// A login's risk against its account's profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProfileRisk {
    reasons: u8,
    /// Reasons set to `monitor`: counted, not told, no points.
    monitored: u8,
    pub score: u32,
    pub level: Level,
    /// The operator's rules refuse this login.
    pub refuse: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Level {
    #[default]
    Low,
    Medium,
    High,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Low => "low",
            Level::Medium => "medium",
            Level::High => "high",
        }
    }
}

impl ProfileRisk {
    pub fn has(&self, reason: ProfileReason) -> bool {
        (self.reasons | self.monitored) & reason.bit() != 0
    }

    /// Every reason found (told or only counted), in the header's order.
    pub fn all_names(&self) -> impl Iterator<Item = &'static str> + '_ {
        REASONS.iter().filter(|(r, _, _)| self.has(*r)).map(|(_, n, _)| *n)
    }

    /// The reasons told to the application.
    pub fn told_names(&self) -> impl Iterator<Item = &'static str> + '_ {
        REASONS.iter().filter(|(r, _, _)| self.reasons & r.bit() != 0).map(|(_, n, _)| *n)
    }

    pub fn is_empty(&self) -> bool {
        self.reasons | self.monitored == 0
    }
}

#[derive(Debug, Clone)]
pub struct LoginProfile {
    config: LoginProfileConfig,
    /// Reasons whose action is `monitor`, and `block`, as bits.
    monitor: u8,
    block: u8,
    block_when: Vec<u8>,
    window_ms: u64,
}

impl LoginProfile {
    /// `window_s`: the stuffing window, over which the account's failures count.
    pub fn new(config: &LoginProfileConfig, window_s: u32) -> Option<LoginProfile> {
        let bits = |action: DetectorAction| {
            config
                .actions
                .iter()
                .filter(|(_, a)| **a == action)
                .filter_map(|(n, _)| ProfileReason::from_name(n))
                .fold(0u8, |b, r| b | r.bit())
        };
        config.enabled.then(|| LoginProfile {
            monitor: bits(DetectorAction::Monitor),
            block: bits(DetectorAction::Block),
            block_when: config
                .block_when
                .iter()
                .map(|c| c.iter().filter_map(|n| ProfileReason::from_name(n)).fold(0u8, |b, r| b | r.bit()))
                .collect(),
            config: config.clone(),
            window_ms: u64::from(window_s).saturating_mul(1000),
        })
    }

    pub fn weight(&self) -> f32 {
        self.config.weight
    }

    pub fn ja4_header(&self) -> Option<&str> {
        self.config.ja4_header.as_deref()
    }

    /// The login's risk if it succeeds. `account`: its record (None: never
    /// seen); `client_key`: the client trying.
    pub fn assess(
        &self,
        account: Option<&AccountRecord>,
        place: &LoginPlace,
        anonymous: bool,
        client_key: u64,
        now_ms: u64,
    ) -> ProfileRisk {
        let mut found = 0u8;
        let mut set = |on: bool, r: ProfileReason| {
            if on {
                found |= r.bit();
            }
        };
        set(anonymous, ProfileReason::AnonymousSource);
        if let Some(a) = account {
            let p = &a.profile;
            if p.is_known() {
                let new_country = place.country != 0 && !p.countries.is_empty() && !p.countries.contains(place.country);
                set(new_country, ProfileReason::NewCountry);
                set(
                    !new_country && place.asn != 0 && !p.asns.is_empty() && !p.asns.contains(place.asn),
                    ProfileReason::NewNetwork,
                );
                set(!p.devices.contains(place.device), ProfileReason::NewDevice);
                let since_ms = now_ms.saturating_sub(p.last_success_ms);
                set(
                    place.country != 0
                        && p.last_country != 0
                        && place.country != p.last_country
                        && since_ms < u64::from(self.config.min_travel_s).saturating_mul(1000),
                    ProfileReason::ImpossibleTravel,
                );
            }
            // Failures by others, recently: the failing-clients sketch
            // holds this client too when it failed itself.
            let failures = a.failures.estimate(now_ms, self.window_ms);
            let others = a.failing_clients.estimate_at(now_ms, self.window_ms)
                - if a.failing_clients.contains(client_key) { 1.0 } else { 0.0 };
            set(
                failures >= f64::from(self.config.failures_elsewhere_min) - 0.5 && others >= 0.5,
                ProfileReason::FailuresElsewhere,
            );
        }
        let monitored = found & self.monitor;
        let reasons = found & !self.monitor;
        let score = REASONS.iter().filter(|(r, _, _)| reasons & r.bit() != 0).map(|(_, _, p)| p).sum();
        let level = if score >= self.config.high_at {
            Level::High
        } else if score >= self.config.medium_at {
            Level::Medium
        } else {
            Level::Low
        };
        let refuse = found & self.block != 0 || self.block_when.iter().any(|c| *c != 0 && found & c == *c);
        ProfileRisk { reasons, monitored, score, level, refuse }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::profile::country_number;

    const GB: &str = "GB";
    const T0: u64 = 1_000_000_000;

    fn place(device: u32, country: &str, asn: u32) -> LoginPlace {
        LoginPlace { device, country: country_number(Some(country)), asn, network: 0 }
    }

    fn owner() -> AccountRecord {
        let mut a = AccountRecord::default();
        a.profile.learn(&place(7, GB, 5089), T0);
        a.profile.learn(&place(7, GB, 5089), T0 + 86_400_000);
        a
    }

    fn detector(config: LoginProfileConfig) -> LoginProfile {
        LoginProfile::new(&config, 600).unwrap()
    }

    fn names(r: &ProfileRisk) -> Vec<&'static str> {
        r.told_names().collect()
    }

    #[test]
    fn the_owner_at_home_is_low_and_a_new_phone_at_home_too() {
        let d = detector(LoginProfileConfig::default());
        let later = T0 + 2 * 86_400_000;
        let home = d.assess(Some(&owner()), &place(7, GB, 5089), false, 1, later);
        assert_eq!((home.level, home.score), (Level::Low, 0));
        assert!(home.is_empty());
        let phone = d.assess(Some(&owner()), &place(8, GB, 5089), false, 1, later);
        assert_eq!((phone.level, names(&phone)), (Level::Low, vec!["new_device"]));
        // On a mobile network: a new network too, still only medium (told, not stepped up).
        let mobile = d.assess(Some(&owner()), &place(8, GB, 25135), false, 1, later);
        assert_eq!((mobile.level, names(&mobile)), (Level::Medium, vec!["new_network", "new_device"]));
    }

    #[test]
    fn another_country_on_another_device_is_high() {
        let d = detector(LoginProfileConfig::default());
        let r = d.assess(Some(&owner()), &place(9, "CN", 4134), false, 1, T0 + 2 * 86_400_000);
        assert_eq!(names(&r), vec!["new_country", "new_device"], "a new country is not also a new network");
        assert_eq!((r.level, r.score), (Level::High, 4));
        assert!(!r.refuse, "tag by default");
        // Within an hour of the last success at home: impossible travel too.
        let fast = d.assess(Some(&owner()), &place(9, "CN", 4134), false, 1, T0 + 86_400_000 + 600_000);
        assert!(fast.has(ProfileReason::ImpossibleTravel) && fast.score == 6);
    }

    #[test]
    fn the_owners_trip_is_medium_and_is_learned() {
        let d = detector(LoginProfileConfig::default());
        let mut a = owner();
        let trip = T0 + 3 * 86_400_000;
        let r = d.assess(Some(&a), &place(7, "SE", 3301), false, 1, trip);
        assert_eq!((r.level, names(&r)), (Level::Medium, vec!["new_country"]));
        a.profile.learn(&place(7, "SE", 3301), trip);
        let again = d.assess(Some(&a), &place(7, "SE", 3301), false, 1, trip + 86_400_000);
        assert_eq!(again.level, Level::Low);
        // Home again a day later is not impossible travel.
        let home = d.assess(Some(&a), &place(7, GB, 5089), false, 1, trip + 2 * 86_400_000);
        assert_eq!(home.level, Level::Low);
    }

    #[test]
    fn a_new_account_is_not_risky_for_lacking_a_profile() {
        let d = detector(LoginProfileConfig::default());
        let r = d.assess(None, &place(9, "CN", 4134), false, 1, T0);
        assert!(r.is_empty() && r.level == Level::Low);
        let r = d.assess(Some(&AccountRecord::default()), &place(9, "CN", 4134), false, 1, T0);
        assert!(r.is_empty());
        // Only what the source itself shows.
        let vpn = d.assess(None, &place(9, "CN", 4134), true, 1, T0);
        assert_eq!((vpn.level, names(&vpn)), (Level::Medium, vec!["anonymous_source"]));
    }

    #[test]
    fn failures_by_others_count_but_a_users_own_typos_do_not() {
        let d = detector(LoginProfileConfig::default());
        let mut a = owner();
        let t = T0 + 2 * 86_400_000;
        for i in 0..3 {
            // What the login detector records for a failure (client 1's).
            a.failures.record(t + i, 600_000);
            a.failing_clients.insert(1, t + i, 600_000);
        }
        let own = d.assess(Some(&a), &place(7, GB, 5089), false, 1, t + 10);
        assert!(!own.has(ProfileReason::FailuresElsewhere), "the owner's own typos");
        let other = d.assess(Some(&a), &place(7, GB, 5089), false, 2, t + 10);
        assert_eq!(names(&other), vec!["failures_elsewhere"]);
        assert_eq!(other.level, Level::Medium);
    }

    #[test]
    fn actions_per_reason_and_combinations() {
        let config = LoginProfileConfig {
            actions: [("new_device".to_string(), DetectorAction::Monitor)].into_iter().collect(),
            block_when: vec![vec!["new_country".into(), "new_device".into(), "anonymous_source".into()]],
            ..LoginProfileConfig::default()
        };
        let d = detector(config);
        let later = T0 + 2 * 86_400_000;
        let r = d.assess(Some(&owner()), &place(9, "CN", 0), false, 1, later);
        assert!(!r.refuse, "not the whole combination");
        assert_eq!(names(&r), vec!["new_country"], "monitored reasons are not told");
        assert_eq!(r.all_names().collect::<Vec<_>>(), vec!["new_country", "new_device"]);
        assert_eq!(r.score, 3);
        let all = d.assess(Some(&owner()), &place(9, "CN", 0), true, 1, later);
        assert!(all.refuse, "new country, new device and an anonymous network");
        // The owner on holiday behind a VPN with their own phone is not refused.
        let holiday = d.assess(Some(&owner()), &place(7, "SE", 0), true, 1, later);
        assert!(!holiday.refuse);
        let block_country = LoginProfileConfig {
            actions: [("new_country".to_string(), DetectorAction::Block)].into_iter().collect(),
            ..LoginProfileConfig::default()
        };
        assert!(detector(block_country).assess(Some(&owner()), &place(7, "SE", 0), false, 1, later).refuse);
    }

    #[test]
    fn bad_config_names_its_key() {
        let bad = |c: LoginProfileConfig| c.validate().unwrap_err().key;
        let c = LoginProfileConfig { actions: [("new_planet".into(), DetectorAction::Tag)].into_iter().collect(), ..Default::default() };
        assert_eq!(bad(c), "account_takeover.profile.actions.new_planet");
        let c = LoginProfileConfig { block_when: vec![vec!["new_country".into(), "x".into()]], ..Default::default() };
        assert_eq!(bad(c), "account_takeover.profile.block_when[0][1]");
        let c = LoginProfileConfig { high_at: 1, medium_at: 2, ..Default::default() };
        assert_eq!(bad(c), "account_takeover.profile.high_at");
        let c = LoginProfileConfig { actions: [("new_device".into(), DetectorAction::Shed)].into_iter().collect(), ..Default::default() };
        assert_eq!(bad(c), "account_takeover.profile.actions.new_device");
        assert!(LoginProfileConfig::default().validate().is_ok());
    }
}
