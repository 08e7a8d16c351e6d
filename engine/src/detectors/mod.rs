//! Detectors: each looks at one request (or its answer) in the light of the
//! client's record and returns a [`Signal`] — risk to add and the reasons why.

pub mod browser;
pub mod distributed_stuffing;
pub mod enumeration;
pub mod harvest;
pub mod login;
pub mod login_profile;
pub mod probing;
pub mod rate;
pub mod scraping;
pub mod session;
pub mod spike;

use crate::reason::{Reason, ReasonSet};

/// Room for every reason's share of a signal (reasons are a u32 bit set).
const MAX_REASONS: usize = 32;

/// Figures a signal carries, at most (a request rarely fires more than two).
pub const MAX_FIGURES: usize = 4;

/// What a detector counted against its limit when it fired — what a
/// decision event shows an operator ("29 failed-login usernames in 600 s;
/// limit 5"). `window_s` 0: not counted over a window.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Figure {
    pub what: &'static str,
    pub value: f32,
    pub limit: f32,
    pub window_s: u32,
}

impl Figure {
    pub fn new(what: &'static str, value: f64, limit: f64, window_ms: u64) -> Figure {
        let window_s = u32::try_from(window_ms / 1000).unwrap_or(u32::MAX);
        Figure { what, value: value as f32, limit: limit as f32, window_s }
    }

    /// "29 failed-login usernames in 600 s; limit 5".
    pub fn text(&self) -> String {
        let round = |v: f32| if (v - v.round()).abs() < 0.05 { format!("{}", v.round() as i64) } else { format!("{v:.1}") };
        match self.window_s {
            0 => format!("{} {}; limit {}", round(self.value), self.what, round(self.limit)),
            w => format!("{} {} in {w} s; limit {}", round(self.value), self.what, round(self.limit)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Signal {
    /// Total risk of the signal.
    pub risk: f32,
    pub reasons: ReasonSet,
    /// Risk per reason, so that each reason's configured action applies to its share.
    parts: [f32; MAX_REASONS],
    /// Risk from rules (`rules[].weight`): it tags, never boxes the client
    /// by itself — a rule refuses its own key (see `rules`).
    rule_risk: f32,
    /// Risk demoted to a tag whatever the reason's action ([`Signal::only_tag`]).
    tag_risk: f32,
    /// The first figures behind the reasons (for decision events).
    figures: [Option<(Reason, Figure)>; MAX_FIGURES],
}

impl Signal {
    pub fn fire(&mut self, reason: Reason, risk: f32) {
        let risk = if risk.is_finite() { risk.max(0.0) } else { 0.0 };
        self.risk += risk;
        if let Some(part) = self.parts.get_mut(reason as usize) {
            *part += risk;
        }
        self.reasons.insert(reason);
    }

    /// Rule `index` fired with `weight` (see [`Signal::rule_risk`]).
    pub fn fire_rule(&mut self, index: usize, weight: f32) {
        let weight = if weight.is_finite() { weight.max(0.0) } else { 0.0 };
        self.risk += weight;
        self.rule_risk += weight;
        self.reasons.insert_rule(index);
    }

    /// The share of the risk that rules added.
    pub fn rule_risk(&self) -> f32 {
        self.rule_risk
    }

    /// Makes `reason`'s share of this signal tag only, whatever its action
    /// (an endpoint spike driven by a partner under its own limit).
    pub fn only_tag(&mut self, reason: Reason) {
        if let Some(part) = self.parts.get_mut(reason as usize) {
            self.tag_risk += *part;
            *part = 0.0;
        }
    }

    /// The share of the risk that only tags (rules' and demoted reasons').
    pub fn tag_risk(&self) -> f32 {
        self.rule_risk + self.tag_risk
    }

    /// Fires with the figure behind it (kept when there is room).
    pub fn fire_with(&mut self, reason: Reason, risk: f32, figure: Figure) {
        self.fire(reason, risk);
        self.note(reason, figure);
    }

    fn note(&mut self, reason: Reason, figure: Figure) {
        if let Some(slot) = self.figures.iter_mut().find(|f| f.is_none()) {
            *slot = Some((reason, figure));
        }
    }

    pub fn add(&mut self, other: Signal) {
        self.risk += other.risk;
        self.rule_risk += other.rule_risk;
        self.tag_risk += other.tag_risk;
        self.reasons = self.reasons.union(other.reasons);
        for (mine, theirs) in self.parts.iter_mut().zip(other.parts.iter()) {
            *mine += *theirs;
        }
        for (reason, figure) in other.figures.into_iter().flatten() {
            self.note(reason, figure);
        }
    }

    /// The figures behind the signal's reasons, in the order they fired.
    pub fn figures(&self) -> [Option<(Reason, Figure)>; MAX_FIGURES] {
        self.figures
    }

    /// Risk contributed by one reason.
    pub fn part(&self, reason: Reason) -> f32 {
        self.parts.get(reason as usize).copied().unwrap_or(0.0)
    }
}
