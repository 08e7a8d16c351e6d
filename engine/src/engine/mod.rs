//! The engine: one [`Engine`] per worker VM, compiled from a validated
//! [`Config`]. The host calls it in phases; a request flows through a short
//! pipeline of stages, each in its own file:
//!
//! ```text
//! on_request (request.rs)
//!   1. identify   identify.rs  the client's address (+ user-agent tag), its record's key;
//!                              allowlisted clients stop here
//!   .  look       request.rs   stateless signals, once, outside the CAS loop (probing paths,
//!                              object ids, the login attempt's shape, the page)
//!   3. count      sessions.rs  the session's footprint (sessions table)
//!                 groups.rs    the route-group counters (spikes), per worker
//!   -- one read-modify-write of the client's record (tiers: worker view or shared) --
//!   2. penalty    decide.rs    a client in the penalty box is refused: no counting, no write
//!   4. detect     request.rs   every detector against the record (rate, sessions, spikes,
//!                              scraping, distributed stuffing, enumeration, ...)
//!   5. decide     decide.rs    risk added per reason's action, a block boxes the client
//!   -- after the update --
//!   .  scorer     scorer.rs    a borderline client asks the scoring service (or its cache)
//!   .  sample     sample.rs    the tick batch's feature samples
//! on_request_body  (body.rs)    login bodies: username, account profile, stuffing evidence
//! on_response      (answer.rs)  the outcome detectors (login, probing 404s, enumeration, volume)
//! on_score_answer  (scorer.rs)  the scorer's answer, cached; waiting_verdict for waiters
//! apply_fleet_verdicts (fleet.rs) the fleet's blocks into this Envoy's penalty box
//! on_tick          (tick.rs)    worker views and group counts merged; events.rs: the batch
//! prepare_state    (tables.rs)  shared tables created, migrated on a layout change
//! ```
//!
//! Phases after the request (body, answer, scorer) run the same penalty and
//! decide stages on the client's record. Every stage is a method of
//! [`Engine`]; this file holds the types they share, [`Engine::new`] and
//! the accessors.

mod answer;
mod body;
mod decide;
mod decisions;
mod operator_allow;
mod events;
mod fleet;
mod groups;
mod identify;
mod request;
mod rules;
mod sample;
mod scorer;
mod sessions;
mod tables;
mod tick;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::too_many_arguments)]
mod harvest_tests;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod decisions_tests;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod stuffing_tests;

use groups::RouteCounters;
pub use tables::StateReport;
pub use rules::{RuleAnswer, FLEET_RULE_POLL_MS};
pub use events::TickBatch;
pub use fleet::FleetApplied;
pub use operator_allow::ALLOW_KEY;
pub use decisions::{path_template, DECISIONS_CAP, WORKERS_KEY};

use crate::account::AccountRecord;
use crate::callout::{Callouts, VerdictRecord};
use crate::config::{Config, ConfigError, DetectorAction, Mode};
use crate::detectors::distributed_stuffing::{AttemptSignals, DistributedStuffing};
use crate::detectors::enumeration::Enumeration;
use crate::detectors::harvest::Harvest;
use crate::object_route::ObjectRouteRecord;
use crate::detectors::login::LoginDetector;
use crate::detectors::login_profile::{LoginProfile, ProfileRisk};
use crate::detectors::probing::Probing;
use crate::detectors::rate::RequestRate;
use crate::detectors::scraping::Scraping;
use crate::detectors::session::Sessions;
use crate::detectors::spike::{GroupState, Spikes};
use crate::endpoint::{EndpointRecord, FingerprintRecord, SprayRecord};
use crate::exemptions::Exemptions;
use crate::hash::{KeyedHasher, SEED_BYTES};
use crate::identity::{ClientAddr, IdentityInput, IdentityPolicy};
use crate::known_accounts::KnownAccounts;
use crate::profile::LoginPlace;
use crate::reason::{Reason, ReasonSet};
use crate::record::{ClientRecord, RECORD_FORMAT};
use crate::routes::RouteTable;
use crate::session::SessionRecord;
use crate::state::store::ShardedTable;
use crate::state::tiers::TieredTable;
use crate::wire::ScoreRequest;
use std::sync::Mutex;

/// Prefix of every shared-data key this filter owns.
pub const STATE_PREFIX: &str = "abuse_filter/v1";
/// Shared-data key of the per-process hashing seed.
pub const SEED_KEY: &str = "abuse_filter/v1/seed";

/// Hash domains: the same bytes hash differently per use.
const DOMAIN_CLIENT: u8 = 1;
/// (Public: the scorer hashes an operator's search alike.)
pub const DOMAIN_USERNAME: u8 = 2;
const DOMAIN_OBJECT: u8 = 3;
const DOMAIN_PATH: u8 = 4;
const DOMAIN_ENDPOINT: u8 = 5;
const DOMAIN_PASSWORD: u8 = 6;
const DOMAIN_FINGERPRINT: u8 = 10;
/// (Public: the scorer hashes an operator's search alike.)
pub const DOMAIN_SESSION: u8 = 7;
const DOMAIN_USER_AGENT: u8 = 8;
const DOMAIN_ROUTE: u8 = 9;
/// An address's pool of new identities (see `identify`): a key no client
/// (with or without a user agent) can have.
const DOMAIN_POOL: u8 = 11;
/// A private object route, by its template (the harvest's route records).
const DOMAIN_OBJECT_ROUTE: u8 = 12;

/// Accounts tracked: 256 shards x 64 slots of 56 bytes = 0.9 MiB.
const ACCOUNT_SHARDS: usize = 256;
const ACCOUNT_SLOTS: usize = 64;
/// Login fingerprints tracked: 64 x 64 slots of 48 bytes = 192 KiB.
const FINGERPRINT_SHARDS: usize = 64;
const FINGERPRINT_SLOTS: usize = 64;
/// Passwords tried during an attack (keyed, rotating hashes): 64 x 64 slots of 32 bytes = 128 KiB.
const SPRAY_SHARDS: usize = 64;
const SPRAY_SLOTS: usize = 64;
/// Cached scorer verdicts: 256 x 64 slots of 48 bytes = 0.75 MiB.
const VERDICT_SHARDS: usize = 256;
const VERDICT_SLOTS: usize = 64;
/// Shared-data key of the fleet-verdict poll lease: `[lease_until_ms u64][cursor u64]`.
pub const FLEET_LEASE_KEY: &str = "abuse_filter/v1/fleet_lease";

/// Sessions tracked: 256 x 64 slots of 64 bytes = 1 MiB.
const SESSION_SHARDS: usize = 256;
const SESSION_SLOTS: usize = 64;

/// What the host read from the request.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestFacts<'a> {
    pub identity: IdentityInput<'a>,
    pub method: &'a str,
    pub path: &'a str,
    pub user_agent: Option<&'a str>,
    /// Request header names in order, comma-joined (login routes only, see
    /// [`Engine::wants_fingerprint`]).
    pub header_names: Option<&'a str>,
    /// The client's ASN, from the GeoIP filter's header.
    pub asn: Option<&'a str>,
    /// The client's country, from the GeoIP filter's header.
    pub country: Option<&'a str>,
    /// The GeoIP filter marked the address as VPN, Tor, hosting or proxy.
    pub anonymous: bool,
    /// The TLS JA4 fingerprint, when `account_takeover.profile.ja4_header` names it.
    pub ja4: Option<&'a str>,
    /// The request headers the rules read ([`Engine::rule_header_names`]), as found.
    pub rule_headers: &'a [(&'a str, &'a [u8])],
}

/// What the engine remembers between a request and its answer.
#[derive(Debug, Clone, Default)]
pub struct Exchange {
    // (fields private: only the engine interprets them)
    client: Option<ClientAddr>,
    agent: Option<u32>,
    client_key: u64,
    /// The session whose credential the upstream may accept with this
    /// answer (`client.accepted_credential_header`): not accepted yet.
    session_to_accept: Option<u64>,
    /// The address's pool record, when this request was also one of its
    /// new identities' (see `identify`): the answer counts there too.
    pool_key: Option<u64>,
    /// False when the client is allowlisted, blocked, or state failed.
    judged: bool,
    good_bot: bool,
    login_route: Option<usize>,
    object: bool,
    /// The request's credential is one the API verified or accepted.
    accepted: bool,
    path_hash: u64,
    username: Option<String>,
    /// The login's device, country and network, for the account's profile.
    login_place: LoginPlace,
    /// The GeoIP filter marked the address as anonymous (VPN, Tor, hosting, proxy).
    anonymous: bool,
    /// The login's risk against its account's profile (once the body was read).
    profile_risk: Option<ProfileRisk>,
    /// The attempt's evidence so far (login routes with distributed stuffing on).
    attempt: Option<AttemptSignals>,
    /// The login endpoint's record as the request found it (read once, for the body too).
    endpoint: Option<EndpointRecord>,
    /// The tool fingerprint's key, when the user agent claims no browser.
    tool_key: Option<u64>,
    /// Keyed, rotating hash of the submitted password (its window only).
    password_key: Option<u64>,
    /// The account is not known to exist (None: no username read).
    account_unknown: Option<bool>,
    /// The username's shape and format (`endpoint::name_shape`), once the body gave it.
    name_shape: Option<crate::endpoint::NameShape>,
    mode: Option<Mode>,
    /// The question for the scorer, when this request must ask it.
    score_request: Option<ScoreRequest>,
    /// The filter's own decision while the scorer is asked.
    risk: f32,
    reasons: ReasonSet,
    /// The rules' work left for the body and the answer.
    rules: crate::rules::Pending,
    /// What body-phase rules need of the request's headers.
    rules_input: Option<Box<rules::KeptInput>>,
    /// The session as the fleet names it (hash with the scorer's secret,
    /// and which credential: `cookie`, `key`, `sub`, `bearer`), for
    /// decision events; only when events are on.
    fleet_session: Option<(u64, &'static str)>,
    /// The request's first route group, for decision events.
    group: Option<usize>,
}

/// Outcome of the read-modify-write on the client's record.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Penalized { reasons: ReasonSet, until_ms: u64, risk: f32, decision: u64 },
    /// `shed`: a `shed` reason refuses this request only (no penalty box).
    /// `decision`: the id minted when this outcome boxed the client.
    Scored {
        risk: f32,
        fired: ReasonSet,
        reasons: ReasonSet,
        blocked_until_ms: Option<u64>,
        shed: bool,
        decision: u64,
        figures: crate::verdict::Figures,
    },
}

#[derive(Debug)]
pub struct Engine {
    config: Config,
    identity: IdentityPolicy,
    exemptions: Exemptions,
    routes: RouteTable,
    rate: Option<RequestRate>,
    login: Option<LoginDetector>,
    login_profile: Option<LoginProfile>,
    probing: Option<Probing>,
    enumeration: Option<Enumeration>,
    /// Harvests of private object routes (on when one is configured).
    harvest: Option<Harvest>,
    /// The private object routes' records, by [`Engine::object_route_key`].
    object_routes: ShardedTable<ObjectRouteRecord>,
    /// Each configured object route's key (by template: a reload keeps its state).
    object_route_keys: Vec<u64>,
    distributed: Option<DistributedStuffing>,
    sessions: Option<Sessions>,
    scraping: Option<Scraping>,
    spikes: Option<Spikes>,
    callouts: Option<Callouts>,
    route_counters: Mutex<RouteCounters>,
    actions: [DetectorAction; 32],
    /// Per-worker views in front of the shared table (see `tiers`).
    clients: TieredTable<ClientRecord>,
    accounts: ShardedTable<AccountRecord>,
    endpoints: ShardedTable<EndpointRecord>,
    sprays: ShardedTable<SprayRecord>,
    fingerprints: ShardedTable<FingerprintRecord>,
    known_accounts: KnownAccounts,
    /// Usernames hash with the scorer's secret when one is configured, so that
    /// every Envoy of the fleet (and the scorer) names an account alike.
    account_hasher: KeyedHasher,
    /// What this worker has for its next batch to the scorer.
    outbox: Mutex<events::Outbox>,
    decision_ids: decisions::DecisionIds,
    decision_outbox: Mutex<decisions::DecisionOutbox>,
    operator_allows: Mutex<operator_allow::OperatorAllows>,
    session_table: ShardedTable<SessionRecord>,
    group_table: ShardedTable<EndpointRecord>,
    verdict_table: ShardedTable<VerdictRecord>,
    /// The operator's rules (`rules[]`), their tables (one per rule) and
    /// this worker's fleet counts for the scorer.
    rules: crate::rules::Rules,
    rule_tables: Vec<ShardedTable<crate::rules::count::RuleRecord>>,
    rule_outbox: Mutex<rules::RuleOutbox>,
    hasher: KeyedHasher,
    half_life_ms: u64,
    penalty_ms: u64,
}

impl Exchange {
    /// Whether the answer to this request will be looked at.
    pub fn judged(&self) -> bool {
        self.judged
    }

    /// Whether the scorer must be asked before this request goes on.
    pub fn asks_scorer(&self) -> bool {
        self.score_request.is_some()
    }
}

impl Engine {
    /// Compiles a validated configuration. `seed` must be the same in every
    /// worker VM of the process (it lives in shared data).
    pub fn new(config: &Config, seed: &[u8; SEED_BYTES]) -> Result<Engine, ConfigError> {
        config.validate()?;
        let identity = IdentityPolicy::new(&config.client)?;
        let exemptions = Exemptions::new(config)?;
        let routes = RouteTable::new(&config.route_groups);
        let rate = RequestRate::new(&config.rate, &routes);
        let hasher = KeyedHasher::from_seed(seed);
        // The shard count is part of the layout: a record's shard is its key
        // modulo the count, so another count means other shards.
        let layout_tag = format!(
            "clients;format={RECORD_FORMAT};shards={};rate={}",
            config.state.shards,
            rate.as_ref().map(RequestRate::layout_tag).unwrap_or_default()
        );
        // Truncation to 32 bits is fine: it only has to differ when layouts do.
        let fingerprint = |tag: &str| (hasher.key(0, tag.as_bytes()) & 0xffff_ffff) as u32;
        let clients = TieredTable::new(
            ShardedTable::new(
                STATE_PREFIX,
                "clients",
                usize::try_from(config.state.shards).unwrap_or(1),
                usize::try_from(config.state.slots_per_shard).unwrap_or(32),
                fingerprint(&layout_tag),
            )
            .with_fields(RECORD_FORMAT, rate.as_ref().map(RequestRate::window_tags).unwrap_or_default()),
            usize::try_from(config.state.worker_clients).unwrap_or(0),
            u64::from(config.state.worker_sync_ms),
        );
        let accounts = ShardedTable::new(STATE_PREFIX, "accounts", ACCOUNT_SHARDS, ACCOUNT_SLOTS, fingerprint("accounts;3"));
        let endpoints = ShardedTable::new(STATE_PREFIX, "endpoints", 1, 16, fingerprint("endpoints;3"));
        let sprays = ShardedTable::new(STATE_PREFIX, "sprays", SPRAY_SHARDS, SPRAY_SLOTS, fingerprint("sprays;2"));
        let fingerprints =
            ShardedTable::new(STATE_PREFIX, "fingerprints", FINGERPRINT_SHARDS, FINGERPRINT_SLOTS, fingerprint("fingerprints;2"));
        let group_table = ShardedTable::new(STATE_PREFIX, "route_groups", 1, 64, fingerprint("route_groups;1"));
        let groups = config.route_groups.len();
        let route_counters = Mutex::new(RouteCounters {
            pending: vec![0; groups],
            state: vec![GroupState::default(); groups],
        });
        let verdict_table =
            ShardedTable::new(STATE_PREFIX, "verdicts", VERDICT_SHARDS, VERDICT_SLOTS, fingerprint("verdicts;1"));
        let session_table =
            ShardedTable::new(STATE_PREFIX, "sessions", SESSION_SHARDS, SESSION_SLOTS, fingerprint("sessions;1"));
        let login = LoginDetector::new(&config.credential_stuffing, &config.account_takeover);
        let distributed = match &login {
            Some(_) => DistributedStuffing::new(&config.credential_stuffing.distributed),
            None => None,
        };
        let compiled_rules = crate::rules::Rules::new(&config.rules, &routes);
        let rule_tables = rules::tables(&compiled_rules, &fingerprint);
        let mut actions = [DetectorAction::Block; 32];
        for reason in Reason::ALL {
            if let Some(slot) = actions.get_mut(reason as usize) {
                *slot = config.actions.get(reason.name()).copied().unwrap_or(reason.default_action());
            }
        }
        Ok(Engine {
            config: config.clone(),
            identity,
            exemptions,
            routes,
            rate,
            login_profile: match &login {
                Some(_) => LoginProfile::new(&config.account_takeover.profile, config.credential_stuffing.window_s),
                None => None,
            },
            login,
            probing: Probing::new(&config.probing),
            enumeration: Enumeration::new(&config.enumeration),
            harvest: match Enumeration::new(&config.enumeration) {
                Some(_) if config.enumeration.has_private_routes() => Harvest::new(&config.enumeration.harvest),
                _ => None,
            },
            object_routes: ShardedTable::new(STATE_PREFIX, "object_routes", 1, 32, fingerprint("object_routes;1")),
            object_route_keys: config
                .enumeration
                .object_routes
                .iter()
                .map(|r| hasher.key(DOMAIN_OBJECT_ROUTE, r.path().as_bytes()))
                .collect(),
            distributed,
            sessions: Sessions::new(&config.sessions),
            scraping: Scraping::new(&config.scraping),
            spikes: if groups > 0 { Spikes::new(&config.spikes) } else { None },
            callouts: Callouts::new(&config.scorer),
            route_counters,
            actions,
            clients,
            accounts,
            endpoints,
            sprays,
            fingerprints,
            known_accounts: KnownAccounts::new(STATE_PREFIX),
            account_hasher: match Callouts::new(&config.scorer).and_then(|c| c.secret) {
                Some(secret) => KeyedHasher::from_secret(&secret),
                None => hasher,
            },
            outbox: Mutex::new(events::Outbox::default()),
            decision_ids: decisions::DecisionIds::new((hasher.key(0, b"instance") & 0xffff) as u16),
            decision_outbox: Mutex::new(decisions::DecisionOutbox::default()),
            operator_allows: Mutex::new(operator_allow::OperatorAllows::default()),
            session_table,
            group_table,
            verdict_table,
            rules: compiled_rules,
            rule_tables,
            rule_outbox: Mutex::new(rules::RuleOutbox::default()),
            hasher,
            half_life_ms: u64::from(config.risk.half_life_s).saturating_mul(1000),
            penalty_ms: u64::from(config.penalty.duration_s).saturating_mul(1000),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn identity_policy(&self) -> &IdentityPolicy {
        &self.identity
    }

    pub fn table(&self) -> &ShardedTable<ClientRecord> {
        self.clients.shared()
    }

    /// The per-worker tier of client records (see `tiers`).
    pub fn worker_tier(&self) -> &TieredTable<ClientRecord> {
        &self.clients
    }

    /// Whether the host must read the user agent.
    pub fn reads_user_agent(&self) -> bool {
        self.config.client.key_by_user_agent
            || self.exemptions.needs_user_agent()
            || self.probing.as_ref().is_some_and(Probing::needs_user_agent)
            || self.tracks_sessions()
            || self.distributed.is_some()
    }

    /// Whether the host must collect the request's header names (login
    /// routes, for the distributed-stuffing fingerprint).
    pub fn wants_fingerprint(&self, method: &str, path: &str) -> bool {
        self.distributed.is_some() && self.login.as_ref().is_some_and(|l| l.route(method, path).is_some())
    }

    /// Whether the host must read the API key header.
    pub fn reads_api_key(&self) -> bool {
        self.identity.api_key_header.is_some()
            && (self.exemptions.needs_api_key()
                || self.sessions.is_some()
                || self.has_anonymous_limits()
                || self.rules.uses_key(&crate::rules::key::KeySpec::ApiKey))
    }

    /// Whether sessions are tracked (the detector is on and a session identity configured).
    pub fn tracks_sessions(&self) -> bool {
        let c = &self.config.client;
        self.sessions.is_some() && (c.session_cookie.is_some() || c.api_key_header.is_some() || c.jwt_claim.is_some())
    }

    /// Whether the host must read `Cookie` (session cookie configured).
    pub fn reads_cookie(&self) -> bool {
        (self.sessions.is_some() || self.has_anonymous_limits() || self.rules.uses_key(&crate::rules::key::KeySpec::Session))
            && self.identity.session_cookie.is_some()
    }

    /// Whether the host must read `Authorization` (JWT claim configured).
    pub fn reads_authorization(&self) -> bool {
        ((self.sessions.is_some() || self.rules.uses_key(&crate::rules::key::KeySpec::JwtClaim))
            && self.identity.jwt_claim.is_some())
            || self.has_anonymous_limits()
    }

}

