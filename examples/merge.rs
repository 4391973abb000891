//! Merge a LoRA adapter into its base, streaming tensor by tensor: bit for bit what peft's
//! `merge_and_unload()` + `save_pretrained()` writes (on the CPU families peftkit has measured),
//! here on the tiny Llama and adapter shipped in `examples/data/`.
//!
//! ```text
//! cargo run --example merge [OUT_DIR]    # default target/example/merge
//! ```

use std::error::Error;
use std::path::{Path, PathBuf};

use peftkit::merge::{merge, AdapterInput, MergeJob, MergeSummary};

/// Where the example data is, wherever the example is run from.
fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/data")
        .join(name)
}

/// Merges `examples/data/tiny-llama-lora` into `examples/data/tiny-llama`, written to `out`.
pub fn run(out: &Path) -> Result<MergeSummary, Box<dyn Error>> {
    let job = MergeJob::new(
        data("tiny-llama"),
        // `DIR:WEIGHT` scales an adapter, as `peftkit merge --adapter DIR:0.5` does.
        vec![AdapterInput::parse(
            &data("tiny-llama-lora").to_string_lossy(),
        )],
        out,
    )
    // An example's output need not survive a power loss: skip the syncs.
    .durable(false);
    Ok(merge(&job)?)
}

fn main() -> Result<(), Box<dyn Error>> {
    let out = std::env::args_os()
        .nth(1)
        .map_or_else(|| PathBuf::from("target/example/merge"), PathBuf::from);
    let s = run(&out)?;
    println!(
        "{}: {} tensors merged, {} copied ({} numerics, {} order)",
        out.display(),
        s.tensors_merged,
        s.tensors_copied,
        s.numerics.mode,
        s.numerics.reduction_order
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn merges_the_example_adapter() {
        let tmp = tempfile::tempdir().unwrap();
        let s = super::run(&tmp.path().join("merged")).unwrap();
        // The adapter targets q_proj and v_proj of both layers.
        assert_eq!(s.tensors_merged, 4);
        assert!(tmp.path().join("merged/model.safetensors").is_file());
    }
}
