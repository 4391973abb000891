//! peft's `_convert_peft_config_moe`: the LoRA config rewritten for the fused v5 parameters.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use indexmap::IndexMap;
use serde_json::Number;

use crate::config::LoraConfig;
use crate::py::{name_matches_suffix, re_escape};
use crate::targeting::{StringOrList, TargetModules};

use super::*;

/// `n * k` with Python's types: an int stays an int, a float stays a float.
pub(super) fn mul_number(n: &Number, k: u64) -> Option<Number> {
    if let Some(u) = n.as_u64() {
        u.checked_mul(k).map(Number::from)
    } else if let Some(i) = n.as_i64() {
        i64::try_from(k)
            .ok()
            .and_then(|k| i.checked_mul(k))
            .map(Number::from)
    } else {
        n.as_f64().and_then(|f| Number::from_f64(f * k as f64))
    }
}

/// peft's `_convert_peft_config_moe` on a LoRA config. `adapter_leaves` are the last name
/// components of the adapter's modules, used to resolve `"all-linear"`.
pub(super) fn rewrite_config(
    lora: &mut LoraConfig,
    rules: &LegacyMoeRules,
    adapter_leaves: &BTreeSet<String>,
    options: &ConvertOptions,
    file: &Path,
) -> Result<(), ConvertError> {
    let targets = legacy_targets(lora, rules, adapter_leaves, file)?;
    // A set in peft, written in set order. Kept here in a fixed order instead: the entries
    // already there, then the new ones in the table's order (router, then the fused parameters
    // in their module's registration order, which is also the order peft nests their wrappers).
    let mut target_parameters = existing_target_parameters(lora, file)?;
    let added_parameters = move_targets(lora, rules, &targets, &mut target_parameters, file)?;
    // peft sets both patterns to {} whenever it converts, even when nothing is fused.
    lora.rank_pattern.get_or_insert_with(IndexMap::new);
    lora.alpha_pattern.get_or_insert_with(IndexMap::new);
    lora.target_parameters = Some(StringOrList::Many(target_parameters));
    if added_parameters {
        check_param_wrapper(lora, options, file)?;
    }
    lora.inference_mode = true;
    Ok(())
}

fn config_err(file: &Path, reason: String) -> ConvertError {
    ConvertError::Config {
        file: file.to_owned(),
        reason,
    }
}

/// The legacy `target_modules` as a list of names (`"all-linear"` resolved).
fn legacy_targets(
    lora: &LoraConfig,
    rules: &LegacyMoeRules,
    adapter_leaves: &BTreeSet<String>,
    file: &Path,
) -> Result<Vec<String>, ConvertError> {
    let config_err = |reason: String| config_err(file, reason);
    Ok(match &lora.target_modules {
        Some(TargetModules::Names(v)) => v.clone(),
        Some(t @ TargetModules::Regex(_)) if t.is_all_linear() => {
            // peft resolves "all-linear" to the leaf names of the v5 model's Linear layers plus
            // every v4 name it maps; a legacy all-linear adapter holds a pair for each of those
            // Linear layers, so its own module names give the same set.
            let mut set: BTreeSet<String> = adapter_leaves.clone();
            set.extend(rules.target_mapping.iter().map(|(old, _)| old.clone()));
            set.into_iter().collect()
        }
        Some(TargetModules::Regex(r)) => {
            return Err(config_err(format!(
                "target_modules is the regex `{r}`; peft resolves it against the loaded model, which a converter without the model cannot repeat exactly. Replace it by the list of module names it matches and convert again"
            )))
        }
        None => {
            return Err(config_err(
                "target_modules is null; peft 0.21.2 would turn it into an empty list before applying the model's default targets, and the adapter would target nothing. Write the target module names into adapter_config.json and convert again".into(),
            ))
        }
    })
}

/// The `target_parameters` already in the config, de-duplicated in order.
fn existing_target_parameters(lora: &LoraConfig, file: &Path) -> Result<Vec<String>, ConvertError> {
    let config_err = |reason: String| config_err(file, reason);
    Ok(match &lora.target_parameters {
        None => Vec::new(),
        Some(StringOrList::Many(v)) => {
            let mut out: Vec<String> = Vec::new();
            for t in v {
                if !out.contains(t) {
                    out.push(t.clone());
                }
            }
            out
        }
        Some(StringOrList::One(s)) => {
            return Err(config_err(format!(
                "target_parameters is the string `{s}`, not a list; peft would read it as a set of characters"
            )))
        }
    })
}

/// Moves every target the table maps from `target_modules` to `target_parameters`, checks that
/// fused parameters are targeted whole, and scales their patterns. Returns whether any
/// parameter was added.
fn move_targets(
    lora: &mut LoraConfig,
    rules: &LegacyMoeRules,
    targets: &[String],
    target_parameters: &mut Vec<String>,
    file: &Path,
) -> Result<bool, ConvertError> {
    let config_err = |reason: String| config_err(file, reason);
    let mut remaining: BTreeSet<String> = BTreeSet::new();
    let mut matched: HashMap<&str, BTreeSet<&str>> = HashMap::new();
    let mut new_parameters: BTreeSet<&str> = BTreeSet::new();
    for target in targets {
        let hit = rules
            .target_mapping
            .iter()
            .find(|(old, _)| name_matches_suffix(target, old));
        match hit {
            None => {
                remaining.insert(target.clone());
            }
            Some((old, new)) => {
                new_parameters.insert(new.as_str());
                if rules.fused_param(new).is_some() {
                    matched
                        .entry(new.as_str())
                        .or_default()
                        .insert(old.as_str());
                }
            }
        }
    }
    for f in &rules.fused {
        let present = matched.get(f.name.as_str()).cloned().unwrap_or_default();
        let required: BTreeSet<&str> = f.parts.iter().map(String::as_str).collect();
        if !present.is_empty() && present.len() < required.len() {
            let missing: Vec<&str> = required.difference(&present).copied().collect();
            let present: Vec<&str> = present.into_iter().collect();
            return Err(config_err(format!(
                "Cannot convert PEFT target(s) {} without also targeting {} because they are fused into {}.",
                present.join(", "),
                missing.join(", "),
                f.name
            )));
        }
        if present.len() == required.len() && required.len() > 1 {
            scale_fused_patterns(lora, &f.name, required.len() as u64, file)?;
        }
    }
    lora.target_modules = Some(TargetModules::Names(remaining.into_iter().collect()));
    for (_, new) in &rules.target_mapping {
        if new_parameters.contains(new.as_str()) && !target_parameters.contains(new) {
            target_parameters.push(new.clone());
        }
    }
    Ok(!new_parameters.is_empty())
}

/// A fused parameter of `n` parts gets `rank_pattern[".*\.<name>"] = n·r` and
/// `alpha_pattern[…] = n·lora_alpha`, so that `alpha/r` is unchanged.
fn scale_fused_patterns(
    lora: &mut LoraConfig,
    name: &str,
    n: u64,
    file: &Path,
) -> Result<(), ConvertError> {
    let config_err = |reason: String| config_err(file, reason);
    let key = format!(".*\\.{}", re_escape(name));
    let rank = lora
        .r
        .checked_mul(n)
        .ok_or_else(|| config_err(format!("r = {} times {n} overflows", lora.r)))?;
    let alpha = mul_number(&lora.lora_alpha, n).ok_or_else(|| {
        config_err(format!(
            "lora_alpha = {} times {n} overflows",
            lora.lora_alpha
        ))
    })?;
    lora.rank_pattern
        .get_or_insert_with(IndexMap::new)
        .insert(key.clone(), Number::from(rank));
    lora.alpha_pattern
        .get_or_insert_with(IndexMap::new)
        .insert(key, alpha);
    Ok(())
}

/// `lora.ParamWrapper`'s refusals (peft raises when it creates the wrapper at load).
fn check_param_wrapper(
    lora: &mut LoraConfig,
    options: &ConvertOptions,
    file: &Path,
) -> Result<(), ConvertError> {
    // peft raises "lora.ParamWrapper does not work with …" when it creates the wrapper.
    const WHY: &str = "the converted adapter targets parameters (lora.ParamWrapper), which peft refuses with this option; peft 0.21.2 cannot load this legacy adapter on transformers v5 either";
    let refuse = |what: &str| ConvertError::Config {
        file: file.to_owned(),
        reason: format!("{what}: {WHY}"),
    };
    if lora.lora_dropout.as_f64().is_some_and(|d| d != 0.0) {
        if options.zero_dropout {
            lora.lora_dropout = Number::from_f64(0.0).unwrap_or_else(|| Number::from(0));
        } else {
            return Err(refuse(&format!(
                "lora_dropout is {} (ConvertOptions::zero_dropout sets it to 0; dropout only acts in training)",
                lora.lora_dropout
            )));
        }
    }
    if lora.fan_in_fan_out {
        return Err(refuse("fan_in_fan_out is true"));
    }
    if lora.lora_bias {
        return Err(refuse("lora_bias is true"));
    }
    if lora.use_dora {
        return Err(refuse("use_dora is true"));
    }
    if lora.velora_config.is_some() {
        return Err(refuse("velora_config is set"));
    }
    if lora.kasa_config.is_some() {
        return Err(refuse("kasa_config is set"));
    }
    Ok(())
}

/// Whether the converted config targets `module` (a v5 module path) as a module, or its
/// `weight` / `param` as a parameter.
pub(super) fn targets_module(lora: &LoraConfig, module: &str) -> bool {
    let by_module = match &lora.target_modules {
        Some(TargetModules::Names(v)) => v.iter().any(|t| name_matches_suffix(module, t)),
        _ => false,
    };
    by_module || targets_param(lora, &format!("{module}.weight"))
}

pub(super) fn targets_param(lora: &LoraConfig, param: &str) -> bool {
    match &lora.target_parameters {
        Some(StringOrList::Many(v)) => v.iter().any(|t| name_matches_suffix(param, t)),
        _ => false,
    }
}
