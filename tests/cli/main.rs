//! The `peftkit` binary run as a user runs it (issue 9: the CLI is tested from Rust).
//!
//! Every verb runs on the fixtures of `tests/fixtures/` (written by transformers 5.24 and peft
//! 0.21.2, see `tests/fixtures/README.md`) and its output is compared byte for byte with the
//! files the real library wrote. Expected values (tensor names, counts, bytes, ranks, ...) are
//! read from those files with the small safetensors header reader below, never typed by hand
//! and never obtained from peftkit's own libraries.
//!
//! * `verbs`: success (exit 0) and byte-identical outputs for inspect, verify, reshard, merge,
//!   extract, remap, and split followed by gather;
//! * `failures`: exit codes and messages of usage errors, bad inputs and corrupted checkpoints,
//!   and that a failed command writes nothing;
//! * `json`: the `--json` outputs of `inspect`, `merge` and `diff`: exact keys and JSON types (those of
//!   the examples in docs/cli.md too), values cross-checked against the fixtures;
//! * `diff`: `peftkit diff` against differences recomputed from the files' raw bytes;
//! * `ui`: completions, man pages, `-q`, `--max-shard-size` forms;
//! * `help`: `--help`, `--version` and the flags docs/cli.md lists;
//! * `quant`: FP8 merges against the quant fixtures, packed (GPTQ) checkpoints passed through
//!   by reshard and inspect and refused by merge.

mod crash;
mod diff;
mod failures;
mod help;
mod hub;
mod json;
mod malformed;
mod quant;
mod reliability;
mod ui;
mod verbs;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

/// The `peftkit` binary built for these tests.
pub fn peftkit() -> assert_cmd::Command {
    assert_cmd::cargo::cargo_bin_cmd!("peftkit")
}

/// `tests/fixtures/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// `tests/fixtures/peft/<case>`.
pub fn peft_case(case: &str) -> PathBuf {
    fixture("peft").join(case)
}

/// The adapter folders of a peft case, in the order peft merged them: `adapter/` (the default
/// adapter) then every sub-folder holding an `adapter_config.json` (two_adapters: `other/`).
pub fn adapter_dirs(case: &str) -> Vec<PathBuf> {
    let root = peft_case(case).join("adapter");
    let mut subs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("adapter_config.json").is_file())
        .collect();
    subs.sort();
    let mut out = vec![root];
    out.extend(subs);
    out
}

pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Names of the entries of a folder.
pub fn entries(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Every file of a folder, sub-folders included, by relative path.
pub fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, read(&p));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// `got` holds exactly the files of `want`, byte for byte.
pub fn assert_same_dir(got: &Path, want: &Path) {
    let (g, w) = (files(got), files(want));
    assert_eq!(
        g.keys().collect::<Vec<_>>(),
        w.keys().collect::<Vec<_>>(),
        "files of {} vs {}",
        got.display(),
        want.display()
    );
    for (name, bytes) in &w {
        assert!(
            &g[name] == bytes,
            "{} differs from {}",
            got.join(name).display(),
            want.join(name).display()
        );
    }
}

/// Sorts the items of the top-level lists `fields` of a JSON file written with indent=2, so
/// that the lists peft writes from Python sets (`target_modules`, `target_parameters`, in
/// `PYTHONHASHSEED` order) compare as sets; every other byte is kept.
pub fn sets_sorted(text: &str, fields: &[&str]) -> String {
    let lines: Vec<&str> = text.split('\n').collect();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        out.push(lines[i].to_owned());
        if fields.iter().any(|f| lines[i] == format!("  \"{f}\": [")) {
            let mut items = Vec::new();
            i += 1;
            while i < lines.len() && lines[i].starts_with("    ") {
                items.push(lines[i].trim_end_matches(',').to_owned());
                i += 1;
            }
            items.sort();
            let n = items.len();
            for (k, item) in items.into_iter().enumerate() {
                out.push(if k + 1 < n { format!("{item},") } else { item });
            }
            continue;
        }
        i += 1;
    }
    out.join("\n")
}

/// An adapter folder written by peftkit equals peft's: weights byte for byte, the config byte
/// for byte once peft's set-ordered lists are sorted.
pub fn assert_same_adapter(got: &Path, want: &Path) {
    assert!(
        read(&got.join("adapter_model.safetensors"))
            == read(&want.join("adapter_model.safetensors")),
        "{}: adapter_model.safetensors differs from {}",
        got.display(),
        want.display()
    );
    let fields = ["target_modules", "target_parameters"];
    let g = String::from_utf8(read(&got.join("adapter_config.json"))).unwrap();
    let w = String::from_utf8(read(&want.join("adapter_config.json"))).unwrap();
    assert_eq!(
        sets_sorted(&g, &fields),
        sets_sorted(&w, &fields),
        "{}: adapter_config.json differs from {}",
        got.display(),
        want.display()
    );
}

/// One tensor entry of a safetensors header.
#[derive(Debug, Clone)]
pub struct HeaderTensor {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<u64>,
    pub begin: u64,
    pub end: u64,
}

impl HeaderTensor {
    pub fn bytes(&self) -> u64 {
        self.end - self.begin
    }
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// The tensors of a `.safetensors` file, read from its header (8-byte little-endian length,
/// then JSON), in storage order. Independent of peftkit's reader on purpose.
pub fn header(path: &Path) -> Vec<HeaderTensor> {
    let bytes = read(path);
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let json: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut out: Vec<HeaderTensor> = json
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(name, v)| HeaderTensor {
            name: name.clone(),
            dtype: v["dtype"].as_str().unwrap().to_owned(),
            shape: v["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .collect(),
            begin: v["data_offsets"][0].as_u64().unwrap(),
            end: v["data_offsets"][1].as_u64().unwrap(),
        })
        .collect();
    out.sort_by_key(|t| t.begin);
    out
}

/// The weight files of a checkpoint folder in shard order: the files its index names, or the
/// single file.
pub fn weight_files(dir: &Path, index: Option<&str>, single: &str) -> Vec<String> {
    match index {
        Some(index) => {
            let idx = read_json(&dir.join(index));
            let set: BTreeSet<String> = idx["weight_map"]
                .as_object()
                .unwrap()
                .values()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect();
            set.into_iter().collect()
        }
        None => vec![single.to_owned()],
    }
}

/// The stdout of a successful run, as text.
pub fn stdout_of(assert: &assert_cmd::assert::Assert) -> String {
    String::from_utf8(assert.get_output().stdout.clone()).unwrap()
}

/// How the text outputs print a size: bytes below 1000, else two decimals of the largest
/// decimal unit (`26.94 kB`, `1.50 GB`), the units of `--max-shard-size`.
pub fn human_bytes(n: u64) -> String {
    if n < 1000 {
        return format!("{n} B");
    }
    let mut value = n as f64;
    let mut unit = "B";
    for u in ["kB", "MB", "GB", "TB", "PB"] {
        if value < 1000.0 {
            break;
        }
        value /= 1000.0;
        unit = u;
    }
    format!("{value:.2} {unit}")
}

/// How the text outputs print a count: thousands separated by commas (`6,736`).
pub fn human_count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `N thing` or `N things`, the count as [`human_count`] prints it.
pub fn human_plural(n: usize, one: &str, many: &str) -> String {
    format!(
        "{} {}",
        human_count(n as u64),
        if n == 1 { one } else { many }
    )
}

/// The stderr of a run, as text.
pub fn stderr_of(assert: &assert_cmd::assert::Assert) -> String {
    String::from_utf8(assert.get_output().stderr.clone()).unwrap()
}

/// The one JSON document a `--json` run printed on stdout.
pub fn stdout_json(assert: &assert_cmd::assert::Assert) -> Value {
    let text = stdout_of(assert);
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("stdout is not one JSON value ({e}):\n{text}"))
}
