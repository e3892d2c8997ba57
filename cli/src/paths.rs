//! Where a file goes: Semaphore's path mapping (`pkg/files/path_resolver.go` in
//! semaphoreci/artifact), lexical and pure, so every case is a unit test.
//!
//! - push: the remote path is `-d` made relative (leading `/`, `./`, `../` dropped), or the
//!   source's base name; a folder's files go under it with their relative paths.
//! - pull: the local path is `-d` cleaned (absolute allowed), or the remote base name; a
//!   folder's files go under it.
//! - yank: the remote path made relative.
//!
//! Where Semaphore's CLI is loose we are strict: a base name of `.`, `..` or `/` (as in
//! `push job .`) adds nothing, so a folder's names are kept whole and never escape the scope.

/// Go's `path.Clean`: the shortest lexically equivalent slash path.
pub fn clean(path: &str) -> String {
    if path.is_empty() {
        return ".".to_owned();
    }
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|last| *last != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            other => parts.push(other),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_owned(),
        (false, false) => joined,
    }
}

/// Semaphore's `ToRelative`: the cleaned path without its leading `/`, `./` and `../`
/// (a hidden name's own dot is kept); empty when only dots and slashes remain.
pub fn to_relative(path: &str) -> String {
    let cleaned = clean(path);
    if cleaned.chars().all(|c| c == '.') {
        return String::new();
    }
    let trimmed = cleaned.trim_start_matches(['.', '/']);
    let left = &cleaned[..cleaned.len() - trimmed.len()];
    let far_left = left.trim_end_matches('.');
    cleaned[far_left.len()..].to_owned()
}

/// Go's `path.Base` of a cleaned path, except that `.`, `..` and `/` name nothing (empty).
pub fn base_name(path: &str) -> String {
    let cleaned = clean(path);
    let base = cleaned.rsplit('/').next().unwrap_or_default();
    match base {
        "" | "." | ".." => String::new(),
        other => other.to_owned(),
    }
}

/// `a/b` joined with `c`, either side possibly empty.
pub fn join(left: &str, right: &str) -> String {
    match (left.is_empty(), right.is_empty()) {
        (true, _) => right.to_owned(),
        (_, true) => left.to_owned(),
        _ => format!("{left}/{right}"),
    }
}

/// The remote path a push of `source` stores (a folder's files go under it); empty means
/// the scope's root, which only a folder may use.
pub fn push_target(source: &str, destination: Option<&str>) -> String {
    let destination = destination.map(to_relative).unwrap_or_default();
    if destination.is_empty() {
        base_name(source)
    } else {
        destination
    }
}

/// The remote path a pull or yank names.
pub fn remote_source(source: &str) -> String {
    to_relative(source)
}

/// The local path a pull of `remote` writes (a folder's files go under it).
pub fn pull_target(remote: &str, destination: Option<&str>) -> String {
    match destination {
        Some(d) if !d.is_empty() => clean(d),
        _ => {
            let base = base_name(remote);
            if base.is_empty() {
                ".".to_owned()
            } else {
                base
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCES: [&str; 6] = [
        "x.zip",
        "/x.zip",
        "./x.zip",
        "long/path/to/x.zip",
        "/long/path/to/x.zip",
        "./long/path/to/x.zip",
    ];

    /// `path_resolver_test.go`, "resolve paths for push": every source with every
    /// destination override.
    #[test]
    fn push_cases_from_semaphore() {
        for source in SOURCES {
            assert_eq!(push_target(source, None), "x.zip", "{source}");
            for (dst, want) in [
                ("y.zip", "y.zip"),
                ("/y.zip", "y.zip"),
                ("./y.zip", "y.zip"),
                ("long/path/to/y.zip", "long/path/to/y.zip"),
                ("/long/path/to/y.zip", "long/path/to/y.zip"),
                ("./long/path/to/y.zip", "long/path/to/y.zip"),
            ] {
                assert_eq!(push_target(source, Some(dst)), want, "{source} -d {dst}");
            }
        }
    }

    /// "resolve paths for pull": the remote is made relative; the local destination is
    /// cleaned and may be absolute.
    #[test]
    fn pull_cases_from_semaphore() {
        for source in SOURCES {
            let remote = remote_source(source);
            assert_eq!(remote, source.trim_start_matches(['.', '/']), "{source}");
            assert_eq!(pull_target(&remote, None), "x.zip");
            for (dst, want) in [
                ("y.zip", "y.zip"),
                ("/y.zip", "/y.zip"),
                ("./y.zip", "y.zip"),
                ("long/path/to/y.zip", "long/path/to/y.zip"),
                ("/long/path/to/y.zip", "/long/path/to/y.zip"),
                ("./long/path/to/y.zip", "long/path/to/y.zip"),
            ] {
                assert_eq!(pull_target(&remote, Some(dst)), want, "{source} -d {dst}");
            }
        }
    }

    /// `files_test.go`, `Test__ToRelative`.
    #[test]
    fn to_relative_cases_from_semaphore() {
        for (input, want) in [
            ("", ""),
            ("./../source", "source"),
            ("./../.source", ".source"),
            ("./../source/..", ""),
            ("./../source/../longer", "longer"),
            ("./../source/../longer/", "longer"),
            ("./../source/../.longer/", ".longer"),
            ("./../source/../longer/.", "longer"),
            ("./../source/../.longer/.", ".longer"),
            ("./../.source/../longer/.", "longer"),
            ("./../.source/../.longer/.", ".longer"),
            ("source", "source"),
            (".source", ".source"),
            ("/source", "source"),
            ("../../y", "y"),
            ("a/../../b", "b"),
        ] {
            assert_eq!(to_relative(input), want, "{input:?}");
        }
    }

    #[test]
    fn folders_and_the_strict_cases() {
        assert_eq!(push_target("src/sub", None), "sub");
        assert_eq!(push_target("src/sub/", Some("out/d")), "out/d");
        assert_eq!(push_target(".hidden", None), ".hidden");
        assert_eq!(push_target("x", Some("../../y")), "y");
        // `push job .` (and `..`, `/`) keeps the folder's names whole.
        assert_eq!(push_target(".", None), "");
        assert_eq!(push_target("..", None), "");
        assert_eq!(push_target("/", None), "");
        assert_eq!(push_target("x", Some(".")), "x");
        assert_eq!(pull_target("logs", None), "logs");
        assert_eq!(pull_target("logs", Some("a/dbg/")), "a/dbg");
        assert_eq!(join("", "a/b"), "a/b");
        assert_eq!(join("out", "a/b"), "out/a/b");
        assert_eq!(clean("a//b/./c/.."), "a/b");
        assert_eq!(clean("/../a"), "/a");
    }
}
