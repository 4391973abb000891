//! Extraction, config inference and adapter saving against files written by the real peft
//! 0.21.2 (`tests/fixtures/peft/<case>/`, see `tests/fixtures/peft/README.md`).
//!
//! Every case's `full_state_dict.safetensors` (the complete `PeftModel.state_dict()`) is
//! extracted and compared with the `adapter/` folder peft's `save_pretrained` wrote:
//!
//! * `adapter_model.safetensors` byte for byte;
//! * `adapter_config.json` byte for byte, `target_modules` compared as a set (peft writes it in
//!   Python set order), both with the fixture's config as `--config` and, where the tensors
//!   determine it, inferred from `--lora-alpha` alone;
//! * `README.md` byte for byte;
//! * `--base-out` against `base/model.safetensors`: same names, dtypes and bytes.
//!
//! `save_adapter` of an adapter's own tensors and config reproduces its files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use peftkit_checkpoint::{Checkpoint, Dtype, ModelConfig, StateDict, Tensor};
use peftkit_peft::{
    classify_state_dict, extract, parse_lora_alpha, save_adapter, save_pretrained,
    summarize_adapters, summarize_path, summarize_path_variant, AdapterConfig, AdapterSaveOptions,
    AdapterTensors, BaseModelInfo, ClassifyError, ClassifyOptions, ExtractError, ExtractOptions,
    PeftSaveOptions, StateDictLayout, TaskTypeChoice,
};
use serde_json::Value;

mod common;
use common::{fixture_root, read, read_text};

fn case_dir(case: &str) -> PathBuf {
    fixture_root("peft").join(case)
}

/// Every case with a full state dict, sorted.
fn cases() -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(fixture_root("peft"))
        .expect("fixtures present (tests/interop/run.sh --regen)")
        .flatten()
        .filter(|e| e.path().join("full_state_dict.safetensors").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    assert!(out.len() >= 17, "expected the 17 peft cases, found {out:?}");
    out
}

fn case_json(case: &str) -> Value {
    serde_json::from_slice(&read(&case_dir(case).join("case.json"))).expect("case.json")
}

/// The adapter folder peft wrote for adapter `name` of `case`.
fn peft_adapter_dir(case: &str, name: &str) -> PathBuf {
    let root = case_dir(case).join("adapter");
    if name == "default" {
        root
    } else {
        root.join(name)
    }
}

fn adapter_names(case: &str) -> Vec<String> {
    case_json(case)["adapter_names"]
        .as_array()
        .expect("adapter_names")
        .iter()
        .map(|v| v.as_str().expect("name").to_owned())
        .collect()
}

fn fixture_config(case: &str, name: &str) -> AdapterConfig {
    AdapterConfig::from_file(&peft_adapter_dir(case, name).join("adapter_config.json"))
        .expect("fixture config")
        .0
}

/// Asserts that `ours/` holds peft's adapter files: weights and config (targets as a set).
fn assert_same_adapter(case: &str, name: &str, ours: &Path) {
    let theirs = peft_adapter_dir(case, name);
    assert!(
        read(&ours.join("adapter_model.safetensors"))
            == read(&theirs.join("adapter_model.safetensors")),
        "{case}/{name}: adapter_model.safetensors differs from peft's"
    );
    let ours_cfg = read_text(&ours.join("adapter_config.json"));
    let theirs_cfg = read_text(&theirs.join("adapter_config.json"));
    assert_eq!(
        common::sort_target_modules(&ours_cfg),
        common::sort_target_modules(&theirs_cfg),
        "{case}/{name}: adapter_config.json differs from peft's"
    );
}

/// Whether the case's base is a transformers model, saved by `save_pretrained` with a
/// `config.json` (its `case.json["model"]` records the config kwargs); conv2d's `TinyConvNet`
/// is not, and has none.
fn has_model_config(case: &str) -> bool {
    let c = case_json(case);
    let has = c["model"]["config"].is_object();
    assert_eq!(
        case_dir(case).join("base/config.json").is_file(),
        has,
        "{case}: base/config.json present iff case.json records a transformers config"
    );
    has
}

fn base_info(case: &str) -> BaseModelInfo {
    let c = case_json(case);
    let config_path = case_dir(case).join("base/config.json");
    BaseModelInfo {
        name_or_path: c["model"]["name_or_path"].as_str().map(str::to_owned),
        task_type: match c["task_type"].as_str() {
            Some(t) => TaskTypeChoice::Given(t.to_owned()),
            None => TaskTypeChoice::Null,
        },
        auto_mapping: None,
        config: has_model_config(case)
            .then(|| ModelConfig::read(&config_path).expect("base config")),
    }
}

fn full_state_dict(case: &str) -> PathBuf {
    case_dir(case).join("full_state_dict.safetensors")
}

/// Tensors of a checkpoint by name: (dtype, shape, bytes).
fn tensors_of(path: &Path) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let ckpt = Checkpoint::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    ckpt.tensors()
        .map(|(n, t)| {
            (
                n.to_owned(),
                (
                    t.dtype(),
                    t.shape().to_vec(),
                    t.bytes().expect("bytes").into_owned(),
                ),
            )
        })
        .collect()
}

#[test]
fn extract_with_config_reproduces_every_peft_adapter() {
    for case in cases() {
        for name in adapter_names(&case) {
            let out = tempfile::tempdir().unwrap();
            let mut options = ExtractOptions::new(out.path().join("adapter"));
            options.adapter_name = Some(name.clone());
            options.config = Some(fixture_config(&case, &name));
            let report = extract(&full_state_dict(&case), &options)
                .unwrap_or_else(|e| panic!("{case}/{name}: {e}"));
            assert_eq!(report.layout, StateDictLayout::PeftModel, "{case}");
            assert!(!report.inferred);
            assert_same_adapter(&case, &name, &out.path().join("adapter"));
            // peft writes the card into the root folder only.
            if name == "default" {
                assert!(
                    read(&out.path().join("adapter/README.md"))
                        == read(&case_dir(&case).join("adapter/README.md")),
                    "{case}: README.md differs from peft's"
                );
            }
        }
    }
}

/// What the tensors cannot say, per case: (lora_alpha, use_rslora, rewrite of peft's config text
/// for fields that only a config can give).
fn inference_inputs(case: &str, name: &str) -> Option<(String, bool)> {
    let c = case_json(case);
    let kwargs = &c["adapter_configs"][name]["kwargs"];
    match case {
        // trainable_token_indices and target_parameters exist only in the config.
        "trainable_tokens" | "mixtral_experts" => None,
        "prompt_tuning" => Some((String::new(), false)),
        _ => Some((
            kwargs["lora_alpha"].to_string(),
            kwargs["use_rslora"].as_bool().unwrap_or(false),
        )),
    }
}

#[test]
fn inferred_config_matches_peft_byte_for_byte() {
    let mut checked = 0;
    for case in cases() {
        for name in adapter_names(&case) {
            let Some((alpha, rslora)) = inference_inputs(&case, &name) else {
                continue;
            };
            let out = tempfile::tempdir().unwrap();
            let mut options = ExtractOptions::new(out.path());
            options.adapter_name = Some(name.clone());
            if !alpha.is_empty() {
                options.lora_alpha = Some(parse_lora_alpha(&alpha).unwrap());
            }
            options.use_rslora = rslora;
            options.model = base_info(&case);
            if case == "conv2d" {
                // A custom torch module: peft records its class, which no file names.
                options.model.auto_mapping = fixture_config(&case, &name)
                    .to_value(&Default::default())
                    .get("auto_mapping")
                    .cloned();
            }
            let report = extract(&full_state_dict(&case), &options)
                .unwrap_or_else(|e| panic!("{case}/{name}: {e}"));
            assert!(report.inferred);
            let theirs = peft_adapter_dir(&case, &name);
            assert!(
                read(&out.path().join("adapter_model.safetensors"))
                    == read(&theirs.join("adapter_model.safetensors")),
                "{case}/{name}: adapter_model.safetensors differs"
            );
            let mut expected = read_text(&theirs.join("adapter_config.json"));
            if case == "patterns" {
                // alpha_pattern is not in the tensors; everything else must match.
                let from = "\"alpha_pattern\": {\n    \"v_proj\": 32\n  },";
                assert!(expected.contains(from));
                expected = expected.replace(from, "\"alpha_pattern\": {},");
            }
            assert_eq!(
                common::sort_target_modules(&read_text(&out.path().join("adapter_config.json"))),
                common::sort_target_modules(&expected),
                "{case}/{name}: inferred adapter_config.json differs from peft's"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 16, "cases whose config is inferred");
}

#[test]
fn base_out_equals_the_base_checkpoint() {
    for case in cases() {
        if case == "mixtral_experts" {
            // In memory the experts are fused (transformers v5); base/ holds the per-expert
            // on-disk layout, which is the remap layer's business. Names are still clean.
            let c = classify_state_dict(
                &Checkpoint::open(&full_state_dict(&case))
                    .unwrap()
                    .state_dict(),
                &ClassifyOptions::default(),
            )
            .unwrap();
            assert!(c
                .base
                .contains_key("model.layers.0.mlp.experts.gate_up_proj"));
            assert!(c
                .base
                .keys()
                .all(|k| !k.contains("base_layer") && !k.contains("lora")));
            continue;
        }
        let name = adapter_names(&case)[0].clone();
        let out = tempfile::tempdir().unwrap();
        let mut options = ExtractOptions::new(out.path().join("adapter"));
        options.adapter_name = Some(name.clone());
        options.config = Some(fixture_config(&case, &name));
        options.base_out = Some(out.path().join("base"));
        options.model = base_info(&case);
        extract(&full_state_dict(&case), &options).unwrap_or_else(|e| panic!("{case}: {e}"));
        let ours = tensors_of(&out.path().join("base"));
        let theirs = tensors_of(&case_dir(&case).join("base"));
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>(),
            "{case}: base tensor names"
        );
        for (k, v) in &theirs {
            assert!(ours[k] == *v, "{case}: base tensor {k} differs");
        }
        // The config given for a lone state-dict file is written the way transformers writes
        // it: the bytes of the config.json transformers' save_pretrained wrote for this base.
        let ours_config = out.path().join("base/config.json");
        if has_model_config(&case) {
            assert!(
                read(&ours_config) == read(&case_dir(&case).join("base/config.json")),
                "{case}: base/config.json differs from the one transformers wrote"
            );
        } else {
            assert!(
                !ours_config.exists(),
                "{case}: a config.json without a config"
            );
        }
    }
}

#[test]
fn save_adapter_reproduces_peft_files() {
    for case in cases() {
        for name in adapter_names(&case) {
            let theirs = peft_adapter_dir(&case, &name);
            let config = fixture_config(&case, &name);
            let state = Checkpoint::open(&theirs.join("adapter_model.safetensors"))
                .unwrap()
                .state_dict();
            let tensors = AdapterTensors::from_adapter_state_dict(&state, &name, &config)
                .unwrap_or_else(|e| panic!("{case}/{name}: {e}"));
            let out = tempfile::tempdir().unwrap();
            let report = save_adapter(
                out.path(),
                &name,
                &tensors,
                &config,
                &AdapterSaveOptions::default(),
            )
            .unwrap_or_else(|e| panic!("{case}/{name}: {e}"));
            // peft's layout: `default` in the folder, others in a sub-folder, card in the root.
            let folder = if name == "default" {
                out.path().to_owned()
            } else {
                out.path().join(&name)
            };
            assert_eq!(report.dir, folder);
            assert_same_adapter(&case, &name, &folder);
            let card = read(&out.path().join("README.md"));
            assert!(
                card == read(&case_dir(&case).join("adapter/README.md")),
                "{case}/{name}: README.md differs from peft's"
            );
        }
    }
}

#[test]
fn save_pretrained_of_a_peft_state_dict_writes_peft_layout() {
    let case = "two_adapters";
    let state = Checkpoint::open(&full_state_dict(case))
        .unwrap()
        .state_dict();
    let mut options = PeftSaveOptions::default();
    for name in adapter_names(case) {
        options
            .configs
            .insert(name.clone(), fixture_config(case, &name));
    }
    let out = tempfile::tempdir().unwrap();
    let report = save_pretrained(out.path(), &state, &options).unwrap();
    assert_eq!(report.adapters.len(), 2);
    assert!(report.base.is_none());
    assert_same_adapter(case, "default", out.path());
    assert_same_adapter(case, "other", &out.path().join("other"));
    assert!(read(&out.path().join("README.md")) == read(&case_dir(case).join("adapter/README.md")));
    assert!(!out.path().join("other/README.md").exists());

    // Asked for the base too: the base checkpoint joins the default adapter's folder.
    options.save_base = true;
    let out = tempfile::tempdir().unwrap();
    let report = save_pretrained(out.path(), &state, &options).unwrap();
    assert!(report.base.is_some());
    assert_same_adapter(case, "default", out.path());
    let ours = tensors_of(&out.path().join("model.safetensors"));
    let theirs = tensors_of(&case_dir(case).join("base/model.safetensors"));
    assert!(ours == theirs, "base tensors differ");

    // Without adapters, save_pretrained is the plain checkpoint save.
    let base = Checkpoint::open(&case_dir(case).join("base"))
        .unwrap()
        .state_dict();
    let out = tempfile::tempdir().unwrap();
    let report = save_pretrained(out.path(), &base, &PeftSaveOptions::default()).unwrap();
    assert!(report.adapters.is_empty());
    assert!(
        read(&out.path().join("model.safetensors"))
            == read(&case_dir(case).join("base/model.safetensors"))
    );
}

#[test]
fn save_peft_format_false_writes_bare_keys() {
    let case = "lora_basic";
    let config = fixture_config(case, "default");
    let state = Checkpoint::open(&case_dir(case).join("adapter/adapter_model.safetensors"))
        .unwrap()
        .state_dict();
    let tensors = AdapterTensors::from_adapter_state_dict(&state, "default", &config).unwrap();
    let out = tempfile::tempdir().unwrap();
    let options = AdapterSaveOptions {
        save_peft_format: false,
        ..AdapterSaveOptions::default()
    };
    save_adapter(out.path(), "default", &tensors, &config, &options).unwrap();
    let ours = tensors_of(&out.path().join("adapter_model.safetensors"));
    let theirs = tensors_of(&case_dir(case).join("adapter/adapter_model.safetensors"));
    let stripped: BTreeMap<String, _> = theirs
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("base_model.model.").unwrap().to_owned(), v))
        .collect();
    assert!(ours == stripped);
}

#[test]
fn sharded_adapter_is_named_like_transformers() {
    let case = "rslora";
    let config = fixture_config(case, "default");
    let state = Checkpoint::open(&case_dir(case).join("adapter/adapter_model.safetensors"))
        .unwrap()
        .state_dict();
    let tensors = AdapterTensors::from_adapter_state_dict(&state, "default", &config).unwrap();
    let out = tempfile::tempdir().unwrap();
    let options = AdapterSaveOptions {
        max_shard_size: 2000,
        ..AdapterSaveOptions::default()
    };
    let report = save_adapter(out.path(), "default", &tensors, &config, &options).unwrap();
    assert!(report.weights.weight_files.len() > 1);
    assert!(report.weights.weight_files[0].starts_with("adapter_model-00001-of-"));
    assert_eq!(
        report.weights.index_file.as_deref(),
        Some("model.safetensors.index.json")
    );
    let reread =
        Checkpoint::open_kind(out.path(), peftkit_checkpoint::WeightsKind::Adapter, None).unwrap();
    let theirs = tensors_of(&case_dir(case).join("adapter/adapter_model.safetensors"));
    let ours: BTreeMap<_, _> = reread
        .tensors()
        .map(|(n, t)| {
            (
                n.to_owned(),
                (
                    t.dtype(),
                    t.shape().to_vec(),
                    t.bytes().unwrap().into_owned(),
                ),
            )
        })
        .collect();
    assert!(ours == theirs);
}

#[test]
fn errors_name_what_is_missing() {
    // No alpha.
    let out = tempfile::tempdir().unwrap();
    let err = extract(
        &full_state_dict("lora_basic"),
        &ExtractOptions::new(out.path()),
    )
    .unwrap_err();
    assert!(
        matches!(&err, ExtractError::Classify(e) if matches!(**e, ClassifyError::MissingAlpha { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("--lora-alpha"), "{err}");
    assert!(!out.path().join("adapter_config.json").exists());

    // Trainable tokens: the indices are only in the config.
    let mut options = ExtractOptions::new(out.path());
    options.lora_alpha = Some(parse_lora_alpha("8").unwrap());
    let err = extract(&full_state_dict("trainable_tokens"), &options).unwrap_err();
    assert!(err.to_string().contains("trainable_token_indices"), "{err}");
    assert!(err.to_string().contains("--config"), "{err}");

    // target_parameters (MoE experts).
    let err = extract(&full_state_dict("mixtral_experts"), &options).unwrap_err();
    assert!(err.to_string().contains("--config"), "{err}");

    // Two adapters and no name.
    let err = extract(&full_state_dict("two_adapters"), &options).unwrap_err();
    assert!(err.to_string().contains("default, other"), "{err}");

    // A config whose rank disagrees with the tensors: the module is named.
    let mut config = fixture_config("patterns", "default");
    if let Some(l) = config.as_lora_mut() {
        l.rank_pattern = Some(Default::default());
    }
    let mut options = ExtractOptions::new(out.path());
    options.config = Some(config);
    let err = extract(&full_state_dict("patterns"), &options).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(&err, ExtractError::Classify(e) if matches!(**e, ClassifyError::RankMismatch { .. })),
        "{text}"
    );
    assert!(text.contains("model.layers.0.self_attn.q_proj"), "{text}");
    assert!(text.contains("full_state_dict.safetensors"), "{text}");

    // use_dora in the config without magnitudes in the tensors.
    let mut config = fixture_config("lora_basic", "default");
    if let Some(l) = config.as_lora_mut() {
        l.use_dora = true;
    }
    options.config = Some(config);
    let err = extract(&full_state_dict("lora_basic"), &options).unwrap_err();
    assert!(err.to_string().contains("use_dora"), "{err}");

    // Nothing was written by any failed extraction.
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);

    // A base checkpoint has no adapter.
    let err = extract(&case_dir("lora_basic").join("base"), &options).unwrap_err();
    assert!(matches!(err, ExtractError::NoAdapters(_)), "{err}");

    assert!(parse_lora_alpha("x").is_err());
    assert_eq!(parse_lora_alpha("16").unwrap().to_string(), "16");
    assert_eq!(parse_lora_alpha("0.5").unwrap().to_string(), "0.5");
}

/// Tensor bytes transposed (2-D, 4-byte elements).
fn transpose_f32(t: &Tensor) -> Tensor {
    let [rows, cols] = <[usize; 2]>::try_from(t.shape()).unwrap();
    let b = t.bytes().unwrap();
    let mut out = vec![0u8; b.len()];
    for r in 0..rows {
        for c in 0..cols {
            let (from, to) = ((r * cols + c) * 4, (c * rows + r) * 4);
            out[to..to + 4].copy_from_slice(&b[from..from + 4]);
        }
    }
    Tensor::from_bytes(t.dtype(), vec![cols, rows], out).unwrap()
}

#[test]
fn burn_export_becomes_the_peft_adapter() {
    // What burn's `apply_lora` state looks like for lora_basic: base weights [in, out] and
    // `<path>.weight.lora.a` [in, r], `.lora.b` [r, out].
    let case = "lora_basic";
    let adapter =
        Checkpoint::open(&case_dir(case).join("adapter/adapter_model.safetensors")).unwrap();
    let base = Checkpoint::open(&case_dir(case).join("base")).unwrap();
    let mut burn = StateDict::new();
    for (name, t) in base.tensors() {
        let t = if t.shape().len() == 2 {
            transpose_f32(t)
        } else {
            t.clone()
        };
        burn.insert(name.to_owned(), t);
    }
    for (name, t) in adapter.tensors() {
        let path = name.strip_prefix("base_model.model.").unwrap();
        let key = if let Some(m) = path.strip_suffix(".lora_A.weight") {
            format!("{m}.weight.lora.a")
        } else {
            let m = path.strip_suffix(".lora_B.weight").unwrap();
            format!("{m}.weight.lora.b")
        };
        burn.insert(key, transpose_f32(t));
    }
    let dir = tempfile::tempdir().unwrap();
    peftkit_checkpoint::save_pretrained(
        &dir.path().join("burn"),
        &burn,
        &peftkit_checkpoint::SaveOptions::default(),
    )
    .unwrap();
    let mut options = ExtractOptions::new(dir.path().join("adapter"));
    options.lora_alpha = Some(parse_lora_alpha("8").unwrap());
    options.model = base_info(case);
    let report = extract(&dir.path().join("burn/model.safetensors"), &options).unwrap();
    assert_eq!(report.layout, StateDictLayout::Burn);
    assert_same_adapter(case, "default", &dir.path().join("adapter"));
}

#[test]
fn summaries_report_method_ranks_targets_and_scaling() {
    // An adapter folder with its config: scaling known.
    let s = summarize_path(&case_dir("patterns").join("adapter")).unwrap();
    assert_eq!(s.len(), 1);
    let a = &s[0];
    assert_eq!((a.name.as_str(), a.method.as_str()), ("default", "LORA"));
    assert_eq!(a.modules, 6);
    assert_eq!(a.ranks, BTreeMap::from([(4, 5), (8, 1)]));
    let scalings: Vec<(u64, f64, f32, usize)> = a
        .scaling
        .iter()
        .map(|g| (g.r, g.alpha, g.scaling, g.modules))
        .collect();
    assert_eq!(
        scalings,
        [(4, 8.0, 2.0, 3), (4, 32.0, 8.0, 2), (8, 8.0, 1.0, 1)]
    );

    // Two adapters in one folder.
    let s = summarize_path(&case_dir("two_adapters").join("adapter")).unwrap();
    assert_eq!(
        s.iter()
            .map(|a| (a.name.as_str(), a.modules))
            .collect::<Vec<_>>(),
        [("default", 4), ("other", 2)]
    );

    // A full PEFT state dict: both adapters found, targets inferred, alpha unknown.
    let state = Checkpoint::open(&full_state_dict("two_adapters"))
        .unwrap()
        .state_dict();
    let s = summarize_adapters(&state, None).unwrap();
    assert_eq!(s.len(), 2);
    assert_eq!(
        s[0].target_modules.as_deref(),
        Some(&["q_proj".to_owned(), "v_proj".to_owned()][..])
    );
    assert_eq!(
        s[1].target_modules.as_deref(),
        Some(&["k_proj".to_owned()][..])
    );
    assert_eq!(s[1].ranks, BTreeMap::from([(2, 2)]));
    assert!(s[0].scaling.is_empty());
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json[0]["layout"], "peft_model");

    // DoRA, modules_to_save and trainable tokens are reported.
    let s = summarize_path(&full_state_dict("dora")).unwrap();
    assert!(s[0].use_dora);
    let s = summarize_path(&full_state_dict("modules_to_save")).unwrap();
    assert_eq!(s[0].modules_to_save, ["lm_head"]);
    let s = summarize_path(&full_state_dict("trainable_tokens")).unwrap();
    assert_eq!(s[0].trainable_token_modules, ["model.embed_tokens"]);
    let s = summarize_path(&full_state_dict("gpt2_conv1d")).unwrap();
    assert_eq!(s[0].fan_in_fan_out, Some(true));

    // A base checkpoint has none.
    assert!(summarize_path(&case_dir("lora_basic").join("base"))
        .unwrap()
        .is_empty());

    // A folder holding only model.fp16-*.safetensors is read through its variant.
    let variant_only = fixture_root("checkpoint").join("llama_variant_fp16/expected");
    assert!(summarize_path(&variant_only).is_err());
    assert!(summarize_path_variant(&variant_only, Some("fp16"))
        .unwrap()
        .is_empty());
}

#[test]
fn extract_from_an_adapter_folder_re_saves_it() {
    // The folder's own adapter_config.json is used; nothing else is needed.
    for (case, name) in [("embedding_lora", "default"), ("two_adapters", "other")] {
        let out = tempfile::tempdir().unwrap();
        let mut options = ExtractOptions::new(out.path());
        options.adapter_name = Some(name.to_owned());
        let report = extract(&peft_adapter_dir(case, name), &options)
            .unwrap_or_else(|e| panic!("{case}/{name}: {e}"));
        assert_eq!(report.layout, StateDictLayout::PeftAdapter);
        assert_same_adapter(case, name, out.path());
    }
}

#[test]
fn task_type_and_auto_mapping_come_from_config_json() {
    for case in ["lora_basic", "gpt2_conv1d"] {
        // `…ForCausalLM` / `…LMHeadModel` → CAUSAL_LM, which is what the fixtures used.
        let out = tempfile::tempdir().unwrap();
        let mut options = ExtractOptions::new(out.path());
        options.lora_alpha = Some(parse_lora_alpha("8").unwrap());
        options.model = base_info(case);
        options.model.task_type = TaskTypeChoice::FromArchitecture;
        extract(&full_state_dict(case), &options).unwrap();
        assert_eq!(
            common::sort_target_modules(&read_text(&out.path().join("adapter_config.json"))),
            common::sort_target_modules(&read_text(
                &case_dir(case).join("adapter/adapter_config.json")
            )),
            "{case}"
        );
    }
    // Without a task type peft records the model class in `auto_mapping` (peft's
    // `PeftModel.save_pretrained`, verified with peft).
    let out = tempfile::tempdir().unwrap();
    let mut options = ExtractOptions::new(out.path());
    options.lora_alpha = Some(parse_lora_alpha("8").unwrap());
    options.model = base_info("lora_basic");
    options.model.task_type = TaskTypeChoice::Null;
    let report = extract(&full_state_dict("lora_basic"), &options).unwrap();
    let v = report.config.to_value(&Default::default());
    assert_eq!(v["task_type"], Value::Null);
    assert_eq!(
        v["auto_mapping"],
        serde_json::json!({"base_model_class": "LlamaForCausalLM",
                           "parent_library": "transformers.models.llama.modeling_llama"})
    );
    // …and the card then has no pipeline tag: otherwise it is the card peft wrote for the
    // causal LM (checked with peft 0.21.2 and task_type=None).
    let card = read_text(&out.path().join("README.md"));
    let with_task = read_text(&case_dir("lora_basic").join("adapter/README.md"));
    assert!(with_task.contains("pipeline_tag: text-generation\n"));
    assert_eq!(
        card,
        with_task.replace("pipeline_tag: text-generation\n", "")
    );
}
