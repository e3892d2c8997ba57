//! Who may do what: roles, the principal a request acts as, and the one policy function
//! every RPC consults (after parsing its request, before any lookup, so a refusal never
//! reveals whether something exists).
//!
//! Open without a token: grpc.health.v1, reflection, and on the HTTP port `/healthz`,
//! `/readyz` and `/metrics` (aggregate figures only: no label names a project, job or path),
//! and the usage pages' sign-in form (`/ui/sign-in`, `/ui/sign-out`: the form checks the
//! token it is given) and stylesheet (`/ui/style.css`).
//!
//! The usage pages and the export (`api::web`) take the same token, as a bearer header or
//! the session cookie, and ask the same questions as the RPCs they are made of:
//! `GET /ui/projects/{P}` and `GET /api/v1/usage/export?project=P` are [`Access::ReadUsage`]
//! of P (an export without `project` is the token's own project, or
//! [`Access::ReadAllUsage`] for a token of no project or an admin); `GET /ui/` is
//! [`Access::ReadAllUsage`] (a token of one project is sent to its page).

use super::error::{Error, Result};
use super::scope::{ProjectId, Scope, ScopeKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A CI job: its own job, workflow and project scopes; delete only in its own job.
    Job,
    /// Everything on one project's artifacts, controls, usage and bills.
    Maintainer,
    /// Usage, bills and alerts of one project, or of all when the token names none.
    BillingReader,
    /// Everything.
    Admin,
}

impl Role {
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "job" => Some(Self::Job),
            "maintainer" => Some(Self::Maintainer),
            "billing_reader" => Some(Self::BillingReader),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Job => "job",
            Self::Maintainer => "maintainer",
            Self::BillingReader => "billing_reader",
            Self::Admin => "admin",
        }
    }
}

/// The identity a request acts as, from its verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub subject: String,
    pub role: Role,
    pub project: Option<ProjectId>,
    pub workflow: Option<String>,
    pub job: Option<String>,
}

impl Principal {
    /// Authentication turned off (`ARTIFACTD_AUTH=none`, local use): everything allowed.
    pub fn unauthenticated_admin() -> Self {
        Self {
            subject: "anonymous".into(),
            role: Role::Admin,
            project: None,
            workflow: None,
            job: None,
        }
    }
}

/// What a request wants to do.
#[derive(Debug, Clone, Copy)]
pub enum Access<'a> {
    /// Pull, Stat, List.
    ReadArtifacts(&'a Scope),
    /// Push, QueryUpload (whoever may push to a scope may ask how its resumable uploads stand).
    WriteArtifacts(&'a Scope),
    /// Delete.
    DeleteArtifacts(&'a Scope),
    /// Keep, Unkeep: pinning changes how long an artifact is stored and billed, so the same
    /// principals as Delete (a job only in its own job scope).
    KeepArtifacts(&'a Scope),
    /// GetUsage, GetBill, ListDailyUsage, ListUsageAlerts, GetProject, ListProjectPlanHistory;
    /// HTTP `GET /ui/projects/{project}` and the usage export of one project.
    ReadUsage(&'a ProjectId),
    /// Usage of every project (ListProjectsUsage; HTTP `GET /ui/` and the export of every
    /// project).
    ReadAllUsage,
    /// GetUsageControls.
    ReadControls(&'a ProjectId),
    /// UpdateUsageControls.
    WriteControls(&'a ProjectId),
    /// RegisterJob, FinishJob: what the CI control plane reports. Not job tokens: a job
    /// that could mark itself PASSED could make its artifacts "the latest on main" that
    /// release pipelines download, and pin them.
    ReportJobs(&'a ProjectId),
    /// GetLatestJob and the artifacts of the latest PASSED job of a (ref, job name)
    /// (archives and raw files by ref). Job tokens of the project may, as GitLab's
    /// CI_JOB_TOKEN may download a ref's latest successful artifacts: they are the
    /// published results of finished jobs. Billing readers may not (usage only).
    ReadLatestJobs(&'a ProjectId),
    /// Plans, plan assignment, token issuing.
    Administer,
}

/// Allows or refuses (PERMISSION_DENIED) an access.
pub fn authorize(principal: &Principal, access: Access<'_>) -> Result<()> {
    if let Some(project) = access.project() {
        // The request's RPC span (see `metrics`) names the project it acts on.
        tracing::Span::current().record("project", project.as_str());
    }
    if allowed(principal, access) {
        return Ok(());
    }
    Err(Error::PermissionDenied(format!(
        "a {} token{} may not {}",
        principal.role.as_str(),
        principal
            .project
            .as_ref()
            .map(|p| format!(" for project {p}"))
            .unwrap_or_default(),
        describe(access)
    )))
}

fn allowed(p: &Principal, access: Access<'_>) -> bool {
    let own_project = |project: &ProjectId| p.project.as_ref() == Some(project);
    match (p.role, access) {
        (Role::Admin, _) => true,
        (Role::Maintainer, Access::ReadArtifacts(s))
        | (Role::Maintainer, Access::WriteArtifacts(s))
        | (Role::Maintainer, Access::DeleteArtifacts(s))
        | (Role::Maintainer, Access::KeepArtifacts(s)) => own_project(s.project()),
        (Role::Maintainer, Access::ReadUsage(project))
        | (Role::Maintainer, Access::ReadControls(project))
        | (Role::Maintainer, Access::WriteControls(project))
        | (Role::Maintainer, Access::ReportJobs(project))
        | (Role::Maintainer, Access::ReadLatestJobs(project))
        | (Role::Job, Access::ReadLatestJobs(project)) => own_project(project),
        (Role::BillingReader, Access::ReadUsage(project)) => {
            p.project.is_none() || own_project(project)
        }
        (Role::BillingReader, Access::ReadAllUsage) => p.project.is_none(),
        (Role::Job, Access::ReadArtifacts(s)) | (Role::Job, Access::WriteArtifacts(s)) => {
            own_project(s.project()) && job_reaches(p, s)
        }
        (Role::Job, Access::DeleteArtifacts(s)) | (Role::Job, Access::KeepArtifacts(s)) => {
            own_project(s.project())
                && s.kind() == ScopeKind::Job
                && p.job.as_deref() == Some(s.id())
        }
        _ => false,
    }
}

/// A job token reaches its own job, its workflow and its project scope.
fn job_reaches(p: &Principal, scope: &Scope) -> bool {
    match scope.kind() {
        ScopeKind::Project => true,
        ScopeKind::Workflow => p.workflow.as_deref() == Some(scope.id()),
        ScopeKind::Job => p.job.as_deref() == Some(scope.id()),
    }
}

impl Access<'_> {
    /// The project this access is about, if one.
    pub fn project(&self) -> Option<&ProjectId> {
        match self {
            Access::ReadArtifacts(s)
            | Access::WriteArtifacts(s)
            | Access::DeleteArtifacts(s)
            | Access::KeepArtifacts(s) => Some(s.project()),
            Access::ReadUsage(p)
            | Access::ReadControls(p)
            | Access::WriteControls(p)
            | Access::ReportJobs(p)
            | Access::ReadLatestJobs(p) => Some(p),
            Access::ReadAllUsage | Access::Administer => None,
        }
    }
}

fn describe(access: Access<'_>) -> String {
    match access {
        Access::ReadArtifacts(s) => format!("read artifacts in {s}"),
        Access::WriteArtifacts(s) => format!("push artifacts to {s}"),
        Access::DeleteArtifacts(s) => format!("delete artifacts in {s}"),
        Access::KeepArtifacts(s) => format!("keep or unkeep artifacts in {s}"),
        Access::ReadUsage(p) => format!("read usage of project {p}"),
        Access::ReadAllUsage => "read every project's usage".into(),
        Access::ReadControls(p) => format!("read usage controls of project {p}"),
        Access::WriteControls(p) => format!("change usage controls of project {p}"),
        Access::ReportJobs(p) => format!("register or finish jobs of project {p}"),
        Access::ReadLatestJobs(p) => format!("read the latest jobs of project {p}"),
        Access::Administer => "administer plans and tokens".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project(id: &str) -> ProjectId {
        ProjectId::parse("p", id).unwrap()
    }

    fn job_token() -> Principal {
        Principal {
            subject: "ci".into(),
            role: Role::Job,
            project: Some(project("p")),
            workflow: Some("w1".into()),
            job: Some("j1".into()),
        }
    }

    #[test]
    fn job_tokens_reach_their_own_scopes_only() {
        let token = job_token();
        let scope = |kind, id: &str| Scope::parse("s", "p", kind, id).unwrap();
        for ok in [
            scope(ScopeKind::Job, "j1"),
            scope(ScopeKind::Workflow, "w1"),
            scope(ScopeKind::Project, ""),
        ] {
            assert!(
                authorize(&token, Access::WriteArtifacts(&ok)).is_ok(),
                "{ok}"
            );
        }
        for denied in [
            scope(ScopeKind::Job, "j2"),
            scope(ScopeKind::Workflow, "w2"),
        ] {
            assert!(
                authorize(&token, Access::ReadArtifacts(&denied)).is_err(),
                "{denied}"
            );
        }
        assert!(
            authorize(
                &token,
                Access::DeleteArtifacts(&scope(ScopeKind::Job, "j1"))
            )
            .is_ok()
        );
        let err = authorize(
            &token,
            Access::DeleteArtifacts(&scope(ScopeKind::Project, "")),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "a job token for project p may not delete artifacts in project p"
        );
        assert!(authorize(&token, Access::KeepArtifacts(&scope(ScopeKind::Job, "j1"))).is_ok());
        let err = authorize(
            &token,
            Access::KeepArtifacts(&scope(ScopeKind::Workflow, "w1")),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "a job token for project p may not keep or unkeep artifacts in workflow w1 of project p"
        );
        let other = Scope::parse("s", "q", ScopeKind::Job, "j1").unwrap();
        assert!(authorize(&token, Access::ReadArtifacts(&other)).is_err());
        assert!(authorize(&token, Access::ReadUsage(&project("p"))).is_err());
        // Jobs: a job token reads its project's latest jobs but reports none.
        assert!(authorize(&token, Access::ReadLatestJobs(&project("p"))).is_ok());
        assert!(authorize(&token, Access::ReadLatestJobs(&project("q"))).is_err());
        let err = authorize(&token, Access::ReportJobs(&project("p"))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "a job token for project p may not register or finish jobs of project p"
        );
    }
}
