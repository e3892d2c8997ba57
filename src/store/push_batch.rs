//! Group commit for small pushes on Postgres: the inline pushes that reach their commit
//! while another group is committing wait for it to finish and then commit together, in
//! one statement and so one transaction and one WAL flush.
//!
//! Each push in a group is answered only after the group's statement has returned, that is
//! after its commit is durable. Nothing waits on a timer: a push arriving while fewer than
//! the configured number of groups are committing starts a group of its own at once, so a
//! lone push costs what it did before; under load the pushes that arrive during a commit
//! (a millisecond or two) form the next group.
//!
//! One push cannot fail another. The statement inserts artifacts with `ON CONFLICT DO
//! NOTHING` on the one-live-row-per-path index, so a push whose path is taken (by a live
//! row, an expired row nothing has marked yet, or another push of the same group) simply
//! is not in the statement's result: it is answered [`Grouped::PathTaken`] and its caller
//! settles it alone through the ordinary transaction, which marks an expired row ended and
//! inserts, or answers ALREADY_EXISTS. Any other failure of the statement (a deadlock with
//! a forced push, a connection lost) rolls the whole group back, and every push of it is
//! answered [`Grouped::Alone`]: each commits alone, as it would have without grouping, and
//! gets its own precise outcome.
//!
//! A push may carry the stamp of the retention rules its lifetime came from (read from a
//! cache, see `service::retention`): the statement compares it with the stamp of the rules
//! stored when it runs, and commits nothing of a push whose rules changed, answering it
//! [`Grouped::RulesChanged`] for its caller to resolve the lifetime again. The statement's
//! snapshot is taken after every policy change acknowledged before the push began, so no
//! push commits a lifetime from rules replaced before it started, on any replica.
//!
//! Blob rows come first, in content order, as in every other push transaction, so groups
//! and single pushes take row locks in one order. A push whose path was taken has still
//! written (or refreshed) its content's blob row: it is an unreferenced blob, which the
//! sweeper collects after the grace period like the content of any push that lost a race.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use bytes::Bytes;
use sea_orm::sea_query::ArrayType;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement, Value};
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;

use super::artifacts::NewArtifact;
use super::retention::{RulesStamp, rules_stamp_sql};
use crate::domain::Timestamp;

/// The most pushes one group commits: a bound on the statement's size and on how long its
/// row locks are held.
const MAX_GROUP: usize = 256;

/// How a grouped push ended.
#[derive(Debug)]
pub(super) enum Grouped {
    /// Committed (durably) with its group.
    Created {
        id: i64,
        pinned: bool,
        deduplicated: bool,
    },
    /// Its path was taken when the group committed: nothing of it but its blob row was
    /// written; the caller decides alone (expired row, ALREADY_EXISTS).
    PathTaken,
    /// The group's statement failed as a whole and was rolled back: the caller commits the
    /// push alone.
    Alone,
    /// The retention rules stored now are not the ones the push's stamp names: nothing of
    /// it was written.
    RulesChanged,
}

struct Pending {
    new: NewArtifact,
    expires_at: i64,
    content: Bytes,
    rules: Option<RulesStamp>,
    /// Queued behind busy groups (counted in `artifactd_push_group_waiting`).
    waited: bool,
    reply: oneshot::Sender<Grouped>,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Pending>,
    committing: usize,
}

/// Gathers concurrent inline pushes into group commits (see the module documentation).
pub(super) struct PushGroups {
    db: DatabaseConnection,
    metrics: crate::metrics::Metrics,
    queue: Mutex<Queue>,
    /// How many groups may commit at once (each on a connection of its own).
    concurrent: usize,
    /// The group commits in progress; [`PushGroups::drain`] waits for them.
    tasks: TaskTracker,
    /// Makes the next group's task panic, as a driver bug once did.
    #[cfg(test)]
    panic_next: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for PushGroups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushGroups")
            .field("concurrent", &self.concurrent)
            .finish_non_exhaustive()
    }
}

impl PushGroups {
    pub(super) fn new(
        db: DatabaseConnection,
        metrics: crate::metrics::Metrics,
        concurrent: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            db,
            metrics,
            queue: Mutex::new(Queue::default()),
            concurrent: concurrent.max(1),
            tasks: TaskTracker::new(),
            #[cfg(test)]
            panic_next: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Commits an inline push with whichever group it joins; answers once the group's
    /// statement has returned. The group runs on a task of its own, so a caller that goes
    /// away (a client disconnecting) never cuts the others' commit short. With `rules`, the
    /// push commits only if its scope kind's stored rules still have that stamp.
    pub(super) async fn commit(
        self: &Arc<Self>,
        new: &NewArtifact,
        content: &Bytes,
        rules: Option<&RulesStamp>,
    ) -> Grouped {
        let Some(expires_at) = new.expires_at.map(Timestamp::as_micros) else {
            return Grouped::Alone;
        };
        let (reply, answer) = oneshot::channel();
        let start = {
            let Ok(mut queue) = self.queue.lock() else {
                return Grouped::Alone;
            };
            // With every slot busy, a group committing now takes it when it is done.
            let start = queue.committing < self.concurrent;
            if start {
                queue.committing += 1;
            }
            queue.waiting.push(Pending {
                new: new.clone(),
                expires_at,
                content: content.clone(),
                rules: rules.cloned(),
                waited: !start,
                reply,
            });
            start
        };
        if !start {
            self.metrics.push_group_waiting(1);
        }
        if start {
            let groups = self.clone();
            self.tasks.spawn(async move { groups.run().await });
        }
        // A dropped sender means the task ended without answering (a panic): alone.
        answer.await.unwrap_or(Grouped::Alone)
    }

    /// Commits groups until nothing waits, then gives its slot back.
    async fn run(&self) {
        let mut slot = Slot {
            groups: self,
            held: true,
        };
        loop {
            let group = {
                let Ok(mut queue) = self.queue.lock() else {
                    return;
                };
                if queue.waiting.is_empty() {
                    queue.committing -= 1;
                    slot.held = false;
                    return;
                }
                let take = queue.waiting.len().min(MAX_GROUP);
                queue.waiting.drain(..take).collect::<Vec<_>>()
            };
            let waited = group.iter().filter(|p| p.waited).count();
            self.metrics.push_group_waiting(-(waited as i64));
            self.commit_group(group).await;
        }
    }

    async fn commit_group(&self, group: Vec<Pending>) {
        #[cfg(test)]
        if self
            .panic_next
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            panic!("injected: the group's task panics");
        }
        let outcome = commit_rows(&self.db, &group).await;
        self.metrics.push_group(group.len(), outcome.is_ok());
        let mut rows = match outcome {
            Ok(rows) => rows,
            Err(err) => {
                tracing::warn!(error = %err, pushes = group.len(), "group commit failed; its pushes commit alone");
                for pending in group {
                    let _ = pending.reply.send(Grouped::Alone);
                }
                return;
            }
        };
        // Pushes of the same new content in one group: the first stored it, the others
        // found it stored, as if they had committed one after the other.
        let mut content_new: HashMap<String, bool> = HashMap::new();
        for pending in group {
            let answer = match rows.remove(&pending.new.upload_id) {
                Some(row) if row.rules_changed => Grouped::RulesChanged,
                Some(row) => {
                    let first = content_new
                        .entry(pending.new.sha256.as_str().to_owned())
                        .or_insert(row.inserted);
                    let deduplicated = !*first;
                    *first = false;
                    Grouped::Created {
                        id: row.id,
                        pinned: row.pinned,
                        deduplicated,
                    }
                }
                None => Grouped::PathTaken,
            };
            let _ = pending.reply.send(answer);
        }
    }

    /// Waits for the group commits in progress (shutdown, before the pool closes).
    pub(super) async fn drain(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// A group task's slot, given back however the task ends. A task that panicked mid-commit (a
/// driver bug once did, on a value it could not bind) or was cancelled would otherwise hold
/// its slot for ever, and once every slot was held, each push queued behind them would wait
/// for ever. Dropped while still held, it frees the slot and lets every waiting push go:
/// their replies are dropped, which answers them [`Grouped::Alone`], so each commits alone
/// as after any failed group (the pushes of the group that panicked are answered so too).
struct Slot<'a> {
    groups: &'a PushGroups,
    held: bool,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if !self.held {
            return;
        }
        let waiting = {
            let mut queue = self
                .groups
                .queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            queue.committing -= 1;
            std::mem::take(&mut queue.waiting)
        };
        let waited = waiting.iter().filter(|p| p.waited).count();
        self.groups.metrics.push_group_waiting(-(waited as i64));
        tracing::error!(
            pushes = waiting.len(),
            "a group commit ended without finishing; the pushes waiting for it commit alone"
        );
    }
}

struct Row {
    id: i64,
    pinned: bool,
    inserted: bool,
    /// Not committed: the push's rule stamp no longer held.
    rules_changed: bool,
}

/// The group's statement: blob rows (one per content, in content order), the artifacts
/// whose path is free (in path order), and their ingress events, one statement and so one
/// transaction. Pushes whose rule stamp (`rules`, when `checks_rules`) differs from the stored
/// rules' are left out of all of it (`checked`). `pin` counts the blob rows first, which
/// runs the blob insert to its end before any artifact goes in (a data-modifying CTE
/// otherwise runs as its rows are read). Returns the committed artifacts by upload id, then
/// the upload ids of the pushes left out for their rules (`rules_changed`).
static GROUP_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "\
WITH r0 AS (\
  SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::text[], \
    $6::text[], $7::text[], $8::int[], $9::bigint[], $10::text[], $11::bool[], $12::bytea[], \
    $13::int[], $14::text[], $15::bool[]) \
  AS r0(sha256, size, now, project_id, scope_kind, scope_id, path, mode, expires, upload_id, \
    ingress, content, ord, rules, checks_rules)), \
checked AS (SELECT r0.*, (NOT r0.checks_rules OR r0.rules = {stamp}) AS rules_hold FROM r0), \
r AS (SELECT * FROM checked WHERE rules_hold), \
blob AS (INSERT INTO blobs (sha256, size, created_at, content, last_ref_at) \
  SELECT DISTINCT ON (sha256) sha256, size, now, content, now FROM r ORDER BY sha256, ord \
  ON CONFLICT (sha256) DO UPDATE SET last_ref_at = EXCLUDED.last_ref_at, \
    content = COALESCE(blobs.content, EXCLUDED.content), collected_at = NULL \
  RETURNING sha256, (xmax = 0) AS inserted), \
pin AS (SELECT r.*, r.scope_kind = 'job' AND EXISTS (SELECT 1 FROM jobs \
    WHERE jobs.project_id = r.project_id AND jobs.job_id = r.scope_id AND keeps_artifacts \
    FOR SHARE) AS pinned \
  FROM r WHERE (SELECT count(*) FROM blob) > 0), \
artifact AS (INSERT INTO artifacts (project_id, scope_kind, scope_id, path, size, sha256, \
    mode, created_at, expires_at, keep, upload_id, billing_end, kept_latest) \
  SELECT project_id, scope_kind, scope_id, path, size, sha256, mode, now, expires, false, \
    upload_id, CASE WHEN pinned THEN NULL ELSE expires END, pinned \
  FROM pin ORDER BY project_id, scope_kind, scope_id, path, ord \
  ON CONFLICT (project_id, scope_kind, scope_id, path) WHERE deleted_at IS NULL DO NOTHING \
  RETURNING id, upload_id, sha256, kept_latest), \
ingress AS (INSERT INTO usage_events (id, project_id, meter, bytes, occurred_at) \
  SELECT 'push:' || r.upload_id, r.project_id, 'ingress', r.size, r.now \
  FROM r JOIN artifact USING (upload_id) WHERE r.ingress) \
SELECT artifact.upload_id, artifact.id, artifact.kept_latest, blob.inserted, false \
FROM artifact JOIN blob USING (sha256) \
UNION ALL SELECT upload_id, 0, false, false, true FROM checked WHERE NOT rules_hold",
        stamp = rules_stamp_sql("r0.project_id", "r0.scope_kind")
    )
});

async fn commit_rows(
    db: &DatabaseConnection,
    group: &[Pending],
) -> Result<HashMap<String, Row>, DbErr> {
    fn column<T>(group: &[Pending], kind: ArrayType, f: impl Fn(&Pending) -> T) -> Value
    where
        T: Into<Value>,
    {
        Value::Array(
            kind,
            Some(Box::new(group.iter().map(|p| f(p).into()).collect())),
        )
    }
    let values = vec![
        column(group, ArrayType::String, |p| {
            p.new.sha256.as_str().to_owned()
        }),
        column(group, ArrayType::BigInt, |p| p.new.size),
        column(group, ArrayType::BigInt, |p| p.new.created_at.as_micros()),
        column(group, ArrayType::String, |p| {
            p.new.scope.project().as_str().to_owned()
        }),
        column(group, ArrayType::String, |p| {
            p.new.scope.kind().as_str().to_owned()
        }),
        column(group, ArrayType::String, |p| p.new.scope.id().to_owned()),
        column(group, ArrayType::String, |p| p.new.path.as_str().to_owned()),
        column(group, ArrayType::Int, |p| p.new.mode as i32),
        column(group, ArrayType::BigInt, |p| p.expires_at),
        column(group, ArrayType::String, |p| p.new.upload_id.clone()),
        column(group, ArrayType::Bool, |p| p.new.record_ingress),
        column(group, ArrayType::Bytes, |p| p.content.to_vec()),
        Value::Array(
            ArrayType::Int,
            Some(Box::new((0..group.len() as i32).map(Value::from).collect())),
        ),
        // No NULL elements: the driver binds none in a text array.
        column(group, ArrayType::String, |p| {
            p.rules
                .as_ref()
                .map_or_else(String::new, |stamp| stamp.as_str().to_owned())
        }),
        column(group, ArrayType::Bool, |p| p.rules.is_some()),
    ];
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            GROUP_SQL.as_str(),
            values,
        ))
        .await?;
    let mut committed = HashMap::with_capacity(rows.len());
    for row in rows {
        let upload_id: String = row.try_get_by_index(0)?;
        committed.insert(
            upload_id,
            Row {
                id: row.try_get_by_index(1)?,
                pinned: row.try_get_by_index(2)?,
                inserted: row.try_get_by_index(3)?,
                rules_changed: row.try_get_by_index(4)?,
            },
        );
    }
    Ok(committed)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use super::*;
    use crate::domain::{ArtifactPath, Scope, ScopeKind, Sha256};

    fn push(n: u8) -> NewArtifact {
        NewArtifact {
            scope: Scope::parse("scope", "p", ScopeKind::Job, "j").unwrap(),
            path: ArtifactPath::parse("path", &format!("f{n}")).unwrap(),
            size: 1,
            sha256: Sha256::from_digest(&[n; 32]),
            mode: 0o644,
            created_at: Timestamp::from_micros(1),
            expires_at: Some(Timestamp::from_micros(2)),
            upload_id: format!("u{n}"),
            record_ingress: false,
        }
    }

    /// A group whose task panics gives its slot back: with one slot, the next push's group
    /// still runs (and, with no database behind it, fails as a whole: each push alone)
    /// instead of waiting for ever behind the dead task.
    #[tokio::test]
    async fn a_panicking_group_gives_its_slot_back() {
        let groups = PushGroups::new(
            DatabaseConnection::default(),
            crate::metrics::Metrics::new(),
            1,
        );
        let content = Bytes::from_static(b"x");
        groups.panic_next.store(true, Ordering::SeqCst);
        let first = tokio::time::timeout(
            Duration::from_secs(5),
            groups.commit(&push(1), &content, None),
        )
        .await
        .expect("the push whose group panicked is answered");
        assert!(matches!(first, Grouped::Alone), "{first:?}");
        for n in 2..5 {
            let next = tokio::time::timeout(
                Duration::from_secs(5),
                groups.commit(&push(n), &content, None),
            )
            .await
            .expect("a push after the panic is answered, not queued for ever");
            assert!(matches!(next, Grouped::Alone), "{next:?}");
        }
        assert_eq!(
            groups.queue.lock().unwrap().committing,
            0,
            "every slot is free"
        );
    }
}
