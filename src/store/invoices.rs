//! Finalized invoices: a month's bill frozen once, served from these rows ever after.
//!
//! Inserting is idempotent and safe with several replicas: the invoice row is inserted with
//! `ON CONFLICT DO NOTHING` and its lines only by the transaction that inserted it, so
//! whichever replica finalizes first wins and every reader then sees the same rows.

use sea_orm::{ConnectionTrait, TransactionTrait};

use super::{NetworkPiece, Store, db_error};
use crate::domain::metering::{
    LineItem, Meter, Month, MonthUsage, ProjectTotals as InvoiceSummary, ProjectsCursor,
    ProjectsSort, ProjectsSortKey, Quantity,
};
use crate::domain::{Error, Plan, ProjectId, Timestamp};

/// A month's bill as finalized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invoice {
    pub project_id: ProjectId,
    pub month: Month,
    /// The plan version in effect at the end of the month.
    pub plan: Plan,
    pub lines: Vec<LineItem>,
    pub total_micros: i128,
    /// The month's own usage (corrections of earlier months excluded).
    pub usage: MonthUsage,
    pub finalized_at: Timestamp,
}

impl Store {
    /// Freezes `invoice`, with the network bytes per piece of a day its lines sum
    /// (`network`), unless the month was finalized already (by this or another replica);
    /// either way the stored invoice is what callers serve afterwards.
    pub async fn insert_invoice(
        &self,
        invoice: &Invoice,
        network: &[NetworkPiece],
    ) -> Result<(), Error> {
        let txn = self.db.begin().await.map_err(db_error)?;
        let inserted = txn
            .execute_raw(self.statement(
                "INSERT INTO invoices (project_id, month, period_start, period_end, finalized_at, \
                 plan_id, plan_version, currency, total_micros, storage_byte_micros, egress_bytes, \
                 ingress_bytes, network_frozen) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, TRUE) \
                 ON CONFLICT DO NOTHING",
                vec![
                    invoice.project_id.as_str().into(),
                    invoice.month.to_string().into(),
                    invoice.month.start().as_micros().into(),
                    invoice.month.end().as_micros().into(),
                    invoice.finalized_at.as_micros().into(),
                    invoice.plan.id.clone().into(),
                    invoice.plan.version.into(),
                    invoice.plan.currency.clone().into(),
                    to_i64("total_micros", invoice.total_micros)?.into(),
                    invoice.usage.storage_byte_micros.to_string().into(),
                    to_i64("egress_bytes", invoice.usage.egress_bytes)?.into(),
                    to_i64("ingress_bytes", invoice.usage.ingress_bytes)?.into(),
                ],
            ))
            .await
            .map_err(db_error)?;
        let finalized = inserted.rows_affected() == 1;
        if finalized {
            for (n, line) in invoice.lines.iter().enumerate() {
                txn.execute_raw(self.statement(
                    "INSERT INTO invoice_lines (project_id, month, line_no, meter, plan_id, \
                     plan_version, period_start, period_end, correction_for, usage_numerator, \
                     usage_denominator, included_numerator, included_denominator, \
                     unit_price_micros, amount_micros) \
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    vec![
                        invoice.project_id.as_str().into(),
                        invoice.month.to_string().into(),
                        (n as i32).into(),
                        line.meter.as_str().into(),
                        line.plan_id.clone().into(),
                        line.plan_version.into(),
                        line.period_start.as_micros().into(),
                        line.period_end.as_micros().into(),
                        line.correction_for.map(|m| m.to_string()).into(),
                        line.usage.numerator.to_string().into(),
                        line.usage.denominator.to_string().into(),
                        line.included.numerator.to_string().into(),
                        line.included.denominator.to_string().into(),
                        line.unit_price_micros.into(),
                        to_i64("amount_micros", line.amount_micros)?.into(),
                    ],
                ))
                .await
                .map_err(db_error)?;
            }
            for piece in network.iter().filter(|p| p.bytes != 0) {
                txn.execute_raw(self.statement(
                    "INSERT INTO invoice_network (project_id, month, meter, piece_start, bytes) \
                     VALUES (?, ?, ?, ?, ?)",
                    vec![
                        invoice.project_id.as_str().into(),
                        invoice.month.to_string().into(),
                        piece.meter.as_str().into(),
                        piece.start.as_micros().into(),
                        piece.bytes.into(),
                    ],
                ))
                .await
                .map_err(db_error)?;
            }
        }
        txn.commit().await.map_err(db_error)?;
        if finalized {
            self.metrics.invoice_finalized();
        }
        Ok(())
    }

    /// The finalized invoice of `month`, if any.
    pub async fn invoice(
        &self,
        project: &ProjectId,
        month: Month,
    ) -> Result<Option<Invoice>, Error> {
        Ok(self
            .invoices_between(project, month, month)
            .await?
            .into_iter()
            .next())
    }

    /// The network bytes per piece of a day `month`'s invoice billed (pieces without any
    /// omitted), or `None` when it has no invoice or one finalized before they were kept
    /// (migration 15).
    pub async fn invoice_network(
        &self,
        project: &ProjectId,
        month: Month,
    ) -> Result<Option<Vec<NetworkPiece>>, Error> {
        let frozen = self
            .db
            .query_one_raw(self.statement(
                "SELECT network_frozen FROM invoices WHERE project_id = ? AND month = ?",
                vec![project.as_str().into(), month.to_string().into()],
            ))
            .await
            .map_err(db_error)?
            .map(|r| r.try_get_by_index::<bool>(0))
            .transpose()
            .map_err(db_error)?;
        if frozen != Some(true) {
            return Ok(None);
        }
        let rows = self
            .db
            .query_all_raw(self.statement(
                "SELECT meter, piece_start, bytes FROM invoice_network \
                 WHERE project_id = ? AND month = ? ORDER BY piece_start, meter",
                vec![project.as_str().into(), month.to_string().into()],
            ))
            .await
            .map_err(db_error)?;
        rows.iter()
            .map(|r| {
                let meter: String = r.try_get_by_index(0).map_err(db_error)?;
                Ok(NetworkPiece {
                    meter: match meter.as_str() {
                        "egress" => Meter::Egress,
                        "ingress" => Meter::Ingress,
                        other => {
                            return Err(Error::Internal(format!("invoice meter {other:?}")));
                        }
                    },
                    start: Timestamp::from_micros(r.try_get_by_index(1).map_err(db_error)?),
                    bytes: r.try_get_by_index(2).map_err(db_error)?,
                })
            })
            .collect::<Result<Vec<_>, Error>>()
            .map(Some)
    }

    /// The network bytes each invoice of months `first..=last` billed for its own month.
    pub async fn invoiced_network(
        &self,
        project: &ProjectId,
        first: Month,
        last: Month,
    ) -> Result<Vec<(Month, i64, i64)>, Error> {
        let rows = self
            .db
            .query_all_raw(self.statement(
                "SELECT month, egress_bytes, ingress_bytes FROM invoices \
                 WHERE project_id = ? AND month >= ? AND month <= ? ORDER BY month",
                vec![
                    project.as_str().into(),
                    first.to_string().into(),
                    last.to_string().into(),
                ],
            ))
            .await
            .map_err(db_error)?;
        rows.iter()
            .map(|r| {
                let month: String = r.try_get_by_index(0).map_err(db_error)?;
                Ok((
                    Month::parse("month", &month)
                        .map_err(|_| Error::Internal(format!("invoice with month {month:?}")))?,
                    r.try_get_by_index(1).map_err(db_error)?,
                    r.try_get_by_index(2).map_err(db_error)?,
                ))
            })
            .collect()
    }

    /// Finalized invoices of months `first..=last`, oldest first.
    pub async fn invoices_between(
        &self,
        project: &ProjectId,
        first: Month,
        last: Month,
    ) -> Result<Vec<Invoice>, Error> {
        let rows = self
            .db
            .query_all_raw(self.statement(
                "SELECT month, finalized_at, plan_id, plan_version, total_micros, \
                 storage_byte_micros, egress_bytes, ingress_bytes FROM invoices \
                 WHERE project_id = ? AND month >= ? AND month <= ? ORDER BY month",
                vec![
                    project.as_str().into(),
                    first.to_string().into(),
                    last.to_string().into(),
                ],
            ))
            .await
            .map_err(db_error)?;
        let mut invoices = Vec::with_capacity(rows.len());
        for r in rows {
            let month: String = r.try_get_by_index(0).map_err(db_error)?;
            let month = Month::parse("month", &month)
                .map_err(|_| Error::Internal(format!("invoice with month {month:?}")))?;
            let plan_id: String = r.try_get_by_index(2).map_err(db_error)?;
            let plan_version: i32 = r.try_get_by_index(3).map_err(db_error)?;
            let storage: String = r.try_get_by_index(5).map_err(db_error)?;
            invoices.push(Invoice {
                project_id: project.clone(),
                month,
                plan: self.plan_version(&plan_id, plan_version).await?,
                lines: self.invoice_lines(project, month).await?,
                total_micros: i128::from(r.try_get_by_index::<i64>(4).map_err(db_error)?),
                usage: MonthUsage {
                    storage_byte_micros: parse_i128(&storage)?,
                    egress_bytes: i128::from(r.try_get_by_index::<i64>(6).map_err(db_error)?),
                    ingress_bytes: i128::from(r.try_get_by_index::<i64>(7).map_err(db_error)?),
                },
                finalized_at: Timestamp::from_micros(r.try_get_by_index(1).map_err(db_error)?),
            });
        }
        Ok(invoices)
    }

    async fn invoice_lines(
        &self,
        project: &ProjectId,
        month: Month,
    ) -> Result<Vec<LineItem>, Error> {
        let rows = self
            .db
            .query_all_raw(self.statement(
                "SELECT meter, plan_id, plan_version, period_start, period_end, correction_for, \
                 usage_numerator, usage_denominator, included_numerator, included_denominator, \
                 unit_price_micros, amount_micros FROM invoice_lines \
                 WHERE project_id = ? AND month = ? ORDER BY line_no",
                vec![project.as_str().into(), month.to_string().into()],
            ))
            .await
            .map_err(db_error)?;
        rows.iter()
            .map(|r| {
                let text = |i| r.try_get_by_index::<String>(i).map_err(db_error);
                let meter = match text(0)?.as_str() {
                    "storage" => Meter::Storage,
                    "egress" => Meter::Egress,
                    "ingress" => Meter::Ingress,
                    other => return Err(Error::Internal(format!("invoice line meter {other:?}"))),
                };
                let correction_for = r
                    .try_get_by_index::<Option<String>>(5)
                    .map_err(db_error)?
                    .map(|m| {
                        Month::parse("correction_for", &m)
                            .map_err(|_| Error::Internal(format!("invoice line month {m:?}")))
                    })
                    .transpose()?;
                let usage = Quantity {
                    numerator: parse_i128(&text(6)?)?,
                    denominator: parse_i128(&text(7)?)?,
                };
                let included = Quantity {
                    numerator: parse_i128(&text(8)?)?,
                    denominator: parse_i128(&text(9)?)?,
                };
                Ok(LineItem {
                    meter,
                    usage,
                    included,
                    billable: usage.saturating_sub_any(included),
                    unit_price_micros: r.try_get_by_index(10).map_err(db_error)?,
                    amount_micros: i128::from(r.try_get_by_index::<i64>(11).map_err(db_error)?),
                    plan_id: text(1)?,
                    plan_version: r.try_get_by_index(2).map_err(db_error)?,
                    period_start: Timestamp::from_micros(r.try_get_by_index(3).map_err(db_error)?),
                    period_end: Timestamp::from_micros(r.try_get_by_index(4).map_err(db_error)?),
                    correction_for,
                })
            })
            .collect()
    }
}

fn parse_i128(text: &str) -> Result<i128, Error> {
    text.parse()
        .map_err(|_| Error::Internal(format!("invoice figure {text:?} is not an integer")))
}

fn to_i64(field: &str, value: i128) -> Result<i64, Error> {
    i64::try_from(value)
        .map_err(|_| Error::Internal(format!("invoice {field} {value} exceeds int64")))
}

impl Store {
    /// Projects that existed before `month` ended and have no invoice for it yet.
    pub async fn projects_without_invoice(
        &self,
        month: Month,
        limit: u64,
    ) -> Result<Vec<ProjectId>, Error> {
        let rows = self
            .db
            .query_all_raw(self.statement(
                "SELECT p.project_id FROM projects p WHERE p.created_at < ? AND NOT EXISTS \
                 (SELECT 1 FROM invoices i WHERE i.project_id = p.project_id AND i.month = ?) \
                 ORDER BY p.project_id LIMIT ?",
                vec![
                    month.end().as_micros().into(),
                    month.to_string().into(),
                    i64::try_from(limit).unwrap_or(i64::MAX).into(),
                ],
            ))
            .await
            .map_err(db_error)?;
        rows.iter()
            .map(|r| {
                let id: String = r.try_get_by_index(0).map_err(db_error)?;
                ProjectId::parse("project_id", &id)
                    .map_err(|_| Error::Internal(format!("bad project id {id:?} in projects")))
            })
            .collect()
    }

    /// Up to `limit` projects that existed before `before`, by id, after `after`: the
    /// projects a month's export covers (keyset paging on the primary key).
    pub async fn project_ids_page(
        &self,
        before: Timestamp,
        after: Option<&ProjectId>,
        limit: u64,
    ) -> Result<Vec<ProjectId>, Error> {
        let rows = self
            .db
            .query_all_raw(self.statement(
                "SELECT project_id FROM projects WHERE created_at < ? AND project_id > ? \
                 ORDER BY project_id LIMIT ?",
                vec![
                    before.as_micros().into(),
                    after.map_or("", ProjectId::as_str).into(),
                    i64::try_from(limit).unwrap_or(i64::MAX).into(),
                ],
            ))
            .await
            .map_err(db_error)?;
        rows.iter()
            .map(|r| {
                let id: String = r.try_get_by_index(0).map_err(db_error)?;
                ProjectId::parse("project_id", &id)
                    .map_err(|_| Error::Internal(format!("bad project id {id:?} in projects")))
            })
            .collect()
    }

    /// A page of `month`'s invoices in `sort`'s order, after `after` (the previous page's
    /// last row): keyset paging, so pages are stable and each is one bounded query. The
    /// default order (largest total first) is one range scan of `invoices_month_total`;
    /// another column reads the month's invoices and keeps the top `limit` (a top-N sort).
    ///
    /// Storage is stored as decimal text (it exceeds int64): it is ordered by its length,
    /// then its digits, which is numeric order for non-negative integers in either database.
    pub async fn invoices_page(
        &self,
        month: Month,
        sort: ProjectsSort,
        after: Option<&ProjectsCursor>,
        limit: u64,
    ) -> Result<Vec<InvoiceSummary>, Error> {
        // The ordering expressions before the project id, each with its cursor value.
        let value = after.and_then(|c| c.value).unwrap_or_default();
        let digits = value.to_string();
        let keys: Vec<(String, sea_orm::Value)> = match sort.key {
            ProjectsSortKey::Project => Vec::new(),
            ProjectsSortKey::Storage => vec![
                (
                    "length(storage_byte_micros)".to_owned(),
                    (digits.len() as i64).into(),
                ),
                ("storage_byte_micros".to_owned(), digits.into()),
            ],
            key => {
                let column = match key {
                    ProjectsSortKey::Total => "total_micros",
                    ProjectsSortKey::Egress => "egress_bytes",
                    _ => "ingress_bytes",
                };
                let value = i64::try_from(value)
                    .map_err(|_| Error::invalid("page", "is not a page this listing linked to"))?;
                vec![(column.to_owned(), value.into())]
            }
        };
        let (direction, beyond) = if sort.descending {
            ("DESC", "<")
        } else {
            ("ASC", ">")
        };
        let project_direction = if keys.is_empty() { direction } else { "ASC" };
        let project_beyond = if keys.is_empty() { beyond } else { ">" };
        let mut values: Vec<sea_orm::Value> = vec![month.to_string().into()];
        // (k1 beyond ? OR (k1 = ? AND (k2 beyond ? OR (k2 = ? AND project_id > ?)))).
        let mut condition = String::new();
        if let Some(cursor) = after {
            let mut close = String::new();
            for (expr, value) in &keys {
                condition.push_str(&format!("({expr} {beyond} ? OR ({expr} = ? AND "));
                values.extend([value.clone(), value.clone()]);
                close.push_str("))");
            }
            condition.push_str(&format!("project_id {project_beyond} ?"));
            values.push(cursor.project.clone().into());
            condition = format!(" AND {condition}{close}");
        }
        let order: Vec<String> = keys
            .iter()
            .map(|(expr, _)| format!("{expr} {direction}"))
            .chain([format!("project_id {project_direction}")])
            .collect();
        values.push(i64::try_from(limit).unwrap_or(i64::MAX).into());
        let rows = self
            .db
            .query_all_raw(self.statement(
                &format!(
                    "SELECT project_id, plan_id, currency, total_micros, storage_byte_micros, \
                     egress_bytes, ingress_bytes FROM invoices WHERE month = ?{condition} \
                     ORDER BY {} LIMIT ?",
                    order.join(", ")
                ),
                values,
            ))
            .await
            .map_err(db_error)?;
        rows.iter()
            .map(|r| {
                let text = |i| r.try_get_by_index::<String>(i).map_err(db_error);
                Ok(InvoiceSummary {
                    project_id: text(0)?,
                    plan_id: text(1)?,
                    currency: text(2)?,
                    total_micros: r.try_get_by_index(3).map_err(db_error)?,
                    storage_byte_micros: parse_i128(&text(4)?)?,
                    egress_bytes: r.try_get_by_index(5).map_err(db_error)?,
                    ingress_bytes: r.try_get_by_index(6).map_err(db_error)?,
                })
            })
            .collect()
    }
}
