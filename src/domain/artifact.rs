//! An artifact: one immutable file in a scope, and the content digest that names its blob.

use std::fmt;

use super::clock::Timestamp;
use super::error::{Error, Result};
use super::scope::{ArtifactPath, Scope};

/// Default unix mode for a pushed file when the client sends 0.
pub const DEFAULT_MODE: u32 = 0o644;
/// Highest mode accepted: permission bits plus setuid, setgid and sticky.
pub const MAX_MODE: u32 = 0o7777;

/// A SHA-256 digest as 64 lower-case hex characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Sha256(String);

impl Sha256 {
    pub fn parse(field: &str, value: &str) -> Result<Self> {
        if value.len() != 64 {
            return Err(Error::invalid(
                field,
                format!("must be 64 hex characters, got {}", value.len()),
            ));
        }
        if !value
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(Error::invalid(field, "must be lower-case hex"));
        }
        Ok(Self(value.to_owned()))
    }

    pub fn from_digest(digest: &[u8; 32]) -> Self {
        Self(hex::encode(digest))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The file-type bits of a unix mode (`st_mode & S_IFMT`).
pub const S_IFMT: u32 = 0o170_000;
/// A regular file: the default type, so it is stored as the permission bits alone.
pub const S_IFREG: u32 = 0o100_000;
/// A symbolic link stored as a link (`artifact push --preserve-symlinks`): its content is
/// the link's target.
pub const S_IFLNK: u32 = 0o120_000;

/// Validates a unix mode, mapping 0 to the 0644 default: permission bits, optionally with
/// the file type of a regular file (dropped: it is the default) or of a symbolic link (kept,
/// so a client can recreate the link). Any other type (folder, device, ...) is refused.
pub fn parse_mode(field: &str, mode: u32) -> Result<u32> {
    let permissions = mode & !S_IFMT;
    if permissions > MAX_MODE {
        return Err(Error::invalid(
            field,
            format!("{mode:#o} has bits beyond permission bits (max {MAX_MODE:#o})"),
        ));
    }
    match mode & S_IFMT {
        0 | S_IFREG if permissions == 0 => Ok(DEFAULT_MODE),
        0 | S_IFREG => Ok(permissions),
        S_IFLNK => Ok(mode),
        kind => Err(Error::invalid(
            field,
            format!(
                "file type {kind:#o} is neither a regular file ({S_IFREG:#o}) nor a symbolic \
                 link ({S_IFLNK:#o})"
            ),
        )),
    }
}

/// A stored artifact as clients see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    pub id: i64,
    pub scope: Scope,
    pub path: ArtifactPath,
    pub size: i64,
    pub sha256: Sha256,
    pub mode: u32,
    pub created_at: Timestamp,
    pub expires_at: Option<Timestamp>,
    pub keep: bool,
    /// Kept as an artifact of the latest PASSED job of its (ref, job name)
    /// (`keep_latest_per_ref`): it does not expire while that lasts.
    pub kept_latest: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_must_be_lower_hex() {
        let ok = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert!(Sha256::parse("d", ok).is_ok());
        assert!(Sha256::parse("d", &ok.to_uppercase()).is_err());
        assert!(Sha256::parse("d", &ok[1..]).is_err());
    }

    #[test]
    fn mode_defaults_and_bounds() {
        assert_eq!(parse_mode("m", 0).unwrap(), 0o644);
        assert_eq!(parse_mode("m", 0o755).unwrap(), 0o755);
        assert!(parse_mode("m", 0o10000).is_err());
        // A regular file's type bits are dropped, a link's kept; no other type passes.
        assert_eq!(parse_mode("m", 0o100_755).unwrap(), 0o755);
        assert_eq!(parse_mode("m", 0o100_000).unwrap(), 0o644);
        assert_eq!(parse_mode("m", 0o120_777).unwrap(), 0o120_777);
        for refused in [
            0o040_755, 0o060_644, 0o020_644, 0o140_777, 0o010_644, 0o170_000,
        ] {
            assert!(parse_mode("m", refused).is_err(), "{refused:o}");
        }
        assert!(parse_mode("m", 0o120_000 | 0o10000).is_err());
    }
}
