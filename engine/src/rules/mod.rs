//! Rules as data: detectors the operator assembles in the configuration
//! (`rules[]`), for abuse no built-in detector foresaw — OTP and
//! password-reset abuse, coupon enumeration, SMS pumping, a partner over
//! its quota, an expensive endpoint over its cost budget.
//!
//! A rule reads like a CrowdSec scenario: **which requests** (`match`:
//! route groups, methods, a path template, request headers, and answer
//! statuses to count only failures), **grouped by what** (`key`: one or
//! two of client, address, prefix, session, API key, JWT claim, a header,
//! a query parameter, the login username, a JSON or form body field, the
//! endpoint), **counting what** (`requests`, `distinct:<field>`, or
//! `cost:<source>`: response bytes, upstream time, or a number the API
//! reports in a header), **over what window**, and **what happens at the
//! threshold** (`block` the key for `penalty_s`, escalating for repeat
//! offenders; `shed` while over; `tag`; `monitor`), with `reset_on`
//! statuses that forget a key's count (a success after a mistyped code).
//!
//! Each rule has its own fixed table of keys in shared data (`keys` × 72
//! bytes, see [`count`]), so one rule's flood never evicts another's
//! keys; a `fleet` rule also sends its counts to the scorer on the tick
//! and refuses the keys the fleet put over. A `shadow` rule counts and
//! reports, never acts. One file per concept: [`config`] (the section and
//! its validation), [`matcher`], [`key`], [`count`]; the engine's stage is
//! `engine/rules.rs`.

pub mod config;
pub mod count;
pub mod key;
pub mod matcher;

pub use config::{CostSource, CountSpec, HeaderCondition, RuleConfig, RuleMatch};

use crate::policy::DetectorAction;
use crate::routes::RouteTable;
use count::Counting;
use key::{FieldSpec, KeySpec};
use matcher::{Matcher, StatusSpec};
use std::sync::Arc;

/// Largest request body the rules read a field from (bigger bodies are
/// not read: the rules keyed by a body field do not count them).
pub const RULE_BODY_BYTES: usize = 8 * 1024;

/// One compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub matcher: Matcher,
    pub key: Vec<KeySpec>,
    pub count: CountSpec,
    pub counting: Counting,
    pub action: DetectorAction,
    pub weight: f32,
    pub reset_on: Vec<StatusSpec>,
    pub fleet: bool,
    pub shadow: bool,
    pub keys: u32,
    pub window_s: u32,
}

impl Rule {
    /// What the rule counts, for a decision event's figure ("distinct json:code").
    pub fn counts_what(&self) -> String {
        let field = |f: &FieldSpec| match f {
            FieldSpec::Header(h) => format!("header:{h}"),
            FieldSpec::Query(q) => format!("query:{q}"),
            FieldSpec::Username => "username".to_string(),
            FieldSpec::Json(j) => format!("json:{j}"),
            FieldSpec::Form(f) => format!("form:{f}"),
            FieldSpec::PathId => "path_id".to_string(),
        };
        match &self.count {
            CountSpec::Requests if self.matcher.on_answer() => "answers".to_string(),
            CountSpec::Requests => "requests".to_string(),
            CountSpec::Distinct(f) => format!("distinct {}", field(f)),
            CountSpec::Cost(CostSource::ResponseBytes) => "response bytes".to_string(),
            CountSpec::Cost(CostSource::UpstreamMs) => "upstream ms".to_string(),
            CountSpec::Cost(CostSource::Header(h)) => format!("cost ({h})"),
        }
    }

    fn new(c: &RuleConfig, routes: &RouteTable) -> Option<Rule> {
        let count = CountSpec::parse(&c.count).ok()?;
        let key = c.key.iter().map(|k| KeySpec::parse(k)).collect::<Result<Vec<_>, _>>().ok()?;
        Some(Rule {
            name: c.name.clone(),
            matcher: Matcher::new(&c.matcher, routes),
            counting: Counting {
                window_ms: u64::from(c.window_s).saturating_mul(1000),
                threshold: c.threshold,
                distinct: matches!(count, CountSpec::Distinct(_)),
                penalty_ms: u64::from(c.penalty()).saturating_mul(1000),
                max_penalty_ms: c.max_penalty_s.map(|s| u64::from(s).saturating_mul(1000)),
                restart_on_fire: c.action == DetectorAction::Block,
            },
            key,
            count,
            action: c.action,
            weight: c.weight,
            reset_on: c.reset_on.iter().filter_map(|s| StatusSpec::parse(s).ok()).collect(),
            fleet: c.fleet,
            shadow: c.shadow,
            keys: c.keys,
            window_s: c.window_s,
        })
    }

    /// The key or the counted field comes from the body (or the login's username).
    pub fn needs_body(&self) -> bool {
        self.key.iter().any(KeySpec::needs_body) || matches!(&self.count, CountSpec::Distinct(f) if f.needs_body())
    }

    /// Counted at the answer: only some statuses, or a cost.
    pub fn counts_at_answer(&self) -> bool {
        self.matcher.on_answer() || matches!(self.count, CountSpec::Cost(_))
    }

    /// Anything to do at the answer (count, or reset).
    pub fn at_answer(&self) -> bool {
        self.counts_at_answer() || !self.reset_on.is_empty()
    }

    pub fn resets_on(&self, status: u32) -> bool {
        self.reset_on.iter().any(|s| s.matches(status))
    }

    /// The refusal's status when it refuses (block 403, shed 429).
    pub fn refusal_status(&self) -> Option<u32> {
        match self.action {
            DetectorAction::Block => Some(403),
            DetectorAction::Shed => Some(429),
            DetectorAction::Tag | DetectorAction::Monitor => None,
        }
    }

    /// The field a `distinct` rule counts.
    pub fn distinct_field(&self) -> Option<&FieldSpec> {
        match &self.count {
            CountSpec::Distinct(f) => Some(f),
            _ => None,
        }
    }

    /// Table slots: `keys` rounded to whole shards of 64.
    pub fn shards(&self) -> usize {
        usize::try_from(self.keys.div_ceil(64)).unwrap_or(1).max(1)
    }
}

/// Every compiled rule, and what the host must read for them.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    pub rules: Vec<Rule>,
    /// Request headers any rule reads (conditions, keys, fields).
    header_names: Vec<String>,
    /// Answer headers a `cost:header:` rule reads.
    answer_header_names: Vec<String>,
    pub names: Arc<[String]>,
}

impl Rules {
    pub fn new(configs: &[RuleConfig], routes: &RouteTable) -> Rules {
        let rules: Vec<Rule> = configs.iter().filter_map(|c| Rule::new(c, routes)).collect();
        let mut header_names: Vec<String> = Vec::new();
        let mut answer_header_names: Vec<String> = Vec::new();
        let add = |list: &mut Vec<String>, name: &str| {
            if !list.iter().any(|n| n == name) {
                list.push(name.to_string());
            }
        };
        for rule in &rules {
            for name in rule.matcher.header_names() {
                add(&mut header_names, name);
            }
            let fields = rule.key.iter().filter_map(|k| match k {
                KeySpec::Field(f) => Some(f),
                _ => None,
            });
            for field in fields.chain(rule.distinct_field()) {
                if let FieldSpec::Header(name) = field {
                    add(&mut header_names, name);
                }
            }
            if let CountSpec::Cost(CostSource::Header(name)) = &rule.count {
                add(&mut answer_header_names, name);
            }
        }
        let names: Vec<String> = rules.iter().map(|r| r.name.clone()).collect();
        Rules { rules, header_names, answer_header_names, names: Arc::from(names) }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn header_names(&self) -> &[String] {
        &self.header_names
    }

    pub fn answer_header_names(&self) -> &[String] {
        &self.answer_header_names
    }

    pub fn uses_key(&self, wanted: &KeySpec) -> bool {
        self.rules.iter().any(|r| r.key.contains(wanted))
    }

    pub fn reads_response_bytes(&self) -> bool {
        self.rules.iter().any(|r| matches!(r.count, CountSpec::Cost(CostSource::ResponseBytes)))
    }

    pub fn has_fleet(&self) -> bool {
        self.rules.iter().any(|r| r.fleet)
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.rules.iter().position(|r| r.name == name)
    }
}

/// A rule's state for one request, across its phases.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pending {
    /// Rules (bit set) whose key or field is in the body: judged there.
    pub body: u32,
    /// Rules to count or reset at the answer: index, key, counted value's hash.
    pub answer: Vec<(usize, u64, u64)>,
    /// When the request came (for `cost:upstream_ms`).
    pub started_ms: u64,
}

/// What a rule's firing does to the request, as the engine applies it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Acted {
    pub hits: crate::verdict::RuleHits,
    /// Reasons to show (rules that tag, monitor or refuse).
    pub reasons: crate::reason::ReasonSet,
    /// The weight of the rules that fired (tag, shed, block).
    pub signal: crate::detectors::Signal,
    /// The refusal: status and seconds until the key is free again.
    pub refuse: Option<(u32, u64)>,
    /// A key was put in the penalty this very request (logged once).
    pub newly: bool,
    /// A `tag` rule fired: the request is tagged, whatever its weight.
    pub tag: bool,
    /// The fired rules' counts (index, the key's count), for decision events.
    pub figures: Vec<(usize, f32)>,
}

impl Acted {
    /// Rule `index` found its key over the threshold (`until_ms`: when its
    /// penalty ends, if any).
    pub fn fire(&mut self, index: usize, rule: &Rule, until_ms: Option<u64>, now_ms: u64, newly: bool) {
        let bit = 1u32 << index;
        self.hits.fired |= bit;
        if rule.shadow {
            // It reports what it would have done, never acts.
            self.hits.shadow |= bit;
            return;
        }
        self.reasons.insert_rule(index);
        if rule.action != DetectorAction::Monitor {
            self.signal.fire_rule(index, rule.weight);
        }
        self.tag |= rule.action == DetectorAction::Tag;
        if let Some(status) = rule.refusal_status() {
            self.hits.blocked |= bit;
            let retry_s = until_ms.map(|u| u.saturating_sub(now_ms).div_ceil(1000)).unwrap_or(1).max(1);
            self.refuse = Some(match self.refuse {
                // A block wins over a shed; the longer wait wins.
                Some((s, r)) => (s.min(status), r.max(retry_s)),
                None => (status, retry_s),
            });
            self.newly |= newly && rule.action == DetectorAction::Block;
        }
    }
}
