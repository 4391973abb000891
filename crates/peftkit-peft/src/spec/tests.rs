use super::*;

const M: &str = "base_model.model.model.layers.0.self_attn.q_proj";

#[test]
fn embedded_spec_loads_and_lists_all_peft_types() {
    let spec = Spec::embedded();
    assert_eq!(spec.peft_version(), "0.21.2");
    for t in [
        "LORA",
        "ADALORA",
        "IA3",
        "LOHA",
        "LOKR",
        "VERA",
        "BOFT",
        "OFT",
        "FOURIERFT",
        "HRA",
        "VBLORA",
        "LN_TUNING",
        "PROMPT_TUNING",
        "P_TUNING",
        "PREFIX_TUNING",
        "MULTITASK_PROMPT_TUNING",
        "TRAINABLE_TOKENS",
        "XLORA",
    ] {
        assert!(spec.is_known_peft_type(t), "{t}");
    }
    assert_eq!(spec.method_names().len(), 45);
    assert!(!spec.method("IA3").unwrap().minimize_target_modules);
    assert!(spec.method("LORA").unwrap().minimize_target_modules);
}

#[test]
fn every_rule_example_round_trips_disk_and_memory_forms() {
    let spec = Spec::embedded();
    for name in spec.method_names() {
        let method = spec.method(name).unwrap();
        for rule in &method.rules {
            let Some(example) = &rule.example else {
                continue;
            };
            let disk = match rule.scope {
                RuleScope::Module => format!("{M}.{example}"),
                RuleScope::Model => format!("base_model.{example}"),
                RuleScope::Top => example.clone(),
            };
            let k = spec
                .classify_key_for(name, &disk)
                .unwrap_or_else(|| panic!("{name} {disk}"));
            assert_eq!(k.role, rule.role, "{disk}");
            assert_eq!(k.disk_key, disk);
            assert_eq!(k.adapter_name, None);
            if rule.scope == RuleScope::Module {
                assert_eq!(
                    k.module_path.as_deref(),
                    Some("model.layers.0.self_attn.q_proj")
                );
            }
            let Some(mem) = k.memory_key("other") else {
                assert_eq!(rule.adapter_name, AdapterNamePlacement::None);
                continue;
            };
            let back = spec
                .classify_key_for(name, &mem)
                .unwrap_or_else(|| panic!("{name} {mem}"));
            assert_eq!(back.role, rule.role, "{mem}");
            assert_eq!(back.adapter_name.as_deref(), Some("other"), "{mem}");
            assert_eq!(back.disk_key, disk, "{mem}");
        }
    }
}

#[test]
fn lora_keys_with_and_without_prefix_and_name() {
    let cases = [
        ("q_proj.lora_A.weight", "a", "q_proj", None),
        (
            "q_proj.lora_A.default.weight",
            "a",
            "q_proj",
            Some("default"),
        ),
        (
            "base_model.model.x.q_proj.lora_B.bias",
            "b_bias",
            "x.q_proj",
            None,
        ),
        (
            "x.q_proj.lora_B.other.bias",
            "b_bias",
            "x.q_proj",
            Some("other"),
        ),
        (
            "model.embed_tokens.lora_embedding_A",
            "embedding_a",
            "model.embed_tokens",
            None,
        ),
        (
            "model.embed_tokens.lora_embedding_B.default",
            "embedding_b",
            "model.embed_tokens",
            Some("default"),
        ),
        ("m.q.lora_magnitude_vector", "magnitude", "m.q", None),
        (
            "base_model.model.m.q.lora_magnitude_vector.default.weight",
            "magnitude",
            "m.q",
            Some("default"),
        ),
        (
            "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta",
            "trainable_tokens",
            "model.embed_tokens",
            None,
        ),
        (
            "mha.base_layer.out_proj.lora_A.weight",
            "a",
            "mha.base_layer.out_proj",
            None,
        ),
    ];
    for (key, role, module, adapter) in cases {
        let k = classify_key(key).unwrap_or_else(|| panic!("{key}"));
        assert_eq!(k.method, "LORA", "{key}");
        assert_eq!(k.role, role, "{key}");
        assert_eq!(k.module_path.as_deref(), Some(module), "{key}");
        assert_eq!(k.adapter_name.as_deref(), adapter, "{key}");
        assert_eq!(k.had_prefix, key.starts_with("base_model.model."), "{key}");
    }
    let k = classify_key("q_proj.lora_magnitude_vector.default.weight").unwrap();
    assert_eq!(k.disk_key, "base_model.model.q_proj.lora_magnitude_vector");
    assert_eq!(
        k.memory_key("x").as_deref(),
        Some("base_model.model.q_proj.lora_magnitude_vector.x.weight")
    );
}

#[test]
fn non_adapter_keys_are_not_classified() {
    for key in [
        "base_model.model.lm_head.weight",
        "base_model.model.model.embed_tokens.base_layer.weight",
        "base_model.model.model.layers.0.input_layernorm.weight",
        "model.norm.weight",
        "lora_A.weight",
    ] {
        assert_eq!(classify_key(key), None, "{key}");
    }
}

#[test]
fn other_methods_and_shared_tensors() {
    let spec = Spec::embedded();
    let k = classify_key("base_model.vera_A").unwrap();
    assert_eq!((k.method.as_str(), k.role.as_str()), ("VERA", "vera_a"));
    assert_eq!(k.scope, RuleScope::Model);
    assert_eq!(k.module_path, None);
    assert_eq!(
        k.memory_key("default").as_deref(),
        Some("base_model.vera_A.default")
    );
    let k = classify_key("base_model.vera_B.default").unwrap();
    assert_eq!(k.adapter_name.as_deref(), Some("default"));
    let k = classify_key("base_model.model.m.q_proj.lora_E").unwrap();
    assert_eq!((k.method.as_str(), k.role.as_str()), ("ADALORA", "e"));
    let k = spec
        .classify_key_for("ADALORA", "base_model.model.m.embed.lora_embedding_A")
        .unwrap();
    assert_eq!(k.method, "ADALORA");
    let k = classify_key("prompt_embeddings").unwrap();
    assert_eq!(k.method, "PROMPT_TUNING");
    let k = spec
        .classify_key_for(
            "MULTITASK_PROMPT_TUNING",
            "prompt_encoder.task1.prefix_task_cols",
        )
        .unwrap();
    assert_eq!(k.disk_key, "prefix_task_cols");
    assert_eq!(k.adapter_name.as_deref(), Some("task1"));
    let k = spec
        .classify_key_for("P_TUNING", "prompt_embeddings")
        .unwrap();
    assert_eq!(k.memory_key("default"), None);
    let k =
        classify_key("base_model.model.m.input_layernorm.ln_tuning_layers.default.bias").unwrap();
    assert_eq!(
        (k.method.as_str(), k.role.as_str()),
        ("LN_TUNING", "norm_param")
    );
    assert_eq!(
        k.disk_key,
        "base_model.model.m.input_layernorm.ln_tuning_layers.bias"
    );
    let k = classify_key("base_model.model.m.embed_tokens.trainable_tokens_delta").unwrap();
    assert_eq!(k.method, "TRAINABLE_TOKENS");
    let k = classify_key("base_model.model.m.q.vblora_logits_A_topk_indices").unwrap();
    assert_eq!(k.role, "logits_a_topk_indices");
}

#[test]
fn remove_adapter_name_like_peft() {
    assert_eq!(
        remove_adapter_name("a.lora_A.default.weight", "default"),
        "a.lora_A.weight"
    );
    assert_eq!(
        remove_adapter_name("a.lora_embedding_A.default", "default"),
        "a.lora_embedding_A"
    );
    // A module that happens to carry the adapter's name in the middle is left alone.
    assert_eq!(
        remove_adapter_name("default.lora_A.weight", "default"),
        "default.lora_A.weight"
    );
    assert_eq!(remove_adapter_name("nodots", "default"), "nodots");
}

#[test]
fn user_file_extends_and_overrides() {
    let user = r#"{
            "methods": {
                "LORA": {"rules": [
                    {"role": "a", "suffix": "lora_A\\.weight", "adapter_name": "before_last", "note": "overridden"},
                    {"role": "diag", "suffix": "lora_diag", "adapter_name": "append", "example": "lora_diag"}
                ]},
                "MYMETHOD": {"param_prefix": "my_", "prefixed": true,
                             "rules": [{"role": "w", "suffix": "my_w", "adapter_name": "append"}]}
            },
            "default_targets": {"target_modules": {"LORA": {"mymodel": ["attn"], "llama": "q_proj"}}}
        }"#;
    let spec = Spec::embedded().with_user_json(user).unwrap();
    let lora = spec.method("LORA").unwrap();
    assert_eq!(lora.rules.len(), 8);
    assert_eq!(lora.rules[0].note.as_deref(), Some("overridden"));
    assert_eq!(spec.classify_key("m.q.lora_diag").unwrap().role, "diag");
    assert_eq!(
        spec.classify_key("m.q.my_w.default").unwrap().method,
        "MYMETHOD"
    );
    assert_eq!(
        spec.default_target_modules("LORA", "mymodel"),
        Some(TargetModules::Names(vec!["attn".into()]))
    );
    assert_eq!(
        spec.default_target_modules("LORA", "llama"),
        Some(TargetModules::Regex("q_proj".into()))
    );
    // Untouched entries stay.
    assert!(spec.default_target_modules("LORA", "gpt2").is_some());
    let replaced = Spec::embedded()
            .with_user_json(
                r#"{"methods": {"LORA": {"replace": true, "param_prefix": "lora_", "prefixed": true}}}"#,
            )
            .unwrap();
    assert!(replaced.method("LORA").unwrap().rules.is_empty());
}

#[test]
fn user_file_errors_are_reported() {
    let spec = Spec::embedded();
    for bad in [
        r#"[]"#,
        r#"{"method": {}}"#,
        r#"{"methods": {"LORA": {"rules": [{"role": "a", "suffix": "(", "adapter_name": "append"}]}}}"#,
        r#"{"methods": {"LORA": {"rules": [{"role": "x", "suffix": "x", "adapter_name": "sideways"}]}}}"#,
        r#"{"methods": {"LORA": {"rules": [{"role": "x", "suffix": "x", "adapter_name": "append", "example": "y"}]}}}"#,
        r#"{"methods": {"LORA": {"prefixd": true}}}"#,
    ] {
        assert!(spec.with_user_json(bad).is_err(), "{bad}");
    }
    let err = Spec::load(Some(Path::new("/nonexistent/spec.json"))).unwrap_err();
    assert!(matches!(err, SpecError::Io { .. }));
}

#[test]
fn default_targets_from_peft() {
    let spec = Spec::embedded();
    assert_eq!(
        spec.default_target_modules("LORA", "gpt2"),
        Some(TargetModules::Names(vec!["c_attn".into()]))
    );
    assert_eq!(
        spec.default_target_modules("LORA", "gemma4"),
        Some(TargetModules::Regex(
            r".*language_model\..*\.(q_proj|v_proj)".into()
        ))
    );
    assert_eq!(
        spec.default_feedforward_modules("IA3", "llama"),
        Some(vec!["down_proj".into()])
    );
    assert_eq!(spec.default_target_modules("LORA", "nope"), None);
}
