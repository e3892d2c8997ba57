//! Usage and bills: figures over a range, a month's bill with its projection, daily usage
//! and every project's totals.
//!
//! A month is billed per plan segment (the project's plan history cut by plan version
//! changes), each at its own prices with included quotas prorated by its share of the
//! month. Once the month has ended plus the invoice grace, its bill is finalized into an
//! invoice and served from there: nothing that happens later changes it. A network record
//! that arrives for an invoiced month is billed on the open month as a correction line
//! naming the month it belongs to.

use futures::StreamExt;

use super::{Bill, DailyUsage, Metering, UsageReport};
use crate::domain::metering::MICROS;
use crate::domain::metering::{
    self, DAY_MICROS, LineItem, Meter, Month, MonthUsage, ProjectsCursor, ProjectsSort, Quantity,
    Segment, byte_micros, segment_lines, split_by_month, total,
};
use crate::domain::plan::GIB;
use crate::domain::{Error, ProjectId, Timestamp};
use crate::store::{Invoice, InvoiceSummary, NetworkPiece, ProjectRecord};

/// Longest range ListDailyUsage answers in one call.
pub const MAX_DAILY_RANGE_DAYS: i64 = 366;
/// Longest range GetUsage answers in one call (ten years): bounds the work of one call.
pub const MAX_USAGE_RANGE_DAYS: i64 = 3660;
/// How many invoiced months before the open one are checked for late network records.
/// Records are dated when they are written, so only a record retried across a month end
/// can be late; three months is far beyond any retry.
const CORRECTION_LOOKBACK_MONTHS: usize = 3;

/// Usage not yet recorded that a spend-cap check adds to the projection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extra {
    /// Bytes that will be stored from now until month end (or their expiry).
    pub stored_bytes: i64,
    pub egress_bytes: i64,
    pub ingress_bytes: i64,
}

/// A bill computed from rows (not an invoice).
struct Draft {
    segments: Vec<Segment>,
    /// Finalizing: the network bytes per piece of a day the lines sum (read at once).
    network: Vec<NetworkPiece>,
    /// Each segment's usage to date, in the order of `segments`.
    used: Vec<MonthUsage>,
    lines: Vec<LineItem>,
    usage: MonthUsage,
}

impl Metering {
    /// The current month's projected total (what is stored carried to month end or its
    /// expiry, network to date, open corrections) with `extra` on top: what the spend cap
    /// is checked against.
    pub(super) async fn projected_total(
        &self,
        record: &ProjectRecord,
        extra: Extra,
    ) -> Result<i128, Error> {
        let now = self.clock.now();
        let month = Month::containing(now);
        let draft = self.draft(&record.project_id, month).await?;
        let (_, projected) = self
            .projection(&record.project_id, month, now, &draft, extra)
            .await?;
        Ok(projected)
    }

    /// Usage of `[from, to)` up to now: storage integrated until `min(to, now)`, network
    /// records dated before `to` and not after now (a record dated this very microsecond
    /// counts); network left zero unless `network`.
    async fn usage_between(
        &self,
        project: &ProjectId,
        from: Timestamp,
        to: Timestamp,
        direct: bool,
        network: bool,
    ) -> Result<MonthUsage, Error> {
        let now = self.clock.now();
        let storage_to = to.min(now);
        let network_to = network_end(to, now);
        let mut usage = MonthUsage::default();
        if storage_to > from {
            usage.storage_byte_micros = if direct {
                self.store
                    .storage_byte_micros_scan(project, from, storage_to)
                    .await?
            } else {
                self.store
                    .storage_byte_micros(project, from, storage_to, now)
                    .await?
            };
        }
        if network && network_to > from {
            usage.egress_bytes = self
                .store
                .network_bytes(project, Meter::Egress, from, network_to)
                .await?;
            usage.ingress_bytes = self
                .store
                .network_bytes(project, Meter::Ingress, from, network_to)
                .await?;
        }
        Ok(usage)
    }

    /// Usage over `[from, to)` clamped to now: nothing is reported for the future.
    pub async fn usage(
        &self,
        project: &ProjectId,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<UsageReport, Error> {
        if to <= from {
            return Err(Error::invalid("end", "must be after start"));
        }
        let days = (to.as_micros() - from.as_micros()) / DAY_MICROS;
        if days > MAX_USAGE_RANGE_DAYS {
            return Err(Error::invalid(
                "end",
                format!("the range is {days} days; at most {MAX_USAGE_RANGE_DAYS} per call"),
            ));
        }
        self.project(project).await?;
        let now = self.clock.now();
        let end = to.min(now);
        let mut parts = Vec::new();
        let mut total = 0i128;
        for (month, start, part_end) in split_by_month(from, end) {
            let bm = self
                .store
                .storage_byte_micros(project, start, part_end, now)
                .await?;
            total += bm;
            parts.push((month, bm));
        }
        let (stored_bytes, live_artifacts) = self.store.stored_at(project, now).await?;
        // Records dated this very microsecond count.
        let network_to = network_end(to, now).max(from);
        let network = |meter| self.store.network_bytes(project, meter, from, network_to);
        Ok(UsageReport {
            end: end.max(from),
            storage_byte_micros: total,
            storage_gib_months: metering::gib_months_over(&parts),
            egress_bytes: network(Meter::Egress).await?,
            ingress_bytes: network(Meter::Ingress).await?,
            stored_bytes,
            live_artifacts,
        })
    }

    /// The month's bill: the invoice once the month is finalized (finalizing it on first
    /// read after the grace if the finalizer has not yet), else a draft from rows with a
    /// projection for the current month.
    pub async fn bill(&self, project: &ProjectId, month: Month) -> Result<Bill, Error> {
        let now = self.clock.now();
        if now >= self.finalizes_at(month) {
            let invoice = self.finalize(project, month).await?;
            return Ok(Bill::from_invoice(invoice));
        }
        let draft = self.draft(project, month).await?;
        let total_micros = total(&draft.lines);
        let projected = if now >= month.start() && now < month.end() {
            Some(
                self.projection(project, month, now, &draft, Extra::default())
                    .await?,
            )
        } else {
            None
        };
        Ok(Bill {
            project_id: project.clone(),
            plan: draft.plan()?,
            month,
            lines: draft.lines,
            total_micros,
            closed: false,
            finalized_at: None,
            projected,
        })
    }

    /// When `month`'s bill is frozen: its end plus the grace for late records.
    pub fn finalizes_at(&self, month: Month) -> Timestamp {
        month.end().saturating_add_micros(self.invoice_grace_micros)
    }

    /// Finalizes `month` for `project` (idempotent: an existing invoice is returned as it
    /// is) and returns the stored invoice.
    pub async fn finalize(&self, project: &ProjectId, month: Month) -> Result<Invoice, Error> {
        if let Some(invoice) = self.store.invoice(project, month).await? {
            return Ok(invoice);
        }
        let now = self.clock.now();
        if now < self.finalizes_at(month) {
            return Err(Error::FailedPrecondition(format!(
                "{month} cannot be finalized before its grace period ends"
            )));
        }
        let draft = self.draft_with(project, month, true).await?;
        let plan = draft.plan()?;
        let invoice = Invoice {
            project_id: project.clone(),
            month,
            plan,
            total_micros: total(&draft.lines),
            lines: draft.lines,
            usage: draft.usage,
            finalized_at: now,
        };
        self.store.insert_invoice(&invoice, &draft.network).await?;
        let stored = self.store.invoice(project, month).await?.ok_or_else(|| {
            Error::Internal(format!("invoice of {month} missing after finalizing"))
        })?;
        if stored.finalized_at == now {
            tracing::info!(project = %project, %month, total_micros = %stored.total_micros, "invoice finalized");
        }
        Ok(stored)
    }

    /// The month's lines from rows: each plan segment's usage up to now, then corrections
    /// for late records of invoiced months.
    async fn draft(&self, project: &ProjectId, month: Month) -> Result<Draft, Error> {
        self.draft_with(project, month, false).await
    }

    /// `direct` (finalizing a month, done once): storage summed straight from the artifact
    /// log in one query instead of through the day rollups that make repeated bills cheap,
    /// and network read per piece of a day in one query, kept with the invoice so the
    /// month's export always shows what it billed.
    async fn draft_with(
        &self,
        project: &ProjectId,
        month: Month,
        direct: bool,
    ) -> Result<Draft, Error> {
        let segments = self
            .store
            .plan_segments(project, month.start(), month.end())
            .await?;
        let network = if direct {
            let cuts: Vec<Timestamp> = segments.iter().map(|s| s.from).collect();
            let until = network_end(month.end(), self.clock.now());
            self.store
                .network_pieces(project, month.start(), until, &cuts)
                .await?
        } else {
            Vec::new()
        };
        let mut lines = Vec::new();
        let mut usage = MonthUsage::default();
        let mut per_segment = Vec::with_capacity(segments.len());
        for segment in &segments {
            let mut used = self
                .usage_between(project, segment.from, segment.to, direct, !direct)
                .await?;
            if direct {
                let in_segment = |meter: Meter| -> i128 {
                    network
                        .iter()
                        .filter(|p| {
                            p.meter == meter && p.start >= segment.from && p.start < segment.to
                        })
                        .map(|p| i128::from(p.bytes))
                        .sum()
                };
                used.egress_bytes = in_segment(Meter::Egress);
                used.ingress_bytes = in_segment(Meter::Ingress);
            }
            usage.storage_byte_micros += used.storage_byte_micros;
            usage.egress_bytes += used.egress_bytes;
            usage.ingress_bytes += used.ingress_bytes;
            lines.extend(segment_lines(segment, month, &used));
            per_segment.push(used);
        }
        lines.extend(self.corrections(project, month).await?);
        Ok(Draft {
            segments,
            network,
            used: per_segment,
            lines,
            usage,
        })
    }

    /// Correction lines for network records of invoiced months before `month` that arrived
    /// after their invoice (and after any earlier correction): the month re-billed from
    /// rows at its own plan segments, minus what was already billed for it.
    pub(super) async fn corrections(
        &self,
        project: &ProjectId,
        month: Month,
    ) -> Result<Vec<LineItem>, Error> {
        let mut first = month;
        for _ in 0..CORRECTION_LOOKBACK_MONTHS {
            first = first.previous();
        }
        // The common case, cheaply: every invoiced month's network records still add up to
        // what its invoice billed, so there is nothing to correct.
        let mut unchanged = true;
        for (m, egress, ingress) in self
            .store
            .invoiced_network(project, first, month.previous())
            .await?
        {
            let now_egress = self
                .store
                .network_bytes(project, Meter::Egress, m.start(), m.end());
            let now_ingress = self
                .store
                .network_bytes(project, Meter::Ingress, m.start(), m.end());
            if now_egress.await? != i128::from(egress) || now_ingress.await? != i128::from(ingress)
            {
                unchanged = false;
                break;
            }
        }
        if unchanged {
            return Ok(Vec::new());
        }
        let invoices = self
            .store
            .invoices_between(project, first, month.previous())
            .await?;
        let mut lines = Vec::new();
        for invoice in &invoices {
            let billed = |meter: Meter| -> (i128, i128) {
                // (bytes, micros) billed for this invoice's month so far: its own lines plus
                // corrections for it on later invoices.
                let own = invoice
                    .lines
                    .iter()
                    .filter(|l| l.meter == meter && l.correction_for.is_none());
                let later = invoices
                    .iter()
                    .filter(|i| i.month > invoice.month)
                    .flat_map(|i| i.lines.iter())
                    .filter(|l| l.meter == meter && l.correction_for == Some(invoice.month));
                let own_bytes = match meter {
                    Meter::Egress => invoice.usage.egress_bytes,
                    _ => invoice.usage.ingress_bytes,
                };
                let later: Vec<&LineItem> = later.collect();
                let bytes = own_bytes
                    + later
                        .iter()
                        .map(|l| {
                            l.usage.numerator * i128::from(crate::domain::plan::GIB)
                                / l.usage.denominator
                        })
                        .sum::<i128>();
                let micros = own.map(|l| l.amount_micros).sum::<i128>()
                    + later.iter().map(|l| l.amount_micros).sum::<i128>();
                (bytes, micros)
            };
            let m = invoice.month;
            for meter in [Meter::Egress, Meter::Ingress] {
                let now_bytes = self
                    .store
                    .network_bytes(project, meter, m.start(), m.end())
                    .await?;
                let (bytes, micros) = billed(meter);
                if now_bytes == bytes {
                    continue;
                }
                // Re-bill the month's meter at its own segments with today's rows.
                let segments = self
                    .store
                    .plan_segments(project, m.start(), m.end())
                    .await?;
                let mut amount = 0i128;
                for segment in &segments {
                    let used = self
                        .store
                        .network_bytes(project, meter, segment.from, segment.to)
                        .await?;
                    let (units, price) = match meter {
                        Meter::Egress => (
                            segment.plan.included_egress_gib,
                            segment.plan.egress_price_micros,
                        ),
                        _ => (0, segment.plan.ingress_price_micros),
                    };
                    amount += LineItem::new(meter, Quantity::gib(used), units, price, segment, m)
                        .amount_micros;
                }
                let last = segments
                    .last()
                    .ok_or_else(|| Error::Internal(format!("{m} has no plan segment")))?;
                let delta = Quantity::gib(now_bytes - bytes).reduced();
                lines.push(LineItem {
                    meter,
                    usage: delta,
                    included: Quantity {
                        numerator: 0,
                        denominator: delta.denominator,
                    },
                    billable: delta,
                    unit_price_micros: match meter {
                        Meter::Egress => last.plan.egress_price_micros,
                        _ => last.plan.ingress_price_micros,
                    },
                    amount_micros: amount - micros,
                    plan_id: last.plan.id.clone(),
                    plan_version: last.plan.version,
                    period_start: m.start(),
                    period_end: m.end(),
                    correction_for: Some(m),
                });
            }
        }
        Ok(lines)
    }

    /// The current month's lines with what is stored now carried to month end (each
    /// artifact until its expiry if that comes first) plus `extra`, in the last segment.
    async fn projection(
        &self,
        project: &ProjectId,
        month: Month,
        now: Timestamp,
        draft: &Draft,
        extra: Extra,
    ) -> Result<(Vec<LineItem>, i128), Error> {
        let future = self
            .store
            .future_storage_byte_micros(project, now, month.end())
            .await?;
        let remaining = i128::from((month.end().as_micros() - now.as_micros()).max(0));
        let mut lines = Vec::new();
        for (segment, used) in draft.segments.iter().zip(&draft.used) {
            let mut used = *used;
            if segment.from <= now && now < segment.to {
                used.storage_byte_micros += future + i128::from(extra.stored_bytes) * remaining;
                used.egress_bytes += i128::from(extra.egress_bytes);
                used.ingress_bytes += i128::from(extra.ingress_bytes);
            }
            lines.extend(segment_lines(segment, month, &used));
        }
        lines.extend(
            draft
                .lines
                .iter()
                .filter(|l| l.correction_for.is_some())
                .cloned(),
        );
        let total = total(&lines);
        Ok((lines, total))
    }

    /// Per UTC day: storage integrated over the day, bytes stored at its end, network.
    /// Days are counted up to now: today until now, later days as zero.
    pub async fn daily(
        &self,
        project: &ProjectId,
        first_day: Timestamp,
        last_day: Timestamp,
    ) -> Result<Vec<DailyUsage>, Error> {
        if last_day < first_day {
            return Err(Error::invalid("end_day", "must not be before start_day"));
        }
        let to = last_day.saturating_add_micros(DAY_MICROS);
        let days = (to.as_micros() - first_day.as_micros()) / DAY_MICROS;
        if days > MAX_DAILY_RANGE_DAYS {
            return Err(Error::invalid(
                "end_day",
                format!("the range is {days} days; at most {MAX_DAILY_RANGE_DAYS} per call"),
            ));
        }
        self.project(project).await?;
        let now = self.clock.now();
        let until = to.min(now).max(first_day);
        let network_until = network_end(to, now).max(first_day);
        let intervals = self
            .store
            .storage_intervals(project, first_day, until)
            .await?;
        let egress = self
            .store
            .network_bytes_daily(project, Meter::Egress, first_day, network_until)
            .await?;
        let ingress = self
            .store
            .network_bytes_daily(project, Meter::Ingress, first_day, network_until)
            .await?;
        let lookup =
            |rows: &[(i64, i64)], day: i64| rows.iter().find(|r| r.0 == day).map_or(0, |r| r.1);
        Ok((0..days)
            .map(|d| {
                let start = first_day.saturating_add_micros(d * DAY_MICROS);
                let end = start.saturating_add_micros(DAY_MICROS).min(now);
                if start > now {
                    return DailyUsage {
                        day: start,
                        storage_byte_micros: 0,
                        stored_bytes_at_end: 0,
                        egress_bytes: 0,
                        ingress_bytes: 0,
                    };
                }
                let last_instant = Timestamp::from_micros(end.as_micros() - 1);
                DailyUsage {
                    day: start,
                    storage_byte_micros: byte_micros(&intervals, start, end),
                    stored_bytes_at_end: intervals
                        .iter()
                        .filter(|i| {
                            i.start <= last_instant && i.end.is_none_or(|e| e > last_instant)
                        })
                        .map(|i| i.size)
                        .sum(),
                    egress_bytes: lookup(&egress, d),
                    ingress_bytes: lookup(&ingress, d),
                }
            })
            .collect())
    }

    /// A page of every project's totals for `month` in `sort`'s order (ties by project id),
    /// after the row the previous page ended with.
    ///
    /// A finalized month reads its invoices with one keyset query. Invoices still missing
    /// (the finalizer writes them right after the grace) are finalized first when they are
    /// few; otherwise the call is UNAVAILABLE until the finalizer has caught up. The open month has no invoices: each project's draft is computed and sorted,
    /// which costs a bill per project.
    pub async fn projects_usage(
        &self,
        month: Month,
        sort: ProjectsSort,
        after: Option<ProjectsCursor>,
        limit: u64,
    ) -> Result<Vec<InvoiceSummary>, Error> {
        let now = self.clock.now();
        if now >= self.finalizes_at(month) {
            // A few stragglers are finalized here; a whole month's worth is the finalizer's
            // work (it starts at once on every replica), and the listing says to retry.
            let missing = self
                .store
                .projects_without_invoice(month, INLINE_FINALIZE_LIMIT + 1)
                .await?;
            if missing.len() as u64 > INLINE_FINALIZE_LIMIT {
                // The finalizer only takes last month; an older month a listing asks for
                // (a deployment upgraded mid-year) is finalized in the background, once.
                self.finalize_in_background(month);
                return Err(Error::Unavailable {
                    what: "invoices",
                    cause: format!("{month} is still being finalized"),
                });
            }
            for project in &missing {
                self.finalize(project, month).await?;
            }
            return self
                .store
                .invoices_page(month, sort, after.as_ref(), limit)
                .await;
        }
        let mut rows = Vec::new();
        for id in self.store.list_project_ids().await? {
            let project = ProjectId::parse("project_id", &id)
                .map_err(|_| Error::Internal(format!("bad project id {id:?} in projects")))?;
            let bill = self.bill(&project, month).await?;
            let usage = |meter: Meter| -> i128 {
                bill.lines
                    .iter()
                    .filter(|l| l.meter == meter && l.correction_for.is_none())
                    .map(|l| {
                        l.usage.numerator * (i128::from(GIB) * MICROS * i128::from(month.seconds()))
                            / l.usage.denominator
                    })
                    .sum()
            };
            let bytes = |meter: Meter| -> i64 {
                let q: i128 = bill
                    .lines
                    .iter()
                    .filter(|l| l.meter == meter && l.correction_for.is_none())
                    .map(|l| l.usage.numerator * i128::from(GIB) / l.usage.denominator)
                    .sum();
                i64::try_from(q).unwrap_or(i64::MAX)
            };
            rows.push(InvoiceSummary {
                project_id: id,
                plan_id: bill.plan.id.clone(),
                currency: bill.plan.currency.clone(),
                total_micros: i64::try_from(bill.total_micros).unwrap_or(i64::MAX),
                storage_byte_micros: usage(Meter::Storage),
                egress_bytes: bytes(Meter::Egress),
                ingress_bytes: bytes(Meter::Ingress),
            });
        }
        rows.sort_by(|a, b| sort.compare(a, b));
        Ok(rows
            .into_iter()
            .filter(|r| {
                after
                    .as_ref()
                    .is_none_or(|c| sort.compare_to(r, c) == std::cmp::Ordering::Greater)
            })
            .take(usize::try_from(limit).unwrap_or(usize::MAX))
            .collect())
    }

    /// Finalizes `month` for every project that existed before it ended, in batches.
    pub async fn finalize_month(&self, month: Month) -> Result<u64, Error> {
        let mut finalized = 0;
        loop {
            let missing = self.store.projects_without_invoice(month, 500).await?;
            if missing.is_empty() {
                return Ok(finalized);
            }
            // A few projects at a time: each is a handful of round trips.
            let results: Vec<Result<Invoice, Error>> = futures::stream::iter(missing)
                .map(|project| async move { self.finalize(&project, month).await })
                .buffer_unordered(FINALIZE_CONCURRENCY)
                .collect()
                .await;
            for result in results {
                result?;
                finalized += 1;
            }
        }
    }

    /// Starts finalizing `month` for every project on a task of its own, unless this process
    /// already is. Idempotent like every finalization.
    fn finalize_in_background(&self, month: Month) {
        let started = self
            .finalizing
            .lock()
            .map(|mut months| months.insert(month))
            .unwrap_or(false);
        if !started {
            return;
        }
        let metering = self.clone();
        self.counters.spawn(async move {
            if let Err(e) = metering.finalize_month(month).await {
                tracing::warn!(error = %e, %month, "finalizing invoices failed; a later listing retries");
            }
            if let Ok(mut months) = metering.finalizing.lock() {
                months.remove(&month);
            }
        });
    }

    /// Finalizes the previous month's invoices once its grace is over, then every few
    /// minutes, until `stop` is cancelled. Safe on every replica at once.
    pub async fn run_finalizer(self, stop: tokio_util::sync::CancellationToken) {
        loop {
            let month = Month::containing(self.clock.now()).previous();
            if self.clock.now() >= self.finalizes_at(month) {
                match self.finalize_month(month).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(%month, invoices = n, "month finalized"),
                    Err(e) => {
                        tracing::warn!(error = %e, %month, "finalizing invoices failed; will retry")
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(FINALIZER_INTERVAL) => {}
            }
        }
    }
}

/// Projects the finalizer freezes at once.
const FINALIZE_CONCURRENCY: usize = 8;
/// Most invoices a listing call finalizes itself before asking the caller to retry.
const INLINE_FINALIZE_LIMIT: u64 = 100;

/// How often the finalizer looks for months to finalize.
const FINALIZER_INTERVAL: std::time::Duration = std::time::Duration::from_secs(300);

impl Draft {
    /// The plan version in effect at the end of the month (plan segments are never empty).
    fn plan(&self) -> Result<crate::domain::Plan, Error> {
        self.segments
            .last()
            .map(|s| s.plan.clone())
            .ok_or_else(|| Error::Internal("a month without plan segments".into()))
    }
}

/// The exclusive end of network records counted up to `to` at `now`: a record dated this
/// very microsecond counts, nothing later does.
pub(super) fn network_end(to: Timestamp, now: Timestamp) -> Timestamp {
    to.min(now.saturating_add_micros(1))
}

impl Bill {
    fn from_invoice(invoice: Invoice) -> Self {
        Self {
            project_id: invoice.project_id,
            plan: invoice.plan,
            month: invoice.month,
            lines: invoice.lines,
            total_micros: invoice.total_micros,
            closed: true,
            finalized_at: Some(invoice.finalized_at),
            projected: None,
        }
    }
}
