//! `peftkit split`: a checkpoint cut into one folder per tensor-parallel rank.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use peftkit::checkpoint::{Checkpoint, WeightsKind};
use peftkit::remap::{SplitOptions, TpPlans};

use super::{human, on_bytes, progress, summary};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The checkpoint folder to read.
    dir: PathBuf,
    /// How many tensor-parallel ranks.
    #[arg(long)]
    world_size: usize,
    /// Where to write rank0 .. rank{N-1} (created, or replaced atomically).
    #[arg(long)]
    out: PathBuf,
    /// A plan file (JSON object of module names to styles, as transformers' model.tp_plan)
    /// instead of the plan transformers applies to the model type.
    #[arg(long)]
    tp_plan: Option<PathBuf>,
    /// Model type whose plan and conversion table apply (default: config.json's model_type).
    #[arg(long)]
    model_type: Option<String>,
    /// Extra conversion table files (JSON, see adapters-spec/conversions/README.md).
    #[arg(long = "table")]
    tables: Vec<PathBuf>,
    /// Variant of the input files (model.VARIANT.safetensors); the rank folders keep its
    /// file names.
    #[arg(long)]
    variant: Option<String>,
    /// Do not sync the output to disk before swapping it in (see `merge --no-fsync`).
    #[arg(long)]
    no_fsync: bool,
    /// Print a JSON report instead of the summary line.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(mut args: Args) -> Result<ExitCode> {
    args.dir = super::resolve(&args.dir)?;
    let plan = match &args.tp_plan {
        Some(file) => Some(TpPlans::builtin()?.plan_from_file(file)?),
        None => None,
    };
    let total = || {
        let ckpt = Checkpoint::open_kind(&args.dir, WeightsKind::Model, args.variant.as_deref())?;
        Ok(ckpt.total_bytes() * args.world_size as u64)
    };
    let bar = progress(total, !args.no_fsync)?;
    let options = SplitOptions {
        world_size: args.world_size,
        plan,
        model_type: args.model_type,
        tables: args.tables,
        variant: args.variant,
        durable: !args.no_fsync,
        progress: on_bytes(&bar, !args.no_fsync).into(),
    };
    let report = peftkit::remap::split(&args.dir, &args.out, &options)?;
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    summary(format!(
        "{}: {} ranks by the plan of {}; {} sharded, {} replicated; per rank: {}",
        args.out.display(),
        report.ranks.len(),
        report.plan,
        human::plural(report.sharded, "tensor", "tensors"),
        human::count(report.replicated as u64),
        report
            .rank_bytes
            .iter()
            .map(|&b| human::bytes(b))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    Ok(ExitCode::SUCCESS)
}
