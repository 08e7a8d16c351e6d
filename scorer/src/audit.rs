//! The audit log: every operator change (an unblock, an allow entry added
//! or removed) with who, when and why, newest first, the last
//! [`AUDIT_CAP`]. Allow entries are logged whole, so the allow list as it
//! stood at any past time can be replayed from it ([`allows_at`]).

use crate::allow::AllowRecord;
use serde::{Deserialize, Serialize};

pub const AUDIT_CAP: usize = 10_000;
/// How long Redis keeps the audit log after its last change.
pub const AUDIT_TTL_MS: u64 = 400 * 24 * 60 * 60 * 1000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// A client lifted everywhere: the labels lifted, the quiet period.
    Unblock { labels: Vec<String>, quiet_until_ms: u64, reasons: Vec<String> },
    AllowAdd { entry: AllowRecord },
    AllowRemove { id: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub at_ms: u64,
    /// Who: the author the operator gave (`x-abuse-operator`, an entry's `author`).
    pub author: String,
    /// The operator's connection (which machine made the change).
    pub peer: String,
    /// What it was about: an address, an allow entry's id.
    pub target: String,
    /// Why, as the operator wrote it.
    pub note: String,
    pub change: Change,
}

/// The allow list as it stood at `at_ms`, replayed from `log` (newest
/// first): entries added at or before then, not removed by then, not yet
/// expired. Complete only if the log reaches back far enough (the caller
/// knows whether it was ever trimmed).
pub fn allows_at(log: &[AuditRecord], at_ms: u64) -> Vec<AllowRecord> {
    let mut list: Vec<AllowRecord> = Vec::new();
    for r in log.iter().rev().filter(|r| r.at_ms <= at_ms) {
        match &r.change {
            Change::AllowAdd { entry } => {
                list.retain(|e| e.id != entry.id);
                list.push(entry.clone());
            }
            Change::AllowRemove { id } => list.retain(|e| &e.id != id),
            Change::Unblock { .. } => {}
        }
    }
    list.retain(|e| e.in_force(at_ms));
    list
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn entry(id: &str, created: u64, until: u64) -> AllowRecord {
        AllowRecord {
            id: id.into(),
            kind: "cidr".into(),
            value: "198.51.100.0/24".into(),
            until_ms: until,
            author: "alice".into(),
            note: "partner".into(),
            created_ms: created,
        }
    }

    fn rec(at: u64, change: Change) -> AuditRecord {
        AuditRecord { at_ms: at, author: "alice".into(), peer: "127.0.0.1".into(), target: String::new(), note: String::new(), change }
    }

    #[test]
    fn the_list_at_a_past_time_is_replayed() {
        // Newest first, as the log is kept.
        let log = vec![
            rec(400, Change::AllowRemove { id: "a".into() }),
            rec(300, Change::Unblock { labels: vec!["1.2.3.4".into()], quiet_until_ms: 0, reasons: vec![] }),
            rec(200, Change::AllowAdd { entry: entry("b", 200, 250) }),
            rec(100, Change::AllowAdd { entry: entry("a", 100, 10_000) }),
        ];
        let ids = |at| allows_at(&log, at).into_iter().map(|e| e.id).collect::<Vec<_>>();
        assert_eq!(ids(50), Vec::<String>::new());
        assert_eq!(ids(100), vec!["a"]);
        assert_eq!(ids(220), vec!["a", "b"]);
        assert_eq!(ids(260), vec!["a"], "b expired");
        assert_eq!(ids(400), Vec::<String>::new(), "a removed");
    }
}
