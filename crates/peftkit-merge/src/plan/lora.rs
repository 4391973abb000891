//! LoRA adapters: plain, DoRA and `lora_bias` pairs on Linear/`Conv1D`, Embedding and Conv
//! modules, and trainable-token rows.

use std::path::Path;
use std::sync::Arc;

use peftkit_checkpoint::Tensor;
use peftkit_peft::{
    Adapter, AdapterModule, LoraConfig, PatternResolver, StringOrList, TrainableTokenIndices,
};

use super::experts::ParamContext;
use super::{key_of, scale_of, unsupported, Planner};
use crate::edit::{Edit, LoraKind, ModuleTensors};
use crate::error::{MergeError, UnsupportedMerge};

impl Planner<'_> {
    /// Adds the steps of a LoRA adapter.
    pub(super) fn lora(
        &mut self,
        adapter: &Adapter,
        dir: &Arc<Path>,
        cfg: &LoraConfig,
        weight: f64,
    ) -> Result<(), MergeError> {
        let features = cfg.unsupported_merge_features();
        if !features.is_empty() {
            let features = features.iter().map(|f| f.to_string()).collect();
            return Err(unsupported(
                adapter,
                UnsupportedMerge::LoraFeatures { features },
            ));
        }
        let target_params: Vec<String> = match &cfg.target_parameters {
            Some(StringOrList::Many(v)) => v.clone(),
            Some(StringOrList::One(s)) => vec![s.clone()],
            None => Vec::new(),
        };
        let resolver = PatternResolver::new(cfg).map_err(|e| unsupported(adapter, e.into()))?;
        for (module, tensors) in &adapter.tensors.modules() {
            if let Some(rows) = tensors.get("trainable_tokens") {
                self.token_rows(adapter, dir, cfg, module, tensors, rows)?;
            }
            if !target_params.is_empty() {
                if let (Some(a), Some(b)) = (tensors.get("a"), tensors.get("b")) {
                    let ctx = ParamContext {
                        base: self.base,
                        mapping: self.mapping.as_ref(),
                        resolver: &resolver,
                        use_rslora: cfg.use_rslora,
                        weight,
                        adapter,
                    };
                    if let Some(edits) =
                        ctx.edits(module, &target_params, a, b, &key_of(tensors, "a"))?
                    {
                        for (base_key, edit) in edits {
                            self.push(&base_key, dir, edit);
                        }
                        continue;
                    }
                }
            }
            self.module_lora(adapter, dir, cfg, module, tensors, weight, &resolver)?;
        }
        Ok(())
    }

    /// Trainable-token rows: the rows of `module`'s weight at the configured indices.
    fn token_rows(
        &mut self,
        adapter: &Adapter,
        dir: &Arc<Path>,
        cfg: &LoraConfig,
        module: &str,
        tensors: &AdapterModule<'_>,
        rows: &Tensor,
    ) -> Result<(), MergeError> {
        let key = key_of(tensors, "trainable_tokens");
        let indices = match &cfg.trainable_token_indices {
            Some(TrainableTokenIndices::Indices(v)) => v.clone(),
            Some(TrainableTokenIndices::PerModule(m)) => m
                .iter()
                .find(|(n, _)| module == *n || module.ends_with(&format!(".{n}")))
                .map(|(_, v)| v.clone())
                .unwrap_or_default(),
            None => {
                let what = UnsupportedMerge::NoTokenIndices { key };
                return Err(unsupported(adapter, what));
            }
        };
        let indices: Vec<usize> = indices
            .iter()
            .map(|&i| usize::try_from(i))
            .collect::<Result<_, _>>()
            .map_err(|_| unsupported(adapter, UnsupportedMerge::NegativeTokenIndex))?;
        let (bk, _) = self.base_tensor(adapter, module, "weight", &key)?;
        let rows = rows.clone();
        self.push(&bk, dir, Edit::Rows { indices, rows });
        Ok(())
    }

    /// A LoRA pair on `module`'s weight (and its `lora_bias` on the bias), the layer type told
    /// by the roles and the base weight's rank.
    #[allow(clippy::too_many_arguments)] // one call site; a struct would only rename them
    fn module_lora(
        &mut self,
        adapter: &Adapter,
        dir: &Arc<Path>,
        cfg: &LoraConfig,
        module: &str,
        tensors: &AdapterModule<'_>,
        weight: f64,
        resolver: &PatternResolver,
    ) -> Result<(), MergeError> {
        let (ra, kind_hint) = if tensors.get("embedding_a").is_some() {
            ("embedding_a", Some(LoraKind::Embedding))
        } else {
            ("a", None)
        };
        let Some(a) = tensors.get(ra) else {
            return Ok(());
        };
        let r = a.shape().first().copied().unwrap_or(0);
        let alpha = resolver
            .alpha_for(module)
            .map_err(|e| unsupported(adapter, e.into()))?;
        let scale = scale_of(alpha, r, cfg.use_rslora, weight, adapter)?;
        let (bk, bt) = self.base_tensor(adapter, module, "weight", &key_of(tensors, ra))?;
        let kind = match kind_hint {
            Some(k) => k,
            None if bt.shape().len() == 2 => LoraKind::Linear {
                fan_in_fan_out: cfg.fan_in_fan_out,
            },
            None if (3..=5).contains(&bt.shape().len()) => {
                if a.shape().get(1) != bt.shape().get(1) {
                    let what = UnsupportedMerge::GroupedConv { tensor: bk };
                    return Err(unsupported(adapter, what));
                }
                LoraKind::Conv
            }
            None => {
                return Err(MergeError::Shape {
                    adapter: adapter.dir.clone(),
                    key: key_of(tensors, ra),
                    adapter_shape: a.shape().to_vec(),
                    base_key: bk,
                    base_shape: bt.shape().to_vec(),
                })
            }
        };
        check_lora_shapes(adapter, tensors, kind, &bk, &bt)?;
        let edit = Edit::Lora {
            module: ModuleTensors::of(tensors),
            kind,
            scale,
            dora: tensors.get("magnitude").is_some(),
            round_first: false,
        };
        self.push(&bk, dir, edit);
        if let Some(bias) = tensors.get("b_bias") {
            let (bbk, _) = self.base_tensor(adapter, module, "bias", &key_of(tensors, "b_bias"))?;
            let bias = bias.clone();
            self.push(&bbk, dir, Edit::LoraBias { bias, scale });
        }
        Ok(())
    }
}

/// Refuses a LoRA pair whose shapes do not fit the base weight, naming the factor at fault.
fn check_lora_shapes(
    adapter: &Adapter,
    m: &AdapterModule<'_>,
    kind: LoraKind,
    base_key: &str,
    base: &Tensor,
) -> Result<(), MergeError> {
    let (ra, rb) = kind.roles();
    let (Some(a), Some(b)) = (m.entry(ra), m.entry(rb)) else {
        return Ok(());
    };
    let bs = base.shape();
    let (a_s, b_s) = (a.tensor.shape(), b.tensor.shape());
    let ok = match kind {
        LoraKind::Linear {
            fan_in_fan_out: false,
        } => bs.len() == 2 && a_s.get(1) == Some(&bs[1]) && b_s.first() == Some(&bs[0]),
        LoraKind::Linear {
            fan_in_fan_out: true,
        } => bs.len() == 2 && a_s.get(1) == Some(&bs[0]) && b_s.first() == Some(&bs[1]),
        LoraKind::Embedding => {
            bs.len() == 2 && a_s.get(1) == Some(&bs[0]) && b_s.first() == Some(&bs[1])
        }
        LoraKind::Conv => b_s.first() == Some(&bs[0]) && a_s.get(1) == bs.get(1),
    } && a_s.first() == b_s.get(1);
    if ok {
        return Ok(());
    }
    let bad = if a_s.first() == b_s.get(1) && b_s.first() == bs.first() {
        a
    } else {
        b
    };
    Err(MergeError::Shape {
        adapter: adapter.dir.clone(),
        key: bad.source_key.clone(),
        adapter_shape: bad.tensor.shape().to_vec(),
        base_key: base_key.to_owned(),
        base_shape: bs.to_vec(),
    })
}
