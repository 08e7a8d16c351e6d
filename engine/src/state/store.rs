//! Per-client state in a compare-and-swap key/value store (Envoy shared
//! data in the filter, [`MemoryStore`] in tests).
//!
//! Every worker VM reads a shard, changes one record, and writes it back
//! with the CAS token it read; if another worker wrote in between, the write
//! fails and the whole read-modify-write is retried. So no update is lost
//! and counts are exact across workers. The shard keys are created once at
//! start, because Envoy only checks a CAS token for keys that exist.

use crate::state::layout::{manifest_key, LayoutManifest, Migration};
use crate::state::shard::{Record, ShardLayout};
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Mutex;

/// Most read-modify-write attempts per request before giving up (fail open).
pub const MAX_ATTEMPTS: u32 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    /// Someone else wrote the key since we read it.
    CasMismatch,
    /// The host refused the call.
    Unavailable,
    /// The shard holds another layout's records (a configuration change is
    /// being applied, or an old configuration is draining): not ours to write.
    OtherLayout,
}

/// The host's shared key/value store, with Envoy's semantics: `get` returns
/// a CAS token; `set` with `Some(token)` fails with `CasMismatch` if the key
/// changed since (and always succeeds for a key that does not exist yet).
pub trait SharedStore {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError>;
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError>;
}

/// What an update cost, for stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UpdateStats {
    pub cas_retries: u32,
    pub evicted: bool,
}

/// The update could not be applied (the caller fails open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpdateFailed {
    pub stats: UpdateStats,
    pub error: StoreError,
}

/// A sharded table of records: which shard a key lives in, and the CAS loop.
#[derive(Debug, Clone)]
pub struct ShardedTable<R> {
    name: String,
    layout: ShardLayout,
    shard_keys: Vec<String>,
    manifest_key: String,
    /// Record format and field tags, for the manifest (see [`crate::state::layout`]).
    format: u16,
    fields: Vec<String>,
    record: PhantomData<R>,
}

/// Turns an old layout's encoded record into a record of the new one (None:
/// it cannot be carried over). Given the old manifest, the new one, and the
/// encoded record.
pub type Converter<'a, R> = &'a dyn Fn(&LayoutManifest, &LayoutManifest, &[u8]) -> Option<R>;

impl<R: Record> ShardedTable<R> {
    /// `name` separates tables in shared data (`<prefix>/<name>/<n>`).
    pub fn new(prefix: &str, name: &str, shards: usize, slots: usize, fingerprint: u32) -> ShardedTable<R> {
        ShardedTable {
            name: name.to_string(),
            layout: ShardLayout { slots: slots.max(1), record_bytes: R::BYTES, fingerprint },
            shard_keys: (0..shards.max(1)).map(|i| shard_key_name(prefix, name, i)).collect(),
            manifest_key: manifest_key(prefix, name),
            format: 0,
            fields: Vec::new(),
            record: PhantomData,
        }
    }

    /// Names the record format and what its configurable parts count, so a
    /// migration knows which of them it can carry over.
    pub fn with_fields(mut self, format: u16, fields: Vec<String>) -> ShardedTable<R> {
        self.format = format;
        self.fields = fields;
        self
    }

    /// This table's layout as its manifest says it.
    pub fn manifest(&self) -> LayoutManifest {
        LayoutManifest {
            shards: self.shard_keys.len(),
            slots: self.layout.slots,
            record_bytes: self.layout.record_bytes,
            fingerprint: self.layout.fingerprint,
            format: self.format,
            fields: self.fields.clone(),
        }
    }

    /// Carries records over only from the same layout with other dimensions
    /// (tables without configurable parts).
    pub fn same_fingerprint(old: &LayoutManifest, new: &LayoutManifest, bytes: &[u8]) -> Option<R> {
        (old.fingerprint == new.fingerprint && old.record_bytes == new.record_bytes).then(|| R::decode(bytes))
    }

    pub fn layout(&self) -> ShardLayout {
        self.layout
    }

    pub fn shard_count(&self) -> usize {
        self.shard_keys.len()
    }

    /// Total bytes of shared data the table occupies, whatever the traffic.
    pub fn total_bytes(&self) -> usize {
        self.layout.value_len().saturating_mul(self.shard_keys.len())
    }

    fn shard_key(&self, client_key: u64) -> &str {
        let n = self.shard_keys.len().max(1) as u64;
        let index = usize::try_from(client_key % n).unwrap_or(0);
        self.shard_keys.get(index).map(String::as_str).unwrap_or("")
    }

    /// Creates every shard that is missing, and migrates the records of
    /// another layout (records of tables without configurable parts survive
    /// only a change of dimensions). Called once at configuration time;
    /// returns how many shards were (re)written.
    pub fn create_shards(&self, store: &dyn SharedStore) -> Result<usize, StoreError> {
        Ok(self.adopt_layout(store, &Self::same_fingerprint, 0)?.0)
    }

    /// Makes the shared shards this table's layout (at configuration time):
    /// when the manifest names another layout, this VM claims the change
    /// (CAS on the manifest) and carries every record `convert` accepts into
    /// the new shards. Returns the shards written and, for the VM that
    /// migrated, what it carried over.
    pub fn adopt_layout(
        &self,
        store: &dyn SharedStore,
        convert: Converter<'_, R>,
        now_ms: u64,
    ) -> Result<(usize, Option<Migration>), StoreError> {
        let new = self.manifest();
        let (value, cas) = store.get(&self.manifest_key)?;
        let old = value.as_deref().and_then(LayoutManifest::decode);
        if old.as_ref() == Some(&new) {
            return Ok((self.create_missing(store)?, None));
        }
        match store.set(&self.manifest_key, &new.encode(), cas) {
            Ok(()) => {}
            // Another VM of this process claimed the change and migrates.
            Err(StoreError::CasMismatch) => return Ok((self.create_missing(store)?, None)),
            Err(e) => return Err(e),
        }
        let mut migration = Migration { table: self.name.clone(), from: old.clone(), to: Some(new.clone()), ..Migration::default() };
        // Every old record is read before any new shard is written: a new
        // shard overwrites an old one that holds records of other shards.
        let shard_count = self.shard_keys.len().max(1);
        let mut buckets: Vec<Vec<R>> = vec![Vec::new(); shard_count];
        if let Some(old) = &old {
            migration.reset_fields = old.fields.iter().filter(|f| !new.fields.contains(f)).cloned().collect();
            if old.format != new.format {
                migration.reset_fields.push(format!("record format {} -> {}", old.format, new.format));
            }
            let old_layout = old.shard_layout();
            for i in 0..old.shards {
                let key = self.shard_key_at(i);
                let (value, _) = store.get(&key)?;
                let Some(value) = value.filter(|v| old_layout.is_current(v)) else {
                    continue;
                };
                for slot in 0..old_layout.slots {
                    let bytes = old_layout.raw_slot(&value, slot);
                    if R::key_of(bytes) == 0 {
                        continue;
                    }
                    match convert(old, &new, bytes) {
                        Some(record) => {
                            let index = usize::try_from(record.key() % shard_count as u64).unwrap_or(0);
                            if let Some(bucket) = buckets.get_mut(index) {
                                bucket.push(record);
                            }
                        }
                        None => migration.unreadable += 1,
                    }
                }
                if i >= shard_count {
                    // Beyond the new shard count: keys cannot be deleted, an
                    // empty value frees the memory.
                    store.set(&key, &[], None)?;
                }
            }
        }
        let mut written = 0;
        for (key, bucket) in self.shard_keys.iter().zip(buckets.iter_mut()) {
            // Least valuable first: when a probe window is full, eviction
            // then drops the idlest records, never a penalized one first.
            bucket.sort_by_key(|r| r.eviction_rank(now_ms));
            let (kept, dropped) = self.write_migrated(store, key, bucket, now_ms)?;
            migration.kept += kept;
            migration.dropped += dropped;
            written += 1;
        }
        Ok((written, Some(migration)))
    }

    /// Writes one new shard: what this layout already wrote there (a newer
    /// record wins) plus the migrated records. Returns (kept, dropped).
    fn write_migrated(&self, store: &dyn SharedStore, key: &str, records: &[R], now_ms: u64) -> Result<(usize, usize), StoreError> {
        for _ in 0..MAX_ATTEMPTS {
            let (value, cas) = store.get(key)?;
            let mut value = match value {
                Some(v) if self.layout.is_current(&v) => v,
                _ => self.layout.empty_value(),
            };
            for record in records {
                // What this layout wrote since is newer: it wins.
                if self.layout.find::<R>(&value, record.key()).is_none() {
                    let slot = self.layout.find_or_make::<R>(&value, record.key(), now_ms);
                    self.layout.write(&mut value, slot.index, record);
                }
            }
            match store.set(key, &value, cas) {
                Ok(()) => {
                    let kept = records.iter().filter(|r| self.layout.find::<R>(&value, r.key()).is_some()).count();
                    return Ok((kept, records.len().saturating_sub(kept)));
                }
                Err(StoreError::CasMismatch) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::CasMismatch)
    }

    /// Creates the shards that are missing or hold no shard at all; leaves
    /// another layout's shards to the VM that migrates them.
    fn create_missing(&self, store: &dyn SharedStore) -> Result<usize, StoreError> {
        let mut created = 0;
        for key in &self.shard_keys {
            let (value, cas) = store.get(key)?;
            if value.as_deref().is_some_and(ShardLayout::is_shard) {
                continue;
            }
            match store.set(key, &self.layout.empty_value(), cas) {
                Ok(()) => created += 1,
                // Another worker created it first: fine.
                Err(StoreError::CasMismatch) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(created)
    }

    fn shard_key_at(&self, index: usize) -> String {
        match self.shard_keys.get(index) {
            Some(k) => k.clone(),
            None => {
                let prefix = self.manifest_key.strip_suffix("/layout").unwrap_or(&self.manifest_key);
                format!("{prefix}/{index}")
            }
        }
    }

    /// Reads a client's record without writing (None if unknown).
    pub fn peek(&self, store: &dyn SharedStore, client_key: u64) -> Result<Option<R>, StoreError> {
        let (value, _) = store.get(self.shard_key(client_key))?;
        let value = value.filter(|v| self.layout.is_current(v));
        Ok(value.and_then(|v| self.layout.find(&v, client_key)).map(|s| s.record))
    }

    /// Applies `change` to the client's record atomically. `change` may run
    /// more than once (on CAS conflicts) and must depend only on the record
    /// it is given; it returns its result and whether the record must be
    /// written (read-only outcomes skip the write).
    pub fn update<T>(
        &self,
        store: &dyn SharedStore,
        client_key: u64,
        now_ms: u64,
        mut change: impl FnMut(&mut R) -> (T, bool),
    ) -> Result<(T, UpdateStats), UpdateFailed> {
        let key = self.shard_key(client_key);
        let mut stats = UpdateStats::default();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (value, cas) = store.get(key).map_err(|error| UpdateFailed { stats, error })?;
            let mut value = match value {
                Some(v) if self.layout.is_current(&v) => v,
                Some(v) if ShardLayout::is_shard(&v) => {
                    return Err(UpdateFailed { stats, error: StoreError::OtherLayout })
                }
                _ => self.layout.empty_value(),
            };
            let mut slot = self.layout.find_or_make::<R>(&value, client_key, now_ms);
            let (result, write) = change(&mut slot.record);
            if !write {
                return Ok((result, stats));
            }
            self.layout.write(&mut value, slot.index, &slot.record);
            match store.set(key, &value, cas) {
                Ok(()) => {
                    stats.evicted = slot.evicted;
                    return Ok((result, stats));
                }
                Err(StoreError::CasMismatch) if attempt < MAX_ATTEMPTS => {
                    stats.cas_retries = stats.cas_retries.saturating_add(1);
                }
                Err(error) => return Err(UpdateFailed { stats, error }),
            }
        }
    }
}

fn shard_key_name(prefix: &str, name: &str, index: usize) -> String {
    format!("{prefix}/{name}/{index}")
}

/// An in-memory [`SharedStore`] with Envoy's CAS semantics, shareable between
/// threads to stand for several worker VMs in native tests.
#[derive(Debug, Default)]
pub struct MemoryStore {
    entries: Mutex<HashMap<String, (Vec<u8>, u32)>>,
    /// Makes the next N `set`s with a CAS token fail, to exercise retries.
    pub forced_conflicts: Mutex<u32>,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    pub fn total_bytes(&self) -> usize {
        self.entries
            .lock()
            .map(|m| m.iter().map(|(k, (v, _))| k.len() + v.len()).sum())
            .unwrap_or(0)
    }

    pub fn key_count(&self) -> usize {
        self.entries.lock().map(|m| m.len()).unwrap_or(0)
    }
}

impl SharedStore for MemoryStore {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
        let map = self.entries.lock().map_err(|_| StoreError::Unavailable)?;
        Ok(match map.get(key) {
            Some((v, cas)) => (Some(v.clone()), Some(*cas)),
            None => (None, None),
        })
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        if cas.is_some() {
            let mut forced = self.forced_conflicts.lock().map_err(|_| StoreError::Unavailable)?;
            if *forced > 0 {
                *forced -= 1;
                return Err(StoreError::CasMismatch);
            }
        }
        let mut map = self.entries.lock().map_err(|_| StoreError::Unavailable)?;
        let next = match (map.get(key), cas) {
            (Some((_, current)), Some(expected)) if *current != expected => {
                return Err(StoreError::CasMismatch)
            }
            (Some((_, current)), _) => current.wrapping_add(1).max(1),
            (None, _) => 1,
        };
        map.insert(key.to_string(), (value.to_vec(), next));
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::record::ClientRecord;
    use std::sync::Arc;

    type ClientTable = ShardedTable<ClientRecord>;

    fn table() -> ClientTable {
        ClientTable::new("t", "c", 4, 16, 1)
    }

    fn bump(t: &ClientTable, s: &MemoryStore, key: u64) -> UpdateStats {
        t.update(s, key, 1, |r| {
            r.risk += 1.0;
            ((), true)
        })
        .unwrap()
        .1
    }

    #[test]
    fn create_shards_once() {
        let (t, s) = (table(), MemoryStore::new());
        assert_eq!(t.create_shards(&s).unwrap(), 4);
        assert_eq!(t.create_shards(&s).unwrap(), 0);
        assert_eq!(s.key_count(), 5, "4 shards and the layout manifest");
        // A new layout (config reload) recreates them.
        let t2 = ClientTable::new("t", "c", 4, 16, 2);
        assert_eq!(t2.create_shards(&s).unwrap(), 4);
    }

    #[test]
    fn conflicts_are_retried_and_counted() {
        let (t, s) = (table(), MemoryStore::new());
        t.create_shards(&s).unwrap();
        *s.forced_conflicts.lock().unwrap() = 3;
        let stats = bump(&t, &s, 77 << 32);
        assert_eq!(stats.cas_retries, 3);
        assert_eq!(t.peek(&s, 77 << 32).unwrap().unwrap().risk, 1.0);
    }

    #[test]
    fn endless_conflicts_give_up() {
        let (t, s) = (table(), MemoryStore::new());
        t.create_shards(&s).unwrap();
        *s.forced_conflicts.lock().unwrap() = 1000;
        let r = t.update(&s, 5, 1, |_| ((), true));
        assert_eq!(r.unwrap_err().error, StoreError::CasMismatch);
    }

    #[test]
    fn read_only_changes_do_not_write() {
        let (t, s) = (table(), MemoryStore::new());
        t.create_shards(&s).unwrap();
        *s.forced_conflicts.lock().unwrap() = 1;
        let (v, stats) = t.update(&s, 5, 1, |_| (7, false)).unwrap();
        assert_eq!((v, stats.cas_retries), (7, 0));
    }

    #[test]
    fn concurrent_workers_lose_no_update() {
        let t = Arc::new(table());
        let s = Arc::new(MemoryStore::new());
        t.create_shards(&*s).unwrap();
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let (t, s) = (t.clone(), s.clone());
                std::thread::spawn(move || {
                    // Two tight loops on one key are far harsher than two
                    // Envoy workers; an update may give up (the filter then
                    // fails open), but none may be lost.
                    (0..500)
                        .filter(|_| {
                            t.update(&*s, 9 << 32, 1, |r| {
                                r.risk += 1.0;
                                ((), true)
                            })
                            .is_ok()
                        })
                        .count()
                })
            })
            .collect();
        let applied: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert!(applied > 900, "too many give-ups: {applied}");
        assert_eq!(t.peek(&*s, 9 << 32).unwrap().unwrap().risk, applied as f32);
    }

    #[test]
    fn memory_is_bounded_by_layout() {
        let (t, s) = (table(), MemoryStore::new());
        t.create_shards(&s).unwrap();
        let before = s.total_bytes();
        for k in 1..20_000u64 {
            bump(&t, &s, k.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        }
        assert_eq!(s.total_bytes(), before);
        assert_eq!(s.key_count(), 5);
    }
}
