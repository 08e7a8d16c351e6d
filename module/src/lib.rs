//! The abuse filter as an Envoy dynamic module: a second thin host adapter
//! over the same pure `abuse-engine` as the proxy-wasm filter (`src/`), with
//! the same JSON configuration, stats names, decisions and access-log facts.
//! Where the hosts differ: headers are read in place (no copy), state lives
//! in an in-process store with a lock per shard (no shared-data mutex, no
//! VM crossing), one engine serves every worker (`Sync`), and the tick runs
//! on Envoy's main thread through the config scheduler.
//!
//! A native module is trusted code: it runs in Envoy's process with Envoy's
//! privileges, and a crash is Envoy's crash. So every hook below runs under
//! `catch_unwind` (a panic across the C ABI is undefined behaviour; one that
//! is caught fails the request open), and the crate obeys the workspace's
//! clippy bans on `unwrap`/`expect`/`panic`/indexing. Built with
//! `panic = "unwind"` (`cargo build --profile module`), or the guard could
//! not catch anything.

// Every hook is `unsafe extern "C"`: its contract is the ABI's (Envoy
// passes back only the pointers it handed out, on the thread the ABI
// names), which a Rust caller could not uphold by accident.
#![allow(clippy::missing_safety_doc)]

mod abi;
mod config;
mod filter;
mod host;
mod stats;
mod store;

pub use store::InProcessStore;

use abi::{ConfigEnvoyPtr, EnvoyBuffer, EnvoyHeader, FilterEnvoyPtr};
use config::FilterConfig;
use filter::{AbuseFilter, Step};
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

/// Runs a hook; a panic becomes `fallback` (and one log line).
fn guard<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(_) => {
            host::log(abi::LOG_ERROR, "abuse_filter: a hook panicked; the request goes on (fail open)");
            fallback
        }
    }
}

/// Envoy loads the module: the ABI version it was built for. Envoy 1.40
/// accepts its own (`v0.2.0`) and warns on the previous minor's.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const std::ffi::c_char {
    abi::ABI_VERSION.as_ptr()
}

/// A filter configuration (main thread): the JSON is the wasm filter's
/// plugin configuration, byte for byte. Null refuses it (Envoy then
/// rejects the listener), with the reason logged.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    envoy: ConfigEnvoyPtr,
    name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> *const c_void {
    guard(std::ptr::null(), || {
        // SAFETY: Envoy's buffers for this call.
        let (name, json) = unsafe { (name.bytes(), config.bytes()) };
        let name = String::from_utf8_lossy(name);
        match FilterConfig::new(envoy, &name, json) {
            Ok(cfg) => Box::into_raw(Box::new(cfg)) as *const c_void,
            Err(e) => {
                host::log(abi::LOG_ERROR, &e);
                std::ptr::null()
            }
        }
    })
}

/// # Safety
/// `ptr` must come from `on_http_filter_config_new` (Envoy guarantees it).
unsafe fn config_ref<'a>(ptr: *const c_void) -> Option<&'a Arc<FilterConfig>> {
    (ptr as *const Arc<FilterConfig>).as_ref()
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(ptr: *const c_void) {
    guard((), || {
        if ptr.is_null() {
            return;
        }
        // SAFETY: created by Box::into_raw in config_new; Envoy destroys it once.
        let cfg = unsafe { Box::from_raw(ptr as *mut Arc<FilterConfig>) };
        cfg.stop();
    })
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(_envoy: ConfigEnvoyPtr, ptr: *const c_void, _event: u64) {
    guard((), || {
        // SAFETY: see config_ref.
        if let Some(cfg) = unsafe { config_ref(ptr) } {
            cfg.on_tick();
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
    _envoy: ConfigEnvoyPtr,
    ptr: *const c_void,
    id: u64,
    result: u32,
    headers: *const EnvoyHeader,
    headers_len: usize,
    chunks: *const EnvoyBuffer,
    chunks_len: usize,
) {
    guard((), || {
        // SAFETY: see config_ref; the arrays are this hook's.
        if let Some(cfg) = unsafe { config_ref(ptr) } {
            unsafe { cfg.on_callout_done(id, result, headers, headers_len, chunks, chunks_len) };
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_new(_name: EnvoyBuffer, _config: EnvoyBuffer) -> *const c_void {
    // No per-route configuration: the filter's own route groups decide.
    std::ptr::null()
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_destroy(_ptr: *const c_void) {}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_new(config: *const c_void, envoy: FilterEnvoyPtr) -> *const c_void {
    guard(std::ptr::null(), || {
        // SAFETY: see config_ref.
        match unsafe { config_ref(config) } {
            Some(cfg) => Box::into_raw(Box::new(AbuseFilter::new(cfg.clone(), envoy))) as *const c_void,
            None => std::ptr::null(),
        }
    })
}

/// # Safety
/// `ptr` must come from `on_http_filter_new` and not be destroyed yet;
/// Envoy calls a stream's hooks on its one worker thread, one at a time.
unsafe fn filter_mut<'a>(ptr: *const c_void) -> Option<&'a mut AbuseFilter> {
    (ptr as *mut AbuseFilter).as_mut()
}

fn headers_status(step: Step) -> u32 {
    match step {
        Step::Continue => abi::HEADERS_CONTINUE,
        Step::Stop => abi::HEADERS_STOP_ITERATION,
    }
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(_envoy: FilterEnvoyPtr, ptr: *const c_void, end_of_stream: bool) -> u32 {
    guard(abi::HEADERS_CONTINUE, || {
        // SAFETY: see filter_mut.
        match unsafe { filter_mut(ptr) } {
            Some(f) => headers_status(f.on_request_headers(end_of_stream)),
            None => abi::HEADERS_CONTINUE,
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_body(_envoy: FilterEnvoyPtr, ptr: *const c_void, end_of_stream: bool) -> u32 {
    guard(abi::BODY_CONTINUE, || {
        // SAFETY: see filter_mut.
        match unsafe { filter_mut(ptr) }.map(|f| f.on_request_body(end_of_stream)) {
            Some(Step::Stop) => abi::BODY_STOP_AND_BUFFER,
            _ => abi::BODY_CONTINUE,
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(_envoy: FilterEnvoyPtr, _ptr: *const c_void) -> u32 {
    abi::TRAILERS_CONTINUE
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(_envoy: FilterEnvoyPtr, ptr: *const c_void, _end_of_stream: bool) -> u32 {
    guard(abi::HEADERS_CONTINUE, || {
        // SAFETY: see filter_mut.
        match unsafe { filter_mut(ptr) } {
            Some(f) => headers_status(f.on_response_headers()),
            None => abi::HEADERS_CONTINUE,
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_body(_envoy: FilterEnvoyPtr, _ptr: *const c_void, _end_of_stream: bool) -> u32 {
    abi::BODY_CONTINUE
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(_envoy: FilterEnvoyPtr, _ptr: *const c_void) -> u32 {
    abi::TRAILERS_CONTINUE
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(_envoy: FilterEnvoyPtr, _ptr: *const c_void) {}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_destroy(ptr: *const c_void) {
    guard((), || {
        if ptr.is_null() {
            return;
        }
        // SAFETY: created by Box::into_raw in filter_new; destroyed once.
        let mut f = unsafe { Box::from_raw(ptr as *mut AbuseFilter) };
        f.destroy();
    })
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _envoy: FilterEnvoyPtr,
    ptr: *const c_void,
    id: u64,
    result: u32,
    headers: *const EnvoyHeader,
    headers_len: usize,
    chunks: *const EnvoyBuffer,
    chunks_len: usize,
) {
    guard((), || {
        // SAFETY: see filter_mut; the arrays are this hook's.
        if let Some(f) = unsafe { filter_mut(ptr) } {
            let (status, body) = unsafe {
                host::callout_answer(result, headers, headers_len, chunks, chunks_len, abuse_engine::wire::MAX_SCORE_ANSWER_BYTES)
            };
            f.on_callout_done(id, status, &body);
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(_envoy: FilterEnvoyPtr, ptr: *const c_void, _event: u64) {
    guard((), || {
        // SAFETY: see filter_mut.
        if let Some(f) = unsafe { filter_mut(ptr) } {
            f.on_scheduled();
        }
    })
}

// Hooks Envoy resolves at load that this filter has no use for: streamed
// callouts (it makes only whole callouts), write-buffer watermarks (it is
// not a terminal filter) and local replies (left as they are).
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _e: *mut c_void, _f: *const c_void, _id: u64, _h: *const EnvoyHeader, _n: usize, _end: bool,
) {
}
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _e: *mut c_void, _f: *const c_void, _id: u64, _d: *const EnvoyBuffer, _n: usize, _end: bool,
) {
}
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(_e: *mut c_void, _f: *const c_void, _id: u64, _t: *const EnvoyHeader, _n: usize) {}
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(_e: *mut c_void, _f: *const c_void, _id: u64) {}
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(_e: *mut c_void, _f: *const c_void, _id: u64, _reason: u32) {}
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_headers(
    _e: *mut c_void, _c: *const c_void, _id: u64, _h: *const EnvoyHeader, _n: usize, _end: bool,
) {
}
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_data(
    _e: *mut c_void, _c: *const c_void, _id: u64, _d: *const EnvoyBuffer, _n: usize, _end: bool,
) {
}
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_trailers(_e: *mut c_void, _c: *const c_void, _id: u64, _t: *const EnvoyHeader, _n: usize) {}
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_complete(_e: *mut c_void, _c: *const c_void, _id: u64) {}
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_reset(_e: *mut c_void, _c: *const c_void, _id: u64, _reason: u32) {}
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(_e: *mut c_void, _f: *const c_void) {}
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(_e: *mut c_void, _f: *const c_void) {}
/// The local reply goes out as it is (0: continue).
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_local_reply(
    _e: *mut c_void, _f: *const c_void, _status: u32, _details: EnvoyBuffer, _reset: bool,
) -> u32 {
    0
}
