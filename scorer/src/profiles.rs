//! The fleet's account profiles (where and on what each account's owner
//! logs in: `abuse_engine::profile`), merged from every Envoy's tick batches
//! and handed to a fresh Envoy in its warm start, most recent first.
//!
//! Bounded: at most [`PROFILES_CAP`] accounts here (and in Redis), the
//! longest stored going first; a fresh Envoy gets the
//! [`WARM_PROFILES`] most recent (its own table holds fewer).

use crate::bounded::BoundedMap;
use abuse_engine::profile::AccountProfile;
use abuse_engine::wire::{ProfileUpdate, MAX_BATCH_PROFILES};

/// Accounts whose profile the scorer keeps.
pub const PROFILES_CAP: usize = 200_000;
/// Profiles a fresh Envoy warms from (pages of [`MAX_BATCH_PROFILES`]).
pub const WARM_PROFILES: usize = 8192;

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

    /// Merges one Envoy's view of an account; whether anything changed.
    pub fn merge(&mut self, update: &ProfileUpdate, now_ms: u64) -> bool {
        let p = self.map.entry_or_insert_with(update.account, now_ms, AccountProfile::default);
        let before = *p;
        p.merge(&update.profile);
        *p != before
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
        assert!(p.merge(&update(1, 7, 1_000), 1));
        assert!(p.merge(&update(1, 8, 2_000), 2));
        assert!(!p.merge(&update(1, 8, 2_000), 3), "nothing new");
        let all = p.all();
        assert_eq!(all.len(), 1);
        assert!(all[0].profile.devices.contains(7) && all[0].profile.devices.contains(8));
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
