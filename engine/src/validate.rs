//! What every configuration section's validation uses: the error that
//! names the key (`rate.limits[0].requests`), range checks, header names
//! and CIDRs. Below every section, so that each detector validates its own.

use ipnet::IpNet;
use std::fmt;
use std::net::IpAddr;

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
pub(crate) fn check_list(key: &str, len: usize, max: usize) -> Result<(), ConfigError> {
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
