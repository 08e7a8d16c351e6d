//! Fleet state in Redis, shared by every scorer pointed at it.
//!
//! Keys (all under `abuse:`; usernames arrive hashed):
//!
//! | key | type | what |
//! |---|---|---|
//! | `abuse:u:{bucket}:{user}` | string (INCR) | attempts in one 10-min bucket; expires after two |
//! | `abuse:s:{session}` | sorted set | address → last seen ms; trimmed to the window and 32 members |
//! | `abuse:b:{client}` | string (JSON verdict) | live block, expires with it |
//! | `abuse:v:seq` | string (INCR) | the verdict cursor; expires 7 days after the last block (filters ahead of a reset cursor start over) |
//! | `abuse:v:log` | sorted set | `{cursor}:{verdict JSON}` or, for an operator's lift, `{cursor}:lift:{logged ms}:{lift JSON}`, scored by cursor; last 10,000; expires 7 days after the last block or lift |
//! | `abuse:v1:known_accounts:{shard}` | string (SETBIT) | shard 0–1023 of the known-accounts Bloom filter: its bytes are the wire layout (bit `b` = bit `b % 8` of byte `b / 8`, LSB first, set at Redis offset `(b / 8)·8 + 7 − b % 8`); up to 1 KiB, shorter until its high bits are set; expires 30 days after its last write |
//! | `abuse:v1:baselines` | hash | baseline name → `BaselineSnapshot` JSON (bounded: `validate::sanitize_baseline`), the warmest per name; at most 64 names; expires 30 days after the last merge |
//! | `abuse:v1:baselines:seen` | sorted set | baseline name scored by the last time (ms) a batch mentioned it: decides which name makes room when all 64 are taken |
//! | `abuse:v1:profiles` | hash | account fleet key (hex) → `AccountProfile` JSON: the devices, countries and ASNs of its successful logins; at most `profiles::PROFILES_CAP` accounts |
//! | `abuse:v1:profiles:recent` | sorted set | account fleet key (hex) scored by its last success (ms): the warm start's order, and which accounts go first past the cap |
//!
//! The profile keys (and `abuse:v1:baselines:seen`) expire 30 days after
//! their last write, like the rest of the warm-start state
//! ([`WARM_TTL_MS`]): a fleet that stops feeding them does not keep them forever.
//!
//! The warm-start keys carry a version (`v1`): a future layout gets new
//! keys instead of misreading these. Baselines are merged by a Lua script
//! (`MERGE_BASELINES`), so scorers sharing the Redis never lose a warmer
//! baseline to a race. Profiles are merged read-modify-write without a
//! lock: two scorers merging the same account in the same instant can lose
//! one side's new entry, which that account's next success sends again.
//!
//! Every call is bounded by [`CALL_TIMEOUT`] on top of the connection's own
//! timeouts: a slow Redis must cost a borderline request a fallback, never
//! the filter's whole call budget.

use super::{
    lift_live, LogEntry, sliding_estimate, FleetStore, StoreError, SESSION_ADDRESS_CAP, VERDICTS_PAGE, VERDICT_LOG_CAP,
    VERDICT_LOG_TTL_MS, WARM_TTL_MS, WINDOW_MS,
};
use crate::known::{self, is_empty, redis_offset, shard_from, ShardPage};
use abuse_engine::known_accounts::{bit_positions, BITS_PER_ACCOUNT, SHARDS};
use crate::profiles::{merge_bounded, PROFILES_CAP, WARM_PROFILES};
use abuse_engine::profile::AccountProfile;
use abuse_engine::wire::{
    BaselineSnapshot, FleetLift, FleetVerdict, FleetVerdicts, ProfileUpdate, MAX_BASELINES, MAX_BATCH_PROFILES,
    WIRE_VERSION,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

/// Most time one store call may take before the memory store answers.
pub const CALL_TIMEOUT: Duration = Duration::from_millis(250);
const SEQ_KEY: &str = "abuse:v:seq";
const LOG_KEY: &str = "abuse:v:log";
const BASELINES_KEY: &str = "abuse:v1:baselines";
const BASELINES_SEEN_KEY: &str = "abuse:v1:baselines:seen";
const PROFILES_KEY: &str = "abuse:v1:profiles";
const PROFILES_RECENT_KEY: &str = "abuse:v1:profiles:recent";

fn known_key(shard: usize) -> String {
    format!("abuse:v1:known_accounts:{shard}")
}

/// KEYS: the baselines hash, the seen sorted set. ARGV: now (ms), the name
/// cap, the staleness (ms), the keys' time to live (ms), then (name,
/// samples, JSON) per baseline. Keeps
/// the warmer per name (the newer on a tie; a value it cannot read loses),
/// notes every name mentioned as seen now, and when all names are taken
/// lets a new one replace the one mentioned longest ago if that is stale
/// (a name without a seen time counts as stale). Returns how many baselines
/// found no room.
const MERGE_BASELINES: &str = r"
local now, cap, stale = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local dropped = 0
for i = 5, #ARGV, 3 do
  local name, samples, json = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  local old = redis.call('HGET', KEYS[1], name)
  if old then
    local ok, v = pcall(cjson.decode, old)
    local old_samples = -1
    if ok and type(v) == 'table' and type(v.samples) == 'number' then
      old_samples = v.samples
    end
    if samples >= old_samples then
      redis.call('HSET', KEYS[1], name, json)
    end
    redis.call('ZADD', KEYS[2], ARGV[1], name)
  else
    local room = redis.call('HLEN', KEYS[1]) < cap
    if not room then
      local stalest, stalest_seen = nil, nil
      for _, kept in ipairs(redis.call('HKEYS', KEYS[1])) do
        local seen = tonumber(redis.call('ZSCORE', KEYS[2], kept)) or 0
        if stalest_seen == nil or seen < stalest_seen then
          stalest, stalest_seen = kept, seen
        end
      end
      if stalest and now - stalest_seen >= stale then
        redis.call('HDEL', KEYS[1], stalest)
        redis.call('ZREM', KEYS[2], stalest)
        room = true
      end
    end
    if room then
      redis.call('HSET', KEYS[1], name, json)
      redis.call('ZADD', KEYS[2], ARGV[1], name)
    else
      dropped = dropped + 1
    end
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return dropped
";

pub struct RedisStore {
    conn: ConnectionManager,
}

pub(crate) async fn bounded<T>(call: impl Future<Output = redis::RedisResult<T>>) -> Result<T, StoreError> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(StoreError(e.to_string())),
        Err(_) => Err(StoreError(format!(
            "no answer within {} ms",
            CALL_TIMEOUT.as_millis()
        ))),
    }
}

impl RedisStore {
    /// Checks the URL now but connects on first use (and reconnects after
    /// failures by itself), so a scorer starts, and serves from memory,
    /// while Redis is down.
    pub fn connect_lazy(url: &str) -> Result<RedisStore, StoreError> {
        let client =
            redis::Client::open(url).map_err(|e| StoreError(format!("bad redis url: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(200)))
            .set_response_timeout(Some(Duration::from_millis(200)))
            // Few, quick retries: while Redis is away each call should fail
            // fast to the fallback; the next call tries to reconnect again.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(100));
        let conn = client
            .get_connection_manager_lazy(config)
            .map_err(|e| StoreError(format!("redis connection manager: {e}")))?;
        Ok(RedisStore { conn })
    }

    /// A handle on the shared connection (cheap: the manager is a handle).
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        bounded(async move { redis::cmd("PING").query_async::<String>(&mut conn).await })
            .await
            .map(|_| ())
    }
}

fn user_key(bucket: u64, user: &str) -> String {
    format!("abuse:u:{bucket}:{user}")
}

/// Log members carry their cursor so that two equal verdicts stay two
/// members; a lift's JSON is marked (`lift:{logged ms}:`), which an older
/// scorer reads as an unparseable verdict and skips.
fn parse_log_member(member: &str) -> Option<LogEntry> {
    let (_, rest) = member.split_once(':')?;
    if let Some(lift) = rest.strip_prefix("lift:") {
        let (logged, json) = lift.split_once(':')?;
        return Some(LogEntry::Lift {
            lift: serde_json::from_str(json).ok()?,
            logged_ms: logged.parse().ok()?,
        });
    }
    serde_json::from_str(rest).ok().map(LogEntry::Verdict)
}

impl FleetStore for RedisStore {
    async fn username_attempt(&self, user: &str, now_ms: u64) -> Result<f64, StoreError> {
        let bucket = now_ms / WINDOW_MS;
        let current = user_key(bucket, user);
        let previous = user_key(bucket.saturating_sub(1), user);
        let mut conn = self.conn.clone();
        let (cur, prev): (u64, Option<u64>) = bounded(async move {
            redis::pipe()
                .atomic()
                .cmd("INCR")
                .arg(&current)
                .cmd("PEXPIRE")
                .arg(&current)
                .arg(2 * WINDOW_MS)
                .ignore()
                .cmd("GET")
                .arg(&previous)
                .query_async(&mut conn)
                .await
        })
        .await?;
        Ok(sliding_estimate(cur, prev.unwrap_or(0), now_ms))
    }

    async fn session_seen(
        &self,
        session: &str,
        client: &str,
        now_ms: u64,
    ) -> Result<u64, StoreError> {
        let key = format!("abuse:s:{session}");
        let mut conn = self.conn.clone();
        let (count,): (u64,) = bounded(async move {
            redis::pipe()
                .atomic()
                .cmd("ZADD")
                .arg(&key)
                .arg(now_ms)
                .arg(client)
                .ignore()
                .cmd("ZREMRANGEBYSCORE")
                .arg(&key)
                .arg("-inf")
                .arg(now_ms.saturating_sub(WINDOW_MS))
                .ignore()
                // Keep the newest members only: memory stays bounded however
                // many addresses share one session.
                .cmd("ZREMRANGEBYRANK")
                .arg(&key)
                .arg(0)
                .arg(-(SESSION_ADDRESS_CAP as i64) - 1)
                .ignore()
                .cmd("PEXPIRE")
                .arg(&key)
                .arg(WINDOW_MS)
                .ignore()
                .cmd("ZCARD")
                .arg(&key)
                .query_async(&mut conn)
                .await
        })
        .await?;
        Ok(count)
    }

    async fn blocked(&self, client: &str, now_ms: u64) -> Result<Option<FleetVerdict>, StoreError> {
        let key = format!("abuse:b:{client}");
        let mut conn = self.conn.clone();
        let json: Option<String> =
            bounded(async move { redis::cmd("GET").arg(&key).query_async(&mut conn).await })
                .await?;
        // Unparseable (another version wrote it): no block rather than an error.
        Ok(json
            .and_then(|j| serde_json::from_str::<FleetVerdict>(&j).ok())
            .filter(|v| v.until_ms >= now_ms))
    }

    async fn record_verdict(&self, verdict: &FleetVerdict, now_ms: u64) -> Result<u64, StoreError> {
        let json = serde_json::to_string(verdict).map_err(|e| StoreError(e.to_string()))?;
        let mut conn = self.conn.clone();
        let seq: u64 =
            bounded(async move { redis::cmd("INCR").arg(SEQ_KEY).query_async(&mut conn).await })
                .await?;
        let ttl_ms = verdict.until_ms.saturating_sub(now_ms).max(1);
        let block_key = format!("abuse:b:{}", verdict.client);
        let member = format!("{seq}:{json}");
        let mut conn = self.conn.clone();
        bounded(async move {
            redis::pipe()
                .atomic()
                .cmd("ZADD")
                .arg(LOG_KEY)
                .arg(seq)
                .arg(&member)
                .ignore()
                .cmd("ZREMRANGEBYRANK")
                .arg(LOG_KEY)
                .arg(0)
                .arg(-(VERDICT_LOG_CAP as i64) - 1)
                .ignore()
                .cmd("SET")
                .arg(&block_key)
                .arg(&json)
                .arg("PX")
                .arg(ttl_ms)
                .ignore()
                .cmd("PEXPIRE")
                .arg(LOG_KEY)
                .arg(VERDICT_LOG_TTL_MS)
                .ignore()
                .cmd("PEXPIRE")
                .arg(SEQ_KEY)
                .arg(VERDICT_LOG_TTL_MS)
                .ignore()
                .query_async::<()>(&mut conn)
                .await
        })
        .await?;
        Ok(seq)
    }

    async fn verdicts_since(&self, since: u64, now_ms: u64) -> Result<FleetVerdicts, StoreError> {
        let (mut seq, mut page) = self.log_after(since).await?;
        if since > seq {
            // The cursor is ahead of the log: Redis was reset. Start over.
            (seq, page) = self.log_after(0).await?;
        }
        let next = if page.len() >= VERDICTS_PAGE {
            page.last().map_or(seq, |(_, s)| *s)
        } else {
            seq
        };
        let mut verdicts = Vec::new();
        let mut lifts = Vec::new();
        for entry in page.iter().filter_map(|(member, _)| parse_log_member(member)) {
            match entry {
                LogEntry::Verdict(v) if v.until_ms >= now_ms => verdicts.push(v),
                LogEntry::Lift { lift, logged_ms } if lift_live(logged_ms, &lift, now_ms) => {
                    lifts.push(lift);
                }
                _ => {}
            }
        }
        Ok(FleetVerdicts {
            version: WIRE_VERSION,
            next,
            verdicts,
            lifts,
            ..FleetVerdicts::default()
        })
    }

    async fn record_lift(&self, lift: &FleetLift, now_ms: u64) -> Result<u64, StoreError> {
        let json = serde_json::to_string(lift).map_err(|e| StoreError(e.to_string()))?;
        let mut conn = self.conn.clone();
        let seq: u64 =
            bounded(async move { redis::cmd("INCR").arg(SEQ_KEY).query_async(&mut conn).await })
                .await?;
        let member = format!("{seq}:lift:{now_ms}:{json}");
        let mut conn = self.conn.clone();
        bounded(async move {
            redis::pipe()
                .atomic()
                .cmd("ZADD")
                .arg(LOG_KEY)
                .arg(seq)
                .arg(&member)
                .ignore()
                .cmd("ZREMRANGEBYRANK")
                .arg(LOG_KEY)
                .arg(0)
                .arg(-(VERDICT_LOG_CAP as i64) - 1)
                .ignore()
                .cmd("PEXPIRE")
                .arg(LOG_KEY)
                .arg(VERDICT_LOG_TTL_MS)
                .ignore()
                .cmd("PEXPIRE")
                .arg(SEQ_KEY)
                .arg(VERDICT_LOG_TTL_MS)
                .ignore()
                .query_async::<()>(&mut conn)
                .await
        })
        .await?;
        Ok(seq)
    }

    async fn forget(&self, clients: &[String]) -> Result<(), StoreError> {
        if clients.is_empty() {
            return Ok(());
        }
        // The log holds at most VERDICT_LOG_CAP members: reading it whole
        // is fine for an operator's action.
        let mut conn = self.conn.clone();
        let members: Vec<String> = bounded(async move {
            redis::cmd("ZRANGE").arg(LOG_KEY).arg(0).arg(-1).query_async(&mut conn).await
        })
        .await?;
        let stale: Vec<&String> = members
            .iter()
            .filter(|m| {
                matches!(parse_log_member(m), Some(LogEntry::Verdict(v)) if clients.contains(&v.client))
            })
            .collect();
        let mut pipe = redis::pipe();
        for c in clients {
            pipe.cmd("DEL").arg(format!("abuse:b:{c}")).ignore();
        }
        if !stale.is_empty() {
            pipe.cmd("ZREM").arg(LOG_KEY).arg(stale).ignore();
        }
        let mut conn = self.conn.clone();
        bounded(async move { pipe.query_async::<()>(&mut conn).await }).await
    }

    async fn add_known_accounts(&self, accounts: &[u64]) -> Result<u64, StoreError> {
        if accounts.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        let mut touched = std::collections::BTreeSet::new();
        for account in accounts {
            let (shard, bits) = bit_positions(*account);
            let key = known_key(shard);
            for b in bits {
                pipe.cmd("SETBIT").arg(&key).arg(redis_offset(b)).arg(1);
            }
            touched.insert(key);
        }
        // A shard lives as long as accounts of it keep logging in.
        for key in &touched {
            pipe.cmd("PEXPIRE").arg(key).arg(WARM_TTL_MS).ignore();
        }
        let mut conn = self.conn.clone();
        let previous: Vec<i64> = bounded(async move { pipe.query_async(&mut conn).await }).await?;
        // An account is new if any of its bits was 0 before.
        Ok(previous
            .chunks(BITS_PER_ACCOUNT as usize)
            .filter(|bits| bits.contains(&0))
            .count() as u64)
    }

    async fn known_shards(&self, from: usize, max: usize) -> Result<ShardPage, StoreError> {
        if from >= SHARDS || max == 0 {
            return Ok(ShardPage::default());
        }
        // Which shards exist (an empty one has no key), then the bytes of
        // the first `max` of them: two round trips, ≤ 64 KiB read.
        let mut lengths = redis::pipe();
        for i in from..SHARDS {
            lengths.cmd("STRLEN").arg(known_key(i));
        }
        let mut conn = self.conn.clone();
        let lengths: Vec<u64> =
            bounded(async move { lengths.query_async(&mut conn).await }).await?;
        let non_empty: Vec<usize> = (from..SHARDS)
            .zip(lengths)
            .filter(|(_, len)| *len > 0)
            .map(|(i, _)| i)
            .collect();
        let wanted: Vec<usize> = non_empty.iter().take(max).copied().collect();
        if wanted.is_empty() {
            return Ok(ShardPage::default());
        }
        let keys: Vec<String> = wanted.iter().map(|i| known_key(*i)).collect();
        let mut conn = self.conn.clone();
        let values: Vec<Option<Vec<u8>>> =
            bounded(async move { redis::cmd("MGET").arg(&keys).query_async(&mut conn).await })
                .await?;
        let shards = wanted
            .iter()
            .zip(values)
            .filter_map(|(i, value)| {
                let bits = shard_from(&value?);
                (!is_empty(bits.as_slice())).then_some((*i, bits))
            })
            .collect();
        let next = if non_empty.len() > wanted.len() {
            wanted.last().map(|last| last + 1)
        } else {
            None
        };
        Ok(ShardPage { shards, next })
    }

    async fn merge_baselines(
        &self,
        baselines: &[BaselineSnapshot],
        now_ms: u64,
    ) -> Result<u64, StoreError> {
        if baselines.is_empty() {
            return Ok(0);
        }
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(MERGE_BASELINES)
            .arg(2)
            .arg(BASELINES_KEY)
            .arg(BASELINES_SEEN_KEY)
            .arg(now_ms)
            .arg(known::BASELINE_NAMES)
            .arg(known::BASELINE_STALE_MS)
            .arg(WARM_TTL_MS);
        for b in baselines {
            let json = serde_json::to_string(b).map_err(|e| StoreError(e.to_string()))?;
            cmd.arg(&b.name).arg(b.samples).arg(json);
        }
        let mut conn = self.conn.clone();
        bounded(async move { cmd.query_async::<u64>(&mut conn).await }).await
    }

    async fn merge_profiles(&self, updates: &[ProfileUpdate], _now_ms: u64) -> Result<u64, StoreError> {
        if updates.is_empty() {
            return Ok(0);
        }
        let fields: Vec<String> = updates.iter().map(|u| format!("{:016x}", u.account)).collect();
        let mut conn = self.conn.clone();
        let keys = fields.clone();
        let stored: Vec<Option<String>> = bounded(async move {
            redis::cmd("HMGET").arg(PROFILES_KEY).arg(&keys).query_async(&mut conn).await
        })
        .await?;
        let mut pipe = redis::pipe();
        let mut changed = 0;
        for ((update, field), old) in updates.iter().zip(&fields).zip(stored) {
            // Unreadable (another version wrote it): replaced.
            let mut profile: AccountProfile =
                old.and_then(|json| serde_json::from_str(&json).ok()).unwrap_or_default();
            let before = profile;
            merge_bounded(&mut profile, &update.profile);
            if profile == before {
                continue;
            }
            changed += 1;
            let json = serde_json::to_string(&profile).map_err(|e| StoreError(e.to_string()))?;
            pipe.cmd("HSET").arg(PROFILES_KEY).arg(field).arg(json).ignore();
            pipe.cmd("ZADD").arg(PROFILES_RECENT_KEY).arg(profile.last_success_ms).arg(field).ignore();
        }
        if changed == 0 {
            return Ok(0);
        }
        // Past the cap, the accounts whose last success is oldest go.
        pipe.cmd("PEXPIRE").arg(PROFILES_KEY).arg(WARM_TTL_MS).ignore();
        pipe.cmd("PEXPIRE").arg(PROFILES_RECENT_KEY).arg(WARM_TTL_MS).ignore();
        let excess = format!("-{}", PROFILES_CAP + 1);
        pipe.cmd("ZRANGE").arg(PROFILES_RECENT_KEY).arg(0).arg(&excess);
        let mut conn = self.conn.clone();
        let (evicted,): (Vec<String>,) = bounded(async move { pipe.query_async(&mut conn).await }).await?;
        if !evicted.is_empty() {
            let mut trim = redis::pipe();
            trim.cmd("ZREM").arg(PROFILES_RECENT_KEY).arg(&evicted).ignore();
            trim.cmd("HDEL").arg(PROFILES_KEY).arg(&evicted).ignore();
            let mut conn = self.conn.clone();
            bounded(async move { trim.query_async::<()>(&mut conn).await }).await?;
        }
        Ok(changed)
    }

    async fn profile_page(&self, k: usize) -> Result<(Vec<ProfileUpdate>, bool), StoreError> {
        let start = k.saturating_mul(MAX_BATCH_PROFILES);
        if start >= WARM_PROFILES {
            return Ok((Vec::new(), false));
        }
        // One more than a page: whether another follows.
        let stop = (start + MAX_BATCH_PROFILES).min(WARM_PROFILES);
        let mut conn = self.conn.clone();
        let members: Vec<String> = bounded(async move {
            redis::cmd("ZREVRANGE")
                .arg(PROFILES_RECENT_KEY)
                .arg(start)
                .arg(stop)
                .query_async(&mut conn)
                .await
        })
        .await?;
        let more = members.len() > stop - start && stop < WARM_PROFILES;
        let members: Vec<String> = members.into_iter().take(stop - start).collect();
        if members.is_empty() {
            return Ok((Vec::new(), false));
        }
        let mut conn = self.conn.clone();
        let keys = members.clone();
        let values: Vec<Option<String>> = bounded(async move {
            redis::cmd("HMGET").arg(PROFILES_KEY).arg(&keys).query_async(&mut conn).await
        })
        .await?;
        let page = members
            .iter()
            .zip(values)
            .filter_map(|(member, json)| {
                Some(ProfileUpdate {
                    account: u64::from_str_radix(member, 16).ok()?,
                    profile: serde_json::from_str(&json?).ok()?,
                })
            })
            .collect();
        Ok((page, more))
    }

    async fn baselines(&self) -> Result<Vec<BaselineSnapshot>, StoreError> {
        let mut conn = self.conn.clone();
        let all: BTreeMap<String, String> = bounded(async move {
            redis::cmd("HGETALL")
                .arg(BASELINES_KEY)
                .query_async(&mut conn)
                .await
        })
        .await?;
        // Unparseable (another version wrote it): skipped, not an error.
        Ok(all
            .values()
            .filter_map(|json| serde_json::from_str::<BaselineSnapshot>(json).ok())
            .take(MAX_BASELINES)
            .collect())
    }
}

impl RedisStore {
    /// The current cursor and a page of log members after `from`.
    async fn log_after(&self, from: u64) -> Result<(u64, Vec<(String, u64)>), StoreError> {
        let mut conn = self.conn.clone();
        let (seq, page): (Option<u64>, Vec<(String, u64)>) = bounded(async move {
            redis::pipe()
                .cmd("GET")
                .arg(SEQ_KEY)
                .cmd("ZRANGEBYSCORE")
                .arg(LOG_KEY)
                .arg(format!("({from}"))
                .arg("+inf")
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(0)
                .arg(VERDICTS_PAGE)
                .query_async(&mut conn)
                .await
        })
        .await?;
        Ok((seq.unwrap_or(0), page))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod tests {
    use super::*;
    use crate::store::memory::tests::contract;

    /// A throwaway redis-server on a free loopback port, killed on drop.
    pub(crate) struct RedisServer {
        child: std::process::Child,
        pub port: u16,
    }

    impl Drop for RedisServer {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    pub(crate) fn start_redis() -> Option<RedisServer> {
        let ok = std::process::Command::new("redis-server")
            .arg("--version")
            .output()
            .is_ok();
        if !ok {
            eprintln!("redis-server is not installed: skipping the Redis store test");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start redis-server");
        let server = RedisServer { child, port };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }

    #[test]
    fn redis_store_keeps_the_same_contract() {
        let Some(server) = start_redis() else { return };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let store =
                RedisStore::connect_lazy(&format!("redis://127.0.0.1:{}", server.port)).unwrap();
            store.ping().await.unwrap();
            // Real TTLs apply in Redis, so the verdicts must be live in real time.
            let t0 = crate::clock::now_ms();
            contract(&store, t0).await;
        });
    }

    #[test]
    fn every_key_expires() {
        let Some(server) = start_redis() else { return };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let url = format!("redis://127.0.0.1:{}", server.port);
            let store = RedisStore::connect_lazy(&url).unwrap();
            let t = crate::clock::now_ms();
            store.add_known_accounts(&[7]).await.unwrap();
            let b = BaselineSnapshot { name: "login:/l".into(), samples: 5, ..BaselineSnapshot::default() };
            store.merge_baselines(&[b], t).await.unwrap();
            let mut profile = AccountProfile::default();
            let place = abuse_engine::profile::LoginPlace { device: 3, country: 1, asn: 0, network: 0 };
            profile.learn(&place, t);
            store.merge_profiles(&[ProfileUpdate { account: 9, profile }], t).await.unwrap();
            let v = FleetVerdict { client: "c".into(), reasons: vec![], until_ms: t + 60_000 };
            store.record_verdict(&v, t).await.unwrap();
            store.username_attempt("u", t).await.unwrap();
            store.session_seen("s", "c", t).await.unwrap();
            let mut conn = redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap();
            let keys: Vec<String> = redis::cmd("KEYS").arg("abuse:*").query_async(&mut conn).await.unwrap();
            assert!(keys.len() >= 10, "{keys:?}");
            for key in keys {
                let ttl: i64 = redis::cmd("PTTL").arg(&key).query_async(&mut conn).await.unwrap();
                assert!(ttl > 0, "{key} never expires ({ttl})");
            }
        });
    }

    #[test]
    fn a_dead_redis_fails_fast() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let store = RedisStore::connect_lazy(&format!("redis://127.0.0.1:{port}")).unwrap();
            let started = std::time::Instant::now();
            assert!(store.username_attempt("u", 0).await.is_err());
            assert!(started.elapsed() <= CALL_TIMEOUT + Duration::from_millis(100));
        });
        assert!(RedisStore::connect_lazy("not a url").is_err());
    }
}
