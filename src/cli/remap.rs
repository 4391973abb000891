//! `peftkit remap`: a checkpoint converted between the original on-disk layout and the
//! transformers-v5 layout; a legacy per-expert adapter fused to the v5 layout.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use peftkit::peft;
use peftkit::remap::{RemapOptions, Revert, TensorLayout};

use super::{human, output_folder, resave_options, summary};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The checkpoint folder to read, or a cached repo id (org/name[@revision]).
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
    /// Target layout: original | transformers-v5.
    #[arg(long)]
    to: TensorLayout,
    /// Model type whose table applies (default: config.json's model_type).
    #[arg(long)]
    model_type: Option<String>,
    /// Largest shard: a number of bytes (10000) or a decimal size (5GB, 500MB, 1.5 MB, 20KB).
    #[arg(long, default_value = "50GB")]
    max_shard_size: String,
    /// Variant of the output files.
    #[arg(long)]
    variant: Option<String>,
    /// Variant of the input files.
    #[arg(long)]
    input_variant: Option<String>,
    /// Also restore renames transformers applies only when it saw them at load time
    /// (Llava's vision_tower.vision_model. level, LayerNorm gamma/beta).
    #[arg(long)]
    restore_load_only: bool,
    /// Extra conversion table files (JSON, see adapters-spec/conversions/README.md).
    #[arg(long = "table")]
    tables: Vec<PathBuf>,
    /// For a legacy per-expert adapter: a base checkpoint whose config.json gives the
    /// model type.
    #[arg(long)]
    base: Option<PathBuf>,
    /// For a legacy adapter: drop LoRA pairs on modules that are not fused experts (peft
    /// drops them silently; peftkit refuses unless asked).
    #[arg(long)]
    drop_untargeted: bool,
    /// For a legacy adapter: set lora_dropout to 0 (peft cannot load expert LoRA with
    /// dropout).
    #[arg(long)]
    zero_dropout: bool,
    /// Print a JSON report instead of the summary line.
    #[arg(long)]
    json: bool,
    /// Do not sync the output to disk before swapping it in (see `merge --no-fsync`).
    #[arg(long)]
    no_fsync: bool,
}

pub(crate) fn run(mut args: Args) -> Result<ExitCode> {
    args.dir = super::resolve(&args.dir)?;
    if let Some(b) = &args.base {
        args.base = Some(super::resolve(b)?);
    }
    if args.dir.join("adapter_config.json").is_file() {
        return legacy_adapter(&args);
    }
    let Args {
        dir,
        out,
        to,
        model_type,
        max_shard_size,
        variant,
        input_variant,
        restore_load_only,
        tables,
        json,
        no_fsync,
        in_place,
        ..
    } = args;
    let out = output_folder(out, &dir, in_place)?;
    let (save, bar) = resave_options(
        &dir,
        input_variant.as_deref(),
        &max_shard_size,
        variant,
        !no_fsync,
    )?;
    let options = RemapOptions {
        save,
        src_variant: input_variant,
        revert: if restore_load_only {
            Revert::AllTableRules
        } else {
            Revert::FromConfig
        },
        tables,
        in_place,
    };
    let report = peftkit::remap::remap(&dir, &out, to, model_type.as_deref(), &options)?;
    bar.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    summary(format!(
        "{}: model_type {}, table {}, {} converted, {}",
        out.display(),
        report.model_type,
        report
            .table
            .as_deref()
            .unwrap_or("none (legacy renames only)"),
        human::plural(report.tensors_converted, "tensor", "tensors"),
        human::plural(report.save.weight_files.len(), "file", "files")
    ));
    Ok(ExitCode::SUCCESS)
}

/// An adapter folder: peft saves adapters in the v5 layout only, so the one conversion is a
/// legacy per-expert adapter fused as peft fuses it on load.
fn legacy_adapter(args: &Args) -> Result<ExitCode> {
    use peft::{convert_legacy_adapter_dir_with, model_type_from_base, ConvertOptions, Untargeted};
    let Args {
        dir,
        out,
        to,
        model_type,
        base,
        drop_untargeted,
        zero_dropout,
        json,
        in_place,
        ..
    } = args;
    if *in_place {
        anyhow::bail!(
            "{} is an adapter: --in-place converts checkpoints only; give --out for the fused adapter",
            dir.display()
        );
    }
    let out = output_folder(out.clone(), dir, false)?;
    if *to != TensorLayout::TransformersV5 {
        anyhow::bail!(
            "{} is an adapter: adapters are only converted to the transformers-v5 layout (peft saves them that way)",
            dir.display()
        );
    }
    let model_type = match (model_type, base) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(b)) => Some(model_type_from_base(b)?),
        _ => None,
    };
    let options = ConvertOptions {
        untargeted: if *drop_untargeted {
            Untargeted::Drop
        } else {
            Untargeted::Error
        },
        zero_dropout: *zero_dropout,
    };
    let r = convert_legacy_adapter_dir_with(dir, &out, model_type.as_deref(), &options)?;
    if *json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    summary(format!(
        "{}: legacy {} adapter fused with table {}: {} ({} fused), {} dropped",
        out.display(),
        r.model_type,
        r.table,
        human::plural(r.tensors, "tensor", "tensors"),
        human::count(r.fused_tensors as u64),
        human::count(r.dropped.len() as u64)
    ));
    Ok(ExitCode::SUCCESS)
}
