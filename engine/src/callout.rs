//! Asking the scoring service about borderline clients — and only them.
//!
//! A client whose risk lies in the band `[ask_at, block_at)` is neither
//! clearly fine nor clearly bad: its request is paused and the scorer asked
//! once. The answer is cached per client in shared data for its TTL, so a
//! client costs at most one callout per TTL across all workers; while one
//! callout is in flight, the client's other requests do not fan out (they
//! proceed on the filter's own decision). A circuit breaker per worker stops
//! asking a scorer that keeps failing and tries again after a cool-down.
//! Failures (reset, timeout, non-2xx, malformed answer, missing cluster)
//! fail open by default, or closed when configured.
//!
//! Verdict cache record, [`VERDICT_BYTES`] bytes: key 8 · last_seen_ms 8 ·
//! valid_until_ms 8 · pending_until_ms 8 · score (f32) 4 · action 4 ·
//! reasons 4 · reserved 4.

use crate::codec::{Reader, Writer};
use crate::config::{FailureMode, ScorerConfig};
use crate::reason::{Reason, ReasonSet};
use crate::wire::{ScoreAction, ScoreResponse, WIRE_VERSION};
use std::sync::Mutex;

pub const VERDICT_BYTES: usize = 48;

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct VerdictRecord {
    pub key: u64,
    pub last_seen_ms: u64,
    /// The cached answer is valid until then (0 = none).
    pub valid_until_ms: u64,
    /// A callout for this client is in flight until then.
    pub pending_until_ms: u64,
    pub score: f32,
    /// 0 allow, 1 tag, 2 block.
    pub action: u32,
    pub reasons: ReasonSet,
}

impl VerdictRecord {
    /// Every field, in the order of the layout above.
    fn encode_fields(&self, w: &mut Writer<'_>) {
        w.u64(self.key);
        w.u64(self.last_seen_ms);
        w.u64(self.valid_until_ms);
        w.u64(self.pending_until_ms);
        w.f32(self.score);
        w.u32(self.action);
        w.u32(self.reasons.bits());
        w.u32(0);
    }

    fn decode_fields(r: &mut Reader<'_>) -> VerdictRecord {
        let key = r.u64();
        let last_seen_ms = r.u64();
        let valid_until_ms = r.u64();
        let pending_until_ms = r.u64();
        let score = r.f32();
        VerdictRecord {
            key,
            last_seen_ms,
            valid_until_ms,
            pending_until_ms,
            score: if score.is_finite() { score.max(0.0) } else { 0.0 },
            action: r.u32().min(2),
            reasons: ReasonSet::from_bits(r.u32()),
        }
    }
}

crate::record::impl_record!(VerdictRecord, VERDICT_BYTES);

fn action_code(action: ScoreAction) -> u32 {
    match action {
        ScoreAction::Allow => 0,
        ScoreAction::Tag => 1,
        ScoreAction::Block => 2,
    }
}

pub fn action_of(code: u32) -> ScoreAction {
    match code {
        2 => ScoreAction::Block,
        1 => ScoreAction::Tag,
        _ => ScoreAction::Allow,
    }
}

/// Reason names from the scorer, as a set (unknown names are dropped).
pub fn reasons_from_names(names: &[String]) -> ReasonSet {
    let mut set = ReasonSet::default();
    for name in names {
        if let Some(r) = Reason::ALL.iter().find(|r| r.name() == name) {
            set.insert(*r);
        }
    }
    set
}

/// What the cache says about a borderline client.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CacheLookup {
    /// A valid cached answer.
    Hit { action: ScoreAction, score: f32, reasons: ReasonSet, until_ms: u64 },
    /// Another request of this client is asking right now.
    InFlight,
    /// This request claimed the callout: ask.
    Ask,
}

/// Why a callout did not give an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalloutFailure {
    /// The call could not be made (e.g. no such cluster).
    Dispatch,
    /// Reset or no answer (0 headers) before the timeout.
    Reset,
    TimedOut,
    Status(u32),
    Malformed,
}

impl CalloutFailure {
    pub fn is_timeout(self) -> bool {
        self == CalloutFailure::TimedOut
    }
}

/// Parses the scorer's answer: 2xx and a valid `ScoreResponse` of our version.
pub fn parse_answer(status: Option<u32>, body: &[u8]) -> Result<ScoreResponse, CalloutFailure> {
    let status = status.ok_or(CalloutFailure::Reset)?;
    if !(200..300).contains(&status) {
        return Err(CalloutFailure::Status(status));
    }
    // The host reads one byte past the limit, so a larger answer is seen whole-or-over, never cut to valid JSON.
    if body.len() > crate::wire::MAX_SCORE_ANSWER_BYTES {
        return Err(CalloutFailure::Malformed);
    }
    let answer: ScoreResponse = serde_json::from_slice(body).map_err(|_| CalloutFailure::Malformed)?;
    if answer.version != WIRE_VERSION || !answer.score.is_finite() {
        return Err(CalloutFailure::Malformed);
    }
    Ok(answer)
}

/// Circuit breaker, per worker: after `failures` consecutive failures it
/// opens for `cooldown_ms`; then one callout is let through (half-open) and
/// its outcome closes or re-opens it.
#[derive(Debug, Default)]
pub struct Breaker {
    state: Mutex<BreakerState>,
}

#[derive(Debug, Default, Clone, Copy)]
struct BreakerState {
    consecutive_failures: u32,
    open_until_ms: u64,
    half_open_trial: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerPosition {
    Closed,
    Open,
    HalfOpen,
}

impl Breaker {
    /// Whether a callout may go out now.
    pub fn allow(&self, now_ms: u64) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return true;
        };
        if s.open_until_ms == 0 {
            return true;
        }
        if now_ms < s.open_until_ms || s.half_open_trial {
            return false;
        }
        s.half_open_trial = true;
        true
    }

    pub fn success(&self) {
        if let Ok(mut s) = self.state.lock() {
            *s = BreakerState::default();
        }
    }

    pub fn failure(&self, now_ms: u64, threshold: u32, cooldown_ms: u64) {
        if let Ok(mut s) = self.state.lock() {
            s.consecutive_failures = s.consecutive_failures.saturating_add(1);
            if s.half_open_trial || s.consecutive_failures >= threshold {
                s.open_until_ms = now_ms.saturating_add(cooldown_ms);
                s.half_open_trial = false;
            }
        }
    }

    pub fn position(&self, now_ms: u64) -> BreakerPosition {
        match self.state.lock() {
            Ok(s) if s.open_until_ms == 0 => BreakerPosition::Closed,
            Ok(s) if now_ms < s.open_until_ms => BreakerPosition::Open,
            Ok(_) => BreakerPosition::HalfOpen,
            Err(_) => BreakerPosition::Closed,
        }
    }
}

/// The compiled scorer policy.
#[derive(Debug)]
pub struct Callouts {
    pub config: ScorerConfig,
    pub breaker: Breaker,
    /// Shared secret, from the config or the named environment variable.
    pub secret: Option<String>,
}

impl Callouts {
    pub fn new(config: &ScorerConfig) -> Option<Callouts> {
        if !config.enabled {
            return None;
        }
        let secret = config
            .secret
            .clone()
            .or_else(|| config.secret_env.as_ref().and_then(|name| std::env::var(name).ok()))
            .filter(|s| !s.is_empty());
        Some(Callouts { config: config.clone(), breaker: Breaker::default(), secret })
    }

    /// Whether a client at `risk` is borderline (given `block_at`).
    pub fn borderline(&self, risk: f32, block_at: f32) -> bool {
        risk >= self.config.ask_at && risk < block_at
    }

    pub fn timeout_ms(&self) -> u64 {
        u64::from(self.config.timeout_ms)
    }

    pub fn fail_closed(&self) -> bool {
        self.config.failure_mode == FailureMode::FailClosed
    }

    /// The cache decision for a borderline client (runs inside the CAS loop).
    pub fn lookup(&self, record: &mut VerdictRecord, now_ms: u64) -> (CacheLookup, bool) {
        record.last_seen_ms = now_ms;
        if record.valid_until_ms > now_ms {
            let hit = CacheLookup::Hit {
                action: action_of(record.action),
                score: record.score,
                reasons: record.reasons,
                until_ms: record.valid_until_ms,
            };
            return (hit, false);
        }
        if record.pending_until_ms > now_ms {
            return (CacheLookup::InFlight, false);
        }
        // Claim the callout; an answer or the timeout releases it.
        record.pending_until_ms = now_ms.saturating_add(self.timeout_ms()).saturating_add(100);
        (CacheLookup::Ask, true)
    }

    /// Stores an answer (inside the CAS loop).
    pub fn store_answer(&self, record: &mut VerdictRecord, answer: &ScoreResponse, now_ms: u64) {
        let ttl_ms = u64::from(answer.ttl_s.clamp(1, self.config.max_ttl_s)).saturating_mul(1000);
        record.last_seen_ms = now_ms;
        record.pending_until_ms = 0;
        record.valid_until_ms = now_ms.saturating_add(ttl_ms);
        record.score = answer.score.max(0.0);
        record.action = action_code(answer.action);
        record.reasons = reasons_from_names(&answer.reasons);
    }

    /// Releases the claim after a failure (inside the CAS loop).
    pub fn release(&self, record: &mut VerdictRecord, now_ms: u64) {
        record.last_seen_ms = now_ms;
        record.pending_until_ms = 0;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::record::Record;

    fn callouts() -> Callouts {
        Callouts::new(&ScorerConfig { enabled: true, ..ScorerConfig::default() }).unwrap()
    }

    fn answer(action: ScoreAction, ttl_s: u32) -> ScoreResponse {
        ScoreResponse {
            version: WIRE_VERSION,
            score: 120.0,
            action,
            reasons: vec!["credential_stuffing".into(), "anomaly".into()],
            ttl_s,
            anomaly: None,
            explanation: vec![],
        }
    }

    #[test]
    fn one_callout_per_ttl() {
        let c = callouts();
        let mut r = VerdictRecord::default();
        assert_eq!(c.lookup(&mut r, 1000).0, CacheLookup::Ask);
        assert_eq!(c.lookup(&mut r, 1001).0, CacheLookup::InFlight);
        c.store_answer(&mut r, &answer(ScoreAction::Block, 30), 1010);
        match c.lookup(&mut r, 2000).0 {
            CacheLookup::Hit { action, reasons, .. } => {
                assert_eq!(action, ScoreAction::Block);
                assert_eq!(reasons.names(), vec!["credential_stuffing", "anomaly"]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.lookup(&mut r, 1010 + 30_000).0, CacheLookup::Ask);
    }

    #[test]
    fn a_lost_callout_does_not_block_asking_forever() {
        let c = callouts();
        let mut r = VerdictRecord::default();
        c.lookup(&mut r, 1000);
        assert_eq!(c.lookup(&mut r, 1000 + c.timeout_ms() + 200).0, CacheLookup::Ask);
    }

    #[test]
    fn answers_are_checked() {
        let ok = serde_json::to_vec(&answer(ScoreAction::Tag, 5)).unwrap();
        assert!(parse_answer(Some(200), &ok).is_ok());
        assert_eq!(parse_answer(None, &ok), Err(CalloutFailure::Reset));
        assert_eq!(parse_answer(Some(503), &ok), Err(CalloutFailure::Status(503)));
        assert_eq!(parse_answer(Some(200), b"{nope"), Err(CalloutFailure::Malformed));
        let mut wrong = answer(ScoreAction::Tag, 5);
        wrong.version = 99;
        assert_eq!(parse_answer(Some(200), &serde_json::to_vec(&wrong).unwrap()), Err(CalloutFailure::Malformed));
    }

    #[test]
    fn breaker_opens_and_recovers() {
        let b = Breaker::default();
        for _ in 0..3 {
            assert!(b.allow(0));
            b.failure(0, 3, 1000);
        }
        assert_eq!(b.position(10), BreakerPosition::Open);
        assert!(!b.allow(500));
        assert!(b.allow(1500), "half-open trial");
        assert!(!b.allow(1501), "only one trial");
        b.failure(1600, 3, 1000);
        assert!(!b.allow(1700), "re-opened");
        assert!(b.allow(2700));
        b.success();
        assert_eq!(b.position(2800), BreakerPosition::Closed);
        assert!(b.allow(2800) && b.allow(2801));
    }

    #[test]
    fn codec_round_trips() {
        let r = VerdictRecord {
            key: 1,
            last_seen_ms: 2,
            valid_until_ms: 3,
            pending_until_ms: 4,
            score: 5.5,
            action: 2,
            reasons: ReasonSet::from_bits(3),
        };
        let mut buf = [0u8; VERDICT_BYTES];
        r.encode(&mut buf);
        assert_eq!(VerdictRecord::decode(&buf), r);
    }
}
