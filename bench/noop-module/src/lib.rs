//! A dynamic-module HTTP filter that does nothing: every hook Envoy requires,
//! each returning "continue" at once (no host call). `make bench` prices the
//! abuse filter's module against it, as it prices the wasm filter against
//! the no-op wasm filter.

use std::ffi::c_void;

/// A byte range Envoy lends (`envoy_dynamic_module_type_envoy_buffer`).
#[repr(C)]
pub struct Buf {
    pub ptr: *const u8,
    pub len: usize,
}

/// Envoy 1.40's dynamic-module ABI version (see module/src/abi.rs).
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const std::ffi::c_char {
    c"v0.2.0".as_ptr()
}

/// Any non-null pointer will do: the filter keeps no state.
static CONFIG: u8 = 0;

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(_e: *mut c_void, _n: Buf, _c: Buf) -> *const c_void {
    std::ptr::addr_of!(CONFIG) as *const c_void
}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(_c: *const c_void) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_new(_n: Buf, _c: Buf) -> *const c_void {
    std::ptr::null()
}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_destroy(_c: *const c_void) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(_c: *const c_void, _e: *mut c_void) -> *const c_void {
    std::ptr::addr_of!(CONFIG) as *const c_void
}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(_e: *mut c_void, _f: *const c_void, _eos: bool) -> u32 {
    0
}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(_e: *mut c_void, _f: *const c_void, _eos: bool) -> u32 {
    0
}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(_e: *mut c_void, _f: *const c_void) -> u32 {
    0
}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(_e: *mut c_void, _f: *const c_void, _eos: bool) -> u32 {
    0
}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(_e: *mut c_void, _f: *const c_void, _eos: bool) -> u32 {
    0
}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(_e: *mut c_void, _f: *const c_void) -> u32 {
    0
}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(_e: *mut c_void, _f: *const c_void) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(_f: *const c_void) {}

/// A header Envoy lends (`envoy_dynamic_module_type_envoy_http_header`).
#[repr(C)]
pub struct Header {
    pub key: *const u8,
    pub key_len: usize,
    pub value: *const u8,
    pub value_len: usize,
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _e: *mut c_void, _f: *const c_void, _id: u64, _r: u32, _h: *const Header, _hn: usize, _b: *const Buf, _bn: usize,
) {
}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
    _e: *mut c_void, _c: *const c_void, _id: u64, _r: u32, _h: *const Header, _hn: usize, _b: *const Buf, _bn: usize,
) {
}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(_e: *mut c_void, _f: *const c_void, _id: u64) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(_e: *mut c_void, _c: *const c_void, _id: u64) {}

// The other hooks Envoy resolves at load.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _e: *mut c_void, _f: *const c_void, _id: u64, _h: *const Header, _n: usize, _end: bool,
) {
}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _e: *mut c_void, _f: *const c_void, _id: u64, _d: *const Buf, _n: usize, _end: bool,
) {
}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(_e: *mut c_void, _f: *const c_void, _id: u64, _t: *const Header, _n: usize) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(_e: *mut c_void, _f: *const c_void, _id: u64) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(_e: *mut c_void, _f: *const c_void, _id: u64, _reason: u32) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_headers(
    _e: *mut c_void, _c: *const c_void, _id: u64, _h: *const Header, _n: usize, _end: bool,
) {
}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_data(
    _e: *mut c_void, _c: *const c_void, _id: u64, _d: *const Buf, _n: usize, _end: bool,
) {
}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_trailers(_e: *mut c_void, _c: *const c_void, _id: u64, _t: *const Header, _n: usize) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_complete(_e: *mut c_void, _c: *const c_void, _id: u64) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_reset(_e: *mut c_void, _c: *const c_void, _id: u64, _reason: u32) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(_e: *mut c_void, _f: *const c_void) {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(_e: *mut c_void, _f: *const c_void) {}
/// The local reply goes out as it is (0: continue).
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_local_reply(
    _e: *mut c_void, _f: *const c_void, _status: u32, _details: Buf, _reset: bool,
) -> u32 {
    0
}
