//! An adapter's tensors by module and role, under the on-disk keys peft writes.

use std::collections::BTreeMap;

use indexmap::IndexMap;
use peftkit_checkpoint::{StateDict, Tensor};

use crate::config::AdapterConfig;

use super::*;

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

    pub(super) fn insert(
        &mut self,
        disk_key: String,
        entry: AdapterEntry,
    ) -> Result<(), ClassifyError> {
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
