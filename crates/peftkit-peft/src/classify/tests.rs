use super::*;
use indexmap::IndexMap;
use peftkit_checkpoint::Dtype;
use peftkit_checkpoint::{ModelConfig, StateDict};

fn t(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let bytes: Vec<u8> = (0..n as u32)
        .flat_map(|i| (i as f32).to_le_bytes())
        .collect();
    Tensor::from_bytes(Dtype::F32, shape.to_vec(), bytes).unwrap()
}

fn sd(entries: &[(&str, &[usize])]) -> StateDict {
    entries
        .iter()
        .map(|(k, s)| ((*k).to_owned(), t(s)))
        .collect()
}

fn classify(state: &StateDict) -> ClassifiedStateDict {
    classify_state_dict(state, &ClassifyOptions::default()).unwrap()
}

fn model_with_type(model_type: &str) -> BaseModelInfo {
    BaseModelInfo {
        config: Some(
            ModelConfig::from_json(&format!(r#"{{"model_type": "{model_type}"}}"#)).unwrap(),
        ),
        ..BaseModelInfo::default()
    }
}

#[test]
fn base_keys_lose_wrapper_levels() {
    for (key, prompt, clean) in [
        (
            "base_model.model.m.q.base_layer.weight",
            false,
            "m.q.weight",
        ),
        ("base_model.model.m.q.base_layer.bias", false, "m.q.bias"),
        (
            "base_model.model.m.emb.token_adapter.base_layer.weight",
            false,
            "m.emb.weight",
        ),
        (
            "base_model.model.lm_head.original_module.weight",
            false,
            "lm_head.weight",
        ),
        (
            "base_model.model.m.experts.base_layer.base_layer.gate_up_proj",
            false,
            "m.experts.gate_up_proj",
        ),
        (
            "base_model.model.embed_tokens.weight",
            true,
            "model.embed_tokens.weight",
        ),
        ("base_model.lm_head.weight", true, "lm_head.weight"),
        // A parameter literally named `base_layer` stays.
        ("m.base_layer", false, "m.base_layer"),
    ] {
        assert_eq!(clean_base_key(key, prompt), clean, "{key}");
    }
}

#[test]
fn conv1d_is_recognised_by_shape_then_by_table() {
    // GPT-2 c_attn: base (in, out) = (16, 48), A (4, 16), B (48, 4).
    let state = sd(&[
        (
            "base_model.model.h.0.attn.c_attn.base_layer.weight",
            &[16, 48],
        ),
        (
            "base_model.model.h.0.attn.c_attn.lora_A.default.weight",
            &[4, 16],
        ),
        (
            "base_model.model.h.0.attn.c_attn.lora_B.default.weight",
            &[48, 4],
        ),
    ]);
    let s = infer_lora_structure(&classify(&state), "default", &BaseModelInfo::default()).unwrap();
    assert!(s.fan_in_fan_out);
    assert!(s.notes.is_empty());

    // A Linear (out, in) = (48, 16).
    let state = sd(&[
        ("base_model.model.h.0.attn.qkv.base_layer.weight", &[48, 16]),
        (
            "base_model.model.h.0.attn.qkv.lora_A.default.weight",
            &[4, 16],
        ),
        (
            "base_model.model.h.0.attn.qkv.lora_B.default.weight",
            &[48, 4],
        ),
    ]);
    let s = infer_lora_structure(&classify(&state), "default", &BaseModelInfo::default()).unwrap();
    assert!(!s.fan_in_fan_out);

    // Square: the table decides, by model type when known.
    let state = sd(&[
        (
            "base_model.model.h.0.attn.c_proj.base_layer.weight",
            &[16, 16],
        ),
        (
            "base_model.model.h.0.attn.c_proj.lora_A.default.weight",
            &[4, 16],
        ),
        (
            "base_model.model.h.0.attn.c_proj.lora_B.default.weight",
            &[16, 4],
        ),
        (
            "base_model.model.h.0.attn.q_proj.base_layer.weight",
            &[16, 16],
        ),
        (
            "base_model.model.h.0.attn.q_proj.lora_A.default.weight",
            &[4, 16],
        ),
        (
            "base_model.model.h.0.attn.q_proj.lora_B.default.weight",
            &[16, 4],
        ),
    ]);
    let c = classify(&state);
    assert!(
        infer_lora_structure(&c, "default", &model_with_type("gpt2"))
            .unwrap()
            .fan_in_fan_out
    );
    assert!(
        !infer_lora_structure(&c, "default", &model_with_type("llama"))
            .unwrap()
            .fan_in_fan_out
    );
    let s = infer_lora_structure(&c, "default", &BaseModelInfo::default()).unwrap();
    assert!(s.fan_in_fan_out);
    assert_eq!(s.notes.len(), 1, "{:?}", s.notes);
    assert!(s.notes[0].contains("h.0.attn.c_proj"));

    // A base weight that fits neither layout.
    let state = sd(&[
        ("base_model.model.x.base_layer.weight", &[16, 40]),
        ("base_model.model.x.lora_A.default.weight", &[4, 16]),
        ("base_model.model.x.lora_B.default.weight", &[48, 4]),
    ]);
    let err =
        infer_lora_structure(&classify(&state), "default", &BaseModelInfo::default()).unwrap_err();
    assert!(matches!(err, ClassifyError::Inconsistent { .. }), "{err}");
    assert!(err.to_string().contains("x.base_layer.weight"), "{err}");
}

#[test]
fn burn_factors_are_transposed_lazily() {
    let state = sd(&[
        ("layers.0.q.weight", &[3, 3]),
        ("layers.0.q.weight.lora.a", &[3, 2]),
        ("layers.0.q.weight.lora.b", &[2, 3]),
    ]);
    let c = classify(&state);
    assert_eq!(c.layout, StateDictLayout::Burn);
    assert_eq!(c.base.keys().collect::<Vec<_>>(), ["layers.0.q.weight"]);
    let a = &c.adapters["default"].entries["base_model.model.layers.0.q.lora_A.weight"];
    assert_eq!(a.tensor.shape(), [2, 3]);
    let vals: Vec<f32> = a
        .tensor
        .bytes()
        .unwrap()
        .chunks(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    // burn a = [[0,1],[2,3],[4,5]] -> A = a^T = [[0,2,4],[1,3,5]].
    assert_eq!(vals, [0.0, 2.0, 4.0, 1.0, 3.0, 5.0]);
    let b = &c.adapters["default"].entries["base_model.model.layers.0.q.lora_B.weight"];
    assert_eq!(b.tensor.shape(), [3, 2]);
    let err = classify_state_dict(
        &sd(&[("q.weight.lora.a", &[3, 2, 1])]),
        &ClassifyOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, ClassifyError::BurnShape { .. }), "{err}");
}

#[test]
fn key_forms_are_not_mixed_and_duplicates_are_refused() {
    let err = classify_state_dict(
        &sd(&[
            ("base_model.model.q.lora_A.default.weight", &[2, 4]),
            ("base_model.model.v.lora_A.weight", &[2, 4]),
        ]),
        &ClassifyOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, ClassifyError::MixedKeyForms { .. }), "{err}");
    let err = classify_state_dict(
        &sd(&[
            ("base_model.model.q.lora_A.weight", &[2, 4]),
            ("q.lora_A.weight", &[2, 4]),
        ]),
        &ClassifyOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, ClassifyError::Duplicate { .. }), "{err}");
}

#[test]
fn an_adapter_is_read_with_one_method() {
    // AdaLoRA's embedding keys look like LoRA's: the adapter's other keys settle it.
    let state = sd(&[
        ("base_model.model.m.q.lora_A", &[2, 4]),
        ("base_model.model.m.q.lora_B", &[4, 2]),
        ("base_model.model.m.q.lora_E", &[2, 1]),
        ("base_model.model.m.emb.lora_embedding_A", &[2, 8]),
    ]);
    let c = classify(&state);
    assert_eq!(c.layout, StateDictLayout::PeftAdapter);
    let a = &c.adapters["default"];
    assert_eq!(a.method, "ADALORA");
    assert_eq!(a.entries.len(), 4);
    // A Rust training state dict: bare base keys stay base, prefixed extra keys are
    // replacements.
    let state = sd(&[
        ("model.q.weight", &[4, 4]),
        ("model.q.lora_A.weight", &[2, 4]),
        ("model.q.lora_B.weight", &[4, 2]),
        ("base_model.model.lm_head.weight", &[8, 4]),
    ]);
    let c = classify(&state);
    assert_eq!(c.base.keys().collect::<Vec<_>>(), ["model.q.weight"]);
    assert_eq!(c.adapters["default"].modules_to_save(), ["lm_head"]);
}

#[test]
fn patterns_and_names_that_are_not_unique_fall_back_to_full_names() {
    let mut entries: Vec<(String, Vec<usize>)> = Vec::new();
    for (i, r) in [(0, 8), (1, 4), (10, 4)] {
        let m = format!("base_model.model.layers.{i}.q_proj");
        entries.push((format!("{m}.base_layer.weight"), vec![4, 4]));
        entries.push((format!("{m}.lora_A.default.weight"), vec![r, 4]));
        entries.push((format!("{m}.lora_B.default.weight"), vec![4, r]));
    }
    entries.push((
        "base_model.model.head.score.original_module.weight".into(),
        vec![2, 4],
    ));
    entries.push((
        "base_model.model.head.score.modules_to_save.default.weight".into(),
        vec![2, 4],
    ));
    entries.push(("base_model.model.head.xscore.weight".into(), vec![2, 4]));
    let state: StateDict = entries.iter().map(|(k, s)| (k.clone(), t(s))).collect();
    let c = classify(&state);
    let s = infer_lora_structure(&c, "default", &BaseModelInfo::default()).unwrap();
    assert_eq!(s.r, 4);
    assert_eq!(
        s.rank_pattern,
        IndexMap::from([("layers.0.q_proj".to_owned(), 8)])
    );
    assert_eq!(s.target_modules, ["q_proj"]);
    // peft matches modules_to_save with a plain `endswith`: "score" would take "xscore" too.
    assert_eq!(s.modules_to_save, Some(vec!["head.score".to_owned()]));
}
