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

/// Validates a unix mode, mapping 0 to the 0644 default.
pub fn parse_mode(field: &str, mode: u32) -> Result<u32> {
    match mode {
        0 => Ok(DEFAULT_MODE),
        m if m <= MAX_MODE => Ok(m),
        m => Err(Error::invalid(
            field,
            format!("{m:#o} has bits beyond permission bits (max {MAX_MODE:#o})"),
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
    }
}
