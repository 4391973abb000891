use super::config::mul_number;
use super::fuse::disk_suffix;
use super::rules::pattern_leaf;
use super::*;
use crate::py::{name_matches_suffix, re_escape};
use serde_json::Number;

#[test]
fn rules_match_peft_tables() {
    // peft 0.21.2's _MOE_TARGET_MODULE_MAPPING / _MOE_FUSED_TARGETS, derived from the data.
    let m = LegacyMoeRules::for_model_type("mixtral").unwrap();
    let pairs: Vec<(&str, &str)> = m
        .target_mapping
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    assert_eq!(
        pairs,
        [
            ("gate", "gate.weight"),
            ("w1", "gate_up_proj"),
            ("w3", "gate_up_proj"),
            ("w2", "down_proj")
        ]
    );
    assert_eq!(m.fused[0].parts, ["w1", "w3"]);
    let q = LegacyMoeRules::for_model_type("qwen3_moe").unwrap();
    let pairs: Vec<(&str, &str)> = q
        .target_mapping
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    assert_eq!(
        pairs,
        [
            ("gate", "gate.weight"),
            ("gate_proj", "gate_up_proj"),
            ("up_proj", "gate_up_proj"),
            ("down_proj", "down_proj")
        ]
    );
    assert_eq!(q.table, "qwen2_moe");
    // minimax_m2 has its own table, which extends mixtral's.
    let mm = LegacyMoeRules::for_model_type("minimax_m2").unwrap();
    assert_eq!(mm.table, "minimax_m2");
    assert_eq!(mm.fused, m.fused);
    // Types without a table of their own use the pattern's.
    assert_eq!(
        LegacyMoeRules::for_model_type("ernie4_5_moe")
            .unwrap()
            .table,
        "qwen2_moe"
    );
}

#[test]
fn unconverted_types_say_why() {
    let err = LegacyMoeRules::for_model_type("qwen2_moe").unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("qwen2_moe") && text.contains("qwen3_moe"),
        "{text}"
    );
    assert!(LegacyMoeRules::for_model_type("llama").is_err());
}

#[test]
fn helpers_follow_python() {
    assert_eq!(re_escape("gate_up_proj"), "gate_up_proj");
    assert_eq!(re_escape("a.b-c"), "a\\.b\\-c");
    assert_eq!(pattern_leaf(".experts.*.w1.weight"), "w1");
    assert_eq!(pattern_leaf("mlp.experts.gate_up_proj"), "gate_up_proj");
    assert_eq!(pattern_leaf("^model\\.x\\.down_proj"), "down_proj");
    assert_eq!(mul_number(&Number::from(8), 2), Some(Number::from(16)));
    assert_eq!(
        mul_number(&Number::from_f64(3.5).unwrap(), 2),
        Number::from_f64(7.0)
    );
    assert!(name_matches_suffix("model.layers.0.mlp.gate", "gate"));
    assert!(!name_matches_suffix(
        "model.layers.0.mlp.shared_expert_gate",
        "gate"
    ));
    assert_eq!(
        disk_suffix(
            "base_model.model.m.q.lora_A.default.weight",
            "m.q",
            "default"
        )
        .as_deref(),
        Some("lora_A.weight")
    );
    assert_eq!(
        disk_suffix("m.q.lora_embedding_A.default", "m.q", "default").as_deref(),
        Some("lora_embedding_A")
    );
}
