use super::lora::float_number;
use super::*;
use serde_json::{json, Number};

fn lora(text: &str) -> (LoraConfig, Vec<ConfigWarning>) {
    LoraConfig::from_json_str(text).expect("parses")
}

#[test]
fn defaults_match_peft() {
    let (c, w) = lora(r#"{"peft_type": "LORA"}"#);
    assert_eq!(w, vec![ConfigWarning::PeftVersionFilled]);
    assert_eq!(c, LoraConfig::default());
    let v = c.to_value(&WriteOptions::default());
    let obj = v.as_object().expect("object");
    assert_eq!(obj.len(), LORA_FIELDS.len());
    for f in LORA_FIELDS {
        assert!(obj.contains_key(f), "{f}");
    }
    assert_eq!(v["lora_dropout"].to_string(), "0.0");
    assert_eq!(v["lora_alpha"].to_string(), "8");
    assert_eq!(v["rank_pattern"], json!({}));
    assert_eq!(v["loftq_config"], json!({}));
    assert_eq!(v["qalora_group_size"], 16);
}

/// The file peft 0.21.2 writes (`PeftConfig.save_pretrained`) for
/// `LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=[q,k,v,o],
/// task_type="CAUSAL_LM")` on `meta-llama/Llama-3.2-1B` (1130 bytes, no trailing newline).
const SPEC_EXAMPLE: &str = r#"{
  "alora_invocation_tokens": null,
  "alpha_pattern": {},
  "arrow_config": null,
  "auto_mapping": null,
  "base_model_name_or_path": "meta-llama/Llama-3.2-1B",
  "bias": "none",
  "corda_config": null,
  "ensure_weight_tying": false,
  "eva_config": null,
  "exclude_modules": null,
  "fan_in_fan_out": false,
  "inference_mode": true,
  "init_lora_weights": true,
  "kasa_config": null,
  "layer_replication": null,
  "layers_pattern": null,
  "layers_to_transform": null,
  "loftq_config": {},
  "lora_alpha": 32,
  "lora_bias": false,
  "lora_dropout": 0.05,
  "lora_ga_config": null,
  "megatron_config": null,
  "megatron_core": "megatron.core",
  "modules_to_save": null,
  "monteclora_config": null,
  "peft_type": "LORA",
  "peft_version": "0.21.2",
  "qalora_group_size": 16,
  "r": 16,
  "rank_pattern": {},
  "revision": null,
  "target_modules": [
    "v_proj",
    "o_proj",
    "k_proj",
    "q_proj"
  ],
  "target_parameters": null,
  "task_type": "CAUSAL_LM",
  "trainable_token_indices": null,
  "use_bdlora": null,
  "use_dora": false,
  "use_qalora": false,
  "use_rslora": false,
  "velora_config": null
}"#;

#[test]
fn spec_example_is_reproduced_byte_for_byte() {
    assert_eq!(SPEC_EXAMPLE.len(), 1130);
    let config = LoraConfig {
        r: 16,
        lora_alpha: Number::from(32),
        lora_dropout: float_number(0.05),
        target_modules: Some(TargetModules::Names(
            ["v_proj", "o_proj", "k_proj", "q_proj"]
                .map(String::from)
                .to_vec(),
        )),
        task_type: Some("CAUSAL_LM".into()),
        base_model_name_or_path: Some("meta-llama/Llama-3.2-1B".into()),
        inference_mode: true,
        ..LoraConfig::default()
    };
    let as_held = WriteOptions {
        set_order: SetOrder::AsHeld,
    };
    let written = AdapterConfig::Lora(Box::new(config.clone())).to_json_string_with(&as_held);
    assert_eq!(written, SPEC_EXAMPLE);
    // The default writer sorts the set-valued list.
    let sorted = config.to_json_string();
    assert!(sorted.contains("\"k_proj\",\n    \"o_proj\",\n    \"q_proj\",\n    \"v_proj\"\n"));
    let (parsed, warnings) = LoraConfig::from_json_str(SPEC_EXAMPLE).expect("parses");
    assert!(warnings.is_empty());
    assert_eq!(parsed, config);
}

#[test]
fn int_and_float_are_kept() {
    let (c, _) =
        lora(r#"{"peft_type":"LORA","lora_alpha":16.0,"lora_dropout":0,"alpha_pattern":{"q":2}}"#);
    let v = c.to_value(&WriteOptions::default());
    assert_eq!(v["lora_alpha"].to_string(), "16.0");
    assert_eq!(v["lora_dropout"].to_string(), "0");
    assert_eq!(v["alpha_pattern"]["q"].to_string(), "2");
}

#[test]
fn unknown_fields_and_runtime_config() {
    let (c, w) = lora(
        r#"{"peft_type":"LORA","peft_version":"0.99.0","new_thing":{"a":1},"runtime_config":{}}"#,
    );
    assert_eq!(
        w,
        vec![
            ConfigWarning::RuntimeConfigDropped,
            ConfigWarning::UnknownField("new_thing".into())
        ]
    );
    let v = c.to_value(&WriteOptions::default());
    assert_eq!(v["new_thing"], json!({"a": 1}));
    assert!(v.get("runtime_config").is_none());
    assert_eq!(v["peft_version"], "0.99.0");
}

#[test]
fn wrong_types_name_the_field() {
    let err = LoraConfig::from_json_str(r#"{"peft_type":"LORA","r":"8"}"#).unwrap_err();
    assert!(
        matches!(&err, ConfigError::WrongType { field, .. } if field == "r"),
        "{err}"
    );
    let err =
        LoraConfig::from_json_str(r#"{"peft_type":"LORA","rank_pattern":{"q":"x"}}"#).unwrap_err();
    assert!(err.to_string().contains(r#"rank_pattern["q"]"#), "{err}");
    let err =
        LoraConfig::from_json_str(r#"{"peft_type":"LORA","target_modules":["a",1]}"#).unwrap_err();
    assert!(err.to_string().contains("target_modules[1]"), "{err}");
    let err = LoraConfig::from_json_str(r#"{"peft_type":"LORA","use_dora":null}"#).unwrap_err();
    assert!(err.to_string().contains("use_dora"), "{err}");
}

#[test]
fn peft_type_errors() {
    assert!(matches!(
        AdapterConfig::from_json_str(r#"{"r": 8}"#),
        Err(ConfigError::MissingPeftType)
    ));
    assert!(matches!(
        AdapterConfig::from_json_str(r#"{"peft_type": "NOPE"}"#),
        Err(ConfigError::UnknownPeftType(t)) if t == "NOPE"
    ));
    assert!(matches!(
        AdapterConfig::from_json_str(r#"[]"#),
        Err(ConfigError::NotAnObject(_))
    ));
    assert!(matches!(
        LoraConfig::from_json_str(r#"{"peft_type": "IA3"}"#),
        Err(ConfigError::PeftTypeMismatch { .. })
    ));
}

fn invalid(text: &str) -> ConfigError {
    let (c, _) = AdapterConfig::from_json_str(text).expect("parses");
    c.validate().expect_err("must be rejected")
}

#[test]
fn validation_mirrors_post_init() {
    assert!(matches!(
        invalid(r#"{"peft_type":"LORA","task_type":"CAUSAL"}"#),
        ConfigError::InvalidTaskType(_)
    ));
    assert!(matches!(
        invalid(r#"{"peft_type":"LORA","target_modules":"q","layers_to_transform":[0]}"#),
        ConfigError::LayersWithRegexTargets("layers_to_transform")
    ));
    assert!(matches!(
        invalid(r#"{"peft_type":"LORA","target_modules":"q","layers_pattern":"layers"}"#),
        ConfigError::LayersWithRegexTargets("layers_pattern")
    ));
    assert!(matches!(
        invalid(r#"{"peft_type":"LORA","target_modules":["q"],"layers_pattern":"layers"}"#),
        ConfigError::LayersPatternWithoutLayersToTransform
    ));
    assert!(matches!(
        invalid(r#"{"peft_type":"LORA","lora_bias":true,"use_dora":true}"#),
        ConfigError::LoraBiasWithDora
    ));
    assert!(matches!(
        invalid(r#"{"peft_type":"LORA","lora_bias":true,"init_lora_weights":"gaussian"}"#),
        ConfigError::LoraBiasWithInit(_)
    ));
    assert!(matches!(
        invalid(r#"{"peft_type":"LORA","target_parameters":"experts.w1"}"#),
        ConfigError::StringTargetParameters(_)
    ));
    assert!(matches!(
        invalid(r#"{"peft_type":"LORA","use_dora":true,"megatron_config":{"a":1}}"#),
        ConfigError::DoraWithMegatron
    ));
    assert!(matches!(
        invalid(r#"{"peft_type":"LORA","init_lora_weights":"loftq"}"#),
        ConfigError::LoftqWithoutConfig
    ));
    assert!(matches!(
        invalid(r#"{"peft_type":"LORA","r":0}"#),
        ConfigError::InvalidValue { field, .. } if field == "r"
    ));
    assert!(matches!(
        invalid(r#"{"peft_type":"LORA","bias":"some"}"#),
        ConfigError::InvalidValue { field, .. } if field == "bias"
    ));
    assert!(matches!(
        invalid(r#"{"peft_type":"LORA","init_lora_weights":"pissa_niter_x"}"#),
        ConfigError::InvalidValue { field, .. } if field == "init_lora_weights"
    ));
    assert!(matches!(
        invalid(r#"{"peft_type":"LORA","rank_pattern":{"q":2.5}}"#),
        ConfigError::InvalidValue { field, .. } if field.starts_with("rank_pattern")
    ));
    assert!(matches!(
        invalid(r#"{"peft_type":"LORA","target_modules":"(q"}"#),
        ConfigError::Regex { field, .. } if field == "target_modules"
    ));
    assert!(matches!(
        invalid(r#"{"peft_type":"LORA","target_modules":["q"],"rank_pattern":{"(q":4}}"#),
        ConfigError::Regex { field, .. } if field == "rank_pattern"
    ));
    assert!(matches!(
        invalid(r#"{"peft_type":"IA3","task_type":"X"}"#),
        ConfigError::InvalidTaskType(_)
    ));
    // Valid, including the empty layers_pattern peft treats as "unset".
    for ok in [
        r#"{"peft_type":"LORA","task_type":"CAUSAL_LM","target_modules":["q"]}"#,
        r#"{"peft_type":"LORA","target_modules":["q"],"layers_pattern":[]}"#,
        r#"{"peft_type":"LORA","init_lora_weights":"pissa_niter_16"}"#,
        r#"{"peft_type":"LORA","init_lora_weights":"loftq","loftq_config":{"loftq_bits":4}}"#,
        r#"{"peft_type":"PROMPT_TUNING","task_type":"CAUSAL_LM","num_virtual_tokens":4}"#,
    ] {
        let (c, _) = AdapterConfig::from_json_str(ok).expect("parses");
        c.validate().unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
}

#[test]
fn load_adjustments_follow_peft() {
    let (c, w) = lora(r#"{"peft_type":"LORA","loftq_config":{"loftq_bits":4}}"#);
    assert!(w.contains(&ConfigWarning::LoftqConfigReset));
    assert_eq!(c.loftq_config, Some(json!({})));
    let (c, w) = lora(r#"{"peft_type":"LORA","init_lora_weights":"eva"}"#);
    assert!(w.contains(&ConfigWarning::SubConfigDefaulted("eva_config")));
    assert_eq!(
        c.eva_config.as_ref().map(|v| v["rho"].clone()),
        Some(json!(2.0))
    );
    let (c, w) = lora(r#"{"peft_type":"LORA","init_lora_weights":"corda"}"#);
    assert!(w.contains(&ConfigWarning::SubConfigDefaulted("corda_config")));
    assert_eq!(
        c.corda_config.as_ref().map(|v| v["corda_method"].clone()),
        Some(json!("ipm"))
    );
}

#[test]
fn set_fields_sorted_or_as_held() {
    let (c, _) = AdapterConfig::from_json_str(
        r#"{"peft_type":"LORA","target_modules":["v","q","v"],"exclude_modules":["b","a"]}"#,
    )
    .expect("parses");
    let sorted = c.to_value(&WriteOptions::default());
    assert_eq!(sorted["target_modules"], json!(["q", "v"]));
    assert_eq!(sorted["exclude_modules"], json!(["a", "b"]));
    let held = c.to_value(&WriteOptions {
        set_order: SetOrder::AsHeld,
    });
    assert_eq!(held["target_modules"], json!(["v", "q", "v"]));
    let (ia3, _) = AdapterConfig::from_json_str(
            r#"{"peft_type":"IA3","target_modules":["v","k"],"feedforward_modules":["v"],"modules_to_save":["z","a"]}"#,
        )
        .expect("parses");
    let v = ia3.to_value(&WriteOptions::default());
    assert_eq!(v["target_modules"], json!(["k", "v"]));
    // modules_to_save is a list in peft: order kept.
    assert_eq!(v["modules_to_save"], json!(["z", "a"]));
}

#[test]
fn generic_configs_keep_everything() {
    let text = r#"{"auto_mapping":null,"base_model_name_or_path":"m","inference_mode":true,
            "num_virtual_tokens":4,"peft_type":"PROMPT_TUNING","prompt_tuning_init":"RANDOM",
            "token_dim":64,"tokenizer_kwargs":null,"runtime_config":{}}"#;
    let (c, w) = AdapterConfig::from_json_str(text).expect("parses");
    assert_eq!(w, vec![ConfigWarning::RuntimeConfigDropped]);
    assert_eq!(c.peft_type(), "PROMPT_TUNING");
    assert_eq!(c.base_model_name_or_path(), Some("m"));
    let v = c.to_value(&WriteOptions::default());
    assert_eq!(v["token_dim"], 64);
    assert_eq!(v["peft_type"], "PROMPT_TUNING");
    assert!(v.get("runtime_config").is_none());
}

#[test]
fn target_rules_from_generic() {
    let (c, _) = AdapterConfig::from_json_str(
            r#"{"peft_type":"LOHA","target_modules":"q|v","exclude_modules":["x"],"layers_to_transform":null}"#,
        )
        .expect("parses");
    let rules = c.target_rules().expect("rules");
    assert_eq!(
        rules.target_modules,
        Some(TargetModules::Regex("q|v".into()))
    );
    assert_eq!(
        rules.exclude_modules,
        Some(TargetModules::Names(vec!["x".into()]))
    );
}

#[test]
fn unsupported_features_are_listed() {
    let (c, _) = lora(
        r#"{"peft_type":"LORA","use_qalora":true,"init_lora_weights":"pissa","layer_replication":[[0,2],[1,3]]}"#,
    );
    assert_eq!(
        c.unsupported_merge_features(),
        vec!["use_qalora", "layer_replication", "init_lora_weights"]
    );
    assert_eq!(c.layer_replication, Some(vec![[0, 2], [1, 3]]));
    assert!(lora(r#"{"peft_type":"LORA","init_lora_weights":"mica"}"#)
        .0
        .unsupported_merge_features()
        .is_empty());
}
