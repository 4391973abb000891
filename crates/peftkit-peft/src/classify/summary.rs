//! Summaries of adapters for `peftkit inspect`.

use std::collections::BTreeMap;
use std::path::Path;

use peftkit_checkpoint::dtype_name;
use peftkit_checkpoint::{Checkpoint, CheckpointError, StateDict, Tensor, WeightsKind};
use serde::Serialize;

use crate::config::{AdapterConfig, ADAPTER_CONFIG_NAME, LORA};
use crate::scaling::lora_scaling;
use crate::targeting::PatternResolver;
use crate::targeting::TargetModules;

use super::*;

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
    pub layout: StateDictLayout,
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
        // One view by module serves the ranks, the module list and the flags below.
        let module_roles = a.modules();
        let adapted: Vec<(&str, &_)> = module_roles
            .iter()
            .filter(|(_, roles)| roles.is_adapted())
            .map(|(m, roles)| (*m, roles))
            .collect();
        let modules: Vec<String> = adapted.iter().map(|(m, _)| (*m).to_owned()).collect();
        let mut ranks: BTreeMap<u64, usize> = BTreeMap::new();
        for (_, roles) in &adapted {
            if let Some(r) = roles.rank() {
                *ranks.entry(r as u64).or_default() += 1;
            }
        }
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
                    let s = lora_scaling(alpha, r as usize, lora.use_rslora, 1.0)
                        .expect("rank_for refuses rank 0");
                    scaling.push(ScalingSummary {
                        r,
                        alpha,
                        use_rslora: lora.use_rslora,
                        scaling: s,
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
    summarize_path_variant(path, None)
}

/// [`summarize_path`] of the `variant` weight files (`model.VARIANT.safetensors`) of a
/// checkpoint folder; adapter folders have no variants (peft writes none).
pub fn summarize_path_variant(
    path: &Path,
    variant: Option<&str>,
) -> Result<Vec<AdapterSummary>, ClassifyError> {
    if path.is_dir() && path.join(ADAPTER_CONFIG_NAME).is_file() || has_sub_adapters(path) {
        let mut out = Vec::new();
        for (name, dir) in crate::adapter::Adapter::list(path) {
            let (config, _) = AdapterConfig::from_file(&dir.join(ADAPTER_CONFIG_NAME))?;
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
    let ckpt = match Checkpoint::open_kind(path, WeightsKind::Model, variant) {
        Ok(c) => c,
        Err(CheckpointError::NotACheckpoint { .. }) if path.is_dir() => {
            Checkpoint::open_kind(path, WeightsKind::Adapter, variant)?
        }
        Err(e) => return Err(e.into()),
    };
    summarize_adapters(&ckpt.state_dict(), None)
}

fn has_sub_adapters(path: &Path) -> bool {
    path.is_dir()
        && std::fs::read_dir(path)
            .map(|rd| {
                rd.flatten()
                    .any(|e| e.path().join(ADAPTER_CONFIG_NAME).is_file())
            })
            .unwrap_or(false)
}

/// Human-readable dtype and shape of a tensor (`F32 [4, 16]`), for messages.
pub fn describe_tensor(t: &Tensor) -> String {
    format!("{} {:?}", dtype_name(t.dtype()), t.shape())
}
