//! What the user sees: text on stdout, or one JSON document with `--json`; one-line errors on
//! stderr; progress bars on stderr only when it is a terminal (or with `--verbose`, which on a
//! non-terminal prints a line per file instead).

use std::io::{IsTerminal, Write};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::error::CliError;
use crate::pb;

pub struct Output {
    pub json: bool,
    pub verbose: bool,
    terminal: bool,
}

impl Output {
    pub fn new(json: bool, verbose: bool) -> Self {
        Self {
            json,
            verbose,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    /// A byte progress bar of `total` bytes, drawn only on a terminal (or with --verbose).
    pub fn progress(&self, total: u64, what: &str) -> ProgressBar {
        if !self.terminal {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(what.to_owned());
        bar
    }

    /// A line per file with --verbose when no bar is drawn.
    pub fn file_done(&self, verb: &str, path: &str, size: u64) {
        if self.verbose && !self.terminal {
            let _ = writeln!(
                std::io::stderr().lock(),
                "{verb} {path} ({})",
                human_bytes(size)
            );
        }
    }

    /// The command's result: `json` with --json, else `text`.
    pub fn result<T: Serialize>(&self, json: &T, text: impl FnOnce() -> String) {
        let mut stdout = std::io::stdout().lock();
        if self.json {
            let _ = serde_json::to_writer_pretty(&mut stdout, json);
            let _ = writeln!(stdout);
        } else {
            let text = text();
            if !text.is_empty() {
                let _ = writeln!(stdout, "{}", text.trim_end());
            }
        }
    }

    pub fn error(&self, error: &CliError) {
        let _ = writeln!(std::io::stderr().lock(), "artifact: {error}");
        if self.json {
            let _ = writeln!(
                std::io::stdout().lock(),
                "{}",
                serde_json::json!({ "error": error.message, "exit_code": error.exit as u8 })
            );
        }
    }
}

/// An artifact as `--json` shows it.
#[derive(Serialize)]
pub struct ArtifactJson {
    pub path: String,
    pub size: i64,
    pub sha256: String,
    /// Octal, as `ls -l` users read it (`100644`, `120777` for a link).
    pub mode: String,
    pub created_at: Option<String>,
    pub expires_at: Option<String>,
    pub keep: bool,
}

impl From<&pb::Artifact> for ArtifactJson {
    fn from(a: &pb::Artifact) -> Self {
        Self {
            path: a.path.clone(),
            size: a.size,
            sha256: a.sha256.clone(),
            mode: format!("{:o}", a.mode),
            created_at: a.created_at.as_ref().map(rfc3339),
            expires_at: a.expires_at.as_ref().map(rfc3339),
            keep: a.keep || a.kept_latest,
        }
    }
}

pub fn rfc3339(t: &prost_types::Timestamp) -> String {
    let seconds = u64::try_from(t.seconds).unwrap_or(0);
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds),
    )
    .to_string()
}

/// 1536 → "1.5 KiB".
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Rows as aligned columns (the first row is the header).
pub fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, cell)| format!("{cell:<width$}", width = widths[c]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
