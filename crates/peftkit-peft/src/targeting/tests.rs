use super::*;
use crate::config::LoraConfig;

fn lora(json: &str) -> LoraConfig {
    LoraConfig::from_json_str(json)
        .expect("test config parses")
        .0
}

#[test]
fn list_targets_match_suffix_components() {
    let c = lora(r#"{"peft_type":"LORA","target_modules":["q_proj","mlp.up_proj"]}"#);
    let m = TargetMatcher::for_lora(&c).unwrap();
    assert!(m.is_target("q_proj").unwrap());
    assert!(m.is_target("model.layers.0.self_attn.q_proj").unwrap());
    assert!(!m.is_target("model.layers.0.self_attn.xq_proj").unwrap());
    assert!(m.is_target("model.layers.0.mlp.up_proj").unwrap());
    assert!(!m.is_target("model.layers.0.up_proj").unwrap());
}

#[test]
fn string_targets_full_match() {
    let c = lora(r#"{"peft_type":"LORA","target_modules":"q_proj"}"#);
    let m = TargetMatcher::for_lora(&c).unwrap();
    // As a string, "q_proj" only matches a top-level module named exactly q_proj.
    assert!(m.is_target("q_proj").unwrap());
    assert!(!m.is_target("model.layers.0.self_attn.q_proj").unwrap());
    let c = lora(r#"{"peft_type":"LORA","target_modules":".*\\.(q_proj|v_proj)"}"#);
    let m = TargetMatcher::for_lora(&c).unwrap();
    assert!(m.is_target("model.layers.0.self_attn.v_proj").unwrap());
    assert!(!m.is_target("model.layers.0.self_attn.v_proj.x").unwrap());
}

#[test]
fn exclusions_come_first() {
    let c = lora(
        r#"{"peft_type":"LORA","target_modules":["q_proj","lm_head","score"],
                "exclude_modules":["layers.1.self_attn.q_proj"],"modules_to_save":["lm_head"]}"#,
    );
    let m = TargetMatcher::for_lora(&c).unwrap();
    assert_eq!(
        m.check("model.layers.1.self_attn.q_proj").unwrap(),
        TargetMatch::Excluded
    );
    assert!(m.is_target("model.layers.0.self_attn.q_proj").unwrap());
    assert_eq!(m.check("lm_head").unwrap(), TargetMatch::Excluded);
    assert_eq!(m.check("lm_head.sub").unwrap(), TargetMatch::Excluded);
    assert!(m.is_target("score").unwrap());
    let c = lora(
        r#"{"peft_type":"LORA","target_modules":["q_proj"],"exclude_modules":".*layers\\.0\\..*"}"#,
    );
    let m = TargetMatcher::for_lora(&c).unwrap();
    assert_eq!(
        m.check("model.layers.0.self_attn.q_proj").unwrap(),
        TargetMatch::Excluded
    );
    assert!(m.is_target("model.layers.10.self_attn.q_proj").unwrap());
}

#[test]
fn layers_to_transform_uses_first_numbered_component() {
    let c = lora(r#"{"peft_type":"LORA","target_modules":["w1"],"layers_to_transform":[1]}"#);
    let m = TargetMatcher::for_lora(&c).unwrap();
    assert!(m.is_target("model.layers.1.experts.0.w1").unwrap());
    assert!(!m.is_target("model.layers.0.experts.1.w1").unwrap());
    // No numbered component: not targeted.
    assert!(!m.is_target("model.w1").unwrap());
    // A full name in the list bypasses the layer filter (peft's `key in targets` branch).
    let c = lora(
        r#"{"peft_type":"LORA","target_modules":["model.layers.0.w1"],"layers_to_transform":1}"#,
    );
    let m = TargetMatcher::for_lora(&c).unwrap();
    assert!(m.is_target("model.layers.0.w1").unwrap());
}

#[test]
fn layers_pattern_selects_the_named_block() {
    let c = lora(
        r#"{"peft_type":"LORA","target_modules":["q"],"layers_to_transform":[0],
                "layers_pattern":["blocks","h"]}"#,
    );
    let m = TargetMatcher::for_lora(&c).unwrap();
    assert!(m.is_target("encoder.blocks.0.attn.q").unwrap());
    assert!(m.is_target("h.0.attn.q").unwrap());
    assert!(!m.is_target("encoder.blocks.1.layer.0.q").unwrap());
    assert!(!m.is_target("encoder.layers.0.attn.q").unwrap());
}

#[test]
fn target_parameters_only() {
    let c = lora(
        r#"{"peft_type":"LORA","target_modules":null,"target_parameters":["experts.gate_up_proj"]}"#,
    );
    let m = TargetMatcher::for_lora(&c).unwrap();
    assert!(!m.is_target("model.layers.0.mlp.experts").unwrap());
    assert!(m.is_target_parameter("model.layers.0.mlp.experts", "gate_up_proj"));
    assert!(!m.is_target_parameter("model.layers.0.mlp.experts", "down_proj"));
    let none = lora(r#"{"peft_type":"LORA"}"#);
    assert!(matches!(
        TargetMatcher::for_lora(&none).unwrap().is_target("q"),
        Err(TargetingError::NoTargetModules)
    ));
    let all = lora(r#"{"peft_type":"LORA","target_modules":"ALL-LINEAR"}"#);
    assert!(matches!(
        TargetMatcher::for_lora(&all).unwrap().is_target("q"),
        Err(TargetingError::UnresolvedAllLinear)
    ));
}

#[test]
fn patterns_first_key_in_file_order_wins() {
    let c = lora(
        r#"{"peft_type":"LORA","r":8,"lora_alpha":16,"target_modules":["q_proj"],
                "rank_pattern":{"q_proj":16,"layers.0.self_attn.q_proj":4},
                "alpha_pattern":{"layers\\.0\\..*":3.5}}"#,
    );
    let p = PatternResolver::new(&c).unwrap();
    assert_eq!(p.rank_for("model.layers.0.self_attn.q_proj").unwrap(), 16);
    assert_eq!(p.rank_for("model.layers.0.self_attn.k_proj").unwrap(), 8);
    // `(.*\.)?(pattern)$` with re.match: the pattern must end at the end of the name and
    // start at a component boundary.
    assert_eq!(p.rank_for("model.layers.0.self_attn.xq_proj").unwrap(), 8);
    assert_eq!(p.alpha_for("model.layers.0.mlp.up_proj").unwrap(), 3.5);
    assert_eq!(p.alpha_for("model.layers.1.mlp.up_proj").unwrap(), 16.0);
    let reversed = lora(
        r#"{"peft_type":"LORA","r":8,"target_modules":["q_proj"],
                "rank_pattern":{"layers.0.self_attn.q_proj":4,"q_proj":16}}"#,
    );
    assert_eq!(
        reversed
            .rank_for("model.layers.0.self_attn.q_proj")
            .unwrap(),
        4
    );
    assert_eq!(
        scaling_of(&c, "model.layers.0.self_attn.q_proj"),
        scaling(3.5, 16, false)
    );
}

/// The unweighted scale, as the removed `targeting::scaling` gave it.
fn scaling(alpha: f64, r: usize, use_rslora: bool) -> f32 {
    crate::scaling::lora_scaling(alpha, r, use_rslora, 1.0).unwrap()
}

fn scaling_of(c: &LoraConfig, module: &str) -> f32 {
    PatternResolver::new(c)
        .unwrap()
        .scaling_for(module)
        .unwrap()
}

#[test]
fn scaling_matches_pytorch_bits() {
    // Expected bits: numpy.float32(alpha / r) (or alpha / math.sqrt(r)) in Python.
    assert_eq!(scaling(16.0, 3, false).to_bits(), 0x40aa_aaab);
    assert_eq!(scaling(7.0, 3, false).to_bits(), 0x4015_5555);
    assert_eq!(scaling(16.0, 3, true).to_bits(), 0x4113_cd3a);
    assert_eq!(scaling(32.0, 24, true).to_bits(), 0x40d1_05ec);
    assert_eq!(scaling(22.627416997969522, 7, false).to_bits(), 0x404e_e116);
}

#[test]
fn minimal_suffixes_like_peft() {
    let mut targets = Vec::new();
    let mut others = Vec::new();
    for i in 0..100 {
        targets.push(format!("model.decoder.layers.{i}.self_attn.q_proj"));
        targets.push(format!("model.decoder.layers.{i}.self_attn.v_proj"));
        others.push(format!("model.encoder.layers.{i}.self_attn.k_proj"));
    }
    let min = minimal_target_suffixes(&targets, &others).unwrap();
    assert_eq!(min.into_iter().collect::<Vec<_>>(), ["q_proj", "v_proj"]);
    assert!(matches!(
        minimal_target_suffixes(&["a"], &["a"]),
        Err(TargetingError::OverlappingTargets(_))
    ));
    assert!(matches!(
        minimal_target_suffixes::<&str, &str>(&[], &[]),
        Err(TargetingError::EmptyTargets)
    ));
}

#[test]
fn minimal_suffixes_keep_distinguishing_components() {
    // q_proj also exists in the encoder, which is not targeted: a longer suffix is needed.
    let targets = ["dec.layers.0.q_proj", "dec.layers.1.q_proj"];
    let others = ["enc.layers.0.q_proj", "enc.layers.1.q_proj"];
    let min = minimal_target_suffixes(&targets, &others).unwrap();
    assert_eq!(
        min.into_iter().collect::<Vec<_>>(),
        ["dec.layers.0.q_proj", "dec.layers.1.q_proj"]
    );
}

#[test]
fn compression_needs_twenty_targets() {
    let linears = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];
    let names = |layers: usize| -> Vec<String> {
        let mut all = vec!["model".to_string(), "model.embed_tokens".to_string()];
        for l in 0..layers {
            for p in linears {
                let parent = if p.ends_with("_proj")
                    && ["gate", "up", "down"].iter().any(|g| p.starts_with(g))
                {
                    "mlp"
                } else {
                    "self_attn"
                };
                all.push(format!("model.layers.{l}.{parent}.{p}"));
            }
        }
        all.push("lm_head".to_string());
        all
    };
    let targets = |layers: usize| -> Vec<String> {
        names(layers)
            .into_iter()
            .filter(|n| n.ends_with("_proj"))
            .collect()
    };
    // 2 layers x 7 linears = 14 < 20: kept as is.
    assert_eq!(
        compress_target_modules(&targets(2), &names(2)).unwrap(),
        None
    );
    // 3 layers = 21: compressed to the 7 linear names (verified with peft, peft `_find_minimal_target_modules`).
    let compressed = compress_target_modules(&targets(3), &names(3))
        .unwrap()
        .unwrap();
    assert_eq!(
        compressed.into_iter().collect::<Vec<_>>(),
        [
            "down_proj",
            "gate_proj",
            "k_proj",
            "o_proj",
            "q_proj",
            "up_proj",
            "v_proj"
        ]
    );
}
