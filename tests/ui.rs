#![allow(clippy::unwrap_used)]
//! The usage pages in a real browser: headless Chromium (Debian's `chromium`) loads each
//! page of a real server with a seeded month — a plan change mid-day, caps, alerts, egress
//! and ingress on most days, three projects — takes a screenshot (laptop and phone widths)
//! and dumps the DOM it built. The test reads the figures back out of that DOM and checks
//! them against GetBill and ListDailyUsage, and counts one chart marker per day of the month
//! per series.
//!
//! Without a `chromium` on PATH the test says SKIPPED on the terminal and passes;
//! `ARTIFACTD_REQUIRE_CHROMIUM=1` (CI) makes that a failure. `ARTIFACTD_SCREENSHOT_DIR=docs`
//! writes the screenshots the README shows.
//!
//! The server runs without authentication (every request is an admin): sign-in and the role
//! matrix of these pages are `tests/security.rs`'s.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use artifactd::domain::{Clock, ProjectId};
use artifactd::pb::v1 as pb;
use artifactd::store::UsageAlert;
use common::billing::*;
use common::*;

on_both_backends!(
    the_project_page_lists_what_is_stored,
    a_database_from_before_the_live_size_index_reads_the_same,
    the_projects_page_sorts_across_pages_by_every_column,
);

const GIB: i64 = 1 << 30;
const MIB: i64 = 1 << 20;

/// `chromium` (or `chromium-browser`) on PATH; `None` after saying SKIPPED, unless
/// `ARTIFACTD_REQUIRE_CHROMIUM=1`.
fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser"] {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    if std::env::var("ARTIFACTD_REQUIRE_CHROMIUM").as_deref() == Ok("1") {
        panic!("ARTIFACTD_REQUIRE_CHROMIUM=1 but no chromium on PATH (apt-get install chromium)");
    }
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr().lock(),
        "SKIPPED (not passed) the usage pages in a browser [ui]: no chromium on PATH. \
         apt-get install chromium to run it; ARTIFACTD_REQUIRE_CHROMIUM=1 makes this a failure."
    );
    None
}

/// Runs headless Chromium on `url` with `args`, returning its stdout; killed after 90 s.
fn run_chromium(binary: &Path, profile: &Path, args: &[String], url: &str) -> String {
    let mut child = Command::new(binary)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--disable-extensions",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut out).unwrap();
        out
    });
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "chromium {args:?} {url}: {status}");
            break;
        }
        if started.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            panic!("chromium {args:?} {url} did not finish in 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    reader.join().unwrap()
}

struct Browser {
    binary: PathBuf,
    profile: tempfile::TempDir,
    shots: tempfile::TempDir,
}

impl Browser {
    /// The DOM Chromium built from `url`, serialized.
    async fn dom(&self, url: String) -> String {
        let (binary, profile) = (self.binary.clone(), self.profile.path().to_owned());
        tokio::task::spawn_blocking(move || {
            run_chromium(&binary, &profile, &["--dump-dom".to_owned()], &url)
        })
        .await
        .unwrap()
    }

    /// A screenshot of `url` at `width`×`height`, saved as `name` (and copied to
    /// `ARTIFACTD_SCREENSHOT_DIR` when set).
    async fn screenshot(&self, url: String, name: &str, width: u32, height: u32) {
        let path = self.shots.path().join(name);
        let (binary, profile) = (self.binary.clone(), self.profile.path().to_owned());
        let args = vec![
            format!("--screenshot={}", path.display()),
            format!("--window-size={width},{height}"),
        ];
        tokio::task::spawn_blocking(move || run_chromium(&binary, &profile, &args, &url))
            .await
            .unwrap();
        let png = std::fs::read(&path).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "{name} is a PNG");
        assert!(png.len() > 10_000, "{name} has something on it");
        if let Ok(dir) = std::env::var("ARTIFACTD_SCREENSHOT_DIR") {
            std::fs::write(Path::new(&dir).join(name), &png).unwrap();
        }
    }
}

fn plan(id: &str, included: i64, storage: i64, egress: i64) -> pb::Plan {
    pb::Plan {
        id: id.into(),
        name: format!("{} plan", id.to_uppercase()),
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

/// The text between `start` (included) and the first `end` after it.
fn between<'a>(text: &'a str, start: &str, end: &str) -> &'a str {
    let from = text
        .find(start)
        .unwrap_or_else(|| panic!("{start} not in the page"));
    let rest = &text[from..];
    &rest[..rest
        .find(end)
        .unwrap_or_else(|| panic!("{end} after {start}"))]
}

/// Every value of `attr="…"` in `text`, in order.
fn attrs(text: &str, attr: &str) -> Vec<String> {
    let key = format!("{attr}=\"");
    text.match_indices(&key)
        .map(|(i, _)| {
            let rest = &text[i + key.len()..];
            rest[..rest.find('"').unwrap()].to_owned()
        })
        .collect()
}

/// The text of every `<td class="num usage">` in `text`.
fn usages(text: &str) -> Vec<String> {
    text.match_indices("<td class=\"num usage\">")
        .map(|(i, m)| {
            let rest = &text[i + m.len()..];
            rest[..rest.find("</td>").unwrap()].to_owned()
        })
        .collect()
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

async fn daily(c: &mut Clients, project: &str, first: &str, last: &str) -> Vec<pb::DailyUsage> {
    c.usage
        .list_daily_usage(pb::ListDailyUsageRequest {
            project_id: project.into(),
            start_day: first.into(),
            end_day: last.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .days
}

/// Checks a project page's DOM against GetBill and ListDailyUsage.
fn check_project_page(dom: &str, bill: &pb::Bill, days: &[pb::DailyUsage]) {
    let bill_section = between(dom, "<section id=\"bill\">", "</section>");
    let main_table = between(bill_section, "<table class=\"lines\">", "</table>");
    let shown: Vec<String> = bill
        .line_items
        .iter()
        .map(|l| format!("{} {}", l.usage, l.unit))
        .collect();
    assert_eq!(usages(main_table), shown, "bill lines' usage");
    let amounts: Vec<i64> = attrs(main_table, "data-micros")
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    assert_eq!(
        amounts,
        bill.line_items
            .iter()
            .map(|l| l.amount_micros)
            .collect::<Vec<_>>(),
        "bill lines' amounts"
    );
    let total = between(bill_section, "<p class=\"total\"", ">");
    assert_eq!(attrs(total, "data-micros"), [bill.total_micros.to_string()]);
    if let Some(projected) = bill.projected_total_micros {
        let shown = between(bill_section, "id=\"projected\"", ">");
        assert_eq!(attrs(shown, "data-micros"), [projected.to_string()]);
    }
    let table = between(dom, "<table id=\"daily\">", "</table>");
    let figures: Vec<i64> = attrs(table, "data-bytes")
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    let expected: Vec<i64> = days
        .iter()
        .flat_map(|d| [d.stored_bytes, d.egress_bytes, d.ingress_bytes])
        .collect();
    assert_eq!(figures, expected, "daily figures");
    let stored = between(dom, "id=\"stored-chart\"", "</figure>");
    assert_eq!(
        stored.matches("<circle").count(),
        days.len(),
        "stored chart"
    );
    let network = between(dom, "id=\"network-chart\"", "</figure>");
    assert_eq!(
        network.matches("<circle").count(),
        2 * days.len(),
        "network chart"
    );
    assert!(stored.contains("day of month (UTC)"));
    assert!(!dom.contains("<script"), "no JavaScript");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_in_a_browser_show_the_figures_of_the_api() {
    let Some(binary) = chromium() else {
        return;
    };
    let browser = Browser {
        binary,
        profile: tempfile::tempdir().unwrap(),
        shots: tempfile::tempdir().unwrap(),
    };
    let server = TestServer::start(Backend::Sqlite).await.unwrap();
    let mut c = clients(&server).await;
    put_on_plan(&mut c, "web", plan("silver", 1, 1_000_000, 90_000)).await;
    c.plans
        .create_plan(pb::CreatePlanRequest {
            plan: Some(plan("gold", 5, 800_000, 70_000)),
        })
        .await
        .unwrap();
    for project in ["api", "docs"] {
        c.plans
            .assign_plan(pb::AssignPlanRequest {
                project_id: project.into(),
                plan_id: "silver".into(),
            })
            .await
            .unwrap();
    }
    c.controls
        .update_usage_controls(pb::UpdateUsageControlsRequest {
            project_id: "web".into(),
            controls: Some(pb::UsageControls {
                spend_cap_micros: Some(10_000_000),
                storage_cap_bytes: Some(8 * GIB),
                alert_thresholds: vec![50, 80, 100],
                ..Default::default()
            }),
            update_mask: None,
            apply_to_existing: false,
        })
        .await
        .unwrap();
    // November for "web": a 2 GiB base from the 1st, a build each third day that lives five
    // days, egress every day and ingress with each build; the business plan from the 16th at
    // 05:30. "api" and "docs" store and send less.
    server.clock.set(at(2026, 11, 1, 3));
    record_artifact(&server, "web", "base/toolchain.tar", 2 * GIB, None).await;
    record_artifact(&server, "api", "dist/api.tar", 600 * MIB, None).await;
    record_artifact(&server, "docs", "site.zip", 40 * MIB, None).await;
    for day in 1..=30u32 {
        let noon = at(2026, 11, day, 12);
        egress(&server, "web", i64::from(day % 7 + 1) * 180 * MIB, noon).await;
        egress(&server, "api", i64::from(day % 3) * 90 * MIB, noon).await;
        if day == 16 {
            server
                .clock
                .set(at(2026, 11, 16, 5).saturating_add_micros(1_800_000_000));
            c.plans
                .assign_plan(pb::AssignPlanRequest {
                    project_id: "web".into(),
                    plan_id: "gold".into(),
                })
                .await
                .unwrap();
        }
        if day % 3 == 1 {
            server.clock.set(at(2026, 11, day, 9));
            let size = i64::from(day) * 25 * MIB + 300 * MIB;
            let expires = at(2026, 11, day, 9).saturating_add_micros(5 * 86_400_000_000);
            record_artifact(
                &server,
                "web",
                &format!("builds/{day}/app.tar"),
                size,
                Some(expires),
            )
            .await;
            ingress(&server, "web", size, at(2026, 11, day, 9)).await;
        }
    }
    let web = ProjectId::parse("p", "web").unwrap();
    for (meter, threshold, basis, figure, limit, when) in [
        (
            "storage",
            50,
            "storage_cap",
            "4.30 GiB",
            "8 GiB",
            at(2026, 11, 4, 9),
        ),
        (
            "spend",
            50,
            "spend_cap",
            "5.12 USD",
            "10.00 USD",
            at(2026, 11, 19, 9),
        ),
    ] {
        server
            .app
            .store
            .record_alert(
                &web,
                &UsageAlert {
                    period: "2026-11".into(),
                    meter: meter.into(),
                    threshold,
                    basis: basis.into(),
                    figure: figure.into(),
                    limit: limit.into(),
                    crossed_at: when,
                },
            )
            .await
            .unwrap();
    }
    let base = format!("http://{}", server.http_addr);

    // The open month, mid-way: projected total, one marker per day of all 30 days.
    server.clock.set(at(2026, 11, 20, 15));
    let url = format!("{base}/ui/projects/web?month=2026-11");
    let dom = browser.dom(url.clone()).await;
    let open = bill(&mut c, "web", "2026-11").await;
    assert!(!open.closed && open.projected_total_micros.is_some());
    check_project_page(
        &dom,
        &open,
        &daily(&mut c, "web", "2026-11-01", "2026-11-30").await,
    );
    assert!(dom.contains("<span class=\"badge open\">open</span>"));

    // December, after the grace: November is closed.
    server.clock.set(at(2026, 12, 1, 2));
    let closed = bill(&mut c, "web", "2026-11").await;
    assert!(closed.closed);
    let dom = browser.dom(url.clone()).await;
    let days = daily(&mut c, "web", "2026-11-01", "2026-11-30").await;
    assert_eq!(days.len(), 30);
    check_project_page(&dom, &closed, &days);
    assert!(dom.contains("<span class=\"badge closed\">closed</span>"));
    // The plan change shows, and the alerts crossed.
    let plan_section = between(&dom, "<section id=\"plan\">", "</section>");
    assert!(
        plan_section
            .contains("<code>silver</code> v1: 2026-11-01T00:00:00Z → 2026-11-16T05:30:00Z"),
        "{plan_section}"
    );
    assert!(
        plan_section.contains("<code>gold</code> v1: 2026-11-16T05:30:00Z → 2026-12-01T00:00:00Z"),
        "{plan_section}"
    );
    let alerts = between(&dom, "<section id=\"alerts\">", "</section>");
    assert_eq!(
        alerts.matches("<tr>").count(),
        3,
        "a header and two alerts: {alerts}"
    );
    // The largest artifacts at the month's end: the base and the builds still live then.
    let largest = between(&dom, "<table id=\"largest\">", "</table>");
    assert!(largest.contains("base/toolchain.tar"), "{largest}");
    assert_eq!(attrs(largest, "data-bytes")[0], (2 * GIB).to_string());
    // The top-level folders holding the most then: base/ (2 GiB), builds/ (the 28th's).
    let folders = between(&dom, "<table id=\"folders\">", "</table>");
    assert!(
        folders.contains("base/") && folders.contains("builds/"),
        "{folders}"
    );
    assert_eq!(
        attrs(folders, "data-bytes"),
        [
            (2 * GIB).to_string(),
            (28 * 25 * MIB + 300 * MIB).to_string()
        ]
    );
    // Months link both ways.
    assert!(dom.contains("href=\"/ui/projects/web?month=2026-10\""));
    assert!(dom.contains("href=\"/ui/projects/web?month=2026-12\""));
    browser
        .screenshot(url.clone(), "ui-project.png", 1280, 2450)
        .await;
    browser
        .screenshot(url, "ui-project-phone.png", 390, 3300)
        .await;

    // The current month has 31 days: 31 markers, the days after today at zero.
    let dom = browser
        .dom(format!("{base}/ui/projects/web?month=2026-12"))
        .await;
    let december = bill(&mut c, "web", "2026-12").await;
    check_project_page(
        &dom,
        &december,
        &daily(&mut c, "web", "2026-12-01", "2026-12-31").await,
    );

    // Every project: the closed month's totals are the invoices', one sparkline each.
    let url = format!("{base}/ui/?month=2026-11");
    let dom = browser.dom(url.clone()).await;
    let table = between(&dom, "<table id=\"projects\"", "</table>");
    assert_eq!(
        attrs(table, "data-project"),
        ["web", "api", "docs"],
        "largest total first"
    );
    for project in ["web", "api", "docs"] {
        let row = between(table, &format!("data-project=\"{project}\""), "</tr>");
        let total = bill(&mut c, project, "2026-11").await.total_micros;
        assert_eq!(attrs(row, "data-micros"), [total.to_string()], "{project}");
        assert_eq!(row.matches("<circle").count(), 30, "{project}'s sparkline");
    }
    let by_name = browser
        .dom(format!("{base}/ui/?month=2026-11&sort=project"))
        .await;
    let table = between(&by_name, "<table id=\"projects\"", "</table>");
    assert_eq!(attrs(table, "data-project"), ["api", "docs", "web"]);
    browser.screenshot(url, "ui-projects.png", 1280, 420).await;
    browser
        .screenshot(format!("{base}/ui/sign-in"), "ui-sign-in.png", 800, 600)
        .await;
    server.stop().await;
}

/// Without a browser, on both backends: the largest artifacts, scopes and folders the page
/// lists come from bounded queries that read the same on SQLite and Postgres (folder
/// extraction is dialect SQL), and an artifact ended before the instant is not among them.
async fn the_project_page_lists_what_is_stored(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    server.clock.set(at(2026, 11, 2, 0));
    let shop = ProjectId::parse("p", "shop").unwrap();
    server
        .app
        .store
        .ensure_project(&shop, "free", at(2026, 11, 2, 0))
        .await
        .unwrap();
    for (path, size) in [
        ("dist/app.tar", 30 * MIB),
        ("dist/app.sha", 1),
        ("logs/run.txt", 5 * MIB),
        ("README", 7 * MIB),
        ("dist/deep/x/y.bin", 2 * MIB),
    ] {
        record_artifact(&server, "shop", path, size, None).await;
    }
    let gone = at(2026, 11, 3, 0);
    record_artifact(&server, "shop", "tmp/huge.bin", GIB, Some(gone)).await;
    server.clock.set(at(2026, 11, 10, 0));
    let page = common::http::get(server.http_addr, "/ui/projects/shop?month=2026-11", &[]).await;
    assert_eq!(page.status, hyper::StatusCode::OK, "{}", page.text());
    let html = page.text();
    let folders = between(&html, "<table id=\"folders\">", "</table>");
    assert_eq!(
        attrs(folders, "data-bytes"),
        [
            (32 * MIB + 1).to_string(),
            (7 * MIB).to_string(),
            (5 * MIB).to_string()
        ]
    );
    for name in ["dist/", "(top level)", "logs/"] {
        assert!(folders.contains(name), "{name} in {folders}");
    }
    assert!(!folders.contains("tmp/"), "ended before the instant");
    let largest = between(&html, "<table id=\"largest\">", "</table>");
    assert_eq!(
        attrs(largest, "data-bytes"),
        ["31457280", "7340032", "5242880", "2097152", "1"]
    );
    let scopes = between(&html, "<table id=\"scopes\">", "</table>");
    assert_eq!(attrs(scopes, "data-bytes"), [(44 * MIB + 1).to_string()]);
    server.stop().await;
}

/// The project page's "What is stored" section for `month`.
async fn stored_section(server: &TestServer, month: &str) -> String {
    let page = common::http::get(
        server.http_addr,
        &format!("/ui/projects/shop?month={month}"),
        &[],
    )
    .await;
    assert_eq!(page.status, hyper::StatusCode::OK, "{}", page.text());
    between(&page.text(), "<section id=\"stored\">", "</section>").to_owned()
}

/// Migration 14 adds `artifacts_live_size`: a database written under migrations 1–13 lists
/// the same largest artifacts, folders and scopes after the upgrade, for the current month
/// (live rows only) and for a past one (rows ended since its end are still listed there),
/// with more candidates than the page shows in both halves of the query. On Postgres the
/// largest-artifacts query can walk the new index.
async fn a_database_from_before_the_live_size_index_reads_the_same(backend: Backend) {
    use sea_orm::{ConnectionTrait, Statement};
    let Some(db) = TestDb::create(backend).await else {
        return;
    };
    {
        db.migrate_to(13).await;
    }
    let has_index = |server: &TestServer| {
        let db = server.app.store.connection().clone();
        async move {
            let sql = match db.get_database_backend() {
                sea_orm::DbBackend::Postgres => {
                    "SELECT COUNT(*) FROM pg_indexes WHERE indexname = 'artifacts_live_size'"
                }
                _ => {
                    "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' \
                     AND name = 'artifacts_live_size'"
                }
            };
            let row = db
                .query_one_raw(Statement::from_string(db.get_database_backend(), sql))
                .await
                .unwrap()
                .unwrap();
            row.try_get_by_index::<i64>(0).unwrap() == 1
        }
    };
    let mut old = TestServer::start_on(db, |config| {
        config.migrate_on_start = false;
        config.redis_url = None;
    })
    .await;
    assert!(!has_index(&old).await, "the previous schema");
    let shop = ProjectId::parse("p", "shop").unwrap();
    let scope =
        artifactd::domain::Scope::parse("scope", "shop", artifactd::domain::ScopeKind::Job, "j")
            .unwrap();
    old.clock.set(at(2026, 10, 1, 0));
    old.app
        .store
        .ensure_project(&shop, "free", old.clock.now())
        .await
        .unwrap();
    old.clock.set(at(2026, 10, 5, 0));
    record_artifact(&old, "shop", "keep/a.bin", 30 * MIB, None).await;
    record_artifact(&old, "shop", "b.bin", 7 * MIB, Some(at(2026, 11, 10, 0))).await;
    record_artifact(&old, "shop", "c.bin", 5 * MIB, None).await;
    record_artifact(&old, "shop", "gone/d.bin", GIB, Some(at(2026, 10, 6, 0))).await;
    record_artifact(&old, "shop", "e.bin", 3 * MIB, None).await;
    // 22 small files, all ended after October: more than the page shows.
    for n in 0..22 {
        record_artifact(&old, "shop", &format!("many/f{n:02}"), 1024 + n, None).await;
    }
    // 22 more that stay: the live half also has more than the page shows.
    for n in 0..22 {
        record_artifact(&old, "shop", &format!("live/f{n:02}"), 512 + n, None).await;
    }
    let end = |server: &TestServer, path: &str, recursive: bool| {
        let (store, scope, now) = (server.app.store.clone(), scope.clone(), server.clock.now());
        let path = artifactd::domain::ArtifactPath::parse("path", path).unwrap();
        async move {
            store
                .end_live(&scope, Some(&path), recursive, now)
                .await
                .unwrap()
        }
    };
    old.clock.set(at(2026, 10, 20, 0));
    end(&old, "e.bin", false).await;
    // Shortly after October ended, inside its invoice grace: the code of today would
    // finalize October on a later read, and the previous schema cannot hold that.
    old.clock
        .set(at(2026, 11, 1, 0).saturating_add_micros(600_000_000));
    end(&old, "c.bin", false).await;
    end(&old, "many", true).await;
    // The sweeper's mark on the expired one (deleted_at = its expiry).
    old.app
        .store
        .end_expired(old.clock.now(), None, 100)
        .await
        .unwrap();
    let now = at(2026, 11, 1, 0).saturating_add_micros(1_800_000_000);
    old.clock.set(now);
    let before = (
        stored_section(&old, "2026-10").await,
        stored_section(&old, "2026-11").await,
    );
    // October's end: a, b, c, then the 17 largest of the files ended since; November (now):
    // a, b, then the 18 largest live files.
    let largest = |section: &str| {
        attrs(
            between(section, "<table id=\"largest\">", "</table>"),
            "data-bytes",
        )
    };
    let mut october = vec![
        (30 * MIB).to_string(),
        (7 * MIB).to_string(),
        (5 * MIB).to_string(),
    ];
    october.extend((5..22).rev().map(|n| (1024 + n).to_string()));
    assert_eq!(largest(&before.0), october);
    let mut november = vec![(30 * MIB).to_string(), (7 * MIB).to_string()];
    november.extend((4..22).rev().map(|n| (512 + n).to_string()));
    assert_eq!(largest(&before.1), november);
    old.shut_down().await;

    let server = TestServer::start_on(old.db.shared(), |_| {}).await;
    assert!(has_index(&server).await, "migration 14 ran");
    server.clock.set(now);
    let after = (
        stored_section(&server, "2026-10").await,
        stored_section(&server, "2026-11").await,
    );
    assert_eq!(before, after, "the page reads the same");

    if backend == Backend::Postgres {
        // The page's own query walks the new index. A table this small would be scanned,
        // so this server's connections are told not to (enable_seqscan off for the
        // database), and Postgres' index statistics say whether the index was read.
        let scans = || async {
            let db = server.app.store.connection();
            let row = db
                .query_one_raw(Statement::from_string(
                    sea_orm::DbBackend::Postgres,
                    "SELECT idx_scan FROM pg_stat_user_indexes \
                     WHERE indexrelname = 'artifacts_live_size'",
                ))
                .await
                .unwrap()
                .unwrap();
            row.try_get_by_index::<i64>(0).unwrap()
        };
        let name = server.db.url.rsplit('/').next().unwrap().to_owned();
        server
            .app
            .store
            .connection()
            .execute_unprepared(&format!(
                "ALTER DATABASE \"{name}\" SET enable_seqscan = off"
            ))
            .await
            .unwrap();
        let fresh = TestServer::start_on(server.db.shared(), |_| {}).await;
        fresh.clock.set(now);
        let before = scans().await;
        assert_eq!(stored_section(&fresh, "2026-11").await, after.1);
        let deadline = Instant::now() + Duration::from_secs(10);
        // Statistics reach other sessions within about a second.
        while scans().await == before {
            assert!(
                Instant::now() < deadline,
                "artifacts_live_size never read: {before} scans"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        fresh.stop().await;
    }
    server.stop().await;
    drop(old);
}

/// The project ids of every page of `/ui/` from `first`, following the "Next page" links.
async fn projects_in_page_order(server: &TestServer, first: &str) -> (Vec<String>, usize) {
    let (mut projects, mut pages, mut url) = (Vec::new(), 0, first.to_owned());
    loop {
        let page = common::http::get(server.http_addr, &url, &[]).await;
        assert_eq!(page.status, hyper::StatusCode::OK, "{url}: {}", page.text());
        let html = page.text();
        pages += 1;
        projects.extend(attrs(
            between(&html, "<table id=\"projects\"", "</table>"),
            "data-project",
        ));
        // The link to the next page (not the month navigation's).
        match html.find("Next page") {
            Some(i) => {
                let from = html[..i].rfind("href=\"").unwrap() + "href=\"".len();
                let rest = &html[from..];
                url = rest[..rest.find('"').unwrap()].replace("&amp;", "&");
                assert!(pages < 10, "paging does not end");
            }
            None => return (projects, pages),
        }
    }
}

/// `/ui/` orders every project across its pages by any column, either way: 60 projects
/// (3 pages of 25) with many equal figures, the open month (drafts sorted in memory) and the
/// same month closed (invoices sorted by the database). Each order, page after page, is
/// exactly the full list sorted independently here: nothing repeated, nothing skipped.
async fn the_projects_page_sorts_across_pages_by_every_column(backend: Backend) {
    use artifactd::domain::metering::{Month, ProjectTotals, ProjectsSort};
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut c = clients(&server).await;
    server.clock.set(at(2026, 10, 31, 0));
    c.plans
        .create_plan(pb::CreatePlanRequest {
            plan: Some(plan("paid", 0, 1_000_000, 3_000_000)),
        })
        .await
        .unwrap();
    for i in 0..60i64 {
        // Ids in an order unrelated to the figures.
        let id = format!("p{:02}", (i * 37) % 60);
        let project = ProjectId::parse("p", &id).unwrap();
        server
            .app
            .store
            .ensure_project(&project, "free", server.clock.now())
            .await
            .unwrap();
        if i % 3 != 0 {
            c.plans
                .assign_plan(pb::AssignPlanRequest {
                    project_id: id.clone(),
                    plan_id: "paid".into(),
                })
                .await
                .unwrap();
        }
        server.clock.set(at(2026, 11, 1, 0));
        if i % 2 == 0 {
            record_artifact(&server, &id, "a.bin", ((i * 13) % 9 + 1) * MIB, None).await;
        }
        egress(&server, &id, ((i * 7) % 11) * MIB, at(2026, 11, 3, 0)).await;
        ingress(&server, &id, (i % 4) * 1000, at(2026, 11, 4, 0)).await;
        server.clock.set(at(2026, 10, 31, 0));
    }
    let month = Month::parse("m", "2026-11").unwrap();
    for (when, state) in [
        (at(2026, 11, 20, 0), "open"),
        (at(2026, 12, 2, 0), "closed"),
    ] {
        server.clock.set(when);
        if state == "closed" {
            server.app.metering.finalize_month(month).await.unwrap();
        }
        let rows = server
            .app
            .metering
            .projects_usage(month, ProjectsSort::default(), None, 1000)
            .await
            .unwrap();
        assert_eq!(rows.len(), 60);
        let distinct = |f: fn(&ProjectTotals) -> i128| {
            rows.iter()
                .map(f)
                .collect::<std::collections::HashSet<_>>()
                .len()
        };
        // Ties on every figure, and more than one value of each.
        for (name, n) in [
            ("total", distinct(|r| r.total_micros.into())),
            ("storage", distinct(|r| r.storage_byte_micros)),
            ("egress", distinct(|r| r.egress_bytes.into())),
            ("ingress", distinct(|r| r.ingress_bytes.into())),
        ] {
            assert!(n > 1 && n < 60, "{state}: {name} has {n} values");
        }
        for key in ["project", "total", "storage", "egress", "ingress"] {
            for dir in ["asc", "desc"] {
                let mut expected = rows.clone();
                expected.sort_by(|a, b| {
                    let figure = |r: &ProjectTotals| -> i128 {
                        match key {
                            "total" => r.total_micros.into(),
                            "storage" => r.storage_byte_micros,
                            "egress" => r.egress_bytes.into(),
                            "ingress" => r.ingress_bytes.into(),
                            _ => 0,
                        }
                    };
                    let by_figure = figure(a).cmp(&figure(b));
                    let by_id = a.project_id.cmp(&b.project_id);
                    match (key, dir) {
                        ("project", "asc") => by_id,
                        ("project", _) => by_id.reverse(),
                        (_, "asc") => by_figure.then(by_id),
                        _ => by_figure.reverse().then(by_id),
                    }
                });
                let expected: Vec<String> = expected.into_iter().map(|r| r.project_id).collect();
                let (got, pages) = projects_in_page_order(
                    &server,
                    &format!("/ui/?month=2026-11&sort={key}&dir={dir}"),
                )
                .await;
                assert_eq!(pages, 3, "{state} {key} {dir}");
                assert_eq!(got, expected, "{state} {key} {dir}");
            }
        }
        // Without parameters: largest total first, as ListProjectsUsage lists them.
        let (got, _) = projects_in_page_order(&server, "/ui/?month=2026-11").await;
        assert_eq!(
            got,
            rows.iter()
                .map(|r| r.project_id.clone())
                .collect::<Vec<_>>()
        );
    }
    // A column's link flips the direction of the column shown, and starts other columns
    // in their own first order; bad parameters are the page's 400.
    let html = common::http::get(
        server.http_addr,
        "/ui/?month=2026-11&sort=egress&dir=desc",
        &[],
    )
    .await
    .text();
    let head = between(&html, "<thead>", "</thead>");
    for link in [
        "/ui/?month=2026-11&amp;sort=egress&amp;dir=asc",
        "/ui/?month=2026-11&amp;sort=project&amp;dir=asc",
        "/ui/?month=2026-11&amp;sort=storage&amp;dir=desc",
    ] {
        assert!(head.contains(link), "{link} in {head}");
    }
    for (query, message) in [
        ("sort=size", "sort: &quot;size&quot; is not a column"),
        (
            "sort=total&dir=up",
            "dir: &quot;up&quot; is not a direction",
        ),
        (
            "sort=total&page=bm90IGEgdG9rZW4",
            "page: is not a page this listing linked to",
        ),
        (
            "sort=project&page=MTI6cDAx",
            "page: is not a page this listing linked to",
        ),
    ] {
        let reply = common::http::get(
            server.http_addr,
            &format!("/ui/?month=2026-11&{query}"),
            &[],
        )
        .await;
        assert_eq!(reply.status, hyper::StatusCode::BAD_REQUEST, "{query}");
        assert!(reply.text().contains(message), "{query}: {}", reply.text());
    }
    server.stop().await;
}
