//! Loading adapter folders written by peft (or by peftkit): the config, and every tensor
//! sorted into what it is for.
//!
//! Keys are accepted with or without the `base_model.model.` prefix and with or without the
//! adapter name (`lora_A.weight` or `lora_A.default.weight`), as peft's loader accepts them.
//! Unlike peft, nothing is silently ignored: a key that is neither an adapter tensor of the
//! config's method nor a tensor under the model prefix is reported as unexpected, and a
//! module with an incomplete set of tensors (an `A` without its `B`) is an error.
//!
//! [`AdapterTensors`] is an adapter's tensors by on-disk key, as classification of any state
//! dict produces them (`classify` builds on these types).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use peftkit_checkpoint::{Checkpoint, CheckpointError, Tensor, WeightsKind};

use crate::config::{AdapterConfig, ConfigError, ConfigWarning, ADAPTER_CONFIG_NAME};
use crate::spec::{RuleScope, Spec};

/// Errors loading an adapter.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdapterError {
    /// The config could not be read or is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The weights could not be read.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The folder has no adapter config.
    #[error("{0}: no adapter_config.json; pass the folder peft's save_pretrained wrote")]
    NoConfig(PathBuf),
    /// A module lacks a tensor its method needs.
    #[error(
        "{file}: module `{module}` has {present} but no {missing}; the adapter file is incomplete"
    )]
    Incomplete {
        /// The adapter weights file.
        file: PathBuf,
        /// The module path.
        module: String,
        /// The roles present.
        present: String,
        /// The missing role.
        missing: String,
    },
    /// Two keys name the same adapter tensor (with and without the adapter name, say).
    #[error("{file}: `{first}` and `{second}` are the same adapter tensor")]
    Duplicate {
        /// The adapter weights file.
        file: PathBuf,
        /// First key.
        first: String,
        /// Second key.
        second: String,
    },
    /// Keys for another adapter name than the one loaded.
    #[error(
        "{file}: `{key}` belongs to adapter `{found}`, but adapter `{expected}` is being loaded"
    )]
    WrongAdapterName {
        /// The adapter weights file.
        file: PathBuf,
        /// The key.
        key: String,
        /// Adapter name in the key.
        found: String,
        /// Adapter name being loaded.
        expected: String,
    },
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
}

/// One tensor of an adapted module.
#[derive(Debug, Clone)]
pub struct AdapterTensor {
    /// Its key in the file.
    pub key: String,
    /// The tensor.
    pub tensor: Tensor,
}

/// The tensors of one adapted module, by role (`a`, `b`, `b_bias`, `magnitude`, …; see
/// adapters-spec/methods.json).
#[derive(Debug, Clone, Default)]
pub struct AdapterModule {
    /// Tensors by role.
    pub tensors: BTreeMap<String, AdapterTensor>,
}

impl AdapterModule {
    /// The tensor of `role`, if present.
    pub fn get(&self, role: &str) -> Option<&Tensor> {
        self.tensors.get(role).map(|t| &t.tensor)
    }
}

/// A full tensor of the base model carried in the adapter file: a `modules_to_save` copy,
/// an embedding saved with `save_embedding_layers`, a bias with `bias="all"`. Loading it
/// replaces the base tensor.
#[derive(Debug, Clone)]
pub struct Replacement {
    /// Its key in the file.
    pub key: String,
    /// The tensor.
    pub tensor: Tensor,
}

/// A loaded adapter.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// Adapter name (`default` for the root folder, the sub-folder name otherwise).
    pub name: String,
    /// The folder.
    pub dir: PathBuf,
    /// Its config.
    pub config: AdapterConfig,
    /// Warnings from reading the config (unknown fields, …).
    pub warnings: Vec<ConfigWarning>,
    /// The weights.
    pub weights: Checkpoint,
    /// Adapted modules by module path (`model.layers.0.self_attn.q_proj`), in file order.
    pub modules: IndexMap<String, AdapterModule>,
    /// Base tensors replaced by the adapter, by base key (`lm_head.weight`;
    /// `embed_tokens.base_layer.weight` is listed as `embed_tokens.weight`).
    pub replacements: IndexMap<String, Replacement>,
    /// Model-level shared tensors (VeRA's `vera_A`), by role.
    pub shared: IndexMap<String, AdapterTensor>,
    /// Keys that are neither (prompt-learning tensors are here too: they have no base).
    pub unexpected: Vec<String>,
}

impl Adapter {
    /// Opens the adapter in `dir` (its `adapter_config.json` and `adapter_model.safetensors`
    /// or sharded weights), named after its folder: `default` unless it is a named
    /// sub-folder of another adapter.
    pub fn open(dir: &Path) -> Result<Self, AdapterError> {
        let name = if dir
            .parent()
            .is_some_and(|p| p.join(ADAPTER_CONFIG_NAME).is_file())
        {
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "default".into())
        } else {
            "default".to_owned()
        };
        Self::open_named(dir, &name)
    }

    /// Opens the adapter in `dir` under the name `name`.
    pub fn open_named(dir: &Path, name: &str) -> Result<Self, AdapterError> {
        let config_path = dir.join(ADAPTER_CONFIG_NAME);
        if !config_path.is_file() {
            return Err(AdapterError::NoConfig(dir.to_owned()));
        }
        let (config, warnings) = AdapterConfig::from_file(&config_path)?;
        let weights = Checkpoint::open_kind(dir, WeightsKind::Adapter, None)?;
        let mut adapter = Adapter {
            name: name.to_owned(),
            dir: dir.to_owned(),
            config,
            warnings,
            weights,
            modules: IndexMap::new(),
            replacements: IndexMap::new(),
            shared: IndexMap::new(),
            unexpected: Vec::new(),
        };
        adapter.sort_tensors(Spec::embedded())?;
        Ok(adapter)
    }

    /// Lists the adapters of a folder: the root one (if any) and named sub-folders, as peft's
    /// `save_pretrained` lays out several adapters.
    pub fn list(dir: &Path) -> Vec<(String, PathBuf)> {
        let mut out = Vec::new();
        if dir.join(ADAPTER_CONFIG_NAME).is_file() {
            out.push(("default".to_owned(), dir.to_owned()));
        }
        if let Ok(entries) = std::fs::read_dir(dir) {
            let mut subs: Vec<(String, PathBuf)> = entries
                .filter_map(|e| e.ok())
                .filter(|e| e.path().join(ADAPTER_CONFIG_NAME).is_file())
                .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
                .collect();
            subs.sort();
            out.extend(subs);
        }
        out
    }

    fn file_of(&self, key: &str) -> PathBuf {
        self.weights
            .file_of(key)
            .map(Path::to_owned)
            .unwrap_or_else(|| self.dir.clone())
    }

    fn sort_tensors(&mut self, spec: &Spec) -> Result<(), AdapterError> {
        let method = self.config.peft_type().to_owned();
        let keys: Vec<(String, Tensor)> = self
            .weights
            .tensors()
            .map(|(k, t)| (k.to_owned(), t.clone()))
            .collect();
        for (key, tensor) in keys {
            let Some(class) = spec.classify_key_for(&method, &key) else {
                let (rest, had_prefix) = spec.strip_model_prefix(&key);
                if had_prefix {
                    let base_key = rest.replace(".base_layer.", ".");
                    self.replacements
                        .insert(base_key, Replacement { key, tensor });
                } else {
                    self.unexpected.push(key);
                }
                continue;
            };
            if let Some(found) = &class.adapter_name {
                if *found != self.name {
                    return Err(AdapterError::WrongAdapterName {
                        file: self.file_of(&key),
                        key,
                        found: found.clone(),
                        expected: self.name.clone(),
                    });
                }
            }
            let entry = AdapterTensor { key, tensor };
            let previous = match (class.scope, class.module_path) {
                (RuleScope::Module, Some(path)) => self
                    .modules
                    .entry(path)
                    .or_default()
                    .tensors
                    .insert(class.role.clone(), entry),
                (RuleScope::Model, _) => self.shared.insert(class.role.clone(), entry),
                _ => {
                    self.unexpected.push(entry.key);
                    None
                }
            };
            if let Some(prev) = previous {
                return Err(AdapterError::Duplicate {
                    file: self.file_of(&prev.key),
                    second: class.disk_key,
                    first: prev.key,
                });
            }
        }
        self.check_complete()
    }

    /// Each module must carry both halves of its low-rank pair.
    fn check_complete(&self) -> Result<(), AdapterError> {
        const PAIRS: [(&str, &str); 4] = [
            ("a", "b"),
            ("b", "a"),
            ("embedding_a", "embedding_b"),
            ("embedding_b", "embedding_a"),
        ];
        for (path, module) in &self.modules {
            for (have, need) in PAIRS {
                if let Some(t) = module.tensors.get(have) {
                    if !module.tensors.contains_key(need) {
                        return Err(AdapterError::Incomplete {
                            file: self.file_of(&t.key),
                            module: path.clone(),
                            present: module
                                .tensors
                                .keys()
                                .cloned()
                                .collect::<Vec<_>>()
                                .join(", "),
                            missing: need.to_owned(),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// The rank of a module: the leading dimension of its `A` tensor.
    pub fn rank_of(&self, module: &str) -> Option<usize> {
        let m = self.modules.get(module)?;
        m.get("a")
            .or_else(|| m.get("embedding_a"))
            .and_then(|t| t.shape().first().copied())
    }
}
