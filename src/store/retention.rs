//! Retention policies (one row per rule: project, scope kind, position) and what applying
//! one needs from the artifact log: live, unpinned artifacts page by page in index order, and
//! moving the expiry of chosen ones.

use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, ExprTrait, QueryFilter, QueryOrder, QuerySelect,
    TransactionTrait,
};

use super::entities::artifact;
use super::lifecycle::{lifetime_end, live_at, unpinned};
use super::{Store, db_error};
use crate::domain::{Error, ProjectId, RetentionPolicy, RetentionRule, ScopeKind, Timestamp};

/// What one scope kind's stored rules were when a push read them: a string equal for equal
/// rule lists and different for different ones (each rule as `<selector bytes>:<selector>:
/// <max age>`, joined by `;`; the selector's length makes it unambiguous). A grouped push
/// carries the stamp of the rules its lifetime came from, and its group's statement commits
/// it only if [`rules_stamp_sql`] computes the same stamp from the rules stored then (see
/// `push_batch`), so a lifetime from cached rules is never one a changed policy no longer
/// gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RulesStamp(String);

impl RulesStamp {
    pub fn of(rules: &[RetentionRule]) -> Self {
        let mut stamp = String::new();
        for (i, rule) in rules.iter().enumerate() {
            if i > 0 {
                stamp.push(';');
            }
            stamp.push_str(&format!(
                "{}:{}:{}",
                rule.selector.len(),
                rule.selector,
                rule.max_age_micros
            ));
        }
        Self(stamp)
    }

    pub(super) fn as_str(&self) -> &str {
        &self.0
    }
}

/// SQL for the stamp of the rules stored now for the project and scope kind that the SQL
/// expressions `project` and `kind` give (Postgres), built exactly as [`RulesStamp::of`]
/// builds it.
pub(super) fn rules_stamp_sql(project: &str, kind: &str) -> String {
    format!(
        "coalesce((SELECT string_agg(octet_length(rr.selector)::text || ':' || rr.selector \
         || ':' || rr.max_age_micros::text, ';' ORDER BY rr.position) FROM retention_rules rr \
         WHERE rr.project_id = {project} AND rr.scope_kind = {kind}), '')"
    )
}

/// A live, unpinned artifact as a retention scan sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveArtifact {
    pub id: i64,
    pub scope_id: String,
    pub path: String,
    pub size: i64,
    pub created_at: Timestamp,
}

impl Store {
    /// The project's whole policy (empty for a project without rules).
    pub async fn retention_policy(&self, project: &ProjectId) -> Result<RetentionPolicy, Error> {
        let rows = self
            .db
            .query_all_raw(self.statement(
                "SELECT scope_kind, selector, max_age_micros FROM retention_rules \
                 WHERE project_id = ? ORDER BY scope_kind, position",
                vec![project.as_str().into()],
            ))
            .await
            .map_err(db_error)?;
        let mut policy = RetentionPolicy::default();
        for row in &rows {
            let kind: String = row.try_get_by_index(0).map_err(db_error)?;
            let kind = ScopeKind::from_db(&kind).ok_or_else(|| {
                Error::Internal(format!("retention rule with scope kind {kind:?}"))
            })?;
            policy.rules_mut(kind).push(RetentionRule {
                selector: row.try_get_by_index(1).map_err(db_error)?,
                max_age_micros: row.try_get_by_index(2).map_err(db_error)?,
            });
        }
        Ok(policy)
    }

    /// One scope kind's rules, in order: what a push reads (one primary-key range).
    pub async fn retention_rules(
        &self,
        project: &ProjectId,
        kind: ScopeKind,
    ) -> Result<Vec<RetentionRule>, Error> {
        let rows = self
            .db
            .query_all_raw(self.statement(
                "SELECT selector, max_age_micros FROM retention_rules \
                 WHERE project_id = ? AND scope_kind = ? ORDER BY position",
                vec![project.as_str().into(), kind.as_str().into()],
            ))
            .await
            .map_err(db_error)?;
        rows.iter()
            .map(|row| {
                Ok(RetentionRule {
                    selector: row.try_get_by_index(0).map_err(db_error)?,
                    max_age_micros: row.try_get_by_index(1).map_err(db_error)?,
                })
            })
            .collect()
    }

    /// The stamp of one scope kind's rules as stored now (Postgres), to check the stamp of
    /// a push that commits without its group's statement.
    pub(super) async fn stored_stamp(
        &self,
        project: &ProjectId,
        kind: ScopeKind,
    ) -> Result<RulesStamp, sea_orm::DbErr> {
        let row = self
            .db
            .query_one_raw(sea_orm::Statement::from_sql_and_values(
                sea_orm::DbBackend::Postgres,
                format!("SELECT {}", rules_stamp_sql("$1", "$2")),
                vec![project.as_str().into(), kind.as_str().into()],
            ))
            .await?
            .ok_or_else(|| sea_orm::DbErr::RecordNotFound("the rules' stamp".into()))?;
        Ok(RulesStamp(row.try_get_by_index(0)?))
    }

    /// Replaces the project's whole policy in one transaction: a push sees the old policy or
    /// the new one, never a mix.
    pub async fn set_retention_policy(
        &self,
        project: &ProjectId,
        policy: &RetentionPolicy,
        now: Timestamp,
    ) -> Result<(), Error> {
        let txn = self.db.begin().await.map_err(db_error)?;
        txn.execute_raw(self.statement(
            "DELETE FROM retention_rules WHERE project_id = ?",
            vec![project.as_str().into()],
        ))
        .await
        .map_err(db_error)?;
        for kind in ScopeKind::ALL {
            for (position, rule) in policy.rules(kind).iter().enumerate() {
                txn.execute_raw(self.statement(
                    "INSERT INTO retention_rules (project_id, scope_kind, position, selector, \
                     max_age_micros, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                    vec![
                        project.as_str().into(),
                        kind.as_str().into(),
                        (position as i32).into(),
                        rule.selector.clone().into(),
                        rule.max_age_micros.into(),
                        now.as_micros().into(),
                    ],
                ))
                .await
                .map_err(db_error)?;
            }
        }
        txn.commit().await.map_err(db_error)
    }

    /// Up to `limit` artifacts of `project`'s `kind` live and unpinned at `now`, after
    /// `after` (the previous page's last `(scope_id, path)`), in the order of the index of
    /// live paths, so each page is one index range.
    pub async fn live_unpinned_page(
        &self,
        project: &ProjectId,
        kind: ScopeKind,
        after: Option<(&str, &str)>,
        limit: u64,
        now: Timestamp,
    ) -> Result<Vec<LiveArtifact>, Error> {
        let mut query = artifact::Entity::find()
            .select_only()
            .columns([
                artifact::Column::Id,
                artifact::Column::ScopeId,
                artifact::Column::Path,
                artifact::Column::Size,
                artifact::Column::CreatedAt,
            ])
            .filter(artifact::Column::ProjectId.eq(project.as_str()))
            .filter(artifact::Column::ScopeKind.eq(kind.as_str()))
            .filter(live_at(now))
            .filter(unpinned());
        if let Some((scope_id, path)) = after {
            query = query.filter(
                Expr::tuple([
                    Expr::col(artifact::Column::ScopeId),
                    Expr::col(artifact::Column::Path),
                ])
                .gt(Expr::tuple([Expr::value(scope_id), Expr::value(path)])),
            );
        }
        let rows: Vec<(i64, String, String, i64, i64)> = query
            .order_by_asc(artifact::Column::ScopeId)
            .order_by_asc(artifact::Column::Path)
            .limit(limit)
            .into_tuple()
            .all(&self.db)
            .await
            .map_err(db_error)?;
        Ok(rows
            .into_iter()
            .map(|(id, scope_id, path, size, created_at)| LiveArtifact {
                id,
                scope_id,
                path,
                size,
                created_at: Timestamp::from_micros(created_at),
            })
            .collect())
    }

    /// Sets the lifetime of the artifacts `ids` that are still live and unpinned at `now` to
    /// `ttl` from their creation, never before `now` (see [`lifetime_end`]). Rows that ended
    /// or were pinned since they were read are left alone. Returns how many changed.
    pub async fn set_lifetime(&self, ids: &[i64], ttl: i64, now: Timestamp) -> Result<u64, Error> {
        if ids.is_empty() {
            return Ok(0);
        }
        let end = lifetime_end(ttl, now);
        let changed = artifact::Entity::update_many()
            .col_expr(artifact::Column::ExpiresAt, end.clone())
            .col_expr(artifact::Column::BillingEnd, end)
            .filter(artifact::Column::Id.is_in(ids.iter().copied()))
            .filter(live_at(now))
            .filter(unpinned())
            .exec(&self.db)
            .await
            .map_err(db_error)?;
        Ok(changed.rows_affected)
    }
}
