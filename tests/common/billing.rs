//! Helpers shared by the billing, metering and caps tests: calendar instants, the four
//! clients a billing test talks through, and putting a project on a new plan.

#![allow(dead_code, clippy::unwrap_used)]

use artifactd::domain::Timestamp;
use artifactd::domain::metering::days_from_civil;
use artifactd::pb::v1::{
    self as pb, artifact_service_client::ArtifactServiceClient,
    plan_service_client::PlanServiceClient,
    usage_control_service_client::UsageControlServiceClient,
    usage_service_client::UsageServiceClient,
};
use tonic::transport::Channel;

use super::TestServer;

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
