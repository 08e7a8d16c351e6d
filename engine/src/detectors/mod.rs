//! Detectors: each looks at one request (or its answer) in the light of the
//! client's record and returns a [`Signal`] — risk to add and the reasons why.

pub mod enumeration;
pub mod login;
pub mod probing;
pub mod rate;

use crate::reason::{Reason, ReasonSet};

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Signal {
    pub risk: f32,
    pub reasons: ReasonSet,
}

impl Signal {
    pub fn fire(&mut self, reason: Reason, risk: f32) {
        self.risk += risk.max(0.0);
        self.reasons.insert(reason);
    }

    pub fn add(&mut self, other: Signal) {
        self.risk += other.risk;
        self.reasons = self.reasons.union(other.reasons);
    }
}
