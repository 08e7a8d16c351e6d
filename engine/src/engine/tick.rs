//! The tick, [`Engine::on_tick`]: what each worker does periodically —
//! merges its client views and route-group counts into shared data — and
//! what the host reports on it (baselines still learning, attacks).

use super::{Engine};
use crate::detectors::spike::GroupState;
use crate::endpoint::EndpointRecord;
use crate::state::store::SharedStore;

impl Engine {
    /// Periodic work of each VM: hands its route-group counts to the shared
    /// records and learns whether a group is spiking. Call it on every tick.
    pub fn on_tick(&self, store: &dyn SharedStore, now_ms: u64) {
        // What this worker counted on its own views goes to shared data.
        let _ = self.clients.on_tick(store, now_ms);
        if self.callouts.as_ref().is_some_and(|c| c.config.fleet_verdicts) {
            self.refresh_operator_allows(store);
        }
        let Some(spikes) = &self.spikes else {
            return;
        };
        let pending: Vec<u32> = match self.route_counters.lock() {
            Ok(mut c) => c.pending.iter_mut().map(std::mem::take).collect(),
            Err(_) => return,
        };
        let states: Vec<Option<GroupState>> = pending
            .into_iter()
            .enumerate()
            .map(|(group, added)| self.merge_group(store, spikes, group, added, now_ms))
            .collect();
        if let Ok(mut c) = self.route_counters.lock() {
            for (slot, state) in c.state.iter_mut().zip(states) {
                if let Some(state) = state {
                    *slot = state;
                }
            }
        }
    }

    /// Whether a login endpoint is under a recognised distributed attack
    /// (its shared record: every worker sees the same).
    pub fn login_under_attack(&self, store: &dyn SharedStore, now_ms: u64) -> bool {
        self.login_endpoints(store).iter().any(|e| e.as_ref().is_some_and(|e| e.under_attack(now_ms)))
    }

    /// The login endpoints' shared records (None: none yet).
    pub(super) fn login_endpoints(&self, store: &dyn SharedStore) -> Vec<Option<EndpointRecord>> {
        match (&self.login, &self.distributed) {
            (Some(login), Some(_)) => (0..login.paths().count())
                .map(|route| self.endpoints.peek(store, self.endpoint_key(route)).ok().flatten())
                .collect(),
            _ => Vec::new(),
        }
    }

    /// How many learned baselines are still learning (route groups for
    /// spikes, as this worker last saw them; login endpoints, from their
    /// shared records): nothing is judged against them yet. Call it on the tick.
    pub fn baselines_learning(&self, store: &dyn SharedStore) -> u32 {
        let login = match &self.distributed {
            Some(d) => self.login_endpoints(store).iter().filter(|e| e.as_ref().is_none_or(|e| d.learning(e))).count() as u32,
            None => 0,
        };
        if self.spikes.is_none() {
            return login;
        }
        let groups = self
            .route_counters
            .lock()
            .map(|c| c.state.iter().filter(|g| !g.warm).count() as u32)
            .unwrap_or(0);
        login.saturating_add(groups)
    }
}
