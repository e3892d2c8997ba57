//! proto ⇄ domain conversion. Every proto field is checked here (parse at the edge): what
//! passes becomes a domain type that cannot hold an invalid value, and what does not becomes
//! INVALID_ARGUMENT naming the field.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::domain::UploadId;
use crate::domain::artifact::parse_mode;
use crate::domain::metering::LineItem;
use crate::domain::{
    Artifact, ArtifactPath, Error, Job, JobStatus, OveragePolicy, Plan, ProjectRecord,
    RetentionPolicy, RetentionRule, Scope, ScopeKind, ScopedPath, Sha256, Timestamp, UsageControls,
};
use crate::pb::v1 as pb;
use crate::service::artifacts::ResumeSpec;
use crate::service::retention::RequestRules;
use crate::service::{Bill, PushSpec};

/// Longest idempotency key accepted, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;

pub fn scope(field: &str, scope: Option<&pb::Scope>) -> Result<Scope, Error> {
    let scope = scope.ok_or_else(|| Error::invalid(field, "is required"))?;
    let kind = match pb::ScopeKind::try_from(scope.kind) {
        Ok(pb::ScopeKind::Job) => ScopeKind::Job,
        Ok(pb::ScopeKind::Workflow) => ScopeKind::Workflow,
        Ok(pb::ScopeKind::Project) => ScopeKind::Project,
        Ok(pb::ScopeKind::Unspecified) => {
            return Err(Error::invalid(
                format!("{field}.kind"),
                "must be JOB, WORKFLOW or PROJECT",
            ));
        }
        Err(_) => {
            return Err(Error::invalid(
                format!("{field}.kind"),
                format!(
                    "unknown value {}; must be JOB, WORKFLOW or PROJECT",
                    scope.kind
                ),
            ));
        }
    };
    Scope::parse(field, &scope.project_id, kind, &scope.id)
}

pub fn scoped_path(
    prefix: &str,
    scope_msg: Option<&pb::Scope>,
    path: &str,
) -> Result<ScopedPath, Error> {
    Ok(ScopedPath {
        scope: scope(&field(prefix, "scope"), scope_msg)?,
        path: ArtifactPath::parse(&field(prefix, "path"), path)?,
    })
}

fn field(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}.{name}")
    }
}

pub fn push_spec(header: pb::PushHeader) -> Result<PushSpec, Error> {
    let target = scoped_path("header", header.scope.as_ref(), &header.path)?;
    let mode = parse_mode("header.mode", header.mode)?;
    if let Some(size) = header.expected_size
        && size < 0
    {
        return Err(Error::invalid(
            "header.expected_size",
            "must not be negative",
        ));
    }
    let expected_sha256 = match header.expected_sha256.as_str() {
        "" => None,
        hex => Some(Sha256::parse("header.expected_sha256", hex)?),
    };
    let expire_in_micros = header
        .expire_in
        .map(|d| duration_micros("header.expire_in", d))
        .transpose()?;
    let idempotency_key = match header.idempotency_key.as_str() {
        "" => None,
        key if key.len() > MAX_IDEMPOTENCY_KEY_BYTES => {
            return Err(Error::invalid(
                "header.idempotency_key",
                format!("longer than {MAX_IDEMPOTENCY_KEY_BYTES} bytes"),
            ));
        }
        key if key.chars().any(char::is_control) => {
            return Err(Error::invalid(
                "header.idempotency_key",
                "contains control characters",
            ));
        }
        key => Some(key.to_owned()),
    };
    if header.write_offset < 0 {
        return Err(Error::invalid(
            "header.write_offset",
            "must not be negative",
        ));
    }
    let resume = match header.upload_id.as_str() {
        "" if header.write_offset != 0 => {
            return Err(Error::invalid(
                "header.write_offset",
                "only a resumable push (one with header.upload_id) starts past 0",
            ));
        }
        "" => None,
        id => Some(ResumeSpec {
            upload_id: UploadId::parse("header.upload_id", id)?,
            write_offset: header.write_offset,
        }),
    };
    Ok(PushSpec {
        target,
        mode,
        force: header.force,
        expected_size: header.expected_size,
        expected_sha256,
        expire_in_micros,
        idempotency_key,
        resume,
    })
}

fn duration_micros(field: &str, d: prost_types::Duration) -> Result<i64, Error> {
    if d.seconds < 0 || d.nanos < 0 || (d.seconds == 0 && d.nanos == 0) {
        return Err(Error::invalid(field, "must be positive"));
    }
    if d.nanos >= 1_000_000_000 {
        return Err(Error::invalid(field, "nanos must be below 1e9"));
    }
    d.seconds
        .checked_mul(1_000_000)
        .and_then(|us| us.checked_add(i64::from(d.nanos / 1_000)))
        .ok_or_else(|| Error::invalid(field, "is too long"))
}

pub fn timestamp(t: Timestamp) -> prost_types::Timestamp {
    let (seconds, nanos) = t.to_seconds_nanos();
    prost_types::Timestamp { seconds, nanos }
}

pub fn scope_kind(kind: ScopeKind) -> pb::ScopeKind {
    match kind {
        ScopeKind::Job => pb::ScopeKind::Job,
        ScopeKind::Workflow => pb::ScopeKind::Workflow,
        ScopeKind::Project => pb::ScopeKind::Project,
    }
}

pub fn scope_message(scope: &Scope) -> pb::Scope {
    pb::Scope {
        project_id: scope.project().as_str().to_owned(),
        kind: scope_kind(scope.kind()) as i32,
        id: scope.id().to_owned(),
    }
}

pub fn artifact(a: &Artifact) -> pb::Artifact {
    pb::Artifact {
        scope: Some(scope_message(&a.scope)),
        path: a.path.as_str().to_owned(),
        size: a.size,
        sha256: a.sha256.as_str().to_owned(),
        mode: a.mode,
        created_at: Some(timestamp(a.created_at)),
        expires_at: a.expires_at.map(timestamp),
        keep: a.keep,
        kept_latest: a.kept_latest,
    }
}

pub fn required_timestamp(
    field: &str,
    t: Option<prost_types::Timestamp>,
) -> Result<Timestamp, Error> {
    let t = t.ok_or_else(|| Error::invalid(field, "is required"))?;
    Timestamp::from_request(field, t.seconds, t.nanos)
}

/// An i128 figure for an int64 field; figures that large (8 EiB) do not occur in practice.
pub fn saturate(value: i128) -> i64 {
    i64::try_from(value).unwrap_or(if value < 0 { i64::MIN } else { i64::MAX })
}

pub fn plan(p: &Plan) -> pb::Plan {
    pb::Plan {
        id: p.id.clone(),
        version: p.version,
        name: p.name.clone(),
        currency: p.currency.clone(),
        included_storage_gib_months: p.included_storage_gib_months,
        included_egress_gib: p.included_egress_gib,
        storage_price_micros: p.storage_price_micros,
        egress_price_micros: p.egress_price_micros,
        ingress_price_micros: p.ingress_price_micros,
        storage_limit_bytes: p.storage_limit_bytes,
        max_artifact_bytes: p.max_artifact_bytes,
        max_retention_days: p.max_retention_days,
        overage_policy: match p.overage_policy {
            OveragePolicy::Block => pb::OveragePolicy::Block,
            OveragePolicy::Bill => pb::OveragePolicy::Bill,
        } as i32,
    }
}

pub fn plan_from_proto(p: Option<pb::Plan>) -> Result<Plan, Error> {
    let p = p.ok_or_else(|| Error::invalid("plan", "is required"))?;
    let overage_policy = match pb::OveragePolicy::try_from(p.overage_policy) {
        Ok(pb::OveragePolicy::Block) => OveragePolicy::Block,
        Ok(pb::OveragePolicy::Bill) => OveragePolicy::Bill,
        _ => {
            return Err(Error::invalid(
                "plan.overage_policy",
                "must be BLOCK or BILL",
            ));
        }
    };
    Ok(Plan {
        id: p.id,
        // Assigned by the store: a new plan is version 1, an update the next version.
        version: 0,
        name: p.name,
        currency: p.currency,
        included_storage_gib_months: p.included_storage_gib_months,
        included_egress_gib: p.included_egress_gib,
        storage_price_micros: p.storage_price_micros,
        egress_price_micros: p.egress_price_micros,
        ingress_price_micros: p.ingress_price_micros,
        storage_limit_bytes: p.storage_limit_bytes,
        max_artifact_bytes: p.max_artifact_bytes,
        max_retention_days: p.max_retention_days,
        overage_policy,
    })
}

pub fn controls(c: &UsageControls) -> pb::UsageControls {
    pb::UsageControls {
        retention_job_days: c.retention_job_days,
        retention_workflow_days: c.retention_workflow_days,
        retention_project_days: c.retention_project_days,
        spend_cap_micros: c.spend_cap_micros,
        storage_cap_bytes: c.storage_cap_bytes,
        alert_thresholds: c.alert_thresholds.clone(),
        keep_latest_per_ref: Some(c.keeps_latest_per_ref()),
    }
}

pub fn controls_from_proto(c: pb::UsageControls) -> UsageControls {
    UsageControls {
        retention_job_days: c.retention_job_days,
        retention_workflow_days: c.retention_workflow_days,
        retention_project_days: c.retention_project_days,
        spend_cap_micros: c.spend_cap_micros,
        storage_cap_bytes: c.storage_cap_bytes,
        alert_thresholds: c.alert_thresholds,
        keep_latest_per_ref: c.keep_latest_per_ref,
    }
}

/// A request's retention rules per scope kind, with each `max_age` in microseconds (the
/// service checks them against the plan). Durations that are not positive are
/// INVALID_ARGUMENT naming the rule, e.g. `policy.job_rules[2].max_age`.
pub fn retention_rules_from_proto(policy: pb::RetentionPolicy) -> Result<RequestRules, Error> {
    let kind = |kind: ScopeKind, rules: Vec<pb::RetentionRule>| {
        let rules = rules
            .into_iter()
            .enumerate()
            .map(|(i, rule)| {
                let field = format!("policy.{}_rules[{i}].max_age", kind.as_str());
                let age = rule
                    .max_age
                    .map(|d| duration_micros(&field, d))
                    .transpose()?;
                Ok((rule.selector, age))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok::<_, Error>((kind, rules))
    };
    Ok([
        kind(ScopeKind::Job, policy.job_rules)?,
        kind(ScopeKind::Workflow, policy.workflow_rules)?,
        kind(ScopeKind::Project, policy.project_rules)?,
    ])
}

pub fn retention_rule(rule: &RetentionRule) -> pb::RetentionRule {
    pb::RetentionRule {
        selector: rule.selector.clone(),
        max_age: Some(prost_types::Duration {
            seconds: rule.max_age_micros.div_euclid(1_000_000),
            nanos: (rule.max_age_micros.rem_euclid(1_000_000) * 1_000) as i32,
        }),
    }
}

pub fn retention_policy(policy: &RetentionPolicy) -> pb::RetentionPolicy {
    let rules = |kind| policy.rules(kind).iter().map(retention_rule).collect();
    pb::RetentionPolicy {
        job_rules: rules(ScopeKind::Job),
        workflow_rules: rules(ScopeKind::Workflow),
        project_rules: rules(ScopeKind::Project),
    }
}

pub fn project(r: &ProjectRecord) -> pb::Project {
    pb::Project {
        project_id: r.project_id.to_string(),
        plan: Some(plan(&r.plan)),
        controls: Some(controls(&r.controls)),
        created_at: Some(timestamp(r.created_at)),
    }
}

fn line_item(l: &LineItem) -> pb::LineItem {
    pb::LineItem {
        meter: l.meter.as_str().to_owned(),
        unit: l.meter.unit().to_owned(),
        usage: l.usage.to_decimal(),
        included: l.included.to_decimal(),
        billable: l.billable.to_decimal(),
        unit_price_micros: l.unit_price_micros,
        amount_micros: saturate(l.amount_micros),
        plan_id: l.plan_id.clone(),
        plan_version: l.plan_version,
        service_start: Some(timestamp(l.period_start)),
        service_end: Some(timestamp(l.period_end)),
        correction_for_month: l.correction_for.map(|m| m.to_string()).unwrap_or_default(),
    }
}

pub fn bill(b: &Bill) -> pb::Bill {
    pb::Bill {
        project_id: b.project_id.to_string(),
        plan_id: b.plan.id.clone(),
        currency: b.plan.currency.clone(),
        month: b.month.to_string(),
        period_start: Some(timestamp(b.month.start())),
        period_end: Some(timestamp(b.month.end())),
        line_items: b.lines.iter().map(line_item).collect(),
        total_micros: saturate(b.total_micros),
        closed: b.closed,
        projected_line_items: b
            .projected
            .as_ref()
            .map(|(lines, _)| lines.iter().map(line_item).collect())
            .unwrap_or_default(),
        projected_total_micros: b.projected.as_ref().map(|(_, total)| saturate(*total)),
        plan_version: b.plan.version,
        finalized_at: b.finalized_at.map(timestamp),
    }
}

/// List page tokens are the last path of the previous page, base64url-encoded. Opaque to
/// clients; decoding checks they belong to the listing they are used with.
pub fn encode_page_token(after: &str) -> String {
    URL_SAFE_NO_PAD.encode(after.as_bytes())
}

pub fn decode_page_token(token: &str, prefix: &str) -> Result<Option<String>, Error> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || Error::invalid("page_token", "is not a token this listing returned");
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let after = String::from_utf8(bytes).map_err(|_| bad())?;
    if !after.starts_with(prefix) {
        return Err(bad());
    }
    Ok(Some(after))
}

pub fn job(j: &Job) -> pb::Job {
    let status = match j.status {
        JobStatus::Running => pb::JobStatus::Running,
        JobStatus::Passed => pb::JobStatus::Passed,
        JobStatus::Failed => pb::JobStatus::Failed,
        JobStatus::Canceled => pb::JobStatus::Canceled,
    };
    pb::Job {
        project_id: j.project.as_str().to_owned(),
        workflow_id: j.workflow_id.clone(),
        job_id: j.job_id.clone(),
        job_name: j.name.as_str().to_owned(),
        r#ref: j.git_ref.as_str().to_owned(),
        status: status as i32,
        registered_at: Some(timestamp(j.registered_at)),
        finished_at: j.finished_at.map(timestamp),
        latest: j.latest,
    }
}

/// A FinishJob status: PASSED, FAILED or CANCELED.
pub fn finished_status(value: i32) -> Result<JobStatus, Error> {
    match pb::JobStatus::try_from(value) {
        Ok(pb::JobStatus::Passed) => Ok(JobStatus::Passed),
        Ok(pb::JobStatus::Failed) => Ok(JobStatus::Failed),
        Ok(pb::JobStatus::Canceled) => Ok(JobStatus::Canceled),
        _ => Err(Error::invalid(
            "status",
            format!("{value} is not an end; must be PASSED, FAILED or CANCELED"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_are_checked() {
        let token = encode_page_token("logs/a b.txt");
        assert_eq!(
            decode_page_token(&token, "logs/").ok().flatten().as_deref(),
            Some("logs/a b.txt")
        );
        assert!(decode_page_token(&token, "other/").is_err());
        assert!(decode_page_token("!!!", "").is_err());
        assert!(matches!(decode_page_token("", "x"), Ok(None)));
    }

    #[test]
    fn durations_must_be_positive() {
        let d = |seconds, nanos| prost_types::Duration { seconds, nanos };
        assert_eq!(duration_micros("f", d(2, 500_000)).ok(), Some(2_000_500));
        assert!(duration_micros("f", d(0, 0)).is_err());
        assert!(duration_micros("f", d(-1, 0)).is_err());
        assert!(duration_micros("f", d(i64::MAX, 0)).is_err());
    }
}
