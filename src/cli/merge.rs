//! `peftkit merge`: adapters merged into a base checkpoint, streaming tensor by tensor.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use peftkit::checkpoint::{self as ckpt, Checkpoint};
use peftkit::merge;

use super::{human, note, on_bytes, output_folder, progress, summary, ui};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The base checkpoint folder (safetensors or .bin), or a repo id (org/name[@revision])
    /// in the local Hugging Face cache. Default: the first adapter's
    /// base_model_name_or_path, when it is a folder or a cached repo.
    #[arg(long)]
    base: Option<PathBuf>,
    /// An adapter folder or cached repo id, optionally with a weight: DIR or DIR:WEIGHT.
    /// Repeat to merge several, in order.
    #[arg(long = "adapter", required = true)]
    adapters: Vec<String>,
    /// Output folder (created, or replaced atomically).
    #[arg(
        long,
        required_unless_present = "in_place",
        conflicts_with = "in_place"
    )]
    out: Option<PathBuf>,
    /// Write the merged model over the base folder itself. Still atomic: the old base stays
    /// until the merged folder is swapped in.
    #[arg(long)]
    in_place: bool,
    /// Reshard the output instead of keeping the base layout.
    #[arg(long)]
    max_shard_size: Option<String>,
    /// Round each delta to the base dtype first and refuse NaN/Inf results (peft's safe_merge).
    #[arg(long)]
    safe_merge: bool,
    /// Write NaN and infinite values as peft does, instead of refusing an adapter holding them
    /// or a merge producing them.
    #[arg(long)]
    allow_nonfinite: bool,
    /// Subtract the adapters instead of adding them (peft's unmerge).
    #[arg(long)]
    unmerge: bool,
    /// Do not sync the output to disk before swapping it in (faster; the swap stays atomic
    /// for readers, but a power loss may lose the new files). transformers never syncs.
    #[arg(long)]
    no_fsync: bool,
    /// `peft`: peft's arithmetic bit for bit. `exact`: every element correctly rounded
    /// from the exact result, the same bytes on every machine (LoRA and IA3 only).
    #[arg(long, default_value = "peft", value_name = "peft|exact")]
    numerics: merge::Numerics,
    /// For a quantized base (FP8, bitsandbytes 4-bit or int8): write every quantized weight
    /// unquantized and drop quantization_config, as transformers saves the model it
    /// dequantizes (FP8 and int8 in the model dtype, 4-bit weights in their own). Without it,
    /// merged weights are re-quantized into the base's format.
    #[arg(long, conflicts_with = "qlora_base")]
    dequantize: bool,
    /// A 16-bit base the adapter was trained on in 4 bits (QLoRA): merge into bitsandbytes'
    /// round trip dequantize(quantize(W)) of each adapted weight, the weights it was trained
    /// against.
    #[arg(long, value_name = "nf4|fp4")]
    qlora_base: Option<merge::Bnb4Type>,
    /// With --qlora-base: the training used double quantization
    /// (bnb_4bit_use_double_quant=True).
    #[arg(long, requires = "qlora_base")]
    qlora_double_quant: bool,
    /// Print a JSON summary.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: Args) -> Result<ExitCode> {
    let Args {
        base,
        adapters,
        out,
        in_place,
        max_shard_size,
        safe_merge,
        allow_nonfinite,
        unmerge,
        no_fsync,
        numerics,
        dequantize,
        qlora_base,
        qlora_double_quant,
        json,
    } = args;
    let qlora_base = qlora_base.map(|kind| merge::QloraBase {
        kind,
        double_quant: qlora_double_quant,
    });
    let adapters = adapters
        .iter()
        .map(|a| {
            let mut input = merge::AdapterInput::parse(a);
            input.dir = super::resolve(&input.dir)?;
            Ok(input)
        })
        .collect::<Result<Vec<_>>>()?;
    let base = match base {
        Some(b) => super::resolve(&b)?,
        None => base_of(&adapters[0].dir)?,
    };
    let out = output_folder(out, &base, in_place)?;
    let max_shard_size = max_shard_size
        .as_deref()
        .map(ckpt::parse_max_shard_size)
        .transpose()?;
    let bar = progress(|| Ok(Checkpoint::open(&base)?.total_bytes()), !no_fsync)?;
    let job = merge::MergeJob::new(base, adapters, out)
        .max_shard_size(max_shard_size)
        .safe_merge(safe_merge)
        .allow_nonfinite(allow_nonfinite)
        .in_place(in_place)
        .unmerge(unmerge)
        .durable(!no_fsync)
        .numerics(numerics)
        .dequantize(dequantize)
        .qlora_base(qlora_base)
        .progress(on_bytes(&bar, !no_fsync));
    let report = merge::merge(&job)?;
    bar.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        summary(format!(
            "{}: {} merged ({} numerics), {} replaced, {} copied{} in {:.2} s",
            job.out.display(),
            human::plural(report.tensors_merged, "tensor", "tensors"),
            report.numerics.mode,
            human::count(report.tensors_replaced as u64),
            human::count(report.tensors_copied as u64),
            if report.untied_embeddings {
                ", embeddings untied"
            } else {
                ""
            },
            report.seconds
        ));
        print_numerics(&report.numerics);
        if let Some(q) = &report.quantization {
            print_quantization(q);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The base an adapter names in `base_model_name_or_path`, resolved like `--base`.
fn base_of(adapter: &std::path::Path) -> Result<PathBuf> {
    let (config, _) = peftkit::peft::AdapterConfig::from_dir(adapter)?;
    let Some(name) = config.base_model_name_or_path() else {
        anyhow::bail!(
            "{}: adapter_config.json has no base_model_name_or_path: pass --base",
            adapter.display()
        );
    };
    super::resolve(std::path::Path::new(name)).with_context(|| {
        format!(
            "the base model `{name}` named by {}/adapter_config.json (pass --base to use another)",
            adapter.display()
        )
    })
}

/// Tells, on stderr, what the merge could not promise bit for bit.
/// Tells, on stderr, what the merge could not promise bit for bit (and, with `-v`, which
/// reduction order it used).
fn print_numerics(n: &merge::NumericsReport) {
    if !n.host_measured {
        note(format!(
            "this CPU family was never measured against peft; merged with the {} order",
            n.reduction_order
        ));
    } else if ui().verbose {
        note(format!(
            "merged with the {} reduction order, measured on this CPU family",
            n.reduction_order
        ));
    }
    if !n.unverified_tensors.is_empty() {
        note(format!(
            "{} tensor(s) agree with peft to {} ulp, not bit for bit (products outside the measured domain): {}",
            n.unverified_tensors.len(),
            n.unverified_bound_ulp,
            n.unverified_tensors.join(", ")
        ));
    }
}

/// Tells what the merge did to a quantized base, and each re-quantized weight's error where
/// it is measured (FP8, bitsandbytes int8).
fn print_quantization(q: &merge::QuantizationReport) {
    quantization_lines(q).into_iter().for_each(summary);
}

/// The lines of [`print_quantization`]: what was done, then the errors, the largest
/// [`SHOWN_ERRORS`] of them when there are more.
fn quantization_lines(q: &merge::QuantizationReport) -> Vec<String> {
    let dq = if q.double_quant {
        " with double quantization"
    } else {
        ""
    };
    let format = match q.method.as_str() {
        "fp8" => "fp8".to_owned(),
        method => format!("{method} {}{dq}", q.format),
    };
    let dtype = q.dtype.as_deref().unwrap_or("its dtype");
    let mut errors = measured(q);
    let head = match q.output.as_str() {
        "dequantized" => format!(
            "{format} base: {} weights dequantized to {dtype}; quantization_config dropped",
            q.tensors_dequantized
        ),
        "qlora-base" => format!(
            "QLoRA base: merged into the {format} round trip dequantize(quantize(W)) of {} weights",
            q.requantized.len()
        ),
        _ => format!(
            "{format} format kept: {} merged weight(s) re-quantized, the others copied{}",
            q.requantized.len(),
            match &q.dtype {
                Some(_) if errors.len() > SHOWN_ERRORS => format!(
                    " (max abs error vs the {dtype} merge, the {SHOWN_ERRORS} largest; --json lists each):"
                ),
                Some(dtype) => format!(" (max abs error vs the {dtype} merge):"),
                None => String::new(),
            }
        ),
    };
    if errors.len() > SHOWN_ERRORS {
        // A large model has hundreds: the worst say what the user needs to know (NaN first).
        errors.sort_by(|a, b| b.1.is_nan().cmp(&a.1.is_nan()).then(b.1.total_cmp(&a.1)));
        errors.truncate(SHOWN_ERRORS);
    }
    let errors = errors.into_iter().map(|(t, e)| format!("  {t}: {e:.3e}"));
    std::iter::once(head).chain(errors).collect()
}

/// Re-quantized weights listed one per line at most; `--json` has every one.
const SHOWN_ERRORS: usize = 8;

/// Each re-quantized weight's measured error, in the report's order.
fn measured(q: &merge::QuantizationReport) -> Vec<(&str, f64)> {
    let e = q.requantized.iter();
    e.filter_map(|t| Some((t.tensor.as_str(), t.max_abs_error?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(errors: &[f64]) -> merge::QuantizationReport {
        merge::QuantizationReport {
            method: "fp8".into(),
            output: "kept".into(),
            format: "e4m3".into(),
            double_quant: false,
            dtype: Some("bfloat16".into()),
            tensors_dequantized: 0,
            requantized: errors
                .iter()
                .enumerate()
                .map(|(i, &e)| merge::RequantizedTensor {
                    tensor: format!("w{i}"),
                    max_abs_error: Some(e),
                })
                .collect(),
        }
    }

    #[test]
    fn a_few_errors_are_listed_in_order() {
        let lines = quantization_lines(&report(&[3e-3, 1e-3]));
        assert_eq!(
            lines,
            [
                "fp8 format kept: 2 merged weight(s) re-quantized, the others copied (max abs error vs the bfloat16 merge):",
                "  w0: 3.000e-3",
                "  w1: 1.000e-3",
            ]
        );
    }

    #[test]
    fn many_errors_show_the_largest_nan_first() {
        let mut errors: Vec<f64> = (0..20).map(|i| f64::from(i) * 1e-4).collect();
        // A NaN of either sign (total_cmp alone would put a negative one last).
        errors[3] = -f64::NAN;
        let lines = quantization_lines(&report(&errors));
        assert_eq!(lines.len(), 1 + SHOWN_ERRORS);
        assert!(
            lines[0].contains("20 merged weight(s)")
                && lines[0].contains("the 8 largest; --json lists each")
        );
        assert_eq!(lines[1], "  w3: NaN");
        let shown: Vec<&str> = lines[2..]
            .iter()
            .map(|l| l.trim().split(':').next().unwrap())
            .collect();
        assert_eq!(shown, ["w19", "w18", "w17", "w16", "w15", "w14", "w13"]);
    }
}
