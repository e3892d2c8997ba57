//! Where an artifact lives, and the validated names that address it. Every constructor here
//! is the edge check: a value of these types is valid by construction, so nothing deeper in
//! the service re-checks it (parse, don't validate).
//!
//! Names are shown to people (CI logs, dashboards, download dialogs), so besides the
//! structural rules they may not hold invisible Unicode format characters: a bidi override
//! makes `a\u{202e}txt.exe` display as `aexe.txt`, and zero-width characters make two
//! different paths look identical.

use std::fmt;

use super::error::{Error, Result};

/// Longest project, workflow or job id accepted, in bytes.
pub const MAX_ID_BYTES: usize = 128;
/// Longest artifact path accepted, in bytes.
pub const MAX_PATH_BYTES: usize = 1024;

/// Checks an id: non-empty, at most 128 bytes, only `[A-Za-z0-9._-]`.
pub fn validate_id(field: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if value.len() > MAX_ID_BYTES {
        return Err(Error::invalid(
            field,
            format!(
                "is {} bytes, longer than the {MAX_ID_BYTES}-byte limit",
                value.len()
            ),
        ));
    }
    if let Some(bad) = value.chars().find(|&c| is_format_character(c)) {
        return Err(format_character_error(field, bad));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(Error::invalid(
            field,
            format!("contains {bad:?}; only letters, digits, '.', '_' and '-' are allowed"),
        ));
    }
    Ok(())
}

/// Unicode general category Cf ("format"), Unicode 16: characters that are invisible but
/// change how the text around them is shown — bidi embeddings, overrides and isolates
/// (U+202A–U+202E, U+2066–U+2069), zero-width space, joiners and marks (U+200B–U+200F),
/// word joiner and invisible operators (U+2060–U+2064), the byte-order mark (U+FEFF), soft
/// hyphen, tags, and a few script-specific controls. std has no general-category lookup, and
/// this short, stable table does not justify a dependency. U+2065 (unassigned, inside the
/// 2060–206F block of invisibles) is refused with its neighbours.
const FORMAT_CHARACTERS: &[(u32, u32)] = &[
    (0x00AD, 0x00AD),
    (0x0600, 0x0605),
    (0x061C, 0x061C),
    (0x06DD, 0x06DD),
    (0x070F, 0x070F),
    (0x0890, 0x0891),
    (0x08E2, 0x08E2),
    (0x180E, 0x180E),
    (0x200B, 0x200F),
    (0x202A, 0x202E),
    (0x2060, 0x206F),
    (0xFEFF, 0xFEFF),
    (0xFFF9, 0xFFFB),
    (0x110BD, 0x110BD),
    (0x110CD, 0x110CD),
    (0x13430, 0x1343F),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0001, 0xE0001),
    (0xE0020, 0xE007F),
];

/// Whether `c` is an invisible format character (see [`FORMAT_CHARACTERS`]).
pub fn is_format_character(c: char) -> bool {
    let c = c as u32;
    FORMAT_CHARACTERS
        .binary_search_by(|&(low, high)| {
            if high < c {
                std::cmp::Ordering::Less
            } else if low > c {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

fn format_character_error(field: &str, c: char) -> Error {
    Error::invalid(
        field,
        format!(
            "contains the invisible format character U+{:04X} (bidi control, zero-width \
             or similar), which would make the name display as something else",
            c as u32
        ),
    )
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProjectId(String);

impl ProjectId {
    pub fn parse(field: &str, value: &str) -> Result<Self> {
        validate_id(field, value)?;
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScopeKind {
    Job,
    Workflow,
    Project,
}

impl ScopeKind {
    pub const ALL: [Self; 3] = [Self::Job, Self::Workflow, Self::Project];

    /// The name stored in the database and shown in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Job => "job",
            Self::Workflow => "workflow",
            Self::Project => "project",
        }
    }

    pub fn from_db(value: &str) -> Option<Self> {
        match value {
            "job" => Some(Self::Job),
            "workflow" => Some(Self::Workflow),
            "project" => Some(Self::Project),
            _ => None,
        }
    }
}

/// A project, or one workflow or job of it. `id` is empty exactly when `kind` is `Project`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope {
    project: ProjectId,
    kind: ScopeKind,
    id: String,
}

impl Scope {
    /// Validates a scope; `field` is the scope's field name in the request (e.g.
    /// `header.scope`), used to name the sub-field that is wrong.
    pub fn parse(field: &str, project_id: &str, kind: ScopeKind, id: &str) -> Result<Self> {
        let project = ProjectId::parse(&format!("{field}.project_id"), project_id)?;
        let id_field = format!("{field}.id");
        match kind {
            ScopeKind::Project if !id.is_empty() => {
                return Err(Error::invalid(
                    id_field,
                    "must be empty for a PROJECT scope",
                ));
            }
            ScopeKind::Project => {}
            ScopeKind::Job | ScopeKind::Workflow if id.is_empty() => {
                return Err(Error::invalid(
                    id_field,
                    format!(
                        "is required for a {} scope",
                        kind.as_str().to_ascii_uppercase()
                    ),
                ));
            }
            ScopeKind::Job | ScopeKind::Workflow => validate_id(&id_field, id)?,
        }
        Ok(Self {
            project,
            kind,
            id: id.to_owned(),
        })
    }

    pub fn project(&self) -> &ProjectId {
        &self.project
    }

    pub fn kind(&self) -> ScopeKind {
        self.kind
    }

    /// The job or workflow id; empty for a project scope.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ScopeKind::Project => write!(f, "project {}", self.project),
            kind => write!(
                f,
                "{} {} of project {}",
                kind.as_str(),
                self.id,
                self.project
            ),
        }
    }
}

/// A relative, `/`-separated, already-normal file path: no empty, `.` or `..` segments, no
/// leading or trailing `/`, no backslash, NUL, control or format characters, at most 1024
/// bytes.
/// Because nothing is rewritten, an accepted path is its own normal form and cannot climb
/// out of its scope.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ArtifactPath(String);

impl ArtifactPath {
    pub fn parse(field: &str, value: &str) -> Result<Self> {
        if let Some(bad) = value.chars().find(|&c| is_format_character(c)) {
            return Err(format_character_error(field, bad));
        }
        Self::parse_structure(field, value)
    }

    /// A path read back from the database: the structural rules only. Rows written before
    /// format characters were refused may hold some; they stay listable and readable
    /// instead of failing as corrupt, while no new one can be written.
    pub fn from_stored(value: &str) -> Result<Self> {
        Self::parse_structure("path", value)
    }

    fn parse_structure(field: &str, value: &str) -> Result<Self> {
        check_path_text(field, value)?;
        if value.starts_with('/') {
            return Err(Error::invalid(
                field,
                "must be relative, not start with '/'",
            ));
        }
        for segment in value.split('/') {
            match segment {
                "" => {
                    return Err(Error::invalid(
                        field,
                        "has an empty segment ('//' or a trailing '/')",
                    ));
                }
                "." | ".." => {
                    return Err(Error::invalid(
                        field,
                        format!("has a '{segment}' segment; paths must be normalised"),
                    ));
                }
                _ => {}
            }
        }
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Every path strictly under this one as a folder lies in `[self + "/", self + "0")`:
    /// `'0'` is the byte after `'/'`, so the range is exact in byte order.
    pub fn folder_range(&self) -> (String, String) {
        (format!("{}/", self.0), format!("{}0", self.0))
    }
}

impl fmt::Display for ArtifactPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A List prefix: any leading part of a path (it may end in `/` or mid-segment). Empty means
/// everything in the scope.
pub fn parse_prefix(field: &str, value: &str) -> Result<String> {
    if value.is_empty() {
        return Ok(String::new());
    }
    check_path_text(field, value)?;
    if let Some(bad) = value.chars().find(|&c| is_format_character(c)) {
        return Err(format_character_error(field, bad));
    }
    if value.starts_with('/') {
        return Err(Error::invalid(
            field,
            "must be relative, not start with '/'",
        ));
    }
    Ok(value.to_owned())
}

/// The smallest string greater than every string that starts with `prefix`, in byte order
/// (UTF-8 byte order equals code point order), or `None` when there is none.
pub fn prefix_upper_bound(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let mut next = last as u32 + 1;
        if (0xD800..=0xDFFF).contains(&next) {
            next = 0xE000;
        }
        if let Some(c) = char::from_u32(next) {
            chars.push(c);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

fn check_path_text(field: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if value.len() > MAX_PATH_BYTES {
        return Err(Error::invalid(
            field,
            format!(
                "is {} bytes, longer than the {MAX_PATH_BYTES}-byte limit",
                value.len()
            ),
        ));
    }
    if value.contains('\\') {
        return Err(Error::invalid(
            field,
            "contains a backslash; use '/' to separate segments",
        ));
    }
    if let Some(bad) = value.chars().find(|c| c.is_control()) {
        return Err(Error::invalid(
            field,
            format!("contains the control character U+{:04X}", bad as u32),
        ));
    }
    Ok(())
}

/// A path inside a scope: the full address of one artifact.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ScopedPath {
    pub scope: Scope,
    pub path: ArtifactPath,
}

impl fmt::Display for ScopedPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} in {}", self.path.as_str(), self.scope)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_paths_are_their_own_normal_form() {
        for ok in [
            "a",
            "a/b.txt",
            "dir/sub/file.tar.gz",
            "…/ünï",
            "a..b/c.",
            ".hidden/x",
        ] {
            let path = ArtifactPath::parse("path", ok).expect(ok);
            assert_eq!(path.as_str(), ok);
        }
    }

    #[test]
    fn rejected_paths_name_the_field() {
        let too_long = "a".repeat(1025);
        for bad in [
            "",
            "/abs",
            "a//b",
            "a/",
            "./a",
            "a/./b",
            "../a",
            "a/..",
            "a\\b",
            "a\0b",
            "a\nb",
            "a\u{7f}",
            too_long.as_str(),
        ] {
            let err = ArtifactPath::parse("header.path", bad).expect_err(bad);
            assert!(
                err.to_string().starts_with("header.path: "),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn format_characters_are_refused_naming_field_and_code_point() {
        for (bad, code) in [
            ("a\u{202e}txt.exe", "U+202E"),
            ("a\u{202a}b", "U+202A"),
            ("dir/\u{2066}x\u{2069}", "U+2066"),
            ("zero\u{200b}width", "U+200B"),
            ("a\u{200f}", "U+200F"),
            ("\u{feff}bom", "U+FEFF"),
            ("word\u{2060}joiner", "U+2060"),
            ("soft\u{ad}hyphen", "U+00AD"),
            ("tag\u{e0041}", "U+E0041"),
        ] {
            let err = ArtifactPath::parse("header.path", bad).expect_err(bad);
            let text = err.to_string();
            assert!(
                text.starts_with("header.path: ") && text.contains(code),
                "{bad:?}: {text}"
            );
            let err = parse_prefix("prefix", bad).expect_err(bad);
            assert!(err.to_string().contains(code), "{bad:?}: {err}");
            let err = validate_id("scope.id", bad).expect_err(bad);
            assert!(
                err.to_string().starts_with("scope.id: ") && err.to_string().contains(code),
                "{bad:?}: {err}"
            );
        }
        // Rows written before the rule stay readable; the structural rules still hold.
        let legacy = ArtifactPath::from_stored("a\u{202e}txt.exe").unwrap();
        assert_eq!(legacy.as_str(), "a\u{202e}txt.exe");
        assert!(ArtifactPath::from_stored("a/../b").is_err());
        // Visible non-ASCII stays allowed in paths.
        for ok in [
            "café/ünï.txt",
            "日本語/ファイル",
            "emoji-🦀.txt",
            "a\u{301}",
        ] {
            ArtifactPath::parse("path", ok).expect(ok);
        }
    }

    #[test]
    fn format_character_table_is_sorted_and_disjoint() {
        for pair in FORMAT_CHARACTERS.windows(2) {
            assert!(pair[0].0 <= pair[0].1 && pair[0].1 < pair[1].0, "{pair:?}");
        }
        for c in [
            '\u{202a}', '\u{202e}', '\u{2066}', '\u{2069}', '\u{200b}', '\u{200f}', '\u{2064}',
            '\u{feff}',
        ] {
            assert!(is_format_character(c), "{c:?}");
        }
        for c in [
            'a', '/', 'é', '\u{2029}', '\u{2070}', '\u{fffc}', '\u{200a}',
        ] {
            assert!(!is_format_character(c), "{c:?}");
        }
    }

    #[test]
    fn folder_range_brackets_exactly_the_children() {
        let (lo, hi) = ArtifactPath::parse("p", "dir").unwrap().folder_range();
        for inside in ["dir/a", "dir/z/zz", "dir/\u{10FFFF}"] {
            assert!(lo.as_str() <= inside && inside < hi.as_str(), "{inside}");
        }
        for outside in ["dir", "dir.txt", "dir-2/a", "dir0", "dirz/a", "di"] {
            assert!(
                !(lo.as_str() <= outside && outside < hi.as_str()),
                "{outside}"
            );
        }
    }

    #[test]
    fn prefix_upper_bound_is_tight() {
        assert_eq!(prefix_upper_bound("ab").as_deref(), Some("ac"));
        assert_eq!(
            prefix_upper_bound("a\u{D7FF}").as_deref(),
            Some("a\u{E000}")
        );
        assert_eq!(prefix_upper_bound("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_upper_bound("\u{10FFFF}"), None);
        let hi = prefix_upper_bound("logs/").unwrap();
        assert!("logs/\u{10FFFF}\u{10FFFF}" < hi.as_str());
        assert!("logs0" >= hi.as_str());
    }

    #[test]
    fn scope_rules() {
        assert!(Scope::parse("scope", "p", ScopeKind::Project, "").is_ok());
        let err = Scope::parse("scope", "p", ScopeKind::Project, "j1").unwrap_err();
        assert_eq!(
            err.to_string(),
            "scope.id: must be empty for a PROJECT scope"
        );
        let err = Scope::parse("scope", "p", ScopeKind::Job, "").unwrap_err();
        assert_eq!(err.to_string(), "scope.id: is required for a JOB scope");
        let err = Scope::parse("scope", "p q", ScopeKind::Job, "j").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("scope.project_id: contains ' '"),
            "{err}"
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;
        use std::path::{Component, Path};

        /// Strings built from the characters that make paths interesting.
        fn tricky() -> impl Strategy<Value = String> {
            let alphabet = vec![
                'a', 'Z', '0', '.', '/', '\\', '\0', '\n', ' ', '-', 'é', '%', '~', ':',
                '\u{202e}', '\u{2066}', '\u{200b}', '\u{feff}', '\u{2060}', '\u{ad}',
            ];
            prop::collection::vec(prop::sample::select(alphabet), 0..24)
                .prop_map(|chars| chars.into_iter().collect())
        }

        fn any_input() -> impl Strategy<Value = String> {
            prop_oneof![tricky(), any::<String>()]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(4000))]

            #[test]
            fn accepted_paths_are_normal_and_stay_inside_their_scope(input in any_input()) {
                if let Ok(path) = ArtifactPath::parse("path", &input) {
                    prop_assert_eq!(path.as_str(), input.as_str(), "parsing never rewrites");
                    let normalised: Vec<&str> =
                        input.split('/').filter(|s| !s.is_empty() && *s != ".").collect();
                    prop_assert_eq!(normalised.join("/"), input.clone(), "already normal");
                    // Joined under a scope's directory, every component is a plain name: no
                    // root, no `.`, no `..`, so nothing can climb out.
                    prop_assert!(Path::new(&input)
                        .components()
                        .all(|c| matches!(c, Component::Normal(_))));
                    prop_assert!(input.len() <= MAX_PATH_BYTES);
                    prop_assert!(!input.contains('\\') && !input.chars().any(char::is_control));
                    prop_assert!(!input.chars().any(is_format_character), "no invisible format characters");
                }
            }

            #[test]
            fn accepted_prefixes_and_ids_are_clean(input in any_input()) {
                if let Ok(prefix) = parse_prefix("prefix", &input) {
                    prop_assert!(!prefix.starts_with('/') && !prefix.contains('\\'));
                    prop_assert!(!prefix.chars().any(is_format_character));
                }
                if validate_id("id", &input).is_ok() {
                    prop_assert!(!input.is_empty() && input.len() <= MAX_ID_BYTES);
                    prop_assert!(input
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')));
                }
            }

            #[test]
            fn prefix_bounds_contain_exactly_the_prefixed_strings(
                prefix in "[a/.]{0,6}",
                rest in any::<String>(),
                other in any::<String>(),
            ) {
                let inside = format!("{prefix}{rest}");
                if let Some(upper) = prefix_upper_bound(&prefix) {
                    prop_assert!(inside.as_str() >= prefix.as_str() && inside < upper);
                    if other.as_str() >= prefix.as_str() && other < upper {
                        prop_assert!(other.starts_with(&prefix));
                    }
                }
            }
        }
    }
}
