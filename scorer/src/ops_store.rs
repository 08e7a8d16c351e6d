//! Where the operator's state lives: the allow entries and the audit log.
//!
//! In memory always (at most [`MAX_ALLOW_ENTRIES`] entries, expired ones
//! dropped on every read; the last [`AUDIT_CAP`] audit records), and in
//! Redis when configured, so every scorer of a fleet hands every Envoy the
//! same list:
//!
//! | key | type | what |
//! |---|---|---|
//! | `abuse:v1:allow` | hash | entry id → `AllowRecord` JSON; expires 90 days after its last change (no entry lasts longer) |
//! | `abuse:v1:audit` | list | `AuditRecord` JSON, newest first, trimmed to 10,000; expires 400 days after its last change |
//!
//! Reads go to Redis and fall back to memory when it fails (counted as the
//! fleet's are, see `store::Fleet::redis_result`).

use crate::allow::{AllowRecord, MAX_ALLOW_ENTRIES, MAX_TTL_S};
use crate::audit::{AuditRecord, AUDIT_CAP, AUDIT_TTL_MS};
use crate::store::redis::bounded;
use crate::store::{Fleet, StoreError};
use redis::aio::ConnectionManager;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

const ALLOW_KEY: &str = "abuse:v1:allow";
const AUDIT_KEY: &str = "abuse:v1:audit";

#[derive(Default)]
struct Local {
    allows: BTreeMap<String, AllowRecord>,
    /// Newest first.
    audit: VecDeque<AuditRecord>,
    /// Whether records ever left the audit (then the past is incomplete).
    trimmed: bool,
}

pub struct OpsStore {
    local: Mutex<Local>,
    redis: Option<ConnectionManager>,
}

/// Why an entry could not be added.
#[derive(Debug, PartialEq, Eq)]
pub enum AddError {
    Full,
}

impl OpsStore {
    pub fn new(redis: Option<ConnectionManager>) -> OpsStore {
        OpsStore { local: Mutex::new(Local::default()), redis }
    }

    fn local(&self) -> MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The entries in force, oldest first.
    pub async fn allows(&self, fleet: &Fleet, now_ms: u64) -> Vec<AllowRecord> {
        let local = {
            let mut l = self.local();
            l.allows.retain(|_, e| e.until_ms > now_ms);
            l.allows.values().cloned().collect::<Vec<_>>()
        };
        let Some(conn) = &self.redis else { return local };
        match fleet.redis_result("allows", redis_allows(conn, now_ms).await, now_ms) {
            Some(mut remote) => {
                remote.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
                remote.truncate(MAX_ALLOW_ENTRIES);
                remote
            }
            None => local,
        }
    }

    /// Adds an entry unless [`MAX_ALLOW_ENTRIES`] are in force.
    pub async fn add_allow(&self, fleet: &Fleet, entry: &AllowRecord, now_ms: u64) -> Result<(), AddError> {
        if self.allows(fleet, now_ms).await.len() >= MAX_ALLOW_ENTRIES {
            return Err(AddError::Full);
        }
        self.local().allows.insert(entry.id.clone(), entry.clone());
        if let Some(conn) = &self.redis {
            let result = async {
                let json = serde_json::to_string(entry).map_err(|e| StoreError(e.to_string()))?;
                let mut c = conn.clone();
                let id = entry.id.clone();
                bounded(async move {
                    redis::pipe()
                        .cmd("HSET")
                        .arg(ALLOW_KEY)
                        .arg(id)
                        .arg(json)
                        .ignore()
                        .cmd("PEXPIRE")
                        .arg(ALLOW_KEY)
                        .arg(MAX_TTL_S.saturating_mul(1000))
                        .ignore()
                        .query_async::<()>(&mut c)
                        .await
                })
                .await
            }
            .await;
            fleet.redis_result("add_allow", result, now_ms);
        }
        Ok(())
    }

    /// Removes an entry; the entry if it was in force.
    pub async fn remove_allow(&self, fleet: &Fleet, id: &str, now_ms: u64) -> Option<AllowRecord> {
        let found = self.allows(fleet, now_ms).await.into_iter().find(|e| e.id == id);
        self.local().allows.remove(id);
        if let Some(conn) = &self.redis {
            let mut c = conn.clone();
            let id = id.to_string();
            let result = bounded(async move { redis::cmd("HDEL").arg(ALLOW_KEY).arg(id).query_async::<()>(&mut c).await }).await;
            fleet.redis_result("remove_allow", result, now_ms);
        }
        found
    }

    pub async fn audit(&self, fleet: &Fleet, record: &AuditRecord, now_ms: u64) {
        {
            let mut l = self.local();
            l.audit.push_front(record.clone());
            while l.audit.len() > AUDIT_CAP {
                l.audit.pop_back();
                l.trimmed = true;
            }
        }
        let Some(conn) = &self.redis else { return };
        let result = async {
            let json = serde_json::to_string(record).map_err(|e| StoreError(e.to_string()))?;
            let mut c = conn.clone();
            bounded(async move {
                redis::pipe()
                    .atomic()
                    .cmd("LPUSH")
                    .arg(AUDIT_KEY)
                    .arg(json)
                    .ignore()
                    .cmd("LTRIM")
                    .arg(AUDIT_KEY)
                    .arg(0)
                    .arg(AUDIT_CAP as i64 - 1)
                    .ignore()
                    .cmd("PEXPIRE")
                    .arg(AUDIT_KEY)
                    .arg(AUDIT_TTL_MS)
                    .ignore()
                    .query_async::<()>(&mut c)
                    .await
            })
            .await
        }
        .await;
        fleet.redis_result("audit", result, now_ms);
    }

    /// The audit log, newest first, and whether it is complete (nothing
    /// ever trimmed from it).
    pub async fn audit_log(&self, fleet: &Fleet, now_ms: u64) -> (Vec<AuditRecord>, bool) {
        self.audit_newest(fleet, AUDIT_CAP, now_ms).await
    }

    /// The newest `n` audit records (a client's state needs only recent
    /// lifts: a quiet period lasts a day at most), and whether the log is complete.
    pub async fn audit_newest(&self, fleet: &Fleet, n: usize, now_ms: u64) -> (Vec<AuditRecord>, bool) {
        let local = {
            let l = self.local();
            (l.audit.iter().take(n).cloned().collect::<Vec<_>>(), !l.trimmed)
        };
        let Some(conn) = &self.redis else { return local };
        let mut c = conn.clone();
        let last = i64::try_from(n).unwrap_or(i64::MAX).saturating_sub(1);
        let result = bounded(async move {
            redis::cmd("LRANGE").arg(AUDIT_KEY).arg(0).arg(last).query_async::<Vec<String>>(&mut c).await
        })
        .await;
        match fleet.redis_result("audit_log", result, now_ms) {
            Some(rows) => {
                let complete = rows.len() < n.min(AUDIT_CAP);
                let records = rows.iter().filter_map(|j| serde_json::from_str(j).ok()).collect();
                (records, complete)
            }
            None => local,
        }
    }
}

async fn redis_allows(conn: &ConnectionManager, now_ms: u64) -> Result<Vec<AllowRecord>, StoreError> {
    let mut c = conn.clone();
    let rows: Vec<String> =
        bounded(async move { redis::cmd("HVALS").arg(ALLOW_KEY).query_async(&mut c).await }).await?;
    let (live, expired): (Vec<AllowRecord>, Vec<AllowRecord>) = rows
        .iter()
        .filter_map(|j| serde_json::from_str::<AllowRecord>(j).ok())
        .partition(|e| e.until_ms > now_ms);
    if !expired.is_empty() {
        let mut c = conn.clone();
        let ids: Vec<String> = expired.into_iter().map(|e| e.id).collect();
        bounded(async move { redis::cmd("HDEL").arg(ALLOW_KEY).arg(ids).query_async::<()>(&mut c).await }).await?;
    }
    Ok(live)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::audit::Change;

    fn entry(id: &str, created: u64, until: u64) -> AllowRecord {
        AllowRecord {
            id: id.into(),
            kind: "agent".into(),
            value: "1a2b3c4d".into(),
            until_ms: until,
            author: "alice".into(),
            note: String::new(),
            created_ms: created,
        }
    }

    async fn contract(ops: &OpsStore, fleet: &Fleet, t: u64) {
        ops.add_allow(fleet, &entry("a", t, t + 60_000), t).await.unwrap();
        ops.add_allow(fleet, &entry("b", t + 1, t + 1_000), t + 1).await.unwrap();
        let ids = |v: Vec<AllowRecord>| v.into_iter().map(|e| e.id).collect::<Vec<_>>();
        assert_eq!(ids(ops.allows(fleet, t + 2).await), vec!["a", "b"]);
        assert_eq!(ids(ops.allows(fleet, t + 1_000).await), vec!["a"], "an expired entry drops out");
        assert_eq!(ops.remove_allow(fleet, "a", t + 2_000).await.unwrap().id, "a");
        assert!(ops.remove_allow(fleet, "a", t + 2_000).await.is_none());
        assert!(ops.allows(fleet, t + 2_000).await.is_empty());
        // Full at MAX_ALLOW_ENTRIES.
        for i in 0..MAX_ALLOW_ENTRIES {
            ops.add_allow(fleet, &entry(&format!("n{i:03}"), t, t + 60_000), t + 3_000).await.unwrap();
        }
        assert_eq!(ops.add_allow(fleet, &entry("over", t, t + 60_000), t + 3_000).await, Err(AddError::Full));
        for n in 0..3 {
            let r = AuditRecord {
                at_ms: t + n,
                author: "alice".into(),
                peer: "127.0.0.1".into(),
                target: format!("t{n}"),
                note: "why".into(),
                change: Change::AllowRemove { id: format!("x{n}") },
            };
            ops.audit(fleet, &r, t + n).await;
        }
        let (log, complete) = ops.audit_log(fleet, t + 5).await;
        assert!(complete);
        assert_eq!(log.iter().map(|r| r.target.as_str()).collect::<Vec<_>>(), vec!["t2", "t1", "t0"], "newest first");
    }

    #[tokio::test]
    async fn memory_keeps_the_contract() {
        contract(&OpsStore::new(None), &Fleet::memory(), 1_700_000_000_000).await;
    }

    #[test]
    fn redis_keeps_the_contract() {
        let Some(server) = crate::store::redis::tests::start_redis() else { return };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let metrics = crate::metrics::Metrics::new().unwrap();
            let fleet = Fleet::redis(
                &format!("redis://127.0.0.1:{}", server.port),
                crate::store::FleetMetrics {
                    errors: metrics.store_errors.clone(),
                    fallbacks: metrics.store_fallbacks.clone(),
                    redis_up: metrics.redis_up.clone(),
                },
            )
            .unwrap();
            let ops = OpsStore::new(fleet.redis_conn());
            contract(&ops, &fleet, crate::clock::now_ms()).await;
            // A second scorer on the same Redis sees the same list.
            let other = OpsStore::new(fleet.redis_conn());
            assert_eq!(other.allows(&fleet, crate::clock::now_ms()).await.len(), MAX_ALLOW_ENTRIES);
            assert_eq!(other.audit_log(&fleet, crate::clock::now_ms()).await.0.len(), 3);
            assert_eq!(metrics.store_fallbacks.get(), 0);
        });
    }
}
