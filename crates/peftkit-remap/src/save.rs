//! Saving in the original layout, and converting whole checkpoint folders between layouts.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use peftkit_checkpoint::config::CONFIG_NAME;
use peftkit_checkpoint::reshard::companion_files;
use peftkit_checkpoint::{
    save_pretrained_with_progress, Checkpoint, ModelConfig, SaveOptions, SaveReport, StateDict,
    WeightsKind,
};

use crate::engine::{Mapping, Revert};
use crate::error::{RemapError, Result};
use crate::table::Registry;

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
    save_pretrained_original_with_progress(dir, v5_state, options, mapping, revert, &mut |_| {})
}

/// [`save_pretrained_original`] that reports data bytes written as it goes.
pub fn save_pretrained_original_with_progress(
    dir: &Path,
    v5_state: &StateDict,
    options: &SaveOptions,
    mapping: &Mapping,
    revert: &Revert,
    on_bytes: &mut dyn FnMut(u64),
) -> Result<SaveReport> {
    let original = mapping.reverse(v5_state, revert)?;
    Ok(save_pretrained_with_progress(
        dir, &original, options, on_bytes,
    )?)
}

/// The two layouts a checkpoint can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// The original on-disk layout (per-expert tensors, legacy names): what transformers writes
    /// with `save_original_format=True`, and what the Hub holds.
    Original,
    /// The transformers v5 module layout (fused experts): `save_original_format=False`.
    TransformersV5,
}

impl FromStr for Layout {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "original" => Ok(Layout::Original),
            "transformers-v5" | "v5" => Ok(Layout::TransformersV5),
            other => Err(format!(
                "unknown layout `{other}`: use `original` or `transformers-v5`"
            )),
        }
    }
}

/// Options of [`remap`].
#[derive(Debug, Clone, Default)]
pub struct RemapOptions {
    /// Shard size, variant and header metadata of the output (the source's header metadata is
    /// kept when the source has some). `extra_files` are added to the source's companion files.
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
}

/// What [`remap`] did.
#[derive(Debug, Clone)]
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
/// use peftkit_remap::{remap, Layout, RemapOptions};
/// let report = remap(Path::new("mixtral-v5"), Path::new("mixtral-hub"), Layout::Original, None,
///                    &RemapOptions::default()).unwrap();
/// println!("{} tensors converted with table {:?}", report.tensors_converted, report.table);
/// ```
pub fn remap(
    src: &Path,
    out: &Path,
    to: Layout,
    model_type: Option<&str>,
    options: &RemapOptions,
) -> Result<RemapReport> {
    remap_with_progress(src, out, to, model_type, options, &mut |_| {})
}

/// [`remap`] that reports data bytes written as it goes.
pub fn remap_with_progress(
    src: &Path,
    out: &Path,
    to: Layout,
    model_type: Option<&str>,
    options: &RemapOptions,
    on_bytes: &mut dyn FnMut(u64),
) -> Result<RemapReport> {
    let mut registry = Registry::builtin()?;
    for t in &options.tables {
        registry.add_table_file(t)?;
    }
    let dir = if src.is_file() {
        src.parent().map(Path::to_owned).unwrap_or_default()
    } else {
        src.to_owned()
    };
    let config_path = dir.join(CONFIG_NAME);
    let config = if config_path.is_file() {
        Some(ModelConfig::read(&config_path)?)
    } else {
        None
    };
    let model_type = match model_type {
        Some(t) => t.to_owned(),
        None => config
            .as_ref()
            .and_then(ModelConfig::model_type)
            .map(str::to_owned)
            .ok_or_else(|| RemapError::NoModelType { path: dir.clone() })?,
    };
    let mut mapping = registry.mapping(&model_type)?;
    if let Some(c) = &config {
        mapping = mapping.with_config(c.fields.clone());
    }
    let ckpt = Checkpoint::open_kind(src, WeightsKind::Model, options.src_variant.as_deref())?;
    let state = ckpt.state_dict();

    let (converted, rules) = match to {
        Layout::TransformersV5 => {
            let fwd = mapping.forward(&state)?;
            let rules = fwd
                .used
                .0
                .iter()
                .filter_map(|&i| mapping.rule_label(i))
                .collect();
            (fwd.state, rules)
        }
        Layout::Original => {
            for (name, _) in ckpt.tensors() {
                if let Some(rule) = mapping.forward_match(name) {
                    return Err(RemapError::AlreadyOriginal {
                        path: dir.clone(),
                        tensor: name.to_owned(),
                        table: mapping.table().unwrap_or("legacy").to_owned(),
                        rule,
                    });
                }
            }
            let (reverted, used) = mapping.reverse_used(&state, &options.revert)?;
            let rules = used
                .0
                .iter()
                .filter_map(|&i| mapping.rule_label(i))
                .collect();
            (reverted, rules)
        }
    };
    let tensors_converted = converted.keys().filter(|k| !state.contains_key(*k)).count();
    let mut save = options.save.clone();
    if src.is_dir() {
        let mut files = companion_files(src)?;
        files.append(&mut save.extra_files);
        save.extra_files = files;
    }
    if let Some(meta) = ckpt.metadata() {
        save.metadata = meta.clone();
    }
    let report = save_pretrained_with_progress(out, &converted, &save, on_bytes)?;
    Ok(RemapReport {
        save: report,
        model_type,
        table: mapping.table().map(str::to_owned),
        rules_applied: rules,
        tensors_converted,
    })
}
