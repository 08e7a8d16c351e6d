//! Probing: forced browsing (many distinct paths answered 404), requests for
//! files only attackers ask for (`/.env`, `/.git/`, backups), and the user
//! agents of attack tools. Declared good bots are exempt (see `exemptions`).
//!
//! Scenario, in short:
//! - counts: distinct paths answered 404; requests for `sensitive_paths`; `scanner_user_agents`;
//! - grouped by: client;
//! - over: sliding `probing.window_s` (404 paths); the paths and user agents on each request;
//! - over the threshold: `probing`: `weight` on each 404 past `max_not_found_paths`, `sensitive_weight` / `scanner_weight` at once.

use super::Signal;
use crate::reason::Reason;
use super::Figure;
use crate::record::ClientRecord;
use crate::validate::{check_finite_range, check_range, err, ConfigError};
use serde::Deserialize;

// ---- configuration (`probing`) ----

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

impl ProbingConfig {
    /// `probing`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let p = self;
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


#[derive(Debug, Clone)]
pub struct Probing {
    sensitive_paths: Vec<String>,
    scanner_user_agents: Vec<String>,
    window_ms: u64,
    max_not_found_paths: f64,
    weight: f32,
    sensitive_weight: f32,
    scanner_weight: f32,
}

impl Probing {
    pub fn new(config: &ProbingConfig) -> Option<Probing> {
        if !config.enabled {
            return None;
        }
        let lower = |items: &[String]| items.iter().map(|s| s.to_lowercase()).collect();
        Some(Probing {
            sensitive_paths: lower(&config.sensitive_paths),
            scanner_user_agents: lower(&config.scanner_user_agents),
            window_ms: u64::from(config.window_s).saturating_mul(1000),
            max_not_found_paths: f64::from(config.max_not_found_paths),
            weight: config.weight,
            sensitive_weight: config.sensitive_weight,
            scanner_weight: config.scanner_weight,
        })
    }

    pub fn needs_user_agent(&self) -> bool {
        !self.scanner_user_agents.is_empty()
    }

    /// What the request alone gives away.
    pub fn on_request(&self, path: &str, user_agent: Option<&str>) -> Signal {
        let mut signal = Signal::default();
        let path = path.split(['?', '#']).next().unwrap_or(path);
        if contains_any_lowercase(path, &self.sensitive_paths) {
            signal.fire_with(Reason::Probing, self.sensitive_weight, Figure::new("sensitive path requested", 1.0, 0.0, 0));
        }
        if user_agent.is_some_and(|ua| contains_any_lowercase(ua, &self.scanner_user_agents)) {
            signal.fire_with(Reason::Probing, self.scanner_weight, Figure::new("scanner user agent", 1.0, 0.0, 0));
        }
        signal
    }

    /// A 404 answer to this client, for the path with keyed hash `path_hash`.
    pub fn on_not_found(&self, client: &mut ClientRecord, path_hash: u64, now_ms: u64) -> Signal {
        let mut signal = Signal::default();
        client.not_found.record(now_ms, self.window_ms);
        let distinct = client.not_found_paths.insert(path_hash, now_ms, self.window_ms);
        if distinct > self.max_not_found_paths {
            let figure = Figure::new("distinct paths answered 404", distinct, self.max_not_found_paths, self.window_ms);
            signal.fire_with(Reason::Probing, self.weight, figure);
        }
        signal
    }
}

/// Whether the text, lowercased, contains one of the (lowercase) needles.
/// Lowercased on the stack (every request pays this: no allocation) when
/// the text is short, as paths and user agents are.
fn contains_any_lowercase(text: &str, needles: &[String]) -> bool {
    let mut buf = [0u8; 512];
    match buf.get_mut(..text.len()) {
        Some(dst) if text.is_ascii() => {
            for (d, s) in dst.iter_mut().zip(text.bytes()) {
                *d = s.to_ascii_lowercase();
            }
            let lower: &[u8] = dst;
            needles.iter().any(|n| {
                let n = n.as_bytes();
                n.is_empty() || lower.windows(n.len()).any(|w| w == n)
            })
        }
        _ => {
            let lower = text.to_lowercase();
            needles.iter().any(|n| lower.contains(n.as_str()))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn case_insensitive_without_allocating() {
        let needles = vec![".env".to_string(), "sqlmap".to_string()];
        assert!(contains_any_lowercase("/app/.ENV", &needles));
        assert!(contains_any_lowercase("SQLMap/1.7", &needles));
        assert!(!contains_any_lowercase("/api/products", &needles));
        // Non-ASCII and long texts take the allocating path, same answers.
        assert!(contains_any_lowercase("/é/.Env", &needles));
        assert!(contains_any_lowercase(&format!("{}/.env", "a".repeat(600)), &needles));
    }

    #[test]
    fn sensitive_paths_and_scanners() {
        let p = Probing::new(&ProbingConfig::default()).unwrap();
        assert!(p.on_request("/.env", None).reasons.contains(Reason::Probing));
        assert!(p.on_request("/app/.GIT/config", None).reasons.contains(Reason::Probing));
        assert!(p.on_request("/api/products?page=1", Some("Mozilla/5.0")).reasons.is_empty());
        assert!(p.on_request("/", Some("sqlmap/1.7#stable")).reasons.contains(Reason::Probing));
        assert!(p.on_request("/", Some("Fuzz Faster U Fool v2.1.0 (ffuf)")).reasons.contains(Reason::Probing));
    }

    #[test]
    fn many_distinct_missing_paths() {
        let p = Probing::new(&ProbingConfig { max_not_found_paths: 5, ..ProbingConfig::default() }).unwrap();
        let mut c = ClientRecord::default();
        // The same missing page again and again is a broken link, not a probe.
        for _ in 0..50 {
            assert!(p.on_not_found(&mut c, 0xabc, 1000).reasons.is_empty());
        }
        let mut fired = false;
        for i in 0..20u64 {
            fired |= !p.on_not_found(&mut c, i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 7, 1000).reasons.is_empty();
        }
        assert!(fired);
    }
}
