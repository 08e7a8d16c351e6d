//! The plugin configuration: any bytes Envoy hands `on_configure`. Parsing
//! and validation refuse with a message or give a configuration the engine
//! compiles; neither may panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(config) = abuse_engine::Config::from_json(data) {
        let _ = abuse_engine::Engine::new(&config, &[1; abuse_engine::SEED_BYTES]);
    }
});
