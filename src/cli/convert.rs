//! `peftkit convert`: pickle weights (`pytorch_model.bin`, `adapter_model.bin`) to safetensors,
//! as transformers and peft save what they loaded.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use peftkit::checkpoint::{self as ckpt, SaveOptions};
use peftkit::remap::ReshardOptions;

use super::{guess_kind, open_any, progress};

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
}

pub(crate) fn run(args: Args) -> Result<ExitCode> {
    let Args {
        input,
        out,
        max_shard_size,
        dtype,
        no_fsync,
    } = args;
    let input = super::resolve(&input)?;
    let out = super::output_folder(Some(out), &input, false)?;
    let kind = guess_kind(&input);
    let bar = progress(open_any(&input, None)?.total_bytes());
    let on_bytes = bar.clone();
    let options = ReshardOptions {
        save: SaveOptions {
            max_shard_size: ckpt::parse_size(&max_shard_size)?,
            durable: !no_fsync,
            progress: ckpt::Progress::new(move |n| on_bytes.inc(n)),
            ..Default::default()
        },
        dtype,
        ..Default::default()
    };
    let report = peftkit::remap::convert(&input, &out, &options)?;
    bar.finish_and_clear();
    let save = &report.save;
    println!(
        "{}: {} {} tensors, {} bytes in {} file(s){}{}",
        out.display(),
        save.tensors,
        match kind {
            ckpt::WeightsKind::Adapter => "adapter",
            _ => "model",
        },
        save.total_size,
        save.weight_files.len(),
        save.index_file
            .as_ref()
            .map(|i| format!(" + {i}"))
            .unwrap_or_default(),
        match save.dropped_ties.len() {
            0 => String::new(),
            n => format!(", {n} tied tensor(s) written once"),
        }
    );
    Ok(ExitCode::SUCCESS)
}
