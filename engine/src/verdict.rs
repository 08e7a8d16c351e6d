//! What the filter does with a request, and how it says so: the local reply
//! body, the upstream headers, the structured log line.

use crate::policy::Mode;
use crate::identity::ClientAddr;
use crate::reason::ReasonSet;
use crate::state::store::UpdateStats;
use serde_json::json;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Forward.
    Allow,
    /// Forward; the client is suspicious enough to be marked in stats.
    Tag,
    /// Answer with a local reply; nothing reaches the upstream.
    Block,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Tag => "tag",
            Action::Block => "block",
        }
    }
}

/// What the scorer had to do with this request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalloutPlan {
    /// Not borderline, or no scorer configured.
    NotAsked,
    /// A cached scorer verdict decided.
    CacheHit,
    /// Another request of the client is asking; this one proceeds.
    InFlight,
    /// The breaker is open: the failure mode decided.
    BreakerOpen,
    /// Pause the request and ask the scorer.
    Ask,
    Answered,
    Failed,
    TimedOut,
}

/// The engine's answer for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub action: Action,
    /// Block mode would have blocked this request (true for real blocks too).
    pub would_block: bool,
    /// Decided by the penalty box: the client was blocked earlier.
    pub penalized: bool,
    /// This request put the client into the penalty box (logged once).
    pub newly_blocked: bool,
    /// Reasons behind the client's risk (of the block, when blocked).
    pub reasons: ReasonSet,
    /// Detectors that fired on this very request (for per-detector stats).
    pub fired: ReasonSet,
    pub risk: f32,
    pub status: u32,
    pub retry_after_s: u64,
    pub client: ClientAddr,
    /// The user-agent tag that, with the address, names the client.
    pub agent: Option<u32>,
    /// The verdict is about the address's pool of new identities (see
    /// `engine/identify.rs`), named `addr#pool`.
    pub pool: bool,
    /// On login routes: the `x-abuse-login-risk` value, when there is a risk.
    pub login_risk: Option<String>,
    /// A successful login's risk against its account's profile, when it
    /// had any reason (counted per reason by the host).
    pub profile_risk: Option<crate::detectors::login_profile::ProfileRisk>,
    pub store: UpdateStats,
    /// Shared state could not be updated; the request was let through.
    pub store_failed: bool,
    /// Allowlisted: not judged at all.
    pub exempt: bool,
    /// Decided on the answer (outcome detectors), not on the request.
    pub on_response: bool,
    /// The mode in force for this request (global, or its route group's).
    pub mode: Mode,
    pub callout: CalloutPlan,
    /// What the rules (`rules[]`) did on this request, for per-rule stats.
    pub rules: RuleHits,
    /// The configured rule names, so that a rule's reason bit can be named
    /// (shared with the engine; empty without rules).
    pub rule_names: Arc<[String]>,
    /// The fired rules' counts (rule index, the key's count), for the
    /// figure a decision event shows against each rule's threshold.
    pub rule_figures: Vec<(usize, f32)>,
    /// The decision's id (0: none): the box's, or one minted for this decision.
    pub decision: u64,
    /// The id as the refusal shows it (`x-abuse-decision`, `decision_id`).
    pub decision_id: Option<String>,
    /// The detectors' figures behind `fired`.
    pub figures: Figures,
    /// In the penalty box until (ms; 0: not boxed).
    pub penalty_until_ms: u64,
}

/// Per-rule outcome of one request, as bit sets by rule index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RuleHits {
    /// The request matched the rule and had its key: it was counted (or checked).
    pub matched: u32,
    /// The key reached the rule's threshold (shadow rules included).
    pub fired: u32,
    /// The rule refused this request (or would have, in monitor mode).
    pub blocked: u32,
    /// Shadow rules that would have acted: they report, never act.
    pub shadow: u32,
}

impl RuleHits {
    pub fn is_empty(&self) -> bool {
        self.matched == 0 && self.fired == 0 && self.blocked == 0
    }

    pub fn add(&mut self, other: RuleHits) {
        self.matched |= other.matched;
        self.fired |= other.fired;
        self.blocked |= other.blocked;
        self.shadow |= other.shadow;
    }
}

/// A signal's figures, as a verdict carries them.
pub type Figures = [Option<(crate::reason::Reason, crate::detectors::Figure)>; crate::detectors::MAX_FIGURES];

impl Verdict {
    pub fn allow(client: ClientAddr) -> Verdict {
        Verdict {
            action: Action::Allow,
            would_block: false,
            penalized: false,
            newly_blocked: false,
            reasons: ReasonSet::default(),
            fired: ReasonSet::default(),
            risk: 0.0,
            status: 0,
            retry_after_s: 0,
            pool: false,
            client,
            agent: None,
            login_risk: None,
            profile_risk: None,
            store: UpdateStats::default(),
            store_failed: false,
            exempt: false,
            on_response: false,
            mode: Mode::Monitor,
            callout: CalloutPlan::NotAsked,
            rules: RuleHits::default(),
            rule_names: Arc::from(Vec::new()),
            rule_figures: Vec::new(),
            decision: 0,
            decision_id: None,
            figures: Figures::default(),
            penalty_until_ms: 0,
        }
    }

    /// Every reason's name, rules' included.
    pub fn reason_names(&self) -> Vec<&str> {
        self.reasons.names_with(&self.rule_names)
    }

    /// Blocks (or, in monitor mode, would block and tags) with `status`.
    pub fn block(&mut self, status: u32, retry_after_s: u64) {
        self.would_block = true;
        self.status = status;
        self.retry_after_s = retry_after_s.max(1);
        self.action = match self.mode {
            Mode::Block => Action::Block,
            Mode::Monitor => Action::Tag,
        };
    }

    /// `x-abuse-score` value: the risk rounded down, so a score shown as
    /// 100 always means "at block_at 100".
    pub fn score_header(&self) -> String {
        format!("{}", self.risk.max(0.0).floor() as u64)
    }

    /// `x-abuse-reasons` value: comma-separated reason names.
    pub fn reasons_header(&self) -> String {
        self.reason_names().join(",")
    }

    /// The access-log text of a decision worth logging — anything but a clean
    /// allow (a risk, a reason, a tag or a block) — else None:
    /// `action=block score=100 reasons=credential_stuffing` (`action` is
    /// `allow`, `tag`, `block` or `would_block`; `score` the risk rounded down,
    /// `reasons` comma-separated, then `decision=<id>` when it has one); a
    /// successful login that differed from its account's profile adds
    /// `login_risk="high; score=4; reasons=new_country,new_device"`. Both
    /// host adapters write it, so both builds log the same text.
    pub fn decision_text(&self) -> Option<String> {
        let clean = self.action == Action::Allow
            && !self.would_block
            && self.risk < 1.0
            && self.reasons.is_empty()
            && self.profile_risk.is_none();
        if clean {
            return None;
        }
        let action = if self.would_block && self.action != Action::Block { "would_block" } else { self.action.name() };
        let mut text = format!("action={action} score={} reasons={}", self.score_header(), self.reasons_header());
        if let Some(id) = &self.decision_id {
            text.push_str(" decision=");
            text.push_str(id);
        }
        // A successful login's risk, as the application was told it.
        Some(match &self.login_risk {
            Some(risk) if self.profile_risk.is_some() => format!("{text} login_risk=\"{risk}\""),
            _ => text,
        })
    }

    /// Body of the local reply: `{"error","reasons","retry_after_s","decision_id"}`
    /// (the id is what a refused user quotes to support).
    pub fn block_body(&self) -> String {
        json!({
            "error": "request blocked",
            "reasons": self.reason_names(),
            "retry_after_s": self.retry_after_s,
            "decision_id": self.decision_id,
        })
        .to_string()
    }

    /// One structured line for a block or a would-block. The path goes
    /// without its query string: tokens travel in URLs, logs travel far.
    pub fn log_line(&self, method: &str, path: &str) -> String {
        let mode = self.mode;
        let path: String = path.split('?').next().unwrap_or("").chars().take(256).collect();
        let method: String = method.chars().take(16).collect();
        json!({
            "event": if self.action == Action::Block { "block" } else { "would_block" },
            "mode": match mode { Mode::Block => "block", Mode::Monitor => "monitor" },
            "client": self.client.to_string(),
            "agent": if self.pool { Some(crate::identity::POOL_TAG.to_string()) } else { self.agent.map(|a| format!("{a:08x}")) },
            "reasons": self.reason_names(),
            "risk": (f64::from(self.risk) * 10.0).round() / 10.0,
            "status": self.status,
            "retry_after_s": self.retry_after_s,
            "method": method,
            "path": path,
            "decision_id": self.decision_id,
        })
        .to_string()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::reason::Reason;

    #[test]
    fn body_and_log_are_json() {
        let mut v = Verdict::allow(ClientAddr::Ip("192.0.2.1".parse().unwrap()));
        v.action = Action::Block;
        v.mode = Mode::Block;
        v.reasons.insert(Reason::RateLimit);
        v.retry_after_s = 30;
        v.risk = 123.96;
        let body: serde_json::Value = serde_json::from_str(&v.block_body()).unwrap();
        assert_eq!(body["error"], "request blocked");
        assert_eq!(body["reasons"][0], "rate_limit");
        assert_eq!(body["retry_after_s"], 30);
        let log: serde_json::Value = serde_json::from_str(&v.log_line("GET", "/x\"y")).unwrap();
        assert_eq!(log["event"], "block");
        assert_eq!(log["client"], "192.0.2.1");
        assert_eq!(log["path"], "/x\"y");
        let log: serde_json::Value = serde_json::from_str(&v.log_line("GET", "/reset?token=s3cret&u=1")).unwrap();
        assert_eq!(log["path"], "/reset", "no query string (tokens) in logs");
        v.pool = true;
        let log: serde_json::Value = serde_json::from_str(&v.log_line("GET", "/x")).unwrap();
        assert_eq!(log["agent"], "pool");
        assert_eq!(v.score_header(), "123");
        assert_eq!(v.reasons_header(), "rate_limit");
    }
}
