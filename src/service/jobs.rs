//! RegisterJob, FinishJob and GetLatestJob: the control plane's view of jobs, and the pins
//! of `keep_latest_per_ref` that follow them (see `store::jobs`).

use std::sync::Arc;

use crate::domain::{Clock, Error, Job, JobLabel, JobStatus, NewJob, ProjectId, Scope, ScopeKind};
use crate::service::Metering;
use crate::store::Store;

#[derive(Debug, Clone)]
pub struct Jobs {
    store: Store,
    metering: Metering,
    clock: Arc<dyn Clock>,
}

impl Jobs {
    pub fn new(store: Store, metering: Metering, clock: Arc<dyn Clock>) -> Self {
        Self {
            store,
            metering,
            clock,
        }
    }

    pub async fn register(&self, new: NewJob) -> Result<Job, Error> {
        let job = self.store.register_job(&new, self.clock.now()).await?;
        tracing::info!(project = %job.project, job = %job.job_id, "job registered");
        Ok(job)
    }

    /// Records how a job ended; RUNNING is not an end.
    pub async fn finish(
        &self,
        project: &ProjectId,
        job_id: &str,
        status: JobStatus,
    ) -> Result<Job, Error> {
        if status == JobStatus::Running {
            return Err(Error::invalid(
                "status",
                "must be PASSED, FAILED or CANCELED",
            ));
        }
        let (job, change) = self
            .store
            .finish_job(project, job_id, status, self.clock.now())
            .await?;
        if change.pinned > 0 || change.released > 0 {
            // The projected month-end storage moved with the artifacts' ends.
            self.metering.forget(project).await;
        }
        tracing::info!(project = %project, job = job_id, status = status.as_str(), latest = job.latest, pinned = change.pinned, released = change.released, "job finished");
        Ok(job)
    }

    /// The scope of the latest PASSED job for (project, ref, name), whose artifacts archives
    /// and downloads by ref serve.
    pub async fn latest_scope(
        &self,
        project: &ProjectId,
        git_ref: &JobLabel,
        name: &JobLabel,
    ) -> Result<Scope, Error> {
        let job = self.latest(project, git_ref, name).await?;
        Scope::parse("job_id", project.as_str(), ScopeKind::Job, &job.job_id)
    }

    /// The latest PASSED job for (project, ref, name); NOT_FOUND when none has passed.
    pub async fn latest(
        &self,
        project: &ProjectId,
        git_ref: &JobLabel,
        name: &JobLabel,
    ) -> Result<Job, Error> {
        self.store
            .latest_job(project, git_ref, name)
            .await?
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "no PASSED job {:?} for ref {:?} in project {project}",
                    name.as_str(),
                    git_ref.as_str()
                ))
            })
    }
}
