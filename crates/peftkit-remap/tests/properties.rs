//! Property test (issue 12): remap to the transformers-v5 layout and back to the original
//! layout is the identity, names and bytes, for random tensor values in the checkpoints of
//! every model family with a conversion fixture (fused experts, split and concatenated
//! projections, renames).

use std::path::Path;

use peftkit_checkpoint::{
    save_pretrained, Checkpoint, ModelConfig, SaveOptions, StateDict, Tensor,
};
use peftkit_remap::{remap, RemapOptions, TensorLayout};
use proptest::prelude::*;

fn fixture(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/remap")
        .join(rel)
}

/// The original-layout checkpoint of `model` with every tensor filled with random bytes
/// from `seed`, written to `dir`.
fn randomised(model: &str, seed: u64, dir: &Path) -> StateDict {
    let src = fixture(&format!("{model}/original"));
    let ckpt = Checkpoint::open(&src).unwrap();
    let mut s = seed | 1;
    let mut sd = StateDict::new();
    for (name, t) in ckpt.tensors() {
        let bytes: Vec<u8> = (0..t.byte_len())
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s as u8
            })
            .collect();
        sd.insert(
            name.to_owned(),
            Tensor::from_bytes(t.dtype(), t.shape().to_vec(), bytes).unwrap(),
        );
    }
    let opts = SaveOptions {
        config: Some(ModelConfig::read(&src.join("config.json")).unwrap()),
        durable: false,
        ..Default::default()
    };
    save_pretrained(dir, &sd, &opts).unwrap();
    sd
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]

    #[test]
    fn remap_to_v5_and_back_is_the_identity(
        model in prop::sample::select(vec!["mixtral", "qwen2_moe", "gpt_neox"]),
        seed in any::<u64>(),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let (orig, v5, back) = (tmp.path().join("o"), tmp.path().join("v5"), tmp.path().join("back"));
        let sd = randomised(model, seed, &orig);
        let opts = RemapOptions::default();
        let there = remap(&orig, &v5, TensorLayout::TransformersV5, None, &opts).unwrap();
        prop_assert!(there.tensors_converted > 0, "{model}: nothing converted");
        remap(&v5, &back, TensorLayout::Original, None, &opts).unwrap();
        let got = Checkpoint::open(&back).unwrap();
        prop_assert_eq!(got.len(), sd.len());
        for (name, t) in &sd {
            let g = got.get(name);
            prop_assert!(g.is_some(), "{model}: `{name}` missing after the round trip");
            let g = g.unwrap();
            prop_assert_eq!(g.shape(), t.shape());
            prop_assert!(g.bytes().unwrap() == t.bytes().unwrap(), "{}: `{}` differs", model, name);
        }
    }
}
