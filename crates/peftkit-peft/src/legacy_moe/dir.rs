//! Folder in, folder out: [`convert_legacy_adapter_dir`].

use std::path::{Path, PathBuf};

use peftkit_checkpoint::{SaveReport, StateDict, WeightsKind};

use crate::adapter::Adapter;
use crate::adapter::{AdapterEntry, AdapterTensors, EntryKind};
use crate::classify::DEFAULT_ADAPTER_NAME;
use crate::config::{ADAPTER_CONFIG_NAME, LORA};
use crate::save::{save_adapter, AdapterSaveOptions};
use crate::spec::Spec;

use super::*;

/// What [`convert_legacy_adapter_dir`] wrote (`peftkit remap --json` of a legacy adapter).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConvertReport {
    /// The output folder.
    pub dir: PathBuf,
    /// The model type used.
    pub model_type: String,
    /// The conversion table used.
    pub table: String,
    /// Fused tensors written.
    pub fused_tensors: usize,
    /// Tensors written in all.
    pub tensors: usize,
    /// Input keys dropped ([`Untargeted::Drop`]).
    pub dropped: Vec<String>,
    /// Other files copied from the legacy folder.
    pub copied: Vec<String>,
    /// The weights written.
    pub save: SaveReport,
}

/// The `model_type` of a base model folder's `config.json` (for `--base`).
pub fn model_type_from_base(base_dir: &Path) -> Result<String, ConvertError> {
    let path = base_dir.join(peftkit_checkpoint::MODEL_CONFIG_NAME);
    let config = peftkit_checkpoint::ModelConfig::read(&path)?;
    config
        .model_type()
        .map(str::to_owned)
        .ok_or_else(|| ConvertError::Config {
            file: path,
            reason: "no `model_type`; pass the model type explicitly (--model-type)".into(),
        })
}

/// Converts the legacy adapter in `src_dir` and writes it to `out_dir` (replaced atomically),
/// with the default options. `model_type` `None`: read from `base_model_name_or_path` when
/// that is a local folder with a `config.json`, else an error asking for it.
pub fn convert_legacy_adapter_dir(
    src_dir: &Path,
    out_dir: &Path,
    model_type: Option<&str>,
) -> Result<ConvertReport, ConvertError> {
    convert_legacy_adapter_dir_with(src_dir, out_dir, model_type, &ConvertOptions::default())
}

/// [`convert_legacy_adapter_dir`] with options.
///
/// The folder gets `adapter_model.safetensors` (`{"format": "pt"}`), `adapter_config.json` (as
/// peft writes it, `target_modules` and `target_parameters` sorted) and every other file of the
/// legacy folder (its `README.md` model card, tokenizer files, …); without a model card, the
/// one peft writes for a new adapter.
pub fn convert_legacy_adapter_dir_with(
    src_dir: &Path,
    out_dir: &Path,
    model_type: Option<&str>,
    options: &ConvertOptions,
) -> Result<ConvertReport, ConvertError> {
    // The one overlap check of every writing verb (same folder, inside, containing).
    peftkit_checkpoint::ensure_apart(out_dir, &[src_dir])?;
    let adapter = Adapter::open(src_dir)?;
    let model_type = match model_type {
        Some(t) => t.to_owned(),
        None => {
            let base = adapter.config.base_model_name_or_path().unwrap_or("");
            let dir = Path::new(base);
            if !base.is_empty() && dir.join(peftkit_checkpoint::MODEL_CONFIG_NAME).is_file() {
                model_type_from_base(dir)?
            } else {
                return Err(ConvertError::NoModelType {
                    dir: src_dir.to_owned(),
                    base: base.to_owned(),
                });
            }
        }
    };
    let rules = rules_for(&adapter, &model_type)?;
    let converted = convert_with_rules(&adapter, &rules, options)?;

    let mut extra = Vec::new();
    let mut copied = Vec::new();
    let io = |path: &Path, source| ConvertError::Io {
        path: path.to_owned(),
        source,
    };
    let entries = std::fs::read_dir(src_dir).map_err(|e| io(src_dir, e))?;
    let mut names: Vec<(String, PathBuf)> = Vec::new();
    // `adapter_model`: the stem of single and sharded adapter weight files.
    let weights_stem = peftkit_checkpoint::WeightsNames::new(WeightsKind::Adapter, None)?.stem();
    for entry in entries {
        let entry = entry.map_err(|e| io(src_dir, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        // The legacy weights and config are what is being replaced.
        if !path.is_file() || name == ADAPTER_CONFIG_NAME || name.starts_with(&weights_stem) {
            continue;
        }
        names.push((name, path));
    }
    names.sort();
    for (name, path) in names {
        let bytes = std::fs::read(&path).map_err(|e| io(&path, e))?;
        extra.push((name.clone(), bytes));
        copied.push(name);
    }
    // The card goes in with the other files rather than through `write_model_card`, which
    // skips the card when `out_dir` already holds one: a converted folder replaces `out_dir`
    // whole, so it always carries the legacy card or a new one.
    if !copied.iter().any(|n| n == MODEL_CARD_NAME) {
        extra.push((
            MODEL_CARD_NAME.to_owned(),
            crate::save::model_card(&converted.config, None).into_bytes(),
        ));
    }
    // Written by the one adapter save path. One difference from the direct save it replaced:
    // a conversion that drops every tensor (`Untargeted::Drop` on an adapter of untargeted
    // modules only) is refused with `SaveError::EmptyAdapter` instead of writing an empty file.
    let tensors = as_adapter_tensors(&converted.state);
    let options = AdapterSaveOptions {
        write_model_card: false,
        extra_files: extra,
        ..AdapterSaveOptions::default()
    };
    let saved = save_adapter(
        out_dir,
        DEFAULT_ADAPTER_NAME,
        &tensors,
        &converted.config,
        &options,
    )?;
    Ok(ConvertReport {
        dir: out_dir.to_owned(),
        model_type,
        table: rules.table,
        fused_tensors: converted.fused.len(),
        tensors: converted.state.len(),
        dropped: converted.dropped,
        copied,
        save: saved.weights,
    })
}

/// The converted tensors as the entries `save_adapter` writes, under exactly the keys the
/// conversion produced: it writes each entry under its key, so the file is the one peft's
/// conversion gives. (`AdapterTensors::from_adapter_state_dict` would re-derive canonical keys
/// and drop keys outside `base_model.model.`, which the conversion passes through as peft
/// does.) Kinds are sorted as `Adapter::open` sorts a file's keys.
fn as_adapter_tensors(state: &StateDict) -> AdapterTensors {
    let spec = Spec::embedded();
    let mut tensors = AdapterTensors::new(DEFAULT_ADAPTER_NAME, LORA);
    for (key, tensor) in state {
        let kind = match spec.classify_key_for(LORA, key) {
            Some(class) => EntryKind::Adapter {
                role: class.role,
                module: class.module_path,
            },
            None => EntryKind::Replacement {
                base_key: spec.strip_model_prefix(key).0.replace(".base_layer.", "."),
            },
        };
        let entry = AdapterEntry {
            source_key: key.clone(),
            kind,
            tensor: tensor.clone(),
        };
        tensors.entries.insert(key.clone(), entry);
    }
    tensors
}
