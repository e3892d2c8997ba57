//! `PlanService`, `UsageService` and `UsageControlService`: thin adapters over
//! [`Accounts`] and [`Metering`].

use tonic::{Request, Response, Status};

use super::convert::{self, timestamp};
use crate::auth::Authenticator;
use crate::domain::metering::{
    Month, ProjectsCursor, ProjectsSort, Quantity, format_day, parse_day,
};
use crate::domain::{Access, Error, ProjectId, authorize};
use crate::pb::v1::{
    self as pb, plan_service_server, usage_control_service_server, usage_service_server,
};
use crate::service::{Accounts, ControlsMask, Metering};

#[derive(Debug, Clone)]
pub struct BillingApi {
    accounts: Accounts,
    metering: Metering,
    auth: Authenticator,
}

impl BillingApi {
    pub fn new(accounts: Accounts, metering: Metering, auth: Authenticator) -> Self {
        Self {
            accounts,
            metering,
            auth,
        }
    }

    /// Authenticates the request and checks `access` before anything is looked up.
    fn allow<T>(&self, request: &Request<T>, access: Access<'_>) -> Result<(), Status> {
        let principal = self.auth.authenticate_grpc(request.metadata())?;
        Ok(authorize(&principal, access)?)
    }

    /// Authenticates, then parses the request's project id, then authorizes: an
    /// unauthenticated request is UNAUTHENTICATED whatever its fields hold.
    fn allow_project<T>(
        &self,
        request: &Request<T>,
        project_id: &str,
        access: impl for<'a> Fn(&'a ProjectId) -> Access<'a>,
    ) -> Result<ProjectId, Status> {
        let principal = self.auth.authenticate_grpc(request.metadata())?;
        let project = ProjectId::parse("project_id", project_id)?;
        authorize(&principal, access(&project))?;
        Ok(project)
    }
}

fn project_id(value: &str) -> Result<ProjectId, Status> {
    Ok(ProjectId::parse("project_id", value)?)
}

/// ListProjectsUsage page tokens: the last row's `total:project`, base64url. Opaque to
/// clients; a token that does not decode is INVALID_ARGUMENT.
pub(crate) fn encode_usage_token(total: i64, project: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{total}:{project}"))
}

pub(crate) fn decode_usage_token(token: &str) -> Result<(i64, String), Status> {
    use base64::Engine;
    let bad = || Error::invalid("page_token", "is not a token this listing returned");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (total, project) = text.split_once(':').ok_or_else(bad)?;
    Ok((total.parse().map_err(|_| bad())?, project.to_owned()))
}

fn month(value: &str) -> Result<Month, Status> {
    Ok(Month::parse("month", value)?)
}

#[tonic::async_trait]
impl plan_service_server::PlanService for BillingApi {
    async fn create_plan(
        &self,
        request: Request<pb::CreatePlanRequest>,
    ) -> Result<Response<pb::Plan>, Status> {
        self.allow(&request, Access::Administer)?;
        let plan = convert::plan_from_proto(request.into_inner().plan)?;
        let plan = self.accounts.create_plan(plan).await?;
        Ok(Response::new(convert::plan(&plan)))
    }

    async fn update_plan(
        &self,
        request: Request<pb::UpdatePlanRequest>,
    ) -> Result<Response<pb::Plan>, Status> {
        self.allow(&request, Access::Administer)?;
        let plan = convert::plan_from_proto(request.into_inner().plan)?;
        let plan = self.accounts.update_plan(plan).await?;
        Ok(Response::new(convert::plan(&plan)))
    }

    async fn get_plan(
        &self,
        request: Request<pb::GetPlanRequest>,
    ) -> Result<Response<pb::Plan>, Status> {
        self.allow(&request, Access::Administer)?;
        let plan = self
            .accounts
            .get_plan(&request.into_inner().plan_id)
            .await?;
        Ok(Response::new(convert::plan(&plan)))
    }

    async fn list_plans(
        &self,
        request: Request<pb::ListPlansRequest>,
    ) -> Result<Response<pb::ListPlansResponse>, Status> {
        self.allow(&request, Access::Administer)?;
        let plans = self.accounts.list_plans().await?;
        Ok(Response::new(pb::ListPlansResponse {
            plans: plans.iter().map(convert::plan).collect(),
        }))
    }

    async fn assign_plan(
        &self,
        request: Request<pb::AssignPlanRequest>,
    ) -> Result<Response<pb::Project>, Status> {
        self.allow(&request, Access::Administer)?;
        let request = request.into_inner();
        let project = project_id(&request.project_id)?;
        if request.plan_id.is_empty() {
            return Err(Error::invalid("plan_id", "must not be empty").into());
        }
        let record = self
            .accounts
            .assign_plan(&project, &request.plan_id)
            .await?;
        Ok(Response::new(convert::project(&record)))
    }

    async fn list_project_plan_history(
        &self,
        request: Request<pb::ListProjectPlanHistoryRequest>,
    ) -> Result<Response<pb::ListProjectPlanHistoryResponse>, Status> {
        let project = self.allow_project(&request, &request.get_ref().project_id, |p| {
            Access::ReadUsage(p)
        })?;
        let history = self.accounts.plan_history(&project).await?;
        Ok(Response::new(pb::ListProjectPlanHistoryResponse {
            periods: history
                .iter()
                .map(|(plan, from, to)| pb::PlanPeriod {
                    plan: Some(convert::plan(plan)),
                    from: Some(timestamp(*from)),
                    to: to.map(timestamp),
                })
                .collect(),
        }))
    }

    async fn get_project(
        &self,
        request: Request<pb::GetProjectRequest>,
    ) -> Result<Response<pb::Project>, Status> {
        let project = self.allow_project(&request, &request.get_ref().project_id, |p| {
            Access::ReadUsage(p)
        })?;
        let record = self.accounts.get_project(&project).await?;
        Ok(Response::new(convert::project(&record)))
    }
}

#[tonic::async_trait]
impl usage_control_service_server::UsageControlService for BillingApi {
    async fn get_usage_controls(
        &self,
        request: Request<pb::GetUsageControlsRequest>,
    ) -> Result<Response<pb::UsageControls>, Status> {
        let project = self.allow_project(&request, &request.get_ref().project_id, |p| {
            Access::ReadControls(p)
        })?;
        let controls = self.accounts.controls(&project).await?;
        Ok(Response::new(convert::controls(&controls)))
    }

    async fn update_usage_controls(
        &self,
        request: Request<pb::UpdateUsageControlsRequest>,
    ) -> Result<Response<pb::UsageControls>, Status> {
        let project = self.allow_project(&request, &request.get_ref().project_id, |p| {
            Access::WriteControls(p)
        })?;
        let request = request.into_inner();
        let update = convert::controls_from_proto(request.controls.unwrap_or_default());
        let paths = request.update_mask.map(|m| m.paths).unwrap_or_default();
        let mask = if paths.is_empty() {
            ControlsMask::present(&update)
        } else {
            ControlsMask::parse(&paths)?
        };
        let controls = self
            .accounts
            .update_controls(&project, update, mask, request.apply_to_existing)
            .await?;
        Ok(Response::new(convert::controls(&controls)))
    }

    async fn get_retention_policy(
        &self,
        request: Request<pb::GetRetentionPolicyRequest>,
    ) -> Result<Response<pb::RetentionPolicy>, Status> {
        let project = self.allow_project(&request, &request.get_ref().project_id, |p| {
            Access::ReadControls(p)
        })?;
        let policy = self.accounts.retention().policy(&project).await?;
        Ok(Response::new(convert::retention_policy(&policy)))
    }

    async fn set_retention_policy(
        &self,
        request: Request<pb::SetRetentionPolicyRequest>,
    ) -> Result<Response<pb::SetRetentionPolicyResponse>, Status> {
        let project = self.allow_project(&request, &request.get_ref().project_id, |p| {
            Access::WriteControls(p)
        })?;
        let request = request.into_inner();
        let rules = convert::retention_rules_from_proto(request.policy.unwrap_or_default())?;
        let (policy, updated) = self
            .accounts
            .retention()
            .set_policy(&project, rules, request.apply_to_existing)
            .await?;
        Ok(Response::new(pb::SetRetentionPolicyResponse {
            policy: Some(convert::retention_policy(&policy)),
            updated_artifacts: updated as i64,
        }))
    }

    async fn dry_run_retention(
        &self,
        request: Request<pb::DryRunRetentionRequest>,
    ) -> Result<Response<pb::DryRunRetentionResponse>, Status> {
        let project = self.allow_project(&request, &request.get_ref().project_id, |p| {
            Access::ReadControls(p)
        })?;
        let rules = request
            .into_inner()
            .policy
            .map(convert::retention_rules_from_proto)
            .transpose()?;
        let (at, figures) = self.accounts.retention().dry_run(&project, rules).await?;
        Ok(Response::new(pb::DryRunRetentionResponse {
            at: Some(timestamp(at)),
            artifacts: figures.iter().map(|f| f.artifacts).sum(),
            bytes: figures.iter().map(|f| f.bytes).sum(),
            rules: figures
                .iter()
                .map(|f| pb::RuleDryRun {
                    scope_kind: convert::scope_kind(f.kind) as i32,
                    position: f.position as u32,
                    rule: Some(convert::retention_rule(&f.rule)),
                    artifacts: f.artifacts,
                    bytes: f.bytes,
                })
                .collect(),
        }))
    }

    async fn list_usage_alerts(
        &self,
        request: Request<pb::ListUsageAlertsRequest>,
    ) -> Result<Response<pb::ListUsageAlertsResponse>, Status> {
        let project = self.allow_project(&request, &request.get_ref().project_id, |p| {
            Access::ReadUsage(p)
        })?;
        let request = request.into_inner();
        let alerts = self
            .metering
            .alerts(&project, month(&request.month)?)
            .await?;
        Ok(Response::new(pb::ListUsageAlertsResponse {
            alerts: alerts
                .into_iter()
                .map(|a| pb::UsageAlert {
                    month: a.period,
                    meter: a.meter,
                    threshold_percent: a.threshold,
                    basis: a.basis,
                    figure: a.figure,
                    limit: a.limit,
                    crossed_at: Some(timestamp(a.crossed_at)),
                })
                .collect(),
        }))
    }
}

#[tonic::async_trait]
impl usage_service_server::UsageService for BillingApi {
    async fn get_usage(
        &self,
        request: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::Usage>, Status> {
        let project = self.allow_project(&request, &request.get_ref().project_id, |p| {
            Access::ReadUsage(p)
        })?;
        let request = request.into_inner();
        let start = convert::required_timestamp("start", request.start)?;
        let end = convert::required_timestamp("end", request.end)?;
        let usage = self.metering.usage(&project, start, end).await?;
        Ok(Response::new(pb::Usage {
            project_id: project.to_string(),
            start: Some(timestamp(start)),
            end: Some(timestamp(usage.end)),
            storage_byte_seconds: crate::domain::metering::byte_seconds(usage.storage_byte_micros),
            storage_gib_months: usage.storage_gib_months,
            egress_bytes: convert::saturate(usage.egress_bytes),
            ingress_bytes: convert::saturate(usage.ingress_bytes),
            stored_bytes: usage.stored_bytes,
            live_artifacts: usage.live_artifacts,
        }))
    }

    async fn get_bill(
        &self,
        request: Request<pb::GetBillRequest>,
    ) -> Result<Response<pb::Bill>, Status> {
        let project = self.allow_project(&request, &request.get_ref().project_id, |p| {
            Access::ReadUsage(p)
        })?;
        let request = request.into_inner();
        let bill = self.metering.bill(&project, month(&request.month)?).await?;
        Ok(Response::new(convert::bill(&bill)))
    }

    async fn list_daily_usage(
        &self,
        request: Request<pb::ListDailyUsageRequest>,
    ) -> Result<Response<pb::ListDailyUsageResponse>, Status> {
        let project = self.allow_project(&request, &request.get_ref().project_id, |p| {
            Access::ReadUsage(p)
        })?;
        let request = request.into_inner();
        let first = parse_day("start_day", &request.start_day)?;
        let last = parse_day("end_day", &request.end_day)?;
        let days = self.metering.daily(&project, first, last).await?;
        Ok(Response::new(pb::ListDailyUsageResponse {
            days: days
                .into_iter()
                .map(|d| pb::DailyUsage {
                    day: format_day(d.day),
                    storage_byte_seconds: crate::domain::metering::byte_seconds(
                        d.storage_byte_micros,
                    ),
                    stored_bytes: d.stored_bytes_at_end,
                    egress_bytes: d.egress_bytes,
                    ingress_bytes: d.ingress_bytes,
                })
                .collect(),
        }))
    }

    async fn list_projects_usage(
        &self,
        request: Request<pb::ListProjectsUsageRequest>,
    ) -> Result<Response<pb::ListProjectsUsageResponse>, Status> {
        self.allow(&request, Access::ReadAllUsage)?;
        let request = request.into_inner();
        let month = month(&request.month)?;
        let page_size = match request.page_size {
            n if n < 0 => return Err(Error::invalid("page_size", "must not be negative").into()),
            0 => 100,
            n => n.min(1000) as usize,
        };
        let after = match request.page_token.as_str() {
            "" => None,
            token => {
                let (total, project) = decode_usage_token(token)?;
                Some(ProjectsCursor {
                    value: Some(i128::from(total)),
                    project,
                })
            }
        };
        let rows = self
            .metering
            .projects_usage(month, ProjectsSort::default(), after, page_size as u64 + 1)
            .await?;
        let more = rows.len() > page_size;
        let rows = &rows[..rows.len().min(page_size)];
        let next_page_token = match rows.last() {
            Some(last) if more => encode_usage_token(last.total_micros, &last.project_id),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListProjectsUsageResponse {
            projects: rows
                .iter()
                .map(|row| pb::ProjectUsage {
                    project_id: row.project_id.clone(),
                    plan_id: row.plan_id.clone(),
                    currency: row.currency.clone(),
                    storage_gib_months: Quantity::gib_months(row.storage_byte_micros, month)
                        .to_decimal(),
                    egress_bytes: row.egress_bytes,
                    ingress_bytes: row.ingress_bytes,
                    total_micros: row.total_micros,
                })
                .collect(),
            next_page_token,
        }))
    }
}
