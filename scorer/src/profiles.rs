//! The fleet's account profiles (where and on what each account's owner
//! logs in: `abuse_engine::profile`), merged from every Envoy's tick batches
//! and handed to a fresh Envoy in its warm start, most recent first.
//!
//! Bounded: at most [`PROFILES_CAP`] accounts here (and in Redis), the
//! longest stored going first; a fresh Envoy gets the
//! [`WARM_PROFILES`] most recent (its own table holds fewer).

use crate::bounded::BoundedMap;
use abuse_engine::profile::{AccountProfile, Seen, SeenSet};
use abuse_engine::wire::{ProfileUpdate, MAX_BATCH_PROFILES};

/// Accounts whose profile the scorer keeps.
pub const PROFILES_CAP: usize = 200_000;
/// Profiles a fresh Envoy warms from (pages of [`MAX_BATCH_PROFILES`]).
pub const WARM_PROFILES: usize = 8192;
/// New values one update may add to each set (devices, countries, ASNs,
/// networks) of a profile the fleet already knows: an owner's new phone
/// arrives one login at a time, while an update naming four new devices
/// would replace the owner's and make an attacker's look like the owner's.
pub const MAX_NEW_PER_SET: usize = 1;

/// Keeps at most [`MAX_NEW_PER_SET`] values of `update` that `kept` lacks
/// (the most recently seen); how many it dropped.
fn bound_new(kept: &SeenSet, update: &mut SeenSet) -> u64 {
    let SeenSet(slots) = update;
    let mut new: Vec<&mut Seen> = slots
        .iter_mut()
        .filter(|s| s.value != 0 && !kept.contains(s.value))
        .collect();
    new.sort_by_key(|s| std::cmp::Reverse(s.at_s));
    let mut dropped = 0;
    for s in new.into_iter().skip(MAX_NEW_PER_SET) {
        *s = Seen::default();
        dropped += 1;
    }
    dropped
}

/// Merges `update` into `kept` (`AccountProfile::merge`), bounded: into a
/// known profile at most [`MAX_NEW_PER_SET`] new values per set. The
/// number of values dropped.
pub fn merge_bounded(kept: &mut AccountProfile, update: &AccountProfile) -> u64 {
    let mut update = *update;
    let mut dropped = 0;
    if kept.is_known() {
        dropped += bound_new(&kept.devices, &mut update.devices);
        dropped += bound_new(&kept.countries, &mut update.countries);
        dropped += bound_new(&kept.asns, &mut update.asns);
        dropped += bound_new(&kept.networks, &mut update.networks);
    }
    kept.merge(&update);
    dropped
}

pub struct Profiles {
    map: BoundedMap<u64, AccountProfile>,
}

impl Default for Profiles {
    fn default() -> Self {
        Profiles::with_cap(PROFILES_CAP)
    }
}

impl Profiles {
    pub fn with_cap(cap: usize) -> Profiles {
        // No second chances by age: the oldest merged goes first.
        Profiles { map: BoundedMap::new(cap, 0) }
    }

    /// Merges one Envoy's view of an account ([`merge_bounded`]); whether
    /// anything changed, and how many new values were dropped.
    pub fn merge(&mut self, update: &ProfileUpdate, now_ms: u64) -> (bool, u64) {
        let p = self.map.entry_or_insert_with(update.account, now_ms, AccountProfile::default);
        let before = *p;
        let dropped = merge_bounded(p, &update.profile);
        (*p != before, dropped)
    }

    /// Every profile, most recent success first.
    pub fn all(&self) -> Vec<ProfileUpdate> {
        let mut all: Vec<ProfileUpdate> =
            self.map.values().map(|(account, profile)| ProfileUpdate { account: *account, profile: *profile }).collect();
        all.sort_by(|a, b| b.profile.last_success_ms.cmp(&a.profile.last_success_ms).then(a.account.cmp(&b.account)));
        all
    }

    /// Page `k` of the most recent profiles, and whether another follows.
    pub fn page(&self, k: usize) -> (Vec<ProfileUpdate>, bool) {
        page_of(self.all(), k)
    }
}

/// Page `k` (of [`MAX_BATCH_PROFILES`]) of a most-recent-first list, within
/// the [`WARM_PROFILES`] a fresh Envoy gets; and whether another follows.
pub fn page_of(all: Vec<ProfileUpdate>, k: usize) -> (Vec<ProfileUpdate>, bool) {
    let shown = all.len().min(WARM_PROFILES);
    let start = k.saturating_mul(MAX_BATCH_PROFILES).min(shown);
    let end = start.saturating_add(MAX_BATCH_PROFILES).min(shown);
    let page = all.get(start..end).map(<[ProfileUpdate]>::to_vec).unwrap_or_default();
    (page, end < shown)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use abuse_engine::profile::LoginPlace;

    fn update(account: u64, device: u32, at_ms: u64) -> ProfileUpdate {
        let mut profile = AccountProfile::default();
        profile.learn(&LoginPlace { device, country: 17735, asn: 0, network: 0 }, at_ms);
        ProfileUpdate { account, profile }
    }

    #[test]
    fn two_envoys_views_merge_into_one() {
        let mut p = Profiles::default();
        assert_eq!(p.merge(&update(1, 7, 1_000), 1), (true, 0));
        assert_eq!(p.merge(&update(1, 8, 2_000), 2), (true, 0));
        assert_eq!(p.merge(&update(1, 8, 2_000), 3), (false, 0), "nothing new");
        let all = p.all();
        assert_eq!(all.len(), 1);
        assert!(all[0].profile.devices.contains(7) && all[0].profile.devices.contains(8));
    }

    #[test]
    fn an_update_adds_one_new_device_at_a_time() {
        let mut p = Profiles::default();
        p.merge(&update(1, 7, 1_000_000), 1);
        // Four made-up devices, all "seen" after the owner's.
        let mut forged = AccountProfile::default();
        for d in [100, 101, 102, 103] {
            forged.learn(&LoginPlace { device: d, country: 17735, asn: 0, network: 0 }, 2_000_000 + u64::from(d) * 1000);
        }
        assert_eq!(p.merge(&ProfileUpdate { account: 1, profile: forged }, 2), (true, 3));
        let kept = p.all()[0].profile;
        assert!(kept.devices.contains(7), "the owner's device stays");
        assert!(kept.devices.contains(103) && !kept.devices.contains(100), "only the latest new one");
        // A brand-new profile takes the whole update.
        assert_eq!(p.merge(&ProfileUpdate { account: 2, profile: forged }, 3), (true, 0));
    }

    #[test]
    fn bounded_and_paged_most_recent_first() {
        let mut p = Profiles::with_cap(300);
        for a in 0..1_000u64 {
            p.merge(&update(a, 7, a * 1_000), a);
        }
        let all = p.all();
        assert_eq!(all.len(), 300, "the cap holds");
        assert_eq!(all[0].account, 999);
        let (first, more) = p.page(0);
        assert_eq!((first.len(), more), (MAX_BATCH_PROFILES, true));
        assert_eq!(first[0].account, 999);
        let (last, more) = p.page(2);
        assert_eq!((last.len(), more), (300 - 2 * MAX_BATCH_PROFILES, false));
        assert!(p.page(9).0.is_empty());
    }
}
