//! Benchmark: a bf16 Hugging Face Llama checkpoint into a burn `LlamaForCausalLM` in f32, by
//! `load_hf` (peftkit-checkpoint + burn-store's applier) or by burn-store's
//! `SafetensorsStore` alone (single-file checkpoints only; no sharded index).
//!
//! Run: `cargo bench -p peftkit-burn --bench load -- DIR [peftkit|store]`. Prints the wall time
//! of the load and the process's peak RSS (VmHWM); run it under `/usr/bin/time -v` to compare
//! with `transformers.from_pretrained` (see docs/benchmarks.md). Nothing here asserts a time.

use std::path::PathBuf;
use std::time::Instant;

use burn::store::{
    FloatCastAdapter, ModuleAdapter, ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore,
};
use burn::tensor::{DType, Device};
use peftkit_burn::{load_hf, LlamaConfig, LlamaForCausalLM, LoadOptions};
use peftkit_checkpoint::ModelConfig;

fn peak_rss_mb() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        / 1024
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let Some(dir) = args.first().map(PathBuf::from) else {
        eprintln!("usage: load DIR [peftkit|store]");
        return;
    };
    let mode = args.get(1).map(String::as_str).unwrap_or("peftkit");
    let device = Device::flex();
    let config = ModelConfig::read(&dir.join("config.json")).unwrap();
    let model = LlamaForCausalLM::new(&LlamaConfig::from_hf(&config).unwrap(), &device);
    let start = Instant::now();
    let model = match mode {
        "store" => {
            let adapter = PyTorchToBurnAdapter.chain(FloatCastAdapter::to(DType::F32));
            let mut store = SafetensorsStore::from_file(dir.join("model.safetensors"))
                .with_from_adapter(adapter);
            let mut model = model;
            let result = model.load_from(&mut store).unwrap();
            assert!(
                result.errors.is_empty() && result.missing.is_empty(),
                "{:?}",
                result.errors
            );
            model
        }
        _ => load_hf(model, &dir, &LoadOptions::default()).unwrap().0,
    };
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(model.model.embed_tokens.weight.val().dtype(), DType::F32);
    println!("{mode}: load {secs:.2} s, peak RSS {} MB", peak_rss_mb());
}
