//! Safe wrappers over the ABI calls: every pointer handed to Envoy lives for
//! the call, every buffer Envoy hands back is read within the hook that got
//! it, and a refusal reads as "nothing" (the caller fails open).

use crate::abi::{self, EnvoyBuffer, EnvoyHeader, FilterEnvoyPtr, ModuleBuffer, ModuleHeader};

/// Logs under Envoy's `[dynamic_modules]` logger.
pub fn log(level: u32, message: &str) {
    // SAFETY: plain values; the message lives for the call.
    unsafe {
        if abi::envoy_dynamic_module_callback_log_enabled(level) {
            abi::envoy_dynamic_module_callback_log(level, ModuleBuffer::of(message.as_bytes()));
        }
    }
}

/// Most headers looked at (Envoy's own default limit is 100).
const MAX_HEADERS: usize = 128;

/// One stream's header map, read in one call without copying: the slices
/// point into Envoy's map and are valid until the hook returns or a header
/// is set (the borrow on `HeaderMap` keeps writes out while they live).
pub struct HeaderMap {
    pairs: Vec<EnvoyHeader>,
}

impl HeaderMap {
    pub fn read(filter: FilterEnvoyPtr, header_type: u32) -> HeaderMap {
        // SAFETY: the vector has room for `n` headers, as the ABI requires.
        unsafe {
            let n = abi::envoy_dynamic_module_callback_http_get_headers_size(filter, header_type).min(MAX_HEADERS * 4);
            let mut pairs = vec![EnvoyHeader::EMPTY; n];
            if n == 0 || !abi::envoy_dynamic_module_callback_http_get_headers(filter, header_type, pairs.as_mut_ptr()) {
                pairs.clear();
            }
            HeaderMap { pairs }
        }
    }

    /// Every (name, value), in the client's order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        // SAFETY: Envoy filled these for the current hook (see the type's doc).
        self.pairs.iter().take(MAX_HEADERS).map(|h| unsafe {
            (
                EnvoyBuffer { ptr: h.key_ptr, len: h.key_len }.bytes(),
                EnvoyBuffer { ptr: h.value_ptr, len: h.value_len }.bytes(),
            )
        })
    }

    /// The first value of a header (names are case-insensitive).
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.iter().find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes())).map(|(_, v)| v)
    }

    /// The first `limit` header names, comma-separated, in the client's order.
    pub fn names(&self, limit: usize) -> String {
        let mut out = String::new();
        for (i, (name, _)) in self.iter().take(limit).enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&String::from_utf8_lossy(name));
        }
        out
    }
}

/// The response-code details of the filter's local replies.
pub const REPLY_DETAILS: &str = "abuse_filter";

/// One header value, copied (for the answer phase's few reads).
pub fn header(filter: FilterEnvoyPtr, header_type: u32, name: &str) -> Option<Vec<u8>> {
    let mut out = EnvoyBuffer::EMPTY;
    // SAFETY: valid pointers for the call; the result is copied at once.
    unsafe {
        let found = abi::envoy_dynamic_module_callback_http_get_header(
            filter,
            header_type,
            ModuleBuffer::of(name.as_bytes()),
            &mut out,
            0,
            std::ptr::null_mut(),
        );
        (found && !out.ptr.is_null()).then(|| out.bytes().to_vec())
    }
}

/// Sets (or, with None, removes) a header. At this ABI an empty value
/// cannot be written (Envoy's set removes the header, its add refuses):
/// where the wasm filter sends `x-abuse-reasons: ` (a clean request that
/// forged the header), the module removes it — the client's copy never
/// reaches the upstream either way.
pub fn set_header(filter: FilterEnvoyPtr, header_type: u32, name: &str, value: Option<&[u8]>) {
    let value = value.filter(|v| !v.is_empty()).map(ModuleBuffer::of).unwrap_or(ModuleBuffer::NULL);
    // SAFETY: valid buffers for the call.
    unsafe {
        abi::envoy_dynamic_module_callback_http_set_header(filter, header_type, ModuleBuffer::of(name.as_bytes()), value);
    }
}

/// The `:status` of the response.
pub fn response_status(filter: FilterEnvoyPtr) -> Option<u32> {
    let value = header(filter, abi::RESPONSE_HEADER, ":status")?;
    std::str::from_utf8(&value).ok()?.parse().ok()
}

/// `source.address` (`ip:port`), as the connection manager names the client.
pub fn source_address(filter: FilterEnvoyPtr) -> Option<Vec<u8>> {
    let mut out = EnvoyBuffer::EMPTY;
    // SAFETY: valid pointers; copied at once.
    unsafe {
        abi::envoy_dynamic_module_callback_http_filter_get_attribute_string(filter, abi::ATTRIBUTE_SOURCE_ADDRESS, &mut out)
            .then(|| out.bytes().to_vec())
    }
}

/// Filter state for Envoy's access log (`%FILTER_STATE(key:PLAIN)%`).
pub fn set_filter_state(filter: FilterEnvoyPtr, key: &str, value: &str) {
    // SAFETY: valid buffers for the call; Envoy copies them.
    unsafe {
        abi::envoy_dynamic_module_callback_http_set_filter_state_bytes(
            filter,
            ModuleBuffer::of(key.as_bytes()),
            ModuleBuffer::of(value.as_bytes()),
        );
    }
}

/// A local reply; the stream stops here. Its response-code details
/// (`%RESPONSE_CODE_DETAILS%`) are `abuse_filter`: Envoy gives every module
/// reply details (`dynamic_module` when none is passed), where a proxy-wasm
/// local reply has none (eval/report.py reads both).
pub fn send_response(filter: FilterEnvoyPtr, status: u32, headers: &[(&str, &[u8])], body: &[u8]) {
    let mut raw: Vec<ModuleHeader> = headers.iter().map(|(k, v)| ModuleHeader::of(k, v)).collect();
    // SAFETY: the headers and body live for the call; Envoy copies them.
    unsafe {
        abi::envoy_dynamic_module_callback_http_send_response(
            filter,
            status,
            raw.as_mut_ptr(),
            raw.len(),
            ModuleBuffer::of(body),
            ModuleBuffer::of(REPLY_DETAILS.as_bytes()),
        );
    }
}

pub fn continue_decoding(filter: FilterEnvoyPtr) {
    // SAFETY: the filter pointer Envoy gave this stream.
    unsafe { abi::envoy_dynamic_module_callback_http_filter_continue_decoding(filter) }
}

/// The request body so far: what earlier calls buffered, then this call's chunk.
pub fn request_body(filter: FilterEnvoyPtr) -> Vec<u8> {
    let mut out = Vec::new();
    // SAFETY: chunk arrays sized as the ABI says; copied at once.
    unsafe {
        let same = abi::envoy_dynamic_module_callback_http_received_buffered_request_body(filter);
        let kinds: &[u32] = if same { &[abi::BUFFERED_REQUEST_BODY] } else { &[abi::BUFFERED_REQUEST_BODY, abi::RECEIVED_REQUEST_BODY] };
        for kind in kinds {
            let n = abi::envoy_dynamic_module_callback_http_get_body_chunks_size(filter, *kind);
            if n == 0 {
                continue;
            }
            let mut chunks = vec![EnvoyBuffer::EMPTY; n];
            if abi::envoy_dynamic_module_callback_http_get_body_chunks(filter, *kind, chunks.as_mut_ptr()) {
                for c in &chunks {
                    out.extend_from_slice(c.bytes());
                }
            }
        }
    }
    out
}

/// Bytes of request body so far (buffered plus this call's chunk).
pub fn request_body_size(filter: FilterEnvoyPtr) -> usize {
    // SAFETY: plain values.
    unsafe {
        let buffered = abi::envoy_dynamic_module_callback_http_get_body_size(filter, abi::BUFFERED_REQUEST_BODY);
        if abi::envoy_dynamic_module_callback_http_received_buffered_request_body(filter) {
            buffered
        } else {
            buffered.saturating_add(abi::envoy_dynamic_module_callback_http_get_body_size(filter, abi::RECEIVED_REQUEST_BODY))
        }
    }
}

/// A callout from a stream: its id, or None when Envoy refused it.
pub fn stream_callout(filter: FilterEnvoyPtr, cluster: &str, headers: &[(&str, &[u8])], body: &[u8], timeout_ms: u64) -> Option<u64> {
    let mut raw: Vec<ModuleHeader> = headers.iter().map(|(k, v)| ModuleHeader::of(k, v)).collect();
    let mut id = 0u64;
    // SAFETY: everything lives for the call; Envoy copies the request.
    let result = unsafe {
        abi::envoy_dynamic_module_callback_http_filter_http_callout(
            filter,
            &mut id,
            ModuleBuffer::of(cluster.as_bytes()),
            raw.as_mut_ptr(),
            raw.len(),
            ModuleBuffer::of(body),
            timeout_ms,
        )
    };
    (result == abi::CALLOUT_INIT_SUCCESS).then_some(id)
}

/// A callout's answer: its status (None: reset, timed out or refused) and
/// body (bounded: one byte past `limit` is kept, so a larger answer is refused, not cut).
///
/// # Safety
/// The arrays must be the ones Envoy handed to the current callout hook.
pub unsafe fn callout_answer(
    result: u32,
    headers: *const EnvoyHeader,
    headers_len: usize,
    chunks: *const EnvoyBuffer,
    chunks_len: usize,
    limit: usize,
) -> (Option<u32>, Vec<u8>) {
    if result != abi::CALLOUT_SUCCESS || headers.is_null() || headers_len == 0 {
        return (None, Vec::new());
    }
    let headers = std::slice::from_raw_parts(headers, headers_len);
    let status = headers.iter().find_map(|h| {
        let key = EnvoyBuffer { ptr: h.key_ptr, len: h.key_len }.bytes();
        (key == b":status").then(|| EnvoyBuffer { ptr: h.value_ptr, len: h.value_len }.bytes())
    });
    let status = status.and_then(|s| std::str::from_utf8(s).ok()?.parse().ok());
    let mut body = Vec::new();
    if !chunks.is_null() {
        for c in std::slice::from_raw_parts(chunks, chunks_len) {
            let bytes = c.bytes();
            let room = limit.saturating_add(1).saturating_sub(body.len());
            body.extend_from_slice(bytes.get(..room.min(bytes.len())).unwrap_or_default());
        }
    }
    (status, body)
}
