//! artifactd: a gRPC service that stores CI build artifacts and meters, per project, the
//! storage and network they use.
//!
//! # Layout
//! - [`api`]: tonic adapters, proto ⇄ domain conversion ([`api::convert`]).
//! - [`error`]: the one place a domain error becomes a gRPC status.
//! - [`service`]: use cases (push, pull, list, …) over the stores and the clock.
//! - [`domain`]: pure rules — scopes, paths, digests, timestamps, the clock.
//! - [`store`]: sea-orm repositories over Postgres or SQLite (migrations live in the
//!   `migrations` crate).
//! - [`blob`]: content-addressed blobs and temporary uploads through `object_store`.
//! - [`metrics`]: the Prometheus registry behind `/metrics` and the per-RPC layer (counts,
//!   durations, bytes, a tracing span per call).
//! - [`server`]: wiring and ordered shutdown; [`config`]: flags and environment;
//!   [`cli`]: the binary's subcommands (serve, migrate, token issue).

pub mod api;
pub mod auth;
pub mod blob;
pub mod cli;
pub mod config;
pub mod coord;
pub mod domain;
pub mod error;
pub mod metrics;
pub mod process;
pub mod server;
pub mod service;
pub mod store;

/// Generated protobuf and gRPC code.
pub mod pb {
    #![allow(clippy::all, missing_docs)]

    pub mod v1 {
        tonic::include_proto!("artifactd.v1");
    }

    /// The bare stream `artifactd-bench` measures the service against.
    pub mod bench {
        tonic::include_proto!("artifactd.bench.v1");
    }

    /// Descriptors of `artifactd.v1`, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("artifactd_descriptor");
}
