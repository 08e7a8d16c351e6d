//! Accounts known to exist: every username that ever logged in successfully,
//! as a Bloom filter in shared data.
//!
//! A leaked combo list mostly names accounts that are not yours, and no
//! disguise of the attacker changes that: the share of attempts on unknown
//! accounts, and a new client failing on one, are what survive rotating
//! addresses and copied browsers (Datadog's `usr.exists`, AWS ATP).
//!
//! Layout: [`SHARDS`] shared-data values of [`SHARD_BYTES`] bytes (a 4-byte
//! magic, then the bits), so one insert or lookup touches one 1 KiB value,
//! never the whole 1 MiB. An account's key (a keyed hash of its username)
//! picks the shard and [`BITS_PER_ACCOUNT`] bits inside it (double hashing).
//! With 8,192 bits per shard and 4 bits per account, one million accounts
//! (~1,000 per shard) give about 2.4 % false positives — and a false
//! positive only ever makes an attempt look *less* suspicious. Bits are never
//! cleared (an account that once existed is not forgotten); memory is fixed.
//!
//! The account key is fleet-stable when a scorer secret is configured (every
//! Envoy of the fleet hashes a username alike, so the scorer can keep the
//! same bits in Redis across restarts and hand them to a fresh Envoy).

use crate::state::store::{SharedStore, StoreError};

pub const SHARDS: usize = 1024;
const MAGIC: [u8; 4] = *b"KA01";
pub const SHARD_BYTES: usize = 4 + 1024;
const BITS: u32 = 1024 * 8;
pub const BITS_PER_ACCOUNT: u32 = 4;
const CAS_RETRIES: usize = 16;

/// Bits in one shard.
pub const SHARD_BITS: u32 = BITS;

/// Where an account lives: its shard and its bits in it (bit `b` is bit
/// `b % 8` of byte `b / 8`, least significant first). The scorer sets the
/// same bits in its copy, so both sides must use this one function.
pub fn bit_positions(account: u64) -> (usize, [u32; BITS_PER_ACCOUNT as usize]) {
    let shard = usize::try_from(account % SHARDS as u64).unwrap_or(0);
    let rest = account / SHARDS as u64;
    let h1 = (rest & 0xffff_ffff) as u32;
    let h2 = ((rest >> 32) as u32) | 1;
    let mut bits = [0u32; BITS_PER_ACCOUNT as usize];
    for (i, bit) in bits.iter_mut().enumerate() {
        *bit = h1.wrapping_add((i as u32).wrapping_mul(h2)) % BITS;
    }
    (shard, bits)
}

#[derive(Debug, Clone)]
pub struct KnownAccounts {
    keys: Vec<String>,
}

impl KnownAccounts {
    pub fn new(prefix: &str) -> KnownAccounts {
        KnownAccounts { keys: (0..SHARDS).map(|i| format!("{prefix}/known_accounts/{i}")).collect() }
    }

    pub fn total_bytes(&self) -> usize {
        SHARDS * SHARD_BYTES
    }

    fn locate(&self, account: u64) -> Option<(&str, [u32; BITS_PER_ACCOUNT as usize])> {
        let (shard, bits) = bit_positions(account);
        Some((self.keys.get(shard)?.as_str(), bits))
    }

    /// Creates the shards (a CAS only works on keys that exist).
    pub fn create_shards(&self, store: &dyn SharedStore) -> Result<usize, StoreError> {
        let mut created = 0;
        for key in &self.keys {
            let (value, _) = store.get(key)?;
            if value.as_deref().is_some_and(valid) {
                continue;
            }
            store.set(key, &empty(), None)?;
            created += 1;
        }
        Ok(created)
    }

    /// Whether the account ever logged in (false when unsure: a missing or
    /// foreign shard reads as empty).
    pub fn contains(&self, store: &dyn SharedStore, account: u64) -> bool {
        let Some((key, bits)) = self.locate(account) else {
            return false;
        };
        match store.get(key) {
            Ok((Some(value), _)) if valid(&value) => bits.iter().all(|b| bit(&value, *b)),
            _ => false,
        }
    }

    /// Marks the account as existing; returns whether it was new.
    pub fn insert(&self, store: &dyn SharedStore, account: u64) -> Result<bool, StoreError> {
        let (key, bits) = self.locate(account).ok_or(StoreError::Unavailable)?;
        for _ in 0..CAS_RETRIES {
            let (value, cas) = store.get(key)?;
            let mut value = value.filter(|v| valid(v)).unwrap_or_else(empty);
            if bits.iter().all(|b| bit(&value, *b)) {
                return Ok(false);
            }
            for b in bits {
                set_bit(&mut value, b);
            }
            match store.set(key, &value, cas) {
                Ok(()) => return Ok(true),
                Err(StoreError::CasMismatch) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::CasMismatch)
    }

    /// ORs bits learned elsewhere (the scorer's copy) into shard `index`.
    pub fn merge(&self, store: &dyn SharedStore, index: usize, bits: &[u8]) -> Result<(), StoreError> {
        let key = self.keys.get(index).ok_or(StoreError::Unavailable)?;
        for _ in 0..CAS_RETRIES {
            let (value, cas) = store.get(key)?;
            let mut value = value.filter(|v| valid(v)).unwrap_or_else(empty);
            for (mine, theirs) in value.iter_mut().skip(MAGIC.len()).zip(bits) {
                *mine |= *theirs;
            }
            match store.set(key, &value, cas) {
                Ok(()) => return Ok(()),
                Err(StoreError::CasMismatch) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::CasMismatch)
    }
}

fn valid(value: &[u8]) -> bool {
    value.len() == SHARD_BYTES && value.starts_with(&MAGIC)
}

fn empty() -> Vec<u8> {
    let mut v = vec![0u8; SHARD_BYTES];
    for (dst, src) in v.iter_mut().zip(MAGIC) {
        *dst = src;
    }
    v
}

fn bit(value: &[u8], b: u32) -> bool {
    let byte = MAGIC.len() + (b / 8) as usize;
    value.get(byte).is_some_and(|v| v & (1 << (b % 8)) != 0)
}

fn set_bit(value: &mut [u8], b: u32) {
    let byte = MAGIC.len() + (b / 8) as usize;
    if let Some(v) = value.get_mut(byte) {
        *v |= 1 << (b % 8);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::hash::KeyedHasher;
    use crate::state::store::MemoryStore;

    #[test]
    fn inserted_accounts_are_known_and_others_mostly_not() {
        let (k, s) = (KnownAccounts::new("t"), MemoryStore::new());
        k.create_shards(&s).unwrap();
        let h = KeyedHasher::from_seed(&[3; 16]);
        for i in 0..20_000u32 {
            assert!(k.insert(&s, h.key(2, format!("user{i}").as_bytes())).unwrap());
        }
        assert!(!k.insert(&s, h.key(2, b"user7")).unwrap(), "already known");
        assert!((0..20_000u32).all(|i| k.contains(&s, h.key(2, format!("user{i}").as_bytes()))));
        let false_positives =
            (0..20_000u32).filter(|i| k.contains(&s, h.key(2, format!("stranger{i}").as_bytes()))).count();
        // 20 accounts per shard: far below the 2.4 % expected at a million.
        assert!(false_positives < 20, "{false_positives}");
        assert_eq!(s.total_bytes() - k.keys.iter().map(String::len).sum::<usize>(), SHARDS * SHARD_BYTES);
    }

    #[test]
    fn foreign_or_missing_shards_know_nothing_and_merge_ors() {
        let (k, s) = (KnownAccounts::new("t"), MemoryStore::new());
        assert!(!k.contains(&s, 12345));
        s.set("t/known_accounts/0", b"garbage", None).unwrap();
        assert!(!k.contains(&s, 1024 * 77));
        assert!(k.insert(&s, 1024 * 77).unwrap(), "a foreign value is replaced");
        assert!(k.contains(&s, 1024 * 77));
        let other = MemoryStore::new();
        k.create_shards(&other).unwrap();
        let (_, value) = (0, s.get("t/known_accounts/0").unwrap().0.unwrap());
        k.merge(&other, 0, &value[4..]).unwrap();
        assert!(k.contains(&other, 1024 * 77));
    }
}
