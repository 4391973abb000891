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

use std::collections::{BTreeMap, HashMap};
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
    /// The adapter config could not be read or is invalid, with the file named.
    #[error("{path}: {source}")]
    InvalidConfig {
        /// The `adapter_config.json`.
        path: PathBuf,
        /// What is wrong with it.
        source: ConfigError,
    },
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

    /// Per module path, the method's tensors by role (module-scope entries only), in the order
    /// each module first appears.
    pub fn modules(&self) -> IndexMap<&str, AdapterModule<'_>> {
        let mut out: IndexMap<&str, AdapterModule<'_>> = IndexMap::new();
        for (key, e) in &self.entries {
            if let EntryKind::Adapter {
                role,
                module: Some(m),
            } = &e.kind
            {
                let module = out.entry(m.as_str()).or_default();
                module.roles.insert(role.as_str(), (key.as_str(), e));
            }
        }
        out
    }

    /// The modules that carry a low-rank pair (`A`/`B` or embedding `A`/`B`): what peft
    /// targeted.
    pub fn adapted_modules(&self) -> Vec<String> {
        self.modules()
            .into_iter()
            .filter(|(_, roles)| roles.is_adapted())
            .map(|(m, _)| m.to_owned())
            .collect()
    }

    /// The rank of a module: the leading dimension of its `A` tensor.
    pub fn rank_of(&self, module: &str) -> Option<usize> {
        self.modules().swap_remove(module)?.rank()
    }

    /// The replacement tensors by the base key they replace, in the order each base key first
    /// appears. Two entries for one base key (`<m>.base_layer.weight` and `<m>.weight`) are
    /// one replacement, the later one's tensor: loading the file in order leaves that one.
    pub fn replacements(&self) -> IndexMap<&str, &AdapterEntry> {
        let mut out = IndexMap::new();
        for e in self.entries.values() {
            if let EntryKind::Replacement { base_key } = &e.kind {
                out.insert(base_key.as_str(), e);
            }
        }
        out
    }

    /// Whether the adapter has model-level tensors (VeRA's shared `vera_A`, prompt
    /// embeddings): adapter tensors of no module.
    pub fn has_model_level(&self) -> bool {
        self.entries
            .values()
            .any(|e| matches!(&e.kind, EntryKind::Adapter { module: None, .. }))
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

/// The tensors of one adapted module by role (`a`, `b`, `b_bias`, `magnitude`, …; see
/// adapters-spec/methods.json): a view of the module's entries in an [`AdapterTensors`].
#[derive(Debug, Clone, Default)]
pub struct AdapterModule<'a> {
    /// Role -> (on-disk key, entry).
    roles: BTreeMap<&'a str, (&'a str, &'a AdapterEntry)>,
}

impl<'a> AdapterModule<'a> {
    /// The tensor of `role`, if present.
    pub fn get(&self, role: &str) -> Option<&'a Tensor> {
        self.entry(role).map(|e| &e.tensor)
    }

    /// The entry of `role`, if present.
    pub fn entry(&self, role: &str) -> Option<&'a AdapterEntry> {
        self.roles.get(role).map(|(_, e)| *e)
    }

    /// The tensor of `role` with its on-disk key, if present.
    pub fn keyed(&self, role: &str) -> Option<(&'a str, &'a Tensor)> {
        self.roles.get(role).map(|(k, e)| (*k, &e.tensor))
    }

    /// Whether the module carries a low-rank pair (`A`/`B` or embedding `A`/`B`): whether peft
    /// targeted it.
    pub fn is_adapted(&self) -> bool {
        self.contains_key("a") || self.contains_key("embedding_a")
    }

    /// The module's `A` tensor (of a Linear/Conv LoRA, or of an embedding LoRA) with its
    /// on-disk key.
    pub fn lora_a(&self) -> Option<(&'a str, &'a Tensor)> {
        self.keyed("a").or_else(|| self.keyed("embedding_a"))
    }

    /// The module's rank: the leading dimension of its `A` tensor.
    pub fn rank(&self) -> Option<usize> {
        self.lora_a().and_then(|(_, t)| t.shape().first().copied())
    }

    /// Whether the module has a tensor of `role`.
    pub fn contains_key(&self, role: &str) -> bool {
        self.roles.contains_key(role)
    }

    /// The number of roles present.
    pub fn len(&self) -> usize {
        self.roles.len()
    }

    /// Whether no role is present (never, for a module of [`AdapterTensors::modules`]).
    pub fn is_empty(&self) -> bool {
        self.roles.is_empty()
    }

    /// The roles and their entries, by role name.
    pub fn entries(&self) -> impl Iterator<Item = (&'a str, &'a AdapterEntry)> + '_ {
        self.roles.iter().map(|(r, (_, e))| (*r, *e))
    }

    /// The tensors with their on-disk keys, by role name.
    pub fn keyed_tensors(&self) -> impl Iterator<Item = (&'a str, &'a Tensor)> + '_ {
        self.roles.values().map(|(k, e)| (*k, &e.tensor))
    }
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
    /// The tensors, in file order, by on-disk key: the method's tensors under the key peft
    /// writes (`source_key` keeps the file's spelling, with or without the adapter name), and
    /// the base tensors the adapter replaces (`lm_head.weight`; `embed_tokens.base_layer.weight`
    /// replaces `embed_tokens.weight`) under their own key. Module-level tensors by module and
    /// role: [`AdapterTensors::modules`]; model-level ones (VeRA's `vera_A`) have no module.
    pub tensors: AdapterTensors,
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
        let (config, warnings) = AdapterConfig::from_file(&config_path).map_err(|source| {
            AdapterError::InvalidConfig {
                path: config_path.clone(),
                source,
            }
        })?;
        let weights = Checkpoint::open_kind(dir, WeightsKind::Adapter, None)?;
        let tensors = AdapterTensors::new(name, config.peft_type());
        let mut adapter = Adapter {
            name: name.to_owned(),
            dir: dir.to_owned(),
            config,
            warnings,
            weights,
            tensors,
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
        // The file key of each (module, role) so far: one tensor per role, even when a user
        // spec gives a role two on-disk spellings.
        let mut roles: HashMap<(Option<String>, String), String> = HashMap::new();
        for (key, tensor) in keys {
            let Some(class) = spec.classify_key_for(&method, &key) else {
                let (rest, had_prefix) = spec.strip_model_prefix(&key);
                if had_prefix {
                    let base_key = rest.replace(".base_layer.", ".");
                    let kind = EntryKind::Replacement { base_key };
                    self.insert(key.clone(), key, kind, tensor)?;
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
            let module = match (class.scope, class.module_path) {
                (RuleScope::Module, Some(path)) => Some(path),
                (RuleScope::Model, _) => None,
                _ => {
                    self.unexpected.push(key);
                    continue;
                }
            };
            let kind = EntryKind::Adapter {
                role: class.role,
                module,
            };
            if let EntryKind::Adapter { role, module } = &kind {
                let slot = (module.clone(), role.clone());
                if let Some(first) = roles.insert(slot, key.clone()) {
                    return Err(AdapterError::Duplicate {
                        file: self.file_of(&first),
                        first,
                        second: class.disk_key,
                    });
                }
            }
            self.insert(class.disk_key, key, kind, tensor)?;
        }
        self.check_complete()
    }

    /// Adds a tensor under its on-disk key; a second file key for one adapter tensor is an
    /// error (a replacement's on-disk key is its file key, so it never clashes).
    fn insert(
        &mut self,
        disk_key: String,
        source_key: String,
        kind: EntryKind,
        tensor: Tensor,
    ) -> Result<(), AdapterError> {
        if let Some(prev) = self.tensors.entries.get(&disk_key) {
            return Err(AdapterError::Duplicate {
                file: self.file_of(&prev.source_key),
                first: prev.source_key.clone(),
                second: disk_key,
            });
        }
        let entry = AdapterEntry {
            source_key,
            kind,
            tensor,
        };
        self.tensors.entries.insert(disk_key, entry);
        Ok(())
    }

    /// Each module must carry both halves of its low-rank pair.
    fn check_complete(&self) -> Result<(), AdapterError> {
        const PAIRS: [(&str, &str); 4] = [
            ("a", "b"),
            ("b", "a"),
            ("embedding_a", "embedding_b"),
            ("embedding_b", "embedding_a"),
        ];
        for (path, module) in self.tensors.modules() {
            for (have, need) in PAIRS {
                if let Some(e) = module.entry(have) {
                    if !module.contains_key(need) {
                        let present: Vec<&str> = module.entries().map(|(r, _)| r).collect();
                        return Err(AdapterError::Incomplete {
                            file: self.file_of(&e.source_key),
                            module: path.to_owned(),
                            present: present.join(", "),
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
        self.tensors.rank_of(module)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use peftkit_checkpoint::{write_file, Dtype, Tensor};

    use super::*;

    /// Two file keys for one base tensor (`<m>.base_layer.weight` and `<m>.weight`) are two
    /// entries but one replacement, the later key's tensor, where the base key first appeared.
    #[test]
    fn two_keys_for_one_replacement_keep_the_later() {
        let dir = tempfile::tempdir().unwrap();
        let config = r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"]}"#;
        std::fs::write(dir.path().join(ADAPTER_CONFIG_NAME), config).unwrap();
        let t = |fill: u8, n: usize| Tensor::from_bytes(Dtype::F32, vec![n], vec![fill; 4 * n]);
        let (first, second, lm) = (t(1, 2).unwrap(), t(2, 2).unwrap(), t(3, 1).unwrap());
        let tensors = [
            ("base_model.model.embed.base_layer.weight", &first),
            ("base_model.model.embed.weight", &second),
            ("base_model.model.lm_head.weight", &lm),
        ];
        let path = dir.path().join("adapter_model.safetensors");
        write_file(&path, tensors, &BTreeMap::new(), &mut |_| {}).unwrap();

        let adapter = Adapter::open(dir.path()).unwrap();
        assert_eq!(adapter.tensors.entries.len(), 3);
        let reps = adapter.tensors.replacements();
        let keys: Vec<(&str, &str)> = reps
            .iter()
            .map(|(b, e)| (*b, e.source_key.as_str()))
            .collect();
        assert_eq!(
            keys,
            [
                ("embed.weight", "base_model.model.embed.weight"),
                ("lm_head.weight", "base_model.model.lm_head.weight"),
            ]
        );
        assert_eq!(reps["embed.weight"].tensor.bytes().unwrap()[0], 2);
    }
}
