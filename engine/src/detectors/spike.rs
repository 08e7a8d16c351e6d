//! Volumetric spikes per endpoint: a sudden rise of one route group's
//! request rate over its own moving baseline, attributed to the clients that
//! cause it.
//!
//! Counting is cheap on purpose: requests only bump per-VM counters; each
//! VM's tick (twice a second) adds them to the group's shared record, a
//! sliding window of `window_s`. The group's rate `r` (requests/s over the
//! window) is compared with its baseline `b`: a spike while
//! `r > factor · b` and `r > min_rps`, held for `hold_s`. Outside spikes `b`
//! follows `r` as an exponential average in time (τ = [`BASELINE_TAU_MS`],
//! ten minutes). Warm-up: the first [`WARM_UP`] ticks only fill the window,
//! the next [`WARM_UP`] take a plain running mean; nothing is judged before. During a spike, a client whose own requests in
//! the window are at least `client_share` of the group's (and at least
//! `min_client_requests`) is charged `endpoint_spike`: the few clients that
//! make a spike, not everyone who happens to call the endpoint then.
//!
//! Bursts shorter than a tick. A worker whose own count for a group since
//! its last merge reaches [`Spikes::early_merge_at`] — a quarter of what the
//! whole group may do in a window before it is a spike, and at least
//! [`EARLY_MERGE_MIN`] — merges at once instead of waiting for the tick, and
//! so learns within the burst that the group is spiking. Normal traffic
//! brings a worker `baseline · T / N` requests per tick (T = 0.5 s), about
//! 1/50 of that threshold at the default `factor` and `window_s`, so the
//! extra shared-data write is paid only while a burst is on, once per
//! threshold's worth of requests. A spike is therefore recognised after at
//! most `max(EARLY_MERGE_MIN, R/4)` requests past the threshold `R` on one
//! worker, or at the next tick, whichever comes first.
//!
//! Scenario, in short:
//! - counts: requests per route group (per-worker counters merged on the tick) against the group's moving baseline; each client's recent requests;
//! - grouped by: route group; the client for attribution;
//! - over: sliding `spikes.window_s`, held `hold_s`;
//! - over the threshold: `endpoint_spike` (`weight`) for clients with `client_share` of a spiking group's requests.

use super::Signal;
use crate::endpoint::EndpointRecord;
use crate::reason::Reason;
use super::Figure;
use crate::record::ClientRecord;
use crate::validate::{check_finite_range, check_range, ConfigError};
use serde::Deserialize;

// ---- configuration (`spikes`) ----

/// Spikes of a route group's traffic over its own baseline (see `detectors::spike`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct SpikeConfig {
    pub enabled: bool,
    pub window_s: u32,
    /// A spike is a rate above `factor` x the baseline...
    pub factor: f32,
    /// ...and above this many requests per second.
    pub min_rps: f32,
    pub hold_s: u32,
    /// Share of the group's requests that makes a client a driver of the spike.
    pub client_share: f32,
    pub min_client_requests: u32,
    pub weight: f32,
}

impl Default for SpikeConfig {
    fn default() -> Self {
        SpikeConfig {
            enabled: true,
            window_s: 10,
            factor: 5.0,
            min_rps: 20.0,
            hold_s: 60,
            client_share: 0.1,
            min_client_requests: 50,
            weight: 100.0,
        }
    }
}

impl SpikeConfig {
    /// `spikes`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let sp = self;
        check_range("spikes.window_s", sp.window_s, 1, 3600)?;
        check_finite_range("spikes.factor", sp.factor, 1.0, 1000.0)?;
        check_finite_range("spikes.min_rps", sp.min_rps, 0.0, 10_000_000.0)?;
        check_range("spikes.hold_s", sp.hold_s, 1, 86_400)?;
        check_finite_range("spikes.client_share", sp.client_share, 0.0, 1.0)?;
        check_range("spikes.min_client_requests", sp.min_client_requests, 1, 10_000_000)?;
        check_finite_range("spikes.weight", sp.weight, 0.0, 10_000.0)?;
        Ok(())
    }
}


pub const BASELINE_TAU_MS: f64 = 600_000.0;
pub const WARM_UP: u32 = 20;
/// A warm-up sample is taken at most once per tick (500 ms; less a
/// margin for the jitter of tick timers), whichever worker merges.
pub const WARM_UP_SAMPLE_GAP_MS: u64 = 400;
/// A worker never merges early for fewer requests than this.
pub const EARLY_MERGE_MIN: u32 = 16;

#[derive(Debug, Clone)]
pub struct Spikes {
    config: SpikeConfig,
    window_ms: u64,
    hold_ms: u64,
}

/// What a VM knows about one group between ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GroupState {
    pub spiking: bool,
    /// The group's requests in the window, as of the last tick.
    pub window_requests: f64,
    /// The group's learned rate (requests/s), as of the last tick.
    pub baseline: f32,
    /// The baseline is learned (spikes can be judged).
    pub warm: bool,
}

impl Spikes {
    pub fn new(config: &SpikeConfig) -> Option<Spikes> {
        config.enabled.then(|| Spikes {
            config: config.clone(),
            window_ms: u64::from(config.window_s).saturating_mul(1000),
            hold_ms: u64::from(config.hold_s).saturating_mul(1000),
        })
    }

    pub fn window_ms(&self) -> u64 {
        self.window_ms
    }

    /// Adds a VM's counts to the group record and judges the rate.
    pub fn on_tick(&self, group: &mut EndpointRecord, added: u32, now_ms: u64) -> GroupState {
        let since_ms = now_ms.saturating_sub(group.last_seen_ms) as f64;
        let in_window = group.attempts.record_n(added, now_ms, self.window_ms);
        let rate = (in_window / (self.window_ms.max(1) as f64 / 1000.0)) as f32;
        let warm = group.baseline_samples >= 2 * WARM_UP;
        // Warm-up is counted in ticks of time, not in merges: every worker
        // merges on its own tick (one per proxy-wasm VM, one per process for
        // the dynamic module), so a merge within a tick of the group's last
        // warm-up sample adds its counts and takes no sample (else the
        // warm-up would last WARM_UP ticks divided by the number of merging
        // workers, and differ between builds).
        if !warm && group.last_seen_ms != 0 && since_ms < WARM_UP_SAMPLE_GAP_MS as f64 {
            return self.state_of(group, in_window, now_ms);
        }
        group.last_seen_ms = now_ms;
        let spike = warm && rate > group.baseline * self.config.factor && rate > self.config.min_rps;
        if spike {
            group.attack_until_ms = now_ms.saturating_add(self.hold_ms);
        } else if !group.under_attack(now_ms) {
            group.learn(rate, since_ms, BASELINE_TAU_MS, WARM_UP, WARM_UP);
        }
        self.state_of(group, in_window, now_ms)
    }

    fn state_of(&self, group: &EndpointRecord, in_window: f64, now_ms: u64) -> GroupState {
        GroupState {
            spiking: group.under_attack(now_ms),
            window_requests: in_window,
            baseline: group.baseline,
            warm: group.baseline_samples >= 2 * WARM_UP,
        }
    }

    /// How many requests a worker may count for a group between ticks
    /// before it merges at once (see the module doc): a quarter of the
    /// window's worth of requests at the spike threshold. Never while the
    /// baseline is still learning (nothing could be judged).
    pub fn early_merge_at(&self, group: &GroupState) -> u32 {
        if !group.warm {
            return u32::MAX;
        }
        let threshold_rps = (group.baseline * self.config.factor).max(self.config.min_rps);
        let window_requests = f64::from(threshold_rps) * (self.window_ms as f64 / 1000.0);
        let quarter = (window_requests / 4.0).ceil().clamp(0.0, f64::from(u32::MAX)) as u32;
        quarter.max(EARLY_MERGE_MIN)
    }

    /// Counts the client's request; charges it when it drives a spike.
    pub fn on_request(&self, client: &mut ClientRecord, group: Option<GroupState>, now_ms: u64) -> Signal {
        let mut signal = Signal::default();
        let own = client.recent_requests.record(now_ms, self.window_ms);
        if let Some(g) = group.filter(|g| g.spiking) {
            let share = f64::from(self.config.client_share) * g.window_requests;
            if own >= f64::from(self.config.min_client_requests) && own >= share {
                let figure = Figure::new("requests while the endpoint spikes", own, share.max(self.config.min_client_requests.into()), self.window_ms);
                signal.fire_with(Reason::EndpointSpike, self.config.weight, figure);
            }
        }
        signal
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn spikes() -> Spikes {
        Spikes::new(&SpikeConfig::default()).unwrap()
    }

    #[test]
    fn steady_traffic_never_spikes_and_a_surge_does() {
        let s = spikes();
        let mut g = EndpointRecord::default();
        let mut t = 1_000_000u64;
        // 30 requests/s, ticks every 500 ms, for five minutes.
        for _ in 0..600 {
            t += 500;
            assert!(!s.on_tick(&mut g, 15, t).spiking);
        }
        assert!((g.baseline - 30.0).abs() < 3.0, "{}", g.baseline);
        // Ten times that.
        let mut spiking_at = None;
        for i in 0..20 {
            t += 500;
            if s.on_tick(&mut g, 150, t).spiking && spiking_at.is_none() {
                spiking_at = Some(i);
            }
        }
        assert!(spiking_at.unwrap() < 10);
        assert!(g.baseline < 40.0, "the surge must not become normal: {}", g.baseline);
    }

    #[test]
    fn warm_up_lasts_the_same_ticks_however_many_workers_merge() {
        // Ticks every 500 ms; one merger (the dynamic module) or three (the
        // proxy-wasm VMs of two workers and the main thread, out of phase).
        let ticks_to_warm = |mergers: u64| {
            let s = spikes();
            let mut g = EndpointRecord::default();
            let mut t = 1_000_000u64;
            for tick in 1..=200 {
                t += 500;
                for m in 0..mergers {
                    if s.on_tick(&mut g, 5, t + m * 120).warm {
                        return tick;
                    }
                }
            }
            u32::MAX
        };
        assert_eq!(ticks_to_warm(1), 2 * WARM_UP);
        assert_eq!(ticks_to_warm(3), 2 * WARM_UP);
    }

    #[test]
    fn early_merge_only_far_past_the_normal_share() {
        let s = spikes();
        let learning = GroupState::default();
        assert_eq!(s.early_merge_at(&learning), u32::MAX, "nothing to judge while learning");
        // 30 requests/s learned: the spike threshold is 150/s over 10 s,
        // a quarter of which is 375 requests; a worker normally sees ~8 per tick.
        let warm = GroupState { warm: true, baseline: 30.0, ..GroupState::default() };
        assert_eq!(s.early_merge_at(&warm), 375);
        // A quiet group: min_rps (20/s over 10 s) sets the bar.
        let quiet = GroupState { warm: true, baseline: 0.5, ..GroupState::default() };
        assert_eq!(s.early_merge_at(&quiet), 50);
    }

    #[test]
    fn clients_are_charged_by_their_share() {
        let s = spikes();
        let state = Some(GroupState { spiking: true, window_requests: 1000.0, ..GroupState::default() });
        let mut heavy = ClientRecord::default();
        let mut fired = false;
        for i in 0..200 {
            fired |= !s.on_request(&mut heavy, state, 1000 + i).reasons.is_empty();
        }
        assert!(fired);
        let mut light = ClientRecord::default();
        for i in 0..20 {
            assert!(s.on_request(&mut light, state, 1000 + i).reasons.is_empty());
        }
        let calm = Some(GroupState { spiking: false, window_requests: 1000.0, ..GroupState::default() });
        assert!(s.on_request(&mut heavy, calm, 2000).reasons.is_empty());
    }
}
