//! The engine's [`SharedStore`] in process memory: the same semantics as
//! Envoy's shared data (a value per key, a CAS token per write) without its
//! one process-wide mutex. Keys are the engine's fixed shard keys (created
//! once at configuration, never one per client), so the map only grows
//! with the configuration, never with traffic; each key has its own lock, so
//! workers touching different shards never wait on each other. A get copies
//! one shard's bytes under its lock (a few KiB), as shared data does, but
//! with no VM crossing and no second copy.

use abuse_engine::{SharedStore, StoreError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

type Slot = Arc<Mutex<(Vec<u8>, u32)>>;

#[derive(Default)]
pub struct InProcessStore {
    keys: RwLock<HashMap<String, Slot>>,
}

impl InProcessStore {
    fn slot(&self, key: &str) -> Result<Option<Slot>, StoreError> {
        let map = self.keys.read().map_err(|_| StoreError::Unavailable)?;
        Ok(map.get(key).cloned())
    }

    /// Bytes held (keys and values), for the memory gauge.
    pub fn total_bytes(&self) -> usize {
        let Ok(map) = self.keys.read() else { return 0 };
        map.iter().map(|(k, v)| k.len() + v.lock().map(|v| v.0.len()).unwrap_or(0)).sum()
    }
}

impl SharedStore for InProcessStore {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
        match self.slot(key)? {
            Some(slot) => {
                let value = slot.lock().map_err(|_| StoreError::Unavailable)?;
                Ok((Some(value.0.clone()), Some(value.1)))
            }
            None => Ok((None, None)),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        let slot = match self.slot(key)? {
            Some(slot) => slot,
            None => {
                // First write of this key (configuration time): create it,
                // unless a racing writer just did.
                let mut map = self.keys.write().map_err(|_| StoreError::Unavailable)?;
                map.entry(key.to_string()).or_insert_with(|| Arc::new(Mutex::new((Vec::new(), 0)))).clone()
            }
        };
        let mut current = slot.lock().map_err(|_| StoreError::Unavailable)?;
        // As in Envoy: a CAS token is checked only for a key that has a value.
        if let (Some(expected), true) = (cas, current.1 != 0) {
            if expected != current.1 {
                return Err(StoreError::CasMismatch);
            }
        }
        current.0.clear();
        current.0.extend_from_slice(value);
        current.1 = current.1.wrapping_add(1).max(1);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn cas_semantics_match_shared_data() {
        let s = InProcessStore::default();
        assert_eq!(s.get("k").unwrap(), (None, None));
        s.set("k", b"a", Some(7)).unwrap(); // no value yet: the token is not checked
        let (v, cas) = s.get("k").unwrap();
        assert_eq!(v.as_deref(), Some(&b"a"[..]));
        s.set("k", b"b", cas).unwrap();
        assert_eq!(s.set("k", b"c", cas), Err(StoreError::CasMismatch));
        s.set("k", b"d", None).unwrap();
        assert_eq!(s.get("k").unwrap().0.as_deref(), Some(&b"d"[..]));
    }

    #[test]
    fn racing_increments_are_never_lost() {
        let s = Arc::new(InProcessStore::default());
        s.set("n", &0u64.to_le_bytes(), None).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        loop {
                            let (v, cas) = s.get("n").unwrap();
                            let n = u64::from_le_bytes(v.unwrap().try_into().unwrap());
                            if s.set("n", &(n + 1).to_le_bytes(), cas).is_ok() {
                                break;
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let n = u64::from_le_bytes(s.get("n").unwrap().0.unwrap().try_into().unwrap());
        assert_eq!(n, 4000);
    }
}
