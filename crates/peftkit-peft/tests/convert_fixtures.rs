//! Legacy (transformers v4, per-expert) MoE LoRA adapters converted to the fused v5 layout,
//! compared with what peft 0.21.2 writes after loading them on a transformers 5.24 model
//! (`tests/fixtures/convert/<case>/`, made by `tests/interop/fixturegen/convert_cases.py`):
//!
//! * `adapter_model.safetensors` byte for byte, `adapter_config.json` byte for byte with
//!   `target_modules` / `target_parameters` compared as sets (peft writes Python sets), and the
//!   model card;
//! * merging the converted adapter is checked in peftkit-merge's `tests/convert_merge.rs`;
//! * the cases peft gets wrong are refused with a message naming the file and tensor.

use std::fs;
use std::path::{Path, PathBuf};

use peftkit_checkpoint::{Checkpoint, Dtype, SaveOptions, StateDict, Tensor, WeightsKind};
use peftkit_peft::{
    convert_legacy_adapter_dir, convert_legacy_adapter_dir_with, convert_legacy_experts, Adapter,
    ConvertError, ConvertOptions, Untargeted,
};
use serde_json::Value;

mod common;
use common::sort_set_lists;

fn case_dir(case: &str) -> PathBuf {
    common::fixture_root("convert").join(case)
}

const CASES: &[&str] = &["mixtral", "mixtral_mixed", "qwen3_moe"];

fn model_type(case: &str) -> String {
    let text = fs::read_to_string(case_dir(case).join("case.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["model"]["model_type"].as_str().unwrap().to_owned()
}

fn convert_case(case: &str, out: &Path) {
    convert_legacy_adapter_dir(
        &case_dir(case).join("legacy_adapter"),
        out,
        Some(&model_type(case)),
    )
    .unwrap_or_else(|e| panic!("{case}: {e}"));
}

#[test]
fn converted_adapters_are_byte_identical_to_peft() {
    for case in CASES {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("converted");
        convert_case(case, &out);
        let expected = case_dir(case).join("converted_adapter");

        let (e, a) = (
            fs::read(expected.join("adapter_model.safetensors")).unwrap(),
            fs::read(out.join("adapter_model.safetensors")).unwrap(),
        );
        if e != a {
            // Name the tensors that differ before failing on the bytes.
            let (ec, ac) = (
                Checkpoint::open_kind(&expected, WeightsKind::Adapter, None).unwrap(),
                Checkpoint::open_kind(&out, WeightsKind::Adapter, None).unwrap(),
            );
            let en: Vec<&str> = ec.tensors().map(|(n, _)| n).collect();
            let an: Vec<&str> = ac.tensors().map(|(n, _)| n).collect();
            assert_eq!(en, an, "{case}: tensor names");
            for (n, t) in ec.tensors() {
                let u = ac.get(n).unwrap();
                assert_eq!(t.shape(), u.shape(), "{case}: {n} shape");
                assert!(
                    t.bytes().unwrap() == u.bytes().unwrap(),
                    "{case}: {n} differs"
                );
            }
            panic!("{case}: adapter_model.safetensors differs outside the tensors");
        }

        let fields = ["target_modules", "target_parameters"];
        let e = fs::read_to_string(expected.join("adapter_config.json")).unwrap();
        let a = fs::read_to_string(out.join("adapter_config.json")).unwrap();
        assert_eq!(
            sort_set_lists(&a, &fields),
            sort_set_lists(&e, &fields),
            "{case}: config"
        );

        let e = fs::read(expected.join("README.md")).unwrap();
        let a = fs::read(out.join("README.md")).unwrap();
        assert!(e == a, "{case}: model card differs");
    }
}

#[test]
fn library_call_returns_the_same_tensors() {
    let adapter = Adapter::open(&case_dir("mixtral").join("legacy_adapter")).unwrap();
    let (config, state) = convert_legacy_experts(&adapter, "mixtral").unwrap();
    let lora = config.as_lora().unwrap();
    assert_eq!(
        lora.rank_pattern.as_ref().unwrap()[".*\\.gate_up_proj"],
        8.into()
    );
    let expected = Checkpoint::open_kind(
        &case_dir("mixtral").join("converted_adapter"),
        WeightsKind::Adapter,
        None,
    )
    .unwrap();
    assert_eq!(state.len(), expected.len());
    for (name, t) in expected.tensors() {
        let got = &state[name];
        assert!(got.bytes().unwrap() == t.bytes().unwrap(), "{name}");
    }
}

/// A copy of a case's legacy adapter with its config edited by `edit` and its tensors filtered by
/// `keep`, plus `extra` tensors.
fn edited_legacy(
    case: &str,
    dir: &Path,
    edit: impl Fn(&mut serde_json::Map<String, Value>),
    keep: impl Fn(&str) -> bool,
    extra: StateDict,
) {
    let src = case_dir(case).join("legacy_adapter");
    let mut config: serde_json::Map<String, Value> =
        serde_json::from_str(&fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    edit(&mut config);
    let weights = Checkpoint::open_kind(&src, WeightsKind::Adapter, None).unwrap();
    let mut state: StateDict = weights
        .tensors()
        .filter(|(k, _)| keep(k))
        .map(|(k, t)| (k.to_owned(), t.clone()))
        .collect();
    state.extend(extra);
    peftkit_checkpoint::save_pretrained(
        dir,
        &state,
        &SaveOptions {
            kind: WeightsKind::Adapter,
            extra_files: vec![(
                "adapter_config.json".into(),
                serde_json::to_string(&config).unwrap().into_bytes(),
            )],
            ..SaveOptions::default()
        },
    )
    .unwrap();
}

fn set_targets(targets: &'static [&'static str]) -> impl Fn(&mut serde_json::Map<String, Value>) {
    move |c| {
        c.insert("target_modules".into(), serde_json::json!(targets));
    }
}

#[test]
fn qwen2_moe_is_refused_as_peft_does_not_convert_it() {
    let tmp = tempfile::tempdir().unwrap();
    let err = convert_legacy_adapter_dir(
        &case_dir("qwen3_moe").join("legacy_adapter"),
        &tmp.path().join("out"),
        Some("qwen2_moe"),
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, ConvertError::UnsupportedModelType { .. }),
        "{text}"
    );
    assert!(
        text.contains("adapter_config.json") && text.contains("qwen3_moe"),
        "{text}"
    );
}

#[test]
fn a_fused_parameter_needs_all_its_parts() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("legacy");
    edited_legacy(
        "mixtral",
        &src,
        set_targets(&["w1", "w2"]),
        |k| !k.contains(".w3."),
        StateDict::new(),
    );
    let err =
        convert_legacy_adapter_dir(&src, &tmp.path().join("out"), Some("mixtral")).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("Cannot convert PEFT target(s) w1 without also targeting w3 because they are fused into gate_up_proj."),
        "{text}"
    );
}

#[test]
fn a_lone_fused_parameter_is_keyed_for_its_own_wrapper() {
    // peft 0.21.2 always keys gate_up_proj as the inner wrapper (`experts.base_layer.lora_*`);
    // with w1/w3 only there is one wrapper, and peft then does not load its own conversion
    // ("Found missing adapter keys"). The key here is the one the model has.
    type Keep = fn(&str) -> bool;
    let cases: [(&[&str], Keep); 2] = [
        (&["w1", "w3"], |k| !k.contains(".w2.")),
        (&["w2"], |k| k.contains(".w2.")),
    ];
    for (targets, keep) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("legacy");
        edited_legacy(
            "mixtral",
            &src,
            set_targets(targets),
            keep,
            StateDict::new(),
        );
        let out = tmp.path().join("out");
        convert_legacy_adapter_dir(&src, &out, Some("mixtral")).unwrap();
        let c = Checkpoint::open_kind(&out, WeightsKind::Adapter, None).unwrap();
        let names: Vec<&str> = c.tensors().map(|(n, _)| n).collect();
        assert_eq!(names.len(), 4, "{targets:?}: {names:?}");
        assert!(
            names.contains(&"base_model.model.model.layers.0.mlp.experts.lora_A.weight"),
            "{targets:?}: {names:?}"
        );
        assert!(!names.iter().any(|n| n.contains("base_layer")), "{names:?}");
    }
}

#[test]
fn dropout_is_refused_unless_zeroed() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("legacy");
    edited_legacy(
        "mixtral",
        &src,
        |c| {
            c.insert("lora_dropout".into(), serde_json::json!(0.05));
        },
        |_| true,
        StateDict::new(),
    );
    let err =
        convert_legacy_adapter_dir(&src, &tmp.path().join("out"), Some("mixtral")).unwrap_err();
    assert!(err.to_string().contains("lora_dropout is 0.05"), "{err}");
    let options = ConvertOptions {
        zero_dropout: true,
        ..ConvertOptions::default()
    };
    let out = tmp.path().join("out");
    convert_legacy_adapter_dir_with(&src, &out, Some("mixtral"), &options).unwrap();
    // Everything else is what peft writes for the dropout-free adapter.
    let expected = case_dir("mixtral").join("converted_adapter");
    assert!(
        fs::read(out.join("adapter_model.safetensors")).unwrap()
            == fs::read(expected.join("adapter_model.safetensors")).unwrap()
    );
    let config = fs::read_to_string(out.join("adapter_config.json")).unwrap();
    assert!(config.contains("\"lora_dropout\": 0.0,"), "{config}");
}

#[test]
fn untargeted_lora_pairs_are_refused_or_dropped() {
    // A Qwen-style shared expert: `gate_proj` as a target also adapted
    // `mlp.shared_expert.gate_proj` in v4, which the converted config no longer targets.
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("legacy");
    let t = |shape: Vec<usize>| {
        let n: usize = shape.iter().product();
        Tensor::from_bytes(Dtype::F32, shape, 0.5f32.to_le_bytes().repeat(n)).unwrap()
    };
    let mut extra = StateDict::new();
    let m = "base_model.model.model.layers.0.mlp.shared_expert.gate_proj";
    extra.insert(format!("{m}.lora_A.weight"), t(vec![4, 16]));
    extra.insert(format!("{m}.lora_B.weight"), t(vec![8, 4]));
    edited_legacy("qwen3_moe", &src, |_| {}, |_| true, extra);
    let err =
        convert_legacy_adapter_dir(&src, &tmp.path().join("out"), Some("qwen3_moe")).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ConvertError::Untargeted { .. }), "{text}");
    assert!(
        text.contains("shared_expert.gate_proj.lora_A.weight")
            && text.contains("adapter_model.safetensors"),
        "{text}"
    );

    let options = ConvertOptions {
        untargeted: Untargeted::Drop,
        ..ConvertOptions::default()
    };
    let out = tmp.path().join("out");
    let report = convert_legacy_adapter_dir_with(&src, &out, Some("qwen3_moe"), &options).unwrap();
    assert_eq!(report.dropped.len(), 2);
    let expected = case_dir("qwen3_moe").join("converted_adapter");
    assert!(
        fs::read(out.join("adapter_model.safetensors")).unwrap()
            == fs::read(expected.join("adapter_model.safetensors")).unwrap()
    );
}

#[test]
fn model_type_is_required_without_a_local_base() {
    let tmp = tempfile::tempdir().unwrap();
    let err = convert_legacy_adapter_dir(
        &case_dir("mixtral").join("legacy_adapter"),
        &tmp.path().join("out"),
        None,
    )
    .unwrap_err();
    assert!(matches!(err, ConvertError::NoModelType { .. }), "{err}");
    // With a base folder it is read from its config.json.
    let src = tmp.path().join("legacy");
    let base = case_dir("mixtral").join("base");
    let base_name = base.to_string_lossy().into_owned();
    edited_legacy(
        "mixtral",
        &src,
        move |c| {
            c.insert(
                "base_model_name_or_path".into(),
                Value::String(base_name.clone()),
            );
        },
        |_| true,
        StateDict::new(),
    );
    let report = convert_legacy_adapter_dir(&src, &tmp.path().join("out"), None).unwrap();
    assert_eq!(report.model_type, "mixtral");
}
