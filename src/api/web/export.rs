//! `GET /api/v1/usage/export`: a month's usage, one record per project × meter × UTC day
//! (split where a plan version starts within the day), as CSV or JSON lines.
//!
//! The body streams project by project: an export of every project reads the project ids
//! a page at a time and holds one project's month of records at once, whatever the number
//! of projects. A failure after the first byte ends the body early (the client sees a
//! truncated transfer, never a short file that looks whole); before it, the error's status.

use std::collections::{HashMap, VecDeque};

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::Web;
use crate::api::http::HttpError;
use crate::domain::metering::{Meter, Month, byte_seconds, format_day};
use crate::domain::{Access, Error, ProjectId, Role, Timestamp, authorize};
use crate::service::UsageRecord;
use crate::service::metering::Metering;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Csv,
    Jsonl,
}

/// The columns of a CSV export, and the keys of a JSON line, in order.
pub const COLUMNS: [&str; 12] = [
    "event_id",
    "project_id",
    "meter",
    "day",
    "period_start",
    "period_end",
    "plan_id",
    "plan_version",
    "quantity",
    "unit",
    "closed",
    "correction_for",
];

/// Which projects one export covers.
enum Projects {
    One(ProjectId),
    All,
}

pub(super) async fn export(
    State(web): State<Web>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, HttpError> {
    // Authenticate, then authorize (the project named, or the one the token implies), then
    // validate the rest.
    let principal = web.principal(&headers)?;
    let projects = match query.get("project").filter(|p| !p.is_empty()) {
        Some(project) => {
            let project = ProjectId::parse("project", project)?;
            authorize(&principal, Access::ReadUsage(&project))?;
            Projects::One(project)
        }
        None => match &principal.project {
            Some(own) if principal.role != Role::Admin => {
                authorize(&principal, Access::ReadUsage(own))?;
                Projects::One(own.clone())
            }
            _ => {
                authorize(&principal, Access::ReadAllUsage)?;
                Projects::All
            }
        },
    };
    let month = Month::parse(
        "month",
        query.get("month").map(String::as_str).unwrap_or_default(),
    )?;
    let format = match query.get("format").map(String::as_str) {
        None | Some("csv") => Format::Csv,
        Some("jsonl") => Format::Jsonl,
        Some(other) => {
            return Err(Error::invalid(
                "format",
                format!("{other:?} is not an export format: csv or jsonl"),
            )
            .into());
        }
    };
    let mut state = Export {
        metering: web.metering.clone(),
        month,
        format,
        header: format == Format::Csv,
        queue: VecDeque::new(),
        after: None,
        exhausted: false,
        ready: None,
    };
    match projects {
        // One project: its records are read before the response starts, so an unknown
        // project is a 404, not an empty file.
        Projects::One(project) => {
            let records = web.metering.usage_records(&project, month).await?;
            state.ready = Some(records);
            state.exhausted = true;
        }
        Projects::All => {}
    }
    let (content_type, extension) = match format {
        Format::Csv => ("text/csv; charset=utf-8", "csv"),
        Format::Jsonl => ("application/jsonl; charset=utf-8", "jsonl"),
    };
    let stream = futures::stream::unfold(state, |mut state| async move {
        match state.next_chunk().await {
            Ok(Some(chunk)) => Some((Ok::<Bytes, std::io::Error>(chunk), state)),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, month = %state.month, "usage export failed mid-stream");
                state.exhausted = true;
                state.queue.clear();
                Some((Err(std::io::Error::other("usage export failed")), state))
            }
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CONTENT_DISPOSITION,
                HeaderValue::from_str(&format!(
                    "attachment; filename=\"artifactd-usage-{month}.{extension}\""
                ))
                .map_err(|_| Error::Internal("bad export filename".into()))?,
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Where a streaming export is.
struct Export {
    metering: Metering,
    month: Month,
    format: Format,
    /// The CSV header line is still to be sent.
    header: bool,
    /// Projects of the current page not yet exported.
    queue: VecDeque<ProjectId>,
    /// The last project id paged past.
    after: Option<ProjectId>,
    /// No more pages.
    exhausted: bool,
    /// Records read before the response started (one project's export).
    ready: Option<Vec<UsageRecord>>,
}

impl Export {
    /// The next piece of the body: the header, then one project's records at a time.
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, Error> {
        if self.header {
            self.header = false;
            return Ok(Some(csv_line(COLUMNS.iter().map(|c| (*c).to_owned()))?));
        }
        if let Some(records) = self.ready.take() {
            return self.encode(&records).map(Some);
        }
        loop {
            if let Some(project) = self.queue.pop_front() {
                let records = match self.metering.usage_records(&project, self.month).await {
                    Ok(records) => records,
                    // Listed a moment ago, gone now (nothing deletes projects today).
                    Err(Error::NotFound(_)) => continue,
                    Err(e) => return Err(e),
                };
                if records.is_empty() {
                    continue;
                }
                return self.encode(&records).map(Some);
            }
            if self.exhausted {
                return Ok(None);
            }
            let page = self
                .metering
                .export_projects(self.month, self.after.as_ref())
                .await?;
            if (page.len() as u64) < crate::service::metering::EXPORT_PROJECTS_PAGE {
                self.exhausted = true;
            }
            self.after = page.last().cloned().or(self.after.take());
            self.queue.extend(page);
        }
    }

    fn encode(&self, records: &[UsageRecord]) -> Result<Bytes, Error> {
        let mut out = Vec::with_capacity(records.len() * 200);
        for record in records {
            let fields = fields(record);
            match self.format {
                Format::Csv => out.extend_from_slice(&csv_line(fields.into_iter())?),
                Format::Jsonl => {
                    let mut line = serde_json::Map::new();
                    for (key, value) in COLUMNS.iter().zip(fields) {
                        let value = match *key {
                            "plan_version" => serde_json::Value::from(record.plan_version),
                            "closed" => serde_json::Value::from(record.closed),
                            "correction_for" if value.is_empty() => serde_json::Value::Null,
                            _ => serde_json::Value::from(value),
                        };
                        line.insert((*key).to_owned(), value);
                    }
                    serde_json::to_writer(&mut out, &line)
                        .map_err(|e| Error::Internal(format!("encoding an export line: {e}")))?;
                    out.push(b'\n');
                }
            }
        }
        Ok(Bytes::from(out))
    }
}

/// A record's fields, in [`COLUMNS`] order, as text. Quantities are exact: storage in
/// byte-seconds with six decimals (the meter counts byte-microseconds), network in bytes.
fn fields(record: &UsageRecord) -> Vec<String> {
    let (quantity, unit) = match record.meter {
        Meter::Storage => (byte_seconds(record.quantity), "byte-second"),
        Meter::Egress | Meter::Ingress => (record.quantity.to_string(), "byte"),
    };
    vec![
        record.event_id.to_string(),
        record.project_id.to_string(),
        record.meter.as_str().to_owned(),
        format_day(record.day),
        rfc3339(record.from),
        rfc3339(record.to),
        record.plan_id.clone(),
        record.plan_version.to_string(),
        quantity,
        unit.to_owned(),
        record.closed.to_string(),
        record
            .correction_for
            .map(|m| m.to_string())
            .unwrap_or_default(),
    ]
}

fn csv_line(fields: impl Iterator<Item = String>) -> Result<Bytes, Error> {
    let mut writer = csv::WriterBuilder::new()
        .has_headers(false)
        .terminator(csv::Terminator::CRLF)
        .from_writer(Vec::new());
    writer
        .write_record(fields)
        .map_err(|e| Error::Internal(format!("encoding an export line: {e}")))?;
    writer
        .into_inner()
        .map(Bytes::from)
        .map_err(|e| Error::Internal(format!("encoding an export line: {e}")))
}

/// `2026-11-01T00:00:00Z` (microseconds shown only when there are some).
pub(super) fn rfc3339(t: Timestamp) -> String {
    let micros = u64::try_from(t.as_micros()).unwrap_or(0);
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_micros(micros);
    if micros % 1_000_000 == 0 {
        humantime::format_rfc3339_seconds(time).to_string()
    } else {
        humantime::format_rfc3339_micros(time).to_string()
    }
}
