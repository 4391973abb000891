//! The verbs of the `peftkit` binary, one module each. A verb's module holds its arguments and
//! a `run` that parses what clap cannot (sizes, adapter weights), calls the libraries and
//! prints; every rule lives in the library crates.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::OnceLock;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use peftkit::checkpoint::{self as ckpt, Checkpoint, SaveOptions, WeightsKind};

mod convert;
mod diff;
mod docs;
mod extract;
mod gather;
mod human;
mod inspect;
mod merge;
mod remap;
mod reshard;
mod split;
mod verify;

/// `0.1.0 (commit abcdef123456)` when built from a git checkout, `0.1.0` otherwise (build.rs).
const VERSION: &str = env!("PEFTKIT_VERSION");

#[derive(Parser)]
#[command(
    name = "peftkit",
    version = VERSION,
    about = "Hugging Face checkpoints and PEFT adapters, byte-identical to transformers and peft"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    ui: Ui,
}

/// How much the binary tells on stderr, for every verb.
#[derive(clap::Args, Clone, Copy, Default)]
pub(crate) struct Ui {
    /// Print only results and errors: no progress bar, notes or summary lines of writing verbs.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// Tell more where a verb has more to tell (merge: the reduction order it used).
    #[arg(short, long, global = true)]
    verbose: bool,
    /// No progress bar (it is also hidden when stderr is not a terminal).
    #[arg(long, global = true)]
    no_progress: bool,
}

static UI: OnceLock<Ui> = OnceLock::new();

/// The verbosity flags of this run.
fn ui() -> Ui {
    UI.get().copied().unwrap_or_default()
}

/// Prints a note on stderr unless `-q`.
fn note(text: impl std::fmt::Display) {
    if !ui().quiet {
        eprintln!("note: {text}");
    }
}

/// Prints a warning on stderr unless `-q`.
fn warning(text: impl std::fmt::Display) {
    if !ui().quiet {
        eprintln!("warning: {text}");
    }
}

/// Prints the closing summary line of a writing verb on stdout unless `-q`.
fn summary(text: impl std::fmt::Display) {
    if !ui().quiet {
        println!("{text}");
    }
}

// The doc comments of the variants are the verbs' `--help` summaries.
#[derive(Subcommand)]
enum Command {
    /// List the files, tensors and totals of a checkpoint or adapter.
    Inspect(inspect::Args),
    /// Check every file and index entry; exit 1 listing every problem found.
    Verify(verify::Args),
    /// Compare two checkpoints or adapters: names, dtypes, shapes and values; exit 0 when
    /// identical, 1 when they differ.
    Diff(diff::Args),
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
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(docs::CompletionsArgs),
    /// Print the man page (roff), or write one page per verb into a folder.
    Man(docs::ManArgs),
    /// Cut a checkpoint into one folder per tensor-parallel rank (rank0 .. rankN-1), each
    /// holding that rank's slices by transformers' tp plan for the model type.
    Split(split::Args),
    /// Rebuild the full checkpoint from the rank folders of `peftkit split`, byte for byte.
    Gather(gather::Args),
}

/// Runs one verb; the exit code is 0, or 1 for a check that found problems or a diff that
/// found differences (errors are 2, in `main`).
pub(crate) fn run(cli: Cli) -> Result<ExitCode> {
    let _ = UI.set(cli.ui);
    match cli.command {
        Command::Inspect(args) => inspect::run(args),
        Command::Verify(args) => verify::run(args),
        Command::Diff(args) => diff::run(args),
        Command::Reshard(args) => reshard::run(args),
        Command::Remap(args) => remap::run(args),
        Command::Extract(args) => extract::run(args),
        Command::Merge(args) => merge::run(args),
        Command::Completions(args) => docs::completions(args),
        Command::Man(args) => docs::man(args),
        Command::Convert(args) => convert::run(args),
        Command::Split(args) => split::run(args),
        Command::Gather(args) => gather::run(args),
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

/// A byte progress bar on stderr over `total()` bytes of tensor data, hidden with `-q`,
/// `--no-progress` or when stderr is not a terminal (scripts and tests see only the result
/// lines; `total`, which opens the input a first time, is then not called). Once every byte
/// is written, it says what the save still does: `durable` saves sync every file before the
/// swap, which can take as long as the writing.
fn progress(total: impl FnOnce() -> Result<u64>, durable: bool) -> Result<ProgressBar> {
    let ui = ui();
    if ui.quiet || ui.no_progress || !std::io::stderr().is_terminal() {
        return Ok(ProgressBar::hidden());
    }
    let bar = ProgressBar::new(total()?);
    if let Ok(style) = ProgressStyle::with_template(
        "{bar:40} {decimal_bytes}/{decimal_total_bytes} {decimal_bytes_per_sec} eta {eta} {msg}",
    ) {
        bar.set_style(style);
    }
    bar.set_message(if durable {
        "writing"
    } else {
        "writing (no sync)"
    });
    Ok(bar)
}

/// The progress callback of a save reporting to `bar`: it counts bytes and, once all are
/// written, tells that the save is syncing (or finishing) rather than stalled.
fn on_bytes(bar: &ProgressBar, durable: bool) -> impl Fn(u64) + Send + Sync + 'static {
    let bar = bar.clone();
    move |n| {
        bar.inc(n);
        if bar.length().is_some_and(|len| bar.position() >= len) {
            bar.set_message(if durable {
                "syncing to disk"
            } else {
                "finishing"
            });
        }
    }
}

/// The save options of a re-save of the checkpoint in `dir` (its `input_variant` files) with
/// shards of at most `max_shard_size` into `variant` files, reporting to a progress bar over
/// the input's bytes, which is returned too (`durable`: synced before the swap). `remap` and
/// `reshard` share them.
fn resave_options(
    dir: &Path,
    input_variant: Option<&str>,
    max_shard_size: &str,
    variant: Option<String>,
    durable: bool,
) -> Result<(SaveOptions, ProgressBar)> {
    let max_shard_size = ckpt::parse_max_shard_size(max_shard_size)?;
    let total = || Ok(Checkpoint::open_kind(dir, WeightsKind::Model, input_variant)?.total_bytes());
    let bar = progress(total, durable)?;
    let mut options = SaveOptions::default()
        .max_shard_size(max_shard_size)
        .durable(durable)
        .progress(on_bytes(&bar, durable));
    options.variant = variant;
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

#[cfg(test)]
mod tests {
    use indicatif::{ProgressBar, ProgressDrawTarget};

    #[test]
    fn the_bar_says_it_syncs_once_every_byte_is_written() {
        for (durable, last) in [(true, "syncing to disk"), (false, "finishing")] {
            let bar = ProgressBar::with_draw_target(Some(10), ProgressDrawTarget::hidden());
            bar.set_message("writing");
            let report = super::on_bytes(&bar, durable);
            report(6);
            assert_eq!((bar.position(), bar.message().as_str()), (6, "writing"));
            report(4);
            assert_eq!((bar.position(), bar.message().as_str()), (10, last));
        }
    }
}
