//! The per-client risk score: detectors add to it, time takes it away.
//!
//! `risk(t) = risk(t0) * 2^(-(t - t0) / half_life)`: a client that stops
//! misbehaving loses half its risk every half-life, so one bad minute is not
//! held against a client forever, while repeated signals accumulate.

/// Highest risk stored; keeps the f32 meaningful under endless signals.
pub const MAX_RISK: f32 = 1_000_000.0;

pub fn decayed(risk: f32, since_ms: u64, now_ms: u64, half_life_ms: u64) -> f32 {
    if !risk.is_finite() || risk <= 0.0 {
        return 0.0;
    }
    let elapsed = now_ms.saturating_sub(since_ms) as f64;
    let half_lives = elapsed / half_life_ms.max(1) as f64;
    let value = f64::from(risk) * (-half_lives).exp2();
    // Below a hundredth nothing is left worth remembering.
    if value < 0.01 {
        0.0
    } else {
        value as f32
    }
}

pub fn add(risk: f32, signal: f32) -> f32 {
    let sum = risk + signal.max(0.0);
    if sum.is_finite() {
        sum.min(MAX_RISK)
    } else {
        MAX_RISK
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn halves_every_half_life() {
        assert_eq!(decayed(100.0, 0, 60_000, 60_000), 50.0);
        assert_eq!(decayed(100.0, 0, 120_000, 60_000), 25.0);
        assert_eq!(decayed(100.0, 50, 50, 60_000), 100.0);
        assert_eq!(decayed(100.0, 0, 60_000 * 40, 60_000), 0.0);
        // A clock going backwards does not increase risk.
        assert_eq!(decayed(100.0, 1000, 0, 60_000), 100.0);
    }

    #[test]
    fn adding_saturates() {
        assert_eq!(add(MAX_RISK, 1e30), MAX_RISK);
        assert_eq!(add(1.0, -5.0), 1.0);
        assert_eq!(add(1.0, f32::INFINITY), MAX_RISK);
    }

    proptest! {
        #[test]
        fn decay_is_monotone(risk in 0f32..1e6, a in 0u64..1_000_000, b in 0u64..1_000_000) {
            let (early, late) = (a.min(b), a.max(b));
            prop_assert!(decayed(risk, 0, late, 10_000) <= decayed(risk, 0, early, 10_000));
            prop_assert!(decayed(risk, 0, early, 10_000) <= risk);
        }
    }
}
