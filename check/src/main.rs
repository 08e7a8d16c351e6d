//! `abuse-filter-check FILE...`: checks every abuse filter configuration in
//! Envoy bootstraps (YAML or JSON), Istio WasmPlugin manifests or plain JSON
//! configuration files with the filter's own parser and validation, prints
//! one line per configuration, or one per problem with its key, and exits 1
//! if any is wrong or a file holds none. `--print-schema` prints the JSON Schema.
//! Also warns (without failing) where a client could choose its own address:
//! see `trust.rs`.

use std::io::Read;
use std::process::ExitCode;

const USAGE: &str = "usage: abuse-filter-check FILE...   (Envoy bootstrap, Istio WasmPlugin or JSON config; - for stdin)
       abuse-filter-check --print-schema";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() || args.iter().any(|a| a == "-h" || a == "--help") {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    }
    if args.iter().any(|a| a == "--print-schema") {
        print!("{}", abuse_filter_check::schema_text());
        return ExitCode::SUCCESS;
    }
    let mut failed = false;
    for file in &args {
        let text = if file == "-" {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).map(|_| s)
        } else {
            std::fs::read_to_string(file)
        };
        let text = match text {
            Ok(t) => t,
            Err(e) => {
                println!("error: {file}: cannot read: {e}");
                failed = true;
                continue;
            }
        };
        // Warnings do not fail the check: a lab may trust loopback on purpose.
        if let Ok(warnings) = abuse_filter_check::warnings(&text) {
            for (location, warning) in warnings {
                println!("warning: {file}: {location}: {warning}");
            }
        }
        match abuse_filter_check::check(&text) {
            Err(e) => {
                println!("error: {file}: {e}");
                failed = true;
            }
            Ok(found) if found.is_empty() => {
                println!("error: {file}: no abuse filter configuration found (an envoy.filters.http.wasm filter whose name, root_id or code names abuse_filter, a dynamic_modules filter whose module or filter_name does, a WasmPlugin, or a JSON object)");
                failed = true;
            }
            Ok(found) => {
                for item in found {
                    match item {
                        Err((location, problem)) => {
                            println!("error: {file}: {location}: {problem}");
                            failed = true;
                        }
                        Ok(checked) => match checked.result {
                            Ok(config) => {
                                let mode = match config.mode {
                                    abuse_engine::config::Mode::Block => "block",
                                    abuse_engine::config::Mode::Monitor => "monitor",
                                };
                                println!("ok: {file}: {} (mode {mode})", checked.found.location);
                            }
                            Err(_) => {
                                for e in abuse_filter_check::all_problems(&checked.found.json) {
                                    println!("error: {file}: {}: key `{}`: {}", checked.found.location, e.key, e.problem);
                                }
                                failed = true;
                            }
                        },
                    }
                }
            }
        }
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
