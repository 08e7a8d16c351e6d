//! Detectors: each looks at one request (or its answer) in the light of the
//! client's record and returns a [`Signal`] — risk to add and the reasons why.

pub mod browser;
pub mod distributed_stuffing;
pub mod enumeration;
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

    pub fn add(&mut self, other: Signal) {
        self.risk += other.risk;
        self.rule_risk += other.rule_risk;
        self.reasons = self.reasons.union(other.reasons);
        for (mine, theirs) in self.parts.iter_mut().zip(other.parts.iter()) {
            *mine += *theirs;
        }
    }

    /// Risk contributed by one reason.
    pub fn part(&self, reason: Reason) -> f32 {
        self.parts.get(reason as usize).copied().unwrap_or(0.0)
    }
}
