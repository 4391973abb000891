//! LoRA in burn against what peft did on the same models (tests/fixtures/burn), and the
//! refusals of what burn's reparameterization cannot express.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use peftkit_burn::{
    apply_lora, load_hf, load_peft_adapter, save_hf, save_peft_adapter, BurnError, HfSaveOptions,
    LlamaConfig, LlamaForCausalLM, LoadOptions,
};
use peftkit_checkpoint::{Checkpoint, ModelConfig};
use peftkit_peft::{Adapter, AdapterSaveOptions, LoraConfig, TargetModules};

fn case(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/burn")
        .join(name)
}

fn model(name: &str) -> LlamaForCausalLM {
    let base = case(name).join("base");
    let config = ModelConfig::read(&base.join("config.json")).unwrap();
    let model = LlamaForCausalLM::new(&LlamaConfig::from_hf(&config).unwrap(), &Device::flex());
    load_hf(model, &base, &LoadOptions::default()).unwrap().0
}

fn fixture_config(name: &str) -> LoraConfig {
    let text = std::fs::read_to_string(case(name).join("adapter/adapter_config.json")).unwrap();
    LoraConfig::from_json_str(&text).unwrap().0
}

fn sorted(t: &Option<TargetModules>) -> Vec<String> {
    let mut names = t.as_ref().and_then(|t| t.names()).unwrap().to_vec();
    names.sort();
    names
}

/// peft's config applied in burn adapts exactly the modules peft adapted, with their ranks:
/// names with rank/alpha patterns, layers_to_transform with rsLoRA, a regex with
/// exclude_modules.
#[test]
fn targeting_matches_peft() {
    for name in [
        "llama_untied",
        "llama_tied_bf16",
        "llama_theta_sharded",
        "qwen2",
        "mistral",
    ] {
        let peft = Adapter::open(&case(name).join("adapter")).unwrap();
        let (_, lora) = apply_lora(model(name), &fixture_config(name)).unwrap();
        let ours: Vec<&String> = lora.modules.keys().collect();
        let mut theirs = peft.tensors.adapted_modules();
        theirs.sort();
        let mut ours_sorted = ours.clone();
        ours_sorted.sort();
        assert_eq!(ours_sorted, theirs.iter().collect::<Vec<_>>(), "{name}");
        for (m, l) in &lora.modules {
            assert_eq!(Some(l.rank), peft.rank_of(m), "{name}: {m}");
        }
    }
    let (_, lora) = apply_lora(model("llama_untied"), &fixture_config("llama_untied")).unwrap();
    // alpha_pattern {"q_proj": 16} over r=4; rank_pattern {"v_proj": 2} with alpha 8.
    assert_eq!(lora.modules["model.layers.0.self_attn.q_proj"].scale, 4.0);
    assert_eq!(lora.modules["model.layers.0.self_attn.v_proj"].scale, 4.0);
    let (_, lora) = apply_lora(
        model("llama_theta_sharded"),
        &fixture_config("llama_theta_sharded"),
    )
    .unwrap();
    // rsLoRA: alpha 4 / √2.
    assert_eq!(
        lora.modules["model.layers.1.mlp.up_proj"].scale,
        f64::from(4.0f32 / 2f32.sqrt())
    );
}

/// `all-linear` resolves as peft resolves it (every linear but the head), which is what peft
/// saved for the Mistral fixture.
#[test]
fn all_linear_resolves_as_peft_saves_it() {
    let mut config = fixture_config("mistral");
    let saved = sorted(&config.target_modules);
    config.target_modules = Some(TargetModules::Regex("all-linear".into()));
    let (_, lora) = apply_lora(model("mistral"), &config).unwrap();
    assert_eq!(sorted(&lora.config.target_modules), saved);
    assert!(!lora.modules.contains_key("lm_head"));
}

/// A fresh adapter: zero B (a no-op), A drawn as peft draws it, saved in peft's layout.
#[test]
fn fresh_adapter_is_saved_in_peft_layout() {
    for (init, gaussian) in [("true", false), ("\"gaussian\"", true)] {
        let text = format!(
            r#"{{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "init_lora_weights": {init}}}"#
        );
        let config = LoraConfig::from_json_str(&text).unwrap().0;
        let (model, lora) = apply_lora(model("llama_untied"), &config).unwrap();
        let out = tempfile::tempdir().unwrap();
        save_peft_adapter(&model, &lora, out.path(), &AdapterSaveOptions::default()).unwrap();
        let saved = Checkpoint::open(&out.path().join("adapter_model.safetensors")).unwrap();
        let key = "base_model.model.model.layers.0.self_attn.q_proj";
        let a = saved.get(&format!("{key}.lora_A.weight")).unwrap();
        let b = saved.get(&format!("{key}.lora_B.weight")).unwrap();
        assert_eq!(
            (a.shape(), b.shape()),
            (&[4usize, 16][..], &[16usize, 4][..])
        );
        assert!(
            b.bytes().unwrap().iter().all(|x| *x == 0),
            "B starts at zero"
        );
        let values: Vec<f32> = a
            .bytes()
            .unwrap()
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
        // Kaiming-uniform(a=√5) on [r, in] is U(±1/√in) = U(±0.25); N(0, 1/r) exceeds it.
        assert_eq!(max <= 0.25, !gaussian, "{init}: max |A| {max}");
    }
}

fn err_text(e: BurnError) -> String {
    e.to_string()
}

#[test]
fn refuses_what_burn_cannot_express() {
    let base = fixture_config("llama_untied");
    for (field, edit) in [
        ("use_dora", r#""use_dora": true"#),
        ("lora_dropout", r#""lora_dropout": 0.1"#),
        ("lora_bias", r#""lora_bias": true"#),
        ("init_lora_weights", r#""init_lora_weights": "pissa""#),
    ] {
        let text =
            format!(r#"{{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], {edit}}}"#);
        let config = LoraConfig::from_json_str(&text).unwrap().0;
        let e = err_text(apply_lora(model("llama_untied"), &config).unwrap_err());
        assert!(e.contains(&format!("`{field}`")), "{e}");
    }
    // Adapters are applied once: a second call would re-map the first factors.
    let (adapted, _) = apply_lora(model("llama_untied"), &base).unwrap();
    let e = err_text(apply_lora(adapted.clone(), &base).unwrap_err());
    assert!(e.contains("already carries a LoRA adapter"), "{e}");
    // save_hf would silently drop the adapters.
    let out = tempfile::tempdir().unwrap();
    let options = HfSaveOptions::from_dir(&case("llama_untied").join("base")).unwrap();
    let e = err_text(save_hf(&adapted, &out.path().join("x"), &options).unwrap_err());
    assert!(e.contains("save_merged_hf"), "{e}");
    // Targets that match nothing.
    let config = LoraConfig::from_json_str(r#"{"peft_type": "LORA", "target_modules": ["nope"]}"#)
        .unwrap()
        .0;
    assert!(
        err_text(apply_lora(model("llama_untied"), &config).unwrap_err())
            .contains("matches no linear layer")
    );
}

/// An adapter file that cannot be applied exactly is refused, naming the field.
#[test]
fn import_refuses_naming_the_field() {
    for (field, value) in [
        ("use_dora", "true"),
        ("modules_to_save", r#"["lm_head"]"#),
        ("target_parameters", r#"["mlp.experts.gate_up_proj"]"#),
        ("peft_type", r#""IA3""#),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let src = case("llama_untied").join("adapter");
        for f in ["adapter_model.safetensors", "README.md"] {
            std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
        }
        let mut config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(src.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        config[field] = serde_json::from_str(value).unwrap();
        std::fs::write(dir.path().join("adapter_config.json"), config.to_string()).unwrap();
        let e = match load_peft_adapter(model("llama_untied"), dir.path()) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{field} accepted"),
        };
        assert!(e.contains(field), "{field}: {e}");
    }
}

/// Strict loads name every missing and unused key; non-strict ones report them.
#[test]
fn strict_load_reports_missing_and_unused_keys() {
    let base = case("llama_untied").join("base");
    let mut config = ModelConfig::read(&base.join("config.json")).unwrap();
    config
        .fields
        .insert("tie_word_embeddings".into(), true.into());
    let fresh = || LlamaForCausalLM::new(&LlamaConfig::from_hf(&config).unwrap(), &Device::flex());
    let e = load_hf(fresh(), &base, &LoadOptions::default()).unwrap_err();
    assert!(
        matches!(&e, BurnError::KeyMismatch { unused, .. } if unused == &["lm_head.weight"]),
        "{e}"
    );
    let options = LoadOptions {
        strict: false,
        ..LoadOptions::default()
    };
    let (_, report) = load_hf(fresh(), &base, &options).unwrap();
    assert_eq!(
        (report.missing.len(), report.unused.as_slice()),
        (0, &["lm_head.weight".to_string()][..])
    );
    // A tied model's checkpoint lacks the head an untied model needs.
    let tied = case("llama_tied_bf16").join("base");
    let mut untied = ModelConfig::read(&tied.join("config.json")).unwrap();
    untied
        .fields
        .insert("tie_word_embeddings".into(), false.into());
    let m = LlamaForCausalLM::new(&LlamaConfig::from_hf(&untied).unwrap(), &Device::flex());
    let e = load_hf(m, &tied, &LoadOptions::default()).unwrap_err();
    assert!(
        matches!(&e, BurnError::KeyMismatch { missing, .. } if missing == &["lm_head.weight"]),
        "{e}"
    );
}

mod moe {
    use super::*;
    use burn::module::{Module, Param};
    use burn::tensor::Tensor;

    #[derive(Module, Debug)]
    struct Experts {
        gate_up_proj: Param<Tensor<3>>,
        down_proj: Param<Tensor<3>>,
    }
    #[derive(Module, Debug)]
    struct Mlp {
        experts: Experts,
    }
    #[derive(Module, Debug)]
    struct Layer {
        mlp: Mlp,
    }
    #[derive(Module, Debug)]
    struct Inner {
        layers: Vec<Layer>,
    }
    /// The fused experts of a Mixtral, under transformers-v5 names.
    #[derive(Module, Debug)]
    struct Moe {
        model: Inner,
    }

    fn experts(dir: &Path) -> Vec<Vec<u8>> {
        let zeros = |s: [usize; 3]| Param::from_tensor(Tensor::zeros(s, &Device::flex()));
        let layer = || Layer {
            mlp: Mlp {
                experts: Experts {
                    gate_up_proj: zeros([3, 16, 16]),
                    down_proj: zeros([3, 16, 8]),
                },
            },
        };
        let module = Moe {
            model: Inner {
                layers: vec![layer()],
            },
        };
        let options = LoadOptions {
            strict: false,
            ..LoadOptions::default()
        };
        let (module, report) = load_hf(module, dir, &options).unwrap();
        assert!(report.missing.is_empty(), "{:?}", report.missing);
        module
            .model
            .layers
            .iter()
            .flat_map(|l| {
                let e = &l.mlp.experts;
                [
                    e.gate_up_proj.val().into_data().into_bytes().to_vec(),
                    e.down_proj.val().into_data().into_bytes().to_vec(),
                ]
            })
            .collect()
    }

    /// A per-expert (original layout) checkpoint is fused by the remap tables on the way in:
    /// the module gets what the v5 checkpoint transformers wrote holds.
    #[test]
    fn either_moe_layout_loads_the_same_fused_experts() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/remap/mixtral");
        let (original, v5) = (experts(&root.join("original")), experts(&root.join("v5")));
        assert!(
            original == v5,
            "original layout fused differently from transformers' v5 file"
        );
        let file = Checkpoint::open(&root.join("v5")).unwrap();
        let want = file
            .get("model.layers.0.mlp.experts.down_proj")
            .unwrap()
            .bytes()
            .unwrap()
            .into_owned();
        assert!(v5[1] == want);
    }
}
