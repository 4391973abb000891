//! `peftkit reshard`: a checkpoint re-saved with another shard size or variant.

use std::path::PathBuf;
use std::process::ExitCode;

use super::{output_folder, resave_options};
use anyhow::Result;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The checkpoint folder to read (safetensors or .bin), or a cached repo id
    /// (org/name[@revision]).
    dir: PathBuf,
    /// Where to write (created, or replaced atomically).
    #[arg(
        long,
        required_unless_present = "in_place",
        conflicts_with = "in_place"
    )]
    out: Option<PathBuf>,
    /// Write over the input folder itself. Still atomic: the old content stays until the new
    /// folder is swapped in.
    #[arg(long)]
    in_place: bool,
    /// Largest shard: bytes or a decimal size such as 5GB, 500MB, 20KB.
    #[arg(long, default_value = "50GB")]
    max_shard_size: String,
    /// Variant of the output files (model.VARIANT.safetensors).
    #[arg(long)]
    variant: Option<String>,
    /// Variant of the input files.
    #[arg(long)]
    input_variant: Option<String>,
    /// Do not sync the output to disk before swapping it in (see `merge --no-fsync`).
    #[arg(long)]
    no_fsync: bool,
    /// Model type whose conversion table applies (default: config.json's model_type).
    #[arg(long)]
    model_type: Option<String>,
    /// Extra conversion table files (JSON, see adapters-spec/conversions/README.md).
    #[arg(long = "table")]
    tables: Vec<PathBuf>,
    /// Cast floating tensors (torch's rounding), as from_pretrained(dtype=...) does:
    /// bf16, f16 or f32. config.json's dtype follows.
    #[arg(long, value_parser = super::parse_dtype)]
    dtype: Option<peftkit::Dtype>,
}

pub(crate) fn run(args: Args) -> Result<ExitCode> {
    let Args {
        dir,
        out,
        max_shard_size,
        variant,
        input_variant,
        no_fsync,
        model_type,
        tables,
        in_place,
        dtype,
    } = args;
    let dir = super::resolve(&dir)?;
    let out = output_folder(out, &dir, in_place)?;
    let (mut save, bar) = resave_options(&dir, input_variant.as_deref(), &max_shard_size, variant)?;
    save.durable = !no_fsync;
    let options = peftkit::remap::ReshardOptions {
        save,
        src_variant: input_variant,
        model_type,
        tables,
        in_place,
        dtype,
    };
    let report = peftkit::remap::reshard(&dir, &out, &options)?;
    bar.finish_and_clear();
    let save = &report.save;
    println!(
        "{}: {} tensors, {} bytes in {} file(s){}{}",
        out.display(),
        save.tensors,
        save.total_size,
        save.weight_files.len(),
        save.index_file
            .as_ref()
            .map(|i| format!(" + {i}"))
            .unwrap_or_default(),
        match report.rules_used.len() {
            0 => String::new(),
            n => format!(
                ", planned on the transformers-v5 model ({n} rule(s) of table {})",
                report.table.as_deref().unwrap_or("legacy")
            ),
        }
    );
    Ok(ExitCode::SUCCESS)
}
