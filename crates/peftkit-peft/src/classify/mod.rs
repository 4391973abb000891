//! Classification of any state dict that may hold adapter parameters, and inference of the
//! `adapter_config.json` peft would write for them (docs/formats.md, "PEFT adapters").
//!
//! Three input layouts are recognised (see [`StateDictLayout`]):
//!
//! * a **PEFT model state dict**, `PeftModel.state_dict()`: base parameters under
//!   `base_model.model.` with wrapped modules' parameters under `<m>.base_layer.`, adapter
//!   parameters with the adapter name inside (`<m>.lora_A.default.weight`,
//!   `<m>.lora_embedding_A.default`, `<m>.lora_magnitude_vector.default.weight`),
//!   `modules_to_save` as `<m>.original_module.<p>` + `<m>.modules_to_save.<name>.<p>`, trainable
//!   tokens as `<emb>.token_adapter.base_layer.weight` + `<emb>.token_adapter.trainable_tokens_delta.<name>`,
//!   prompt learning as `prompt_encoder.<name>.embedding.weight` next to `base_model.<base key>`;
//! * a **PEFT adapter file**: on-disk keys as peft writes them (`base_model.model.<m>.lora_A.weight`),
//!   plus replacement tensors (`modules_to_save` copies, embeddings saved with
//!   `save_embedding_layers`); keys without the `base_model.model.` prefix that are not adapter
//!   tensors are taken as base parameters (a Rust training state dict mixing both);
//! * tensors exported from **burn** (`<path>.weight.lora.a` `[d_in, r]`, `<path>.weight.lora.b`
//!   `[r, d_out]`), which are transposed to PEFT's `lora_A.weight` `[r, d_in]` /
//!   `lora_B.weight` `[d_out, r]` lazily, when written.
//!
//! The result ([`ClassifiedStateDict`]) has the base parameters under clean names (`base_layer.`,
//! `token_adapter.base_layer.` and `original_module.` removed, prefix stripped: the names of the
//! base checkpoint), and per adapter name its tensors under the on-disk keys peft writes
//! ([`AdapterTensors`]).
//!
//! ```
//! use peftkit_checkpoint::{Dtype, StateDict, Tensor};
//! use peftkit_peft::{classify_state_dict, ClassifyOptions, StateDictLayout};
//!
//! let t = |shape: Vec<usize>| {
//!     let n: usize = shape.iter().product();
//!     Tensor::from_bytes(Dtype::F32, shape, vec![0; 4 * n]).unwrap()
//! };
//! let mut sd = StateDict::new();
//! sd.insert("base_model.model.model.q_proj.base_layer.weight".into(), t(vec![8, 8]));
//! sd.insert("base_model.model.model.q_proj.lora_A.default.weight".into(), t(vec![2, 8]));
//! sd.insert("base_model.model.model.q_proj.lora_B.default.weight".into(), t(vec![8, 2]));
//! sd.insert("base_model.model.lm_head.weight".into(), t(vec![16, 8]));
//! let c = classify_state_dict(&sd, &ClassifyOptions::default()).unwrap();
//! assert_eq!(c.layout, StateDictLayout::PeftModel);
//! assert_eq!(c.base.keys().collect::<Vec<_>>(), ["model.q_proj.weight", "lm_head.weight"]);
//! let a = &c.adapters["default"];
//! assert_eq!(a.rank_of("model.q_proj"), Some(2));
//! assert!(a.entries.contains_key("base_model.model.model.q_proj.lora_A.weight"));
//! ```
//!
//! Layout: `keys` sorts the keys, `tensors` holds one adapter's tensors, `base` describes the
//! base model, `conv1d` tells `Conv1D` from Linear, `infer` writes the config peft would write,
//! `check` checks a given config against the tensors, `summary` feeds `peftkit inspect`.

use peftkit_checkpoint::{CheckpointError, Tensor};

use crate::adapter::{AdapterEntry, AdapterModule, AdapterTensors, EntryKind};
use crate::config::ConfigError;
use crate::targeting::TargetingError;

mod base;
mod check;
mod conv1d;
mod infer;
mod keys;
mod summary;
mod tensors;

#[cfg(test)]
mod tests;

pub use base::{BaseModelInfo, TaskTypeChoice};
pub use check::check_config;
pub use conv1d::conv1d_table;
pub use infer::{infer_config, infer_lora_structure, InferOptions, Inferred, LoraStructure};
pub use keys::{
    classify_state_dict, clean_base_key, ClassifiedStateDict, ClassifyOptions, StateDictLayout,
};
pub use summary::{
    describe_tensor, summarize_adapters, summarize_classified, summarize_path,
    summarize_path_variant, AdapterSummary, ScalingSummary,
};

use crate::embedded::EMBEDDED_CONV1D_MODULES_JSON;

/// The adapter name peft gives the first adapter.
pub const DEFAULT_ADAPTER_NAME: &str = "default";

/// Prefix of per-module keys in peft files and in a `PeftModel` state dict.
pub const MODEL_PREFIX: &str = "base_model.model.";

/// Prefix of the base model's keys in a prompt-learning `PeftModel` state dict.
pub const PROMPT_BASE_PREFIX: &str = "base_model.";

/// `peft.utils.constants.EMBEDDING_LAYER_NAMES`: names whose presence in `target_modules` makes
/// `save_embedding_layers="auto"` save the embedding.
pub const EMBEDDING_LAYER_NAMES: [&str; 2] = ["embed_tokens", "lm_head"];

/// Last name components of input embeddings, used where peft asks the model
/// (`get_input_embeddings()`) and peftkit only has names.
const INPUT_EMBEDDING_NAMES: [&str; 6] = [
    "embed_tokens",
    "wte",
    "word_embeddings",
    "embed_in",
    "tok_embeddings",
    "shared",
];

/// Last name components of output embeddings (`get_output_embeddings()`).
const OUTPUT_EMBEDDING_NAMES: [&str; 2] = ["lm_head", "embed_out"];

/// Errors classifying a state dict or inferring its adapter config. Each names the tensor (and
/// its file, when it comes from one) and says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClassifyError {
    /// In-memory (adapter name inside) and on-disk adapter keys in one state dict.
    #[error("{origin}: `{in_memory}` carries an adapter name but `{on_disk}` does not; a state dict must be either a PEFT model's state_dict() or an adapter file: split it and classify each part")]
    MixedKeyForms {
        /// File of the first key, or `<memory>`.
        origin: String,
        /// A key with an adapter name.
        in_memory: String,
        /// A key without.
        on_disk: String,
    },
    /// A burn LoRA factor that is not a matrix.
    #[error("{origin}: tensor `{key}` is a burn LoRA factor of shape {shape:?}; expected 2 dimensions ([d_in, r] for `.lora.a`, [r, d_out] for `.lora.b`)")]
    BurnShape {
        /// File of the tensor, or `<memory>`.
        origin: String,
        /// The key.
        key: String,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// Two keys map to the same on-disk adapter key.
    #[error("{origin}: `{first}` and `{second}` are both `{disk_key}` of adapter `{adapter}`; keep one of them")]
    Duplicate {
        /// File, or `<memory>`.
        origin: String,
        /// Adapter name.
        adapter: String,
        /// First key.
        first: String,
        /// Second key.
        second: String,
        /// The on-disk key both map to.
        disk_key: String,
    },
    /// Tensors of two methods under one adapter name.
    #[error("{origin}: `{key}` is a {found} tensor, but adapter `{adapter}` is a {method} adapter; pass the adapter config (--config) so keys are read with its method's rules, or split the state dict")]
    MixedMethods {
        /// File, or `<memory>`.
        origin: String,
        /// The key.
        key: String,
        /// Adapter name.
        adapter: String,
        /// Method of the adapter's other tensors.
        method: String,
        /// Method this key belongs to.
        found: String,
    },
    /// Something the tensors do not determine.
    #[error("adapter `{adapter}`: {what} cannot be inferred from the tensors: {reason}; pass the adapter_config.json the adapter was trained with (--config)")]
    NeedsConfig {
        /// Adapter name.
        adapter: String,
        /// The field or feature.
        what: String,
        /// Why.
        reason: String,
    },
    /// `lora_alpha` was not given.
    #[error("adapter `{adapter}`: lora_alpha cannot be inferred from the tensors (the factors carry no alpha: only alpha/r scales B·A); pass --lora-alpha or --config")]
    MissingAlpha {
        /// Adapter name.
        adapter: String,
    },
    /// A tensor whose shape contradicts the others of its module or the base weight.
    #[error("{origin}: tensor `{key}` (module `{module}`): {reason}")]
    Inconsistent {
        /// File, or `<memory>`.
        origin: String,
        /// The key.
        key: String,
        /// The module path.
        module: String,
        /// What does not fit.
        reason: String,
    },
    /// A module's rank differs from what the config says.
    #[error("{origin}: module `{module}` has rank {tensor_rank} (tensor `{key}`, shape {shape:?}) but the config gives it rank {config_rank}; fix `r` / `rank_pattern` or pass the config the adapter was trained with")]
    RankMismatch {
        /// File, or `<memory>`.
        origin: String,
        /// The module path.
        module: String,
        /// The `A` tensor's key.
        key: String,
        /// Its shape.
        shape: Vec<usize>,
        /// Rank from the tensor.
        tensor_rank: u64,
        /// Rank from the config.
        config_rank: u64,
    },
    /// Another config field contradicts the tensors.
    #[error("adapter `{adapter}`: config field `{field}` disagrees with the tensors: {reason}")]
    ConfigMismatch {
        /// Adapter name.
        adapter: String,
        /// The config field.
        field: String,
        /// What disagrees.
        reason: String,
    },
    /// The requested adapter is not in the state dict.
    #[error("no adapter named `{name}` in the state dict (found: {found}); choose one of those")]
    UnknownAdapter {
        /// The name asked for.
        name: String,
        /// The names found.
        found: String,
    },
    /// Several adapters and none chosen.
    #[error("the state dict holds several adapters ({found}): choose one (--adapter-name)")]
    AmbiguousAdapter {
        /// The names found.
        found: String,
    },
    /// The embedded or user Conv1D table is invalid.
    #[error("adapters-spec conv1d_modules.json: {0}")]
    Conv1dTable(String),
    /// A config error.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A targeting rule failed to compile or run.
    #[error(transparent)]
    Targeting(#[from] TargetingError),
    /// Reading tensors failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

/// The file a tensor is read from, for error messages (`<memory>` for buffers and lazy tensors).
pub fn origin_of(t: &Tensor) -> String {
    t.file_source()
        .map(|(p, _)| p.display().to_string())
        .unwrap_or_else(|| "<memory>".to_owned())
}
