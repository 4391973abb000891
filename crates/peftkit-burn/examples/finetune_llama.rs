//! Fine-tune LoRA on a Hugging Face Llama-family model in burn, and hand the result to peft.
//!
//! ```text
//! cargo run --release -p peftkit-burn --example finetune_llama -- --base DIR --out DIR --steps N
//!     [--adapter DIR] [--r R --alpha A --targets q_proj,v_proj,...] [--lr LR] [--save-merged DIR]
//! ```
//!
//! Loads the base (f32 for training), applies a fresh LoRA (or the peft adapter of
//! `--adapter`), trains `N` Adam steps on a deterministic next-token task (printing the loss of
//! each step; `--steps 0` trains nothing), then writes the adapter to `--out` as peft writes
//! it, `--out/probe.safetensors` (`input_ids` I64 `[1, T]` and the final model's `logits` F32
//! `[1, T, vocab]` on a fixed prompt), and with `--save-merged` the merged model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use clap::Parser;
use peftkit_burn::{
    apply_lora, load_hf, load_peft_adapter, save_merged_hf, save_peft_adapter, AppliedLora,
    LlamaConfig, LlamaForCausalLM, LoadOptions,
};
use peftkit_checkpoint::{write_file, Dtype, ModelConfig, Tensor as StTensor};
use peftkit_peft::{AdapterSaveOptions, LoraConfig, TargetModules};

#[derive(Parser)]
#[command(about = "LoRA fine-tuning of a Hugging Face Llama in burn, saved for peft")]
struct Args {
    /// The Hugging Face base model folder.
    #[arg(long)]
    base: PathBuf,
    /// Where the adapter and probe.safetensors go.
    #[arg(long)]
    out: PathBuf,
    /// Adam steps (0: train nothing).
    #[arg(long)]
    steps: usize,
    /// Start from this peft adapter instead of a fresh LoRA.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Rank of a fresh LoRA.
    #[arg(long, default_value_t = 8)]
    r: u64,
    /// alpha of a fresh LoRA.
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    /// Target modules of a fresh LoRA (comma-separated names, or all-linear).
    #[arg(long, default_value = "q_proj,v_proj")]
    targets: String,
    /// Learning rate.
    #[arg(long, default_value_t = 1e-2)]
    lr: f64,
    /// Also write the merged model (peftkit's merge, bit-identical to peft's) here.
    #[arg(long)]
    save_merged: Option<PathBuf>,
    /// Seed of the fresh factors.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// The fixed prompt of probe.safetensors.
const PROBE: [i64; 8] = [1, 5, 9, 3, 7, 2, 11, 4];

/// The training task: after token `t` comes `(3t + 1) mod vocab`. A batch of 4 sequences of 16.
fn batch(vocab: usize, device: &Device) -> (Tensor<2, Int>, Tensor<1, Int>) {
    let (rows, len) = (4usize, 16usize);
    let mut inputs = Vec::with_capacity(rows * len);
    let mut targets = Vec::with_capacity(rows * len);
    for row in 0..rows {
        let mut t = (row * 7 + 1) % vocab;
        for _ in 0..len {
            let next = (3 * t + 1) % vocab;
            inputs.push(t as i64);
            targets.push(next as i64);
            t = next;
        }
    }
    (
        Tensor::from_data(TensorData::new(inputs, [rows, len]), device),
        Tensor::from_data(TensorData::new(targets, [rows * len]), device),
    )
}

fn fresh_lora(args: &Args) -> Result<LoraConfig> {
    let targets = if args.targets.eq_ignore_ascii_case("all-linear") {
        TargetModules::Regex(args.targets.clone())
    } else {
        TargetModules::Names(args.targets.split(',').map(str::to_owned).collect())
    };
    Ok(LoraConfig {
        task_type: Some("CAUSAL_LM".into()),
        base_model_name_or_path: Some(args.base.display().to_string()),
        r: args.r,
        lora_alpha: serde_json::Number::from_f64(args.alpha).context("--alpha must be finite")?,
        target_modules: Some(targets),
        ..LoraConfig::default()
    })
}

fn train(
    mut model: LlamaForCausalLM,
    args: &Args,
    vocab: usize,
    device: &Device,
) -> LlamaForCausalLM {
    let mut optim = AdamConfig::new().init();
    let (inputs, targets) = batch(vocab, device);
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    for step in 0..args.steps {
        let [rows, len] = inputs.dims();
        let logits = model.forward(inputs.clone()).reshape([rows * len, vocab]);
        let loss = loss_fn.forward(logits, targets.clone());
        let value: f32 = loss.clone().into_scalar::<f32>();
        println!("step {step} loss {value:.6}");
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(args.lr, model, grads);
    }
    model
}

fn write_probe(model: &LlamaForCausalLM, out: &Path, device: &Device) -> Result<()> {
    let ids =
        Tensor::<2, Int>::from_data(TensorData::new(PROBE.to_vec(), [1, PROBE.len()]), device);
    let logits = model.forward(ids).into_data().convert::<f32>();
    let shape = logits.shape().to_vec();
    let ids_bytes: Vec<u8> = PROBE.iter().flat_map(|t| t.to_le_bytes()).collect();
    let ids = StTensor::from_bytes(Dtype::I64, vec![1, PROBE.len()], ids_bytes)?;
    let logits = StTensor::from_bytes(Dtype::F32, shape, logits.into_bytes().to_vec())?;
    let meta = BTreeMap::from([("format".to_owned(), "pt".to_owned())]);
    write_file(
        &out.join("probe.safetensors"),
        [("input_ids", &ids), ("logits", &logits)],
        &meta,
        &mut |_| {},
    )?;
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = Device::flex().autodiff();
    device.seed(args.seed);
    let config = ModelConfig::read(&args.base.join("config.json"))?;
    let llama = LlamaConfig::from_hf(&config)?;
    let model = LlamaForCausalLM::new(&llama, &device);
    let (model, _) = load_hf(model, &args.base, &LoadOptions::default())?;
    let (model, lora): (_, AppliedLora) = match &args.adapter {
        Some(dir) => load_peft_adapter(model, dir)?,
        None => apply_lora(model, &fresh_lora(&args)?)?,
    };
    if lora.modules.is_empty() {
        bail!("no module was adapted");
    }
    let model = train(model, &args, llama.vocab_size, &device).valid();
    save_peft_adapter(&model, &lora, &args.out, &AdapterSaveOptions::default())?;
    write_probe(&model, &args.out, &device.clone().inner())?;
    if let Some(merged) = &args.save_merged {
        save_merged_hf(&model, &lora, &args.base, merged)?;
    }
    println!("adapter: {}", args.out.display());
    Ok(())
}
