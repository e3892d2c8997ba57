//! Reservations and settlements sent to Redis together: the ones that arrive while a call
//! is in flight wait for it and then go as one call of [`BATCH`], which runs each of them in
//! arrival order exactly as it would run alone. So a burst of pushes (a commit group settling
//! at once, clients starting together) costs one round trip and one script call instead of
//! one each, for Redis and for this process. Nothing waits on a timer: an operation arriving
//! with no call in flight goes at once.
//!
//! Each operation is still atomic (a script runs to its end before Redis runs anything else),
//! and its caller gets its own result. A call that fails fails every operation in it, each
//! caller then acting as after a failed call of its own (a reservation is refused as
//! unavailable, a settle retried in its idempotent form).

use std::sync::{Arc, LazyLock, Mutex};

use redis::aio::ConnectionManager;
use tokio::sync::oneshot;

/// The most operations one call carries.
const MAX_BATCH: usize = 256;

/// One operation. Keys: the pool's figure, reservation deadlines (ZSET) and amounts (HASH),
/// and the figure's generation.
pub(super) struct Op {
    pub keys: [String; 4],
    pub kind: OpKind,
}

pub(super) enum OpKind {
    /// Sets reservation `id`'s total to `total` if the figure plus the other live entries
    /// plus `total` stays within `limit` (-1: none); entries past their deadline go first.
    /// Answers (granted 1 | denied 0 | miss -1, figure, reserved by others).
    Reserve {
        id: String,
        total: i64,
        limit: i64,
        ttl_ms: i64,
    },
    /// Takes `take` bytes out of entry `id` (-1: all of it), and adds `delta` to the figure
    /// when it is known, counting a change in the generation. Answers (1, 0, 0).
    Settle {
        id: String,
        take: i64,
        delta: i64,
        generation_ttl_s: u64,
    },
}

/// KEYS: four per operation (see [`Op`]). ARGV: five per operation, its kind ('r' or 's')
/// then the fields of [`OpKind`] in order. Returns one {a, b, c} per operation.
static BATCH: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)

local function reserve(figure, deadlines, amounts, id, want, limit, ttl)
  local lapsed = redis.call('ZRANGEBYSCORE', deadlines, '-inf', now_ms)
  if #lapsed > 0 then
    redis.call('HDEL', amounts, unpack(lapsed))
    redis.call('ZREMRANGEBYSCORE', deadlines, '-inf', now_ms)
  end
  local stored = redis.call('GET', figure)
  if not stored then return {-1, 0, 0} end
  stored = tonumber(stored)
  local others = 0
  local entries = redis.call('HGETALL', amounts)
  for i = 1, #entries, 2 do
    if entries[i] ~= id then others = others + tonumber(entries[i + 1]) end
  end
  if limit >= 0 and stored + others + want > limit then
    return {0, stored, others}
  end
  redis.call('HSET', amounts, id, want)
  redis.call('ZADD', deadlines, now_ms + ttl, id)
  redis.call('PEXPIRE', deadlines, ttl)
  redis.call('PEXPIRE', amounts, ttl)
  return {1, stored, others}
end

local function settle(figure, deadlines, amounts, generation, id, take, delta, generation_ttl)
  if take < 0 then
    redis.call('HDEL', amounts, id)
    redis.call('ZREM', deadlines, id)
  elseif take > 0 then
    local held = redis.call('HGET', amounts, id)
    if held then
      local left = tonumber(held) - take
      if left > 0 then
        redis.call('HSET', amounts, id, left)
      else
        redis.call('HDEL', amounts, id)
        redis.call('ZREM', deadlines, id)
      end
    end
  end
  if delta ~= 0 then
    redis.call('INCR', generation)
    redis.call('EXPIRE', generation, generation_ttl)
    if redis.call('EXISTS', figure) == 1 then
      redis.call('INCRBY', figure, delta)
    end
  end
  return {1, 0, 0}
end

local out = {}
for i = 0, #ARGV / 5 - 1 do
  local k, a = i * 4, i * 5
  local id = ARGV[a + 2]
  local x, y, z = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  if ARGV[a + 1] == 'r' then
    out[i + 1] = reserve(KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], id, x, y, z)
  else
    out[i + 1] = settle(KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], id, x, y, z)
  end
end
return out
"#,
    )
});

/// An operation's answer.
pub(super) type Answer = redis::RedisResult<(i64, i64, i64)>;

struct Waiting {
    op: Op,
    reply: oneshot::Sender<Answer>,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Waiting>,
    /// A call is in flight (its task sends what queues meanwhile when it is done).
    sending: bool,
}

/// Gathers operations into calls (see the module documentation).
#[derive(Default)]
pub(super) struct Batches {
    queue: Mutex<Queue>,
}

impl Batches {
    /// Runs `op` with whichever call it joins; the call runs on a task of `tasks` (the
    /// counters' tracker, which shutdown drains), so a caller that goes away never cuts the
    /// others' call short.
    pub(super) async fn run(
        self: &Arc<Self>,
        redis: &ConnectionManager,
        tasks: &tokio_util::task::TaskTracker,
        op: Op,
    ) -> Answer {
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut queue = self
                .queue
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            queue.waiting.push(Waiting { op, reply });
            !std::mem::replace(&mut queue.sending, true)
        };
        if start {
            let batches = self.clone();
            let redis = redis.clone();
            tasks.spawn(async move { batches.send_all(redis).await });
        }
        answer.await.unwrap_or_else(|_| {
            Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "the batch ended without an answer",
            )))
        })
    }

    /// Sends calls until nothing waits.
    async fn send_all(&self, mut redis: ConnectionManager) {
        loop {
            let batch = {
                let mut queue = self
                    .queue
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if queue.waiting.is_empty() {
                    queue.sending = false;
                    return;
                }
                let take = queue.waiting.len().min(MAX_BATCH);
                queue.waiting.drain(..take).collect::<Vec<_>>()
            };
            let mut call = BATCH.prepare_invoke();
            for Waiting { op, .. } in &batch {
                for key in &op.keys {
                    call.key(key);
                }
                match &op.kind {
                    OpKind::Reserve {
                        id,
                        total,
                        limit,
                        ttl_ms,
                    } => call.arg("r").arg(id).arg(total).arg(limit).arg(ttl_ms),
                    OpKind::Settle {
                        id,
                        take,
                        delta,
                        generation_ttl_s,
                    } => call
                        .arg("s")
                        .arg(id)
                        .arg(take)
                        .arg(delta)
                        .arg(generation_ttl_s),
                };
            }
            let result: redis::RedisResult<Vec<(i64, i64, i64)>> =
                call.invoke_async(&mut redis).await;
            match result {
                Ok(answers) if answers.len() == batch.len() => {
                    for (waiting, answer) in batch.into_iter().zip(answers) {
                        let _ = waiting.reply.send(Ok(answer));
                    }
                }
                Ok(answers) => {
                    let e = redis::RedisError::from((
                        redis::ErrorKind::Client,
                        "a batch answered a different number of operations",
                        format!("{} sent, {} answered", batch.len(), answers.len()),
                    ));
                    for waiting in batch {
                        let _ = waiting.reply.send(Err(e.clone()));
                    }
                }
                Err(e) => {
                    for waiting in batch {
                        let _ = waiting.reply.send(Err(e.clone()));
                    }
                }
            }
        }
    }
}
