//! The request's header map in one host call, read where it lies.
//!
//! The SDK's `hostcalls::get_map_bytes` copies every header into a
//! `String` and a `Vec` (two allocations per header, ~20 per request) and
//! panics on a status it does not expect; this reads the host's serialized
//! map (`proxy_get_header_map_pairs`) and looks headers up in that one
//! buffer. Layout (proxy-wasm ABI 0.2): a u32 count `n`, then `n` pairs of
//! u32 (name length, value length), then each name and value followed by a
//! NUL byte; all little-endian. Every offset is checked: a malformed buffer
//! reads as fewer headers, never as a trap.

use proxy_wasm::types::MapType;

#[link(wasm_import_module = "env")]
extern "C" {
    #[link_name = "proxy_get_header_map_pairs"]
    fn raw_proxy_get_header_map_pairs(map_type: u32, return_data: *mut *mut u8, return_size: *mut usize) -> u32;
}

/// Most headers looked at (Envoy's own default limit is 100).
const MAX_HEADERS: usize = 128;

pub struct HeaderMap {
    buf: Vec<u8>,
}

fn u32_at(buf: &[u8], at: usize) -> Option<usize> {
    let bytes: [u8; 4] = buf.get(at..at.checked_add(4)?)?.try_into().ok()?;
    usize::try_from(u32::from_le_bytes(bytes)).ok()
}

impl HeaderMap {
    /// The request headers (empty if the host refuses).
    pub fn request() -> HeaderMap {
        HeaderMap::read(MapType::HttpRequestHeaders)
    }

    fn read(map: MapType) -> HeaderMap {
        let mut data: *mut u8 = std::ptr::null_mut();
        let mut size: usize = 0;
        // SAFETY: the host writes a pointer to `size` bytes it allocated
        // through this module's `proxy_on_memory_allocate` (the SDK's, a
        // `Vec<u8>` of that capacity), which we take back as a Vec — as
        // the SDK's own get_map_bytes does.
        let status = unsafe { raw_proxy_get_header_map_pairs(map as u32, &mut data, &mut size) };
        let buf = if status == 0 && !data.is_null() && size > 0 {
            unsafe { Vec::from_raw_parts(data, size, size) }
        } else {
            Vec::new()
        };
        HeaderMap { buf }
    }

    /// Every (name, value), in the client's order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let buf = self.buf.as_slice();
        let count = u32_at(buf, 0).unwrap_or(0).min(MAX_HEADERS);
        let mut at = 4usize.saturating_add(count.saturating_mul(8));
        (0..count).map_while(move |n| {
            let sizes = 4 + n * 8;
            let (name_len, value_len) = (u32_at(buf, sizes)?, u32_at(buf, sizes + 4)?);
            let name = buf.get(at..at.checked_add(name_len)?)?;
            at = at.checked_add(name_len)?.checked_add(1)?;
            let value = buf.get(at..at.checked_add(value_len)?)?;
            at = at.checked_add(value_len)?.checked_add(1)?;
            Some((name, value))
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
