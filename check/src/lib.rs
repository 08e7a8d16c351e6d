//! Finds the abuse filter's configuration wherever operators keep it — an
//! Envoy bootstrap (the `configuration` StringValue of the Wasm HTTP
//! filter, or the `filter_config` StringValue of the dynamic-module HTTP
//! filter), an Istio `WasmPlugin` (`spec.pluginConfig`), or a plain JSON
//! file — and checks it with the engine's own `Config::from_json`, the very
//! code the filter runs in `on_configure`. Also the JSON Schema of that
//! configuration, generated from the engine's serde types.

pub mod trust;

use abuse_engine::Config;
use serde::Deserialize;
use serde_json::{Map, Value};

/// Type URL of Envoy's Wasm HTTP filter configuration.
pub const WASM_FILTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
/// Type URL of Envoy's dynamic-module HTTP filter configuration (the native build).
pub const MODULE_FILTER_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter";
const STRING_VALUE_TYPE: &str = "type.googleapis.com/google.protobuf.StringValue";

/// One filter configuration found in a file.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    /// Where in the file: a path such as `static_resources.listeners[0]...http_filters[2]`.
    pub location: String,
    /// The configuration as the filter receives it (JSON text).
    pub json: String,
}

/// A configuration found at a location, or what is wrong there: `(location, problem)`.
pub type Located<T> = Result<T, (String, String)>;

/// The outcome of checking one configuration.
#[derive(Debug)]
pub struct Checked {
    pub found: Found,
    pub result: Result<Config, abuse_engine::config::ConfigError>,
}

/// The JSON Schema (draft 2020-12) of the plugin configuration.
pub fn schema() -> Value {
    let mut schema = serde_json::to_value(schemars::schema_for!(Config)).unwrap_or(Value::Null);
    if let Some(object) = schema.as_object_mut() {
        object.insert("title".into(), Value::from("abuse-filter plugin configuration"));
        object.insert(
            "description".into(),
            Value::from(
                "The JSON configuration of the abuse filter (Envoy: the Wasm filter's `configuration` StringValue; \
                 Istio: WasmPlugin `pluginConfig`). Generated from the engine's serde types by `make schema`; \
                 ranges and cross-key rules are checked by the filter itself and by `abuse-filter-check`.",
            ),
        );
    }
    schema
}

/// The schema as committed: pretty JSON with a final newline.
pub fn schema_text() -> String {
    let mut text = serde_json::to_string_pretty(&schema()).unwrap_or_default();
    text.push('\n');
    text
}

/// Every document of a YAML or JSON file.
fn documents(text: &str) -> Result<Vec<Value>, String> {
    if let Ok(value) = serde_json::from_str::<Value>(text) {
        return Ok(vec![value]);
    }
    let mut docs = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(doc).map_err(|e| format!("document {i}: not YAML or JSON: {e}"))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

fn is_abuse_filter(config: &Map<String, Value>) -> bool {
    let named = |v: Option<&Value>| v.and_then(Value::as_str).is_some_and(|s| s.contains("abuse"));
    let code = config.get("vm_config").and_then(|vm| vm.get("code"));
    let source = code.and_then(|c| {
        c.get("local")
            .and_then(|l| l.get("filename"))
            .or_else(|| c.get("remote").and_then(|r| r.get("http_uri")).and_then(|u| u.get("uri")))
    });
    named(config.get("root_id")) || named(config.get("name")) || named(source)
}

/// A dynamic-module filter is ours when its module or filter is named so.
fn is_abuse_module(config: &Map<String, Value>) -> bool {
    let named = |v: Option<&Value>| v.and_then(Value::as_str).is_some_and(|s| s.contains("abuse"));
    named(config.get("dynamic_module_config").and_then(|m| m.get("name"))) || named(config.get("filter_name"))
}

/// The filter configuration held in `key` of a filter's config: a
/// StringValue holding the JSON (an absent one means defaults).
fn string_value(config: &Map<String, Value>, key: &str) -> Result<String, String> {
    let Some(configuration) = config.get(key) else {
        return Ok(String::new());
    };
    let type_url = configuration.get("@type").and_then(Value::as_str).unwrap_or_default();
    if type_url != STRING_VALUE_TYPE {
        return Err(format!("`{key}` must be a {STRING_VALUE_TYPE} holding the JSON, not {type_url:?}"));
    }
    match configuration.get("value") {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(format!("`{key}.value` must be a string holding the JSON")),
    }
}

/// Where a filter keeps our configuration: the Wasm filter's `config`
/// (key `configuration`) or the dynamic-module filter itself (key
/// `filter_config`), when the filter is ours.
fn our_filter(map: &Map<String, Value>) -> Option<(&Map<String, Value>, &'static str)> {
    match map.get("@type").and_then(Value::as_str) {
        Some(WASM_FILTER_TYPE) => match map.get("config") {
            Some(Value::Object(config)) if is_abuse_filter(config) => Some((config, "configuration")),
            _ => None,
        },
        Some(MODULE_FILTER_TYPE) if is_abuse_module(map) => Some((map, "filter_config")),
        _ => None,
    }
}

fn walk(value: &Value, path: &str, out: &mut Vec<Located<Found>>) {
    match value {
        Value::Object(map) => {
            if let Some((config, key)) = our_filter(map) {
                let location = path.trim_end_matches(".typed_config").to_string();
                out.push(string_value(config, key).map(|json| Found { location: location.clone(), json }).map_err(|e| (location, e)));
            }
            for (key, child) in map {
                let sep = if path.is_empty() { "" } else { "." };
                walk(child, &format!("{path}{sep}{key}"), out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                walk(child, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Finds every abuse filter configuration in a file's text. A document that
/// is neither an Envoy config with the filter nor a WasmPlugin is taken as
/// the configuration itself when it is the file's only document.
pub fn find(text: &str) -> Result<Vec<Located<Found>>, String> {
    let docs = documents(text)?;
    let mut out = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        let prefix = if docs.len() > 1 { format!("document {i}: ") } else { String::new() };
        if doc.get("kind").and_then(Value::as_str) == Some("WasmPlugin") {
            let meta = doc.get("metadata");
            let name = |k: &str| meta.and_then(|m| m.get(k)).and_then(Value::as_str).unwrap_or("?").to_string();
            let location = format!("{prefix}WasmPlugin {}/{} spec.pluginConfig", name("namespace"), name("name"));
            let json = match doc.get("spec").and_then(|s| s.get("pluginConfig")) {
                // Istio hands pluginConfig to the filter as this JSON.
                Some(config) => serde_json::to_string(config).unwrap_or_default(),
                None => String::new(),
            };
            out.push(Ok(Found { location, json }));
            continue;
        }
        let before = out.len();
        let mut found = Vec::new();
        walk(doc, "", &mut found);
        out.extend(found.into_iter().map(|r| match r {
            Ok(f) => Ok(Found { location: format!("{prefix}{}", f.location), json: f.json }),
            Err((l, e)) => Err((format!("{prefix}{l}"), e)),
        }));
        let envoy_like = doc.get("static_resources").is_some() || doc.get("kind").is_some() || doc.get("@type").is_some();
        if out.len() == before && docs.len() == 1 && doc.is_object() && !envoy_like {
            let json = if serde_json::from_str::<Value>(text).is_ok() { text.to_string() } else { serde_json::to_string(doc).unwrap_or_default() };
            out.push(Ok(Found { location: "(file)".to_string(), json }));
        }
    }
    Ok(out)
}

/// The segments of a key as the engine names it: `rate.limits[0].requests`
/// is `rate`, `limits`, 0, `requests`.
enum Segment {
    Key(String),
    Index(usize),
}

fn segments(key: &str) -> Option<Vec<Segment>> {
    let mut out = Vec::new();
    for part in key.split('.') {
        let (name, rest) = part.split_once('[').map_or((part, ""), |(n, r)| (n, r));
        if !name.is_empty() {
            out.push(Segment::Key(name.to_string()));
        }
        for index in rest.split('[').filter(|s| !s.is_empty()) {
            out.push(Segment::Index(index.trim_end_matches(']').parse().ok()?));
        }
    }
    Some(out)
}

/// The object holding `key`, and the key's last name.
fn parent_mut<'a>(value: &'a mut Value, key: &str) -> Option<(&'a mut Map<String, Value>, String)> {
    let mut path = segments(key)?;
    let Some(Segment::Key(last)) = path.pop() else {
        return None;
    };
    let mut node = value;
    for segment in path {
        node = match segment {
            Segment::Key(k) => node.get_mut(k.as_str())?,
            Segment::Index(i) => node.get_mut(i)?,
        };
    }
    Some((node.as_object_mut()?, last))
}

fn parent_key(key: &str) -> &str {
    key.rfind('.').and_then(|dot| key.get(..dot)).unwrap_or("")
}

fn recheck(value: &Value) -> Option<abuse_engine::config::ConfigError> {
    let text = serde_json::to_string(value).unwrap_or_default();
    Config::from_json(text.as_bytes()).err().map(|mut e| {
        // Positions refer to the re-serialized text, not the operator's.
        if let Some(at) = e.problem.find(" at line ") {
            e.problem.truncate(at);
        }
        e
    })
}

/// Sets the problem at `key` aside so that the rest can be checked: removes
/// it (its default applies), or — for a required key — puts a plain valid
/// value in its place. Only scalars, or any unknown key: removing a list or
/// a section the rest refers to would only make up more problems. Returns
/// the next problem, or None when the configuration then passes; Err(())
/// when the problem cannot be set aside.
fn set_aside(value: &mut Value, key: &str, unknown: bool) -> Result<Option<abuse_engine::config::ConfigError>, ()> {
    let (object, last) = parent_mut(value, key).ok_or(())?;
    let removed = match object.get(&last) {
        Some(v) if unknown || !(v.is_object() || v.is_array()) => object.remove(&last).ok_or(())?,
        _ => return Err(()),
    };
    let next = recheck(value);
    let made_up = |e: &Option<abuse_engine::config::ConfigError>| {
        e.as_ref().is_some_and(|e| e.key == parent_key(key) && e.problem.starts_with(&format!("missing field `{last}`")))
    };
    if !made_up(&next) {
        return Ok(next);
    }
    // A required key: try plain values until its own problem is gone.
    let candidates = [Value::from(1), Value::from(60), Value::from(100), Value::from("/"), Value::from("a"), Value::from(true)];
    for candidate in candidates {
        if let Some((object, _)) = parent_mut(value, key) {
            object.insert(last.clone(), candidate);
        }
        let next = recheck(value);
        if !made_up(&next) && next.as_ref().is_none_or(|e| e.key != key) {
            return Ok(next);
        }
    }
    if let Some((object, _)) = parent_mut(value, key) {
        object.insert(last, removed);
    }
    Err(())
}

/// Every problem of a configuration, each with its key. The filter stops at
/// the first; here each problem is set aside (see `set_aside`) and the rest
/// checked again, until the configuration passes or a problem cannot be set
/// aside (a missing required key, a bad list as a whole).
pub fn all_problems(json: &str) -> Vec<abuse_engine::config::ConfigError> {
    let mut problems: Vec<abuse_engine::config::ConfigError> = Vec::new();
    let first = match Config::from_json(json.as_bytes()) {
        Ok(_) => return problems,
        Err(e) => e,
    };
    let Ok(mut value) = serde_json::from_str::<Value>(json) else {
        return vec![first];
    };
    let mut next = Some(first);
    while let Some(problem) = next.take() {
        if problems.iter().any(|p| p.key == problem.key) || problems.len() >= 64 {
            break;
        }
        let unknown = problem.problem.starts_with("unknown field");
        let aside = if problem.problem.starts_with("missing field") { Err(()) } else { set_aside(&mut value, &problem.key, unknown) };
        problems.push(problem);
        match aside {
            Ok(following) => next = following,
            Err(()) => break,
        }
    }
    problems
}

/// The plugin configuration of an `http_filters` entry, when it is the abuse filter.
fn ours_in_filter(filter: &Value) -> Option<Value> {
    let (config, key) = our_filter(filter.get("typed_config")?.as_object()?)?;
    let json = string_value(config, key).ok()?;
    Some(serde_json::from_str(&json).unwrap_or(Value::Null))
}

/// Warnings about who chooses the client's address (see [`trust`]), at
/// their locations: the connection managers of Envoy bootstraps holding the
/// filter, and every configuration found.
pub fn warnings(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for doc in documents(text)? {
        out.extend(trust::bootstrap_warnings(&doc, &ours_in_filter));
    }
    for found in find(text)?.into_iter().flatten() {
        if let Ok(config) = serde_json::from_str::<Value>(&found.json) {
            out.extend(trust::config_warnings(&config).into_iter().map(|w| (found.location.clone(), w)));
            out.extend(fleet_rule_warnings(&config).into_iter().map(|w| (found.location.clone(), w)));
        }
    }
    Ok(out)
}

/// `fleet` rules without the scorer's tick channel count per Envoy only.
fn fleet_rule_warnings(config: &Value) -> Vec<String> {
    let scorer = config.get("scorer");
    let on = |key: &str, default: bool| scorer.and_then(|s| s.get(key)).and_then(Value::as_bool).unwrap_or(default);
    if on("enabled", false) && on("events", true) {
        return Vec::new();
    }
    let rules = config.get("rules").and_then(Value::as_array).cloned().unwrap_or_default();
    rules
        .iter()
        .enumerate()
        .filter(|(_, r)| r.get("fleet").and_then(Value::as_bool) == Some(true))
        .map(|(i, _)| {
            format!("rules[{i}].fleet: without the scorer's tick channel (scorer.enabled and scorer.events) this rule counts per Envoy, not fleet-wide")
        })
        .collect()
}

/// Finds and checks every configuration in a file's text.
pub fn check(text: &str) -> Result<Vec<Located<Checked>>, String> {
    Ok(find(text)?
        .into_iter()
        .map(|f| f.map(|found| Checked { result: Config::from_json(found.json.as_bytes()), found }))
        .collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn a_fleet_rule_without_the_scorer_is_warned_about() {
        let rule = r#"{"name":"sms","match":{"path":"/api/otp/send"},"key":"json:phone","window_s":600,"threshold":5,"action":"block","fleet":true}"#;
        let alone = format!(r#"{{"rules":[{rule}]}}"#);
        let w = warnings(&alone).unwrap();
        assert!(w.iter().any(|(_, text)| text.contains("rules[0].fleet")), "{w:?}");
        let with_scorer = format!(r#"{{"rules":[{rule}],"scorer":{{"enabled":true,"secret":"s"}}}}"#);
        assert!(warnings(&with_scorer).unwrap().iter().all(|(_, text)| !text.contains("fleet")));
    }

    #[test]
    fn every_problem_is_named() {
        let keys: Vec<String> = all_problems(
            r#"{"penalty": {"duration_s": 0}, "rate": {"limitz": [], "limits": [{"requests": 0, "window_s": 1}]},
                "colour": "blue", "actions": {"rate_limit": "drop"}, "risk": {"half_life_s": -1}}"#,
        )
        .into_iter()
        .map(|p| p.key)
        .collect();
        for key in ["penalty.duration_s", "rate.limitz", "rate.limits[0].requests", "colour", "actions.rate_limit", "risk.half_life_s"] {
            assert!(keys.iter().any(|k| k == key), "{key} not in {keys:?}");
        }
        assert!(all_problems(r#"{"mode": "block"}"#).is_empty());
        // A missing required key stops the search (setting its object aside would make up problems).
        let p = all_problems(r#"{"route_groups": [{"name": "a"}], "penalty": {"duration_s": 0}}"#);
        assert_eq!(p.len(), 1, "{p:?}");
        // Setting a required key aside makes up no "missing field".
        let p = all_problems(r#"{"rate": {"limits": [{"requests": 0, "window_s": 1}]}}"#);
        assert_eq!(p.iter().map(|p| p.key.as_str()).collect::<Vec<_>>(), ["rate.limits[0].requests"]);
    }

    #[test]
    fn plain_json_is_the_configuration() {
        let found = find(r#"{"mode":"block"}"#).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].as_ref().unwrap().location, "(file)");
    }

    #[test]
    fn wasm_plugin_config_becomes_json() {
        let yaml = "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: abuse-filter, namespace: shop}\nspec:\n  pluginConfig:\n    mode: block\n    penalty: {duration_s: 30}\n";
        let checked = check(yaml).unwrap();
        let c = checked[0].as_ref().unwrap();
        assert_eq!(c.found.location, "WasmPlugin shop/abuse-filter spec.pluginConfig");
        assert_eq!(c.result.as_ref().unwrap().penalty.duration_s, 30);
    }

    #[test]
    fn other_wasm_filters_are_not_ours() {
        let yaml = r#"
static_resources:
  listeners:
  - filter_chains:
    - filters:
      - typed_config:
          http_filters:
          - typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config: {name: other, root_id: other, vm_config: {code: {local: {filename: other.wasm}}}}
          - typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                root_id: abuse_filter
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: '{"penalty": {"duration_s": 0}}'
"#;
        let checked = check(yaml).unwrap();
        assert_eq!(checked.len(), 1);
        let c = checked[0].as_ref().unwrap();
        assert_eq!(c.found.location, "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.http_filters[1]");
        assert_eq!(c.result.as_ref().unwrap_err().key, "penalty.duration_s");
    }

    #[test]
    fn the_dynamic_module_filter_is_found_and_checked() {
        let yaml = r#"
http_filters:
- typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter
    dynamic_module_config: {name: other_module}
    filter_name: other
    filter_config: {"@type": type.googleapis.com/google.protobuf.StringValue, value: "not ours"}
- typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter
    dynamic_module_config: {name: abuse_filter}
    filter_name: abuse_filter
    filter_config:
      "@type": type.googleapis.com/google.protobuf.StringValue
      value: '{"penalty": {"duration_s": 0}}'
- typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter
    dynamic_module_config: {name: abuse_filter}
    filter_config: {"@type": type.googleapis.com/google.protobuf.Struct, value: {mode: block}}
"#;
        let checked = check(yaml).unwrap();
        assert_eq!(checked.len(), 2, "the other module is not ours");
        let c = checked[0].as_ref().unwrap();
        assert_eq!(c.found.location, "http_filters[1]");
        assert_eq!(c.result.as_ref().unwrap_err().key, "penalty.duration_s");
        let (location, problem) = checked[1].as_ref().unwrap_err();
        assert_eq!(location, "http_filters[2]");
        assert!(problem.contains("`filter_config` must be a type.googleapis.com/google.protobuf.StringValue"), "{problem}");
    }
}
