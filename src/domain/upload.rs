//! Resumable uploads: the client-chosen id that names one, and the header fields a resumed
//! Push must repeat.

use super::error::{Error, Result};

/// Longest upload id accepted (a UUID is 36 characters).
pub const MAX_UPLOAD_ID_CHARS: usize = 128;

/// A client-chosen upload id: 1 to [`MAX_UPLOAD_ID_CHARS`] characters of `A-Z a-z 0-9 .
/// _ -`, unique within the scope it pushes to. Never used as a file name (the server names
/// the bytes with an id of its own), but kept to a safe alphabet for logs and URLs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UploadId(String);

impl UploadId {
    pub fn parse(field: &str, value: &str) -> Result<Self> {
        if value.is_empty() {
            return Err(Error::invalid(field, "must not be empty"));
        }
        if value.len() > MAX_UPLOAD_ID_CHARS {
            return Err(Error::invalid(
                field,
                format!(
                    "{} characters; at most {MAX_UPLOAD_ID_CHARS}",
                    value.chars().count()
                ),
            ));
        }
        if let Some(bad) = value
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(Error::invalid(
                field,
                format!("contains {bad:?}; use only A-Z a-z 0-9 . _ - (a UUID fits)"),
            ));
        }
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for UploadId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_ids_are_short_and_plain() {
        assert!(UploadId::parse("u", "0b5e7c2a-6f1d-4e8b-9c3a-2d7f1e0a9b4c").is_ok());
        assert!(UploadId::parse("u", "a").is_ok());
        assert!(UploadId::parse("u", &"x".repeat(128)).is_ok());
        let err = |v: &str| {
            UploadId::parse("header.upload_id", v)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(err(""), "header.upload_id: must not be empty");
        assert_eq!(
            err(&"x".repeat(129)),
            "header.upload_id: 129 characters; at most 128"
        );
        assert_eq!(
            err("../etc"),
            "header.upload_id: contains '/'; use only A-Z a-z 0-9 . _ - (a UUID fits)"
        );
        assert!(UploadId::parse("u", "a b").is_err());
        assert!(UploadId::parse("u", "é").is_err());
    }
}
