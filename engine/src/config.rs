//! The plugin configuration: what operators write in the Envoy Wasm filter's
//! `configuration` (JSON). Every key has a safe default, unknown keys are
//! refused, and every value is range-checked so that a typo never turns into a
//! silently different policy. Errors name the key (`rate.limits[0].requests`).

use ipnet::IpNet;
use serde::Deserialize;
use std::fmt;
use std::net::IpAddr;

/// Most route groups an operator may declare (each costs a prefix match per request).
pub const MAX_ROUTE_GROUPS: usize = 32;
/// Most rate limits; each one owns a window in every client record.
pub const MAX_RATE_LIMITS: usize = 4;
/// Largest plugin configuration accepted (the shipped one is 1.6 KiB).
pub const MAX_CONFIG_BYTES: usize = 256 * 1024;
/// Longest address lists: `client.trusted_proxies`, `good_bots[].cidrs`.
pub const MAX_PROXY_CIDRS: usize = 256;
/// Longest allowlists: `allowlist.cidrs`, `allowlist.api_keys`.
pub const MAX_ALLOWLIST: usize = 4096;
pub const MAX_GOOD_BOTS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Record, tag and count what block mode would do, but never block.
    #[default]
    Monitor,
    /// Block clients whose risk reaches `risk.block_at`.
    Block,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub mode: Mode,
    pub client: ClientConfig,
    pub route_groups: Vec<RouteGroup>,
    pub rate: RateConfig,
    pub risk: RiskConfig,
    pub penalty: PenaltyConfig,
    pub headers: HeadersConfig,
    pub state: StateConfig,
    /// One JSON log line each time a client is blocked (or would be).
    pub log_blocks: bool,
    pub allowlist: Allowlist,
    pub good_bots: Vec<GoodBot>,
    pub credential_stuffing: CredentialStuffingConfig,
    pub account_takeover: AccountTakeoverConfig,
    pub enumeration: EnumerationConfig,
    pub probing: ProbingConfig,
    pub scraping: crate::detectors::scraping::ScrapingConfig,
    pub sessions: SessionConfig,
    pub spikes: SpikeConfig,
    pub scorer: ScorerConfig,
    pub geo: GeoConfig,
    /// Per-reason action (`"anonymous_network": "tag"`); reasons not listed block.
    pub actions: std::collections::BTreeMap<String, DetectorAction>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: Mode::Monitor,
            client: ClientConfig::default(),
            route_groups: Vec::new(),
            rate: RateConfig::default(),
            risk: RiskConfig::default(),
            penalty: PenaltyConfig::default(),
            headers: HeadersConfig::default(),
            state: StateConfig::default(),
            log_blocks: true,
            allowlist: Allowlist::default(),
            good_bots: Vec::new(),
            credential_stuffing: CredentialStuffingConfig::default(),
            account_takeover: AccountTakeoverConfig::default(),
            enumeration: EnumerationConfig::default(),
            probing: ProbingConfig::default(),
            scraping: crate::detectors::scraping::ScrapingConfig::default(),
            sessions: SessionConfig::default(),
            spikes: SpikeConfig::default(),
            scorer: ScorerConfig::default(),
            geo: GeoConfig::default(),
            actions: std::collections::BTreeMap::new(),
        }
    }
}

/// How a client is identified.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct ClientConfig {
    /// CIDRs of proxies/load balancers whose `X-Forwarded-For` is believed.
    /// Empty (the default) means XFF is never believed.
    pub trusted_proxies: Vec<String>,
    /// How many proxies append to XFF in front of Envoy: the client is the
    /// `trusted_hops`-th address from the right.
    pub trusted_hops: u32,
    pub forwarded_for_header: String,
    /// IPv6 clients are grouped by this prefix length (a /64 is one subscriber).
    pub ipv6_prefix_len: u8,
    /// Header carrying an API key, if the API uses one.
    pub api_key_header: Option<String>,
    /// Name of the session cookie, if the API uses one.
    pub session_cookie: Option<String>,
    /// Claim of the `Authorization: Bearer` JWT naming the subject (decoded, not verified).
    pub jwt_claim: Option<String>,
    /// A client is its address *and* its user agent: the people behind one
    /// office or carrier NAT are judged apart, so one of them abusing the
    /// API is stopped without stopping the others.
    pub key_by_user_agent: bool,
    /// Header that Envoy's `header_mutation` filter, placed before this
    /// one, fills with the peer address and the request's start time
    /// (value `%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %START_TIME(%s%3f)%
    /// %TLS_JA4_FINGERPRINT%`, append_action OVERWRITE_IF_EXISTS_OR_ADD):
    /// read in the header map instead of two host calls (`source.address`,
    /// the clock). Only set it when that filter is in place, or a client
    /// could name its own address. Unset: the host calls.
    pub facts_header: Option<String>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            trusted_proxies: Vec::new(),
            trusted_hops: 1,
            forwarded_for_header: "x-forwarded-for".to_string(),
            ipv6_prefix_len: 64,
            api_key_header: None,
            session_cookie: None,
            jwt_claim: None,
            key_by_user_agent: true,
            facts_header: None,
        }
    }
}

/// A named part of the API: a path prefix and optionally some methods.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RouteGroup {
    pub name: String,
    pub path_prefix: String,
    /// Empty means every method.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Overrides the global `mode` for requests on this group (e.g. try a
    /// stricter policy in monitor mode on one route first).
    #[serde(default)]
    pub mode: Option<Mode>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct RateConfig {
    pub enabled: bool,
    pub limits: Vec<RateLimit>,
}

impl Default for RateConfig {
    fn default() -> Self {
        // Generous on purpose: a NATed office of 100 people behind one
        // address, or a partner at 50 requests/s, stays below 100/s.
        RateConfig {
            enabled: true,
            limits: vec![RateLimit {
                route_group: None,
                requests: 6000,
                window_s: 60,
                weight: 100.0,
                anonymous_only: false,
            }],
        }
    }
}

/// At most `requests` per client in any sliding `window_s`, on `route_group`
/// (all requests when absent).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    #[serde(default)]
    pub route_group: Option<String>,
    pub requests: u32,
    pub window_s: u32,
    /// Risk added for each request over the limit.
    #[serde(default = "default_weight")]
    pub weight: f32,
    /// Count only requests without credentials (no `Authorization`, no API
    /// key header, no session cookie): a tight limit for anonymous floods
    /// that logged-in users behind one NAT address never share.
    #[serde(default)]
    pub anonymous_only: bool,
}

fn default_weight() -> f32 {
    100.0
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct RiskConfig {
    /// Risk at which a client is blocked (or would be, in monitor mode).
    pub block_at: f32,
    /// Risk at which a client's requests are tagged for the upstream.
    pub tag_at: f32,
    /// Risk halves every `half_life_s` seconds without new signals.
    pub half_life_s: u32,
}

impl Default for RiskConfig {
    fn default() -> Self {
        RiskConfig {
            block_at: 100.0,
            tag_at: 30.0,
            half_life_s: 300,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct PenaltyConfig {
    /// How long a blocked client stays blocked.
    pub duration_s: u32,
}

impl Default for PenaltyConfig {
    fn default() -> Self {
        PenaltyConfig { duration_s: 60 }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct HeadersConfig {
    /// Add risk headers to requests forwarded upstream.
    pub enabled: bool,
    pub score: String,
    pub reasons: String,
    /// On login routes: the login's risk as far as the request tells
    /// (`high; reasons=…`), for the application to step up (MFA).
    pub login_risk: String,
}

impl Default for HeadersConfig {
    fn default() -> Self {
        HeadersConfig {
            enabled: true,
            score: "x-abuse-score".to_string(),
            reasons: "x-abuse-reasons".to_string(),
            login_risk: "x-abuse-login-risk".to_string(),
        }
    }
}

/// Size of the shared per-client state: `shards * slots_per_shard` client
/// records, fixed at start whatever the traffic.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    pub shards: u32,
    pub slots_per_shard: u32,
    /// Clients each worker keeps in its own view between merges into shared
    /// data (fixed memory, ~0.8 KiB each); 0 = none, every request goes to
    /// shared data (see "State tiers" in the README).
    pub worker_clients: u32,
    /// A worker's view of a client is at most this old when a request uses
    /// it, so a penalty decided on one worker reaches every worker within it.
    pub worker_sync_ms: u32,
}

impl Default for StateConfig {
    fn default() -> Self {
        // 2048 x 16 = 32768 clients; a request that goes to shared data
        // copies one 5 KiB shard.
        StateConfig {
            shards: 2048,
            slots_per_shard: 16,
            // Enough for 10,000 clients active on one worker within 2T
            // (`make bench`): ~12 MiB per worker, fixed.
            worker_clients: 16_384,
            worker_sync_ms: 1000,
        }
    }
}

/// Clients that are never judged: no state, no detectors, no blocks.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct Allowlist {
    pub cidrs: Vec<String>,
    pub api_keys: Vec<String>,
}

/// A declared crawler: its user agent contains `user_agent` AND it comes from
/// one of `cidrs` (a user agent alone is forgeable). Exempt from probing and
/// enumeration; rate limits still apply.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct GoodBot {
    pub name: String,
    pub user_agent: String,
    pub cidrs: Vec<String>,
}

/// A login endpoint and how to read its outcome.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct LoginRoute {
    /// Exact path (query ignored).
    pub path: String,
    #[serde(default = "default_post")]
    pub method: String,
    /// JSON field or form field holding the username.
    #[serde(default = "default_username_field")]
    pub username_field: String,
    /// JSON field or form field holding the password (hashed with a rotating
    /// key for spray detection; never stored or logged).
    #[serde(default = "default_password_field")]
    pub password_field: String,
    #[serde(default = "default_failure_statuses")]
    pub failure_statuses: Vec<u32>,
    #[serde(default = "default_success_statuses")]
    pub success_statuses: Vec<u32>,
}

fn default_password_field() -> String {
    "password".to_string()
}

fn default_post() -> String {
    "POST".to_string()
}
fn default_username_field() -> String {
    "username".to_string()
}
fn default_failure_statuses() -> Vec<u32> {
    vec![401, 403]
}
fn default_success_statuses() -> Vec<u32> {
    vec![200]
}

/// Failed logins per client, distinct usernames a client fails on
/// (stuffing, spraying), and failures per account across all clients.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct CredentialStuffingConfig {
    pub enabled: bool,
    pub login_routes: Vec<LoginRoute>,
    pub window_s: u32,
    pub max_failures_per_client: u32,
    pub max_usernames_per_client: u32,
    pub max_failures_per_account: u32,
    pub weight: f32,
    /// Login bodies longer than this are not read (the request still passes).
    pub max_body_bytes: u32,
    /// Hold a login request's headers until its body was read, so the
    /// login-risk header carries the account-level evidence and a refused
    /// attempt never reaches the upstream at all. Needs
    /// `allow_on_headers_stop_iteration: true` in the Wasm filter's Envoy
    /// config (Envoy >= 1.35); without it the filter releases held headers
    /// on its next tick (<= 0.5 s) and logs a warning.
    pub hold_login_headers: bool,
    pub distributed: DistributedStuffingConfig,
}

/// Recognising an attack spread over many addresses from the login
/// endpoint's failure ratio (see `detectors::distributed_stuffing`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct DistributedStuffingConfig {
    pub enabled: bool,
    pub window_s: u32,
    /// Attempts in the window before the ratio is judged.
    pub min_attempts: u32,
    /// Failure ratio assumed before any traffic was seen, and the fixed
    /// baseline while the real one is learned (an attack cannot drag it).
    pub baseline_prior: f32,
    /// Attack when the ratio exceeds `attack_factor` x baseline...
    pub attack_factor: f32,
    /// ...and at least this ratio.
    pub attack_min_ratio: f32,
    /// How long the endpoint stays "under attack" after the last sign of it.
    pub hold_s: u32,
    /// A client with more requests than this, or any successful login, is not "new".
    pub new_client_max_requests: u32,
    /// During an attack, an attempt whose evidence adds up to this is
    /// refused before it reaches the upstream (see the detector's doc).
    pub refuse_at: u32,
    /// Successful logins the known-accounts table must have learned before
    /// "unknown account" counts as evidence (0: from the first).
    pub known_accounts_min: u32,
    /// Also an attack: more than this share of the window's attempts are
    /// on accounts not known to exist (once the baseline and the known
    /// accounts have learned; 1 turns this off).
    pub attack_unknown_share: f32,
    /// One password failing on this many accounts in the window is a spray.
    pub spray_min_accounts: u32,
    /// Risk added to a client per refused attempt (two refusals reach the
    /// default `block_at`: one refused attempt never boxes a person).
    pub weight: f32,
}

impl Default for DistributedStuffingConfig {
    fn default() -> Self {
        DistributedStuffingConfig {
            enabled: true,
            window_s: 60,
            min_attempts: 20,
            baseline_prior: 0.2,
            attack_factor: 2.5,
            attack_min_ratio: 0.25,
            hold_s: 300,
            new_client_max_requests: 5,
            refuse_at: 4,
            known_accounts_min: 20,
            attack_unknown_share: 0.6,
            spray_min_accounts: 5,
            weight: 50.0,
        }
    }
}

/// Spikes of a route group's traffic over its own baseline (see `detectors::spike`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct SpikeConfig {
    pub enabled: bool,
    pub window_s: u32,
    /// A spike is a rate above `factor` x the baseline...
    pub factor: f32,
    /// ...and above this many requests per second.
    pub min_rps: f32,
    pub hold_s: u32,
    /// Share of the group's requests that makes a client a driver of the spike.
    pub client_share: f32,
    pub min_client_requests: u32,
    pub weight: f32,
}

impl Default for SpikeConfig {
    fn default() -> Self {
        SpikeConfig {
            enabled: true,
            window_s: 10,
            factor: 5.0,
            min_rps: 20.0,
            hold_s: 60,
            client_share: 0.1,
            min_client_requests: 50,
            weight: 100.0,
        }
    }
}

/// What to do when the scorer cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Let the request through on the filter's own decision.
    #[default]
    FailOpen,
    /// Block the borderline request.
    FailClosed,
}

/// What a client's other requests do while its callout is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Concurrent {
    /// Go on with the filter's own decision.
    #[default]
    Proceed,
    /// Wait (up to the timeout) for the answer and share it.
    Wait,
}

/// The scoring service for borderline clients (see `callout`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct ScorerConfig {
    pub enabled: bool,
    /// Envoy cluster of the scorer.
    pub cluster: String,
    pub authority: String,
    /// Borderline band: `[ask_at, risk.block_at)`.
    pub ask_at: f32,
    pub timeout_ms: u32,
    pub failure_mode: FailureMode,
    pub concurrent: Concurrent,
    /// Shared secret sent in `x-abuse-scorer-secret`...
    pub secret: Option<String>,
    /// ...or the environment variable holding it (expose it to the VM with
    /// `vm_config.environment_variables.host_env_keys`).
    pub secret_env: Option<String>,
    /// Consecutive failures that open the circuit breaker.
    pub breaker_failures: u32,
    pub breaker_cooldown_s: u32,
    /// Longest a scorer verdict is cached, whatever TTL it asks for.
    pub max_ttl_s: u32,
    /// Pull blocks decided anywhere in the fleet, every `fleet_poll_s`.
    pub fleet_verdicts: bool,
    pub fleet_poll_s: u32,
    /// Each worker sends the scorer, on its tick, what the fleet should
    /// learn (known accounts, baselines), batched: never on a request's path.
    pub events: bool,
    /// At start, warm the known accounts and baselines from the scorer (one
    /// worker per Envoy), so a restart is not a cold, poisonable start.
    pub warm_start: bool,
}

impl Default for ScorerConfig {
    fn default() -> Self {
        ScorerConfig {
            enabled: false,
            cluster: "abuse_scorer".to_string(),
            authority: "abuse-scorer".to_string(),
            ask_at: 50.0,
            timeout_ms: 50,
            failure_mode: FailureMode::FailOpen,
            concurrent: Concurrent::Proceed,
            secret: None,
            secret_env: None,
            breaker_failures: 5,
            breaker_cooldown_s: 10,
            max_ttl_s: 300,
            fleet_verdicts: true,
            events: true,
            warm_start: true,
            fleet_poll_s: 2,
        }
    }
}

/// Anomalous sessions (see `detectors::session`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    pub enabled: bool,
    pub window_s: u32,
    /// Addresses one session may use in the window (phone on Wi-Fi and LTE, laptop, ...).
    pub max_addresses: u32,
    pub max_user_agents: u32,
    pub max_sessions_per_client: u32,
    /// A session seen at home less than this long ago cannot be in another country.
    pub min_travel_s: u32,
    pub weight: f32,
    pub churn_weight: f32,
    pub travel_weight: f32,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            enabled: true,
            window_s: 600,
            max_addresses: 4,
            max_user_agents: 3,
            max_sessions_per_client: 30,
            min_travel_s: 3600,
            weight: 100.0,
            churn_weight: 40.0,
            travel_weight: 100.0,
        }
    }
}

/// Headers set by Envoy's GeoIP filter (`envoy.filters.http.geoip`) in
/// front of this one; name them as in its `geo_headers_to_add`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct GeoConfig {
    pub country_header: Option<String>,
    pub asn_header: Option<String>,
    /// Headers whose value `true` marks an anonymous network (VPN, Tor, hosting, proxy).
    pub anonymous_headers: Vec<String>,
    /// Risk per request from an anonymous network (`anonymous_network` tags by default).
    pub anonymous_weight: f32,
}

impl Default for GeoConfig {
    fn default() -> Self {
        GeoConfig { country_header: None, asn_header: None, anonymous_headers: Vec::new(), anonymous_weight: 30.0 }
    }
}

/// What a detector's signal may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum DetectorAction {
    /// Adds its weight to the risk; can block.
    Block,
    /// Adds its weight but can never, alone, lift the risk to `block_at`.
    Tag,
    /// Counted and shown in stats and reasons; adds no risk.
    Monitor,
    /// Refuses this one request (429) and adds no risk: for volume, where
    /// the excess is shed and the penalty box is kept for abuse evidence.
    /// With other blocking evidence on the client, counts as `block`.
    Shed,
}

impl Default for CredentialStuffingConfig {
    fn default() -> Self {
        // A user who mistypes a few times, or an office of 100 behind one
        // address logging in each morning, stays well below these.
        CredentialStuffingConfig {
            enabled: true,
            login_routes: Vec::new(),
            window_s: 600,
            max_failures_per_client: 10,
            max_usernames_per_client: 5,
            max_failures_per_account: 20,
            weight: 100.0,
            max_body_bytes: 8192,
            hold_login_headers: false,
            distributed: DistributedStuffingConfig::default(),
        }
    }
}

/// A successful login to an account that just had many failures, or by a
/// client already suspected of stuffing.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct AccountTakeoverConfig {
    pub enabled: bool,
    /// Failures on the account (within the stuffing window) that make a success suspicious.
    pub min_account_failures: u32,
    pub weight: f32,
    /// Takeover with valid credentials: each login compared with its
    /// account's profile (see `detectors::login_profile`).
    pub profile: crate::detectors::login_profile::LoginProfileConfig,
}

impl Default for AccountTakeoverConfig {
    fn default() -> Self {
        AccountTakeoverConfig {
            enabled: true,
            min_account_failures: 5,
            weight: 100.0,
            profile: crate::detectors::login_profile::LoginProfileConfig::default(),
        }
    }
}

/// Iterating through object ids (BOLA, harvesting).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct EnumerationConfig {
    pub enabled: bool,
    /// Path templates whose `{...}` segment is an object id, e.g. `/api/users/{id}`.
    pub object_routes: Vec<String>,
    /// Also treat numeric, UUID and long hex path segments as object ids.
    pub auto_normalize: bool,
    pub window_s: u32,
    pub max_distinct_ids: u32,
    /// Consecutive ids (n, n+1, n+2, ...) in a row.
    pub max_sequential_run: u32,
    /// Share of 404/403 answers on object routes, once `min_requests` were made.
    pub max_miss_ratio: f32,
    pub min_requests: u32,
    pub weight: f32,
}

impl Default for EnumerationConfig {
    fn default() -> Self {
        EnumerationConfig {
            enabled: true,
            object_routes: Vec::new(),
            auto_normalize: true,
            window_s: 60,
            max_distinct_ids: 100,
            max_sequential_run: 15,
            max_miss_ratio: 0.5,
            min_requests: 10,
            weight: 100.0,
        }
    }
}

/// Forced browsing, sensitive files, scanner tools.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct ProbingConfig {
    pub enabled: bool,
    pub window_s: u32,
    /// Distinct paths answered 404 per client per window.
    pub max_not_found_paths: u32,
    pub weight: f32,
    /// Case-insensitive path substrings that only probes ask for.
    pub sensitive_paths: Vec<String>,
    pub sensitive_weight: f32,
    /// Case-insensitive user-agent substrings of attack tools.
    pub scanner_user_agents: Vec<String>,
    pub scanner_weight: f32,
}

impl Default for ProbingConfig {
    fn default() -> Self {
        let list = |items: &[&str]| items.iter().map(|s| s.to_string()).collect();
        ProbingConfig {
            enabled: true,
            window_s: 60,
            max_not_found_paths: 20,
            weight: 100.0,
            sensitive_paths: list(&[
                "/.env", "/.git/", "/.svn/", "/.htaccess", "/.htpasswd", "/.aws/", "/.ssh/",
                "/wp-login.php", "/wp-admin", "/xmlrpc.php", "/phpmyadmin", "/server-status",
                "/config.php", "/web.config", "/.ds_store", "/backup.zip", "/backup.sql",
                "/dump.sql", "/db.sql", ".bak", "/etc/passwd", "/actuator/env", "/cgi-bin/",
            ]),
            sensitive_weight: 60.0,
            scanner_user_agents: list(&[
                "sqlmap", "nikto", "hydra", "ffuf", "gobuster", "dirbuster", "wfuzz", "nmap",
                "masscan", "zgrab", "nuclei", "acunetix", "nessus", "openvas", "w3af", "arachni",
                "feroxbuster", "dirb/", "whatweb", "wpscan", "jaeles", "burpcollaborator",
            ]),
            scanner_weight: 100.0,
        }
    }
}

/// A configuration problem, naming the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration: key `{}`: {}", self.key, self.problem)
    }
}

impl std::error::Error for ConfigError {}

pub(crate) fn err(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        problem: problem.into(),
    }
}

pub(crate) fn check_range<T: PartialOrd + fmt::Display + Copy>(
    key: &str,
    value: T,
    min: T,
    max: T,
) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(err(key, format!("{value} is out of range [{min}, {max}]")));
    }
    Ok(())
}

/// A list the configuration may hold at most `max` entries of.
fn check_list(key: &str, len: usize, max: usize) -> Result<(), ConfigError> {
    if len > max {
        return Err(err(key, format!("at most {max} entries, got {len}")));
    }
    Ok(())
}

pub(crate) fn check_header_name(key: &str, name: &str) -> Result<(), ConfigError> {
    let valid = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !valid {
        return Err(err(
            key,
            format!("{name:?} is not a lowercase HTTP header name"),
        ));
    }
    Ok(())
}

impl Config {
    /// Parses and validates the plugin configuration. An empty configuration
    /// means all defaults.
    pub fn from_json(bytes: &[u8]) -> Result<Config, ConfigError> {
        if bytes.len() > MAX_CONFIG_BYTES {
            return Err(err("(root)", format!("configuration is {} bytes, at most {MAX_CONFIG_BYTES}", bytes.len())));
        }
        let trimmed = std::str::from_utf8(bytes)
            .map_err(|_| err("(root)", "configuration is not UTF-8"))?
            .trim();
        if trimmed.is_empty() {
            let config = Config::default();
            config.validate()?;
            return Ok(config);
        }
        let mut de = serde_json::Deserializer::from_str(trimmed);
        let config: Config = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let key = if path == "." { "(root)".to_string() } else { path };
            // serde_json appends " at line L column C": keep it, it helps.
            err(key, e.into_inner().to_string())
        })?;
        de.end()
            .map_err(|e| err("(root)", format!("trailing characters: {e}")))?;
        config.validate()?;
        Ok(config)
    }

    /// Range and consistency checks that types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let c = &self.client;
        check_list("client.trusted_proxies", c.trusted_proxies.len(), MAX_PROXY_CIDRS)?;
        for (i, cidr) in c.trusted_proxies.iter().enumerate() {
            parse_cidr(cidr).map_err(|p| err(format!("client.trusted_proxies[{i}]"), p))?;
        }
        check_range("client.trusted_hops", c.trusted_hops, 1, 10)?;
        check_header_name("client.forwarded_for_header", &c.forwarded_for_header)?;
        check_range("client.ipv6_prefix_len", c.ipv6_prefix_len, 32, 128)?;
        if let Some(h) = &c.api_key_header {
            check_header_name("client.api_key_header", h)?;
        }
        if let Some(h) = &c.facts_header {
            check_header_name("client.facts_header", h)?;
        }
        if let Some(name) = &c.session_cookie {
            if name.is_empty() || name.len() > 128 || name.contains(['=', ';', ' ']) {
                return Err(err("client.session_cookie", format!("{name:?} is not a cookie name")));
            }
        }
        if let Some(claim) = &c.jwt_claim {
            if claim.is_empty() || claim.len() > 128 {
                return Err(err("client.jwt_claim", "must be 1 to 128 characters"));
            }
        }

        if self.route_groups.len() > MAX_ROUTE_GROUPS {
            return Err(err(
                "route_groups",
                format!("at most {MAX_ROUTE_GROUPS} route groups"),
            ));
        }
        for (i, g) in self.route_groups.iter().enumerate() {
            let key = format!("route_groups[{i}]");
            if g.name.is_empty() || g.name.len() > 64 {
                return Err(err(format!("{key}.name"), "must be 1 to 64 characters"));
            }
            if self.route_groups.iter().take(i).any(|o| o.name == g.name) {
                return Err(err(format!("{key}.name"), format!("duplicate route group {:?}", g.name)));
            }
            if !g.path_prefix.starts_with('/') {
                return Err(err(format!("{key}.path_prefix"), "must start with '/'"));
            }
            for (j, m) in g.methods.iter().enumerate() {
                let ok = !m.is_empty() && m.len() <= 16 && m.bytes().all(|b| b.is_ascii_uppercase());
                if !ok {
                    return Err(err(format!("{key}.methods[{j}]"), format!("{m:?} is not an uppercase HTTP method")));
                }
            }
        }

        if self.rate.limits.len() > MAX_RATE_LIMITS {
            return Err(err("rate.limits", format!("at most {MAX_RATE_LIMITS} limits")));
        }
        for (i, l) in self.rate.limits.iter().enumerate() {
            let key = format!("rate.limits[{i}]");
            if let Some(group) = &l.route_group {
                if !self.route_groups.iter().any(|g| &g.name == group) {
                    return Err(err(
                        format!("{key}.route_group"),
                        format!("no route group named {group:?} in route_groups"),
                    ));
                }
            }
            check_range(&format!("{key}.requests"), l.requests, 1, 10_000_000)?;
            check_range(&format!("{key}.window_s"), l.window_s, 1, 86_400)?;
            check_finite_range(&format!("{key}.weight"), l.weight, 0.0, 10_000.0)?;
        }

        let r = &self.risk;
        check_finite_range("risk.block_at", r.block_at, 1.0, 10_000.0)?;
        check_finite_range("risk.tag_at", r.tag_at, 0.0, 10_000.0)?;
        if r.tag_at > r.block_at {
            return Err(err("risk.tag_at", "must not exceed risk.block_at"));
        }
        check_range("risk.half_life_s", r.half_life_s, 1, 86_400)?;
        check_range("penalty.duration_s", self.penalty.duration_s, 1, 86_400)?;
        check_header_name("headers.score", &self.headers.score)?;
        check_header_name("headers.reasons", &self.headers.reasons)?;
        check_header_name("headers.login_risk", &self.headers.login_risk)?;
        check_range("state.shards", self.state.shards, 1, 65_536)?;
        check_range("state.slots_per_shard", self.state.slots_per_shard, 8, 4096)?;
        check_range("state.worker_clients", self.state.worker_clients, 0, 262_144)?;
        check_range("state.worker_sync_ms", self.state.worker_sync_ms, 100, 10_000)?;

        check_list("allowlist.cidrs", self.allowlist.cidrs.len(), MAX_ALLOWLIST)?;
        check_list("allowlist.api_keys", self.allowlist.api_keys.len(), MAX_ALLOWLIST)?;
        check_list("good_bots", self.good_bots.len(), MAX_GOOD_BOTS)?;
        for (i, cidr) in self.allowlist.cidrs.iter().enumerate() {
            parse_cidr(cidr).map_err(|p| err(format!("allowlist.cidrs[{i}]"), p))?;
        }
        for (i, key) in self.allowlist.api_keys.iter().enumerate() {
            if key.is_empty() || key.len() > 256 {
                return Err(err(format!("allowlist.api_keys[{i}]"), "must be 1 to 256 characters"));
            }
        }
        for (i, bot) in self.good_bots.iter().enumerate() {
            if bot.user_agent.trim().is_empty() {
                return Err(err(format!("good_bots[{i}].user_agent"), "must not be empty"));
            }
            if bot.cidrs.is_empty() {
                return Err(err(format!("good_bots[{i}].cidrs"), "list the crawler's addresses: a user agent alone is forgeable"));
            }
            check_list(&format!("good_bots[{i}].cidrs"), bot.cidrs.len(), MAX_PROXY_CIDRS)?;
            for (j, cidr) in bot.cidrs.iter().enumerate() {
                parse_cidr(cidr).map_err(|p| err(format!("good_bots[{i}].cidrs[{j}]"), p))?;
            }
        }

        let cs = &self.credential_stuffing;
        if cs.login_routes.len() > 8 {
            return Err(err("credential_stuffing.login_routes", "at most 8 login routes"));
        }
        for (i, r) in cs.login_routes.iter().enumerate() {
            let key = format!("credential_stuffing.login_routes[{i}]");
            if !r.path.starts_with('/') {
                return Err(err(format!("{key}.path"), "must start with '/'"));
            }
            if r.method.is_empty() || !r.method.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(err(format!("{key}.method"), "must be an uppercase HTTP method"));
            }
            if r.username_field.is_empty() || r.username_field.len() > 64 {
                return Err(err(format!("{key}.username_field"), "must be 1 to 64 characters"));
            }
            for (name, list) in [("failure_statuses", &r.failure_statuses), ("success_statuses", &r.success_statuses)] {
                for (j, status) in list.iter().enumerate() {
                    check_range(&format!("{key}.{name}[{j}]"), *status, 100, 599)?;
                }
            }
        }
        check_range("credential_stuffing.window_s", cs.window_s, 10, 86_400)?;
        check_range("credential_stuffing.max_failures_per_client", cs.max_failures_per_client, 1, 100_000)?;
        check_range("credential_stuffing.max_usernames_per_client", cs.max_usernames_per_client, 1, 100)?;
        check_range("credential_stuffing.max_failures_per_account", cs.max_failures_per_account, 1, 100_000)?;
        check_finite_range("credential_stuffing.weight", cs.weight, 0.0, 10_000.0)?;
        check_range("credential_stuffing.max_body_bytes", cs.max_body_bytes, 64, 1_048_576)?;

        let d = &cs.distributed;
        check_range("credential_stuffing.distributed.window_s", d.window_s, 5, 86_400)?;
        check_range("credential_stuffing.distributed.min_attempts", d.min_attempts, 1, 1_000_000)?;
        check_finite_range("credential_stuffing.distributed.baseline_prior", d.baseline_prior, 0.0, 1.0)?;
        check_finite_range("credential_stuffing.distributed.attack_factor", d.attack_factor, 1.0, 100.0)?;
        check_finite_range("credential_stuffing.distributed.attack_min_ratio", d.attack_min_ratio, 0.01, 1.0)?;
        check_range("credential_stuffing.distributed.hold_s", d.hold_s, 1, 86_400)?;
        check_range("credential_stuffing.distributed.refuse_at", d.refuse_at, 1, 100)?;
        check_range("credential_stuffing.distributed.known_accounts_min", d.known_accounts_min, 0, 1_000_000)?;
        check_finite_range("credential_stuffing.distributed.attack_unknown_share", d.attack_unknown_share, 0.05, 1.0)?;
        check_range("credential_stuffing.distributed.spray_min_accounts", d.spray_min_accounts, 2, 1_000)?;
        check_range("credential_stuffing.distributed.new_client_max_requests", d.new_client_max_requests, 0, 1_000_000)?;
        check_finite_range("credential_stuffing.distributed.weight", d.weight, 0.0, 10_000.0)?;

        let se = &self.sessions;
        check_range("sessions.window_s", se.window_s, 10, 86_400)?;
        check_range("sessions.max_addresses", se.max_addresses, 1, 100)?;
        check_range("sessions.max_user_agents", se.max_user_agents, 1, 100)?;
        check_range("sessions.max_sessions_per_client", se.max_sessions_per_client, 1, 100)?;
        check_range("sessions.min_travel_s", se.min_travel_s, 60, 86_400 * 7)?;
        check_finite_range("sessions.weight", se.weight, 0.0, 10_000.0)?;
        check_finite_range("sessions.churn_weight", se.churn_weight, 0.0, 10_000.0)?;
        check_finite_range("sessions.travel_weight", se.travel_weight, 0.0, 10_000.0)?;

        self.scraping.validate()?;
        let sp = &self.spikes;
        check_range("spikes.window_s", sp.window_s, 1, 3600)?;
        check_finite_range("spikes.factor", sp.factor, 1.0, 1000.0)?;
        check_finite_range("spikes.min_rps", sp.min_rps, 0.0, 10_000_000.0)?;
        check_range("spikes.hold_s", sp.hold_s, 1, 86_400)?;
        check_finite_range("spikes.client_share", sp.client_share, 0.0, 1.0)?;
        check_range("spikes.min_client_requests", sp.min_client_requests, 1, 10_000_000)?;
        check_finite_range("spikes.weight", sp.weight, 0.0, 10_000.0)?;

        let sc = &self.scorer;
        if sc.cluster.is_empty() || sc.cluster.len() > 128 {
            return Err(err("scorer.cluster", "must be 1 to 128 characters"));
        }
        if sc.authority.is_empty() || sc.authority.len() > 256 {
            return Err(err("scorer.authority", "must be 1 to 256 characters"));
        }
        check_finite_range("scorer.ask_at", sc.ask_at, 0.0, 10_000.0)?;
        if sc.enabled && sc.ask_at >= self.risk.block_at {
            return Err(err("scorer.ask_at", "must be below risk.block_at (the band is [ask_at, block_at))"));
        }
        check_range("scorer.timeout_ms", sc.timeout_ms, 1, 10_000)?;
        check_range("scorer.breaker_failures", sc.breaker_failures, 1, 1000)?;
        check_range("scorer.breaker_cooldown_s", sc.breaker_cooldown_s, 1, 3600)?;
        check_range("scorer.max_ttl_s", sc.max_ttl_s, 1, 86_400)?;
        check_range("scorer.fleet_poll_s", sc.fleet_poll_s, 1, 3600)?;

        let g = &self.geo;
        check_finite_range("geo.anonymous_weight", g.anonymous_weight, 0.0, 10_000.0)?;
        if let Some(h) = &g.country_header {
            check_header_name("geo.country_header", h)?;
        }
        if let Some(h) = &g.asn_header {
            check_header_name("geo.asn_header", h)?;
        }
        for (i, h) in g.anonymous_headers.iter().enumerate().take(16) {
            check_header_name(&format!("geo.anonymous_headers[{i}]"), h)?;
        }
        if g.anonymous_headers.len() > 16 {
            return Err(err("geo.anonymous_headers", "at most 16 headers"));
        }
        for name in self.actions.keys() {
            if !crate::reason::Reason::ALL.iter().any(|r| r.name() == name) {
                let known: Vec<&str> = crate::reason::Reason::ALL.iter().map(|r| r.name()).collect();
                return Err(err(format!("actions.{name}"), format!("unknown reason; known: {}", known.join(", "))));
            }
        }

        let ato = &self.account_takeover;
        check_range("account_takeover.min_account_failures", ato.min_account_failures, 1, 100_000)?;
        check_finite_range("account_takeover.weight", ato.weight, 0.0, 10_000.0)?;
        ato.profile.validate()?;

        let en = &self.enumeration;
        if en.object_routes.len() > 32 {
            return Err(err("enumeration.object_routes", "at most 32 object routes"));
        }
        for (i, t) in en.object_routes.iter().enumerate() {
            if !t.starts_with('/') || !t.contains('{') {
                return Err(err(format!("enumeration.object_routes[{i}]"), "must start with '/' and contain an {id} segment"));
            }
        }
        check_range("enumeration.window_s", en.window_s, 1, 86_400)?;
        check_range("enumeration.max_distinct_ids", en.max_distinct_ids, 2, 150)?;
        check_range("enumeration.max_sequential_run", en.max_sequential_run, 2, 1_000_000)?;
        check_finite_range("enumeration.max_miss_ratio", en.max_miss_ratio, 0.01, 1.0)?;
        check_range("enumeration.min_requests", en.min_requests, 1, 1_000_000)?;
        check_finite_range("enumeration.weight", en.weight, 0.0, 10_000.0)?;

        let p = &self.probing;
        check_range("probing.window_s", p.window_s, 1, 86_400)?;
        check_range("probing.max_not_found_paths", p.max_not_found_paths, 2, 150)?;
        check_finite_range("probing.weight", p.weight, 0.0, 10_000.0)?;
        check_finite_range("probing.sensitive_weight", p.sensitive_weight, 0.0, 10_000.0)?;
        check_finite_range("probing.scanner_weight", p.scanner_weight, 0.0, 10_000.0)?;
        for (name, list) in [("sensitive_paths", &p.sensitive_paths), ("scanner_user_agents", &p.scanner_user_agents)] {
            if list.len() > 256 {
                return Err(err(format!("probing.{name}"), "at most 256 entries"));
            }
            for (i, item) in list.iter().enumerate() {
                if item.is_empty() || item.len() > 128 {
                    return Err(err(format!("probing.{name}[{i}]"), "must be 1 to 128 characters"));
                }
            }
        }
        Ok(())
    }
}

pub(crate) fn check_finite_range(key: &str, value: f32, min: f32, max: f32) -> Result<(), ConfigError> {
    if !value.is_finite() {
        return Err(err(key, "must be a finite number"));
    }
    check_range(key, value, min, max)
}

/// Accepts `10.0.0.0/8`, `::1/128`, or a bare address (a single host).
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    Err(format!("{text:?} is not a CIDR or IP address"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn problem(json: &str) -> ConfigError {
        Config::from_json(json.as_bytes()).unwrap_err()
    }

    #[test]
    fn empty_config_means_defaults() {
        assert_eq!(Config::from_json(b"").unwrap(), Config::default());
        assert_eq!(Config::from_json(b"{}").unwrap(), Config::default());
        assert_eq!(Config::default().mode, Mode::Monitor);
    }

    #[test]
    fn full_config_parses() {
        let c = Config::from_json(
            br#"{"mode":"block",
                 "client":{"trusted_proxies":["127.0.0.0/8","::1"],"trusted_hops":1,
                           "api_key_header":"x-api-key","session_cookie":"sid","jwt_claim":"sub"},
                 "route_groups":[{"name":"login","path_prefix":"/api/login","methods":["POST"]}],
                 "rate":{"limits":[{"route_group":"login","requests":5,"window_s":60}]},
                 "risk":{"block_at":100,"tag_at":20,"half_life_s":60},
                 "penalty":{"duration_s":30},
                 "headers":{"enabled":false},
                 "state":{"shards":16,"slots_per_shard":64}}"#,
        )
        .unwrap();
        assert_eq!(c.mode, Mode::Block);
        assert_eq!(c.rate.limits[0].weight, 100.0);
        assert!(!c.headers.enabled);
        assert_eq!(c.headers.score, "x-abuse-score");
    }

    #[test]
    fn unknown_keys_are_refused_with_their_path() {
        let e = problem(r#"{"rate":{"limitz":[]}}"#);
        assert_eq!(e.key, "rate.limitz");
        assert!(e.problem.contains("unknown field `limitz`"), "{e}");
        let e = problem(r#"{"colour":"blue"}"#);
        assert!(e.problem.contains("unknown field `colour`"), "{e}");
    }

    #[test]
    fn wrong_types_name_the_key() {
        let e = problem(r#"{"rate":{"limits":[{"requests":"ten","window_s":1}]}}"#);
        assert_eq!(e.key, "rate.limits[0].requests");
        let e = problem(r#"{"rate":{"limits":[{"requests":1,"window_s":1,"anonymous_only":"yes"}]}}"#);
        assert_eq!(e.key, "rate.limits[0].anonymous_only");
        let e = problem(r#"{"mode":"blocc"}"#);
        assert_eq!(e.key, "mode");
    }

    #[test]
    fn ranges_are_checked() {
        let e = problem(r#"{"rate":{"limits":[{"requests":0,"window_s":1}]}}"#);
        assert_eq!(e.key, "rate.limits[0].requests");
        let e = problem(r#"{"penalty":{"duration_s":0}}"#);
        assert_eq!(e.key, "penalty.duration_s");
        let e = problem(r#"{"state":{"shards":0}}"#);
        assert_eq!(e.key, "state.shards");
        let e = problem(r#"{"state":{"worker_sync_ms":20000}}"#);
        assert_eq!(e.key, "state.worker_sync_ms");
        let e = problem(r#"{"risk":{"tag_at":200}}"#);
        assert_eq!(e.key, "risk.tag_at");
        let e = problem(r#"{"client":{"trusted_hops":0}}"#);
        assert_eq!(e.key, "client.trusted_hops");
        let e = problem(r#"{"client":{"ipv6_prefix_len":129}}"#);
        assert_eq!(e.key, "client.ipv6_prefix_len");
    }

    #[test]
    fn references_and_formats_are_checked() {
        let e = problem(r#"{"client":{"trusted_proxies":["10.0.0.0/33"]}}"#);
        assert_eq!(e.key, "client.trusted_proxies[0]");
        let e = problem(r#"{"rate":{"limits":[{"route_group":"nope","requests":1,"window_s":1}]}}"#);
        assert_eq!(e.key, "rate.limits[0].route_group");
        let e = problem(r#"{"route_groups":[{"name":"a","path_prefix":"api"}]}"#);
        assert_eq!(e.key, "route_groups[0].path_prefix");
        let e = problem(r#"{"route_groups":[{"name":"a","path_prefix":"/a","methods":["get"]}]}"#);
        assert_eq!(e.key, "route_groups[0].methods[0]");
        let e = problem(r#"{"headers":{"score":"X Score"}}"#);
        assert_eq!(e.key, "headers.score");
        let e = problem(r#"{"client":{"facts_header":"X-Request-Facts"}}"#);
        assert_eq!(e.key, "client.facts_header");
        let e = problem("not json");
        assert_eq!(e.key, "(root)");
        let e = problem("{} {}");
        assert_eq!(e.key, "(root)");
    }

    #[test]
    fn display_names_the_key() {
        let e = problem(r#"{"penalty":{"duration_s":0}}"#);
        assert!(e.to_string().starts_with("invalid configuration: key `penalty.duration_s`: "));
    }
}
