//! Helpers shared by this crate's fixture tests.

// Each test binary compiles this module and uses a subset of it.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};

use peftkit_checkpoint::Checkpoint;
use peftkit_merge::{set_bnb_avx512, set_reduction_order, HostOrder};
use serde_json::Value;

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

/// Every file of `expected` equals the one in `actual` byte for byte (tensors first, for a
/// readable failure).
pub fn assert_same(what: &str, expected: &Path, actual: &Path) {
    let names = |d: &Path| {
        let mut v: Vec<String> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(expected), names(actual), "{what}: files");
    let (e, a) = (
        Checkpoint::open(expected).unwrap(),
        Checkpoint::open(actual).unwrap(),
    );
    let mut bad = vec![];
    for (name, et) in e.tensors() {
        let at = a
            .get(name)
            .unwrap_or_else(|| panic!("{what}: {name} missing"));
        if (et.dtype(), et.shape()) != (at.dtype(), at.shape())
            || et.bytes().unwrap() != at.bytes().unwrap()
        {
            bad.push(name.to_owned());
        }
    }
    assert!(bad.is_empty(), "{what}: tensors differ: {bad:#?}");
    for f in names(expected) {
        let same = fs::read(expected.join(&f)).unwrap() == fs::read(actual.join(&f)).unwrap();
        assert!(same, "{what}: {f} differs");
    }
}

/// This process merges as the fixtures' host did (tests/fixtures/HOST.json): MKL's reduction
/// order and bitsandbytes' AVX-512 kernel.
pub fn as_fixture_host() {
    let text = fs::read_to_string(fixture_root("HOST.json")).unwrap();
    let host: Value = serde_json::from_str(&text).unwrap();
    let avx512 = host["isa"]["avx512f"].as_bool().unwrap();
    let made_on = HostOrder::for_cpu(host["vendor_id"].as_str().unwrap(), avx512);
    assert!(
        made_on.measured,
        "fixtures made on an unmeasured CPU: {text}"
    );
    set_reduction_order(Some(made_on.order));
    set_bnb_avx512(Some(avx512));
}
