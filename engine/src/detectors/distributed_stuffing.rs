//! Distributed credential stuffing: hundreds of rotating addresses, each
//! trying only 1–3 logins, stay under every per-client threshold. The login
//! endpoint as a whole does not: its failure ratio jumps far above the ratio
//! it normally has.
//!
//! Recognition. Over the last `window_s` the endpoint's failure ratio
//! `r = failures / attempts` (once `min_attempts` were made) is compared with
//! its learned baseline `b`: the endpoint is under attack while
//! `r > max(attack_factor · b, attack_min_ratio)`, and for `hold_s` after.
//! Outside attacks the baseline follows `r` as an exponentially weighted
//! mean in time, `b ← b + α (r − b)` with `α = 1 − e^(−Δt/τ)` (`Δt` since the
//! previous login, `τ` = [`BASELINE_TAU_MS`], one hour), starting from
//! `baseline_prior`; during the first [`WARM_UP`] logins `α = 1/n` so it
//! learns fast. A burst of seconds cannot drag it along, and an attack
//! never teaches it that failing is normal.
//!
//! Attribution. During an attack the risk goes to the clients that drive
//! it, not to everyone: a login attempt is refused when the client is new
//! (no successful login, at most `new_client_max_requests` requests so far)
//! AND its fingerprint (user agent + header-name order + ASN) has failed at
//! least `fingerprint_min_failures` times in the window with almost no
//! successes. A real user logging in meanwhile has a fingerprint with
//! successes or no failures, and any client with history is left alone.

use super::Signal;
use crate::config::DistributedStuffingConfig;
use crate::endpoint::{EndpointRecord, FingerprintRecord};
use crate::reason::Reason;
use crate::record::ClientRecord;

/// Time constant of the baseline's exponential average.
pub const BASELINE_TAU_MS: f64 = 3_600_000.0;
/// Logins during which the baseline is a plain running mean.
pub const WARM_UP: u32 = 50;

#[derive(Debug, Clone)]
pub struct DistributedStuffing {
    config: DistributedStuffingConfig,
    window_ms: u64,
    hold_ms: u64,
}

impl DistributedStuffing {
    pub fn new(config: &DistributedStuffingConfig) -> Option<DistributedStuffing> {
        config.enabled.then(|| DistributedStuffing {
            config: config.clone(),
            window_ms: u64::from(config.window_s).saturating_mul(1000),
            hold_ms: u64::from(config.hold_s).saturating_mul(1000),
        })
    }

    /// Records one login outcome on the endpoint and updates its state.
    pub fn on_outcome(&self, endpoint: &mut EndpointRecord, failed: bool, now_ms: u64) {
        let since_ms = now_ms.saturating_sub(endpoint.last_seen_ms) as f64;
        endpoint.last_seen_ms = now_ms;
        if endpoint.baseline_samples == 0 && endpoint.baseline == 0.0 {
            endpoint.baseline = self.config.baseline_prior;
        }
        let attempts = endpoint.attempts.record(now_ms, self.window_ms);
        let failures = if failed {
            endpoint.failures.record(now_ms, self.window_ms)
        } else {
            endpoint.failures.estimate(now_ms, self.window_ms)
        };
        if attempts < f64::from(self.config.min_attempts) {
            return;
        }
        let ratio = (failures / attempts.max(1.0)).clamp(0.0, 1.0) as f32;
        let threshold = (endpoint.baseline * self.config.attack_factor).max(self.config.attack_min_ratio);
        if ratio > threshold {
            endpoint.attack_until_ms = now_ms.saturating_add(self.hold_ms);
        } else if !endpoint.under_attack(now_ms) {
            endpoint.learn(ratio, since_ms, BASELINE_TAU_MS, 0, WARM_UP);
        }
    }

    pub fn on_fingerprint_outcome(&self, fp: &mut FingerprintRecord, failed: bool, now_ms: u64) {
        fp.last_seen_ms = now_ms;
        if failed {
            fp.failures.record(now_ms, self.window_ms);
        } else {
            fp.successes.record(now_ms, self.window_ms);
        }
    }

    /// Whether a fingerprint behaves like the attack tool.
    pub fn fingerprint_is_attacking(&self, fp: &FingerprintRecord, now_ms: u64) -> bool {
        let failures = fp.failures.estimate(now_ms, self.window_ms);
        let successes = fp.successes.estimate(now_ms, self.window_ms);
        failures >= f64::from(self.config.fingerprint_min_failures) && successes * 20.0 <= failures
    }

    /// A login attempt while the endpoint is under attack and the client's
    /// fingerprint is attacking: fires for new clients only.
    pub fn on_attempt(&self, client: &ClientRecord) -> Signal {
        let mut signal = Signal::default();
        let new_client = client.login_successes == 0 && client.requests <= self.config.new_client_max_requests;
        if new_client {
            signal.fire(Reason::CredentialStuffing, self.config.weight);
        }
        signal
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn detector() -> DistributedStuffing {
        DistributedStuffing::new(&DistributedStuffingConfig::default()).unwrap()
    }

    #[test]
    fn normal_traffic_teaches_the_baseline_and_never_alarms() {
        let d = detector();
        let mut e = EndpointRecord::default();
        // 15 % failures, steady.
        for i in 0..2000u64 {
            d.on_outcome(&mut e, i % 20 < 3, 1_000_000 + i * 100);
            assert!(!e.under_attack(1_000_000 + i * 100), "false alarm at {i}");
        }
        assert!((e.baseline - 0.15).abs() < 0.05, "{}", e.baseline);
    }

    #[test]
    fn a_burst_of_failures_is_an_attack_and_does_not_move_the_baseline() {
        let d = detector();
        let mut e = EndpointRecord::default();
        // Two logins a second, one in ten failing.
        for i in 0..500u64 {
            d.on_outcome(&mut e, i % 10 == 0, 1_000_000 + i * 500);
        }
        let learned = e.baseline;
        let t0 = 1_000_000 + 500 * 500;
        let mut recognised_at = None;
        for i in 0..300u64 {
            d.on_outcome(&mut e, true, t0 + i * 20);
            if recognised_at.is_none() && e.under_attack(t0 + i * 20) {
                recognised_at = Some(i);
            }
        }
        assert!(recognised_at.unwrap() < 200, "{recognised_at:?}");
        assert!((e.baseline - learned).abs() < 0.05);
    }

    #[test]
    fn fingerprints_and_new_clients() {
        let d = detector();
        let mut fp = FingerprintRecord::default();
        for i in 0..10 {
            d.on_fingerprint_outcome(&mut fp, true, 1000 + i);
        }
        assert!(d.fingerprint_is_attacking(&fp, 2000));
        let mut browser = FingerprintRecord::default();
        d.on_fingerprint_outcome(&mut browser, false, 1000);
        assert!(!d.fingerprint_is_attacking(&browser, 2000));

        let fresh = ClientRecord::default();
        assert!(d.on_attempt(&fresh).reasons.contains(Reason::CredentialStuffing));
        let regular = ClientRecord { login_successes: 1, ..ClientRecord::default() };
        assert!(d.on_attempt(&regular).reasons.is_empty());
    }
}
