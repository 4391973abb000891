//! `peftkit diff`: two checkpoints or adapters compared; exit 0 identical, 1 different.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use peftkit::remap::{diff_checkpoints, CheckpointDiff, DiffLayout, DiffOptions};

use super::{human, summary};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The reference: a checkpoint folder, a .safetensors file or an adapter folder.
    a: PathBuf,
    /// What is compared with it.
    b: PathBuf,
    /// Print one JSON object instead of lines.
    #[arg(long)]
    json: bool,
    /// Variant of the weight files of both sides (model.VARIANT.safetensors).
    #[arg(long)]
    variant: Option<String>,
    /// Variant of B's weight files, when it differs from A's.
    #[arg(long)]
    variant_b: Option<String>,
    /// Names compared: auto (as stored when both sides hold the same names, else the
    /// transformers-v5 layout) | stored | transformers-v5.
    #[arg(
        long,
        default_value = "auto",
        value_name = "auto|stored|transformers-v5"
    )]
    layout: DiffLayout,
    /// Model type whose conversion table applies (default: each side's config.json).
    #[arg(long)]
    model_type: Option<String>,
    /// Extra conversion table files (JSON, see adapters-spec/conversions/README.md).
    #[arg(long = "table")]
    tables: Vec<PathBuf>,
}

pub(crate) fn run(args: Args) -> Result<ExitCode> {
    let Args {
        a,
        b,
        json,
        variant,
        variant_b,
        layout,
        model_type,
        tables,
    } = args;
    let mut options = DiffOptions::default().layout(layout).tables(tables);
    options.variant_b = variant_b.or_else(|| variant.clone());
    options.variant_a = variant;
    options.model_type = model_type;
    let d = diff_checkpoints(&a, &b, &options)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&d)?);
    } else {
        print_lines(&d);
        let differ = d.diff.missing.len()
            + d.diff.extra.len()
            + d.diff.dtype_differs.len()
            + d.diff.shape_differs.len()
            + d.diff.value_differs.len();
        summary(format!(
            "{} vs {} ({} names): {} identical, {} different",
            a.display(),
            b.display(),
            d.layout,
            human::plural(d.diff.identical, "tensor", "tensors"),
            human::count(differ as u64)
        ));
    }
    Ok(if d.diff.is_identical() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// One line per difference: `-` only in A, `+` only in B, `~` in both but different.
fn print_lines(d: &CheckpointDiff) {
    let d = &d.diff;
    for n in &d.missing {
        println!("- {n} (only in A)");
    }
    for n in &d.extra {
        println!("+ {n} (only in B)");
    }
    for t in &d.dtype_differs {
        println!("~ {}: dtype {} -> {}", t.name, t.a, t.b);
    }
    for t in &d.shape_differs {
        println!("~ {}: shape {:?} -> {:?}", t.name, t.a, t.b);
    }
    for v in &d.value_differs {
        let size = match (v.max_abs_diff, v.max_ulp) {
            (Some(abs), Some(ulp)) => format!(", max |a-b| {abs:.3e}, max {ulp} ulp"),
            _ => ", compared bit for bit".to_owned(),
        };
        let non_finite = match v.non_finite {
            0 => String::new(),
            n => format!(", {} with NaN or infinity", human::count(n)),
        };
        println!(
            "~ {} ({}): {} of {} elements differ{size}{non_finite}",
            v.name,
            v.dtype,
            human::count(v.differing),
            human::count(v.elements)
        );
    }
}
