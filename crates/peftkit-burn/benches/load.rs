//! Benchmark: a bf16 Hugging Face Llama checkpoint into a burn `LlamaForCausalLM` in f32, by
//! `load_hf` (peftkit-checkpoint + burn-store's applier) or by burn-store's
//! `SafetensorsStore` alone (single-file checkpoints only; no sharded index).
//!
//! `save` loads with `load_hf`, then times `save_hf` of the f32 module back to bf16 into a
//! temporary folder beside DIR (not synced: the write is not what is measured).
//!
//! Run: `cargo bench -p peftkit-burn --bench load -- DIR [peftkit|store|save]`. Prints the wall
//! time and this process's user and system CPU time of the step, and the process's peak RSS
//! (VmHWM); run it under `/usr/bin/time -v` to compare with `transformers.from_pretrained`
//! (see docs/benchmarks.md). Nothing here asserts a time.

use std::path::PathBuf;
use std::time::Instant;

use burn::store::{
    FloatCastAdapter, ModuleAdapter, ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore,
};
use burn::tensor::{DType, Device};
use peftkit_burn::{load_hf, save_hf, HfSaveOptions, LlamaConfig, LlamaForCausalLM, LoadOptions};
use peftkit_checkpoint::ModelConfig;

fn peak_rss_mb() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        / 1024
}

/// This process's user and system CPU time so far, in seconds (`/proc/self/stat`, in ticks
/// of 1/100 s).
fn cpu_secs() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit(')').next().unwrap_or("");
    let field = |i: usize| {
        after_name
            .split_whitespace()
            .nth(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 100.0
    };
    // Fields 14 and 15 of the line; the 12th and 13th after the command's closing paren.
    (field(11), field(12))
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
    let (start, cpu) = (Instant::now(), cpu_secs());
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
    let (mut secs, mut now) = (start.elapsed().as_secs_f64(), cpu_secs());
    let mut spent = (now.0 - cpu.0, now.1 - cpu.1);
    assert_eq!(model.model.embed_tokens.weight.val().dtype(), DType::F32);
    let mut step = "load";
    if mode == "save" {
        let parent = dir.canonicalize().unwrap();
        let out = tempfile::tempdir_in(parent.parent().unwrap()).unwrap();
        let mut options = HfSaveOptions::from_dir(&dir).unwrap();
        options.save.durable = false;
        let (start, cpu) = (Instant::now(), now);
        save_hf(&model, &out.path().join("saved"), &options).unwrap();
        (secs, now) = (start.elapsed().as_secs_f64(), cpu_secs());
        spent = (now.0 - cpu.0, now.1 - cpu.1);
        step = "save";
    }
    println!(
        "{mode}: {step} {secs:.2} s, user {:.2} s, sys {:.2} s, peak RSS {} MB",
        spent.0,
        spent.1,
        peak_rss_mb()
    );
}
