//! The legacy-MoE rules of one model type, derived from adapters-spec/legacy_moe_adapters.json
//! and the model's conversion table.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use peftkit_remap::{ConvertSpec, Mapping, Op, Registry};
use serde::Deserialize;

use crate::config::ADAPTER_CONFIG_NAME;

use super::*;

/// A fused v5 parameter built from per-expert modules (a `stack`/`concat` converter of the
/// conversion table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FusedParam {
    /// The parameter's name in its module (`gate_up_proj`).
    pub name: String,
    /// The per-expert modules it is made of, in concatenation order (`["w1", "w3"]`).
    pub parts: Vec<String>,
}

/// The rules of one model type: what peft's `_MOE_TARGET_MODULE_MAPPING` and
/// `_MOE_FUSED_TARGETS` hold for it, derived from the data, and the table's name mapping.
#[derive(Debug, Clone)]
pub struct LegacyMoeRules {
    /// The model type.
    pub model_type: String,
    /// peft's conversion pattern (`mixtral`, `qwen2_moe`).
    pub pattern: String,
    /// The conversion table whose rules are used (the model's own, else the pattern's).
    pub table: String,
    /// v4 target name -> v5 target parameter, in peft's order (renamed targets, then the
    /// fused parameters' parts in table order): `gate -> gate.weight`, `w1 -> gate_up_proj`, ….
    pub target_mapping: Vec<(String, String)>,
    /// The fused parameters, in table order (the order of the parameters in their module).
    pub fused: Vec<FusedParam>,
    pub(super) mapping: Mapping,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecFile {
    schema_version: u32,
    #[allow(dead_code)]
    peft_version: String,
    #[allow(dead_code)]
    transformers_version: String,
    #[allow(dead_code)]
    follows: String,
    #[allow(dead_code)]
    description: String,
    patterns: BTreeMap<String, PatternEntry>,
    #[serde(default)]
    not_converted: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PatternEntry {
    table: String,
    #[serde(default)]
    renamed_targets: IndexMap<String, String>,
    model_types: Vec<String>,
    #[serde(default)]
    #[allow(dead_code)]
    note: Option<String>,
}

fn spec_file() -> Result<SpecFile, ConvertError> {
    let spec: SpecFile = serde_json::from_str(LEGACY_MOE_ADAPTERS_JSON)
        .map_err(|e| ConvertError::InvalidSpec(e.to_string()))?;
    if spec.schema_version != 1 {
        return Err(ConvertError::InvalidSpec(format!(
            "schema_version {} is not supported (1 is)",
            spec.schema_version
        )));
    }
    Ok(spec)
}

/// The model types peft 0.21.2 converts legacy MoE adapters for, sorted.
pub fn supported_model_types() -> Result<Vec<String>, ConvertError> {
    let spec = spec_file()?;
    let mut out: Vec<String> = spec
        .patterns
        .values()
        .flat_map(|p| p.model_types.iter().cloned())
        .collect();
    out.sort();
    Ok(out)
}

/// The last name component of a table pattern, without a trailing `.weight`:
/// `.experts.*.w1.weight` -> `w1`, `.experts.gate_up_proj` -> `gate_up_proj`.
pub(super) fn pattern_leaf(pattern: &str) -> String {
    let text = pattern.replace("\\.", ".");
    let text = text.trim_start_matches('^');
    let text = text.strip_suffix(".weight").unwrap_or(text);
    text.rsplit('.').next().unwrap_or(text).to_owned()
}

/// The converters of table `name` (its `extends` first), in rule order.
fn table_converters(
    registry: &Registry,
    name: &str,
    depth: usize,
    out: &mut Vec<ConvertSpec>,
) -> Result<(), ConvertError> {
    let table = registry
        .table(name)
        .ok_or_else(|| ConvertError::InvalidSpec(format!("no conversion table named `{name}`")))?;
    if depth > 16 {
        return Err(ConvertError::InvalidSpec(format!(
            "table `{name}`: `extends` nests more than 16 levels"
        )));
    }
    for parent in &table.extends {
        table_converters(registry, parent, depth + 1, out)?;
    }
    out.extend(table.rules.iter().filter_map(|r| r.convert.clone()));
    Ok(())
}

/// Whether peft's adapter conversion handles this converter: the experts stacked (transformers
/// `MergeModulelist`), then optionally the projections concatenated (`Concatenate`), into one
/// v5 parameter. peft builds its LoRA ops from exactly these two op kinds.
fn is_expert_fusion(c: &ConvertSpec) -> bool {
    let single_target = c.v5.to_vec().len() == 1;
    let ops_ok = match c.ops.as_slice() {
        [Op::Stack { dim: 0 }] => true,
        [Op::Stack { dim: 0 }, Op::Concat { dim: 1, .. }] => c.original.to_vec().len() > 1,
        _ => false,
    };
    single_target && ops_ok
}

impl LegacyMoeRules {
    /// The rules for `model_type` with the built-in tables.
    pub fn for_model_type(model_type: &str) -> Result<Self, ConvertError> {
        let registry = Registry::builtin().map_err(|source| ConvertError::Remap {
            file: PathBuf::from("adapters-spec/conversions"),
            source,
        })?;
        Self::with_registry(&registry, model_type, Path::new(ADAPTER_CONFIG_NAME))
    }

    /// The rules for `model_type` with the tables of `registry`; `file` is named in errors.
    pub fn with_registry(
        registry: &Registry,
        model_type: &str,
        file: &Path,
    ) -> Result<Self, ConvertError> {
        let spec = spec_file()?;
        let Some((pattern, entry)) = spec
            .patterns
            .iter()
            .find(|(_, p)| p.model_types.iter().any(|m| m == model_type))
        else {
            let mut known: Vec<&str> = spec
                .patterns
                .values()
                .flat_map(|p| p.model_types.iter().map(String::as_str))
                .collect();
            known.sort_unstable();
            return Err(ConvertError::UnsupportedModelType {
                file: file.to_owned(),
                model_type: model_type.to_owned(),
                hint: spec
                    .not_converted
                    .get(model_type)
                    .map(|h| format!(": {h}"))
                    .unwrap_or_default(),
                known: known.join(", "),
            });
        };
        // transformers applies the model's own mapping (peft asks it for the model's); types
        // peftkit has no table of their own for reuse the pattern's rules for expert names.
        let table = registry
            .table_for(model_type)
            .unwrap_or(entry.table.as_str())
            .to_owned();
        let remap_err = |source| ConvertError::Remap {
            file: file.to_owned(),
            source,
        };
        let mapping = registry.mapping_for_table(&table).map_err(remap_err)?;
        let mut converters = Vec::new();
        table_converters(registry, &table, 0, &mut converters)?;
        let mut fused = Vec::new();
        for c in converters.iter().filter(|c| is_expert_fusion(c)) {
            let name = c.v5.to_vec().first().map(|p| pattern_leaf(p));
            let Some(name) = name else { continue };
            let parts = c
                .original
                .to_vec()
                .iter()
                .map(|p| pattern_leaf(p))
                .collect();
            fused.push(FusedParam { name, parts });
        }
        if fused.is_empty() {
            return Err(ConvertError::InvalidSpec(format!(
                "table `{table}` (pattern `{pattern}`) has no expert-stacking converter"
            )));
        }
        let mut target_mapping: Vec<(String, String)> = entry
            .renamed_targets
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for f in &fused {
            for p in &f.parts {
                target_mapping.push((p.clone(), f.name.clone()));
            }
        }
        Ok(LegacyMoeRules {
            model_type: model_type.to_owned(),
            pattern: pattern.clone(),
            table,
            target_mapping,
            fused,
            mapping,
        })
    }

    pub(super) fn fused_param(&self, name: &str) -> Option<&FusedParam> {
        self.fused.iter().find(|f| f.name == name)
    }
}
