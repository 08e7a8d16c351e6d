//! Stage 3 (**count**), route groups: each worker counts its requests per
//! route group and merges them into the shared group record on the tick (or
//! at once during a burst), for spike detection.

use super::{Engine, DOMAIN_ROUTE};
use crate::detectors::spike::{GroupState, Spikes};
use crate::state::store::SharedStore;

/// Per-VM view of the route groups between ticks (spike detection).
#[derive(Debug, Default)]
pub(super) struct RouteCounters {
    /// Requests per group since the last tick.
    pub(super) pending: Vec<u32>,
    /// Each group's state as of the last tick.
    pub(super) state: Vec<GroupState>,
}

impl Engine {
    /// Counts the request for its route groups (per VM, no host call);
    /// returns the state of a matching group that is spiking, if any. A
    /// group whose count on this worker jumped past its early-merge
    /// threshold is merged at once (a burst shorter than a tick).
    pub(super) fn count_route_groups(&self, store: &dyn SharedStore, routes: crate::routes::RouteMatch, now_ms: u64) -> Option<GroupState> {
        let spikes = self.spikes.as_ref()?;
        // Allocates only when a merge is due (rare: during bursts).
        let mut due: Vec<(usize, u32)> = Vec::new();
        let mut spiking = None;
        {
            let mut counters = self.route_counters.lock().ok()?;
            let RouteCounters { pending, state } = &mut *counters;
            for (i, (count, group)) in pending.iter_mut().zip(state.iter()).enumerate() {
                if routes.contains(i) {
                    *count = count.saturating_add(1);
                    if *count >= spikes.early_merge_at(group) {
                        due.push((i, std::mem::take(count)));
                    } else if group.spiking && spiking.is_none() {
                        spiking = Some(*group);
                    }
                }
            }
        }
        for (i, added) in due {
            let merged = self.merge_group(store, spikes, i, added, now_ms);
            if let Some(state) = merged {
                if let Ok(mut c) = self.route_counters.lock() {
                    if let Some(slot) = c.state.get_mut(i) {
                        *slot = state;
                    }
                }
                if state.spiking && spiking.is_none() {
                    spiking = Some(state);
                }
            } else if let Ok(mut c) = self.route_counters.lock() {
                // Not merged: keep the counts for the tick.
                if let Some(count) = c.pending.get_mut(i) {
                    *count = count.saturating_add(added);
                }
            }
        }
        spiking
    }

    /// Adds a worker's count for one group to its shared record and judges it.
    pub(super) fn merge_group(&self, store: &dyn SharedStore, spikes: &Spikes, group: usize, added: u32, now_ms: u64) -> Option<GroupState> {
        let name = &self.config.route_groups.get(group)?.name;
        let key = self.hasher.key(DOMAIN_ROUTE, name.as_bytes());
        self.group_table
            .update(store, key, now_ms, |g| (spikes.on_tick(g, added, now_ms), true))
            .ok()
            .map(|(state, _)| state)
    }
}
