//! Helpers shared by this crate's fixture tests.

// Each test binary compiles this module and uses a subset of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// `tests/fixtures/<kind>` of the workspace (`peft`, `convert`, `numerics`).
pub fn fixture_root(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(kind)
}

/// A case of `tests/fixtures/peft` (an adapter, its base and peft's merge).
pub fn peft_case(case: &str) -> PathBuf {
    fixture_root("peft").join(case)
}

/// A case of `tests/fixtures/convert` (a legacy MoE adapter, its base and peft's results).
pub fn convert_case(case: &str) -> PathBuf {
    fixture_root("convert").join(case)
}
