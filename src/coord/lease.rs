//! Named leases in Redis: at most one holder across replicas, each lease with its own
//! expiry so a holder that dies frees it on schedule. The sweeper takes one when Redis is
//! configured (`store::sweep` has the Postgres advisory lock it uses otherwise).
//!
//! Taking is `SET key token NX PX ttl` with a random token; while held, a task renews it
//! every third of its lifetime with a script that extends it only if it still holds this
//! token; releasing is a compare-and-delete script, so a holder whose lease lapsed (and
//! another then took) never deletes someone else's.

use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::ConnectionManager;

use super::{Counters, millis};
use crate::domain::Error;

/// KEYS: lease. ARGV: token, ttl ms. Extends the lease if `token` still holds it.
static RENEW: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
",
    )
});

/// KEYS: lease. ARGV: token. Deletes the lease if `token` still holds it.
static RELEASE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
",
    )
});

/// A lease this process holds, renewed until [`Lease::release`] (or until it is dropped:
/// then it lapses after its lifetime, as a dead holder's would).
pub struct Lease {
    redis: ConnectionManager,
    key: String,
    token: String,
    lost: Arc<AtomicBool>,
    renewing: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("key", &self.key).finish()
    }
}

impl Counters {
    /// Tries to take the lease `name` for `ttl`: `Ok(None)` when another holder has it,
    /// UNAVAILABLE when Redis does not answer. Only with Redis configured
    /// ([`Counters::shared`]); in process there is nothing to share, so it is an error.
    pub async fn try_lease(&self, name: &str, ttl: Duration) -> Result<Option<Lease>, Error> {
        let Some(redis) = self.connection() else {
            return Err(Error::Internal(format!(
                "lease {name}: leases need Redis, and none is configured"
            )));
        };
        let key = format!("{}artifactd:lease:{name}", self.inner.prefix);
        let token = uuid::Uuid::new_v4().simple().to_string();
        let taken: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(millis(ttl))
            .query_async(&mut redis.clone())
            .await
            .map_err(|e| unavailable(&e))?;
        if taken.is_none() {
            return Ok(None);
        }
        let lost = Arc::new(AtomicBool::new(false));
        let renewing = tokio::spawn(renew(
            redis.clone(),
            key.clone(),
            token.clone(),
            ttl,
            lost.clone(),
        ));
        Ok(Some(Lease {
            redis: redis.clone(),
            key,
            token,
            lost,
            renewing,
        }))
    }
}

impl Lease {
    /// False once a renewal found the lease held by another (this holder was paused past
    /// its lifetime).
    pub fn held(&self) -> bool {
        !self.lost.load(Ordering::SeqCst)
    }

    /// Stops renewing and deletes the lease if this holder still has it. A Redis error is
    /// counted and otherwise ignored: the lease then lapses after its lifetime.
    pub async fn release(self) {
        self.renewing.abort();
        let result: redis::RedisResult<i64> = RELEASE
            .key(&self.key)
            .arg(&self.token)
            .invoke_async(&mut self.redis.clone())
            .await;
        if let Err(e) = result {
            crate::metrics::redis_error(&e);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewing.abort();
    }
}

/// Extends the lease every third of `ttl` while it is held by `token`. A failed renewal is
/// retried at the next tick (the lease survives two missed ones); a lease found taken by
/// another is lost for good.
async fn renew(
    redis: ConnectionManager,
    key: String,
    token: String,
    ttl: Duration,
    lost: Arc<AtomicBool>,
) {
    let script = &*RENEW;
    loop {
        tokio::time::sleep(ttl / 3).await;
        let result: redis::RedisResult<i64> = script
            .key(&key)
            .arg(&token)
            .arg(millis(ttl))
            .invoke_async(&mut redis.clone())
            .await;
        match result {
            Ok(1) => {}
            Ok(_) => {
                lost.store(true, Ordering::SeqCst);
                tracing::warn!(lease = %key, "lease lost: another holder took it after it lapsed");
                return;
            }
            Err(e) => {
                crate::metrics::redis_error(&e);
                tracing::warn!(lease = %key, error = %e, "lease renewal failed; retrying");
            }
        }
    }
}

fn unavailable(e: &redis::RedisError) -> Error {
    crate::metrics::redis_error(e);
    Error::Unavailable {
        what: "redis",
        cause: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One holder at a time; renewal keeps a lease past its lifetime; release frees it at
    /// once; a holder that vanishes without releasing frees it after its lifetime.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_holder_renewed_released_and_lapsing() {
        let Some(url) = crate::coord::tests::redis_url() else {
            return;
        };
        let prefix = format!("unit-{}:", uuid::Uuid::new_v4().simple());
        let (a, b) = (
            Counters::redis(&url, &prefix, crate::coord::REDIS_TIMEOUT).unwrap(),
            Counters::redis(&url, &prefix, crate::coord::REDIS_TIMEOUT).unwrap(),
        );
        let ttl = Duration::from_millis(300);
        let held = a.try_lease("sweeper", ttl).await.unwrap().unwrap();
        assert!(b.try_lease("sweeper", ttl).await.unwrap().is_none());
        tokio::time::sleep(ttl * 3).await;
        assert!(held.held(), "renewed past its lifetime");
        assert!(b.try_lease("sweeper", ttl).await.unwrap().is_none());
        held.release().await;
        let crashed = b.try_lease("sweeper", ttl).await.unwrap().unwrap();
        drop(crashed); // no release, no more renewals: as if the replica died
        assert!(a.try_lease("sweeper", ttl).await.unwrap().is_none());
        tokio::time::sleep(ttl + Duration::from_millis(100)).await;
        let again = a.try_lease("sweeper", ttl).await.unwrap().unwrap();
        again.release().await;
    }

    #[tokio::test]
    async fn in_process_counters_have_no_leases() {
        let counters = Counters::in_process();
        assert!(
            counters
                .try_lease("sweeper", Duration::from_secs(1))
                .await
                .is_err()
        );
    }
}
