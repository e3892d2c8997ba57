//! `artifactd.v1.JobService`: a thin adapter over [`crate::service::Jobs`]. Authenticate,
//! then parse the project id, then authorize, then validate the rest.

use tonic::{Request, Response, Status};

use super::convert;
use crate::auth::Authenticator;
use crate::domain::job::parse_job_id;
use crate::domain::{Access, JobLabel, NewJob, ProjectId, authorize};
use crate::pb::v1::{self as pb, job_service_server};
use crate::service::Jobs;

#[derive(Debug, Clone)]
pub struct JobApi {
    jobs: Jobs,
    auth: Authenticator,
}

impl JobApi {
    pub fn new(jobs: Jobs, auth: Authenticator) -> Self {
        Self { jobs, auth }
    }

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

#[tonic::async_trait]
impl job_service_server::JobService for JobApi {
    async fn register_job(
        &self,
        request: Request<pb::RegisterJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let project = self.allow_project(&request, &request.get_ref().project_id, |p| {
            Access::ReportJobs(p)
        })?;
        let request = request.into_inner();
        let new = NewJob {
            project,
            workflow_id: parse_job_id("workflow_id", &request.workflow_id)?,
            job_id: parse_job_id("job_id", &request.job_id)?,
            name: JobLabel::parse("job_name", &request.job_name)?,
            git_ref: JobLabel::parse("ref", &request.r#ref)?,
        };
        let job = self.jobs.register(new).await?;
        Ok(Response::new(convert::job(&job)))
    }

    async fn finish_job(
        &self,
        request: Request<pb::FinishJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let project = self.allow_project(&request, &request.get_ref().project_id, |p| {
            Access::ReportJobs(p)
        })?;
        let request = request.into_inner();
        let job_id = parse_job_id("job_id", &request.job_id)?;
        let status = convert::finished_status(request.status)?;
        let job = self.jobs.finish(&project, &job_id, status).await?;
        Ok(Response::new(convert::job(&job)))
    }

    async fn get_latest_job(
        &self,
        request: Request<pb::GetLatestJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let project = self.allow_project(&request, &request.get_ref().project_id, |p| {
            Access::ReadLatestJobs(p)
        })?;
        let request = request.into_inner();
        let git_ref = JobLabel::parse("ref", &request.r#ref)?;
        let name = JobLabel::parse("job_name", &request.job_name)?;
        let job = self.jobs.latest(&project, &git_ref, &name).await?;
        Ok(Response::new(convert::job(&job)))
    }
}
