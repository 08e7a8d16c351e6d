//! What a table's shards were written with, kept beside them in shared data
//! (`<prefix>/<name>/layout`), so that a reload whose configuration changes
//! the layout carries the records over instead of starting from empty
//! shards (an operator who changes a rate window must not free every client
//! in the penalty box).
//!
//! The first VM of a process to configure a new layout wins the manifest
//! (compare-and-swap) and migrates: it reads every shard of the old layout,
//! converts each record ([`ShardedTable::adopt_layout`]'s converter), and
//! writes them into the new shards, least valuable first so that, when the
//! new layout has less room, eviction drops idle clients before penalized
//! ones. Other VMs see the new manifest and only create missing shards.
//!
//! Shared data is one map under one lock in Envoy, and a configuration is
//! applied on the main thread before workers serve with it, so the window in
//! which a worker still on the old configuration can write an old shard that
//! was already read is the few microseconds of the copy; such a write is
//! lost, never misread. While the old configuration drains, its VMs find
//! shards of another layout and fail open rather than overwrite them
//! ([`crate::state::store::StoreError::OtherLayout`]).
//!
//! [`ShardedTable::adopt_layout`]: crate::state::store::ShardedTable::adopt_layout

use crate::record::{ClientRecord, Record, MAX_RATE_LIMITS, STABLE_PREFIX_BYTES};
use crate::state::shard::ShardLayout;
use crate::window::SlidingWindow;
use serde::{Deserialize, Serialize};

/// A manifest larger than this is not one of ours (read as absent).
pub const MANIFEST_MAX_BYTES: usize = 16 * 1024;

/// Name of a table's manifest key.
pub fn manifest_key(prefix: &str, name: &str) -> String {
    format!("{prefix}/{name}/layout")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutManifest {
    pub shards: usize,
    pub slots: usize,
    pub record_bytes: usize,
    /// The shard header's fingerprint (see [`crate::state::shard`]).
    pub fingerprint: u32,
    /// Record format version (0: the table has none beyond its fingerprint).
    pub format: u16,
    /// What each configurable part of a record counts, in record order
    /// (client records: one tag per rate window).
    pub fields: Vec<String>,
}

impl LayoutManifest {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Any bytes: a value that is not a manifest of ours reads as None.
    pub fn decode(bytes: &[u8]) -> Option<LayoutManifest> {
        if bytes.len() > MANIFEST_MAX_BYTES {
            return None;
        }
        let m: LayoutManifest = serde_json::from_slice(bytes).ok()?;
        // Bounds the migration's reads: a forged manifest cannot make a VM
        // read millions of keys (the configuration caps shards at 65,536).
        (m.shards <= 65_536 && m.slots <= 4096 && m.record_bytes <= 4096).then_some(m)
    }

    pub fn shard_layout(&self) -> ShardLayout {
        ShardLayout { slots: self.slots.max(1), record_bytes: self.record_bytes, fingerprint: self.fingerprint }
    }

    /// Which of the old fields each new field finds again, by name.
    pub fn field_map(&self, new: &LayoutManifest) -> Vec<Option<usize>> {
        new.fields.iter().map(|f| self.fields.iter().position(|o| o == f)).collect()
    }
}

/// What one table's layout change carried over (for the one log line).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Migration {
    pub table: String,
    /// The old layout (None: no manifest, e.g. the first start of a process).
    pub from: Option<LayoutManifest>,
    pub to: Option<LayoutManifest>,
    /// Records written into the new layout.
    pub kept: usize,
    /// Records the new layout had no room for (evicted, idle ones first).
    pub dropped: usize,
    /// Records the converter could not carry over (another record format).
    pub unreadable: usize,
    /// Parts of kept records reset because the new layout has no place for
    /// them (client records: rate windows whose limit changed).
    pub reset_fields: Vec<String>,
}

impl Migration {
    /// Whether there is anything worth a log line (a first start is not).
    pub fn is_change(&self) -> bool {
        self.from.is_some()
    }

    /// `clients: 2048x16 -> 1024x16 shards, kept 812, dropped 3 (no room), 0 unreadable, reset rate windows [api/10s]`
    pub fn summary(&self) -> String {
        let dims = |m: &Option<LayoutManifest>| match m {
            Some(m) => format!("{}x{}", m.shards, m.slots),
            None => "none".to_string(),
        };
        let mut s = format!(
            "{}: {} -> {} shards, kept {}, dropped {} (no room), {} unreadable",
            self.table,
            dims(&self.from),
            dims(&self.to),
            self.kept,
            self.dropped,
            self.unreadable
        );
        if !self.reset_fields.is_empty() {
            s.push_str(&format!(", reset [{}]", self.reset_fields.join(", ")));
        }
        s
    }
}

// ---- the client table ----

/// Carries a client record over a layout change. Same format: the whole
/// record, each rate window moved to where the new configuration counts the
/// same thing (route group, window, anonymous only) and reset when none does.
/// Another format: the stable prefix (penalty box, risk, timestamps).
pub fn migrate_client(old: &LayoutManifest, new: &LayoutManifest, bytes: &[u8]) -> Option<ClientRecord> {
    let decoded = <ClientRecord as Record>::decode(bytes);
    if decoded.key == 0 {
        return None;
    }
    if old.format == new.format && old.record_bytes == new.record_bytes {
        let mut rate = [SlidingWindow::default(); MAX_RATE_LIMITS];
        for (dst, from) in rate.iter_mut().zip(old.field_map(new)) {
            if let Some(window) = from.and_then(|i| decoded.rate.get(i)) {
                *dst = *window;
            }
        }
        return Some(ClientRecord { rate, ..decoded });
    }
    let prefix = <ClientRecord as Record>::decode(bytes.get(..STABLE_PREFIX_BYTES).unwrap_or(bytes));
    Some(ClientRecord {
        key: prefix.key,
        last_seen_ms: prefix.last_seen_ms,
        first_seen_ms: prefix.first_seen_ms,
        penalty_until_ms: prefix.penalty_until_ms,
        penalty_reasons: prefix.penalty_reasons,
        recent_reasons: prefix.recent_reasons,
        risk: prefix.risk,
        requests: prefix.requests,
        ..ClientRecord::default()
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::record::{RECORD_BYTES, RECORD_FORMAT};

    fn manifest(fields: &[&str]) -> LayoutManifest {
        LayoutManifest {
            shards: 4,
            slots: 16,
            record_bytes: 332,
            fingerprint: 7,
            format: 5,
            fields: fields.iter().map(|f| f.to_string()).collect(),
        }
    }

    #[test]
    fn round_trips_and_refuses_garbage() {
        let m = manifest(&["*/10s", "api/60s"]);
        assert_eq!(LayoutManifest::decode(&m.encode()), Some(m.clone()));
        assert_eq!(LayoutManifest::decode(b"garbage"), None);
        assert_eq!(LayoutManifest::decode(&vec![b' '; MANIFEST_MAX_BYTES + 1]), None);
        let huge = LayoutManifest { shards: 1 << 40, ..m };
        assert_eq!(LayoutManifest::decode(&huge.encode()), None);
    }

    #[test]
    fn fields_are_found_by_name_at_any_position() {
        let old = manifest(&["*/10s", "api/60s"]);
        let new = manifest(&["api/60s", "login/60s", "*/10s"]);
        assert_eq!(old.field_map(&new), vec![Some(1), None, Some(0)]);
    }

    fn client_manifest(format: u16, fields: &[&str]) -> LayoutManifest {
        LayoutManifest {
            shards: 4,
            slots: 16,
            record_bytes: RECORD_BYTES,
            fingerprint: 1,
            format,
            fields: fields.iter().map(|f| f.to_string()).collect(),
        }
    }

    #[test]
    fn migration_moves_rate_windows_by_what_they_count() {
        let mut r = ClientRecord::new(9);
        r.penalty_until_ms = 5000;
        r.risk = 80.0;
        r.login_successes = 3;
        r.rate[0] = SlidingWindow { start_ms: 1, current: 10, previous: 0 };
        r.rate[1] = SlidingWindow { start_ms: 2, current: 20, previous: 0 };
        let mut bytes = [0u8; RECORD_BYTES];
        Record::encode(&r, &mut bytes);
        let old = client_manifest(RECORD_FORMAT, &["*/10s", "api/60s"]);
        let new = client_manifest(RECORD_FORMAT, &["api/60s", "*/20s"]);
        let m = migrate_client(&old, &new, &bytes).unwrap();
        assert_eq!((m.penalty_until_ms, m.risk, m.login_successes), (5000, 80.0, 3));
        assert_eq!(m.rate[0].current, 20, "api/60s moved to its new place");
        assert_eq!(m.rate[1], SlidingWindow::default(), "*/20s counts something else: reset");
        // Another record format: the stable prefix only.
        let other = client_manifest(RECORD_FORMAT + 1, &["*/10s", "api/60s"]);
        let m = migrate_client(&other, &old, &bytes).unwrap();
        assert_eq!((m.key, m.penalty_until_ms, m.risk, m.login_successes), (9, 5000, 80.0, 0));
        assert_eq!(m.rate[0], SlidingWindow::default());
        assert!(migrate_client(&old, &new, &[0u8; RECORD_BYTES]).is_none());
    }

}
