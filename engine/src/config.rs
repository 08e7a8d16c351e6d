//! The plugin configuration: what operators write in the Envoy Wasm filter's
//! `configuration` (JSON). Every key has a safe default, unknown keys are
//! refused, and every value is range-checked so that a typo never turns into a
//! silently different policy. Errors name the key (`rate.limits[0].requests`).

use serde::Deserialize;

use crate::validate::{check_finite_range, check_header_name, check_list, check_range, err};
pub use crate::validate::{parse_cidr, ConfigError};
// Sections and words that lower layers own (arrows point down: see lib.rs).
pub use crate::identity::ClientConfig;
pub use crate::policy::{DetectorAction, Mode};
pub use crate::record::MAX_RATE_LIMITS;
pub use crate::routes::RouteGroup;
// Each detector's section lives with the detector (one detector, one file).
pub use crate::detectors::distributed_stuffing::DistributedStuffingConfig;
pub use crate::detectors::enumeration::EnumerationConfig;
pub use crate::detectors::login::{AccountTakeoverConfig, CredentialStuffingConfig, LoginRoute};
pub use crate::detectors::login_profile::LoginProfileConfig;
pub use crate::detectors::probing::ProbingConfig;
pub use crate::detectors::rate::{RateConfig, RateLimit};
pub use crate::detectors::scraping::ScrapingConfig;
pub use crate::detectors::session::SessionConfig;
pub use crate::detectors::spike::SpikeConfig;
pub use crate::rules::{RuleConfig, RuleMatch, HeaderCondition};

/// Most route groups an operator may declare (each costs a prefix match per request).
pub const MAX_ROUTE_GROUPS: usize = 32;
/// Largest plugin configuration accepted (the shipped one is 1.6 KiB).
pub const MAX_CONFIG_BYTES: usize = 256 * 1024;
/// Longest address lists: `client.trusted_proxies`, `good_bots[].cidrs`.
pub const MAX_PROXY_CIDRS: usize = 256;
/// Longest allowlists: `allowlist.cidrs`, `allowlist.api_keys`.
pub const MAX_ALLOWLIST: usize = 4096;
pub const MAX_GOOD_BOTS: usize = 64;

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
    pub scraping: ScrapingConfig,
    pub sessions: SessionConfig,
    pub spikes: SpikeConfig,
    pub scorer: ScorerConfig,
    pub geo: GeoConfig,
    /// Per-reason action (`"anonymous_network": "tag"`); reasons not listed block.
    pub actions: std::collections::BTreeMap<String, DetectorAction>,
    /// Your own detectors, as data (at most 32): see docs/rules.md.
    #[cfg_attr(feature = "schema", schemars(length(max = 32)))]
    pub rules: Vec<RuleConfig>,
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
            scraping: ScrapingConfig::default(),
            sessions: SessionConfig::default(),
            spikes: SpikeConfig::default(),
            scorer: ScorerConfig::default(),
            geo: GeoConfig::default(),
            actions: std::collections::BTreeMap::new(),
            rules: Vec::new(),
        }
    }
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
            // ~6 MiB per worker, fixed. Each worker sees only the clients
            // whose connections it holds: size it to them (README "State
            // tiers"); `make bench`'s one worker sees 10,000 and sets 16,384.
            worker_clients: 8192,
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

impl Config {
    /// The rules' own checks, and what they need of the rest: a rule keyed
    /// by session, API key or JWT claim needs that identity configured.
    fn validate_rules(&self) -> Result<(), ConfigError> {
        use crate::rules::key::KeySpec;
        let groups: Vec<&str> = self.route_groups.iter().map(|g| g.name.as_str()).collect();
        crate::rules::config::validate(&self.rules, &groups, self.scorer.enabled && self.scorer.events)?;
        for (i, rule) in self.rules.iter().enumerate() {
            let fleet_on = rule.fleet && self.scorer.enabled && self.scorer.events;
            if fleet_on && self.scorer.secret.is_none() && self.scorer.secret_env.is_none() {
                // Keys are hashed with the fleet's secret: without one, each
                // Envoy would name the same key differently.
                return Err(err(format!("rules[{i}].fleet"), "needs the fleet's secret (scorer.secret or scorer.secret_env)"));
            }
            for (j, part) in rule.key.iter().enumerate() {
                let needs = match KeySpec::parse(part) {
                    Ok(KeySpec::Session) if self.client.session_cookie.is_none() => "client.session_cookie",
                    Ok(KeySpec::ApiKey) if self.client.api_key_header.is_none() => "client.api_key_header",
                    Ok(KeySpec::JwtClaim) if self.client.jwt_claim.is_none() => "client.jwt_claim",
                    _ => continue,
                };
                return Err(err(format!("rules[{i}].key[{j}]"), format!("{part:?} needs {needs}")));
            }
        }
        Ok(())
    }

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
        check_range("client.returning_after_s", c.returning_after_s, 0, 3600)?;
        if let Some(h) = &c.verified_subject_header {
            check_header_name("client.verified_subject_header", h)?;
        }
        if let Some(h) = &c.accepted_credential_header {
            check_header_name("client.accepted_credential_header", h)?;
        }
        check_range("client.pool_budget", c.pool_budget, 1, 1000)?;
        check_range("client.pool_prefix_v4", c.pool_prefix_v4, 8, 32)?;
        check_range("client.max_crowd", c.max_crowd, 0, 1000)?;
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

        self.rate.validate(&self.route_groups)?;
        self.validate_rules()?;

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

        self.credential_stuffing.validate()?;
        self.sessions.validate()?;
        self.scraping.validate()?;
        self.spikes.validate()?;

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

        self.account_takeover.validate()?;
        self.enumeration.validate()?;
        self.probing.validate()?;
        Ok(())
    }
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
