//! The operator's temporary allow entries (an address or prefix, an API
//! key's fleet hash, a user-agent tag), pushed by the scorer on the
//! fleet-verdicts answer. The polling worker writes the list in force to
//! shared data; every worker re-reads it on its tick when it changed (one
//! shared-data read per tick), so every worker of the Envoy honours it
//! within a tick of the poll. An allowed client is not judged, like one on
//! the configured allowlist, until the entry expires.

use super::{Engine, DOMAIN_SESSION};
use crate::identity::{agent_tag, ClientAddr};
use crate::state::store::SharedStore;
use crate::wire::{AllowEntry, MAX_ALLOW_ENTRIES};
use ipnet::IpNet;

/// Shared-data key of the entries in force (JSON, at most [`MAX_ALLOW_ENTRIES`]).
pub const ALLOW_KEY: &str = "abuse_filter/v1/operator_allow";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Matcher {
    Net(IpNet),
    ApiKey(u64),
    Agent(u32),
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Entry {
    matcher: Matcher,
    until_ms: u64,
}

/// One worker's copy of the list, and the shared-data version it came from.
#[derive(Debug, Default)]
pub struct OperatorAllows {
    version: Option<u32>,
    entries: Vec<Entry>,
    needs_api_key: bool,
    needs_agent: bool,
}

fn parse(entry: &AllowEntry) -> Option<Entry> {
    let matcher = match entry.kind.as_str() {
        "cidr" => Matcher::Net(crate::validate::parse_cidr(&entry.value).ok()?),
        "api_key" => Matcher::ApiKey(u64::from_str_radix(&entry.value, 16).ok()?),
        "agent" => Matcher::Agent(u32::from_str_radix(&entry.value, 16).ok()?),
        _ => return None,
    };
    Some(Entry { matcher, until_ms: entry.until_ms })
}

impl Engine {
    /// Writes the scorer's list (the polling worker), when it changed.
    pub(super) fn store_operator_allows(&self, store: &dyn SharedStore, entries: &[AllowEntry], now_ms: u64) {
        let live: Vec<&AllowEntry> =
            entries.iter().filter(|e| e.until_ms > now_ms && parse(e).is_some()).take(MAX_ALLOW_ENTRIES).collect();
        let Ok(body) = serde_json::to_vec(&live) else { return };
        let Ok((current, cas)) = store.get(ALLOW_KEY) else { return };
        let unchanged = match &current {
            Some(bytes) => *bytes == body,
            None => live.is_empty(),
        };
        if !unchanged {
            let _ = store.set(ALLOW_KEY, &body, cas);
        }
    }

    /// Re-reads the list when another worker changed it (each tick).
    pub(super) fn refresh_operator_allows(&self, store: &dyn SharedStore) {
        let Ok((value, version)) = store.get(ALLOW_KEY) else { return };
        let Ok(mut allows) = self.operator_allows.lock() else { return };
        if allows.version == version {
            return;
        }
        let entries: Vec<AllowEntry> = value.as_deref().and_then(|v| serde_json::from_slice(v).ok()).unwrap_or_default();
        allows.entries = entries.iter().take(MAX_ALLOW_ENTRIES).filter_map(parse).collect();
        allows.needs_api_key = allows.entries.iter().any(|e| matches!(e.matcher, Matcher::ApiKey(_)));
        allows.needs_agent = allows.entries.iter().any(|e| matches!(e.matcher, Matcher::Agent(_)));
        allows.version = version;
    }

    /// Whether an operator's entry in force allows this request's client.
    pub(super) fn operator_allowed(&self, client: ClientAddr, api_key: Option<&str>, user_agent: Option<&str>, now_ms: u64) -> bool {
        let Ok(allows) = self.operator_allows.lock() else { return false };
        if allows.entries.is_empty() {
            return false;
        }
        let key_hash = match (allows.needs_api_key, api_key) {
            (true, Some(k)) => Some(self.account_hasher.key(DOMAIN_SESSION, format!("key:{k}").as_bytes())),
            _ => None,
        };
        let agent = if allows.needs_agent { user_agent.map(agent_tag) } else { None };
        allows.entries.iter().any(|e| {
            e.until_ms > now_ms
                && match e.matcher {
                    Matcher::Net(net) => matches!(client, ClientAddr::Ip(ip) if net.contains(&ip)),
                    Matcher::ApiKey(h) => key_hash == Some(h),
                    Matcher::Agent(t) => agent == Some(t),
                }
        })
    }
}
