//! The filter ↔ scorer wire format, one definition for both sides.
//!
//! `POST /v1/score` takes a [`ScoreRequest`] (a borderline client's feature
//! summary) and answers a [`ScoreResponse`]; `GET /v1/verdicts?since=N`
//! answers [`FleetVerdicts`], the blocks decided anywhere in the fleet since
//! cursor `N`. Both carry [`WIRE_VERSION`]; a peer refuses other versions.
//! Calls carry the shared secret in [`SECRET_HEADER`].

use serde::{Deserialize, Serialize};

pub const WIRE_VERSION: u32 = 1;
pub const SCORE_PATH: &str = "/v1/score";
pub const VERDICTS_PATH: &str = "/v1/verdicts";
pub const SECRET_HEADER: &str = "x-abuse-scorer-secret";
/// Largest request body the scorer accepts.
pub const MAX_SCORE_REQUEST_BYTES: usize = 16 * 1024;
/// Largest scorer answer the filter reads (a larger one fails like a malformed one).
pub const MAX_SCORE_ANSWER_BYTES: usize = 64 * 1024;
/// Largest fleet-verdict poll answer the filter reads, and the most verdicts
/// it applies from one (more are left for the next poll).
pub const MAX_FLEET_BYTES: usize = 1 << 20;
pub const MAX_FLEET_VERDICTS: usize = 10_000;
/// Largest warm-start page the filter reads (64 shards of 1 KiB in base64, plus baselines).
pub const MAX_WARM_BYTES: usize = 256 * 1024;

/// The model's features, in vector order (see [`Features::to_vector`]).
pub const FEATURE_NAMES: [&str; 18] = [
    "risk",
    "requests",
    "recent_requests",
    "login_failures",
    "failed_usernames",
    "login_successes",
    "not_found",
    "not_found_paths",
    "object_requests",
    "object_miss_ratio",
    "distinct_object_ids",
    "sequential_object_run",
    "page_run",
    "interval_mean_ms",
    "interval_cv",
    "sessions",
    "response_kib",
    "anonymous_network",
];

/// A client's behaviour as the filter's record sees it (windowed estimates).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Features {
    pub risk: f32,
    pub requests: f32,
    pub recent_requests: f32,
    pub login_failures: f32,
    pub failed_usernames: f32,
    pub login_successes: f32,
    pub not_found: f32,
    pub not_found_paths: f32,
    pub object_requests: f32,
    pub object_miss_ratio: f32,
    pub distinct_object_ids: f32,
    pub sequential_object_run: f32,
    pub page_run: f32,
    pub interval_mean_ms: f32,
    pub interval_cv: f32,
    pub sessions: f32,
    pub response_kib: f32,
    pub anonymous_network: f32,
}

impl Features {
    /// The features in [`FEATURE_NAMES`] order; non-finite values read as 0.
    pub fn to_vector(&self) -> [f32; 18] {
        let v = [
            self.risk,
            self.requests,
            self.recent_requests,
            self.login_failures,
            self.failed_usernames,
            self.login_successes,
            self.not_found,
            self.not_found_paths,
            self.object_requests,
            self.object_miss_ratio,
            self.distinct_object_ids,
            self.sequential_object_run,
            self.page_run,
            self.interval_mean_ms,
            self.interval_cv,
            self.sessions,
            self.response_kib,
            self.anonymous_network,
        ];
        v.map(|x| if x.is_finite() { x } else { 0.0 })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScoreRequest {
    pub version: u32,
    /// The client address (as the filter identified it).
    pub client: String,
    /// Route group matched first, if any.
    pub route_group: Option<String>,
    pub method: String,
    /// Path without query, at most 256 characters.
    pub path: String,
    /// Reasons behind the client's current risk.
    pub reasons: Vec<String>,
    pub features: Features,
    /// Username of this login attempt (login routes only).
    pub username: Option<String>,
    /// Keyed hash (hex) of the session identity, never the raw token.
    pub session: Option<String>,
    pub subject: Option<String>,
    pub user_agent: Option<String>,
    pub country: Option<String>,
    pub asn: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScoreAction {
    Allow,
    Tag,
    Block,
}

/// One feature's share in making a client abnormal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contribution {
    pub feature: String,
    pub weight: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreResponse {
    pub version: u32,
    /// Final risk, on the filter's scale (block at the filter's `block_at`).
    pub score: f32,
    pub action: ScoreAction,
    pub reasons: Vec<String>,
    /// How long the filter may reuse this verdict for the client.
    pub ttl_s: u32,
    /// Model anomaly in [0, 1] (0.5 = ordinary), when the model is warm.
    #[serde(default)]
    pub anomaly: Option<f32>,
    #[serde(default)]
    pub explanation: Vec<Contribution>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetVerdict {
    pub client: String,
    pub reasons: Vec<String>,
    /// Blocked until (ms since the epoch).
    pub until_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetVerdicts {
    pub version: u32,
    /// Cursor to pass as `since` next time.
    pub next: u64,
    pub verdicts: Vec<FleetVerdict>,
    /// Operator lifts since `since` (at most [`MAX_FLEET_LIFTS`]).
    #[serde(default)]
    pub lifts: Vec<FleetLift>,
    /// The operator allow entries in force, all of them, every answer (at
    /// most [`MAX_ALLOW_ENTRIES`]): an Envoy replaces its list with this one.
    #[serde(default)]
    pub allows: Vec<AllowEntry>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_unknown_fields() {
        let r = ScoreRequest { version: WIRE_VERSION, client: "1.2.3.4".into(), ..ScoreRequest::default() };
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<ScoreRequest>(&json).unwrap(), r);
        assert!(serde_json::from_str::<ScoreRequest>(r#"{"version":1,"nope":1}"#).is_err());
        let a: ScoreResponse = serde_json::from_str(
            r#"{"version":1,"score":120.5,"action":"block","reasons":["credential_stuffing"],"ttl_s":30}"#,
        )
        .unwrap();
        assert_eq!(a.action, ScoreAction::Block);
        assert_eq!(Features { risk: f32::NAN, ..Features::default() }.to_vector()[0], 0.0);
        assert_eq!(FEATURE_NAMES.len(), Features::default().to_vector().len());
    }
}

/// `POST` — one worker's tick batch to the scorer ([`EventBatch`]). The
/// channel is general on purpose: what the fleet should learn from every
/// worker rides on it (known accounts and baselines today; feature samples
/// and decision events can join as new fields).
pub const EVENTS_PATH: &str = "/v1/events";
/// `GET ?from=N` — what a fresh Envoy warms from ([`WarmState`]), paged by
/// known-accounts shard.
pub const WARM_PATH: &str = "/v1/warm";
/// At most this many known accounts per batch (the rest waits, or is dropped and counted).
pub const MAX_BATCH_ACCOUNTS: usize = 2048;
/// At most this many baselines per batch or warm answer.
pub const MAX_BASELINES: usize = 64;
/// Known-accounts shards per warm page.
pub const WARM_PAGE_SHARDS: usize = 64;
/// Largest batch body the scorer accepts: room for a full batch of decision
/// events (~500 bytes each, [`MAX_BATCH_DECISIONS`]) beside the rest.
pub const MAX_BATCH_BYTES: usize = 256 * 1024;

/// A learned baseline the fleet keeps across restarts (Redis), by a name
/// every Envoy of the fleet derives alike (`login:<path>`, `group:<name>`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BaselineSnapshot {
    pub name: String,
    /// The failure ratio (login) or request rate (group) it normally has.
    pub baseline: f32,
    /// Login endpoints: the share of attempts on unknown accounts it normally has.
    pub unknown_baseline: f32,
    /// Samples behind it: the warmer one wins.
    pub samples: u32,
    /// Login endpoints: successful logins seen (known accounts learned).
    pub successes_seen: u32,
}

/// One worker's tick batch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventBatch {
    pub version: u32,
    /// Accounts that logged in successfully since the last batch, by their
    /// fleet key (the username hashed with the fleet secret; see
    /// `known_accounts::bit_positions`).
    pub known_accounts: Vec<u64>,
    pub baselines: Vec<BaselineSnapshot>,
    /// Account profiles changed by successful logins since the last batch
    /// (at most [`MAX_BATCH_PROFILES`]), for the fleet to merge.
    pub profiles: Vec<ProfileUpdate>,
    /// Items this worker dropped since its last delivered batch (buffer full or scorer away).
    pub dropped: u64,
    /// A uniform random sample of the clients this worker saw in its last
    /// sample window (see `engine::sample`): what the scorer's model learns
    /// "normal" from.
    pub samples: Vec<FeatureSample>,
    /// Decisions since the last batch (at most [`MAX_BATCH_DECISIONS`]).
    pub decisions: Vec<DecisionEvent>,
    /// Decision events this worker dropped since its last delivered batch.
    pub decisions_dropped: u64,
}

/// At most this many feature samples per batch.
pub const MAX_BATCH_SAMPLES: usize = 64;

/// One sampled client's feature summary at its last request of the window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeatureSample {
    /// The client label (as in [`ScoreRequest::client`]).
    pub client: String,
    /// Route group of its last request in the window, if any.
    pub route_group: Option<String>,
    /// [`Features::to_vector`], in [`FEATURE_NAMES`] order (compact: a batch
    /// carries up to [`MAX_BATCH_SAMPLES`] of them).
    pub features: Vec<f32>,
    /// The client was in the penalty box or blocked during the window: the
    /// scorer scores it but never learns from it.
    pub penalized: bool,
}

/// The scorer's answer to a batch: what it took, and the sampled clients
/// its model finds anomalous enough to tag (the filter raises their risk to
/// `tag_at` with reason `anomaly`; the model alone never blocks).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsAnswer {
    pub accepted: u64,
    pub flags: Vec<FleetVerdict>,
}

/// Profiles per tick batch, and per warm-start page.
pub const MAX_BATCH_PROFILES: usize = 128;

/// One account's profile, by its fleet key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileUpdate {
    pub account: u64,
    pub profile: crate::profile::AccountProfile,
}

/// One known-accounts shard: its 1 KiB of Bloom bits, base64 (standard alphabet, padded).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KnownShard {
    pub index: u32,
    pub bits: String,
}

/// What a fresh Envoy warms from: the baselines (first page only) and a
/// page of non-empty known-accounts shards from shard `from` on; `next` is
/// where the next page starts (None: done).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WarmState {
    pub version: u32,
    pub baselines: Vec<BaselineSnapshot>,
    pub known_shards: Vec<KnownShard>,
    /// Account profiles, most recent first: pages after the known shards'
    /// (`next` ≥ the shard count) carry them, [`MAX_BATCH_PROFILES`] a page.
    pub profiles: Vec<ProfileUpdate>,
    pub next: Option<u32>,
}

// ---------------------------------------------------------------------------
// The operator's view (issue 21): decisions on the tick batch, lifts and
// allow entries on the fleet-verdicts poll.

/// Decision events per tick batch, at most (the worker's buffer holds
/// [`MAX_BATCH_DECISIONS`] × 4; beyond it the oldest are dropped and counted).
pub const MAX_BATCH_DECISIONS: usize = 128;
/// Reasons (with figures) per decision event, at most.
pub const MAX_DECISION_REASONS: usize = 8;
/// Lifts per fleet-verdicts answer, at most.
pub const MAX_FLEET_LIFTS: usize = 1_000;
/// Operator allow entries in force, at most (the scorer refuses more).
pub const MAX_ALLOW_ENTRIES: usize = 256;

/// One reason of a decision with the detector's figure against its limit,
/// e.g. `{"reason":"credential_stuffing","what":"failed-login usernames",
/// "value":29,"limit":5,"window_s":600}`; `text` says it in words.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReasonFigure {
    pub reason: String,
    /// What was counted ("failed-login usernames"); empty when the reason
    /// carries no figure (e.g. `anomaly`, set by the model).
    pub what: String,
    pub value: f32,
    pub limit: f32,
    /// The window the value was counted over (0: not windowed).
    pub window_s: u32,
    /// "29 failed-login usernames in 600 s; limit 5".
    pub text: String,
}

/// One decision of the filter: a block (the request that boxed the client),
/// a shed with evidence, a tag, or — aggregated per client — the penalty
/// box's refusals since the last batch (`action` `penalty`, `hits` of them,
/// quoting the id of the block that boxed the client).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecisionEvent {
    /// Short and unique per Envoy (`<instance>-<worker>-<counter>`, hex):
    /// what a refused user quotes from the body or `x-abuse-decision`.
    pub id: String,
    pub time_ms: u64,
    /// The Envoy (its node id, else a per-process tag).
    pub instance: String,
    /// The client as fleet verdicts name it (`addr`, `addr#agenttag`, `addr#pool`).
    pub client: String,
    pub address: String,
    /// The user-agent tag (8 hex digits), when it is part of the client key.
    pub agent: Option<String>,
    /// The session / API key / verified subject / bearer token hashed with the
    /// fleet's secret (16 hex digits): never the raw value.
    pub session: Option<String>,
    /// Which credential `session` hashes: `cookie`, `key`, `sub` or `bearer`.
    pub credential: Option<String>,
    /// The login username hashed with the fleet's secret, on login routes.
    pub username: Option<String>,
    pub route_group: Option<String>,
    pub method: String,
    /// The path with object ids replaced (`/api/users/{id}`).
    pub path: String,
    /// `block`, `shed`, `tag` or `penalty`.
    pub action: String,
    /// `block` or `monitor` (monitor: nothing was refused).
    pub mode: String,
    pub status: u32,
    pub risk: f32,
    /// In the penalty box until (ms since the epoch; 0: not boxed).
    pub until_ms: u64,
    /// `penalty` events: refusals aggregated into this event.
    pub hits: u32,
    pub reasons: Vec<ReasonFigure>,
}

/// An operator's lift of a client's block, for every Envoy: release the
/// client's penalty, forget its risk, and until `quiet_until_ms` let none of
/// `reasons` (empty: any) box it again.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetLift {
    /// A client label as in [`FleetVerdict::client`].
    pub client: String,
    pub reasons: Vec<String>,
    pub quiet_until_ms: u64,
}

/// An operator's temporary allow entry, in force until `until_ms`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AllowEntry {
    pub id: String,
    /// `cidr` (an address or prefix), `api_key` (the key's fleet hash, as in
    /// [`DecisionEvent::session`] with credential `key`) or `agent` (a
    /// user-agent tag, 8 hex digits).
    pub kind: String,
    pub value: String,
    pub until_ms: u64,
}
