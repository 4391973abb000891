//! `peftkit inspect`: the files, tensors and totals of a checkpoint, and its adapters.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use peftkit::checkpoint::CheckpointSummary;
use peftkit::peft;

use super::{human, open_any};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// A checkpoint folder, a .safetensors or .bin file, an adapter folder, or a repo id
    /// (org/name[@revision]) in the local Hugging Face cache.
    path: PathBuf,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Variant of the weight files (model.VARIANT.safetensors).
    #[arg(long)]
    variant: Option<String>,
}

pub(crate) fn run(args: Args) -> Result<ExitCode> {
    let Args {
        path,
        json,
        variant,
    } = args;
    let path = super::resolve(&path)?;
    let ckpt = open_any(&path, variant.as_deref())?;
    let summary = CheckpointSummary::of(&ckpt);
    let adapters = peft::summarize_path_variant(&path, variant.as_deref())?;
    if json {
        let mut v = serde_json::to_value(&summary)?;
        v["adapters"] = serde_json::to_value(&adapters)?;
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_summary(&summary);
        for a in &adapters {
            print_adapter(a);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_summary(s: &CheckpointSummary) {
    let width = s
        .tensors
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!(
        "{:width$}  {:6}  {:>16}  {:>10}  file",
        "name", "dtype", "shape", "size"
    );
    for t in &s.tensors {
        println!(
            "{:width$}  {:6}  {:>16}  {:>10}  {}",
            t.name,
            t.dtype,
            format!("{:?}", t.shape),
            human::bytes(t.bytes),
            t.file
        );
    }
    println!(
        "{}, {} parameters, {} in {}{}",
        human::plural(s.total_tensors, "tensor", "tensors"),
        human::count(s.total_parameters),
        human::bytes(s.total_size),
        human::plural(s.files.len(), "file", "files"),
        s.index
            .as_ref()
            .map(|i| format!(" + {i}"))
            .unwrap_or_default()
    );
}

fn print_adapter(a: &peft::AdapterSummary) {
    let ranks: Vec<String> = a.ranks.iter().map(|(r, n)| format!("r={r} x{n}")).collect();
    println!(
        "adapter `{}`: {} ({}), {}, {}{}{}",
        a.name,
        a.method,
        a.layout,
        human::plural(a.modules, "module", "modules"),
        ranks.join(", "),
        if a.use_dora { ", DoRA" } else { "" },
        if a.lora_bias { ", lora_bias" } else { "" }
    );
    if let Some(t) = &a.target_modules {
        println!("  targets: {}", t.join(", "));
    }
    if !a.modules_to_save.is_empty() {
        println!("  modules_to_save: {}", a.modules_to_save.join(", "));
    }
    for s in &a.scaling {
        println!(
            "  scaling: {} (alpha {} / {}r with r={}) on {}",
            s.scaling,
            s.alpha,
            if s.use_rslora { "sqrt " } else { "" },
            s.r,
            human::plural(s.modules, "module", "modules")
        );
    }
    for n in &a.notes {
        println!("  note: {n}");
    }
}
