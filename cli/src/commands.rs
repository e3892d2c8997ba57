//! The small commands: yank, stat, list, usage and bill.

use serde::Serialize;

use crate::connect::Client;
use crate::error::{CliError, Exit, Result};
use crate::output::{ArtifactJson, Output, human_bytes, rfc3339, table};
use crate::push::{list_all, scope_name};
use crate::{paths, pb};

pub async fn yank(client: &Client, out: &Output, scope: pb::Scope, source: &str) -> Result<()> {
    let path = paths::remote_source(source);
    if path.is_empty() {
        return Err(CliError::usage(
            "name a file or a folder to yank (the whole scope cannot be yanked at once)",
        ));
    }
    let deleted = client
        .retry(&format!("yank of '{path}'"), || {
            let mut api = client.artifacts();
            let request = pb::DeleteRequest {
                scope: Some(scope.clone()),
                path: path.clone(),
                recursive: true,
            };
            async move { api.delete(request).await }
        })
        .await?
        .into_inner();
    if deleted.deleted_count == 0 {
        return Err(CliError::new(
            Exit::NotFound,
            format!(
                "'{path}' not found in {}: check the path (`artifact list` shows what is there)",
                scope_name(&scope)
            ),
        ));
    }
    #[derive(Serialize)]
    struct Yanked {
        path: String,
        deleted_count: i64,
        deleted_bytes: i64,
    }
    let yanked = Yanked {
        path: path.clone(),
        deleted_count: deleted.deleted_count,
        deleted_bytes: deleted.deleted_bytes,
    };
    out.result(&yanked, || {
        format!(
            "yanked '{path}' from {} ({} files, {})",
            scope_name(&scope),
            deleted.deleted_count,
            human_bytes(u64::try_from(deleted.deleted_bytes).unwrap_or(0))
        )
    });
    Ok(())
}

pub async fn stat(client: &Client, out: &Output, scope: pb::Scope, source: &str) -> Result<()> {
    let path = paths::remote_source(source);
    let artifact = client
        .retry(&format!("stat of '{path}'"), || {
            let mut api = client.artifacts();
            let request = pb::StatRequest {
                scope: Some(scope.clone()),
                path: path.clone(),
            };
            async move { api.stat(request).await }
        })
        .await?
        .into_inner();
    let json = ArtifactJson::from(&artifact);
    out.result(&json, || {
        table(&[
            vec!["path".into(), json.path.clone()],
            vec![
                "size".into(),
                format!(
                    "{} ({} bytes)",
                    human_bytes(u64::try_from(json.size).unwrap_or(0)),
                    json.size
                ),
            ],
            vec!["sha256".into(), json.sha256.clone()],
            vec!["mode".into(), json.mode.clone()],
            vec![
                "created".into(),
                json.created_at.clone().unwrap_or_default(),
            ],
            vec![
                "expires".into(),
                if json.keep {
                    "never (kept)".into()
                } else {
                    json.expires_at.clone().unwrap_or_else(|| "never".into())
                },
            ],
        ])
    });
    Ok(())
}

pub async fn list(
    client: &Client,
    out: &Output,
    scope: pb::Scope,
    prefix: Option<&str>,
) -> Result<()> {
    let prefix = prefix.map(paths::remote_source).unwrap_or_default();
    let artifacts = list_all(client, &scope, &prefix).await?;
    let json: Vec<ArtifactJson> = artifacts.iter().map(ArtifactJson::from).collect();
    out.result(&json, || {
        if json.is_empty() {
            return format!("no files in {}", scope_name(&scope));
        }
        let mut rows = vec![vec![
            "PATH".to_owned(),
            "SIZE".to_owned(),
            "MODE".to_owned(),
            "CREATED".to_owned(),
            "EXPIRES".to_owned(),
        ]];
        for a in &json {
            rows.push(vec![
                a.path.clone(),
                human_bytes(u64::try_from(a.size).unwrap_or(0)),
                a.mode.clone(),
                a.created_at.clone().unwrap_or_default(),
                if a.keep {
                    "kept".into()
                } else {
                    a.expires_at.clone().unwrap_or_else(|| "never".into())
                },
            ]);
        }
        table(&rows)
    });
    Ok(())
}

/// `YYYY-MM` → (month, its first second, the next month's first second), in Unix seconds;
/// the current month (UTC) when `None`.
pub fn month_bounds(month: Option<&str>) -> Result<(String, i64, i64)> {
    let (year, mon) = match month {
        Some(text) => {
            let bad = || CliError::usage(format!("--month '{text}' is not YYYY-MM (e.g. 2026-11)"));
            let (y, m) = text.split_once('-').ok_or_else(bad)?;
            let (y, m): (i64, u32) = (y.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
            if y.to_string().len() != 4 || m.to_string().len() > 2 || !(1..=12).contains(&m) {
                return Err(bad());
            }
            (y, m)
        }
        None => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let (y, m, _) = civil_from_days(i64::try_from(now / 86_400).unwrap_or(0));
            (y, m)
        }
    };
    let (next_year, next_mon) = if mon == 12 {
        (year + 1, 1)
    } else {
        (year, mon + 1)
    };
    Ok((
        format!("{year:04}-{mon:02}"),
        days_from_civil(year, mon, 1) * 86_400,
        days_from_civil(next_year, next_mon, 1) * 86_400,
    ))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let month = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

pub async fn usage(
    client: &Client,
    out: &Output,
    project: &str,
    month: Option<&str>,
) -> Result<()> {
    let (month, start, end) = month_bounds(month)?;
    let usage = client
        .retry(&format!("usage of project {project}"), || {
            let mut api = client.usage();
            let request = pb::GetUsageRequest {
                project_id: project.to_owned(),
                start: Some(prost_types::Timestamp {
                    seconds: start,
                    nanos: 0,
                }),
                end: Some(prost_types::Timestamp {
                    seconds: end,
                    nanos: 0,
                }),
            };
            async move { api.get_usage(request).await }
        })
        .await?
        .into_inner();
    #[derive(Serialize)]
    struct UsageJson {
        project_id: String,
        month: String,
        start: Option<String>,
        end: Option<String>,
        storage_byte_seconds: String,
        storage_gib_months: String,
        egress_bytes: i64,
        ingress_bytes: i64,
        stored_bytes: i64,
        live_artifacts: i64,
    }
    let json = UsageJson {
        project_id: usage.project_id.clone(),
        month: month.clone(),
        start: usage.start.as_ref().map(rfc3339),
        end: usage.end.as_ref().map(rfc3339),
        storage_byte_seconds: usage.storage_byte_seconds.clone(),
        storage_gib_months: usage.storage_gib_months.clone(),
        egress_bytes: usage.egress_bytes,
        ingress_bytes: usage.ingress_bytes,
        stored_bytes: usage.stored_bytes,
        live_artifacts: usage.live_artifacts,
    };
    let bytes = |n: i64| format!("{} ({n} bytes)", human_bytes(u64::try_from(n).unwrap_or(0)));
    out.result(&json, || {
        table(&[
            vec!["project".into(), json.project_id.clone()],
            vec![
                "period".into(),
                format!(
                    "{} to {}",
                    json.start.clone().unwrap_or_default(),
                    json.end.clone().unwrap_or_default()
                ),
            ],
            vec![
                "storage".into(),
                format!("{} GiB-months", json.storage_gib_months),
            ],
            vec!["egress".into(), bytes(json.egress_bytes)],
            vec!["ingress".into(), bytes(json.ingress_bytes)],
            vec![
                "stored now".into(),
                format!(
                    "{} in {} files",
                    bytes(json.stored_bytes),
                    json.live_artifacts
                ),
            ],
        ])
    });
    Ok(())
}

/// Micro-units as a decimal amount: 1_234_500 → "1.2345".
pub fn money(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let abs = micros.unsigned_abs();
    let fraction = format!("{:06}", abs % 1_000_000);
    let fraction = fraction.trim_end_matches('0');
    let fraction = if fraction.len() < 2 {
        format!("{fraction:0<2}")
    } else {
        fraction.to_owned()
    };
    format!("{sign}{}.{fraction}", abs / 1_000_000)
}

pub async fn bill(client: &Client, out: &Output, project: &str, month: Option<&str>) -> Result<()> {
    let (month, _, _) = month_bounds(month)?;
    let bill = client
        .retry(&format!("bill of project {project}"), || {
            let mut api = client.usage();
            let request = pb::GetBillRequest {
                project_id: project.to_owned(),
                month: month.clone(),
            };
            async move { api.get_bill(request).await }
        })
        .await?
        .into_inner();
    #[derive(Serialize)]
    struct Line {
        meter: String,
        unit: String,
        usage: String,
        included: String,
        billable: String,
        unit_price_micros: i64,
        amount_micros: i64,
        plan_id: String,
        plan_version: i32,
        correction_for_month: String,
    }
    #[derive(Serialize)]
    struct BillJson {
        project_id: String,
        month: String,
        plan_id: String,
        currency: String,
        closed: bool,
        line_items: Vec<Line>,
        total_micros: i64,
        projected_line_items: Vec<Line>,
        projected_total_micros: Option<i64>,
    }
    let lines = |items: &[pb::LineItem]| -> Vec<Line> {
        items
            .iter()
            .map(|l| Line {
                meter: l.meter.clone(),
                unit: l.unit.clone(),
                usage: l.usage.clone(),
                included: l.included.clone(),
                billable: l.billable.clone(),
                unit_price_micros: l.unit_price_micros,
                amount_micros: l.amount_micros,
                plan_id: l.plan_id.clone(),
                plan_version: l.plan_version,
                correction_for_month: l.correction_for_month.clone(),
            })
            .collect()
    };
    let json = BillJson {
        project_id: bill.project_id.clone(),
        month: bill.month.clone(),
        plan_id: bill.plan_id.clone(),
        currency: bill.currency.clone(),
        closed: bill.closed,
        line_items: lines(&bill.line_items),
        total_micros: bill.total_micros,
        projected_line_items: lines(&bill.projected_line_items),
        projected_total_micros: bill.projected_total_micros,
    };
    out.result(&json, || {
        let currency = &json.currency;
        let mut rows = vec![vec![
            "METER".to_owned(),
            "USAGE".to_owned(),
            "INCLUDED".to_owned(),
            "BILLABLE".to_owned(),
            "UNIT PRICE".to_owned(),
            "AMOUNT".to_owned(),
        ]];
        for l in &json.line_items {
            let meter = if l.correction_for_month.is_empty() {
                l.meter.clone()
            } else {
                format!("{} (late, {})", l.meter, l.correction_for_month)
            };
            rows.push(vec![
                meter,
                format!("{} {}", l.usage, l.unit),
                l.included.clone(),
                l.billable.clone(),
                format!("{} {currency}/{}", money(l.unit_price_micros), l.unit),
                format!("{} {currency}", money(l.amount_micros)),
            ]);
        }
        let state = if json.closed {
            "closed invoice"
        } else {
            "to date, open"
        };
        let mut text = format!(
            "bill of project {} for {} (plan {}, {state})\n{}total  {} {currency}\n",
            json.project_id,
            json.month,
            json.plan_id,
            table(&rows),
            money(json.total_micros)
        );
        if let Some(projected) = json.projected_total_micros {
            text.push_str(&format!(
                "projected at month end  {} {currency}\n",
                money(projected)
            ));
        }
        text
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months() {
        let (m, start, end) = month_bounds(Some("2026-11")).unwrap();
        assert_eq!(m, "2026-11");
        assert_eq!(start, 1_793_491_200);
        assert_eq!(end - start, 30 * 86_400);
        let (_, start, end) = month_bounds(Some("2024-02")).unwrap();
        assert_eq!(end - start, 29 * 86_400);
        let (_, _, end) = month_bounds(Some("2026-12")).unwrap();
        assert_eq!(civil_from_days(end / 86_400), (2027, 1, 1));
        for bad in ["2026", "2026-13", "26-01", "2026-00", "x-y"] {
            assert_eq!(
                month_bounds(Some(bad)).unwrap_err().exit,
                Exit::Usage,
                "{bad}"
            );
        }
    }

    #[test]
    fn money_is_exact() {
        assert_eq!(money(0), "0.00");
        assert_eq!(money(1_500_000), "1.50");
        assert_eq!(money(1_234_567), "1.234567");
        assert_eq!(money(-20_000), "-0.02");
    }
}
