//! Helpers shared by this crate's fixture tests.

// Each test binary compiles this module and uses a subset of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// `tests/fixtures/<kind>` of the workspace (`peft`, `convert`, ...).
pub fn fixture_root(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(kind)
}

/// The bytes of `path`; panics naming the file.
pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The text of `path`; panics naming the file.
pub fn read_text(path: &Path) -> String {
    String::from_utf8(read(path)).expect("utf-8")
}

/// Sorts the items of the top-level lists `fields` in peft's indent=2 layout, so that lists peft
/// wrote from a Python set (`target_modules`, ...) compare as sets; everything else stays byte
/// for byte.
pub fn sort_set_lists<S: AsRef<str>>(text: &str, fields: &[S]) -> String {
    let openers: Vec<String> = fields
        .iter()
        .map(|f| format!("  \"{}\": [", f.as_ref()))
        .collect();
    let lines: Vec<&str> = text.split('\n').collect();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        out.push(lines[i].to_owned());
        if openers.iter().any(|o| o == lines[i]) {
            let mut items = Vec::new();
            i += 1;
            // Items sit one level deeper than the list; the closing `  ]` ends them.
            while i < lines.len() && lines[i].starts_with("    ") {
                items.push(lines[i].trim_end_matches(',').to_owned());
                i += 1;
            }
            items.sort();
            let n = items.len();
            for (k, item) in items.into_iter().enumerate() {
                out.push(if k + 1 < n { format!("{item},") } else { item });
            }
            // The closing bracket is pushed by the next iteration.
            continue;
        }
        i += 1;
    }
    out.join("\n")
}

/// [`sort_set_lists`] of `target_modules` alone.
pub fn sort_target_modules(text: &str) -> String {
    sort_set_lists(text, &["target_modules"])
}
