//! Checking a given adapter config against the classified tensors.

use crate::config::{AdapterConfig, LoraConfig, TrainableTokenIndices};
use crate::py::name_matches_suffix;
use crate::targeting::{PatternResolver, TargetMatcher};

use super::*;

/// Checks `config` against adapter `adapter`'s tensors: every module's rank (`A` rows) is what
/// `r` / `rank_pattern` give it, every adapted module is targeted, `use_dora` / `lora_bias` match
/// the tensors present, trainable-token rows match the indices. Returns notes on what could not
/// be checked.
pub fn check_config(
    c: &ClassifiedStateDict,
    adapter: &str,
    config: &AdapterConfig,
) -> Result<Vec<String>, ClassifyError> {
    let a = c.adapter(Some(adapter))?;
    let mut notes = Vec::new();
    if a.method != config.peft_type() {
        return Err(ClassifyError::ConfigMismatch {
            adapter: adapter.to_owned(),
            field: "peft_type".into(),
            reason: format!(
                "the config is {} but the tensors are {}",
                config.peft_type(),
                a.method
            ),
        });
    }
    let Some(lora) = config.as_lora() else {
        return Ok(notes);
    };
    let resolver = PatternResolver::new(lora)?;
    let parameter_targets = lora.target_parameters.is_some();
    let matcher = if parameter_targets || lora.target_modules.is_none() {
        None
    } else {
        Some(TargetMatcher::for_lora(lora)?)
    };
    if lora.target_modules.is_none() && !parameter_targets {
        notes.push(
            "target_modules is null (peft fills its model-type default): targeting not checked"
                .into(),
        );
    }
    let checks = ModuleChecks {
        adapter,
        lora,
        resolver: &resolver,
        matcher: matcher.as_ref(),
    };
    for (module, roles) in a.modules() {
        checks.check(module.to_owned(), &roles)?;
    }
    check_trainable_tokens(adapter, a, lora)?;
    check_modules_to_save(adapter, a, lora)?;
    Ok(notes)
}

fn mismatch(adapter: &str, field: &str, reason: String) -> ClassifyError {
    ClassifyError::ConfigMismatch {
        adapter: adapter.to_owned(),
        field: field.to_owned(),
        reason,
    }
}

/// What every LoRA module is checked against.
struct ModuleChecks<'a> {
    adapter: &'a str,
    lora: &'a LoraConfig,
    resolver: &'a PatternResolver,
    /// `None` when targeting cannot be checked by name.
    matcher: Option<&'a TargetMatcher>,
}

impl ModuleChecks<'_> {
    /// One module: its rank, that it is targeted, its DoRA and bias tensors.
    fn check(&self, module: String, roles: &AdapterModule<'_>) -> Result<(), ClassifyError> {
        let (adapter, lora, resolver) = (self.adapter, self.lora, self.resolver);
        let parameter_targets = lora.target_parameters.is_some();
        let mismatch = |field: &str, reason: String| mismatch(adapter, field, reason);
        let Some((key, t)) = roles.lora_a() else {
            return Ok(());
        };
        let tensor_rank = t.shape().first().copied().unwrap_or(0) as u64;
        let config_rank = resolver.rank_for(&module)?;
        // A `target_parameters` expert adapter has r·E rows.
        let fits = if parameter_targets {
            tensor_rank.is_multiple_of(config_rank)
        } else {
            tensor_rank == config_rank
        };
        if !fits {
            return Err(ClassifyError::RankMismatch {
                origin: origin_of(t),
                module,
                key: key.to_owned(),
                shape: t.shape().to_vec(),
                tensor_rank,
                config_rank,
            });
        }
        if let Some(m) = self.matcher {
            if !m.is_target(&module)? {
                return Err(mismatch(
                    "target_modules",
                    format!("module `{module}` has adapter tensors (`{key}`) but the config does not target it"),
                ));
            }
        }
        if lora.use_dora != roles.contains_key("magnitude") {
            return Err(mismatch(
                "use_dora",
                format!(
                    "use_dora is {} but module `{module}` {} a lora_magnitude_vector",
                    lora.use_dora,
                    if roles.contains_key("magnitude") {
                        "has"
                    } else {
                        "has no"
                    }
                ),
            ));
        }
        if roles.contains_key("b_bias") && !lora.lora_bias {
            return Err(mismatch(
                "lora_bias",
                format!("module `{module}` has lora_B.bias but lora_bias is false"),
            ));
        }
        Ok(())
    }
}

/// Trainable-token rows present exactly when the config has indices, as many as it lists.
fn check_trainable_tokens(
    adapter: &str,
    a: &AdapterTensors,
    lora: &LoraConfig,
) -> Result<(), ClassifyError> {
    let mismatch = |field: &str, reason: String| mismatch(adapter, field, reason);
    let tt = a.trainable_token_modules();
    match (&lora.trainable_token_indices, tt.is_empty()) {
        (None, false) => {
            return Err(mismatch(
                "trainable_token_indices",
                format!(
                    "`{}` has trainable-token rows but the config has no indices",
                    tt.join("`, `")
                ),
            ))
        }
        (Some(_), true) => {
            return Err(mismatch(
                "trainable_token_indices",
                "the config has indices but the tensors have no trainable-token rows".into(),
            ))
        }
        (Some(indices), false) => {
            for m in &tt {
                let Some(e) = a.entries.values().find(|e| {
                    matches!(&e.kind, EntryKind::Adapter { role, module: Some(x) } if role == "trainable_tokens" && x == m)
                }) else {
                    continue;
                };
                let want = match indices {
                    TrainableTokenIndices::Indices(v) => Some(v.len()),
                    TrainableTokenIndices::PerModule(map) => map
                        .iter()
                        .find(|(k, _)| name_matches_suffix(m, k))
                        .map(|(_, v)| v.len()),
                };
                let rows = e.tensor.shape().first().copied().unwrap_or(0);
                if want.is_some_and(|w| w != rows) {
                    return Err(ClassifyError::Inconsistent {
                        origin: origin_of(&e.tensor),
                        key: e.source_key.clone(),
                        module: m.clone(),
                        reason: format!(
                            "{rows} trainable-token rows but trainable_token_indices lists {}",
                            want.unwrap_or_default()
                        ),
                    });
                }
            }
        }
        (None, true) => {}
    }
    Ok(())
}

/// Every modules_to_save copy is listed in the config.
fn check_modules_to_save(
    adapter: &str,
    a: &AdapterTensors,
    lora: &LoraConfig,
) -> Result<(), ClassifyError> {
    let mismatch = |field: &str, reason: String| mismatch(adapter, field, reason);
    let mts = a.modules_to_save();
    if !mts.is_empty() {
        let names = lora.modules_to_save.clone().unwrap_or_default();
        for m in &mts {
            if !names.iter().any(|n| m.ends_with(n.as_str())) {
                return Err(mismatch(
                    "modules_to_save",
                    format!(
                        "module `{m}` has a modules_to_save copy but the config does not list it"
                    ),
                ));
            }
        }
    }
    Ok(())
}
