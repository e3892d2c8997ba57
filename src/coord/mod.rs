//! Hot quota figures and reservations, per project: bytes stored, month-to-date egress, and
//! the reservations of pushes and pulls in flight. They live in Redis when `REDIS_URL` is set
//! (shared by replicas) and in process otherwise. The database stays the ledger: a missing
//! figure is a *miss* that the caller rebuilds from the database, and figures expire after
//! [`FIGURE_TTL`] so any drift heals. With Redis configured and unreachable, a reservation
//! is refused as [`Reserve::Unavailable`] (UNAVAILABLE to the client): falling back to this
//! process alone would let replicas together pass a cap. A settle that cannot reach Redis
//! is retried in the background until it can, in an idempotent form (the entry goes, the
//! figure is forgotten and rebuilt from the database, which holds the change), so nothing
//! is lost or counted twice across an outage.
//!
//! A figure counts only what the database holds (committed artifacts, recorded egress).
//! Reservations are kept apart from it, one entry per holder with its own deadline, so a
//! rebuilt figure never forgets bytes in flight, and a holder that dies (a crashed replica)
//! stops counting [`Counters::reservation_ttl`] after its last refresh however busy the
//! project is. A live holder's entries are refreshed by a background task of this process
//! until they are settled. Check-and-reserve is atomic (a Lua script in Redis, a mutex in
//! process), so two requests can never both squeeze under a limit.
//!
//! Reservations and settlements in flight at once go to Redis in one call (`batch.rs`).
//! Named leases with their own expiry (the sweeper's, across replicas) are in `lease.rs`.
//!
//! Spawned work that must outlive a request (releasing a reservation from `Drop`, recording
//! egress) goes through [`Counters::spawn`]: one task tracker that shutdown drains.

mod batch;
mod lease;

pub use lease::Lease;

use std::collections::HashMap;
use std::future::Future;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use redis::IntoConnectionInfo;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::io::tcp::TcpSettings;
use tokio_util::task::TaskTracker;

use crate::domain::Error;

/// How long a rebuilt figure is trusted before it is rebuilt again.
pub const FIGURE_TTL: Duration = Duration::from_secs(60);
/// How long a figure's change count is kept: longer than any rebuild takes.
const GENERATION_TTL: Duration = Duration::from_secs(10 * 60);
/// How long a reservation outlives its holder's last refresh. Holders refresh every third
/// of it, so only a dead holder's reservations lapse.
pub const RESERVATION_TTL: Duration = Duration::from_secs(5 * 60);
/// How long a Redis command or connection may take by default before Redis counts as not
/// answering (`ARTIFACTD_REDIS_TIMEOUT`).
pub const REDIS_TIMEOUT: Duration = Duration::from_millis(500);

/// What a reservation is counted against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool<'a> {
    /// Bytes stored (the project's storage limit or cap).
    Storage,
    /// Bytes sent in a calendar month, named like `2026-11` (included egress).
    Egress(&'a str),
}

/// The outcome of a reservation attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserve {
    Granted,
    /// Would exceed the limit; the figures it was checked against (`reserved` excludes the
    /// requester's own entry).
    Denied {
        stored: i64,
        reserved: i64,
    },
    /// The base figure is unknown: load it from the database, prime it, retry.
    Miss,
    /// Redis is configured but does not answer: nothing was reserved; retry later.
    Unavailable,
}

/// How a reservation entry ends (or shrinks) when usage is recorded against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// The entry is gone.
    All,
    /// The entry keeps what is left after this many bytes (recorded meanwhile) are taken out.
    Part(i64),
}

#[derive(Clone)]
pub struct Counters {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counters")
            .field("redis", &self.inner.redis.is_some())
            .field("reservation_ttl", &self.inner.reservation_ttl)
            .finish()
    }
}

struct Inner {
    redis: Option<ConnectionManager>,
    prefix: String,
    reservation_ttl: Duration,
    local: std::sync::Mutex<Local>,
    /// Reservations this process holds, refreshed until settled: (entries key, id).
    held: std::sync::Mutex<HashMap<(String, String), ()>>,
    tasks: TaskTracker,
    /// Called when shutdown drains: work in flight (pulls stuck on a slow client) hands
    /// what it has to the tracker before the process goes.
    on_drain: std::sync::Mutex<HashMap<u64, DrainHook>>,
    next_hook: std::sync::atomic::AtomicU64,
    redis_down_logged: AtomicBool,
    /// Reservations and settlements on their way to Redis.
    batches: Arc<batch::Batches>,
}

/// A callback run once at drain.
pub type DrainHook = Arc<dyn Fn() + Send + Sync>;

/// The in-process stand-in: figures with their expiry, and per pool the reservation
/// entries with their deadlines.
#[derive(Default)]
struct Local {
    figures: HashMap<String, (i64, Instant)>,
    /// Per figure, how many recorded changes it has seen (see [`Counters::token`]).
    generations: HashMap<String, i64>,
    reservations: HashMap<String, HashMap<String, (i64, Instant)>>,
}

/// KEYS: figure, deadlines, amounts, generation. ARGV: id ('' for none), generation ttl.
/// The idempotent form of a settle that could not reach Redis: the entry (if named) goes,
/// and the figure is forgotten, so the next reservation rebuilds it from the database.
static RESET: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
if ARGV[1] ~= '' then
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
end
redis.call('DEL', KEYS[1])
redis.call('INCR', KEYS[4])
redis.call('EXPIRE', KEYS[4], ARGV[2])
return 1
"#,
    )
});

/// KEYS: figure, generation. ARGV: value, token, ttl. Sets the figure unless it exists or
/// a change was recorded since the token was taken (the value may predate it).
static PRIME: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
if tonumber(redis.call('GET', KEYS[2]) or '0') ~= tonumber(ARGV[2]) then return 0 end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[3]) then return 1 end
return 0
"#,
    )
});

/// KEYS: deadlines, amounts. ARGV: ttl ms, ids... Moves the deadline of each id still held.
static REFRESH: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local now = redis.call('TIME')
local deadline = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do
  if redis.call('HEXISTS', KEYS[2], ARGV[i]) == 1 then
    redis.call('ZADD', KEYS[1], 'XX', deadline, ARGV[i])
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return 1
"#,
    )
});

/// KEYS: deadlines, amounts. Sum of the live entries.
static RESERVED: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local total = 0
local live = redis.call('ZRANGEBYSCORE', KEYS[1], now_ms, '+inf')
for _, id in ipairs(live) do
  total = total + tonumber(redis.call('HGET', KEYS[2], id) or '0')
end
return total
"#,
    )
});

impl Counters {
    pub fn in_process() -> Self {
        Self::with(None, String::new(), RESERVATION_TTL)
    }

    /// Uses Redis at `url`. Connects lazily, so a Redis that is down at start-up does not stop
    /// the service (it runs on in-process figures until Redis answers).
    /// A command (or a connection) that takes longer than `timeout` counts as Redis not
    /// answering ([`REDIS_TIMEOUT`] by default, `ARTIFACTD_REDIS_TIMEOUT`).
    pub fn redis(url: &str, prefix: &str, timeout: Duration) -> Result<Self, Error> {
        Self::redis_with_ttl(url, prefix, timeout, RESERVATION_TTL)
    }

    /// Like [`Counters::redis`] with another reservation lifetime (tests).
    pub fn redis_with_ttl(
        url: &str,
        prefix: &str,
        timeout: Duration,
        ttl: Duration,
    ) -> Result<Self, Error> {
        // redis-rs leaves Nagle's algorithm on: with many commands in flight on the one
        // multiplexed connection, each small write then waits for the previous one's ACK.
        let info = url
            .into_connection_info()
            .map_err(|e| Error::Unavailable {
                what: "redis",
                cause: e.to_string(),
            })?
            .set_tcp_settings(TcpSettings::default().set_nodelay(true));
        let client = redis::Client::open(info).map_err(|e| Error::Unavailable {
            what: "redis",
            cause: e.to_string(),
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let manager = ConnectionManager::new_lazy_with_config(client, config).map_err(|e| {
            Error::Unavailable {
                what: "redis",
                cause: e.to_string(),
            }
        })?;
        Ok(Self::with(Some(manager), prefix.to_owned(), ttl))
    }

    /// In process with another reservation lifetime (tests).
    pub fn in_process_with_ttl(ttl: Duration) -> Self {
        Self::with(None, String::new(), ttl)
    }

    fn with(redis: Option<ConnectionManager>, prefix: String, reservation_ttl: Duration) -> Self {
        let inner = Arc::new(Inner {
            redis,
            prefix,
            reservation_ttl,
            local: std::sync::Mutex::new(Local::default()),
            held: std::sync::Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
            on_drain: std::sync::Mutex::new(HashMap::new()),
            next_hook: std::sync::atomic::AtomicU64::new(0),
            redis_down_logged: AtomicBool::new(false),
            batches: Arc::default(),
        });
        // Outside a runtime (never in the service) nothing refreshes: reservations then
        // simply lapse after their lifetime.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(refresh_held(Arc::downgrade(&inner)));
        }
        Self { inner }
    }

    /// Whether the figures and reservations are shared by replicas (Redis configured).
    pub fn shared(&self) -> bool {
        self.inner.redis.is_some()
    }

    pub fn reservation_ttl(&self) -> Duration {
        self.inner.reservation_ttl
    }

    /// Runs `task` on the tracker that [`Counters::drain`] waits for at shutdown.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            self.inner.tasks.spawn_on(task, &runtime);
        }
    }

    /// Registers `hook` to run when shutdown drains; returns its id for
    /// [`Counters::forget_on_drain`].
    pub fn on_drain(&self, hook: DrainHook) -> u64 {
        let id = self.inner.next_hook.fetch_add(1, Ordering::Relaxed);
        self.hooks().insert(id, hook);
        id
    }

    pub fn forget_on_drain(&self, id: u64) {
        self.hooks().remove(&id);
    }

    fn hooks(&self) -> std::sync::MutexGuard<'_, HashMap<u64, DrainHook>> {
        self.inner
            .on_drain
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs the drain hooks, then waits up to `deadline` for tracked tasks (releases,
    /// egress records) to finish. Returns whether they all did.
    pub async fn drain(&self, deadline: Duration) -> bool {
        let hooks: Vec<DrainHook> = self.hooks().values().cloned().collect();
        for hook in hooks {
            hook();
        }
        self.inner.tasks.close();
        tokio::time::timeout(deadline, self.inner.tasks.wait())
            .await
            .is_ok()
    }

    fn figure_key(&self, project: &str, pool: Pool<'_>) -> String {
        match pool {
            Pool::Storage => format!("{}artifactd:stored:{project}", self.inner.prefix),
            Pool::Egress(month) => {
                format!("{}artifactd:egress:{project}:{month}", self.inner.prefix)
            }
        }
    }

    fn generation_key(&self, project: &str, pool: Pool<'_>) -> String {
        let figure = self.figure_key(project, pool);
        format!("{figure}:gen")
    }

    /// A reservation or settlement of `pool` for the batch script, with the keys it touches:
    /// the figure, the entries' deadlines and amounts, and the figure's change count.
    fn batch_op(&self, project: &str, pool: Pool<'_>, kind: batch::OpKind) -> batch::Op {
        let (deadlines, amounts) = self.entry_keys(project, pool);
        batch::Op {
            keys: [
                self.figure_key(project, pool),
                deadlines,
                amounts,
                self.generation_key(project, pool),
            ],
            kind,
        }
    }

    /// The keys of a pool's reservation entries: deadlines (ZSET) and amounts (HASH).
    fn entry_keys(&self, project: &str, pool: Pool<'_>) -> (String, String) {
        let pool = match pool {
            Pool::Storage => "stored".to_owned(),
            Pool::Egress(month) => format!("egress:{month}"),
        };
        let base = format!("{}artifactd:res:{pool}:{project}", self.inner.prefix);
        (format!("{base}:deadline"), format!("{base}:bytes"))
    }

    /// Sets reservation `id`'s total to `total` if `figure + others + total <= limit`
    /// (`None`: no limit), where `others` are the live entries of other holders. Entries
    /// whose deadline passed are purged first. A granted entry is refreshed by this process
    /// until [`Counters::settle`] releases it.
    pub async fn try_reserve(
        &self,
        project: &str,
        pool: Pool<'_>,
        id: &str,
        total: i64,
        limit: Option<i64>,
    ) -> Reserve {
        let figure = self.figure_key(project, pool);
        let (_, amounts) = self.entry_keys(project, pool);
        let ttl = self.inner.reservation_ttl;
        let outcome = 'outcome: {
            if let Some(redis) = self.connection() {
                let op = self.batch_op(
                    project,
                    pool,
                    batch::OpKind::Reserve {
                        id: id.to_owned(),
                        total,
                        limit: limit.unwrap_or(-1),
                        ttl_ms: millis(ttl),
                    },
                );
                let result = self.inner.batches.run(redis, &self.inner.tasks, op).await;
                if result.is_ok() {
                    self.redis_answered();
                }
                match result {
                    Ok((1, _, _)) => break 'outcome Reserve::Granted,
                    Ok((0, stored, reserved)) => {
                        break 'outcome Reserve::Denied { stored, reserved };
                    }
                    Ok(_) => break 'outcome Reserve::Miss,
                    Err(e) => {
                        self.redis_failed(&e);
                        break 'outcome Reserve::Unavailable;
                    }
                }
            }
            let mut local = self.local();
            let now = Instant::now();
            let Some(stored) = fresh(&local.figures, &figure, now) else {
                break 'outcome Reserve::Miss;
            };
            let entries = local.reservations.entry(amounts.clone()).or_default();
            entries.retain(|_, (_, deadline)| *deadline > now);
            let others: i64 = entries
                .iter()
                .filter(|(held, _)| held.as_str() != id)
                .map(|(_, (bytes, _))| *bytes)
                .sum();
            if limit.is_some_and(|limit| stored + others + total > limit) {
                break 'outcome Reserve::Denied {
                    stored,
                    reserved: others,
                };
            }
            entries.insert(id.to_owned(), (total, now + ttl));
            Reserve::Granted
        };
        if outcome == Reserve::Granted {
            self.held().insert((amounts, id.to_owned()), ());
        }
        outcome
    }

    /// Ends (or shrinks) reservation `id` and adds `figure_delta` to the pool's figure when
    /// it is known, in one atomic step: bytes move from reserved to recorded without a
    /// moment where they count twice or not at all.
    pub async fn settle(
        &self,
        project: &str,
        pool: Pool<'_>,
        id: &str,
        release: Release,
        figure_delta: i64,
    ) {
        let figure = self.figure_key(project, pool);
        let (_, amounts) = self.entry_keys(project, pool);
        let take = match release {
            Release::All => -1,
            Release::Part(bytes) => bytes.max(0),
        };
        if release == Release::All {
            self.held().remove(&(amounts.clone(), id.to_owned()));
        }
        if let Some(redis) = self.connection() {
            let op = self.batch_op(
                project,
                pool,
                batch::OpKind::Settle {
                    id: id.to_owned(),
                    take,
                    delta: figure_delta,
                    generation_ttl_s: GENERATION_TTL.as_secs(),
                },
            );
            let result = self.inner.batches.run(redis, &self.inner.tasks, op).await;
            if let Err(e) = result {
                self.redis_failed(&e);
                let entry = (release == Release::All).then(|| id.to_owned());
                self.reset_later(project, pool, entry);
            }
            return;
        }
        let mut local = self.local();
        let now = Instant::now();
        if let Some(entries) = local.reservations.get_mut(&amounts) {
            match release {
                Release::All => {
                    entries.remove(id);
                }
                Release::Part(bytes) => {
                    if let Some((held, _)) = entries.get_mut(id) {
                        *held -= bytes.max(0);
                        if *held <= 0 {
                            entries.remove(id);
                        }
                    }
                }
            }
        }
        if figure_delta != 0 {
            let generation = self.generation_key(project, pool);
            *local.generations.entry(generation).or_default() += 1;
            if fresh(&local.figures, &figure, now).is_some()
                && let Some((value, _)) = local.figures.get_mut(&figure)
            {
                *value += figure_delta;
            }
        }
    }

    /// Adds `delta` to the pool's figure when it is known (a delete, a recorded transfer
    /// that held no reservation).
    pub async fn add(&self, project: &str, pool: Pool<'_>, delta: i64) {
        if delta != 0 {
            self.settle(project, pool, "", Release::Part(0), delta)
                .await;
        }
    }

    /// Sum of the live reservations in a pool (for the spend cap, which prices them).
    pub async fn reserved(&self, project: &str, pool: Pool<'_>) -> i64 {
        let (deadlines, amounts) = self.entry_keys(project, pool);
        if let Some(redis) = self.connection() {
            let result: redis::RedisResult<i64> = RESERVED
                .key(&deadlines)
                .key(&amounts)
                .invoke_async(&mut redis.clone())
                .await;
            match result {
                Ok(total) => return total,
                Err(e) => self.redis_failed(&e),
            }
        }
        let local = self.local();
        let now = Instant::now();
        local.reservations.get(&amounts).map_or(0, |entries| {
            entries
                .values()
                .filter(|(_, deadline)| *deadline > now)
                .map(|(bytes, _)| *bytes)
                .sum()
        })
    }

    /// The pool's figure (bytes stored, or sent this month), if known.
    pub async fn figure(&self, project: &str, pool: Pool<'_>) -> Option<i64> {
        let key = self.figure_key(project, pool);
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
        fresh(&self.local().figures, &key, Instant::now())
    }

    /// Take before reading a figure from the database, and pass to [`Counters::prime`]:
    /// a change recorded in between (a commit settled, egress recorded) may or may not be in
    /// what was read, so that value is not trusted.
    pub async fn token(&self, project: &str, pool: Pool<'_>) -> i64 {
        let key = self.generation_key(project, pool);
        if let Some(redis) = self.connection() {
            let result: redis::RedisResult<Option<i64>> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut redis.clone())
                .await;
            match result {
                Ok(value) => return value.unwrap_or(0),
                Err(e) => self.redis_failed(&e),
            }
        }
        self.local().generations.get(&key).copied().unwrap_or(0)
    }

    /// Sets a figure rebuilt from the database, unless another replica did first or a
    /// change was recorded since `token` was taken (the caller then sees a miss and reads
    /// again). Without this, a commit settled while the figure was being read could be lost
    /// from it, and the cap exceeded.
    pub async fn prime(&self, project: &str, pool: Pool<'_>, value: i64, token: i64) {
        let key = self.figure_key(project, pool);
        let generation = self.generation_key(project, pool);
        if let Some(redis) = self.connection() {
            let result: redis::RedisResult<i64> = PRIME
                .key(&key)
                .key(&generation)
                .arg(value)
                .arg(token)
                .arg(FIGURE_TTL.as_secs())
                .invoke_async(&mut redis.clone())
                .await;
            match result {
                Ok(_) => return,
                Err(e) => self.redis_failed(&e),
            }
        }
        let mut local = self.local();
        let now = Instant::now();
        if local.generations.get(&generation).copied().unwrap_or(0) == token
            && fresh(&local.figures, &key, now).is_none()
        {
            local.figures.insert(key, (value, now + FIGURE_TTL));
        }
    }

    /// Forgets a project's stored figure (after changes the counters cannot follow, such as
    /// a retention recomputation). Reservations are untouched.
    pub async fn forget_stored(&self, project: &str) {
        let key = self.figure_key(project, Pool::Storage);
        if let Some(redis) = self.connection() {
            let result: redis::RedisResult<i64> = redis::cmd("DEL")
                .arg(&key)
                .query_async(&mut redis.clone())
                .await;
            if let Err(e) = result {
                self.redis_failed(&e);
                self.reset_later(project, Pool::Storage, None);
            }
        }
        self.local().figures.remove(&key);
    }

    /// Retries, until Redis answers (for at most a reservation's lifetime, after which
    /// everything a settle would have changed has lapsed anyway), the idempotent [`RESET`]
    /// of a settle that failed: `entry`'s reservation goes and the pool's figure is
    /// forgotten. On the task tracker, so shutdown waits for it.
    fn reset_later(&self, project: &str, pool: Pool<'_>, entry: Option<String>) {
        let figure = self.figure_key(project, pool);
        let generation = self.generation_key(project, pool);
        let (deadlines, amounts) = self.entry_keys(project, pool);
        let Some(redis) = self.connection().cloned() else {
            return;
        };
        let give_up = Instant::now() + self.inner.reservation_ttl;
        self.spawn(async move {
            let script = &*RESET;
            let mut delay = Duration::from_millis(100);
            loop {
                tokio::time::sleep(delay).await;
                let result: redis::RedisResult<i64> = script
                    .key(&figure)
                    .key(&deadlines)
                    .key(&amounts)
                    .key(&generation)
                    .arg(entry.as_deref().unwrap_or(""))
                    .arg(GENERATION_TTL.as_secs())
                    .invoke_async(&mut redis.clone())
                    .await;
                match result {
                    Ok(_) => return,
                    Err(e) => crate::metrics::redis_error(&e),
                }
                if Instant::now() >= give_up {
                    tracing::warn!(figure = %figure, "redis still unreachable: a settle was dropped; its figure and reservation lapse on their own");
                    return;
                }
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        });
    }

    /// Moves the deadline of every reservation this process still holds.
    async fn refresh(&self) {
        let mut by_pool: HashMap<String, Vec<String>> = HashMap::new();
        for (amounts, id) in self.held().keys() {
            by_pool.entry(amounts.clone()).or_default().push(id.clone());
        }
        let ttl = self.inner.reservation_ttl;
        for (amounts, ids) in by_pool {
            let deadlines = match amounts.strip_suffix(":bytes") {
                Some(base) => format!("{base}:deadline"),
                None => continue,
            };
            if let Some(redis) = self.connection() {
                let refresh = &*REFRESH;
                let mut script = refresh.prepare_invoke();
                script.key(&deadlines).key(&amounts).arg(millis(ttl));
                for id in &ids {
                    script.arg(id);
                }
                let result: redis::RedisResult<i64> = script.invoke_async(&mut redis.clone()).await;
                match result {
                    Ok(_) => continue,
                    Err(e) => self.redis_failed(&e),
                }
            }
            let mut local = self.local();
            let deadline = Instant::now() + ttl;
            if let Some(entries) = local.reservations.get_mut(&amounts) {
                for id in &ids {
                    if let Some((_, until)) = entries.get_mut(id) {
                        *until = deadline;
                    }
                }
            }
        }
    }

    fn connection(&self) -> Option<&ConnectionManager> {
        self.inner.redis.as_ref()
    }

    fn redis_failed(&self, e: &redis::RedisError) {
        crate::metrics::redis_error(e);
        if !self.inner.redis_down_logged.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                error = %e,
                "redis unavailable: pushes and pulls that need a quota reservation answer \
                 UNAVAILABLE until it answers again"
            );
        }
    }

    /// Redis answered: says so once after an outage was logged.
    fn redis_answered(&self) {
        if self.inner.redis_down_logged.swap(false, Ordering::SeqCst) {
            tracing::info!("redis reachable again: quota reservations resume");
        }
    }

    fn local(&self) -> std::sync::MutexGuard<'_, Local> {
        // A poisoned lock only means another thread panicked mid-update of plain integers.
        self.inner
            .local
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), ()>> {
        self.inner
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Refreshes this process's reservations every third of their lifetime, until the counters
/// are dropped. A process that dies stops refreshing, so its entries lapse on schedule.
async fn refresh_held(inner: Weak<Inner>) {
    let period = match inner.upgrade() {
        Some(inner) => (inner.reservation_ttl / 3).max(Duration::from_millis(10)),
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        Counters { inner }.refresh().await;
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn fresh(map: &HashMap<String, (i64, Instant)>, key: &str, now: Instant) -> Option<i64> {
    map.get(key)
        .filter(|(_, expires)| *expires > now)
        .map(|(value, _)| *value)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The Redis of the unit tests that need one (`TEST_REDIS_URL`); `None` (after saying so)
    /// when unset, which `ARTIFACTD_REQUIRE_REDIS=1` turns into a failure.
    pub(crate) fn redis_url() -> Option<String> {
        let url = std::env::var("TEST_REDIS_URL").ok();
        if url.is_none() {
            assert_ne!(
                std::env::var("ARTIFACTD_REQUIRE_REDIS").as_deref(),
                Ok("1"),
                "ARTIFACTD_REQUIRE_REDIS=1 but TEST_REDIS_URL is unset"
            );
            eprintln!("skipping: TEST_REDIS_URL is unset");
        }
        url
    }

    #[tokio::test]
    async fn in_process_reservations_respect_the_limit() {
        let counters = Counters::in_process();
        let s = Pool::Storage;
        assert_eq!(
            counters.try_reserve("p", s, "a", 10, Some(100)).await,
            Reserve::Miss
        );
        counters.prime("p", s, 50, 0).await;
        assert_eq!(
            counters.try_reserve("p", s, "a", 30, Some(100)).await,
            Reserve::Granted
        );
        assert_eq!(
            counters.try_reserve("p", s, "b", 30, Some(100)).await,
            Reserve::Denied {
                stored: 50,
                reserved: 30
            }
        );
        // Growing one's own entry counts only the growth.
        assert_eq!(
            counters.try_reserve("p", s, "a", 50, Some(100)).await,
            Reserve::Granted
        );
        // Committed 40 of the 50: the entry goes, the figure takes the 40.
        counters.settle("p", s, "a", Release::All, 40).await;
        assert_eq!(counters.figure("p", s).await, Some(90));
        assert_eq!(counters.reserved("p", s).await, 0);
        assert_eq!(
            counters.try_reserve("p", s, "b", 11, Some(100)).await,
            Reserve::Denied {
                stored: 90,
                reserved: 0
            }
        );
        // A rebuilt figure does not forget entries in flight.
        assert_eq!(
            counters.try_reserve("p", s, "b", 10, Some(100)).await,
            Reserve::Granted
        );
        counters.forget_stored("p").await;
        // A rebuild whose read began before a recorded change is not trusted: the value
        // read may or may not include it.
        let token = counters.token("p", s).await;
        counters.add("p", s, 3).await;
        counters.prime("p", s, 87, token).await;
        assert_eq!(
            counters.try_reserve("p", s, "c", 1, Some(100)).await,
            Reserve::Miss
        );
        counters.add("p", s, -3).await;
        let token = counters.token("p", s).await;
        counters.prime("p", s, 90, token).await;
        assert_eq!(
            counters.try_reserve("p", s, "c", 1, Some(100)).await,
            Reserve::Denied {
                stored: 90,
                reserved: 10
            }
        );
        // A partial release keeps the rest held.
        counters.settle("p", s, "b", Release::Part(4), 4).await;
        assert_eq!(counters.reserved("p", s).await, 6);
        assert_eq!(counters.figure("p", s).await, Some(94));
    }

    /// A holder that stops refreshing (its process died) loses its reservation one lifetime
    /// later, however much other traffic the project sees; a live holder keeps it.
    async fn crashed_holder_lapses(make: impl Fn() -> Counters) {
        let ttl = Duration::from_millis(600);
        let survivor = make();
        let crashed = make();
        let project = format!("lapse-{}", uuid::Uuid::new_v4().simple());
        let p = project.as_str();
        let s = Pool::Storage;
        survivor.prime(p, s, 0, 0).await;
        crashed.prime(p, s, 0, 0).await;
        assert_eq!(
            crashed.try_reserve(p, s, "dead", 60, Some(100)).await,
            Reserve::Granted
        );
        assert_eq!(
            survivor.try_reserve(p, s, "alive", 30, Some(100)).await,
            Reserve::Granted
        );
        // The crashed process's refresher ends with it.
        drop(crashed);
        // Traffic: another holder reserves and releases over and over; the dead entry
        // must still lapse. Bounded by iterations, not by timing assertions.
        let mut lapsed = false;
        for i in 0..400 {
            let id = format!("busy-{i}");
            match survivor.try_reserve(p, s, &id, 10, Some(100)).await {
                Reserve::Granted => survivor.settle(p, s, &id, Release::All, 0).await,
                other => panic!("10 more must always fit while 90 are held: {other:?}"),
            }
            if survivor.try_reserve(p, s, "probe", 70, Some(100)).await == Reserve::Granted {
                lapsed = true;
                break;
            }
            tokio::time::sleep(ttl / 20).await;
        }
        assert!(lapsed, "the crashed holder's 60 bytes never lapsed");
        // The live holder's entry outlived several lifetimes thanks to its refresher.
        assert_eq!(
            survivor.try_reserve(p, s, "more", 1, Some(100)).await,
            Reserve::Denied {
                stored: 0,
                reserved: 100
            },
            "alive (30) + probe (70) are still held"
        );
        assert_eq!(survivor.reserved(p, s).await, 100);
    }

    #[tokio::test]
    async fn crashed_holder_lapses_in_process() {
        // In process both "replicas" share nothing, so the dead one is simulated by an
        // entry whose holder never refreshes: one Counters whose refresher is the survivor's.
        let counters = Counters::in_process_with_ttl(Duration::from_millis(600));
        let s = Pool::Storage;
        counters.prime("p", s, 0, 0).await;
        assert_eq!(
            counters.try_reserve("p", s, "dead", 60, Some(100)).await,
            Reserve::Granted
        );
        // Forget that we hold it, as a leaked holder would.
        counters.held().clear();
        let mut lapsed = false;
        for _ in 0..400 {
            if counters.try_reserve("p", s, "probe", 70, Some(100)).await == Reserve::Granted {
                lapsed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        assert!(lapsed, "the leaked 60 bytes never lapsed");
    }

    /// Every connection to Redis has `TCP_NODELAY` (the driver's default is off).
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn redis_connections_have_tcp_nodelay() {
        let Some(url) = crate::coord::tests::redis_url() else {
            return;
        };
        let port = match url.as_str().into_connection_info().unwrap().addr() {
            redis::ConnectionAddr::Tcp(_, port) => *port,
            other => {
                eprintln!("skipped: TEST_REDIS_URL is not TCP ({other:?})");
                return;
            }
        };
        let prefix = format!("unit-{}:", uuid::Uuid::new_v4().simple());
        let counters = Counters::redis(&url, &prefix, REDIS_TIMEOUT).unwrap();
        let s = Pool::Storage;
        counters.prime("p", s, 0, 0).await;
        assert_eq!(
            counters.try_reserve("p", s, "r", 1, Some(10)).await,
            Reserve::Granted
        );
        let sockets = crate::store::nodelay::nodelay_of_sockets_to(port);
        assert!(!sockets.is_empty(), "no socket to Redis' port {port}");
        for (inode, nodelay) in sockets {
            assert_eq!(nodelay, Some(true), "socket {inode} to Redis' port {port}");
        }
        counters.settle("p", s, "r", Release::All, 0).await;
    }

    /// Reservations and settlements sent together (one call for those in flight at once)
    /// each keep their own outcome: of 50 racing for 20 places exactly 20 are granted, and
    /// settling them all at once moves exactly their bytes into the figure.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_reservations_and_settlements_in_redis_are_exact() {
        let Some(url) = crate::coord::tests::redis_url() else {
            return;
        };
        let prefix = format!("unit-{}:", uuid::Uuid::new_v4().simple());
        let counters = Counters::redis(&url, &prefix, REDIS_TIMEOUT).unwrap();
        let s = Pool::Storage;
        counters.prime("p", s, 0, 0).await;
        let racers: Vec<_> = (0..50)
            .map(|i| {
                let counters = counters.clone();
                tokio::spawn(async move {
                    let id = format!("r{i}");
                    let outcome = counters.try_reserve("p", s, &id, 10, Some(200)).await;
                    (id, outcome)
                })
            })
            .collect();
        let mut granted = Vec::new();
        for racer in racers {
            match racer.await.unwrap() {
                (id, Reserve::Granted) => granted.push(id),
                (
                    _,
                    Reserve::Denied {
                        stored: 0,
                        reserved,
                    },
                ) => assert_eq!(reserved, 200),
                (_, other) => panic!("{other:?}"),
            }
        }
        assert_eq!(granted.len(), 20);
        assert_eq!(counters.reserved("p", s).await, 200);
        let settles: Vec<_> = granted
            .into_iter()
            .map(|id| {
                let counters = counters.clone();
                tokio::spawn(async move { counters.settle("p", s, &id, Release::All, 7).await })
            })
            .collect();
        for settle in settles {
            settle.await.unwrap();
        }
        assert_eq!(counters.reserved("p", s).await, 0);
        assert_eq!(counters.figure("p", s).await, Some(140));
        counters.forget_stored("p").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn crashed_holder_lapses_in_redis() {
        let Some(url) = crate::coord::tests::redis_url() else {
            return;
        };
        let prefix = format!("unit-{}:", uuid::Uuid::new_v4().simple());
        crashed_holder_lapses(|| {
            Counters::redis_with_ttl(&url, &prefix, REDIS_TIMEOUT, Duration::from_millis(600))
                .unwrap()
        })
        .await;
    }
}
