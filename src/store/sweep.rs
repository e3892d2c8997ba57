//! The sweeper's side of the store: ending expired artifacts, collecting blobs nobody
//! references, adopting orphaned blob files, and pruning old history — plus the lease a
//! push takes on a blob before it relies on its bytes.
//!
//! # Why a push and a sweep never lose content
//!
//! A blob's bytes are deleted only inside a *collection* transaction that holds the blob's
//! row locked (Postgres `FOR UPDATE`; SQLite's single writer) and, under that lock, has
//! seen that no artifact references the blob within the grace period and that no push
//! leased it within the grace period (`last_ref_at`). It marks the row collected, bumps its
//! `epoch`, deletes the bytes, and only then commits.
//!
//! A push that stores content in the blob store first takes a lease ([`Store::lease_blob`]:
//! `last_ref_at = now`, committed, returning the epoch), then checks or writes the bytes,
//! then commits its artifact in a transaction that updates the blob row again only if the
//! epoch is unchanged and the row is not collected — taking the row lock, so a collection
//! waits for it and then sees the new artifact. Whatever the interleaving:
//!
//! - a collection that locked the row first finishes deleting before the lease returns, so
//!   the push's check finds the bytes gone and writes them again;
//! - a collection between the lease and the commit (only possible when the push took
//!   longer than the grace period) changes the epoch, so the commit fails with ABORTED and
//!   stores nothing;
//! - a commit that locked the row first is visible to the collection, which skips the blob.
//!
//! Inline blobs carry their content in the push's own transaction, which writes it into the
//! row (reviving a collected one), so they need no lease.

use std::collections::HashSet;

use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseTransaction, DbBackend, EntityTrait, QueryFilter,
    QueryOrder, QueryResult, QuerySelect, QueryTrait, TransactionTrait, Value,
};

use super::entities::artifact;
use super::lifecycle::{expired_at, mark_expired};
use super::{Store, db_error};
use crate::domain::{Error, Sha256, Timestamp};

/// Arbitrary but fixed key of the Postgres advisory lock only one sweeper holds at a time.
const SWEEP_LOCK_KEY: i64 = 0x7377_6565_7065_7221; // "sweeper!"
/// The same for the one scrubber.
const SCRUB_LOCK_KEY: i64 = 0x7363_7275_6262_6572; // "scrubber"

/// An ended artifact row the history pruner may remove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndedRow {
    pub id: i64,
    pub project_id: String,
    pub created_at: Timestamp,
    /// When it stopped costing storage (≤ its end).
    pub billing_end: Timestamp,
    pub deleted_at: Timestamp,
}

/// An artifact the sweeper just ended: the content it referenced, and its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub sha256: String,
    pub ended_at: Timestamp,
}

/// One page of the blob index, for the collector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobPage {
    /// The page's blobs that no artifact references (checked again under lock).
    pub candidates: Vec<String>,
    /// Where the next page starts, after this page's last blob; `None` after the last page.
    pub next: Option<(i64, String)>,
}

/// A blob collection in progress: the rows are marked collected and locked until
/// [`BlobCollection::commit`]; the caller deletes the stored bytes in between. Dropping it
/// rolls back, so content whose bytes could not be deleted stays recorded as stored.
pub struct BlobCollection {
    txn: DatabaseTransaction,
    /// Blobs whose bytes are in the blob store, with their sizes: delete them, then commit.
    pub stored: Vec<(Sha256, i64)>,
    /// Where those bytes are: each blob's location (`None`: its content address).
    pub stored_at: Vec<(Sha256, Option<String>)>,
    /// Blobs whose content was in their row (cleared in this transaction).
    pub inline: Vec<(Sha256, i64)>,
}

impl BlobCollection {
    pub async fn commit(self) -> Result<(), Error> {
        self.txn.commit().await.map_err(db_error)
    }
}

/// Held while a sweep runs; another sweeper cannot get one until it is dropped or released.
/// On Postgres a transaction-level advisory lock on a connection of its own, so a sweeper
/// that dies releases it with its connection.
pub struct SweepLock {
    txn: Option<DatabaseTransaction>,
}

impl SweepLock {
    pub async fn release(mut self) {
        if let Some(txn) = self.txn.take() {
            let _ = txn.commit().await;
        }
    }
}

/// A blob whose bytes are in the blob store, as recorded in its row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBlob {
    pub sha256: Sha256,
    pub size: i64,
    /// Where its bytes are (`None`: its content address).
    pub location: Option<String>,
}

/// A push's lease on a blob's row ([`Store::lease_blob_at`]).
#[derive(Debug, Clone)]
pub struct BlobLease {
    /// The epoch the push's commit must still find.
    pub epoch: i64,
    /// Where the blob's bytes are recorded to be, if stored (`None`: its content address).
    pub location: Option<String>,
}

impl Store {
    /// Takes a lease on blob `sha256` before a push checks or writes its bytes in the blob
    /// store (creating its row, or reviving a collected one), and returns the epoch the
    /// push's commit must still find. See the module documentation.
    pub async fn lease_blob(
        &self,
        sha256: &Sha256,
        size: i64,
        now: Timestamp,
    ) -> Result<i64, Error> {
        Ok(self.lease_blob_at(sha256, size, now).await?.epoch)
    }

    /// [`Store::lease_blob`], also returning where the blob's bytes are recorded to be.
    pub async fn lease_blob_at(
        &self,
        sha256: &Sha256,
        size: i64,
        now: Timestamp,
    ) -> Result<BlobLease, Error> {
        let row = self
            .db
            .query_one_raw(self.statement(
                "INSERT INTO blobs (sha256, size, created_at, last_ref_at) VALUES (?, ?, ?, ?) \
                 ON CONFLICT (sha256) DO UPDATE SET collected_at = NULL, \
                   last_ref_at = CASE WHEN blobs.last_ref_at > excluded.last_ref_at \
                     THEN blobs.last_ref_at ELSE excluded.last_ref_at END \
                 RETURNING epoch, location",
                vec![
                    sha256.as_str().into(),
                    size.into(),
                    now.as_micros().into(),
                    now.as_micros().into(),
                ],
            ))
            .await
            .map_err(db_error)?
            .ok_or_else(|| Error::Internal(format!("blob {sha256}: lease returned no row")))?;
        Ok(BlobLease {
            epoch: row.try_get_by_index(0).map_err(db_error)?,
            location: row.try_get_by_index(1).map_err(db_error)?,
        })
    }

    /// Tries to become the one sweeper: `None` when another holds the lock. On SQLite (one
    /// process) the caller's own mutual exclusion is enough and this always succeeds.
    pub async fn try_sweep_lock(&self) -> Result<Option<SweepLock>, Error> {
        self.try_worker_lock(SWEEP_LOCK_KEY).await
    }

    /// Tries to become the one scrubber (see `service::scrubber`), as
    /// [`Store::try_sweep_lock`] does for the sweeper.
    pub async fn try_scrub_lock(&self) -> Result<Option<SweepLock>, Error> {
        self.try_worker_lock(SCRUB_LOCK_KEY).await
    }

    /// The Postgres advisory lock `key`, held in a transaction of its own until released.
    async fn try_worker_lock(&self, key: i64) -> Result<Option<SweepLock>, Error> {
        if self.db.get_database_backend() != DbBackend::Postgres {
            return Ok(Some(SweepLock { txn: None }));
        }
        let txn = self.db.begin().await.map_err(db_error)?;
        let row = txn
            .query_one_raw(self.statement("SELECT pg_try_advisory_xact_lock(?)", vec![key.into()]))
            .await
            .map_err(db_error)?;
        let locked: bool = match row {
            Some(row) => row.try_get_by_index(0).map_err(db_error)?,
            None => false,
        };
        Ok(locked.then_some(SweepLock { txn: Some(txn) }))
    }

    /// Up to `limit` blobs whose bytes are in the blob store (not collected, no inline
    /// copy), after `after` in digest order: the scrubber's walk.
    pub async fn stored_blobs_after(
        &self,
        after: Option<&Sha256>,
        limit: u64,
    ) -> Result<Vec<StoredBlob>, Error> {
        let rows = self
            .db
            .query_all_raw(self.statement(
                "SELECT sha256, size, location FROM blobs WHERE collected_at IS NULL \
                 AND content IS NULL AND sha256 > ? ORDER BY sha256 LIMIT ?",
                vec![
                    after.map_or("", Sha256::as_str).into(),
                    (limit as i64).into(),
                ],
            ))
            .await
            .map_err(db_error)?;
        rows.iter()
            .map(|row| {
                let sha256: String = row.try_get_by_index(0).map_err(db_error)?;
                Ok(StoredBlob {
                    sha256: Sha256::parse("blobs.sha256", &sha256)
                        .map_err(|e| Error::Internal(format!("blob row {sha256}: {e}")))?,
                    size: row.try_get_by_index(1).map_err(db_error)?,
                    location: row.try_get_by_index(2).map_err(db_error)?,
                })
            })
            .collect()
    }

    /// Marks up to `limit` artifacts that expired at or before `now` as ended at their
    /// expiry (`deleted_at = billing_end`, `end_reason = 'expired'`), earliest expiry first.
    /// Billing is untouched: `billing_end` already was the instant storage stopped. Returns
    /// the content each ended artifact referenced and when it ended, so the sweeper can
    /// collect that content while its index pages are still in memory.
    ///
    /// `from`: the latest expiry the previous batch of this run ended (its last
    /// [`Ended::ended_at`]); the batch starts there instead of at the start of the expiry
    /// index, whose first entries are the rows earlier batches just ended (dead until a
    /// vacuum): scanning them again would make a run quadratic in its size. An expiry
    /// earlier than `from` cannot become due during a run (keep, unkeep and retention
    /// changes never set one in the past), and the next run starts from the beginning.
    pub async fn end_expired(
        &self,
        now: Timestamp,
        from: Option<Timestamp>,
        limit: u64,
    ) -> Result<Vec<Ended>, Error> {
        let mut due = expired_at(now);
        if let Some(from) = from {
            due = due.add(artifact::Column::BillingEnd.gte(from.as_micros()));
        }
        let batch = artifact::Entity::find()
            .select_only()
            .column(artifact::Column::Id)
            .filter(due)
            .order_by_asc(artifact::Column::BillingEnd)
            .limit(limit)
            .into_query();
        let mut update = mark_expired(
            artifact::Entity::update_many()
                .filter(artifact::Column::Id.in_subquery(batch))
                // Whoever marks a row first (another sweeper, a push taking the path) wins.
                .filter(expired_at(now)),
        )
        .into_query();
        update.returning(
            sea_orm::sea_query::Query::returning()
                .columns([artifact::Column::Sha256, artifact::Column::DeletedAt]),
        );
        let txn = self.begin_sweep_transaction().await?;
        let ended = txn
            .query_all(&update)
            .await
            .map_err(db_error)?
            .iter()
            .map(|row| {
                Ok(Ended {
                    sha256: row.try_get_by_index(0).map_err(db_error)?,
                    ended_at: Timestamp::from_micros(row.try_get_by_index(1).map_err(db_error)?),
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        txn.commit().await.map_err(db_error)?;
        Ok(ended)
    }

    /// A transaction for the sweeper's ending and collecting, which on Postgres commits
    /// without waiting for its WAL to reach disk (`synchronous_commit = off`): each batch
    /// then costs no flush wait, and the WAL writer flushes within a few hundred
    /// milliseconds. What a crash can lose is safe to lose:
    ///
    /// - Recovery replays a prefix of the WAL, so a lost commit loses every later one too.
    ///   Anything that saw a sweep's effect and committed durably (a push leasing a blob
    ///   after its collection, a bill) flushed the sweep's commit with its own.
    /// - A lost end mark leaves an artifact that every read already treats as ended (reads
    ///   filter on expiry); the next sweep marks it again. Billing never read the mark.
    /// - A lost collection leaves a blob row not marked collected whose bytes were deleted —
    ///   the state a crash between the delete and the commit leaves even with a synchronous
    ///   commit. No live artifact references the blob; a push of the same content finds the
    ///   bytes missing and writes them again, and the next sweep collects the row again.
    ///   Inline content is cleared in the same transaction, so it is lost or kept with it.
    ///
    /// Pruning history and finalizing invoices keep synchronous commits: they touch bills.
    async fn begin_sweep_transaction(&self) -> Result<DatabaseTransaction, Error> {
        let txn = self.db.begin().await.map_err(db_error)?;
        if self.db.get_database_backend() == DbBackend::Postgres {
            txn.execute_unprepared("SET LOCAL synchronous_commit = off")
                .await
                .map_err(db_error)?;
        }
        Ok(txn)
    }

    /// The next page of up to `limit` stored blobs not leased since `cutoff` (now − grace),
    /// after `after` in (last_ref_at, sha256) order, and of them the ones referenced by no
    /// artifact live after the cutoff: candidates [`Store::collect_blobs`] checks again
    /// under lock. The page is taken from the `blobs_stored_last_ref` index first and only
    /// its rows are checked for references, so each page costs `limit` index probes however
    /// many blobs and artifacts there are (checking first let the planner hash-join every
    /// blob with every artifact, over a second per page at a million).
    pub async fn blob_candidates(
        &self,
        cutoff: Timestamp,
        after: &(i64, String),
        limit: u64,
    ) -> Result<BlobPage, Error> {
        let cutoff = cutoff.as_micros();
        let rows = self
            .db
            .query_all_raw(self.statement(
                &format!(
                    "SELECT blobs.last_ref_at, blobs.sha256, {UNREFERENCED} FROM \
                     (SELECT last_ref_at, sha256 FROM blobs WHERE collected_at IS NULL \
                      AND last_ref_at < ? AND (last_ref_at, sha256) > (?, ?) \
                      ORDER BY last_ref_at, sha256 LIMIT ?) AS blobs \
                     ORDER BY blobs.last_ref_at, blobs.sha256"
                ),
                vec![
                    cutoff.into(),
                    cutoff.into(),
                    after.0.into(),
                    after.1.as_str().into(),
                    (limit as i64).into(),
                ],
            ))
            .await
            .map_err(db_error)?;
        let mut page = BlobPage {
            candidates: Vec::new(),
            next: None,
        };
        for row in &rows {
            let last_ref_at: i64 = row.try_get_by_index(0).map_err(db_error)?;
            let sha256: String = row.try_get_by_index(1).map_err(db_error)?;
            let unreferenced: bool = row.try_get_by_index(2).map_err(db_error)?;
            if unreferenced {
                page.candidates.push(sha256.clone());
            }
            page.next = Some((last_ref_at, sha256));
        }
        if (rows.len() as u64) < limit {
            page.next = None;
        }
        Ok(page)
    }

    /// Starts collecting `candidates`: locks their rows (skipping rows a push holds), and
    /// marks collected those still unreferenced and unleased since `cutoff`. The caller
    /// deletes [`BlobCollection::stored`] bytes, then commits.
    pub async fn collect_blobs(
        &self,
        candidates: &[String],
        cutoff: Timestamp,
        now: Timestamp,
    ) -> Result<BlobCollection, Error> {
        let txn = self.begin_sweep_transaction().await?;
        let mut empty = BlobCollection {
            txn,
            stored: Vec::new(),
            stored_at: Vec::new(),
            inline: Vec::new(),
        };
        if candidates.is_empty() {
            return Ok(empty);
        }
        let cutoff = cutoff.as_micros();
        let mut locked: Vec<String> = candidates.to_vec();
        if self.db.get_database_backend() == DbBackend::Postgres {
            // Lock first, then check in a new statement: its snapshot sees every push that
            // committed before the lock was granted.
            let rows = empty
                .txn
                .query_all_raw(self.statement(
                    &format!(
                        "SELECT sha256 FROM blobs WHERE sha256 IN ({}) AND collected_at IS NULL \
                         AND last_ref_at < ? ORDER BY sha256 FOR UPDATE SKIP LOCKED",
                        placeholders(candidates.len())
                    ),
                    strings(candidates).chain([cutoff.into()]).collect(),
                ))
                .await
                .map_err(db_error)?;
            locked = rows
                .iter()
                .map(|row| row.try_get_by_index(0))
                .collect::<Result<_, _>>()
                .map_err(db_error)?;
            if locked.is_empty() {
                return Ok(empty);
            }
        }
        // Postgres: `old` tells where each (locked) blob's content was before this statement
        // clears it. SQLite returns only the target table's columns from an UPDATE … FROM,
        // so there the content is cleared by a second statement; its UPDATE is the
        // transaction's first statement, so it takes the write lock before it reads, and no
        // push commits until this transaction ends.
        let postgres = self.db.get_database_backend() == DbBackend::Postgres;
        let sql = if postgres {
            format!(
                "UPDATE blobs SET collected_at = ?, epoch = blobs.epoch + 1, content = NULL \
                 FROM (SELECT sha256 AS sha, content IS NULL AS in_store FROM blobs \
                   WHERE sha256 IN ({})) AS old \
                 WHERE blobs.sha256 = old.sha AND blobs.collected_at IS NULL \
                 AND blobs.last_ref_at < ? AND {UNREFERENCED} \
                 RETURNING blobs.sha256, blobs.size, old.in_store, blobs.location",
                placeholders(locked.len())
            )
        } else {
            format!(
                "UPDATE blobs SET collected_at = ?, epoch = epoch + 1 \
                 WHERE sha256 IN ({}) AND collected_at IS NULL AND last_ref_at < ? \
                 AND {UNREFERENCED} RETURNING sha256, size, content IS NULL, location",
                placeholders(locked.len())
            )
        };
        let rows: Vec<QueryResult> = empty
            .txn
            .query_all_raw(
                self.statement(
                    &sql,
                    std::iter::once(now.as_micros().into())
                        .chain(strings(&locked))
                        .chain([cutoff.into(), cutoff.into()])
                        .collect(),
                ),
            )
            .await
            .map_err(db_error)?;
        for row in rows {
            let sha256: String = row.try_get_by_index(0).map_err(db_error)?;
            let size: i64 = row.try_get_by_index(1).map_err(db_error)?;
            let in_store: bool = row.try_get_by_index(2).map_err(db_error)?;
            let sha256 = Sha256::parse("sha256", &sha256)
                .map_err(|_| Error::Internal(format!("blob row with a bad sha256 {sha256:?}")))?;
            if in_store {
                let location: Option<String> = row.try_get_by_index(3).map_err(db_error)?;
                empty.stored_at.push((sha256.clone(), location));
                empty.stored.push((sha256, size));
            } else {
                empty.inline.push((sha256, size));
            }
        }
        if !postgres && !empty.inline.is_empty() {
            empty
                .txn
                .execute_raw(
                    self.statement(
                        &format!(
                            "UPDATE blobs SET content = NULL WHERE sha256 IN ({})",
                            placeholders(empty.inline.len())
                        ),
                        empty
                            .inline
                            .iter()
                            .map(|(sha256, _)| sha256.as_str().into())
                            .collect(),
                    ),
                )
                .await
                .map_err(db_error)?;
        }
        Ok(empty)
    }

    /// Of blobs found in the blob store, records those the database does not know as
    /// stored (a crash between writing a blob and committing it, or content written again
    /// after its row was collected): a missing row is created and a collected one revived
    /// (at the content address, where the file was found),
    /// leased at `now`, so the ordinary collection reclaims them once the grace period has
    /// passed — under the same lock that protects pushes. Returns how many were adopted.
    pub async fn adopt_blob_files(
        &self,
        found: &[(Sha256, i64)],
        now: Timestamp,
    ) -> Result<u64, Error> {
        if found.is_empty() {
            return Ok(0);
        }
        let known: HashSet<String> = self
            .db
            .query_all_raw(self.statement(
                &format!(
                    "SELECT sha256 FROM blobs WHERE collected_at IS NULL AND sha256 IN ({})",
                    placeholders(found.len())
                ),
                found.iter().map(|(s, _)| s.as_str().into()).collect(),
            ))
            .await
            .map_err(db_error)?
            .iter()
            .map(|row| row.try_get_by_index(0))
            .collect::<Result<_, _>>()
            .map_err(db_error)?;
        let mut adopted = 0;
        for (sha256, size) in found.iter().filter(|(s, _)| !known.contains(s.as_str())) {
            adopted += self
                .db
                .execute_raw(self.statement(
                    "INSERT INTO blobs (sha256, size, created_at, last_ref_at) \
                     VALUES (?, ?, ?, ?) ON CONFLICT (sha256) DO UPDATE \
                     SET collected_at = NULL, last_ref_at = excluded.last_ref_at, \
                       location = NULL \
                     WHERE blobs.collected_at IS NOT NULL",
                    vec![
                        sha256.as_str().into(),
                        (*size).into(),
                        now.as_micros().into(),
                        now.as_micros().into(),
                    ],
                ))
                .await
                .map_err(db_error)?
                .rows_affected();
        }
        Ok(adopted)
    }

    /// Up to `limit` ended artifacts that ended before `cutoff`, after `after` in
    /// (deleted_at, id) order.
    pub async fn ended_before(
        &self,
        cutoff: Timestamp,
        after: (i64, i64),
        limit: u64,
    ) -> Result<Vec<EndedRow>, Error> {
        let rows = self
            .db
            .query_all_raw(self.statement(
                "SELECT id, project_id, created_at, billing_end, deleted_at FROM artifacts \
                 WHERE deleted_at IS NOT NULL AND deleted_at < ? \
                 AND (deleted_at, id) > (?, ?) \
                 ORDER BY deleted_at, id LIMIT ?",
                vec![
                    cutoff.as_micros().into(),
                    after.0.into(),
                    after.1.into(),
                    (limit as i64).into(),
                ],
            ))
            .await
            .map_err(db_error)?;
        rows.iter()
            .map(|row| {
                let deleted_at: i64 = row.try_get_by_index(4).map_err(db_error)?;
                let billing_end: Option<i64> = row.try_get_by_index(3).map_err(db_error)?;
                Ok(EndedRow {
                    id: row.try_get_by_index(0).map_err(db_error)?,
                    project_id: row.try_get_by_index(1).map_err(db_error)?,
                    created_at: Timestamp::from_micros(row.try_get_by_index(2).map_err(db_error)?),
                    billing_end: Timestamp::from_micros(billing_end.unwrap_or(deleted_at)),
                    deleted_at: Timestamp::from_micros(deleted_at),
                })
            })
            .collect()
    }

    /// The months (`YYYY-MM`) of `project` that have a finalized invoice.
    pub async fn invoiced_months(&self, project: &str) -> Result<HashSet<String>, Error> {
        self.db
            .query_all_raw(self.statement(
                "SELECT month FROM invoices WHERE project_id = ?",
                vec![project.into()],
            ))
            .await
            .map_err(db_error)?
            .iter()
            .map(|row| row.try_get_by_index(0).map_err(db_error))
            .collect()
    }

    /// Deletes ended artifact rows (and the idempotency records that point at them) in one
    /// transaction. Returns how many rows went.
    pub async fn prune_artifacts(&self, ids: &[i64]) -> Result<u64, Error> {
        if ids.is_empty() {
            return Ok(0);
        }
        let values = || ids.iter().map(|&id| id.into()).collect::<Vec<Value>>();
        let txn = self.db.begin().await.map_err(db_error)?;
        txn.execute_raw(self.statement(
            &format!(
                "DELETE FROM push_idempotency WHERE artifact_id IN ({})",
                placeholders(ids.len())
            ),
            values(),
        ))
        .await
        .map_err(db_error)?;
        let pruned = txn
            .execute_raw(self.statement(
                &format!(
                    "DELETE FROM artifacts WHERE deleted_at IS NOT NULL AND id IN ({})",
                    placeholders(ids.len())
                ),
                values(),
            ))
            .await
            .map_err(db_error)?
            .rows_affected();
        txn.commit().await.map_err(db_error)?;
        Ok(pruned)
    }
}

/// No artifact references the blob at or after the cutoff (the `?` is the cutoff): every
/// artifact that used it has been marked ended, before the cutoff. An artifact past its
/// expiry but not yet marked ended still counts as a reference (the next run's first step
/// ends it), so content is never collected under a row that reads still find.
const UNREFERENCED: &str = "NOT EXISTS (SELECT 1 FROM artifacts a WHERE a.sha256 = blobs.sha256 \
     AND (a.deleted_at IS NULL OR a.deleted_at > ?))";

fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

fn strings(values: &[String]) -> impl Iterator<Item = Value> + '_ {
    values.iter().map(|v| v.as_str().into())
}
