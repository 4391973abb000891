//! Classification-side constructors of [`AdapterTensors`]: inserting under peft's on-disk
//! keys (a clash is a `ClassifyError`), reading an adapter file's state dict, and writing the
//! tensors back under the keys peft or transformers writes.

use peftkit_checkpoint::StateDict;

use crate::adapter::{AdapterEntry, AdapterTensors};
use crate::config::AdapterConfig;

use super::*;

impl AdapterTensors {
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
