//! peftkit-remap against checkpoints written by the real transformers 5.24.0
//! (tests/fixtures/remap/, made by tests/interop/fixturegen/remap_cases.py).

use std::collections::BTreeMap;
use std::path::PathBuf;

use peftkit_checkpoint::{parse_size, Checkpoint, SaveOptions, StateDict};
use peftkit_remap::{
    remap, save_pretrained_original, Mapping, Registry, RemapError, RemapOptions, Revert,
    TensorLayout,
};
use serde_json::Value;

mod common;
use common::{assert_same_dir, fixture_root, read_json};

const CASES: &[&str] = &[
    "mixtral",
    "qwen2_moe",
    "llava",
    "gpt_neox",
    "vit",
    "bert_legacy",
];
const SHARDED: &[&str] = &["mixtral", "qwen2_moe"];
const SIZES: &[&str] = &["2KB", "5KB", "20KB"];

fn case_dir(case: &str) -> PathBuf {
    fixture_root("remap").join(case)
}

fn case_json(case: &str) -> Value {
    read_json(&case_dir(case).join("case.json"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

fn mapping(case: &str) -> Mapping {
    let mt = case_json(case)["model_type"].as_str().unwrap().to_owned();
    Registry::builtin().unwrap().mapping(&mt).unwrap()
}

/// Same tensor names, shapes, dtypes and bytes (order not compared).
fn assert_same_tensors(got: &StateDict, want: &StateDict) {
    let mut g: Vec<&String> = got.keys().collect();
    let mut w: Vec<&String> = want.keys().collect();
    g.sort();
    w.sort();
    assert_eq!(g, w);
    for (name, t) in want {
        let o = &got[name];
        assert_eq!(o.dtype(), t.dtype(), "{name}");
        assert_eq!(o.shape(), t.shape(), "{name}");
        assert!(
            o.bytes().unwrap() == t.bytes().unwrap(),
            "{name}: bytes differ"
        );
    }
}

fn state(case: &str, folder: &str) -> StateDict {
    Checkpoint::open(&case_dir(case).join(folder))
        .unwrap()
        .state_dict()
}

/// The model's in-memory order: what transformers handed to the splitter for the v5 save
/// (`model.state_dict()` order, minus ties).
fn v5_in_memory(case: &str) -> StateDict {
    let order = strings(&case_json(case)["saves"]["v5"]["order"]);
    let on_disk = state(case, "v5");
    let sd: StateDict = order
        .iter()
        .map(|k| (k.clone(), on_disk[k].clone()))
        .collect();
    assert_eq!(sd.len(), on_disk.len());
    sd
}

#[test]
fn forward_gives_the_v5_tensors_and_reverse_gives_back_the_original_in_transformers_order() {
    for case in CASES {
        let m = mapping(case);
        let original = state(case, "original");
        let fwd = m.forward(&original).unwrap();
        assert_same_tensors(&fwd.state, &state(case, "v5"));
        assert!(
            !fwd.used.0.is_empty(),
            "{case}: the original layout uses at least one rule"
        );
        let used = case_json(case)["weight_conversions_used_at_load"]
            .as_array()
            .unwrap()
            .len();
        assert_eq!(fwd.used.0.len(), used, "{case}: rules used at load");

        let back = m
            .reverse(&fwd.state, &Revert::AsLoaded(fwd.used.clone()))
            .unwrap();
        assert_same_tensors(&back, &original);
        let order: Vec<&String> = back.keys().collect();
        let want = strings(&case_json(case)["saves"]["original"]["order"]);
        assert_eq!(
            order,
            want.iter().collect::<Vec<_>>(),
            "{case}: reverted order"
        );
    }
}

#[test]
fn reverse_of_the_in_memory_state_matches_order_and_storage_groups() {
    for case in SHARDED {
        let m = mapping(case);
        let v5 = v5_in_memory(case);
        for save in ["original", "original_2KB"] {
            let rec = &case_json(case)["saves"][save];
            let back = m.reverse(&v5, &Revert::FromConfig).unwrap();
            assert_eq!(
                back.keys().cloned().collect::<Vec<_>>(),
                strings(&rec["order"]),
                "{case}/{save}"
            );
            let mut groups: BTreeMap<u64, Vec<String>> = BTreeMap::new();
            for (k, t) in &back {
                if let Some(f) = t.family() {
                    groups.entry(f).or_default().push(k.clone());
                }
            }
            let mut got: Vec<Vec<String>> = groups.into_values().collect();
            let mut want: Vec<Vec<String>> = rec["storage_groups"]
                .as_array()
                .unwrap()
                .iter()
                .map(strings)
                .collect();
            got.sort();
            want.sort();
            assert_eq!(got, want, "{case}: storage families");
        }
    }
}

fn companion(case: &str) -> Vec<(String, Vec<u8>)> {
    ["config.json", "generation_config.json"]
        .iter()
        .map(|n| {
            (
                n.to_string(),
                std::fs::read(case_dir(case).join("v5").join(n)).unwrap(),
            )
        })
        .collect()
}

#[test]
fn sharded_save_original_format_is_byte_identical_to_transformers() {
    for case in SHARDED {
        let m = mapping(case);
        let v5 = v5_in_memory(case);
        let used = m.forward(&state(case, "original")).unwrap().used;
        for size in SIZES {
            let want = case_dir(case).join(format!("original_{size}"));
            for revert in [Revert::FromConfig, Revert::AsLoaded(used.clone())] {
                let tmp = tempfile::tempdir().unwrap();
                let out = tmp.path().join("out");
                let options = SaveOptions {
                    max_shard_size: parse_size(size).unwrap(),
                    extra_files: companion(case),
                    ..SaveOptions::default()
                };
                save_pretrained_original(&out, &v5, &options, &m, &revert).unwrap();
                assert_same_dir(case, &out, &want);
            }
        }
        // And with the default size: one file, as original/.
        let tmp = tempfile::tempdir().unwrap();
        let options = SaveOptions {
            extra_files: companion(case),
            ..SaveOptions::default()
        };
        save_pretrained_original(tmp.path(), &v5, &options, &m, &Revert::FromConfig).unwrap();
        assert_same_dir(case, tmp.path(), &case_dir(case).join("original"));
    }
}

#[test]
fn input_order_does_not_matter_since_transformers_sorts_first() {
    let m = mapping("qwen2_moe");
    let v5 = v5_in_memory("qwen2_moe");
    let mut reversed_input = v5.clone();
    reversed_input.reverse();
    let a = m.reverse(&v5, &Revert::FromConfig).unwrap();
    let b = m.reverse(&reversed_input, &Revert::FromConfig).unwrap();
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
}

/// The worked example of the reference spec, section 7.5: Mixtral (E=3, 1 layer) saved with
/// max_shard_size="2KB" in the original format.
#[test]
fn mixtral_2kb_shards_are_those_of_the_reference_spec() {
    let m = mapping("mixtral");
    let tmp = tempfile::tempdir().unwrap();
    let options = SaveOptions {
        max_shard_size: parse_size("2KB").unwrap(),
        ..SaveOptions::default()
    };
    save_pretrained_original(
        tmp.path(),
        &v5_in_memory("mixtral"),
        &options,
        &m,
        &Revert::FromConfig,
    )
    .unwrap();
    let index: Value = serde_json::from_slice(
        &std::fs::read(tmp.path().join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        index["metadata"],
        serde_json::json!({"total_parameters": 4064, "total_size": 16256})
    );
    let mut shards: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in index["weight_map"].as_object().unwrap() {
        shards
            .entry(v.as_str().unwrap().to_owned())
            .or_default()
            .push(k.clone());
    }
    let short = |k: &str| {
        k.replace("model.layers.0.", "")
            .replace("block_sparse_moe.experts.", "")
            .replace(".weight", "")
    };
    let got: Vec<Vec<String>> = shards
        .values()
        .map(|ks| ks.iter().map(|k| short(k)).collect())
        .collect();
    let want: Vec<Vec<&str>> = vec![
        vec!["lm_head"],
        vec!["model.embed_tokens"],
        vec!["0.w2", "1.w2", "2.w2", "input_layernorm"],
        vec!["0.w1", "1.w1", "2.w1"],
        vec![
            "0.w3",
            "1.w3",
            "2.w3",
            "block_sparse_moe.gate",
            "post_attention_layernorm",
        ],
        vec!["self_attn.k_proj", "self_attn.o_proj"],
        vec!["self_attn.q_proj", "self_attn.v_proj", "model.norm"],
    ];
    assert_eq!(got, want);
    assert_eq!(shards.len(), 7);
    assert!(shards
        .keys()
        .next()
        .unwrap()
        .ends_with("-00001-of-00007.safetensors"));
}

#[test]
fn remap_to_v5_equals_transformers_v5_save() {
    for case in CASES {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let report = remap(
            &case_dir(case).join("original"),
            &out,
            TensorLayout::TransformersV5,
            None,
            &RemapOptions::default(),
        )
        .unwrap();
        assert!(!report.rules_applied.is_empty(), "{case}");
        // A single file: safetensors orders the header by dtype then name, so the tensor
        // order of the save does not show; every byte must match.
        assert_same_dir(case, &out, &case_dir(case).join("v5"));
    }
}

#[test]
fn remap_to_v5_sharded_equals_transformers_resave_of_a_v5_checkpoint() {
    for case in SHARDED {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let options = RemapOptions {
            save: SaveOptions {
                max_shard_size: parse_size("2KB").unwrap(),
                ..SaveOptions::default()
            },
            ..RemapOptions::default()
        };
        remap(
            &case_dir(case).join("original"),
            &out,
            TensorLayout::TransformersV5,
            None,
            &options,
        )
        .unwrap();
        assert_same_dir(case, &out, &case_dir(case).join("v5_resaved_2KB"));
    }
}

#[test]
fn remap_to_original_equals_transformers_original_save() {
    for (case, revert) in [
        ("mixtral", Revert::FromConfig),
        ("qwen2_moe", Revert::FromConfig),
        ("gpt_neox", Revert::FromConfig),
        ("vit", Revert::FromConfig),
        // The Hub's vision_tower.vision_model.* level is load-only: restore it explicitly.
        ("llava", Revert::AllTableRules),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let options = RemapOptions {
            revert,
            ..RemapOptions::default()
        };
        remap(
            &case_dir(case).join("v5"),
            &out,
            TensorLayout::Original,
            None,
            &options,
        )
        .unwrap();
        assert_same_dir(case, &out, &case_dir(case).join("original"));
    }
}

#[test]
fn load_only_rules_are_not_reverted_by_default() {
    // Llava from config: transformers drops the PrefixChange, so no vision_model level.
    let m = mapping("llava");
    let back = m
        .reverse(&state("llava", "v5"), &Revert::FromConfig)
        .unwrap();
    assert!(back.contains_key("vision_tower.encoder.layers.0.mlp.fc1.weight"));
    assert!(back.contains_key("language_model.model.layers.0.mlp.up_proj.weight"));
    assert!(back.contains_key("language_model.lm_head.weight"));
    // BERT has no table: legacy renames are load-only, so a from-config save keeps v5 names
    // (and, with nothing to revert, the input order).
    let m = mapping("bert_legacy");
    assert_eq!(m.table(), None);
    let v5 = v5_in_memory("bert_legacy");
    let back = m.reverse(&v5, &Revert::FromConfig).unwrap();
    assert_eq!(
        back.keys().collect::<Vec<_>>(),
        v5.keys().collect::<Vec<_>>()
    );
}

#[test]
fn remap_to_original_refuses_an_original_checkpoint() {
    for case in [
        "mixtral",
        "qwen2_moe",
        "vit",
        "llava",
        "gpt_neox",
        "bert_legacy",
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let err = remap(
            &case_dir(case).join("original"),
            &tmp.path().join("out"),
            TensorLayout::Original,
            None,
            &RemapOptions::default(),
        )
        .unwrap_err();
        assert!(
            matches!(err, RemapError::AlreadyOriginal { .. }),
            "{case}: {err}"
        );
        assert!(!tmp.path().join("out").exists());
    }
    // And a v5 checkpoint is never mistaken for an original one.
    for case in CASES {
        let m = mapping(case);
        for name in state(case, "v5").keys() {
            assert_eq!(m.forward_match(name), None, "{case}: {name}");
        }
    }
}

#[test]
fn expert_pieces_locate_each_expert_in_the_fused_tensors() {
    let m = mapping("qwen2_moe");
    let v5 = state("qwen2_moe", "v5");
    let original = state("qwen2_moe", "original");
    for layer in 0..2 {
        for param in ["gate_up_proj", "down_proj"] {
            let name = format!("model.layers.{layer}.mlp.experts.{param}");
            let fused = &v5[&name];
            let shape = fused.shape().to_vec();
            let bytes = fused.bytes().unwrap();
            let row = shape[2] * 4;
            for e in 0..shape[0] {
                let pieces = m
                    .expert_pieces(&name, &shape, e, &Revert::FromConfig)
                    .unwrap();
                assert_eq!(pieces.len(), if param == "down_proj" { 1 } else { 2 });
                for p in pieces {
                    assert_eq!(p.expert, Some((0, e)));
                    let on_disk = &original[&p.original_name];
                    assert_eq!(on_disk.shape(), &p.original_shape[..]);
                    let slab = e * shape[1] * row;
                    let want = &bytes[slab + p.region[1].start * row..slab + p.region[1].end * row];
                    assert!(&*on_disk.bytes().unwrap() == want, "{}", p.original_name);
                }
            }
        }
    }
    let err = m
        .expert_pieces(
            "model.layers.0.mlp.gate.weight",
            &[12, 16],
            0,
            &Revert::FromConfig,
        )
        .unwrap_err();
    assert!(matches!(err, RemapError::NotFused { .. }), "{err}");
}

/// More model types sharing a table (aliases), built from config in transformers: the
/// reverted order and shapes must be those transformers handed to the shard splitter.
#[test]
fn aliases_revert_like_transformers_for_models_built_from_config() {
    use peftkit_checkpoint::{Dtype, Tensor};
    let path = case_dir("names_only.json");
    let all: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let reg = Registry::builtin().unwrap();
    let cases = all["cases"].as_object().unwrap();
    assert!(cases.len() >= 12);
    for (model_type, rec) in cases {
        let m = reg.mapping(model_type).unwrap();
        assert!(m.table().is_some(), "{model_type}");
        let shape = |side: &str, k: &str| -> Vec<usize> {
            rec[side]["shapes"][k]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect()
        };
        let mut v5 = StateDict::new();
        for k in strings(&rec["v5"]["order"]) {
            let s = shape("v5", &k);
            v5.insert(k, Tensor::lazy(Dtype::F32, s, || Ok(Vec::new())).unwrap());
        }
        let back = m.reverse(&v5, &Revert::FromConfig).unwrap();
        assert_eq!(
            back.keys().cloned().collect::<Vec<_>>(),
            strings(&rec["original"]["order"]),
            "{model_type}"
        );
        for (k, t) in &back {
            assert_eq!(t.shape(), &shape("original", k)[..], "{model_type}: {k}");
        }
    }
}
