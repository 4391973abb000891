//! `peftkit split`: a checkpoint cut into one folder per tensor-parallel rank.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use peftkit::checkpoint::{self as ckpt, Checkpoint};
use peftkit::remap::{SplitOptions, TpPlans};

use super::progress;

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
    /// Do not sync the output to disk before swapping it in (see `merge --no-fsync`).
    #[arg(long)]
    no_fsync: bool,
}

pub(crate) fn run(args: Args) -> Result<ExitCode> {
    let plan = match &args.tp_plan {
        Some(file) => Some(TpPlans::builtin()?.plan_from_file(file)?),
        None => None,
    };
    let total = Checkpoint::open(&args.dir)?.total_bytes();
    let bar = progress(total * args.world_size as u64);
    let on_bytes = bar.clone();
    let options = SplitOptions {
        world_size: args.world_size,
        plan,
        model_type: args.model_type,
        tables: args.tables,
        durable: !args.no_fsync,
        progress: ckpt::Progress::new(move |n| on_bytes.inc(n)),
    };
    let report = peftkit::remap::split(&args.dir, &args.out, &options)?;
    bar.finish_and_clear();
    println!(
        "{}: {} ranks by the plan of {}; {} tensors sharded, {} replicated; bytes per rank: {}",
        args.out.display(),
        report.ranks.len(),
        report.plan,
        report.sharded,
        report.replicated,
        report
            .rank_bytes
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(ExitCode::SUCCESS)
}
