//! `verify` catches each corruption a checkpoint on disk can have, names the file and the
//! tensor, and `Checkpoint::open` refuses the same inputs.

use std::fs;
use std::path::{Path, PathBuf};

mod common;
use common::fixture_root;

use peftkit_checkpoint::verify;
use peftkit_checkpoint::{Checkpoint, WeightsKind};

const SHARDED: &str = "llama_tied_5KB";

/// The checkpoint transformers wrote for `case`.
fn fixture(case: &str) -> PathBuf {
    fixture_root("checkpoint").join(case).join("expected")
}

/// A writable copy of a fixture checkpoint.
fn copy_of(case: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    fs::create_dir(&dir).unwrap();
    for e in fs::read_dir(fixture(case)).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    (tmp, dir)
}

fn problems(dir: &Path) -> Vec<String> {
    verify(dir, WeightsKind::Model, None).unwrap()
}

fn assert_problem(dir: &Path, needles: &[&str]) {
    let found = problems(dir);
    assert!(
        found.iter().any(|p| needles.iter().all(|n| p.contains(n))),
        "no problem mentions {needles:?}; got {found:#?}"
    );
    assert!(
        Checkpoint::open(dir).is_err(),
        "open accepted a corrupt checkpoint"
    );
}

/// Writes a safetensors file from a raw header JSON and `data_len` zero bytes.
fn raw_file(path: &Path, header: &str, data_len: usize) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.resize(bytes.len() + data_len, 0);
    fs::write(path, bytes).unwrap();
}

fn single(header: &str, data_len: usize) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    raw_file(&dir.join("model.safetensors"), header, data_len);
    (tmp, dir)
}

#[test]
fn fixtures_verify_clean() {
    for case in [
        "llama_tied_single",
        SHARDED,
        "llama_untied_3KB",
        "mixed_dtypes",
    ] {
        assert_eq!(problems(&fixture(case)), Vec::<String>::new(), "{case}");
    }
    assert_eq!(
        verify(
            &fixture("llama_variant_fp16"),
            WeightsKind::Model,
            Some("fp16")
        )
        .unwrap(),
        Vec::<String>::new()
    );
}

#[test]
fn truncated_shard() {
    let (_t, dir) = copy_of(SHARDED);
    let f = dir.join("model-00002-of-00006.safetensors");
    let len = fs::metadata(&f).unwrap().len();
    fs::File::options()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 3)
        .unwrap();
    assert_problem(&dir, &["model-00002-of-00006.safetensors", "truncated"]);
}

#[test]
fn trailing_bytes() {
    let (_t, dir) = single(
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
        9,
    );
    assert_problem(&dir, &["model.safetensors", "trailing"]);
}

#[test]
fn header_length_past_end_of_file() {
    let tmp = tempfile::tempdir().unwrap();
    let mut bytes = 1000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    fs::write(tmp.path().join("model.safetensors"), bytes).unwrap();
    assert_problem(tmp.path(), &["model.safetensors", "past the end"]);
}

#[test]
fn gap_between_tensors() {
    let (_t, dir) = single(
        r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#,
        12,
    );
    assert_problem(&dir, &["tensor `b`", "gap"]);
}

#[test]
fn overlapping_tensors() {
    let (_t, dir) = single(
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
        8,
    );
    assert_problem(&dir, &["tensor `b`", "overlaps"]);
}

#[test]
fn size_does_not_match_dtype_and_shape() {
    let (_t, dir) = single(
        r#"{"a":{"dtype":"BF16","shape":[3],"data_offsets":[0,8]}}"#,
        8,
    );
    assert_problem(&dir, &["tensor `a`", "needs 6 bytes"]);
}

#[test]
fn unknown_dtype() {
    let (_t, dir) = single(
        r#"{"a":{"dtype":"F12","shape":[1],"data_offsets":[0,4]}}"#,
        4,
    );
    assert_problem(&dir, &["tensor `a`", "unknown dtype `F12`"]);
}

#[test]
fn header_not_json() {
    let (_t, dir) = single("{nope", 0);
    assert_problem(&dir, &["model.safetensors", "not valid JSON"]);
}

fn edit_index(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("model.safetensors.index.json");
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
    edit(&mut v);
    fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn index_entry_missing_from_shards() {
    let (_t, dir) = copy_of(SHARDED);
    edit_index(&dir, |v| {
        v["weight_map"]["model.ghost.weight"] = "model-00001-of-00006.safetensors".into();
    });
    assert_problem(&dir, &["model.ghost.weight", "no shard holds it"]);
}

#[test]
fn shard_tensor_missing_from_index() {
    let (_t, dir) = copy_of(SHARDED);
    edit_index(&dir, |v| {
        v["weight_map"]
            .as_object_mut()
            .unwrap()
            .shift_remove("model.norm.weight");
    });
    assert_problem(&dir, &["model.norm.weight", "does not list"]);
}

#[test]
fn index_entry_in_wrong_file() {
    let (_t, dir) = copy_of(SHARDED);
    edit_index(&dir, |v| {
        v["weight_map"]["model.norm.weight"] = "model-00001-of-00006.safetensors".into();
    });
    assert_problem(&dir, &["model.norm.weight", "stored in"]);
}

#[test]
fn index_total_size_wrong() {
    let (_t, dir) = copy_of(SHARDED);
    edit_index(&dir, |v| v["metadata"]["total_size"] = 1.into());
    assert_problem(&dir, &["total_size is 1"]);
}

#[test]
fn index_escapes_the_folder() {
    for bad in [
        "../model-00001-of-00006.safetensors",
        "/etc/passwd",
        "sub/../../x.safetensors",
    ] {
        let (_t, dir) = copy_of(SHARDED);
        edit_index(&dir, |v| v["weight_map"]["model.norm.weight"] = bad.into());
        assert_problem(&dir, &[bad, "not a plain file name"]);
    }
}

#[cfg(unix)]
#[test]
fn symlink_escaping_the_folder() {
    let (t, dir) = copy_of(SHARDED);
    let outside = t.path().join("outside.safetensors");
    fs::rename(dir.join("model-00006-of-00006.safetensors"), &outside).unwrap();
    std::os::unix::fs::symlink(&outside, dir.join("model-00006-of-00006.safetensors")).unwrap();
    assert_problem(
        &dir,
        &[
            "model-00006-of-00006.safetensors",
            "outside the checkpoint folder",
        ],
    );
}

#[test]
fn missing_shard() {
    let (_t, dir) = copy_of(SHARDED);
    fs::remove_file(dir.join("model-00003-of-00006.safetensors")).unwrap();
    assert_problem(&dir, &["model-00003-of-00006.safetensors", "missing"]);
}

#[test]
fn tensor_stored_twice() {
    let (_t, dir) = copy_of(SHARDED);
    // Replace shard 6 (model.norm.weight) with a copy of shard 5, so shard 5's tensors are
    // stored twice and model.norm.weight is stored nowhere.
    fs::copy(
        dir.join("model-00005-of-00006.safetensors"),
        dir.join("model-00006-of-00006.safetensors"),
    )
    .unwrap();
    assert_problem(&dir, &["stored more than once"]);
}

#[test]
fn stale_single_file_shadows_index() {
    let (_t, dir) = copy_of(SHARDED);
    fs::copy(
        fixture("llama_tied_single").join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let found = problems(&dir);
    assert!(
        found
            .iter()
            .any(|p| p.contains("both model.safetensors and model.safetensors.index.json")),
        "{found:?}"
    );
}

#[test]
fn not_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let found = problems(tmp.path());
    assert!(found[0].contains("no checkpoint found"), "{found:?}");
}
