//! The text before parsing: byte-order mark, size and nesting caps, and reading files.

use std::path::PathBuf;

use super::*;

fn limit_line(yaml: &str) -> Option<usize> {
    match load(yaml) {
        Err(TopologyError::Limit { line, message, .. }) => {
            assert!(message.contains("nested deeper than 64"), "{message}");
            line
        }
        other => panic!("expected Limit, got {other:?}"),
    }
}

fn not_limited(yaml: &str) {
    if let Err(e @ TopologyError::Limit { .. }) = load(yaml) {
        panic!("refused before parsing: {e}");
    }
}

#[test]
fn a_leading_byte_order_mark_is_skipped() {
    // Right before the first key, where the parser took it for part of the key.
    let text = VALID.trim_start();
    let t = load(&format!("\u{feff}{text}")).unwrap();
    assert_eq!(t, load(text).unwrap());
    let (line, message) = parse_error(&format!(
        "\u{feff}{}",
        text.replace("weight: 3", "wieght: 3")
    ));
    assert_eq!(line, Some(17), "lines are counted as without it");
    assert!(message.contains("unknown field `wieght`"), "{message}");
}

#[test]
fn a_document_nested_100k_deep_is_refused_before_parsing() {
    const DEEP: usize = 100_000;
    for (yaml, line) in [
        (format!("x: {}{}\n", "[".repeat(DEEP), "]".repeat(DEEP)), 1),
        (
            format!("x: {}1{}\n", "{a: ".repeat(DEEP), "}".repeat(DEEP)),
            1,
        ),
        (format!("x:\n{}1\n", "- ".repeat(DEEP)), 2),
        // Across lines, behind comments that hold the closing brackets.
        (format!("x:\n{}", "  [[ # ]]\n".repeat(DEEP / 2)), 33),
        // Behind strings that hold the closing brackets.
        (format!("x: {}\n", "[\"]\", ".repeat(DEEP)), 1),
    ] {
        assert_eq!(limit_line(&yaml), Some(line), "{}", &yaml[..40]);
    }
}

#[test]
fn deep_indentation_is_refused_at_the_line_that_crosses_the_cap() {
    let yaml: String = (0..100).map(|i| format!("{}k:\n", " ".repeat(i))).collect();
    assert_eq!(limit_line(&yaml), Some(65));
    let yaml: String = (0..64).map(|i| format!("{}k:\n", " ".repeat(i))).collect();
    not_limited(&yaml);
}

#[test]
fn brackets_left_open_in_strings_and_comments_are_refused_only_by_the_dozen() {
    let line = |i: usize| format!("k{i}: \"[\" # {{\n");
    let few: String = (0..20).map(line).collect();
    not_limited(&format!("{VALID}{few}"));
    // The count that reads no strings or comments sees 80 open brackets.
    let many: String = (0..40).map(line).collect();
    assert!(matches!(
        load(&format!("{VALID}{many}")),
        Err(TopologyError::Limit { .. })
    ));
}

#[test]
fn multi_line_flow_collections_and_strings_are_followed() {
    let yaml = format!(
        "{VALID}x: [\n  \"a ]]]] \\\" ]]]]\",\n  'b '' ]]]]',\n  [[[[[[ # ]]]]]]\n  ]]]]]]\n]\n"
    );
    not_limited(&yaml);
}

#[test]
fn text_over_the_size_cap_is_refused_before_parsing() {
    let padding = "#".repeat(MAX_CONFIG_BYTES - VALID.len());
    let at_cap = format!("{VALID}{padding}");
    assert_eq!(at_cap.len(), MAX_CONFIG_BYTES);
    load(&at_cap).unwrap();
    match load(&format!("{at_cap}#")) {
        Err(e @ TopologyError::Limit { .. }) => {
            assert!(
                e.to_string().starts_with("test.yaml: larger than 4 MiB"),
                "{e}"
            );
        }
        other => panic!("expected Limit, got {other:?}"),
    }
}

/// A file in the system's temporary directory, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, bytes: &[u8]) -> TempFile {
        let path =
            std::env::temp_dir().join(format!("tether-topology-{}-{name}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn every_error_of_loading_a_file_names_it() {
    let good = TempFile::new("good.yaml", VALID.as_bytes());
    assert_eq!(Topology::load(&good.0).unwrap(), load(VALID).unwrap());

    let mut utf16 = vec![0xff, 0xfe];
    utf16.extend(VALID.encode_utf16().flat_map(u16::to_le_bytes));
    let large = format!("{VALID}{}", "#".repeat(MAX_CONFIG_BYTES));
    let files = [
        (
            TempFile::new("latin1.yaml", b"listen: caf\xe9\n"),
            "not UTF-8: invalid byte sequence at offset 11",
        ),
        (TempFile::new("utf16.yaml", &utf16), "UTF-16"),
        (
            TempFile::new("large.yaml", large.as_bytes()),
            "larger than 4 MiB",
        ),
        (
            TempFile::new("invalid.yaml", VALID.replace("eu-2", "eu 2").as_bytes()),
            "regions[0].replicas[1].id",
        ),
        (TempFile::new("unparsable.yaml", b"listen: [\n"), "line"),
    ];
    for (file, words) in &files {
        let err = Topology::load(&file.0).unwrap_err().to_string();
        assert!(err.contains(&file.0.display().to_string()), "{err}");
        assert!(err.contains(words), "{err}");
    }
    let dir = std::env::temp_dir();
    let err = Topology::load(&dir).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("cannot read {}", dir.display())),
        "{err}"
    );
}
