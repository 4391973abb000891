//! Legacy MoE LoRA adapters (trained on transformers v4, one LoRA pair per expert projection)
//! converted to the fused layout of transformers v5, as peft 0.21.2 does when it loads such an
//! adapter on a v5 model (`convert_peft_config_for_transformers` and
//! `convert_peft_adapter_state_dict_for_transformers`, then `save_pretrained`).
//!
//! transformers v5 holds the experts of Mixtral-style and Qwen2-MoE-style models as fused
//! parameters (`mlp.experts.gate_up_proj [E, 2I, H]`, `mlp.experts.down_proj [E, H, I]`), which
//! peft adapts with `target_parameters` (`lora.ParamWrapper`). A legacy adapter has
//! `block_sparse_moe.experts.{e}.w1.lora_A.weight` and so on. The conversion:
//!
//! * **config**: every `target_modules` entry naming an expert projection (`w1`, `w3`, `w2`) or
//!   the router (`gate`) leaves `target_modules` and its v5 parameter (`gate_up_proj`,
//!   `down_proj`, `gate.weight`) joins `target_parameters`; a fused parameter made of several
//!   projections gets `rank_pattern[".*\.gate_up_proj"] = n·r` and
//!   `alpha_pattern[".*\.gate_up_proj"] = n·lora_alpha` (n = 2), so `alpha/r` is unchanged.
//! * **tensors**: for a fused parameter of `n` parts and `E` experts, `A` is every expert's
//!   parts' `A`s stacked along the rank, expert-major: `A[e·R + k]` with `R = Σ r_p`; `B` is the
//!   block-diagonal `[[B_w1, 0], [0, B_w3]]` of each expert, laid out rank-major:
//!   `B[o, k·E + e]` (the column order `lora.ParamWrapper` uses, reference §5.6). The keys are
//!   those of the nested wrappers: the first fused parameter of a module (in the table's order,
//!   which is the parameters' registration order) is the innermost wrapper
//!   (`mlp.experts.base_layer.lora_A.weight`), the last the outermost
//!   (`mlp.experts.lora_A.weight`). Other LoRA keys are renamed as the table renames their
//!   module (`block_sparse_moe.gate` -> `mlp.gate`); keys without `.lora_` pass through.
//!
//! What is model specific comes from data: the per-expert modules, the fused parameter each
//! belongs to and the concatenation order from the conversion table of the model
//! (`adapters-spec/conversions/`, the same `stack`/`concat` converters that fuse the base
//! weights), and the model types peft converts plus the renamed router targets from
//! `adapters-spec/legacy_moe_adapters.json`.
//!
//! Every output tensor is lazy: it reads its source tensors when the writer reaches it, so
//! memory stays at one fused tensor.
//!
//! Where peft 0.21.2 would write an adapter it cannot load, this module refuses instead of
//! copying the mistake (see [`ConvertError`]): a fused parameter targeted without all of its
//! parts, LoRA pairs of modules the rewritten config no longer targets (a Qwen-style
//! `shared_expert.gate_proj` when `gate_proj` was a target; [`Untargeted::Drop`] drops them as
//! peft does), `lora_dropout` (which `lora.ParamWrapper` refuses; [`ConvertOptions::zero_dropout`]),
//! and a lone fused parameter, which is keyed for the wrapper it really gets.
//!
//! ```no_run
//! use std::path::Path;
//! use peftkit_peft::convert::convert_legacy_adapter_dir;
//!
//! let report = convert_legacy_adapter_dir(
//!     Path::new("mixtral-lora-v4"),
//!     Path::new("mixtral-lora-v5"),
//!     Some("mixtral"),
//! )
//! .unwrap();
//! println!("{} fused tensors written", report.fused_tensors);
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use peftkit_checkpoint::tensor::{dtype_name, dtype_size};
use peftkit_checkpoint::{
    CheckpointError, Dtype, SaveOptions, SaveReport, StateDict, Tensor, WeightsKind,
};
use peftkit_remap::{ConvertSpec, Mapping, Op, Registry, RemapError, Revert};
use serde::Deserialize;
use serde_json::Number;

use crate::adapter::{Adapter, AdapterError, ADAPTER_CONFIG_NAME};
use crate::config::{AdapterConfig, LoraConfig, StringOrList, TargetModules};
use crate::py::{name_matches_suffix, re_escape};

pub use crate::embedded::LEGACY_MOE_ADAPTERS_JSON;

/// peft's prefix of per-module keys on disk.
const MODEL_PREFIX: &str = "base_model.model.";

/// The model card file copied (or written) next to the converted adapter.
const MODEL_CARD: &str = "README.md";

/// Why a legacy adapter cannot be converted. Every variant names the file, and the tensor
/// where there is one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConvertError {
    /// The adapter folder could not be loaded.
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    /// Reading a source tensor or writing the output failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The conversion tables could not be loaded, or refused a tensor.
    #[error("{file}: {source}")]
    Remap {
        /// The adapter weights file (or the table, for table errors).
        file: PathBuf,
        /// The table's error (it names the tensor).
        #[source]
        source: RemapError,
    },
    /// `adapters-spec/legacy_moe_adapters.json` is not of the documented shape.
    #[error("adapters-spec/legacy_moe_adapters.json: {0}")]
    InvalidSpec(String),
    /// Only LoRA adapters are converted (peft converts nothing else).
    #[error("{file}: peft_type is {peft_type}; peft converts only LoRA adapters to the transformers v5 layout, so this adapter is used as it is")]
    NotLora {
        /// The adapter config.
        file: PathBuf,
        /// Its `peft_type`.
        peft_type: String,
    },
    /// A model type peft does not convert legacy adapters for.
    #[error("{file}: peft 0.21.2 does not convert legacy adapters for model_type `{model_type}`{hint}; model types it converts: {known}")]
    UnsupportedModelType {
        /// The adapter config.
        file: PathBuf,
        /// The model type asked for.
        model_type: String,
        /// Why, when known (`: …`).
        hint: String,
        /// The model types that are converted.
        known: String,
    },
    /// No model type was given and none could be found.
    #[error("{dir}: the model type is unknown (base_model_name_or_path `{base}` is not a local folder with a config.json); pass it (--model-type, e.g. mixtral) or read it from the base model's config.json (--base)")]
    NoModelType {
        /// The adapter folder.
        dir: PathBuf,
        /// Its `base_model_name_or_path` (empty when null).
        base: String,
    },
    /// The adapter config cannot be converted as it is.
    #[error("{file}: {reason}")]
    Config {
        /// The adapter config.
        file: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// An adapter tensor that does not fit the fused layout.
    #[error("{file}: tensor `{tensor}`: {reason}")]
    Tensor {
        /// The adapter weights file.
        file: PathBuf,
        /// The tensor's key.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// LoRA tensors of a module that the converted config no longer targets.
    #[error("{file}: tensor `{tensor}` adapts `{module}`, which the converted config no longer targets ({why}); peft 0.21.2 silently skips it when it loads the adapter on transformers v5. ConvertOptions::untargeted = Untargeted::Drop drops such tensors as peft does")]
    Untargeted {
        /// The adapter weights file.
        file: PathBuf,
        /// The first such tensor.
        tensor: String,
        /// Its module, in v5 names.
        module: String,
        /// Why it is no longer targeted.
        why: String,
    },
    /// Input and output folder are the same.
    #[error("{0}: the converted adapter must go to another folder than the legacy one")]
    SameFolder(PathBuf),
    /// A file of the adapter folder could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// What to do with LoRA tensors of modules the converted config no longer targets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Untargeted {
    /// Refuse the conversion, naming the first such tensor (default): the adapter would lose
    /// part of what it learned without a word.
    #[default]
    Error,
    /// Leave them out, as peft's load and save does.
    Drop,
}

/// Options of [`convert_legacy_experts_with`] and [`convert_legacy_adapter_dir_with`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConvertOptions {
    /// LoRA pairs of modules the converted config no longer targets.
    pub untargeted: Untargeted,
    /// Set `lora_dropout` to 0 when the config gains `target_parameters`: peft's
    /// `lora.ParamWrapper` refuses dropout ("does not work with lora_dropout != 0"), so peft
    /// 0.21.2 cannot load a legacy adapter trained with dropout at all. Dropout only acts in
    /// training; inference and merges do not change.
    pub zero_dropout: bool,
}

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
    mapping: Mapping,
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
fn pattern_leaf(pattern: &str) -> String {
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

    fn fused_param(&self, name: &str) -> Option<&FusedParam> {
        self.fused.iter().find(|f| f.name == name)
    }
}

/// The result of [`convert_legacy_experts_with`].
#[derive(Debug, Clone)]
pub struct Converted {
    /// The converted config (`inference_mode: true`, as peft's save writes it).
    pub config: AdapterConfig,
    /// The converted tensors under their on-disk keys (`base_model.model.…`), lazy.
    pub state: StateDict,
    /// Keys of fused tensors written.
    pub fused: Vec<String>,
    /// Input keys dropped ([`Untargeted::Drop`]).
    pub dropped: Vec<String>,
}

/// `n * k` with Python's types: an int stays an int, a float stays a float.
fn mul_number(n: &Number, k: u64) -> Option<Number> {
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
fn rewrite_config(
    lora: &mut LoraConfig,
    rules: &LegacyMoeRules,
    adapter_leaves: &BTreeSet<String>,
    options: &ConvertOptions,
    file: &Path,
) -> Result<(), ConvertError> {
    let config_err = |reason: String| ConvertError::Config {
        file: file.to_owned(),
        reason,
    };
    let targets: Vec<String> = match &lora.target_modules {
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
    };
    // A set in peft, written in set order. Kept here in a fixed order instead: the entries
    // already there, then the new ones in the table's order (router, then the fused parameters
    // in their module's registration order, which is also the order peft nests their wrappers).
    let mut target_parameters: Vec<String> = match &lora.target_parameters {
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
    };
    let added_parameters = {
        let mut remaining: BTreeSet<String> = BTreeSet::new();
        let mut matched: HashMap<&str, BTreeSet<&str>> = HashMap::new();
        let mut new_parameters: BTreeSet<&str> = BTreeSet::new();
        for target in &targets {
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
                let n = required.len() as u64;
                let key = format!(".*\\.{}", re_escape(&f.name));
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
            }
        }
        lora.target_modules = Some(TargetModules::Names(remaining.into_iter().collect()));
        for (_, new) in &rules.target_mapping {
            if new_parameters.contains(new.as_str()) && !target_parameters.contains(new) {
                target_parameters.push(new.clone());
            }
        }
        !new_parameters.is_empty()
    };
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
fn targets_module(lora: &LoraConfig, module: &str) -> bool {
    let by_module = match &lora.target_modules {
        Some(TargetModules::Names(v)) => v.iter().any(|t| name_matches_suffix(module, t)),
        _ => false,
    };
    by_module || targets_param(lora, &format!("{module}.weight"))
}

fn targets_param(lora: &LoraConfig, param: &str) -> bool {
    match &lora.target_parameters {
        Some(StringOrList::Many(v)) => v.iter().any(|t| name_matches_suffix(param, t)),
        _ => false,
    }
}

/// The on-disk suffix of `key` after `module`, without the adapter name (peft's
/// `_convert_to_peft_serialized_keys`): `…q_proj.lora_A.default.weight` -> `lora_A.weight`.
fn disk_suffix(key: &str, module: &str, adapter: &str) -> Option<String> {
    let rest = key.strip_prefix(MODEL_PREFIX).unwrap_or(key);
    let suffix = rest.strip_prefix(module)?.strip_prefix('.')?;
    let tail = format!(".{adapter}");
    if let Some(head) = suffix.strip_suffix(&tail) {
        return Some(head.to_owned());
    }
    Some(match suffix.rsplit_once('.') {
        Some((head, last)) => match head.strip_suffix(&tail) {
            Some(h) => format!("{h}.{last}"),
            None => suffix.to_owned(),
        },
        None => suffix.to_owned(),
    })
}

/// One per-expert LoRA pair feeding a fused parameter.
struct Piece {
    module: String,
    a: Tensor,
    b: Tensor,
}

/// A fused parameter of one module: its parts (in concatenation order), each with one pair
/// per expert.
struct Group {
    /// v5 name of the fused parameter (`model.layers.0.mlp.experts.gate_up_proj`).
    v5_name: String,
    /// Its module (`model.layers.0.mlp.experts`).
    container: String,
    /// Its name in the module (`gate_up_proj`).
    param: String,
    /// `parts[p][e]`.
    parts: Vec<Vec<Piece>>,
}

/// The fused A: `A[e·R + koff_p + k] = A_{p,e}[k]` (experts outer, parts, then rank).
fn fused_a(
    key: String,
    parts: &[Vec<Piece>],
    dtype: Dtype,
    shape: Vec<usize>,
) -> Result<Tensor, ConvertError> {
    let experts = parts.first().map_or(0, Vec::len);
    let sources: Vec<Vec<Tensor>> = parts
        .iter()
        .map(|p| p.iter().map(|x| x.a.clone()).collect())
        .collect();
    let name = key.clone();
    let t = Tensor::lazy(dtype, shape, move || {
        let mut out = Vec::new();
        for e in 0..experts {
            for part in &sources {
                let bytes = part[e].bytes().map_err(|err| named(err, &name))?;
                out.extend_from_slice(&bytes);
            }
        }
        Ok(out)
    })?;
    Ok(t)
}

/// The fused B: each expert's block-diagonal `[[B_{0,e}, 0], [0, B_{1,e}]]`, rank-major columns:
/// `B[ooff_p + o, (koff_p + k)·E + e] = B_{p,e}[o, k]`, zero elsewhere.
fn fused_b(
    key: String,
    parts: &[Vec<Piece>],
    dtype: Dtype,
    elt: usize,
    rows: Vec<(usize, usize)>,
    ranks: Vec<(usize, usize)>,
) -> Result<Tensor, ConvertError> {
    let experts = parts.first().map_or(0, Vec::len);
    let total_out: usize = rows.iter().map(|(_, n)| n).sum();
    let total_rank: usize = ranks.iter().map(|(_, n)| n).sum();
    let cols = total_rank * experts;
    let sources: Vec<Vec<Tensor>> = parts
        .iter()
        .map(|p| p.iter().map(|x| x.b.clone()).collect())
        .collect();
    let name = key.clone();
    let t = Tensor::lazy(dtype, vec![total_out, cols], move || {
        let mut out = vec![0u8; total_out * cols * elt];
        for (p, part) in sources.iter().enumerate() {
            let (ooff, nout) = rows[p];
            let (koff, rank) = ranks[p];
            for (e, b) in part.iter().enumerate() {
                let bytes = b.bytes().map_err(|err| named(err, &name))?;
                for o in 0..nout {
                    for k in 0..rank {
                        let src = (o * rank + k) * elt;
                        let dst = ((ooff + o) * cols + (koff + k) * experts + e) * elt;
                        out[dst..dst + elt].copy_from_slice(&bytes[src..src + elt]);
                    }
                }
            }
        }
        Ok(out)
    })?;
    Ok(t)
}

/// Puts the output tensor's name into an error that has none.
fn named(err: CheckpointError, name: &str) -> CheckpointError {
    match err {
        CheckpointError::TensorData { tensor, reason } if tensor.is_empty() => {
            CheckpointError::TensorData {
                tensor: name.to_owned(),
                reason,
            }
        }
        other => other,
    }
}

/// Converts a legacy adapter with the default options: the config peft writes after loading it
/// on a transformers v5 model of type `model_type`, and its tensors under their on-disk keys.
pub fn convert_legacy_experts(
    adapter: &Adapter,
    model_type: &str,
) -> Result<(AdapterConfig, StateDict), ConvertError> {
    let c = convert_legacy_experts_with(adapter, model_type, &ConvertOptions::default())?;
    Ok((c.config, c.state))
}

/// [`convert_legacy_experts`] with options, also listing what was fused and dropped.
pub fn convert_legacy_experts_with(
    adapter: &Adapter,
    model_type: &str,
    options: &ConvertOptions,
) -> Result<Converted, ConvertError> {
    let rules = rules_for(adapter, model_type)?;
    convert_with_rules(adapter, &rules, options)
}

/// The built-in rules of `model_type`, errors naming the adapter's config.
fn rules_for(adapter: &Adapter, model_type: &str) -> Result<LegacyMoeRules, ConvertError> {
    let registry = Registry::builtin().map_err(|source| ConvertError::Remap {
        file: PathBuf::from("adapters-spec/conversions"),
        source,
    })?;
    LegacyMoeRules::with_registry(
        &registry,
        model_type,
        &adapter.dir.join(ADAPTER_CONFIG_NAME),
    )
}

/// [`convert_legacy_experts_with`] with rules built by the caller
/// ([`LegacyMoeRules::with_registry`], e.g. with user tables).
pub fn convert_with_rules(
    adapter: &Adapter,
    rules: &LegacyMoeRules,
    options: &ConvertOptions,
) -> Result<Converted, ConvertError> {
    let config_file = adapter.dir.join(ADAPTER_CONFIG_NAME);
    let mut config = adapter.config.clone();
    let Some(lora) = config.as_lora_mut() else {
        return Err(ConvertError::NotLora {
            file: config_file,
            peft_type: adapter.config.peft_type().to_owned(),
        });
    };
    let leaves: BTreeSet<String> = adapter
        .modules
        .keys()
        .filter_map(|m| m.rsplit('.').next().map(str::to_owned))
        .collect();
    rewrite_config(lora, rules, &leaves, options, &config_file)?;
    let lora = lora.clone();

    let file_of = |key: &str| -> PathBuf {
        adapter
            .weights
            .file_of(key)
            .map(Path::to_owned)
            .unwrap_or_else(|| adapter.dir.clone())
    };
    let remap_err = |key: &str, source: RemapError| ConvertError::Remap {
        file: file_of(key),
        source,
    };
    let tensor_err = |key: &str, reason: String| ConvertError::Tensor {
        file: file_of(key),
        tensor: key.to_owned(),
        reason,
    };

    // Which module each LoRA key belongs to. Only keys with `.lora_` are converted,
    // as in peft; everything else passes through.
    let mut module_of: HashMap<&str, &str> = HashMap::new();
    for (path, m) in &adapter.modules {
        for t in m.tensors.values() {
            if t.key.contains(".lora_") {
                module_of.insert(t.key.as_str(), path.as_str());
            }
        }
    }

    // The A tensors named like the base weights they adapt: the table's converters group
    // them exactly as they group the per-expert base weights.
    let mut probe = StateDict::new();
    let mut probe_key: HashMap<String, String> = HashMap::new();
    for (path, m) in &adapter.modules {
        if let Some(a) = m.tensors.get("a") {
            if a.key.contains(".lora_") {
                probe.insert(format!("{path}.weight"), a.tensor.clone());
                probe_key.insert(format!("{path}.weight"), a.key.clone());
            }
        }
    }
    let first_key = |name: &str| probe_key.get(name).cloned().unwrap_or_default();
    let forward = rules.mapping.forward(&probe).map_err(|e| {
        let key = match &e {
            RemapError::Tensor { tensor, .. } => first_key(tensor),
            _ => String::new(),
        };
        remap_err(&key, e)
    })?;

    let mut groups: Vec<Group> = Vec::new();
    let mut consumed: BTreeSet<String> = BTreeSet::new();
    for (name, t) in &forward.state {
        let pieces = match rules
            .mapping
            .fused_pieces(name, t.shape(), &Revert::FromConfig)
        {
            Ok(p) => p,
            Err(RemapError::NotFused { .. }) => continue,
            Err(e) => return Err(remap_err("", e)),
        };
        let Some((container, param)) = name.rsplit_once('.') else {
            continue;
        };
        if rules.fused_param(param).is_none() || pieces.iter().any(|p| p.expert.is_none()) {
            continue;
        }
        // Parts are told apart by where their rows sit in the fused tensor.
        let mut starts: Vec<usize> = pieces
            .iter()
            .filter_map(|p| p.region.get(1).map(|r| r.start))
            .collect();
        starts.sort_unstable();
        starts.dedup();
        let experts = t.shape().first().copied().unwrap_or(0);
        let mut parts: Vec<Vec<Option<Piece>>> = (0..starts.len())
            .map(|_| (0..experts).map(|_| None).collect())
            .collect();
        for piece in &pieces {
            let module = piece
                .original_name
                .strip_suffix(".weight")
                .unwrap_or(&piece.original_name)
                .to_owned();
            let key = first_key(&piece.original_name);
            let Some(m) = adapter.modules.get(&module) else {
                return Err(tensor_err(
                    &key,
                    format!("the table places `{module}` in `{name}`, but the adapter has no such module"),
                ));
            };
            if let Some((role, extra)) = m.tensors.iter().find(|(r, _)| *r != "a" && *r != "b") {
                return Err(tensor_err(
                    &extra.key,
                    format!("role `{role}` of an expert module cannot be fused (peft's fused experts hold only lora_A and lora_B)"),
                ));
            }
            let (Some(a), Some(b)) = (m.get("a"), m.get("b")) else {
                return Err(tensor_err(
                    &key,
                    "an expert module needs both lora_A and lora_B".into(),
                ));
            };
            let p = piece
                .region
                .get(1)
                .and_then(|r| starts.iter().position(|s| *s == r.start));
            let e = piece.expert.map(|(_, e)| e);
            let slot = p
                .zip(e)
                .and_then(|(p, e)| parts.get_mut(p).and_then(|v| v.get_mut(e)));
            let Some(slot) = slot else {
                return Err(tensor_err(&key, format!("no place in `{name}`")));
            };
            *slot = Some(Piece {
                module: module.clone(),
                a: a.clone(),
                b: b.clone(),
            });
            consumed.insert(module);
        }
        let mut complete = Vec::new();
        for part in parts {
            let v: Option<Vec<Piece>> = part.into_iter().collect();
            let Some(v) = v else {
                return Err(tensor_err(
                    &first_key(&pieces[0].original_name),
                    format!("`{name}` misses an expert's LoRA pair"),
                ));
            };
            complete.push(v);
        }
        groups.push(Group {
            v5_name: name.clone(),
            container: container.to_owned(),
            param: param.to_owned(),
            parts: complete,
        });
    }

    let mut state = StateDict::new();
    let mut dropped = Vec::new();
    let mut fused_keys = Vec::new();
    let untargeted = |key: &str, module: &str, why: String| ConvertError::Untargeted {
        file: file_of(key),
        tensor: key.to_owned(),
        module: module.to_owned(),
        why,
    };

    // Keys without `.lora_` first, untouched, as peft's output dict has them first.
    for (key, t) in adapter.weights.tensors() {
        if !module_of.contains_key(key) {
            state.insert(key.to_owned(), t.clone());
        }
    }

    // LoRA keys of modules that are not fused: renamed as the table renames their module.
    for (path, m) in &adapter.modules {
        if consumed.contains(path) {
            continue;
        }
        let lora_tensors: Vec<&crate::adapter::AdapterTensor> = m
            .tensors
            .values()
            .filter(|t| t.key.contains(".lora_"))
            .collect();
        let Some(first) = lora_tensors.first() else {
            continue;
        };
        let mut single = StateDict::new();
        single.insert(format!("{path}.weight"), first.tensor.clone());
        let renamed = rules
            .mapping
            .forward(&single)
            .map_err(|e| remap_err(&first.key, e))?;
        let new_path = match renamed
            .state
            .keys()
            .next()
            .map(|k| k.strip_suffix(".weight"))
        {
            Some(Some(p)) if renamed.state.len() == 1 => p.to_owned(),
            _ => {
                return Err(tensor_err(
                    &first.key,
                    format!("the conversion table does not map module `{path}` to one module"),
                ))
            }
        };
        if !targets_module(&lora, &new_path) {
            match options.untargeted {
                Untargeted::Error => {
                    return Err(untargeted(
                        &first.key,
                        &new_path,
                        "no target_modules entry or target_parameters entry matches it".into(),
                    ))
                }
                Untargeted::Drop => {
                    dropped.extend(lora_tensors.iter().map(|t| t.key.clone()));
                    continue;
                }
            }
        }
        for t in lora_tensors {
            let suffix = disk_suffix(&t.key, path, &adapter.name).ok_or_else(|| {
                tensor_err(
                    &t.key,
                    format!("the key does not start with its module `{path}`"),
                )
            })?;
            state.insert(
                format!("{MODEL_PREFIX}{new_path}.{suffix}"),
                t.tensor.clone(),
            );
        }
    }

    // The fused parameters, nested as peft nests its parameter wrappers.
    for g in &groups {
        let first = &g.parts[0][0];
        let first_key = first_key(&format!("{}.weight", first.module));
        let targeted: Vec<&str> = rules
            .fused
            .iter()
            .map(|f| f.name.as_str())
            .filter(|f| targets_param(&lora, &format!("{}.{f}", g.container)))
            .collect();
        let Some(index) = targeted.iter().position(|f| *f == g.param) else {
            match options.untargeted {
                Untargeted::Error => {
                    return Err(untargeted(
                        &first_key,
                        &g.v5_name,
                        format!(
                            "no target_parameters entry matches the fused parameter `{}`",
                            g.param
                        ),
                    ))
                }
                Untargeted::Drop => {
                    for part in &g.parts {
                        for piece in part {
                            if let Some(m) = adapter.modules.get(&piece.module) {
                                dropped.extend(m.tensors.values().map(|t| t.key.clone()));
                            }
                        }
                    }
                    continue;
                }
            }
        };
        let depth = targeted.len() - 1 - index;
        let prefix = format!(
            "{MODEL_PREFIX}{}{}",
            g.container,
            ".base_layer".repeat(depth)
        );
        let (a_key, b_key) = (
            format!("{prefix}.lora_A.weight"),
            format!("{prefix}.lora_B.weight"),
        );

        let dtype = first.a.dtype();
        let elt = dtype_size(dtype).ok_or_else(|| {
            tensor_err(
                &first_key,
                format!("{} has no whole-byte element size", dtype_name(dtype)),
            )
        })?;
        let experts = g.parts[0].len();
        let mut rows = Vec::new();
        let mut ranks = Vec::new();
        let (mut ooff, mut koff) = (0usize, 0usize);
        let mut in_features = None;
        for part in &g.parts {
            let p0 = &part[0];
            let key0 = first_key_of(adapter, &p0.module, "a");
            let (rank, fin) = match p0.a.shape() {
                [r, i] => (*r, *i),
                s => {
                    return Err(tensor_err(
                        &key0,
                        format!("lora_A has shape {s:?}; 2 dims expected"),
                    ))
                }
            };
            let nout = match p0.b.shape() {
                [o, r] if *r == rank => *o,
                s => {
                    return Err(tensor_err(
                        &first_key_of(adapter, &p0.module, "b"),
                        format!("lora_B has shape {s:?}; [out, {rank}] expected"),
                    ))
                }
            };
            if *in_features.get_or_insert(fin) != fin {
                return Err(tensor_err(
                    &key0,
                    format!(
                        "lora_A has {fin} input features; the other parts of `{}` have {}",
                        g.v5_name,
                        in_features.unwrap_or(fin)
                    ),
                ));
            }
            if g.parts.len() > 1 && rank as u64 != lora.r {
                return Err(tensor_err(
                    &key0,
                    format!("rank {rank} differs from r = {}: peft gives `{}` rank {}·r, so the fused tensors would not load", lora.r, g.param, g.parts.len()),
                ));
            }
            for piece in part {
                let ka = first_key_of(adapter, &piece.module, "a");
                let kb = first_key_of(adapter, &piece.module, "b");
                if piece.a.shape() != p0.a.shape() || piece.b.shape() != p0.b.shape() {
                    return Err(tensor_err(
                        &ka,
                        format!("expert shapes differ: lora_A {:?} / lora_B {:?} here, {:?} / {:?} for `{}`", piece.a.shape(), piece.b.shape(), p0.a.shape(), p0.b.shape(), p0.module),
                    ));
                }
                for (t, k) in [(&piece.a, &ka), (&piece.b, &kb)] {
                    if t.dtype() != dtype {
                        return Err(tensor_err(
                            k,
                            format!(
                                "dtype {} differs from {} of the other tensors fused into `{}`",
                                dtype_name(t.dtype()),
                                dtype_name(dtype),
                                g.v5_name
                            ),
                        ));
                    }
                }
            }
            rows.push((ooff, nout));
            ranks.push((koff, rank));
            ooff += nout;
            koff += rank;
        }
        let fin = in_features.unwrap_or(0);
        let a = fused_a(a_key.clone(), &g.parts, dtype, vec![experts * koff, fin])?;
        let b = fused_b(b_key.clone(), &g.parts, dtype, elt, rows, ranks)?;
        state.insert(a_key.clone(), a);
        state.insert(b_key.clone(), b);
        fused_keys.push(a_key);
        fused_keys.push(b_key);
    }

    Ok(Converted {
        config,
        state,
        fused: fused_keys,
        dropped,
    })
}

fn first_key_of(adapter: &Adapter, module: &str, role: &str) -> String {
    adapter
        .modules
        .get(module)
        .and_then(|m| m.tensors.get(role))
        .map(|t| t.key.clone())
        .unwrap_or_else(|| format!("{module} ({role})"))
}

/// What [`convert_legacy_adapter_dir`] wrote.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    /// The output folder.
    pub dir: PathBuf,
    /// The model type used.
    pub model_type: String,
    /// The conversion table used.
    pub table: String,
    /// Fused tensors written.
    pub fused_tensors: usize,
    /// Tensors written in all.
    pub tensors: usize,
    /// Input keys dropped ([`Untargeted::Drop`]).
    pub dropped: Vec<String>,
    /// Other files copied from the legacy folder.
    pub copied: Vec<String>,
    /// The weights written.
    pub save: SaveReport,
}

/// The `model_type` of a base model folder's `config.json` (for `--base`).
pub fn model_type_from_base(base_dir: &Path) -> Result<String, ConvertError> {
    let path = base_dir.join("config.json");
    let config = peftkit_checkpoint::ModelConfig::read(&path)?;
    config
        .model_type()
        .map(str::to_owned)
        .ok_or_else(|| ConvertError::Config {
            file: path,
            reason: "no `model_type`; pass the model type explicitly (--model-type)".into(),
        })
}

/// Converts the legacy adapter in `src_dir` and writes it to `out_dir` (replaced atomically),
/// with the default options. `model_type` `None`: read from `base_model_name_or_path` when
/// that is a local folder with a `config.json`, else an error asking for it.
pub fn convert_legacy_adapter_dir(
    src_dir: &Path,
    out_dir: &Path,
    model_type: Option<&str>,
) -> Result<ConvertReport, ConvertError> {
    convert_legacy_adapter_dir_with(src_dir, out_dir, model_type, &ConvertOptions::default())
}

/// [`convert_legacy_adapter_dir`] with options.
///
/// The folder gets `adapter_model.safetensors` (`{"format": "pt"}`), `adapter_config.json` (as
/// peft writes it, `target_modules` and `target_parameters` sorted) and every other file of the
/// legacy folder (its `README.md` model card, tokenizer files, …); without a model card, the
/// one peft writes for a new adapter.
pub fn convert_legacy_adapter_dir_with(
    src_dir: &Path,
    out_dir: &Path,
    model_type: Option<&str>,
    options: &ConvertOptions,
) -> Result<ConvertReport, ConvertError> {
    if let (Ok(a), Ok(b)) = (src_dir.canonicalize(), out_dir.canonicalize()) {
        if a == b {
            return Err(ConvertError::SameFolder(out_dir.to_owned()));
        }
    }
    let adapter = Adapter::open(src_dir)?;
    let model_type = match model_type {
        Some(t) => t.to_owned(),
        None => {
            let base = adapter.config.base_model_name_or_path().unwrap_or("");
            let dir = Path::new(base);
            if !base.is_empty() && dir.join("config.json").is_file() {
                model_type_from_base(dir)?
            } else {
                return Err(ConvertError::NoModelType {
                    dir: src_dir.to_owned(),
                    base: base.to_owned(),
                });
            }
        }
    };
    let rules = rules_for(&adapter, &model_type)?;
    let converted = convert_with_rules(&adapter, &rules, options)?;

    let mut extra = vec![(
        ADAPTER_CONFIG_NAME.to_owned(),
        converted.config.to_json_string().into_bytes(),
    )];
    let mut copied = Vec::new();
    let io = |path: &Path, source| ConvertError::Io {
        path: path.to_owned(),
        source,
    };
    let entries = std::fs::read_dir(src_dir).map_err(|e| io(src_dir, e))?;
    let mut names: Vec<(String, PathBuf)> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io(src_dir, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        // The legacy weights and config are what is being replaced.
        if !path.is_file() || name == ADAPTER_CONFIG_NAME || name.starts_with("adapter_model") {
            continue;
        }
        names.push((name, path));
    }
    names.sort();
    for (name, path) in names {
        let bytes = std::fs::read(&path).map_err(|e| io(&path, e))?;
        extra.push((name.clone(), bytes));
        copied.push(name);
    }
    if !copied.iter().any(|n| n == MODEL_CARD) {
        extra.push((
            MODEL_CARD.to_owned(),
            crate::save::model_card(&converted.config, None).into_bytes(),
        ));
    }
    let save = peftkit_checkpoint::save_pretrained(
        out_dir,
        &converted.state,
        &SaveOptions {
            kind: WeightsKind::Adapter,
            extra_files: extra,
            ..SaveOptions::default()
        },
    )?;
    Ok(ConvertReport {
        dir: out_dir.to_owned(),
        model_type,
        table: rules.table,
        fused_tensors: converted.fused.len(),
        tensors: converted.state.len(),
        dropped: converted.dropped,
        copied,
        save,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_match_peft_tables() {
        // peft 0.21.2's _MOE_TARGET_MODULE_MAPPING / _MOE_FUSED_TARGETS, derived from the data.
        let m = LegacyMoeRules::for_model_type("mixtral").unwrap();
        let pairs: Vec<(&str, &str)> = m
            .target_mapping
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("gate", "gate.weight"),
                ("w1", "gate_up_proj"),
                ("w3", "gate_up_proj"),
                ("w2", "down_proj")
            ]
        );
        assert_eq!(m.fused[0].parts, ["w1", "w3"]);
        let q = LegacyMoeRules::for_model_type("qwen3_moe").unwrap();
        let pairs: Vec<(&str, &str)> = q
            .target_mapping
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("gate", "gate.weight"),
                ("gate_proj", "gate_up_proj"),
                ("up_proj", "gate_up_proj"),
                ("down_proj", "down_proj")
            ]
        );
        assert_eq!(q.table, "qwen2_moe");
        // minimax_m2 has its own table, which extends mixtral's.
        let mm = LegacyMoeRules::for_model_type("minimax_m2").unwrap();
        assert_eq!(mm.table, "minimax_m2");
        assert_eq!(mm.fused, m.fused);
        // Types without a table of their own use the pattern's.
        assert_eq!(
            LegacyMoeRules::for_model_type("ernie4_5_moe")
                .unwrap()
                .table,
            "qwen2_moe"
        );
    }

    #[test]
    fn unconverted_types_say_why() {
        let err = LegacyMoeRules::for_model_type("qwen2_moe").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("qwen2_moe") && text.contains("qwen3_moe"),
            "{text}"
        );
        assert!(LegacyMoeRules::for_model_type("llama").is_err());
    }

    #[test]
    fn helpers_follow_python() {
        assert_eq!(re_escape("gate_up_proj"), "gate_up_proj");
        assert_eq!(re_escape("a.b-c"), "a\\.b\\-c");
        assert_eq!(pattern_leaf(".experts.*.w1.weight"), "w1");
        assert_eq!(pattern_leaf("mlp.experts.gate_up_proj"), "gate_up_proj");
        assert_eq!(pattern_leaf("^model\\.x\\.down_proj"), "down_proj");
        assert_eq!(mul_number(&Number::from(8), 2), Some(Number::from(16)));
        assert_eq!(
            mul_number(&Number::from_f64(3.5).unwrap(), 2),
            Number::from_f64(7.0)
        );
        assert!(name_matches_suffix("model.layers.0.mlp.gate", "gate"));
        assert!(!name_matches_suffix(
            "model.layers.0.mlp.shared_expert_gate",
            "gate"
        ));
        assert_eq!(
            disk_suffix(
                "base_model.model.m.q.lora_A.default.weight",
                "m.q",
                "default"
            )
            .as_deref(),
            Some("lora_A.weight")
        );
        assert_eq!(
            disk_suffix("m.q.lora_embedding_A.default", "m.q", "default").as_deref(),
            Some("lora_embedding_A")
        );
    }
}
