//! `peftkit convert`: pickle weights (`pytorch_model.bin`, `adapter_model.bin`) to safetensors,
//! as transformers and peft save what they loaded.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use peftkit::checkpoint::{self as ckpt, SaveOptions};
use peftkit::remap::ReshardOptions;

use super::{guess_kind, human, on_bytes, open_any, progress, summary};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// A checkpoint or adapter folder (pytorch_model.bin, its sharded index, or
    /// adapter_model.bin), a .bin file, or a cached repo id (org/name[@revision]).
    input: PathBuf,
    /// Where to write (created, or replaced atomically).
    #[arg(long)]
    out: PathBuf,
    /// Largest shard of a model checkpoint: bytes or a decimal size such as 5GB, 500MB
    /// (adapters are one file, as peft writes them).
    #[arg(long, default_value = "50GB")]
    max_shard_size: String,
    /// Cast floating tensors (torch's rounding): bf16, f16 or f32. config.json's dtype
    /// follows. `--dtype f32` is what peft's re-save of a float16 adapter writes.
    #[arg(long, value_parser = super::parse_dtype)]
    dtype: Option<peftkit::Dtype>,
    /// Do not sync the output to disk before swapping it in (see `merge --no-fsync`).
    #[arg(long)]
    no_fsync: bool,
    /// Print a JSON report (as `reshard --json`) instead of the summary line.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: Args) -> Result<ExitCode> {
    let Args {
        input,
        out,
        max_shard_size,
        dtype,
        no_fsync,
        json,
    } = args;
    let input = super::resolve(&input)?;
    let out = super::output_folder(Some(out), &input, false)?;
    let kind = guess_kind(&input);
    let bar = progress(|| Ok(open_any(&input, None)?.total_bytes()), !no_fsync)?;
    let save = SaveOptions::default()
        .max_shard_size(ckpt::parse_max_shard_size(&max_shard_size)?)
        .durable(!no_fsync)
        .progress(on_bytes(&bar, !no_fsync));
    let options = ReshardOptions {
        dtype,
        ..ReshardOptions::default().save(save)
    };
    let report = peftkit::remap::convert(&input, &out, &options)?;
    bar.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    let save = &report.save;
    summary(format!(
        "{}: {} {}, {} in {}{}{}",
        out.display(),
        human::count(save.tensors as u64),
        match kind {
            ckpt::WeightsKind::Adapter => "adapter tensors",
            _ => "model tensors",
        },
        human::bytes(save.total_size),
        human::plural(save.weight_files.len(), "file", "files"),
        save.index_file
            .as_ref()
            .map(|i| format!(" + {i}"))
            .unwrap_or_default(),
        match save.dropped_ties.len() {
            0 => String::new(),
            n => format!(", {n} tied tensor(s) written once"),
        }
    ));
    Ok(ExitCode::SUCCESS)
}
