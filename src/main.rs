//! The `peftkit` command line: parses arguments and calls the libraries.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use peftkit::checkpoint::{
    self as ckpt, inspect::CheckpointSummary, Checkpoint, SaveOptions, WeightsKind,
};
use peftkit::peft;

#[derive(Parser)]
#[command(
    name = "peftkit",
    version,
    about = "Hugging Face checkpoints and PEFT adapters, byte-identical to transformers and peft"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the files, tensors and totals of a checkpoint or adapter.
    Inspect {
        /// A checkpoint folder, a .safetensors file, or an adapter folder.
        path: PathBuf,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Variant of the weight files (model.VARIANT.safetensors).
        #[arg(long)]
        variant: Option<String>,
    },
    /// Check every file and index entry; exit 1 listing every problem found.
    Verify {
        /// A checkpoint folder or a .safetensors file.
        path: PathBuf,
        /// Variant of the weight files.
        #[arg(long)]
        variant: Option<String>,
    },
    /// Re-save a checkpoint with another shard size or variant, as
    /// `from_pretrained(DIR).save_pretrained(OUT, ...)` would (shards planned on the
    /// transformers-v5 model, for model types with conversion tables).
    Reshard {
        /// The checkpoint folder to read.
        dir: PathBuf,
        /// Where to write (created, or replaced atomically).
        #[arg(long)]
        out: PathBuf,
        /// Largest shard: bytes or a decimal size such as 5GB, 500MB, 20KB.
        #[arg(long, default_value = "50GB")]
        max_shard_size: String,
        /// Variant of the output files (model.VARIANT.safetensors).
        #[arg(long)]
        variant: Option<String>,
        /// Variant of the input files.
        #[arg(long)]
        input_variant: Option<String>,
        /// Do not sync the output to disk before swapping it in (see `merge --no-fsync`).
        #[arg(long)]
        no_fsync: bool,
        /// Model type whose conversion table applies (default: config.json's model_type).
        #[arg(long)]
        model_type: Option<String>,
        /// Extra conversion table files (JSON, see adapters-spec/conversions/README.md).
        #[arg(long = "table")]
        tables: Vec<PathBuf>,
    },
    /// Convert a checkpoint between the original on-disk layout and the transformers-v5
    /// layout (fused MoE experts, VLM prefixes, ...).
    Remap {
        /// The checkpoint folder to read.
        dir: PathBuf,
        /// Where to write (created, or replaced atomically).
        #[arg(long)]
        out: PathBuf,
        /// Target layout: original | transformers-v5.
        #[arg(long)]
        to: peftkit::remap::Layout,
        /// Model type whose table applies (default: config.json's model_type).
        #[arg(long)]
        model_type: Option<String>,
        /// Largest shard: bytes or a decimal size such as 5GB.
        #[arg(long, default_value = "50GB")]
        max_shard_size: String,
        /// Variant of the output files.
        #[arg(long)]
        variant: Option<String>,
        /// Variant of the input files.
        #[arg(long)]
        input_variant: Option<String>,
        /// Also restore renames transformers applies only when it saw them at load time
        /// (Llava's vision_tower.vision_model. level, LayerNorm gamma/beta).
        #[arg(long)]
        restore_load_only: bool,
        /// Extra conversion table files (JSON, see adapters-spec/conversions/README.md).
        #[arg(long = "table")]
        tables: Vec<PathBuf>,
        /// For a legacy per-expert adapter: a base checkpoint whose config.json gives the
        /// model type.
        #[arg(long)]
        base: Option<PathBuf>,
        /// For a legacy adapter: drop LoRA pairs on modules that are not fused experts (peft
        /// drops them silently; peftkit refuses unless asked).
        #[arg(long)]
        drop_untargeted: bool,
        /// For a legacy adapter: set lora_dropout to 0 (peft cannot load expert LoRA with
        /// dropout).
        #[arg(long)]
        zero_dropout: bool,
    },
    /// Extract the adapter from a full PEFT model state dict and write it as peft's
    /// save_pretrained would (adapter_model.safetensors, adapter_config.json, README.md).
    Extract {
        /// A .safetensors file or a checkpoint folder holding a full PEFT state dict.
        #[arg(long)]
        from: PathBuf,
        /// The adapter folder to write.
        #[arg(long)]
        out: PathBuf,
        /// Which adapter to extract when the state dict holds several (default: "default").
        #[arg(long)]
        adapter_name: Option<String>,
        /// lora_alpha (it is not in the tensors).
        #[arg(long, conflicts_with = "config")]
        lora_alpha: Option<String>,
        /// An adapter_config.json to use (checked against the tensors).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Mark the adapter as rsLoRA (scaling alpha/sqrt(r)); not visible in the tensors.
        #[arg(long)]
        use_rslora: bool,
        /// base_model_name_or_path to record (a state dict does not hold it).
        #[arg(long)]
        base_model: Option<String>,
        /// task_type to record (default: from the base config's architectures).
        #[arg(long)]
        task_type: Option<String>,
        /// config.json of the base, when --from is a lone file.
        #[arg(long)]
        base_config: Option<PathBuf>,
        /// Also write the clean base checkpoint (no base_layer, no adapter tensors) here.
        #[arg(long)]
        base_out: Option<PathBuf>,
    },
    /// Merge one or more adapters into a base checkpoint, as peft's merge_and_unload() +
    /// save_pretrained() would, streaming tensor by tensor.
    Merge {
        /// The base checkpoint folder.
        #[arg(long)]
        base: PathBuf,
        /// An adapter folder, optionally with a weight: DIR or DIR:WEIGHT. Repeat to merge
        /// several, in order.
        #[arg(long = "adapter", required = true)]
        adapters: Vec<String>,
        /// Output folder (created, or replaced atomically).
        #[arg(long)]
        out: PathBuf,
        /// Reshard the output instead of keeping the base layout.
        #[arg(long)]
        max_shard_size: Option<String>,
        /// Round each delta to the base dtype first and refuse NaN/Inf results (peft's safe_merge).
        #[arg(long)]
        safe_merge: bool,
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
        numerics: peftkit::merge::Numerics,
        /// Print a JSON summary.
        #[arg(long)]
        json: bool,
    },
}

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

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Inspect {
            path,
            json,
            variant,
        } => {
            let ckpt = open_any(&path, variant.as_deref())?;
            let summary = CheckpointSummary::of(&ckpt);
            // summarize_path opens the path again without the variant, which finds no weights
            // in a folder holding only model.VARIANT.safetensors: use what was opened.
            let adapters = if variant.is_some() && guess_kind(&path) == WeightsKind::Model {
                peft::classify::summarize_adapters(&ckpt.state_dict(), None)?
            } else {
                peft::classify::summarize_path(&path)?
            };
            if json {
                let mut v = serde_json::to_value(&summary)?;
                v["adapters"] = serde_json::to_value(&adapters)?;
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_summary(&summary);
                for a in &adapters {
                    print_adapter(a);
                }
            }
        }
        Command::Verify { path, variant } => {
            let kind = guess_kind(&path);
            let problems = ckpt::checkpoint::verify(&path, kind, variant.as_deref())?;
            if problems.is_empty() {
                println!("{}: ok", path.display());
            } else {
                for p in &problems {
                    println!("{p}");
                }
                eprintln!("{}: {} problem(s)", path.display(), problems.len());
                return Ok(ExitCode::from(1));
            }
        }
        Command::Reshard {
            dir,
            out,
            max_shard_size,
            variant,
            input_variant,
            no_fsync,
            model_type,
            tables,
        } => {
            let options = peftkit::remap::ReshardOptions {
                save: SaveOptions {
                    max_shard_size: ckpt::parse_size(&max_shard_size)?,
                    variant,
                    durable: !no_fsync,
                    ..Default::default()
                },
                src_variant: input_variant.clone(),
                model_type,
                tables,
            };
            let total = Checkpoint::open_kind(&dir, WeightsKind::Model, input_variant.as_deref())?
                .total_bytes();
            let bar = progress(total);
            let report =
                peftkit::remap::reshard_with_progress(&dir, &out, &options, &mut |n| bar.inc(n))?;
            bar.finish_and_clear();
            let save = &report.save;
            println!(
                "{}: {} tensors, {} bytes in {} file(s){}{}",
                out.display(),
                save.tensors,
                save.total_size,
                save.weight_files.len(),
                save.index_file
                    .as_ref()
                    .map(|i| format!(" + {i}"))
                    .unwrap_or_default(),
                match report.rules_used.len() {
                    0 => String::new(),
                    n => format!(
                        ", planned on the transformers-v5 model ({n} rule(s) of table {})",
                        report.table.as_deref().unwrap_or("legacy")
                    ),
                }
            );
        }
        Command::Remap {
            dir,
            out,
            to,
            model_type,
            max_shard_size,
            variant,
            input_variant,
            restore_load_only,
            tables,
            base,
            drop_untargeted,
            zero_dropout,
        } => {
            use peftkit::remap::{RemapOptions, Revert};
            if dir.join("adapter_config.json").is_file() {
                use peft::convert::{
                    convert_legacy_adapter_dir_with, model_type_from_base, ConvertOptions,
                    Untargeted,
                };
                if to != peftkit::remap::Layout::TransformersV5 {
                    anyhow::bail!(
                        "{} is an adapter: adapters are only converted to the transformers-v5 layout (peft saves them that way)",
                        dir.display()
                    );
                }
                let model_type = match (&model_type, &base) {
                    (Some(t), _) => Some(t.clone()),
                    (None, Some(b)) => Some(model_type_from_base(b)?),
                    _ => None,
                };
                let options = ConvertOptions {
                    untargeted: if drop_untargeted {
                        Untargeted::Drop
                    } else {
                        Untargeted::Error
                    },
                    zero_dropout,
                };
                let r =
                    convert_legacy_adapter_dir_with(&dir, &out, model_type.as_deref(), &options)?;
                println!(
                    "{}: legacy {} adapter fused with table {}: {} tensors ({} fused), {} dropped",
                    out.display(),
                    r.model_type,
                    r.table,
                    r.tensors,
                    r.fused_tensors,
                    r.dropped.len()
                );
                return Ok(ExitCode::SUCCESS);
            }
            let options = RemapOptions {
                save: SaveOptions {
                    max_shard_size: ckpt::parse_size(&max_shard_size)?,
                    variant,
                    ..Default::default()
                },
                src_variant: input_variant.clone(),
                revert: if restore_load_only {
                    Revert::AllTableRules
                } else {
                    Revert::FromConfig
                },
                tables,
            };
            let total = Checkpoint::open_kind(&dir, WeightsKind::Model, input_variant.as_deref())?
                .total_bytes();
            let bar = progress(total);
            let report = peftkit::remap::remap_with_progress(
                &dir,
                &out,
                to,
                model_type.as_deref(),
                &options,
                &mut |n| bar.inc(n),
            )?;
            bar.finish_and_clear();
            println!(
                "{}: model_type {}, table {}, {} tensors converted, {} file(s)",
                out.display(),
                report.model_type,
                report
                    .table
                    .as_deref()
                    .unwrap_or("none (legacy renames only)"),
                report.tensors_converted,
                report.save.weight_files.len()
            );
        }
        Command::Extract {
            from,
            out,
            adapter_name,
            lora_alpha,
            config,
            use_rslora,
            base_model,
            task_type,
            base_config,
            base_out,
        } => {
            use peft::extract::{extract, parse_lora_alpha, ExtractOptions};
            let mut o = ExtractOptions::new(&out);
            o.adapter_name = adapter_name;
            o.use_rslora = use_rslora;
            o.base_out = base_out;
            if let Some(a) = &lora_alpha {
                o.lora_alpha = Some(parse_lora_alpha(a)?);
            }
            if let Some(p) = &config {
                let (c, warnings) = peft::config::AdapterConfig::from_file(p)?;
                for w in warnings {
                    eprintln!("warning: {}: {w}", p.display());
                }
                o.config = Some(c);
            }
            if base_model.is_some() {
                o.model.name_or_path = base_model;
            }
            if let Some(t) = task_type {
                o.model.task_type = peft::classify::TaskTypeChoice::Given(t);
            }
            if let Some(p) = &base_config {
                o.model.config = Some(ckpt::ModelConfig::read(p)?);
            }
            let report = extract(&from, &o)?;
            for note in &report.notes {
                eprintln!("note: {note}");
            }
            println!(
                "{}: adapter `{}` ({} config){}",
                out.display(),
                report.adapter_name,
                if report.inferred { "inferred" } else { "given" },
                report
                    .base
                    .as_ref()
                    .map(|b| format!(", base in {}", b.dir.display()))
                    .unwrap_or_default()
            );
        }
        Command::Merge {
            base,
            adapters,
            out,
            max_shard_size,
            safe_merge,
            unmerge,
            no_fsync,
            numerics,
            json,
        } => {
            let adapters = adapters
                .iter()
                .map(|a| peftkit::merge::AdapterInput::parse(a))
                .collect();
            let max_shard_size = max_shard_size
                .as_deref()
                .map(ckpt::parse_size)
                .transpose()?;
            let bar = progress(Checkpoint::open(&base)?.total_bytes());
            let on_bytes = bar.clone();
            let job = peftkit::merge::MergeJob::new(base, adapters, out)
                .max_shard_size(max_shard_size)
                .safe_merge(safe_merge)
                .unmerge(unmerge)
                .durable(!no_fsync)
                .numerics(numerics)
                .progress(move |n| on_bytes.inc(n));
            let summary = peftkit::merge::merge(&job)?;
            bar.finish_and_clear();
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                println!(
                    "{}: {} tensors merged ({} numerics), {} replaced, {} copied{} in {:.2} s",
                    job.out.display(),
                    summary.tensors_merged,
                    summary.numerics.mode,
                    summary.tensors_replaced,
                    summary.tensors_copied,
                    if summary.untied_embeddings {
                        ", embeddings untied"
                    } else {
                        ""
                    },
                    summary.seconds
                );
                print_numerics(&summary.numerics);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn guess_kind(path: &std::path::Path) -> WeightsKind {
    if path.join("adapter_model.safetensors").is_file()
        || path.join("adapter_config.json").is_file()
    {
        WeightsKind::Adapter
    } else {
        WeightsKind::Model
    }
}

fn open_any(path: &std::path::Path, variant: Option<&str>) -> Result<Checkpoint> {
    Checkpoint::open_kind(path, guess_kind(path), variant)
        .with_context(|| format!("cannot open {}", path.display()))
}

/// Tells, on stderr, what the merge could not promise bit for bit.
fn print_numerics(n: &peftkit::merge::NumericsReport) {
    if !n.host_measured {
        eprintln!(
            "note: this CPU family was never measured against peft; merged with the {} order",
            n.reduction_order
        );
    }
    if !n.unverified_tensors.is_empty() {
        eprintln!(
            "note: {} tensor(s) agree with peft to {} ulp, not bit for bit (products outside the measured domain): {}",
            n.unverified_tensors.len(),
            n.unverified_bound_ulp,
            n.unverified_tensors.join(", ")
        );
    }
}

fn print_summary(s: &CheckpointSummary) {
    let width = s
        .tensors
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!(
        "{:width$}  {:6}  {:>16}  {:>12}  file",
        "name", "dtype", "shape", "bytes"
    );
    for t in &s.tensors {
        println!(
            "{:width$}  {:6}  {:>16}  {:>12}  {}",
            t.name,
            t.dtype,
            format!("{:?}", t.shape),
            t.bytes,
            t.file
        );
    }
    println!(
        "{} tensors, {} parameters, {} bytes in {} file(s){}",
        s.total_tensors,
        s.total_parameters,
        s.total_size,
        s.files.len(),
        s.index
            .as_ref()
            .map(|i| format!(" + {i}"))
            .unwrap_or_default()
    );
}

fn print_adapter(a: &peft::classify::AdapterSummary) {
    let ranks: Vec<String> = a.ranks.iter().map(|(r, n)| format!("r={r} x{n}")).collect();
    println!(
        "adapter `{}`: {} ({:?}), {} modules, {}{}{}",
        a.name,
        a.method,
        a.layout,
        a.modules,
        ranks.join(", "),
        if a.use_dora { ", DoRA" } else { "" },
        if a.lora_bias { ", lora_bias" } else { "" }
    );
    if let Some(t) = &a.target_modules {
        println!("  targets: {}", t.join(", "));
    }
    if !a.modules_to_save.is_empty() {
        println!("  modules_to_save: {}", a.modules_to_save.join(", "));
    }
    for s in &a.scaling {
        println!(
            "  scaling: {}",
            serde_json::to_string(s).unwrap_or_default()
        );
    }
    for n in &a.notes {
        println!("  note: {n}");
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
