//! `peftkit gather`: the full checkpoint rebuilt from the rank folders of `peftkit split`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use peftkit::checkpoint::{self as ckpt, Checkpoint};
use peftkit::remap::GatherOptions;

use super::progress;

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
}

pub(crate) fn run(args: Args) -> Result<ExitCode> {
    let mut total = 0;
    for dir in &args.ranks {
        total += Checkpoint::open(dir)?.total_bytes();
    }
    let bar = progress(total);
    let on_bytes = bar.clone();
    let options = GatherOptions {
        durable: !args.no_fsync,
        progress: ckpt::Progress::new(move |n| on_bytes.inc(n)),
    };
    let save = peftkit::remap::gather(&args.ranks, &args.out, &options)?;
    bar.finish_and_clear();
    println!(
        "{}: {} tensors, {} bytes in {} file(s){} gathered from {} ranks",
        args.out.display(),
        save.tensors,
        save.total_size,
        save.weight_files.len(),
        save.index_file
            .as_ref()
            .map(|i| format!(" + {i}"))
            .unwrap_or_default(),
        args.ranks.len()
    );
    Ok(ExitCode::SUCCESS)
}
