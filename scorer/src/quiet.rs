//! Quiet periods on the scorer's side: after an operator lifts a client
//! with `quiet_s`, the scorer publishes no new fleet block for it on the
//! lifted reasons (none given: any) until the period ends, and answers its
//! callouts with at most a tag — otherwise the scorer's own fleet signals
//! could box again, fleet-wide, the client the operator just let through.
//! The filters hold the same period for their own detectors (the lift's
//! `quiet_until_ms`).
//!
//! In memory (at most [`QUIET_CAP`] clients) and, with Redis, under
//! `abuse:q:{label}` expiring with the period, so every scorer replica
//! honours it.

use crate::bounded::BoundedMap;
use crate::store::redis::bounded;
use crate::store::{Fleet, StoreError};
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use std::sync::{Mutex, PoisonError};

pub const QUIET_CAP: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuietPeriod {
    pub until_ms: u64,
    /// Empty: every reason.
    pub reasons: Vec<String>,
}

impl QuietPeriod {
    /// Whether a block for `reasons` is held off.
    pub fn holds_off(&self, reasons: &[String], now_ms: u64) -> bool {
        self.until_ms > now_ms && (self.reasons.is_empty() || reasons.iter().any(|r| self.reasons.contains(r)))
    }
}

pub struct Quiet {
    local: Mutex<BoundedMap<String, QuietPeriod>>,
    redis: Option<ConnectionManager>,
}

fn key(label: &str) -> String {
    format!("abuse:q:{label}")
}

impl Quiet {
    pub fn new(redis: Option<ConnectionManager>) -> Quiet {
        // "Touched" at the period's end (see `set`): a live one (a day at
        // most) gets second chances before anything is evicted.
        Quiet { local: Mutex::new(BoundedMap::new(QUIET_CAP, 24 * 60 * 60 * 1000)), redis }
    }

    pub async fn set(&self, fleet: &Fleet, labels: &[String], period: &QuietPeriod, now_ms: u64) {
        if period.until_ms <= now_ms {
            return;
        }
        {
            let mut local = self.local.lock().unwrap_or_else(PoisonError::into_inner);
            for l in labels {
                *local.entry_or_insert_with(l.clone(), period.until_ms, || period.clone()) = period.clone();
            }
        }
        let Some(conn) = &self.redis else { return };
        let result = async {
            let json = serde_json::to_string(period).map_err(|e| StoreError(e.to_string()))?;
            let mut pipe = redis::pipe();
            for l in labels {
                pipe.cmd("SET").arg(key(l)).arg(&json).arg("PX").arg(period.until_ms - now_ms).ignore();
            }
            let mut c = conn.clone();
            bounded(async move { pipe.query_async::<()>(&mut c).await }).await
        }
        .await;
        fleet.redis_result("set_quiet", result, now_ms);
    }

    /// The live quiet periods of `labels` (a label and its address).
    pub async fn get(&self, fleet: &Fleet, labels: &[&str], now_ms: u64) -> Vec<QuietPeriod> {
        let local: Vec<QuietPeriod> = {
            let local = self.local.lock().unwrap_or_else(PoisonError::into_inner);
            labels
                .iter()
                .filter_map(|l| local.get(&(*l).to_string()).cloned())
                .filter(|p| p.until_ms > now_ms)
                .collect()
        };
        let Some(conn) = &self.redis else { return local };
        let mut pipe = redis::pipe();
        for l in labels {
            pipe.cmd("GET").arg(key(l));
        }
        let mut c = conn.clone();
        let result = bounded(async move { pipe.query_async::<Vec<Option<String>>>(&mut c).await }).await;
        match fleet.redis_result("get_quiet", result, now_ms) {
            Some(rows) => rows
                .into_iter()
                .flatten()
                .filter_map(|j| serde_json::from_str::<QuietPeriod>(&j).ok())
                .filter(|p| p.until_ms > now_ms)
                .collect(),
            None => local,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_period_holds_off_its_reasons_until_it_ends() {
        let all = QuietPeriod { until_ms: 1_000, reasons: vec![] };
        let some = QuietPeriod { until_ms: 1_000, reasons: vec!["credential_stuffing".into()] };
        let stuffing = vec!["credential_stuffing".to_string()];
        let probing = vec!["probing".to_string()];
        assert!(all.holds_off(&probing, 999) && !all.holds_off(&probing, 1_000));
        assert!(some.holds_off(&stuffing, 10) && !some.holds_off(&probing, 10));
    }

    async fn contract(q: &Quiet, fleet: &Fleet, t: u64) {
        let p = QuietPeriod { until_ms: t + 60_000, reasons: vec![] };
        q.set(fleet, &["203.0.113.7".into(), "203.0.113.7#pool".into()], &p, t).await;
        assert_eq!(q.get(fleet, &["203.0.113.7#1a2b3c4d", "203.0.113.7"], t + 1).await, vec![p.clone()]);
        assert!(q.get(fleet, &["198.51.100.1"], t).await.is_empty());
        assert!(q.get(fleet, &["203.0.113.7"], t + 60_000).await.is_empty(), "over");
    }

    #[tokio::test]
    async fn memory_keeps_periods() {
        contract(&Quiet::new(None), &Fleet::memory(), 1_700_000_000_000).await;
    }

    #[test]
    fn redis_shares_periods_between_replicas() {
        let Some(server) = crate::store::redis::tests::start_redis() else { return };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let m = crate::metrics::Metrics::new().unwrap();
            let fleet = Fleet::redis(
                &format!("redis://127.0.0.1:{}", server.port),
                crate::store::FleetMetrics { errors: m.store_errors.clone(), fallbacks: m.store_fallbacks.clone(), redis_up: m.redis_up.clone() },
            )
            .unwrap();
            let t = crate::clock::now_ms();
            contract(&Quiet::new(fleet.redis_conn()), &fleet, t).await;
            let p = QuietPeriod { until_ms: t + 60_000, reasons: vec!["probing".into()] };
            Quiet::new(fleet.redis_conn()).set(&fleet, &["192.0.2.9".into()], &p, t).await;
            assert_eq!(Quiet::new(fleet.redis_conn()).get(&fleet, &["192.0.2.9"], t).await, vec![p], "another replica sees it");
            assert_eq!(m.store_fallbacks.get(), 0);
        });
    }
}
