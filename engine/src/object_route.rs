//! A private object route's own history, within this Envoy: its requests
//! and distinct ids over a window, how many came from clients with no
//! history on the site and how many asked for an id next to one just asked
//! for, the distinct ids per window it normally has (learned), whether it is
//! being harvested now, and the last numeric ids asked for.
//!
//! Layout, [`OBJECT_ROUTE_BYTES`] bytes: key 8 · last_seen_ms 8 · requests
//! (sliding window) 16 · requests from clients with no history (sliding
//! window) 16 · requests next to a recent id (sliding window) 16 · distinct
//! ids (wide distinct window) 136 · baseline distinct ids per window (f32) 4
//! · baseline samples 4 · the mean being learned while the baseline is still
//! the prior (f32) 4 · harvest_until_ms 8 · the last [`RECENT_IDS`] numeric
//! ids (u64 each, id + 1; 0 = empty) · the ring's next slot 4.

use crate::codec::{Reader, Writer};
use crate::sketch::{WideDistinct, WIDE_DISTINCT_BYTES};
use crate::window::SlidingWindow;

/// Numeric ids remembered for adjacency (a harvest walks in order; people
/// rarely ask for the neighbour of an id someone asked for a moment ago).
pub const RECENT_IDS: usize = 16;

pub const OBJECT_ROUTE_BYTES: usize = 8 + 8 + 16 * 3 + WIDE_DISTINCT_BYTES + 4 + 4 + 4 + 8 + RECENT_IDS * 8 + 4;

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ObjectRouteRecord {
    pub key: u64,
    pub last_seen_ms: u64,
    pub requests: SlidingWindow,
    pub fresh: SlidingWindow,
    pub adjacent: SlidingWindow,
    pub ids: WideDistinct,
    pub baseline: f32,
    pub baseline_samples: u32,
    pub learning_mean: f32,
    pub harvest_until_ms: u64,
    pub recent: [u64; RECENT_IDS],
    pub recent_next: u32,
}

impl ObjectRouteRecord {
    pub fn harvested(&self, now_ms: u64) -> bool {
        self.harvest_until_ms > now_ms
    }

    /// Whether `id` is within `distance` of (but not) a recently asked id.
    pub fn next_to_recent(&self, id: u64, distance: u64) -> bool {
        self.recent.iter().filter(|r| **r != 0).map(|r| r.saturating_sub(1)).any(|r| r != id && r.abs_diff(id) <= distance)
    }

    /// Remembers a numeric id (the oldest is forgotten).
    pub fn remember(&mut self, id: u64) {
        let slot = (self.recent_next as usize) % RECENT_IDS;
        if let Some(s) = self.recent.get_mut(slot) {
            *s = id.saturating_add(1);
        }
        self.recent_next = ((slot + 1) % RECENT_IDS) as u32;
    }

    /// Every field, in the order of the layout above.
    fn encode_fields(&self, w: &mut Writer<'_>) {
        w.u64(self.key);
        w.u64(self.last_seen_ms);
        w.window(&self.requests);
        w.window(&self.fresh);
        w.window(&self.adjacent);
        w.wide_distinct(&self.ids);
        w.f32(self.baseline);
        w.u32(self.baseline_samples);
        w.f32(self.learning_mean);
        w.u64(self.harvest_until_ms);
        for id in &self.recent {
            w.u64(*id);
        }
        w.u32(self.recent_next);
    }

    fn decode_fields(r: &mut Reader<'_>) -> ObjectRouteRecord {
        let finite = |v: f32| if v.is_finite() { v.max(0.0) } else { 0.0 };
        let mut record = ObjectRouteRecord {
            key: r.u64(),
            last_seen_ms: r.u64(),
            requests: r.window(),
            fresh: r.window(),
            adjacent: r.window(),
            ids: r.wide_distinct(),
            baseline: finite(r.f32()),
            baseline_samples: r.u32(),
            learning_mean: finite(r.f32()),
            harvest_until_ms: r.u64(),
            ..ObjectRouteRecord::default()
        };
        for id in record.recent.iter_mut() {
            *id = r.u64();
        }
        record.recent_next = r.u32() % RECENT_IDS as u32;
        record
    }
}

crate::record::impl_record!(ObjectRouteRecord, OBJECT_ROUTE_BYTES);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Record;

    #[test]
    fn codec_round_trips() {
        let mut o = ObjectRouteRecord {
            key: 1,
            last_seen_ms: 2,
            requests: SlidingWindow { start_ms: 3, current: 4, previous: 5 },
            fresh: SlidingWindow { start_ms: 6, current: 7, previous: 8 },
            adjacent: SlidingWindow { start_ms: 9, current: 10, previous: 11 },
            baseline: 12.5,
            baseline_samples: 13,
            learning_mean: 14.5,
            harvest_until_ms: 15,
            ..ObjectRouteRecord::default()
        };
        o.ids.insert(99, 1000, 60_000);
        for id in 0..20 {
            o.remember(id * 3);
        }
        let mut buf = [0u8; OBJECT_ROUTE_BYTES];
        o.encode(&mut buf);
        assert_eq!(ObjectRouteRecord::decode(&buf), o);
    }

    #[test]
    fn neighbours_of_recent_ids() {
        let mut o = ObjectRouteRecord::default();
        assert!(!o.next_to_recent(0, 2), "an empty ring knows no id (0 is not remembered as 0)");
        o.remember(100);
        assert!(o.next_to_recent(101, 2) && o.next_to_recent(98, 2));
        assert!(!o.next_to_recent(100, 2), "the same id is a repeat, not a neighbour");
        assert!(!o.next_to_recent(103, 2));
        for id in 200..216 {
            o.remember(id);
        }
        assert!(!o.next_to_recent(101, 2), "forgotten after {RECENT_IDS} newer ids");
    }
}
