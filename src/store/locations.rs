//! Blob locations on an object store (`blobs.location`, see `blob`): a push claims the object
//! it wrote as its blob's location, and the sweeper removes pushed objects no blob names.
//!
//! Both take a lock on the object's key (a Postgres transaction-level advisory lock on the
//! key's hash; on SQLite the single writer, taken by each side's first statement, a write).
//! The sweeper holds it from seeing that no blob names the object until it has deleted the
//! object; a claim holds it only for its one update, and checks that its object exists once
//! it has committed. So a claim that commits first is seen by the sweeper, which spares the
//! object; one that commits after a removal finds its object gone and fails the push
//! (UNAVAILABLE, retryable) before any artifact names the content. No lock is held across a
//! request to the object store on the push's path.

use std::collections::HashSet;

use sea_orm::{ConnectionTrait, DatabaseTransaction, DbBackend, DbErr, TransactionTrait};

use super::{Store, db_error};
use crate::domain::{Error, Sha256};

/// The lock on an object's key, held until [`KeyLock::commit`]; dropping it rolls back.
pub struct KeyLock {
    txn: DatabaseTransaction,
}

impl KeyLock {
    pub async fn commit(self) -> Result<(), Error> {
        self.txn.commit().await.map_err(db_error)
    }
}

impl Store {
    /// Names `key` as the location of blob `sha256`, if the row still holds the lease that
    /// saw `epoch` and the location `seen` (`None`: the content address). `false` when it
    /// does not: another push claimed intact content first, or the content was collected
    /// (the push's commit then fails). The caller then checks that the object exists.
    pub async fn claim_location(
        &self,
        sha256: &Sha256,
        epoch: i64,
        seen: Option<&str>,
        key: &str,
    ) -> Result<bool, Error> {
        let txn = self.db.begin().await.map_err(db_error)?;
        self.lock_key(&txn, key).await.map_err(db_error)?;
        let claimed = txn
            .execute_raw(self.statement(
                "UPDATE blobs SET location = ? WHERE sha256 = ? AND epoch = ? \
                 AND collected_at IS NULL AND location IS NOT DISTINCT FROM ?",
                vec![
                    key.into(),
                    sha256.as_str().into(),
                    epoch.into(),
                    seen.map(str::to_owned).into(),
                ],
            ))
            .await
            .map_err(db_error)?
            .rows_affected();
        txn.commit().await.map_err(db_error)?;
        Ok(claimed == 1)
    }

    /// Which of `keys` are the location of some blob (collected or not: a collected blob's
    /// object is the collection's to delete).
    pub async fn named_locations(&self, keys: &[String]) -> Result<HashSet<String>, Error> {
        if keys.is_empty() {
            return Ok(HashSet::new());
        }
        self.db
            .query_all_raw(self.statement(
                &format!(
                    "SELECT location FROM blobs WHERE location IN ({})",
                    vec!["?"; keys.len()].join(", ")
                ),
                keys.iter().map(|k| k.as_str().into()).collect(),
            ))
            .await
            .map_err(db_error)?
            .iter()
            .map(|row| row.try_get_by_index(0).map_err(db_error))
            .collect()
    }

    /// Locks `key` for deletion when no blob names it (`None` when one does). The caller
    /// deletes the object, then commits.
    pub async fn lock_unclaimed(&self, key: &str) -> Result<Option<KeyLock>, Error> {
        let txn = self.db.begin().await.map_err(db_error)?;
        self.lock_key(&txn, key).await.map_err(db_error)?;
        // A write, so that on SQLite it takes the write lock a claim needs too.
        let named = txn
            .execute_raw(self.statement(
                "UPDATE blobs SET location = location WHERE location = ?",
                vec![key.into()],
            ))
            .await
            .map_err(db_error)?
            .rows_affected();
        Ok((named == 0).then_some(KeyLock { txn }))
    }

    async fn lock_key(&self, txn: &DatabaseTransaction, key: &str) -> Result<(), DbErr> {
        if self.db.get_database_backend() == DbBackend::Postgres {
            txn.execute_raw(self.statement(
                "SELECT pg_advisory_xact_lock(hashtextextended(?, 0))",
                vec![key.into()],
            ))
            .await?;
        }
        Ok(())
    }
}
