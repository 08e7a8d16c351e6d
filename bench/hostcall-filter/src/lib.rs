//! Makes N host calls of one kind on every request, nothing else, so that
//! `bench/hostcalls.py` can price each kind against the no-op filter. The
//! plugin configuration is `<kind>:<n>`, e.g. `header:10`; kinds: `header`
//! (one request header), `headers` (the whole header map), `property`
//! (`source.address`), `time`, `shared` (a 5 KiB shared-data get + CAS set),
//! `set_header`, `filter_state` (a decision-sized value written as filter
//! state, as the abuse filter does for the access log; N distinct keys, since
//! Envoy's wasm filter state is write-once).

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, MapType};

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(ProbeRoot { calls: Calls::None }) });
}}

#[derive(Clone, Copy)]
enum Calls {
    None,
    Header(u32),
    Headers(u32),
    Property(u32),
    Time(u32),
    Shared(u32),
    SetHeader(u32),
    FilterState(u32),
}

#[link(wasm_import_module = "env")]
extern "C" {
    #[link_name = "proxy_set_property"]
    fn raw_proxy_set_property(path_data: *const u8, path_size: usize, value_data: *const u8, value_size: usize) -> u32;
}

const FILTER_STATE_KEYS: [&str; 10] = ["probe0", "probe1", "probe2", "probe3", "probe4", "probe5", "probe6", "probe7", "probe8", "probe9"];
const DECISION: &str = "action=block score=100 reasons=credential_stuffing";

const SHARED_KEY: &str = "hostcall_filter/shard";
const SHARED_BYTES: usize = 5 * 1024;

struct ProbeRoot {
    calls: Calls,
}

impl Context for ProbeRoot {}

impl RootContext for ProbeRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        let text = String::from_utf8_lossy(&config);
        let (kind, n) = text.trim().split_once(':').unwrap_or(("none", "0"));
        let n: u32 = n.parse().unwrap_or(0);
        self.calls = match kind {
            "header" => Calls::Header(n),
            "headers" => Calls::Headers(n),
            "property" => Calls::Property(n),
            "time" => Calls::Time(n),
            "shared" => Calls::Shared(n),
            "set_header" => Calls::SetHeader(n),
            "filter_state" => Calls::FilterState(n.min(10)),
            _ => Calls::None,
        };
        if matches!(self.calls, Calls::Shared(_)) {
            let _ = hostcalls::set_shared_data(SHARED_KEY, Some(&[0u8; SHARED_BYTES]), None);
        }
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(ProbeHttp { calls: self.calls }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct ProbeHttp {
    calls: Calls,
}

impl Context for ProbeHttp {}

impl HttpContext for ProbeHttp {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        match self.calls {
            Calls::None => {}
            Calls::Header(n) => (0..n).for_each(|_| {
                let _ = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, "x-forwarded-for");
            }),
            Calls::Headers(n) => (0..n).for_each(|_| {
                let _ = hostcalls::get_map_bytes(MapType::HttpRequestHeaders);
            }),
            Calls::Property(n) => (0..n).for_each(|_| {
                let _ = hostcalls::get_property(vec!["source", "address"]);
            }),
            Calls::Time(n) => (0..n).for_each(|_| {
                let _ = hostcalls::get_current_time();
            }),
            Calls::Shared(n) => (0..n).for_each(|_| {
                if let Ok((Some(mut value), cas)) = hostcalls::get_shared_data(SHARED_KEY) {
                    if let Some(byte) = value.first_mut() {
                        *byte = byte.wrapping_add(1);
                    }
                    let _ = hostcalls::set_shared_data(SHARED_KEY, Some(&value), cas);
                }
            }),
            Calls::SetHeader(n) => (0..n).for_each(|_| {
                let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, "x-probe", Some("1"));
            }),
            Calls::FilterState(n) => FILTER_STATE_KEYS.iter().take(n as usize).for_each(|key| {
                // SAFETY: valid pointers for their lengths during the call.
                let _ = unsafe { raw_proxy_set_property(key.as_ptr(), key.len(), DECISION.as_ptr(), DECISION.len()) };
            }),
        }
        Action::Continue
    }
}
