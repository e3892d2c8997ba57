//! The usage pages, rendered on the server with maud (compile-time templates, every
//! interpolation HTML-escaped). Each figure comes from the service call the gRPC API
//! answers with — `GetBill`, `ListDailyUsage`, `ListUsageAlerts`, `GetUsageControls`,
//! `ListProjectsUsage` — so a page never disagrees with the API. Exact figures sit beside
//! the rounded ones in `data-*` attributes (bytes, micro-units).

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Uri, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::Web;
use super::charts::{self, BLUE, ORANGE, Series};
use super::export::rfc3339;
use crate::api::http::http_status;
use crate::domain::metering::{
    DAY_MICROS, LineItem, Month, ProjectsCursor, ProjectsSort, ProjectsSortKey, decimal, format_day,
};
use crate::domain::{Access, Error, Principal, ProjectId, Timestamp, authorize};

/// Rows of the all-projects page.
const PROJECTS_PAGE: usize = 25;
/// Rows of the "largest" tables.
const TOP: u64 = 20;

/// The frame of every page: the stylesheet, who is signed in, sign-out.
pub(super) fn layout(title: &str, principal: Option<&Principal>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · artifactd" }
                link rel="stylesheet" href="/ui/style.css";
            }
            body {
                header.top {
                    a.brand href="/ui/" { "artifactd usage" }
                    @if let Some(p) = principal {
                        span.who {
                            (p.role.as_str())
                            @if let Some(project) = &p.project { " · " (project.as_str()) }
                        }
                        form.signout method="post" action="/ui/sign-out" {
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// An error as a page: without credentials, the sign-in form (returning here after);
/// otherwise the status the API would answer with and its message.
fn error_page(e: Error, uri: &Uri, principal: Option<&Principal>) -> Response {
    if matches!(e, Error::Unauthenticated(_)) {
        let next = uri
            .path_and_query()
            .map(|p| p.as_str())
            .and_then(super::session::safe_next)
            .unwrap_or_default();
        let to = if next.is_empty() {
            "/ui/sign-in".to_owned()
        } else {
            format!("/ui/sign-in?next={}", percent_encode(&next))
        };
        return Redirect::to(&to).into_response();
    }
    let status = tonic::Status::from(e);
    let code = http_status(status.code());
    let body = html! {
        h1 { (code.as_u16()) " " (code.canonical_reason().unwrap_or("")) }
        p.error role="alert" { (status.message()) }
        p { a href="/ui/sign-in" { "Sign in with another token" } }
    };
    (
        code,
        [(header::CACHE_CONTROL, "no-store")],
        Html(layout("Error", principal, body).into_string()),
    )
        .into_response()
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn page(title: &str, principal: &Principal, body: Markup) -> Response {
    (
        [(header::CACHE_CONTROL, "no-store")],
        Html(layout(title, Some(principal), body).into_string()),
    )
        .into_response()
}

/// `?month=` or the current month.
fn month_param(query: &HashMap<String, String>, now: Timestamp) -> Result<Month, Error> {
    match query.get("month").filter(|m| !m.is_empty()) {
        Some(m) => Month::parse("month", m),
        None => Ok(Month::containing(now)),
    }
}

/// `GET /ui/projects/{project}?month=YYYY-MM`.
pub(super) async fn project(
    State(web): State<Web>,
    Path(project): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let principal = match web.principal(&headers) {
        Ok(p) => p,
        Err(e) => return error_page(e, &uri, None),
    };
    match project_page(&web, &principal, &project, &query).await {
        Ok(body) => body,
        Err(e) => error_page(e, &uri, Some(&principal)),
    }
}

async fn project_page(
    web: &Web,
    principal: &Principal,
    project: &str,
    query: &HashMap<String, String>,
) -> Result<Response, Error> {
    let project = ProjectId::parse("project", project)?;
    authorize(principal, Access::ReadUsage(&project))?;
    let now = web.metering.now();
    let month = month_param(query, now)?;
    let bill = web.metering.bill(&project, month).await?;
    let last_day = month.end().saturating_add_micros(-DAY_MICROS);
    let days = web
        .metering
        .daily(&project, month.start(), last_day)
        .await?;
    let controls = web.accounts.controls(&project).await?;
    let alerts = web.metering.alerts(&project, month).await?;
    // What is stored at the end of the month, or now for the current one.
    let at = Timestamp::from_micros(month.end().as_micros() - 1).min(now);
    let stored_now_at = web.metering.stored_breakdown(&project, at, TOP).await?;
    let (largest, scopes, folders) = (
        &stored_now_at.artifacts,
        &stored_now_at.scopes,
        &stored_now_at.folders,
    );
    let stored: Vec<i64> = days.iter().map(|d| d.stored_bytes_at_end).collect();
    let egress: Vec<i64> = days.iter().map(|d| d.egress_bytes).collect();
    let ingress: Vec<i64> = days.iter().map(|d| d.ingress_bytes).collect();
    let stored_chart = charts::daily_bytes(
        "Stored bytes at the end of each day",
        &[Series {
            name: "stored",
            color: BLUE,
            values: &stored,
        }],
    )?;
    let network_chart = charts::daily_bytes(
        "Network per day",
        &[
            Series {
                name: "egress",
                color: BLUE,
                values: &egress,
            },
            Series {
                name: "ingress",
                color: ORANGE,
                values: &ingress,
            },
        ],
    )?;
    let currency = bill.plan.currency.as_str();
    let stored_now = stored
        .iter()
        .zip(&days)
        .filter(|(_, d)| d.day <= now)
        .map(|(s, _)| *s)
        .next_back()
        .unwrap_or(0);
    let spend = bill.projected.as_ref().map_or(bill.total_micros, |p| p.1);
    let segments = segments(&bill.lines);
    let link = |m: Month| format!("/ui/projects/{project}?month={m}");
    let body = html! {
        nav.months {
            a rel="prev" href=(link(month.previous())) { "← " (month.previous().to_string()) }
            h1 { (project.as_str()) " · " (month.to_string()) }
            a rel="next" href=(link(month.next())) { (month.next().to_string()) " →" }
        }
        section #bill {
            h2 {
                "Bill "
                @if bill.closed { span.badge.closed { "closed" } }
                @else { span.badge.open { "open" } }
            }
            (lines_table(&bill.lines, currency))
            p.total data-micros=(bill.total_micros) {
                "Total " @if !bill.closed { "to date " } strong { (money(bill.total_micros, currency)) }
            }
            @if let Some((lines, total)) = &bill.projected {
                details {
                    summary { "Projected at month end: " strong #projected data-micros=(total) { (money(*total, currency)) } }
                    (lines_table(lines, currency))
                }
            }
        }
        section #plan {
            h2 { "Plan" }
            p { strong { (bill.plan.name) } " (" code { (bill.plan.id) } " v" (bill.plan.version) ", " (currency) ")" }
            @if segments.len() > 1 {
                p { "The plan changed this month; each stretch is billed at its own prices, included amounts prorated:" }
            }
            ul.segments {
                @for (plan, version, from, to) in &segments {
                    li { code { (plan) } " v" (version) ": " (rfc3339(*from)) " → " (rfc3339(*to)) }
                }
            }
        }
        section #controls {
            h2 { "Usage controls" }
            table {
                thead { tr { th { "Control" } th { "Limit" } th { "Now" } th { "Used" } } }
                tbody {
                    tr {
                        td { "Spend cap" }
                        @match controls.spend_cap_micros {
                            Some(cap) => {
                                td data-micros=(cap) { (money(i128::from(cap), currency)) }
                                td { (money(spend, currency)) @if bill.projected.is_some() { " projected" } }
                                td { (meter_bar(spend, i128::from(cap))) }
                            }
                            None => { td { "none" } td { (money(spend, currency)) } td { "—" } }
                        }
                    }
                    tr {
                        td { "Storage cap" }
                        @match controls.storage_cap_bytes.or(bill.plan.storage_limit_bytes) {
                            Some(cap) => {
                                td data-bytes=(cap) { (bytes(cap)) }
                                td data-bytes=(stored_now) { (bytes(stored_now)) }
                                td { (meter_bar(i128::from(stored_now), i128::from(cap))) }
                            }
                            None => { td { "none" } td data-bytes=(stored_now) { (bytes(stored_now)) } td { "—" } }
                        }
                    }
                }
            }
            @if !controls.alert_thresholds.is_empty() {
                p { "Alerts at " (controls.alert_thresholds.iter().map(|t| format!("{t}%")).collect::<Vec<_>>().join(", ")) " of each limit." }
            }
        }
        section #alerts {
            h2 { "Alerts crossed" }
            @if alerts.is_empty() { p { "None this month." } }
            @else {
                table {
                    thead { tr { th { "When" } th { "Meter" } th { "Threshold" } th { "Figure" } th { "Limit" } } }
                    tbody {
                        @for a in &alerts {
                            tr { td { (rfc3339(a.crossed_at)) } td { (a.meter) } td { (a.threshold) "% of " (a.basis) } td { (a.figure) } td { (a.limit) } }
                        }
                    }
                }
            }
        }
        section #charts {
            h2 { "Per day" }
            figure.chart #stored-chart data-points=(days.len()) { (PreEscaped(stored_chart)) }
            figure.chart #network-chart data-points=(days.len()) { (PreEscaped(network_chart)) }
            details {
                summary { "The figures, day by day" }
                table #daily {
                    thead { tr { th { "Day" } th { "Stored at end" } th { "Egress" } th { "Ingress" } } }
                    tbody {
                        @for d in &days {
                            tr {
                                td { (format_day(d.day)) }
                                td.num data-bytes=(d.stored_bytes_at_end) { (bytes(d.stored_bytes_at_end)) }
                                td.num data-bytes=(d.egress_bytes) { (bytes(d.egress_bytes)) }
                                td.num data-bytes=(d.ingress_bytes) { (bytes(d.ingress_bytes)) }
                            }
                        }
                    }
                }
            }
        }
        section #stored {
            h2 { "What is stored" small { " at " (rfc3339(at)) } }
            h3 { "Largest artifacts" }
            @if largest.is_empty() { p { "Nothing stored." } }
            @else {
                table #largest {
                    thead { tr { th { "Scope" } th { "Path" } th { "Size" } th { "Since" } } }
                    tbody {
                        @for a in largest {
                            tr { td { (a.scope_kind) " " (a.scope_id) } td.path { (a.path) } td.num data-bytes=(a.size) { (bytes(a.size)) } td { (rfc3339(a.created_at)) } }
                        }
                    }
                }
            }
            h3 { "Folders holding the most" }
            @if !folders.is_empty() {
                table #folders {
                    thead { tr { th { "Scope" } th { "Folder" } th { "Artifacts" } th { "Bytes" } } }
                    tbody {
                        @for f in folders {
                            tr {
                                td { (f.scope_kind) " " (f.scope_id) }
                                td.path { @if f.folder.is_empty() { "(top level)" } @else { (f.folder) } }
                                td.num { (f.artifacts) }
                                td.num data-bytes=(f.bytes) { (bytes(f.bytes)) }
                            }
                        }
                    }
                }
            }
            h3 { "Scopes holding the most" }
            @if !scopes.is_empty() {
                table #scopes {
                    thead { tr { th { "Scope" } th { "Artifacts" } th { "Bytes" } } }
                    tbody {
                        @for s in scopes {
                            tr { td { (s.scope_kind) " " (s.scope_id) } td.num { (s.artifacts) } td.num data-bytes=(s.bytes) { (bytes(s.bytes)) } }
                        }
                    }
                }
            }
        }
        p.export {
            "Export this month: "
            a href=(format!("/api/v1/usage/export?month={month}&format=csv&project={project}")) { "CSV" } " · "
            a href=(format!("/api/v1/usage/export?month={month}&format=jsonl&project={project}")) { "JSON lines" }
        }
    };
    Ok(page(&format!("{project} {month}"), principal, body))
}

/// The bill's plan stretches in order, from its lines: (plan, version, from, to).
fn segments(lines: &[LineItem]) -> Vec<(String, i32, Timestamp, Timestamp)> {
    let mut out: Vec<(String, i32, Timestamp, Timestamp)> = Vec::new();
    for l in lines.iter().filter(|l| l.correction_for.is_none()) {
        let s = (
            l.plan_id.clone(),
            l.plan_version,
            l.period_start,
            l.period_end,
        );
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out
}

fn lines_table(lines: &[LineItem], currency: &str) -> Markup {
    html! {
        table.lines {
            thead { tr { th { "Meter" } th { "Plan" } th { "Usage" } th { "Included" } th { "Billable" } th { "Unit price" } th { "Amount" } } }
            tbody {
                @for l in lines {
                    tr data-meter=(l.meter.as_str()) data-plan=(l.plan_id) data-version=(l.plan_version) {
                        td {
                            (l.meter.as_str())
                            @if let Some(m) = l.correction_for { " (correction for " (m.to_string()) ")" }
                        }
                        td { (l.plan_id) " v" (l.plan_version) }
                        td.num.usage { (l.usage.to_decimal()) " " (l.meter.unit()) }
                        td.num { (l.included.to_decimal()) }
                        td.num { (l.billable.to_decimal()) }
                        td.num { (money(i128::from(l.unit_price_micros), currency)) }
                        td.num.amount data-micros=(l.amount_micros) { (money(l.amount_micros, currency)) }
                    }
                }
            }
        }
    }
}

/// Micro-units as money with cents (half-up), e.g. `12.35 USD`; the exact figure is in
/// the element's `data-micros`.
fn money(micros: i128, currency: &str) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    format!("{sign}{} {currency}", decimal(micros.abs(), 1_000_000, 2))
}

/// Bytes in the largest binary unit that keeps them ≥ 1, two decimals.
fn bytes(n: i64) -> String {
    let (unit, scale) = charts::byte_unit(n);
    if unit == "B" {
        return format!("{n} B");
    }
    format!("{:.2} {unit}", n as f64 / scale)
}

/// How close a figure is to its limit, as a bar and a percentage.
fn meter_bar(figure: i128, limit: i128) -> Markup {
    let percent = if limit > 0 {
        (figure * 100 / limit).clamp(0, 999)
    } else {
        100
    };
    let class = match percent {
        p if p >= 100 => "over",
        p if p >= 80 => "near",
        _ => "ok",
    };
    html! {
        meter class=(class) min="0" max="100" value=(percent.min(100)) { (percent) "%" }
        " " (percent) "%"
    }
}

/// `GET /ui/`: every project's month totals, in the order chosen, a page at a time.
pub(super) async fn projects(
    State(web): State<Web>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let principal = match web.principal(&headers) {
        Ok(p) => p,
        Err(e) => return error_page(e, &uri, None),
    };
    // A token of one project has one page to read.
    if authorize(&principal, Access::ReadAllUsage).is_err()
        && let Some(project) = &principal.project
        && authorize(&principal, Access::ReadUsage(project)).is_ok()
    {
        return Redirect::to(&format!("/ui/projects/{project}")).into_response();
    }
    match projects_page(&web, &principal, &query).await {
        Ok(body) => body,
        Err(e) => error_page(e, &uri, Some(&principal)),
    }
}

/// `?sort=&dir=`: the column and direction of the all-projects table (largest total first
/// when absent; a column's first click orders names A→Z and figures largest first).
fn sort_param(query: &HashMap<String, String>) -> Result<ProjectsSort, Error> {
    let key = match query.get("sort").filter(|s| !s.is_empty()) {
        None => return Ok(ProjectsSort::default()),
        Some(text) => ProjectsSortKey::parse(text).ok_or_else(|| {
            let keys: Vec<&str> = ProjectsSortKey::ALL.iter().map(|k| k.as_str()).collect();
            Error::invalid(
                "sort",
                format!("{text:?} is not a column: {}", keys.join(", ")),
            )
        })?,
    };
    let descending = match query.get("dir").map(String::as_str) {
        None | Some("") => key != ProjectsSortKey::Project,
        Some("desc") => true,
        Some("asc") => false,
        Some(other) => {
            return Err(Error::invalid(
                "dir",
                format!("{other:?} is not a direction: asc or desc"),
            ));
        }
    };
    Ok(ProjectsSort { key, descending })
}

/// A page link's cursor: the last row's figure (empty when sorting by project) and project
/// id, base64url. Opaque to readers; one that does not decode is INVALID_ARGUMENT.
fn encode_cursor(cursor: &ProjectsCursor) -> String {
    use base64::Engine;
    let value = cursor.value.map(|v| v.to_string()).unwrap_or_default();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{value}:{}", cursor.project))
}

fn decode_cursor(token: &str, sort: ProjectsSort) -> Result<ProjectsCursor, Error> {
    use base64::Engine;
    let bad = || Error::invalid("page", "is not a page this listing linked to");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (value, project) = text.split_once(':').ok_or_else(bad)?;
    let value = match (sort.key, value) {
        (ProjectsSortKey::Project, "") => None,
        (ProjectsSortKey::Project, _) => return Err(bad()),
        (_, value) => Some(value.parse::<i128>().map_err(|_| bad())?),
    };
    Ok(ProjectsCursor {
        value,
        project: project.to_owned(),
    })
}

async fn projects_page(
    web: &Web,
    principal: &Principal,
    query: &HashMap<String, String>,
) -> Result<Response, Error> {
    authorize(principal, Access::ReadAllUsage)?;
    let now = web.metering.now();
    let month = month_param(query, now)?;
    let sort = sort_param(query)?;
    let after = match query.get("page").filter(|p| !p.is_empty()) {
        Some(token) => Some(decode_cursor(token, sort)?),
        None => None,
    };
    let mut rows = web
        .metering
        .projects_usage(month, sort, after, PROJECTS_PAGE as u64 + 1)
        .await?;
    let more = rows.len() > PROJECTS_PAGE;
    rows.truncate(PROJECTS_PAGE);
    let next = match rows.last() {
        Some(last) if more => Some(encode_cursor(&sort.cursor(last))),
        _ => None,
    };
    let last_day = month.end().saturating_add_micros(-DAY_MICROS);
    let mut lines = Vec::with_capacity(rows.len());
    for row in rows {
        let project = ProjectId::parse("project", &row.project_id)?;
        let days = web
            .metering
            .daily(&project, month.start(), last_day)
            .await?;
        let stored: Vec<i64> = days.iter().map(|d| d.stored_bytes_at_end).collect();
        lines.push((row, charts::sparkline(&stored)?));
    }
    let direction = |descending: bool| if descending { "desc" } else { "asc" };
    // A column's link: the other direction for the current column (from the first page),
    // else the column's own first order.
    let column_link = |key: ProjectsSortKey| {
        let descending = if key == sort.key {
            !sort.descending
        } else {
            key != ProjectsSortKey::Project
        };
        format!(
            "/ui/?month={month}&sort={}&dir={}",
            key.as_str(),
            direction(descending)
        )
    };
    let columns = [
        (ProjectsSortKey::Project, "Project"),
        (ProjectsSortKey::Total, "Total"),
        (ProjectsSortKey::Storage, "Storage"),
        (ProjectsSortKey::Egress, "Egress"),
        (ProjectsSortKey::Ingress, "Ingress"),
    ];
    let body = html! {
        nav.months {
            a rel="prev" href=(format!("/ui/?month={}", month.previous())) { "← " (month.previous().to_string()) }
            h1 { "All projects · " (month.to_string()) }
            a rel="next" href=(format!("/ui/?month={}", month.next())) { (month.next().to_string()) " →" }
        }
        p.note { (PROJECTS_PAGE) " per page, ordered across every page by the column chosen (ties by project id); click a column again for the other direction." }
        table #projects data-sort=(sort.key.as_str()) data-dir=(direction(sort.descending)) {
            thead {
                tr {
                    @for (key, label) in columns {
                        th aria-sort=[(key == sort.key).then(|| if sort.descending { "descending" } else { "ascending" })] {
                            a href=(column_link(key)) {
                                (label)
                                @if key == sort.key { @if sort.descending { " ▾" } @else { " ▴" } }
                            }
                        }
                    }
                    th { "Plan" }
                    th { "Stored per day" }
                }
            }
            tbody {
                @for (row, spark) in &lines {
                    tr data-project=(row.project_id) {
                        td { a href=(format!("/ui/projects/{}?month={month}", row.project_id)) { (row.project_id) } }
                        td.num data-micros=(row.total_micros) { (money(i128::from(row.total_micros), &row.currency)) }
                        td.num { (crate::domain::metering::Quantity::gib_months(row.storage_byte_micros, month).to_decimal()) " GiB-month" }
                        td.num data-bytes=(row.egress_bytes) { (bytes(row.egress_bytes)) }
                        td.num data-bytes=(row.ingress_bytes) { (bytes(row.ingress_bytes)) }
                        td { (row.plan_id) }
                        td.spark { (PreEscaped(spark)) }
                    }
                }
            }
        }
        @if let Some(token) = &next {
            p { a rel="next" href=(format!("/ui/?month={month}&sort={}&dir={}&page={}", sort.key.as_str(), direction(sort.descending), percent_encode(token))) { "Next page →" } }
        }
        p.export { "Export every project's month: "
            a href=(format!("/api/v1/usage/export?month={month}&format=csv")) { "CSV" } " · "
            a href=(format!("/api/v1/usage/export?month={month}&format=jsonl")) { "JSON lines" } }
    };
    Ok(page(&format!("All projects {month}"), principal, body))
}
