//! `reshard` against `from_pretrained(src).save_pretrained(out, max_shard_size=…)` of the real
//! transformers 5.24.0: every file byte for byte, from sources in the original layout and in
//! the v5 layout, single-file and sharded (tests/fixtures/reshard/, made by
//! tests/interop/fixturegen/reshard_cases.py), plus the re-saves of tests/fixtures/remap/ and
//! tests/fixtures/checkpoint/.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use peftkit_checkpoint::{parse_size, Checkpoint, SaveOptions};
use peftkit_remap::{reshard, Registry, ReshardOptions};
use serde_json::Value;

mod common;
use common::{assert_same_dir, dir_difference, fixture_root, read_json};

fn size(v: &Value) -> u64 {
    match v {
        Value::String(s) => parse_size(s).unwrap(),
        v => v.as_u64().expect("max_shard_size"),
    }
}

fn resharded(src: &Path, max_shard_size: u64, variant: Option<&str>) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let options = ReshardOptions {
        save: SaveOptions {
            max_shard_size,
            variant: variant.map(str::to_owned),
            // Tests need no sync to disk.
            durable: false,
            ..SaveOptions::default()
        },
        ..ReshardOptions::default()
    };
    reshard(src, &tmp.path().join("out"), &options).unwrap();
    tmp
}

/// `(case, case folder, case.json)` of tests/fixtures/reshard.
fn reshard_cases() -> Vec<(String, PathBuf, Value)> {
    let root = fixture_root("reshard");
    let mut out: Vec<(String, PathBuf, Value)> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|d| d.join("case.json").is_file())
        .map(|d| {
            let case = read_json(&d.join("case.json"));
            (
                d.file_name().unwrap().to_string_lossy().into_owned(),
                d,
                case,
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn reshard_is_transformers_resave_from_either_layout() {
    let mut checked = BTreeMap::<String, usize>::new();
    let mut failed = Vec::new();
    for (case, dir, json) in reshard_cases() {
        let sources = json["sources"].as_object().unwrap();
        for (folder, expected) in json["expected"].as_object().unwrap() {
            let max = size(&expected["max_shard_size"]);
            for source in expected["sources"].as_array().unwrap() {
                let source = source.as_str().unwrap();
                let src = dir.join(sources[source]["folder"].as_str().unwrap());
                let out = resharded(&src, max, None);
                if let Some(diff) = dir_difference(&out.path().join("out"), &dir.join(folder)) {
                    failed.push(format!("{case}: {source} -> {folder}: {diff}"));
                }
                *checked
                    .entry(expected["layout"].as_str().unwrap().to_owned())
                    .or_default() += 1;
            }
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    // Both layouts, single-file and sharded sources, several model types.
    assert!(checked["original"] >= 20, "{checked:?}");
    assert!(checked["v5"] >= 16, "{checked:?}");
}

/// The MoE sources of the original layout: reshard must not plan on the on-disk tensors.
/// (The on-disk natural order of a Mixtral layer is w1, w2, w3 per expert; transformers plans
/// every w2, then every w1, then every w3, each group as one unit.)
#[test]
fn the_plan_is_the_fused_models_order_and_storage_groups() {
    let mut checked = 0;
    for (case, dir, json) in reshard_cases() {
        let registry = Registry::builtin().unwrap();
        let mapping = registry
            .mapping(json["model_type"].as_str().unwrap())
            .unwrap();
        let sources = json["sources"].as_object().unwrap();
        for (folder, expected) in json["expected"].as_object().unwrap() {
            for source in expected["sources"].as_array().unwrap() {
                let src = dir.join(
                    sources[source.as_str().unwrap()]["folder"]
                        .as_str()
                        .unwrap(),
                );
                let ckpt = Checkpoint::open(&src).unwrap();
                let state = ckpt.state_dict();
                let saved = mapping.round_trip(&state).unwrap();
                let order: Vec<&str> = saved.state.keys().map(String::as_str).collect();
                let want: Vec<&str> = expected["order"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap())
                    .collect();
                assert_eq!(order, want, "{case}: {source} -> {folder}");
                let mut groups: BTreeMap<u64, Vec<&str>> = BTreeMap::new();
                for (k, t) in &saved.state {
                    if let Some(f) = t.family() {
                        groups.entry(f).or_default().push(k);
                    }
                }
                let mut got: Vec<Vec<&str>> = groups.into_values().collect();
                let mut want: Vec<Vec<&str>> = expected["storage_groups"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|g| {
                        g.as_array()
                            .unwrap()
                            .iter()
                            .map(|v| v.as_str().unwrap())
                            .collect()
                    })
                    .collect();
                got.sort();
                want.sort();
                assert_eq!(got, want, "{case}: {source} -> {folder}: storage groups");
                // Nothing is gathered or computed: every tensor written is a source tensor's
                // own file region (copied as is), whatever the layout.
                for (k, t) in &saved.state {
                    assert_eq!(
                        t.file_source(),
                        state[k].file_source(),
                        "{case}: {k} is not streamed from its file"
                    );
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 30, "{checked}");
}

/// tests/fixtures/remap: `original_<size>/` is the loaded model saved at that size, and
/// `v5_resaved_2KB/` the re-save of `v5/`.
#[test]
fn reshard_reproduces_the_remap_fixtures_resaves() {
    for case in ["mixtral", "qwen2_moe"] {
        let dir = fixture_root("remap").join(case);
        for s in ["2KB", "5KB", "20KB"] {
            let want = dir.join(format!("original_{s}"));
            for src in ["original", "original_2KB", "original_20KB"] {
                let out = resharded(&dir.join(src), parse_size(s).unwrap(), None);
                assert_same_dir(
                    &format!("{case}: {src} -> {s}"),
                    &out.path().join("out"),
                    &want,
                );
            }
        }
        let out = resharded(&dir.join("v5"), parse_size("2KB").unwrap(), None);
        assert_same_dir(
            &format!("{case}: v5 -> 2KB"),
            &out.path().join("out"),
            &dir.join("v5_resaved_2KB"),
        );
    }
}

/// tests/fixtures/checkpoint: Llama models (no conversion table) loaded with
/// `from_pretrained` and re-saved: natural order of the names, variants.
#[test]
fn reshard_of_models_without_a_table_is_transformers_resave() {
    let root = fixture_root("checkpoint");
    let mut checked = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.join("case.json").is_file() {
            continue;
        }
        let case = read_json(&dir.join("case.json"));
        if case["provenance"] != "from_pretrained" {
            continue;
        }
        let max = match &case["max_shard_size"] {
            Value::Null => SaveOptions::default().max_shard_size,
            v => size(v),
        };
        let src = dir.join(case["source"].as_str().unwrap_or("source"));
        let out = resharded(&src, max, case["variant"].as_str());
        assert_same_dir(
            &dir.display().to_string(),
            &out.path().join("out"),
            &dir.join("expected"),
        );
        checked += 1;
    }
    assert!(checked >= 2, "only {checked} from_pretrained cases");
}
