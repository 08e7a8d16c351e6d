//! The login-risk header (`x-abuse-login-risk`): what the filter tells the
//! application about a login, so that it can ask for a second factor.
//!
//! `high; score=4; reasons=new_country,new_device` — the level (`low`,
//! `medium`, `high`), the points, and the reasons: distributed stuffing's
//! evidence about the attempt (see `detectors::distributed_stuffing`) and
//! the account profile's (see `detectors::login_profile`). The level is the
//! higher of the two; the header is sent only above `low`.

use crate::detectors::distributed_stuffing::AttemptSignals;
use crate::detectors::login_profile::{Level, ProfileRisk};

/// The header's value, or None when the login is `low` on both counts.
/// `attempt`: the attempt's signals and the detector's `refuse_at`.
pub fn header(attempt: Option<(AttemptSignals, u32)>, profile: Option<&ProfileRisk>) -> Option<String> {
    let attempt_level = attempt.map_or(Level::Low, |(a, refuse_at)| match a.level(refuse_at) {
        "high" => Level::High,
        "medium" => Level::Medium,
        _ => Level::Low,
    });
    let profile_level = profile.map_or(Level::Low, |p| p.level);
    let level = attempt_level.max(profile_level);
    if level == Level::Low {
        return None;
    }
    let mut score = 0;
    let mut reasons: Vec<&str> = Vec::new();
    if let Some((a, _)) = attempt {
        score += a.score();
        reasons.extend(a.names());
    }
    if let Some(p) = profile {
        score += p.score;
        reasons.extend(p.told_names());
    }
    Some(format!("{}; score={score}; reasons={}", level.name(), reasons.join(",")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::account::AccountRecord;
    use crate::detectors::login_profile::{LoginProfile, LoginProfileConfig};
    use crate::profile::{country_number, LoginPlace};

    fn takeover() -> ProfileRisk {
        let mut owner = AccountRecord::default();
        owner.profile.learn(&LoginPlace { device: 7, country: country_number(Some("GB")), asn: 0, network: 0 }, 1_000);
        let d = LoginProfile::new(&LoginProfileConfig::default(), 600).unwrap();
        d.assess(Some(&owner), &LoginPlace { device: 9, country: country_number(Some("CN")), asn: 0, network: 0 }, false, 1, 90_000_000)
    }

    #[test]
    fn nothing_to_say_sends_nothing() {
        assert_eq!(header(None, None), None);
        assert_eq!(header(Some((AttemptSignals::default(), 4)), Some(&ProfileRisk::default())), None);
    }

    #[test]
    fn a_takeover_is_high_with_its_reasons() {
        assert_eq!(header(None, Some(&takeover())).unwrap(), "high; score=4; reasons=new_country,new_device");
    }

    #[test]
    fn both_detectors_speak_in_one_header() {
        let a = AttemptSignals { under_attack: true, new_client: true, ..AttemptSignals::default() };
        assert_eq!(
            header(Some((a, 4)), Some(&takeover())).unwrap(),
            "high; score=5; reasons=endpoint_under_attack,new_client,new_country,new_device"
        );
        assert_eq!(header(Some((a, 4)), None).unwrap(), "medium; score=1; reasons=endpoint_under_attack,new_client");
    }
}
