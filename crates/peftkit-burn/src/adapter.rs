//! LoRA factors between burn modules and peft adapter folders. Export goes through
//! peftkit-peft (classification of burn's `.lora.a`/`.lora.b` keys, which transposes them to
//! peft's layout, then `save_adapter`), so the files are the ones peft writes; import reads
//! the folder with peftkit-peft and attaches the factors with the crate's one reparameterizer.

use std::path::Path;

use burn::module::Module;
use burn::tensor::TensorData;
use burn_store::{bridge, ModuleSnapshot, PathFilter};
use peftkit_checkpoint::{CheckpointError, StateDict, Tensor};
use peftkit_peft::{
    classify_state_dict, save_adapter, Adapter, AdapterConfig, AdapterSaveOptions,
    AdapterSaveReport, ClassifyOptions, PatternResolver, DEFAULT_ADAPTER_NAME, LORA,
};

use crate::convert::{from_burn_dtype, read_as};
use crate::error::BurnError;
use crate::lora::{attach_factors, check_expressible, linear_layers, module_lora, AppliedLora};

/// The burn paths of LoRA factors (`<module>.weight.lora.a` / `.lora.b`).
const FACTOR_PATHS: &str = r"\.weight\.lora\.(a|b)$";

/// The factors of `module` as a state dict under their burn paths, each read from the
/// device only when the writer reaches it.
fn factor_state<M: ModuleSnapshot>(module: &M) -> Result<StateDict, BurnError> {
    let filter = PathFilter::new().with_regex(FACTOR_PATHS);
    let mut state = StateDict::new();
    for t in module.collect(Some(filter), None, false) {
        let name = t.name.clone();
        let dtype = from_burn_dtype(t.dtype).ok_or_else(|| BurnError::Tensor {
            tensor: name.clone(),
            reason: format!("dtype {:?} cannot be written to safetensors", t.dtype),
        })?;
        let key = name.clone();
        let lazy = Tensor::lazy(dtype, t.shape.to_vec(), move || {
            bridge::to_data(&t)
                .map(|d| d.into_bytes().to_vec())
                .map_err(|e| CheckpointError::TensorCompute {
                    tensor: key.clone(),
                    context: "reading the LoRA factor from burn".into(),
                    source: Box::new(e),
                })
        })?;
        state.insert(name, lazy);
    }
    Ok(state)
}

/// Writes the LoRA adapters of `module` as peft's `save_pretrained(dir)` does:
/// `adapter_model.safetensors` (burn's `a [in, r]` / `b [r, out]` transposed to peft's
/// `lora_A [r, in]` / `lora_B [out, r]`), `adapter_config.json` (`lora.config`) and
/// `README.md`. The bytes are those peft writes for the same tensors and config.
///
/// Every module of `lora` must carry its factors, and no other module may.
pub fn save_peft_adapter<M: ModuleSnapshot>(
    module: &M,
    lora: &AppliedLora,
    dir: &Path,
    options: &AdapterSaveOptions,
) -> Result<AdapterSaveReport, BurnError> {
    let state = factor_state(module)?;
    let classified = classify_state_dict(&state, &ClassifyOptions::default())?;
    let config = AdapterConfig::Lora(Box::new(lora.config.clone()));
    let tensors = classified.adapter_for_save(DEFAULT_ADAPTER_NAME, &config)?;
    let found = tensors.adapted_modules();
    for (name, m) in &lora.modules {
        let rank = tensors.rank_of(name).ok_or_else(|| BurnError::Module {
            module: name.clone(),
            reason: "is listed as adapted but carries no LoRA factors".into(),
        })?;
        if rank != m.rank {
            return Err(BurnError::Module {
                module: name.clone(),
                reason: format!("its factors have rank {rank}, the adapter says {}", m.rank),
            });
        }
    }
    if let Some(extra) = found.iter().find(|m| !lora.modules.contains_key(*m)) {
        return Err(BurnError::Module {
            module: extra.clone(),
            reason: "carries LoRA factors that the applied adapter does not list".into(),
        });
    }
    Ok(save_adapter(
        dir,
        DEFAULT_ADAPTER_NAME,
        &tensors,
        &config,
        options,
    )?)
}

/// Applies the peft LoRA adapter in `dir` to `module`: per-module rank (from the tensors)
/// and alpha (`lora_alpha`, `alpha_pattern`), rsLoRA, the factors transposed to burn's
/// layout and kept in their stored dtype, so [`save_peft_adapter`] writes the same files
/// back. Every base parameter is frozen.
///
/// Refused, naming the field or tensor: another `peft_type`, DoRA, `lora_bias`, `bias`,
/// `modules_to_save`, trainable tokens, `target_parameters`, `fan_in_fan_out`, LoRA
/// variants, any tensor that is not a linear layer's `lora_A`/`lora_B`, and modules the
/// burn module does not have (or whose shapes differ).
pub fn load_peft_adapter<M: Module>(module: M, dir: &Path) -> Result<(M, AppliedLora), BurnError> {
    let adapter = Adapter::open(dir)?;
    let config = match &adapter.config {
        AdapterConfig::Lora(c) => c.as_ref().clone(),
        other => {
            return Err(BurnError::UnsupportedLora {
                field: "peft_type".into(),
                value: other.peft_type().to_owned(),
                reason: format!("only {LORA} adapters can be applied in burn"),
            })
        }
    };
    check_expressible(&config, false)?;
    if let Some(key) = adapter.unexpected.first() {
        return Err(unsupported_tensor(key, "is not a LoRA factor"));
    }
    let layers = linear_layers(&module);
    let resolver = PatternResolver::new(&config)?;
    let mut factors = Vec::new();
    let mut modules = indexmap::IndexMap::new();
    for (name, roles) in adapter.tensors.modules() {
        if let Some((role, entry)) = roles.entries().find(|(r, _)| !matches!(*r, "a" | "b")) {
            return Err(unsupported_tensor(
                &entry.source_key,
                &format!("role `{role}` has no burn equivalent"),
            ));
        }
        let (Some((_, a)), Some((_, b))) = (roles.keyed("a"), roles.keyed("b")) else {
            return Err(BurnError::Module {
                module: name.to_owned(),
                reason: "needs both lora_A and lora_B".into(),
            });
        };
        let layer = layers.get(name).ok_or_else(|| BurnError::Module {
            module: name.to_owned(),
            reason: "is not a Linear layer of the burn module".into(),
        })?;
        let rank = a.shape()[0];
        if a.shape() != [rank, layer.d_in] || b.shape() != [layer.d_out, rank] {
            return Err(BurnError::Module {
                module: name.to_owned(),
                reason: format!(
                    "lora_A {:?} / lora_B {:?} do not fit a [{}, {}] layer",
                    a.shape(),
                    b.shape(),
                    layer.d_out,
                    layer.d_in
                ),
            });
        }
        let m = module_lora(&config, &resolver, name, rank)?;
        factors.push((
            name.to_owned(),
            m.clone(),
            transposed(name, a)?,
            transposed(name, b)?,
        ));
        modules.insert(name.to_owned(), m);
    }
    if modules.is_empty() {
        return Err(BurnError::Module {
            module: dir.display().to_string(),
            reason: "the adapter has no LoRA factors".into(),
        });
    }
    let module = attach_factors(module, &layers, factors)?;
    Ok((module, AppliedLora { config, modules }))
}

fn unsupported_tensor(key: &str, why: &str) -> BurnError {
    BurnError::Tensor {
        tensor: key.to_owned(),
        reason: format!("{why}: burn's LoRA holds only a linear layer's lora_A and lora_B"),
    }
}

/// A peft factor (`[rows, cols]`) in burn's layout (`[cols, rows]`), dtype kept. Transposed
/// on the host: no backend is needed to read it.
fn transposed(module: &str, t: &Tensor) -> Result<TensorData, BurnError> {
    read_as(module, t, None, true).map_err(|reason| BurnError::Tensor {
        tensor: module.to_owned(),
        reason,
    })
}
