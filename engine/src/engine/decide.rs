//! Stages 2 and 5, **penalty** and **decide**, shared by every phase (request,
//! body, answer): a client in the penalty box is refused before any other
//! work; a signal adds to the client's risk, each reason's share counted as
//! its configured action says, and a risk at `risk.block_at` boxes it.

use super::{Engine, Outcome};
use crate::risk;
use crate::config::{DetectorAction, Mode};
use crate::detectors::Signal;
use crate::identity::ClientAddr;
use crate::reason::{Reason, ReasonSet};
use crate::record::ClientRecord;
use crate::state::store::UpdateStats;
use crate::verdict::{Action, Verdict};

impl Engine {
    pub(super) fn penalized(&self, record: &ClientRecord, now_ms: u64) -> Option<Outcome> {
        // Penalty box first: no counting, no detectors, no write.
        record.penalized_at(now_ms).then(|| Outcome::Penalized {
            reasons: record.penalty_reasons,
            until_ms: record.penalty_until_ms,
            risk: risk::decayed(record.risk, record.last_seen_ms, now_ms, self.half_life_ms),
            decision: record.decision,
        })
    }

    /// Adds a signal to the record's risk and decides on a block.
    pub(super) fn apply(&self, record: &mut ClientRecord, signal: Signal, now_ms: u64) -> Outcome {
        let decayed = risk::decayed(record.risk, record.last_seen_ms, now_ms, self.half_life_ms);
        if decayed < 1.0 {
            record.recent_reasons = ReasonSet::default();
        }
        // Each reason's share counts as its configured action says. A shed
        // reason refuses this request only, unless the client already has
        // evidence of abuse (a blocking reason with risk at tag_at).
        let evidence = decayed >= self.config.risk.tag_at
            && record.recent_reasons.iter().any(|r| self.action_of(r) == DetectorAction::Block);
        let (mut blocking, mut tagging, mut shed) = (0.0f32, 0.0f32, false);
        for reason in signal.reasons.iter() {
            if record.quiet_for(reason, now_ms) {
                // An operator lifted the client for this: it may tag, not box.
                tagging += signal.part(reason);
                continue;
            }
            match self.action_of(reason) {
                DetectorAction::Block => blocking += signal.part(reason),
                DetectorAction::Tag => tagging += signal.part(reason),
                DetectorAction::Shed if evidence => blocking += signal.part(reason),
                DetectorAction::Shed => shed = true,
                DetectorAction::Monitor => {}
            }
        }
        // Rules' weight tags (their refusals are on their own keys), and so
        // do reasons demoted to a tag.
        tagging += signal.tag_risk();
        let mut risk = risk::add(decayed, blocking + tagging);
        if blocking <= 0.0 {
            // Tag-only signals never lift a client to block_at by themselves.
            let ceiling = (self.config.risk.block_at - 0.01).max(decayed);
            risk = risk.min(ceiling);
        }
        record.risk = risk;
        record.last_seen_ms = now_ms;
        // Records keep built-in reasons only: a rule's index is not
        // stable across reloads (the verdict names this request's rules).
        record.recent_reasons = record.recent_reasons.union(signal.reasons.builtins());
        let mut blocked_until_ms = None;
        let mut decision = 0;
        if risk >= self.config.risk.block_at && blocking > 0.0 {
            let until = now_ms.saturating_add(self.penalty_ms);
            record.penalty_until_ms = until;
            record.penalty_reasons = record.recent_reasons;
            decision = self.mint_decision();
            record.decision = decision;
            blocked_until_ms = Some(until);
        }
        Outcome::Scored {
            risk,
            fired: signal.reasons,
            reasons: record.recent_reasons,
            blocked_until_ms,
            shed,
            decision,
            figures: signal.figures(),
        }
    }

    /// Whether an outcome refuses the request (a box, a block, a shed).
    pub(super) fn refuses(outcome: &Outcome) -> bool {
        match outcome {
            Outcome::Penalized { .. } => true,
            Outcome::Scored { blocked_until_ms, shed, .. } => blocked_until_ms.is_some() || *shed,
        }
    }

    pub(super) fn action_of(&self, reason: Reason) -> DetectorAction {
        self.actions.get(reason as usize).copied().unwrap_or(DetectorAction::Block)
    }

    pub(super) fn verdict(
        &self,
        client: ClientAddr,
        updated: Result<(Outcome, UpdateStats), crate::state::store::UpdateFailed>,
        mode: Mode,
        now_ms: u64,
    ) -> Verdict {
        let mut v = Verdict::allow(client);
        v.mode = mode;
        let (outcome, stats) = match updated {
            Ok(done) => done,
            Err(failed) => {
                // Fail open: losing a count is better than blocking a user.
                v.store = failed.stats;
                v.store_failed = true;
                return v;
            }
        };
        v.store = stats;
        let blocked = match outcome {
            Outcome::Penalized { reasons, until_ms, risk, decision } => {
                v.penalized = true;
                v.reasons = reasons;
                v.risk = risk;
                v.decision = decision;
                Some(until_ms)
            }
            Outcome::Scored { risk, fired, reasons, blocked_until_ms, shed, decision, figures } => {
                v.decision = decision;
                v.figures = figures;
                v.fired = fired;
                v.reasons = reasons;
                v.risk = risk;
                v.newly_blocked = blocked_until_ms.is_some();
                if risk >= self.config.risk.tag_at {
                    v.action = Action::Tag;
                }
                if shed && blocked_until_ms.is_none() {
                    // Only this request: the next one may fit again.
                    v.reasons = v.reasons.union(fired);
                    v.block(429, 1);
                }
                blocked_until_ms
            }
        };
        if let Some(until_ms) = blocked {
            v.penalty_until_ms = until_ms;
            v.block(v.reasons.block_status(), until_ms.saturating_sub(now_ms).div_ceil(1000));
        }
        v
    }
}
