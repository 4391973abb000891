//! Planning a merge: every adapter tensor resolved to the base tensor it changes, and every
//! check that can be made before a byte is written.
//!
//! One module per method family: [`lora`] (LoRA, DoRA, `lora_bias`, trainable tokens),
//! [`experts`] (LoRA on module parameters: fused MoE experts and routers), [`ia3`] and
//! [`loha_lokr`]. They all add [`Step`]s to one [`Planner`].

mod experts;
mod ia3;
mod loha_lokr;
mod lora;

use std::path::Path;
use std::sync::Arc;

use indexmap::IndexMap;
use peftkit_checkpoint::{Checkpoint, Dtype, ModelConfig, StateDict, Tensor};
use peftkit_peft::{Adapter, AdapterConfig};

use crate::edit::{Edit, Step};
use crate::error::{MergeError, UnsupportedMerge};
use crate::kernels::lora_scaling;

/// Everything decided before any byte is written.
pub(crate) struct MergePlan {
    /// The edits of each base tensor, in the order they apply.
    pub steps: IndexMap<String, Vec<Step>>,
    /// Tensors the base lacks (an untied `lm_head`), with the base tensor they were tied to.
    pub added: IndexMap<String, (Tensor, String)>,
    /// Whether the merge unties the embeddings.
    pub untie: bool,
}

/// A plan under construction, and what resolving names against the base needs.
pub(crate) struct Planner<'a> {
    base: &'a Checkpoint,
    /// The conversion table of the base's model type: adapters name fused v5 parameters,
    /// checkpoints on disk may hold them per expert or under their original names.
    mapping: Option<peftkit_remap::Mapping>,
    tied: bool,
    plan: MergePlan,
}

/// Plans the merge of `adapters` (each with its weight), in order, into `base`.
pub(crate) fn plan(
    base: &Checkpoint,
    base_config: Option<&ModelConfig>,
    adapters: &[(Adapter, f64)],
) -> Result<MergePlan, MergeError> {
    let mut planner = Planner {
        base,
        mapping: base_config
            .and_then(ModelConfig::model_type)
            .and_then(|t| peftkit_remap::Registry::builtin().ok()?.mapping(t).ok()),
        tied: base_config
            .map(ModelConfig::tie_word_embeddings)
            .unwrap_or(false),
        plan: MergePlan {
            steps: IndexMap::new(),
            added: IndexMap::new(),
            untie: false,
        },
    };
    for (adapter, weight) in adapters {
        planner.adapter(adapter, *weight)?;
    }
    Ok(planner.plan)
}

/// `what`, refused for `adapter`.
pub(crate) fn unsupported(adapter: &Adapter, what: UnsupportedMerge) -> MergeError {
    MergeError::Unsupported {
        adapter: adapter.dir.clone(),
        what,
    }
}

/// The scale of one adapter layer: [`lora_scaling`] with the adapter's merge weight.
pub(crate) fn scale_of(
    alpha: f64,
    r: usize,
    rslora: bool,
    weight: f64,
    adapter: &Adapter,
) -> Result<f32, MergeError> {
    lora_scaling(alpha, r, rslora, weight)
        .map_err(|e| unsupported(adapter, UnsupportedMerge::Scaling(e.into())))
}

/// The adapter tensor key of `role` in a module's tensors (for messages).
pub(crate) fn key_of(module: &peftkit_peft::AdapterModule<'_>, role: &str) -> String {
    module
        .entry(role)
        .map(|e| e.source_key.clone())
        .unwrap_or_default()
}

impl Planner<'_> {
    /// Adds the steps of one adapter.
    fn adapter(&mut self, adapter: &Adapter, weight: f64) -> Result<(), MergeError> {
        let dir: Arc<Path> = Arc::from(adapter.dir.as_path());
        if let Some(key) = adapter.unexpected.first() {
            return Err(unsupported(
                adapter,
                UnsupportedMerge::NotAModuleTensor {
                    key: key.clone(),
                    peft_type: adapter.config.peft_type().to_string(),
                },
            ));
        }
        // Full tensors carried by the adapter replace the base's before its deltas apply, as
        // peft loads them into the base model first.
        self.replacements(adapter, &dir)?;
        if adapter.tensors.has_model_level() {
            return Err(unsupported(
                adapter,
                UnsupportedMerge::SharedTensors {
                    peft_type: adapter.config.peft_type().to_string(),
                },
            ));
        }
        match &adapter.config {
            AdapterConfig::Lora(cfg) => self.lora(adapter, &dir, cfg, weight),
            AdapterConfig::Other(generic) => match generic.peft_type.as_str() {
                "IA3" => self.ia3(adapter, &dir, &generic.fields),
                method @ ("LOHA" | "LOKR") => {
                    self.loha_lokr(adapter, &dir, method, &generic.fields, weight)
                }
                other => Err(unsupported(
                    adapter,
                    UnsupportedMerge::Method {
                        peft_type: other.to_owned(),
                    },
                )),
            },
        }
    }

    /// Adds `edit` to base tensor `key`.
    fn push(&mut self, key: &str, dir: &Arc<Path>, edit: Edit) {
        self.plan
            .steps
            .entry(key.to_owned())
            .or_default()
            .push(Step {
                adapter: dir.clone(),
                edit,
            });
    }

    /// The base tensor `{module}.{param}` (under its on-disk name if the base renames it),
    /// which adapter tensor `key` adapts.
    fn base_tensor(
        &self,
        adapter: &Adapter,
        module: &str,
        param: &str,
        key: &str,
    ) -> Result<(String, Tensor), MergeError> {
        let expected = format!("{module}.{param}");
        let found = self
            .base
            .get(&expected)
            .map(|t| (expected.clone(), t.clone()))
            .or_else(|| {
                let name = on_disk_name(self.mapping.as_ref()?, &expected, self.base)?;
                self.base.get(&name).map(|t| (name, t.clone()))
            });
        found.ok_or_else(|| MergeError::NoBaseTensor {
            adapter: adapter.dir.clone(),
            key: key.to_owned(),
            module: module.to_owned(),
            expected,
            base: self.base.dir.clone(),
        })
    }

    /// The full tensors an adapter carries (`modules_to_save`, saved embeddings).
    fn replacements(&mut self, adapter: &Adapter, dir: &Arc<Path>) -> Result<(), MergeError> {
        for (base_key, rep) in adapter.tensors.replacements() {
            if self.base.get(base_key).is_some() {
                let source = rep.tensor.clone();
                self.push(base_key, dir, Edit::Replace { source });
            } else if self.tied && base_key.ends_with("lm_head.weight") {
                // A trained lm_head copy on a tied model: the merge unties the embeddings.
                let source = self
                    .base
                    .tensors()
                    .find(|(k, _)| k.ends_with("embed_tokens.weight") || k.ends_with("wte.weight"))
                    .map(|(k, _)| k.to_owned())
                    .unwrap_or_default();
                let added = (rep.tensor.clone(), source);
                self.plan.added.insert(base_key.to_owned(), added);
                self.plan.untie = true;
            } else {
                return Err(MergeError::NoBaseTensor {
                    adapter: adapter.dir.clone(),
                    key: rep.source_key.clone(),
                    module: base_key.to_owned(),
                    expected: base_key.to_owned(),
                    base: self.base.dir.clone(),
                });
            }
        }
        Ok(())
    }
}

/// The on-disk name of a base tensor an adapter names in transformers-v5 module naming
/// (`model.language_model.layers.0…` for Llava, `mlp.gate` for Mixtral's router), through the
/// base's conversion table. Only one-to-one renames qualify; fused parameters are split per
/// expert elsewhere.
fn on_disk_name(
    mapping: &peftkit_remap::Mapping,
    v5_name: &str,
    base: &Checkpoint,
) -> Option<String> {
    let probe = Tensor::lazy(Dtype::U8, vec![0], || Ok(Vec::new())).ok()?;
    let single: StateDict = [(v5_name.to_owned(), probe)].into_iter().collect();
    let reversed = mapping
        .reverse(&single, &peftkit_remap::Revert::AllTableRules)
        .ok()?;
    let mut names = reversed.keys();
    match (names.next(), names.next()) {
        (Some(name), None) if name != v5_name && base.get(name).is_some() => Some(name.clone()),
        _ => None,
    }
}

impl MergePlan {
    /// Refuses, before anything is written, the edits that exact numerics do not define (the
    /// kernels would refuse them too, but only once the save is under way).
    pub(crate) fn check_exact(&self, unmerge: bool) -> Result<(), MergeError> {
        for (name, steps) in &self.steps {
            for step in steps {
                let method = match &step.edit {
                    Edit::Lora { dora: true, .. } => "DoRA",
                    Edit::Loha { .. } => "LoHa",
                    Edit::Lokr { .. } => "LoKr",
                    Edit::Ia3 { .. } | Edit::Ia3Bias { .. } if unmerge => "IA3 unmerge",
                    _ => continue,
                };
                return Err(MergeError::Unsupported {
                    adapter: step.adapter.to_path_buf(),
                    what: UnsupportedMerge::Exact {
                        tensor: name.clone(),
                        method,
                    },
                });
            }
        }
        Ok(())
    }

    /// Refuses an unmerge whose original values the adapters do not hold: an added tensor
    /// (`first_adapter` is named), a replaced tensor or rows.
    pub(crate) fn check_unmerge(&self, first_adapter: &Path) -> Result<(), MergeError> {
        if !self.added.is_empty() {
            return Err(MergeError::Unsupported {
                adapter: first_adapter.to_owned(),
                what: UnsupportedMerge::UnmergeUntie,
            });
        }
        let replacing = self
            .steps
            .values()
            .flatten()
            .find(|s| matches!(s.edit, Edit::Replace { .. } | Edit::Rows { .. }));
        match replacing {
            Some(step) => Err(MergeError::Unsupported {
                adapter: step.adapter.to_path_buf(),
                what: UnsupportedMerge::UnmergeReplacement,
            }),
            None => Ok(()),
        }
    }
}
