//! Who chooses the client's address? Warnings about an Envoy bootstrap, or
//! a filter configuration, that lets a client name its own address.
//!
//! Envoy's HTTP connection manager, unless `use_remote_address: true` or an
//! `xff` original-IP-detection extension with `xff_trusted_cidrs`, takes its
//! *downstream remote address* from the last `X-Forwarded-For` entry, which
//! any client can write. Everything that reads that address then believes
//! the client: `%DOWNSTREAM_REMOTE_ADDRESS%` in the facts header, the
//! filter's `source.address` fallback, and the GeoIP filter; the GeoIP
//! filter's own `xff_config` reads the header from anyone. The filter's
//! `client.trusted_proxies` check is only worth anything on the *direct*
//! peer (`%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%`).

use serde_json::{Map, Value};

const HCM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const HEADER_MUTATION_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation";
const GEOIP_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.geoip.v3.Geoip";

/// A warning at a location of the file.
pub type Warning = (String, String);

/// Warnings about the plugin configuration alone (any file kind).
pub fn config_warnings(config: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let proxies = config
        .get("client")
        .and_then(|c| c.get("trusted_proxies"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for (i, p) in proxies.iter().enumerate() {
        if let Some(text) = p.as_str() {
            if text.ends_with("/0") {
                out.push(format!(
                    "client.trusted_proxies[{i}] `{text}` trusts every peer: any client can then choose its address with X-Forwarded-For"
                ));
            }
        }
    }
    out
}

/// Warnings about every connection manager in `doc` that holds the abuse
/// filter (`is_ours` tells a Wasm filter of ours from another).
pub fn bootstrap_warnings(doc: &Value, is_ours: &dyn Fn(&Value) -> Option<Value>) -> Vec<Warning> {
    let mut out = Vec::new();
    walk(doc, "", is_ours, &mut out);
    out
}

fn walk(value: &Value, path: &str, is_ours: &dyn Fn(&Value) -> Option<Value>, out: &mut Vec<Warning>) {
    match value {
        Value::Object(map) => {
            if map.get("@type").and_then(Value::as_str) == Some(HCM_TYPE) {
                connection_manager(map, path, is_ours, out);
            }
            for (key, child) in map {
                let sep = if path.is_empty() { "" } else { "." };
                walk(child, &format!("{path}{sep}{key}"), is_ours, out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                walk(child, &format!("{path}[{i}]"), is_ours, out);
            }
        }
        _ => {}
    }
}

/// Whether the manager's remote address is the peer, or an XFF entry only
/// when the peer is in `xff_trusted_cidrs`.
fn remote_address_is_trusted(hcm: &Map<String, Value>) -> bool {
    if hcm.get("use_remote_address").and_then(Value::as_bool) == Some(true) {
        return true;
    }
    hcm.get("original_ip_detection_extensions")
        .and_then(Value::as_array)
        .is_some_and(|exts| {
            exts.iter().any(|e| {
                e.get("typed_config")
                    .and_then(|t| t.get("xff_trusted_cidrs"))
                    .and_then(|c| c.get("cidrs"))
                    .and_then(Value::as_array)
                    .is_some_and(|c| !c.is_empty())
            })
        })
}

fn connection_manager(hcm: &Map<String, Value>, path: &str, is_ours: &dyn Fn(&Value) -> Option<Value>, out: &mut Vec<Warning>) {
    let filters = hcm.get("http_filters").and_then(Value::as_array).cloned().unwrap_or_default();
    let Some((ours_at, config)) = filters.iter().enumerate().find_map(|(i, f)| is_ours(f).map(|c| (i, c))) else {
        return;
    };
    let location = format!("{path}.http_filters[{ours_at}]");
    let trusted_remote = remote_address_is_trusted(hcm);
    let facts = config.get("client").and_then(|c| c.get("facts_header")).and_then(Value::as_str);
    let mut facts_written = false;
    for f in &filters {
        let typed = f.get("typed_config");
        let kind = typed.and_then(|t| t.get("@type")).and_then(Value::as_str);
        if kind == Some(HEADER_MUTATION_TYPE) {
            let mutations = typed
                .and_then(|t| t.get("mutations"))
                .and_then(|m| m.get("request_mutations"))
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for m in mutations {
                let header = m.get("append").and_then(|a| a.get("header"));
                let key = header.and_then(|h| h.get("key")).and_then(Value::as_str);
                let value = header.and_then(|h| h.get("value")).and_then(Value::as_str).unwrap_or("");
                if key.is_some() && key == facts {
                    facts_written = true;
                    if value.contains("%DOWNSTREAM_REMOTE_ADDRESS") && !trusted_remote {
                        out.push((
                            location.clone(),
                            format!(
                                "the facts header `{}` carries %DOWNSTREAM_REMOTE_ADDRESS%, which this connection manager takes from X-Forwarded-For (no use_remote_address, no xff_trusted_cidrs): a client chooses its address. Use %DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%",
                                facts.unwrap_or("")
                            ),
                        ));
                    }
                }
            }
        }
        if kind == Some(GEOIP_TYPE) {
            if typed.and_then(|t| t.get("xff_config")).is_some() {
                out.push((
                    location.clone(),
                    "the GeoIP filter's xff_config reads X-Forwarded-For from any client: country, ASN and anonymous-network flags are the client's choice. Remove it and set xff_trusted_cidrs on the connection manager".to_string(),
                ));
            } else if !trusted_remote {
                out.push((
                    location.clone(),
                    "the GeoIP filter looks up the connection manager's remote address, taken from X-Forwarded-For (no use_remote_address, no xff_trusted_cidrs): geo is the client's choice".to_string(),
                ));
            }
        }
    }
    if facts.is_none() && !trusted_remote {
        out.push((
            location.clone(),
            "without client.facts_header the filter reads source.address, which this connection manager takes from X-Forwarded-For (no use_remote_address, no xff_trusted_cidrs): a client chooses its address".to_string(),
        ));
    }
    if let (Some(name), true) = (facts, facts_written) {
        if reaches_upstream(hcm, &filters, ours_at, name) {
            out.push((
                location.clone(),
                format!(
                    "the facts header `{name}` reaches the upstream (the client's address and the time): add it to route_config.request_headers_to_remove"
                ),
            ));
        }
    }
    if facts.is_some() && !facts_written {
        out.push((
            location,
            format!(
                "client.facts_header `{}` is written by no header_mutation filter of this connection manager: a client could send it",
                facts.unwrap_or("")
            ),
        ));
    }
}

/// Whether a header written for the filter would reach the upstream: the
/// inline route configuration (all of it, or every virtual host) does not
/// remove it, nor does a header_mutation after the filter. With routes from
/// RDS nothing can be said from this file: no warning.
fn reaches_upstream(hcm: &Map<String, Value>, filters: &[Value], ours_at: usize, name: &str) -> bool {
    let Some(routes) = hcm.get("route_config") else {
        return false;
    };
    let removes = |v: &Value| {
        v.get("request_headers_to_remove")
            .and_then(Value::as_array)
            .is_some_and(|h| h.iter().any(|h| h.as_str().is_some_and(|h| h.eq_ignore_ascii_case(name))))
    };
    let hosts = routes.get("virtual_hosts").and_then(Value::as_array).cloned().unwrap_or_default();
    let removed_after = filters.iter().skip(ours_at.saturating_add(1)).any(|f| {
        let typed = f.get("typed_config");
        typed.and_then(|t| t.get("@type")).and_then(Value::as_str) == Some(HEADER_MUTATION_TYPE)
            && typed
                .and_then(|t| t.get("mutations"))
                .and_then(|m| m.get("request_mutations"))
                .and_then(Value::as_array)
                .is_some_and(|ms| {
                    ms.iter().any(|m| m.get("remove").and_then(Value::as_str).is_some_and(|h| h.eq_ignore_ascii_case(name)))
                })
    });
    !(removes(routes) || (!hosts.is_empty() && hosts.iter().all(removes)) || removed_after)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ours(f: &Value) -> Option<Value> {
        (f.get("name").and_then(Value::as_str) == Some("abuse")).then(|| f["config"].clone())
    }

    fn hcm(extra: Value, facts_value: &str, geo: Option<Value>) -> Value {
        let mut filters = vec![json!({"name": "facts", "typed_config": {"@type": HEADER_MUTATION_TYPE,
            "mutations": {"request_mutations": [{"append": {"header": {"key": "x-abuse-facts", "value": facts_value}}}]}}})];
        if let Some(g) = geo {
            filters.push(json!({"name": "geo", "typed_config": g}));
        }
        filters.push(json!({"name": "abuse", "config": {"client": {"facts_header": "x-abuse-facts"}}}));
        let mut m = json!({"@type": HCM_TYPE, "http_filters": filters});
        for (k, v) in extra.as_object().unwrap() {
            m[k] = v.clone();
        }
        json!({"static_resources": {"listeners": [{"hcm": m}]}})
    }

    #[test]
    fn the_old_shipped_pattern_is_named() {
        let doc = hcm(json!({}), "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %START_TIME(%s%3f)%",
            Some(json!({"@type": GEOIP_TYPE, "xff_config": {"xff_num_trusted_hops": 0}})));
        let w = bootstrap_warnings(&doc, &ours);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].1.contains("%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%"));
        assert!(w[1].1.contains("xff_config"));
        assert!(w[0].0.ends_with("http_filters[2]"), "{}", w[0].0);
    }

    #[test]
    fn direct_peer_and_trusted_cidrs_pass() {
        let extra = json!({"original_ip_detection_extensions": [{"typed_config": {"xff_trusted_cidrs": {"cidrs": [{"address_prefix": "10.0.0.0", "prefix_len": 8}]}}}]});
        let doc = hcm(extra, "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT% %START_TIME(%s%3f)%", Some(json!({"@type": GEOIP_TYPE})));
        assert_eq!(bootstrap_warnings(&doc, &ours), vec![]);
        let doc = hcm(json!({"use_remote_address": true}), "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", None);
        assert_eq!(bootstrap_warnings(&doc, &ours), vec![]);
    }

    #[test]
    fn geoip_on_a_client_chosen_address_is_named() {
        let doc = hcm(json!({}), "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%", Some(json!({"@type": GEOIP_TYPE})));
        let w = bootstrap_warnings(&doc, &ours);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].1.contains("GeoIP"));
    }

    #[test]
    fn a_facts_header_that_reaches_the_upstream_is_named() {
        let trusted = json!({"use_remote_address": true});
        let with_routes = |routes: Value| {
            let mut doc = hcm(trusted.clone(), "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%", None);
            doc["static_resources"]["listeners"][0]["hcm"]["route_config"] = routes;
            bootstrap_warnings(&doc, &ours)
        };
        let w = with_routes(json!({"virtual_hosts": [{"name": "a"}, {"name": "b", "request_headers_to_remove": ["x-abuse-facts"]}]}));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].1.contains("reaches the upstream"), "{w:?}");
        assert_eq!(with_routes(json!({"request_headers_to_remove": ["X-Abuse-Facts"], "virtual_hosts": []})), vec![]);
        let every_host = json!({"virtual_hosts": [{"request_headers_to_remove": ["x-abuse-facts"]}]});
        assert_eq!(with_routes(every_host), vec![]);
        // A header_mutation after the filter removing it will do too.
        let mut doc = hcm(trusted, "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%", None);
        let hcm_at = &mut doc["static_resources"]["listeners"][0]["hcm"];
        hcm_at["route_config"] = json!({"virtual_hosts": [{"name": "a"}]});
        hcm_at["http_filters"].as_array_mut().unwrap().push(json!({"name": "strip", "typed_config": {
            "@type": HEADER_MUTATION_TYPE, "mutations": {"request_mutations": [{"remove": "x-abuse-facts"}]}}}));
        assert_eq!(bootstrap_warnings(&doc, &ours), vec![]);
    }

    #[test]
    fn trusting_everyone_is_named() {
        let w = config_warnings(&json!({"client": {"trusted_proxies": ["10.0.0.0/8", "0.0.0.0/0", "::/0"]}}));
        assert_eq!(w.len(), 2);
        assert!(w[0].contains("client.trusted_proxies[1]"));
    }
}
