//! Fleet verdicts: one worker per Envoy process polls the scorer for the
//! clients the fleet blocked (a lease in shared data), and puts them into
//! this Envoy's penalty box.

use super::{Engine, FLEET_LEASE_KEY};
use crate::callout::reasons_from_names;
use crate::state::store::SharedStore;
use crate::wire::{FleetVerdicts, WIRE_VERSION};

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
    /// Envoy's penalty box. Returns how many were applied.
    pub fn apply_fleet_verdicts(&self, store: &dyn SharedStore, body: &[u8], now_ms: u64) -> usize {
        if body.len() > crate::wire::MAX_FLEET_BYTES {
            return 0;
        }
        let Ok(fleet) = serde_json::from_slice::<FleetVerdicts>(body) else {
            return 0;
        };
        if fleet.version != WIRE_VERSION {
            return 0;
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
            let done = self.clients.update(store, key, now_ms, |r| {
                if r.penalty_until_ms >= until {
                    return ((), false);
                }
                r.penalty_until_ms = until;
                r.penalty_reasons = if reasons.is_empty() { r.recent_reasons } else { reasons };
                ((), true)
            });
            if done.is_ok() {
                applied += 1;
            }
        }
        // Remember where we are, for whichever worker polls next.
        for _ in 0..8 {
            let Ok((value, cas)) = store.get(FLEET_LEASE_KEY) else { break };
            let (lease_until, _) = decode_lease(value.as_deref());
            if store.set(FLEET_LEASE_KEY, &encode_lease(lease_until, fleet.next), cas).is_ok() {
                break;
            }
        }
        applied
    }
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
