//! Pure rules with no I/O: scopes, paths, ids, timestamps, and the clock every timestamp comes
//! from. Nothing here imports tonic, sea-orm or object_store.

pub mod access;
pub mod artifact;
pub mod clock;
pub mod digest;
pub mod error;
pub mod job;
pub mod metering;
pub mod plan;
pub mod retention;
pub mod scope;
pub mod upload;

pub use access::{Access, Principal, Role, authorize};
pub use artifact::{Artifact, Sha256};
pub use clock::{Clock, ManualClock, SystemClock, Timestamp};
pub use digest::Hasher;
pub use error::{Error, Result};
pub use job::{Job, JobLabel, JobStatus, NewJob};
pub use plan::{ControlsMask, OveragePolicy, Plan, ProjectRecord, UsageControls};
pub use retention::{RetentionPolicy, RetentionRule};
pub use scope::{ArtifactPath, ProjectId, Scope, ScopeKind, ScopedPath};
pub use upload::UploadId;
