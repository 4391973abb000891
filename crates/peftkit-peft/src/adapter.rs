//! Loading adapter folders written by peft (or by peftkit): the config, and every tensor
//! sorted into what it is for.
//!
//! Keys are accepted with or without the `base_model.model.` prefix and with or without the
//! adapter name (`lora_A.weight` or `lora_A.default.weight`), as peft's loader accepts them.
//! Unlike peft, nothing is silently ignored: a key that is neither an adapter tensor of the
//! config's method nor a tensor under the model prefix is reported as unexpected, and a
//! module with an incomplete set of tensors (an `A` without its `B`) is an error.

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
