//! Legacy MoE LoRA adapters (trained on transformers v4, one LoRA pair per expert projection)
//! converted to the fused layout of transformers v5, as peft 0.21.2 does when it loads such an
//! adapter on a v5 model (`convert_peft_config_for_transformers` and
//! `convert_peft_adapter_state_dict_for_transformers`, then `save_pretrained`).
//!
//! transformers v5 holds the experts of Mixtral-style and Qwen2-MoE-style models as fused
//! parameters (`mlp.experts.gate_up_proj [E, 2I, H]`, `mlp.experts.down_proj [E, H, I]`), which
//! peft adapts with `target_parameters` (`lora.ParamWrapper`). A legacy adapter has
//! `block_sparse_moe.experts.{e}.w1.lora_A.weight` and so on. The conversion:
//!
//! * **config**: every `target_modules` entry naming an expert projection (`w1`, `w3`, `w2`) or
//!   the router (`gate`) leaves `target_modules` and its v5 parameter (`gate_up_proj`,
//!   `down_proj`, `gate.weight`) joins `target_parameters`; a fused parameter made of several
//!   projections gets `rank_pattern[".*\.gate_up_proj"] = n·r` and
//!   `alpha_pattern[".*\.gate_up_proj"] = n·lora_alpha` (n = 2), so `alpha/r` is unchanged.
//! * **tensors**: for a fused parameter of `n` parts and `E` experts, `A` is every expert's
//!   parts' `A`s stacked along the rank, expert-major: `A[e·R + k]` with `R = Σ r_p`; `B` is the
//!   block-diagonal `[[B_w1, 0], [0, B_w3]]` of each expert, laid out rank-major:
//!   `B[o, k·E + e]` (the column order of peft's `lora.ParamWrapper`, `tuners/lora/layer.py`). The keys are
//!   those of the nested wrappers: the first fused parameter of a module (in the table's order,
//!   which is the parameters' registration order) is the innermost wrapper
//!   (`mlp.experts.base_layer.lora_A.weight`), the last the outermost
//!   (`mlp.experts.lora_A.weight`). Other LoRA keys are renamed as the table renames their
//!   module (`block_sparse_moe.gate` -> `mlp.gate`); keys without `.lora_` pass through.
//!
//! What is model specific comes from data: the per-expert modules, the fused parameter each
//! belongs to and the concatenation order from the conversion table of the model
//! (`adapters-spec/conversions/`, the same `stack`/`concat` converters that fuse the base
//! weights), and the model types peft converts plus the renamed router targets from
//! `adapters-spec/legacy_moe_adapters.json`.
//!
//! Every output tensor is lazy: it reads its source tensors when the writer reaches it, so
//! memory stays at one fused tensor.
//!
//! Where peft 0.21.2 would write an adapter it cannot load, this module refuses instead of
//! copying the mistake (see [`ConvertError`]): a fused parameter targeted without all of its
//! parts, LoRA pairs of modules the rewritten config no longer targets (a Qwen-style
//! `shared_expert.gate_proj` when `gate_proj` was a target; [`Untargeted::Drop`] drops them as
//! peft does), `lora_dropout` (which `lora.ParamWrapper` refuses; [`ConvertOptions::zero_dropout`]),
//! and a lone fused parameter, which is keyed for the wrapper it really gets.
//!
//! ```no_run
//! use std::path::Path;
//! use peftkit_peft::convert_legacy_adapter_dir;
//!
//! let report = convert_legacy_adapter_dir(
//!     Path::new("mixtral-lora-v4"),
//!     Path::new("mixtral-lora-v5"),
//!     Some("mixtral"),
//! )
//! .unwrap();
//! println!("{} fused tensors written", report.fused_tensors);
//! ```
//!
//! Layout: `rules` (what the data says about a model type), `config` (peft's
//! `_convert_peft_config_moe`), `fuse` (the tensors), `dir` (folder in, folder out).

use std::path::PathBuf;

use peftkit_checkpoint::{CheckpointError, StateDict};
use peftkit_remap::{Registry, RemapError};

use crate::adapter::{Adapter, AdapterError};
use crate::config::AdapterConfig;
use crate::config::ADAPTER_CONFIG_NAME;

use crate::embedded::LEGACY_MOE_ADAPTERS_JSON;

mod config;
mod dir;
mod fuse;
mod rules;

#[cfg(test)]
mod tests;

pub use dir::{
    convert_legacy_adapter_dir, convert_legacy_adapter_dir_with, model_type_from_base,
    ConvertReport,
};
pub use fuse::convert_with_rules;
pub use rules::{supported_model_types, FusedParam, LegacyMoeRules};

use config::{rewrite_config, targets_module, targets_param};

use crate::classify::MODEL_PREFIX;

use crate::save::{SaveError, MODEL_CARD_NAME};

// A write error keeps the `Checkpoint` variant it had before conversions were saved through
// `save_adapter`; the rest is boxed, as `SaveError` is large.
impl From<SaveError> for ConvertError {
    fn from(e: SaveError) -> Self {
        match e {
            SaveError::Checkpoint(e) => ConvertError::Checkpoint(e),
            other => ConvertError::Save(Box::new(other)),
        }
    }
}

/// Why a legacy adapter cannot be converted. Every variant names the file, and the tensor
/// where there is one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConvertError {
    /// The adapter folder could not be loaded.
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    /// Reading a source tensor or writing the output failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The conversion tables could not be loaded, or refused a tensor.
    #[error("{file}: {source}")]
    Remap {
        /// The adapter weights file (or the table, for table errors).
        file: PathBuf,
        /// The table's error (it names the tensor).
        #[source]
        source: RemapError,
    },
    /// `adapters-spec/legacy_moe_adapters.json` is not of the documented shape.
    #[error("adapters-spec/legacy_moe_adapters.json: {0}")]
    InvalidSpec(String),
    /// Only LoRA adapters are converted (peft converts nothing else).
    #[error("{file}: peft_type is {peft_type}; peft converts only LoRA adapters to the transformers v5 layout, so this adapter is used as it is")]
    NotLora {
        /// The adapter config.
        file: PathBuf,
        /// Its `peft_type`.
        peft_type: String,
    },
    /// A model type peft does not convert legacy adapters for.
    #[error("{file}: peft 0.21.2 does not convert legacy adapters for model_type `{model_type}`{hint}; model types it converts: {known}")]
    UnsupportedModelType {
        /// The adapter config.
        file: PathBuf,
        /// The model type asked for.
        model_type: String,
        /// Why, when known (`: …`).
        hint: String,
        /// The model types that are converted.
        known: String,
    },
    /// No model type was given and none could be found.
    #[error("{dir}: the model type is unknown (base_model_name_or_path `{base}` is not a local folder with a config.json); pass it (--model-type, e.g. mixtral) or read it from the base model's config.json (--base)")]
    NoModelType {
        /// The adapter folder.
        dir: PathBuf,
        /// Its `base_model_name_or_path` (empty when null).
        base: String,
    },
    /// The adapter config cannot be converted as it is.
    #[error("{file}: {reason}")]
    Config {
        /// The adapter config.
        file: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// An adapter tensor that does not fit the fused layout.
    #[error("{file}: tensor `{tensor}`: {reason}")]
    Tensor {
        /// The adapter weights file.
        file: PathBuf,
        /// The tensor's key.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// LoRA tensors of a module that the converted config no longer targets.
    #[error("{file}: tensor `{tensor}` adapts `{module}`, which the converted config no longer targets ({why}); peft 0.21.2 silently skips it when it loads the adapter on transformers v5. ConvertOptions::untargeted = Untargeted::Drop drops such tensors as peft does")]
    Untargeted {
        /// The adapter weights file.
        file: PathBuf,
        /// The first such tensor.
        tensor: String,
        /// Its module, in v5 names.
        module: String,
        /// Why it is no longer targeted.
        why: String,
    },
    /// Writing the converted adapter failed other than in its files (see
    /// [`ConvertError::Checkpoint`] for those).
    #[error(transparent)]
    Save(Box<SaveError>),
    /// A file of the adapter folder could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// What to do with LoRA tensors of modules the converted config no longer targets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Untargeted {
    /// Refuse the conversion, naming the first such tensor (default): the adapter would lose
    /// part of what it learned without a word.
    #[default]
    Error,
    /// Leave them out, as peft's load and save does.
    Drop,
}

/// Options of [`convert_legacy_experts_with`] and [`convert_legacy_adapter_dir_with`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConvertOptions {
    /// LoRA pairs of modules the converted config no longer targets.
    pub untargeted: Untargeted,
    /// Set `lora_dropout` to 0 when the config gains `target_parameters`: peft's
    /// `lora.ParamWrapper` refuses dropout ("does not work with lora_dropout != 0"), so peft
    /// 0.21.2 cannot load a legacy adapter trained with dropout at all. Dropout only acts in
    /// training; inference and merges do not change.
    pub zero_dropout: bool,
}

peftkit_checkpoint::option_setters!(ConvertOptions {
    untargeted: Untargeted,
    zero_dropout: bool,
});

/// The result of [`convert_legacy_experts_with`].
#[derive(Debug, Clone)]
pub struct Converted {
    /// The converted config (`inference_mode: true`, as peft's save writes it).
    pub config: AdapterConfig,
    /// The converted tensors under their on-disk keys (`base_model.model.…`), lazy.
    pub state: StateDict,
    /// Keys of fused tensors written.
    pub fused: Vec<String>,
    /// Input keys dropped ([`Untargeted::Drop`]).
    pub dropped: Vec<String>,
}

/// Converts a legacy adapter with the default options: the config peft writes after loading it
/// on a transformers v5 model of type `model_type`, and its tensors under their on-disk keys.
pub fn convert_legacy_experts(
    adapter: &Adapter,
    model_type: &str,
) -> Result<(AdapterConfig, StateDict), ConvertError> {
    let c = convert_legacy_experts_with(adapter, model_type, &ConvertOptions::default())?;
    Ok((c.config, c.state))
}

/// [`convert_legacy_experts`] with options, also listing what was fused and dropped.
pub fn convert_legacy_experts_with(
    adapter: &Adapter,
    model_type: &str,
    options: &ConvertOptions,
) -> Result<Converted, ConvertError> {
    let rules = rules_for(adapter, model_type)?;
    convert_with_rules(adapter, &rules, options)
}

/// The built-in rules of `model_type`, errors naming the adapter's config.
fn rules_for(adapter: &Adapter, model_type: &str) -> Result<LegacyMoeRules, ConvertError> {
    let registry = Registry::builtin().map_err(|source| ConvertError::Remap {
        file: PathBuf::from("adapters-spec/conversions"),
        source,
    })?;
    LegacyMoeRules::with_registry(
        &registry,
        model_type,
        &adapter.dir.join(ADAPTER_CONFIG_NAME),
    )
}
