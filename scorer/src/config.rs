//! Command line and environment. Every flag can also come from the
//! environment (container deployments), the secrets preferably so: a
//! command line is visible to every user of the machine.
//!
//! [`check_deployment`] is what the scorer checks before it listens: off
//! loopback it refuses to start without a strong filter secret, and an
//! operator token, when given, must be strong and differ from the secret.
//! Its messages name the problem, never a secret's value.

use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Fewest bytes a secret or token may have (`openssl rand -hex 32` gives 64).
pub const MIN_SECRET_BYTES: usize = 32;
/// Fewest distinct bytes: 32 × `a` is long but guessable.
const MIN_DISTINCT_BYTES: usize = 8;
/// Values shipped in examples, templates and docs (compared in lower case,
/// anywhere in the value): whoever reads them knows them.
const PLACEHOLDERS: [&str; 12] = [
    "demo-secret",
    "change-me",
    "changeme",
    "change_me",
    "replace-me",
    "replaceme",
    "your-secret",
    "test-secret",
    "placeholder",
    "password",
    "example",
    "secret",
];

#[derive(Clone, Parser)]
#[command(
    name = "abuse-scorer",
    version,
    about = "Scores borderline clients for the abuse filter: rules + a streaming anomaly model + fleet state"
)]
pub struct Cli {
    /// Address to serve on (port 0 picks a free one; the banner shows it).
    #[arg(long, env = "LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,

    /// Share fleet state through this Redis (e.g. redis://127.0.0.1:6379);
    /// without it the state is this process's own.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,

    /// Shared secret the filter sends in `x-abuse-scorer-secret`; without
    /// one, anyone who reaches the port can score and read verdicts.
    #[arg(long, env = "ABUSE_SCORER_SECRET", hide_env_values = true)]
    pub secret: Option<String>,

    /// Where the model snapshot (model.json) and the warm-start state
    /// (warm.json) are kept.
    #[arg(long, env = "STATE_DIR", default_value = "./target/scorer")]
    pub state_dir: PathBuf,

    /// Vectors the model learns before it scores.
    #[arg(long, env = "WARM_UP", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub warm_up: u32,

    /// Score at which a client is blocked (the filter's `risk.block_at`).
    #[arg(long, env = "BLOCK_AT", default_value_t = 100.0, value_parser = parse_block_at)]
    pub block_at: f32,

    /// Seconds the filter may reuse an answer; blocks are published to the
    /// fleet for 4 × this (at least 60 s).
    #[arg(long, env = "TTL_S", default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=86_400))]
    pub ttl_s: u32,

    /// Append every scored feature sample to this file as a JSON line
    /// (client, route group, anomaly, features): for offline evaluation.
    #[arg(long, env = "SAMPLE_LOG")]
    pub sample_log: Option<PathBuf>,

    /// Token operators (and Prometheus) send as `Authorization: Bearer` to
    /// read the dashboard and /metrics; without one, those answer only to
    /// 127.0.0.1 / ::1. Not the filters' secret.
    #[arg(long, env = "ABUSE_OPERATOR_TOKEN", hide_env_values = true)]
    pub operator_token: Option<String>,

    /// Known-accounts additions one caller (peer address) may make per
    /// minute; the rest of a batch's accounts are dropped and counted.
    #[arg(long, env = "CALLER_KNOWN_ACCOUNTS_PER_MIN", default_value_t = 12_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub caller_known_accounts_per_min: u32,

    /// Account-profile updates one caller may merge per minute.
    #[arg(long, env = "CALLER_PROFILES_PER_MIN", default_value_t = 12_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub caller_profiles_per_min: u32,

    /// Fleet blocks one caller's score requests may publish per minute;
    /// past it the caller still gets its block answer, the fleet does not.
    #[arg(long, env = "CALLER_BLOCKS_PER_MIN", default_value_t = 600, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub caller_blocks_per_min: u32,

    /// Without a command the scorer serves; `ctl` talks to a running one.
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// The operator's API from a shell: `ctl decisions list --client ADDR`,
    /// `ctl explain ID`, `ctl unblock ADDR [--quiet-s N]`, `ctl allow
    /// add|list|remove`, `ctl audit [--at MS]` (token: ABUSE_OPERATOR_TOKEN).
    Ctl(crate::ctl::Ctl),
}

/// Never prints a secret (the derive would).
impl std::fmt::Debug for Cli {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |s: &Option<String>| if s.is_some() { "<set>" } else { "<unset>" };
        f.debug_struct("Cli")
            .field("listen", &self.listen)
            .field("redis_url", &self.redis_url.as_ref().map(|_| "<set>"))
            .field("secret", &set(&self.secret))
            .field("operator_token", &set(&self.operator_token))
            .field("state_dir", &self.state_dir)
            .field("warm_up", &self.warm_up)
            .field("block_at", &self.block_at)
            .field("ttl_s", &self.ttl_s)
            .finish_non_exhaustive()
    }
}

fn parse_block_at(s: &str) -> Result<f32, String> {
    let v: f32 = s.parse().map_err(|e| format!("{e}"))?;
    if v.is_finite() && (1.0..=10_000.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is out of range [1, 10000]"))
    }
}

impl Cli {
    /// The secret, if any: an empty one (an unset variable in a template)
    /// counts as none.
    pub fn secret(&self) -> Option<&str> {
        self.secret.as_deref().filter(|s| !s.is_empty())
    }

    /// The operator token, if any (empty counts as none).
    pub fn operator_token(&self) -> Option<&str> {
        self.operator_token.as_deref().filter(|s| !s.is_empty())
    }
}

/// Why `value` is too weak to guard anything, if it is: too short, too
/// few distinct characters, or a known placeholder. Never quotes it.
pub fn weakness(value: &str) -> Option<String> {
    let lower = value.trim().to_ascii_lowercase();
    if PLACEHOLDERS
        .iter()
        .any(|p| lower == *p || (p.len() > 6 && lower.contains(*p)))
    {
        // Not named: the placeholder is the value, and values are never logged.
        return Some("is (or contains) a published placeholder such as the examples' own".to_string());
    }
    if value.len() < MIN_SECRET_BYTES {
        return Some(format!(
            "is {} bytes long (at least {MIN_SECRET_BYTES} are needed)",
            value.len()
        ));
    }
    let mut seen = [false; 256];
    for b in value.bytes() {
        if let Some(s) = seen.get_mut(usize::from(b)) {
            *s = true;
        }
    }
    let distinct = seen.iter().filter(|s| **s).count();
    if distinct < MIN_DISTINCT_BYTES {
        return Some(format!(
            "has only {distinct} distinct characters (at least {MIN_DISTINCT_BYTES} are needed)"
        ));
    }
    None
}

const GENERATE: &str = "generate one with `openssl rand -hex 32`";

/// Whether the scorer may start with these secrets on `listen`: `Err` names
/// the problem (the scorer then refuses to start), `Ok` carries warnings
/// to log.
///
/// * Off loopback (`0.0.0.0`, a pod or host address) the filters' secret is
///   required and must be strong ([`weakness`]): it is all that stands
///   between the network and the fleet's blocks, known accounts and
///   baselines, and it keys the username hashes in Redis.
/// * On loopback only local processes reach the port: a missing or weak
///   secret is a warning.
/// * An operator token, when given, must be strong and differ from the
///   secret (the filters must not be able to read the dashboard, nor an
///   operator's browser to post batches).
pub fn check_deployment(
    listen: SocketAddr,
    secret: Option<&str>,
    operator_token: Option<&str>,
) -> Result<Vec<String>, String> {
    let mut warnings = Vec::new();
    let public = !listen.ip().is_loopback();
    match (secret, public) {
        (None, true) => {
            return Err(format!(
                "refusing to listen on {listen} without a secret: anyone who reaches the port could \
                 publish fleet blocks and poison the warm-start state. Set ABUSE_SCORER_SECRET \
                 (at least {MIN_SECRET_BYTES} random bytes; {GENERATE}), or listen on 127.0.0.1"
            ))
        }
        (Some(s), true) => {
            if let Some(why) = weakness(s) {
                return Err(format!(
                    "refusing to listen on {listen} with a weak ABUSE_SCORER_SECRET: it {why}; {GENERATE}"
                ));
            }
        }
        (None, false) => warnings.push(
            "no secret configured: any local process can score, read verdicts and post batches"
                .to_string(),
        ),
        (Some(s), false) => {
            if let Some(why) = weakness(s) {
                warnings.push(format!(
                    "ABUSE_SCORER_SECRET {why}: fine on loopback, refused on any other address"
                ));
            }
        }
    }
    match operator_token {
        Some(t) => {
            if let Some(why) = weakness(t) {
                return Err(format!("refusing to start: ABUSE_OPERATOR_TOKEN {why}; {GENERATE}"));
            }
            if secret.is_some_and(|s| s == t) {
                return Err(
                    "refusing to start: ABUSE_OPERATOR_TOKEN must differ from ABUSE_SCORER_SECRET \
                     (the filters hold the secret; they must not read the dashboard)"
                        .to_string(),
                );
            }
        }
        None if public => warnings.push(
            "no operator token (ABUSE_OPERATOR_TOKEN): the dashboard and /metrics answer only to \
             127.0.0.1 and ::1"
                .to_string(),
        ),
        None => {}
    }
    Ok(warnings)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_ranges() {
        let cli = Cli::try_parse_from(["abuse-scorer"]).unwrap();
        assert_eq!((cli.warm_up, cli.block_at, cli.ttl_s), (200, 100.0, 30));
        assert!(Cli::try_parse_from(["abuse-scorer", "--block-at", "0"]).is_err());
        assert!(Cli::try_parse_from(["abuse-scorer", "--ttl-s", "0"]).is_err());
        let cli = Cli::try_parse_from(["abuse-scorer", "--listen", "127.0.0.1:0", "--secret", ""])
            .unwrap();
        assert_eq!(cli.secret(), None);
    }

    const STRONG: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    const OTHER: &str = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn off_loopback_a_strong_secret_is_required() {
        let public = addr("0.0.0.0:8081");
        let e = check_deployment(public, None, None).unwrap_err();
        assert!(e.contains("refusing to listen on 0.0.0.0:8081 without a secret"), "{e}");
        assert!(e.contains("ABUSE_SCORER_SECRET"), "{e}");
        for weak in ["demo-secret", "change-me", "secret", "CHANGE-ME", "short-but-random-9f86d0"] {
            let e = check_deployment(public, Some(weak), None).unwrap_err();
            assert!(e.contains("weak ABUSE_SCORER_SECRET"), "{weak}: {e}");
        }
        let e = check_deployment(public, Some("short-but-random-9f86d0"), None).unwrap_err();
        assert!(e.contains("is 23 bytes long") && !e.contains("9f86d0"), "never quotes a value: {e}");
        let e = check_deployment(public, Some(&"a".repeat(64)), None).unwrap_err();
        assert!(e.contains("distinct characters"), "{e}");
        let e = check_deployment(public, Some("change-me-change-me-change-me-change-me"), None).unwrap_err();
        assert!(e.contains("placeholder"), "{e}");
        let e = check_deployment(addr("[::]:8081"), Some("demo-secret"), None).unwrap_err();
        assert!(e.contains("placeholder") && !e.contains("demo-secret"), "{e}");
        let warnings = check_deployment(addr("10.1.2.3:8081"), Some(STRONG), None).unwrap();
        assert!(warnings.iter().any(|w| w.contains("answer only to")), "{warnings:?}");
        assert_eq!(check_deployment(public, Some(STRONG), Some(OTHER)).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn on_loopback_a_missing_or_weak_secret_is_a_warning() {
        let w = check_deployment(addr("127.0.0.1:0"), None, None).unwrap();
        assert!(w[0].contains("no secret"), "{w:?}");
        let w = check_deployment(addr("[::1]:8081"), Some("demo-secret"), None).unwrap();
        assert!(w[0].contains("refused on any other address"), "{w:?}");
        assert!(check_deployment(addr("127.0.0.1:0"), Some(STRONG), None).unwrap().is_empty());
    }

    #[test]
    fn an_operator_token_must_be_strong_and_not_the_secret() {
        let local = addr("127.0.0.1:0");
        let e = check_deployment(local, Some(STRONG), Some("admin")).unwrap_err();
        assert!(e.contains("ABUSE_OPERATOR_TOKEN is 5 bytes long"), "{e}");
        let e = check_deployment(local, Some(STRONG), Some(STRONG)).unwrap_err();
        assert!(e.contains("must differ"), "{e}");
        assert!(check_deployment(local, None, Some(OTHER)).is_ok());
        let cli = Cli::try_parse_from(["abuse-scorer", "--operator-token", "", "--secret", STRONG]).unwrap();
        assert_eq!(cli.operator_token(), None);
        let shown = format!("{cli:?}");
        assert!(!shown.contains(STRONG) && shown.contains("<set>"), "{shown}");
    }
}
