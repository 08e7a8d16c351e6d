//! The dashboard's fleet counts in Redis, so that every scorer replica's
//! dashboard shows the whole fleet (each replica only receives the batches
//! of the filters that call it). Same buckets and bounds as `fleetview`:
//!
//! | key | type | what |
//! |---|---|---|
//! | `abuse:v1:view:{bucket ms}` | hash | `r␟{reason}`, `e␟{endpoint}`, `er␟{endpoint}␟{reason}`, `i␟{instance}` → requests; `refused`, `tagged`, `monitored`; `#{kind}` names taken (at most 32 per kind, then `{kind}␟other`); expires after 10 minutes |
//! | `abuse:v1:view:top:{bucket ms}` | sorted set | client label → requests decided in the bucket, the top 200 kept; expires after 10 minutes |
//! | `abuse:v1:view:client:{label}` | hash | `decisions`, `refusals`, `address`, `reasons` (JSON), `last_ms`, `last_id`, `last_endpoint`; expires 10 minutes after its last write |
//!
//! (`␟` is the unit separator, 0x1f: no name can hold it, `decisions::check`
//! refuses control characters.)

use crate::dashboard::{BUCKETS, BUCKET_MS};
use crate::fleetview::{endpoint_of, refused, requests_of, Bucket, TopClient, NAMES_CAP, TOP_CLIENTS};
use crate::store::redis::bounded;
use crate::store::StoreError;
use abuse_engine::wire::DecisionEvent;
use redis::aio::ConnectionManager;
use std::collections::HashMap;

const SEP: char = '\u{1f}';
const WINDOW_MS: u64 = BUCKET_MS * BUCKETS as u64;
/// Clients ranked per bucket.
const TOP_PER_BUCKET: i64 = 200;

fn bucket_key(start_ms: u64) -> String {
    format!("abuse:v1:view:{start_ms}")
}

fn top_key(start_ms: u64) -> String {
    format!("abuse:v1:view:top:{start_ms}")
}

fn client_key(label: &str) -> String {
    format!("abuse:v1:view:client:{label}")
}

/// KEYS[1]: the bucket. ARGV: the name cap, the time to live (ms), then
/// (kind, name, n) triples; an empty kind is a plain counter.
const ADD: &str = r"
local cap = tonumber(ARGV[1])
for i = 3, #ARGV, 3 do
  local kind, name, n = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local f = name
  if kind ~= '' then
    f = kind .. '\31' .. name
    if redis.call('HEXISTS', KEYS[1], f) == 0 then
      local taken = tonumber(redis.call('HGET', KEYS[1], '#' .. kind) or '0')
      if taken >= cap then f = kind .. '\31other' else redis.call('HINCRBY', KEYS[1], '#' .. kind, 1) end
    end
  end
  redis.call('HINCRBY', KEYS[1], f, n)
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 0
";

/// Counts a batch's events, received at `now_ms`.
pub async fn record(conn: &ConnectionManager, events: &[DecisionEvent], now_ms: u64) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    let start = now_ms - now_ms % BUCKET_MS;
    let mut add = redis::cmd("EVAL");
    add.arg(ADD).arg(1).arg(bucket_key(start)).arg(NAMES_CAP).arg(WINDOW_MS);
    let mut pipe = redis::pipe();
    for d in events {
        let n = requests_of(d);
        let endpoint = endpoint_of(d);
        for r in &d.reasons {
            add.arg("r").arg(&r.reason).arg(n);
            add.arg("er").arg(format!("{endpoint}{SEP}{}", r.reason)).arg(n);
        }
        add.arg("e").arg(&endpoint).arg(n);
        add.arg("i").arg(&d.instance).arg(n);
        let counter = if d.mode == "monitor" {
            "monitored"
        } else if refused(d) {
            "refused"
        } else {
            "tagged"
        };
        add.arg("").arg(counter).arg(n);
        let top = top_key(start);
        pipe.cmd("ZINCRBY").arg(&top).arg(n).arg(&d.client).ignore();
        let key = client_key(&d.client);
        if d.action == "penalty" {
            pipe.cmd("HINCRBY").arg(&key).arg("refusals").arg(n).ignore();
        } else {
            let reasons: Vec<&str> = d.reasons.iter().map(|r| r.reason.as_str()).collect();
            pipe.cmd("HINCRBY").arg(&key).arg("decisions").arg(1).ignore();
            if refused(d) {
                pipe.cmd("HINCRBY").arg(&key).arg("refusals").arg(n).ignore();
            }
            pipe.cmd("HSET")
                .arg(&key)
                .arg("last_id")
                .arg(&d.id)
                .arg("reasons")
                .arg(serde_json::to_string(&reasons).unwrap_or_default())
                .ignore();
        }
        pipe.cmd("HSET")
            .arg(&key)
            .arg("address")
            .arg(&d.address)
            .arg("last_ms")
            .arg(now_ms)
            .arg("last_endpoint")
            .arg(&endpoint)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(WINDOW_MS)
            .ignore();
    }
    let top = top_key(start);
    pipe.cmd("ZREMRANGEBYRANK").arg(&top).arg(0).arg(-TOP_PER_BUCKET - 1).ignore();
    pipe.cmd("PEXPIRE").arg(&top).arg(WINDOW_MS).ignore();
    pipe.add_command(add).ignore();
    let mut c = conn.clone();
    bounded(async move { pipe.query_async::<()>(&mut c).await }).await
}

/// A bucket from its hash.
fn bucket_of(start_ms: u64, fields: HashMap<String, u64>) -> Bucket {
    let mut b = Bucket { start_ms, ..Bucket::default() };
    for (f, n) in fields {
        match f.split_once(SEP) {
            Some(("r", name)) => {
                b.reasons.insert(name.to_string(), n);
            }
            Some(("e", name)) => b.endpoints.entry(name.to_string()).or_default().0 += n,
            Some(("er", pair)) => {
                if let Some((endpoint, reason)) = pair.rsplit_once(SEP) {
                    b.endpoints.entry(endpoint.to_string()).or_default().1.insert(reason.to_string());
                }
            }
            Some(("i", name)) => {
                b.instances.insert(name.to_string(), n);
            }
            None if f == "refused" => b.refused = n,
            None if f == "tagged" => b.tagged = n,
            None if f == "monitored" => b.monitored = n,
            _ => {}
        }
    }
    // A reason seen on an endpoint that fell into `other` names no row.
    b.endpoints.retain(|_, (n, _)| *n > 0);
    b
}

/// The buckets' hashes and the clients ranked over them, as Redis answers.
type Raw = (Vec<HashMap<String, u64>>, Vec<(String, f64)>);

/// The buckets of the last 10 minutes and the top clients.
pub async fn read(conn: &ConnectionManager, now_ms: u64) -> Result<(Vec<Bucket>, Vec<TopClient>), StoreError> {
    let current = now_ms - now_ms % BUCKET_MS;
    let starts: Vec<u64> = (0..BUCKETS as u64).map(|i| current.saturating_sub(i * BUCKET_MS)).collect();
    let mut pipe = redis::pipe();
    for s in &starts {
        pipe.cmd("HGETALL").arg(bucket_key(*s));
    }
    let mut union = redis::cmd("ZUNION");
    union.arg(starts.len());
    for s in &starts {
        union.arg(top_key(*s));
    }
    union.arg("WITHSCORES");
    pipe.add_command(union);
    let mut c = conn.clone();
    let (hashes, ranked): Raw = bounded(async move {
        let mut values: Vec<redis::Value> = pipe.query_async(&mut c).await?;
        let ranked_value = values.pop().unwrap_or(redis::Value::Nil);
        let hashes = values
            .into_iter()
            .map(redis::from_redis_value::<HashMap<String, u64>>)
            .collect::<Result<Vec<_>, _>>()?;
        let ranked = redis::from_redis_value::<Vec<(String, f64)>>(ranked_value)?;
        Ok((hashes, ranked))
    })
    .await?;
    let buckets: Vec<Bucket> = starts.iter().zip(hashes).map(|(s, h)| bucket_of(*s, h)).collect();
    let mut ranked = ranked;
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked.truncate(TOP_CLIENTS);
    let mut pipe = redis::pipe();
    for (label, _) in &ranked {
        pipe.cmd("HGETALL").arg(client_key(label));
    }
    let mut c = conn.clone();
    let rows: Vec<HashMap<String, String>> = if ranked.is_empty() {
        Vec::new()
    } else {
        bounded(async move { pipe.query_async(&mut c).await }).await?
    };
    let mut clients: Vec<TopClient> = ranked
        .iter()
        .zip(rows)
        .filter(|(_, row)| !row.is_empty())
        .map(|((label, _), row)| {
            let num = |k: &str| row.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            let text = |k: &str| row.get(k).cloned().unwrap_or_default();
            TopClient {
                client: label.clone(),
                address: text("address"),
                decisions: num("decisions"),
                refusals: num("refusals"),
                reasons: row.get("reasons").and_then(|j| serde_json::from_str(j).ok()).unwrap_or_default(),
                last_ms: num("last_ms"),
                last_id: text("last_id"),
                last_endpoint: text("last_endpoint"),
            }
        })
        .filter(|c| now_ms.saturating_sub(c.last_ms) < WINDOW_MS)
        .collect();
    clients.sort_by(|a, b| (b.refusals + b.decisions).cmp(&(a.refusals + a.decisions)).then(b.last_ms.cmp(&a.last_ms)));
    Ok((buckets, clients))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::decisions::tests::event;
    use crate::fleetview::{data_of, FleetView};

    #[test]
    fn two_replicas_show_one_fleet_as_memory_would() {
        let Some(server) = crate::store::redis::tests::start_redis() else { return };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let url = format!("redis://127.0.0.1:{}", server.port);
            let a = crate::store::redis::RedisStore::connect_lazy(&url).unwrap().connection();
            let b = crate::store::redis::RedisStore::connect_lazy(&url).unwrap().connection();
            let t = crate::clock::now_ms();
            let mut tag = event("b", "198.51.100.1#1a2b3c4d", "tag", t);
            tag.instance = "envoy-b".into();
            tag.path = "/api/products".into();
            tag.method = "GET".into();
            tag.hits = 12;
            let first = vec![event("a", "203.0.113.7", "block", t), event("a", "203.0.113.7", "penalty", t)];
            // One replica takes envoy-a's batch, the other envoy-b's.
            record(&a, &first, t).await.unwrap();
            record(&b, std::slice::from_ref(&tag), t).await.unwrap();
            let mut memory = FleetView::new();
            for d in first.iter().chain([&tag]) {
                memory.record(t, d);
            }
            let (buckets, clients) = read(&a, t + 1).await.unwrap();
            let from_redis = data_of(buckets.iter(), clients, t + 1);
            let from_memory = memory.data(t + 1);
            assert_eq!(from_redis.reasons, from_memory.reasons);
            assert_eq!(from_redis.endpoints, from_memory.endpoints);
            assert_eq!(from_redis.instances, from_memory.instances);
            assert_eq!((from_redis.refused, from_redis.tagged), (from_memory.refused, from_memory.tagged));
            assert_eq!(from_redis.blocked_share, from_memory.blocked_share);
            let attacked: Vec<(&str, &Vec<String>)> = from_redis.under_attack.iter().map(|a| (a.endpoint.as_str(), &a.reasons)).collect();
            assert_eq!(attacked.len(), 2);
            assert_eq!(attacked[0].0, "GET /api/products");
            let top: Vec<(&str, u64, u64)> = from_redis.top_clients.iter().map(|c| (c.client.as_str(), c.decisions, c.refusals)).collect();
            let mem: Vec<(&str, u64, u64)> = from_memory.top_clients.iter().map(|c| (c.client.as_str(), c.decisions, c.refusals)).collect();
            assert_eq!(top, mem);
            // Names stay bounded in Redis too.
            let many: Vec<DecisionEvent> = (0..50)
                .map(|i| DecisionEvent { path: format!("/p{i}"), ..event(&format!("x{i}"), "10.0.0.1", "block", t) })
                .collect();
            record(&b, &many, t).await.unwrap();
            let (buckets, _) = read(&a, t + 1).await.unwrap();
            let d = data_of(buckets.iter(), Vec::new(), t + 1);
            assert_eq!(d.endpoints.len(), NAMES_CAP + 1, "{:?}", d.endpoints.keys());
            assert!(d.endpoints.contains_key("other"));
        });
    }
}
