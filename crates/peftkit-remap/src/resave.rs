//! Re-saving checkpoints: a v5 state dict saved in the original layout, and whole checkpoint
//! folders converted between layouts ([`remap`]) or re-sharded ([`reshard`]).

use std::path::{Path, PathBuf};
use std::str::FromStr;

use peftkit_checkpoint::companion_files;
use peftkit_checkpoint::{cast_state_dict, Dtype, MODEL_CONFIG_NAME, TRANSFORMERS_VERSION};
use peftkit_checkpoint::{
    save_pretrained, Checkpoint, ModelConfig, SaveOptions, SaveReport, StateDict, WeightsKind,
};

use crate::engine::{Mapping, Revert};
use crate::error::{RemapError, Result};
use crate::registry::Registry;

/// `save_pretrained(save_original_format=True)`: reverts `v5_state` with `mapping` (in
/// transformers' order, with storage families) and saves it with
/// [`peftkit_checkpoint::save_pretrained`].
///
/// `v5_state` may be in any order: transformers sorts it by natural order before reverting
/// (unless `revert` selects no rule at all, see [`Revert::FromConfig`]).
///
/// ```
/// use peftkit_checkpoint::{Checkpoint, Dtype, SaveOptions, StateDict, Tensor};
/// use peftkit_remap::{save_pretrained_original, Registry, Revert};
///
/// let mapping = Registry::builtin().unwrap().mapping("qwen2_moe").unwrap();
/// let mut v5 = StateDict::new();
/// v5.insert("model.layers.0.mlp.experts.down_proj".into(),
///           Tensor::from_bytes(Dtype::F32, vec![2, 4, 3], vec![0; 96]).unwrap());
/// let dir = tempfile::tempdir().unwrap();
/// save_pretrained_original(dir.path(), &v5, &SaveOptions::default(), &mapping, &Revert::FromConfig).unwrap();
/// let saved = Checkpoint::open(dir.path()).unwrap();
/// assert_eq!(saved.get("model.layers.0.mlp.experts.1.down_proj.weight").unwrap().shape(), &[4, 3]);
/// ```
pub fn save_pretrained_original(
    dir: &Path,
    v5_state: &StateDict,
    options: &SaveOptions,
    mapping: &Mapping,
    revert: &Revert,
) -> Result<SaveReport> {
    let original = mapping.reverse(v5_state, revert)?;
    Ok(save_pretrained(dir, &original, options)?)
}

/// The two tensor layouts a checkpoint can be written in: which tensors it holds and under
/// which names (how its files are split is [`peftkit_checkpoint::FileLayout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorLayout {
    /// The original on-disk layout (per-expert tensors, legacy names): what transformers writes
    /// with `save_original_format=True`, and what the Hub holds.
    Original,
    /// The transformers v5 module layout (fused experts): `save_original_format=False`.
    TransformersV5,
}

impl FromStr for TensorLayout {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "original" => Ok(TensorLayout::Original),
            "transformers-v5" | "v5" => Ok(TensorLayout::TransformersV5),
            other => Err(format!(
                "unknown layout `{other}`: use `original` or `transformers-v5`"
            )),
        }
    }
}

/// Options of [`remap`].
#[derive(Debug, Clone, Default)]
pub struct RemapOptions {
    /// Shard size, variant, header metadata and progress of the output (the source's header
    /// metadata is kept when the source has some). `extra_files` are added to the source's
    /// companion files; `save.progress` is told the bytes written.
    pub save: SaveOptions,
    /// Variant of the source weights (`model.fp16.safetensors`).
    pub src_variant: Option<String>,
    /// Which rules `--to original` undoes (default: transformers' rules for a model built
    /// from its config; [`Revert::AllTableRules`] also restores load-only levels such as
    /// Llava's `vision_tower.vision_model.`).
    pub revert: Revert,
    /// Conversion table files added to the embedded ones (a table of the same name replaces
    /// the embedded one; its `model_types` become aliases).
    pub tables: Vec<PathBuf>,
    /// Write over `src` itself (`--in-place`): `out` must then be `src`. The save stays
    /// atomic: the old content is kept until the new folder is swapped in.
    pub in_place: bool,
}

peftkit_checkpoint::option_setters!(RemapOptions {
    save: SaveOptions,
    src_variant: Some(String),
    revert: Revert,
    tables: Vec<PathBuf>,
});

/// What [`remap`] did (`peftkit remap --json`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct RemapReport {
    /// The save.
    pub save: SaveReport,
    /// The model type used.
    pub model_type: String,
    /// The table serving it, if any (`None`: only the `legacy` renames apply).
    pub table: Option<String>,
    /// Labels of the rules that changed at least one name.
    pub rules_applied: Vec<String>,
    /// Tensors whose name or data changed.
    pub tensors_converted: usize,
}

/// Converts the model checkpoint in `src` to layout `to` and writes it to `out`, copying
/// every other file of `src` (config, tokenizer, …) unchanged.
///
/// The model type comes from `model_type`, or else `config.json`. Tensors are streamed: a
/// renamed tensor is copied from its file, a converted one gathers only its own source bytes.
///
/// * `--to transformers-v5` gives the tensors `from_pretrained` would hold, in natural order of
///   their names: byte for byte what transformers writes when it re-saves a v5 checkpoint
///   loaded with `from_pretrained`, and, for a single-file output, what
///   `save_pretrained(save_original_format=False)` writes for a model loaded from `src`.
/// * `--to original` reverts v5 names with [`Mapping::reverse`] and `options.revert`. A
///   checkpoint that already has original-layout names is refused
///   ([`RemapError::AlreadyOriginal`]) instead of being renamed twice.
///
/// ```no_run
/// use std::path::Path;
/// use peftkit_remap::{remap, TensorLayout, RemapOptions};
/// let report = remap(Path::new("mixtral-v5"), Path::new("mixtral-hub"), TensorLayout::Original, None,
///                    &RemapOptions::default()).unwrap();
/// println!("{} tensors converted with table {:?}", report.tensors_converted, report.table);
/// ```
pub fn remap(
    src: &Path,
    out: &Path,
    to: TensorLayout,
    model_type: Option<&str>,
    options: &RemapOptions,
) -> Result<RemapReport> {
    peftkit_checkpoint::ensure_output(out, &[src], options.in_place.then_some(src))?;
    let source = Source::open(
        src,
        options.src_variant.as_deref(),
        model_type,
        &options.tables,
    )?;
    let Some(model_type) = source.model_type.clone() else {
        return Err(RemapError::NoModelType { path: source.dir });
    };
    let mapping = &source.mapping;
    let state = source.ckpt.state_dict();

    let (converted, rules) = match to {
        TensorLayout::TransformersV5 => {
            let fwd = mapping.forward(&state)?;
            (fwd.state, mapping.rule_labels(&fwd.used))
        }
        TensorLayout::Original => {
            for (name, _) in source.ckpt.tensors() {
                if let Some(rule) = mapping.forward_match(name) {
                    return Err(RemapError::AlreadyOriginal {
                        path: source.dir.clone(),
                        tensor: name.to_owned(),
                        table: mapping.table().unwrap_or("legacy").to_owned(),
                        rule,
                    });
                }
            }
            let (reverted, used) = mapping.reverse_used(&state, &options.revert)?;
            (reverted, mapping.rule_labels(&used))
        }
    };
    let tensors_converted = converted.keys().filter(|k| !state.contains_key(*k)).count();
    let save = source.save_options(src, &options.save)?;
    let report = save_pretrained(out, &converted, &save)?;
    Ok(RemapReport {
        save: report,
        model_type,
        table: mapping.table().map(str::to_owned),
        rules_applied: rules,
        tensors_converted,
    })
}

/// Options of [`reshard`].
#[derive(Debug, Clone, Default)]
pub struct ReshardOptions {
    /// Shard size, variant, header metadata and progress of the output (the source's header
    /// metadata is kept when the source has some). `extra_files` are added to the source's
    /// companion files; `save.progress` is told the bytes written.
    pub save: SaveOptions,
    /// Variant of the source weights (`model.fp16.safetensors`).
    pub src_variant: Option<String>,
    /// The model type whose conversion table applies (default: `config.json`'s `model_type`;
    /// with neither, only the `legacy` renames).
    pub model_type: Option<String>,
    /// Conversion table files added to the embedded ones.
    pub tables: Vec<PathBuf>,
    /// Write over `src` itself (`--in-place`): `out` must then be `src`. The save stays
    /// atomic: the old content is kept until the new folder is swapped in.
    pub in_place: bool,
    /// Cast every floating tensor to this dtype, as `from_pretrained(src, dtype=...)` does
    /// (see [`peftkit_checkpoint::cast_tensor`]); `config.json`'s `dtype` follows.
    pub dtype: Option<Dtype>,
}

peftkit_checkpoint::option_setters!(ReshardOptions {
    save: SaveOptions,
    src_variant: Some(String),
    model_type: Some(String),
    tables: Vec<PathBuf>,
    dtype: Some(Dtype),
});

/// What [`reshard`] did (`peftkit reshard --json`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReshardReport {
    /// The save.
    pub save: SaveReport,
    /// The model type used, if one was known.
    pub model_type: Option<String>,
    /// The table serving it, if any.
    pub table: Option<String>,
    /// Labels of the rules loading would apply to the source (and saving reverts): empty for a
    /// checkpoint already in the v5 layout.
    pub rules_used: Vec<String>,
}

/// Re-saves the model checkpoint in `src` into `out` exactly as
/// `from_pretrained(src).save_pretrained(out, max_shard_size=…, variant=…)` does with
/// transformers 5.24, copying every other file of `src` (config, tokenizer, …) unchanged.
///
/// transformers holds the model in the v5 layout and plans shards on that: the tensors are
/// taken through [`Mapping::round_trip`] (load, then save with the rules the load used) and
/// planned by [`peftkit_checkpoint::plan_save`]. An original-layout MoE checkpoint comes back
/// in its own names and bytes, but in the fused model's order, each layer's per-expert views of
/// one fused tensor kept together; a v5 checkpoint comes back in natural order of its names.
/// Tensors are streamed from the source files.
///
/// ```no_run
/// use std::path::Path;
/// use peftkit_checkpoint::{parse_size, SaveOptions};
/// use peftkit_remap::{reshard, ReshardOptions};
/// let options = ReshardOptions {
///     save: SaveOptions { max_shard_size: parse_size("5GB").unwrap(), ..Default::default() },
///     ..Default::default()
/// };
/// let report = reshard(Path::new("mixtral"), Path::new("mixtral-5GB"), &options).unwrap();
/// println!("{} files, table {:?}", report.save.weight_files.len(), report.table);
/// ```
pub fn reshard(src: &Path, out: &Path, options: &ReshardOptions) -> Result<ReshardReport> {
    peftkit_checkpoint::ensure_output(out, &[src], options.in_place.then_some(src))?;
    let source = Source::open(
        src,
        options.src_variant.as_deref(),
        options.model_type.as_deref(),
        &options.tables,
    )?;
    let saved = source.mapping.round_trip(&source.ckpt.state_dict())?;
    let state = match options.dtype {
        Some(d) => cast_state_dict(&saved.state, d)?,
        None => saved.state,
    };
    let mut save = source.save_options(src, &options.save)?;
    // A `.bin` holds tied weights twice; transformers keeps the tie source only.
    save.tied_weights.extend(source.ckpt.ties().iter().cloned());
    if options.dtype.is_some() || source.ckpt.is_pickle() {
        source.rewrite_config(&mut save);
    }
    let report = save_pretrained(out, &state, &save)?;
    Ok(ReshardReport {
        save: report,
        table: source.mapping.table().map(str::to_owned),
        rules_used: source.mapping.rule_labels(&saved.used),
        model_type: source.model_type,
    })
}

/// Converts the checkpoint or adapter in `src` (`.bin` or safetensors weights) into
/// safetensors in `out`, as transformers and peft save what they loaded:
///
/// * a model checkpoint (`pytorch_model.bin`, sharded or not, or safetensors) is re-saved as
///   [`reshard`] does, i.e. `from_pretrained(src).save_pretrained(out)`, with `config.json`
///   rewritten as transformers writes it; tied weights stored twice are written once;
/// * an adapter (`adapter_model.bin` beside `adapter_config.json`) becomes
///   `adapter_model.safetensors` as peft's safetensors save writes it, in one file; its other
///   files are copied. peft loads float16/bfloat16 adapter weights into float32 parameters
///   (`autocast_adapter_dtype`), so its re-save of such an adapter is `dtype: Some(F32)`.
///
/// `options.dtype` casts floating tensors with torch's rounding.
///
/// ```no_run
/// use std::path::Path;
/// use peftkit_remap::{convert, ReshardOptions};
/// let report = convert(Path::new("old-model"), Path::new("old-model-st"), &ReshardOptions::default()).unwrap();
/// println!("{:?}", report.save.weight_files);
/// ```
pub fn convert(src: &Path, out: &Path, options: &ReshardOptions) -> Result<ReshardReport> {
    if !is_adapter(src) {
        return reshard(src, out, options);
    }
    peftkit_checkpoint::ensure_apart(out, &[src])?;
    let ckpt = Checkpoint::open_kind(src, WeightsKind::Adapter, None)?;
    let state = match options.dtype {
        Some(d) => cast_state_dict(&ckpt.state_dict(), d)?,
        None => ckpt.state_dict(),
    };
    let mut save = options.save.clone();
    save.kind = WeightsKind::Adapter;
    // peft writes an adapter with one `safe_save_file`, never in shards.
    save.max_shard_size = u64::MAX;
    save.tied_weights.extend(ckpt.ties().iter().cloned());
    if src.is_dir() {
        let mut files = companion_files(src)?;
        files.append(&mut save.extra_files);
        save.extra_files = files;
    }
    Ok(ReshardReport {
        save: save_pretrained(out, &state, &save)?,
        model_type: None,
        table: None,
        rules_used: Vec::new(),
    })
}

/// An adapter folder or file, by its file names.
fn is_adapter(src: &Path) -> bool {
    let name = |p: &Path| p.file_name().and_then(|n| n.to_str()).map(str::to_owned);
    if src.is_file() {
        return name(src).is_some_and(|n| n.starts_with("adapter_model"));
    }
    [
        "adapter_config.json",
        "adapter_model.bin",
        "adapter_model.safetensors",
    ]
    .iter()
    .any(|f| src.join(f).is_file())
}

/// The rules transformers applies to a checkpoint: those of `model_type`, or else of
/// `config`'s `model_type`, with `config`'s fields for sizes; only the `legacy` renames when
/// neither names a model type.
pub fn checkpoint_mapping(
    registry: &Registry,
    config: Option<&ModelConfig>,
    model_type: Option<&str>,
) -> Result<Mapping> {
    let model_type = model_type.or_else(|| config.and_then(ModelConfig::model_type));
    let mut mapping = match model_type {
        Some(t) => registry.mapping(t)?,
        None => registry.mapping_without_table()?,
    };
    if let Some(c) = config {
        mapping = mapping.with_config(c.fields.clone());
    }
    Ok(mapping)
}

/// A checkpoint opened for a re-save: its tensors, and the rules of its model type.
pub(crate) struct Source {
    pub(crate) dir: PathBuf,
    pub(crate) ckpt: Checkpoint,
    pub(crate) config: Option<ModelConfig>,
    pub(crate) model_type: Option<String>,
    pub(crate) mapping: Mapping,
}

impl Source {
    pub(crate) fn open(
        src: &Path,
        src_variant: Option<&str>,
        model_type: Option<&str>,
        tables: &[PathBuf],
    ) -> Result<Self> {
        let mut registry = Registry::builtin()?;
        for t in tables {
            registry.add_table_file(t)?;
        }
        let dir = if src.is_file() {
            src.parent().map(Path::to_owned).unwrap_or_default()
        } else {
            src.to_owned()
        };
        let config_path = dir.join(MODEL_CONFIG_NAME);
        let config = if config_path.is_file() {
            Some(ModelConfig::read(&config_path)?)
        } else {
            None
        };
        let mapping = checkpoint_mapping(&registry, config.as_ref(), model_type)?;
        let model_type = model_type
            .or_else(|| config.as_ref().and_then(ModelConfig::model_type))
            .map(str::to_owned);
        let ckpt = Checkpoint::open_kind(src, WeightsKind::Model, src_variant)?;
        Ok(Source {
            dir,
            ckpt,
            config,
            model_type,
            mapping,
        })
    }

    /// Writes `config.json` as transformers re-saves it instead of copying it: `dtype` set
    /// from the tensors written and `transformers_version` its own (a `.bin` checkpoint's
    /// config is usually a transformers v4 one, and a cast changes the dtype).
    fn rewrite_config(&self, save: &mut SaveOptions) {
        let Some(mut config) = self.config.clone() else {
            return;
        };
        config.fields.insert(
            "transformers_version".into(),
            serde_json::Value::String(TRANSFORMERS_VERSION.into()),
        );
        save.extra_files
            .retain(|(name, _)| name != MODEL_CONFIG_NAME);
        save.config = Some(config);
    }

    /// `options` with the source's companion files (before `options.extra_files`) and header
    /// metadata.
    fn save_options(&self, src: &Path, options: &SaveOptions) -> Result<SaveOptions> {
        let mut save = options.clone();
        if src.is_dir() {
            let mut files = companion_files(src)?;
            files.append(&mut save.extra_files);
            save.extra_files = files;
        }
        if let Some(meta) = self.ckpt.metadata() {
            save.metadata = meta.clone();
        }
        Ok(save)
    }
}
