//! `peftkit extract`: the adapter of a full PEFT state dict, written as peft writes it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use peftkit::checkpoint as ckpt;
use peftkit::peft;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// A .safetensors or .bin file, or a checkpoint folder (or cached repo id), holding a
    /// full PEFT state dict.
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
    /// Print a JSON report instead of the summary line.
    #[arg(long)]
    json: bool,
    /// Do not sync the outputs to disk before swapping them in (see `merge --no-fsync`).
    #[arg(long)]
    no_fsync: bool,
}

pub(crate) fn run(args: Args) -> Result<ExitCode> {
    use peft::{extract, parse_lora_alpha, ExtractOptions};
    let Args {
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
        json,
        no_fsync,
    } = args;
    let from = super::resolve(&from)?;
    let out = super::output_folder(Some(out), &from, false)?;
    if let Some(b) = &base_out {
        super::output_folder(Some(b.clone()), &from, false)?;
    }
    let mut o = ExtractOptions::new(&out);
    o.adapter_name = adapter_name;
    o.use_rslora = use_rslora;
    o.base_out = base_out;
    o.save.durable = !no_fsync;
    if let Some(a) = &lora_alpha {
        o.lora_alpha = Some(parse_lora_alpha(a)?);
    }
    if let Some(p) = &config {
        let (c, warnings) = peft::AdapterConfig::from_file(p)?;
        for w in warnings {
            super::warning(format!("{}: {w}", p.display()));
        }
        o.config = Some(c);
    }
    if base_model.is_some() {
        o.model.name_or_path = base_model;
    }
    if let Some(t) = task_type {
        o.model.task_type = peft::TaskTypeChoice::Given(t);
    }
    if let Some(p) = &base_config {
        o.model.config = Some(ckpt::ModelConfig::read(p)?);
    }
    let report = extract(&from, &o)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    for note in &report.notes {
        super::note(note);
    }
    super::summary(format!(
        "{}: adapter `{}` ({} config){}",
        out.display(),
        report.adapter_name,
        if report.inferred { "inferred" } else { "given" },
        report
            .base
            .as_ref()
            .map(|b| format!(", base in {}", b.dir.display()))
            .unwrap_or_default()
    ));
    Ok(ExitCode::SUCCESS)
}
