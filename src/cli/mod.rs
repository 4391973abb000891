//! The verbs of the `peftkit` binary, one module each. A verb's module holds its arguments and
//! a `run` that parses what clap cannot (sizes, adapter weights), calls the libraries and
//! prints; every rule lives in the library crates.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use peftkit::checkpoint::{self as ckpt, Checkpoint, SaveOptions, WeightsKind};

mod convert;
mod extract;
mod inspect;
mod merge;
mod remap;
mod reshard;
mod verify;

#[derive(Parser)]
#[command(
    name = "peftkit",
    version,
    about = "Hugging Face checkpoints and PEFT adapters, byte-identical to transformers and peft"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
}

// The doc comments of the variants are the verbs' `--help` summaries.
#[derive(Subcommand)]
enum Command {
    /// List the files, tensors and totals of a checkpoint or adapter.
    Inspect(inspect::Args),
    /// Check every file and index entry; exit 1 listing every problem found.
    Verify(verify::Args),
    /// Re-save a checkpoint with another shard size or variant, as
    /// `from_pretrained(DIR).save_pretrained(OUT, ...)` would (shards planned on the
    /// transformers-v5 model, for model types with conversion tables).
    Reshard(reshard::Args),
    /// Convert a checkpoint between the original on-disk layout and the transformers-v5
    /// layout (fused MoE experts, VLM prefixes, ...).
    Remap(remap::Args),
    /// Extract the adapter from a full PEFT model state dict and write it as peft's
    /// save_pretrained would (adapter_model.safetensors, adapter_config.json, README.md).
    Extract(extract::Args),
    /// Merge one or more adapters into a base checkpoint, as peft's merge_and_unload() +
    /// save_pretrained() would, streaming tensor by tensor.
    Merge(merge::Args),
    /// Convert pickle weights (pytorch_model.bin, sharded or not, or adapter_model.bin) to
    /// safetensors, as from_pretrained(IN).save_pretrained(OUT) and peft's save would,
    /// without running the pickle.
    Convert(convert::Args),
}

/// Runs one verb; the exit code is 0, or 1 for a check that found problems (errors are 2, in
/// `main`).
pub(crate) fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Inspect(args) => inspect::run(args),
        Command::Verify(args) => verify::run(args),
        Command::Reshard(args) => reshard::run(args),
        Command::Remap(args) => remap::run(args),
        Command::Extract(args) => extract::run(args),
        Command::Merge(args) => merge::run(args),
        Command::Convert(args) => convert::run(args),
    }
}

/// Installs the binary's signal handling: SIGINT and SIGTERM remove the staging folders of the
/// running save (the output folder stays as it was) and exit with 128 + the signal's number;
/// SIGXFSZ (a write past `ulimit -f`) is caught so that the write fails with EFBIG and the save
/// cleans up and reports, where its default action would kill the process mid-write.
pub(crate) fn handle_signals() {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGXFSZ};
    let _ = signal_hook::flag::register(
        SIGXFSZ,
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
    );
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else {
        return;
    };
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            for dir in ckpt::abandon_staging() {
                eprintln!(
                    "interrupted: removed the partial output {}; the output folder is as it was",
                    dir.display()
                );
            }
            std::process::exit(128 + signal);
        }
    });
}

/// The folder a verb writes: `--out`, or with `--in-place` its input. Removes the stale
/// staging folders of dead runs beside it first, and says so on stderr.
fn output_folder(out: Option<PathBuf>, input: &Path, in_place: bool) -> Result<PathBuf> {
    let out = match (out, in_place) {
        (Some(out), false) => out,
        (None, true) => input.to_owned(),
        // clap's `required_unless_present` / `conflicts_with` make these unreachable.
        _ => anyhow::bail!("give either --out or --in-place"),
    };
    for stale in ckpt::remove_stale_staging(&out)? {
        eprintln!("note: {stale}");
    }
    Ok(out)
}

/// A folder or file argument as given, or, when no such path exists and it reads
/// `org/name[@revision]`, that repo's snapshot in the local Hugging Face cache.
fn resolve(path: &Path) -> Result<PathBuf> {
    Ok(ckpt::resolve_model_path(&path.to_string_lossy())?)
}

/// A byte progress bar on stderr, hidden when stderr is not a terminal (scripts and tests see
/// only the result lines).
fn progress(total: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
    {
        bar.set_style(style);
    }
    bar
}

/// The save options of a re-save of the checkpoint in `dir` (its `input_variant` files) with
/// shards of at most `max_shard_size` into `variant` files, reporting to a progress bar over
/// the input's bytes, which is returned too. `remap` and `reshard` share them.
fn resave_options(
    dir: &Path,
    input_variant: Option<&str>,
    max_shard_size: &str,
    variant: Option<String>,
) -> Result<(SaveOptions, ProgressBar)> {
    let max_shard_size = ckpt::parse_size(max_shard_size)?;
    let total = Checkpoint::open_kind(dir, WeightsKind::Model, input_variant)?.total_bytes();
    let bar = progress(total);
    let on_bytes = bar.clone();
    let options = SaveOptions {
        max_shard_size,
        variant,
        progress: ckpt::Progress::new(move |n| on_bytes.inc(n)),
        ..Default::default()
    };
    Ok((options, bar))
}

/// A `--dtype` value: bf16, f16 or f32.
fn parse_dtype(text: &str) -> std::result::Result<peftkit::Dtype, String> {
    ckpt::parse_cast_dtype(text)
        .ok_or_else(|| format!("`{text}` is not a dtype peftkit casts to: use bf16, f16 or f32"))
}

/// An adapter folder (or file) by its file names, a model checkpoint otherwise.
fn guess_kind(path: &Path) -> WeightsKind {
    let adapter_file = path
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("adapter_model."));
    if adapter_file
        || path.join("adapter_model.safetensors").is_file()
        || path.join("adapter_model.bin").is_file()
        || path.join("adapter_config.json").is_file()
    {
        WeightsKind::Adapter
    } else {
        WeightsKind::Model
    }
}

fn open_any(path: &Path, variant: Option<&str>) -> Result<Checkpoint> {
    Checkpoint::open_kind(path, guess_kind(path), variant)
        .with_context(|| format!("cannot open {}", path.display()))
}
