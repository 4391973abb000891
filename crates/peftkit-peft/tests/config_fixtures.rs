//! The config, spec and targeting layers against files written by the real peft 0.21.2
//! (`tests/fixtures/peft/<case>/`, see `tests/fixtures/peft/README.md`).
//!
//! * every `adapter_config.json` parses without warnings, validates, and is written back byte
//!   for byte (set-valued lists compared as sets; with `SetOrder::AsHeld`, exactly);
//! * every tensor key of every adapter file classifies as the config's method (or is a plain
//!   replacement tensor), LoRA ranks agree with `rank_pattern`, adapted modules are targeted;
//! * the in-memory keys of `full_state_dict_order.json` map to the on-disk keys and back;
//! * the ≥ 20 target-module compression reproduces what peft saved.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use peftkit_peft::{
    compress_target_modules, AdapterConfig, AdapterNamePlacement, PatternResolver, SetOrder, Spec,
    TargetMatcher, TargetModules, WriteOptions,
};
use serde_json::Value;

mod common;
use common::{fixture_root, sort_set_lists};

/// Every `adapter_config.json` below `dir`, sorted.
fn find_configs(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            find_configs(&path, out);
        } else if path.file_name().is_some_and(|n| n == "adapter_config.json") {
            out.push(path);
        }
    }
}

fn all_configs() -> Vec<PathBuf> {
    let mut configs = Vec::new();
    find_configs(&fixture_root("peft"), &mut configs);
    configs.sort();
    assert!(
        !configs.is_empty(),
        "no adapter_config.json under {} (run tests/interop/run.sh --regen)",
        fixture_root("peft").display()
    );
    configs
}

fn read_config(path: &Path) -> AdapterConfig {
    let (config, warnings) =
        AdapterConfig::from_file(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // peft 0.21.2 wrote these files: every field must be known and nothing adjusted.
    assert!(
        warnings.is_empty(),
        "{}: unexpected warnings {warnings:?}",
        path.display()
    );
    config
}

#[test]
fn configs_round_trip_byte_for_byte() {
    for path in all_configs() {
        let expected = std::fs::read_to_string(&path).expect("readable fixture");
        let config = read_config(&path);
        config
            .validate()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));

        // As held: peft's own (hash-seed dependent) set order is reproduced exactly.
        let as_held = config.to_json_string_with(&WriteOptions {
            set_order: SetOrder::AsHeld,
        });
        assert_eq!(as_held, expected, "{} (as held)", path.display());

        // Default writer: set-valued lists sorted; equal to peft's file up to that order.
        let written = config.to_json_string();
        let set_fields = &Spec::embedded()
            .method(config.peft_type())
            .expect("known method")
            .set_fields;
        assert_eq!(
            sort_set_lists(&written, set_fields),
            sort_set_lists(&expected, set_fields),
            "{}",
            path.display()
        );

        // Reading what we wrote gives the same config back (up to the set order).
        let (again, warnings) = AdapterConfig::from_json_str(&written).expect("own output parses");
        assert!(warnings.is_empty());
        assert_eq!(again.to_json_string(), written, "{}", path.display());
    }
}

/// Tensor names and shapes from a safetensors header.
fn safetensors_shapes(path: &Path) -> HashMap<String, Vec<u64>> {
    let mut file = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut len = [0u8; 8];
    file.read_exact(&mut len).expect("header length");
    let mut header = vec![0u8; u64::from_le_bytes(len) as usize];
    file.read_exact(&mut header).expect("header");
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(&header).expect("header JSON");
    header
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(k, v)| {
            let shape = v["shape"]
                .as_array()
                .expect("shape")
                .iter()
                .map(|d| d.as_u64().expect("dim"))
                .collect();
            (k, shape)
        })
        .collect()
}

/// The case's `case.json`.
fn case_json(case: &Path) -> Value {
    let path = case.join("case.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `(adapter name, adapter directory)` of every adapter of a case, from its own metadata
/// (`case.json["adapter_names"]`, `default` first): peft saves `default` in `adapter/` and every
/// other adapter in `adapter/<name>/`. A missing folder is a failure, not a skipped adapter.
fn adapters_of(case: &Path) -> Vec<(String, PathBuf)> {
    let dir = case.join("adapter");
    let names = case_json(case)["adapter_names"]
        .as_array()
        .unwrap_or_else(|| panic!("{}: case.json has no adapter_names", case.display()))
        .iter()
        .map(|n| n.as_str().expect("adapter name").to_owned())
        .collect::<Vec<_>>();
    assert_eq!(names.first().map(String::as_str), Some("default"));
    names
        .into_iter()
        .map(|name| {
            let path = if name == "default" {
                dir.clone()
            } else {
                dir.join(&name)
            };
            assert!(
                path.join("adapter_config.json").is_file(),
                "{}: adapter {name} has no adapter_config.json",
                case.display()
            );
            (name, path)
        })
        .collect()
}

/// The number of peft cases the generator writes (`tests/fixtures/peft/README.md`).
const PEFT_CASES: usize = 17;

/// Every case folder (one with a `case.json`), sorted. Each has an adapter; every check below
/// fails on a missing file instead of skipping the case.
fn cases() -> Vec<PathBuf> {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(fixture_root("peft"))
        .expect("fixture folder")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("case.json").is_file())
        .collect();
    cases.sort();
    assert!(
        cases.len() >= PEFT_CASES,
        "expected the {PEFT_CASES} peft cases, found {cases:?}"
    );
    cases
}

#[test]
fn adapter_keys_classify_and_ranks_follow_the_config() {
    let spec = Spec::embedded();
    let mut checked_ranks = 0;
    for case in cases() {
        for (name, dir) in adapters_of(&case) {
            let config = read_config(&dir.join("adapter_config.json"));
            let method = config.peft_type();
            let prefix = &spec.method(method).expect("known").param_prefix;
            let shapes = safetensors_shapes(&dir.join("adapter_model.safetensors"));
            let rules = config.target_rules().expect("rules");
            let matcher = config
                .as_lora()
                .map(|_| TargetMatcher::new(&rules).expect("compiles"));
            let patterns = config
                .as_lora()
                .map(|c| PatternResolver::new(c).expect("compiles"));
            for (key, shape) in &shapes {
                let where_ = format!("{} [{name}] {key}", case.display());
                let Some(class) = spec.classify_key_for(method, key) else {
                    // Replacement tensors carry no marker; they never use the method's prefix.
                    assert!(!key.contains(prefix.as_str()), "{where_}: unclassified");
                    continue;
                };
                assert_eq!(&class.disk_key, key, "{where_}");
                assert_eq!(class.adapter_name, None, "{where_}");
                let (Some(matcher), Some(patterns)) = (&matcher, &patterns) else {
                    continue;
                };
                let module = class
                    .module_path
                    .as_deref()
                    .expect("LoRA keys are per module");
                // Nested ParamWrapper levels and target_parameters are not module targets.
                if rules.target_parameters.is_some() || module.contains(".base_layer") {
                    continue;
                }
                if class.role == "trainable_tokens" {
                    continue;
                }
                assert!(matcher.is_target(module).expect("matches"), "{where_}");
                if class.role == "a" || class.role == "embedding_a" {
                    let r = patterns.rank_for(module).expect("rank");
                    assert_eq!(shape[0], r, "{where_}: rank");
                    checked_ranks += 1;
                }
            }
        }
    }
    assert!(checked_ranks > 0);
}

#[test]
fn in_memory_keys_map_to_disk_keys_and_back() {
    let spec = Spec::embedded();
    let mut checked = 0;
    for case in cases() {
        // The generator saves the full state dict of every case (peft_cases.py,
        // save_full_state_dict), mergeable or not: a missing file is a broken fixture.
        let order_path = case.join("full_state_dict_order.json");
        let order = std::fs::read_to_string(&order_path)
            .unwrap_or_else(|e| panic!("{}: {e}", order_path.display()));
        let memory_keys: Vec<String> = serde_json::from_str(&order).expect("list of keys");
        let memory_set: HashSet<&str> = memory_keys.iter().map(String::as_str).collect();
        let adapters = adapters_of(&case);
        let mut disk: HashMap<String, (String, HashSet<String>)> = HashMap::new();
        for (name, dir) in &adapters {
            let config = read_config(&dir.join("adapter_config.json"));
            let keys = safetensors_shapes(&dir.join("adapter_model.safetensors"))
                .into_keys()
                .collect();
            disk.insert(name.clone(), (config.peft_type().to_owned(), keys));
        }
        let method = disk["default"].0.clone();
        // Memory → disk: every adapter tensor of the live model is in its adapter's file.
        let mut mapped = 0;
        for key in &memory_keys {
            let Some(class) = spec.classify_key_for(&method, key) else {
                continue;
            };
            let adapter = class
                .adapter_name
                .clone()
                .unwrap_or_else(|| panic!("{}: {key} has no adapter name", case.display()));
            let (_, file_keys) = &disk[&adapter];
            assert!(
                file_keys.contains(&class.disk_key),
                "{}: {key} -> {} not in the {adapter} file",
                case.display(),
                class.disk_key
            );
            mapped += 1;
        }
        // Disk → memory: every classified key of a file has its in-memory counterpart.
        for (adapter, (peft_type, keys)) in &disk {
            for key in keys {
                let Some(class) = spec.classify_key_for(peft_type, key) else {
                    continue;
                };
                if class.placement == AdapterNamePlacement::None {
                    continue;
                }
                let memory = class.memory_key(adapter).expect("has a memory form");
                assert!(
                    memory_set.contains(memory.as_str()),
                    "{}: {key} -> {memory} not in the live state dict",
                    case.display()
                );
            }
        }
        assert!(mapped > 0, "{}: no adapter keys in memory", case.display());
        checked += 1;
    }
    assert!(
        checked >= PEFT_CASES,
        "only {checked} cases had their in-memory keys checked"
    );
}

#[test]
fn many_targets_compress_like_peft() {
    let case = fixture_root("peft").join("lora_many_targets");
    let case_json: Value =
        serde_json::from_str(&std::fs::read_to_string(case.join("case.json")).expect("case.json"))
            .expect("case JSON");
    let given: Vec<String> = serde_json::from_value(
        case_json["adapter_configs"]["default"]["kwargs"]["target_modules"].clone(),
    )
    .expect("target list");
    // named_modules() of the base model, approximated by every prefix of every parameter name
    // (parameter-less modules such as rotary embeddings are missing; no target suffix names one).
    let params = safetensors_shapes(&case.join("base/model.safetensors"));
    let mut modules: BTreeSet<String> = BTreeSet::new();
    for key in params.keys() {
        let parts: Vec<&str> = key.split('.').collect();
        for n in 1..parts.len() {
            modules.insert(parts[..n].join("."));
        }
    }
    let modules: Vec<String> = modules.into_iter().collect();
    let compressed = compress_target_modules(&given, &modules)
        .expect("compresses")
        .expect("21 targets are compressed");
    let saved = read_config(&case.join("adapter/adapter_config.json"));
    let Some(TargetModules::Names(saved)) = saved.as_lora().and_then(|c| c.target_modules.clone())
    else {
        panic!("saved target_modules is a list");
    };
    assert_eq!(compressed, saved.into_iter().collect::<BTreeSet<_>>());
}

#[test]
fn set_list_normalisation_sorts_only_the_named_lists() {
    let text = "{\n  \"a\": [\n    \"y\",\n    \"x\"\n  ],\n  \"target_modules\": [\n    \"v\",\n    \"k\"\n  ]\n}";
    let fields = vec!["target_modules".to_owned()];
    assert_eq!(
        sort_set_lists(text, &fields),
        "{\n  \"a\": [\n    \"y\",\n    \"x\"\n  ],\n  \"target_modules\": [\n    \"k\",\n    \"v\"\n  ]\n}"
    );
}
