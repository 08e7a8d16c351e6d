//! The Envoy side of the abuse filter: a thin proxy-wasm adapter around the
//! pure `abuse-engine`. Contexts read what the engine needs from the host,
//! call it, and act on its verdict; nothing here decides anything.
//!
//! Host calls go through `proxy_wasm::hostcalls` (which return `Result`)
//! rather than the SDK's context traits (which `unwrap` them), so a host
//! refusal degrades to "let the request through", never to a trap.

mod header_map;
mod held;
mod http;
mod metrics;
mod root;
mod shared_data;
mod waiters;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(root::AbuseFilterRoot::default())
    });
}}
