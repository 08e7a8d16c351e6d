//! Who is never judged (allowlist) and who is exempt from the crawling-type
//! detectors (declared good bots: user agent AND address must match).

use crate::config::{parse_cidr, Config, ConfigError};
use crate::identity::ClientAddr;
use ipnet::IpNet;

#[derive(Debug, Clone)]
struct GoodBot {
    user_agent: String,
    nets: Vec<IpNet>,
}

#[derive(Debug, Clone, Default)]
pub struct Exemptions {
    nets: Vec<IpNet>,
    api_keys: Vec<String>,
    good_bots: Vec<GoodBot>,
}

impl Exemptions {
    pub fn new(config: &Config) -> Result<Exemptions, ConfigError> {
        let parse = |key: String, text: &String| parse_cidr(text).map_err(|problem| ConfigError { key, problem });
        let mut nets = Vec::new();
        for (i, c) in config.allowlist.cidrs.iter().enumerate() {
            nets.push(parse(format!("allowlist.cidrs[{i}]"), c)?);
        }
        let mut good_bots = Vec::new();
        for (i, bot) in config.good_bots.iter().enumerate() {
            let mut bot_nets = Vec::new();
            for (j, c) in bot.cidrs.iter().enumerate() {
                bot_nets.push(parse(format!("good_bots[{i}].cidrs[{j}]"), c)?);
            }
            good_bots.push(GoodBot { user_agent: bot.user_agent.to_lowercase(), nets: bot_nets });
        }
        Ok(Exemptions { nets, api_keys: config.allowlist.api_keys.clone(), good_bots })
    }

    pub fn needs_api_key(&self) -> bool {
        !self.api_keys.is_empty()
    }

    pub fn needs_user_agent(&self) -> bool {
        !self.good_bots.is_empty()
    }

    pub fn allowlisted(&self, client: ClientAddr, api_key: Option<&str>) -> bool {
        let in_nets = match client {
            ClientAddr::Ip(ip) => self.nets.iter().any(|n| n.contains(&ip)),
            ClientAddr::Unknown => false,
        };
        in_nets || api_key.is_some_and(|k| self.api_keys.iter().any(|a| a == k))
    }

    pub fn good_bot(&self, client: ClientAddr, user_agent: Option<&str>) -> bool {
        let (ClientAddr::Ip(ip), Some(ua)) = (client, user_agent) else {
            return false;
        };
        let ua = ua.to_lowercase();
        self.good_bots
            .iter()
            .any(|b| ua.contains(b.user_agent.as_str()) && b.nets.iter().any(|n| n.contains(&ip)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn good_bots_need_both_agent_and_address() {
        let config = Config::from_json(
            br#"{"allowlist":{"cidrs":["10.0.0.0/8"],"api_keys":["k1"]},
                 "good_bots":[{"name":"google","user_agent":"Googlebot","cidrs":["66.249.64.0/19"]}]}"#,
        )
        .unwrap();
        let e = Exemptions::new(&config).unwrap();
        let ip = |s: &str| ClientAddr::Ip(s.parse().unwrap());
        assert!(e.allowlisted(ip("10.1.2.3"), None));
        assert!(e.allowlisted(ip("1.2.3.4"), Some("k1")));
        assert!(!e.allowlisted(ip("1.2.3.4"), Some("k2")));
        assert!(e.good_bot(ip("66.249.66.1"), Some("Mozilla/5.0 (compatible; Googlebot/2.1)")));
        assert!(!e.good_bot(ip("203.0.113.1"), Some("Mozilla/5.0 (compatible; Googlebot/2.1)")));
        assert!(!e.good_bot(ip("66.249.66.1"), Some("curl/8")));
    }
}
