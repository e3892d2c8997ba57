//! The lifecycle of an artifact row, in one place: when it is live, when it has expired,
//! what pins it (keep), and the writes that move its end — Keep and Unkeep here, expiry
//! recomputation for retention changes in `plans.rs` and `retention.rs`.
//!
//! The contract (DESIGN.md, shared with the sweeper): a row is live at `t` iff
//! `deleted_at IS NULL AND (billing_end IS NULL OR billing_end > t)`. `billing_end` is when
//! storage billing stops: the expiry (`expires_at`) while not pinned, NULL while pinned or
//! when it never expires, the end instant once ended. An expired row is marked ended with
//! `deleted_at = billing_end` and `end_reason = 'expired'`, which changes no bill.

use sea_orm::sea_query::{Expr, SimpleExpr};
use sea_orm::{ColumnTrait, EntityTrait, ExprTrait, QueryFilter, QuerySelect, QueryTrait};

use super::artifacts::{at_or_under, in_scope};
use super::entities::artifact;
use super::{Store, db_error};
use crate::domain::{ArtifactPath, Error, Scope, Timestamp};

/// Rows a Keep or Unkeep changes per statement: bounded lock time and memory on a folder of
/// millions, as for a recursive delete.
const PIN_BATCH_ROWS: u64 = 1000;

/// What a Keep or Unkeep did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinChange {
    /// Artifacts whose pin changed (those already in the asked state are not counted).
    pub changed: i64,
    /// Whether anything live was at the path (or under it) at all.
    pub found: bool,
}

impl Store {
    /// Pins (`keep`) or releases the user's pin on the artifacts live at `now` at `path`, and
    /// under it as a folder with `recursive`. Pinned: `billing_end` NULL (billed while
    /// stored, never expires); `expires_at` is left as it was, to be restored. Released:
    /// `expires_at = billing_end = max(expires_at, now)` — the expiry comes back, never into
    /// the past — unless another pin still holds the row. Rows that already ended (deleted,
    /// replaced, or expired at `now`) are not live and are never touched: the past does not
    /// change. Batches of [`PIN_BATCH_ROWS`], each committed on its own like a delete.
    pub async fn set_keep(
        &self,
        scope: &Scope,
        path: &ArtifactPath,
        recursive: bool,
        keep: bool,
        now: Timestamp,
    ) -> Result<PinChange, Error> {
        let target = sea_orm::Condition::all()
            .add(in_scope(scope))
            .add(at_or_under(path, recursive))
            .add(live_at(now));
        let mut changed = 0i64;
        loop {
            let batch = artifact::Entity::find()
                .select_only()
                .column(artifact::Column::Id)
                .filter(target.clone())
                .filter(artifact::Column::Keep.eq(!keep))
                .limit(PIN_BATCH_ROWS)
                .into_query();
            let mut update = artifact::Entity::update_many()
                .col_expr(artifact::Column::Keep, Expr::value(keep))
                .filter(artifact::Column::Id.in_subquery(batch))
                // A concurrent delete, keep or unkeep may have changed some of the batch.
                .filter(target.clone())
                .filter(artifact::Column::Keep.eq(!keep));
            update = if keep {
                update.col_expr(
                    artifact::Column::BillingEnd,
                    Expr::value(Option::<i64>::None),
                )
            } else {
                update
                    .col_expr(
                        artifact::Column::ExpiresAt,
                        released_end(artifact::Column::ExpiresAt, artifact::Column::Keep, now),
                    )
                    .col_expr(
                        artifact::Column::BillingEnd,
                        released_end(artifact::Column::BillingEnd, artifact::Column::Keep, now),
                    )
            };
            let rows = update.exec(&self.db).await.map_err(db_error)?.rows_affected;
            changed = changed.saturating_add(rows as i64);
            if rows < PIN_BATCH_ROWS {
                break;
            }
        }
        if changed > 0 {
            // Only the future moved; rollups of the past stay (a no-op unless the clock went
            // back).
            self.forget_snapshots(&self.db, scope.project(), now)
                .await
                .map_err(db_error)?;
            return Ok(PinChange {
                changed,
                found: true,
            });
        }
        let found = artifact::Entity::find()
            .select_only()
            .column(artifact::Column::Id)
            .filter(target)
            .into_tuple::<i64>()
            .one(&self.db)
            .await
            .map_err(db_error)?
            .is_some();
        Ok(PinChange { changed, found })
    }
}

/// The value of `column` (`expires_at` or `billing_end`) when `pin` is released at `now`:
/// `max(expires_at, now)` (NULL stays NULL: it never expires), or the column unchanged while
/// another pin still holds the row.
pub(super) fn released_end(
    column: artifact::Column,
    pin: artifact::Column,
    now: Timestamp,
) -> SimpleExpr {
    let now = now.as_micros();
    let restored: SimpleExpr = Expr::case(
        Expr::col(artifact::Column::ExpiresAt).lt(now),
        Expr::value(now),
    )
    .finally(Expr::col(artifact::Column::ExpiresAt))
    .into();
    match pinned_except(pin) {
        Some(other) => Expr::case(other, Expr::col(column))
            .finally(restored)
            .into(),
        None => restored,
    }
}

/// The lifecycle contract, in the one place it is written down: an artifact row is live at
/// `now` iff it has not ended (`deleted_at IS NULL`) and its billing has not stopped
/// (`billing_end IS NULL OR billing_end > now`). `billing_end` is the expiry (NULL while kept
/// or when it never expires), so an artifact is gone for every read from its expiry instant
/// on, whether or not anything has marked it ended. Every query that asks "is it there?"
/// (Stat, Pull, List, Delete, the push's existence check, Keep, retention) filters with this.
pub fn live_at(now: Timestamp) -> sea_orm::Condition {
    sea_orm::Condition::all()
        .add(artifact::Column::DeletedAt.is_null())
        .add(
            artifact::Column::BillingEnd
                .is_null()
                .or(artifact::Column::BillingEnd.gt(now.as_micros())),
        )
}

/// Rows past their expiry at `now` that nothing has marked ended yet: the complement of
/// [`live_at`] among unended rows. They still hold their path in the unique index of live
/// paths until marked (by a push that takes the path, or the sweeper).
pub fn expired_at(now: Timestamp) -> sea_orm::Condition {
    sea_orm::Condition::all()
        .add(artifact::Column::DeletedAt.is_null())
        .add(artifact::Column::BillingEnd.lte(now.as_micros()))
}

/// Marks the rows `query` selects (which must be within [`expired_at`]) ended at their expiry:
/// `deleted_at = billing_end`, reason `expired`. `billing_end` is untouched, so no byte-second
/// billed so far, or to be billed, changes.
pub fn mark_expired(
    query: sea_orm::UpdateMany<artifact::Entity>,
) -> sea_orm::UpdateMany<artifact::Entity> {
    query
        .col_expr(
            artifact::Column::DeletedAt,
            Expr::col(artifact::Column::BillingEnd),
        )
        .col_expr(artifact::Column::EndReason, Expr::value("expired"))
}

/// What may pin a row (keep it from expiring: `billing_end` NULL while any pin holds): the
/// user's Keep, and `kept_latest` (the latest PASSED job's artifacts, `keep_latest_per_ref`,
/// see `store::jobs`); releasing one pin restores the expiry only when no other holds
/// ([`pinned_except`]).
pub const PINS: &[artifact::Column] = &[artifact::Column::Keep, artifact::Column::KeptLatest];

/// Rows no pin holds: the ones retention changes may move.
pub fn unpinned() -> sea_orm::Condition {
    PINS.iter()
        .fold(sea_orm::Condition::all(), |all, pin| all.add(pin.eq(false)))
}

/// Rows some pin other than `pin` holds; `None` when there is no other pin.
pub fn pinned_except(pin: artifact::Column) -> Option<sea_orm::Condition> {
    let others: Vec<_> = PINS
        .iter()
        .filter(|other| std::mem::discriminant(*other) != std::mem::discriminant(&pin))
        .collect();
    (!others.is_empty()).then(|| {
        others
            .into_iter()
            .fold(sea_orm::Condition::any(), |any, other| {
                any.add(other.eq(true))
            })
    })
}

/// The end of an artifact living `ttl` from its creation, moved at `now`: `created_at + ttl`,
/// but never before `now` (a retention change never reaches into the past).
pub fn lifetime_end(ttl: i64, now: Timestamp) -> SimpleExpr {
    let now = now.as_micros();
    Expr::case(
        Expr::col(artifact::Column::CreatedAt).add(ttl).lt(now),
        Expr::value(now),
    )
    .finally(Expr::col(artifact::Column::CreatedAt).add(ttl))
    .into()
}
