//! The artifactd server as a process of its own, for what only a process shows: TLS
//! configured from `ARTIFACTD_TLS_CERT`/`ARTIFACTD_TLS_KEY`, and a SIGKILL followed by a
//! restart on the same ports and database.
//!
//! Another package's binaries are not built for this crate's tests (`CARGO_BIN_EXE_artifactd`
//! exists only in the main crate's), and a copy found under `target/` may be stale. So the
//! child is this test binary run again with [`CHILD`] set, running only
//! [`serve_if_child`]: it parses its configuration from the environment and serves through
//! `artifactd::cli::run`, exactly what the `artifactd` binary's `main` does.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Set in the child's environment: run the server instead of the test.
pub const CHILD: &str = "ARTIFACT_CLI_TEST_ARTIFACTD_CHILD";
/// The test function of `cli.rs` that calls [`serve_if_child`].
pub const CHILD_TEST: &str = "artifactd_child_process";

/// In the child process: serves until killed (or until the server fails, then exits 1).
/// Anywhere else: returns at once.
pub fn serve_if_child() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    use clap::Parser;
    let cli = artifactd::config::Cli::parse_from(["artifactd"]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let result = runtime.block_on(artifactd::cli::run(cli));
    if let Err(error) = result {
        eprintln!("artifactd: {error:#}");
        std::process::exit(1);
    }
    std::process::exit(0);
}

/// A running artifactd process on fixed loopback ports; its stderr goes to a file that is
/// printed when the test panics. Killed when dropped.
pub struct ServerProcess {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    env: Vec<(String, String)>,
    child: Option<Child>,
    log: tempfile::NamedTempFile,
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

impl ServerProcess {
    /// Starts a server with `env` on top of free ports and `ARTIFACTD_BLOB_FSYNC=false`
    /// (which `env` may override); returns once its gRPC port accepts connections.
    pub async fn start(env: &[(&str, String)]) -> Self {
        let mut server = Self {
            grpc: free_port(),
            http: free_port(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
            child: None,
            log: tempfile::NamedTempFile::new().unwrap(),
        };
        server.spawn().await;
        server
    }

    async fn spawn(&mut self) {
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .env_remove("REDIS_URL")
            .env_remove("DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(self.log.reopen().unwrap());
        for (key, _) in std::env::vars() {
            if key.starts_with("ARTIFACTD_") {
                command.env_remove(key);
            }
        }
        command.env("ARTIFACTD_GRPC_LISTEN", self.grpc.to_string());
        command.env("ARTIFACTD_HTTP_LISTEN", self.http.to_string());
        command.env("ARTIFACTD_BLOB_FSYNC", "false");
        for (key, value) in &self.env {
            command.env(key, value);
        }
        self.child = Some(command.spawn().unwrap());
        // The listeners are bound before the app is built: a connection accepted early
        // waits in the backlog until the server serves.
        for _ in 0..1200 {
            if tokio::net::TcpStream::connect(self.grpc).await.is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("artifactd exited at start ({status}):\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "artifactd did not come up on {}:\n{}",
            self.grpc,
            self.log()
        );
    }

    /// SIGKILL: no shutdown, no flush, no goodbye to its clients.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Starts it again on the same ports with the same environment (so the same database
    /// and blob directory).
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// What it wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- artifactd on {} ---\n{}", self.grpc, self.log());
        }
    }
}
