//! Where per-client state lives: the tiers, and the rules that merge them.
//!
//! | tier | where | holds | file |
//! |---|---|---|---|
//! | per worker | the worker VM's memory | a bounded table of views: the shared record as last read (`base`) and the worker's own (`local`) | [`tiers`] |
//! | shared | Envoy shared data, one process | fixed-size tables of fixed-size records in shards, changed by compare-and-swap | [`store`], [`shard`], [`layout`] |
//! | scorer | the scoring service, the fleet | fleet-wide aggregates (known accounts, baselines, fleet blocks), asked for borderline clients and fed tick batches | `engine/scorer.rs`, `engine/fleet.rs`, `engine/events.rs` |
//!
//! - [`shard`]: one shared-data value = a 16-byte header + `slots` records;
//!   open addressing over 8 slots, eviction of the least valuable record.
//! - [`store`]: the [`SharedStore`](store::SharedStore) trait (Envoy shared data, or
//!   [`MemoryStore`](store::MemoryStore)), and [`ShardedTable`](store::ShardedTable):
//!   a read-modify-write of one record with CAS retries, so no update is lost.
//! - [`layout`]: each table's manifest beside its shards; a configuration
//!   that changes a table's layout migrates its records at configuration time.
//! - [`tiers`]: the per-worker views in front of the shared client table,
//!   when a request may stay in the worker's view and when it must go to
//!   shared data at once, and the bounds that follow (no increment lost, a
//!   penalty everywhere within T, rate limits overshot by < N × 10 %).
//! - [`merge`]: the merge rules of a worker's delta into the shared record:
//!   counts summed window by window, distinct sketches OR-ed (or the newer
//!   window kept), penalties, risk and last-seen times max-ed, reason sets
//!   united, sequence state from whichever saw the client last.
//!
//! The records themselves (what a slot holds, byte by byte) are below this
//! layer: [`crate::record`] (clients), [`crate::account`], [`crate::endpoint`],
//! [`crate::session`], [`crate::callout`] (cached scorer verdicts).

pub mod layout;
pub mod merge;
pub mod shard;
pub mod store;
pub mod tiers;
