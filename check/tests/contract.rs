//! The configuration contract: the committed JSON Schema matches the engine's
//! types, every configuration the project ships passes the filter's own
//! validation, and the checker's command line reports errors by key.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Every file the project ships with a filter configuration in it.
const SHIPPED: [&str; 5] = [
    "envoy/envoy.yaml",
    "deploy/compose/envoy.yaml",
    "examples/istio/wasmplugin.yaml",
    "deploy/module/envoy.yaml",
    "deploy/compose/envoy.module.yaml",
];

#[test]
fn committed_schema_matches_the_types() {
    let path = root().join("schema/abuse-filter.schema.json");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    let generated = abuse_filter_check::schema_text();
    assert!(
        committed == generated,
        "{} is out of date with engine/src/config.rs: run `make schema` and commit the result",
        path.display()
    );
}

#[test]
fn every_shipped_configuration_is_valid() {
    for file in SHIPPED {
        let text = std::fs::read_to_string(root().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let checked = abuse_filter_check::check(&text).unwrap();
        assert!(!checked.is_empty(), "{file}: no filter configuration found");
        for c in checked {
            let c = c.unwrap_or_else(|(l, e)| panic!("{file}: {l}: {e}"));
            if let Err(e) = &c.result {
                panic!("{file}: {}: {e}", c.found.location);
            }
        }
    }
}

fn run(args: &[&str], stdin: Option<&str>) -> (i32, String) {
    use std::io::Write;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_abuse-filter-check"));
    cmd.args(args).current_dir(root()).stdout(std::process::Stdio::piped());
    if stdin.is_some() {
        cmd.stdin(std::process::Stdio::piped());
    }
    let mut child = cmd.spawn().unwrap();
    if let Some(text) = stdin {
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn command_line_passes_the_shipped_files() {
    let (code, out) = run(&SHIPPED, None);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.lines().filter(|l| l.starts_with("ok: ")).count(), SHIPPED.len(), "{out}");
}

#[test]
fn the_shipped_files_let_no_client_choose_its_address() {
    let (_, out) = run(&SHIPPED, None);
    assert!(!out.contains("warning:"), "{out}");
}

#[test]
fn command_line_warns_where_a_client_chooses_its_address() {
    // The pattern issue 20 found in the shipped config: the facts header and
    // GeoIP on an address Envoy took from a client-written X-Forwarded-For.
    let old = std::fs::read_to_string(root().join("envoy/envoy.yaml"))
        .unwrap()
        .replace("%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%", "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%")
        .replace("original_ip_detection_extensions:", "unused_detection:")
        .replace("- name: envoy.http.original_ip_detection.xff", "- unused_name: xff");
    let (code, out) = run(&["-"], Some(&old));
    assert_eq!(code, 0, "warnings do not fail the check: {out}");
    let warnings: Vec<&str> = out.lines().filter(|l| l.starts_with("warning: ")).collect();
    assert!(warnings.iter().any(|w| w.contains("%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%")), "{out}");
    assert!(warnings.iter().any(|w| w.contains("GeoIP")), "{out}");
}

#[test]
fn command_line_names_the_key_and_exits_1() {
    let bad = std::fs::read_to_string(root().join("envoy/envoy.yaml"))
        .unwrap()
        .replace(r#""penalty": { "duration_s": 60 }"#, r#""penalty": { "duration_s": 0 }"#);
    assert!(bad.contains(r#""duration_s": 0"#));
    let (code, out) = run(&["-"], Some(&bad));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("error: -: static_resources.listeners[0]"), "{out}");
    assert!(out.contains("key `penalty.duration_s`: 0 is out of range [1, 86400]"), "{out}");

    let (code, out) = run(&["-"], Some(r#"{"rate": {"limitz": []}}"#));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("key `rate.limitz`: unknown field `limitz`"), "{out}");

    // Every problem, each with its key, not only the first.
    let (code, out) = run(&["-"], Some(r#"{"penalty": {"duration_s": 0}, "risk": {"half_life_s": 0}, "colour": "blue"}"#));
    assert_eq!(code, 1, "{out}");
    assert_eq!(out.lines().count(), 3, "{out}");
    for key in ["penalty.duration_s", "risk.half_life_s", "colour"] {
        assert!(out.contains(&format!("error: -: (file): key `{key}`: ")), "{out}");
    }

    let (code, out) = run(&["-"], Some("static_resources: {listeners: []}\n"));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no abuse filter configuration found"), "{out}");

    // A bad rule names its index and key.
    let bad_rule = std::fs::read_to_string(root().join("envoy/envoy.yaml"))
        .unwrap()
        .replace(r#""window_s": 600, "threshold": 20,"#, r#""window_s": 0, "threshold": 20,"#);
    let (code, out) = run(&["-"], Some(&bad_rule));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("key `rules[1].window_s`: 0 is out of range [1, 86400]"), "{out}");
    let (code, out) = run(&["-"], Some(r#"{"rules": [{"name": "r", "key": ["address"], "window_s": 60, "threshold": 5, "action": "tag", "colour": 1}]}"#));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("key `rules[0].colour`: unknown field `colour`"), "{out}");

    let (code, out) = run(&["does/not/exist.yaml"], None);
    assert_eq!(code, 1, "{out}");
}
