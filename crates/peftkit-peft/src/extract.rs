//! Extracting an adapter from a full state dict: the files peft's `save_pretrained` would have
//! written for it (same tensor names, values, dtypes; the `adapter_config.json` fields peft
//! writes), and optionally the clean base checkpoint.
//!
//! What the tensors cannot say must be given: `lora_alpha` (`--lora-alpha` or `--config`),
//! `use_rslora`, and everything else a config holds beyond shapes (`alpha_pattern`,
//! `trainable_token_indices`, `lora_dropout`, …: pass `--config`). With a config, its fields
//! are used and checked against the tensors (a rank that differs is an error naming the module).
//! See [`crate::classify::infer_config`] for the inference rules.
//!
//! ```
//! use peftkit_checkpoint::{Dtype, SaveOptions, StateDict, Tensor};
//! use peftkit_peft::Adapter;
//! use peftkit_peft::{classify_state_dict, infer_config, ClassifyOptions, InferOptions};
//! use peftkit_peft::TargetModules;
//! use peftkit_peft::{extract, parse_lora_alpha, ExtractOptions};
//! use peftkit_peft::{save_adapter, AdapterSaveOptions};
//!
//! // A training loop's state: base weights and LoRA factors under peft's on-disk names.
//! let zeros = |shape: Vec<usize>| {
//!     let n: usize = shape.iter().product();
//!     Tensor::from_bytes(Dtype::F32, shape, vec![0; 4 * n])
//! };
//! let mut state = StateDict::new();
//! for i in 0..2 {
//!     let m = format!("model.layers.{i}.self_attn");
//!     state.insert(format!("{m}.q_proj.weight"), zeros(vec![64, 64])?);
//!     state.insert(format!("{m}.k_proj.weight"), zeros(vec![16, 64])?);
//!     state.insert(format!("{m}.q_proj.lora_A.weight"), zeros(vec![8, 64])?);
//!     state.insert(format!("{m}.q_proj.lora_B.weight"), zeros(vec![64, 8])?);
//! }
//!
//! // Classify, infer the config peft would write, save the adapter as peft does.
//! let classified = classify_state_dict(&state, &ClassifyOptions::default())?;
//! let infer = InferOptions { lora_alpha: Some(16.into()), ..InferOptions::default() };
//! let config = infer_config(&classified, "default", &infer)?.config;
//! let lora = config.as_lora().ok_or("not LoRA")?;
//! assert_eq!(lora.r, 8);
//! assert_eq!(lora.target_modules, Some(TargetModules::Names(vec!["q_proj".into()])));
//! let tensors = classified.adapter_for_save("default", &config)?;
//! let out = tempfile::tempdir()?;
//! save_adapter(out.path(), "default", &tensors, &config, &AdapterSaveOptions::default())?;
//! let adapter = Adapter::open(out.path())?;
//! assert_eq!(adapter.rank_of("model.layers.0.self_attn.q_proj"), Some(8));
//!
//! // The same from a checkpoint on disk, with the clean base beside it.
//! peftkit_checkpoint::save_pretrained(&out.path().join("full"), &state, &SaveOptions::default())?;
//! let mut options = ExtractOptions::new(out.path().join("extracted"));
//! options.lora_alpha = Some(parse_lora_alpha("16")?);
//! options.base_out = Some(out.path().join("base"));
//! let report = extract(&out.path().join("full"), &options)?;
//! assert_eq!(report.adapter.weights.tensors, 4);
//! assert_eq!(report.base.map(|b| b.tensors), Some(4));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::path::{Path, PathBuf};

use peftkit_checkpoint::companion_files;
use peftkit_checkpoint::natural_cmp;
use peftkit_checkpoint::{
    Checkpoint, CheckpointError, ModelConfig, SaveOptions, SaveReport, StateDict, WeightsKind,
    WeightsNames,
};
use serde_json::Number;

use crate::classify::{
    check_config, classify_state_dict, infer_config, BaseModelInfo, ClassifiedStateDict,
    ClassifyError, ClassifyOptions, InferOptions, StateDictLayout, DEFAULT_ADAPTER_NAME,
};
use crate::config::{AdapterConfig, ConfigError, ADAPTER_CONFIG_NAME};
use crate::save::{save_adapter, AdapterSaveOptions, AdapterSaveReport, SaveError};

/// Errors of [`extract`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExtractError {
    /// Reading the source failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The config could not be read.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Classification, inference or the config check failed.
    #[error(transparent)]
    Classify(Box<ClassifyError>),
    /// Writing failed.
    #[error(transparent)]
    Save(#[from] SaveError),
    /// The source has no adapter tensors.
    #[error("{}: no adapter tensors (no lora_A / lora_embedding_A / prompt_encoder / modules_to_save key): nothing to extract; is this a base checkpoint?", .0.display())]
    NoAdapters(PathBuf),
    /// `--base-out` on a source without base tensors.
    #[error("{}: holds only adapter tensors, so there is no base checkpoint to write with --base-out", .0.display())]
    NoBase(PathBuf),
    /// `--lora-alpha` is not a number.
    #[error("lora_alpha {0:?} is not a finite number (give e.g. 16 or 0.5)")]
    InvalidAlpha(String),
}

// Boxed: classification errors carry several names and would make every result large.
impl From<ClassifyError> for ExtractError {
    fn from(e: ClassifyError) -> Self {
        ExtractError::Classify(Box::new(e))
    }
}

/// Options of [`extract`] (the `peftkit extract` flags).
#[derive(Debug, Clone)]
pub struct ExtractOptions {
    /// Where the adapter goes (`--out`). The adapter is written into this folder itself, whatever
    /// its name: load it with `PeftModel.from_pretrained(model, out, adapter_name=...)`.
    pub out: PathBuf,
    /// Which adapter (`--adapter-name`); `None`: the only one (an error when there are several).
    /// For adapter files and burn exports, the name their keys are given.
    pub adapter_name: Option<String>,
    /// `lora_alpha` (`--lora-alpha`); overrides the config's when both are given.
    pub lora_alpha: Option<Number>,
    /// `use_rslora` for an inferred config.
    pub use_rslora: bool,
    /// The adapter's config (`--config adapter_config.json`): its fields are written, checked
    /// against the tensors.
    pub config: Option<AdapterConfig>,
    /// Also write the base checkpoint, without adapter layers, here (`--base-out`).
    pub base_out: Option<PathBuf>,
    /// The base model: name, task, `config.json` (read from the source folder when not given).
    pub model: BaseModelInfo,
    /// How the adapter is written; its `durable` (`--no-fsync` when `false`) also applies to
    /// the base.
    pub save: AdapterSaveOptions,
}

impl ExtractOptions {
    /// Defaults, writing to `out`.
    pub fn new(out: impl Into<PathBuf>) -> Self {
        ExtractOptions {
            out: out.into(),
            adapter_name: None,
            lora_alpha: None,
            use_rslora: false,
            config: None,
            base_out: None,
            model: BaseModelInfo::default(),
            save: AdapterSaveOptions::default(),
        }
    }
}

peftkit_checkpoint::option_setters!(ExtractOptions {
    out: PathBuf,
    adapter_name: Some(String),
    lora_alpha: Some(Number),
    use_rslora: bool,
    config: Some(AdapterConfig),
    base_out: Some(PathBuf),
    model: BaseModelInfo,
    save: AdapterSaveOptions,
});

/// What [`extract`] did (`peftkit extract --json`: every field but the config).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExtractReport {
    /// The adapter extracted.
    pub adapter_name: String,
    /// Layout of the source.
    pub layout: StateDictLayout,
    /// The config written (before `inference_mode` was forced on).
    #[serde(skip)]
    pub config: AdapterConfig,
    /// Whether the config was inferred (no `--config`).
    pub inferred: bool,
    /// The adapter files.
    pub adapter: AdapterSaveReport,
    /// The base checkpoint, with `--base-out`.
    pub base: Option<SaveReport>,
    /// How ambiguous cases were settled, what was not checked.
    pub notes: Vec<String>,
}

/// Parses `--lora-alpha`: an integer stays an integer (`"lora_alpha": 16`), anything else is a
/// float, as Python writes them.
pub fn parse_lora_alpha(text: &str) -> Result<Number, ExtractError> {
    let t = text.trim();
    if let Ok(i) = t.parse::<i64>() {
        return Ok(Number::from(i));
    }
    t.parse::<f64>()
        .ok()
        .and_then(Number::from_f64)
        .ok_or_else(|| ExtractError::InvalidAlpha(text.to_owned()))
}

/// A state dict to extract from, and what its folder says about it.
#[derive(Debug, Clone)]
pub struct Source {
    /// The path given.
    pub path: PathBuf,
    /// Its tensors, in transformers' natural order.
    pub state: StateDict,
    /// The folder's non-weight files (configs, tokenizer), to carry into `--base-out`.
    pub companions: Vec<(String, Vec<u8>)>,
    /// The folder's `config.json`.
    pub model_config: Option<ModelConfig>,
    /// The folder's `adapter_config.json`, when it is an adapter folder.
    pub adapter_config: Option<AdapterConfig>,
}

/// Opens a `.safetensors` file, a checkpoint folder (single file or sharded) or an adapter
/// folder.
pub fn open_source(from: &Path) -> Result<Source, ExtractError> {
    let mut source = Source {
        path: from.to_owned(),
        state: StateDict::new(),
        companions: Vec::new(),
        model_config: None,
        adapter_config: None,
    };
    if from.is_file() {
        source.state = Checkpoint::open(from)?.natural_state_dict();
        return Ok(source);
    }
    let ckpt = match Checkpoint::open(from) {
        Ok(c) => c,
        // An adapter folder (a sharded adapter's index has the model's name and is found
        // above).
        Err(CheckpointError::NotACheckpoint { .. })
            if from
                .join(WeightsNames::new(WeightsKind::Adapter, None)?.single())
                .is_file() =>
        {
            Checkpoint::open_kind(from, WeightsKind::Adapter, None)?
        }
        Err(e) => return Err(e.into()),
    };
    source.state = ckpt.natural_state_dict();
    source.companions = companion_files(from)?
        .into_iter()
        .filter(|(name, _)| name != ADAPTER_CONFIG_NAME)
        .collect();
    let config_json = from.join(peftkit_checkpoint::MODEL_CONFIG_NAME);
    if config_json.is_file() {
        source.model_config = Some(ModelConfig::read(&config_json)?);
    }
    let adapter_config = from.join(ADAPTER_CONFIG_NAME);
    if adapter_config.is_file() {
        source.adapter_config = Some(AdapterConfig::from_file(&adapter_config)?.0);
    }
    Ok(source)
}

/// Extracts one adapter of the state dict at `from` into `options.out` (and the base into
/// `options.base_out`). Everything is classified, inferred and checked before the first file
/// is written; each output folder changes atomically.
pub fn extract(from: &Path, options: &ExtractOptions) -> Result<ExtractReport, ExtractError> {
    for out in std::iter::once(&options.out).chain(&options.base_out) {
        peftkit_checkpoint::ensure_apart(out, &[from])?;
    }
    let source = open_source(from)?;
    extract_from(&source, options)
}

/// [`extract`] from an opened [`Source`].
pub fn extract_from(
    source: &Source,
    options: &ExtractOptions,
) -> Result<ExtractReport, ExtractError> {
    let config = options
        .config
        .clone()
        .or_else(|| source.adapter_config.clone());
    let classified = classify_state_dict(
        &source.state,
        &ClassifyOptions {
            peft_type: config.as_ref().map(|c| c.peft_type().to_owned()),
            disk_adapter_name: options.adapter_name.clone(),
        },
    )?;
    if classified.adapters.is_empty() {
        return Err(ExtractError::NoAdapters(source.path.clone()));
    }
    let name = classified
        .adapter(options.adapter_name.as_deref())?
        .name
        .clone();
    let mut model = options.model.clone();
    if model.config.is_none() {
        model.config = source.model_config.clone();
    }
    let (config, inferred, mut notes) = match config {
        Some(mut c) => {
            if let (Some(alpha), Some(lora)) = (&options.lora_alpha, c.as_lora_mut()) {
                lora.lora_alpha = alpha.clone();
            }
            if let Some(n) = &model.name_or_path {
                c.set_base_model_name_or_path(Some(n.clone()));
            }
            let notes = check_config(&classified, &name, &c)?;
            (c, false, notes)
        }
        None => {
            let inferred = infer_config(
                &classified,
                &name,
                &InferOptions {
                    lora_alpha: options.lora_alpha.clone(),
                    use_rslora: options.use_rslora,
                    model: model.clone(),
                },
            )?;
            (inferred.config, true, inferred.notes)
        }
    };
    let tensors = classified.adapter_for_save(&name, &config)?;
    let base_plan = match &options.base_out {
        Some(dir) => Some((
            dir,
            base_save(
                &classified,
                source,
                &model,
                options.save.durable,
                &mut notes,
            )?,
        )),
        None => None,
    };
    // The base first: it is the larger write, and a failure leaves no adapter claiming it.
    let base = match base_plan {
        Some((dir, (state, opts))) => {
            Some(peftkit_checkpoint::save_pretrained(dir, &state, &opts)?)
        }
        None => None,
    };
    let adapter = save_adapter(
        &options.out,
        DEFAULT_ADAPTER_NAME,
        &tensors,
        &config,
        &options.save,
    )?;
    Ok(ExtractReport {
        adapter_name: name,
        layout: classified.layout,
        config,
        inferred,
        adapter,
        base,
        notes,
    })
}

/// The base checkpoint to write: clean names in transformers' order, the source folder's files,
/// and the output embedding dropped when the config ties it to the input embedding (as
/// transformers does).
fn base_save(
    classified: &ClassifiedStateDict,
    source: &Source,
    model: &BaseModelInfo,
    durable: bool,
    notes: &mut Vec<String>,
) -> Result<(StateDict, SaveOptions), ExtractError> {
    if classified.base.is_empty() {
        return Err(ExtractError::NoBase(source.path.clone()));
    }
    let mut state = classified.base.clone();
    state.sort_by(|a, _, b, _| natural_cmp(a, b));
    let mut options = SaveOptions {
        extra_files: source.companions.clone(),
        durable,
        ..SaveOptions::default()
    };
    let has_config_file = source
        .companions
        .iter()
        .any(|(n, _)| n == peftkit_checkpoint::MODEL_CONFIG_NAME);
    if let Some(cfg) = &model.config {
        // A folder's config.json is copied as it is; a config given for a lone file is written
        // the way transformers writes it.
        if !has_config_file {
            options.config = Some(cfg.clone());
        }
        if cfg.tie_word_embeddings() {
            if let Some(tie) = tied_output_embedding(&state)? {
                options.tied_weights.push(tie);
            } else if state.contains_key("lm_head.weight") {
                notes.push("config ties the embeddings but lm_head.weight differs from the input embedding: both kept".into());
            }
        }
    }
    if classified.layout == StateDictLayout::Burn {
        notes.push(
            "base tensors written with burn's names and layouts (Linear weights are [in, out])"
                .into(),
        );
    }
    Ok((state, options))
}

/// `("lm_head.weight", <input embedding>)` when both exist with equal values.
fn tied_output_embedding(state: &StateDict) -> Result<Option<(String, String)>, ExtractError> {
    let Some(head) = state.get("lm_head.weight") else {
        return Ok(None);
    };
    for (name, t) in state {
        if name == "lm_head.weight" || !name.ends_with(".weight") {
            continue;
        }
        let module = &name[..name.len() - ".weight".len()];
        let last = module.rsplit('.').next().unwrap_or(module);
        if ![
            "embed_tokens",
            "wte",
            "word_embeddings",
            "embed_in",
            "tok_embeddings",
            "shared",
        ]
        .contains(&last)
        {
            continue;
        }
        if t.dtype() == head.dtype() && t.shape() == head.shape() && t.bytes()? == head.bytes()? {
            return Ok(Some(("lm_head.weight".to_owned(), name.clone())));
        }
    }
    Ok(None)
}
