//! Property test (issue 12): a LoRA merged into an f32 base and unmerged again gives the base
//! back within 1 ulp, for random shapes, ranks, alphas and values. (peft's unmerge subtracts
//! the same `Δ`; with `|Δ| ≤ |W|` the two roundings move an element by at most 1 ulp.)

use std::path::Path;

use peftkit_checkpoint::{
    save_pretrained, Checkpoint, Dtype, SaveOptions, StateDict, Tensor, WeightsKind,
};
use peftkit_merge::{merge, AdapterInput, MergeJob};
use proptest::prelude::*;

const MODULE: &str = "model.layers.0.self_attn.q_proj";

fn f32_tensor(shape: Vec<usize>, vals: &[f32]) -> Tensor {
    let bytes = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    Tensor::from_bytes(Dtype::F32, shape, bytes).unwrap()
}

fn save(dir: &Path, sd: &StateDict, kind: WeightsKind) {
    let opts = SaveOptions {
        kind,
        durable: false,
        ..Default::default()
    };
    save_pretrained(dir, sd, &opts).unwrap();
}

/// The adapter config peft writes for `lora_basic`, with this case's rank and alpha.
fn adapter_config(r: usize, alpha: u32) -> String {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/peft/lora_basic/adapter/adapter_config.json");
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture).unwrap()).unwrap();
    v["r"] = r.into();
    v["lora_alpha"] = alpha.into();
    v["target_modules"] = serde_json::json!(["q_proj"]);
    v.to_string()
}

fn weight_bits(dir: &Path) -> Vec<u32> {
    let ckpt = Checkpoint::open(dir).unwrap();
    let bytes = ckpt
        .get(&format!("{MODULE}.weight"))
        .unwrap()
        .bytes()
        .unwrap()
        .into_owned();
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn case() -> impl Strategy<Value = (usize, usize, usize, u32, Vec<f32>, Vec<f32>, Vec<f32>)> {
    (1usize..24, 1usize..24, 1usize..9, 1u32..17).prop_flat_map(|(out, inp, r, alpha)| {
        // |W| in [1, 2); |A|, |B| ≤ 0.1, so |Δ| ≤ r · 0.01 · alpha / r ≤ 0.16 < |W|.
        let w = prop::collection::vec(
            (1.0f32..2.0, any::<bool>()).prop_map(|(v, s)| if s { -v } else { v }),
            out * inp,
        );
        let a = prop::collection::vec(-0.1f32..0.1, r * inp);
        let b = prop::collection::vec(-0.1f32..0.1, out * r);
        (Just(out), Just(inp), Just(r), Just(alpha), w, a, b)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn merge_then_unmerge_is_within_one_ulp_in_f32((out, inp, r, alpha, w, a, b) in case()) {
        let tmp = tempfile::tempdir().unwrap();
        let (base, adapter) = (tmp.path().join("base"), tmp.path().join("adapter"));
        let mut sd = StateDict::new();
        sd.insert(format!("{MODULE}.weight"), f32_tensor(vec![out, inp], &w));
        save(&base, &sd, WeightsKind::Model);
        let mut ad = StateDict::new();
        ad.insert(format!("base_model.model.{MODULE}.lora_A.weight"), f32_tensor(vec![r, inp], &a));
        ad.insert(format!("base_model.model.{MODULE}.lora_B.weight"), f32_tensor(vec![out, r], &b));
        save(&adapter, &ad, WeightsKind::Adapter);
        std::fs::write(adapter.join("adapter_config.json"), adapter_config(r, alpha)).unwrap();

        let merged = tmp.path().join("merged");
        let input = || vec![AdapterInput::parse(adapter.to_str().unwrap())];
        merge(&MergeJob::new(&base, input(), &merged).durable(false)).unwrap();
        let back = tmp.path().join("back");
        merge(&MergeJob::new(&merged, input(), &back).unmerge(true).durable(false)).unwrap();

        let (orig, round) = (weight_bits(&base), weight_bits(&back));
        let changed = weight_bits(&merged) != orig;
        for (i, (x, y)) in orig.iter().zip(&round).enumerate() {
            // Same sign (|Δ| < |W|), so the bit patterns are ordered like the values.
            prop_assert!(x.abs_diff(*y) <= 1, "element {i}: {:e} came back as {:e}",
                f32::from_bits(*x), f32::from_bits(*y));
        }
        // The merge did something (else the property would hold trivially), unless Δ is 0.
        prop_assert!(changed || a.iter().chain(&b).all(|v| v.abs() < 1e-3));
    }
}
