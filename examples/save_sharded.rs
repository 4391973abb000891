//! Save a state dict as a sharded checkpoint, as transformers' `save_pretrained(max_shard_size=…)`
//! writes it, then read it back by its headers.
//!
//! ```text
//! cargo run --example save_sharded [OUT_DIR]    # default target/example/save_sharded
//! ```

use std::error::Error;
use std::path::{Path, PathBuf};

use peftkit::checkpoint::{parse_max_shard_size, save_pretrained, GenerationConfig};
use peftkit::{Checkpoint, Dtype, ModelConfig, SaveOptions, StateDict, Tensor};

/// A tiny Llama-shaped state dict: bf16 weights of a 2-layer model, one of them computed only
/// when the writer reaches it.
fn state_dict() -> Result<StateDict, Box<dyn Error>> {
    let mut state = StateDict::new();
    let ones = |shape: Vec<usize>| -> Result<Tensor, Box<dyn Error>> {
        let n: usize = shape.iter().product();
        // 1.0 in bf16 is 0x3f80, little-endian.
        Ok(Tensor::from_bytes(
            Dtype::BF16,
            shape,
            [0x80, 0x3f].repeat(n),
        )?)
    };
    state.insert("model.embed_tokens.weight".into(), ones(vec![128, 32])?);
    for i in 0..2 {
        for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            state.insert(
                format!("model.layers.{i}.self_attn.{proj}.weight"),
                ones(vec![32, 32])?,
            );
        }
    }
    state.insert(
        "model.norm.weight".into(),
        Tensor::lazy(Dtype::BF16, vec![32], || Ok([0x80, 0x3f].repeat(32)))?,
    );
    Ok(state)
}

/// Writes the checkpoint into `out` with shards of at most 5 kB; returns the weight files.
pub fn run(out: &Path) -> Result<Vec<String>, Box<dyn Error>> {
    let config = ModelConfig::from_json(
        r#"{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}"#,
    )?;
    let options = SaveOptions::default()
        .max_shard_size(parse_max_shard_size("5KB")?)
        .generation_config(GenerationConfig::from_model_config(&config))
        .config(config);
    let report = save_pretrained(out, &state_dict()?, &options)?;
    // Read it back: headers only, tensors are read when asked for.
    let ckpt = Checkpoint::open(out)?;
    assert_eq!(ckpt.len(), 10);
    assert!(peftkit::checkpoint::verify(out, Default::default(), None)?.is_empty());
    Ok(report.weight_files)
}

fn main() -> Result<(), Box<dyn Error>> {
    let out = std::env::args_os().nth(1).map_or_else(
        || PathBuf::from("target/example/save_sharded"),
        PathBuf::from,
    );
    let files = run(&out)?;
    println!(
        "{}: {} shards: {}",
        out.display(),
        files.len(),
        files.join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn writes_a_sharded_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let files = super::run(&tmp.path().join("out")).unwrap();
        // huggingface_hub's greedy plan: the 8 kB embedding alone, then two 2 kB projections
        // per shard, the 64-byte norm with the last two.
        assert_eq!(files.len(), 5, "{files:?}");
        assert!(tmp
            .path()
            .join("out/model.safetensors.index.json")
            .is_file());
    }
}
