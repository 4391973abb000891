//! `peftkit verify`: every file and index entry checked; exit 1 listing every problem.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use peftkit::checkpoint as ckpt;

use super::guess_kind;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// A checkpoint folder, a .safetensors or .bin file, or a cached repo id
    /// (org/name[@revision]).
    path: PathBuf,
    /// Variant of the weight files.
    #[arg(long)]
    variant: Option<String>,
    /// Print every problem as JSON (schema in docs/cli.md) instead of one line each.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: Args) -> Result<ExitCode> {
    let Args {
        path,
        variant,
        json,
    } = args;
    let path = super::resolve(&path)?;
    let kind = guess_kind(&path);
    let mut problems = peftkit::peft::AdapterConfig::problems_in(&path);
    problems.extend(ckpt::verify_problems(&path, kind, variant.as_deref())?);
    if json {
        let doc = serde_json::json!({
            "path": path,
            "ok": problems.is_empty(),
            "problems": problems,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else if problems.is_empty() {
        println!("{}: ok", path.display());
    } else {
        for p in &problems {
            println!("{p}");
        }
        eprintln!("{}: {} problem(s)", path.display(), problems.len());
    }
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
