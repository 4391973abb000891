//! `peftkit inspect`: the files, tensors and totals of a checkpoint, and its adapters.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use peftkit::checkpoint::{CheckpointSummary, WeightsKind};
use peftkit::peft;

use super::{guess_kind, open_any};

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
    // summarize_path opens the path again without the variant, which finds no weights
    // in a folder holding only model.VARIANT.safetensors: use what was opened.
    let adapters = if variant.is_some() && guess_kind(&path) == WeightsKind::Model {
        peft::summarize_adapters(&ckpt.state_dict(), None)?
    } else {
        peft::summarize_path(&path)?
    };
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
        "{:width$}  {:6}  {:>16}  {:>12}  file",
        "name", "dtype", "shape", "bytes"
    );
    for t in &s.tensors {
        println!(
            "{:width$}  {:6}  {:>16}  {:>12}  {}",
            t.name,
            t.dtype,
            format!("{:?}", t.shape),
            t.bytes,
            t.file
        );
    }
    println!(
        "{} tensors, {} parameters, {} bytes in {} file(s){}",
        s.total_tensors,
        s.total_parameters,
        s.total_size,
        s.files.len(),
        s.index
            .as_ref()
            .map(|i| format!(" + {i}"))
            .unwrap_or_default()
    );
}

fn print_adapter(a: &peft::AdapterSummary) {
    let ranks: Vec<String> = a.ranks.iter().map(|(r, n)| format!("r={r} x{n}")).collect();
    println!(
        "adapter `{}`: {} ({:?}), {} modules, {}{}{}",
        a.name,
        a.method,
        a.layout,
        a.modules,
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
            "  scaling: {}",
            serde_json::to_string(s).unwrap_or_default()
        );
    }
    for n in &a.notes {
        println!("  note: {n}");
    }
}
