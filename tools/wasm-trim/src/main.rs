//! `wasm-trim`: drops the proxy-wasm callbacks a filter does not use from
//! its `.wasm`, so that Envoy never enters the VM for them.
//!
//! Why a build step: proxy-wasm-cpp-host calls a guest callback only when
//! the module exports it (ABI 0.2.1: "called only if exposed"), and the Rust
//! SDK (`proxy-wasm` 0.2.5) exports every `proxy_on_*` from its dispatcher,
//! whatever the filter implements. Each export the filter does not need
//! still costs a VM entry when its event happens — `proxy_on_log` on every
//! request (Envoy registers the Wasm filter as an access-log handler),
//! `proxy_on_response_body` on every response chunk, `proxy_on_done` at
//! every stream's end — each through the SDK's thread-local, `RefCell` and
//! context-map lookup to reach a default method that does nothing. A
//! dispatcher of our own would mean leaving the SDK (its `#[no_mangle]`
//! exports come with the crate, and a second definition does not link);
//! removing the exports after linking keeps the SDK, its host calls and its
//! contexts as they are, and is applied alike to the no-op filter the
//! benchmark compares against. The functions left unreferenced are then
//! removed (walrus's garbage collection).
//!
//! `--count-entries` (benchmarks only, never shipped) also counts every
//! entry: each remaining `proxy_on_*` export, `proxy_on_memory_allocate`
//! included (the host calls it back for every string it hands to the
//! guest), adds one to a new global at its start (the allocator to a second
//! one too), and the body of the export `bench_vm_count` (crate
//! `vm-entries`, a cargo feature of the filters) is replaced by reads of
//! those globals.
//!
//! Usage: `wasm-trim [--keep-all] [--count-entries] IN.wasm [OUT.wasm]`
//! (OUT defaults to IN, replaced atomically). `--keep-all` drops nothing
//! (to count the SDK's full export set).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use walrus::ir::{BinaryOp, Binop, Const, GlobalGet, GlobalSet, Instr, InstrLocId, Value};
use walrus::{ConstExpr, ExportItem, FunctionId, FunctionKind, GlobalId, Module, ValType};

/// The proxy-wasm callbacks the abuse filter implements, and why each one is
/// needed; every other `proxy_on_*` export is dropped. The no-op filter is
/// trimmed to the same set so that the benchmark compares like with like.
pub const KEEP: &[(&str, &str)] = &[
    ("proxy_on_context_create", "creates the root context and one HTTP context per request"),
    ("proxy_on_configure", "reads and validates the configuration (false rejects it)"),
    ("proxy_on_tick", "stats flush, tick batch, fleet poll, held and waiting requests"),
    ("proxy_on_request_headers", "judges the request"),
    ("proxy_on_request_body", "reads login bodies; holds a body while the scorer is asked"),
    ("proxy_on_response_headers", "judges the answer (status, size, accepted credential)"),
    ("proxy_on_http_call_response", "the scorer's answers (requests and root callouts)"),
    ("proxy_on_delete", "frees the SDK's per-request context (without it every request leaks one)"),
    ("proxy_on_memory_allocate", "the host allocates in the guest every value it returns"),
];

/// Prefix of the ABI's callbacks; other exports (`memory`, `_initialize`,
/// `proxy_abi_version_0_2_1`) are always kept.
const CALLBACK_PREFIX: &str = "proxy_on_";
const ALLOCATE: &str = "proxy_on_memory_allocate";
/// The export of crate `vm-entries` whose body becomes a read of the counters.
const PROBE: &str = "bench_vm_count";

struct Options {
    keep_all: bool,
    count_entries: bool,
    input: PathBuf,
    output: PathBuf,
}

fn parse_args() -> Result<Options, String> {
    let mut keep_all = false;
    let mut count_entries = false;
    let mut paths = Vec::new();
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--keep-all" => keep_all = true,
            "--count-entries" => count_entries = true,
            "-h" | "--help" => return Err(String::new()),
            a if a.starts_with('-') => return Err(format!("unknown option {a}")),
            _ => paths.push(PathBuf::from(arg)),
        }
    }
    let mut paths = paths.into_iter();
    let input = paths.next().ok_or("no input .wasm")?;
    let output = paths.next().unwrap_or_else(|| input.clone());
    if paths.next().is_some() {
        return Err("at most IN and OUT".into());
    }
    Ok(Options { keep_all, count_entries, input, output })
}

/// Whether the host may call this export (a callback the filter keeps).
pub fn keeps(name: &str) -> bool {
    !name.starts_with(CALLBACK_PREFIX) || KEEP.iter().any(|(kept, _)| *kept == name)
}

/// Drops the callbacks outside `KEEP`; returns their names.
pub fn trim(module: &mut Module) -> Vec<String> {
    let dropped: Vec<(walrus::ExportId, String)> = module
        .exports
        .iter()
        .filter(|e| matches!(e.item, ExportItem::Function(_)) && !keeps(&e.name))
        .map(|e| (e.id(), e.name.clone()))
        .collect();
    for (id, _) in &dropped {
        module.exports.delete(*id);
    }
    dropped.into_iter().map(|(_, name)| name).collect()
}

fn exported_function(module: &Module, name: &str) -> Option<FunctionId> {
    module.exports.iter().find(|e| e.name == name).and_then(|e| match e.item {
        ExportItem::Function(f) => Some(f),
        _ => None,
    })
}

fn counter(module: &mut Module) -> GlobalId {
    module.globals.add_local(ValType::I64, true, false, ConstExpr::Value(Value::I64(0)))
}

/// `global += 1`, as instructions to put first in a function's body.
fn increment(global: GlobalId) -> Vec<(Instr, InstrLocId)> {
    let at = InstrLocId::default;
    vec![
        (Instr::GlobalGet(GlobalGet { global }), at()),
        (Instr::Const(Const { value: Value::I64(1) }), at()),
        (Instr::Binop(Binop { op: BinaryOp::I64Add }), at()),
        (Instr::GlobalSet(GlobalSet { global }), at()),
    ]
}

/// Counts every entry into the VM through a remaining callback (and the
/// allocator's separately); the probes read the counts.
pub fn count_entries(module: &mut Module) -> Result<usize, String> {
    let entries = counter(module);
    let allocs = counter(module);
    let callbacks: HashSet<(FunctionId, bool)> = module
        .exports
        .iter()
        .filter(|e| e.name.starts_with(CALLBACK_PREFIX))
        .filter_map(|e| match e.item {
            ExportItem::Function(f) => Some((f, e.name == ALLOCATE)),
            _ => None,
        })
        .collect();
    // One function may back two exports: count it once.
    let mut seen = HashSet::new();
    for (f, is_alloc) in &callbacks {
        if !seen.insert(*f) {
            continue;
        }
        let FunctionKind::Local(local) = &mut module.funcs.get_mut(*f).kind else {
            continue;
        };
        let mut prologue = increment(entries);
        if *is_alloc {
            prologue.extend(increment(allocs));
        }
        local.builder_mut().func_body().instrs_mut().splice(0..0, prologue);
    }
    // The probe `bench_vm_count(allocations: u32) -> u64` reads them:
    // `if allocations { allocs } else { entries }`.
    let f = exported_function(module, PROBE).ok_or(format!("no export {PROBE}: build with feature count-entries"))?;
    let FunctionKind::Local(local) = &mut module.funcs.get_mut(f).kind else {
        return Err(format!("{PROBE} is not a local function"));
    };
    let Some(&which) = local.args.first() else {
        return Err(format!("{PROBE} takes no argument"));
    };
    let mut body = local.builder_mut().func_body();
    body.instrs_mut().clear();
    body.local_get(which).if_else(
        ValType::I64,
        |then| {
            then.global_get(allocs);
        },
        |otherwise| {
            otherwise.global_get(entries);
        },
    );
    Ok(seen.len())
}

fn run(options: &Options) -> Result<String, String> {
    let mut module = Module::from_file(&options.input).map_err(|e| format!("{}: {e}", options.input.display()))?;
    let dropped = if options.keep_all { Vec::new() } else { trim(&mut module) };
    for (name, _) in KEEP {
        if exported_function(&module, name).is_none() {
            return Err(format!("{}: exports no {name}: not a proxy-wasm filter built with the SDK?", options.input.display()));
        }
    }
    let counted = if options.count_entries { Some(count_entries(&mut module)?) } else { None };
    // The functions only the dropped exports reached.
    walrus::passes::gc::run(&mut module);
    let bytes = module.emit_wasm();
    write_atomically(&options.output, &bytes)?;
    let mut note = format!("{}: {} callbacks dropped", options.output.display(), dropped.len());
    if !dropped.is_empty() {
        note.push_str(&format!(" ({})", dropped.join(", ")));
    }
    if let Some(n) = counted {
        note.push_str(&format!("; VM entries counted in {n} callbacks (bench build)"));
    }
    Ok(note)
}

/// Writes beside the target and renames: a reader (a running Envoy, cargo's
/// hard link in `deps/`) never sees half a file, nor the input changed.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("wasm.trim-tmp");
    std::fs::write(&tmp, bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

fn main() -> ExitCode {
    let options = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("wasm-trim: {e}");
            }
            eprintln!("usage: wasm-trim [--keep-all] [--count-entries] IN.wasm [OUT.wasm]");
            return ExitCode::from(2);
        }
    };
    match run(&options) {
        Ok(note) => {
            println!("{note}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wasm-trim: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn only_callbacks_outside_the_list_are_dropped() {
        assert!(keeps("memory"));
        assert!(keeps("_initialize"));
        assert!(keeps("proxy_abi_version_0_2_1"));
        assert!(keeps("proxy_on_request_headers"));
        assert!(keeps("proxy_on_delete"));
        for dropped in ["proxy_on_log", "proxy_on_done", "proxy_on_vm_start", "proxy_on_response_body",
            "proxy_on_request_trailers", "proxy_on_response_trailers", "proxy_on_queue_ready"] {
            assert!(!keeps(dropped), "{dropped}");
        }
    }

    /// A module exporting empty callbacks under these names (two names may
    /// share one function: `a=b`), plus the probe when asked.
    fn module(names: &[&str], probe: bool) -> Module {
        let mut m = Module::default();
        for name in names {
            let f = walrus::FunctionBuilder::new(&mut m.types, &[], &[]).finish(vec![], &mut m.funcs);
            for alias in name.split('=') {
                m.exports.add(alias, f);
            }
        }
        if probe {
            let arg = m.locals.add(ValType::I32);
            let mut b = walrus::FunctionBuilder::new(&mut m.types, &[ValType::I32], &[ValType::I64]);
            b.func_body().i64_const(0);
            let f = b.finish(vec![arg], &mut m.funcs);
            m.exports.add(PROBE, f);
        }
        m
    }

    fn export_names(m: &Module) -> Vec<String> {
        let mut names: Vec<String> = m.exports.iter().map(|e| e.name.clone()).collect();
        names.sort();
        names
    }

    #[test]
    fn trimming_drops_the_exports_and_their_code() {
        let mut m = module(&["proxy_on_request_headers", "proxy_on_log", "proxy_on_response_body", "_initialize"], false);
        let before = m.funcs.iter().count();
        let mut dropped = trim(&mut m);
        dropped.sort();
        assert_eq!(dropped, ["proxy_on_log", "proxy_on_response_body"]);
        walrus::passes::gc::run(&mut m);
        assert_eq!(export_names(&m), ["_initialize", "proxy_on_request_headers"]);
        assert_eq!(m.funcs.iter().count(), before - 2, "the dropped callbacks' code is gone");
        // The result is a valid module.
        Module::from_buffer(&m.emit_wasm()).unwrap();
    }

    #[test]
    fn counting_instruments_each_callback_once_and_rewrites_the_probe() {
        let mut m = module(&["proxy_on_request_headers=proxy_on_response_headers", "proxy_on_memory_allocate", "other"], true);
        assert_eq!(count_entries(&mut m).unwrap(), 2, "one function behind two exports is counted once");
        let probe = exported_function(&m, PROBE).unwrap();
        let FunctionKind::Local(local) = &m.funcs.get(probe).kind else { panic!("local") };
        let body = local.block(local.entry_block());
        assert!(matches!(body.instrs.last(), Some((Instr::IfElse(_), _))), "{:?}", body.instrs);
        let counted = |name: &str| {
            let FunctionKind::Local(f) = &m.funcs.get(exported_function(&m, name).unwrap()).kind else { panic!("local") };
            f.block(f.entry_block()).instrs.iter().filter(|(i, _)| matches!(i, Instr::GlobalSet(_))).count()
        };
        assert_eq!((counted("proxy_on_request_headers"), counted("proxy_on_memory_allocate"), counted("other")), (1, 2, 0));
        let bytes = m.emit_wasm();
        Module::from_buffer(&bytes).unwrap();
        // Without the probe (a filter built without count-entries) it refuses.
        let mut plain = module(&["proxy_on_request_headers"], false);
        assert!(count_entries(&mut plain).is_err());
    }

    /// A callback the filter implements must stay exported, else Envoy never
    /// calls it: the adapter may implement no SDK method whose export is
    /// dropped (the integration tests would catch most, not all).
    #[test]
    fn the_filter_implements_no_dropped_callback() {
        let dropped_methods = [
            "fn on_vm_start", "fn on_log", "fn on_done", "fn on_http_request_trailers", "fn on_http_response_body",
            "fn on_http_response_trailers", "fn on_queue_ready", "fn on_grpc_", "fn on_foreign_function",
            "fn on_new_connection", "fn on_downstream_", "fn on_upstream_", "fn on_http_request_metadata",
        ];
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../src");
        let mut read = 0;
        for entry in std::fs::read_dir(&src).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                read += 1;
                for m in dropped_methods {
                    assert!(!text.contains(m), "{} implements `{m}`: keep its export in wasm-trim's KEEP", path.display());
                }
            }
        }
        assert!(read > 3, "read the adapter's sources in {}", src.display());
    }
}
