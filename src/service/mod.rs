//! Use cases: each public method is one thing a client asks for, carried out over the store,
//! the blob store and the clock. No gRPC types come in or go out.

pub mod accounts;
pub mod archive;
pub mod artifacts;
pub mod jobs;
pub mod metering;
pub mod retention;
pub mod scrubber;
pub mod sweeper;
pub mod tokens;

pub use crate::domain::ControlsMask;
pub use accounts::Accounts;
pub use artifacts::{
    ArchiveDownload, ArchiveSpec, ArtifactService, ListPage, PullSpec, PullStream, PushOutcome,
    PushSpec,
};
pub use jobs::Jobs;
pub use metering::{Bill, DailyUsage, Metering, UsageRecord, UsageReport};
pub use retention::{PolicyExpired, PolicyExpiredPages, Retention, RuleFigures};
pub use scrubber::Scrubber;
pub use sweeper::Sweeper;
