//! What a fresh Envoy warms from: the fleet's copy of the known-accounts
//! Bloom filter and the learned baselines, as this process keeps them (the
//! whole state of a single scorer, and the mirror of a Redis-backed one).
//!
//! The filter's geometry is the engine's, never re-implemented here:
//! [`bit_positions`] names an account's shard and bits, [`SHARDS`] shards of
//! [`SHARD_BITS`] bits, bit `b` being bit `b % 8` of byte `b / 8` (least
//! significant first) — the layout of the shard's bytes on the wire and in
//! the filter's shared data (after its magic). Memory is fixed: a shard's
//! 1 KiB is allocated when its first bit is set, so 1 MiB at most.
//!
//! Baselines are kept per name, the warmer one (more `samples`; on a tie the
//! newer) winning, at most [`BASELINE_NAMES`] names.

use abuse_engine::known_accounts::{bit_positions, SHARDS, SHARD_BITS};
use abuse_engine::wire::{BaselineSnapshot, KnownShard, MAX_BASELINES};
use base64::Engine as _;
use std::collections::BTreeMap;

/// Bytes of one shard's bits (1024).
pub const SHARD_LEN: usize = (SHARD_BITS / 8) as usize;

/// One shard's bits, in the wire layout.
pub type ShardBits = Box<[u8; SHARD_LEN]>;

/// Baseline names kept: all of them fit in one warm answer.
pub const BASELINE_NAMES: usize = MAX_BASELINES;

/// A name no batch mentioned for this long may make room for a new one
/// when all [`BASELINE_NAMES`] are taken (a renamed route group must not
/// hold its slot forever). Names in use are never evicted.
pub const BASELINE_STALE_MS: u64 = 24 * 60 * 60 * 1000;

fn empty_shard() -> ShardBits {
    Box::new([0u8; SHARD_LEN])
}

/// Sets bit `bit` (LSB-first); whether it was unset.
pub fn set_bit(shard: &mut [u8], bit: u32) -> bool {
    let Some(byte) = shard.get_mut((bit / 8) as usize) else {
        return false;
    };
    let mask = 1u8 << (bit % 8);
    let was_unset = *byte & mask == 0;
    *byte |= mask;
    was_unset
}

/// Redis numbers the bits of a string most significant first within a
/// byte (`SETBIT key 0 1` sets `0x80` of byte 0): this is the offset that
/// sets our bit `bit`, so that the string's bytes are the wire layout.
pub fn redis_offset(bit: u32) -> u64 {
    u64::from(bit / 8) * 8 + u64::from(7 - bit % 8)
}

pub fn is_empty(bits: &[u8]) -> bool {
    bits.iter().all(|b| *b == 0)
}

/// A shard from stored bytes: shorter ones (a Redis string only grows to
/// its highest set bit) are padded with zeros, longer ones cut.
pub fn shard_from(bytes: &[u8]) -> ShardBits {
    let mut shard = empty_shard();
    for (dst, src) in shard.iter_mut().zip(bytes) {
        *dst = *src;
    }
    shard
}

/// Standard base64, padded (the wire's `KnownShard::bits`).
pub fn encode(bits: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bits)
}

/// Shards as the wire (and `warm.json`) carries them.
pub fn wire_shards(shards: &[(usize, ShardBits)]) -> Vec<KnownShard> {
    shards
        .iter()
        .map(|(index, bits)| KnownShard {
            index: u32::try_from(*index).unwrap_or(u32::MAX),
            bits: encode(bits.as_slice()),
        })
        .collect()
}

/// The shard a `KnownShard::bits` names, if it is exactly one shard's bytes.
pub fn decode(text: &str) -> Option<ShardBits> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?;
    (bytes.len() == SHARD_LEN).then(|| shard_from(&bytes))
}

/// A page of non-empty shards, ascending by index, and where the next page
/// starts: the index after the last shard of this one while non-empty
/// shards remain after it, None when there are none.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ShardPage {
    pub shards: Vec<(usize, ShardBits)>,
    pub next: Option<usize>,
}

impl ShardPage {
    /// Up to `max` of `non_empty` (ascending indices ≥ the page's start),
    /// fetched with `bits`.
    pub fn collect(
        non_empty: impl Iterator<Item = usize>,
        max: usize,
        mut bits: impl FnMut(usize) -> Option<ShardBits>,
    ) -> ShardPage {
        let mut page = ShardPage::default();
        for index in non_empty {
            if page.shards.len() >= max {
                page.next = page.shards.last().map(|(last, _)| last + 1);
                break;
            }
            if let Some(b) = bits(index) {
                page.shards.push((index, b));
            }
        }
        page
    }

    /// First index this page does not speak for: everything before it
    /// (from the page's start) that is non-empty is in it.
    fn covered_to(&self) -> usize {
        self.next.unwrap_or(SHARDS)
    }
}

/// The union of two pages read from the same start (Redis's and the local
/// mirror's): shards in both are ORed, and the page speaks only for the
/// range both cover, cut again to `max`.
pub fn merge_pages(a: ShardPage, b: ShardPage, max: usize) -> ShardPage {
    let covered = a.covered_to().min(b.covered_to());
    let mut union: BTreeMap<usize, ShardBits> = BTreeMap::new();
    for (index, bits) in a.shards.into_iter().chain(b.shards) {
        if index >= covered {
            continue;
        }
        match union.get_mut(&index) {
            Some(mine) => {
                for (m, t) in mine.iter_mut().zip(bits.iter()) {
                    *m |= *t;
                }
            }
            None => {
                union.insert(index, bits);
            }
        }
    }
    let truncated = union.len() > max;
    let shards: Vec<(usize, ShardBits)> = union.into_iter().take(max).collect();
    let next = if truncated {
        shards.last().map(|(last, _)| last + 1)
    } else {
        (covered < SHARDS).then_some(covered)
    };
    ShardPage { shards, next }
}

/// The known-accounts filter, shard by shard (allocated on first use).
pub struct KnownFilter {
    shards: Vec<Option<ShardBits>>,
}

impl Default for KnownFilter {
    fn default() -> Self {
        KnownFilter::new()
    }
}

impl KnownFilter {
    pub fn new() -> KnownFilter {
        KnownFilter {
            shards: (0..SHARDS).map(|_| None).collect(),
        }
    }

    /// Sets the account's bits; whether it was new (some bit was unset).
    pub fn add(&mut self, account: u64) -> bool {
        let (index, bits) = bit_positions(account);
        let Some(slot) = self.shards.get_mut(index) else {
            return false;
        };
        let shard = slot.get_or_insert_with(empty_shard);
        let mut new = false;
        for b in bits {
            new |= set_bit(shard.as_mut_slice(), b);
        }
        new
    }

    /// ORs `bits` into shard `index`; whether that set any bit.
    pub fn merge(&mut self, index: usize, bits: &[u8]) -> bool {
        let Some(slot) = self.shards.get_mut(index) else {
            return false;
        };
        if is_empty(bits) {
            return false;
        }
        let shard = slot.get_or_insert_with(empty_shard);
        let mut changed = false;
        for (m, t) in shard.iter_mut().zip(bits) {
            changed |= *t & !*m != 0;
            *m |= *t;
        }
        changed
    }

    /// Up to `max` non-empty shards with index ≥ `from` (see [`ShardPage`]).
    pub fn page(&self, from: usize, max: usize) -> ShardPage {
        let non_empty = self
            .shards
            .iter()
            .enumerate()
            .skip(from)
            .filter(|(_, s)| s.as_deref().is_some_and(|s| !is_empty(s)))
            .map(|(i, _)| i);
        ShardPage::collect(non_empty, max, |i| self.shards.get(i)?.clone())
    }
}

/// Whether `new` should replace `old`: the warmer wins, the newer on a tie.
pub fn replaces(new: &BaselineSnapshot, old: &BaselineSnapshot) -> bool {
    new.samples >= old.samples
}

/// What merging one baseline did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merged {
    /// Stored (a new name, or warmer than the one kept).
    Stored,
    /// The kept one is warmer; only its name was seen.
    Kept,
    /// A new name while all are taken by names in use.
    Dropped,
}

/// Baselines per name, with when a batch last mentioned each.
#[derive(Default)]
pub struct Baselines {
    by_name: BTreeMap<String, (BaselineSnapshot, u64)>,
}

impl Baselines {
    pub fn merge(&mut self, b: &BaselineSnapshot, now_ms: u64) -> Merged {
        if let Some((kept, seen)) = self.by_name.get_mut(&b.name) {
            *seen = now_ms.max(*seen);
            if replaces(b, kept) {
                *kept = b.clone();
                return Merged::Stored;
            }
            return Merged::Kept;
        }
        if self.by_name.len() >= BASELINE_NAMES {
            let stalest = self
                .by_name
                .iter()
                .min_by_key(|(_, (_, seen))| *seen)
                .filter(|(_, (_, seen))| now_ms.saturating_sub(*seen) >= BASELINE_STALE_MS)
                .map(|(name, _)| name.clone());
            match stalest {
                Some(name) => {
                    self.by_name.remove(&name);
                }
                None => return Merged::Dropped,
            }
        }
        self.by_name.insert(b.name.clone(), (b.clone(), now_ms));
        Merged::Stored
    }

    /// Every baseline kept, by name.
    pub fn list(&self) -> Vec<BaselineSnapshot> {
        self.by_name.values().map(|(b, _)| b.clone()).collect()
    }

    /// Every baseline kept with when it was last mentioned (snapshots).
    pub fn entries(&self) -> impl Iterator<Item = (&BaselineSnapshot, u64)> {
        self.by_name.values().map(|(b, seen)| (b, *seen))
    }

    /// Puts back a saved entry (at start, before any batch).
    pub fn restore(&mut self, b: BaselineSnapshot, seen_ms: u64) {
        if self.by_name.len() < BASELINE_NAMES || self.by_name.contains_key(&b.name) {
            self.by_name.insert(b.name.clone(), (b, seen_ms));
        }
    }
}

/// The union of two baseline lists (Redis's and the local mirror's), by
/// name, the warmer winning (`first` on a tie), at most [`MAX_BASELINES`],
/// `first`'s names before the others'.
pub fn merge_lists(
    first: Vec<BaselineSnapshot>,
    second: Vec<BaselineSnapshot>,
) -> Vec<BaselineSnapshot> {
    let mut out = first;
    for b in second {
        match out.iter_mut().find(|kept| kept.name == b.name) {
            Some(kept) => {
                if b.samples > kept.samples {
                    *kept = b;
                }
            }
            None => out.push(b),
        }
    }
    out.truncate(MAX_BASELINES);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use abuse_engine::known_accounts::KnownAccounts;
    use abuse_engine::MemoryStore as EngineStore;

    fn baseline(name: &str, samples: u32, baseline: f32) -> BaselineSnapshot {
        BaselineSnapshot {
            name: name.into(),
            baseline,
            samples,
            ..BaselineSnapshot::default()
        }
    }

    #[test]
    fn bits_are_the_ones_bit_positions_names_lsb_first() {
        let mut f = KnownFilter::new();
        let account = 0x1234_5678_9abc_def0u64;
        assert!(f.add(account));
        assert!(!f.add(account), "already known");
        let (shard, bits) = bit_positions(account);
        let page = f.page(0, 64);
        assert_eq!(page.shards.len(), 1);
        assert_eq!(page.next, None);
        let (index, got) = &page.shards[0];
        assert_eq!(*index, shard);
        let mut expected = [0u8; SHARD_LEN];
        for b in bits {
            expected[(b / 8) as usize] |= 1 << (b % 8);
        }
        assert_eq!(&got[..], &expected[..]);
        assert_eq!(decode(&encode(&got[..])).unwrap(), *got);
        assert!(decode("AAAA").is_none(), "not one shard");
        assert!(decode("not base64!").is_none());
    }

    #[test]
    fn the_engine_reads_what_the_scorer_wrote() {
        // The end-to-end check of the geometry: bits set here, ORed into
        // the filter's shared data by the engine's own merge, make the
        // engine know the accounts.
        let mut f = KnownFilter::new();
        let accounts: Vec<u64> = (0..3_000u64)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .collect();
        for a in &accounts {
            f.add(*a);
        }
        let (k, store) = (KnownAccounts::new("t"), EngineStore::new());
        k.create_shards(&store).unwrap();
        let mut from = Some(0);
        let mut pages = 0;
        while let Some(start) = from {
            let page = f.page(start, 64);
            for (index, bits) in &page.shards {
                k.merge(&store, *index, &bits[..]).unwrap();
            }
            from = page.next;
            pages += 1;
        }
        assert_eq!(pages, SHARDS / 64, "3,000 accounts touch every shard");
        assert!(accounts.iter().all(|a| k.contains(&store, *a)));
        assert!(!k.contains(&store, 77), "an account never added");
    }

    #[test]
    fn redis_offsets_are_msb_first() {
        assert_eq!(redis_offset(0), 7);
        assert_eq!(redis_offset(7), 0);
        assert_eq!(redis_offset(8), 15);
        assert_eq!(redis_offset(SHARD_BITS - 1), u64::from(SHARD_BITS) - 8);
        let mut shard = [0u8; SHARD_LEN];
        assert!(set_bit(&mut shard, 9));
        assert!(!set_bit(&mut shard, 9));
        assert_eq!(shard[1], 0b10);
        assert!(!set_bit(&mut shard, SHARD_BITS), "out of range: ignored");
    }

    #[test]
    fn pages_skip_empty_shards_and_say_where_to_go_on() {
        let mut f = KnownFilter::new();
        // One account in each of shards 3, 10, 11 and 1000.
        for shard in [3u64, 10, 11, 1000] {
            f.add(shard + 1024 * 5);
        }
        let p = f.page(0, 2);
        assert_eq!(
            p.shards.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            [3, 10]
        );
        assert_eq!(p.next, Some(11));
        let p = f.page(11, 2);
        assert_eq!(
            p.shards.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            [11, 1000]
        );
        assert_eq!(
            p.next, None,
            "a full page with nothing after it is the last"
        );
        let p = f.page(4, 64);
        assert_eq!(p.shards.len(), 3);
        assert_eq!(p.next, None);
        assert_eq!(f.page(1001, 64), ShardPage::default());
        assert_eq!(f.page(5000, 64), ShardPage::default());
        assert_eq!(KnownFilter::new().page(0, 64), ShardPage::default());
    }

    #[test]
    fn merged_pages_are_the_union_within_what_both_cover() {
        let (mut a, mut b) = (KnownFilter::new(), KnownFilter::new());
        for s in [1u64, 5, 9] {
            a.add(s);
        }
        for s in [2u64, 5, 1024 + 5, 7, 8] {
            b.add(s);
        }
        let m = merge_pages(a.page(0, 64), b.page(0, 64), 64);
        assert_eq!(
            m.shards.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            [1, 2, 5, 7, 8, 9]
        );
        assert_eq!(m.next, None);
        let five = &m.shards[2].1;
        let mut both = KnownFilter::new();
        for s in [5u64, 1024 + 5] {
            both.add(s);
        }
        assert_eq!(five, &both.page(5, 1).shards[0].1, "ORed");
        // a covers [0, 6) only (next 6): b's 7 and 8 wait for the next page.
        let m = merge_pages(a.page(0, 2), b.page(0, 64), 64);
        assert_eq!(
            m.shards.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            [1, 2, 5]
        );
        assert_eq!(m.next, Some(6));
        // Cut to max.
        let m = merge_pages(a.page(0, 64), b.page(0, 64), 4);
        assert_eq!(
            m.shards.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            [1, 2, 5, 7]
        );
        assert_eq!(m.next, Some(8));
        // Paging through the merge sees every shard once.
        let mut from = Some(0);
        let mut seen = Vec::new();
        while let Some(start) = from {
            let m = merge_pages(a.page(start, 1), b.page(start, 2), 2);
            seen.extend(m.shards.iter().map(|(i, _)| *i));
            from = m.next;
        }
        assert_eq!(seen, [1, 2, 5, 7, 8, 9]);
    }

    #[test]
    fn warmer_baselines_win_and_names_are_bounded() {
        let mut b = Baselines::default();
        assert_eq!(b.merge(&baseline("login:/a", 100, 0.1), 0), Merged::Stored);
        assert_eq!(b.merge(&baseline("login:/a", 50, 0.9), 1), Merged::Kept);
        assert_eq!(b.list()[0].baseline, 0.1);
        assert_eq!(
            b.merge(&baseline("login:/a", 100, 0.2), 2),
            Merged::Stored,
            "a tie: the newer"
        );
        assert_eq!(b.list()[0].baseline, 0.2);
        assert_eq!(b.merge(&baseline("login:/a", 101, 0.3), 3), Merged::Stored);
        for i in 1..BASELINE_NAMES {
            assert_eq!(
                b.merge(&baseline(&format!("group:{i}"), 1, 1.0), 10),
                Merged::Stored
            );
        }
        assert_eq!(b.list().len(), BASELINE_NAMES);
        assert_eq!(b.merge(&baseline("group:new", 1, 1.0), 20), Merged::Dropped);
        // Once a name went unmentioned for a day, a new one takes its slot.
        let later = 10 + BASELINE_STALE_MS;
        for i in 2..BASELINE_NAMES {
            b.merge(&baseline(&format!("group:{i}"), 1, 1.0), later);
        }
        b.merge(&baseline("login:/a", 1, 1.0), later);
        assert_eq!(
            b.merge(&baseline("group:new", 1, 1.0), later),
            Merged::Stored
        );
        let names: Vec<String> = b.list().into_iter().map(|b| b.name).collect();
        assert!(names.contains(&"group:new".to_string()));
        assert!(
            !names.contains(&"group:1".to_string()),
            "the stale one went"
        );
        assert_eq!(names.len(), BASELINE_NAMES);
    }

    #[test]
    fn merged_lists_keep_the_warmer_per_name() {
        let m = merge_lists(
            vec![baseline("a", 10, 1.0), baseline("b", 5, 1.0)],
            vec![
                baseline("b", 6, 2.0),
                baseline("c", 1, 3.0),
                baseline("a", 10, 9.0),
            ],
        );
        assert_eq!(
            m.iter()
                .map(|b| (b.name.as_str(), b.baseline))
                .collect::<Vec<_>>(),
            [("a", 1.0), ("b", 2.0), ("c", 3.0)]
        );
        let many: Vec<_> = (0..100)
            .map(|i| baseline(&format!("n{i}"), 1, 0.0))
            .collect();
        assert_eq!(merge_lists(many, vec![]).len(), MAX_BASELINES);
    }
}
