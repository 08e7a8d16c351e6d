//! The decision: the filter's rule score, plus what the model and the fleet
//! add. A pure function of its inputs (request, model assessment, fleet
//! signals, time), so every rule below is unit-tested.
//!
//! ```text
//! score = min(risk, block_at)                    the filter's own score
//!       + max(block_at / 2, 60 · anomaly)        model, once warm, if anomaly > 0.5
//!                                                and the key is one party's (< 4 sessions)
//!       + 50 if the username had ≥ 20 attempts fleet-wide in 10 min   (credential_stuffing)
//!       + 50 if the session was used from ≥ 5 addresses in 10 min     (session_sharing)
//! action = block  if score − model ≥ block_at, or the client is blocked fleet-wide
//!          tag    if score ≥ block_at / 2
//!          allow  otherwise
//! ```
//!
//! Why these weights: the model adds only beyond its route group's tag
//! line (anomaly > 0.5: a calibrated line a normal client crosses with
//! probability ≤ 8/1,001, see `model`), and there it is a tag by itself
//! (half a block), at most 60. **The model can make a tag, never a block**: the block needs the rules' and the fleet's
//! points alone. It used to lift a borderline client (risk 40–99) over the
//! line, while it never left warm-up; once it learned from all traffic
//! (`models`), the first `make eval --quick` blocked the benign partner
//! integration — borderline on tag-only reasons (`endpoint_spike`,
//! `machine_rhythm`), and of course unlike any person (anomaly 1.0). A
//! learned guess marks and explains; evidence blocks. Each fleet signal is strong evidence seen nowhere else, worth
//! half a block. A new block is published to the fleet for `4 · ttl_s`
//! (at least 60 s): long enough to outlive several filter polls.
//!
//! **A shared key is not the model's to tag.** Behind a key with
//! [`SHARED_KEY_SESSIONS`] or more sessions (an office's NAT, a family's
//! router with one browser build) many people logged in: its mix is the
//! crowd's, unlike any one client's, and a tag would reach every one of
//! them (`make eval`: one office key tagged was 38 of 1,151 benign clients,
//! 3.5 %, against the issue's 1 %). The model's anomaly is still reported;
//! the rules judge such a key as before (a scraper that juggles sessions
//! meets session churn there).
//!
//! Bounds on what a caller claims: the request's risk counts at most
//! `block_at` (a `risk: 1e6` is a block, not a bigger or longer one: every
//! block lasts the policy's `verdict_ms`), and a stored block handed out
//! again never ends later than `verdict_ms` from now ([`cap_verdict`]).

use crate::model::Assessment;
use abuse_engine::wire::{FleetVerdict, ScoreAction, ScoreRequest, ScoreResponse, FEATURE_NAMES, WIRE_VERSION};

pub const REASON_ANOMALY: &str = "anomaly";
pub const REASON_STUFFING: &str = "credential_stuffing";
pub const REASON_SHARING: &str = "session_sharing";
/// A key with this many sessions (the filter's estimate) is several
/// people's: the model does not tag it (module doc).
pub const SHARED_KEY_SESSIONS: f32 = 4.0;
/// One named feature of a sample's vector (0 when the name is unknown).
pub fn feature(v: &[f32], name: &str) -> f32 {
    FEATURE_NAMES.iter().position(|n| *n == name).and_then(|i| v.get(i)).copied().unwrap_or(0.0)
}

/// Most reasons in one answer (requests are validated to fewer; fleet
/// verdicts may add theirs).
const MAX_REASONS: usize = 24;

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub block_at: f32,
    pub ttl_s: u32,
    /// Most the model can add (at anomaly 1.0).
    pub model_weight: f32,
    /// Fleet-wide attempts on one username that mean stuffing.
    pub stuffing_attempts: f64,
    /// Fleet-wide addresses on one session that mean sharing.
    pub sharing_addresses: u64,
    /// What each fleet signal adds.
    pub fleet_weight: f32,
}

impl Policy {
    pub fn new(block_at: f32, ttl_s: u32) -> Policy {
        Policy {
            block_at,
            ttl_s,
            model_weight: 60.0,
            stuffing_attempts: 20.0,
            sharing_addresses: 5,
            fleet_weight: 50.0,
        }
    }

    /// How long a new block is published to the fleet.
    pub fn verdict_ms(&self) -> u64 {
        u64::from(self.ttl_s).saturating_mul(4).max(60) * 1000
    }
}

/// What the fleet store knows about this request's identities.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FleetSignals {
    /// Attempts on the request's username fleet-wide (0 without a username).
    pub username_attempts: f64,
    /// Distinct addresses of the request's session fleet-wide (0 without one).
    pub session_addresses: u64,
    /// A live block on the client, decided by any scorer.
    pub blocked: Option<FleetVerdict>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub response: ScoreResponse,
    /// A block to publish to the fleet (none when the client already is).
    pub new_verdict: Option<FleetVerdict>,
    /// What the model added to the score.
    pub model_points: f32,
    /// The request claimed a risk above `block_at` (counted there).
    pub risk_capped: bool,
}

/// Caps a stored block's end at `verdict_ms` from now (a block written by
/// another version, or into Redis by hand, cannot outlast the policy);
/// whether it was capped.
pub fn cap_verdict(policy: &Policy, verdict: &mut FleetVerdict, now_ms: u64) -> bool {
    let latest = now_ms.saturating_add(policy.verdict_ms());
    let capped = verdict.until_ms > latest;
    verdict.until_ms = verdict.until_ms.min(latest);
    capped
}

fn push_reason(reasons: &mut Vec<String>, reason: &str) {
    if reasons.len() < MAX_REASONS && !reasons.iter().any(|r| r == reason) {
        reasons.push(reason.to_string());
    }
}

pub fn combine(
    policy: &Policy,
    req: &ScoreRequest,
    model: Option<&Assessment>,
    fleet: &FleetSignals,
    now_ms: u64,
) -> Decision {
    let claimed = if req.features.risk.is_finite() {
        req.features.risk.max(0.0)
    } else {
        0.0
    };
    let risk_capped = claimed > policy.block_at;
    let risk = claimed.min(policy.block_at);
    let mut score = risk;
    let mut reasons = Vec::new();
    for r in &req.reasons {
        push_reason(&mut reasons, r);
    }

    if fleet.username_attempts >= policy.stuffing_attempts {
        score += policy.fleet_weight;
        push_reason(&mut reasons, REASON_STUFFING);
    }
    if fleet.session_addresses >= policy.sharing_addresses {
        score += policy.fleet_weight;
        push_reason(&mut reasons, REASON_SHARING);
    }

    let mut model_points = 0.0;
    if let Some(a) = model {
        let anomaly = if a.anomaly.is_finite() {
            a.anomaly.clamp(0.0, 1.0)
        } else {
            0.0
        };
        // Beyond its group's tag line (anomaly > 0.5) the model is a tag by
        // itself (half a block), up to `model_weight` at anomaly 1.
        let shared = req.features.sessions.is_finite() && req.features.sessions >= SHARED_KEY_SESSIONS;
        model_points = if anomaly > 0.5 && !shared {
            (policy.block_at / 2.0).max(policy.model_weight * anomaly)
        } else {
            0.0
        };
        if model_points > 0.0 {
            score += model_points;
            push_reason(&mut reasons, REASON_ANOMALY);
        }
    }

    let mut ttl_s = policy.ttl_s;
    if let Some(block) = &fleet.blocked {
        score = score.max(policy.block_at);
        for r in &block.reasons {
            push_reason(&mut reasons, r);
        }
        // Reuse no longer than the fleet block lasts.
        let left_s = block.until_ms.saturating_sub(now_ms).div_ceil(1000);
        ttl_s = ttl_s.min(u32::try_from(left_s).unwrap_or(u32::MAX)).max(1);
    }

    let action = if score - model_points >= policy.block_at || fleet.blocked.is_some() {
        ScoreAction::Block
    } else if score >= policy.block_at / 2.0 {
        ScoreAction::Tag
    } else {
        ScoreAction::Allow
    };
    let new_verdict =
        (action == ScoreAction::Block && fleet.blocked.is_none()).then(|| FleetVerdict {
            client: req.client.clone(),
            reasons: reasons.clone(),
            until_ms: now_ms.saturating_add(policy.verdict_ms()),
        });
    let anomaly = model.map(|a| a.anomaly);
    let explanation = model
        .filter(|_| model_points > 0.0)
        .map(|a| a.explanation.clone())
        .unwrap_or_default();
    Decision {
        response: ScoreResponse {
            version: WIRE_VERSION,
            score: (score * 100.0).round() / 100.0,
            action,
            reasons,
            ttl_s,
            anomaly,
            explanation,
        },
        new_verdict,
        model_points,
        risk_capped,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use abuse_engine::wire::{Contribution, Features};

    const NOW: u64 = 1_700_000_000_000;

    fn req(risk: f32, reasons: &[&str]) -> ScoreRequest {
        ScoreRequest {
            version: WIRE_VERSION,
            client: "203.0.113.7".into(),
            reasons: reasons.iter().map(|r| r.to_string()).collect(),
            features: Features {
                risk,
                ..Features::default()
            },
            ..ScoreRequest::default()
        }
    }

    fn anomaly(a: f32) -> Assessment {
        Assessment {
            anomaly: a,
            explanation: vec![Contribution {
                feature: "login_failures".into(),
                weight: 1.0,
            }],
        }
    }

    fn policy() -> Policy {
        Policy::new(100.0, 30)
    }

    #[test]
    fn rules_alone_set_the_action() {
        let quiet = FleetSignals::default();
        let d = combine(&policy(), &req(10.0, &[]), None, &quiet, NOW);
        assert_eq!(
            (d.response.score, d.response.action),
            (10.0, ScoreAction::Allow)
        );
        assert!(
            d.response.reasons.is_empty()
                && d.new_verdict.is_none()
                && d.response.anomaly.is_none()
        );
        let d = combine(&policy(), &req(50.0, &["probing"]), None, &quiet, NOW);
        assert_eq!(
            (d.response.action, d.response.reasons.clone()),
            (ScoreAction::Tag, vec!["probing".to_string()])
        );
        let d = combine(&policy(), &req(100.0, &["probing"]), None, &quiet, NOW);
        assert_eq!(d.response.action, ScoreAction::Block);
        let v = d.new_verdict.unwrap();
        assert_eq!(v.until_ms, NOW + 120_000, "4 × ttl_s");
        assert_eq!(v.reasons, ["probing"]);
        assert_eq!(d.response.ttl_s, 30);
    }

    #[test]
    fn the_model_does_not_tag_a_key_several_people_share() {
        let quiet = FleetSignals::default();
        let with_sessions = |sessions: f32| ScoreRequest {
            features: Features { risk: 38.0, sessions, ..Features::default() },
            ..ScoreRequest::default()
        };
        // An office's NAT: 12 sessions, far beyond its group's line.
        let office = combine(&policy(), &with_sessions(12.0), Some(&anomaly(0.98)), &quiet, NOW);
        assert_eq!((office.response.action, office.model_points), (ScoreAction::Allow, 0.0));
        assert!(office.response.reasons.is_empty());
        assert_eq!(office.response.anomaly, Some(0.98), "still reported");
        // A sample's vector carries the sessions the decision reads.
        let mut v = [0.0f32; 18];
        v[15] = 12.0;
        v[0] = 38.0;
        assert_eq!((feature(&v, "sessions"), feature(&v, "risk"), feature(&v, "nope")), (12.0, 38.0, 0.0));
        // One person with a session or three: the model tags as before.
        for sessions in [0.0, 1.0, 3.0] {
            let one = combine(&policy(), &with_sessions(sessions), Some(&anomaly(0.98)), &quiet, NOW);
            assert_eq!(one.response.reasons, ["anomaly"], "{sessions} sessions");
        }
    }

    #[test]
    fn model_adds_only_beyond_the_tag_line_a_tag_and_at_most_its_weight() {
        let quiet = FleetSignals::default();
        let ordinary = combine(&policy(), &req(40.0, &[]), Some(&anomaly(0.4)), &quiet, NOW);
        assert_eq!(ordinary.response.score, 40.0);
        assert!(ordinary.response.reasons.is_empty() && ordinary.response.explanation.is_empty());
        assert_eq!(ordinary.response.anomaly, Some(0.4));
        let odd = combine(
            &policy(),
            &req(40.0, &["scraping"]),
            Some(&anomaly(0.75)),
            &quiet,
            NOW,
        );
        assert_eq!(odd.response.score, 90.0, "beyond the line: half a block at least");
        assert_eq!(odd.response.action, ScoreAction::Tag);
        assert_eq!(odd.response.reasons, ["scraping", "anomaly"]);
        assert_eq!(odd.response.explanation.len(), 1);
        let max = combine(&policy(), &req(40.0, &[]), Some(&anomaly(1.0)), &quiet, NOW);
        assert_eq!(
            (max.response.score, max.response.action),
            (100.0, ScoreAction::Tag),
            "the model makes a tag, never a block"
        );
        let borderline = combine(&policy(), &req(99.0, &["machine_rhythm"]), Some(&anomaly(1.0)), &quiet, NOW);
        assert_eq!(borderline.response.action, ScoreAction::Tag, "not even at 99 + 60");
        assert!(borderline.new_verdict.is_none());
        let stuffing = FleetSignals { username_attempts: 30.0, ..FleetSignals::default() };
        let with_evidence = combine(&policy(), &req(50.0, &[]), Some(&anomaly(1.0)), &stuffing, NOW);
        assert_eq!(with_evidence.response.action, ScoreAction::Block, "rules + fleet evidence still block");
        let just = combine(&policy(), &req(0.0, &[]), Some(&anomaly(0.51)), &quiet, NOW);
        assert_eq!(
            (just.response.score, just.response.action),
            (50.0, ScoreAction::Tag),
            "just beyond its group's tag line the model alone is a tag"
        );
        let under = combine(&policy(), &req(49.0, &[]), Some(&anomaly(0.5)), &quiet, NOW);
        assert_eq!((under.response.action, under.model_points), (ScoreAction::Allow, 0.0), "on the line: nothing");
        let alone = combine(&policy(), &req(0.0, &[]), Some(&anomaly(1.0)), &quiet, NOW);
        assert_eq!(
            alone.response.action,
            ScoreAction::Tag,
            "the model alone never blocks"
        );
    }

    #[test]
    fn fleet_signals_add_their_reasons() {
        let stuffing = FleetSignals {
            username_attempts: 20.0,
            ..FleetSignals::default()
        };
        let d = combine(
            &policy(),
            &req(10.0, &["credential_stuffing"]),
            None,
            &stuffing,
            NOW,
        );
        assert_eq!(d.response.score, 60.0);
        assert_eq!(d.response.reasons, ["credential_stuffing"], "no duplicates");
        let below = FleetSignals {
            username_attempts: 19.9,
            session_addresses: 4,
            blocked: None,
        };
        assert_eq!(
            combine(&policy(), &req(10.0, &[]), None, &below, NOW)
                .response
                .score,
            10.0
        );
        let both = FleetSignals {
            username_attempts: 25.0,
            session_addresses: 5,
            blocked: None,
        };
        let d = combine(&policy(), &req(0.0, &[]), None, &both, NOW);
        assert_eq!(
            (d.response.score, d.response.action),
            (100.0, ScoreAction::Block)
        );
        assert_eq!(
            d.response.reasons,
            ["credential_stuffing", "session_sharing"]
        );
    }

    #[test]
    fn a_fleet_block_blocks_without_republishing() {
        let blocked = FleetSignals {
            blocked: Some(FleetVerdict {
                client: "203.0.113.7".into(),
                reasons: vec!["probing".into()],
                until_ms: NOW + 5_500,
            }),
            ..FleetSignals::default()
        };
        let d = combine(&policy(), &req(0.0, &[]), None, &blocked, NOW);
        assert_eq!(
            (d.response.score, d.response.action),
            (100.0, ScoreAction::Block)
        );
        assert_eq!(d.response.reasons, ["probing"]);
        assert_eq!(d.response.ttl_s, 6, "not beyond the block");
        assert!(d.new_verdict.is_none());
    }

    #[test]
    fn verdicts_last_at_least_a_minute_and_hostile_numbers_are_tamed() {
        assert_eq!(Policy::new(100.0, 5).verdict_ms(), 60_000);
        assert_eq!(Policy::new(100.0, 60).verdict_ms(), 240_000);
        for risk in [f32::NAN, f32::INFINITY, -5.0] {
            let d = combine(
                &policy(),
                &req(risk, &[]),
                Some(&anomaly(f32::NAN)),
                &FleetSignals::default(),
                NOW,
            );
            assert_eq!(d.response.score, 0.0, "{risk}");
        }
        let huge = combine(
            &policy(),
            &req(f32::MAX, &[]),
            None,
            &FleetSignals::default(),
            NOW,
        );
        assert!(huge.response.score.is_finite());
        assert!(huge.risk_capped);
    }

    #[test]
    fn a_huge_risk_is_one_ordinary_block() {
        let quiet = FleetSignals::default();
        let d = combine(&policy(), &req(1e6, &["probing"]), None, &quiet, NOW);
        assert!(d.risk_capped);
        assert_eq!((d.response.action, d.response.score), (ScoreAction::Block, 100.0));
        let v = d.new_verdict.unwrap();
        assert_eq!(v.until_ms, NOW + policy().verdict_ms(), "the policy's block, not a longer one");
        assert!(!combine(&policy(), &req(100.0, &[]), None, &quiet, NOW).risk_capped);
        // A stored block that claims a day is handed out for the policy's time.
        let mut day = FleetVerdict { client: "c".into(), reasons: vec![], until_ms: NOW + 86_400_000 };
        assert!(cap_verdict(&policy(), &mut day, NOW));
        assert_eq!(day.until_ms, NOW + 120_000);
        assert!(!cap_verdict(&policy(), &mut day, NOW));
    }

    #[test]
    fn deterministic() {
        let s = FleetSignals {
            username_attempts: 30.0,
            session_addresses: 7,
            blocked: None,
        };
        let a = combine(
            &policy(),
            &req(33.0, &["enumeration"]),
            Some(&anomaly(0.8)),
            &s,
            NOW,
        );
        let b = combine(
            &policy(),
            &req(33.0, &["enumeration"]),
            Some(&anomaly(0.8)),
            &s,
            NOW,
        );
        assert_eq!(a, b);
    }
}
