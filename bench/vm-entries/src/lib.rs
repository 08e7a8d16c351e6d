//! Bench-only (cargo feature `count-entries` of the abuse filter and of the
//! no-op filter, never in a shipped build): publishes how many times the
//! host entered this VM as the gauges `bench_vm_entries` (every callback,
//! allocations included) and `bench_vm_allocs` (`proxy_on_memory_allocate`
//! alone: the host hands a value to the guest). `make bench` divides them by
//! the requests Envoy served.
//!
//! The counting itself is done by `wasm-trim --count-entries` on the built
//! `.wasm`: it adds one to a global at the start of every exported callback
//! and replaces the body of the probe below by reads of those globals. Counting at the wasm level sees every entry, the SDK's own
//! (`proxy_on_log`, `proxy_on_done`, the allocator) included, which the
//! filter's Rust code never sees.

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;
use std::cell::Cell;

/// Read by the probe until `wasm-trim --count-entries` replaces its body;
/// a volatile read so that the compiler cannot fold the probe's result into
/// its callers. One probe with an argument, not two: the compiler merges
/// identical functions (and identical statics), and two merged probes would
/// read one counter.
static UNCOUNTED: u64 = 0;

/// The VM entries counted so far (`allocations` = 0: every callback,
/// allocations included; 1: `proxy_on_memory_allocate` alone); 0 without
/// `wasm-trim --count-entries`.
#[no_mangle]
#[inline(never)]
pub extern "C" fn bench_vm_count(allocations: u32) -> u64 {
    // SAFETY: a read of an immutable static through a valid reference.
    let uncounted = unsafe { std::ptr::read_volatile(&UNCOUNTED) };
    uncounted.saturating_mul(u64::from(allocations))
}

thread_local! {
    static GAUGES: Cell<Option<(u32, u32)>> = const { Cell::new(None) };
}

/// Sets the two gauges to the counts so far (call it once per request: the
/// figure then lags by the current request's own entries only). Host call
/// failures are ignored: a bench figure missing is visible as 0.
pub fn publish() {
    let gauges = GAUGES.with(|g| {
        if g.get().is_none() {
            let entries = hostcalls::define_metric(MetricType::Gauge, "bench_vm_entries").ok();
            let allocs = hostcalls::define_metric(MetricType::Gauge, "bench_vm_allocs").ok();
            if let (Some(e), Some(a)) = (entries, allocs) {
                g.set(Some((e, a)));
            }
        }
        g.get()
    });
    if let Some((entries, allocs)) = gauges {
        let _ = hostcalls::record_metric(entries, bench_vm_count(0));
        let _ = hostcalls::record_metric(allocs, bench_vm_count(1));
    }
}
