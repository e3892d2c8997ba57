//! Jobs as the CI control plane reports them: registered with their workflow, name and git
//! ref, finished once with a status. They answer GitLab's "artifacts of the latest
//! successful job for this ref" and drive "keep the latest artifacts per ref".
//!
//! **Latest** for (project, ref, job name) is the PASSED job that finished last; jobs that
//! finished at the same instant are ordered by registration, the later one winning. A job
//! that passes but finished before the current latest (a clock moved back) does not
//! displace it.

use super::clock::Timestamp;
use super::error::{Error, Result};
use super::scope::{ProjectId, is_format_character, validate_id};

/// Longest git ref or job name accepted, in bytes (git itself has no limit; GitLab caps
/// job names at 255 characters).
pub const MAX_NAME_BYTES: usize = 255;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    Running,
    Passed,
    Failed,
    Canceled,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Passed => "passed",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
        }
    }

    pub fn from_db(value: &str) -> Option<Self> {
        match value {
            "running" => Some(Self::Running),
            "passed" => Some(Self::Passed),
            "failed" => Some(Self::Failed),
            "canceled" => Some(Self::Canceled),
            _ => None,
        }
    }
}

/// A git ref (`main`, `feature/login`, `v1.2.0`) or a job name (`test: unit 1/2`): shown to
/// people and used in URLs, so 1–255 bytes with no control or invisible format characters.
/// Slashes, spaces and colons are fine (GitLab job names and refs use them).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JobLabel(String);

impl JobLabel {
    pub fn parse(field: &str, value: &str) -> Result<Self> {
        if value.is_empty() {
            return Err(Error::invalid(field, "must not be empty"));
        }
        if value.len() > MAX_NAME_BYTES {
            return Err(Error::invalid(
                field,
                format!(
                    "is {} bytes, longer than the {MAX_NAME_BYTES}-byte limit",
                    value.len()
                ),
            ));
        }
        if let Some(bad) = value.chars().find(|&c| c.is_control()) {
            return Err(Error::invalid(
                field,
                format!("contains the control character {bad:?}"),
            ));
        }
        if let Some(bad) = value.chars().find(|&c| is_format_character(c)) {
            return Err(Error::invalid(
                field,
                format!(
                    "contains the invisible format character U+{:04X}, which would make it \
                     display as something else",
                    bad as u32
                ),
            ));
        }
        if value.trim() != value {
            return Err(Error::invalid(
                field,
                "must not start or end with white space",
            ));
        }
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for JobLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A job id, validated like every other id (`[A-Za-z0-9._-]`, 1–128 bytes).
pub fn parse_job_id(field: &str, value: &str) -> Result<String> {
    validate_id(field, value)?;
    Ok(value.to_owned())
}

/// What the control plane says when a job starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJob {
    pub project: ProjectId,
    pub workflow_id: String,
    pub job_id: String,
    pub name: JobLabel,
    pub git_ref: JobLabel,
}

/// A registered job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub project: ProjectId,
    pub workflow_id: String,
    pub job_id: String,
    pub name: JobLabel,
    pub git_ref: JobLabel,
    pub status: JobStatus,
    pub registered_at: Timestamp,
    pub finished_at: Option<Timestamp>,
    /// The latest PASSED job of its (ref, name) right now.
    pub latest: bool,
}

impl Job {
    /// Whether a re-registration describes this same job.
    pub fn same_as(&self, new: &NewJob) -> bool {
        self.workflow_id == new.workflow_id && self.name == new.name && self.git_ref == new.git_ref
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_allow_refs_and_gitlab_job_names() {
        for ok in [
            "main",
            "feature/login",
            "refs/tags/v1.2.0",
            "test: unit 1/2",
            "é",
        ] {
            assert!(JobLabel::parse("ref", ok).is_ok(), "{ok}");
        }
        for bad in ["", " main", "main ", "a\nb", "a\u{202e}b", &"x".repeat(256)] {
            assert!(JobLabel::parse("ref", bad).is_err(), "{bad:?}");
        }
        let err = JobLabel::parse("ref", "a\tb").unwrap_err();
        assert_eq!(err.to_string(), "ref: contains the control character '\\t'");
    }
}
