#![allow(clippy::unwrap_used)]
//! The real `artifact` binary against a real artifactd server: Semaphore's path mapping,
//! folders with modes, symlinks, stdin/stdout, refusals, every exit code, resumed downloads.

mod common;

use common::*;
use std::path::{Path, PathBuf};

fn paths(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_maps_paths_as_semaphore_does() {
    let server = Server::start().await;
    let cli = Cli::new(&server.url());
    cli.write("long/path/to/x.zip", b"zip", 0o644);
    cli.write("src/sub/a", b"a", 0o644);
    cli.write("src/sub/b/c", b"c", 0o644);
    cli.write(".hidden", b"h", 0o600);
    let absolute = cli.path("long/path/to/x.zip").display().to_string();
    let cases: Vec<(Vec<&str>, Vec<String>)> = vec![
        (vec!["long/path/to/x.zip"], paths(&["x.zip"])),
        (vec!["./long/path/to/x.zip"], paths(&["x.zip"])),
        (vec![absolute.as_str()], paths(&["x.zip"])),
        (
            vec!["long/path/to/x.zip", "-d", "long/path/y.zip"],
            paths(&["long/path/y.zip"]),
        ),
        (
            vec!["long/path/to/x.zip", "-d", "/long/path/y.zip"],
            paths(&["long/path/y.zip"]),
        ),
        (
            vec!["long/path/to/x.zip", "-d", "./y.zip"],
            paths(&["y.zip"]),
        ),
        (vec!["long/path/to/x.zip", "-d", "../../y"], paths(&["y"])),
        (vec!["src/sub"], paths(&["sub/a", "sub/b/c"])),
        (vec!["src/sub/"], paths(&["sub/a", "sub/b/c"])),
        (
            vec!["src/sub", "-d", "out/d"],
            paths(&["out/d/a", "out/d/b/c"]),
        ),
        (vec![".hidden"], paths(&[".hidden"])),
    ];
    for (i, (args, want)) in cases.into_iter().enumerate() {
        let job = format!("job-{i}");
        let mut full = vec!["push", "job"];
        full.extend(&args);
        full.extend(["--job-id", job.as_str()]);
        cli.ok(&full).await;
        let listed = cli.json(&["list", "job", "--job-id", &job]).await;
        let mut got: Vec<String> = listed
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["path"].as_str().unwrap().to_owned())
            .collect();
        got.sort();
        assert_eq!(got, want, "push job {}", args.join(" "));
    }

    // `push job .` keeps the names whole (Semaphore's CLI cuts their first character).
    let here = Cli::new(&server.url());
    here.write("a", b"a", 0o644);
    here.write("b/c", b"c", 0o644);
    here.ok(&["push", "job", ".", "--job-id", "dot"]).await;
    let mut dot = Cli::new(&server.url());
    dot.set("SEMAPHORE_JOB_ID", "dot");
    assert_eq!(dot.remote_paths("job").await, paths(&["a", "b/c"]));

    // stdin needs -d.
    let run = cli
        .run_with_stdin(
            &["push", "job", "-", "-d", "f.txt"],
            Some(b"from stdin".to_vec()),
        )
        .await;
    run.assert_code(0);
    assert_eq!(
        run.stdout(),
        "pushed 'f.txt' (10 B, sha256 \
         e1c20b6b2e4a4ba1b0e6a9ac23dfd1b16d4bf5ab8dfba6fa2f8d4b7b70e05bd1) to job j1\n"
            .replace(
                "e1c20b6b2e4a4ba1b0e6a9ac23dfd1b16d4bf5ab8dfba6fa2f8d4b7b70e05bd1",
                &sha256_hex(b"from stdin")
            )
    );
    cli.run(&["push", "job", "-"]).await.assert_error(
        1,
        "pushing stdin needs a name: add -d NAME (e.g. `artifact push job - -d log.txt`)",
    );
    server.stop().await;
}

fn sha256_hex(data: &[u8]) -> String {
    use std::fmt::Write;
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    digest.as_ref().iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_and_yank_map_paths_as_semaphore_does() {
    let server = Server::start().await;
    let cli = Cli::new(&server.url());
    cli.write("in/x.zip", b"x-content", 0o640);
    cli.write("in/logs/a", b"log a", 0o644);
    cli.write("in/logs/b/c", b"log c", 0o755);
    cli.ok(&["push", "job", "in/x.zip", "-d", "long/path/x.zip"])
        .await;
    cli.ok(&["push", "job", "in/logs", "-d", "logs"]).await;

    cli.ok(&["pull", "job", "long/path/x.zip"]).await;
    assert_eq!(cli.read("x.zip"), b"x-content");
    cli.ok(&["pull", "job", "/long/path/x.zip", "-d", "a/y.zip"])
        .await;
    assert_eq!(cli.read("a/y.zip"), b"x-content");
    let absolute = cli.path("abs/y.zip").display().to_string();
    cli.ok(&["pull", "job", "./long/path/x.zip", "-d", &absolute])
        .await;
    assert_eq!(cli.read("abs/y.zip"), b"x-content");

    let out = cli.ok(&["pull", "job", "logs"]).await;
    assert_eq!(out, "pulled 2 files (10 B) into 'logs'\n");
    assert_eq!(
        tree(&cli.path("logs")),
        vec![
            ("a".to_owned(), b"log a".to_vec(), 0o644),
            ("b/c".to_owned(), b"log c".to_vec(), 0o755),
        ]
    );
    cli.ok(&["pull", "job", "logs", "-d", "a/dbg"]).await;
    assert_eq!(tree(&cli.path("a/dbg")), tree(&cli.path("logs")));
    // The mode pulled is the mode pushed.
    assert_eq!(tree(&cli.path("a"))[0].2 & 0o777, 0o644);
    assert_eq!(
        tree(&cli.path("."))
            .into_iter()
            .find(|(p, ..)| p == "x.zip")
            .unwrap()
            .2,
        0o640
    );
    // No temporary file is left behind.
    assert!(
        tree(&cli.path("."))
            .iter()
            .all(|(p, ..)| !p.contains("artifact-part")),
        "{:?}",
        tree(&cli.path("."))
    );

    // Yank: a file, then a folder recursively.
    let out = cli.ok(&["yank", "job", "/long/path/x.zip"]).await;
    assert_eq!(out, "yanked 'long/path/x.zip' from job j1 (1 files, 9 B)\n");
    let yanked = cli.json(&["yank", "job", "logs"]).await;
    assert_eq!(yanked["deleted_count"], 2);
    assert!(cli.remote_paths("job").await.is_empty());
    cli.run(&["yank", "job", "logs"]).await.assert_error(
        2,
        "yank of 'logs': no artifact \"logs\" in job j1 of project p1: check the path and the \
         scope id (`artifact list` shows what is there)",
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn folders_keep_modes_hidden_files_and_symlinks() {
    let server = Server::start().await;
    let cli = Cli::new(&server.url());
    cli.write("dist/bin/tool", &content(200_000, 1), 0o755);
    cli.write("dist/.env", b"HIDDEN=1", 0o600);
    cli.write("dist/deep/er/file.txt", &content(70_000, 2), 0o644);
    cli.write("dist/empty", b"", 0o444);
    for i in 0..50 {
        cli.write(
            &format!("dist/many/{i:03}"),
            &content(i * 100, i as u64),
            0o640,
        );
    }
    std::os::unix::fs::symlink("bin/tool", cli.path("dist/tool-link")).unwrap();
    std::os::unix::fs::symlink("../outside", cli.path("dist/dangling")).unwrap();

    // Followed by default: a dangling link cannot be followed.
    let run = cli.run(&["push", "workflow", "dist"]).await;
    run.assert_error(
        2,
        "cannot read 'dist/dangling': No such file or directory (os error 2): fix or remove it \
         (a broken link can be pushed with --preserve-symlinks)",
    );
    std::fs::remove_file(cli.path("dist/dangling")).unwrap();
    let pushed = cli.json(&["push", "workflow", "dist"]).await;
    assert_eq!(pushed["files"], 55);
    let original = tree(&cli.path("dist"));
    let mut pull = Cli::new(&server.url());
    pull.set("SEMAPHORE_JOB_ID", "another-job");
    pull.ok(&["pull", "workflow", "dist"]).await;
    let mut followed = original.clone();
    for entry in &mut followed {
        if entry.0 == "tool-link" {
            *entry = ("tool-link".into(), content(200_000, 1), 0o755);
        }
    }
    assert_eq!(tree(&pull.path("dist")), followed);

    // --preserve-symlinks stores links as links and pull recreates them.
    std::os::unix::fs::symlink("../outside", cli.path("dist/dangling")).unwrap();
    cli.ok(&[
        "push",
        "project",
        "dist",
        "-d",
        "kept",
        "--preserve-symlinks",
    ])
    .await;
    let link = cli.json(&["stat", "project", "kept/tool-link"]).await;
    assert_eq!(link["mode"], "120777");
    assert_eq!(link["size"], 8);
    pull.ok(&["pull", "project", "kept"]).await;
    assert_eq!(tree(&pull.path("kept")), tree(&cli.path("dist")));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_and_stdout() {
    let server = Server::start().await;
    let cli = Cli::new(&server.url());
    let data = content(3 * 1024 * 1024 + 7, 9);
    let run = cli
        .run_with_stdin(&["push", "job", "-", "-d", "big.bin"], Some(data.clone()))
        .await;
    run.assert_code(0);
    let run = cli.run(&["pull", "job", "big.bin", "-d", "-"]).await;
    run.assert_code(0);
    assert!(
        run.output.stdout == data,
        "stdout differs ({} bytes)",
        run.output.stdout.len()
    );
    assert_eq!(run.stderr(), "");
    let small = cli
        .run_with_stdin(&["push", "job", "-", "-d", "s"], Some(b"tiny".to_vec()))
        .await;
    small.assert_code(0);
    let run = cli.run(&["pull", "job", "s", "-d", "-"]).await;
    assert_eq!(run.output.stdout, b"tiny");
    server.stop().await;
}

/// A destination that is a FIFO (or `/dev/null`, a terminal) is written into, not replaced:
/// the pull once renamed its temporary file over `-d /dev/null`, leaving a regular file
/// there. Small (gathered in memory) and large (streamed) artifacts alike, without --force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_destination_is_written_into_not_replaced() {
    let server = Server::start().await;
    let cli = Cli::new(&server.url());
    let big = content(3 * 1024 * 1024 + 5, 21);
    cli.write("big.bin", &big, 0o644);
    cli.write("small.txt", b"small artifact", 0o644);
    cli.ok(&["push", "job", "big.bin"]).await;
    cli.ok(&["push", "job", "small.txt"]).await;
    let fifo = mkfifo(&cli.path("pipe"));
    for (remote, want) in [
        ("big.bin", big.clone()),
        ("small.txt", b"small artifact".to_vec()),
    ] {
        let reader = read_fifo(&fifo);
        cli.ok(&["pull", "job", remote, "-d", "pipe"]).await;
        // Checked before joining: a pull that replaced the FIFO never opened it, and its
        // reader would wait for ever.
        assert!(is_fifo(&fifo), "{remote}: the FIFO was replaced");
        let got = reader.join().unwrap();
        assert!(
            got == want,
            "{remote}: the FIFO's reader got {} bytes",
            got.len()
        );
    }
    let leftovers: Vec<_> = std::fs::read_dir(cli.path("."))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".artifact-part"))
        .collect();
    assert_eq!(leftovers, Vec::<String>::new());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_targets_are_refused_without_force() {
    let server = Server::start().await;
    let cli = Cli::new(&server.url());
    cli.write("reports/a.xml", b"a1", 0o644);
    cli.write("reports/b.xml", b"b1", 0o644);
    cli.write("reports/c.xml", b"c1", 0o644);
    cli.ok(&["push", "job", "reports/b.xml", "-d", "reports/b.xml"])
        .await;
    // A folder push checks every target before it uploads anything.
    cli.run(&["push", "job", "reports"]).await.assert_error(
        3,
        "'reports/b.xml' already exists in job j1: add --force to replace it; nothing was pushed",
    );
    assert_eq!(cli.remote_paths("job").await, paths(&["reports/b.xml"]));
    // A single file: the server refuses.
    cli.run(&["push", "job", "reports/a.xml", "-d", "reports/b.xml"])
        .await
        .assert_error(
            3,
            "push of 'reports/b.xml': already exists: add --force to replace it",
        );
    cli.write("reports/b.xml", b"b2", 0o644);
    cli.ok(&["push", "job", "reports", "--force"]).await;
    assert_eq!(
        cli.remote_paths("job").await,
        paths(&["reports/a.xml", "reports/b.xml", "reports/c.xml"])
    );

    // Pull refuses to overwrite any local file, before it downloads anything.
    let puller = Cli::new(&server.url());
    puller.write("reports/c.xml", b"local", 0o644);
    puller.run(&["pull", "job", "reports"]).await.assert_error(
        3,
        "'reports/c.xml' already exists locally: delete it first or add --force; nothing was pulled",
    );
    assert!(!puller.path("reports/a.xml").exists());
    assert_eq!(puller.read("reports/c.xml"), b"local");
    puller.ok(&["pull", "job", "reports", "--force"]).await;
    assert_eq!(puller.read("reports/b.xml"), b"b2");
    assert_eq!(puller.read("reports/c.xml"), b"c1");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_exit_code() {
    let server = Server::start_with(|c| c.max_artifact_bytes = 1000).await;
    let mut cli = Cli::new(&server.url());
    cli.write("f", b"data", 0o644);
    cli.write("big", &content(2000, 3), 0o644);
    // 0
    cli.ok(&["push", "job", "f"]).await;
    // 1: usage
    let run = cli.run(&["push", "nowhere", "f"]).await;
    run.assert_code(1);
    assert!(
        run.stderr().contains("invalid value 'nowhere'"),
        "{}",
        run.stderr()
    );
    cli.run(&["push", "job", "f", "--expire-in", "soon"]).await.assert_error(
        1,
        "--expire-in 'soon' is not a duration: use a number and s, m, h, d, w or y (30d, 1w) or never",
    );
    cli.unset("SEMAPHORE_JOB_ID");
    cli.run(&["push", "job", "f"]).await.assert_error(
        1,
        "job ID is not set: pass --job-id or set ARTIFACTD_JOB_ID (or SEMAPHORE_JOB_ID)",
    );
    cli.set("ARTIFACTD_JOB_ID", "j1");
    // 2: not found, remote and local
    cli.run(&["pull", "job", "missing.txt"]).await.assert_error(
        2,
        "'missing.txt' not found in job j1: check the path and the id (`artifact list` shows what is there)",
    );
    cli.run(&["push", "job", "nope.txt"])
        .await
        .assert_error(2, "'nope.txt' does not exist locally: check the path");
    // 3: exists
    cli.run(&["push", "job", "f"]).await.assert_code(3);
    // 4: over the size limit
    let run = cli.run(&["push", "job", "big"]).await;
    run.assert_code(4);
    assert!(
        run.stderr()
            .ends_with(": yank artifacts you no longer need or ask for a larger plan\n"),
        "{}",
        run.stderr()
    );
    // 6: nothing listens there
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut down = Cli::new(&format!("http://127.0.0.1:{port}"));
    down.set("ARTIFACTD_RETRIES", "1");
    let run = down.run(&["list", "job"]).await;
    run.assert_code(6);
    assert!(
        run.stderr().starts_with("artifact: list: ")
            && run.stderr().ends_with(&format!(
                ": the server at http://127.0.0.1:{port} could not be reached; try again later\n"
            )),
        "{}",
        run.stderr()
    );
    server.stop().await;

    // 5: authentication and permission.
    let secured = Server::start_with(|c| {
        c.auth = artifactd::config::AuthMode::Jwt;
        c.jwt_secret = Some(SECRET.parse().unwrap());
    })
    .await;
    let mut cli = Cli::new(&secured.url());
    cli.write("f", b"data", 0o644);
    let run = cli.run(&["push", "job", "f"]).await;
    run.assert_code(5);
    assert!(
        run.stderr()
            .ends_with(": set ARTIFACTD_TOKEN (or ARTIFACTD_TOKEN_FILE) to a valid token\n"),
        "{}",
        run.stderr()
    );
    cli.set(
        "SEMAPHORE_ARTIFACT_TOKEN",
        &token("job", Some("other"), Some("j1")),
    );
    let run = cli.run(&["push", "job", "f"]).await;
    run.assert_code(5);
    assert!(
        run.stderr()
            .ends_with(": use a token issued for this project and scope\n"),
        "{}",
        run.stderr()
    );
    // The right token, from a file.
    std::fs::write(cli.path("token"), token("job", Some("p1"), Some("j1"))).unwrap();
    cli.ok(&["push", "job", "f", "--token-file", "token"]).await;
    cli.set(
        "ARTIFACTD_TOKEN_FILE",
        &cli.path("token").display().to_string(),
    );
    cli.ok(&["stat", "job", "f"]).await;
    secured.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expire_in_and_never() {
    let server = Server::start().await;
    let cli = Cli::new(&server.url());
    cli.write("f", b"data", 0o644);
    cli.ok(&["push", "job", "f", "--expire-in", "1w"]).await;
    let stat = cli.json(&["stat", "job", "f"]).await;
    assert_eq!(stat["created_at"], "2026-11-01T00:00:00Z");
    assert_eq!(stat["expires_at"], "2026-11-08T00:00:00Z");
    assert_eq!(stat["keep"], false);
    cli.ok(&["push", "job", "f", "-d", "g", "--expire-in", "never"])
        .await;
    assert_eq!(cli.json(&["stat", "job", "g"]).await["keep"], true);
    server.stop().await;
}

/// A download cut mid-stream resumes at the byte it stopped: the file is byte for byte
/// right and the bytes the client kept are each metered once. What the server handed to
/// the connection before the cut but the client never got is metered too (the server
/// meters what it sends, not what arrives): at most one HTTP/2 flow-control window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_download_resumes_and_is_metered_once() {
    let server = Server::start().await;
    let cli = Cli::new(&server.url());
    let size = 24 * 1024 * 1024;
    let data = content(size, 5);
    cli.write("big.bin", &data, 0o644);
    cli.ok(&["push", "job", "big.bin"]).await;

    let proxy = CutProxy::start(server.addr, Direction::Down, 9 * 1024 * 1024 + 123).await;
    let mut puller = Cli::new(&proxy.url());
    puller.set("ARTIFACTD_RETRIES", "5");
    let pulled = puller.json(&["pull", "job", "big.bin"]).await;
    assert_eq!(
        proxy.cuts.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the proxy cut once"
    );
    assert_eq!(pulled["pulled"][0]["sha256"], sha256_hex(&data));
    assert!(puller.read("big.bin") == data, "the resumed file differs");

    // The user-visible figure: `artifact usage`, once the stream's record is written.
    let mut egress = 0;
    for _ in 0..200 {
        let usage = cli.json(&["usage", "--month", "2026-11"]).await;
        egress = usage["egress_bytes"].as_i64().unwrap();
        if egress >= size as i64 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let window = 2 * 1024 * 1024 + 2 * 1024 * 1024;
    assert!(
        (size as i64..=size as i64 + window).contains(&egress),
        "egress {egress} for {size} bytes kept"
    );
    eprintln!(
        "metered {egress} bytes for {size} kept: {} sent before the cut were lost",
        egress - size as i64
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_and_bill_tables() {
    let server = Server::start().await;
    let cli = Cli::new(&server.url());
    cli.write("f", &content(1024 * 1024, 1), 0o644);
    cli.ok(&["push", "project", "f"]).await;
    server.clock.advance_seconds(86_400);
    let usage = cli.json(&["usage", "--month", "2026-11"]).await;
    assert_eq!(usage["project_id"], "p1");
    assert_eq!(usage["stored_bytes"], 1024 * 1024);
    assert_eq!(usage["live_artifacts"], 1);
    assert_eq!(usage["ingress_bytes"], 1024 * 1024);
    assert_eq!(usage["storage_byte_seconds"], "90596966400.000000");
    let text = cli.ok(&["usage", "--month", "2026-11"]).await;
    assert!(text.starts_with("project     p1\n"), "{text}");
    assert!(
        text.contains("stored now  1.0 MiB (1048576 bytes) in 1 files\n"),
        "{text}"
    );

    let bill = cli.json(&["bill", "--month", "2026-11"]).await;
    assert_eq!(bill["month"], "2026-11");
    assert!(
        bill["line_items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["meter"] == "storage")
    );
    let text = cli.ok(&["bill", "--month", "2026-11"]).await;
    assert!(
        text.starts_with("bill of project p1 for 2026-11 (plan "),
        "{text}"
    );
    assert!(text.contains("\nMETER"), "{text}");
    assert!(text.contains("\ntotal  "), "{text}");
    cli.run(&["bill", "--month", "2026-13"])
        .await
        .assert_error(1, "--month '2026-13' is not YYYY-MM (e.g. 2026-11)");
    server.stop().await;
}

/// An upload cut mid-stream resumes from the server's committed offset (QueryUpload): stored
/// byte for byte, its ingress counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_upload_resumes_and_is_counted_once() {
    let server = Server::start().await;
    let size = 24 * 1024 * 1024;
    let data = content(size, 11);
    let proxy = CutProxy::start(server.addr, Direction::Up, 9 * 1024 * 1024 + 77).await;
    let mut pusher = Cli::new(&proxy.url());
    pusher.set("ARTIFACTD_RETRIES", "8");
    pusher.write("up.bin", &data, 0o644);
    let pushed = pusher.json(&["push", "job", "up.bin"]).await;
    assert_eq!(proxy.cuts(), 1, "the proxy cut once");
    assert_eq!(pushed["artifacts"][0]["sha256"], sha256_hex(&data));
    let cli = Cli::new(&server.url());
    cli.ok(&["pull", "job", "up.bin"]).await;
    assert!(cli.read("up.bin") == data, "the stored file differs");
    let usage = cli.json(&["usage", "--month", "2026-11"]).await;
    assert_eq!(usage["ingress_bytes"], size as i64);
    server.stop().await;
}

/// Not a test: the body of the artifactd child process that the tests below start (see
/// `common::process`); in an ordinary run it returns at once.
#[test]
fn artifactd_child_process() {
    process::serve_if_child();
}

/// The server on https with a certificate from a CA of the user's own: with
/// `ARTIFACTD_CA_FILE` (or `--ca-file`) files go up and come back whole, over gRPC and over
/// HTTP (the usage export); without it every command fails at once with exit 5 and one
/// line that names the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_custom_ca() {
    let dir = tempfile::tempdir().unwrap();
    let mut env = local_stores(dir.path());
    env.push((
        "ARTIFACTD_TLS_CERT",
        tls_fixture("tls-cert.pem").display().to_string(),
    ));
    env.push((
        "ARTIFACTD_TLS_KEY",
        tls_fixture("tls-key.pem").display().to_string(),
    ));
    let server = process::ServerProcess::start(&env).await;
    let ca = tls_fixture("ca-cert.pem").display().to_string();
    let mut cli = Cli::new(&format!("https://127.0.0.1:{}", server.grpc.port()));
    cli.set("ARTIFACTD_CA_FILE", &ca);
    let small = content(1000, 31);
    let large = content(3 * 1024 * 1024 + 17, 32);
    cli.write("out/small.txt", &small, 0o640);
    cli.write("out/large.bin", &large, 0o755);
    cli.ok(&["push", "job", "out"]).await;
    cli.ok(&["pull", "job", "out", "-d", "back"]).await;
    assert_eq!(
        tree(&cli.path("back")),
        vec![
            ("large.bin".to_owned(), large.clone(), 0o755),
            ("small.txt".to_owned(), small.clone(), 0o640),
        ]
    );
    // The certificate names localhost too; --ca-file does what the variable does.
    let mut by_name = Cli::new(&format!("https://localhost:{}", server.grpc.port()));
    let pulled = by_name
        .json(&["stat", "job", "out/large.bin", "--ca-file", &ca])
        .await;
    assert_eq!(pulled["sha256"], sha256_hex(&large));
    // The usage export over https, with the same CA.
    let http_url = format!("https://127.0.0.1:{}", server.http.port());
    let csv = cli
        .ok(&[
            "usage",
            "--export",
            "--month",
            "2026-11",
            "--http-url",
            &http_url,
        ])
        .await;
    assert!(csv.starts_with("event_id,project_id,meter,"), "{csv}");

    // Without the CA: no retries, exit 5, the fix named.
    let hint = "the server's certificate is not trusted (invalid peer certificate: UnknownIssuer): \
                pass --ca-file or set ARTIFACTD_CA_FILE to the PEM file of the CA that signed it";
    cli.unset("ARTIFACTD_CA_FILE");
    cli.set("ARTIFACTD_RETRIES", "6");
    cli.run(&["push", "job", "out/small.txt", "-d", "again.txt"])
        .await
        .assert_error(5, &format!("push of 'again.txt': {hint}"));
    cli.run(&["pull", "job", "out/large.bin", "-d", "again.bin"])
        .await
        .assert_error(5, &format!("pull of 'out/large.bin': {hint}"));
    assert!(!cli.path("again.bin").exists());
    cli.run(&[
        "usage",
        "--export",
        "--month",
        "2026-11",
        "--http-url",
        &http_url,
    ])
    .await
    .assert_error(5, &format!("usage export of 2026-11: {hint}"));
    by_name.unset("ARTIFACTD_CA_FILE");
    by_name
        .run(&["list", "job"])
        .await
        .assert_error(5, &format!("list: {hint}"));
    // A CA file that is not there is the user's mistake, named.
    cli.run(&["list", "job", "--ca-file", "missing.pem"])
        .await
        .assert_error(
            2,
            "cannot read the CA file 'missing.pem': No such file or directory (os error 2)",
        );
}

/// The files below the server's blob directory `dir` whose path contains `part`, with
/// their sizes.
fn blob_files(dir: &std::path::Path, part: &str) -> Vec<(String, u64)> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.metadata() {
                Ok(meta) if meta.is_dir() => stack.push(path),
                Ok(meta) if path.to_string_lossy().contains(part) => {
                    found.push((path.display().to_string(), meta.len()));
                }
                _ => {}
            }
        }
    }
    found
}

const MIB: usize = 1024 * 1024;

/// The server killed (SIGKILL) in the middle of a large upload and started again on the same
/// port and database: the CLI finds it again by itself (retries with backoff), resumes from
/// what the server holds durably (QueryUpload), and the stored file is byte for byte right,
/// its ingress counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_survives_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = process::ServerProcess::start(&local_stores(dir.path())).await;
    let size = 48 * MIB;
    let data = content(size, 41);
    // The proxy pins the upload at 20 MiB, so the kill lands in its middle.
    let proxy = HoldProxy::start(server.grpc, Direction::Up, 20 * MIB as u64).await;
    let mut pusher = Cli::new(&proxy.url());
    pusher.set("ARTIFACTD_RETRIES", "8");
    pusher.write("up.bin", &data, 0o644);
    let pusher = std::sync::Arc::new(pusher);
    let running = tokio::spawn({
        let pusher = pusher.clone();
        async move { pusher.run(&["push", "job", "up.bin", "--json"]).await }
    });
    tokio::time::timeout(std::time::Duration::from_secs(60), proxy.held())
        .await
        .expect("the upload reached 20 MiB");
    // Kill once the server holds part of it durably (a checkpoint every 8 MiB).
    let blobs = dir.path().join("blobs");
    for _ in 0..400 {
        if blob_files(&blobs, "resumable")
            .iter()
            .any(|(_, len)| *len >= 16 * MIB as u64)
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!running.is_finished(), "the push ended before the kill");
    server.restart().await;
    proxy.release();
    let run = running.await.unwrap();
    run.assert_code(0);
    let pushed: serde_json::Value = serde_json::from_str(&run.stdout()).unwrap();
    assert_eq!(pushed["artifacts"][0]["sha256"], sha256_hex(&data));
    assert_eq!(pushed["artifacts"][0]["size"], size as i64);

    let cli = Cli::new(&format!("http://{}", server.grpc));
    cli.ok(&["pull", "job", "up.bin"]).await;
    assert!(cli.read("up.bin") == data, "the stored file differs");
    let usage = cli.json(&["usage"]).await;
    assert_eq!(usage["ingress_bytes"], size as i64, "ingress counted once");
    assert_eq!(usage["stored_bytes"], size as i64);
}

/// The server killed in the middle of a large download and started again: the CLI resumes
/// at the byte it had and the file is byte for byte right. Egress: the server meters what it
/// sends, recording it at the end of a stream and every 64 MiB within one; the killed
/// stream reached neither, so none of its bytes are metered and egress is only what the
/// resumed stream sent: less than the file (the server's crash is the server's loss).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_survives_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = process::ServerProcess::start(&local_stores(dir.path())).await;
    let size = 48 * MIB;
    let data = content(size, 43);
    let cli = Cli::new(&format!("http://{}", server.grpc));
    cli.write("big.bin", &data, 0o644);
    cli.ok(&["push", "job", "big.bin"]).await;

    let held_at = 20 * MIB;
    let proxy = HoldProxy::start(server.grpc, Direction::Down, held_at as u64).await;
    let mut puller = Cli::new(&proxy.url());
    puller.set("ARTIFACTD_RETRIES", "8");
    let puller = std::sync::Arc::new(puller);
    let running = tokio::spawn({
        let puller = puller.clone();
        async move { puller.run(&["pull", "job", "big.bin", "--json"]).await }
    });
    tokio::time::timeout(std::time::Duration::from_secs(60), proxy.held())
        .await
        .expect("the download reached 20 MiB");
    assert!(!running.is_finished(), "the pull ended before the kill");
    server.restart().await;
    proxy.release();
    let run = running.await.unwrap();
    run.assert_code(0);
    let pulled: serde_json::Value = serde_json::from_str(&run.stdout()).unwrap();
    assert_eq!(pulled["pulled"][0]["sha256"], sha256_hex(&data));
    assert!(puller.read("big.bin") == data, "the resumed file differs");
    let parts = std::fs::read_dir(puller.dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".artifact-part"))
        .count();
    assert_eq!(parts, 0, "no temporary file is left");

    let mut egress = 0;
    for _ in 0..200 {
        egress = cli.json(&["usage"]).await["egress_bytes"].as_i64().unwrap();
        if egress > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    // From the killed stream the client had what the proxy forwarded before it held
    // (`held_at` bytes, framing included) plus what the server had already written into the
    // sockets' buffers when it died; the resumed stream sent the rest, and only that is
    // metered.
    let buffers = 8 * MIB;
    assert!(
        ((size - held_at - buffers) as i64..size as i64).contains(&egress),
        "egress {egress} for a {size}-byte file resumed after a kill at {held_at} bytes"
    );
    eprintln!(
        "metered {egress} bytes for {size} kept: the {} bytes the client had from the killed stream were never metered",
        size as i64 - egress
    );
}

/// `artifact usage --export` passes the server's export through byte for byte (CSV and
/// JSON lines, to stdout or to a file), and refuses what the server refuses with the
/// documented exit codes, leaving no file behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_export_is_the_servers_byte_for_byte() {
    let server = Server::start_with(|c| {
        c.auth = artifactd::config::AuthMode::Jwt;
        c.jwt_secret = Some(SECRET.parse().unwrap());
    })
    .await;
    for (project, seed) in [("p1", 1), ("p2", 2)] {
        let mut job = Cli::new(&server.url());
        job.set("SEMAPHORE_PROJECT_ID", project);
        job.set("ARTIFACTD_TOKEN", &token("job", Some(project), Some("j1")));
        job.write("f", &content(300_000, seed), 0o644);
        job.ok(&["push", "project", "f"]).await;
        server.clock.advance_seconds(86_400 + 3_600);
        job.ok(&["pull", "project", "f", "-d", "g"]).await;
    }
    server.clock.advance_seconds(2 * 86_400);

    let http = reqwest::Client::new();
    let direct = |token: String, query: &'static str| {
        let http = http.clone();
        let url = format!("{}/api/v1/usage/export?{query}", server.http_url());
        async move {
            let response = http.get(url).bearer_auth(token).send().await.unwrap();
            assert_eq!(response.status(), 200);
            response.bytes().await.unwrap().to_vec()
        }
    };
    let mut cli = Cli::new(&server.url());
    cli.set("ARTIFACTD_HTTP_URL", &server.http_url());
    let reader = token("billing_reader", Some("p1"), None);
    cli.set("ARTIFACTD_TOKEN", &reader);

    let csv = direct(reader.clone(), "month=2026-11&format=csv&project=p1").await;
    assert!(csv.starts_with(b"event_id,project_id,meter,"));
    assert!(csv.split(|b| *b == b'\n').count() > 3, "records for p1");
    let run = cli.run(&["usage", "--export", "--month", "2026-11"]).await;
    run.assert_code(0);
    assert!(
        run.output.stdout == csv,
        "CSV on stdout differs:\n{}",
        run.stdout()
    );
    assert_eq!(run.stderr(), "");

    // `-o` naming a FIFO: the export is written into it (a temporary file renamed over it
    // would replace the FIFO and leave its reader waiting for ever).
    {
        let fifo = mkfifo(&cli.path("usage.pipe"));
        let reader = read_fifo(&fifo);
        let run = cli
            .run(&[
                "usage",
                "--export",
                "--month",
                "2026-11",
                "-o",
                "usage.pipe",
            ])
            .await;
        run.assert_code(0);
        assert!(is_fifo(&fifo), "the FIFO was replaced");
        let got = reader.join().unwrap();
        assert!(got == csv, "the FIFO's reader got {} bytes", got.len());
        std::fs::remove_file(&fifo).unwrap();
    }

    let jsonl = direct(reader.clone(), "month=2026-11&format=jsonl&project=p1").await;
    let text = cli
        .ok(&[
            "usage",
            "--export",
            "--month",
            "2026-11",
            "--format",
            "jsonl",
            "-o",
            "out/usage.jsonl",
        ])
        .await;
    assert_eq!(
        text,
        format!(
            "exported the usage of 2026-11 (jsonl, {}) to 'out/usage.jsonl'\n",
            human(jsonl.len())
        )
    );
    assert!(std::fs::read(cli.path("out/usage.jsonl")).unwrap() == jsonl);
    assert_eq!(std::fs::read_dir(cli.path("out")).unwrap().count(), 1);
    let summary = cli
        .json(&[
            "usage",
            "--export",
            "--month",
            "2026-11",
            "--format",
            "jsonl",
            "-o",
            "again.jsonl",
        ])
        .await;
    assert_eq!(summary["bytes"], jsonl.len() as u64);
    assert_eq!(summary["file"], "again.jsonl");

    // An admin without a project id: every project, as the server exports them.
    let admin = token("admin", None, None);
    let all = direct(admin.clone(), "month=2026-11&format=csv").await;
    let mut everyone = Cli::new(&server.url());
    everyone.unset("SEMAPHORE_PROJECT_ID");
    everyone.set("ARTIFACTD_HTTP_URL", &server.http_url());
    everyone.set("ARTIFACTD_TOKEN", &admin);
    let run = everyone
        .run(&["usage", "--export", "--month", "2026-11"])
        .await;
    run.assert_code(0);
    assert!(run.output.stdout == all, "admin's CSV differs");
    assert!(all.len() > csv.len(), "p2's records are in it");

    // 5: a billing_reader of another project; no file is left.
    let mut other = Cli::new(&server.url());
    other.set("ARTIFACTD_HTTP_URL", &server.http_url());
    other.set(
        "ARTIFACTD_TOKEN",
        &token("billing_reader", Some("p2"), None),
    );
    let run = other
        .run(&["usage", "--export", "--month", "2026-11", "-o", "usage.csv"])
        .await;
    run.assert_code(5);
    assert!(
        run.stderr()
            .starts_with("artifact: usage export of 2026-11: ")
            && run
                .stderr()
                .ends_with(": use a billing_reader, maintainer or admin token of this project\n"),
        "{}",
        run.stderr()
    );
    assert_eq!(std::fs::read_dir(other.dir.path()).unwrap().count(), 0);
    // 5: no token.
    other.unset("ARTIFACTD_TOKEN");
    let run = other
        .run(&["usage", "--export", "--month", "2026-11"])
        .await;
    run.assert_code(5);
    assert!(
        run.stderr()
            .ends_with(": set ARTIFACTD_TOKEN (or ARTIFACTD_TOKEN_FILE) to a valid token\n"),
        "{}",
        run.stderr()
    );
    // 1: a month that is not one; an option that needs --export.
    cli.run(&["usage", "--export", "--month", "2026-13"])
        .await
        .assert_error(1, "--month '2026-13' is not YYYY-MM (e.g. 2026-11)");
    cli.run(&["usage", "--format", "jsonl"])
        .await
        .assert_code(1);
    // 6: nothing listens on the HTTP port; no file is left.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    cli.set("ARTIFACTD_HTTP_URL", &format!("http://127.0.0.1:{port}"));
    cli.set("ARTIFACTD_RETRIES", "1");
    let run = cli
        .run(&["usage", "--export", "--month", "2026-11", "-o", "down.csv"])
        .await;
    run.assert_code(6);
    assert!(
        run.stderr().ends_with(&format!(
            ": the server's HTTP port at http://127.0.0.1:{port} could not be reached; check --http-url (ARTIFACTD_HTTP_URL) or try again later\n"
        )),
        "{}",
        run.stderr()
    );
    assert!(!cli.path("down.csv").exists());
    server.stop().await;
}

/// Makes a FIFO at `path` and returns the path.
fn mkfifo(path: &Path) -> PathBuf {
    let made = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo {}", path.display());
    path.to_path_buf()
}

/// Reads the FIFO at `path` to its end on a thread of its own (opening it waits for a
/// writer, so a writer that never opens it leaves this thread waiting, not the test).
fn read_fifo(path: &Path) -> std::thread::JoinHandle<Vec<u8>> {
    let path = path.to_path_buf();
    std::thread::spawn(move || std::fs::read(path).unwrap())
}

/// Whether `path` is (still) a FIFO rather than a file put in its place.
fn is_fifo(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path)
        .unwrap()
        .file_type()
        .is_fifo()
}

/// The CLI's rendering of a byte count (as `human_bytes`).
fn human(bytes: usize) -> String {
    if bytes < 1024 {
        format!("{bytes} B")
    } else if bytes < 1024 * 1024 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
    }
}

/// A small push whose answer is lost (the connection cut after the server committed it,
/// while it answers) is retried; the retry finds the path taken by this push's own content
/// and reports success, not "already exists", and its ingress is counted once. (Pushes
/// without --force carry no idempotency key, so the server commits them in one statement.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_push_whose_answer_is_lost_succeeds_once() {
    let server = Server::start().await;
    // The server's first bytes are its HTTP/2 settings (and the acknowledgement of the
    // client's); the answer to the push comes only after the commit. Cutting at 100 bytes
    // lands inside that answer.
    let proxy = CutProxy::start(server.addr, Direction::Down, 100).await;
    let mut pusher = Cli::new(&proxy.url());
    pusher.set("ARTIFACTD_RETRIES", "4");
    let data = content(3000, 51);
    pusher.write("small.txt", &data, 0o600);
    let pushed = pusher.json(&["push", "job", "small.txt"]).await;
    assert_eq!(proxy.cuts(), 1, "the proxy cut once");
    assert_eq!(pushed["artifacts"][0]["sha256"], sha256_hex(&data));
    let cli = Cli::new(&server.url());
    let usage = cli.json(&["usage", "--month", "2026-11"]).await;
    assert_eq!(usage["ingress_bytes"], 3000, "ingress counted once");
    assert_eq!(usage["live_artifacts"], 1);
    // Another file at that path is still refused.
    let other = Cli::new(&server.url());
    other.write("small.txt", b"different", 0o600);
    other
        .run(&["push", "job", "small.txt"])
        .await
        .assert_code(3);
    server.stop().await;
}
