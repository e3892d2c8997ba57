#![allow(clippy::unwrap_used)]
//! Authentication and the role matrix, exhaustively: every RPC × every role × own project /
//! other project / own job / sibling job (and the workflow and project scopes), asserting the
//! exact code. Real server with `ARTIFACTD_AUTH=jwt`, real tokens.

mod common;

use artifactd::auth::{Authenticator, Claims};
use artifactd::config::{AuthMode, Secret};
use artifactd::pb::v1::{
    self as pb, artifact_service_client::ArtifactServiceClient,
    job_service_client::JobServiceClient, plan_service_client::PlanServiceClient,
    usage_control_service_client::UsageControlServiceClient,
    usage_service_client::UsageServiceClient,
};
use common::*;
use tonic::transport::Channel;
use tonic::{Code, Request};

const SECRET: &str = "test-secret-that-is-at-least-32-bytes-long";

fn now_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(role: &str, project: Option<&str>, workflow: Option<&str>, job: Option<&str>) -> String {
    let now = now_seconds();
    Authenticator::shared_secret(SECRET.as_bytes())
        .unwrap()
        .issue(&Claims {
            sub: format!("test-{role}"),
            role: role.into(),
            project_id: project.map(Into::into),
            workflow_id: workflow.map(Into::into),
            job_id: job.map(Into::into),
            exp: now + 3600,
            iat: Some(now),
            ..Claims::default()
        })
        .unwrap()
}

fn authed<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

struct Clients {
    artifacts: ArtifactServiceClient<Channel>,
    plans: PlanServiceClient<Channel>,
    usage: UsageServiceClient<Channel>,
    controls: UsageControlServiceClient<Channel>,
    jobs: JobServiceClient<Channel>,
}

async fn secured_server() -> (TestServer, Clients) {
    let server = TestServer::start_with(Backend::Sqlite, |c| {
        c.auth = AuthMode::Jwt;
        c.jwt_secret = Some(SECRET.parse::<Secret>().unwrap());
    })
    .await
    .unwrap();
    let channel = server.channel().await;
    let clients = Clients {
        artifacts: ArtifactServiceClient::new(channel.clone()),
        plans: PlanServiceClient::new(channel.clone()),
        usage: UsageServiceClient::new(channel.clone()),
        controls: UsageControlServiceClient::new(channel.clone()),
        jobs: JobServiceClient::new(channel),
    };
    (server, clients)
}

fn code<T>(result: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

async fn push_as(c: &mut Clients, token: &str, scope: pb::Scope, path: &str) -> Code {
    let mut h = header(scope, path);
    h.force = true;
    let messages = push_messages(h, b"matrix", 1024);
    code(
        c.artifacts
            .push(authed(tokio_stream::iter(messages), token))
            .await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_for_every_role_and_target() {
    let (server, mut c) = secured_server().await;
    let admin = token("admin", None, None, None);
    let principals = [
        ("job", token("job", Some("p"), Some("w1"), Some("j1"))),
        ("maintainer", token("maintainer", Some("p"), None, None)),
        (
            "billing_reader",
            token("billing_reader", Some("p"), None, None),
        ),
        (
            "billing_reader_all",
            token("billing_reader", None, None, None),
        ),
        ("admin", admin.clone()),
    ];
    // Artifact targets: own job, sibling job, own workflow, other workflow, project scope,
    // and the same job id in another project.
    let targets = [
        ("own_job", job("p", "j1")),
        ("sibling_job", job("p", "j2")),
        ("own_workflow", workflow("p", "w1")),
        ("other_workflow", workflow("p", "w2")),
        ("project", project("p")),
        ("other_project", job("q", "j1")),
    ];
    // Expected for (role, target): read/push allowed, delete allowed.
    let artifact_rules = |role: &str, target: &str| -> (bool, bool) {
        match (role, target) {
            ("admin", _) => (true, true),
            ("maintainer", "other_project") => (false, false),
            ("maintainer", _) => (true, true),
            ("job", "own_job") => (true, true),
            ("job", "own_workflow" | "project") => (true, false),
            _ => (false, false),
        }
    };
    for (_, scope) in &targets {
        assert_eq!(
            push_as(&mut c, &admin, scope.clone(), "a.txt").await,
            Code::Ok
        );
    }

    for (role, token) in &principals {
        for (target, scope) in &targets {
            let (read, delete) = artifact_rules(role, target);
            let expect = |allowed: bool| {
                if allowed {
                    Code::Ok
                } else {
                    Code::PermissionDenied
                }
            };
            let at = format!("{role} on {target}");
            assert_eq!(
                push_as(&mut c, token, scope.clone(), "pushed.txt").await,
                expect(read),
                "Push: {at}"
            );
            // QueryUpload is authorized as a Push to its scope, before any lookup: an
            // unknown upload id answers NOT_FOUND only to those who may push there.
            let query = c
                .artifacts
                .query_upload(authed(
                    pb::QueryUploadRequest {
                        scope: Some(scope.clone()),
                        upload_id: "no-such-upload".into(),
                    },
                    token,
                ))
                .await;
            assert_eq!(
                code(query),
                if read {
                    Code::NotFound
                } else {
                    Code::PermissionDenied
                },
                "QueryUpload: {at}"
            );
            let pull = c
                .artifacts
                .pull(authed(
                    pb::PullRequest {
                        scope: Some(scope.clone()),
                        path: "a.txt".into(),
                        offset: 0,
                        length: 0,
                    },
                    token,
                ))
                .await;
            assert_eq!(code(pull), expect(read), "Pull: {at}");
            let stat = c
                .artifacts
                .stat(authed(
                    pb::StatRequest {
                        scope: Some(scope.clone()),
                        path: "a.txt".into(),
                    },
                    token,
                ))
                .await;
            assert_eq!(code(stat), expect(read), "Stat: {at}");
            // Refused before any lookup: a missing path answers the same as an existing one.
            let missing = c
                .artifacts
                .stat(authed(
                    pb::StatRequest {
                        scope: Some(scope.clone()),
                        path: "missing".into(),
                    },
                    token,
                ))
                .await;
            assert_eq!(
                code(missing),
                if read {
                    Code::NotFound
                } else {
                    Code::PermissionDenied
                },
                "Stat missing: {at}"
            );
            let list = c
                .artifacts
                .list(authed(
                    pb::ListRequest {
                        scope: Some(scope.clone()),
                        prefix: String::new(),
                        page_size: 10,
                        page_token: String::new(),
                    },
                    token,
                ))
                .await;
            assert_eq!(code(list), expect(read), "List: {at}");
            // Keep and Unkeep: the same principals as Delete.
            let kept = c
                .artifacts
                .keep(authed(
                    pb::KeepRequest {
                        scope: Some(scope.clone()),
                        path: "a.txt".into(),
                        recursive: false,
                    },
                    token,
                ))
                .await;
            assert_eq!(code(kept), expect(delete), "Keep: {at}");
            let unkept = c
                .artifacts
                .unkeep(authed(
                    pb::UnkeepRequest {
                        scope: Some(scope.clone()),
                        path: "a.txt".into(),
                        recursive: false,
                    },
                    token,
                ))
                .await;
            assert_eq!(code(unkept), expect(delete), "Unkeep: {at}");
            let deleted = c
                .artifacts
                .delete(authed(
                    pb::DeleteRequest {
                        scope: Some(scope.clone()),
                        path: "a.txt".into(),
                        recursive: false,
                    },
                    token,
                ))
                .await;
            assert_eq!(code(deleted), expect(delete), "Delete: {at}");
            if delete {
                assert_eq!(
                    push_as(&mut c, &admin, scope.clone(), "a.txt").await,
                    Code::Ok
                );
            }
        }
    }

    // Project-level RPCs, on the token's own project and on another.
    for (role, token) in &principals {
        for project_id in ["p", "q"] {
            let own = project_id == "p";
            let reads_usage = match *role {
                "admin" | "billing_reader_all" => true,
                "maintainer" | "billing_reader" => own,
                _ => false,
            };
            let controls = match *role {
                "admin" => true,
                "maintainer" => own,
                _ => false,
            };
            let expect = |allowed: bool| {
                if allowed {
                    Code::Ok
                } else {
                    Code::PermissionDenied
                }
            };
            let at = format!("{role} on project {project_id}");
            let p = || project_id.to_string();
            assert_eq!(
                code(
                    c.plans
                        .get_project(authed(pb::GetProjectRequest { project_id: p() }, token))
                        .await
                ),
                expect(reads_usage),
                "GetProject: {at}"
            );
            assert_eq!(
                code(
                    c.plans
                        .list_project_plan_history(authed(
                            pb::ListProjectPlanHistoryRequest { project_id: p() },
                            token
                        ))
                        .await
                ),
                expect(reads_usage),
                "ListProjectPlanHistory: {at}"
            );
            let now = prost_types::Timestamp {
                seconds: TEST_EPOCH_SECONDS,
                nanos: 0,
            };
            let later = prost_types::Timestamp {
                seconds: TEST_EPOCH_SECONDS + 86_400,
                nanos: 0,
            };
            assert_eq!(
                code(
                    c.usage
                        .get_usage(authed(
                            pb::GetUsageRequest {
                                project_id: p(),
                                start: Some(now),
                                end: Some(later)
                            },
                            token
                        ))
                        .await
                ),
                expect(reads_usage),
                "GetUsage: {at}"
            );
            assert_eq!(
                code(
                    c.usage
                        .get_bill(authed(
                            pb::GetBillRequest {
                                project_id: p(),
                                month: "2026-11".into()
                            },
                            token
                        ))
                        .await
                ),
                expect(reads_usage),
                "GetBill: {at}"
            );
            assert_eq!(
                code(
                    c.usage
                        .list_daily_usage(authed(
                            pb::ListDailyUsageRequest {
                                project_id: p(),
                                start_day: "2026-11-01".into(),
                                end_day: "2026-11-02".into()
                            },
                            token
                        ))
                        .await
                ),
                expect(reads_usage),
                "ListDailyUsage: {at}"
            );
            assert_eq!(
                code(
                    c.controls
                        .list_usage_alerts(authed(
                            pb::ListUsageAlertsRequest {
                                project_id: p(),
                                month: "2026-11".into()
                            },
                            token
                        ))
                        .await
                ),
                expect(reads_usage),
                "ListUsageAlerts: {at}"
            );
            assert_eq!(
                code(
                    c.controls
                        .get_usage_controls(authed(
                            pb::GetUsageControlsRequest { project_id: p() },
                            token
                        ))
                        .await
                ),
                expect(controls),
                "GetUsageControls: {at}"
            );
            let update = pb::UpdateUsageControlsRequest {
                project_id: p(),
                controls: Some(pb::UsageControls {
                    alert_thresholds: vec![80],
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["alert_thresholds".into()],
                }),
                apply_to_existing: false,
            };
            assert_eq!(
                code(
                    c.controls
                        .update_usage_controls(authed(update, token))
                        .await
                ),
                expect(controls),
                "UpdateUsageControls: {at}"
            );
            assert_eq!(
                code(
                    c.controls
                        .get_retention_policy(authed(
                            pb::GetRetentionPolicyRequest { project_id: p() },
                            token
                        ))
                        .await
                ),
                expect(controls),
                "GetRetentionPolicy: {at}"
            );
            let policy = pb::RetentionPolicy {
                job_rules: vec![pb::RetentionRule {
                    selector: "logs/**".into(),
                    max_age: Some(prost_types::Duration {
                        seconds: 86_400,
                        nanos: 0,
                    }),
                }],
                ..Default::default()
            };
            assert_eq!(
                code(
                    c.controls
                        .set_retention_policy(authed(
                            pb::SetRetentionPolicyRequest {
                                project_id: p(),
                                policy: Some(policy.clone()),
                                apply_to_existing: false,
                            },
                            token
                        ))
                        .await
                ),
                expect(controls),
                "SetRetentionPolicy: {at}"
            );
            assert_eq!(
                code(
                    c.controls
                        .dry_run_retention(authed(
                            pb::DryRunRetentionRequest {
                                project_id: p(),
                                policy: Some(policy),
                            },
                            token
                        ))
                        .await
                ),
                expect(controls),
                "DryRunRetention: {at}"
            );
        }
    }

    // JobService: the control plane (maintainer, admin) reports jobs; job tokens read their
    // project's latest jobs too; billing readers neither.
    let register = |project: &str, job_id: String| pb::RegisterJobRequest {
        project_id: project.into(),
        workflow_id: "w1".into(),
        job_id,
        job_name: "build".into(),
        r#ref: "main".into(),
    };
    for project_id in ["p", "q"] {
        c.jobs
            .register_job(authed(register(project_id, "passed".into()), &admin))
            .await
            .unwrap();
        c.jobs
            .finish_job(authed(
                pb::FinishJobRequest {
                    project_id: project_id.into(),
                    job_id: "passed".into(),
                    status: pb::JobStatus::Passed as i32,
                },
                &admin,
            ))
            .await
            .unwrap();
    }
    for (i, (role, token)) in principals.iter().enumerate() {
        for project_id in ["p", "q"] {
            let own = project_id == "p";
            let reports = match *role {
                "admin" => true,
                "maintainer" => own,
                _ => false,
            };
            let reads_latest = match *role {
                "admin" => true,
                "maintainer" | "job" => own,
                _ => false,
            };
            let expect = |allowed: bool| {
                if allowed {
                    Code::Ok
                } else {
                    Code::PermissionDenied
                }
            };
            let at = format!("{role} on project {project_id}");
            let job_id = format!("j-{i}");
            c.jobs
                .register_job(authed(register(project_id, job_id.clone()), &admin))
                .await
                .unwrap();
            assert_eq!(
                code(
                    c.jobs
                        .register_job(authed(register(project_id, format!("r-{i}")), token))
                        .await
                ),
                expect(reports),
                "RegisterJob: {at}"
            );
            assert_eq!(
                code(
                    c.jobs
                        .finish_job(authed(
                            pb::FinishJobRequest {
                                project_id: project_id.into(),
                                job_id,
                                status: pb::JobStatus::Failed as i32,
                            },
                            token
                        ))
                        .await
                ),
                expect(reports),
                "FinishJob: {at}"
            );
            assert_eq!(
                code(
                    c.jobs
                        .get_latest_job(authed(
                            pb::GetLatestJobRequest {
                                project_id: project_id.into(),
                                r#ref: "main".into(),
                                job_name: "build".into(),
                            },
                            token
                        ))
                        .await
                ),
                expect(reads_latest),
                "GetLatestJob: {at}"
            );
        }
    }

    // Admin-only RPCs, and the all-projects usage listing.
    for (i, (role, token)) in principals.iter().enumerate() {
        let admin_role = *role == "admin";
        let expect = |allowed: bool| {
            if allowed {
                Code::Ok
            } else {
                Code::PermissionDenied
            }
        };
        let plan = |id: String| pb::Plan {
            id,
            name: "Matrix".into(),
            currency: "USD".into(),
            max_artifact_bytes: 1 << 20,
            max_retention_days: 7,
            overage_policy: pb::OveragePolicy::Bill as i32,
            ..Default::default()
        };
        let created = c
            .plans
            .create_plan(authed(
                pb::CreatePlanRequest {
                    plan: Some(plan(format!("matrix-{i}"))),
                },
                token,
            ))
            .await;
        assert_eq!(code(created), expect(admin_role), "CreatePlan: {role}");
        let updated = c
            .plans
            .update_plan(authed(
                pb::UpdatePlanRequest {
                    plan: Some(plan("matrix-4".into())),
                },
                token,
            ))
            .await;
        assert_eq!(
            code(updated),
            if admin_role {
                Code::Ok
            } else {
                Code::PermissionDenied
            },
            "UpdatePlan: {role}"
        );
        assert_eq!(
            code(
                c.plans
                    .get_plan(authed(
                        pb::GetPlanRequest {
                            plan_id: "free".into()
                        },
                        token
                    ))
                    .await
            ),
            expect(admin_role),
            "GetPlan: {role}"
        );
        assert_eq!(
            code(
                c.plans
                    .list_plans(authed(pb::ListPlansRequest {}, token))
                    .await
            ),
            expect(admin_role),
            "ListPlans: {role}"
        );
        assert_eq!(
            code(
                c.plans
                    .assign_plan(authed(
                        pb::AssignPlanRequest {
                            project_id: "p".into(),
                            plan_id: "team".into()
                        },
                        token
                    ))
                    .await
            ),
            expect(admin_role),
            "AssignPlan: {role}"
        );
        let all_usage = matches!(*role, "admin" | "billing_reader_all");
        assert_eq!(
            code(
                c.usage
                    .list_projects_usage(authed(
                        pb::ListProjectsUsageRequest {
                            month: "2026-11".into(),
                            page_size: 10,
                            page_token: String::new()
                        },
                        token
                    ))
                    .await
            ),
            expect(all_usage),
            "ListProjectsUsage: {role}"
        );
    }
    server.stop().await;
}

/// Authenticate, then authorize, then validate: a request without a token is
/// UNAUTHENTICATED even when its fields are invalid (a bad project id, a bad month).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_comes_before_invalid_argument() {
    let (server, mut c) = secured_server().await;
    let bad = || "not a valid id!".to_owned();
    let codes = [
        (
            "GetBill",
            code(
                c.usage
                    .get_bill(pb::GetBillRequest {
                        project_id: bad(),
                        month: "13-2026".into(),
                    })
                    .await,
            ),
        ),
        (
            "GetUsage",
            code(
                c.usage
                    .get_usage(pb::GetUsageRequest {
                        project_id: bad(),
                        start: None,
                        end: None,
                    })
                    .await,
            ),
        ),
        (
            "ListDailyUsage",
            code(
                c.usage
                    .list_daily_usage(pb::ListDailyUsageRequest {
                        project_id: bad(),
                        start_day: "x".into(),
                        end_day: "y".into(),
                    })
                    .await,
            ),
        ),
        (
            "ListProjectsUsage",
            code(
                c.usage
                    .list_projects_usage(pb::ListProjectsUsageRequest {
                        month: "bad".into(),
                        page_size: -1,
                        page_token: "%%".into(),
                    })
                    .await,
            ),
        ),
        (
            "GetUsageControls",
            code(
                c.controls
                    .get_usage_controls(pb::GetUsageControlsRequest { project_id: bad() })
                    .await,
            ),
        ),
        (
            "UpdateUsageControls",
            code(
                c.controls
                    .update_usage_controls(pb::UpdateUsageControlsRequest {
                        project_id: bad(),
                        controls: None,
                        update_mask: Some(prost_types::FieldMask {
                            paths: vec!["nope".into()],
                        }),
                        apply_to_existing: false,
                    })
                    .await,
            ),
        ),
        (
            "SetRetentionPolicy",
            code(
                c.controls
                    .set_retention_policy(pb::SetRetentionPolicyRequest {
                        project_id: bad(),
                        policy: Some(pb::RetentionPolicy {
                            job_rules: vec![pb::RetentionRule {
                                selector: "[".into(),
                                max_age: None,
                            }],
                            ..Default::default()
                        }),
                        apply_to_existing: true,
                    })
                    .await,
            ),
        ),
        (
            "DryRunRetention",
            code(
                c.controls
                    .dry_run_retention(pb::DryRunRetentionRequest {
                        project_id: bad(),
                        policy: None,
                    })
                    .await,
            ),
        ),
        (
            "Keep",
            code(
                c.artifacts
                    .keep(pb::KeepRequest {
                        scope: None,
                        path: "../x".into(),
                        recursive: false,
                    })
                    .await,
            ),
        ),
        (
            "ListUsageAlerts",
            code(
                c.controls
                    .list_usage_alerts(pb::ListUsageAlertsRequest {
                        project_id: bad(),
                        month: "bad".into(),
                    })
                    .await,
            ),
        ),
        (
            "GetProject",
            code(
                c.plans
                    .get_project(pb::GetProjectRequest { project_id: bad() })
                    .await,
            ),
        ),
        (
            "ListProjectPlanHistory",
            code(
                c.plans
                    .list_project_plan_history(pb::ListProjectPlanHistoryRequest {
                        project_id: bad(),
                    })
                    .await,
            ),
        ),
        (
            "AssignPlan",
            code(
                c.plans
                    .assign_plan(pb::AssignPlanRequest {
                        project_id: bad(),
                        plan_id: String::new(),
                    })
                    .await,
            ),
        ),
        (
            "CreatePlan",
            code(
                c.plans
                    .create_plan(pb::CreatePlanRequest { plan: None })
                    .await,
            ),
        ),
        (
            "RegisterJob",
            code(
                c.jobs
                    .register_job(pb::RegisterJobRequest {
                        project_id: bad(),
                        ..Default::default()
                    })
                    .await,
            ),
        ),
        (
            "FinishJob",
            code(
                c.jobs
                    .finish_job(pb::FinishJobRequest {
                        project_id: bad(),
                        job_id: String::new(),
                        status: 99,
                    })
                    .await,
            ),
        ),
        (
            "GetLatestJob",
            code(
                c.jobs
                    .get_latest_job(pb::GetLatestJobRequest {
                        project_id: bad(),
                        ..Default::default()
                    })
                    .await,
            ),
        ),
    ];
    for (rpc, code) in codes {
        assert_eq!(code, Code::Unauthenticated, "{rpc}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_unauthenticated() {
    let (server, mut c) = secured_server().await;
    let good = token("admin", None, None, None);
    let past = Authenticator::shared_secret(SECRET.as_bytes())
        .unwrap()
        .issue(&Claims {
            sub: "old".into(),
            role: "admin".into(),
            project_id: None,
            workflow_id: None,
            job_id: None,
            exp: 1_000_000,
            ..Claims::default()
        })
        .unwrap();
    let other_key = Authenticator::shared_secret(b"another-secret-that-is-32-bytes-long!!")
        .unwrap()
        .issue(&Claims {
            sub: "x".into(),
            role: "admin".into(),
            project_id: None,
            workflow_id: None,
            job_id: None,
            exp: u64::MAX / 2,
            ..Claims::default()
        })
        .unwrap();
    let unknown_role = Authenticator::shared_secret(SECRET.as_bytes())
        .unwrap()
        .issue(&Claims {
            sub: "x".into(),
            role: "root".into(),
            exp: now_seconds() + 60,
            iat: Some(now_seconds()),
            ..Claims::default()
        })
        .unwrap();
    let job_without_job = token("job", Some("p"), None, None);
    let stat = |t: Option<String>| {
        let mut request = Request::new(pb::StatRequest {
            scope: Some(job("p", "j")),
            path: "f".into(),
        });
        if let Some(value) = t {
            request
                .metadata_mut()
                .insert("authorization", value.parse().unwrap());
        }
        request
    };
    for (what, value, expected) in [
        ("no token", None, "a bearer token is required"),
        (
            "not bearer",
            Some(format!("Basic {good}")),
            "must be `Bearer <token>`",
        ),
        ("garbage", Some("Bearer not.a.jwt".to_string()), "malformed"),
        ("expired", Some(format!("Bearer {past}")), "expired"),
        (
            "other key",
            Some(format!("Bearer {other_key}")),
            "signature",
        ),
        (
            "unknown role",
            Some(format!("Bearer {unknown_role}")),
            "unknown role",
        ),
        (
            "job token without job",
            Some(format!("Bearer {job_without_job}")),
            "needs project_id, workflow_id and job_id",
        ),
    ] {
        let err = c.artifacts.stat(stat(value)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{what}: {err:?}");
        assert!(
            err.message().contains(expected),
            "{what}: {}",
            err.message()
        );
    }
    // Pushes and billing calls check tokens too.
    let messages = push_messages(header(job("p", "j"), "f"), b"x", 1);
    assert_eq!(
        code(c.artifacts.push(tokio_stream::iter(messages)).await),
        Code::Unauthenticated
    );
    assert_eq!(
        code(
            c.usage
                .get_bill(Request::new(pb::GetBillRequest {
                    project_id: "p".into(),
                    month: "2026-11".into()
                }))
                .await
        ),
        Code::Unauthenticated
    );
    // And a good token works.
    let err = c
        .artifacts
        .stat(stat(Some(format!("Bearer {good}"))))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    server.stop().await;
}

#[test]
fn no_auth_is_refused_on_reachable_addresses() {
    use artifactd::config::Config;
    let mut config = Config::with_stores("sqlite://x.db", "memory://");
    assert!(config.validate().is_ok(), "loopback without auth is fine");
    config.grpc_listen = "0.0.0.0:50051".parse().unwrap();
    let err = config.validate().unwrap_err();
    assert!(err.to_string().starts_with("ARTIFACTD_AUTH:"), "{err}");
    config.insecure_no_auth = true;
    assert!(config.validate().is_ok());
    config.auth = AuthMode::Jwt;
    assert!(config.validate().is_err(), "jwt needs a key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issued_job_tokens_reach_their_job_only() {
    let (server, mut c) = secured_server().await;
    let channel = server.channel().await;
    let mut tokens = pb::token_service_client::TokenServiceClient::new(channel);
    let request = || pb::IssueJobTokenRequest {
        project_id: "p".into(),
        workflow_id: "w1".into(),
        job_id: "j1".into(),
        ttl: Some(prost_types::Duration {
            seconds: 600,
            nanos: 0,
        }),
    };
    let maintainer = token("maintainer", Some("p"), None, None);
    let refused = tokens
        .issue_job_token(authed(request(), &maintainer))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let issued = tokens
        .issue_job_token(authed(request(), &token("admin", None, None, None)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        issued.expires_at.unwrap().seconds,
        TEST_EPOCH_SECONDS + 600,
        "expiry from the server's clock"
    );
    // The test clock is in the past of the wall clock the verifier checks `exp` against, so
    // verify reach with a token from the same claims but a live expiry.
    let live = token("job", Some("p"), Some("w1"), Some("j1"));
    assert_eq!(push_as(&mut c, &live, job("p", "j1"), "x").await, Code::Ok);
    assert_eq!(
        push_as(&mut c, &live, job("p", "j2"), "x").await,
        Code::PermissionDenied
    );
    let claims = Authenticator::shared_secret(SECRET.as_bytes()).unwrap();
    let err = claims.authenticate(Some(&issued.token)).unwrap_err();
    assert!(
        err.to_string().contains("expired"),
        "issued on the test clock: {err}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_issues_tokens_the_server_accepts() {
    let (server, mut c) = secured_server().await;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_artifactd"))
        .args([
            "token",
            "issue",
            "--role",
            "maintainer",
            "--project",
            "p",
            "--ttl",
            "10m",
        ])
        .env("ARTIFACTD_JWT_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let token = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    let stat = |project_id: &str| pb::StatRequest {
        scope: Some(job(project_id, "j")),
        path: "f".into(),
    };
    assert_eq!(
        code(c.artifacts.stat(authed(stat("p"), &token)).await),
        Code::NotFound
    );
    assert_eq!(
        code(c.artifacts.stat(authed(stat("q"), &token)).await),
        Code::PermissionDenied
    );
    let missing = std::process::Command::new(env!("CARGO_BIN_EXE_artifactd"))
        .args(["token", "issue", "--role", "job", "--project", "p"])
        .env("ARTIFACTD_JWT_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("--workflow is required"));
    server.stop().await;
}

/// A whole session against the real binary, with verbose logs: neither the secret, nor any
/// token (presented, refused or issued), nor blob bytes reach the log.
/// In both log formats; the JSON one is one object per line, and each API call's line
/// carries its span: service, method, project, code, duration and bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_never_contain_tokens_secrets_or_content() {
    logs_without_secrets("text").await;
    let log = logs_without_secrets("json").await;
    let mut calls = 0;
    for line in log.lines() {
        let event: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line}"));
        if event["fields"]["message"] == "rpc finished" && event["span"]["method"] == "Push" {
            let span = &event["span"];
            assert_eq!(span["service"], "artifactd.v1.ArtifactService", "{line}");
            assert_eq!(span["project"], "p", "{line}");
            assert_eq!(span["code"], "OK", "{line}");
            assert!(span["duration_ms"].as_f64().is_some(), "{line}");
            assert!(span["received_bytes"].as_u64().unwrap() > 26, "{line}");
            calls += 1;
        }
        if event["fields"]["message"] == "rpc finished" && event["span"]["method"] == "Stat" {
            assert_eq!(event["span"]["code"], "UNAUTHENTICATED", "{line}");
            calls += 1;
        }
    }
    assert_eq!(calls, 2, "one line per call: {log:.2000}");
}

/// Runs the binary with debug logs in `format`, makes calls with tokens and content, and
/// checks neither reaches the log; returns the log.
async fn logs_without_secrets(format: &str) -> String {
    use std::io::Read;
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (grpc, http) = (free(), free());
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_artifactd"))
        .env("ARTIFACTD_GRPC_LISTEN", grpc.to_string())
        .env("ARTIFACTD_HTTP_LISTEN", http.to_string())
        .env(
            "DATABASE_URL",
            format!("sqlite://{}", dir.path().join("db.sqlite").display()),
        )
        .env(
            "ARTIFACTD_BLOB_URL",
            format!("file://{}", dir.path().join("blobs").display()),
        )
        .env("ARTIFACTD_AUTH", "jwt")
        .env("ARTIFACTD_JWT_SECRET", SECRET)
        .env("RUST_LOG", "debug")
        .env("ARTIFACTD_LOG_FORMAT", format)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{grpc}")).unwrap();
    let mut channel = None;
    for _ in 0..200 {
        if let Ok(ch) = endpoint.connect().await {
            channel = Some(ch);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let channel = channel.expect("the server came up");
    let mut artifacts = ArtifactServiceClient::new(channel.clone());
    let mut usage = UsageServiceClient::new(channel.clone());
    let mut tokens = pb::token_service_client::TokenServiceClient::new(channel);
    let admin = token("admin", None, None, None);
    let marker = "BLOB-CONTENT-MARKER-5f2c91";
    let messages = push_messages(header(job("p", "j"), "secret.txt"), marker.as_bytes(), 64);
    artifacts
        .push(authed(tokio_stream::iter(messages), &admin))
        .await
        .unwrap();
    let pulled = artifacts
        .pull(authed(
            pb::PullRequest {
                scope: Some(job("p", "j")),
                path: "secret.txt".into(),
                offset: 0,
                length: 0,
            },
            &admin,
        ))
        .await
        .unwrap();
    drop(pulled);
    let _ = usage
        .get_bill(authed(
            pb::GetBillRequest {
                project_id: "p".into(),
                month: "2026-11".into(),
            },
            &admin,
        ))
        .await;
    // The usage pages: a sign-in (and one with a bad token), a page and an export by cookie.
    let reader = token("billing_reader", Some("p"), None, None);
    let origin = format!("http://{http}");
    let form = [
        ("content-type", "application/x-www-form-urlencoded"),
        ("origin", origin.as_str()),
    ];
    for body in [format!("token={reader}"), format!("token={reader}x")] {
        let _ =
            common::http::send_body(http, hyper::Method::POST, "/ui/sign-in", &form, &body).await;
    }
    let cookie = format!("artifactd_session={reader}");
    for route in [
        "/ui/projects/p?month=2026-11",
        "/api/v1/usage/export?month=2026-11",
    ] {
        let reply = common::http::get(http, route, &[("cookie", cookie.as_str())]).await;
        assert_eq!(reply.status, hyper::StatusCode::OK, "{route}");
    }
    let forged = format!("{admin}x");
    let _ = artifacts
        .stat(authed(
            pb::StatRequest {
                scope: Some(job("p", "j")),
                path: "secret.txt".into(),
            },
            &forged,
        ))
        .await;
    let issued = tokens
        .issue_job_token(authed(
            pb::IssueJobTokenRequest {
                project_id: "p".into(),
                workflow_id: "w".into(),
                job_id: "j".into(),
                ttl: None,
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .token;
    let _ = artifacts
        .delete(authed(
            pb::DeleteRequest {
                scope: Some(job("p", "j")),
                path: "secret.txt".into(),
                recursive: false,
            },
            &issued,
        ))
        .await;

    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert!(status.success(), "clean exit on SIGTERM");
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(
        log.contains("artifact pushed"),
        "the log was captured: {log:.500}"
    );
    for (what, needle) in [
        ("the JWT secret", SECRET.to_string()),
        ("the admin token", admin.clone()),
        (
            "the admin token's signature",
            admin.rsplit('.').next().unwrap().to_string(),
        ),
        ("the forged token", forged),
        (
            "the signed-in token's signature",
            reader.rsplit('.').next().unwrap().to_string(),
        ),
        ("the issued token", issued),
        ("blob bytes", marker.to_string()),
    ] {
        assert!(!log.contains(&needle), "{what} leaked into the log");
    }
    log
}

/// A control plane signs with its private key (EdDSA or RS256); the service only verifies
/// with the public key, and so cannot issue tokens itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_key_tokens_from_a_control_plane() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let claims = Claims {
        sub: "control-plane".into(),
        role: "maintainer".into(),
        project_id: Some("p".into()),
        exp: now_seconds() + 600,
        iat: Some(now_seconds()),
        ..Claims::default()
    };
    for (public, private, algorithm) in [
        (
            "ed25519-public.pem",
            "ed25519-private.pem",
            Algorithm::EdDSA,
        ),
        ("rsa-public.pem", "rsa-private.pem", Algorithm::RS256),
    ] {
        let server = TestServer::start_with(Backend::Sqlite, |c| {
            c.auth = AuthMode::Jwt;
            c.jwt_public_key_file = Some(fixtures.join(public));
        })
        .await
        .unwrap();
        let pem = std::fs::read(fixtures.join(private)).unwrap();
        let key = match algorithm {
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem).unwrap(),
            _ => EncodingKey::from_rsa_pem(&pem).unwrap(),
        };
        let signed = jsonwebtoken::encode(&Header::new(algorithm), &claims, &key).unwrap();
        let mut artifacts = ArtifactServiceClient::new(server.channel().await);
        let stat = |project_id: &str| pb::StatRequest {
            scope: Some(job(project_id, "j")),
            path: "f".into(),
        };
        assert_eq!(
            code(artifacts.stat(authed(stat("p"), &signed)).await),
            Code::NotFound,
            "{public}"
        );
        assert_eq!(
            code(artifacts.stat(authed(stat("q"), &signed)).await),
            Code::PermissionDenied,
            "{public}"
        );
        // A token made with a shared secret is not accepted by a public-key server.
        let hs = token("admin", None, None, None);
        assert_eq!(
            code(artifacts.stat(authed(stat("p"), &hs)).await),
            Code::Unauthenticated,
            "{public}"
        );
        // Nor can this server issue tokens: it has no private key.
        let admin = jsonwebtoken::encode(
            &Header::new(algorithm),
            &Claims {
                role: "admin".into(),
                project_id: None,
                ..claims.clone()
            },
            &key,
        )
        .unwrap();
        let mut tokens = pb::token_service_client::TokenServiceClient::new(server.channel().await);
        let refused = tokens
            .issue_job_token(authed(
                pb::IssueJobTokenRequest {
                    project_id: "p".into(),
                    workflow_id: "w".into(),
                    job_id: "j".into(),
                    ttl: None,
                },
                &admin,
            ))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition, "{public}");
        server.stop().await;
    }
}

/// Every HTTP download route × every role × own and other targets, with the exact status:
/// 200 (204 for DELETE) when the role matrix allows, 403 when not, 401 without a valid
/// token — whichever way the token comes (Bearer, JOB-TOKEN, ?job_token=).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_routes_for_every_role_and_target() {
    use common::http::{get, send};
    use hyper::{Method, StatusCode};

    let (server, mut c) = secured_server().await;
    let addr = server.http_addr;
    let admin = token("admin", None, None, None);
    let principals = [
        ("job", token("job", Some("p"), Some("w1"), Some("j1"))),
        ("maintainer", token("maintainer", Some("p"), None, None)),
        (
            "billing_reader",
            token("billing_reader", Some("p"), None, None),
        ),
        ("admin", admin.clone()),
    ];
    // (target, scope, route prefix)
    let targets = [
        (
            "own_job",
            job("p", "j1"),
            "/api/v1/projects/p/jobs/j1/artifacts",
        ),
        (
            "sibling_job",
            job("p", "j2"),
            "/api/v1/projects/p/jobs/j2/artifacts",
        ),
        (
            "own_workflow",
            workflow("p", "w1"),
            "/api/v1/projects/p/workflows/w1/artifacts",
        ),
        (
            "other_workflow",
            workflow("p", "w2"),
            "/api/v1/projects/p/workflows/w2/artifacts",
        ),
        ("project", project("p"), "/api/v1/projects/p/artifacts"),
        (
            "other_project",
            job("q", "j1"),
            "/api/v1/projects/q/jobs/j1/artifacts",
        ),
    ];
    let artifact_rules = |role: &str, target: &str| -> (bool, bool) {
        match (role, target) {
            ("admin", _) => (true, true),
            ("maintainer", "other_project") => (false, false),
            ("maintainer", _) => (true, true),
            ("job", "own_job") => (true, true),
            ("job", "own_workflow" | "project") => (true, false),
            _ => (false, false),
        }
    };
    for (_, scope, _) in &targets {
        assert_eq!(
            push_as(&mut c, &admin, scope.clone(), "a.txt").await,
            Code::Ok
        );
    }
    for project_id in ["p", "q"] {
        c.jobs
            .register_job(authed(
                pb::RegisterJobRequest {
                    project_id: project_id.into(),
                    workflow_id: "w1".into(),
                    job_id: "j1".into(),
                    job_name: "build".into(),
                    r#ref: "main".into(),
                },
                &admin,
            ))
            .await
            .unwrap();
        c.jobs
            .finish_job(authed(
                pb::FinishJobRequest {
                    project_id: project_id.into(),
                    job_id: "j1".into(),
                    status: pb::JobStatus::Passed as i32,
                },
                &admin,
            ))
            .await
            .unwrap();
    }
    let allowed = |ok: bool, yes: StatusCode| if ok { yes } else { StatusCode::FORBIDDEN };
    for (role, token) in &principals {
        let bearer = format!("Bearer {token}");
        let auth = [("authorization", bearer.as_str())];
        for (target, scope, route) in &targets {
            let (read, delete) = artifact_rules(role, target);
            let at = format!("{role} on {target}");
            let file = get(addr, &format!("{route}/a.txt"), &auth).await;
            assert_eq!(file.status, allowed(read, StatusCode::OK), "file: {at}");
            let zip = get(addr, route, &auth).await;
            assert_eq!(zip.status, allowed(read, StatusCode::OK), "zip: {at}");
            // Refused before any lookup: a missing file answers like an existing one.
            let missing = get(addr, &format!("{route}/missing"), &auth).await;
            assert_eq!(
                missing.status,
                allowed(read, StatusCode::NOT_FOUND),
                "missing: {at}"
            );
            if route.contains("/jobs/") {
                let deleted = send(addr, Method::DELETE, route, &auth).await;
                assert_eq!(
                    deleted.status,
                    allowed(delete, StatusCode::NO_CONTENT),
                    "DELETE: {at}"
                );
                if delete {
                    assert_eq!(
                        push_as(&mut c, &admin, scope.clone(), "a.txt").await,
                        Code::Ok
                    );
                }
            }
        }
        for project_id in ["p", "q"] {
            let own = project_id == "p";
            let reads_latest = match *role {
                "admin" => true,
                "maintainer" | "job" => own,
                _ => false,
            };
            let at = format!("{role} on project {project_id}");
            let base = format!("/api/v1/projects/{project_id}/jobs/artifacts/main");
            let zip = get(addr, &format!("{base}/download?job=build"), &auth).await;
            assert_eq!(
                zip.status,
                allowed(reads_latest, StatusCode::OK),
                "latest zip: {at}"
            );
            let raw = get(addr, &format!("{base}/raw/a.txt?job=build"), &auth).await;
            assert_eq!(
                raw.status,
                allowed(reads_latest, StatusCode::OK),
                "latest raw: {at}"
            );
        }
    }

    // The other two ways a job token comes, and the ways it does not.
    let job_token = token("job", Some("p"), Some("w1"), Some("j1"));
    let file = "/api/v1/projects/p/jobs/j1/artifacts/a.txt";
    let by_header = get(addr, file, &[("job-token", &job_token)]).await;
    assert_eq!(
        (by_header.status, by_header.text().as_str()),
        (StatusCode::OK, "matrix")
    );
    let by_query = get(addr, &format!("{file}?job_token={job_token}"), &[]).await;
    assert_eq!(by_query.status, StatusCode::OK);
    let sibling = get(
        addr,
        &format!("/api/v1/projects/p/jobs/j2/artifacts/a.txt?job_token={job_token}"),
        &[],
    )
    .await;
    assert_eq!(sibling.status, StatusCode::FORBIDDEN);
    assert!(
        sibling.text().contains("may not read artifacts"),
        "{}",
        sibling.text()
    );
    for (headers, why) in [
        (vec![], "a bearer token is required"),
        (vec![("authorization", "Bearer nope")], "malformed"),
        (
            vec![("authorization", "Basic abc")],
            "must be `Bearer <token>`",
        ),
        (vec![("job-token", "x.y.z")], "malformed"),
    ] {
        // Unauthenticated comes before any validation: even a bad path is 401.
        for route in [
            file,
            "/api/v1/projects/p/jobs/j1/artifacts/a/../b",
            "/api/v1/projects/p/jobs/artifacts/main/download",
        ] {
            let reply = get(addr, route, &headers).await;
            assert_eq!(
                reply.status,
                StatusCode::UNAUTHORIZED,
                "{route} {headers:?}"
            );
            assert_eq!(reply.header("www-authenticate"), "Bearer");
            assert!(reply.text().contains(why), "{}", reply.text());
        }
    }
    let delete = send(
        addr,
        Method::DELETE,
        "/api/v1/projects/p/jobs/j1/artifacts",
        &[],
    )
    .await;
    assert_eq!(delete.status, StatusCode::UNAUTHORIZED);
    server.stop().await;
}

/// The HTTP port's probes and `/metrics` answer without a token even with `jwt` on: they
/// carry aggregate figures only, never a project, job, path or token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_and_metrics_are_open_and_name_no_project() {
    let (server, mut c) = secured_server().await;
    let admin = token("admin", None, None, None);
    assert_eq!(
        push_as(
            &mut c,
            &admin,
            job("secret-project", "secret-job"),
            "secret/path.txt"
        )
        .await,
        Code::Ok
    );
    let forged = format!("{admin}x");
    assert_eq!(
        push_as(
            &mut c,
            &forged,
            job("secret-project", "secret-job"),
            "x.txt"
        )
        .await,
        Code::Unauthenticated
    );
    assert_eq!(http_get(server.http_addr, "/healthz").await.0, 200);
    assert_eq!(http_get(server.http_addr, "/readyz").await.0, 200);
    let (status, text) = http_get(server.http_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        sample(
            &text,
            "artifactd_grpc_requests_total",
            &[
                ("service", "artifactd.v1.ArtifactService"),
                ("method", "Push"),
                ("code", "UNAUTHENTICATED")
            ]
        ),
        Some(1.0)
    );
    let signature = admin.rsplit('.').next().unwrap();
    for needle in ["secret-project", "secret-job", "secret/path", signature] {
        assert!(!text.contains(needle), "{needle} in /metrics");
    }
    server.stop().await;
}

/// The usage pages and the export × every role × own and other project, by bearer header
/// and by the session cookie the sign-in form sets: 200 when the matrix allows, 403 when
/// not; without credentials pages redirect to the sign-in form and the export is 401. The
/// form checks Origin and the token, refuses job tokens, and sign-out clears the cookie.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_pages_and_export_for_every_role() {
    use common::http::{get, send, send_body};
    use hyper::{Method, StatusCode};

    let (server, mut c) = secured_server().await;
    let addr = server.http_addr;
    let admin = token("admin", None, None, None);
    for project_id in ["p", "q"] {
        assert_eq!(
            push_as(&mut c, &admin, project(project_id), "a.txt").await,
            Code::Ok
        );
    }
    let principals = [
        ("job", token("job", Some("p"), Some("w1"), Some("j1"))),
        ("maintainer", token("maintainer", Some("p"), None, None)),
        (
            "billing_reader",
            token("billing_reader", Some("p"), None, None),
        ),
        (
            "billing_reader_all",
            token("billing_reader", None, None, None),
        ),
        ("admin", admin.clone()),
    ];
    let origin = format!("http://{addr}");
    // Every route: (route, who may) — the others get 403.
    let routes: [(&str, &[&str]); 6] = [
        (
            "/api/v1/usage/export?month=2026-11&project=p",
            &[
                "maintainer",
                "billing_reader",
                "billing_reader_all",
                "admin",
            ],
        ),
        (
            "/api/v1/usage/export?month=2026-11&project=q",
            &["billing_reader_all", "admin"],
        ),
        // No project: the token's own, or every project for those who may read all.
        (
            "/api/v1/usage/export?month=2026-11",
            &[
                "maintainer",
                "billing_reader",
                "billing_reader_all",
                "admin",
            ],
        ),
        (
            "/ui/projects/p?month=2026-11",
            &[
                "maintainer",
                "billing_reader",
                "billing_reader_all",
                "admin",
            ],
        ),
        (
            "/ui/projects/q?month=2026-11",
            &["billing_reader_all", "admin"],
        ),
        ("/ui/?month=2026-11", &["billing_reader_all", "admin"]),
    ];
    for (role, token) in &principals {
        // The same token as a bearer header, and as the cookie the form sets.
        let bearer = format!("Bearer {token}");
        let signed_in = send_body(
            addr,
            Method::POST,
            "/ui/sign-in",
            &[
                ("content-type", "application/x-www-form-urlencoded"),
                ("origin", &origin),
            ],
            &format!("token={token}&next="),
        )
        .await;
        let cookie = if *role == "job" {
            assert_eq!(
                signed_in.status,
                StatusCode::FORBIDDEN,
                "{}",
                signed_in.text()
            );
            assert!(signed_in.text().contains("a job token may not read usage"));
            assert_eq!(signed_in.header("set-cookie"), "");
            format!("artifactd_session={token}")
        } else {
            assert_eq!(
                signed_in.status,
                StatusCode::SEE_OTHER,
                "{role}: {}",
                signed_in.text()
            );
            let set = signed_in.header("set-cookie").to_owned();
            assert_eq!(
                set,
                format!("artifactd_session={token}; HttpOnly; SameSite=Strict; Path=/"),
                "{role}"
            );
            let home = match *role {
                "admin" | "billing_reader_all" => "/ui/",
                _ => "/ui/projects/p",
            };
            assert_eq!(signed_in.header("location"), home, "{role}");
            set.split(';').next().unwrap().to_owned()
        };
        for (how, header) in [
            ("authorization", bearer.as_str()),
            ("cookie", cookie.as_str()),
        ] {
            for (route, who) in &routes {
                let reply = get(addr, route, &[(how, header)]).await;
                let at = format!("{role} by {how} on {route}");
                if who.contains(role) {
                    assert_eq!(reply.status, StatusCode::OK, "{at}: {}", reply.text());
                } else if route.starts_with("/ui/?") && *role != "job" {
                    // A token of one project is sent to its page.
                    assert_eq!(reply.status, StatusCode::SEE_OTHER, "{at}");
                    assert_eq!(reply.header("location"), "/ui/projects/p", "{at}");
                } else {
                    assert_eq!(
                        reply.status,
                        StatusCode::FORBIDDEN,
                        "{at}: {}",
                        reply.text()
                    );
                    assert!(
                        reply.text().contains("may not read"),
                        "{at}: {}",
                        reply.text()
                    );
                }
            }
        }
        // Tokens never come from the URL here.
        let reply = get(
            addr,
            &format!("/api/v1/usage/export?month=2026-11&job_token={token}"),
            &[],
        )
        .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{role}");
    }
    // What a billing_reader of p exports is p's alone.
    let reader = token("billing_reader", Some("p"), None, None);
    let own = get(
        addr,
        "/api/v1/usage/export?month=2026-11&format=jsonl",
        &[("authorization", &format!("Bearer {reader}"))],
    )
    .await;
    assert!(!own.body.is_empty());
    assert!(
        own.text()
            .lines()
            .all(|l| l.contains("\"project_id\":\"p\"")),
        "{}",
        own.text()
    );

    // Without credentials: pages send to the form (coming back after), the export is 401.
    for route in ["/ui/", "/ui/projects/p?month=2026-11"] {
        let reply = get(addr, route, &[]).await;
        assert_eq!(reply.status, StatusCode::SEE_OTHER, "{route}");
        assert!(
            reply.header("location").starts_with("/ui/sign-in"),
            "{route}"
        );
    }
    assert_eq!(
        get(addr, "/ui/projects/p?month=2026-11", &[])
            .await
            .header("location"),
        "/ui/sign-in?next=/ui/projects/p%3Fmonth%3D2026-11"
    );
    for headers in [
        vec![],
        vec![("cookie", "artifactd_session=x.y.z")],
        vec![("authorization", "Bearer nope")],
    ] {
        let reply = get(addr, "/api/v1/usage/export?month=2026-11", &headers).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{headers:?}");
        assert_eq!(reply.header("www-authenticate"), "Bearer");
    }
    // A bad cookie on a page: back to the form.
    let reply = get(addr, "/ui/", &[("cookie", "artifactd_session=x.y.z")]).await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER);

    // The form: served to anyone, no state changed by GET.
    let form = get(addr, "/ui/sign-in", &[]).await;
    assert_eq!(form.status, StatusCode::OK);
    assert!(
        form.text()
            .contains("<form class=\"signin\" method=\"post\" action=\"/ui/sign-in\">")
    );
    assert_eq!(
        get(addr, "/ui/sign-out", &[]).await.status,
        StatusCode::METHOD_NOT_ALLOWED
    );
    let body = format!("token={admin}");
    // Another site's form, or none named: refused, no cookie.
    for bad in [Some("http://evil.example"), Some("null"), None] {
        let mut headers = vec![("content-type", "application/x-www-form-urlencoded")];
        if let Some(o) = bad {
            headers.push(("origin", o));
        }
        let reply = send_body(addr, Method::POST, "/ui/sign-in", &headers, &body).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{bad:?}");
        assert_eq!(reply.header("set-cookie"), "", "{bad:?}");
        assert!(reply.text().contains("Origin"), "{bad:?}: {}", reply.text());
    }
    // A bad token: 401 with the reason, never echoed back.
    let reply = send_body(
        addr,
        Method::POST,
        "/ui/sign-in",
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("origin", &origin),
        ],
        &format!("token={admin}x"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert!(
        reply
            .text()
            .contains("the token&#39;s signature is not valid")
            || reply.text().contains("signature"),
        "{}",
        reply.text()
    );
    assert!(!reply.text().contains(&admin), "the token is never echoed");
    // A return address elsewhere is ignored.
    let reply = send_body(
        addr,
        Method::POST,
        "/ui/sign-in",
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("origin", &origin),
        ],
        &format!("token={admin}&next=%2F%2Fevil.example%2F"),
    )
    .await;
    assert_eq!(reply.header("location"), "/ui/");
    // Sign-out: checks Origin, then clears the cookie.
    let out = send(
        addr,
        Method::POST,
        "/ui/sign-out",
        &[("origin", "http://evil.example")],
    )
    .await;
    assert_eq!(out.status, StatusCode::FORBIDDEN);
    assert_eq!(out.header("set-cookie"), "");
    let out = send(addr, Method::POST, "/ui/sign-out", &[("origin", &origin)]).await;
    assert_eq!(out.status, StatusCode::SEE_OTHER);
    assert_eq!(
        out.header("set-cookie"),
        "artifactd_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"
    );
    assert_eq!(out.header("location"), "/ui/sign-in");
    // Pages and the export forbid scripts and framing.
    let page = get(
        addr,
        "/ui/projects/p?month=2026-11",
        &[("authorization", &format!("Bearer {admin}"))],
    )
    .await;
    assert!(
        page.header("content-security-policy")
            .starts_with("default-src 'none'; style-src 'self'"),
        "{:?}",
        page.headers
    );
    assert_eq!(page.header("x-frame-options"), "DENY");
    assert_eq!(page.header("x-content-type-options"), "nosniff");
    // The stylesheet needs no token.
    let css = get(addr, "/ui/style.css", &[]).await;
    assert_eq!(
        (css.status, css.header("content-type")),
        (StatusCode::OK, "text/css; charset=utf-8")
    );
    server.stop().await;
}
