//! The scorer's HTTP inputs: a score request and an event batch, parsed as
//! its handlers do (serde) and checked by its validate.rs (compiled in from
//! the scorer's source: the scorer is a binary crate).
#![no_main]
use abuse_engine::wire::{EventBatch, ScoreRequest};
use libfuzzer_sys::fuzz_target;

#[path = "../../scorer/src/validate.rs"]
#[allow(dead_code)]
mod validate;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = serde_json::from_slice::<ScoreRequest>(data) {
        let _ = validate::check(&req);
    }
    if let Ok(batch) = serde_json::from_slice::<EventBatch>(data) {
        let _ = validate::check_batch(&batch);
        for b in &batch.baselines {
            let _ = validate::check_baseline(b);
        }
    }
});
