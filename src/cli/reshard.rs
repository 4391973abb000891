//! `peftkit reshard`: a checkpoint re-saved with another shard size or variant.

use std::path::PathBuf;
use std::process::ExitCode;

use super::{human, output_folder, resave_options, summary};
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
    /// Largest shard: a number of bytes (10000) or a decimal size (5GB, 500MB, 1.5 MB, 20KB).
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
    /// Print a JSON report instead of the summary line.
    #[arg(long)]
    json: bool,
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
        json,
    } = args;
    let dir = super::resolve(&dir)?;
    let out = output_folder(out, &dir, in_place)?;
    let (save, bar) = resave_options(
        &dir,
        input_variant.as_deref(),
        &max_shard_size,
        variant,
        !no_fsync,
    )?;
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
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    let save = &report.save;
    summary(format!(
        "{}: {}, {} in {}{}{}",
        out.display(),
        human::plural(save.tensors, "tensor", "tensors"),
        human::bytes(save.total_size),
        human::plural(save.weight_files.len(), "file", "files"),
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
    ));
    Ok(ExitCode::SUCCESS)
}
