//! Helpers shared by this crate's tests: where the fixtures are, how to read them, and how
//! to compare a written folder with the one transformers wrote.

// Each test binary compiles this module and uses a subset of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// `tests/fixtures/<kind>` of the workspace (`remap`, `reshard`, `checkpoint`).
pub fn fixture_root(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(kind)
}

/// The JSON document in `path`; panics naming the file.
pub fn read_json(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()))
}

/// Every file of `dir`, by name.
pub fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// The first difference between two folders, if any.
pub fn dir_difference(got: &Path, want: &Path) -> Option<String> {
    let (g, w) = (files(got), files(want));
    if g.keys().ne(w.keys()) {
        return Some(format!(
            "file names {:?} vs {:?}",
            g.keys().collect::<Vec<_>>(),
            w.keys().collect::<Vec<_>>()
        ));
    }
    w.iter()
        .find(|(name, bytes)| &&g[*name] != bytes)
        .map(|(name, bytes)| {
            format!(
                "{name} differs ({} vs {} bytes)",
                g[name].len(),
                bytes.len()
            )
        })
}

/// Panics with the first difference between the folders `got` and `want`, naming `what`.
pub fn assert_same_dir(what: &str, got: &Path, want: &Path) {
    if let Some(diff) = dir_difference(got, want) {
        panic!("{what}: {diff} ({} vs {})", got.display(), want.display());
    }
}
