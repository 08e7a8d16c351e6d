//! Command line and environment. Every flag can also come from the
//! environment (container deployments), the secret preferably so: a
//! command line is visible to every user of the machine.

use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Clone, Parser)]
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
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
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
}
