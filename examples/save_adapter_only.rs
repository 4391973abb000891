//! Save only the adapter weights out of a full state dict (base weights and LoRA factors side
//! by side, as a training loop holds them), as peft's `save_pretrained` writes an adapter:
//! `adapter_model.safetensors`, `adapter_config.json` and `README.md`, the config inferred from
//! the tensors.
//!
//! ```text
//! cargo run --example save_adapter_only [OUT_DIR]    # default target/example/save_adapter_only
//! ```

use std::error::Error;
use std::path::{Path, PathBuf};

use peftkit::peft::{save_pretrained, Adapter, InferOptions, PeftSaveOptions};
use peftkit::{Dtype, StateDict, Tensor};

/// A `PeftModel.state_dict()`-shaped training state: each targeted projection's base weight under
/// `base_layer`, its LoRA factors under the adapter name `default`.
fn training_state() -> Result<StateDict, Box<dyn Error>> {
    let f32s = |shape: Vec<usize>, value: f32| -> Result<Tensor, Box<dyn Error>> {
        let n: usize = shape.iter().product();
        Ok(Tensor::from_bytes(
            Dtype::F32,
            shape,
            value.to_le_bytes().repeat(n),
        )?)
    };
    let mut state = StateDict::new();
    state.insert(
        "base_model.model.model.embed_tokens.weight".into(),
        f32s(vec![64, 16], 0.5)?,
    );
    for i in 0..2 {
        let m = format!("base_model.model.model.layers.{i}.self_attn");
        for proj in ["q_proj", "v_proj"] {
            state.insert(
                format!("{m}.{proj}.base_layer.weight"),
                f32s(vec![16, 16], 0.25)?,
            );
            state.insert(
                format!("{m}.{proj}.lora_A.default.weight"),
                f32s(vec![4, 16], 0.01)?,
            );
            state.insert(
                format!("{m}.{proj}.lora_B.default.weight"),
                f32s(vec![16, 4], 0.02)?,
            );
        }
        state.insert(format!("{m}.k_proj.weight"), f32s(vec![16, 16], 0.125)?);
    }
    Ok(state)
}

/// Writes the adapter (and nothing of the base) into `out`; returns its tensor count.
pub fn run(out: &Path) -> Result<usize, Box<dyn Error>> {
    // lora_alpha is not in the tensors: it is the one thing inference must be told.
    let options = PeftSaveOptions::default()
        .infer(InferOptions::default().lora_alpha(16))
        .save_base(false);
    let report = save_pretrained(out, &training_state()?, &options)?;
    let (name, adapter) = &report.adapters[0];
    assert_eq!(name, "default");
    assert!(report.base.is_none());
    // Loaded back as peft would: rank from the tensors, alpha from the config.
    let loaded = Adapter::open(out)?;
    assert_eq!(loaded.rank_of("model.layers.0.self_attn.q_proj"), Some(4));
    Ok(adapter.weights.tensors)
}

fn main() -> Result<(), Box<dyn Error>> {
    let out = std::env::args_os().nth(1).map_or_else(
        || PathBuf::from("target/example/save_adapter_only"),
        PathBuf::from,
    );
    let tensors = run(&out)?;
    println!("{}: adapter `default`, {tensors} tensors", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn writes_only_the_adapter() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("adapter");
        // Two layers × (q_proj, v_proj) × (lora_A, lora_B).
        assert_eq!(super::run(&out).unwrap(), 8);
        let mut files: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(
            files,
            [
                "README.md",
                "adapter_config.json",
                "adapter_model.safetensors"
            ]
        );
    }
}
