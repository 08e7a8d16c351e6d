//! The fleet's decision records: every block, shed, tag and (aggregated)
//! penalty-box refusal the filters report on their tick batches
//! (`EventBatch::decisions`), kept so that an operator can find why a
//! client was refused — by decision id, address, session / API key or
//! username hash — anywhere in the fleet.
//!
//! Bounded by count **and** age, in both stores:
//!
//! * memory: a ring of the last [`MEMORY_CAP`] records and at most
//!   [`MEMORY_BYTES`] of them (every string of an event is bounded by
//!   [`check`]: ~1 KiB typical, ~6 KiB at most), an id index
//!   that only points into the ring, records older than [`MAX_AGE_MS`]
//!   dropped; queries scan the ring (operator queries are rare, the ring
//!   small);
//! * Redis: `abuse:v1:dec:{id}` (hash: `json`, `hits`, `last_hit_ms`)
//!   expiring [`MAX_AGE_MS`] after its last write; `abuse:v1:dec:all`
//!   (sorted set id → time) trimmed to [`REDIS_CAP`] — the trimmed
//!   records deleted with it — and to the age; per address, session hash
//!   and username hash an index `abuse:v1:dec:{a|s|u}:{key}` (sorted set
//!   id → time) of the newest [`PER_KEY_CAP`], expiring with the records.
//!
//! A `penalty` event (the penalty box's refusals of one client since the
//! last batch, quoting the id of the decision that boxed it) adds its
//! `hits` to that record; a penalty whose decision is unknown here (it aged
//! out, or the scorer restarted without Redis) becomes a record of its own.
//! With Redis every record is also kept in memory: when Redis fails, the
//! memory ring answers (and the failure is counted, as for fleet state).

use crate::store::redis::bounded;
use crate::store::StoreError;
use abuse_engine::wire::{DecisionEvent, MAX_DECISION_REASONS};
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

pub const MEMORY_CAP: usize = 20_000;
/// And at most this many bytes of records in memory (a typical record is
/// ~1 KiB, a largest one ~6 KiB: the count alone would allow 120 MiB).
pub const MEMORY_BYTES: usize = 32 << 20;
pub const REDIS_CAP: usize = 200_000;
pub const MAX_AGE_MS: u64 = 7 * 24 * 60 * 60 * 1000;
/// Newest decisions indexed per address / session / username in Redis.
pub const PER_KEY_CAP: usize = 1_000;
/// Records per query answer, by default and at most.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1_000;
/// An event stamped later than this past the scorer's clock is stamped now.
const FUTURE_SLACK_MS: u64 = 60_000;
/// Longest path template kept.
pub const MAX_PATH: usize = 256;

const ACTIONS: [&str; 4] = ["block", "shed", "tag", "penalty"];
const MODES: [&str; 2] = ["block", "monitor"];
const CREDENTIALS: [&str; 4] = ["cookie", "key", "sub", "bearer"];

/// One decision as kept: the event, the penalty-box refusals that quoted
/// it since, and when the scorer received it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub decision: DecisionEvent,
    pub penalty_hits: u64,
    pub last_hit_ms: u64,
    pub received_ms: u64,
}

/// A record as the API answers it: the event's fields, flat, and what the
/// scorer added (penalty refusals since, when it arrived).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecordView {
    #[serde(flatten)]
    pub decision: DecisionEvent,
    pub penalty_hits: u64,
    pub last_hit_ms: u64,
    pub received_ms: u64,
}

impl From<Record> for RecordView {
    fn from(r: Record) -> RecordView {
        RecordView { decision: r.decision, penalty_hits: r.penalty_hits, last_hit_ms: r.last_hit_ms, received_ms: r.received_ms }
    }
}

/// What to look records up by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// Every record at this address (any user-agent tag, the pool).
    Address(String),
    /// One client label exactly (`addr#tag`, `addr#pool`).
    Label(String),
    /// A session / API key / subject / bearer hash (16 hex digits).
    Session(String),
    /// A username hash (16 hex digits).
    Username(String),
    /// The newest records of the fleet.
    Recent,
}

impl Key {
    fn matches(&self, d: &DecisionEvent) -> bool {
        match self {
            Key::Address(a) => &d.address == a,
            Key::Label(l) => &d.client == l,
            Key::Session(h) => d.session.as_deref() == Some(h.as_str()),
            Key::Username(h) => d.username.as_deref() == Some(h.as_str()),
            Key::Recent => true,
        }
    }

    /// The Redis index that holds it (None: `dec:all`).
    fn index(&self) -> Option<String> {
        match self {
            Key::Address(a) => Some(address_index(a)),
            // Labels live in their address's index.
            Key::Label(l) => Some(address_index(address_of(l))),
            Key::Session(h) => Some(format!("abuse:v1:dec:s:{h}")),
            Key::Username(h) => Some(format!("abuse:v1:dec:u:{h}")),
            Key::Recent => None,
        }
    }
}

/// The address part of a client label (`addr`, `addr#tag`, `addr#pool`).
pub fn address_of(label: &str) -> &str {
    label.split_once('#').map_or(label, |(a, _)| a)
}

fn address_index(address: &str) -> String {
    format!("abuse:v1:dec:a:{address}")
}

fn record_key(id: &str) -> String {
    format!("abuse:v1:dec:{id}")
}

const ALL_KEY: &str = "abuse:v1:dec:all";

fn printable(s: &str, max: usize, what: &str) -> Result<(), String> {
    if s.len() > max {
        return Err(format!("`{what}` longer than {max} bytes"));
    }
    if s.chars().any(char::is_control) {
        return Err(format!("`{what}` has control characters"));
    }
    Ok(())
}

fn hex_of(s: Option<&str>, digits: usize, what: &str) -> Result<(), String> {
    match s {
        Some(v) if v.len() != digits || !v.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Err(format!("`{what}` is not {digits} hex digits"))
        }
        _ => Ok(()),
    }
}

/// Whether `id` is a decision id as the filter makes them (and as keys
/// may hold): 1–64 of `[A-Za-z0-9._:-]`.
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Whether a decision event may be kept: every string bounded and free of
/// control characters, ids and hashes in their shape, the action and mode
/// known, every number finite. A bad one is skipped and counted.
pub fn check(d: &DecisionEvent) -> Result<(), String> {
    if !valid_id(&d.id) {
        return Err("`id` must be 1-64 of [A-Za-z0-9._:-]".into());
    }
    printable(&d.instance, 128, "instance")?;
    printable(&d.client, 128, "client")?;
    if d.address.is_empty() || d.address.len() > 64 || d.address.contains(['#', ' ', '/']) {
        return Err("`address` must be 1-64 bytes without '#', '/' or blanks".into());
    }
    printable(&d.address, 64, "address")?;
    if address_of(&d.client) != d.address {
        return Err("`client` must be the address, or the address and '#...'".into());
    }
    hex_of(d.agent.as_deref(), 8, "agent")?;
    hex_of(d.session.as_deref(), 16, "session")?;
    hex_of(d.username.as_deref(), 16, "username")?;
    if let Some(c) = &d.credential {
        if !CREDENTIALS.contains(&c.as_str()) {
            return Err("`credential` must be cookie, key, sub or bearer".into());
        }
    }
    if let Some(g) = &d.route_group {
        printable(g, 64, "route_group")?;
    }
    printable(&d.method, 16, "method")?;
    printable(&d.path, MAX_PATH, "path")?;
    if !ACTIONS.contains(&d.action.as_str()) {
        return Err("`action` must be block, shed, tag or penalty".into());
    }
    if !MODES.contains(&d.mode.as_str()) {
        return Err("`mode` must be block or monitor".into());
    }
    if d.status > 999 || !d.risk.is_finite() {
        return Err("`status` or `risk` out of range".into());
    }
    if d.reasons.len() > MAX_DECISION_REASONS {
        return Err(format!("more than {MAX_DECISION_REASONS} `reasons`"));
    }
    for r in &d.reasons {
        printable(&r.reason, 64, "reasons.reason")?;
        printable(&r.what, 64, "reasons.what")?;
        printable(&r.text, 256, "reasons.text")?;
        if !r.value.is_finite() || !r.limit.is_finite() {
            return Err("a reason's `value` or `limit` is not finite".into());
        }
    }
    Ok(())
}

/// Cuts an over-long path template (at a character boundary) rather than
/// lose the decision for it; whether it did.
pub fn clamp_path(d: &mut DecisionEvent) -> bool {
    if d.path.len() <= MAX_PATH {
        return false;
    }
    let mut end = MAX_PATH;
    while !d.path.is_char_boundary(end) {
        end -= 1;
    }
    d.path.truncate(end);
    true
}

/// Stamps an event from the future now (a filter's clock ahead of ours
/// must not keep a record from aging out); whether it did.
pub fn clamp_time(d: &mut DecisionEvent, now_ms: u64) -> bool {
    if d.time_ms > now_ms.saturating_add(FUTURE_SLACK_MS) {
        d.time_ms = now_ms;
        return true;
    }
    false
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Approximate heap bytes of a record: its strings and a fixed overhead
/// for the struct, the strings' headers and the id index entry.
fn approx_bytes(d: &DecisionEvent) -> usize {
    let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    let reasons: usize = d.reasons.iter().map(|r| r.reason.len() + r.what.len() + r.text.len() + 96).sum();
    d.id.len() * 2
        + d.instance.len()
        + d.client.len()
        + d.address.len()
        + opt(&d.agent)
        + opt(&d.session)
        + opt(&d.credential)
        + opt(&d.username)
        + opt(&d.route_group)
        + d.method.len()
        + d.path.len()
        + d.action.len()
        + d.mode.len()
        + reasons
        + 512
}

/// The memory store: a ring with an id index into it.
struct Ring {
    cap: usize,
    max_bytes: usize,
    bytes: usize,
    records: VecDeque<Record>,
    /// id → position counted from the first record ever pushed.
    by_id: HashMap<String, u64>,
    /// Position of `records[0]`.
    first: u64,
}

impl Ring {
    fn position(&self, id: &str) -> Option<usize> {
        let at = *self.by_id.get(id)?;
        usize::try_from(at.checked_sub(self.first)?).ok()
    }

    fn push(&mut self, r: Record) {
        let at = self.first + self.records.len() as u64;
        self.by_id.insert(r.decision.id.clone(), at);
        self.bytes += approx_bytes(&r.decision);
        self.records.push_back(r);
        while self.records.len() > self.cap || (self.bytes > self.max_bytes && self.records.len() > 1) {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some(old) = self.records.pop_front() {
            self.bytes = self.bytes.saturating_sub(approx_bytes(&old.decision));
            if self.by_id.get(&old.decision.id) == Some(&self.first) {
                self.by_id.remove(&old.decision.id);
            }
            self.first += 1;
        }
    }

    fn expire(&mut self, now_ms: u64) {
        let horizon = now_ms.saturating_sub(MAX_AGE_MS);
        while self.records.front().is_some_and(|r| r.received_ms < horizon) {
            self.pop_front();
        }
    }
}

/// What became of a batch's decisions.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// New records.
    pub records: u64,
    /// Penalty events added onto the decision they quote.
    pub aggregated: u64,
}

pub struct Decisions {
    ring: Mutex<Ring>,
    redis: Option<ConnectionManager>,
}

/// Adds a penalty's hits to the record it quotes, if that exists; 1 if it did.
const ADD_HITS: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'hits', ARGV[1])
local last = tonumber(redis.call('HGET', KEYS[1], 'last_hit_ms') or '0') or 0
if tonumber(ARGV[2]) > last then redis.call('HSET', KEYS[1], 'last_hit_ms', ARGV[2]) end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
";

/// Trims `dec:all` to ARGV[1] members and to scores ≥ ARGV[2], deleting the
/// records trimmed (keys `ARGV[3]..id`), so the count bound holds for them too.
const TRIM_ALL: &str = r"
local n = redis.call('ZCARD', KEYS[1])
local old = {}
if n > tonumber(ARGV[1]) then old = redis.call('ZRANGE', KEYS[1], 0, n - tonumber(ARGV[1]) - 1) end
for _, id in ipairs(old) do redis.call('DEL', ARGV[3] .. id) end
if #old > 0 then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, #old - 1) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2])
return #old
";

impl Decisions {
    #[cfg(test)]
    pub fn memory() -> Decisions {
        Decisions::with_cap(MEMORY_CAP, None)
    }

    pub fn with_cap(cap: usize, redis: Option<ConnectionManager>) -> Decisions {
        Decisions {
            ring: Mutex::new(Ring {
                cap: cap.max(1),
                max_bytes: MEMORY_BYTES,
                bytes: 0,
                records: VecDeque::new(),
                by_id: HashMap::new(),
                first: 0,
            }),
            redis,
        }
    }

    pub fn redis(conn: Option<ConnectionManager>) -> Decisions {
        Decisions::with_cap(MEMORY_CAP, conn)
    }

    /// Keeps checked events in memory; what it did.
    fn store_local(&self, events: &[DecisionEvent], now_ms: u64) -> Stored {
        let mut ring = lock(&self.ring);
        ring.expire(now_ms);
        let mut stored = Stored::default();
        for d in events {
            if d.action != "penalty" {
                if let Some(r) = ring.position(&d.id).and_then(|i| ring.records.get_mut(i)) {
                    if r.decision.action == "penalty" {
                        // The block a penalty placeholder quoted: it takes its place.
                        r.decision = d.clone();
                        stored.records += 1;
                        continue;
                    }
                }
            }
            if d.action == "penalty" {
                if let Some(i) = ring.position(&d.id) {
                    if let Some(r) = ring.records.get_mut(i) {
                        r.penalty_hits = r.penalty_hits.saturating_add(u64::from(d.hits));
                        r.last_hit_ms = r.last_hit_ms.max(d.time_ms);
                        stored.aggregated += 1;
                        continue;
                    }
                }
            }
            ring.push(Record {
                decision: d.clone(),
                penalty_hits: if d.action == "penalty" { u64::from(d.hits) } else { 0 },
                last_hit_ms: if d.action == "penalty" { d.time_ms } else { 0 },
                received_ms: now_ms,
            });
            stored.records += 1;
        }
        stored
    }

    /// Keeps a batch's checked events (memory, and Redis when configured).
    /// The result of the Redis part is returned for the caller to count.
    pub async fn store(&self, events: &[DecisionEvent], now_ms: u64) -> (Stored, Result<(), StoreError>) {
        let local = self.store_local(events, now_ms);
        let Some(conn) = &self.redis else {
            return (local, Ok(()));
        };
        match store_redis(conn, events, now_ms).await {
            Ok(s) => (s, Ok(())),
            Err(e) => (local, Err(e)),
        }
    }

    /// Records matching `key`, newest first, at most `limit`, from memory.
    pub fn find_local(&self, key: &Key, limit: usize, now_ms: u64) -> Vec<Record> {
        let mut ring = lock(&self.ring);
        ring.expire(now_ms);
        ring.records
            .iter()
            .rev()
            .filter(|r| key.matches(&r.decision))
            .take(limit)
            .cloned()
            .collect()
    }

    pub fn get_local(&self, id: &str) -> Option<Record> {
        let ring = lock(&self.ring);
        ring.position(id).and_then(|i| ring.records.get(i)).cloned()
    }

    /// Records matching `key` from Redis (None without Redis).
    pub async fn find_redis(&self, key: &Key, limit: usize, now_ms: u64) -> Option<Result<Vec<Record>, StoreError>> {
        let conn = self.redis.as_ref()?;
        Some(find_redis(conn, key, limit, now_ms).await)
    }

    pub async fn get_redis(&self, id: &str) -> Option<Result<Option<Record>, StoreError>> {
        let conn = self.redis.as_ref()?;
        Some(fetch(conn, &[id.to_string()]).await.map(|mut v| v.pop()))
    }

    /// Records received after `since_ms` (oldest first, at most `limit`),
    /// from memory: what the export stream replays before it goes live.
    pub fn since_local(&self, since_ms: u64, limit: usize) -> Vec<Record> {
        let ring = lock(&self.ring);
        let start = ring.records.partition_point(|r| r.received_ms <= since_ms);
        ring.records.iter().skip(start).take(limit).cloned().collect()
    }
}

/// Queues the commands that keep `d` as a new record (with `hits` penalty
/// refusals already on it) and index it.
fn add_record(pipe: &mut redis::Pipeline, d: &DecisionEvent, hits: u32, now_ms: u64) -> Result<(), StoreError> {
    let record = Record { decision: d.clone(), penalty_hits: 0, last_hit_ms: 0, received_ms: now_ms };
    let json = serde_json::to_string(&record).map_err(|e| StoreError(e.to_string()))?;
    let key = record_key(&d.id);
    if d.action == "penalty" {
        // A penalty whose block is not here (yet): a placeholder that a
        // block arriving later (another worker's batch, another replica)
        // replaces — never the other way round, whatever the order.
        pipe.cmd("HSETNX").arg(&key).arg("json").arg(json).ignore();
    } else {
        // The decision itself: replaces a penalty's placeholder, keeps the
        // hits counted on it.
        pipe.cmd("HSET").arg(&key).arg("json").arg(json).ignore();
    }
    pipe.cmd("HINCRBY").arg(&key).arg("hits").arg(hits).ignore();
    if hits > 0 {
        pipe.cmd("EVAL")
            .arg("local l = tonumber(redis.call('HGET', KEYS[1], 'last_hit_ms') or '0') or 0 if tonumber(ARGV[1]) > l then redis.call('HSET', KEYS[1], 'last_hit_ms', ARGV[1]) end return 0")
            .arg(1)
            .arg(&key)
            .arg(d.time_ms)
            .ignore();
    }
    pipe        .cmd("PEXPIRE")
        .arg(&key)
        .arg(MAX_AGE_MS)
        .ignore()
        .cmd("ZADD")
        .arg(ALL_KEY)
        .arg(now_ms)
        .arg(&d.id)
        .ignore();
    let mut indexes = vec![address_index(&d.address)];
    indexes.extend(d.session.as_ref().map(|h| format!("abuse:v1:dec:s:{h}")));
    indexes.extend(d.username.as_ref().map(|h| format!("abuse:v1:dec:u:{h}")));
    for index in indexes {
        pipe.cmd("ZADD")
            .arg(&index)
            .arg(now_ms)
            .arg(&d.id)
            .ignore()
            .cmd("ZREMRANGEBYRANK")
            .arg(&index)
            .arg(0)
            .arg(-(PER_KEY_CAP as i64) - 1)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&index)
            .arg(MAX_AGE_MS)
            .ignore();
    }
    Ok(())
}

async fn store_redis(conn: &ConnectionManager, events: &[DecisionEvent], now_ms: u64) -> Result<Stored, StoreError> {
    let mut stored = Stored::default();
    // In the batch's order: the decisions first, so that a penalty in the
    // same batch finds the block it quotes; then the penalties.
    let (penalties, decisions): (Vec<&DecisionEvent>, Vec<&DecisionEvent>) =
        events.iter().partition(|d| d.action == "penalty");
    let mut pipe = redis::pipe();
    for d in &decisions {
        add_record(&mut pipe, d, 0, now_ms)?;
    }
    let mut found: Vec<i64> = Vec::new();
    for d in &penalties {
        pipe.cmd("EVAL").arg(ADD_HITS).arg(1).arg(record_key(&d.id)).arg(d.hits).arg(d.time_ms).arg(MAX_AGE_MS);
    }
    if !events.is_empty() {
        let mut c = conn.clone();
        found = bounded(async move { pipe.query_async::<Vec<i64>>(&mut c).await }).await?;
    }
    stored.records = decisions.len() as u64;
    // A penalty whose decision is not here (aged out, trimmed) is a record of its own.
    let mut pipe = redis::pipe();
    for (d, hit) in penalties.iter().zip(found.iter().chain(std::iter::repeat(&0))) {
        if *hit == 1 {
            stored.aggregated += 1;
        } else {
            add_record(&mut pipe, d, d.hits, now_ms)?;
            stored.records += 1;
        }
    }
    if stored.records > 0 {
        pipe.cmd("PEXPIRE").arg(ALL_KEY).arg(MAX_AGE_MS).ignore();
        pipe.cmd("EVAL")
            .arg(TRIM_ALL)
            .arg(1)
            .arg(ALL_KEY)
            .arg(REDIS_CAP)
            .arg(now_ms.saturating_sub(MAX_AGE_MS))
            .arg("abuse:v1:dec:")
            .ignore();
        let mut c = conn.clone();
        bounded(async move { pipe.query_async::<()>(&mut c).await }).await?;
    }
    Ok(stored)
}

/// The records of `ids` (in that order) still in Redis.
async fn fetch(conn: &ConnectionManager, ids: &[String]) -> Result<Vec<Record>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for id in ids {
        pipe.cmd("HMGET").arg(record_key(id)).arg("json").arg("hits").arg("last_hit_ms");
    }
    let mut c = conn.clone();
    let rows: Vec<(Option<String>, Option<u64>, Option<u64>)> =
        bounded(async move { pipe.query_async(&mut c).await }).await?;
    Ok(rows
        .into_iter()
        .filter_map(|(json, hits, last)| {
            // Unreadable (another version wrote it): skipped, not an error.
            let mut r: Record = serde_json::from_str(&json?).ok()?;
            r.penalty_hits = r.penalty_hits.saturating_add(hits.unwrap_or(0));
            r.last_hit_ms = r.last_hit_ms.max(last.unwrap_or(0));
            Some(r)
        })
        .collect())
}

async fn find_redis(conn: &ConnectionManager, key: &Key, limit: usize, now_ms: u64) -> Result<Vec<Record>, StoreError> {
    let index = key.index().unwrap_or_else(|| ALL_KEY.to_string());
    // A label is filtered out of its address's index: read that whole.
    let take = if matches!(key, Key::Label(_)) { PER_KEY_CAP } else { limit };
    let horizon = now_ms.saturating_sub(MAX_AGE_MS);
    let mut c = conn.clone();
    let ids: Vec<String> = bounded(async move {
        redis::cmd("ZREVRANGEBYSCORE")
            .arg(&index)
            .arg("+inf")
            .arg(horizon)
            .arg("LIMIT")
            .arg(0)
            .arg(take)
            .query_async(&mut c)
            .await
    })
    .await?;
    let mut records = fetch(conn, &ids).await?;
    records.retain(|r| key.matches(&r.decision));
    records.truncate(limit);
    Ok(records)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
pub(crate) mod tests {
    use super::*;
    use abuse_engine::wire::ReasonFigure;

    pub(crate) fn event(id: &str, client: &str, action: &str, t: u64) -> DecisionEvent {
        DecisionEvent {
            id: id.into(),
            time_ms: t,
            instance: "envoy-a".into(),
            client: client.into(),
            address: address_of(client).into(),
            method: "POST".into(),
            path: "/api/login".into(),
            route_group: Some("login".into()),
            action: action.into(),
            mode: "block".into(),
            status: 403,
            risk: 100.0,
            until_ms: t + 60_000,
            hits: if action == "penalty" { 7 } else { 0 },
            session: Some("00112233aabbccdd".into()),
            credential: Some("key".into()),
            reasons: vec![ReasonFigure {
                reason: "credential_stuffing".into(),
                what: "failed-login usernames".into(),
                value: 29.0,
                limit: 5.0,
                window_s: 600,
                text: "29 failed-login usernames in 600 s; limit 5".into(),
            }],
            ..DecisionEvent::default()
        }
    }

    #[test]
    fn checks_bound_every_field() {
        let t = 1_700_000_000_000;
        assert_eq!(check(&event("e1-0-1", "203.0.113.7", "block", t)), Ok(()));
        assert_eq!(check(&event("e1-0-1", "203.0.113.7#pool", "block", t)), Ok(()));
        let bad = [
            DecisionEvent { id: String::new(), ..event("x", "1.2.3.4", "block", t) },
            DecisionEvent { id: "a b".into(), ..event("x", "1.2.3.4", "block", t) },
            DecisionEvent { action: "nuke".into(), ..event("x", "1.2.3.4", "block", t) },
            DecisionEvent { mode: "x".into(), ..event("x", "1.2.3.4", "block", t) },
            DecisionEvent { client: "9.9.9.9".into(), ..event("x", "1.2.3.4", "block", t) },
            DecisionEvent { session: Some("raw-cookie-value".into()), ..event("x", "1.2.3.4", "block", t) },
            DecisionEvent { risk: f32::NAN, ..event("x", "1.2.3.4", "block", t) },
            DecisionEvent { reasons: vec![ReasonFigure::default(); 9], ..event("x", "1.2.3.4", "block", t) },
            DecisionEvent { credential: Some("password".into()), ..event("x", "1.2.3.4", "block", t) },
        ];
        for b in bad {
            assert!(check(&b).is_err(), "{b:?}");
        }
        let mut long = DecisionEvent { path: "/é".repeat(200), ..event("x", "1.2.3.4", "block", t) };
        assert!(clamp_path(&mut long) && long.path.len() <= MAX_PATH && check(&long).is_ok());
        let mut future = event("x", "1.2.3.4", "block", t + 3_600_000);
        assert!(clamp_time(&mut future, t));
        assert_eq!(future.time_ms, t);
    }

    /// What every store must do; run on memory and on a real Redis.
    pub(crate) async fn contract(d: &Decisions, t: u64, redis: bool) {
        let find = |key: Key| async move {
            if redis {
                d.find_redis(&key, 100, t + 10).await.unwrap().unwrap()
            } else {
                d.find_local(&key, 100, t + 10)
            }
        };
        let batch = vec![
            event("a-0-1", "203.0.113.7", "block", t),
            event("a-0-1", "203.0.113.7", "penalty", t + 1),
            event("a-0-2", "203.0.113.7#1a2b3c4d", "shed", t + 1),
            event("a-0-3", "198.51.100.1", "tag", t + 2),
        ];
        let (s, r) = d.store(&batch, t).await;
        r.unwrap();
        assert_eq!(s, Stored { records: 3, aggregated: 1 }, "a penalty finds its block in the same batch");
        // Penalty hits add up on the decision they quote; an unknown one is its own.
        let (s, r) = d
            .store(&[event("a-0-1", "203.0.113.7", "penalty", t + 5), event("zz-9", "192.0.2.1", "penalty", t + 6)], t + 6)
            .await;
        r.unwrap();
        assert_eq!(s, Stored { records: 1, aggregated: 1 });

        let at = find(Key::Address("203.0.113.7".into())).await;
        let ids: Vec<&str> = at.iter().map(|r| r.decision.id.as_str()).collect();
        assert_eq!(ids.len(), 2);
        assert!(ids.contains(&"a-0-1") && ids.contains(&"a-0-2"), "{ids:?}");
        let boxed = at.iter().find(|r| r.decision.id == "a-0-1").unwrap();
        assert_eq!((boxed.penalty_hits, boxed.last_hit_ms), (14, t + 5));
        assert_eq!(boxed.decision.reasons[0].value, 29.0);
        let label = find(Key::Label("203.0.113.7#1a2b3c4d".into())).await;
        assert_eq!(label.len(), 1);
        assert_eq!(find(Key::Session("00112233aabbccdd".into())).await.len(), 4);
        assert!(find(Key::Username("00112233aabbccdd".into())).await.is_empty());
        assert_eq!(find(Key::Recent).await.len(), 4);
        let own = find(Key::Address("192.0.2.1".into())).await;
        assert_eq!((own.len(), own[0].penalty_hits), (1, 7));
        // Another worker's batch can bring the penalty before the block it
        // quotes: the block takes the placeholder's place, hits kept.
        d.store(&[event("late-1", "198.51.100.9", "penalty", t + 7)], t + 7).await.1.unwrap();
        d.store(&[event("late-1", "198.51.100.9", "block", t + 6)], t + 8).await.1.unwrap();
        d.store(&[event("late-1", "198.51.100.9", "penalty", t + 9)], t + 9).await.1.unwrap();
        let late = find(Key::Address("198.51.100.9".into())).await;
        assert_eq!(late.len(), 1, "one record per decision");
        assert_eq!((late[0].decision.action.as_str(), late[0].penalty_hits), ("block", 14));
    }

    #[tokio::test]
    async fn memory_store_keeps_the_contract() {
        contract(&Decisions::memory(), 1_700_000_000_000, false).await;
    }

    #[tokio::test]
    async fn memory_is_bounded_by_count_and_age() {
        let d = Decisions::with_cap(10, None);
        let t = 1_700_000_000_000;
        let batch: Vec<_> = (0..25).map(|i| event(&format!("b-{i}"), "203.0.113.7", "block", t)).collect();
        d.store(&batch, t).await.1.unwrap();
        let all = d.find_local(&Key::Recent, 100, t);
        assert_eq!(all.len(), 10);
        assert_eq!(all[0].decision.id, "b-24", "newest first");
        assert!(d.get_local("b-3").is_none(), "the id index forgets what left the ring");
        assert!(d.get_local("b-20").is_some());
        assert_eq!(lock(&d.ring).by_id.len(), 10);
        assert!(d.find_local(&Key::Recent, 100, t + MAX_AGE_MS + 1).is_empty(), "aged out");
        assert_eq!(lock(&d.ring).bytes, 0, "the byte count follows the ring");
        // The byte budget holds whatever the count: largest records.
        let big = Decisions::with_cap(MEMORY_CAP, None);
        let mut e = event("x", "203.0.113.7", "block", t);
        e.path = "p".repeat(MAX_PATH);
        e.reasons = vec![e.reasons[0].clone(); MAX_DECISION_REASONS];
        for r in &mut e.reasons {
            r.text = "t".repeat(256);
        }
        let per = approx_bytes(&e);
        let batch: Vec<_> = (0..MEMORY_BYTES / per + 100).map(|i| DecisionEvent { id: format!("x-{i}"), ..e.clone() }).collect();
        big.store(&batch, t).await.1.unwrap();
        let ring = lock(&big.ring);
        assert!(ring.bytes <= MEMORY_BYTES && ring.records.len() < batch.len(), "{} records, {} bytes", ring.records.len(), ring.bytes);
        assert_eq!(d.since_local(t - 1, 5).len(), 0);
    }

    #[test]
    fn redis_store_keeps_the_contract_and_its_bounds() {
        let Some(server) = crate::store::redis::tests::start_redis() else { return };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let url = format!("redis://127.0.0.1:{}", server.port);
            let store = crate::store::redis::RedisStore::connect_lazy(&url).unwrap();
            let d = Decisions::redis(Some(store.connection()));
            let t = crate::clock::now_ms();
            contract(&d, t, true).await;
            assert_eq!(d.get_redis("a-0-2").await.unwrap().unwrap().unwrap().decision.action, "shed");
            assert!(d.get_redis("nope").await.unwrap().unwrap().is_none());
            // Every key expires.
            let mut c = store.connection();
            let keys: Vec<String> = redis::cmd("KEYS").arg("abuse:v1:dec*").query_async(&mut c).await.unwrap();
            assert!(keys.len() >= 5, "{keys:?}");
            for k in keys {
                let ttl: i64 = redis::cmd("PTTL").arg(&k).query_async(&mut c).await.unwrap();
                assert!(ttl > 0 && ttl as u64 <= MAX_AGE_MS, "{k}: {ttl}");
            }
            // The count bound deletes what it trims.
            let removed: i64 = redis::cmd("EVAL")
                .arg(TRIM_ALL)
                .arg(1)
                .arg(ALL_KEY)
                .arg(2)
                .arg(0)
                .arg("abuse:v1:dec:")
                .query_async(&mut c)
                .await
                .unwrap();
            assert_eq!(removed, 3, "five records (late-1 included), two kept");
            let left: i64 = redis::cmd("ZCARD").arg(ALL_KEY).query_async(&mut c).await.unwrap();
            assert_eq!(left, 2);
            let gone: i64 = redis::cmd("EXISTS").arg(record_key("a-0-1")).query_async(&mut c).await.unwrap();
            assert_eq!(gone, 0, "the oldest record was deleted with its index entry");
        });
    }
}
