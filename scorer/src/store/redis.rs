//! Fleet state in Redis, shared by every scorer pointed at it.
//!
//! Keys (all under `abuse:`; usernames arrive hashed):
//!
//! | key | type | what |
//! |---|---|---|
//! | `abuse:u:{bucket}:{user}` | string (INCR) | attempts in one 10-min bucket; expires after two |
//! | `abuse:s:{session}` | sorted set | address → last seen ms; trimmed to the window and 32 members |
//! | `abuse:b:{client}` | string (JSON verdict) | live block, expires with it |
//! | `abuse:v:seq` | string (INCR) | the verdict cursor |
//! | `abuse:v:log` | sorted set | `{cursor}:{verdict JSON}` scored by cursor; last 10,000 |
//!
//! Every call is bounded by [`CALL_TIMEOUT`] on top of the connection's own
//! timeouts: a slow Redis must cost a borderline request a fallback, never
//! the filter's whole call budget.

use super::{
    sliding_estimate, FleetStore, StoreError, SESSION_ADDRESS_CAP, VERDICTS_PAGE, VERDICT_LOG_CAP,
    WINDOW_MS,
};
use abuse_engine::wire::{FleetVerdict, FleetVerdicts, WIRE_VERSION};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::future::Future;
use std::time::Duration;

/// Most time one store call may take before the memory store answers.
pub const CALL_TIMEOUT: Duration = Duration::from_millis(250);
const SEQ_KEY: &str = "abuse:v:seq";
const LOG_KEY: &str = "abuse:v:log";

pub struct RedisStore {
    conn: ConnectionManager,
}

async fn bounded<T>(call: impl Future<Output = redis::RedisResult<T>>) -> Result<T, StoreError> {
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

/// Log members carry their cursor so that two equal verdicts stay two members.
fn parse_log_member(member: &str) -> Option<FleetVerdict> {
    let (_, json) = member.split_once(':')?;
    serde_json::from_str(json).ok()
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
        let verdicts = page
            .iter()
            .filter_map(|(member, _)| parse_log_member(member))
            .filter(|v| v.until_ms >= now_ms)
            .collect();
        Ok(FleetVerdicts {
            version: WIRE_VERSION,
            next,
            verdicts,
        })
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
mod tests {
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
