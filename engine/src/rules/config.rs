//! The `rules[]` section: declarative detectors the operator assembles —
//! what to count (`match`, `count`), grouped by what (`key`), over what
//! window, and what happens at the threshold. Parsed strictly (unknown keys
//! refused) and validated here; an error names the rule's index and key
//! (`rules[2].window_s`).

use super::key::{FieldSpec, KeySpec};
use super::matcher::StatusSpec;
use crate::policy::DetectorAction;
use crate::reason::{Reason, MAX_RULES};
use crate::validate::{check_finite_range, check_header_name, check_list, check_range, err, ConfigError};
use serde::Deserialize;

/// Most parts in a rule's key (a key is one part or a combination of two).
pub const MAX_KEY_PARTS: usize = 2;
/// Most header conditions, statuses, methods and route groups per rule.
pub const MAX_CONDITIONS: usize = 16;
/// Longest rule name: it becomes a stat name and a header value.
pub const MAX_RULE_NAME: usize = 48;
/// Keys a rule tracks by default, and at most (`keys`).
pub const DEFAULT_RULE_KEYS: u32 = 4096;
pub const MAX_RULE_KEYS: u32 = 65_536;

/// One rule (`rules[i]`). See docs/rules.md for every field's semantics.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// The rule's reason name (in refusal bodies, `x-abuse-reasons`, logs,
    /// stats `abuse_filter.rule.<name>.*`): 1 to 48 of `a-z 0-9 _`, not a
    /// built-in reason's name.
    #[cfg_attr(feature = "schema", schemars(regex(pattern = r"^[a-z0-9_]{1,48}$")))]
    pub name: String,
    /// Which requests the rule counts.
    #[serde(rename = "match", default)]
    pub matcher: RuleMatch,
    /// What it groups by: one or two of `client`, `address`, `prefix`
    /// (the address's /24 or /64), `session`, `api_key`, `jwt_claim`,
    /// `header:<name>`, `username`, `json:<field>`, `form:<field>`,
    /// `endpoint`. A request missing a part is not counted by this rule.
    #[cfg_attr(feature = "schema", schemars(length(min = 1, max = 2)))]
    pub key: Vec<String>,
    /// `requests` (default), `distinct:<field>` (field: `path_id`,
    /// `query:<name>`, `header:<name>`, `username`, `json:<field>`,
    /// `form:<field>`), or `cost:<source>` (`response_bytes`,
    /// `upstream_ms`, `header:<name>`).
    #[serde(default = "default_count")]
    #[cfg_attr(feature = "schema", schemars(regex(pattern = r"^(requests|distinct:.+|cost:(response_bytes|upstream_ms|header:[a-z0-9_-]+))$")))]
    pub count: String,
    /// The counting window, seconds (1 to 86400).
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = 86400)))]
    pub window_s: u32,
    /// The rule fires when its key's count in the window reaches this.
    pub threshold: f64,
    /// `block` (403 to the key for `penalty_s`), `shed` (429 while over,
    /// and for `penalty_s`), `tag` (reason and weight on the request), or
    /// `monitor` (reason only).
    pub action: DetectorAction,
    /// Risk the firing adds to the client's score (it tags; only built-in
    /// detectors put a client in the penalty box).
    #[serde(default = "default_weight")]
    pub weight: f32,
    /// How long a fired key stays refused, seconds (`block` default 60,
    /// `shed` default 0: only while over the threshold).
    #[serde(default)]
    pub penalty_s: Option<u32>,
    /// Escalation: each repeat offence of the key doubles its penalty, up
    /// to this many seconds (unset: no escalation).
    #[serde(default)]
    pub max_penalty_s: Option<u32>,
    /// Answer statuses (`"200"`, `"2xx"`) that reset the key's count
    /// (CrowdSec's `cancel_on`).
    #[serde(default)]
    pub reset_on: Vec<String>,
    /// Count fleet-wide through the scorer's tick channel (needs
    /// `scorer.events` and the fleet's secret): every Envoy refuses a key
    /// the fleet put over.
    #[serde(default)]
    pub fleet: bool,
    /// Count and report (stats, log line) what it would have done; never act.
    #[serde(default)]
    pub shadow: bool,
    /// Keys tracked (fixed table, 64 to 65536; 72 bytes each).
    #[serde(default = "default_keys")]
    pub keys: u32,
}

fn default_count() -> String {
    "requests".to_string()
}

fn default_weight() -> f32 {
    10.0
}

fn default_keys() -> u32 {
    DEFAULT_RULE_KEYS
}

/// Which requests a rule sees; every condition given must hold.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct RuleMatch {
    /// Route group names (`route_groups[].name`): any of them.
    pub route_groups: Vec<String>,
    /// Uppercase methods: any of them (empty: every method).
    pub methods: Vec<String>,
    /// A path template: `/api/otp/verify`, `/api/users/*` (`*` one
    /// segment), `/api/**` (`**` last: any rest). The query is ignored.
    pub path: Option<String>,
    /// Request header conditions: all of them.
    pub headers: Vec<HeaderCondition>,
    /// Answer statuses (`"401"`, `"4xx"`): the rule counts at the answer,
    /// and only these (e.g. failures).
    pub statuses: Vec<String>,
}

/// One request header condition: exactly one of `present`, `equals`, `prefix`.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct HeaderCondition {
    /// Lowercase header name.
    pub name: String,
    /// `true`: the header is present; `false`: it is absent.
    #[serde(default)]
    pub present: Option<bool>,
    #[serde(default)]
    pub equals: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
}

/// What a rule's `count` parses to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CountSpec {
    Requests,
    Distinct(FieldSpec),
    Cost(CostSource),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CostSource {
    ResponseBytes,
    UpstreamMs,
    /// A number the API reports in this response header.
    Header(String),
}

impl CountSpec {
    pub fn parse(text: &str) -> Result<CountSpec, String> {
        if text == "requests" {
            return Ok(CountSpec::Requests);
        }
        if let Some(field) = text.strip_prefix("distinct:") {
            return FieldSpec::parse(field).map(CountSpec::Distinct);
        }
        if let Some(source) = text.strip_prefix("cost:") {
            return match source {
                "response_bytes" => Ok(CountSpec::Cost(CostSource::ResponseBytes)),
                "upstream_ms" => Ok(CountSpec::Cost(CostSource::UpstreamMs)),
                _ => match source.strip_prefix("header:") {
                    Some(h) => header_name(h).map(|h| CountSpec::Cost(CostSource::Header(h))),
                    None => Err(format!("{source:?}: cost is response_bytes, upstream_ms or header:<name>")),
                },
            };
        }
        Err(format!("{text:?}: one of requests, distinct:<field>, cost:<source>"))
    }
}

/// A lowercase header name, or why not.
pub(crate) fn header_name(name: &str) -> Result<String, String> {
    check_header_name("", name).map(|_| name.to_string()).map_err(|e| e.problem)
}

/// Whether `name` is a safe rule name: a stat name part and a header value.
pub fn valid_rule_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_RULE_NAME
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl RuleConfig {
    pub fn default_penalty_s(&self) -> u32 {
        match self.action {
            DetectorAction::Block => 60,
            _ => 0,
        }
    }

    pub fn penalty(&self) -> u32 {
        self.penalty_s.unwrap_or_else(|| self.default_penalty_s())
    }
}

/// Validates every rule; `groups` are the configured route group names,
/// `events` whether the scorer's tick channel is on (fleet rules need it).
pub fn validate(rules: &[RuleConfig], groups: &[&str], events: bool) -> Result<(), ConfigError> {
    check_list("rules", rules.len(), MAX_RULES)?;
    for (i, rule) in rules.iter().enumerate() {
        let key = |k: &str| format!("rules[{i}].{k}");
        if !valid_rule_name(&rule.name) {
            return Err(err(key("name"), format!("{:?}: 1 to {MAX_RULE_NAME} of a-z 0-9 _", rule.name)));
        }
        if Reason::ALL.iter().any(|r| r.name() == rule.name) {
            return Err(err(key("name"), format!("{:?} is a built-in reason", rule.name)));
        }
        if rules.iter().take(i).any(|o| o.name == rule.name) {
            return Err(err(key("name"), format!("duplicate rule {:?}", rule.name)));
        }
        validate_match(&rule.matcher, groups, &|k: &str| key(&format!("match.{k}")))?;
        if rule.key.is_empty() || rule.key.len() > MAX_KEY_PARTS {
            return Err(err(key("key"), format!("one or {MAX_KEY_PARTS} parts")));
        }
        for (j, part) in rule.key.iter().enumerate() {
            KeySpec::parse(part).map_err(|p| err(key(&format!("key[{j}]")), p))?;
        }
        CountSpec::parse(&rule.count).map_err(|p| err(key("count"), p))?;
        check_range(&key("window_s"), rule.window_s, 1, 86_400)?;
        if !rule.threshold.is_finite() || rule.threshold < 1.0 || rule.threshold > 1e12 {
            return Err(err(key("threshold"), format!("{} is out of range [1, 1e12]", rule.threshold)));
        }
        check_finite_range(&key("weight"), rule.weight, 0.0, 1000.0)?;
        if let Some(p) = rule.penalty_s {
            check_range(&key("penalty_s"), p, 0, 86_400)?;
        }
        if rule.action == DetectorAction::Block && rule.penalty() == 0 {
            // A block that ends the moment it starts is a shed.
            return Err(err(key("penalty_s"), "a block needs at least 1 s (or use \"shed\")"));
        }
        if let Some(max) = rule.max_penalty_s {
            check_range(&key("max_penalty_s"), max, rule.penalty().max(1), 7 * 86_400)?;
        }
        check_list(&key("reset_on"), rule.reset_on.len(), MAX_CONDITIONS)?;
        for (j, s) in rule.reset_on.iter().enumerate() {
            StatusSpec::parse(s).map_err(|p| err(key(&format!("reset_on[{j}]")), p))?;
        }
        // (`fleet` without the scorer's tick channel counts per Envoy, like
        // any rule: `abuse-filter-check` warns. Refusing the configuration
        // would take the whole filter down with a scorer section change.)
        let _ = events;
        check_range(&key("keys"), rule.keys, 64, MAX_RULE_KEYS)?;
    }
    Ok(())
}

fn validate_match(m: &RuleMatch, groups: &[&str], key: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
    check_list(&key("route_groups"), m.route_groups.len(), MAX_CONDITIONS)?;
    for (j, g) in m.route_groups.iter().enumerate() {
        if !groups.contains(&g.as_str()) {
            return Err(err(key(&format!("route_groups[{j}]")), format!("no route group {g:?}")));
        }
    }
    check_list(&key("methods"), m.methods.len(), MAX_CONDITIONS)?;
    for (j, method) in m.methods.iter().enumerate() {
        if method.is_empty() || method.len() > 16 || !method.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(err(key(&format!("methods[{j}]")), format!("{method:?} is not an uppercase HTTP method")));
        }
    }
    if let Some(path) = &m.path {
        super::matcher::PathTemplate::parse(path).map_err(|p| err(key("path"), p))?;
    }
    check_list(&key("headers"), m.headers.len(), MAX_CONDITIONS)?;
    for (j, h) in m.headers.iter().enumerate() {
        check_header_name(&key(&format!("headers[{j}].name")), &h.name)?;
        let given = usize::from(h.present.is_some()) + usize::from(h.equals.is_some()) + usize::from(h.prefix.is_some());
        if given != 1 {
            return Err(err(key(&format!("headers[{j}]")), "exactly one of present, equals, prefix"));
        }
    }
    check_list(&key("statuses"), m.statuses.len(), MAX_CONDITIONS)?;
    for (j, s) in m.statuses.iter().enumerate() {
        StatusSpec::parse(s).map_err(|p| err(key(&format!("statuses[{j}]")), p))?;
    }
    Ok(())
}
