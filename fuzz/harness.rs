//! The fuzz harnesses: one function per target, each feeding arbitrary bytes to a parser the
//! way the CLI does. The property checked is the one a hostile file must not break: no panic,
//! no hang, no read or write outside the scratch folder, and answers that agree with each other
//! (a header `read_header` accepts opens, and every tensor it lists reads its stated length).
//!
//! Included by the cargo-fuzz targets (`fuzz/fuzz_targets/`) and by
//! `tests/fuzz_regressions.rs`, which replays every input kept in `fuzz/regressions/` on stable.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use peftkit::checkpoint::{self as ckpt, Checkpoint, WeightsKind};

/// A scratch folder for the process (the readers take paths).
fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("scratch folder"))
        .path()
}

/// A folder of the scratch area, created once.
fn scratch_dir(name: &str) -> PathBuf {
    let d = scratch().join(name);
    std::fs::create_dir_all(&d).expect("scratch sub-folder");
    d
}

/// A safetensors file given as bytes: its header checked, then opened, then every tensor read.
pub fn safetensors_reader(data: &[u8]) {
    let path = scratch_dir("st").join("model.safetensors");
    std::fs::write(&path, data).expect("scratch write");
    let (header, problems) = match ckpt::inspect_file(&path) {
        Ok(r) => r,
        Err(_) => return,
    };
    let opened = ckpt::open_file(&path);
    // The two readers agree: a header without problems opens, one with problems does not.
    assert_eq!(
        header.is_some() && problems.is_empty(),
        opened.is_ok(),
        "inspect_file and open_file disagree: {problems:?}"
    );
    if let Ok((_, tensors)) = opened {
        for (name, t) in tensors {
            let bytes = t.bytes().expect("a validated tensor reads");
            assert_eq!(bytes.len(), t.byte_len(), "{name}: length");
            let _ = ckpt::nonfinite(t.dtype(), &bytes);
        }
    }
}

/// A sharded checkpoint whose index is the input: two valid shards, a link leading out of the
/// folder, then `Checkpoint::open` and `verify`.
pub fn index_reader(data: &[u8]) {
    let dir = scratch_dir("idx");
    let shard = |name: &str, tensor: &str| {
        let p = dir.join(name);
        if !p.exists() {
            let mut sd = ckpt::StateDict::new();
            sd.insert(
                tensor.to_owned(),
                ckpt::Tensor::from_bytes(ckpt::Dtype::F32, vec![2], vec![0; 8]).expect("tensor"),
            );
            let tensors = sd.iter().map(|(n, t)| (n.as_str(), t));
            ckpt::write_file(&p, tensors, &Default::default(), &mut |_| {}).expect("shard");
        }
    };
    shard("model-00001-of-00002.safetensors", "a");
    shard("model-00002-of-00002.safetensors", "b");
    let outside = scratch_dir("outside").join("x.safetensors");
    if !outside.exists() {
        std::fs::copy(dir.join("model-00001-of-00002.safetensors"), &outside).expect("copy");
        let _ = std::os::unix::fs::symlink(&outside, dir.join("escape.safetensors"));
    }
    std::fs::write(dir.join("model.safetensors.index.json"), data).expect("scratch write");
    if let Ok(c) = Checkpoint::open_kind(&dir, WeightsKind::Model, None) {
        for f in &c.files {
            assert!(
                f.path.starts_with(&dir) && !f.path.ends_with("escape.safetensors"),
                "a shard outside the folder was opened: {}",
                f.path.display()
            );
        }
        let problems = ckpt::verify(&dir, WeightsKind::Model, None).expect("verify");
        assert!(
            problems.is_empty(),
            "open accepted what verify refuses: {problems:?}"
        );
    }
}

/// `config.json`, `generation_config.json` and `adapter_config.json` parsing, and the writers
/// of what parsed.
pub fn configs(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = ckpt::ModelConfig::from_json(text) {
        let _ = c.to_json_string();
        let _ = c.model_type();
        let _ = c.tie_word_embeddings();
        let _ = ckpt::GenerationConfig::from_model_config(&c).to_json_string();
    }
    if let Ok(g) = ckpt::GenerationConfig::from_json(text) {
        let _ = g.to_json_string();
    }
    if let Ok((a, _)) = peftkit::peft::AdapterConfig::from_json_str(text) {
        let _ = a.validate();
        let _ = a.target_rules();
        let _ = a.to_json_string();
    }
}

/// A user conversion table (`--table`), layered over the built-in ones and compiled.
pub fn conversion_table(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(table) = peftkit::remap::ConversionTable::from_json(text, "fuzz") else {
        return;
    };
    // The built-in tables are parsed once; each input is layered over a copy.
    static BUILTIN: OnceLock<peftkit::Registry> = OnceLock::new();
    let mut registry = BUILTIN
        .get_or_init(|| peftkit::Registry::builtin().expect("built-in tables"))
        .clone();
    if registry.add_table_json(text, "fuzz").is_err() {
        return;
    }
    let _ = registry.mapping_for_table(&table.name);
}

/// A Python `re` pattern and a text (split at the first NUL byte), compiled in every mode and
/// matched.
pub fn py_regex(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (pattern, subject) = text
        .split_once('\0')
        .unwrap_or((text, "model.layers.0.q_proj"));
    use peftkit::peft::{PyMatchMode, PyRegex};
    for mode in [
        PyMatchMode::Search,
        PyMatchMode::Match,
        PyMatchMode::FullMatch,
    ] {
        if let Ok(re) = PyRegex::new(pattern, mode) {
            let _ = re.is_match(subject);
            let _ = re.named_group(subject, "name");
        }
    }
    let escaped = peftkit::peft::re_escape(pattern);
    // An escaped text matches itself, whole.
    if let Ok(re) = PyRegex::fullmatch(&escaped) {
        assert_eq!(
            re.is_match(pattern).ok(),
            Some(true),
            "re.escape({pattern:?})"
        );
    }
}
