//! Hot quota figures: bytes stored and bytes reserved by in-flight pushes per project, and
//! month-to-date egress. They live in Redis when `REDIS_URL` is set (shared by replicas) and
//! in process otherwise. The database stays the ledger: a missing figure is a *miss* that the
//! caller rebuilds from the database, figures expire after [`FIGURE_TTL`] so any drift heals,
//! and with Redis unreachable the service falls back to in-process figures and says so once.
//!
//! Reservations are atomic check-and-add (a Lua script in Redis, a mutex in process), so two
//! pushes can never both squeeze under a limit.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::domain::Error;

/// How long a rebuilt figure is trusted before it is rebuilt again.
pub const FIGURE_TTL: Duration = Duration::from_secs(60);
/// How long reservations of an idle project survive a crashed replica.
const RESERVATION_TTL: Duration = Duration::from_secs(6 * 3600);

/// The outcome of a reservation attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserve {
    Granted,
    /// Would exceed the limit; the figures it was checked against.
    Denied {
        stored: i64,
        reserved: i64,
    },
    /// The stored figure is unknown: load it from the database, `prime_stored`, retry.
    Miss,
}

#[derive(Clone)]
pub struct Counters {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counters")
            .field("redis", &self.inner.redis.is_some())
            .finish()
    }
}

struct Inner {
    redis: Option<ConnectionManager>,
    prefix: String,
    local: std::sync::Mutex<HashMap<String, (i64, Instant)>>,
    redis_down_logged: AtomicBool,
}

const RESERVE: &str = r#"
local stored = redis.call('GET', KEYS[1])
if not stored then return {-1, 0, 0} end
local reserved = tonumber(redis.call('GET', KEYS[2]) or '0')
local want = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
if limit >= 0 and tonumber(stored) + reserved + want > limit then
  return {0, tonumber(stored), reserved}
end
if ARGV[4] == '1' then
  redis.call('INCRBY', KEYS[1], want)
else
  redis.call('INCRBY', KEYS[2], want)
  redis.call('EXPIRE', KEYS[2], ARGV[3])
end
return {1, tonumber(stored), reserved}
"#;

const SETTLE: &str = r#"
local reserved = tonumber(redis.call('GET', KEYS[2]) or '0')
local release = tonumber(ARGV[1])
if release > reserved then release = reserved end
if release > 0 then redis.call('DECRBY', KEYS[2], release) end
if tonumber(ARGV[2]) ~= 0 and redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('INCRBY', KEYS[1], ARGV[2])
end
return 1
"#;

const ADD_IF_PRESENT: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('INCRBY', KEYS[1], ARGV[1]) end
return false
"#;

impl Counters {
    pub fn in_process() -> Self {
        Self::with(None, String::new())
    }

    /// Uses Redis at `url`. Connects lazily, so a Redis that is down at start-up does not stop
    /// the service (it runs on in-process figures until Redis answers).
    pub fn redis(url: &str, prefix: &str) -> Result<Self, Error> {
        let client = redis::Client::open(url).map_err(|e| Error::Unavailable {
            what: "redis",
            cause: e.to_string(),
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_millis(500)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let manager = ConnectionManager::new_lazy_with_config(client, config).map_err(|e| {
            Error::Unavailable {
                what: "redis",
                cause: e.to_string(),
            }
        })?;
        Ok(Self::with(Some(manager), prefix.to_owned()))
    }

    fn with(redis: Option<ConnectionManager>, prefix: String) -> Self {
        Self {
            inner: Arc::new(Inner {
                redis,
                prefix,
                local: std::sync::Mutex::new(HashMap::new()),
                redis_down_logged: AtomicBool::new(false),
            }),
        }
    }

    fn stored_key(&self, project: &str) -> String {
        format!("{}artifactd:stored:{project}", self.inner.prefix)
    }

    fn reserved_key(&self, project: &str) -> String {
        format!("{}artifactd:reserved:{project}", self.inner.prefix)
    }

    fn egress_key(&self, project: &str, month: &str) -> String {
        format!("{}artifactd:egress:{project}:{month}", self.inner.prefix)
    }

    /// Reserves `bytes` if `stored + reserved + bytes <= limit` (`None`: no limit). With
    /// `as_stored`, the bytes are counted as stored at once (a push of declared size, which
    /// then needs no second round trip when it commits; undone with a negative `settle`).
    pub async fn try_reserve(
        &self,
        project: &str,
        bytes: i64,
        limit: Option<i64>,
        as_stored: bool,
    ) -> Reserve {
        let keys = [self.stored_key(project), self.reserved_key(project)];
        if let Some(redis) = self.connection() {
            let result: redis::RedisResult<(i64, i64, i64)> = redis::Script::new(RESERVE)
                .key(&keys[0])
                .key(&keys[1])
                .arg(bytes)
                .arg(limit.unwrap_or(-1))
                .arg(RESERVATION_TTL.as_secs())
                .arg(if as_stored { "1" } else { "0" })
                .invoke_async(&mut redis.clone())
                .await;
            match result {
                Ok((1, _, _)) => return Reserve::Granted,
                Ok((0, stored, reserved)) => return Reserve::Denied { stored, reserved },
                Ok(_) => return Reserve::Miss,
                Err(e) => self.redis_failed(&e),
            }
        }
        let mut local = self.local();
        let now = Instant::now();
        let Some(stored) = fresh(&local, &keys[0], now) else {
            return Reserve::Miss;
        };
        let reserved = fresh(&local, &keys[1], now).unwrap_or(0);
        if limit.is_some_and(|limit| stored + reserved + bytes > limit) {
            return Reserve::Denied { stored, reserved };
        }
        if as_stored {
            if let Some((value, _)) = local.get_mut(&keys[0]) {
                *value += bytes;
            }
        } else {
            local.insert(keys[1].clone(), (reserved + bytes, now + RESERVATION_TTL));
        }
        Reserve::Granted
    }

    /// Sets the stored figure rebuilt from the database, unless another replica did first.
    pub async fn prime_stored(&self, project: &str, stored: i64) {
        self.prime(self.stored_key(project), stored).await;
    }

    /// Ends a reservation: releases `reserved` and adds `stored_delta` to the stored figure
    /// (when it is known).
    pub async fn settle(&self, project: &str, reserved: i64, stored_delta: i64) {
        let keys = [self.stored_key(project), self.reserved_key(project)];
        if let Some(redis) = self.connection() {
            let result: redis::RedisResult<i64> = redis::Script::new(SETTLE)
                .key(&keys[0])
                .key(&keys[1])
                .arg(reserved)
                .arg(stored_delta)
                .invoke_async(&mut redis.clone())
                .await;
            match result {
                Ok(_) => return,
                Err(e) => self.redis_failed(&e),
            }
        }
        let mut local = self.local();
        let now = Instant::now();
        if let Some(current) = fresh(&local, &keys[1], now) {
            local.insert(
                keys[1].clone(),
                ((current - reserved).max(0), now + RESERVATION_TTL),
            );
        }
        if stored_delta != 0
            && let Some((value, _)) = local.get_mut(&keys[0])
        {
            *value += stored_delta;
        }
    }

    /// Month-to-date egress bytes, if known.
    pub async fn egress(&self, project: &str, month: &str) -> Option<i64> {
        let key = self.egress_key(project, month);
        if let Some(redis) = self.connection() {
            let result: redis::RedisResult<Option<i64>> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut redis.clone())
                .await;
            match result {
                Ok(value) => return value,
                Err(e) => self.redis_failed(&e),
            }
        }
        fresh(&self.local(), &key, Instant::now())
    }

    pub async fn prime_egress(&self, project: &str, month: &str, bytes: i64) {
        self.prime(self.egress_key(project, month), bytes).await;
    }

    /// Adds sent bytes to the month-to-date egress figure, when it is known.
    pub async fn add_egress(&self, project: &str, month: &str, bytes: i64) {
        let key = self.egress_key(project, month);
        if let Some(redis) = self.connection() {
            let result: redis::RedisResult<Option<i64>> = redis::Script::new(ADD_IF_PRESENT)
                .key(&key)
                .arg(bytes)
                .invoke_async(&mut redis.clone())
                .await;
            match result {
                Ok(_) => return,
                Err(e) => self.redis_failed(&e),
            }
        }
        if let Some((value, _)) = self.local().get_mut(&key) {
            *value += bytes;
        }
    }

    /// Forgets a project's figures (after changes the counters cannot follow, such as a
    /// retention recomputation).
    pub async fn forget_stored(&self, project: &str) {
        let key = self.stored_key(project);
        if let Some(redis) = self.connection() {
            let result: redis::RedisResult<i64> = redis::cmd("DEL")
                .arg(&key)
                .query_async(&mut redis.clone())
                .await;
            if let Err(e) = result {
                self.redis_failed(&e);
            }
        }
        self.local().remove(&key);
    }

    async fn prime(&self, key: String, value: i64) {
        if let Some(redis) = self.connection() {
            let result: redis::RedisResult<Option<String>> = redis::cmd("SET")
                .arg(&key)
                .arg(value)
                .arg("NX")
                .arg("EX")
                .arg(FIGURE_TTL.as_secs())
                .query_async(&mut redis.clone())
                .await;
            match result {
                Ok(_) => return,
                Err(e) => self.redis_failed(&e),
            }
        }
        let mut local = self.local();
        let now = Instant::now();
        if fresh(&local, &key, now).is_none() {
            local.insert(key, (value, now + FIGURE_TTL));
        }
    }

    fn connection(&self) -> Option<&ConnectionManager> {
        self.inner.redis.as_ref()
    }

    fn redis_failed(&self, e: &redis::RedisError) {
        if !self.inner.redis_down_logged.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                error = %e,
                "redis unavailable: quota figures fall back to the database and this process"
            );
        }
    }

    fn local(&self) -> std::sync::MutexGuard<'_, HashMap<String, (i64, Instant)>> {
        // A poisoned lock only means another thread panicked mid-update of plain integers.
        self.inner
            .local
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn fresh(map: &HashMap<String, (i64, Instant)>, key: &str, now: Instant) -> Option<i64> {
    map.get(key)
        .filter(|(_, expires)| *expires > now)
        .map(|(value, _)| *value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn in_process_reservations_respect_the_limit() {
        let counters = Counters::in_process();
        assert_eq!(
            counters.try_reserve("p", 10, Some(100), false).await,
            Reserve::Miss
        );
        counters.prime_stored("p", 50).await;
        assert_eq!(
            counters.try_reserve("p", 30, Some(100), false).await,
            Reserve::Granted
        );
        assert_eq!(
            counters.try_reserve("p", 30, Some(100), false).await,
            Reserve::Denied {
                stored: 50,
                reserved: 30
            }
        );
        counters.settle("p", 30, 30).await;
        assert_eq!(
            counters.try_reserve("p", 21, Some(100), false).await,
            Reserve::Denied {
                stored: 80,
                reserved: 0
            }
        );
        assert_eq!(
            counters.try_reserve("p", 20, Some(100), false).await,
            Reserve::Granted
        );
        counters.settle("p", 20, 0).await;
        // Counted as stored at once: nothing left to settle when the push commits.
        assert_eq!(
            counters.try_reserve("p", 15, Some(100), true).await,
            Reserve::Granted
        );
        assert_eq!(
            counters.try_reserve("p", 6, Some(100), false).await,
            Reserve::Denied {
                stored: 95,
                reserved: 0
            }
        );
        // Undone (the push failed): the bytes are free again.
        counters.settle("p", 0, -15).await;
        assert_eq!(
            counters.try_reserve("p", 20, Some(100), false).await,
            Reserve::Granted
        );
    }
}
