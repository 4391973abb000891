//! Inference of the `adapter_config.json` peft would write for classified adapter tensors.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use indexmap::IndexMap;
use serde::Serialize;
use serde_json::{Map, Number, Value};

use crate::config::{AdapterConfig, GenericConfig, LoraConfig, LORA, PEFT_VERSION};
use crate::py::re_escape;
use crate::spec::Spec;
use crate::targeting::TargetModules;
use crate::targeting::{minimal_target_suffixes, PatternResolver, TargetMatcher};

use super::conv1d::{conv1d_by_table, conv1d_kind};
use super::*;

/// The LoRA config fields that the tensors determine, and how.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoraStructure {
    /// `r`: the most frequent rank (ties: the smaller).
    pub r: u64,
    /// Rank of every adapted module.
    pub ranks: IndexMap<String, u64>,
    /// `rank_pattern` for modules whose rank differs from `r`.
    pub rank_pattern: IndexMap<String, u64>,
    /// `target_modules`: minimal name suffixes that select exactly the adapted modules.
    pub target_modules: Vec<String>,
    /// `use_dora`: magnitude vectors present.
    pub use_dora: bool,
    /// `lora_bias`: `lora_B.bias` present.
    pub lora_bias: bool,
    /// `fan_in_fan_out`: a targeted module is a GPT-2 style `Conv1D`.
    pub fan_in_fan_out: bool,
    /// `modules_to_save`, or `None`.
    pub modules_to_save: Option<Vec<String>>,
    /// Modules with trainable-token rows (their indices are only in the config).
    pub trainable_token_modules: Vec<String>,
    /// How ambiguous cases were settled.
    pub notes: Vec<String>,
}

/// Strips leading all-digit components' ambiguity: a suffix starting with a layer index
/// (`0.self_attn.q_proj`) is extended by the component before it (`layers.0.self_attn.q_proj`),
/// the form people write and peft records.
fn readable_suffixes(suffixes: &BTreeSet<String>, targets: &[String]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for s in suffixes {
        let first = s.split('.').next().unwrap_or("");
        if first.is_empty() || !first.bytes().all(|b| b.is_ascii_digit()) {
            out.insert(s.clone());
            continue;
        }
        let mut extended = false;
        for t in targets {
            if let Some(head) = t.strip_suffix(&format!(".{s}")) {
                let prev = head.rsplit('.').next().unwrap_or(head);
                out.insert(format!("{prev}.{s}"));
                extended = true;
            }
        }
        if !extended {
            out.insert(s.clone());
        }
    }
    out
}

/// The structural LoRA fields of adapter `adapter` (see [`LoraStructure`]).
///
/// `model` supplies the `model_type` for the `Conv1D` table when a base weight is square.
pub fn infer_lora_structure(
    c: &ClassifiedStateDict,
    adapter: &str,
    model: &BaseModelInfo,
) -> Result<LoraStructure, ClassifyError> {
    let a = c.adapter(Some(adapter))?;
    let mut notes = Vec::new();
    let scan = scan_modules(c, adapter, a, model, &mut notes)?;
    let trainable_token_modules = a.trainable_token_modules();
    if scan.ranks.is_empty() && trainable_token_modules.is_empty() && a.modules_to_save().is_empty()
    {
        return Err(needs(adapter, "r", "the adapter has no LoRA module".into()));
    }
    let (r, counts) = most_frequent_rank(&scan.ranks);
    let all_modules = c.module_names();
    let mts = a.modules_to_save();
    let modules_to_save = infer_modules_to_save(&all_modules, &mts, &mut notes)?;
    let target_modules = infer_target_modules(
        &all_modules,
        &scan.ranks,
        &mts,
        modules_to_save.as_ref(),
        &mut notes,
    )?;
    let rank_pattern = infer_rank_pattern(&scan.ranks, &counts, r, &mut notes)?;
    Ok(LoraStructure {
        r,
        ranks: scan.ranks,
        rank_pattern,
        target_modules,
        use_dora: scan.any_magnitude,
        lora_bias: scan.lora_bias,
        fan_in_fan_out: scan.fan_in_fan_out,
        modules_to_save,
        trainable_token_modules,
        notes,
    })
}

/// "Adapter `adapter` needs `what` from its config": the tensors do not determine it.
fn needs(adapter: &str, what: &str, reason: String) -> ClassifyError {
    ClassifyError::NeedsConfig {
        adapter: adapter.to_owned(),
        what: what.to_owned(),
        reason,
    }
}

/// What one pass over an adapter's LoRA modules finds.
struct ModuleScan {
    /// Rank of every adapted module, in module order.
    ranks: IndexMap<String, u64>,
    any_magnitude: bool,
    lora_bias: bool,
    fan_in_fan_out: bool,
}

/// Ranks, DoRA, `lora_bias` and `Conv1D` layout of every LoRA module of `a`, with the checks
/// that make a module a LoRA module peft could have written.
fn scan_modules(
    c: &ClassifiedStateDict,
    adapter: &str,
    a: &AdapterTensors,
    model: &BaseModelInfo,
    notes: &mut Vec<String>,
) -> Result<ModuleScan, ClassifyError> {
    let mut scan = ModuleScan {
        ranks: IndexMap::new(),
        any_magnitude: false,
        lora_bias: false,
        fan_in_fan_out: false,
    };
    let mut all_magnitude = true;
    let mut square_conv1d: Vec<String> = Vec::new();
    for (module, roles) in &a.modules() {
        if roles.contains_key("trainable_tokens") && roles.len() == 1 {
            continue;
        }
        let base_weight = c.base.get(&format!("{module}.weight"));
        let rank = module_rank(c, adapter, module, roles, base_weight)?;
        scan.ranks.insert(module.to_string(), rank);
        if roles.contains_key("magnitude") {
            scan.any_magnitude = true;
        } else {
            all_magnitude = false;
        }
        scan.lora_bias |= roles.contains_key("b_bias");
        if roles.contains_key("a") && c.layout != StateDictLayout::Burn {
            if let Some(conv1d) = conv1d_kind(c, module, roles, base_weight)? {
                scan.fan_in_fan_out |= conv1d;
            } else if conv1d_by_table(model.model_type(), module)? {
                scan.fan_in_fan_out = true;
                square_conv1d.push(module.to_string());
            }
        }
    }
    if !square_conv1d.is_empty() {
        notes.push(format!(
            "base weight square or unknown for `{}`: taken as Conv1D from adapters-spec/conv1d_modules.json ({})",
            square_conv1d.join("`, `"),
            model
                .model_type()
                .map_or("model type unknown: any model type's entry".to_owned(), |m| format!("model type {m}"))
        ));
    }
    if scan.any_magnitude && !all_magnitude {
        return Err(needs(
            adapter,
            "use_dora",
            "some modules have lora_magnitude_vector and some do not".into(),
        ));
    }
    Ok(scan)
}

/// The rank of one LoRA module: the rows of its A factor, which its B factor must agree with.
fn module_rank(
    c: &ClassifiedStateDict,
    adapter: &str,
    module: &str,
    roles: &AdapterModule<'_>,
    base_weight: Option<&Tensor>,
) -> Result<u64, ClassifyError> {
    let inconsistent = |t: &Tensor, key: &str, reason: String| ClassifyError::Inconsistent {
        origin: origin_of(t),
        key: key.to_owned(),
        module: module.to_owned(),
        reason,
    };
    let (a_key, a_t) = match roles.lora_a() {
        Some(x) => x,
        None => {
            let (k, t) = roles.keyed_tensors().next().ok_or_else(|| {
                needs(
                    adapter,
                    "the module list",
                    format!("module `{module}` has no tensors"),
                )
            })?;
            return Err(inconsistent(
                t,
                k,
                "the module has no lora_A / lora_embedding_A tensor".into(),
            ));
        }
    };
    if module.split('.').any(|p| p == "base_layer") {
        return Err(needs(
            adapter,
            "target_parameters",
            format!(
                "module `{module}` is a nested adapter layer (peft's `target_parameters` for MoE experts, or a MultiheadAttention out_proj)"
            ),
        ));
    }
    if c.layout == StateDictLayout::PeftModel && base_weight.is_none() {
        return Err(needs(
            adapter,
            "the targeted parameters",
            format!("module `{module}` has no `weight` (a `target_parameters` or MultiheadAttention adapter)"),
        ));
    }
    let rank = a_t.shape().first().copied().unwrap_or(0) as u64;
    if rank == 0 {
        return Err(inconsistent(
            a_t,
            a_key,
            format!("shape {:?} gives rank 0", a_t.shape()),
        ));
    }
    // The B factor must agree on the rank (Linear / Conv1D / Embedding: B is (out, r)).
    let Some((b_key, b_t)) = roles.keyed("b").or_else(|| roles.keyed("embedding_b")) else {
        return Err(inconsistent(
            a_t,
            a_key,
            "the module has an A factor but no B factor".into(),
        ));
    };
    if b_t.shape().len() == 2 && b_t.shape()[1] as u64 != rank {
        return Err(inconsistent(
            b_t,
            b_key,
            format!(
                "shape {:?} does not have the rank {rank} of `{a_key}` {:?}",
                b_t.shape(),
                a_t.shape()
            ),
        ));
    }
    Ok(rank)
}

/// `r`: the most frequent rank, ties to the smaller (8, peft's default, when there is none);
/// and how many modules have each rank.
fn most_frequent_rank(ranks: &IndexMap<String, u64>) -> (u64, BTreeMap<u64, usize>) {
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for r in ranks.values() {
        *counts.entry(*r).or_default() += 1;
    }
    let r = counts
        .iter()
        .max_by(|x, y| x.1.cmp(y.1).then(y.0.cmp(x.0)))
        .map(|(r, _)| *r)
        .unwrap_or(8);
    (r, counts)
}

/// `modules_to_save`: suffixes matched with peft's plain `key.endswith(name)`.
fn infer_modules_to_save(
    all_modules: &BTreeSet<String>,
    mts: &[String],
    notes: &mut Vec<String>,
) -> Result<Option<Vec<String>>, ClassifyError> {
    if mts.is_empty() {
        return Ok(None);
    }
    let mts_set: HashSet<&str> = mts.iter().map(String::as_str).collect();
    let others: Vec<&String> = all_modules
        .iter()
        .filter(|m| {
            !mts_set.contains(m.as_str()) && !mts.iter().any(|t| m.starts_with(&format!("{t}.")))
        })
        .collect();
    let minimal = minimal_target_suffixes(mts, &others)?;
    let ok = minimal.iter().all(|s| {
        all_modules
            .iter()
            .filter(|m| m.ends_with(s.as_str()))
            .all(|m| mts_set.contains(m.as_str()))
    });
    Ok(Some(if ok {
        minimal.into_iter().collect()
    } else {
        notes.push(
            "modules_to_save written as full module names (no shorter name is unique)".into(),
        );
        let mut v = mts.to_vec();
        v.sort();
        v
    }))
}

/// `target_modules`: minimal suffixes, checked with peft's matcher; the full names when no
/// shorter set selects exactly the adapted modules.
fn infer_target_modules(
    all_modules: &BTreeSet<String>,
    ranks: &IndexMap<String, u64>,
    mts: &[String],
    modules_to_save: Option<&Vec<String>>,
    notes: &mut Vec<String>,
) -> Result<Vec<String>, ClassifyError> {
    let targets: Vec<String> = ranks.keys().cloned().collect();
    if targets.is_empty() {
        return Ok(Vec::new());
    }
    let target_set: HashSet<&str> = targets.iter().map(String::as_str).collect();
    let others: Vec<&String> = all_modules
        .iter()
        .filter(|m| !target_set.contains(m.as_str()))
        .collect();
    let minimal: Vec<String> = minimal_target_suffixes(&targets, &others)?
        .into_iter()
        .collect();
    let cfg = LoraConfig {
        target_modules: Some(TargetModules::Names(minimal.clone())),
        modules_to_save: modules_to_save.cloned(),
        ..LoraConfig::default()
    };
    let m = TargetMatcher::for_lora(&cfg)?;
    let mut exact = true;
    for t in &targets {
        if !m.is_target(t)? {
            exact = false;
            break;
        }
    }
    if exact {
        for o in &others {
            if !mts.iter().any(|x| o.starts_with(x.as_str())) && m.is_target(o)? {
                exact = false;
                break;
            }
        }
    }
    if exact {
        return Ok(minimal);
    }
    notes.push(
        "target_modules written as full module names (no shorter suffix set is exact)".into(),
    );
    let mut v = targets;
    v.sort();
    Ok(v)
}

/// `rank_pattern` for the modules whose rank is not `r`: readable minimal suffixes when they
/// resolve every module's rank through peft's pattern rule, else full escaped names.
fn infer_rank_pattern(
    ranks: &IndexMap<String, u64>,
    counts: &BTreeMap<u64, usize>,
    r: u64,
    notes: &mut Vec<String>,
) -> Result<IndexMap<String, u64>, ClassifyError> {
    let mut rank_pattern: IndexMap<String, u64> = IndexMap::new();
    for (&k, _) in counts.iter().filter(|(k, _)| **k != r) {
        let group: Vec<String> = ranks
            .iter()
            .filter(|(_, v)| **v == k)
            .map(|(m, _)| m.clone())
            .collect();
        let others: Vec<String> = ranks
            .iter()
            .filter(|(_, v)| **v != k)
            .map(|(m, _)| m.clone())
            .collect();
        let minimal = minimal_target_suffixes(&group, &others)?;
        for s in readable_suffixes(&minimal, &group) {
            rank_pattern.insert(s, k);
        }
    }
    rank_pattern.sort_keys();
    if !rank_pattern_resolves(&rank_pattern, ranks, r)? {
        notes.push("rank_pattern written with full, escaped module names".into());
        rank_pattern = ranks
            .iter()
            .filter(|(_, v)| **v != r)
            .map(|(m, v)| (re_escape(m), *v))
            .collect();
        rank_pattern.sort_keys();
    }
    Ok(rank_pattern)
}

/// Whether `pattern` with default `r` gives every module of `ranks` its rank.
fn rank_pattern_resolves(
    pattern: &IndexMap<String, u64>,
    ranks: &IndexMap<String, u64>,
    r: u64,
) -> Result<bool, ClassifyError> {
    let cfg = LoraConfig {
        r,
        rank_pattern: Some(
            pattern
                .iter()
                .map(|(k, v)| (k.clone(), Number::from(*v)))
                .collect(),
        ),
        ..LoraConfig::default()
    };
    let resolver = PatternResolver::new(&cfg)?;
    for (m, rank) in ranks {
        if resolver.rank_for(m)? != *rank {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Options of [`infer_config`].
#[derive(Debug, Clone, Default)]
pub struct InferOptions {
    /// `lora_alpha` (required for LoRA: the tensors do not carry it).
    pub lora_alpha: Option<Number>,
    /// `use_rslora` (not visible in the tensors).
    pub use_rslora: bool,
    /// The base model.
    pub model: BaseModelInfo,
}

peftkit_checkpoint::option_setters!(InferOptions {
    lora_alpha: Some(Number),
    use_rslora: bool,
    model: BaseModelInfo,
});

/// An inferred config and how it was settled.
#[derive(Debug, Clone)]
pub struct Inferred {
    /// The config, with `inference_mode: true` as peft saves it.
    pub config: AdapterConfig,
    /// Notes on ambiguous cases.
    pub notes: Vec<String>,
}

/// The `adapter_config.json` peft would have written for adapter `adapter` of `c`, as far as
/// the tensors and `options` determine it (docs/formats.md, "What peftkit infers, and how"):
///
/// * LoRA: `r`, `rank_pattern`, `target_modules`, `use_dora`, `lora_bias`, `fan_in_fan_out`,
///   `modules_to_save` from the tensors ([`infer_lora_structure`]); `lora_alpha` and
///   `use_rslora` from `options`; `task_type`, `auto_mapping`, `base_model_name_or_path` from
///   `options.model`; every other field peft's default. `alpha_pattern`, `lora_dropout`,
///   `bias`, `init_lora_weights` and `trainable_token_indices` are not in the tensors: adapters
///   that used them need the config ([`ClassifyError::NeedsConfig`] for trainable tokens).
/// * Prompt tuning: `num_virtual_tokens` and `token_dim` from `prompt_embeddings`,
///   `num_layers` / `num_attention_heads` from the base `config.json` (required).
/// * Other methods: [`ClassifyError::NeedsConfig`].
pub fn infer_config(
    c: &ClassifiedStateDict,
    adapter: &str,
    options: &InferOptions,
) -> Result<Inferred, ClassifyError> {
    let a = c.adapter(Some(adapter))?;
    let task_type = options.model.resolved_task_type();
    let auto_mapping = options.model.resolved_auto_mapping(task_type.as_deref());
    match a.method.as_str() {
        LORA => {
            let s = infer_lora_structure(c, adapter, &options.model)?;
            if !s.trainable_token_modules.is_empty() {
                return Err(ClassifyError::NeedsConfig {
                    adapter: adapter.to_owned(),
                    what: "trainable_token_indices".into(),
                    reason: format!(
                        "`{}` has trainable-token rows, whose token ids are only recorded in the config",
                        s.trainable_token_modules.join("`, `")
                    ),
                });
            }
            let lora_alpha =
                options
                    .lora_alpha
                    .clone()
                    .ok_or_else(|| ClassifyError::MissingAlpha {
                        adapter: adapter.to_owned(),
                    })?;
            let config = LoraConfig {
                task_type,
                auto_mapping,
                base_model_name_or_path: options.model.name_or_path.clone(),
                inference_mode: true,
                r: s.r,
                target_modules: Some(TargetModules::Names(s.target_modules.clone())),
                lora_alpha,
                fan_in_fan_out: s.fan_in_fan_out,
                use_rslora: options.use_rslora,
                modules_to_save: s.modules_to_save.clone(),
                rank_pattern: Some(
                    s.rank_pattern
                        .iter()
                        .map(|(k, v)| (k.clone(), Number::from(*v)))
                        .collect(),
                ),
                use_dora: s.use_dora,
                lora_bias: s.lora_bias,
                ..LoraConfig::default()
            };
            Ok(Inferred {
                config: AdapterConfig::Lora(Box::new(config)),
                notes: s.notes,
            })
        }
        "PROMPT_TUNING" => infer_prompt_tuning(a, adapter, options, task_type, auto_mapping),
        other => Err(ClassifyError::NeedsConfig {
            adapter: adapter.to_owned(),
            what: format!("the {other} config"),
            reason: "peftkit infers LoRA and prompt-tuning configs only".into(),
        }),
    }
}

fn infer_prompt_tuning(
    a: &AdapterTensors,
    adapter: &str,
    options: &InferOptions,
    task_type: Option<String>,
    auto_mapping: Option<Value>,
) -> Result<Inferred, ClassifyError> {
    let needs = |reason: String| ClassifyError::NeedsConfig {
        adapter: adapter.to_owned(),
        what: "the prompt-tuning config".into(),
        reason,
    };
    let model = &options.model;
    if model.config.is_none() {
        return Err(needs(
            "num_layers and num_attention_heads come from the base model's config.json, which was not given".into(),
        ));
    }
    let e = a
        .entries
        .get("prompt_embeddings")
        .ok_or_else(|| needs("no prompt_embeddings tensor".into()))?;
    let [rows, dim] =
        <[usize; 2]>::try_from(e.tensor.shape()).map_err(|_| ClassifyError::Inconsistent {
            origin: origin_of(&e.tensor),
            key: e.source_key.clone(),
            module: "prompt_encoder".into(),
            reason: format!(
                "shape {:?} is not (num_virtual_tokens, token_dim)",
                e.tensor.shape()
            ),
        })?;
    let hidden = model.config_usize(&["hidden_size", "n_embd", "d_model"]);
    if hidden.is_some_and(|h| h != dim as u64) {
        return Err(needs(format!(
            "prompt_embeddings has {dim} columns but the model's hidden size is {} (prefix tuning?)",
            hidden.unwrap_or_default()
        )));
    }
    let submodules: u64 = if task_type.as_deref() == Some("SEQ_2_SEQ_LM") {
        2
    } else {
        1
    };
    if !(rows as u64).is_multiple_of(submodules) {
        return Err(needs(format!(
            "{rows} prompt rows do not split over {submodules} transformer submodules"
        )));
    }
    let fields = prompt_tuning_fields(model, task_type, auto_mapping, rows, dim, submodules);
    let set_fields = Spec::embedded()
        .method("PROMPT_TUNING")
        .map(|m| m.set_fields.clone())
        .unwrap_or_default();
    Ok(Inferred {
        config: AdapterConfig::Other(GenericConfig {
            peft_type: "PROMPT_TUNING".into(),
            fields,
            set_fields,
        }),
        notes: vec![
            "prompt_tuning_init recorded as RANDOM (the init is not visible in the tensors)".into(),
        ],
    })
}

/// The fields peft's `PromptTuningConfig` writes for a prompt of `rows` rows of `dim` columns
/// over `submodules` transformer submodules, with peft's defaults for the rest.
fn prompt_tuning_fields(
    model: &BaseModelInfo,
    task_type: Option<String>,
    auto_mapping: Option<Value>,
    rows: usize,
    dim: usize,
    submodules: u64,
) -> Map<String, Value> {
    let num = |v: Option<u64>| v.map_or(Value::Null, Value::from);
    let mut fields = Map::new();
    fields.insert(
        "task_type".into(),
        task_type.map_or(Value::Null, Value::String),
    );
    fields.insert("auto_mapping".into(), auto_mapping.unwrap_or(Value::Null));
    fields.insert("peft_version".into(), Value::String(PEFT_VERSION.into()));
    fields.insert(
        "base_model_name_or_path".into(),
        model
            .name_or_path
            .clone()
            .map_or(Value::Null, Value::String),
    );
    fields.insert("revision".into(), Value::Null);
    fields.insert("inference_mode".into(), Value::Bool(true));
    fields.insert(
        "num_virtual_tokens".into(),
        Value::from(rows as u64 / submodules),
    );
    fields.insert("token_dim".into(), Value::from(dim as u64));
    fields.insert("num_transformer_submodules".into(), Value::from(submodules));
    fields.insert(
        "num_attention_heads".into(),
        num(model.config_usize(&[
            "num_attention_heads",
            "n_head",
            "num_heads",
            "encoder_attention_heads",
        ])),
    );
    fields.insert(
        "num_layers".into(),
        num(model.config_usize(&["num_hidden_layers", "num_layers", "n_layer", "n_layers"])),
    );
    fields.insert("modules_to_save".into(), Value::Null);
    fields.insert("prompt_tuning_init".into(), Value::String("RANDOM".into()));
    fields.insert("prompt_tuning_init_text".into(), Value::Null);
    fields.insert("tokenizer_name_or_path".into(), Value::Null);
    fields.insert("tokenizer_kwargs".into(), Value::Null);
    fields
}
