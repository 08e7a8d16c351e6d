//! Shard and record codecs: a shard value written by anything (another
//! build, a corrupt write, a hostile neighbour in the same vm_id) and a
//! layout manifest beside it. Every record type decodes any bytes; the
//! table's update and the layout migration take any stored value.
#![no_main]
use abuse_engine::account::AccountRecord;
use abuse_engine::callout::VerdictRecord;
use abuse_engine::endpoint::{EndpointRecord, FingerprintRecord, SprayRecord};
use abuse_engine::layout::{migrate_client, LayoutManifest};
use abuse_engine::record::ClientRecord;
use abuse_engine::session::SessionRecord;
use abuse_engine::shard::{Record, ShardLayout};
use abuse_engine::store::ShardedTable;
use abuse_engine::{MemoryStore, SharedStore};
use libfuzzer_sys::fuzz_target;

mod common;

fn decode_all(bytes: &[u8]) {
    let _ = ClientRecord::decode(bytes);
    let _ = AccountRecord::decode(bytes);
    let _ = EndpointRecord::decode(bytes);
    let _ = SprayRecord::decode(bytes);
    let _ = FingerprintRecord::decode(bytes);
    let _ = SessionRecord::decode(bytes);
    let _ = VerdictRecord::decode(bytes);
}

fuzz_target!(|data: &[u8]| {
    let [record, shard, manifest, key] = common::fields::<4>(data);
    decode_all(record);
    let _ = ShardLayout::is_shard(shard);
    let key = u64::from_le_bytes(std::array::from_fn(|i| key.get(i).copied().unwrap_or(0)));

    // A table whose shards and manifest hold the fuzzer's bytes.
    let store = MemoryStore::new();
    let table: ShardedTable<ClientRecord> = ShardedTable::new("f", "clients", 2, 8, 1);
    let _ = store.set("f/clients/0", shard, None);
    let _ = store.set("f/clients/1", shard, None);
    let _ = store.set("f/clients/layout", manifest, None);
    if let Some(m) = LayoutManifest::decode(manifest) {
        let _ = migrate_client(&m, &table.manifest(), record);
        let _ = m.field_map(&table.manifest());
    }
    let _ = table.peek(&store, key);
    let _ = table.update(&store, key, 1000, |r| {
        r.requests = r.requests.saturating_add(1);
        ((), true)
    });
    let _ = table.adopt_layout(&store, &migrate_client, 2000);
    let _ = table.update(&store, key | 1, 3000, |r| ((), r.key() != 0));
    let layout = table.layout();
    let _ = layout.find::<ClientRecord>(shard, key);
    let _ = layout.find_or_make::<ClientRecord>(shard, key, 4000);
});
