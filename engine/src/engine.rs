//! The decision for one request: identify the client, enforce its penalty
//! box, run the detectors against its record, update its risk, decide —
//! all in one read-modify-write of the client's shard. Answers (status of
//! the response) feed the outcome detectors in a second, rarer update: only
//! login routes, 404/403 answers and object routes pay for it.

mod events;
mod sample;

use crate::account::AccountRecord;
use crate::callout::{reasons_from_names, CacheLookup, CalloutFailure, Callouts, VerdictRecord};
use crate::wire::{FleetVerdicts, Features, ScoreAction, ScoreRequest, ScoreResponse, WIRE_VERSION};
use crate::config::{Config, ConfigError, DetectorAction, Mode};
use crate::detectors::distributed_stuffing::DistributedStuffing;
use crate::detectors::distributed_stuffing::AttemptSignals;
use crate::endpoint::{EndpointRecord, FingerprintRecord, SprayRecord};
use crate::known_accounts::KnownAccounts;
use crate::detectors::enumeration::Enumeration;
use crate::detectors::login::{LoginDetector, LoginOutcome};
use crate::detectors::login_profile::{LoginProfile, ProfileRisk};
use crate::profile::{asn_number, country_number, device_tag, network_tag, LoginPlace};
use crate::detectors::probing::Probing;
use crate::detectors::scraping::Scraping;
use crate::detectors::session::{country_code, Sessions};
use crate::detectors::spike::{GroupState, Spikes};
use std::sync::Mutex;
use crate::session::SessionRecord;
use crate::detectors::rate::RequestRate;
use crate::detectors::Signal;
use crate::exemptions::Exemptions;
use crate::hash::{KeyedHasher, SEED_BYTES};
use crate::identity::{ClientAddr, ClientIdentity, IdentityInput, IdentityPolicy};
use crate::reason::{Reason, ReasonSet};
use crate::layout::Migration;
use crate::record::{migrate_client, ClientRecord, RECORD_FORMAT};
use crate::risk;
use crate::routes::RouteTable;
use crate::store::{ShardedTable, SharedStore, UpdateStats};
use crate::tiers::TieredTable;
use crate::verdict::{Action, CalloutPlan, Verdict};

/// Prefix of every shared-data key this filter owns.
pub const STATE_PREFIX: &str = "abuse_filter/v1";
/// Shared-data key of the per-process hashing seed.
pub const SEED_KEY: &str = "abuse_filter/v1/seed";

/// Hash domains: the same bytes hash differently per use.
const DOMAIN_CLIENT: u8 = 1;
const DOMAIN_USERNAME: u8 = 2;
const DOMAIN_OBJECT: u8 = 3;
const DOMAIN_PATH: u8 = 4;
const DOMAIN_ENDPOINT: u8 = 5;
const DOMAIN_PASSWORD: u8 = 6;
const DOMAIN_FINGERPRINT: u8 = 10;
const DOMAIN_SESSION: u8 = 7;
const DOMAIN_USER_AGENT: u8 = 8;
const DOMAIN_ROUTE: u8 = 9;

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
}

/// What the engine remembers between a request and its answer.
#[derive(Debug, Clone, Default)]
pub struct Exchange {
    // (fields private: only the engine interprets them)
    client: Option<ClientAddr>,
    agent: Option<u32>,
    client_key: u64,
    /// False when the client is allowlisted, blocked, or state failed.
    judged: bool,
    good_bot: bool,
    login_route: Option<usize>,
    object: bool,
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
    /// Keyed, rotating hash of the submitted password (during an attack).
    password_key: Option<u64>,
    /// The account is not known to exist (None: no username read).
    account_unknown: Option<bool>,
    mode: Option<Mode>,
    /// The question for the scorer, when this request must ask it.
    score_request: Option<ScoreRequest>,
    /// The filter's own decision while the scorer is asked.
    risk: f32,
    reasons: ReasonSet,
}

/// What [`Engine::prepare_state`] did.
#[derive(Debug, Clone, Default)]
pub struct StateReport {
    /// Shards created or rewritten.
    pub created: usize,
    /// Tables whose layout this configuration changed, and what was carried over.
    pub migrations: Vec<Migration>,
}

impl StateReport {
    /// The one log line of a layout change (None: nothing changed).
    pub fn summary(&self) -> Option<String> {
        (!self.migrations.is_empty())
            .then(|| self.migrations.iter().map(Migration::summary).collect::<Vec<_>>().join("; "))
    }
}

/// Outcome of the read-modify-write on the client's record.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Penalized { reasons: ReasonSet, until_ms: u64, risk: f32 },
    /// `shed`: a `shed` reason refuses this request only (no penalty box).
    Scored { risk: f32, fired: ReasonSet, reasons: ReasonSet, blocked_until_ms: Option<u64>, shed: bool },
}

/// Per-VM view of the route groups between ticks (spike detection).
#[derive(Debug, Default)]
struct RouteCounters {
    /// Requests per group since the last tick.
    pending: Vec<u32>,
    /// Each group's state as of the last tick.
    state: Vec<GroupState>,
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
    session_table: ShardedTable<SessionRecord>,
    group_table: ShardedTable<EndpointRecord>,
    verdict_table: ShardedTable<VerdictRecord>,
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
        let endpoints = ShardedTable::new(STATE_PREFIX, "endpoints", 1, 16, fingerprint("endpoints;2"));
        let sprays = ShardedTable::new(STATE_PREFIX, "sprays", SPRAY_SHARDS, SPRAY_SLOTS, fingerprint("sprays;1"));
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
            session_table,
            group_table,
            verdict_table,
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

    /// Creates every shard key (at configuration time).
    pub fn create_state(&self, store: &dyn SharedStore) -> Result<usize, crate::store::StoreError> {
        Ok(self.prepare_state(store, 0)?.created)
    }

    /// Creates every shard key and, when this configuration changes a
    /// table's layout, carries its records over (see [`crate::layout`]):
    /// at configuration time, with the host's clock.
    pub fn prepare_state(&self, store: &dyn SharedStore, now_ms: u64) -> Result<StateReport, crate::store::StoreError> {
        let mut report = StateReport::default();
        let mut note = |(written, migration): (usize, Option<Migration>)| {
            report.created += written;
            report.migrations.extend(migration.filter(Migration::is_change));
        };
        note(self.clients.adopt_layout(store, &migrate_client, now_ms)?);
        if self.login.is_some() {
            note(self.accounts.adopt_layout(store, &ShardedTable::same_fingerprint, now_ms)?);
        }
        if self.distributed.is_some() {
            note(self.endpoints.adopt_layout(store, &ShardedTable::same_fingerprint, now_ms)?);
            note(self.sprays.adopt_layout(store, &ShardedTable::same_fingerprint, now_ms)?);
            note(self.fingerprints.adopt_layout(store, &ShardedTable::same_fingerprint, now_ms)?);
            note((self.known_accounts.create_shards(store)?, None));
        }
        if self.tracks_sessions() {
            note(self.session_table.adopt_layout(store, &ShardedTable::same_fingerprint, now_ms)?);
        }
        if self.spikes.is_some() {
            note(self.group_table.adopt_layout(store, &ShardedTable::same_fingerprint, now_ms)?);
        }
        if self.callouts.is_some() {
            note(self.verdict_table.adopt_layout(store, &ShardedTable::same_fingerprint, now_ms)?);
        }
        Ok(report)
    }

    /// Bytes of shared data the state occupies, whatever the traffic.
    pub fn state_bytes(&self) -> usize {
        let accounts = if self.login.is_some() { self.accounts.total_bytes() } else { 0 };
        let distributed = if self.distributed.is_some() {
            self.endpoints
                .total_bytes()
                .saturating_add(self.sprays.total_bytes())
                .saturating_add(self.fingerprints.total_bytes())
                .saturating_add(self.known_accounts.total_bytes())
        } else {
            0
        };
        let sessions = if self.tracks_sessions() { self.session_table.total_bytes() } else { 0 };
        self.clients
            .total_bytes()
            .saturating_add(accounts)
            .saturating_add(distributed)
            .saturating_add(sessions)
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
            && (self.exemptions.needs_api_key() || self.sessions.is_some() || self.has_anonymous_limits())
    }

    fn has_anonymous_limits(&self) -> bool {
        self.rate.as_ref().is_some_and(RequestRate::has_anonymous_limits)
    }

    /// A request without credentials: no `Authorization`, no API key, no
    /// session cookie (for `anonymous_only` rate limits).
    fn is_anonymous(&self, input: &IdentityInput<'_>) -> bool {
        let session_cookie = match (input.cookie, &self.identity.session_cookie) {
            (Some(cookie), Some(name)) => crate::identity::cookie_value(cookie, name).is_some(),
            _ => false,
        };
        input.authorization.is_none() && input.api_key.is_none() && !session_cookie
    }

    /// Whether sessions are tracked (the detector is on and a session identity configured).
    pub fn tracks_sessions(&self) -> bool {
        let c = &self.config.client;
        self.sessions.is_some() && (c.session_cookie.is_some() || c.api_key_header.is_some() || c.jwt_claim.is_some())
    }

    /// Whether the host must read `Cookie` (session cookie configured).
    pub fn reads_cookie(&self) -> bool {
        (self.sessions.is_some() || self.has_anonymous_limits()) && self.identity.session_cookie.is_some()
    }

    /// Whether the host must read `Authorization` (JWT claim configured).
    pub fn reads_authorization(&self) -> bool {
        (self.sessions.is_some() && self.identity.jwt_claim.is_some()) || self.has_anonymous_limits()
    }

    pub fn identify(&self, input: &IdentityInput<'_>) -> ClientIdentity {
        self.identity.identify(input)
    }

    pub fn on_request(&self, store: &dyn SharedStore, facts: &RequestFacts<'_>, now_ms: u64) -> (Verdict, Exchange) {
        let client = self
            .identity
            .client_addr(facts.identity.peer, facts.identity.forwarded_for);
        let agent = self.agent_of(facts.user_agent);
        let mut exchange = Exchange { client: Some(client), agent, ..Exchange::default() };
        let api_key = facts.identity.api_key.and_then(|k| std::str::from_utf8(k).ok()).map(str::trim);
        if self.exemptions.allowlisted(client, api_key) {
            let mut v = Verdict::allow(client);
            v.exempt = true;
            return (v, exchange);
        }
        let key = self.client_key(client, agent);
        let good_bot = self.exemptions.good_bot(client, facts.user_agent);
        let routes = self.routes.matches(facts.method, facts.path);
        // Stateless signals are computed once, outside the CAS loop.
        let probe = match &self.probing {
            Some(p) if !good_bot => p.on_request(facts.path, facts.user_agent),
            _ => Signal::default(),
        };
        let object = match &self.enumeration {
            Some(e) if !good_bot => e.object_id(facts.path),
            _ => None,
        };
        let object_hash = object.as_ref().map(|o| self.hasher.key(DOMAIN_OBJECT, o.text.as_bytes()));
        let login_route = self.login.as_ref().and_then(|l| l.route(facts.method, facts.path));
        // Login routes: what the request itself tells about the attempt. The
        // client's fingerprint (header order + user agent) names its device in
        // the account's profile, and a user agent that claims no browser is
        // also judged as a tool by it.
        let header_shape = login_route.map(|_| self.client_header_shape(facts.header_names.unwrap_or("")));
        let fingerprint_text = header_shape
            .as_ref()
            .map(|shape| format!("{shape}|{}", facts.user_agent.unwrap_or("")));
        let tool_key = match (&self.distributed, &fingerprint_text) {
            (Some(_), Some(text)) if !facts.user_agent.is_some_and(crate::detectors::browser::claims_browser) => {
                Some(self.hasher.key(DOMAIN_FINGERPRINT, text.as_bytes()))
            }
            _ => None,
        };
        let endpoint = match (&self.distributed, login_route) {
            (Some(_), Some(route)) => self.endpoints.peek(store, self.endpoint_key(route)).ok().flatten(),
            _ => None,
        };
        let attempt = match (&self.distributed, login_route) {
            (Some(d), Some(_)) => {
                let under_attack = endpoint.is_some_and(|e| e.under_attack(now_ms));
                let tool_fingerprint = under_attack
                    && tool_key.is_some_and(|k| {
                        self.fingerprints
                            .peek(store, k)
                            .ok()
                            .flatten()
                            .is_some_and(|f| d.tool_is_attacking(&f, now_ms))
                    });
                Some(AttemptSignals {
                    under_attack,
                    tool_fingerprint,
                    inconsistent_headers: crate::detectors::browser::inconsistent(
                        facts.user_agent,
                        facts.header_names.unwrap_or(""),
                    ),
                    ..AttemptSignals::default()
                })
            }
            _ => None,
        };
        let login_place = match login_route {
            Some(_) => LoginPlace {
                device: device_tag(facts.user_agent.unwrap_or(""), header_shape.as_deref().unwrap_or(""), facts.ja4),
                country: country_number(facts.country),
                asn: asn_number(facts.asn),
                network: network_tag(&client),
            },
            None => LoginPlace::default(),
        };
        let mode = self.routes.mode_for(routes).unwrap_or(self.config.mode);
        // Parsing the cookie is only worth it when a limit asks.
        let anonymous = self.has_anonymous_limits() && self.is_anonymous(&facts.identity);
        let (session_hash, session_signal) = self.observe_session(store, facts, key, now_ms);
        let group_state = self.count_route_groups(store, routes, now_ms);
        let mut snapshot: Option<ClientRecord> = None;
        let mut attempt_seen = attempt;
        let page = match &self.scraping {
            Some(sc) if !good_bot => sc.page_of(facts.path),
            _ => None,
        };
        // A quiet client's request stays in this worker's view (see `tiers`).
        let stays_local = |base: &ClientRecord, next: &ClientRecord| {
            crate::tiers::client_stays_local(base, next, self.rate.as_ref(), now_ms)
        };
        let updated = self.clients.update_local(store, key, now_ms, stays_local, |record| {
            if let Some(penalized) = self.penalized(record, now_ms) {
                return (penalized, false);
            }
            if record.first_seen_ms == 0 {
                record.first_seen_ms = now_ms;
            }
            let mut signal = probe;
            signal.add(session_signal);
            if let (Some(d), Some(h)) = (&self.sessions, session_hash) {
                signal.add(d.on_client(record, h, now_ms));
            }
            if facts.anonymous {
                signal.fire(Reason::AnonymousNetwork, self.config.geo.anonymous_weight);
            }
            if let Some(spikes) = &self.spikes {
                signal.add(spikes.on_request(record, group_state, now_ms));
            }
            if let (Some(sc), false) = (&self.scraping, good_bot) {
                signal.add(sc.on_request(record, page, now_ms));
            }
            if let (Some(a), Some(d)) = (attempt_seen.as_mut(), &self.distributed) {
                (a.new_client, a.never_browsed) = d.client_signals(record);
                signal.add(d.refusal(a));
            }
            if login_route.is_some() {
                record.login_attempts = record.login_attempts.saturating_add(1);
            }
            if let Some(rate) = &self.rate {
                signal.add(rate.observe(routes, anonymous, record, now_ms));
            }
            if let (Some(e), Some(o), Some(h)) = (&self.enumeration, &object, object_hash) {
                let session = session_hash.map(|h| (h & 0xffff_ffff) as u32).unwrap_or(0);
                let sessions = record.sessions.estimate();
                signal.add(e.on_request(record, o, h, session, sessions, now_ms));
            }
            record.requests = record.requests.saturating_add(1);
            let outcome = self.apply(record, signal, now_ms);
            if self.callouts.is_some() {
                snapshot = Some(*record);
            }
            (outcome, true)
        });
        let mut verdict = self.verdict(client, updated, mode, now_ms);
        verdict.agent = agent;
        if let (Some(a), Some(d)) = (&attempt_seen, &self.distributed) {
            if a.level(d.refuse_at()) != "low" {
                verdict.login_risk = Some(a.header(d.refuse_at()));
            }
        }
        if !verdict.would_block && !verdict.store_failed {
            exchange.judged = true;
            exchange.client_key = key;
            exchange.good_bot = good_bot;
            exchange.login_route = login_route;
            exchange.attempt = attempt_seen;
            exchange.endpoint = endpoint;
            exchange.tool_key = tool_key;
            exchange.login_place = login_place;
            exchange.anonymous = facts.anonymous;
            exchange.mode = Some(mode);
            exchange.object = object.is_some();
            if self.probing.is_some() {
                // Only probing reads it (distinct paths answered 404).
                exchange.path_hash = self.hasher.key(DOMAIN_PATH, facts.path.split('?').next().unwrap_or("").as_bytes());
            }
            if let Some(record) = snapshot {
                self.consult_scorer(store, facts, record, routes, session_hash, &mut verdict, &mut exchange, now_ms);
            }
        }
        self.sample_client(key, &verdict, snapshot.as_ref(), routes, facts.anonymous, now_ms);
        (verdict, exchange)
    }

    /// For a borderline client: use the cached scorer verdict, or claim the
    /// callout and prepare the question (single flight per client).
    #[allow(clippy::too_many_arguments)]
    fn consult_scorer(
        &self,
        store: &dyn SharedStore,
        facts: &RequestFacts<'_>,
        record: ClientRecord,
        routes: crate::routes::RouteMatch,
        session_hash: Option<u64>,
        verdict: &mut Verdict,
        exchange: &mut Exchange,
        now_ms: u64,
    ) {
        let Some(callouts) = &self.callouts else {
            return;
        };
        if !callouts.borderline(verdict.risk, self.config.risk.block_at) {
            return;
        }
        let looked_up = self
            .verdict_table
            .update(store, exchange.client_key, now_ms, |v| callouts.lookup(v, now_ms));
        let Ok((lookup, _)) = looked_up else {
            return;
        };
        match lookup {
            CacheLookup::Hit { action, score, reasons, until_ms } => {
                verdict.callout = CalloutPlan::CacheHit;
                self.apply_answer(verdict, action, score, reasons, until_ms, now_ms);
            }
            CacheLookup::InFlight => {
                verdict.callout = CalloutPlan::InFlight;
                exchange.risk = verdict.risk;
                exchange.reasons = verdict.reasons;
            }
            CacheLookup::Ask if !callouts.breaker.allow(now_ms) => {
                verdict.callout = CalloutPlan::BreakerOpen;
                let _ = self.verdict_table.update(store, exchange.client_key, now_ms, |v| {
                    callouts.release(v, now_ms);
                    ((), true)
                });
                if callouts.fail_closed() {
                    verdict.block(403, 1);
                }
            }
            CacheLookup::Ask => {
                verdict.callout = CalloutPlan::Ask;
                exchange.risk = verdict.risk;
                exchange.reasons = verdict.reasons;
                exchange.score_request = Some(self.score_request(facts, &record, routes, session_hash, verdict, now_ms));
            }
        }
    }

    /// Applies a scorer verdict (fresh or cached) to the filter's verdict.
    fn apply_answer(&self, v: &mut Verdict, action: ScoreAction, score: f32, reasons: ReasonSet, until_ms: u64, now_ms: u64) {
        v.risk = score;
        v.reasons = v.reasons.union(reasons);
        match action {
            ScoreAction::Block => v.block(403, until_ms.saturating_sub(now_ms).div_ceil(1000)),
            ScoreAction::Tag => v.action = Action::Tag,
            ScoreAction::Allow => {}
        }
    }

    /// A client's feature summary, as the scorer sees it (callouts and samples).
    fn features_of(&self, r: &ClientRecord, risk: f32, anonymous: bool, now_ms: u64) -> Features {
        let c = &self.config;
        let w = |s: u32| u64::from(s).saturating_mul(1000);
        let (login_w, probe_w, enum_w, scrape_w) =
            (w(c.credential_stuffing.window_s), w(c.probing.window_s), w(c.enumeration.window_s), w(c.scraping.window_s));
        let object_requests = r.object_requests.estimate(now_ms, enum_w) as f32;
        let cv = if r.interval_mean_ms > 0.0 { r.interval_var.max(0.0).sqrt() / r.interval_mean_ms } else { 0.0 };
        Features {
            risk,
            requests: r.requests as f32,
            recent_requests: r.recent_requests.estimate(now_ms, w(c.spikes.window_s)) as f32,
            login_failures: r.login_failures.estimate(now_ms, login_w) as f32,
            failed_usernames: r.failed_usernames.estimate() as f32,
            login_successes: r.login_successes as f32,
            not_found: r.not_found.estimate(now_ms, probe_w) as f32,
            not_found_paths: r.not_found_paths.estimate() as f32,
            object_requests,
            object_miss_ratio: (r.object_misses.estimate(now_ms, enum_w) as f32) / object_requests.max(1.0),
            distinct_object_ids: r.object_ids.estimate() as f32,
            sequential_object_run: r.object_run as f32,
            page_run: r.page_run as f32,
            interval_mean_ms: r.interval_mean_ms,
            interval_cv: cv,
            sessions: r.sessions.estimate() as f32,
            response_kib: r.response_kib.estimate(now_ms, scrape_w) as f32,
            anonymous_network: if anonymous { 1.0 } else { 0.0 },
        }
    }

    /// The feature summary the scorer judges.
    fn score_request(
        &self,
        facts: &RequestFacts<'_>,
        r: &ClientRecord,
        routes: crate::routes::RouteMatch,
        session_hash: Option<u64>,
        verdict: &Verdict,
        now_ms: u64,
    ) -> ScoreRequest {
        let c = &self.config;
        let features = self.features_of(r, verdict.risk, facts.anonymous, now_ms);
        let route_group = c
            .route_groups
            .iter()
            .enumerate()
            .find(|(i, _)| routes.contains(*i))
            .map(|(_, g)| g.name.clone());
        let id = self.identity.identify(&facts.identity);
        let short = |s: &str, n: usize| s.chars().take(n).collect::<String>();
        ScoreRequest {
            version: WIRE_VERSION,
            client: crate::identity::client_label(verdict.client, verdict.agent),
            route_group,
            method: short(facts.method, 16),
            path: short(facts.path.split('?').next().unwrap_or(""), 256),
            reasons: verdict.reasons.names().into_iter().map(String::from).collect(),
            features,
            username: None,
            session: session_hash.map(|h| format!("{h:016x}")),
            subject: id.subject.map(|s| short(&s, 128)),
            user_agent: facts.user_agent.map(|u| short(u, 256)),
            country: facts.country.map(|c| short(c, 8)),
            asn: facts.asn.map(|a| short(a, 16)),
        }
    }

    /// The scorer question as JSON, once everything it needs is known
    /// (for login routes: after the body gave the username).
    pub fn score_request_body(&self, exchange: &Exchange) -> Option<Vec<u8>> {
        exchange.score_request.as_ref().and_then(|r| serde_json::to_vec(r).ok())
    }

    /// The scorer answered (or failed): caches the answer, moves the breaker,
    /// and returns the final verdict for the paused request.
    pub fn on_score_answer(
        &self,
        store: &dyn SharedStore,
        exchange: &Exchange,
        answer: Result<ScoreResponse, CalloutFailure>,
        now_ms: u64,
    ) -> Verdict {
        let mut v = self.held_verdict(exchange);
        let Some(callouts) = &self.callouts else {
            return v;
        };
        let key = exchange.client_key;
        match answer {
            Ok(answer) => {
                v.callout = CalloutPlan::Answered;
                callouts.breaker.success();
                let cached = self.verdict_table.update(store, key, now_ms, |r| {
                    callouts.store_answer(r, &answer, now_ms);
                    (r.valid_until_ms, true)
                });
                let until_ms = cached.map(|(u, _)| u).unwrap_or(now_ms.saturating_add(1000));
                let reasons = reasons_from_names(&answer.reasons);
                self.apply_answer(&mut v, answer.action, answer.score, reasons, until_ms, now_ms);
                if answer.action == ScoreAction::Block {
                    // Into the penalty box, like any block: later requests
                    // are refused before any other work.
                    let penalty = v.reasons;
                    let _ = self.clients.update(store, key, now_ms, |r| {
                        r.penalty_until_ms = until_ms;
                        r.penalty_reasons = penalty;
                        r.risk = r.risk.max(answer.score.min(risk::MAX_RISK));
                        ((), true)
                    });
                    v.newly_blocked = true;
                }
            }
            Err(failure) => {
                v.callout = if failure.is_timeout() { CalloutPlan::TimedOut } else { CalloutPlan::Failed };
                callouts.breaker.failure(
                    now_ms,
                    callouts.config.breaker_failures,
                    u64::from(callouts.config.breaker_cooldown_s).saturating_mul(1000),
                );
                let _ = self.verdict_table.update(store, key, now_ms, |r| {
                    callouts.release(r, now_ms);
                    ((), true)
                });
                if callouts.fail_closed() {
                    v.block(403, 1);
                }
            }
        }
        v
    }

    /// For a request that waited while another asked about its client: the
    /// cached answer once there, the failure mode once `deadline_ms` passed,
    /// else None (keep waiting).
    pub fn waiting_verdict(&self, store: &dyn SharedStore, exchange: &Exchange, deadline_ms: u64, now_ms: u64) -> Option<Verdict> {
        let callouts = self.callouts.as_ref()?;
        let cached = self
            .verdict_table
            .peek(store, exchange.client_key)
            .ok()
            .flatten()
            .filter(|r| r.valid_until_ms > now_ms);
        let mut v = self.held_verdict(exchange);
        match cached {
            Some(r) => {
                v.callout = CalloutPlan::CacheHit;
                let action = crate::callout::action_of(r.action);
                self.apply_answer(&mut v, action, r.score, r.reasons, r.valid_until_ms, now_ms);
                Some(v)
            }
            None if now_ms >= deadline_ms => {
                v.callout = CalloutPlan::TimedOut;
                if callouts.fail_closed() {
                    v.block(403, 1);
                }
                Some(v)
            }
            None => None,
        }
    }

    /// The client key of an exchange (to match waiters with their callout).
    pub fn client_key_of(exchange: &Exchange) -> u64 {
        exchange.client_key
    }

    /// The filter's own decision for a request held while the scorer is asked.
    fn held_verdict(&self, exchange: &Exchange) -> Verdict {
        let mut v = Verdict::allow(exchange.client.unwrap_or(ClientAddr::Unknown));
        v.agent = exchange.agent;
        v.mode = exchange.mode.unwrap_or(self.config.mode);
        v.risk = exchange.risk;
        v.reasons = exchange.reasons;
        if v.risk >= self.config.risk.tag_at {
            v.action = Action::Tag;
        }
        v
    }

    /// The scorer policy, when enabled.
    pub fn callouts(&self) -> Option<&Callouts> {
        self.callouts.as_ref()
    }

    /// Claims this process's fleet-verdict poll when due (a lease in shared
    /// data: one worker per Envoy process polls); returns the cursor to poll from.
    pub fn claim_fleet_poll(&self, store: &dyn SharedStore, now_ms: u64) -> Option<u64> {
        let callouts = self.callouts.as_ref().filter(|c| c.config.fleet_verdicts)?;
        let (value, cas) = store.get(FLEET_LEASE_KEY).ok()?;
        let (lease_until, cursor) = decode_lease(value.as_deref());
        if lease_until > now_ms {
            return None;
        }
        let period = u64::from(callouts.config.fleet_poll_s).saturating_mul(1000);
        let lease = encode_lease(now_ms.saturating_add(period), cursor);
        store.set(FLEET_LEASE_KEY, &lease, cas).ok()?;
        Some(cursor)
    }

    /// Applies the fleet's verdicts: each blocked client goes into this
    /// Envoy's penalty box. Returns how many were applied.
    pub fn apply_fleet_verdicts(&self, store: &dyn SharedStore, body: &[u8], now_ms: u64) -> usize {
        if body.len() > crate::wire::MAX_FLEET_BYTES {
            return 0;
        }
        let Ok(fleet) = serde_json::from_slice::<FleetVerdicts>(body) else {
            return 0;
        };
        if fleet.version != WIRE_VERSION {
            return 0;
        }
        let mut applied = 0;
        for v in fleet.verdicts.iter().take(crate::wire::MAX_FLEET_VERDICTS) {
            if v.until_ms <= now_ms {
                continue;
            }
            // `addr` or `addr#tag` (see identity::client_label).
            let (addr, agent) = match v.client.split_once('#') {
                Some((addr, tag)) => (addr, u32::from_str_radix(tag, 16).ok()),
                None => (v.client.as_str(), None),
            };
            let client = self.identity.client_addr(Some(addr.as_bytes()), None);
            if client == ClientAddr::Unknown {
                continue;
            }
            let key = self.client_key(client, agent);
            let reasons = reasons_from_names(&v.reasons);
            let until = v.until_ms.min(now_ms.saturating_add(86_400_000));
            let done = self.clients.update(store, key, now_ms, |r| {
                if r.penalty_until_ms >= until {
                    return ((), false);
                }
                r.penalty_until_ms = until;
                r.penalty_reasons = if reasons.is_empty() { r.recent_reasons } else { reasons };
                ((), true)
            });
            if done.is_ok() {
                applied += 1;
            }
        }
        // Remember where we are, for whichever worker polls next.
        for _ in 0..8 {
            let Ok((value, cas)) = store.get(FLEET_LEASE_KEY) else { break };
            let (lease_until, _) = decode_lease(value.as_deref());
            if store.set(FLEET_LEASE_KEY, &encode_lease(lease_until, fleet.next), cas).is_ok() {
                break;
            }
        }
        applied
    }

    /// Counts the request for its route groups (per VM, no host call);
    /// returns the state of a matching group that is spiking, if any. A
    /// group whose count on this worker jumped past its early-merge
    /// threshold is merged at once (a burst shorter than a tick).
    fn count_route_groups(&self, store: &dyn SharedStore, routes: crate::routes::RouteMatch, now_ms: u64) -> Option<GroupState> {
        let spikes = self.spikes.as_ref()?;
        // Allocates only when a merge is due (rare: during bursts).
        let mut due: Vec<(usize, u32)> = Vec::new();
        let mut spiking = None;
        {
            let mut counters = self.route_counters.lock().ok()?;
            let RouteCounters { pending, state } = &mut *counters;
            for (i, (count, group)) in pending.iter_mut().zip(state.iter()).enumerate() {
                if routes.contains(i) {
                    *count = count.saturating_add(1);
                    if *count >= spikes.early_merge_at(group) {
                        due.push((i, std::mem::take(count)));
                    } else if group.spiking && spiking.is_none() {
                        spiking = Some(*group);
                    }
                }
            }
        }
        for (i, added) in due {
            let merged = self.merge_group(store, spikes, i, added, now_ms);
            if let Some(state) = merged {
                if let Ok(mut c) = self.route_counters.lock() {
                    if let Some(slot) = c.state.get_mut(i) {
                        *slot = state;
                    }
                }
                if state.spiking && spiking.is_none() {
                    spiking = Some(state);
                }
            } else if let Ok(mut c) = self.route_counters.lock() {
                // Not merged: keep the counts for the tick.
                if let Some(count) = c.pending.get_mut(i) {
                    *count = count.saturating_add(added);
                }
            }
        }
        spiking
    }

    /// Adds a worker's count for one group to its shared record and judges it.
    fn merge_group(&self, store: &dyn SharedStore, spikes: &Spikes, group: usize, added: u32, now_ms: u64) -> Option<GroupState> {
        let name = &self.config.route_groups.get(group)?.name;
        let key = self.hasher.key(DOMAIN_ROUTE, name.as_bytes());
        self.group_table
            .update(store, key, now_ms, |g| (spikes.on_tick(g, added, now_ms), true))
            .ok()
            .map(|(state, _)| state)
    }

    /// Periodic work of each VM: hands its route-group counts to the shared
    /// records and learns whether a group is spiking. Call it on every tick.
    pub fn on_tick(&self, store: &dyn SharedStore, now_ms: u64) {
        // What this worker counted on its own views goes to shared data.
        let _ = self.clients.on_tick(store, now_ms);
        let Some(spikes) = &self.spikes else {
            return;
        };
        let pending: Vec<u32> = match self.route_counters.lock() {
            Ok(mut c) => c.pending.iter_mut().map(std::mem::take).collect(),
            Err(_) => return,
        };
        let states: Vec<Option<GroupState>> = pending
            .into_iter()
            .enumerate()
            .map(|(group, added)| self.merge_group(store, spikes, group, added, now_ms))
            .collect();
        if let Ok(mut c) = self.route_counters.lock() {
            for (slot, state) in c.state.iter_mut().zip(states) {
                if let Some(state) = state {
                    *slot = state;
                }
            }
        }
    }

    /// Whether a login endpoint is under a recognised distributed attack
    /// (its shared record: every worker sees the same).
    pub fn login_under_attack(&self, store: &dyn SharedStore, now_ms: u64) -> bool {
        self.login_endpoints(store).iter().any(|e| e.as_ref().is_some_and(|e| e.under_attack(now_ms)))
    }

    /// The login endpoints' shared records (None: none yet).
    fn login_endpoints(&self, store: &dyn SharedStore) -> Vec<Option<EndpointRecord>> {
        match (&self.login, &self.distributed) {
            (Some(login), Some(_)) => (0..login.paths().count())
                .map(|route| self.endpoints.peek(store, self.endpoint_key(route)).ok().flatten())
                .collect(),
            _ => Vec::new(),
        }
    }

    /// How many learned baselines are still learning (route groups for
    /// spikes, as this worker last saw them; login endpoints, from their
    /// shared records): nothing is judged against them yet. Call it on the tick.
    pub fn baselines_learning(&self, store: &dyn SharedStore) -> u32 {
        let login = match &self.distributed {
            Some(d) => self.login_endpoints(store).iter().filter(|e| e.as_ref().is_none_or(|e| d.learning(e))).count() as u32,
            None => 0,
        };
        if self.spikes.is_none() {
            return login;
        }
        let groups = self
            .route_counters
            .lock()
            .map(|c| c.state.iter().filter(|g| !g.warm).count() as u32)
            .unwrap_or(0);
        login.saturating_add(groups)
    }

    /// Updates the session's footprint; returns its hash and what it showed.
    fn observe_session(
        &self,
        store: &dyn SharedStore,
        facts: &RequestFacts<'_>,
        client_key: u64,
        now_ms: u64,
    ) -> (Option<u64>, Signal) {
        let Some(sessions) = &self.sessions else {
            return (None, Signal::default());
        };
        let id = self.identity.identify(&facts.identity);
        // One identity per request: the most specific one present.
        let session = match (&id.session, &id.api_key, &id.subject) {
            (Some(s), _, _) => format!("cookie:{s}"),
            (None, Some(k), _) => format!("key:{k}"),
            (None, None, Some(sub)) => format!("sub:{sub}"),
            _ => return (None, Signal::default()),
        };
        let hash = self.hasher.key(DOMAIN_SESSION, session.as_bytes());
        let ua_hash = self.hasher.key(DOMAIN_USER_AGENT, facts.user_agent.unwrap_or("").as_bytes());
        let country = facts.country.and_then(country_code);
        let signal = self
            .session_table
            .update(store, hash, now_ms, |s| (sessions.on_request(s, client_key, ua_hash, country, now_ms), true))
            .map(|(signal, _)| signal)
            .unwrap_or_default();
        (Some(hash), signal)
    }

    /// How much request body to read for this exchange (login routes only).
    pub fn wants_body(&self, exchange: &Exchange) -> Option<usize> {
        match (&self.login, exchange.login_route) {
            (Some(login), Some(_)) if exchange.judged => Some(login.max_body_bytes()),
            _ => None,
        }
    }

    /// Keyed by the route's path, not its position: a reload that adds,
    /// removes or reorders login routes keeps each endpoint's baseline and
    /// attack state (the scorer names baselines by path too).
    fn endpoint_key(&self, route: usize) -> u64 {
        let path = self.login.as_ref().and_then(|l| l.paths().nth(route)).unwrap_or_default();
        self.hasher.key(DOMAIN_ENDPOINT, path.as_bytes())
    }

    /// The login body, read whole (never called for an oversized body).
    /// During a recognised attack the account-level evidence is added to the
    /// attempt's; returns the verdict when the attempt is refused.
    pub fn on_request_body(&self, store: &dyn SharedStore, exchange: &mut Exchange, body: &[u8], now_ms: u64) -> Option<Verdict> {
        let (Some(login), Some(route)) = (&self.login, exchange.login_route) else {
            return None;
        };
        exchange.username = login.username(route, body);
        if let Some(q) = exchange.score_request.as_mut() {
            q.username = exchange.username.clone();
        }
        let username = exchange.username.as_deref()?;
        let account_key = self.account_hasher.key(DOMAIN_USERNAME, username.as_bytes());
        let account = self.accounts.peek(store, account_key).ok().flatten();
        // The login compared with the account's profile, for the
        // application (as if it succeeds: the outcome is not known yet).
        if let Some(lp) = &self.login_profile {
            let risk = lp.assess(account.as_ref(), &exchange.login_place, exchange.anonymous, exchange.client_key, now_ms);
            exchange.profile_risk = Some(risk);
        }
        let mut signal = self.attempt_evidence(store, exchange, login, route, body, account_key, account.as_ref(), now_ms);
        if let (Some(lp), true) = (&self.login_profile, exchange.profile_risk.is_some_and(|r| r.refuse)) {
            signal.fire(Reason::AccountTakeover, lp.weight());
        }
        if signal.reasons.is_empty() {
            return None;
        }
        let updated = self.clients.update(store, exchange.client_key, now_ms, |record| {
            if let Some(penalized) = self.penalized(record, now_ms) {
                return (penalized, false);
            }
            (self.apply(record, signal, now_ms), true)
        });
        let mode = exchange.mode.unwrap_or(self.config.mode);
        let client = exchange.client.unwrap_or(ClientAddr::Unknown);
        let mut verdict = self.verdict(client, updated, mode, now_ms);
        verdict.agent = exchange.agent;
        verdict.fired = verdict.fired.union(signal.reasons);
        verdict.login_risk = self.login_risk(exchange);
        // The attempt itself is refused, boxed or not.
        verdict.reasons = verdict.reasons.union(signal.reasons);
        verdict.block(403, verdict.retry_after_s.max(1));
        verdict.on_response = true;
        // No answer will be judged: the attempt never reaches the upstream.
        exchange.judged = false;
        Some(verdict)
    }

    /// Distributed stuffing's account-level evidence for the attempt: is
    /// the account known, does the attempt look like its owner, is the
    /// password sprayed. Returns the refusal signal (during an attack).
    #[allow(clippy::too_many_arguments)]
    fn attempt_evidence(
        &self,
        store: &dyn SharedStore,
        exchange: &mut Exchange,
        login: &LoginDetector,
        route: usize,
        body: &[u8],
        account_key: u64,
        account: Option<&AccountRecord>,
        now_ms: u64,
    ) -> Signal {
        let Some(d) = self.distributed.as_ref() else {
            return Signal::default();
        };
        // Every attempt: the endpoint's share of unknown accounts is a
        // recognition signal too (recorded with the outcome).
        let known = self.known_accounts.contains(store, account_key);
        exchange.account_unknown = Some(!known);
        // The account-level evidence, always (it also goes to the login-risk
        // header when the headers were held for the body); the spray and the
        // refusal only during an attack.
        let Some(mut attempt) = exchange.attempt else {
            return Signal::default();
        };
        let endpoint = exchange.endpoint.unwrap_or_default();
        if known {
            attempt.unlike_owner =
                account.is_some_and(|a| a.profile.is_known() && !a.profile.looks_like_owner(&exchange.login_place));
        } else {
            attempt.unknown_account = d.unknown_is_evidence(&endpoint);
        }
        if let Some(password) = login.password(route, body).filter(|_| attempt.under_attack) {
            // Keyed and rotating: the hash means nothing after its window.
            let epoch = now_ms / d.window_ms().max(1);
            let mut text = epoch.to_le_bytes().to_vec();
            text.extend_from_slice(password.as_bytes());
            let key = self.hasher.key(DOMAIN_PASSWORD, &text);
            // Only failures count (the answer records them): real users who
            // share a common password log in, and are never a "spray".
            exchange.password_key = Some(key);
            attempt.sprayed_password = self
                .sprays
                .peek(store, key)
                .ok()
                .flatten()
                .is_some_and(|p| d.is_sprayed(&p, now_ms));
        }
        exchange.attempt = Some(attempt);
        d.refusal(&attempt)
    }

    /// The `x-abuse-login-risk` value once the body was read (for headers
    /// held until then: `credential_stuffing.hold_login_headers`): the
    /// attempt's evidence and the profile's reasons together.
    pub fn login_risk(&self, exchange: &Exchange) -> Option<String> {
        let attempt = match (&self.distributed, exchange.attempt) {
            (Some(d), Some(a)) => Some((a, d.refuse_at())),
            _ => None,
        };
        crate::login_risk::header(attempt, exchange.profile_risk.as_ref())
    }

    /// The request's header names as the client sent them: without those
    /// the proxy adds (Envoy's `x-request-id`, `x-forwarded-*`, `x-envoy-*`,
    /// the GeoIP filter's, the JA4 and facts headers), whose order and presence change
    /// from one request to the next (the GeoIP filter adds its headers in no
    /// fixed order) and say nothing about the client's device.
    fn client_header_shape(&self, names: &str) -> String {
        let geo = &self.config.geo;
        let added = |name: &str| {
            name == "x-request-id"
                || name.starts_with("x-forwarded-")
                || name.starts_with("x-envoy-")
                || geo.country_header.as_deref() == Some(name)
                || geo.asn_header.as_deref() == Some(name)
                || geo.anonymous_headers.iter().any(|h| h == name)
                || self.ja4_header() == Some(name)
                || self.config.client.facts_header.as_deref() == Some(name)
        };
        names.split(',').filter(|n| !added(n)).collect::<Vec<_>>().join(",")
    }

    /// The header with the TLS JA4 fingerprint, when configured (login routes read it).
    pub fn ja4_header(&self) -> Option<&str> {
        self.login_profile.as_ref().and_then(LoginProfile::ja4_header)
    }

    /// Whether login requests wait for their body before their headers go
    /// upstream (needs Envoy's `allow_on_headers_stop_iteration`).
    pub fn holds_login_headers(&self, exchange: &Exchange) -> bool {
        self.config.credential_stuffing.hold_login_headers && exchange.login_route.is_some() && exchange.judged
    }

    /// Whether the host must read the answer's size (`content-length`).
    pub fn reads_response_size(&self) -> bool {
        self.scraping.as_ref().is_some_and(Scraping::tracks_volume)
    }

    /// Whether an answer with this status can change anything: lets the host
    /// skip reading the clock and the size for the common answer.
    pub fn answer_matters(&self, exchange: &Exchange, status: u32) -> bool {
        if !exchange.judged {
            return false;
        }
        let login = self.login.is_some() && exchange.login_route.is_some();
        let volume = self.reads_response_size() && !exchange.good_bot;
        login || self.counts_not_found(exchange, status) || self.counts_object_answer(exchange) || volume
    }

    /// A 404 counts for probing (forced browsing).
    fn counts_not_found(&self, exchange: &Exchange, status: u32) -> bool {
        status == 404 && self.probing.is_some() && !exchange.good_bot
    }

    /// The answer to an object request counts for enumeration (miss ratio).
    fn counts_object_answer(&self, exchange: &Exchange) -> bool {
        exchange.object && self.enumeration.is_some() && !exchange.good_bot
    }

    /// The answer's status and size (KiB, when read). Returns a verdict only
    /// when the answer mattered.
    pub fn on_response(
        &self,
        store: &dyn SharedStore,
        exchange: &Exchange,
        status: u32,
        response_kib: Option<u32>,
        now_ms: u64,
    ) -> Option<Verdict> {
        if !self.answer_matters(exchange, status) {
            return None;
        }
        let client = exchange.client?;
        let outcome = match (&self.login, exchange.login_route) {
            (Some(login), Some(route)) => login.outcome(route, status),
            _ => LoginOutcome::Other,
        };
        let not_found = self.counts_not_found(exchange, status);
        let object_answer = self.counts_object_answer(exchange);
        let volume = match (&self.scraping, response_kib) {
            (Some(sc), Some(kib)) if sc.tracks_volume() && !exchange.good_bot && kib > 0 => Some(kib),
            _ => None,
        };
        // A login the application answered otherwise (a second factor
        // asked, say) still reports what it was told about it.
        let told = outcome != LoginOutcome::Failure && exchange.profile_risk.is_some_and(|r| !r.is_empty());
        if outcome == LoginOutcome::Other && !not_found && !object_answer && volume.is_none() && !told {
            return None;
        }
        let username_hash = exchange
            .username
            .as_deref()
            .map(|u| self.account_hasher.key(DOMAIN_USERNAME, u.as_bytes()));
        let account_failures = match (&self.login, username_hash, outcome) {
            (Some(login), Some(user), LoginOutcome::Failure) => self
                .accounts
                .update(store, user, now_ms, |a| (login.account_failure(a, exchange.client_key, now_ms), true))
                .map(|(f, _)| f)
                .unwrap_or(0.0),
            (Some(login), Some(user), LoginOutcome::Success) => {
                // The account exists, and this is how its owner logs in.
                if self.distributed.is_some() && matches!(self.known_accounts.insert(store, user), Ok(true)) {
                    self.queue_known_account(user);
                }
                self.accounts
                    .update(store, user, now_ms, |a| {
                        // The owner on their own device is never a takeover,
                        // however many failures others caused on the account.
                        let owner = a.profile.is_known() && a.profile.looks_like_owner(&exchange.login_place);
                        let failures = if owner { 0.0 } else { login.account_failures(a, now_ms) };
                        // Only a success teaches the profile.
                        a.profile.learn(&exchange.login_place, now_ms);
                        ((failures, a.profile), true)
                    })
                    .map(|((f, profile), _)| {
                        self.queue_profile(user, profile);
                        f
                    })
                    .unwrap_or(0.0)
            }
            _ => 0.0,
        };
        if let (Some(d), Some(route), true) = (&self.distributed, exchange.login_route, outcome != LoginOutcome::Other) {
            let failed = outcome == LoginOutcome::Failure;
            // Best effort, all three: a lost update only delays recognition.
            if let (true, Some(pw), Some(user)) = (failed, exchange.password_key, username_hash) {
                let _ = self.sprays.update(store, pw, now_ms, |p| {
                    d.on_failed_password(p, user, now_ms);
                    ((), true)
                });
            }
            if let Some(fp) = exchange.tool_key {
                let _ = self.fingerprints.update(store, fp, now_ms, |f| {
                    d.on_fingerprint_outcome(f, failed, now_ms);
                    ((), true)
                });
            }
            let _ = self.endpoints.update(store, self.endpoint_key(route), now_ms, |e| {
                d.on_outcome(e, failed, exchange.account_unknown, now_ms);
                ((), true)
            });
        }
        let updated = self.clients.update(store, exchange.client_key, now_ms, |record| {
            if let Some(penalized) = self.penalized(record, now_ms) {
                return (penalized, false);
            }
            let mut signal = Signal::default();
            if let Some(login) = &self.login {
                // Suspected of stuffing, not merely risky: an office address
                // tagged for session churn still logs its people in.
                let suspected = record.recent_reasons.contains(Reason::CredentialStuffing);
                signal.add(login.observe(record, outcome, username_hash, account_failures, suspected, now_ms));
            }
            if let (true, Some(p)) = (not_found, &self.probing) {
                signal.add(p.on_not_found(record, exchange.path_hash, now_ms));
            }
            if let (true, Some(e)) = (object_answer, &self.enumeration) {
                signal.add(e.on_answer(record, status, now_ms));
            }
            if let (Some(kib), Some(sc)) = (volume, &self.scraping) {
                signal.add(sc.on_response(record, kib, now_ms));
            }
            (self.apply(record, signal, now_ms), true)
        });
        let mode = exchange.mode.unwrap_or(self.config.mode);
        let mut verdict = self.verdict(client, updated, mode, now_ms);
        verdict.agent = exchange.agent;
        verdict.on_response = true;
        if told {
            // What the application was told about this login, now that it
            // answered: for the access log and the stats.
            verdict.login_risk = self.login_risk(exchange).or_else(|| {
                let r = exchange.profile_risk?;
                Some(format!("low; score={}; reasons={}", r.score, r.all_names().collect::<Vec<_>>().join(",")))
            });
            verdict.profile_risk = exchange.profile_risk;
        }
        // Penalties found here were already handled by the request phase.
        (!verdict.penalized).then_some(verdict)
    }

    /// The user-agent tag that is part of the client's key (when configured).
    fn agent_of(&self, user_agent: Option<&str>) -> Option<u32> {
        if !self.config.client.key_by_user_agent {
            return None;
        }
        user_agent.map(crate::identity::agent_tag)
    }

    /// The key of a client's record: its address and, when configured, its
    /// user agent's tag (seeded, so nobody can aim at one shard).
    fn client_key(&self, client: ClientAddr, agent: Option<u32>) -> u64 {
        let mut bytes = [0u8; 21];
        let (addr, tag) = bytes.split_at_mut(17);
        addr.copy_from_slice(&client.key_bytes());
        match agent {
            Some(a) => tag.copy_from_slice(&a.to_le_bytes()),
            None => return self.hasher.key(DOMAIN_CLIENT, &client.key_bytes()),
        }
        self.hasher.key(DOMAIN_CLIENT, &bytes)
    }

    fn penalized(&self, record: &ClientRecord, now_ms: u64) -> Option<Outcome> {
        // Penalty box first: no counting, no detectors, no write.
        record.penalized_at(now_ms).then(|| Outcome::Penalized {
            reasons: record.penalty_reasons,
            until_ms: record.penalty_until_ms,
            risk: risk::decayed(record.risk, record.last_seen_ms, now_ms, self.half_life_ms),
        })
    }

    /// Adds a signal to the record's risk and decides on a block.
    fn apply(&self, record: &mut ClientRecord, signal: Signal, now_ms: u64) -> Outcome {
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
            match self.action_of(reason) {
                DetectorAction::Block => blocking += signal.part(reason),
                DetectorAction::Tag => tagging += signal.part(reason),
                DetectorAction::Shed if evidence => blocking += signal.part(reason),
                DetectorAction::Shed => shed = true,
                DetectorAction::Monitor => {}
            }
        }
        let mut risk = risk::add(decayed, blocking + tagging);
        if blocking <= 0.0 {
            // Tag-only signals never lift a client to block_at by themselves.
            let ceiling = (self.config.risk.block_at - 0.01).max(decayed);
            risk = risk.min(ceiling);
        }
        record.risk = risk;
        record.last_seen_ms = now_ms;
        record.recent_reasons = record.recent_reasons.union(signal.reasons);
        let mut blocked_until_ms = None;
        if risk >= self.config.risk.block_at && blocking > 0.0 {
            let until = now_ms.saturating_add(self.penalty_ms);
            record.penalty_until_ms = until;
            record.penalty_reasons = record.recent_reasons;
            blocked_until_ms = Some(until);
        }
        Outcome::Scored { risk, fired: signal.reasons, reasons: record.recent_reasons, blocked_until_ms, shed }
    }

    fn action_of(&self, reason: Reason) -> DetectorAction {
        self.actions.get(reason as usize).copied().unwrap_or(DetectorAction::Block)
    }

    fn verdict(
        &self,
        client: ClientAddr,
        updated: Result<(Outcome, UpdateStats), crate::store::UpdateFailed>,
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
            Outcome::Penalized { reasons, until_ms, risk } => {
                v.penalized = true;
                v.reasons = reasons;
                v.risk = risk;
                Some(until_ms)
            }
            Outcome::Scored { risk, fired, reasons, blocked_until_ms, shed } => {
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
            v.block(v.reasons.block_status(), until_ms.saturating_sub(now_ms).div_ceil(1000));
        }
        v
    }
}

fn decode_lease(value: Option<&[u8]>) -> (u64, u64) {
    let mut r = crate::codec::Reader::new(value.unwrap_or(&[]));
    (r.u64(), r.u64())
}

fn encode_lease(until_ms: u64, cursor: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut w = crate::codec::Writer::new(&mut out);
    w.u64(until_ms);
    w.u64(cursor);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use std::sync::Arc;

    const T0: u64 = 1_700_000_000_000;

    fn engine(json: &str) -> Engine {
        Engine::new(&Config::from_json(json.as_bytes()).unwrap(), &[7; SEED_BYTES]).unwrap()
    }

    fn request<'a>(peer: &'a str, xff: Option<&'a str>, path: &'a str) -> RequestFacts<'a> {
        RequestFacts {
            identity: IdentityInput {
                peer: Some(peer.as_bytes()),
                forwarded_for: xff.map(str::as_bytes),
                ..IdentityInput::default()
            },
            method: "GET",
            path,
            ..RequestFacts::default()
        }
    }

    const BLOCK: &str = r#"{"mode":"block",
        "client":{"trusted_proxies":["127.0.0.1"]},
        "route_groups":[{"name":"api","path_prefix":"/api/"}],
        "rate":{"limits":[{"route_group":"api","requests":5,"window_s":10}]},
        "penalty":{"duration_s":30},
        "actions":{"rate_limit":"block"},
        "state":{"shards":4,"slots_per_shard":16}}"#;

    #[test]
    fn by_default_a_rate_overflow_sheds_the_excess_and_penalizes_nobody() {
        let json = BLOCK.replace(r#""actions":{"rate_limit":"block"},"#, "");
        let (e, s) = (engine(&json), MemoryStore::new());
        e.table().create_shards(&s).unwrap();
        let r = request("192.0.2.1:5", None, "/api/x");
        let verdicts: Vec<Verdict> = (0..12).map(|i| e.on_request(&s, &r, T0 + i).0).collect();
        assert!(verdicts[..5].iter().all(|v| v.action == Action::Allow));
        for v in &verdicts[5..] {
            assert_eq!((v.action, v.status, v.retry_after_s, v.penalized, v.newly_blocked), (Action::Block, 429, 1, false, false));
            assert_eq!(v.reasons_header(), "rate_limit");
        }
        // Once the window has room again the client is served: no penalty box.
        let later = e.on_request(&s, &r, T0 + 20_001).0;
        assert_eq!(later.action, Action::Allow, "{later:?}");
        // With other evidence of abuse (a scanner), the overflow counts as a block.
        let mut scan = request("192.0.2.2:5", None, "/api/.env");
        scan.user_agent = Some("curl/8");
        let json = json.replace(r#""state""#, r#""probing":{"sensitive_weight":40},"state""#);
        let e = engine(&json);
        e.table().create_shards(&s).unwrap();
        let first = e.on_request(&s, &scan, T0).0;
        assert_eq!(first.action, Action::Tag);
        let mut clean = request("192.0.2.2:5", None, "/api/x");
        clean.user_agent = Some("curl/8");
        let mut last = first;
        for i in 1..8 {
            last = e.on_request(&s, &clean, T0 + i).0;
        }
        assert!(last.penalized || last.newly_blocked, "abuse evidence + overflow = penalty: {last:?}");
    }

    #[test]
    fn people_behind_one_address_are_judged_apart_by_user_agent() {
        let (e, s) = (engine(BLOCK), MemoryStore::new());
        e.table().create_shards(&s).unwrap();
        let mut flood = request("192.0.2.1:5", None, "/api/x");
        flood.user_agent = Some("wrk/4");
        for i in 0..10 {
            e.on_request(&s, &flood, T0 + i);
        }
        assert!(e.on_request(&s, &flood, T0 + 10).0.penalized, "the flooder is in the penalty box");
        let mut colleague = request("192.0.2.1:5", None, "/api/x");
        colleague.user_agent = Some("Mozilla/5.0 (X11; Linux x86_64) Firefox/133.0");
        let v = e.on_request(&s, &colleague, T0 + 11).0;
        assert_eq!(v.action, Action::Allow, "the person sharing its address is not");
        // Off: the address alone is the client.
        let off = engine(&BLOCK.replace(r#""client":{"#, r#""client":{"key_by_user_agent":false,"#));
        off.table().create_shards(&s).unwrap();
        for i in 0..10 {
            off.on_request(&s, &flood, T0 + 100 + i);
        }
        assert!(off.on_request(&s, &colleague, T0 + 111).0.penalized);
    }

    #[test]
    fn over_the_limit_blocks_then_penalty_holds_then_expires() {
        let (e, s) = (engine(BLOCK), MemoryStore::new());
        e.table().create_shards(&s).unwrap();
        let r = request("192.0.2.1:5", None, "/api/x");
        for i in 0..5 {
            let v = e.on_request(&s, &r, T0 + i).0;
            assert_eq!(v.action, Action::Allow, "request {i}");
        }
        let v = e.on_request(&s, &r, T0 + 10).0;
        assert_eq!((v.action, v.status, v.newly_blocked), (Action::Block, 429, true));
        assert_eq!(v.retry_after_s, 30);
        assert_eq!(v.reasons_header(), "rate_limit");
        // Still blocked 29 s later, from the penalty box, without detectors.
        let v = e.on_request(&s, &r, T0 + 29_500).0;
        assert_eq!((v.action, v.penalized, v.newly_blocked), (Action::Block, true, false));
        assert_eq!(v.retry_after_s, 1);
        // After the penalty the window has moved on.
        let v = e.on_request(&s, &r, T0 + 31_000).0;
        assert_eq!(v.action, Action::Tag, "risk still above tag_at: {}", v.risk);
        assert!(!v.would_block);
        // Other routes never counted.
        let v = e.on_request(&s, &request("192.0.2.9:5", None, "/health"), T0).0;
        assert_eq!(v.action, Action::Allow);
    }

    #[test]
    fn other_clients_are_unaffected() {
        let (e, s) = (engine(BLOCK), MemoryStore::new());
        e.table().create_shards(&s).unwrap();
        for i in 0..20 {
            e.on_request(&s, &request("127.0.0.1:1", Some("198.51.100.1"), "/api/x"), T0 + i);
        }
        let v = e.on_request(&s, &request("127.0.0.1:1", Some("198.51.100.2"), "/api/x"), T0 + 30).0;
        assert_eq!(v.action, Action::Allow);
        // The proxy itself is not the client.
        let v = e.on_request(&s, &request("127.0.0.1:1", None, "/api/x"), T0 + 30).0;
        assert_eq!(v.action, Action::Allow);
    }

    #[test]
    fn monitor_mode_never_blocks_but_says_so() {
        let json = BLOCK.replace(r#""mode":"block""#, r#""mode":"monitor""#);
        let (e, s) = (engine(&json), MemoryStore::new());
        e.table().create_shards(&s).unwrap();
        let r = request("192.0.2.1:5", None, "/api/x");
        let verdicts: Vec<Verdict> = (0..20).map(|i| e.on_request(&s, &r, T0 + i).0).collect();
        assert!(verdicts.iter().all(|v| v.action != Action::Block));
        assert_eq!(verdicts.iter().filter(|v| v.would_block).count(), 15);
        assert_eq!(verdicts.iter().filter(|v| v.newly_blocked).count(), 1);
    }

    #[test]
    fn counts_are_exact_across_concurrent_workers() {
        let json = BLOCK.replace(r#""requests":5"#, r#""requests":400"#);
        let e = Arc::new(engine(&json));
        let s = Arc::new(MemoryStore::new());
        e.table().create_shards(&*s).unwrap();
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (e, s) = (e.clone(), s.clone());
                std::thread::spawn(move || {
                    let verdicts: Vec<Verdict> = (0..200)
                        .map(|_| e.on_request(&*s, &request("192.0.2.1:5", None, "/api/x"), T0).0)
                        .collect();
                    let blocked = verdicts.iter().filter(|v| v.action == Action::Block).count();
                    let gave_up = verdicts.iter().filter(|v| v.store_failed).count();
                    (blocked, gave_up)
                })
            })
            .collect();
        let (blocked, gave_up) = threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .fold((0, 0), |acc, x| (acc.0 + x.0, acc.1 + x.1));
        assert_eq!(blocked, 0);
        // Updates that gave up (failed open) were not counted: exactly that
        // many more fit under the limit, and not one more.
        let r = request("192.0.2.1:5", None, "/api/x");
        for _ in 0..gave_up {
            assert_eq!(e.on_request(&*s, &r, T0).0.action, Action::Allow);
        }
        let v = e.on_request(&*s, &r, T0).0;
        assert_eq!(v.action, Action::Block, "the 401st request is over");
    }

    #[test]
    fn store_failure_fails_open() {
        let (e, s) = (engine(BLOCK), MemoryStore::new());
        e.table().create_shards(&s).unwrap();
        *s.forced_conflicts.lock().unwrap() = 10_000;
        let v = e.on_request(&s, &request("192.0.2.1:5", None, "/api/x"), T0).0;
        assert!(v.store_failed);
        assert_eq!(v.action, Action::Allow);
    }

    #[test]
    fn a_reload_keeps_the_penalty_box_and_the_counts() {
        let s = MemoryStore::new();
        let e1 = engine(BLOCK);
        assert!(e1.prepare_state(&s, T0).unwrap().summary().is_none(), "a first start is no change");
        for i in 0..6 {
            e1.on_request(&s, &request("192.0.2.1:5", None, "/api/x"), T0 + i);
        }
        for i in 0..3 {
            e1.on_request(&s, &request("192.0.2.2:5", None, "/api/x"), T0 + i);
        }
        assert!(e1.on_request(&s, &request("192.0.2.1:5", None, "/"), T0 + 10).0.penalized);

        // A threshold and an action change: same layout, nothing to migrate, all kept.
        let stricter = BLOCK.replace(r#""requests":5"#, r#""requests":4"#).replace(r#""penalty":{"duration_s":30}"#, r#""penalty":{"duration_s":60}"#);
        let e2 = engine(&stricter);
        let report = e2.prepare_state(&s, T0 + 20).unwrap();
        assert!(report.summary().is_none(), "{:?}", report.summary());
        assert!(e2.on_request(&s, &request("192.0.2.1:5", None, "/"), T0 + 30).0.penalized);
        // 192.0.2.2 had 3 requests in the window: the 4th is within 4, the 5th over.
        assert!(!e2.on_request(&s, &request("192.0.2.2:5", None, "/api/x"), T0 + 40).0.penalized);
        let v = e2.on_request(&s, &request("192.0.2.2:5", None, "/api/x"), T0 + 50).0;
        assert_eq!(v.action, Action::Block, "the count was forgotten: {v:?}");

        // Another window and half the shards: a real layout change.
        let other = stricter.replace(r#""window_s":10"#, r#""window_s":20"#).replace(r#""shards":4"#, r#""shards":2"#);
        let e3 = engine(&other);
        let report = e3.prepare_state(&s, T0 + 60).unwrap();
        let line = report.summary().unwrap();
        assert!(line.starts_with("clients: 4x16 -> 2x16 shards, kept 2, dropped 0"), "{line}");
        assert!(line.contains("reset [api/10s]"), "{line}");
        let v = e3.on_request(&s, &request("192.0.2.1:5", None, "/"), T0 + 70).0;
        assert!(v.penalized, "the penalty box was emptied by the reload");
        // The old configuration, still draining, does not overwrite the new shards.
        let refused = (0..10)
            .map(|i| e1.on_request(&s, &request(&format!("192.0.2.{}:5", 10 + i), None, "/"), T0 + 80).0)
            .filter(|v| v.store_failed && v.action == Action::Allow)
            .count();
        assert!(refused > 0, "the old layout wrote into the new shards");
        assert!(e3.on_request(&s, &request("192.0.2.1:5", None, "/"), T0 + 90).0.penalized);
        // Back to the first layout: carried over again.
        let e4 = engine(BLOCK);
        assert!(e4.prepare_state(&s, T0 + 100).unwrap().summary().unwrap().contains("kept 2"));
        assert!(e4.on_request(&s, &request("192.0.2.1:5", None, "/"), T0 + 110).0.penalized);
    }

    #[test]
    fn a_reload_that_reorders_login_routes_keeps_each_endpoints_state() {
        let s = MemoryStore::new();
        let one = engine(LOGIN);
        one.prepare_state(&s, T0).unwrap();
        let key = one.endpoint_key(0);
        one.endpoints
            .update(&s, key, T0, |e| {
                e.attack_until_ms = T0 + 60_000;
                ((), true)
            })
            .unwrap();
        assert!(one.login_under_attack(&s, T0 + 1));
        let two = engine(&LOGIN.replace(r#""login_routes":[{"path":"/login""#, r#""login_routes":[{"path":"/signin"},{"path":"/login""#));
        assert!(two.prepare_state(&s, T0 + 2).unwrap().summary().is_none());
        assert_eq!(two.endpoint_key(1), key, "/login is now the second route");
        assert!(two.login_under_attack(&s, T0 + 3), "the endpoint forgot the attack");
    }

    #[test]
    fn a_smaller_table_keeps_penalized_clients_before_idle_ones() {
        let s = MemoryStore::new();
        let big = engine(&BLOCK.replace(r#""slots_per_shard":16"#, r#""slots_per_shard":64"#).replace(r#""shards":4"#, r#""shards":1"#));
        big.prepare_state(&s, T0).unwrap();
        // 60 idle clients, and one in the penalty box.
        for i in 0..60u64 {
            big.on_request(&s, &request(&format!("198.51.100.{i}:5"), None, "/"), T0 + i);
        }
        for i in 0..6 {
            big.on_request(&s, &request("192.0.2.1:5", None, "/api/x"), T0 + 100 + i);
        }
        let small = engine(&BLOCK.replace(r#""slots_per_shard":16"#, r#""slots_per_shard":8"#).replace(r#""shards":4"#, r#""shards":1"#));
        let line = small.prepare_state(&s, T0 + 200).unwrap().summary().unwrap();
        assert!(line.starts_with("clients: 1x64 -> 1x8 shards, kept 8, dropped "), "{line}");
        assert!(small.on_request(&s, &request("192.0.2.1:5", None, "/"), T0 + 300).0.penalized);
    }

    #[test]
    fn a_burst_shorter_than_a_tick_is_recognised_inside_it() {
        let json = r#"{"mode":"block","client":{"trusted_proxies":["127.0.0.1"]},
            "route_groups":[{"name":"users","path_prefix":"/api/users/"}],
            "enumeration":{"enabled":false},
            "spikes":{"window_s":5,"factor":4,"min_rps":20,"min_client_requests":40,"client_share":0.2},
            "actions":{"endpoint_spike":"block"}}"#;
        let (e, s) = (engine(json), MemoryStore::new());
        e.create_state(&s).unwrap();
        assert_eq!(e.baselines_learning(&s), 1);
        // 30 s of ~8 requests/s from ten regular clients, ticking every 500 ms.
        let mut t = T0;
        for n in 0..240u64 {
            t += 125;
            let xff = format!("198.51.100.{}", 10 + n % 10);
            assert_eq!(e.on_request(&s, &request("127.0.0.1:1", Some(&xff), "/api/users/1"), t).0.action, Action::Allow);
            if n % 4 == 3 {
                e.on_tick(&s, t);
            }
        }
        assert_eq!(e.baselines_learning(&s), 0, "learned");
        // 600 requests in 60 ms: no tick happens during the burst.
        let flood = request("127.0.0.1:1", Some("203.0.113.250"), "/api/users/2");
        let verdicts: Vec<Verdict> = (0..600u64).map(|i| e.on_request(&s, &flood, t + i / 10).0).collect();
        let first = verdicts.iter().position(|v| v.action == Action::Block);
        assert!(first.is_some(), "blocked inside the burst");
        let first = first.unwrap();
        assert!(first <= 250, "recognised after {first} requests");
        assert!(verdicts[first].reasons.contains(Reason::EndpointSpike));
        assert!(verdicts[first..].iter().all(|v| v.action == Action::Block), "and held");
        // A regular client calling the endpoint during the spike is not charged.
        let regular = e.on_request(&s, &request("127.0.0.1:1", Some("198.51.100.10"), "/api/users/3"), t + 61).0;
        assert_eq!(regular.action, Action::Allow);
        // Steady traffic never merges early: the early threshold is far above a worker's share.
        let calm = Engine::new(&Config::from_json(json.as_bytes()).unwrap(), &[7; SEED_BYTES]).unwrap();
        let s2 = MemoryStore::new();
        calm.create_state(&s2).unwrap();
        let mut t = T0;
        for n in 0..400u64 {
            t += 125;
            let xff = format!("198.51.100.{}", 10 + n % 10);
            calm.on_request(&s2, &request("127.0.0.1:1", Some(&xff), "/api/users/1"), t);
            if n % 4 == 3 {
                calm.on_tick(&s2, t);
            }
        }
        // The CAS token counts the group shard's writes: creation + one per tick.
        let writes = s2.get("abuse_filter/v1/route_groups/0").unwrap().1.unwrap();
        assert_eq!(writes, 1 + 100, "one merge per tick, none early");
    }

    const LOGIN: &str = r#"{"mode":"block","client":{"trusted_proxies":["127.0.0.1"]},
        "credential_stuffing":{"login_routes":[{"path":"/login","failure_statuses":[401],"success_statuses":[200]}]}}"#;

    const BROWSER_NAMES: &str = ":authority,:path,:method,content-type,user-agent,accept,accept-language,accept-encoding";
    const CHROME: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36";

    /// One login attempt through every phase; returns (refused, login-risk header).
    fn login(e: &Engine, s: &MemoryStore, xff: &str, ua: &str, user: &str, ok: bool, t: u64) -> (bool, Option<String>) {
        let mut facts = request("127.0.0.1:1", Some(xff), "/login");
        facts.method = "POST";
        facts.user_agent = Some(ua);
        facts.header_names = Some(BROWSER_NAMES);
        // The GeoIP filter's country: real users here are in GB; the
        // attack's scattered addresses are everywhere.
        const ELSEWHERE: [&str; 6] = ["US", "BR", "IN", "VN", "DE", "NG"];
        facts.country = Some(if xff.starts_with("100.") { ELSEWHERE[t as usize % 6] } else { "GB" });
        let (v, mut ex) = e.on_request(s, &facts, t);
        if v.action == Action::Block {
            return (true, v.login_risk);
        }
        // A leaked list pairs each username with its own password.
        let body = format!(r#"{{"username":"{user}","password":"{}"}}"#, if ok { "right".to_string() } else { format!("Summer{t}!") });
        if let Some(refused) = e.on_request_body(s, &mut ex, body.as_bytes(), t) {
            return (refused.action == Action::Block, refused.login_risk);
        }
        let answer = e.on_response(s, &ex, if ok { 200 } else { 401 }, None, t + 5);
        (answer.is_some_and(|a| a.action == Action::Block), v.login_risk)
    }

    /// A login with valid credentials from `country`; returns (refused, the
    /// header the application got, the answer's verdict).
    fn valid_login(e: &Engine, s: &MemoryStore, xff: &str, ua: &str, country: &str, t: u64) -> (bool, Option<String>, Option<Verdict>) {
        let mut facts = request("127.0.0.1:1", Some(xff), "/login");
        facts.method = "POST";
        facts.user_agent = Some(ua);
        facts.header_names = Some(BROWSER_NAMES);
        facts.country = Some(country);
        let (v, mut ex) = e.on_request(s, &facts, t);
        assert_ne!(v.action, Action::Block);
        if let Some(refused) = e.on_request_body(s, &mut ex, br#"{"username":"owner@mail.example","password":"right"}"#, t) {
            return (refused.action == Action::Block, refused.login_risk, None);
        }
        let told = e.login_risk(&ex);
        (false, told, e.on_response(s, &ex, 200, None, t + 5))
    }

    const FIREFOX: &str = "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0";
    const IPHONE: &str = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1";

    /// The profile's part of a successful login's risk: (level, reasons).
    fn profile_part(answer: &Option<Verdict>) -> (&'static str, Vec<&'static str>) {
        match answer.as_ref().and_then(|a| a.profile_risk) {
            Some(r) => (r.level.name(), r.told_names().collect()),
            None => ("low", Vec::new()),
        }
    }

    #[test]
    fn a_takeover_with_the_right_password_is_told_to_the_application_and_the_owner_is_not() {
        let (e, s) = (engine(LOGIN), MemoryStore::new());
        e.create_state(&s).unwrap();
        let day = 86_400_000;
        // The owner logs in from home, in GB, on their laptop, for a week.
        for d in 0..7 {
            let (refused, _, answer) = valid_login(&e, &s, "81.2.69.142", CHROME, "GB", T0 + d * day);
            assert!(!refused);
            assert_eq!(profile_part(&answer), ("low", vec![]), "day {d}");
        }
        // A new phone at home: low, only a new device.
        let (_, told, answer) = valid_login(&e, &s, "81.2.69.143", IPHONE, "GB", T0 + 7 * day);
        assert_eq!(profile_part(&answer), ("low", vec!["new_device"]));
        assert!(!told.unwrap_or_default().starts_with("high"), "no step-up for a new phone at home");
        // The password used from another country on another browser.
        let (refused, told, answer) = valid_login(&e, &s, "175.16.199.1", FIREFOX, "CN", T0 + 8 * day);
        assert!(!refused, "tag by default: the application decides");
        assert_eq!(profile_part(&answer), ("high", vec!["new_country", "new_device"]));
        let told = told.unwrap();
        assert!(told.starts_with("high; ") && told.ends_with("new_country,new_device"), "{told}");
        let answer = answer.unwrap();
        assert_eq!(answer.login_risk.as_deref(), Some(told.as_str()), "the answer carries it to the access log");
        assert_ne!(answer.action, Action::Block);
        // Ten minutes after it the owner at home: another country than the
        // last success that soon is impossible travel, but the owner's
        // device at home is only medium.
        let (_, _, answer) = valid_login(&e, &s, "81.2.69.142", CHROME, "GB", T0 + 8 * day + 600_000);
        assert_eq!(profile_part(&answer), ("medium", vec!["impossible_travel"]));
    }

    #[test]
    fn the_device_is_the_clients_headers_not_the_proxys() {
        let e = engine(r#"{"geo":{"country_header":"x-geo-country","anonymous_headers":["x-geo-anon-vpn","x-geo-anon-tor"]}}"#);
        let a = e.client_header_shape("host,user-agent,accept,x-forwarded-proto,x-request-id,x-geo-anon-vpn,x-geo-anon-tor,x-geo-country");
        let b = e.client_header_shape("host,user-agent,accept,x-forwarded-proto,x-request-id,x-geo-country,x-geo-anon-tor,x-geo-anon-vpn");
        assert_eq!(a, "host,user-agent,accept");
        assert_eq!(a, b, "the GeoIP filter's order does not matter");
    }

    #[test]
    fn an_owners_trip_is_learned_and_an_operator_can_block_a_combination() {
        let config = r#"{"mode":"block","client":{"trusted_proxies":["127.0.0.1"]},
            "credential_stuffing":{"login_routes":[{"path":"/login","failure_statuses":[401],"success_statuses":[200]}]},
            "account_takeover":{"profile":{"block_when":[["new_country","new_device","anonymous_source"]]}}}"#;
        let (e, s) = (engine(config), MemoryStore::new());
        e.create_state(&s).unwrap();
        let day = 86_400_000;
        for d in 0..3 {
            valid_login(&e, &s, "81.2.69.142", CHROME, "GB", T0 + d * day);
        }
        // The owner travels (a day later, with their laptop): medium, let in, learned.
        let (refused, _, answer) = valid_login(&e, &s, "89.160.20.112", CHROME, "SE", T0 + 4 * day);
        assert!(!refused);
        assert_eq!(profile_part(&answer), ("medium", vec!["new_country"]));
        let (_, _, answer) = valid_login(&e, &s, "89.160.20.112", CHROME, "SE", T0 + 5 * day);
        assert_eq!(profile_part(&answer), ("low", vec![]), "the trip is in the profile now");
        // The owner behind a VPN abroad with their own laptop: not the combination.
        let (refused, _, _) = valid_login(&e, &s, "1.2.0.2", CHROME, "SE", T0 + 5 * day + 3_600_000);
        assert!(!refused);
        // A new country, a new device and a VPN: refused before the upstream.
        let mut facts = request("127.0.0.1:1", Some("1.2.0.1"), "/login");
        facts.method = "POST";
        facts.user_agent = Some(FIREFOX);
        facts.header_names = Some(BROWSER_NAMES);
        facts.country = Some("PH");
        facts.anonymous = true;
        let (v, mut ex) = e.on_request(&s, &facts, T0 + 6 * day);
        assert_ne!(v.action, Action::Block);
        let refused = e.on_request_body(&s, &mut ex, br#"{"username":"owner@mail.example","password":"right"}"#, T0 + 6 * day).unwrap();
        assert_eq!(refused.action, Action::Block);
        assert!(refused.reasons.contains(Reason::AccountTakeover));
        assert!(refused.login_risk.is_some_and(|r| r.contains("anonymous_source")));
        // Refused attempts teach the profile nothing: PH is still new.
        let (_, _, answer) = valid_login(&e, &s, "202.196.224.1", CHROME, "PH", T0 + 7 * day);
        assert_eq!(profile_part(&answer).1, vec!["new_country"]);
    }

    #[test]
    fn stuffing_disguised_as_browsers_is_refused_and_real_users_are_not() {
        let (e, s) = (engine(LOGIN), MemoryStore::new());
        e.create_state(&s).unwrap();
        let mut t = T0;
        // A live site: 100 people log in (a cold start: every first login is
        // to an account the filter does not know yet), then two hours of
        // their repeat logins, one every 2 s, ~23 % after a typo, each user
        // from their own address with the common browser the attacker will copy.
        for i in 0..3700u64 {
            t += if i < 100 { 500 } else { 2_000 };
            let (xff, user) = (format!("198.51.{}.{}", i % 100 / 50, i % 50 + 1), format!("user{:04}", i % 100));
            if i % 13 < 3 {
                login(&e, &s, &xff, CHROME, &user, false, t);
            }
            t += 100;
            assert!(!login(&e, &s, &xff, CHROME, &user, true, t).0, "real login {i}");
        }
        // Only now do unknown accounts count as evidence (the learned
        // share of real logins to unknown accounts fell below 1 in 4).
        let ep = e.endpoints.peek(&s, e.endpoint_key(0)).unwrap().unwrap();
        assert!(e.distributed.as_ref().unwrap().unknown_is_evidence(&ep), "{ep:?}");
        // 600 addresses, 1-3 tries each, the same browser, a leaked list of
        // which one in ten names a real account; real users keep logging in.
        let (mut attempts, mut refused_after, mut later, mut recognised_at) = (0u32, 0u32, 0u32, None);
        let (mut real_refused, mut first_timers_refused) = (0, 0);
        for a in 0..600u64 {
            for k in 0..(1 + a % 3) {
                t += 60;
                let user = if (a + k) % 10 == 0 { format!("user{:04}", (a + k) % 100) } else { format!("leak{a}x{k}@mail.example") };
                let (refused, _) = login(&e, &s, &format!("100.{}.{}.{}", 64 + a % 50, a / 50, k + 1), CHROME, &user, false, t);
                attempts += 1;
                if recognised_at.is_none() && e.login_under_attack(&s, t) {
                    recognised_at = Some(attempts);
                }
                if recognised_at.is_some_and(|r| attempts > r) {
                    later += 1;
                    refused_after += u32::from(refused);
                }
            }
            if a % 10 == 0 {
                // A real user logging in from their usual browser, a new address.
                let u = a / 10 % 100;
                let (refused, _) = login(&e, &s, &format!("198.51.100.{}", u + 1), CHROME, &format!("user{u:04}"), true, t);
                real_refused += usize::from(refused);
            }
            if a % 50 == 25 {
                // A person logging in for the first time, after browsing.
                let xff = format!("198.51.101.{}", a / 50 + 1);
                let mut browse = request("127.0.0.1:1", Some(&xff), "/products");
                browse.user_agent = Some(CHROME);
                e.on_request(&s, &browse, t);
                let (refused, risk) = login(&e, &s, &xff, CHROME, &format!("newbie{a}"), true, t + 1);
                first_timers_refused += usize::from(refused);
                // The request header knows what the request tells (the
                // account comes with the body): the app can step up.
                if e.login_under_attack(&s, t) {
                    assert!(risk.is_some_and(|r| r.contains("endpoint_under_attack")), "told, not refused");
                }
            }
        }
        assert!(recognised_at.is_some(), "recognised");
        let recognised_at = recognised_at.unwrap_or(u32::MAX);
        assert!(recognised_at <= 200, "recognised at attempt {recognised_at}");
        let share = f64::from(refused_after) / f64::from(later);
        assert!(share >= 0.95, "{refused_after} of {later} later attempts refused");
        assert_eq!(real_refused, 0, "real users logging into their own accounts");
        assert_eq!(first_timers_refused, 0, "first-time logins after browsing");
    }

    #[test]
    fn after_a_cold_start_an_early_attack_is_recognised() {
        let (e, s) = (engine(LOGIN), MemoryStore::new());
        e.create_state(&s).unwrap();
        let mut t = T0;
        for i in 0..20u64 {
            t += 1000;
            login(&e, &s, &format!("198.51.100.{}", i + 1), CHROME, &format!("user{i:04}"), i % 5 != 0, t);
        }
        assert_eq!(e.baselines_learning(&s), 1, "still learning, and says so");
        let mut recognised_at = None;
        for a in 0..300u64 {
            t += 250;
            login(&e, &s, &format!("100.64.{}.{}", a / 200, a % 200 + 1), CHROME, &format!("leak{a}"), false, t);
            if recognised_at.is_none() && e.login_under_attack(&s, t) {
                recognised_at = Some(a + 1);
            }
        }
        assert!(recognised_at.is_some_and(|a| a <= 200), "{recognised_at:?}");
    }

    proptest::proptest! {
        /// Whatever a client sends, every phase of the engine answers
        /// without panicking and keeps the risk finite.
        #[test]
        fn arbitrary_requests_never_panic(
            peer in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..60),
            xff in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            path in ".{0,120}",
            ua in ".{0,80}",
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            status in 0u32..1000,
            cookie in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..100),
            auth in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..100),
        ) {
            let config = r#"{"mode":"block","client":{"trusted_proxies":["0.0.0.0/0","::/0"],
                "session_cookie":"s","jwt_claim":"sub","api_key_header":"x-api-key"},
                "route_groups":[{"name":"all","path_prefix":"/"}],
                "credential_stuffing":{"login_routes":[{"path":"/login"}]},
                "scraping":{"max_kib_per_window":1},
                "scorer":{"enabled":true},
                "state":{"shards":2,"slots_per_shard":8}}"#;
            let e = engine(config);
            let s = MemoryStore::new();
            e.create_state(&s).unwrap();
            for (i, method) in ["GET", "POST"].iter().enumerate() {
                let path = if i == 1 { "/login" } else { path.as_str() };
                let facts = RequestFacts {
                    identity: IdentityInput {
                        peer: Some(&peer),
                        forwarded_for: Some(&xff),
                        api_key: Some(&cookie),
                        cookie: Some(&cookie),
                        authorization: Some(&auth),
                    },
                    method,
                    path,
                    user_agent: Some(ua.as_str()),
                    header_names: Some(ua.as_str()),
                    asn: Some(ua.as_str()),
                    country: Some(ua.as_str()),
                    anonymous: i == 0,
                    ja4: Some(ua.as_str()),
                };
                let (v, mut ex) = e.on_request(&s, &facts, T0 + i as u64);
                proptest::prop_assert!(v.risk.is_finite());
                let _ = e.on_request_body(&s, &mut ex, &body, T0 + 4);
                let _ = e.score_request_body(&ex);
                let _ = e.on_response(&s, &ex, status, Some(status), T0 + 5);
                let _ = e.on_score_answer(&s, &ex, crate::callout::parse_answer(Some(status), &body), T0 + 6);
                let _ = e.waiting_verdict(&s, &ex, T0, T0 + 7);
                let _ = e.apply_fleet_verdicts(&s, &body, T0 + 8);
                e.on_tick(&s, T0 + 9);
            }
        }
    }
}
