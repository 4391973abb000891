//! Byte-for-byte comparison with checkpoints written by transformers 5.24
//! (tests/fixtures/checkpoint, made by tests/interop/make_fixtures.py). The re-saves of the
//! `from_pretrained` cases are checked by peftkit-remap's `reshard` tests (a re-save plans on
//! the layout transformers loads into, which takes the conversion tables).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use peftkit_checkpoint::{
    parse_size, save_pretrained, Checkpoint, GenerationConfig, ModelConfig, SaveOptions, StateDict,
    WeightsKind,
};
use serde_json::Value;

mod common;
use common::{file_names, fixture_root, read_json};

fn cases() -> Vec<(String, PathBuf, Value)> {
    let mut out = Vec::new();
    for entry in fs::read_dir(fixture_root("checkpoint")).expect("fixtures folder") {
        let dir = entry.unwrap().path();
        let case = dir.join("case.json");
        if case.is_file() {
            let v = read_json(&case);
            out.push((
                dir.file_name().unwrap().to_string_lossy().into_owned(),
                dir,
                v,
            ));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(
        out.len() >= 12,
        "expected the 12 transformers fixtures, found {}",
        out.len()
    );
    out
}

fn assert_same_dir(case: &str, expected: &Path, actual: &Path) {
    assert_eq!(
        file_names(expected),
        file_names(actual),
        "{case}: file names differ"
    );
    for name in file_names(expected) {
        let (e, a) = (
            fs::read(expected.join(&name)).unwrap(),
            fs::read(actual.join(&name)).unwrap(),
        );
        assert!(
            e == a,
            "{case}: {name} differs ({} vs {} bytes)",
            e.len(),
            a.len()
        );
    }
}

fn options(case: &Value) -> SaveOptions {
    let max_shard_size = match &case["max_shard_size"] {
        Value::Null => SaveOptions::default().max_shard_size,
        Value::String(s) => parse_size(s).unwrap(),
        v => v.as_u64().expect("max_shard_size"),
    };
    SaveOptions {
        max_shard_size,
        variant: case["variant"].as_str().map(str::to_owned),
        total_parameters: case["total_parameters"].as_u64(),
        tied_weights: case["tied"]
            .as_array()
            .map(|ties| {
                ties.iter()
                    .map(|t| {
                        (
                            t[0].as_str().unwrap().to_owned(),
                            t[1].as_str().unwrap().to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
        ..Default::default()
    }
}

#[test]
fn save_pretrained_matches_transformers_for_models_built_from_config() {
    let mut checked = Vec::new();
    for (name, dir, case) in cases() {
        if case["provenance"] != "from_config" {
            continue;
        }
        let expected = dir.join("expected");
        let mut opts = options(&case);
        let src =
            Checkpoint::open_kind(&expected, WeightsKind::Model, opts.variant.as_deref()).unwrap();
        // Rebuild the state dict in the order transformers handed to the splitter; tied
        // targets alias their source, as they do in memory.
        let mut sd = StateDict::new();
        for key in case["order"].as_array().unwrap() {
            let key = key.as_str().unwrap();
            sd.insert(
                key.to_owned(),
                src.get(key)
                    .unwrap_or_else(|| panic!("{name}: {key}"))
                    .clone(),
            );
        }
        for (target, source) in opts.tied_weights.clone() {
            if let Some(t) = sd.get(&source).cloned() {
                sd.insert(target, t);
            }
        }
        if expected.join("config.json").is_file() {
            opts.config = Some(ModelConfig::read(&expected.join("config.json")).unwrap());
        }
        if expected.join("generation_config.json").is_file() {
            opts.generation_config =
                Some(GenerationConfig::read(&expected.join("generation_config.json")).unwrap());
        }
        let out = tempfile::tempdir().unwrap();
        let target = out.path().join("saved");
        save_pretrained(&target, &sd, &opts).unwrap();
        assert_same_dir(&name, &expected, &target);
        checked.push(name);
    }
    assert!(checked.len() >= 10, "only {checked:?} from_config cases");
    // The shard limit's boundary: a tensor of exactly the limit (4096 B) and tensors summing
    // exactly to it (6144 B).
    for boundary in ["llama_untied_4096B", "llama_untied_6144B"] {
        assert!(
            checked.iter().any(|c| c == boundary),
            "{boundary} not checked"
        );
    }
}

#[test]
fn natural_order_of_fixture_matches_case_order() {
    for (name, dir, case) in cases() {
        if case["provenance"] != "from_pretrained" {
            continue;
        }
        let src = Checkpoint::open(&dir.join(case["source"].as_str().unwrap_or("source"))).unwrap();
        let ours: Vec<String> = src.natural_state_dict().keys().cloned().collect();
        let theirs: Vec<String> = case["order"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(ours, theirs, "{name}");
    }
}

#[test]
fn saving_through_a_checkpoints_own_plan_reproduces_its_file_names() {
    use peftkit_checkpoint::{save_planned, SavePlan};
    for (name, dir, case) in cases() {
        let expected = dir.join("expected");
        let ck =
            Checkpoint::open_kind(&expected, WeightsKind::Model, case["variant"].as_str()).unwrap();
        let plan = SavePlan::from_checkpoint(&ck);
        let out = tempfile::tempdir().unwrap();
        let target = out.path().join("copy");
        let opts = SaveOptions {
            metadata: ck.metadata().cloned().unwrap_or_default(),
            ..Default::default()
        };
        save_planned(&target, &ck.state_dict(), &plan, &opts).unwrap();
        for f in file_names(&target) {
            assert_eq!(
                fs::read(expected.join(&f)).unwrap(),
                fs::read(target.join(&f)).unwrap(),
                "{name}: {f}"
            );
        }
        let weights: BTreeSet<String> = file_names(&expected)
            .into_iter()
            .filter(|f| f.ends_with(".safetensors") || f.contains(".index"))
            .collect();
        assert_eq!(file_names(&target), weights, "{name}");
    }
}
