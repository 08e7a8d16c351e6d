//! Keyed hashing of attacker-controlled values (addresses, usernames).
//!
//! SipHash-1-3 with a random 128-bit key per Envoy process: an attacker who
//! does not know the key cannot choose addresses that collide in one shard
//! and evict everybody else's state.

use siphasher::sip::SipHasher13;
use std::hash::Hasher;

/// Length of the seed stored in shared data and shared by all worker VMs.
pub const SEED_BYTES: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyedHasher {
    k0: u64,
    k1: u64,
}

impl KeyedHasher {
    pub fn from_seed(seed: &[u8; SEED_BYTES]) -> KeyedHasher {
        let (a, b) = seed.split_at(8);
        let mut k0 = [0u8; 8];
        let mut k1 = [0u8; 8];
        k0.copy_from_slice(a);
        k1.copy_from_slice(b);
        KeyedHasher {
            k0: u64::from_le_bytes(k0),
            k1: u64::from_le_bytes(k1),
        }
    }

    /// A hasher every holder of `secret` derives alike (the fleet's scorer
    /// secret): keys that the scorer and other Envoys must recognise.
    pub fn from_secret(secret: &str) -> KeyedHasher {
        let base = KeyedHasher { k0: 0x6162_7573_655f_6b30, k1: 0x6162_7573_655f_6b31 };
        KeyedHasher { k0: base.key(0, secret.as_bytes()), k1: base.key(1, secret.as_bytes()) }
    }

    /// A non-zero 64-bit key (0 marks an empty slot).
    pub fn key(&self, domain: u8, bytes: &[u8]) -> u64 {
        let mut h = SipHasher13::new_with_keys(self.k0, self.k1);
        h.write_u8(domain);
        h.write(bytes);
        h.finish().max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_and_domains_separate_keys() {
        let a = KeyedHasher::from_seed(&[1; SEED_BYTES]);
        let b = KeyedHasher::from_seed(&[2; SEED_BYTES]);
        assert_eq!(a.key(0, b"x"), a.key(0, b"x"));
        assert_ne!(a.key(0, b"x"), b.key(0, b"x"));
        assert_ne!(a.key(0, b"x"), a.key(1, b"x"));
        assert_ne!(a.key(0, b""), 0);
    }
}
