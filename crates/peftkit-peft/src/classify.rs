//! Classification of any state dict that may hold adapter parameters, and inference of the
//! `adapter_config.json` peft would write for them (reference §2, §3, §4).
//!
//! Three input layouts are recognised (see [`Layout`]):
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
//! use peftkit_peft::classify::{classify_state_dict, ClassifyOptions, Layout};
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
//! assert_eq!(c.layout, Layout::PeftModel);
//! assert_eq!(c.base.keys().collect::<Vec<_>>(), ["model.q_proj.weight", "lm_head.weight"]);
//! let a = &c.adapters["default"];
//! assert_eq!(a.rank_of("model.q_proj"), Some(2));
//! assert!(a.entries.contains_key("base_model.model.model.q_proj.lora_A.weight"));
//! ```

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;
use std::sync::OnceLock;

use indexmap::IndexMap;
use peftkit_checkpoint::tensor::{dtype_name, dtype_size};
use peftkit_checkpoint::{
    Checkpoint, CheckpointError, ModelConfig, StateDict, Tensor, WeightsKind,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Number, Value};

use crate::config::{
    AdapterConfig, ConfigError, GenericConfig, LoraConfig, TargetModules, TrainableTokenIndices,
    CONFIG_NAME, LORA, PEFT_VERSION,
};
use crate::py::{name_matches_suffix, re_escape, PyRegex};
use crate::spec::{remove_adapter_name, KeyClass, Spec};
use crate::targeting::{
    minimal_target_suffixes, PatternResolver, TargetMatcher, TargetingError, ALL_LINEAR,
};

/// The adapter name peft gives the first adapter.
pub const DEFAULT_ADAPTER_NAME: &str = "default";

/// Prefix of per-module keys in peft files and in a `PeftModel` state dict.
pub const MODEL_PREFIX: &str = "base_model.model.";

/// Prefix of the base model's keys in a prompt-learning `PeftModel` state dict.
pub const PROMPT_BASE_PREFIX: &str = "base_model.";

/// `peft.utils.constants.EMBEDDING_LAYER_NAMES`: names whose presence in `target_modules` makes
/// `save_embedding_layers="auto"` save the embedding.
pub const EMBEDDING_LAYER_NAMES: [&str; 2] = ["embed_tokens", "lm_head"];

/// `adapters-spec/conv1d_modules.json` as embedded at build time: per `model_type`, the module
/// names (dotted suffixes) that transformers builds as GPT-2 style `Conv1D`.
pub const EMBEDDED_CONV1D_MODULES_JSON: &str =
    include_str!("../../../adapters-spec/conv1d_modules.json");

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

/// What kind of state dict was classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// `PeftModel.state_dict()`: adapter names inside the keys, wrapped base parameters under
    /// `base_layer`.
    PeftModel,
    /// On-disk adapter keys (an `adapter_model.safetensors`, or a Rust state dict using them).
    PeftAdapter,
    /// burn LoRA factors (`<path>.weight.lora.a` / `.lora.b`).
    Burn,
    /// No adapter tensor at all: a plain checkpoint.
    Base,
}

/// What an adapter entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A tensor of the adapter's method: its role (`a`, `b`, `b_bias`, `embedding_a`,
    /// `magnitude`, `trainable_tokens`, `prompt_embeddings`, …; see adapters-spec/methods.json)
    /// and module path (`None` for model-level and prompt-learning tensors).
    Adapter {
        /// The rule's role.
        role: String,
        /// The module path in the base model.
        module: Option<String>,
    },
    /// A `modules_to_save` copy: module path and parameter name (`lm_head`, `weight`).
    ModulesToSave {
        /// The wrapped module.
        module: String,
        /// The parameter.
        param: String,
    },
    /// A base tensor saved with the adapter (an embedding under `save_embedding_layers`, a
    /// bias under `bias="all"`, or a replacement read from an adapter file); loading it
    /// overwrites the base tensor `base_key`.
    Replacement {
        /// The base checkpoint key it replaces.
        base_key: String,
    },
}

/// One tensor of an adapter.
#[derive(Debug, Clone)]
pub struct AdapterEntry {
    /// The key it had in the classified state dict.
    pub source_key: String,
    /// What it is.
    pub kind: EntryKind,
    /// The tensor (for burn factors: already transposed to PEFT's layout, lazily).
    pub tensor: Tensor,
}

/// The tensors of one adapter, by the on-disk key peft writes (`base_model.model.<m>.lora_A.weight`,
/// `prompt_embeddings`, …), in peft's `get_peft_model_state_dict` order.
#[derive(Debug, Clone)]
pub struct AdapterTensors {
    /// Adapter name (`default`, …).
    pub name: String,
    /// `peft_type` (`LORA`, `PROMPT_TUNING`, …).
    pub method: String,
    /// Entries by on-disk key.
    pub entries: IndexMap<String, AdapterEntry>,
}

impl AdapterTensors {
    /// An empty adapter.
    pub fn new(name: &str, method: &str) -> Self {
        AdapterTensors {
            name: name.to_owned(),
            method: method.to_owned(),
            entries: IndexMap::new(),
        }
    }

    fn insert(&mut self, disk_key: String, entry: AdapterEntry) -> Result<(), ClassifyError> {
        if let Some(prev) = self.entries.get(&disk_key) {
            return Err(ClassifyError::Duplicate {
                origin: origin_of(&entry.tensor),
                adapter: self.name.clone(),
                first: prev.source_key.clone(),
                second: entry.source_key,
                disk_key,
            });
        }
        self.entries.insert(disk_key, entry);
        Ok(())
    }

    /// Per module path, the method's tensors by role (module-scope entries only), in order.
    pub fn modules(&self) -> IndexMap<String, BTreeMap<String, (&str, &Tensor)>> {
        let mut out: IndexMap<String, BTreeMap<String, (&str, &Tensor)>> = IndexMap::new();
        for (key, e) in &self.entries {
            if let EntryKind::Adapter {
                role,
                module: Some(m),
            } = &e.kind
            {
                out.entry(m.clone())
                    .or_default()
                    .insert(role.clone(), (key.as_str(), &e.tensor));
            }
        }
        out
    }

    /// The modules that carry a low-rank pair (`A`/`B` or embedding `A`/`B`): what peft
    /// targeted.
    pub fn adapted_modules(&self) -> Vec<String> {
        self.modules()
            .into_iter()
            .filter(|(_, roles)| roles.contains_key("a") || roles.contains_key("embedding_a"))
            .map(|(m, _)| m)
            .collect()
    }

    /// The rank of a module: the leading dimension of its `A` tensor.
    pub fn rank_of(&self, module: &str) -> Option<usize> {
        let roles = self.modules().swap_remove(module)?;
        roles
            .get("a")
            .or_else(|| roles.get("embedding_a"))
            .and_then(|(_, t)| t.shape().first().copied())
    }

    /// Module paths with a `modules_to_save` copy (or, from an adapter file, a replacement
    /// tensor outside any `base_layer`), in order.
    pub fn modules_to_save(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for e in self.entries.values() {
            let module = match &e.kind {
                EntryKind::ModulesToSave { module, .. } => Some(module.clone()),
                EntryKind::Replacement { base_key } if !e.source_key.contains(".base_layer.") => {
                    base_key.rsplit_once('.').map(|(m, _)| m.to_owned())
                }
                _ => None,
            };
            if let Some(m) = module {
                if !out.contains(&m) {
                    out.push(m);
                }
            }
        }
        out
    }

    /// Modules with trainable-token rows.
    pub fn trainable_token_modules(&self) -> Vec<String> {
        self.entries
            .values()
            .filter_map(|e| match &e.kind {
                EntryKind::Adapter {
                    role,
                    module: Some(m),
                } if role == "trainable_tokens" => Some(m.clone()),
                _ => None,
            })
            .collect()
    }

    /// Total bytes of tensor data.
    pub fn total_bytes(&self) -> u64 {
        self.entries
            .values()
            .map(|e| e.tensor.byte_len() as u64)
            .sum()
    }

    /// The tensors under the keys they are written with: peft's on-disk keys, or with
    /// `save_peft_format = false` without the `base_model.model.` (model-level:
    /// `base_model.`) prefix, as transformers' `save_pretrained(save_peft_format=False)` writes
    /// adapters.
    pub fn to_state_dict(&self, save_peft_format: bool) -> StateDict {
        self.entries
            .iter()
            .map(|(k, e)| {
                let key = if save_peft_format {
                    k.clone()
                } else {
                    k.strip_prefix(MODEL_PREFIX)
                        .or_else(|| k.strip_prefix(PROMPT_BASE_PREFIX))
                        .unwrap_or(k)
                        .to_owned()
                };
                (key, e.tensor.clone())
            })
            .collect()
    }

    /// The adapter tensors of an adapter file's state dict (on-disk keys), read with the rules
    /// of `config`'s method. Every tensor under `base_model.model.` that is not an adapter tensor
    /// becomes a [`EntryKind::Replacement`].
    pub fn from_adapter_state_dict(
        state: &StateDict,
        name: &str,
        config: &AdapterConfig,
    ) -> Result<Self, ClassifyError> {
        let c = classify_state_dict(
            state,
            &ClassifyOptions {
                peft_type: Some(config.peft_type().to_owned()),
                disk_adapter_name: Some(name.to_owned()),
            },
        )?;
        let mut adapters = c.adapters;
        Ok(adapters
            .shift_remove(name)
            .unwrap_or_else(|| AdapterTensors::new(name, config.peft_type())))
    }
}

/// Options of [`classify_state_dict`].
#[derive(Debug, Clone, Default)]
pub struct ClassifyOptions {
    /// The method (`peft_type`) when known (from a config): keys are matched with its rules
    /// only, which settles keys several methods share (`lora_embedding_A`, `prompt_embeddings`).
    pub peft_type: Option<String>,
    /// The name given to adapters whose keys carry none (adapter files, burn). Default
    /// `default`.
    pub disk_adapter_name: Option<String>,
}

/// A classified state dict.
#[derive(Debug, Clone)]
pub struct ClassifiedStateDict {
    /// Which layout the input had.
    pub layout: Layout,
    /// Base parameters under the names of the base checkpoint, in input order.
    pub base: StateDict,
    /// For each base name, the key it had in the input.
    pub base_source_keys: IndexMap<String, String>,
    /// Adapters by name, in order of first appearance.
    pub adapters: IndexMap<String, AdapterTensors>,
    /// Keys dropped because they alias another tensor (prompt learning's `word_embeddings.*`).
    pub dropped: Vec<String>,
    /// Modules wrapped by an adapter layer in the input (those with `<m>.base_layer.` keys).
    pub wrapped_modules: BTreeSet<String>,
    source: StateDict,
}

enum KeyKind {
    Spec(Box<KeyClass>),
    Burn { module: String, role: &'static str },
    Other,
}

/// `<path>.lora.a` / `<path>.lora.b` of burn's built-in LoRA: `(module, role)`. burn wraps a
/// parameter, so the module is the parameter path without `.weight`.
fn burn_key(key: &str) -> Option<(String, &'static str)> {
    let (param, role) = if let Some(p) = key.strip_suffix(".lora.a") {
        (p, "a")
    } else if let Some(p) = key.strip_suffix(".lora.b") {
        (p, "b")
    } else {
        return None;
    };
    let module = param.strip_suffix(".weight").unwrap_or(param);
    (!module.is_empty()).then(|| (module.to_owned(), role))
}

/// A 2-D tensor transposed, computed when its bytes are read (burn factors are stored
/// transposed relative to PEFT).
fn transposed(t: &Tensor, key: &str) -> Result<Tensor, ClassifyError> {
    let bad = || ClassifyError::BurnShape {
        origin: origin_of(t),
        key: key.to_owned(),
        shape: t.shape().to_vec(),
    };
    let [rows, cols] = <[usize; 2]>::try_from(t.shape()).map_err(|_| bad())?;
    let elem = dtype_size(t.dtype()).ok_or_else(bad)?;
    let src = t.clone();
    Ok(Tensor::lazy(t.dtype(), vec![cols, rows], move || {
        let bytes = src.bytes()?;
        let mut out = vec![0u8; bytes.len()];
        for r in 0..rows {
            for c in 0..cols {
                let from = (r * cols + c) * elem;
                let to = (c * rows + r) * elem;
                out[to..to + elem].copy_from_slice(&bytes[from..from + elem]);
            }
        }
        Ok(out)
    })?)
}

/// The base checkpoint name of a base key of a PEFT model state dict: prefix stripped,
/// wrapper levels removed (`q_proj.base_layer.weight` → `q_proj.weight`,
/// `embed_tokens.token_adapter.base_layer.weight` → `embed_tokens.weight`,
/// `lm_head.original_module.weight` → `lm_head.weight`,
/// `experts.base_layer.base_layer.gate_up_proj` → `experts.gate_up_proj`).
pub fn clean_base_key(key: &str, prompt_layout: bool) -> String {
    let rest = if prompt_layout {
        key.strip_prefix(PROMPT_BASE_PREFIX).unwrap_or(key)
    } else {
        key.strip_prefix(MODEL_PREFIX).unwrap_or(key)
    };
    let parts: Vec<&str> = rest.split('.').collect();
    let mut out: Vec<&str> = Vec::with_capacity(parts.len());
    let mut i = 0;
    while i < parts.len() {
        let p = parts[i];
        let is_last = i + 1 == parts.len();
        // Wrapper levels are never the parameter name itself (the last component).
        if !is_last
            && (p == "base_layer"
                || p == "original_module"
                || (p == "token_adapter" && parts.get(i + 1) == Some(&"base_layer")))
        {
            i += 1;
            continue;
        }
        out.push(p);
        i += 1;
    }
    out.join(".")
}

/// `<m>.modules_to_save.<name>.<param>` → `(m, name, param)`, `m` without prefix.
fn split_modules_to_save(rest: &str) -> Option<(String, String, String)> {
    let (module, tail) = rest.split_once(".modules_to_save.")?;
    let (name, param) = tail.split_once('.')?;
    (!module.is_empty() && !name.is_empty() && !param.is_empty()).then(|| {
        (
            clean_base_key(module, false),
            name.to_owned(),
            param.to_owned(),
        )
    })
}

/// Classifies every key of `state` (see the module documentation).
pub fn classify_state_dict(
    state: &StateDict,
    options: &ClassifyOptions,
) -> Result<ClassifiedStateDict, ClassifyError> {
    let spec = Spec::embedded();
    let disk_name = options
        .disk_adapter_name
        .clone()
        .unwrap_or_else(|| DEFAULT_ADAPTER_NAME.to_owned());
    let prompt_layout = state.keys().any(|k| k.starts_with("prompt_encoder."));
    let classify = |key: &str, method: Option<&str>| -> Option<KeyClass> {
        match method {
            Some(m) => spec.classify_key_for(m, key),
            None => spec.classify_key(key),
        }
    };

    // Pass 1: every key by itself.
    let mut kinds: Vec<(String, Tensor, KeyKind)> = Vec::with_capacity(state.len());
    for (key, t) in state {
        let kind = if let Some((module, role)) = burn_key(key) {
            KeyKind::Burn { module, role }
        } else {
            match classify(key, options.peft_type.as_deref()) {
                Some(c) => KeyKind::Spec(Box::new(c)),
                None => KeyKind::Other,
            }
        };
        kinds.push((key.clone(), t.clone(), kind));
    }

    // Pass 2: without a known method, settle each adapter's method on its first tensor that is
    // not a trainable-token one (which peft also allows next to LoRA), and re-read the adapter's
    // keys with that method's rules (AdaLoRA's `lora_embedding_A` looks like LoRA's).
    let mut primary: IndexMap<String, String> = IndexMap::new();
    if options.peft_type.is_none() {
        for (_, _, kind) in &kinds {
            if let KeyKind::Spec(c) = kind {
                let name = c.adapter_name.clone().unwrap_or_else(|| disk_name.clone());
                let slot = primary.entry(name).or_insert_with(|| c.method.clone());
                if slot == "TRAINABLE_TOKENS" {
                    *slot = c.method.clone();
                }
            }
        }
        for (key, t, kind) in &mut kinds {
            let KeyKind::Spec(c) = kind else { continue };
            let name = c.adapter_name.clone().unwrap_or_else(|| disk_name.clone());
            let Some(method) = primary.get(&name) else {
                continue;
            };
            if &c.method == method {
                continue;
            }
            match spec.classify_key_for(method, key) {
                Some(again) => **c = again,
                None if c.method == "TRAINABLE_TOKENS" => {}
                None => {
                    return Err(ClassifyError::MixedMethods {
                        origin: origin_of(t),
                        key: key.clone(),
                        adapter: name,
                        method: method.clone(),
                        found: c.method.clone(),
                    })
                }
            }
        }
    }

    let first_memory = kinds.iter().find_map(|(k, _, kind)| match kind {
        KeyKind::Spec(c) if c.adapter_name.is_some() => Some(k.clone()),
        _ => None,
    });
    let first_disk = kinds.iter().find_map(|(k, t, kind)| match kind {
        KeyKind::Spec(c) if c.adapter_name.is_none() => Some((k.clone(), t.clone())),
        _ => None,
    });
    let any_burn = kinds
        .iter()
        .any(|(_, _, k)| matches!(k, KeyKind::Burn { .. }));
    let layout = match (&first_memory, &first_disk, any_burn) {
        (Some(mem), Some((disk, t)), _) => {
            return Err(ClassifyError::MixedKeyForms {
                origin: origin_of(t),
                in_memory: mem.clone(),
                on_disk: disk.clone(),
            })
        }
        (Some(_), None, _) => Layout::PeftModel,
        (None, Some(_), false) => Layout::PeftAdapter,
        (None, Some((disk, t)), true) => {
            return Err(ClassifyError::MixedKeyForms {
                origin: origin_of(t),
                in_memory: "a burn `.lora.a` key".into(),
                on_disk: disk.clone(),
            })
        }
        (None, None, true) => Layout::Burn,
        (None, None, false) => Layout::Base,
    };

    let mut out = ClassifiedStateDict {
        layout,
        base: StateDict::new(),
        base_source_keys: IndexMap::new(),
        adapters: IndexMap::new(),
        dropped: Vec::new(),
        wrapped_modules: BTreeSet::new(),
        source: state.clone(),
    };
    // An adapter's method: the config's, else the one settled above, else the key's own.
    let adapter = |out: &mut ClassifiedStateDict, name: &str, method: &str| {
        if !out.adapters.contains_key(name) {
            let method = options
                .peft_type
                .as_deref()
                .or(primary.get(name).map(String::as_str))
                .unwrap_or(method);
            out.adapters
                .insert(name.to_owned(), AdapterTensors::new(name, method));
        }
    };
    for (key, tensor, kind) in kinds {
        match kind {
            KeyKind::Spec(c) => {
                let name = c.adapter_name.clone().unwrap_or_else(|| disk_name.clone());
                let method = options
                    .peft_type
                    .clone()
                    .unwrap_or_else(|| c.method.clone());
                adapter(&mut out, &name, &method);
                let entry = AdapterEntry {
                    source_key: key,
                    kind: EntryKind::Adapter {
                        role: c.role.clone(),
                        module: c.module_path.clone(),
                    },
                    tensor,
                };
                if let Some(a) = out.adapters.get_mut(&name) {
                    a.insert(c.disk_key.clone(), entry)?;
                }
            }
            KeyKind::Burn { module, role } => {
                adapter(&mut out, &disk_name, LORA);
                let tensor = transposed(&tensor, &key)?;
                let suffix = if role == "a" { "lora_A" } else { "lora_B" };
                let entry = AdapterEntry {
                    source_key: key,
                    kind: EntryKind::Adapter {
                        role: role.to_owned(),
                        module: Some(module.clone()),
                    },
                    tensor,
                };
                if let Some(a) = out.adapters.get_mut(&disk_name) {
                    a.insert(format!("{MODEL_PREFIX}{module}.{suffix}.weight"), entry)?;
                }
            }
            KeyKind::Other => match layout {
                Layout::PeftModel => {
                    if prompt_layout
                        && (key == "word_embeddings.weight" || key.starts_with("word_embeddings."))
                    {
                        // PeftModel registers the input embedding a second time as
                        // `word_embeddings`; it is the same storage as the base's.
                        out.dropped.push(key);
                        continue;
                    }
                    // Prompt learning wraps the transformers model one level higher.
                    let prefix = if prompt_layout {
                        PROMPT_BASE_PREFIX
                    } else {
                        MODEL_PREFIX
                    };
                    let rest = key.strip_prefix(prefix).unwrap_or(&key);
                    if let Some((module, name, param)) = split_modules_to_save(rest) {
                        let method = options.peft_type.clone().unwrap_or_else(|| LORA.to_owned());
                        adapter(&mut out, &name, &method);
                        let entry = AdapterEntry {
                            source_key: key.clone(),
                            kind: EntryKind::ModulesToSave {
                                module: module.clone(),
                                param: param.clone(),
                            },
                            tensor,
                        };
                        if let Some(a) = out.adapters.get_mut(&name) {
                            a.insert(format!("{prefix}{module}.{param}"), entry)?;
                        }
                        continue;
                    }
                    if !prompt_layout {
                        if let Some((m, _)) = rest.split_once(".base_layer.") {
                            out.wrapped_modules.insert(clean_base_key(m, false));
                        }
                    }
                    out.add_base(clean_base_key(&key, prompt_layout), key, tensor)?;
                }
                Layout::PeftAdapter if key.starts_with(MODEL_PREFIX) => {
                    let method = options.peft_type.clone().unwrap_or_else(|| LORA.to_owned());
                    adapter(&mut out, &disk_name, &method);
                    let base_key = clean_base_key(&key, false);
                    let entry = AdapterEntry {
                        source_key: key.clone(),
                        kind: EntryKind::Replacement { base_key },
                        tensor,
                    };
                    if let Some(a) = out.adapters.get_mut(&disk_name) {
                        a.insert(key, entry)?;
                    }
                }
                _ => {
                    let clean = if layout == Layout::Burn {
                        key.clone()
                    } else {
                        clean_base_key(&key, false)
                    };
                    out.add_base(clean, key, tensor)?;
                }
            },
        }
    }
    out.order_adapter_entries();
    // peft's order of adapters: `default` (the one `get_peft_model` creates) first, then the
    // others as they appear.
    if let Some(i) = out.adapters.get_index_of(DEFAULT_ADAPTER_NAME) {
        out.adapters.move_index(i, 0);
    }
    Ok(out)
}

impl ClassifiedStateDict {
    fn add_base(
        &mut self,
        clean: String,
        key: String,
        tensor: Tensor,
    ) -> Result<(), ClassifyError> {
        if let Some(prev) = self.base_source_keys.get(&clean) {
            return Err(ClassifyError::Duplicate {
                origin: origin_of(&tensor),
                adapter: "(base)".into(),
                first: prev.clone(),
                second: key,
                disk_key: clean,
            });
        }
        self.base_source_keys.insert(clean.clone(), key);
        self.base.insert(clean, tensor);
        Ok(())
    }

    /// peft's `get_peft_model_state_dict` order: the method's tensors first, then the auxiliary
    /// wrappers (`modules_to_save`, trainable tokens), then everything else.
    fn order_adapter_entries(&mut self) {
        for a in self.adapters.values_mut() {
            let rank = |e: &AdapterEntry| match &e.kind {
                EntryKind::Adapter { role, .. } if role == "trainable_tokens" => 1,
                EntryKind::Adapter { .. } => 0,
                EntryKind::ModulesToSave { .. } => 1,
                EntryKind::Replacement { .. } => 2,
            };
            a.entries.sort_by(|_, x, _, y| rank(x).cmp(&rank(y)));
        }
    }

    /// The input state dict.
    pub fn source(&self) -> &StateDict {
        &self.source
    }

    /// Adapter names, in order.
    pub fn adapter_names(&self) -> Vec<String> {
        self.adapters.keys().cloned().collect()
    }

    /// The adapter `name`, or the only one when `name` is `None`.
    pub fn adapter(&self, name: Option<&str>) -> Result<&AdapterTensors, ClassifyError> {
        let found = || {
            if self.adapters.is_empty() {
                "none".to_owned()
            } else {
                self.adapter_names().join(", ")
            }
        };
        match name {
            Some(n) => self
                .adapters
                .get(n)
                .ok_or_else(|| ClassifyError::UnknownAdapter {
                    name: n.to_owned(),
                    found: found(),
                }),
            None if self.adapters.len() == 1 => {
                self.adapters
                    .values()
                    .next()
                    .ok_or_else(|| ClassifyError::UnknownAdapter {
                        name: DEFAULT_ADAPTER_NAME.into(),
                        found: found(),
                    })
            }
            None => Err(ClassifyError::AmbiguousAdapter { found: found() }),
        }
    }

    /// Every module name of the base model that the tensors reveal: each prefix of a base
    /// parameter name, every adapted module, every `modules_to_save` module (no root `""`).
    pub fn module_names(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut add_prefixes = |name: &str, include_self: bool| {
            for (i, _) in name.match_indices('.') {
                out.insert(name[..i].to_owned());
            }
            if include_self && !name.is_empty() {
                out.insert(name.to_owned());
            }
        };
        for k in self.base.keys() {
            add_prefixes(k, false);
        }
        for a in self.adapters.values() {
            for m in a.modules().keys() {
                add_prefixes(m, true);
            }
            for m in a.modules_to_save() {
                add_prefixes(&m, true);
            }
        }
        out
    }

    /// The tensors peft's `save_pretrained` writes for adapter `name` under `config`: the
    /// adapter's own tensors, plus (PEFT model state dicts only) the embeddings that
    /// `save_embedding_layers="auto"` adds when an embedding is targeted, and the biases of
    /// `bias="all"` / `"lora_only"` — all under the keys peft gives them.
    pub fn adapter_for_save(
        &self,
        name: &str,
        config: &AdapterConfig,
    ) -> Result<AdapterTensors, ClassifyError> {
        let mut out = self.adapter(Some(name))?.clone();
        if self.layout != Layout::PeftModel {
            return Ok(out);
        }
        let others: Vec<&String> = self.adapters.keys().filter(|n| *n != name).collect();
        // peft's `_filter_state_dict_for_adapter_name`.
        let belongs_to_other = |key: &str| {
            others
                .iter()
                .any(|o| key.contains(&format!(".{o}.")) || key.ends_with(&format!(".{o}")))
        };
        let mut extra: Vec<(String, String, Tensor)> = Vec::new();
        if let Some(lora) = config.as_lora() {
            match lora.bias.as_str() {
                "all" => {
                    for (k, t) in &self.source {
                        if (k == "bias" || k.ends_with(".bias")) && !belongs_to_other(k) {
                            extra.push((k.clone(), remove_adapter_name(k, name), t.clone()));
                        }
                    }
                }
                "lora_only" => {
                    for m in &self.wrapped_modules {
                        let k = format!("{MODEL_PREFIX}{m}.base_layer.bias");
                        if let Some(t) = self.source.get(&k) {
                            extra.push((k.clone(), k, t.clone()));
                        }
                    }
                }
                _ => {}
            }
        }
        if self.embedding_is_targeted(config)? && !uses_trainable_tokens(config) {
            for emb in self.embedding_modules() {
                if !self.wrapped_modules.contains(&emb) {
                    continue;
                }
                let prefix = format!("{MODEL_PREFIX}{emb}.base_layer.");
                for (k, t) in &self.source {
                    if k.starts_with(&prefix) {
                        extra.push((k.clone(), remove_adapter_name(k, name), t.clone()));
                    }
                }
            }
        }
        for (source_key, disk_key, tensor) in extra {
            if out.entries.contains_key(&disk_key) {
                continue; // `bias="all"` re-adds `lora_B.bias`, already present.
            }
            let base_key = clean_base_key(&source_key, false);
            out.entries.insert(
                disk_key,
                AdapterEntry {
                    source_key,
                    kind: EntryKind::Replacement { base_key },
                    tensor,
                },
            );
        }
        Ok(out)
    }

    /// peft's `embedding_is_targeted` of `get_peft_model_state_dict`.
    fn embedding_is_targeted(&self, config: &AdapterConfig) -> Result<bool, ClassifyError> {
        let rules = config.target_rules()?;
        Ok(match &rules.target_modules {
            Some(TargetModules::Regex(s)) if !s.eq_ignore_ascii_case(ALL_LINEAR) => {
                let re = PyRegex::fullmatch(s).map_err(|source| TargetingError::Regex {
                    field: "target_modules".into(),
                    source,
                })?;
                let mut hit = false;
                for m in self.module_names() {
                    let last = m.rsplit('.').next().unwrap_or(&m);
                    if EMBEDDING_LAYER_NAMES.contains(&last) && re.is_match(&m).unwrap_or(false) {
                        hit = true;
                        break;
                    }
                }
                hit
            }
            Some(TargetModules::Names(v)) => EMBEDDING_LAYER_NAMES
                .iter()
                .any(|e| v.iter().any(|t| t == e)),
            _ => false,
        })
    }

    /// The input and output embedding modules, by name (peft asks the model; peftkit uses the
    /// names transformers gives them: [`INPUT_EMBEDDING_NAMES`], [`OUTPUT_EMBEDDING_NAMES`]).
    fn embedding_modules(&self) -> Vec<String> {
        let names = self.module_names();
        let last = |m: &str| m.rsplit('.').next().unwrap_or(m).to_owned();
        let mut out = Vec::new();
        if let Some(m) = names
            .iter()
            .find(|m| INPUT_EMBEDDING_NAMES.contains(&last(m).as_str()))
        {
            out.push(m.clone());
        }
        if let Some(m) = names
            .iter()
            .find(|m| OUTPUT_EMBEDDING_NAMES.contains(&last(m).as_str()))
        {
            out.push(m.clone());
        }
        out
    }
}

fn uses_trainable_tokens(config: &AdapterConfig) -> bool {
    config.peft_type() == "TRAINABLE_TOKENS"
        || config
            .as_lora()
            .is_some_and(|l| l.trainable_token_indices.is_some())
}

// ---------------------------------------------------------------------------------------------
// What the base model is: name, task, config.json.

/// How `task_type` is chosen for an inferred config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum TaskTypeChoice {
    /// From the base config's `architectures[0]` (`…ForCausalLM` → `CAUSAL_LM`, …); null when
    /// unknown.
    #[default]
    FromArchitecture,
    /// This value.
    Given(String),
    /// `null` (peft then writes `auto_mapping`).
    Null,
}

/// What peft takes from the live model when it writes a config and a model card, and peftkit
/// must be told: the base model's name, the task and its `config.json`.
#[derive(Debug, Clone, Default)]
pub struct BaseModelInfo {
    /// `base_model_name_or_path` (peft: the model's `name_or_path`; `null` when unknown).
    pub name_or_path: Option<String>,
    /// `task_type`.
    pub task_type: TaskTypeChoice,
    /// `auto_mapping` to write when `task_type` is null (default: derived from `config`).
    pub auto_mapping: Option<Value>,
    /// The base model's `config.json` (model type, architecture, tied embeddings, sizes).
    pub config: Option<ModelConfig>,
}

impl BaseModelInfo {
    /// `model_type` of the config.
    pub fn model_type(&self) -> Option<&str> {
        self.config.as_ref().and_then(ModelConfig::model_type)
    }

    /// `architectures[0]` of the config.
    pub fn architecture(&self) -> Option<&str> {
        self.config
            .as_ref()?
            .fields
            .get("architectures")?
            .as_array()?
            .first()?
            .as_str()
    }

    /// The `task_type` to write.
    pub fn resolved_task_type(&self) -> Option<String> {
        match &self.task_type {
            TaskTypeChoice::Given(t) => Some(t.clone()),
            TaskTypeChoice::Null => None,
            TaskTypeChoice::FromArchitecture => {
                let arch = self.architecture()?;
                let encoder_decoder = self
                    .config
                    .as_ref()
                    .and_then(|c| c.fields.get("is_encoder_decoder"))
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                let t = if arch.ends_with("ForCausalLM") || arch.ends_with("LMHeadModel") {
                    "CAUSAL_LM"
                } else if arch.ends_with("ForSequenceClassification") {
                    "SEQ_CLS"
                } else if arch.ends_with("ForTokenClassification") {
                    "TOKEN_CLS"
                } else if arch.ends_with("ForQuestionAnswering") {
                    "QUESTION_ANS"
                } else if encoder_decoder
                    && (arch.ends_with("ForConditionalGeneration")
                        || arch.ends_with("ForSeq2SeqLM"))
                {
                    "SEQ_2_SEQ_LM"
                } else {
                    return None;
                };
                Some(t.to_owned())
            }
        }
    }

    /// The `auto_mapping` peft writes when `task_type` is null: the base class and its module
    /// (`transformers.models.<model_type>.modeling_<model_type>`).
    pub fn resolved_auto_mapping(&self, task_type: Option<&str>) -> Option<Value> {
        if task_type.is_some() {
            return None;
        }
        if let Some(m) = &self.auto_mapping {
            return Some(m.clone());
        }
        let arch = self.architecture()?;
        let mt = self.model_type()?.replace('-', "_");
        Some(json!({
            "base_model_class": arch,
            "parent_library": format!("transformers.models.{mt}.modeling_{mt}"),
        }))
    }

    fn config_usize(&self, names: &[&str]) -> Option<u64> {
        let c = self.config.as_ref()?;
        names
            .iter()
            .find_map(|n| c.fields.get(*n).and_then(Value::as_u64))
    }
}

// ---------------------------------------------------------------------------------------------
// Conv1D table.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Conv1dDoc {
    schema_version: u32,
    #[allow(dead_code)] // Documents the file.
    transformers_version: String,
    #[allow(dead_code)]
    #[serde(default)]
    source: Option<String>,
    conv1d_modules: IndexMap<String, Vec<String>>,
}

/// `model_type` → module-name suffixes that are `Conv1D` (adapters-spec/conv1d_modules.json).
pub fn conv1d_table() -> Result<&'static IndexMap<String, Vec<String>>, ClassifyError> {
    static TABLE: OnceLock<Result<IndexMap<String, Vec<String>>, String>> = OnceLock::new();
    TABLE
        .get_or_init(|| {
            let doc: Conv1dDoc =
                serde_json::from_str(EMBEDDED_CONV1D_MODULES_JSON).map_err(|e| e.to_string())?;
            if doc.schema_version != 1 {
                return Err(format!("unsupported schema_version {}", doc.schema_version));
            }
            Ok(doc.conv1d_modules)
        })
        .as_ref()
        .map_err(|e| ClassifyError::Conv1dTable(e.clone()))
}

/// Whether `module` is a `Conv1D` by the table: under `model_type` when known, else under any
/// model type whose entries name it.
fn conv1d_by_table(model_type: Option<&str>, module: &str) -> Result<bool, ClassifyError> {
    let table = conv1d_table()?;
    let hit = |list: &Vec<String>| list.iter().any(|e| name_matches_suffix(module, e));
    Ok(match model_type {
        Some(mt) => table.get(mt).is_some_and(hit),
        None => table.values().any(hit),
    })
}

// ---------------------------------------------------------------------------------------------
// Inference.

/// The LoRA config fields that the tensors determine, and how.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoraStructure {
    /// `r`: the most frequent rank (ties: the smaller).
    pub r: u64,
    /// Rank of every adapted module.
    pub ranks: IndexMap<String, u64>,
    /// `rank_pattern` for modules whose rank differs from `r`.
    pub rank_pattern: IndexMap<String, u64>,
    /// `target_modules`: minimal name suffixes that select exactly the adapted modules.
    pub target_modules: Vec<String>,
    /// `use_dora`: magnitude vectors present.
    pub use_dora: bool,
    /// `lora_bias`: `lora_B.bias` present.
    pub lora_bias: bool,
    /// `fan_in_fan_out`: a targeted module is a GPT-2 style `Conv1D`.
    pub fan_in_fan_out: bool,
    /// `modules_to_save`, or `None`.
    pub modules_to_save: Option<Vec<String>>,
    /// Modules with trainable-token rows (their indices are only in the config).
    pub trainable_token_modules: Vec<String>,
    /// How ambiguous cases were settled.
    pub notes: Vec<String>,
}

/// Strips leading all-digit components' ambiguity: a suffix starting with a layer index
/// (`0.self_attn.q_proj`) is extended by the component before it (`layers.0.self_attn.q_proj`),
/// the form people write and peft records.
fn readable_suffixes(suffixes: &BTreeSet<String>, targets: &[String]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for s in suffixes {
        let first = s.split('.').next().unwrap_or("");
        if first.is_empty() || !first.bytes().all(|b| b.is_ascii_digit()) {
            out.insert(s.clone());
            continue;
        }
        let mut extended = false;
        for t in targets {
            if let Some(head) = t.strip_suffix(&format!(".{s}")) {
                let prev = head.rsplit('.').next().unwrap_or(head);
                out.insert(format!("{prev}.{s}"));
                extended = true;
            }
        }
        if !extended {
            out.insert(s.clone());
        }
    }
    out
}

/// The structural LoRA fields of adapter `adapter` (see [`LoraStructure`]).
///
/// `model` supplies the `model_type` for the `Conv1D` table when a base weight is square.
pub fn infer_lora_structure(
    c: &ClassifiedStateDict,
    adapter: &str,
    model: &BaseModelInfo,
) -> Result<LoraStructure, ClassifyError> {
    let a = c.adapter(Some(adapter))?;
    let needs = |what: &str, reason: String| ClassifyError::NeedsConfig {
        adapter: adapter.to_owned(),
        what: what.to_owned(),
        reason,
    };
    let modules = a.modules();
    let mut notes = Vec::new();
    let mut ranks: IndexMap<String, u64> = IndexMap::new();
    let (mut any_magnitude, mut all_magnitude) = (false, true);
    let mut lora_bias = false;
    let mut fan_in_fan_out = false;
    let mut square_conv1d: Vec<String> = Vec::new();
    for (module, roles) in &modules {
        if roles.contains_key("trainable_tokens") && roles.len() == 1 {
            continue;
        }
        let (a_key, a_t) = match roles.get("a").or_else(|| roles.get("embedding_a")) {
            Some(x) => *x,
            None => {
                let (k, t) = roles.values().next().copied().ok_or_else(|| {
                    needs(
                        "the module list",
                        format!("module `{module}` has no tensors"),
                    )
                })?;
                return Err(ClassifyError::Inconsistent {
                    origin: origin_of(t),
                    key: k.to_owned(),
                    module: module.clone(),
                    reason: "the module has no lora_A / lora_embedding_A tensor".into(),
                });
            }
        };
        if module.split('.').any(|p| p == "base_layer") {
            return Err(needs(
                "target_parameters",
                format!(
                    "module `{module}` is a nested adapter layer (peft's `target_parameters` for MoE experts, or a MultiheadAttention out_proj)"
                ),
            ));
        }
        let base_weight = c.base.get(&format!("{module}.weight"));
        if c.layout == Layout::PeftModel && base_weight.is_none() {
            return Err(needs(
                "the targeted parameters",
                format!("module `{module}` has no `weight` (a `target_parameters` or MultiheadAttention adapter)"),
            ));
        }
        let rank = a_t.shape().first().copied().unwrap_or(0) as u64;
        if rank == 0 {
            return Err(ClassifyError::Inconsistent {
                origin: origin_of(a_t),
                key: a_key.to_owned(),
                module: module.clone(),
                reason: format!("shape {:?} gives rank 0", a_t.shape()),
            });
        }
        // The B factor must agree on the rank (Linear / Conv1D / Embedding: B is (out, r)).
        if let Some((b_key, b_t)) = roles.get("b").or_else(|| roles.get("embedding_b")) {
            if b_t.shape().len() == 2 && b_t.shape()[1] as u64 != rank {
                return Err(ClassifyError::Inconsistent {
                    origin: origin_of(b_t),
                    key: (*b_key).to_owned(),
                    module: module.clone(),
                    reason: format!(
                        "shape {:?} does not have the rank {rank} of `{a_key}` {:?}",
                        b_t.shape(),
                        a_t.shape()
                    ),
                });
            }
        } else {
            return Err(ClassifyError::Inconsistent {
                origin: origin_of(a_t),
                key: a_key.to_owned(),
                module: module.clone(),
                reason: "the module has an A factor but no B factor".into(),
            });
        }
        ranks.insert(module.clone(), rank);
        if roles.contains_key("magnitude") {
            any_magnitude = true;
        } else {
            all_magnitude = false;
        }
        lora_bias |= roles.contains_key("b_bias");
        if roles.contains_key("a") && c.layout != Layout::Burn {
            if let Some(conv1d) = conv1d_kind(c, module, roles, base_weight)? {
                fan_in_fan_out |= conv1d;
            } else if conv1d_by_table(model.model_type(), module)? {
                fan_in_fan_out = true;
                square_conv1d.push(module.clone());
            }
        }
    }
    if !square_conv1d.is_empty() {
        notes.push(format!(
            "base weight square or unknown for `{}`: taken as Conv1D from adapters-spec/conv1d_modules.json ({})",
            square_conv1d.join("`, `"),
            model
                .model_type()
                .map_or("model type unknown: any model type's entry".to_owned(), |m| format!("model type {m}"))
        ));
    }
    if any_magnitude && !all_magnitude {
        return Err(needs(
            "use_dora",
            "some modules have lora_magnitude_vector and some do not".into(),
        ));
    }
    let trainable_token_modules = a.trainable_token_modules();
    if ranks.is_empty() && trainable_token_modules.is_empty() && a.modules_to_save().is_empty() {
        return Err(needs("r", "the adapter has no LoRA module".into()));
    }

    // r: the most frequent rank, ties to the smaller.
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for r in ranks.values() {
        *counts.entry(*r).or_default() += 1;
    }
    let r = counts
        .iter()
        .max_by(|x, y| x.1.cmp(y.1).then(y.0.cmp(x.0)))
        .map(|(r, _)| *r)
        .unwrap_or(8);

    let all_modules = c.module_names();
    let targets: Vec<String> = ranks.keys().cloned().collect();
    let target_set: HashSet<&str> = targets.iter().map(String::as_str).collect();
    let mts = a.modules_to_save();
    let mts_set: HashSet<&str> = mts.iter().map(String::as_str).collect();

    // modules_to_save: suffixes matched with peft's plain `key.endswith(name)`.
    let modules_to_save = if mts.is_empty() {
        None
    } else {
        let others: Vec<&String> = all_modules
            .iter()
            .filter(|m| {
                !mts_set.contains(m.as_str())
                    && !mts.iter().any(|t| m.starts_with(&format!("{t}.")))
            })
            .collect();
        let minimal = minimal_target_suffixes(&mts, &others)?;
        let ok = minimal.iter().all(|s| {
            all_modules
                .iter()
                .filter(|m| m.ends_with(s.as_str()))
                .all(|m| mts_set.contains(m.as_str()))
        });
        Some(if ok {
            minimal.into_iter().collect()
        } else {
            notes.push(
                "modules_to_save written as full module names (no shorter name is unique)".into(),
            );
            let mut v = mts.clone();
            v.sort();
            v
        })
    };

    // target_modules: minimal suffixes, checked with peft's matcher.
    let target_modules = if targets.is_empty() {
        Vec::new()
    } else {
        let others: Vec<&String> = all_modules
            .iter()
            .filter(|m| !target_set.contains(m.as_str()))
            .collect();
        let minimal: Vec<String> = minimal_target_suffixes(&targets, &others)?
            .into_iter()
            .collect();
        let check = |names: &[String]| -> Result<bool, ClassifyError> {
            let cfg = LoraConfig {
                target_modules: Some(TargetModules::Names(names.to_vec())),
                modules_to_save: modules_to_save.clone(),
                ..LoraConfig::default()
            };
            let m = TargetMatcher::for_lora(&cfg)?;
            for t in &targets {
                if !m.is_target(t)? {
                    return Ok(false);
                }
            }
            for o in &others {
                if !mts.iter().any(|x| o.starts_with(x.as_str())) && m.is_target(o)? {
                    return Ok(false);
                }
            }
            Ok(true)
        };
        if check(&minimal)? {
            minimal
        } else {
            notes.push(
                "target_modules written as full module names (no shorter suffix set is exact)"
                    .into(),
            );
            let mut v = targets.clone();
            v.sort();
            v
        }
    };

    // rank_pattern for modules whose rank is not r.
    let mut rank_pattern: IndexMap<String, u64> = IndexMap::new();
    for (&k, _) in counts.iter().filter(|(k, _)| **k != r) {
        let group: Vec<String> = ranks
            .iter()
            .filter(|(_, v)| **v == k)
            .map(|(m, _)| m.clone())
            .collect();
        let others: Vec<String> = ranks
            .iter()
            .filter(|(_, v)| **v != k)
            .map(|(m, _)| m.clone())
            .collect();
        let minimal = minimal_target_suffixes(&group, &others)?;
        for s in readable_suffixes(&minimal, &group) {
            rank_pattern.insert(s, k);
        }
    }
    rank_pattern.sort_keys();
    let resolves = |pattern: &IndexMap<String, u64>| -> Result<bool, ClassifyError> {
        let cfg = LoraConfig {
            r,
            rank_pattern: Some(
                pattern
                    .iter()
                    .map(|(k, v)| (k.clone(), Number::from(*v)))
                    .collect(),
            ),
            ..LoraConfig::default()
        };
        let resolver = PatternResolver::new(&cfg)?;
        for (m, rank) in &ranks {
            if resolver.rank_for(m)? != *rank {
                return Ok(false);
            }
        }
        Ok(true)
    };
    if !resolves(&rank_pattern)? {
        notes.push("rank_pattern written with full, escaped module names".into());
        rank_pattern = ranks
            .iter()
            .filter(|(_, v)| **v != r)
            .map(|(m, v)| (re_escape(m), *v))
            .collect();
        rank_pattern.sort_keys();
    }

    Ok(LoraStructure {
        r,
        ranks,
        rank_pattern,
        target_modules,
        use_dora: any_magnitude,
        lora_bias,
        fan_in_fan_out,
        modules_to_save,
        trainable_token_modules,
        notes,
    })
}

/// `Some(true)` for a `Conv1D` (base weight `(in, out)`), `Some(false)` for a Linear
/// (`(out, in)`), `None` when the base weight is unknown, square, or the factors are not 2-D.
fn conv1d_kind(
    c: &ClassifiedStateDict,
    module: &str,
    roles: &BTreeMap<String, (&str, &Tensor)>,
    base_weight: Option<&Tensor>,
) -> Result<Option<bool>, ClassifyError> {
    let (Some((_, a)), Some((_, b)), Some(w)) = (roles.get("a"), roles.get("b"), base_weight)
    else {
        return Ok(None);
    };
    let (Ok([_, fan_in]), Ok([fan_out, _]), Ok([p, q])) = (
        <[usize; 2]>::try_from(a.shape()),
        <[usize; 2]>::try_from(b.shape()),
        <[usize; 2]>::try_from(w.shape()),
    ) else {
        return Ok(None);
    };
    if fan_in == fan_out && p == q && p == fan_in {
        return Ok(None);
    }
    if (p, q) == (fan_out, fan_in) {
        return Ok(Some(false));
    }
    if (p, q) == (fan_in, fan_out) {
        return Ok(Some(true));
    }
    let key = c
        .base_source_keys
        .get(&format!("{module}.weight"))
        .cloned()
        .unwrap_or_else(|| format!("{module}.weight"));
    Err(ClassifyError::Inconsistent {
        origin: origin_of(w),
        key,
        module: module.to_owned(),
        reason: format!(
            "base weight shape {:?} fits neither a Linear ({fan_out}, {fan_in}) nor a Conv1D ({fan_in}, {fan_out}) for lora_A {:?} / lora_B {:?}",
            w.shape(),
            a.shape(),
            b.shape()
        ),
    })
}

/// Options of [`infer_config`].
#[derive(Debug, Clone, Default)]
pub struct InferOptions {
    /// `lora_alpha` (required for LoRA: the tensors do not carry it).
    pub lora_alpha: Option<Number>,
    /// `use_rslora` (not visible in the tensors).
    pub use_rslora: bool,
    /// The base model.
    pub model: BaseModelInfo,
}

/// An inferred config and how it was settled.
#[derive(Debug, Clone)]
pub struct Inferred {
    /// The config, with `inference_mode: true` as peft saves it.
    pub config: AdapterConfig,
    /// Notes on ambiguous cases.
    pub notes: Vec<String>,
}

/// The `adapter_config.json` peft would have written for adapter `adapter` of `c`, as far as
/// the tensors and `options` determine it (reference §3):
///
/// * LoRA: `r`, `rank_pattern`, `target_modules`, `use_dora`, `lora_bias`, `fan_in_fan_out`,
///   `modules_to_save` from the tensors ([`infer_lora_structure`]); `lora_alpha` and
///   `use_rslora` from `options`; `task_type`, `auto_mapping`, `base_model_name_or_path` from
///   `options.model`; every other field peft's default. `alpha_pattern`, `lora_dropout`,
///   `bias`, `init_lora_weights` and `trainable_token_indices` are not in the tensors: adapters
///   that used them need the config ([`ClassifyError::NeedsConfig`] for trainable tokens).
/// * Prompt tuning: `num_virtual_tokens` and `token_dim` from `prompt_embeddings`,
///   `num_layers` / `num_attention_heads` from the base `config.json` (required).
/// * Other methods: [`ClassifyError::NeedsConfig`].
pub fn infer_config(
    c: &ClassifiedStateDict,
    adapter: &str,
    options: &InferOptions,
) -> Result<Inferred, ClassifyError> {
    let a = c.adapter(Some(adapter))?;
    let task_type = options.model.resolved_task_type();
    let auto_mapping = options.model.resolved_auto_mapping(task_type.as_deref());
    match a.method.as_str() {
        LORA => {
            let s = infer_lora_structure(c, adapter, &options.model)?;
            if !s.trainable_token_modules.is_empty() {
                return Err(ClassifyError::NeedsConfig {
                    adapter: adapter.to_owned(),
                    what: "trainable_token_indices".into(),
                    reason: format!(
                        "`{}` has trainable-token rows, whose token ids are only recorded in the config",
                        s.trainable_token_modules.join("`, `")
                    ),
                });
            }
            let lora_alpha =
                options
                    .lora_alpha
                    .clone()
                    .ok_or_else(|| ClassifyError::MissingAlpha {
                        adapter: adapter.to_owned(),
                    })?;
            let config = LoraConfig {
                task_type,
                auto_mapping,
                base_model_name_or_path: options.model.name_or_path.clone(),
                inference_mode: true,
                r: s.r,
                target_modules: Some(TargetModules::Names(s.target_modules.clone())),
                lora_alpha,
                fan_in_fan_out: s.fan_in_fan_out,
                use_rslora: options.use_rslora,
                modules_to_save: s.modules_to_save.clone(),
                rank_pattern: Some(
                    s.rank_pattern
                        .iter()
                        .map(|(k, v)| (k.clone(), Number::from(*v)))
                        .collect(),
                ),
                use_dora: s.use_dora,
                lora_bias: s.lora_bias,
                ..LoraConfig::default()
            };
            Ok(Inferred {
                config: AdapterConfig::Lora(Box::new(config)),
                notes: s.notes,
            })
        }
        "PROMPT_TUNING" => infer_prompt_tuning(a, adapter, options, task_type, auto_mapping),
        other => Err(ClassifyError::NeedsConfig {
            adapter: adapter.to_owned(),
            what: format!("the {other} config"),
            reason: "peftkit infers LoRA and prompt-tuning configs only".into(),
        }),
    }
}

fn infer_prompt_tuning(
    a: &AdapterTensors,
    adapter: &str,
    options: &InferOptions,
    task_type: Option<String>,
    auto_mapping: Option<Value>,
) -> Result<Inferred, ClassifyError> {
    let needs = |reason: String| ClassifyError::NeedsConfig {
        adapter: adapter.to_owned(),
        what: "the prompt-tuning config".into(),
        reason,
    };
    let model = &options.model;
    if model.config.is_none() {
        return Err(needs(
            "num_layers and num_attention_heads come from the base model's config.json, which was not given".into(),
        ));
    }
    let e = a
        .entries
        .get("prompt_embeddings")
        .ok_or_else(|| needs("no prompt_embeddings tensor".into()))?;
    let [rows, dim] =
        <[usize; 2]>::try_from(e.tensor.shape()).map_err(|_| ClassifyError::Inconsistent {
            origin: origin_of(&e.tensor),
            key: e.source_key.clone(),
            module: "prompt_encoder".into(),
            reason: format!(
                "shape {:?} is not (num_virtual_tokens, token_dim)",
                e.tensor.shape()
            ),
        })?;
    let hidden = model.config_usize(&["hidden_size", "n_embd", "d_model"]);
    if hidden.is_some_and(|h| h != dim as u64) {
        return Err(needs(format!(
            "prompt_embeddings has {dim} columns but the model's hidden size is {} (prefix tuning?)",
            hidden.unwrap_or_default()
        )));
    }
    let submodules: u64 = if task_type.as_deref() == Some("SEQ_2_SEQ_LM") {
        2
    } else {
        1
    };
    if !(rows as u64).is_multiple_of(submodules) {
        return Err(needs(format!(
            "{rows} prompt rows do not split over {submodules} transformer submodules"
        )));
    }
    let num = |v: Option<u64>| v.map_or(Value::Null, Value::from);
    let mut fields = Map::new();
    fields.insert(
        "task_type".into(),
        task_type.map_or(Value::Null, Value::String),
    );
    fields.insert("auto_mapping".into(), auto_mapping.unwrap_or(Value::Null));
    fields.insert("peft_version".into(), Value::String(PEFT_VERSION.into()));
    fields.insert(
        "base_model_name_or_path".into(),
        model
            .name_or_path
            .clone()
            .map_or(Value::Null, Value::String),
    );
    fields.insert("revision".into(), Value::Null);
    fields.insert("inference_mode".into(), Value::Bool(true));
    fields.insert(
        "num_virtual_tokens".into(),
        Value::from(rows as u64 / submodules),
    );
    fields.insert("token_dim".into(), Value::from(dim as u64));
    fields.insert("num_transformer_submodules".into(), Value::from(submodules));
    fields.insert(
        "num_attention_heads".into(),
        num(model.config_usize(&[
            "num_attention_heads",
            "n_head",
            "num_heads",
            "encoder_attention_heads",
        ])),
    );
    fields.insert(
        "num_layers".into(),
        num(model.config_usize(&["num_hidden_layers", "num_layers", "n_layer", "n_layers"])),
    );
    fields.insert("modules_to_save".into(), Value::Null);
    fields.insert("prompt_tuning_init".into(), Value::String("RANDOM".into()));
    fields.insert("prompt_tuning_init_text".into(), Value::Null);
    fields.insert("tokenizer_name_or_path".into(), Value::Null);
    fields.insert("tokenizer_kwargs".into(), Value::Null);
    let set_fields = Spec::embedded()
        .method("PROMPT_TUNING")
        .map(|m| m.set_fields.clone())
        .unwrap_or_default();
    Ok(Inferred {
        config: AdapterConfig::Other(GenericConfig {
            peft_type: "PROMPT_TUNING".into(),
            fields,
            set_fields,
        }),
        notes: vec![
            "prompt_tuning_init recorded as RANDOM (the init is not visible in the tensors)".into(),
        ],
    })
}

/// Checks `config` against adapter `adapter`'s tensors: every module's rank (`A` rows) is what
/// `r` / `rank_pattern` give it, every adapted module is targeted, `use_dora` / `lora_bias` match
/// the tensors present, trainable-token rows match the indices. Returns notes on what could not
/// be checked.
pub fn check_config(
    c: &ClassifiedStateDict,
    adapter: &str,
    config: &AdapterConfig,
) -> Result<Vec<String>, ClassifyError> {
    let a = c.adapter(Some(adapter))?;
    let mut notes = Vec::new();
    if a.method != config.peft_type() {
        return Err(ClassifyError::ConfigMismatch {
            adapter: adapter.to_owned(),
            field: "peft_type".into(),
            reason: format!(
                "the config is {} but the tensors are {}",
                config.peft_type(),
                a.method
            ),
        });
    }
    let Some(lora) = config.as_lora() else {
        return Ok(notes);
    };
    let mismatch = |field: &str, reason: String| ClassifyError::ConfigMismatch {
        adapter: adapter.to_owned(),
        field: field.to_owned(),
        reason,
    };
    let resolver = PatternResolver::new(lora)?;
    let parameter_targets = lora.target_parameters.is_some();
    let matcher = if parameter_targets || lora.target_modules.is_none() {
        None
    } else {
        Some(TargetMatcher::for_lora(lora)?)
    };
    if lora.target_modules.is_none() && !parameter_targets {
        notes.push(
            "target_modules is null (peft fills its model-type default): targeting not checked"
                .into(),
        );
    }
    for (module, roles) in a.modules() {
        let Some((key, t)) = roles.get("a").or_else(|| roles.get("embedding_a")).copied() else {
            continue;
        };
        let tensor_rank = t.shape().first().copied().unwrap_or(0) as u64;
        let config_rank = resolver.rank_for(&module)?;
        // A `target_parameters` expert adapter has r·E rows.
        let fits = if parameter_targets {
            tensor_rank.is_multiple_of(config_rank)
        } else {
            tensor_rank == config_rank
        };
        if !fits {
            return Err(ClassifyError::RankMismatch {
                origin: origin_of(t),
                module,
                key: key.to_owned(),
                shape: t.shape().to_vec(),
                tensor_rank,
                config_rank,
            });
        }
        if let Some(m) = &matcher {
            if !m.is_target(&module)? {
                return Err(mismatch(
                    "target_modules",
                    format!("module `{module}` has adapter tensors (`{key}`) but the config does not target it"),
                ));
            }
        }
        if lora.use_dora != roles.contains_key("magnitude") {
            return Err(mismatch(
                "use_dora",
                format!(
                    "use_dora is {} but module `{module}` {} a lora_magnitude_vector",
                    lora.use_dora,
                    if roles.contains_key("magnitude") {
                        "has"
                    } else {
                        "has no"
                    }
                ),
            ));
        }
        if roles.contains_key("b_bias") && !lora.lora_bias {
            return Err(mismatch(
                "lora_bias",
                format!("module `{module}` has lora_B.bias but lora_bias is false"),
            ));
        }
    }
    let tt = a.trainable_token_modules();
    match (&lora.trainable_token_indices, tt.is_empty()) {
        (None, false) => {
            return Err(mismatch(
                "trainable_token_indices",
                format!(
                    "`{}` has trainable-token rows but the config has no indices",
                    tt.join("`, `")
                ),
            ))
        }
        (Some(_), true) => {
            return Err(mismatch(
                "trainable_token_indices",
                "the config has indices but the tensors have no trainable-token rows".into(),
            ))
        }
        (Some(indices), false) => {
            for m in &tt {
                let Some(e) = a.entries.values().find(|e| {
                    matches!(&e.kind, EntryKind::Adapter { role, module: Some(x) } if role == "trainable_tokens" && x == m)
                }) else {
                    continue;
                };
                let want = match indices {
                    TrainableTokenIndices::Indices(v) => Some(v.len()),
                    TrainableTokenIndices::PerModule(map) => map
                        .iter()
                        .find(|(k, _)| name_matches_suffix(m, k))
                        .map(|(_, v)| v.len()),
                };
                let rows = e.tensor.shape().first().copied().unwrap_or(0);
                if want.is_some_and(|w| w != rows) {
                    return Err(ClassifyError::Inconsistent {
                        origin: origin_of(&e.tensor),
                        key: e.source_key.clone(),
                        module: m.clone(),
                        reason: format!(
                            "{rows} trainable-token rows but trainable_token_indices lists {}",
                            want.unwrap_or_default()
                        ),
                    });
                }
            }
        }
        (None, true) => {}
    }
    let mts = a.modules_to_save();
    if !mts.is_empty() {
        let names = lora.modules_to_save.clone().unwrap_or_default();
        for m in &mts {
            if !names.iter().any(|n| m.ends_with(n.as_str())) {
                return Err(mismatch(
                    "modules_to_save",
                    format!(
                        "module `{m}` has a modules_to_save copy but the config does not list it"
                    ),
                ));
            }
        }
    }
    Ok(notes)
}

// ---------------------------------------------------------------------------------------------
// Summaries for `peftkit inspect`.

/// Scaling of a group of modules (`alpha / r`, or `alpha / sqrt(r)` with rsLoRA, as the `f32`
/// PyTorch applies).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScalingSummary {
    /// Rank.
    pub r: u64,
    /// Alpha.
    pub alpha: f64,
    /// rsLoRA.
    pub use_rslora: bool,
    /// The factor.
    pub scaling: f32,
    /// How many modules.
    pub modules: usize,
}

/// What `peftkit inspect` reports about one adapter.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdapterSummary {
    /// Adapter name.
    pub name: String,
    /// `peft_type`.
    pub method: String,
    /// Layout of the state dict it came from.
    pub layout: Layout,
    /// Tensors written for it.
    pub tensors: usize,
    /// Bytes of those tensors.
    pub bytes: u64,
    /// Adapted modules.
    pub modules: usize,
    /// Rank → number of modules.
    pub ranks: BTreeMap<u64, usize>,
    /// `target_modules` (from the config, else inferred).
    pub target_modules: Option<Vec<String>>,
    /// `use_dora`.
    pub use_dora: bool,
    /// `lora_bias`.
    pub lora_bias: bool,
    /// `fan_in_fan_out` (from the config, else inferred; `None` when unknown).
    pub fan_in_fan_out: Option<bool>,
    /// Modules saved whole.
    pub modules_to_save: Vec<String>,
    /// Modules with trainable-token rows.
    pub trainable_token_modules: Vec<String>,
    /// Scaling groups (needs a config: alpha is not in the tensors).
    pub scaling: Vec<ScalingSummary>,
    /// What could not be determined.
    pub notes: Vec<String>,
}

/// Summaries of every adapter in `state`. `config`, when given, applies to every adapter found
/// (pass it for a single adapter's file); without it, alpha and scaling are unknown.
pub fn summarize_adapters(
    state: &StateDict,
    config: Option<&AdapterConfig>,
) -> Result<Vec<AdapterSummary>, ClassifyError> {
    let c = classify_state_dict(
        state,
        &ClassifyOptions {
            peft_type: config.map(|c| c.peft_type().to_owned()),
            disk_adapter_name: None,
        },
    )?;
    summarize_classified(&c, config)
}

/// [`summarize_adapters`] over an already classified state dict.
pub fn summarize_classified(
    c: &ClassifiedStateDict,
    config: Option<&AdapterConfig>,
) -> Result<Vec<AdapterSummary>, ClassifyError> {
    let mut out = Vec::new();
    for (name, a) in &c.adapters {
        let mut notes = Vec::new();
        let modules = a.adapted_modules();
        let mut ranks: BTreeMap<u64, usize> = BTreeMap::new();
        for m in &modules {
            if let Some(r) = a.rank_of(m) {
                *ranks.entry(r as u64).or_default() += 1;
            }
        }
        let module_roles = a.modules();
        let use_dora = module_roles.values().any(|r| r.contains_key("magnitude"));
        let lora_bias = module_roles.values().any(|r| r.contains_key("b_bias"));
        let (mut target_modules, mut fan_in_fan_out) = (None, None);
        let mut scaling = Vec::new();
        match config.and_then(AdapterConfig::as_lora) {
            Some(lora) => {
                target_modules = match &lora.target_modules {
                    Some(TargetModules::Names(v)) => Some(v.clone()),
                    Some(TargetModules::Regex(s)) => Some(vec![s.clone()]),
                    None => None,
                };
                fan_in_fan_out = Some(lora.fan_in_fan_out);
                let resolver = PatternResolver::new(lora)?;
                let mut groups: BTreeMap<(u64, u64), (f64, usize)> = BTreeMap::new();
                for m in &modules {
                    let (r, alpha) = (resolver.rank_for(m)?, resolver.alpha_for(m)?);
                    let g = groups.entry((r, alpha.to_bits())).or_insert((alpha, 0));
                    g.1 += 1;
                }
                for ((r, _), (alpha, n)) in groups {
                    scaling.push(ScalingSummary {
                        r,
                        alpha,
                        use_rslora: lora.use_rslora,
                        scaling: crate::targeting::scaling(alpha, r, lora.use_rslora),
                        modules: n,
                    });
                }
            }
            None if a.method == LORA => {
                match infer_lora_structure(c, name, &BaseModelInfo::default()) {
                    Ok(s) => {
                        target_modules = Some(s.target_modules);
                        fan_in_fan_out = Some(s.fan_in_fan_out);
                        notes.extend(s.notes);
                    }
                    Err(e) => notes.push(e.to_string()),
                }
                notes.push("no adapter config: lora_alpha and scaling unknown".into());
            }
            None => {}
        }
        out.push(AdapterSummary {
            name: name.clone(),
            method: a.method.clone(),
            layout: c.layout,
            tensors: a.entries.len(),
            bytes: a.total_bytes(),
            modules: modules.len(),
            ranks,
            target_modules,
            use_dora,
            lora_bias,
            fan_in_fan_out,
            modules_to_save: a.modules_to_save(),
            trainable_token_modules: a.trainable_token_modules(),
            scaling,
            notes,
        });
    }
    Ok(out)
}

/// Summaries of the adapters at `path`: an adapter folder (its `adapter_config.json` and
/// weights, and every named sub-adapter), a checkpoint folder, or a `.safetensors` file.
pub fn summarize_path(path: &Path) -> Result<Vec<AdapterSummary>, ClassifyError> {
    if path.is_dir() && path.join(CONFIG_NAME).is_file() || has_sub_adapters(path) {
        let mut out = Vec::new();
        for (name, dir) in crate::adapter::Adapter::list(path) {
            let (config, _) = AdapterConfig::from_file(&dir.join(CONFIG_NAME))?;
            let ckpt = Checkpoint::open_kind(&dir, WeightsKind::Adapter, None)?;
            let c = classify_state_dict(
                &ckpt.state_dict(),
                &ClassifyOptions {
                    peft_type: Some(config.peft_type().to_owned()),
                    disk_adapter_name: Some(name.clone()),
                },
            )?;
            out.extend(summarize_classified(&c, Some(&config))?);
        }
        return Ok(out);
    }
    let ckpt = match Checkpoint::open(path) {
        Ok(c) => c,
        Err(CheckpointError::NotACheckpoint { .. }) if path.is_dir() => {
            Checkpoint::open_kind(path, WeightsKind::Adapter, None)?
        }
        Err(e) => return Err(e.into()),
    };
    summarize_adapters(&ckpt.state_dict(), None)
}

fn has_sub_adapters(path: &Path) -> bool {
    path.is_dir()
        && std::fs::read_dir(path)
            .map(|rd| rd.flatten().any(|e| e.path().join(CONFIG_NAME).is_file()))
            .unwrap_or(false)
}

/// Human-readable dtype and shape of a tensor (`F32 [4, 16]`), for messages.
pub fn describe_tensor(t: &Tensor) -> String {
    format!("{} {:?}", dtype_name(t.dtype()), t.shape())
}

#[cfg(test)]
mod tests {
    use super::*;
    use peftkit_checkpoint::Dtype;

    fn t(shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let bytes: Vec<u8> = (0..n as u32)
            .flat_map(|i| (i as f32).to_le_bytes())
            .collect();
        Tensor::from_bytes(Dtype::F32, shape.to_vec(), bytes).unwrap()
    }

    fn sd(entries: &[(&str, &[usize])]) -> StateDict {
        entries
            .iter()
            .map(|(k, s)| ((*k).to_owned(), t(s)))
            .collect()
    }

    fn classify(state: &StateDict) -> ClassifiedStateDict {
        classify_state_dict(state, &ClassifyOptions::default()).unwrap()
    }

    fn model_with_type(model_type: &str) -> BaseModelInfo {
        BaseModelInfo {
            config: Some(
                ModelConfig::from_json(&format!(r#"{{"model_type": "{model_type}"}}"#)).unwrap(),
            ),
            ..BaseModelInfo::default()
        }
    }

    #[test]
    fn base_keys_lose_wrapper_levels() {
        for (key, prompt, clean) in [
            (
                "base_model.model.m.q.base_layer.weight",
                false,
                "m.q.weight",
            ),
            ("base_model.model.m.q.base_layer.bias", false, "m.q.bias"),
            (
                "base_model.model.m.emb.token_adapter.base_layer.weight",
                false,
                "m.emb.weight",
            ),
            (
                "base_model.model.lm_head.original_module.weight",
                false,
                "lm_head.weight",
            ),
            (
                "base_model.model.m.experts.base_layer.base_layer.gate_up_proj",
                false,
                "m.experts.gate_up_proj",
            ),
            (
                "base_model.model.embed_tokens.weight",
                true,
                "model.embed_tokens.weight",
            ),
            ("base_model.lm_head.weight", true, "lm_head.weight"),
            // A parameter literally named `base_layer` stays.
            ("m.base_layer", false, "m.base_layer"),
        ] {
            assert_eq!(clean_base_key(key, prompt), clean, "{key}");
        }
    }

    #[test]
    fn conv1d_is_recognised_by_shape_then_by_table() {
        // GPT-2 c_attn: base (in, out) = (16, 48), A (4, 16), B (48, 4).
        let state = sd(&[
            (
                "base_model.model.h.0.attn.c_attn.base_layer.weight",
                &[16, 48],
            ),
            (
                "base_model.model.h.0.attn.c_attn.lora_A.default.weight",
                &[4, 16],
            ),
            (
                "base_model.model.h.0.attn.c_attn.lora_B.default.weight",
                &[48, 4],
            ),
        ]);
        let s =
            infer_lora_structure(&classify(&state), "default", &BaseModelInfo::default()).unwrap();
        assert!(s.fan_in_fan_out);
        assert!(s.notes.is_empty());

        // A Linear (out, in) = (48, 16).
        let state = sd(&[
            ("base_model.model.h.0.attn.qkv.base_layer.weight", &[48, 16]),
            (
                "base_model.model.h.0.attn.qkv.lora_A.default.weight",
                &[4, 16],
            ),
            (
                "base_model.model.h.0.attn.qkv.lora_B.default.weight",
                &[48, 4],
            ),
        ]);
        let s =
            infer_lora_structure(&classify(&state), "default", &BaseModelInfo::default()).unwrap();
        assert!(!s.fan_in_fan_out);

        // Square: the table decides, by model type when known.
        let state = sd(&[
            (
                "base_model.model.h.0.attn.c_proj.base_layer.weight",
                &[16, 16],
            ),
            (
                "base_model.model.h.0.attn.c_proj.lora_A.default.weight",
                &[4, 16],
            ),
            (
                "base_model.model.h.0.attn.c_proj.lora_B.default.weight",
                &[16, 4],
            ),
            (
                "base_model.model.h.0.attn.q_proj.base_layer.weight",
                &[16, 16],
            ),
            (
                "base_model.model.h.0.attn.q_proj.lora_A.default.weight",
                &[4, 16],
            ),
            (
                "base_model.model.h.0.attn.q_proj.lora_B.default.weight",
                &[16, 4],
            ),
        ]);
        let c = classify(&state);
        assert!(
            infer_lora_structure(&c, "default", &model_with_type("gpt2"))
                .unwrap()
                .fan_in_fan_out
        );
        assert!(
            !infer_lora_structure(&c, "default", &model_with_type("llama"))
                .unwrap()
                .fan_in_fan_out
        );
        let s = infer_lora_structure(&c, "default", &BaseModelInfo::default()).unwrap();
        assert!(s.fan_in_fan_out);
        assert_eq!(s.notes.len(), 1, "{:?}", s.notes);
        assert!(s.notes[0].contains("h.0.attn.c_proj"));

        // A base weight that fits neither layout.
        let state = sd(&[
            ("base_model.model.x.base_layer.weight", &[16, 40]),
            ("base_model.model.x.lora_A.default.weight", &[4, 16]),
            ("base_model.model.x.lora_B.default.weight", &[48, 4]),
        ]);
        let err = infer_lora_structure(&classify(&state), "default", &BaseModelInfo::default())
            .unwrap_err();
        assert!(matches!(err, ClassifyError::Inconsistent { .. }), "{err}");
        assert!(err.to_string().contains("x.base_layer.weight"), "{err}");
    }

    #[test]
    fn burn_factors_are_transposed_lazily() {
        let state = sd(&[
            ("layers.0.q.weight", &[3, 3]),
            ("layers.0.q.weight.lora.a", &[3, 2]),
            ("layers.0.q.weight.lora.b", &[2, 3]),
        ]);
        let c = classify(&state);
        assert_eq!(c.layout, Layout::Burn);
        assert_eq!(c.base.keys().collect::<Vec<_>>(), ["layers.0.q.weight"]);
        let a = &c.adapters["default"].entries["base_model.model.layers.0.q.lora_A.weight"];
        assert_eq!(a.tensor.shape(), [2, 3]);
        let vals: Vec<f32> = a
            .tensor
            .bytes()
            .unwrap()
            .chunks(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        // burn a = [[0,1],[2,3],[4,5]] -> A = a^T = [[0,2,4],[1,3,5]].
        assert_eq!(vals, [0.0, 2.0, 4.0, 1.0, 3.0, 5.0]);
        let b = &c.adapters["default"].entries["base_model.model.layers.0.q.lora_B.weight"];
        assert_eq!(b.tensor.shape(), [3, 2]);
        let err = classify_state_dict(
            &sd(&[("q.weight.lora.a", &[3, 2, 1])]),
            &ClassifyOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(err, ClassifyError::BurnShape { .. }), "{err}");
    }

    #[test]
    fn key_forms_are_not_mixed_and_duplicates_are_refused() {
        let err = classify_state_dict(
            &sd(&[
                ("base_model.model.q.lora_A.default.weight", &[2, 4]),
                ("base_model.model.v.lora_A.weight", &[2, 4]),
            ]),
            &ClassifyOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(err, ClassifyError::MixedKeyForms { .. }), "{err}");
        let err = classify_state_dict(
            &sd(&[
                ("base_model.model.q.lora_A.weight", &[2, 4]),
                ("q.lora_A.weight", &[2, 4]),
            ]),
            &ClassifyOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(err, ClassifyError::Duplicate { .. }), "{err}");
    }

    #[test]
    fn an_adapter_is_read_with_one_method() {
        // AdaLoRA's embedding keys look like LoRA's: the adapter's other keys settle it.
        let state = sd(&[
            ("base_model.model.m.q.lora_A", &[2, 4]),
            ("base_model.model.m.q.lora_B", &[4, 2]),
            ("base_model.model.m.q.lora_E", &[2, 1]),
            ("base_model.model.m.emb.lora_embedding_A", &[2, 8]),
        ]);
        let c = classify(&state);
        assert_eq!(c.layout, Layout::PeftAdapter);
        let a = &c.adapters["default"];
        assert_eq!(a.method, "ADALORA");
        assert_eq!(a.entries.len(), 4);
        // A Rust training state dict: bare base keys stay base, prefixed extra keys are
        // replacements.
        let state = sd(&[
            ("model.q.weight", &[4, 4]),
            ("model.q.lora_A.weight", &[2, 4]),
            ("model.q.lora_B.weight", &[4, 2]),
            ("base_model.model.lm_head.weight", &[8, 4]),
        ]);
        let c = classify(&state);
        assert_eq!(c.base.keys().collect::<Vec<_>>(), ["model.q.weight"]);
        assert_eq!(c.adapters["default"].modules_to_save(), ["lm_head"]);
    }

    #[test]
    fn patterns_and_names_that_are_not_unique_fall_back_to_full_names() {
        let mut entries: Vec<(String, Vec<usize>)> = Vec::new();
        for (i, r) in [(0, 8), (1, 4), (10, 4)] {
            let m = format!("base_model.model.layers.{i}.q_proj");
            entries.push((format!("{m}.base_layer.weight"), vec![4, 4]));
            entries.push((format!("{m}.lora_A.default.weight"), vec![r, 4]));
            entries.push((format!("{m}.lora_B.default.weight"), vec![4, r]));
        }
        entries.push((
            "base_model.model.head.score.original_module.weight".into(),
            vec![2, 4],
        ));
        entries.push((
            "base_model.model.head.score.modules_to_save.default.weight".into(),
            vec![2, 4],
        ));
        entries.push(("base_model.model.head.xscore.weight".into(), vec![2, 4]));
        let state: StateDict = entries.iter().map(|(k, s)| (k.clone(), t(s))).collect();
        let c = classify(&state);
        let s = infer_lora_structure(&c, "default", &BaseModelInfo::default()).unwrap();
        assert_eq!(s.r, 4);
        assert_eq!(
            s.rank_pattern,
            IndexMap::from([("layers.0.q_proj".to_owned(), 8)])
        );
        assert_eq!(s.target_modules, ["q_proj"]);
        // peft matches modules_to_save with a plain `endswith`: "score" would take "xscore" too.
        assert_eq!(s.modules_to_save, Some(vec!["head.score".to_owned()]));
    }
}
