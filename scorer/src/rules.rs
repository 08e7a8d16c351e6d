//! Fleet-wide counts of the filters' `fleet` rules (`rules[].fleet`): each
//! Envoy worker sends, on its tick batch, what it counted per rule key
//! since its last batch ([`RuleCount`]); the scorer sums them per key over
//! the rule's sliding window and answers every batch with the keys over
//! their threshold ([`RuleKeyOver`]), which each Envoy then refuses (or
//! tags) itself. A distributed client is counted as one, whichever Envoy
//! and worker its requests reach.
//!
//! Where the counts live:
//!
//! * without Redis, in this scorer's memory ([`MemoryRules`]): at most
//!   [`MAX_FLEET_RULE_KEYS`] keys (the least recently counted one is
//!   evicted), each about 100 bytes;
//! * with Redis ([`FleetRules::new`] with a connection), in Redis, shared by
//!   every scorer replica: a key counted through replica A and replica B is
//!   one sum, and every replica answers every key over its threshold. The
//!   memory store is still fed, as the fallback: while Redis fails, a batch
//!   is judged on this scorer's own counts (never refused; the failure is
//!   counted in `abuse_scorer_store_fallbacks_total`), and a key it put over
//!   during the outage stays in its answers until its penalty ends.
//!
//! In Redis (one Lua script per batch, one round trip, atomic; the window is
//! the same [`SlidingWindow`] as in memory, aligned on a key's first count):
//!
//! | key | type | what |
//! |---|---|---|
//! | `abuse:v1:rules:k:{rule}:{key}` | hash | `s` (window start, ms), `c` (current window), `p` (previous): the sliding window; expires two windows after its last count |
//! | `abuse:v1:rules:seen` | sorted set | `{rule}:{key}` → last count (ms): at most [`MAX_FLEET_RULE_KEYS`], the least recently counted evicted with its window and over entry; members older than two days (twice the longest window) dropped; expires two days after the last count |
//! | `abuse:v1:rules:over` | sorted set | `{rule}:{key}` → over until (ms): ended entries dropped on every batch, at most [`MAX_FLEET_RULE_KEYS`]; expires when its last entry ends |
//!
//! (A rule name is `[a-z0-9_]`, a key 16 hex digits: `:` separates them.)
//! Every replica's answer is the [`MAX_RULE_KEYS_OVER`] latest-ending keys.

use crate::store::redis::bounded;
use crate::store::StoreError;
use abuse_engine::window::SlidingWindow;
use abuse_engine::wire::{RuleCount, RuleKeyOver, MAX_RULE_KEYS_OVER};
use redis::aio::ConnectionManager;
use std::collections::HashMap;
use std::sync::Mutex;

/// Rule keys tracked at most.
pub const MAX_FLEET_RULE_KEYS: usize = 16_384;
/// A key over a rule without a penalty stays over this long (the next
/// batches re-judge it).
const OVER_WITHOUT_PENALTY_MS: u64 = 2_000;

#[derive(Debug, Clone, Copy)]
struct Entry {
    window: SlidingWindow,
    last_ms: u64,
    over_until_ms: u64,
}

/// The counts in this scorer's memory (the store without Redis, and the
/// fallback with it).
#[derive(Debug, Default)]
pub struct MemoryRules {
    keys: Mutex<HashMap<(String, String), Entry>>,
}

/// The fleet rules' store (see the module doc).
#[derive(Default)]
pub struct FleetRules {
    local: MemoryRules,
    redis: Option<ConnectionManager>,
}

/// A count the scorer takes: a rule name of the filter's charset, a
/// 16-hex-digit key, sane window and threshold.
pub fn valid(c: &RuleCount) -> bool {
    let name_ok = !c.rule.is_empty()
        && c.rule.len() <= 48
        && c.rule.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    let key_ok = c.key.len() == 16 && c.key.bytes().all(|b| b.is_ascii_hexdigit());
    name_ok && key_ok && (1..=86_400).contains(&c.window_s) && c.threshold.is_finite() && c.threshold >= 1.0
}

/// How long a key over a rule stays over: its penalty, at least
/// [`OVER_WITHOUT_PENALTY_MS`].
fn hold_ms(c: &RuleCount) -> u64 {
    (u64::from(c.penalty_s) * 1000).max(OVER_WITHOUT_PENALTY_MS)
}

impl MemoryRules {
    /// Adds a batch's counts; returns how many were refused as invalid.
    pub fn add(&self, counts: &[RuleCount], now_ms: u64) -> u64 {
        let Ok(mut keys) = self.keys.lock() else {
            return counts.len() as u64;
        };
        let mut refused = 0;
        for c in counts {
            if !valid(c) {
                refused += 1;
                continue;
            }
            let id = (c.rule.clone(), c.key.to_ascii_lowercase());
            if !keys.contains_key(&id) && keys.len() >= MAX_FLEET_RULE_KEYS {
                // Full: the least recently counted key goes.
                if let Some(old) = keys.iter().min_by_key(|(_, e)| e.last_ms).map(|(k, _)| k.clone()) {
                    keys.remove(&old);
                }
            }
            let entry =
                keys.entry(id).or_insert(Entry { window: SlidingWindow::default(), last_ms: now_ms, over_until_ms: 0 });
            let window_ms = u64::from(c.window_s) * 1000;
            let n = u32::try_from(c.count).unwrap_or(u32::MAX);
            let estimate = entry.window.record_n(n, now_ms, window_ms);
            entry.last_ms = now_ms;
            if estimate >= c.threshold {
                let hold = hold_ms(c);
                entry.over_until_ms = entry.over_until_ms.max(now_ms.saturating_add(hold));
            }
        }
        refused
    }

    /// Every key over its threshold now (the latest first, at most [`MAX_RULE_KEYS_OVER`]).
    pub fn over(&self, now_ms: u64) -> Vec<RuleKeyOver> {
        let Ok(keys) = self.keys.lock() else {
            return Vec::new();
        };
        let mut out: Vec<RuleKeyOver> = keys
            .iter()
            .filter(|(_, e)| e.over_until_ms > now_ms)
            .map(|((rule, key), e)| RuleKeyOver { rule: rule.clone(), key: key.clone(), until_ms: e.over_until_ms })
            .collect();
        out.sort_by_key(|o| std::cmp::Reverse(o.until_ms));
        out.truncate(MAX_RULE_KEYS_OVER);
        out
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.keys.lock().map(|k| k.len()).unwrap_or(0)
    }
}

const KEY_PREFIX: &str = "abuse:v1:rules:k:";
const SEEN_KEY: &str = "abuse:v1:rules:seen";
const OVER_KEY: &str = "abuse:v1:rules:over";
/// How long the seen set keeps a key: two days, twice the longest window
/// (`valid`: a day); its window hash is gone by then.
const SEEN_TTL_MS: u64 = 2 * 86_400 * 1000;

/// `{rule}:{key}`: a key's name in the sorted sets, and its window's after the prefix.
fn member(c: &RuleCount) -> String {
    format!("{}:{}", c.rule, c.key.to_ascii_lowercase())
}

/// KEYS: the over set, the seen set, then each count's window hash.
/// ARGV: now (ms), the key cap, the answer cap, the window key prefix, the
/// seen set's time to live (ms), then per count (member, n, window ms,
/// threshold, hold ms). Per count, exactly as `MemoryRules::add`: makes
/// room (the least recently counted key goes, with its window and over
/// entry), rolls the key's `SlidingWindow` (see
/// `abuse_engine::window`), adds n, and puts the key over until now + hold
/// if the estimate reaches the threshold (never shortening a later until).
/// Then drops the ended over entries and returns the live ones, the latest
/// ending first, as (member, until) pairs.
const JUDGE: &str = r"
local now, cap, answer = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local prefix, seen_ttl = ARGV[4], tonumber(ARGV[5])
local function s(x) return string.format('%.0f', x) end
for i = 6, #ARGV, 5 do
  local key = KEYS[(i - 6) / 5 + 3]
  local member, n = ARGV[i], tonumber(ARGV[i + 1])
  local w, threshold, hold = math.max(tonumber(ARGV[i + 2]), 1), tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
  if not redis.call('ZSCORE', KEYS[2], member) and redis.call('ZCARD', KEYS[2]) >= cap then
    local old = redis.call('ZPOPMIN', KEYS[2])
    if old[1] then
      redis.call('DEL', prefix .. old[1])
      redis.call('ZREM', KEYS[1], old[1])
    end
  end
  local v = redis.call('HMGET', key, 's', 'c', 'p')
  local st, c, p = tonumber(v[1]) or 0, tonumber(v[2]) or 0, tonumber(v[3]) or 0
  if st == 0 or now < st then
    if st == 0 or st - now > w then st, c, p = math.max(now, 1), 0, 0 end
  else
    local e = now - st
    if e >= w then
      if e < 2 * w then p, st = c, st + w else p, st = 0, math.max(now, 1) end
      c = 0
    end
  end
  c = math.min(c + n, 4294967295)
  local e = math.min(math.max(now - st, 0), w)
  local estimate = p * (w - e) / w + c
  redis.call('HSET', key, 's', s(st), 'c', s(c), 'p', s(p))
  redis.call('PEXPIRE', key, s(2 * w))
  redis.call('ZADD', KEYS[2], s(now), member)
  if estimate >= threshold then
    local untl = now + hold
    local before = tonumber(redis.call('ZSCORE', KEYS[1], member)) or 0
    if untl > before then redis.call('ZADD', KEYS[1], s(untl), member) end
  end
end
if #ARGV >= 6 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', s(now - seen_ttl))
  redis.call('PEXPIRE', KEYS[2], s(seen_ttl))
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', s(now))
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -cap - 1)
local last = redis.call('ZREVRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if last[2] then redis.call('PEXPIRE', KEYS[1], s(math.max(tonumber(last[2]) - now, 1))) end
return redis.call('ZREVRANGEBYSCORE', KEYS[1], '+inf', '(' .. s(now), 'LIMIT', 0, answer, 'WITHSCORES')
";

/// Adds `counts` (all valid) to Redis's and answers the keys over, as
/// [`JUDGE`] does, with at most `cap` keys tracked.
async fn judge_redis(
    conn: &ConnectionManager,
    counts: &[&RuleCount],
    now_ms: u64,
    cap: usize,
) -> Result<Vec<RuleKeyOver>, StoreError> {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(JUDGE).arg(2 + counts.len()).arg(OVER_KEY).arg(SEEN_KEY);
    for c in counts {
        cmd.arg(format!("{KEY_PREFIX}{}", member(c)));
    }
    cmd.arg(now_ms).arg(cap).arg(MAX_RULE_KEYS_OVER).arg(KEY_PREFIX).arg(SEEN_TTL_MS);
    for c in counts {
        cmd.arg(member(c))
            .arg(u32::try_from(c.count).unwrap_or(u32::MAX))
            .arg(u64::from(c.window_s) * 1000)
            .arg(c.threshold.to_string())
            .arg(hold_ms(c));
    }
    let mut conn = conn.clone();
    let flat: Vec<String> = bounded(async move { cmd.query_async(&mut conn).await }).await?;
    let mut out = Vec::with_capacity(flat.len() / 2);
    for pair in flat.chunks_exact(2) {
        let [m, until] = pair else { continue };
        let Some((rule, key)) = m.split_once(':') else { continue };
        let Ok(until_ms) = until.parse::<f64>() else { continue };
        out.push(RuleKeyOver { rule: rule.to_string(), key: key.to_string(), until_ms: until_ms as u64 });
    }
    Ok(out)
}

/// Both answers in one: per key the later until, the latest first, at
/// most [`MAX_RULE_KEYS_OVER`].
fn union(a: Vec<RuleKeyOver>, b: Vec<RuleKeyOver>) -> Vec<RuleKeyOver> {
    let mut by_key: HashMap<(String, String), u64> = HashMap::with_capacity(a.len() + b.len());
    for o in a.into_iter().chain(b) {
        let until = by_key.entry((o.rule, o.key)).or_insert(0);
        *until = (*until).max(o.until_ms);
    }
    let mut out: Vec<RuleKeyOver> =
        by_key.into_iter().map(|((rule, key), until_ms)| RuleKeyOver { rule, key, until_ms }).collect();
    out.sort_by(|x, y| y.until_ms.cmp(&x.until_ms).then_with(|| x.rule.cmp(&y.rule)).then_with(|| x.key.cmp(&y.key)));
    out.truncate(MAX_RULE_KEYS_OVER);
    out
}

impl FleetRules {
    /// In Redis with a connection (and in memory as the fallback), in
    /// memory alone without.
    pub fn new(redis: Option<ConnectionManager>) -> FleetRules {
        FleetRules { local: MemoryRules::default(), redis }
    }

    /// Adds a batch's counts and answers every key over its threshold:
    /// how many counts were refused as invalid, the answer, and how Redis
    /// did (Ok without Redis). When Redis fails the answer is this
    /// scorer's own: the batch is never refused for it.
    pub async fn judge(&self, counts: &[RuleCount], now_ms: u64) -> (u64, Vec<RuleKeyOver>, Result<(), StoreError>) {
        let refused = self.local.add(counts, now_ms);
        let local = self.local.over(now_ms);
        let Some(conn) = &self.redis else {
            return (refused, local, Ok(()));
        };
        let valid: Vec<&RuleCount> = counts.iter().filter(|c| valid(c)).collect();
        match judge_redis(conn, &valid, now_ms, MAX_FLEET_RULE_KEYS).await {
            // A key this scorer put over during an outage stays over here
            // until its penalty ends, though Redis never heard of it.
            Ok(fleet) => (refused, union(fleet, local), Ok(())),
            Err(e) => (refused, local, Err(e)),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000;

    fn count(key: &str, n: u64) -> RuleCount {
        RuleCount { rule: "sms_pumping".into(), key: key.into(), count: n, window_s: 600, threshold: 5.0, penalty_s: 600 }
    }

    #[test]
    fn sums_across_envoys_and_answers_the_keys_over() {
        let f = MemoryRules::default();
        assert_eq!(f.add(&[count("00000000000000aa", 3)], T0), 0);
        assert!(f.over(T0).is_empty(), "3 of 5");
        f.add(&[count("00000000000000aa", 3), count("00000000000000bb", 2)], T0 + 1000);
        let over = f.over(T0 + 1000);
        assert_eq!(over.len(), 1);
        assert_eq!((over[0].key.as_str(), over[0].until_ms), ("00000000000000aa", T0 + 1000 + 600_000));
        assert!(f.over(T0 + 1000 + 600_001).is_empty(), "the penalty ends");
    }

    #[test]
    fn refuses_bad_counts_and_stays_bounded() {
        let f = MemoryRules::default();
        let bad = [
            RuleCount { rule: "Bad".into(), ..count("00000000000000aa", 1) },
            count("zz", 1),
            RuleCount { window_s: 0, ..count("00000000000000aa", 1) },
            RuleCount { threshold: f64::NAN, ..count("00000000000000aa", 1) },
        ];
        assert_eq!(f.add(&bad, T0), 4);
        for i in 0..(MAX_FLEET_RULE_KEYS as u64 + 100) {
            f.add(&[count(&format!("{i:016x}"), 1)], T0 + i);
        }
        assert_eq!(f.len(), MAX_FLEET_RULE_KEYS);
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    fn connect(port: u16) -> ConnectionManager {
        crate::store::redis::RedisStore::connect_lazy(&format!("redis://127.0.0.1:{port}")).unwrap().connection()
    }

    #[test]
    fn two_replicas_sum_in_redis_as_one_memory_would() {
        let Some(server) = crate::store::redis::tests::start_redis() else { return };
        rt().block_on(async {
            // Two replicas on one Redis; one memory store fed everything.
            let a = FleetRules::new(Some(connect(server.port)));
            let b = FleetRules::new(Some(connect(server.port)));
            let memory = MemoryRules::default();
            // Real time: Redis's expiries run on its clock.
            let t = crate::clock::now_ms();
            let short = |key: &str, n| RuleCount { window_s: 10, threshold: 5.0, penalty_s: 0, ..count(key, n) };
            let steps: Vec<(&FleetRules, u64, Vec<RuleCount>)> = vec![
                (&a, t, vec![count("00000000000000aa", 3), count("00000000000000bb", 2), short("00000000000000cc", 4)]),
                (&b, t + 1000, vec![count("00000000000000AA", 3), count("00000000000000bb", 2)]),
                (&a, t + 1500, vec![]),
                // cc: 4 in its first 10 s window, 2 at 15 s: 4·½ + 2 = 4, under 5.
                (&b, t + 15_000, vec![short("00000000000000cc", 2)]),
                // At 16 s: 4·0.4 + 2 + 2 = 5.6, over (for the 2 s minimum).
                (&a, t + 16_000, vec![short("00000000000000cc", 2)]),
                (&b, t + 17_000, vec![]),
                (&b, t + 18_001, vec![]),
            ];
            for (i, (replica, now, counts)) in steps.into_iter().enumerate() {
                assert_eq!(memory.add(&counts, now), 0);
                let (refused, over, redis) = replica.judge(&counts, now).await;
                assert_eq!((refused, redis), (0, Ok(())), "step {i}");
                let mut expected = memory.over(now);
                expected.sort_by(|x, y| y.until_ms.cmp(&x.until_ms).then_with(|| x.key.cmp(&y.key)));
                assert_eq!(over, expected, "step {i}");
                match i {
                    0 => assert!(over.is_empty()),
                    1 | 2 => assert_eq!(over.iter().map(|o| o.key.as_str()).collect::<Vec<_>>(), ["00000000000000aa"]),
                    4 | 5 => assert!(over.iter().any(|o| o.key == "00000000000000cc" && o.until_ms == t + 18_000)),
                    6 => assert!(!over.iter().any(|o| o.key == "00000000000000cc"), "its hold ended"),
                    _ => {}
                }
            }
            // The other replica answers the fleet's keys without a count of its own.
            let (_, over, _) = b.judge(&[], t + 2000).await;
            assert_eq!(over.len(), 1);
            assert_eq!((over[0].key.as_str(), over[0].until_ms), ("00000000000000aa", t + 1000 + 600_000));
        });
    }

    #[test]
    fn everything_in_redis_is_bounded_by_count_and_age() {
        let Some(server) = crate::store::redis::tests::start_redis() else { return };
        rt().block_on(async {
            let conn = connect(server.port);
            let t = crate::clock::now_ms();
            let cap = 64;
            let over_all = |i: u64| RuleCount { threshold: 1.0, ..count(&format!("{i:016x}"), 1) };
            // 300 keys over their threshold, in batches of at most 256.
            let counts: Vec<RuleCount> = (0..300).map(over_all).collect();
            let mut answer = Vec::new();
            for (n, chunk) in counts.chunks(150).enumerate() {
                let refs: Vec<&RuleCount> = chunk.iter().collect();
                answer = judge_redis(&conn, &refs, t + n as u64, cap).await.unwrap();
            }
            assert_eq!(answer.len(), cap, "evicted keys leave the over set");
            assert_eq!(answer[0].until_ms, t + 1 + 600_000, "the latest first");
            let mut c = conn.clone();
            let keys: Vec<String> = redis::cmd("KEYS").arg("abuse:v1:rules:*").query_async(&mut c).await.unwrap();
            assert_eq!(keys.len(), cap + 2, "{cap} windows, the seen and over sets");
            for k in &keys {
                let ttl: i64 = redis::cmd("PTTL").arg(k).query_async(&mut c).await.unwrap();
                assert!(ttl > 0, "{k} expires");
            }
            let seen: usize = redis::cmd("ZCARD").arg(SEEN_KEY).query_async(&mut c).await.unwrap();
            assert_eq!(seen, cap);
            // Without a cap on Redis's side the answer is still the wire's bound.
            let refs: Vec<&RuleCount> = counts.iter().take(256).collect();
            let answer = judge_redis(&conn, &refs, t + 2, MAX_FLEET_RULE_KEYS).await.unwrap();
            let refs: Vec<&RuleCount> = counts.iter().skip(256).collect();
            judge_redis(&conn, &refs, t + 3, MAX_FLEET_RULE_KEYS).await.unwrap();
            assert_eq!(answer.len(), 256);
            let answer = judge_redis(&conn, &[], t + 4, MAX_FLEET_RULE_KEYS).await.unwrap();
            assert_eq!(answer.len(), MAX_RULE_KEYS_OVER);
            // Once every hold ended the over set is empty.
            assert!(judge_redis(&conn, &[], t + 10 + 600_000, MAX_FLEET_RULE_KEYS).await.unwrap().is_empty());
            let over: usize = redis::cmd("ZCARD").arg(OVER_KEY).query_async(&mut c).await.unwrap();
            assert_eq!(over, 0);
        });
    }

    #[test]
    fn without_redis_a_batch_is_judged_on_this_scorers_counts() {
        // A port nobody listens on: Redis away.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        rt().block_on(async {
            let f = FleetRules::new(Some(connect(port)));
            let (refused, over, redis) = f.judge(&[count("00000000000000aa", 3)], T0).await;
            assert!((refused, over.is_empty(), redis.is_err()) == (0, true, true));
            let (_, over, redis) = f.judge(&[count("00000000000000aa", 3)], T0 + 1).await;
            assert!(redis.is_err());
            assert_eq!(over.len(), 1, "counted locally");
        });
    }
}
