#![allow(clippy::unwrap_used)]
//! Billing a finance team signs off, end to end over the real server: plan history and
//! proration, invoices frozen once their month is over (byte-identical after plan, price and
//! retention changes and a restart), late records billed as corrections, retention that never
//! rewrites the past, usage that stops at now, reads that never create projects, and a
//! database migrated from the previous schema billing exactly as before. Every figure is
//! computed by hand in the test.

mod common;

use std::sync::Arc;

use artifactd::domain::Timestamp;
use artifactd::domain::{Clock, ManualClock, ProjectId, Scope, ScopeKind};
use artifactd::pb::v1 as pb;
use artifactd::server::{self, App};
use common::billing::*;
use common::*;
use prost::Message;
use sea_orm::{ConnectionTrait, Database};
use tonic::Code;

on_both_backends!(
    a_mid_month_plan_change_is_prorated_and_the_closed_month_never_moves,
    a_plan_update_mid_month_bills_each_version,
    late_records_are_billed_as_corrections_on_the_open_month,
    a_retention_change_never_rebills_the_past,
    usage_stops_at_now,
    plans_bound_retention_after_a_downgrade,
    reads_never_create_projects,
    concurrent_control_updates_both_survive,
    a_database_from_the_previous_schema_bills_the_same,
    an_old_month_is_finalized_when_listed,
);

const GIB: i64 = 1 << 30;
const DAY: i64 = 86_400;

/// BILL plan: `storage` / `egress` micro-units per GiB-month / GiB, `included` of each.
fn plan(id: &str, included: i64, storage: i64, egress: i64) -> pb::Plan {
    pb::Plan {
        id: id.into(),
        name: format!("Plan {id}"),
        currency: "USD".into(),
        included_storage_gib_months: included,
        included_egress_gib: included,
        storage_price_micros: storage,
        egress_price_micros: egress,
        ingress_price_micros: 0,
        storage_limit_bytes: None,
        max_artifact_bytes: 100 * GIB,
        max_retention_days: 365,
        overage_policy: pb::OveragePolicy::Bill as i32,
        version: 0,
    }
}

async fn create(c: &mut Clients, plan: pb::Plan) {
    c.plans
        .create_plan(pb::CreatePlanRequest { plan: Some(plan) })
        .await
        .unwrap();
}

async fn assign(c: &mut Clients, project: &str, plan_id: &str) {
    c.plans
        .assign_plan(pb::AssignPlanRequest {
            project_id: project.into(),
            plan_id: plan_id.into(),
        })
        .await
        .unwrap();
}

async fn bill(c: &mut Clients, project: &str, month: &str) -> pb::Bill {
    c.usage
        .get_bill(pb::GetBillRequest {
            project_id: project.into(),
            month: month.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// (meter, plan, version, usage, included, amount) of each line.
fn lines(b: &pb::Bill) -> Vec<(String, String, i32, String, String, i64)> {
    b.line_items
        .iter()
        .map(|l| {
            (
                l.meter.clone(),
                l.plan_id.clone(),
                l.plan_version,
                l.usage.clone(),
                l.included.clone(),
                l.amount_micros,
            )
        })
        .collect()
}

fn line(
    meter: &str,
    plan: &str,
    version: i32,
    usage: &str,
    included: &str,
    amount: i64,
) -> (String, String, i32, String, String, i64) {
    (
        meter.into(),
        plan.into(),
        version,
        usage.into(),
        included.into(),
        amount,
    )
}

/// A second server process's worth: a new App on the same database and blob directory
/// (a restart, or another replica), with its own clock set to `now`.
struct Replica {
    addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

async fn replica(server: &TestServer, now: Timestamp) -> Replica {
    let clock = ManualClock::new(now);
    let app = App::build(&server.config, Arc::new(clock)).await.unwrap();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = grpc.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        server::serve(app, grpc, http, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    Replica { addr, stop, task }
}

impl Replica {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
    }
}

async fn a_mid_month_plan_change_is_prorated_and_the_closed_month_never_moves(backend: Backend) {
    let Some(server) = TestServer::start_with(backend, |_| {}).await else {
        return;
    };
    let mut c = clients_at(server.grpc_addr).await;
    create(&mut c, plan("a", 1, 1_000_000, 1_000_000)).await;
    create(&mut c, plan("b", 2, 3_000_000, 1_000_000)).await;
    assign(&mut c, "pro", "a").await;
    // 2 GiB stored all November (30 days); 1 GiB sent on the 10th; plan b from the 16th.
    server.clock.set(at(2026, 11, 1, 0));
    record_artifact(&server, "pro", "big.bin", 2 * GIB, None).await;
    egress(&server, "pro", GIB, at(2026, 11, 10, 0)).await;
    server.clock.set(at(2026, 11, 16, 0));
    assign(&mut c, "pro", "b").await;

    server.clock.set(at(2026, 12, 1, 2));
    let closed = bill(&mut c, "pro", "2026-11").await;
    assert!(closed.closed, "finalized after the 1 h grace");
    // Each half of the month: 1 GiB-month used. Plan a includes 1 GiB-month and 1 GiB of
    // egress prorated to half; plan b includes 2 of each, prorated to half.
    assert_eq!(
        lines(&closed),
        [
            line("storage", "a", 1, "1.000000", "0.500000", 500_000),
            line("egress", "a", 1, "1.000000", "0.500000", 500_000),
            line("ingress", "a", 1, "0.000000", "0.000000", 0),
            line("storage", "b", 1, "1.000000", "1.000000", 0),
            line("egress", "b", 1, "0.000000", "1.000000", 0),
            line("ingress", "b", 1, "0.000000", "0.000000", 0),
        ]
    );
    assert_eq!(closed.total_micros, 1_000_000);
    let split = at(2026, 11, 16, 0).to_seconds_nanos().0;
    assert_eq!(closed.line_items[0].service_end.unwrap().seconds, split);
    assert_eq!(closed.line_items[3].service_start.unwrap().seconds, split);
    let frozen = closed.encode_to_vec();

    // Nothing that happens now moves the closed month: another plan, new prices, a
    // retention change applied to existing artifacts, a restart.
    assign(&mut c, "pro", "enterprise").await;
    let mut doubled = plan("a", 1, 2_000_000, 2_000_000);
    doubled.max_retention_days = 10;
    c.plans
        .update_plan(pb::UpdatePlanRequest {
            plan: Some(doubled),
        })
        .await
        .unwrap();
    c.controls
        .update_usage_controls(pb::UpdateUsageControlsRequest {
            project_id: "pro".into(),
            controls: Some(pb::UsageControls {
                retention_job_days: Some(1),
                ..Default::default()
            }),
            update_mask: None,
            apply_to_existing: true,
        })
        .await
        .unwrap();
    assert_eq!(bill(&mut c, "pro", "2026-11").await.encode_to_vec(), frozen);
    let now = server.clock.now();
    let restarted = replica(&server, now).await;
    let mut r = clients_at(restarted.addr).await;
    assert_eq!(bill(&mut r, "pro", "2026-11").await.encode_to_vec(), frozen);
    restarted.stop().await;

    // The plan history shows every period.
    let history = c
        .plans
        .list_project_plan_history(pb::ListProjectPlanHistoryRequest {
            project_id: "pro".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .periods;
    let ids: Vec<(String, Option<i64>)> = history
        .iter()
        .map(|p| (p.plan.as_ref().unwrap().id.clone(), p.to.map(|t| t.seconds)))
        .collect();
    assert_eq!(
        ids,
        [
            ("a".to_owned(), Some(split)),
            ("b".to_owned(), Some(now.to_seconds_nanos().0)),
            ("enterprise".to_owned(), None),
        ]
    );
    server.stop().await;
}

async fn a_plan_update_mid_month_bills_each_version(backend: Backend) {
    let Some(server) = TestServer::start_with(backend, |_| {}).await else {
        return;
    };
    let mut c = clients_at(server.grpc_addr).await;
    create(&mut c, plan("c", 0, 1_000_000, 1_000_000)).await;
    assign(&mut c, "ver", "c").await;
    server.clock.set(at(2026, 11, 1, 0));
    record_artifact(&server, "ver", "two.bin", 2 * GIB, None).await;
    server.clock.set(at(2026, 11, 16, 0));
    let updated = c
        .plans
        .update_plan(pb::UpdatePlanRequest {
            plan: Some(plan("c", 0, 2_000_000, 1_000_000)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.version, 2);
    // Mid-month: to date, version 1 for the first half (1 GiB-month at 1.00), version 2
    // since (nothing yet); projected, version 2's half at 2.00.
    let open = bill(&mut c, "ver", "2026-11").await;
    assert!(!open.closed);
    assert_eq!(open.total_micros, 1_000_000);
    assert_eq!(open.projected_total_micros, Some(3_000_000));
    server.clock.set(at(2026, 12, 2, 0));
    let closed = bill(&mut c, "ver", "2026-11").await;
    assert_eq!(
        lines(&closed)
            .into_iter()
            .filter(|l| l.0 == "storage")
            .collect::<Vec<_>>(),
        [
            line("storage", "c", 1, "1.000000", "0.000000", 1_000_000),
            line("storage", "c", 2, "1.000000", "0.000000", 2_000_000),
        ]
    );
    assert_eq!(closed.total_micros, 3_000_000);
    assert_eq!(closed.plan_version, 2);
    server.stop().await;
}

async fn late_records_are_billed_as_corrections_on_the_open_month(backend: Backend) {
    let Some(server) = TestServer::start_with(backend, |_| {}).await else {
        return;
    };
    let mut c = clients_at(server.grpc_addr).await;
    create(&mut c, plan("l", 1, 1_000_000, 1_000_000)).await;
    assign(&mut c, "late", "l").await;
    server.clock.set(at(2026, 12, 1, 2));
    let november = bill(&mut c, "late", "2026-11").await;
    assert!(november.closed);
    assert_eq!(november.total_micros, 0);
    let frozen = november.encode_to_vec();

    // A record for November arrives after its invoice: 2 GiB sent on the 20th.
    egress(&server, "late", 2 * GIB, at(2026, 11, 20, 0)).await;
    assert_eq!(
        bill(&mut c, "late", "2026-11").await.encode_to_vec(),
        frozen
    );
    let december = bill(&mut c, "late", "2026-12").await;
    let correction: Vec<_> = december
        .line_items
        .iter()
        .filter(|l| !l.correction_for_month.is_empty())
        .collect();
    assert_eq!(correction.len(), 1, "{december:?}");
    // November re-billed: 2 GiB sent, 1 included → 1.00; 0 billed before.
    assert_eq!(correction[0].correction_for_month, "2026-11");
    assert_eq!(correction[0].meter, "egress");
    assert_eq!(correction[0].usage, "2.000000");
    assert_eq!(correction[0].amount_micros, 1_000_000);
    assert_eq!(december.total_micros, 1_000_000);

    // Once December is invoiced with the correction, January owes nothing more for it.
    server.clock.set(at(2027, 1, 1, 2));
    let december = bill(&mut c, "late", "2026-12").await;
    assert!(december.closed);
    assert_eq!(december.total_micros, 1_000_000);
    let january = bill(&mut c, "late", "2027-01").await;
    assert!(
        january
            .line_items
            .iter()
            .all(|l| l.correction_for_month.is_empty()),
        "{january:?}"
    );
    assert_eq!(january.total_micros, 0);
    server.stop().await;
}

async fn a_retention_change_never_rebills_the_past(backend: Backend) {
    let Some(server) = TestServer::start_with(backend, |_| {}).await else {
        return;
    };
    let mut c = clients_at(server.grpc_addr).await;
    assign(&mut c, "ret", "team").await;
    let t0 = at(2026, 11, 2, 0);
    server.clock.set(t0);
    // Expired after a day (not swept), and one still live with a week to go.
    record_artifact(
        &server,
        "ret",
        "gone.bin",
        409_600,
        Some(at(2026, 11, 3, 0)),
    )
    .await;
    server.clock.set(at(2026, 11, 4, 0));
    record_artifact(&server, "ret", "live.bin", 1000, Some(at(2026, 11, 11, 0))).await;
    server.clock.set(at(2026, 11, 5, 0));
    let window = |c: &mut Clients| {
        let mut usage = c.usage.clone();
        async move {
            usage
                .get_usage(pb::GetUsageRequest {
                    project_id: "ret".into(),
                    start: Some(ts(t0)),
                    end: Some(ts(at(2026, 11, 5, 0))),
                })
                .await
                .unwrap()
                .into_inner()
                .storage_byte_seconds
        }
    };
    // 409,600 B for one day + 1,000 B for one day.
    let before = window(&mut c).await;
    assert_eq!(before, format!("{}.000000", 409_600 * DAY + 1000 * DAY));
    c.controls
        .update_usage_controls(pb::UpdateUsageControlsRequest {
            project_id: "ret".into(),
            controls: Some(pb::UsageControls {
                retention_job_days: Some(30),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["retention_job_days".into()],
            }),
            apply_to_existing: true,
        })
        .await
        .unwrap();
    assert_eq!(window(&mut c).await, before, "the past window did not move");
    let live = stat(&mut c.artifacts, job("ret", "j"), "live.bin")
        .await
        .unwrap();
    assert_eq!(
        live.expires_at.unwrap().seconds,
        at(2026, 12, 4, 0).to_seconds_nanos().0,
        "the live artifact gets the new retention"
    );
    let gone = stat(&mut c.artifacts, job("ret", "j"), "gone.bin").await;
    if let Ok(gone) = gone {
        assert_eq!(
            gone.expires_at.unwrap().seconds,
            at(2026, 11, 3, 0).to_seconds_nanos().0,
            "an expired artifact keeps its end"
        );
    }
    // A retention shorter than an artifact's age ends it now, not in the past.
    c.controls
        .update_usage_controls(pb::UpdateUsageControlsRequest {
            project_id: "ret".into(),
            controls: Some(pb::UsageControls {
                retention_job_days: Some(1),
                ..Default::default()
            }),
            update_mask: None,
            apply_to_existing: true,
        })
        .await
        .unwrap();
    assert_eq!(window(&mut c).await, before);
    server.clock.set(at(2026, 11, 6, 0));
    let after = c
        .usage
        .get_usage(pb::GetUsageRequest {
            project_id: "ret".into(),
            start: Some(ts(t0)),
            end: Some(ts(at(2026, 11, 6, 0))),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        after.storage_byte_seconds, before,
        "live.bin ended at the change"
    );
    server.stop().await;
}

async fn usage_stops_at_now(backend: Backend) {
    let Some(server) = TestServer::start_with(backend, |_| {}).await else {
        return;
    };
    let mut c = clients_at(server.grpc_addr).await;
    let t0 = at(2026, 11, 1, 1);
    server.clock.set(t0);
    push(
        &mut c.artifacts,
        header(job("now", "j"), "a.bin"),
        &[7u8; 1000],
    )
    .await
    .unwrap();
    let ask = |c: &Clients, end: Timestamp| {
        let mut usage = c.usage.clone();
        async move {
            usage
                .get_usage(pb::GetUsageRequest {
                    project_id: "now".into(),
                    start: Some(ts(t0)),
                    end: Some(ts(end)),
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let right_after = ask(&c, at(2026, 11, 11, 1)).await;
    assert_eq!(right_after.storage_byte_seconds, "0.000000");
    assert_eq!(right_after.end.unwrap().seconds, t0.to_seconds_nanos().0);
    assert_eq!(
        right_after.ingress_bytes, 1000,
        "this microsecond's records count"
    );
    server.clock.set(at(2026, 11, 1, 2));
    assert_eq!(
        ask(&c, at(2026, 11, 11, 1)).await.storage_byte_seconds,
        "3600000.000000"
    );
    let days = c
        .usage
        .list_daily_usage(pb::ListDailyUsageRequest {
            project_id: "now".into(),
            start_day: "2026-11-01".into(),
            end_day: "2026-11-02".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .days;
    let figures: Vec<(&str, &str, i64)> = days
        .iter()
        .map(|d| {
            (
                d.day.as_str(),
                d.storage_byte_seconds.as_str(),
                d.stored_bytes,
            )
        })
        .collect();
    assert_eq!(
        figures,
        [
            ("2026-11-01", "3600000.000000", 1000),
            ("2026-11-02", "0.000000", 0)
        ]
    );
    // The current month's usage is the bill's usage line.
    let month = ask(&c, at(2026, 12, 1, 0)).await;
    let bill = bill(&mut c, "now", "2026-11").await;
    assert_eq!(bill.line_items[0].meter, "storage");
    assert_eq!(month.storage_gib_months, bill.line_items[0].usage);
    server.stop().await;
}

async fn plans_bound_retention_after_a_downgrade(backend: Backend) {
    let Some(server) = TestServer::start_with(backend, |_| {}).await else {
        return;
    };
    let mut c = clients_at(server.grpc_addr).await;
    let t0 = at(2026, 11, 1, 0);
    server.clock.set(t0);
    assign(&mut c, "down", "enterprise").await;
    c.controls
        .update_usage_controls(pb::UpdateUsageControlsRequest {
            project_id: "down".into(),
            controls: Some(pb::UsageControls {
                retention_job_days: Some(300),
                ..Default::default()
            }),
            update_mask: None,
            apply_to_existing: false,
        })
        .await
        .unwrap();
    let long = push(&mut c.artifacts, header(job("down", "j"), "long.bin"), b"x")
        .await
        .unwrap()
        .artifact
        .unwrap();
    assert_eq!(
        long.expires_at.unwrap().seconds,
        t0.to_seconds_nanos().0 + 300 * DAY
    );

    server.clock.set(at(2026, 11, 5, 0));
    assign(&mut c, "down", "free").await;
    let controls = c
        .controls
        .get_usage_controls(pb::GetUsageControlsRequest {
            project_id: "down".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        controls.retention_job_days,
        Some(30),
        "clamped to free's maximum"
    );
    let clamped = stat(&mut c.artifacts, job("down", "j"), "long.bin")
        .await
        .unwrap();
    assert_eq!(
        clamped.expires_at.unwrap().seconds,
        t0.to_seconds_nanos().0 + 30 * DAY
    );
    let new = push(&mut c.artifacts, header(job("down", "j"), "new.bin"), b"y")
        .await
        .unwrap()
        .artifact
        .unwrap();
    assert_eq!(
        new.expires_at.unwrap().seconds,
        at(2026, 11, 5, 0).to_seconds_nanos().0 + 30 * DAY
    );
    server.stop().await;
}

async fn reads_never_create_projects(backend: Backend) {
    let Some(server) = TestServer::start_with(backend, |_| {}).await else {
        return;
    };
    let mut c = clients_at(server.grpc_addr).await;
    let ghost = || "ghost".to_owned();
    let code = |r: Result<tonic::Status, ()>| r.unwrap().code();
    let bill_err = c
        .usage
        .get_bill(pb::GetBillRequest {
            project_id: ghost(),
            month: "2026-11".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(code(Ok(bill_err)), Code::NotFound);
    let controls_err = c
        .controls
        .get_usage_controls(pb::GetUsageControlsRequest {
            project_id: ghost(),
        })
        .await
        .unwrap_err();
    assert_eq!(controls_err.code(), Code::NotFound);
    let usage_err = c
        .usage
        .get_usage(pb::GetUsageRequest {
            project_id: ghost(),
            start: Some(ts(at(2026, 10, 1, 0))),
            end: Some(ts(at(2026, 11, 1, 0))),
        })
        .await
        .unwrap_err();
    assert_eq!(usage_err.code(), Code::NotFound);
    let daily_err = c
        .usage
        .list_daily_usage(pb::ListDailyUsageRequest {
            project_id: ghost(),
            start_day: "2026-11-01".into(),
            end_day: "2026-11-01".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(daily_err.code(), Code::NotFound);
    let history_err = c
        .plans
        .list_project_plan_history(pb::ListProjectPlanHistoryRequest {
            project_id: ghost(),
        })
        .await
        .unwrap_err();
    assert_eq!(history_err.code(), Code::NotFound);
    let listed = c
        .usage
        .list_projects_usage(pb::ListProjectsUsageRequest {
            month: "2026-11".into(),
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .projects;
    assert!(listed.iter().all(|p| p.project_id != "ghost"), "{listed:?}");
    server.stop().await;
}

async fn concurrent_control_updates_both_survive(backend: Backend) {
    let Some(server) = TestServer::start_with(backend, |_| {}).await else {
        return;
    };
    let mut c = clients_at(server.grpc_addr).await;
    assign(&mut c, "ctl", "team").await;
    let update = |controls: pb::UsageControls, path: &str| pb::UpdateUsageControlsRequest {
        project_id: "ctl".into(),
        controls: Some(controls),
        update_mask: Some(prost_types::FieldMask {
            paths: vec![path.into()],
        }),
        apply_to_existing: false,
    };
    for round in 0..10i64 {
        let (mut a, mut b) = (c.controls.clone(), c.controls.clone());
        let cap = update(
            pb::UsageControls {
                spend_cap_micros: Some(1_000_000 + round),
                ..Default::default()
            },
            "spend_cap_micros",
        );
        let storage = update(
            pb::UsageControls {
                storage_cap_bytes: Some(5_000 + round),
                ..Default::default()
            },
            "storage_cap_bytes",
        );
        let (x, y) = tokio::join!(
            a.update_usage_controls(cap),
            b.update_usage_controls(storage)
        );
        x.unwrap();
        y.unwrap();
        let now = c
            .controls
            .get_usage_controls(pb::GetUsageControlsRequest {
                project_id: "ctl".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            now.spend_cap_micros,
            Some(1_000_000 + round),
            "round {round}"
        );
        assert_eq!(now.storage_cap_bytes, Some(5_000 + round), "round {round}");
    }
    // An update that names nothing and sets nothing is refused, and wipes nothing.
    let empty = c
        .controls
        .update_usage_controls(pb::UpdateUsageControlsRequest {
            project_id: "ctl".into(),
            controls: None,
            update_mask: None,
            apply_to_existing: false,
        })
        .await
        .unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert!(
        empty.message().starts_with("update_mask:"),
        "{}",
        empty.message()
    );
    let kept = c
        .controls
        .get_usage_controls(pb::GetUsageControlsRequest {
            project_id: "ctl".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kept.spend_cap_micros, Some(1_000_009));
    server.stop().await;
}

/// A database populated under the previous schema (migrations 1–4) — a project on the
/// `team` plan with October's artifacts and egress — bills October exactly as the old
/// code did (one plan over the whole month), and lists the same artifacts.
async fn a_database_from_the_previous_schema_bills_the_same(backend: Backend) {
    let Some(db) = TestDb::create(backend).await else {
        return;
    };
    {
        let conn = db.connect_migrated_to(4).await;
        let oct1 = at(2026, 10, 1, 0).as_micros();
        let oct11 = at(2026, 10, 11, 0).as_micros();
        let statements = [
            "INSERT INTO projects (project_id, plan_id, alert_thresholds, created_at, updated_at) \
             VALUES ('legacy', 'team', '', 0, 0)"
                .to_owned(),
            "INSERT INTO blobs (sha256, size, created_at) VALUES \
             ('aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa', 3, 0), \
             ('bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb', 12, 0)"
                .to_owned(),
            format!(
                "INSERT INTO artifacts (project_id, scope_kind, scope_id, path, size, sha256, mode, \
                 created_at, expires_at, keep, deleted_at, end_reason, upload_id, billing_end) VALUES \
                 ('legacy', 'project', '', 'small.bin', {}, 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa', 420, {oct1}, NULL, false, {oct11}, 'overwritten', 'u1', {oct11}), \
                 ('legacy', 'project', '', 'big.bin', {}, 'bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb', 420, {oct11}, NULL, false, NULL, NULL, 'u2', NULL)",
                3 * GIB,
                12 * GIB
            ),
            format!(
                "INSERT INTO usage_events (id, project_id, meter, bytes, occurred_at) VALUES \
                 ('pull:x:0', 'legacy', 'egress', {}, {oct11})",
                200 * GIB
            ),
        ];
        for statement in statements {
            conn.execute_unprepared(&statement).await.unwrap();
        }
        let _ = conn.close().await;
    }
    let blob_dir = tempfile::tempdir().unwrap();
    let config = artifactd::config::Config::with_stores(
        &db.url,
        &format!("file://{}", blob_dir.path().display()),
    );
    let clock = ManualClock::new(at(2026, 11, 27, 0));
    let app = App::build(&config, Arc::new(clock)).await.unwrap();
    let october = app
        .metering
        .bill(
            &ProjectId::parse("p", "legacy").unwrap(),
            artifactd::domain::metering::Month::parse("m", "2026-10").unwrap(),
        )
        .await
        .unwrap();
    // GitHub's example on the team plan: 9.096774 GiB-months (100 included, free); 200 GiB
    // sent, 100 included, 100 × 0.35 = 35.00.
    let summary: Vec<(String, String, i128)> = october
        .lines
        .iter()
        .map(|l| {
            (
                l.meter.as_str().to_owned(),
                l.usage.to_decimal(),
                l.amount_micros,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("storage".to_owned(), "9.096774".to_owned(), 0),
            ("egress".to_owned(), "200.000000".to_owned(), 35_000_000),
            ("ingress".to_owned(), "0.000000".to_owned(), 0),
        ]
    );
    assert_eq!(october.total_micros, 35_000_000);
    assert!(october.closed);
    assert_eq!(october.plan.id, "team");
    let scope = Scope::parse("s", "legacy", ScopeKind::Project, "").unwrap();
    let listed = app.artifacts.list(&scope, "", None, 10).await.unwrap();
    let paths: Vec<&str> = listed.artifacts.iter().map(|a| a.path.as_str()).collect();
    assert_eq!(paths, ["big.bin"]);
    app.store.clone().close().await;
}

/// Two replicas finalize the same month at once: one invoice, the same bytes from both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_finalize_a_month_once() {
    let Some(server) = TestServer::start_with(Backend::Postgres, |_| {}).await else {
        return;
    };
    let mut c = clients_at(server.grpc_addr).await;
    server.clock.set(at(2026, 11, 3, 0));
    assign(&mut c, "two", "team").await;
    record_artifact(&server, "two", "f.bin", 7 * GIB, None).await;
    let after = at(2026, 12, 1, 1).saturating_add_micros(1);
    server.clock.set(after);
    let other = replica(&server, after).await;
    let mut r = clients_at(other.addr).await;
    let (a, b) = tokio::join!(
        bill(&mut c, "two", "2026-11"),
        bill(&mut r, "two", "2026-11")
    );
    assert!(a.closed && b.closed);
    assert_eq!(a.encode_to_vec(), b.encode_to_vec());
    let conn = Database::connect(server.db.url.as_str()).await.unwrap();
    let row = conn
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT count(*) FROM invoices WHERE project_id = 'two'",
        ))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.try_get_by_index::<i64>(0).unwrap(), 1);
    let _ = conn.close().await;
    other.stop().await;
    server.stop().await;
}

/// The README's plain SQL recomputes every line of a closed invoice that spans a plan
/// change, from the artifact log, the usage events and the plan versions alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_sql_recomputes_a_closed_invoice() {
    let Some(server) = TestServer::start_with(Backend::Postgres, |_| {}).await else {
        return;
    };
    let mut c = clients_at(server.grpc_addr).await;
    create(&mut c, plan("s1", 1, 1_234_567, 345_678)).await;
    create(&mut c, plan("s2", 3, 2_000_001, 99_999)).await;
    assign(&mut c, "sql", "s1").await;
    server.clock.set(at(2026, 11, 1, 5));
    record_artifact(&server, "sql", "a.bin", 3 * GIB + 12_345, None).await;
    egress(&server, "sql", 5 * GIB + 777, at(2026, 11, 3, 0)).await;
    server.clock.set(at(2026, 11, 9, 13));
    record_artifact(
        &server,
        "sql",
        "b.bin",
        7 * GIB + 1,
        Some(at(2026, 11, 20, 7)),
    )
    .await;
    server.clock.set(at(2026, 11, 12, 17));
    assign(&mut c, "sql", "s2").await;
    egress(&server, "sql", 4 * GIB + 3, at(2026, 11, 12, 18)).await;
    server.clock.set(at(2026, 11, 21, 0));
    c.plans
        .update_plan(pb::UpdatePlanRequest {
            plan: Some(plan("s2", 2, 3_000_003, 150_000)),
        })
        .await
        .unwrap();
    egress(&server, "sql", 9 * GIB, at(2026, 11, 25, 0)).await;
    server.clock.set(at(2026, 12, 1, 3));
    let invoice = bill(&mut c, "sql", "2026-11").await;
    assert!(invoice.closed);
    assert_eq!(invoice.line_items.len(), 9, "three segments of three lines");

    let readme = include_str!("../README.md");
    let marker = readme
        .find("<!-- invoice-recompute-sql -->")
        .expect("the README marks its SQL");
    let block = &readme[marker..];
    let start = block.find("```sql\n").unwrap() + "```sql\n".len();
    let sql = &block[start..start + block[start..].find("```").unwrap()];
    let conn = Database::connect(server.db.url.as_str()).await.unwrap();
    let rows = conn
        .query_all_raw(sea_orm::Statement::from_sql_and_values(
            sea_orm::DbBackend::Postgres,
            format!("SELECT line_no, amount_micros, recomputed::text FROM ({sql}) AS q"),
            ["sql".into(), "2026-11".into()],
        ))
        .await
        .unwrap();
    assert_eq!(rows.len(), 9);
    let mut total = 0i64;
    for row in &rows {
        let line: i32 = row.try_get_by_index(0).unwrap();
        let stored: i64 = row.try_get_by_index(1).unwrap();
        let recomputed: String = row.try_get_by_index(2).unwrap();
        assert_eq!(recomputed, stored.to_string(), "line {line}");
        total += stored;
    }
    assert_eq!(total, invoice.total_micros);
    assert!(invoice.total_micros > 0);
    let _ = conn.close().await;
    server.stop().await;
}

/// GetUsage answers ranges of up to ten years; a longer one is INVALID_ARGUMENT naming `end`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_ranges_are_capped() {
    let Some(server) = TestServer::start_with(Backend::Sqlite, |_| {}).await else {
        return;
    };
    let mut c = clients_at(server.grpc_addr).await;
    assign(&mut c, "cap", "team").await;
    let ask = |days: i64| pb::GetUsageRequest {
        project_id: "cap".into(),
        start: Some(ts(at(2020, 1, 1, 0))),
        end: Some(ts(
            at(2020, 1, 1, 0).saturating_add_micros(days * DAY * 1_000_000)
        )),
    };
    c.usage.get_usage(ask(3660)).await.unwrap();
    let err = c.usage.get_usage(ask(3661)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("end: the range is 3661 days"),
        "{}",
        err.message()
    );
    server.stop().await;
}

/// An older month nobody finalized (the finalizer takes only last month) is finalized in
/// the background when a listing asks for it: UNAVAILABLE first, then every project, in
/// keyset pages that neither repeat nor skip.
async fn an_old_month_is_finalized_when_listed(backend: Backend) {
    let Some(server) = TestServer::start_with(backend, |_| {}).await else {
        return;
    };
    let mut c = clients_at(server.grpc_addr).await;
    server.clock.set(at(2026, 9, 1, 0));
    for i in 0..150 {
        let project = format!("old{i:03}");
        assign(&mut c, &project, "team").await;
        egress(&server, &project, (i % 7 + 1) * GIB, at(2026, 9, 10, 0)).await;
    }
    server.clock.set(at(2026, 11, 15, 0));
    let list = |token: String| pb::ListProjectsUsageRequest {
        month: "2026-09".into(),
        page_size: 100,
        page_token: token,
    };
    let first = c.usage.list_projects_usage(list(String::new())).await;
    assert_eq!(first.unwrap_err().code(), Code::Unavailable);
    let mut page = None;
    for _ in 0..600 {
        match c.usage.list_projects_usage(list(String::new())).await {
            Ok(response) => {
                page = Some(response.into_inner());
                break;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable);
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
    let page = page.expect("the month was finalized in the background");
    assert_eq!(page.projects.len(), 100);
    let rest = c
        .usage
        .list_projects_usage(list(page.next_page_token.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.projects.len(), 50);
    assert!(rest.next_page_token.is_empty());
    let all: Vec<(i64, String)> = page
        .projects
        .iter()
        .chain(&rest.projects)
        .map(|p| (p.total_micros, p.project_id.clone()))
        .collect();
    let mut sorted = all.clone();
    sorted.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    assert_eq!(all, sorted, "largest first, ties by project id");
    let mut ids: Vec<&String> = all.iter().map(|p| &p.1).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 150);
    // 7 GiB sent on team (100 GiB included): nothing billable; the listing carries bytes.
    assert!(all.iter().all(|p| p.0 == 0));
    server.stop().await;
}
