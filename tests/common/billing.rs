//! Helpers shared by the billing, metering and caps tests: calendar instants, the four
//! clients a billing test talks through, and putting a project on a new plan.

#![allow(dead_code, clippy::unwrap_used)]

use artifactd::domain::metering::Meter;
use artifactd::domain::metering::days_from_civil;
use artifactd::domain::{ArtifactPath, Clock, ProjectId, Scope, ScopeKind, Sha256, Timestamp};
use artifactd::pb::v1::{
    self as pb, artifact_service_client::ArtifactServiceClient,
    plan_service_client::PlanServiceClient,
    usage_control_service_client::UsageControlServiceClient,
    usage_service_client::UsageServiceClient,
};
use artifactd::store::{NewArtifact, PushedBlob};
use tonic::transport::Channel;

use super::{TestServer, sha256_hex};

/// `h` o'clock on `y`-`m`-`d`, UTC.
pub fn at(y: i32, m: u32, d: u32, h: i64) -> Timestamp {
    Timestamp::from_seconds(days_from_civil(y, m, d) * 86_400 + h * 3600)
}

pub fn ts(t: Timestamp) -> prost_types::Timestamp {
    let (seconds, nanos) = t.to_seconds_nanos();
    prost_types::Timestamp { seconds, nanos }
}

pub struct Clients {
    pub plans: PlanServiceClient<Channel>,
    pub usage: UsageServiceClient<Channel>,
    pub controls: UsageControlServiceClient<Channel>,
    pub artifacts: ArtifactServiceClient<Channel>,
}

impl Clients {
    pub fn on(channel: Channel) -> Self {
        Self {
            plans: PlanServiceClient::new(channel.clone()),
            usage: UsageServiceClient::new(channel.clone()),
            controls: UsageControlServiceClient::new(channel.clone()),
            artifacts: ArtifactServiceClient::new(channel),
        }
    }
}

pub async fn clients(server: &TestServer) -> Clients {
    Clients::on(server.channel().await)
}

pub async fn clients_at(addr: std::net::SocketAddr) -> Clients {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Clients::on(channel)
}

/// Creates `plan` and puts `project` on it.
pub async fn put_on_plan(c: &mut Clients, project: &str, plan: pb::Plan) {
    let plan_id = plan.id.clone();
    c.plans
        .create_plan(pb::CreatePlanRequest { plan: Some(plan) })
        .await
        .unwrap();
    c.plans
        .assign_plan(pb::AssignPlanRequest {
            project_id: project.into(),
            plan_id,
        })
        .await
        .unwrap();
}

/// Records an artifact of any logical size without streaming its bytes (the storage meter
/// only reads the artifact log), through the same store call a push commits with.
pub async fn record_artifact(
    server: &TestServer,
    project: &str,
    path: &str,
    size: i64,
    expires_at: Option<Timestamp>,
) {
    let new = NewArtifact {
        scope: Scope::parse("scope", project, ScopeKind::Job, "j").unwrap(),
        path: ArtifactPath::parse("path", path).unwrap(),
        size,
        sha256: Sha256::parse("sha", &sha256_hex(path.as_bytes())).unwrap(),
        mode: 0o644,
        created_at: server.clock.now(),
        expires_at,
        upload_id: uuid::Uuid::new_v4().simple().to_string(),
        record_ingress: false,
    };
    commit_recorded(server, &new).await;
}

/// Commits `new` as a push of stored content would: the push's lease on its blob (as Push
/// takes it before storing the bytes), then the commit.
pub async fn commit_recorded(server: &TestServer, new: &NewArtifact) {
    let epoch = server
        .app
        .store
        .lease_blob(&new.sha256, new.size, new.created_at)
        .await
        .unwrap();
    server
        .app
        .store
        .commit_push(
            new,
            false,
            None,
            &PushedBlob::Stored {
                deduplicated: false,
                epoch,
            },
        )
        .await
        .unwrap();
}

pub async fn egress(server: &TestServer, project: &str, bytes: i64, when: Timestamp) {
    server
        .app
        .store
        .record_usage(
            &uuid::Uuid::new_v4().to_string(),
            &ProjectId::parse("p", project).unwrap(),
            Meter::Egress,
            bytes,
            when,
        )
        .await
        .unwrap();
}

/// Records `bytes` of ingress at `when`, as a push's commit would.
pub async fn ingress(server: &TestServer, project: &str, bytes: i64, when: Timestamp) {
    server
        .app
        .store
        .record_usage(
            &uuid::Uuid::new_v4().to_string(),
            &ProjectId::parse("p", project).unwrap(),
            Meter::Ingress,
            bytes,
            when,
        )
        .await
        .unwrap();
}
