//! Path, prefix and id parsing on arbitrary bytes: nothing panics, an accepted path is its
//! own normal form made only of plain components with no control or invisible format
//! characters, and prefix bounds are above the prefix.
#![no_main]

use std::path::{Component, Path};

use artifactd::domain::ArtifactPath;
use artifactd::domain::scope::{
    is_format_character, parse_prefix, prefix_upper_bound, validate_id,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(path) = ArtifactPath::parse("path", input) {
        assert_eq!(path.as_str(), input);
        assert!(
            Path::new(input)
                .components()
                .all(|c| matches!(c, Component::Normal(_)))
        );
        assert!(
            !input
                .chars()
                .any(|c| c.is_control() || is_format_character(c))
        );
    }
    if let Ok(prefix) = parse_prefix("prefix", input) {
        assert!(!prefix.chars().any(is_format_character));
    }
    if validate_id("id", input).is_ok() {
        assert!(input.bytes().all(|b| b.is_ascii_graphic()));
    }
    if let Some(upper) = prefix_upper_bound(input) {
        assert!(upper.as_str() > input);
    }
});
