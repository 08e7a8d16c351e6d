//! A shard: one Envoy shared-data value holding a fixed number of client
//! records, so memory is `shards * slots * RECORD_BYTES` whatever the number
//! of distinct clients.
//!
//! Value layout: a 16-byte header, then `slots` records.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `ABSH` |
//! | 4 | 2 | record format ([`RECORD_FORMAT`]) |
//! | 6 | 2 | reserved (0) |
//! | 8 | 4 | layout fingerprint (changes when the config changes what records mean) |
//! | 12 | 4 | slots |
//!
//! A value whose header differs (older build, other config, corrupt) is
//! never misread: a configuration that changes the layout migrates the
//! records at configuration time (see [`crate::state::layout`]); until then a
//! shard of another layout is left alone, and anything that is not a shard
//! at all is read as an empty one.
//!
//! Lookup is open addressing over a short probe window of [`PROBE`] slots
//! starting at a slot chosen by the key. Records are never deleted, only
//! replaced, so a key is always found inside its window. When the window is
//! full the victim is, in order: an empty slot, the least recently seen
//! client not in the penalty box, the client whose penalty ends first —
//! so a flood of fresh addresses evicts idle clients before blocked ones.

use crate::record::RECORD_FORMAT;

pub use crate::record::Record;

pub const HEADER_BYTES: usize = 16;
pub const PROBE: usize = 8;
const MAGIC: &[u8; 4] = b"ABSH";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardLayout {
    pub slots: usize,
    pub record_bytes: usize,
    pub fingerprint: u32,
}

/// Where a client's record lives and what it held before this request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slot<R> {
    pub index: usize,
    pub record: R,
    /// Another client's record was displaced to make room.
    pub evicted: bool,
}

impl ShardLayout {
    pub fn value_len(&self) -> usize {
        HEADER_BYTES.saturating_add(self.slots.saturating_mul(self.record_bytes))
    }

    fn header(&self) -> [u8; HEADER_BYTES] {
        let mut h = [0u8; HEADER_BYTES];
        let slots = u32::try_from(self.slots).unwrap_or(u32::MAX);
        for (dst, src) in h.iter_mut().zip(
            MAGIC
                .iter()
                .chain(RECORD_FORMAT.to_le_bytes().iter())
                .chain([0u8, 0u8].iter())
                .chain(self.fingerprint.to_le_bytes().iter())
                .chain(slots.to_le_bytes().iter()),
        ) {
            *dst = *src;
        }
        h
    }

    pub fn empty_value(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.value_len()];
        if let Some(dst) = v.get_mut(..HEADER_BYTES) {
            dst.copy_from_slice(&self.header());
        }
        v
    }

    /// Whether `value` is a shard of this layout (else it must be treated as empty).
    pub fn is_current(&self, value: &[u8]) -> bool {
        value.len() == self.value_len() && value.get(..HEADER_BYTES) == Some(&self.header()[..])
    }

    /// Whether `value` is a shard of some layout (ours or another's): the
    /// magic and a header that agrees with the value's length.
    pub fn is_shard(value: &[u8]) -> bool {
        let mut r = crate::codec::Reader::new(value);
        let magic: [u8; 4] = r.take();
        let (_format, _reserved, _fingerprint, slots) = (r.u16(), r.u16(), r.u32(), r.u32());
        &magic == MAGIC
            && value.len() > HEADER_BYTES
            && slots > 0
            && (value.len() - HEADER_BYTES).is_multiple_of(usize::try_from(slots).unwrap_or(usize::MAX))
    }

    /// The encoded record in slot `index` (`record_bytes` long; empty past the end).
    pub fn raw_slot<'a>(&self, value: &'a [u8], index: usize) -> &'a [u8] {
        let start = self.offset(index);
        value.get(start..start.saturating_add(self.record_bytes)).unwrap_or(&[])
    }

    /// Takes a stored value, or starts a fresh shard if it is missing or foreign.
    pub fn adopt(&self, value: Option<Vec<u8>>) -> Vec<u8> {
        match value {
            Some(v) if self.is_current(&v) => v,
            _ => self.empty_value(),
        }
    }

    fn offset(&self, index: usize) -> usize {
        HEADER_BYTES.saturating_add(index.saturating_mul(self.record_bytes))
    }

    fn slot_bytes<'a, R: Record>(&self, value: &'a [u8], index: usize) -> &'a [u8] {
        let start = self.offset(index);
        value.get(start..start.saturating_add(R::BYTES.min(self.record_bytes))).unwrap_or(&[])
    }

    pub fn read<R: Record>(&self, value: &[u8], index: usize) -> R {
        R::decode(self.slot_bytes::<R>(value, index))
    }

    pub fn write<R: Record>(&self, value: &mut [u8], index: usize, record: &R) {
        let start = self.offset(index);
        if let Some(dst) = value.get_mut(start..start.saturating_add(R::BYTES.min(self.record_bytes))) {
            record.encode(dst);
        }
    }

    fn probe(&self, key: u64) -> impl Iterator<Item = usize> {
        let slots = self.slots.max(1);
        // High bits choose the slot; low bits already chose the shard.
        let start = usize::try_from((key >> 32) % slots as u64).unwrap_or(0);
        let len = PROBE.min(slots);
        (0..len).map(move |i| start.wrapping_add(i) % slots)
    }

    /// The client's record if present.
    pub fn find<R: Record>(&self, value: &[u8], key: u64) -> Option<Slot<R>> {
        let index = self.probe(key).find(|&i| R::key_of(self.slot_bytes::<R>(value, i)) == key)?;
        Some(Slot { index, record: self.read(value, index), evicted: false })
    }

    /// The client's record, or a fresh one in the slot chosen for it.
    pub fn find_or_make<R: Record>(&self, value: &[u8], key: u64, now_ms: u64) -> Slot<R> {
        if let Some(found) = self.find(value, key) {
            return found;
        }
        // (index, rank, empty)
        let mut victim: Option<(usize, (bool, u64), bool)> = None;
        for index in self.probe(key) {
            let bytes = self.slot_bytes::<R>(value, index);
            if R::key_of(bytes) == 0 {
                victim = Some((index, (false, 0), true));
                break;
            }
            let rank = R::rank_of(bytes, now_ms);
            if victim.is_none_or(|(_, best, _)| rank < best) {
                victim = Some((index, rank, false));
            }
        }
        let (index, _, empty) = victim.unwrap_or((0, (false, 0), true));
        Slot {
            index,
            record: R::new(key),
            evicted: !empty,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::record::{ClientRecord, RECORD_BYTES};
    use proptest::prelude::*;

    const LAYOUT: ShardLayout = ShardLayout { slots: 16, record_bytes: RECORD_BYTES, fingerprint: 42 };

    fn put(layout: &ShardLayout, value: &mut [u8], key: u64, now: u64) -> Slot<ClientRecord> {
        let mut slot: Slot<ClientRecord> = layout.find_or_make(value, key, now);
        slot.record.last_seen_ms = now;
        layout.write(value, slot.index, &slot.record);
        slot
    }

    #[test]
    fn foreign_values_are_empty_shards() {
        let fresh = LAYOUT.empty_value();
        assert_eq!(fresh.len(), 16 + 16 * RECORD_BYTES);
        assert!(LAYOUT.is_current(&fresh));
        let other = ShardLayout { slots: 16, record_bytes: RECORD_BYTES, fingerprint: 43 };
        assert!(!other.is_current(&fresh));
        assert_eq!(other.adopt(Some(fresh.clone())), other.empty_value());
        assert_eq!(LAYOUT.adopt(Some(b"garbage".to_vec())), fresh);
        let mut wrong_format = fresh.clone();
        wrong_format[4] ^= 0xff;
        assert!(!LAYOUT.is_current(&wrong_format));
        assert!(ShardLayout::is_shard(&fresh) && ShardLayout::is_shard(&wrong_format));
        assert!(!ShardLayout::is_shard(b"garbage") && !ShardLayout::is_shard(&fresh[..HEADER_BYTES]));
        assert!(!ShardLayout::is_shard(&fresh[..fresh.len() - 1]));
    }

    #[test]
    fn finds_what_it_stored() {
        let mut v = LAYOUT.empty_value();
        for key in 1..=10u64 {
            let s = put(&LAYOUT, &mut v, key << 32, key);
            assert!(!s.evicted);
        }
        for key in 1..=10u64 {
            let s: Slot<ClientRecord> = LAYOUT.find(&v, key << 32).unwrap();
            assert_eq!(s.record.last_seen_ms, key);
        }
        assert!(LAYOUT.find::<ClientRecord>(&v, 99 << 32).is_none());
    }

    #[test]
    fn full_window_evicts_the_idlest_unpenalized_client() {
        let mut v = LAYOUT.empty_value();
        // Same high bits: all eight land in one probe window.
        let keys: Vec<u64> = (1..=8u64).map(|k| (5u64 << 32) | k).collect();
        for (t, key) in keys.iter().enumerate() {
            put(&LAYOUT, &mut v, *key, 100 + t as u64);
        }
        // The oldest one is in the penalty box: it must survive.
        let mut first: Slot<ClientRecord> = LAYOUT.find(&v, keys[0]).unwrap();
        first.record.penalty_until_ms = 10_000;
        LAYOUT.write(&mut v, first.index, &first.record);

        let s = put(&LAYOUT, &mut v, (5u64 << 32) | 99, 200);
        assert!(s.evicted);
        assert!(LAYOUT.find::<ClientRecord>(&v, keys[0]).is_some(), "penalized client evicted");
        assert!(LAYOUT.find::<ClientRecord>(&v, keys[1]).is_none(), "idlest client kept");
    }

    proptest! {
        /// However many clients arrive, the value never changes size and
        /// the most recent client is always found.
        #[test]
        fn bounded_and_consistent(keys in proptest::collection::vec(1u64..u64::MAX, 1..400)) {
            let mut v = LAYOUT.empty_value();
            for (t, key) in keys.iter().enumerate() {
                put(&LAYOUT, &mut v, *key, t as u64 + 1);
                prop_assert_eq!(v.len(), LAYOUT.value_len());
                prop_assert!(LAYOUT.find::<ClientRecord>(&v, *key).is_some());
            }
        }
    }
}
