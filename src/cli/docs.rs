//! `peftkit completions SHELL` and `peftkit man`: generated from the clap definition at run
//! time, so they always describe the binary that prints them (no build step, nothing to keep
//! in sync by hand).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::CommandFactory;

use super::{summary, Cli};

#[derive(clap::Args)]
pub(crate) struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell.
    shell: clap_complete::Shell,
}

#[derive(clap::Args)]
pub(crate) struct ManArgs {
    /// Write peftkit.1 and one peftkit-VERB.1 per verb into this folder instead of printing
    /// peftkit.1.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Prints the completion script; e.g. `peftkit completions bash > ~/.local/share/bash-completion/completions/peftkit`.
pub(crate) fn completions(args: CompletionsArgs) -> Result<ExitCode> {
    let mut cmd = Cli::command();
    clap_complete::generate(args.shell, &mut cmd, "peftkit", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}

/// Prints `peftkit.1`, or writes every page into `--out`.
pub(crate) fn man(args: ManArgs) -> Result<ExitCode> {
    let cmd = Cli::command();
    match args.out {
        None => {
            let mut out = std::io::stdout().lock();
            clap_mangen::Man::new(cmd).render(&mut out)?;
            out.flush()?;
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(cmd, &dir)
                .with_context(|| format!("cannot write the man pages into {}", dir.display()))?;
            summary(format!("{}: man pages written", dir.display()));
        }
    }
    Ok(ExitCode::SUCCESS)
}
