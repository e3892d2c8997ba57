//! The real `artifactd` binary as a child process, for tests that need what only a process
//! shows: signals and exit codes, real time, several replicas. Listens on free loopback
//! ports; its stderr goes to a file that is printed when the test panics; it is killed when
//! dropped, however the test ends.

#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// A running `artifactd` process.
pub struct BinaryServer {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    child: Option<Child>,
    log: tempfile::NamedTempFile,
}

/// `DATABASE_URL` and `ARTIFACTD_BLOB_URL` for a SQLite file and a blob directory in `dir`.
pub fn local_stores(dir: &Path) -> Vec<(&'static str, String)> {
    vec![
        (
            "DATABASE_URL",
            format!("sqlite://{}", dir.join("db.sqlite").display()),
        ),
        (
            "ARTIFACTD_BLOB_URL",
            format!("file://{}", dir.join("blobs").display()),
        ),
    ]
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

impl BinaryServer {
    /// Starts `artifactd` with `env` (on top of free listen addresses and
    /// `ARTIFACTD_BLOB_FSYNC=false`, which `env` may override) and waits until its gRPC port
    /// accepts connections.
    pub async fn start(env: &[(&str, String)]) -> Self {
        let (grpc, http) = (free_port(), free_port());
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_artifactd"));
        command
            .env("ARTIFACTD_GRPC_LISTEN", grpc.to_string())
            .env("ARTIFACTD_HTTP_LISTEN", http.to_string())
            .env("ARTIFACTD_BLOB_FSYNC", "false")
            .env_remove("REDIS_URL")
            .env_remove("DATABASE_URL")
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap());
        for (key, value) in env {
            command.env(key, value);
        }
        let server = Self {
            grpc,
            http,
            child: Some(command.spawn().unwrap()),
            log,
        };
        server.channel().await;
        server
    }

    /// A channel to its gRPC port, retried for up to 30 s while it starts (migrations).
    pub async fn channel(&self) -> Channel {
        let endpoint = Endpoint::from_shared(format!("http://{}", self.grpc)).unwrap();
        for _ in 0..1200 {
            if let Ok(channel) = endpoint.connect().await {
                return channel;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "artifactd did not come up on {}:\n{}",
            self.grpc,
            self.log()
        );
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends SIGTERM (a graceful shutdown).
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit.
    pub async fn wait(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap()
    }

    /// What it wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

impl Drop for BinaryServer {
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
