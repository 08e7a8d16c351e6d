//! Fleet verdicts: one worker per Envoy process polls the scorer for the
//! clients the fleet blocked (a lease in shared data), and puts them into
//! this Envoy's penalty box. The same answer carries the operator's lifts
//! (out of the box, with a quiet period) and allow entries (see
//! `operator_allow.rs`), so an undo reaches every Envoy within a poll.

use super::{Engine, FLEET_LEASE_KEY};
use crate::callout::reasons_from_names;
use crate::state::store::SharedStore;
use crate::wire::{FleetLift, FleetVerdicts, WIRE_VERSION};

impl Engine {
    /// Claims this process's fleet-verdict poll when due (a lease in shared
    /// data: one worker per Envoy process polls); returns the cursor to poll from.
    pub fn claim_fleet_poll(&self, store: &dyn SharedStore, now_ms: u64) -> Option<u64> {
        let callouts = self.callouts.as_ref().filter(|c| c.config.fleet_verdicts)?;
        let (value, cas) = store.get(FLEET_LEASE_KEY).ok()?;
        let (lease_until, cursor) = decode_lease(value.as_deref());
        if lease_until > now_ms {
            return None;
        }
        let period = u64::from(callouts.config.fleet_poll_s).saturating_mul(1000);
        let lease = encode_lease(now_ms.saturating_add(period), cursor);
        store.set(FLEET_LEASE_KEY, &lease, cas).ok()?;
        Some(cursor)
    }

    /// Applies the fleet's verdicts: each blocked client goes into this
    /// Envoy's penalty box; then the operator's lifts and allow entries.
    pub fn apply_fleet_verdicts(&self, store: &dyn SharedStore, body: &[u8], now_ms: u64) -> FleetApplied {
        let mut done = FleetApplied::default();
        if body.len() > crate::wire::MAX_FLEET_BYTES {
            return done;
        }
        let Ok(fleet) = serde_json::from_slice::<FleetVerdicts>(body) else {
            return done;
        };
        if fleet.version != WIRE_VERSION {
            return done;
        }
        let mut applied = 0;
        for v in fleet.verdicts.iter().take(crate::wire::MAX_FLEET_VERDICTS) {
            if v.until_ms <= now_ms {
                continue;
            }
            let Some(key) = self.key_of_label(&v.client) else {
                continue;
            };
            let reasons = reasons_from_names(&v.reasons);
            let until = v.until_ms.min(now_ms.saturating_add(86_400_000));
            self.begin_phase();
            let done = self.clients.update(store, key, now_ms, |r| {
                if r.penalty_until_ms >= until {
                    return ((), false);
                }
                if r.quiet_until_ms > now_ms {
                    // Lifted by an operator lately: the fleet's verdict is
                    // older evidence (the scorer dropped it with the lift).
                    return ((), false);
                }
                r.penalty_until_ms = until;
                r.penalty_reasons = if reasons.is_empty() { r.recent_reasons } else { reasons };
                r.decision = self.mint_decision();
                ((), true)
            });
            if done.is_ok() {
                applied += 1;
            }
        }
        done.verdicts = applied;
        done.lifts = self.apply_lifts(store, &fleet.lifts, now_ms);
        self.store_operator_allows(store, &fleet.allows, now_ms);
        // Remember where we are, for whichever worker polls next.
        for _ in 0..8 {
            let Ok((value, cas)) = store.get(FLEET_LEASE_KEY) else { break };
            let (lease_until, _) = decode_lease(value.as_deref());
            if store.set(FLEET_LEASE_KEY, &encode_lease(lease_until, fleet.next), cas).is_ok() {
                break;
            }
        }
        done
    }

    /// The operator's lifts: each client out of the penalty box, its risk
    /// and any cached scorer verdict forgotten, and for its quiet period the
    /// lifted reasons cannot box it again. Returns how many were applied.
    fn apply_lifts(&self, store: &dyn SharedStore, lifts: &[FleetLift], now_ms: u64) -> usize {
        let mut applied = 0;
        for lift in lifts.iter().take(crate::wire::MAX_FLEET_LIFTS) {
            let Some(key) = self.key_of_label(&lift.client) else {
                continue;
            };
            let quiet_until = lift.quiet_until_ms.min(now_ms.saturating_add(7 * 86_400_000));
            let reasons = reasons_from_names(&lift.reasons);
            if self.clients.update(store, key, now_ms, |r| ((), { r.lift(now_ms, quiet_until, reasons); true })).is_ok() {
                applied += 1;
            }
            let _ = self.verdict_table.update(store, key, now_ms, |v| {
                v.valid_until_ms = 0;
                ((), true)
            });
        }
        applied
    }
}

/// What one fleet answer changed here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FleetApplied {
    pub verdicts: usize,
    pub lifts: usize,
}

fn decode_lease(value: Option<&[u8]>) -> (u64, u64) {
    let mut r = crate::codec::Reader::new(value.unwrap_or(&[]));
    (r.u64(), r.u64())
}

fn encode_lease(until_ms: u64, cursor: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut w = crate::codec::Writer::new(&mut out);
    w.u64(until_ms);
    w.u64(cursor);
    out
}
