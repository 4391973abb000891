//! `peftkit gather`: the full checkpoint rebuilt from the rank folders of `peftkit split`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use peftkit::remap::{open_rank, GatherOptions};

use super::{human, on_bytes, progress, summary};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The rank folders (rank0 .. rank{N-1} of one split, in any order).
    #[arg(required = true)]
    ranks: Vec<PathBuf>,
    /// Where to write the full checkpoint (created, or replaced atomically).
    #[arg(long)]
    out: PathBuf,
    /// Do not sync the output to disk before swapping it in (see `merge --no-fsync`).
    #[arg(long)]
    no_fsync: bool,
    /// Print a JSON report (the `save` object of `reshard --json`) instead of the summary line.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: Args) -> Result<ExitCode> {
    let total = || {
        let mut total = 0;
        for dir in &args.ranks {
            total += open_rank(dir)?.1.total_bytes();
        }
        Ok(total)
    };
    let bar = progress(total, !args.no_fsync)?;
    let options = GatherOptions {
        durable: !args.no_fsync,
        progress: on_bytes(&bar, !args.no_fsync).into(),
    };
    let save = peftkit::remap::gather(&args.ranks, &args.out, &options)?;
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&save)?);
        return Ok(ExitCode::SUCCESS);
    }
    summary(format!(
        "{}: {}, {} in {}{} gathered from {} ranks",
        args.out.display(),
        human::plural(save.tensors, "tensor", "tensors"),
        human::bytes(save.total_size),
        human::plural(save.weight_files.len(), "file", "files"),
        save.index_file
            .as_ref()
            .map(|i| format!(" + {i}"))
            .unwrap_or_default(),
        args.ranks.len()
    ));
    Ok(ExitCode::SUCCESS)
}
