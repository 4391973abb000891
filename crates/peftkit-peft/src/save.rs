//! Writing adapters as peft's `PeftModel.save_pretrained` does (docs/formats.md, "PEFT adapters"), and the
//! `save_pretrained` of a state dict that may hold adapter parameters.
//!
//! * [`save_adapter`]: `adapter_model.safetensors` (`{"format":"pt"}`, keys
//!   `base_model.model.<path>.<suffix>`, or bare with `save_peft_format = false`),
//!   `adapter_config.json` (`inference_mode: true`, written byte for byte as peft writes it) and
//!   the `README.md` model card peft writes. A non-default adapter goes into `<dir>/<name>/`,
//!   its model card into `<dir>`, as in peft. Every folder changes atomically (through
//!   [`peftkit_checkpoint::save_pretrained`]).
//! * [`save_pretrained`]: classifies a state dict ([`crate::classify`]) and writes its adapters
//!   (configs given or inferred), and/or its base checkpoint under clean names.
//!
//! ```
//! use peftkit_checkpoint::{Dtype, StateDict, Tensor};
//! use peftkit_peft::AdapterTensors;
//! use peftkit_peft::AdapterConfig;
//! use peftkit_peft::{save_adapter, AdapterSaveOptions};
//!
//! let t = |shape: Vec<usize>| {
//!     let n: usize = shape.iter().product();
//!     Tensor::from_bytes(Dtype::F32, shape, vec![0; 4 * n]).unwrap()
//! };
//! let mut sd = StateDict::new();
//! sd.insert("base_model.model.model.q_proj.lora_A.weight".into(), t(vec![2, 8]));
//! sd.insert("base_model.model.model.q_proj.lora_B.weight".into(), t(vec![8, 2]));
//! let (config, _) = AdapterConfig::from_json_str(
//!     r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}"#,
//! )
//! .unwrap();
//! let tensors = AdapterTensors::from_adapter_state_dict(&sd, "default", &config).unwrap();
//! let dir = tempfile::tempdir().unwrap();
//! save_adapter(dir.path(), "default", &tensors, &config, &AdapterSaveOptions::default()).unwrap();
//! for f in ["adapter_model.safetensors", "adapter_config.json", "README.md"] {
//!     assert!(dir.path().join(f).is_file());
//! }
//! ```

use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use peftkit_checkpoint::DEFAULT_MAX_SHARD_SIZE;
use peftkit_checkpoint::{
    plan_save, CheckpointError, SaveOptions, SaveReport, StateDict, WeightsKind,
};
use serde_json::Value;

use crate::adapter::AdapterTensors;
use crate::classify::{
    check_config, classify_state_dict, infer_config, ClassifiedStateDict, ClassifyError,
    ClassifyOptions, InferOptions, DEFAULT_ADAPTER_NAME,
};
use crate::config::{AdapterConfig, ADAPTER_CONFIG_NAME, LORA, PEFT_VERSION};

use crate::embedded::MODEL_CARD_TEMPLATE;

/// File name of the model card.
pub const MODEL_CARD_NAME: &str = "README.md";

/// Errors writing adapters.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SaveError {
    /// Writing the files failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Classifying the state dict or inferring a config failed.
    #[error(transparent)]
    Classify(Box<ClassifyError>),
    /// An adapter name that cannot be a folder name.
    #[error("adapter name {name:?} {reason}; peft saves a non-default adapter in a sub-folder named after it, so use a plain name")]
    InvalidAdapterName {
        /// The name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Nothing to write for an adapter.
    #[error("adapter `{adapter}` has no tensors: nothing to save to {}", dir.display())]
    EmptyAdapter {
        /// Adapter name.
        adapter: String,
        /// Target folder.
        dir: PathBuf,
    },
    /// A state dict with neither adapters nor base parameters.
    #[error("the state dict holds neither adapter nor base tensors: nothing to save to {}", .0.display())]
    Nothing(PathBuf),
    /// Base and default adapter would share a folder although one of them is sharded:
    /// transformers names both indexes `model.safetensors.index.json`.
    #[error("{}: the base checkpoint and the default adapter cannot share this folder when either is sharded (both indexes are named model.safetensors.index.json); raise max_shard_size or save the base elsewhere", .0.display())]
    ShardCollision(PathBuf),
    /// Writing the model card failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

// Boxed: classification errors carry several names and would make every result large.
impl From<ClassifyError> for SaveError {
    fn from(e: ClassifyError) -> Self {
        SaveError::Classify(Box::new(e))
    }
}

/// Options of [`save_adapter`], named after peft's / transformers' keyword arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterSaveOptions {
    /// Keys with the `base_model.model.` prefix peft needs (default `true`); `false` writes
    /// bare keys, as transformers' `save_pretrained(save_peft_format=False)`.
    pub save_peft_format: bool,
    /// Largest shard in bytes (peft itself never shards; transformers shards adapters with
    /// `adapter_model-0000k-of-0000n.safetensors` and `model.safetensors.index.json`). Default
    /// 50 GB.
    pub max_shard_size: u64,
    /// `false` writes nothing (a non-zero rank of a distributed job).
    pub is_main_process: bool,
    /// Overrides the config's `base_model_name_or_path` (peft fills it from the model's
    /// `name_or_path` when it is null).
    pub base_model_name_or_path: Option<String>,
    /// Write `README.md` when the folder has none (peft updates an existing card; peftkit leaves
    /// an existing card untouched).
    pub write_model_card: bool,
    /// Whether the base is a transformers model (the card's `transformers` tag). `None`:
    /// guessed from the config (a `task_type`, a transformers `auto_mapping` or a base model
    /// name).
    pub transformers_model: Option<bool>,
    /// Other files (name, bytes) written into the adapter's folder by the same atomic save:
    /// a converted adapter's tokenizer files and model card. Default none.
    pub extra_files: Vec<(String, Vec<u8>)>,
    /// Sync the files to disk before the folder is swapped in (default `true`); `false` is
    /// `--no-fsync` (see [`SaveOptions::durable`]).
    pub durable: bool,
}

impl Default for AdapterSaveOptions {
    fn default() -> Self {
        AdapterSaveOptions {
            save_peft_format: true,
            max_shard_size: DEFAULT_MAX_SHARD_SIZE,
            is_main_process: true,
            base_model_name_or_path: None,
            write_model_card: true,
            transformers_model: None,
            extra_files: Vec::new(),
            durable: true,
        }
    }
}

peftkit_checkpoint::option_setters!(AdapterSaveOptions {
    save_peft_format: bool,
    max_shard_size: u64,
    is_main_process: bool,
    base_model_name_or_path: Some(String),
    write_model_card: bool,
    transformers_model: Some(bool),
    extra_files: Vec<(String, Vec<u8>)>,
    durable: bool,
});

/// What [`save_adapter`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AdapterSaveReport {
    /// The adapter's folder (`dir`, or `dir/<name>`).
    pub dir: PathBuf,
    /// The weights written.
    pub weights: SaveReport,
    /// The model card, when one was written.
    pub model_card: Option<PathBuf>,
}

/// The folder peft saves adapter `name` into: `dir` for `default`, `dir/<name>` otherwise.
pub fn adapter_folder(dir: &Path, name: &str) -> PathBuf {
    if name == DEFAULT_ADAPTER_NAME {
        dir.to_owned()
    } else {
        dir.join(name)
    }
}

fn check_name(name: &str) -> Result<(), SaveError> {
    let reason = if name.is_empty() {
        "is empty"
    } else if name.contains(['/', '\\']) {
        "contains a path separator"
    } else if name == "." || name == ".." {
        "is a relative folder reference"
    } else {
        return Ok(());
    };
    Err(SaveError::InvalidAdapterName {
        name: name.to_owned(),
        reason,
    })
}

/// A YAML scalar as PyYAML writes it in a model card: plain when unambiguous, else single
/// quoted.
fn yaml_scalar(s: &str) -> String {
    let lower = s.to_ascii_lowercase();
    let special = [
        "true", "false", "yes", "no", "on", "off", "null", "~", "y", "n",
    ];
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_./:@+-".contains(c))
        && !s.starts_with(['-', ':', '@', '?', '.'])
        && !s.ends_with(':')
        && !special.contains(&lower.as_str())
        && s.parse::<f64>().is_err();
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "''"))
    }
}

/// The `README.md` peft's `create_or_update_model_card` writes for a new adapter: YAML front
/// matter (`base_model`, `library_name: peft`, `pipeline_tag: text-generation` for causal LMs,
/// sorted `tags`: `base_model:adapter:<name>`, `lora`, `transformers`), huggingface_hub's empty
/// template, and `### Framework versions\n\n- PEFT 0.21.2` (no trailing newline).
pub fn model_card(config: &AdapterConfig, transformers_model: Option<bool>) -> String {
    let base = config.base_model_name_or_path();
    let is_transformers = transformers_model.unwrap_or_else(|| {
        let auto_transformers = match config.to_value(&Default::default()).get("auto_mapping") {
            Some(Value::Object(m)) => m
                .get("parent_library")
                .and_then(Value::as_str)
                .is_some_and(|p| p.starts_with("transformers.")),
            _ => false,
        };
        config.task_type().is_some() || auto_transformers || base.is_some()
    });
    let mut tags: Vec<String> = Vec::new();
    if is_transformers {
        tags.push("transformers".into());
    }
    if config.peft_type() == LORA {
        tags.push("lora".into());
    }
    if let Some(b) = base {
        tags.push(format!("base_model:adapter:{b}"));
    }
    tags.sort();
    tags.dedup();
    let mut text = String::from("---\n");
    if let Some(b) = base {
        text += &format!("base_model: {}\n", yaml_scalar(b));
    }
    text += "library_name: peft\n";
    if config.task_type() == Some("CAUSAL_LM") {
        text += "pipeline_tag: text-generation\n";
    }
    if !tags.is_empty() {
        text += "tags:\n";
        for t in &tags {
            text += &format!("- {}\n", yaml_scalar(t));
        }
    }
    text += "---\n";
    text += MODEL_CARD_TEMPLATE;
    text += &format!("### Framework versions\n\n- PEFT {PEFT_VERSION}");
    text
}

/// Writes `bytes` to `path` through a temporary sibling and a rename, so a reader never sees a
/// half-written file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SaveError> {
    let io = |source| SaveError::Io {
        path: path.to_owned(),
        source,
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(io)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.peftkit-{}.tmp", std::process::id()));
    if let Err(e) = std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    Ok(())
}

/// The config as peft writes it: `inference_mode` true, `base_model_name_or_path` overridden
/// when asked.
fn config_to_write(config: &AdapterConfig, options: &AdapterSaveOptions) -> AdapterConfig {
    let mut config = config.clone();
    config.set_inference_mode(true);
    if let Some(name) = &options.base_model_name_or_path {
        config.set_base_model_name_or_path(Some(name.clone()));
    }
    config
}

fn adapter_save_options(
    options: &AdapterSaveOptions,
    extra: Vec<(String, Vec<u8>)>,
) -> SaveOptions {
    SaveOptions {
        kind: WeightsKind::Adapter,
        max_shard_size: options.max_shard_size,
        is_main_process: options.is_main_process,
        extra_files: extra,
        durable: options.durable,
        ..SaveOptions::default()
    }
}

/// Saves adapter `adapter_name` as peft's `save_pretrained(dir)` does: into `dir` for
/// `default`, into `dir/<name>` otherwise; the model card (if `dir` has none) into `dir`.
///
/// `tensors` holds the adapter's entries under peft's on-disk keys (see
/// [`crate::AdapterTensors`]); `config` is written with `inference_mode: true`.
pub fn save_adapter(
    dir: &Path,
    adapter_name: &str,
    tensors: &AdapterTensors,
    config: &AdapterConfig,
    options: &AdapterSaveOptions,
) -> Result<AdapterSaveReport, SaveError> {
    check_name(adapter_name)?;
    let folder = adapter_folder(dir, adapter_name);
    if tensors.entries.is_empty() {
        return Err(SaveError::EmptyAdapter {
            adapter: adapter_name.to_owned(),
            dir: folder,
        });
    }
    let config = config_to_write(config, options);
    let state = tensors.to_state_dict(options.save_peft_format);
    let mut extra = vec![(
        ADAPTER_CONFIG_NAME.to_owned(),
        config.to_json_string().into_bytes(),
    )];
    extra.extend(options.extra_files.iter().cloned());
    // peft writes the card into the save directory (the root, for a named adapter) and only
    // from the main process; an existing card is left as it is.
    let card_path = dir.join(MODEL_CARD_NAME);
    let card = (options.write_model_card && options.is_main_process && !card_path.exists())
        .then(|| model_card(&config, options.transformers_model));
    let wrote_card = card.is_some();
    let separate_card = match card {
        Some(text) if folder == dir => {
            extra.push((MODEL_CARD_NAME.to_owned(), text.into_bytes()));
            None
        }
        other => other,
    };
    let weights = peftkit_checkpoint::save_pretrained(
        &folder,
        &state,
        &adapter_save_options(options, extra),
    )?;
    if let Some(text) = separate_card {
        write_atomic(&card_path, text.as_bytes())?;
    }
    Ok(AdapterSaveReport {
        dir: folder,
        weights,
        model_card: wrote_card.then_some(card_path),
    })
}

/// Options of [`save_pretrained`].
#[derive(Debug, Clone, Default)]
pub struct PeftSaveOptions {
    /// How adapters are written (`save_peft_format`, shard size, main process, card).
    pub adapter: AdapterSaveOptions,
    /// Config per adapter name; an adapter without one gets an inferred config
    /// ([`crate::classify::infer_config`] with `infer`).
    pub configs: IndexMap<String, AdapterConfig>,
    /// What inference needs (`lora_alpha`, the base model).
    pub infer: InferOptions,
    /// Adapters to save (peft's `selected_adapters`); `None`: all.
    pub selected_adapters: Option<Vec<String>>,
    /// Also write the base checkpoint (clean names) when the state dict holds adapters.
    pub save_base: bool,
    /// Options of the base checkpoint save (`config.json`, ties, shard size, …).
    pub base: SaveOptions,
}

peftkit_checkpoint::option_setters!(PeftSaveOptions {
    adapter: AdapterSaveOptions,
    configs: IndexMap<String, AdapterConfig>,
    infer: InferOptions,
    selected_adapters: Some(Vec<String>),
    save_base: bool,
    base: SaveOptions,
});

/// What [`save_pretrained`] wrote.
#[derive(Debug, Clone)]
pub struct PeftSaveReport {
    /// How the state dict was classified.
    pub layout: crate::classify::StateDictLayout,
    /// Each adapter written, in order.
    pub adapters: Vec<(String, AdapterSaveReport)>,
    /// The base checkpoint, when written.
    pub base: Option<SaveReport>,
    /// Notes from config inference and checks.
    pub notes: Vec<String>,
}

/// `save_pretrained` over a state dict that may hold adapter parameters (a `PeftModel`
/// state dict, adapter tensors, burn LoRA factors, or a plain checkpoint):
///
/// * with adapters, each selected adapter is written with [`save_adapter`] (peft's layout:
///   `default` in `dir`, others in `dir/<name>`), with its config from `options.configs`
///   (checked against the tensors) or inferred;
/// * without adapters, or with `options.save_base`, the base parameters are written under
///   their clean names through [`peftkit_checkpoint::save_pretrained`] with `options.base`.
///
/// Everything is planned and checked before the first file is written; each folder changes
/// atomically.
pub fn save_pretrained(
    dir: &Path,
    state: &StateDict,
    options: &PeftSaveOptions,
) -> Result<PeftSaveReport, SaveError> {
    // One method for every given config: read the keys with its rules.
    let peft_type = options
        .configs
        .values()
        .next()
        .map(|c| c.peft_type().to_owned())
        .filter(|t| options.configs.values().all(|c| c.peft_type() == t));
    let classified = classify_state_dict(
        state,
        &ClassifyOptions {
            peft_type,
            disk_adapter_name: options.configs.keys().next().cloned(),
        },
    )?;
    save_classified(dir, &classified, options)
}

/// [`save_pretrained`] over an already classified state dict.
pub fn save_classified(
    dir: &Path,
    classified: &ClassifiedStateDict,
    options: &PeftSaveOptions,
) -> Result<PeftSaveReport, SaveError> {
    let names: Vec<String> = match &options.selected_adapters {
        Some(sel) => {
            for n in sel {
                classified.adapter(Some(n))?;
            }
            sel.clone()
        }
        None => classified.adapter_names(),
    };
    let mut notes = Vec::new();
    let mut planned: Vec<(String, AdapterTensors, AdapterConfig)> = Vec::new();
    for name in &names {
        check_name(name)?;
        let config = match options.configs.get(name) {
            Some(c) => {
                notes.extend(check_config(classified, name, c)?);
                c.clone()
            }
            None => {
                let inferred = infer_config(classified, name, &options.infer)?;
                notes.extend(inferred.notes);
                inferred.config
            }
        };
        let tensors = classified.adapter_for_save(name, &config)?;
        planned.push((name.clone(), tensors, config));
    }
    let write_base = planned.is_empty() || options.save_base;
    if write_base && classified.base.is_empty() && planned.is_empty() {
        return Err(SaveError::Nothing(dir.to_owned()));
    }
    if write_base && !classified.base.is_empty() {
        if let Some((_, tensors, _)) = planned.iter().find(|(n, _, _)| n == DEFAULT_ADAPTER_NAME) {
            let base_plan = plan_save(&classified.base, &options.base)?;
            let adapter_plan = plan_save(
                &tensors.to_state_dict(options.adapter.save_peft_format),
                &adapter_save_options(&options.adapter, Vec::new()),
            )?;
            if base_plan.index.is_some() || adapter_plan.index.is_some() {
                return Err(SaveError::ShardCollision(dir.to_owned()));
            }
        }
    }
    let mut adapters = Vec::new();
    for (name, tensors, config) in &planned {
        let report = save_adapter(dir, name, tensors, config, &options.adapter)?;
        adapters.push((name.clone(), report));
    }
    // The base goes last: its save keeps the adapter files already in the folder.
    let base = if write_base && !classified.base.is_empty() {
        Some(peftkit_checkpoint::save_pretrained(
            dir,
            &classified.base,
            &options.base,
        )?)
    } else {
        None
    };
    Ok(PeftSaveReport {
        layout: classified.layout,
        adapters,
        base,
        notes,
    })
}
