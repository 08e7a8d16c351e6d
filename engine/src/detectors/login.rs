//! Credential stuffing, password spraying, distributed attacks on one
//! account, and account takeover — all judged from login outcomes.
//!
//! The filter reads the username from the body of configured login routes
//! only (bounded), and the outcome from the response status:
//! - per client: failed logins in the window, and distinct usernames the
//!   client failed on (stuffing tries many users; spraying tries one
//!   password on many users — both show as many usernames);
//! - per account, across all clients: failures in the window, so an attack
//!   on one account spread over many addresses is still seen;
//! - a success on an account with many recent failures, or by a client
//!   already suspected of stuffing, is `account_takeover`.
//!
//! Scenario, in short:
//! - counts: failed logins, distinct usernames failed on, failures per account, successes after failures;
//! - grouped by: client; account (username, hashed) across clients;
//! - over: sliding `credential_stuffing.window_s`;
//! - over the threshold: `credential_stuffing` (`weight`) past `max_failures_per_client` / `max_usernames_per_client` / `max_failures_per_account`; `account_takeover` (`account_takeover.weight`) for a success after `min_account_failures`.

use super::Signal;
use crate::account::AccountRecord;
use super::distributed_stuffing::DistributedStuffingConfig;
use super::login_profile::LoginProfileConfig;
use crate::reason::Reason;
use super::Figure;
use crate::record::ClientRecord;
use crate::validate::{check_finite_range, check_range, err, ConfigError};
use serde::Deserialize;

// ---- configuration (`credential_stuffing`, `account_takeover`) ----

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
    pub profile: LoginProfileConfig,
}

impl Default for AccountTakeoverConfig {
    fn default() -> Self {
        AccountTakeoverConfig {
            enabled: true,
            min_account_failures: 5,
            weight: 100.0,
            profile: LoginProfileConfig::default(),
        }
    }
}

impl CredentialStuffingConfig {
    /// `credential_stuffing` (its login routes, thresholds, and `distributed`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let cs = self;
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
        cs.distributed.validate()
    }
}

impl AccountTakeoverConfig {
    /// `account_takeover` and its `profile`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_range("account_takeover.min_account_failures", self.min_account_failures, 1, 100_000)?;
        check_finite_range("account_takeover.weight", self.weight, 0.0, 10_000.0)?;
        self.profile.validate()
    }
}


/// Usernames longer than this are cut (after trimming and lowercasing).
const MAX_USERNAME: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginOutcome {
    Success,
    Failure,
    Other,
}

#[derive(Debug, Clone)]
pub struct LoginDetector {
    routes: Vec<LoginRoute>,
    window_ms: u64,
    config: CredentialStuffingConfig,
    takeover: Option<AccountTakeoverConfig>,
}

impl LoginDetector {
    pub fn new(config: &CredentialStuffingConfig, takeover: &AccountTakeoverConfig) -> Option<LoginDetector> {
        if !config.enabled || config.login_routes.is_empty() {
            return None;
        }
        Some(LoginDetector {
            routes: config.login_routes.clone(),
            window_ms: u64::from(config.window_s).saturating_mul(1000),
            config: config.clone(),
            takeover: takeover.enabled.then(|| takeover.clone()),
        })
    }

    pub fn max_body_bytes(&self) -> usize {
        usize::try_from(self.config.max_body_bytes).unwrap_or(8192)
    }

    /// The login routes' paths, in route order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.routes.iter().map(|r| r.path.as_str())
    }

    /// Index of the login route this request is for.
    pub fn route(&self, method: &str, path: &str) -> Option<usize> {
        let path = path.split(['?', '#']).next().unwrap_or(path);
        self.routes.iter().position(|r| r.method == method && r.path == path)
    }

    pub fn username(&self, route: usize, body: &[u8]) -> Option<String> {
        let field = &self.routes.get(route)?.username_field;
        extract_username(body, field)
    }

    /// The submitted password, only to hash it (never stored or logged).
    pub fn password(&self, route: usize, body: &[u8]) -> Option<String> {
        let field = &self.routes.get(route)?.password_field;
        extract_field(body, field).filter(|p| !p.is_empty())
    }

    pub fn outcome(&self, route: usize, status: u32) -> LoginOutcome {
        match self.routes.get(route) {
            Some(r) if r.failure_statuses.contains(&status) => LoginOutcome::Failure,
            Some(r) if r.success_statuses.contains(&status) => LoginOutcome::Success,
            _ => LoginOutcome::Other,
        }
    }

    /// Records a failure on the account; returns the account's failures in the window.
    pub fn account_failure(&self, account: &mut AccountRecord, client_key: u64, now_ms: u64) -> f64 {
        account.last_seen_ms = now_ms;
        account.last_failure_ms = now_ms;
        account.failing_clients.insert(client_key, now_ms, self.window_ms);
        account.failures.record(now_ms, self.window_ms)
    }

    /// The stuffing window, ms.
    pub fn window_ms(&self) -> u64 {
        self.window_ms
    }

    /// Failures on the account in the window, without recording.
    pub fn account_failures(&self, account: &AccountRecord, now_ms: u64) -> f64 {
        account.failures.estimate(now_ms, self.window_ms)
    }

    /// Judges a login outcome for the client. `username_hash` is the keyed
    /// hash of the username (None when it could not be read);
    /// `account_failures` the account's failures in the window, this one included.
    pub fn observe(
        &self,
        client: &mut ClientRecord,
        outcome: LoginOutcome,
        username_hash: Option<u64>,
        account_failures: f64,
        client_suspected: bool,
        now_ms: u64,
    ) -> Signal {
        let mut signal = Signal::default();
        let c = &self.config;
        match outcome {
            LoginOutcome::Failure => {
                let failures = client.login_failures.record(now_ms, self.window_ms);
                // An office behind one address fails now and then but mostly
                // succeeds; a stuffer almost never does.
                let mostly_failing = f64::from(client.login_successes) * 2.0 < failures;
                if failures > f64::from(c.max_failures_per_client) && mostly_failing {
                    let figure = Figure::new("failed logins", failures, c.max_failures_per_client.into(), self.window_ms);
                    signal.fire_with(Reason::CredentialStuffing, c.weight, figure);
                }
                if let Some(hash) = username_hash {
                    let usernames = client.failed_usernames.insert(hash, now_ms, self.window_ms);
                    if usernames > f64::from(c.max_usernames_per_client) + 0.5 && mostly_failing {
                        let figure = Figure::new("failed-login usernames", usernames, c.max_usernames_per_client.into(), self.window_ms);
                        signal.fire_with(Reason::CredentialStuffing, c.weight, figure);
                    }
                    // Taking part in an attack on one account: half weight,
                    // so a real user's single typo on an attacked account
                    // does not block them; a second failure does.
                    if account_failures > f64::from(c.max_failures_per_account) {
                        let figure = Figure::new("failed logins on the account", account_failures, c.max_failures_per_account.into(), self.window_ms);
                        signal.fire_with(Reason::CredentialStuffing, c.weight / 2.0, figure);
                    }
                }
            }
            LoginOutcome::Success => {
                client.login_successes = client.login_successes.saturating_add(1);
                if let Some(t) = &self.takeover {
                    let attacked = username_hash.is_some() && account_failures >= f64::from(t.min_account_failures);
                    if attacked || client_suspected {
                        let figure = match attacked {
                            true => Figure::new("failed logins on the account before this success", account_failures, t.min_account_failures.into(), self.window_ms),
                            false => Figure::new("success by a client suspected of stuffing", 1.0, 0.0, 0),
                        };
                        signal.fire_with(Reason::AccountTakeover, t.weight, figure);
                    }
                }
            }
            LoginOutcome::Other => {}
        }
        signal
    }
}

/// The username from a JSON object field or a form field, trimmed and
/// lowercased (so `Alice` and `alice ` count as one account).
pub fn extract_username(body: &[u8], field: &str) -> Option<String> {
    let raw = extract_field(body, field)?;
    let name: String = raw.trim().to_lowercase().chars().take(MAX_USERNAME).collect();
    (!name.is_empty()).then_some(name)
}

/// A JSON object's string or number field, or a form field, as sent.
fn extract_field(body: &[u8], field: &str) -> Option<String> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace())?;
    if *first == b'{' {
        let value: serde_json::Value = serde_json::from_slice(body).ok()?;
        match value.get(field)? {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    } else {
        form_urlencoded::parse(body).find(|(k, _)| k == field).map(|(_, v)| v.into_owned())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn detector() -> LoginDetector {
        let config = CredentialStuffingConfig {
            login_routes: vec![LoginRoute {
                path: "/login".into(),
                method: "POST".into(),
                username_field: "user".into(),
                password_field: "password".into(),
                failure_statuses: vec![401],
                success_statuses: vec![200],
            }],
            max_failures_per_client: 3,
            max_usernames_per_client: 2,
            max_failures_per_account: 5,
            ..CredentialStuffingConfig::default()
        };
        LoginDetector::new(&config, &AccountTakeoverConfig::default()).unwrap()
    }

    #[test]
    fn usernames_from_json_and_forms() {
        assert_eq!(extract_username(br#"{"user":" Alice ","password":"x"}"#, "user"), Some("alice".into()));
        assert_eq!(extract_username(b"user=Bob%40x.com&password=1", "user"), Some("bob@x.com".into()));
        assert_eq!(extract_username(br#"{"user":42}"#, "user"), Some("42".into()));
        assert_eq!(extract_username(br#"{"user":null}"#, "user"), None);
        assert_eq!(extract_username(b"{broken", "user"), None);
        assert_eq!(extract_username(b"", "user"), None);
        assert_eq!(extract_username(b"\xff\xfe=\xff", "user"), None);
        assert_eq!(extract_username(b"user=", "user"), None);
    }

    #[test]
    fn routes_and_outcomes() {
        let d = detector();
        assert_eq!(d.route("POST", "/login?next=/"), Some(0));
        assert_eq!(d.route("GET", "/login"), None);
        assert_eq!(d.route("POST", "/login/x"), None);
        assert_eq!(d.outcome(0, 401), LoginOutcome::Failure);
        assert_eq!(d.outcome(0, 200), LoginOutcome::Success);
        assert_eq!(d.outcome(0, 500), LoginOutcome::Other);
    }

    #[test]
    fn a_few_typos_are_fine_many_failures_are_not() {
        let d = detector();
        let mut c = ClientRecord::default();
        for i in 0..3 {
            let s = d.observe(&mut c, LoginOutcome::Failure, Some(7), 1.0, false, 1000 + i);
            assert!(s.reasons.is_empty());
        }
        let s = d.observe(&mut c, LoginOutcome::Failure, Some(7), 1.0, false, 2000);
        assert!(s.reasons.contains(Reason::CredentialStuffing));
    }

    #[test]
    fn an_office_that_mostly_succeeds_is_not_stuffing() {
        let d = detector();
        let mut c = ClientRecord::default();
        for user in 0..40u64 {
            d.observe(&mut c, LoginOutcome::Success, Some(user), 0.0, false, 1000);
            if user % 5 == 0 {
                let s = d.observe(&mut c, LoginOutcome::Failure, Some(user), 1.0, false, 1000);
                assert!(s.reasons.is_empty(), "user {user}");
            }
        }
    }

    #[test]
    fn many_usernames_is_stuffing_or_spraying() {
        let d = detector();
        let mut c = ClientRecord::default();
        let mut fired = false;
        for user in [11u64, 22, 33] {
            fired |= !d.observe(&mut c, LoginOutcome::Failure, Some(user), 1.0, false, 1000).reasons.is_empty();
        }
        assert!(fired);
    }

    #[test]
    fn success_after_account_failures_is_takeover() {
        let d = detector();
        let mut c = ClientRecord::default();
        let s = d.observe(&mut c, LoginOutcome::Success, Some(1), 1.0, false, 1000);
        assert!(s.reasons.is_empty(), "a normal login");
        let s = d.observe(&mut c, LoginOutcome::Success, Some(1), 5.0, false, 1000);
        assert!(s.reasons.contains(Reason::AccountTakeover));
        let s = d.observe(&mut c, LoginOutcome::Success, Some(1), 0.0, true, 1000);
        assert!(s.reasons.contains(Reason::AccountTakeover), "suspected client");
        assert_eq!(c.login_successes, 3);
    }

    #[test]
    fn account_failures_accumulate_across_clients() {
        let d = detector();
        let mut a = AccountRecord::default();
        for client in 0..6u64 {
            d.account_failure(&mut a, client, 1000 + client);
        }
        assert_eq!(d.account_failures(&a, 2000), 6.0);
        let mut c = ClientRecord::default();
        let s = d.observe(&mut c, LoginOutcome::Failure, Some(1), 6.0, false, 2000);
        assert_eq!(s.risk, 50.0, "half weight for taking part");
    }
}
