//! The shared tables: created, and migrated when a configuration changes
//! their layout, at configuration time; their size in shared data.

use super::Engine;
use crate::state::layout::{migrate_client, Migration};
use crate::state::store::{ShardedTable, SharedStore};

/// What [`Engine::prepare_state`] did.
#[derive(Debug, Clone, Default)]
pub struct StateReport {
    /// Shards created or rewritten.
    pub created: usize,
    /// Tables whose layout this configuration changed, and what was carried over.
    pub migrations: Vec<Migration>,
}

impl StateReport {
    /// The one log line of a layout change (None: nothing changed).
    pub fn summary(&self) -> Option<String> {
        (!self.migrations.is_empty())
            .then(|| self.migrations.iter().map(Migration::summary).collect::<Vec<_>>().join("; "))
    }
}

impl Engine {
    /// Creates every shard key (at configuration time).
    pub fn create_state(&self, store: &dyn SharedStore) -> Result<usize, crate::state::store::StoreError> {
        Ok(self.prepare_state(store, 0)?.created)
    }

    /// Creates every shard key and, when this configuration changes a
    /// table's layout, carries its records over (see [`crate::state::layout`]):
    /// at configuration time, with the host's clock.
    pub fn prepare_state(&self, store: &dyn SharedStore, now_ms: u64) -> Result<StateReport, crate::state::store::StoreError> {
        let mut report = StateReport::default();
        let mut note = |(written, migration): (usize, Option<Migration>)| {
            report.created += written;
            report.migrations.extend(migration.filter(Migration::is_change));
        };
        note(self.clients.adopt_layout(store, &migrate_client, now_ms)?);
        if self.login.is_some() {
            note(self.accounts.adopt_layout(store, &ShardedTable::same_fingerprint, now_ms)?);
        }
        if self.distributed.is_some() {
            note(self.endpoints.adopt_layout(store, &ShardedTable::same_fingerprint, now_ms)?);
            note(self.sprays.adopt_layout(store, &ShardedTable::same_fingerprint, now_ms)?);
            note(self.fingerprints.adopt_layout(store, &ShardedTable::same_fingerprint, now_ms)?);
            note((self.known_accounts.create_shards(store)?, None));
        }
        if self.harvest.is_some() {
            note(self.object_routes.adopt_layout(store, &ShardedTable::same_fingerprint, now_ms)?);
        }
        if self.tracks_sessions() {
            note(self.session_table.adopt_layout(store, &ShardedTable::same_fingerprint, now_ms)?);
        }
        if self.spikes.is_some() {
            note(self.group_table.adopt_layout(store, &ShardedTable::same_fingerprint, now_ms)?);
        }
        if self.callouts.is_some() {
            note(self.verdict_table.adopt_layout(store, &ShardedTable::same_fingerprint, now_ms)?);
        }
        for table in &self.rule_tables {
            note(table.adopt_layout(store, &ShardedTable::same_fingerprint, now_ms)?);
        }
        Ok(report)
    }

    /// Bytes of shared data the state occupies, whatever the traffic.
    pub fn state_bytes(&self) -> usize {
        let accounts = if self.login.is_some() { self.accounts.total_bytes() } else { 0 };
        let distributed = if self.distributed.is_some() {
            self.endpoints
                .total_bytes()
                .saturating_add(self.sprays.total_bytes())
                .saturating_add(self.fingerprints.total_bytes())
                .saturating_add(self.known_accounts.total_bytes())
        } else {
            0
        };
        let sessions = if self.tracks_sessions() { self.session_table.total_bytes() } else { 0 };
        let harvest = if self.harvest.is_some() { self.object_routes.total_bytes() } else { 0 };
        self.clients
            .total_bytes()
            .saturating_add(accounts)
            .saturating_add(distributed)
            .saturating_add(sessions)
            .saturating_add(harvest)
            .saturating_add(self.rule_bytes())
    }
}
