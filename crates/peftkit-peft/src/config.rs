//! `adapter_config.json`, read leniently and written byte for byte as peft 0.21.2 writes it
//! (spec §3).
//!
//! * LoRA configs are typed ([`LoraConfig`]: the 41 fields peft 0.21.2 writes, with peft's
//!   defaults); unknown fields are kept, reported as [`ConfigWarning::UnknownField`] and written
//!   back.
//! * Every other method is held as an ordered JSON map with its `peft_type`
//!   ([`GenericConfig`]), which round-trips the bytes of any config peft wrote (prompt tuning
//!   included).
//! * Reading checks JSON types (errors name the field); [`AdapterConfig::validate`] adds peft's
//!   `__post_init__` checks (task type, contradictory options, regexes that do not compile).
//! * Writing is `json.dumps(config, indent=2, sort_keys=True)` without a trailing newline.
//!   peft writes `target_modules` / `exclude_modules` (and IA3's `feedforward_modules`) from a
//!   Python `set`, so their order in peft's files is the set's iteration order, which depends on
//!   the hash seed and is arbitrary. This writer writes them **sorted** (and de-duplicated) by
//!   default; [`SetOrder::AsHeld`] keeps the order they were read in.
//!
//! ```
//! use peftkit_peft::config::{AdapterConfig, ConfigWarning, TargetModules};
//!
//! let text = r#"{"peft_type": "LORA", "peft_version": "0.21.2", "r": 16, "lora_alpha": 32,
//!                "lora_dropout": 0.05, "target_modules": ["v_proj", "q_proj"], "my_tool_field": 1}"#;
//! let (config, warnings) = AdapterConfig::from_json_str(text).unwrap();
//! assert_eq!(warnings, [ConfigWarning::UnknownField("my_tool_field".into())]); // kept
//! config.validate().unwrap();
//! let lora = config.as_lora().unwrap();
//! assert_eq!(lora.r, 16);
//! assert_eq!(
//!     lora.target_modules,
//!     Some(TargetModules::Names(vec!["v_proj".into(), "q_proj".into()]))
//! );
//! // peft's layout: all fields, sorted keys, 2-space indent, no trailing newline.
//! let json = config.to_json_string();
//! assert!(json.starts_with("{\n  \"alora_invocation_tokens\": null,\n"));
//! assert!(json.contains("\n  \"lora_alpha\": 32,\n  \"lora_bias\": false,\n  \"lora_dropout\": 0.05,\n"));
//! assert!(json.contains("\"target_modules\": [\n    \"q_proj\",\n    \"v_proj\"\n  ],"));
//! assert!(json.ends_with("\n  \"velora_config\": null\n}"));
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use peftkit_checkpoint::pyjson::{self, PyJsonStyle};
use serde_json::{json, Map, Number, Value};

use crate::py::RegexError;
use crate::spec::Spec;
use crate::targeting::{PatternResolver, TargetMatcher, TargetingError};

/// File name of an adapter config (`peft.utils.CONFIG_NAME`).
pub const CONFIG_NAME: &str = "adapter_config.json";

/// The peft release whose format this module writes; also what peft fills into a missing
/// `peft_version` when it loads a config.
pub const PEFT_VERSION: &str = "0.21.2";

/// `peft_type` of LoRA.
pub const LORA: &str = "LORA";

/// Valid `task_type` values (`peft.utils.TaskType`).
pub const TASK_TYPES: [&str; 6] = [
    "SEQ_CLS",
    "SEQ_2_SEQ_LM",
    "CAUSAL_LM",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
];

/// Valid LoRA `bias` values.
pub const LORA_BIAS_VALUES: [&str; 3] = ["none", "all", "lora_only"];

/// Keys peft drops (with a warning) from any config file it loads.
const RUNTIME_CONFIG: &str = "runtime_config";

/// Errors reading or validating an adapter config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The text is not JSON.
    #[error("adapter config is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The document is JSON but not an object.
    #[error("adapter config must be a JSON object, found {0}")]
    NotAnObject(String),
    /// No `peft_type` (peft: `KeyError: 'peft_type'`).
    #[error("adapter config has no `peft_type`")]
    MissingPeftType,
    /// A `peft_type` peft does not know (peft: `KeyError`).
    #[error("unknown peft_type {0:?}")]
    UnknownPeftType(String),
    /// A typed reader got a config of another method.
    #[error("expected peft_type {expected:?}, found {found:?}")]
    PeftTypeMismatch {
        /// The method the reader handles.
        expected: String,
        /// The method in the file.
        found: String,
    },
    /// A field has the wrong JSON type.
    #[error("field `{field}` must be {expected}, found {found}")]
    WrongType {
        /// The field (with a key or index for nested values, e.g. `rank_pattern["q_proj"]`).
        field: String,
        /// What peft accepts.
        expected: &'static str,
        /// What the file has.
        found: String,
    },
    /// `task_type` is not one of [`TASK_TYPES`] (peft: `ValueError: Invalid task type`).
    #[error("invalid task type {0:?}: must be one of {list}", list = TASK_TYPES.join(", "))]
    InvalidTaskType(String),
    /// A field has a value peft rejects.
    #[error("field `{field}`: {reason}")]
    InvalidValue {
        /// The field.
        field: String,
        /// Why the value is rejected.
        reason: String,
    },
    /// `layers_to_transform` / `layers_pattern` with a regex-string `target_modules`.
    #[error("`{0}` cannot be used when `target_modules` is a str")]
    LayersWithRegexTargets(&'static str),
    /// `layers_pattern` without `layers_to_transform`.
    #[error("when `layers_pattern` is specified, `layers_to_transform` must also be specified")]
    LayersPatternWithoutLayersToTransform,
    /// `lora_bias=true` with `use_dora=true`.
    #[error("lora_bias=true is not supported for DoRA (use_dora=true)")]
    LoraBiasWithDora,
    /// `lora_bias=true` with a string `init_lora_weights`.
    #[error("lora_bias=true is only supported with init_lora_weights true or false, got {0:?}")]
    LoraBiasWithInit(String),
    /// `use_dora=true` with a `megatron_config`.
    #[error("DoRA does not support megatron_core: use_dora=true with a megatron_config")]
    DoraWithMegatron,
    /// `init_lora_weights="loftq"` without a `loftq_config`.
    #[error("`loftq_config` must be specified when `init_lora_weights` is \"loftq\"")]
    LoftqWithoutConfig,
    /// `target_parameters` is a string (peft: `TypeError`).
    #[error("`target_parameters` must be a list of strings or null, found the string {0:?}")]
    StringTargetParameters(String),
    /// A pattern in the config does not compile.
    #[error("in `{field}`: {source}")]
    Regex {
        /// The field holding the pattern.
        field: String,
        /// The compile error.
        #[source]
        source: RegexError,
    },
}

impl From<TargetingError> for ConfigError {
    fn from(e: TargetingError) -> Self {
        match e {
            TargetingError::Regex { field, source } => ConfigError::Regex { field, source },
            other => ConfigError::InvalidValue {
                field: "target_modules".into(),
                reason: other.to_string(),
            },
        }
    }
}

/// Something peft would warn about while loading; reading goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigWarning {
    /// A field this peft version does not have; kept and written back (peft ≥ 0.14 drops it).
    UnknownField(String),
    /// `runtime_config` was in the file; dropped, as peft does.
    RuntimeConfigDropped,
    /// `peft_version` was missing or null; filled with [`PEFT_VERSION`], as peft does.
    PeftVersionFilled,
    /// `loftq_config` was set although `init_lora_weights` is not `"loftq"`; reset to `{}` as peft
    /// does.
    LoftqConfigReset,
    /// `init_lora_weights` names a data-driven init whose sub-config was missing; peft's default
    /// sub-config was filled in.
    SubConfigDefaulted(&'static str),
    /// A sub-config is set but `init_lora_weights` does not use it (kept, as peft does).
    SubConfigUnused(&'static str),
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigWarning::UnknownField(name) => write!(
                f,
                "unknown field `{name}` (not a field of peft {PEFT_VERSION}); kept and written back"
            ),
            ConfigWarning::RuntimeConfigDropped => {
                write!(f, "`runtime_config` is only valid at run time; dropped")
            }
            ConfigWarning::PeftVersionFilled => {
                write!(f, "`peft_version` missing; set to {PEFT_VERSION:?}")
            }
            ConfigWarning::LoftqConfigReset => write!(
                f,
                "`loftq_config` is ignored when `init_lora_weights` is not \"loftq\"; reset to {{}}"
            ),
            ConfigWarning::SubConfigDefaulted(field) => {
                write!(
                    f,
                    "`{field}` missing for its init_lora_weights; default used"
                )
            }
            ConfigWarning::SubConfigUnused(field) => {
                write!(f, "`{field}` is ignored for this init_lora_weights")
            }
        }
    }
}

/// Order in which set-valued lists (`target_modules`, `exclude_modules`, IA3's
/// `feedforward_modules`) are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SetOrder {
    /// Sorted and de-duplicated: deterministic. peft's own order is Python set iteration order.
    #[default]
    Sorted,
    /// In the order held (as read from the file), duplicates kept.
    AsHeld,
}

/// Options of the config writer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// Order of set-valued lists.
    pub set_order: SetOrder,
}

/// `target_modules` / `exclude_modules`: a list of names (set semantics: `name == t` or
/// `name.endswith("." + t)`) or one Python regex that must match the whole module name.
/// `"all-linear"` (any case) is a string here; see [`TargetModules::is_all_linear`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Module names or name suffixes.
    Names(Vec<String>),
    /// A regex (`re.fullmatch`) or `"all-linear"`.
    Regex(String),
}

impl TargetModules {
    /// Whether this is peft's `"all-linear"` shorthand (compared case-insensitively, as peft does).
    pub fn is_all_linear(&self) -> bool {
        matches!(self, TargetModules::Regex(s) if s.eq_ignore_ascii_case(crate::targeting::ALL_LINEAR))
    }

    /// The names, for the list form.
    pub fn names(&self) -> Option<&[String]> {
        match self {
            TargetModules::Names(v) => Some(v),
            TargetModules::Regex(_) => None,
        }
    }

    fn to_value(&self, order: SetOrder) -> Value {
        match self {
            TargetModules::Regex(s) => Value::String(s.clone()),
            TargetModules::Names(v) => set_list_value(v, order),
        }
    }
}

fn set_list_value(items: &[String], order: SetOrder) -> Value {
    let mut items = items.to_vec();
    if order == SetOrder::Sorted {
        items.sort();
        items.dedup();
    }
    Value::Array(items.into_iter().map(Value::String).collect())
}

/// A field that is either one string or a list of strings (`layers_pattern`;
/// `target_parameters`, where the string form is invalid but readable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StringOrList {
    /// One string.
    One(String),
    /// A list.
    Many(Vec<String>),
}

impl StringOrList {
    /// Python truthiness: a non-empty string or list.
    pub fn is_truthy(&self) -> bool {
        match self {
            StringOrList::One(s) => !s.is_empty(),
            StringOrList::Many(v) => !v.is_empty(),
        }
    }

    fn to_value(&self) -> Value {
        match self {
            StringOrList::One(s) => Value::String(s.clone()),
            StringOrList::Many(v) => json!(v),
        }
    }
}

/// `layers_to_transform`: one layer index or a list of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayersToTransform {
    /// One index.
    One(i64),
    /// Several indices (an empty list means "all layers").
    Many(Vec<i64>),
}

impl LayersToTransform {
    fn to_value(&self) -> Value {
        match self {
            LayersToTransform::One(i) => json!(i),
            LayersToTransform::Many(v) => json!(v),
        }
    }
}

/// `init_lora_weights`: `true` / `false` or the name of an initialisation (`"gaussian"`,
/// `"pissa"`, `"pissa_niter_4"`, `"olora"`, `"corda"`, `"eva"`, `"loftq"`, `"orthogonal"`,
/// `"mica"`, `"lora_ga"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitLoraWeights {
    /// `true` (Kaiming-uniform A, zero B) or `false` (random B: a non-no-op adapter).
    Bool(bool),
    /// A named initialisation.
    Method(String),
}

impl InitLoraWeights {
    fn is(&self, name: &str) -> bool {
        matches!(self, InitLoraWeights::Method(m) if m == name)
    }

    /// Whether peft accepts this value.
    pub fn is_known(&self) -> bool {
        match self {
            InitLoraWeights::Bool(_) => true,
            InitLoraWeights::Method(m) => {
                let lower = m.to_ascii_lowercase();
                m == "pissa"
                    || m.strip_prefix("pissa_niter_")
                        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                    || m.starts_with("corda")
                    || ["olora", "mica", "gaussian"].contains(&lower.as_str())
                    || ["loftq", "eva", "orthogonal", "lora_ga"].contains(&m.as_str())
            }
        }
    }

    /// Whether this initialisation changes the *base* weights (PiSSA, OLoRA, CorDA, LoRA-GA,
    /// LoftQ): such adapters only apply to the residual base they were trained against.
    pub fn mutates_base_weights(&self) -> bool {
        match self {
            InitLoraWeights::Bool(_) => false,
            InitLoraWeights::Method(m) => {
                m.starts_with("pissa")
                    || m.starts_with("corda")
                    || m.eq_ignore_ascii_case("olora")
                    || m == "lora_ga"
                    || m == "loftq"
            }
        }
    }

    fn to_value(&self) -> Value {
        match self {
            InitLoraWeights::Bool(b) => Value::Bool(*b),
            InitLoraWeights::Method(m) => Value::String(m.clone()),
        }
    }
}

/// `trainable_token_indices`: token rows of the input embedding, or rows per embedding module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrainableTokenIndices {
    /// Rows of the input embedding.
    Indices(Vec<i64>),
    /// Rows per module name, in file order.
    PerModule(IndexMap<String, Vec<i64>>),
}

impl TrainableTokenIndices {
    fn to_value(&self) -> Value {
        match self {
            TrainableTokenIndices::Indices(v) => json!(v),
            TrainableTokenIndices::PerModule(m) => {
                Value::Object(m.iter().map(|(k, v)| (k.clone(), json!(v))).collect())
            }
        }
    }
}

/// The fields that decide which modules get an adapter (spec §4), from any method's config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetRules {
    /// `target_modules`.
    pub target_modules: Option<TargetModules>,
    /// `exclude_modules`.
    pub exclude_modules: Option<TargetModules>,
    /// `modules_to_save` (entries are regex fragments to peft).
    pub modules_to_save: Option<Vec<String>>,
    /// `layers_to_transform`.
    pub layers_to_transform: Option<LayersToTransform>,
    /// `layers_pattern`.
    pub layers_pattern: Option<StringOrList>,
    /// `target_parameters` (LoRA only).
    pub target_parameters: Option<StringOrList>,
}

impl TargetRules {
    /// The targeting fields of a LoRA config.
    pub fn from_lora(config: &LoraConfig) -> Self {
        Self {
            target_modules: config.target_modules.clone(),
            exclude_modules: config.exclude_modules.clone(),
            modules_to_save: config.modules_to_save.clone(),
            layers_to_transform: config.layers_to_transform.clone(),
            layers_pattern: config.layers_pattern.clone(),
            target_parameters: config.target_parameters.clone(),
        }
    }
}

/// A LoRA `adapter_config.json`: every field peft 0.21.2 writes (`PeftConfig` base fields first,
/// then `LoraConfig`'s in declaration order), with peft's defaults ([`LoraConfig::default`]).
///
/// Sub-configs (`eva_config`, `loftq_config`, ...) are kept as JSON. `runtime_config` is never
/// held (peft drops it on load and never writes it).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// `task_type`: null or one of [`TASK_TYPES`] (checked by `validate`).
    pub task_type: Option<String>,
    /// `auto_mapping`: null, or `{"base_model_class", "parent_library"}` when `task_type` is null.
    pub auto_mapping: Option<Value>,
    /// `peft_version` of the writer (peft ≥ 0.18); peft fills its own version when missing.
    pub peft_version: Option<String>,
    /// `base_model_name_or_path`.
    pub base_model_name_or_path: Option<String>,
    /// `revision` of the base model.
    pub revision: Option<String>,
    /// `inference_mode` (`PeftModel.save_pretrained` always writes `true`).
    pub inference_mode: bool,
    /// `r`, the rank (default 8).
    pub r: u64,
    /// `target_modules` (null: peft fills its per-model-type default before matching).
    pub target_modules: Option<TargetModules>,
    /// `exclude_modules`.
    pub exclude_modules: Option<TargetModules>,
    /// `lora_alpha` (default 8), int or float as written.
    pub lora_alpha: Number,
    /// `lora_dropout` (default 0.0), int or float as written.
    pub lora_dropout: Number,
    /// `fan_in_fan_out` (true for GPT-2 `Conv1D` weights stored as (in, out)).
    pub fan_in_fan_out: bool,
    /// `bias`: `"none"`, `"all"` or `"lora_only"`.
    pub bias: String,
    /// `use_rslora`: scaling `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    /// `modules_to_save`: modules saved (and merged) as full copies.
    pub modules_to_save: Option<Vec<String>>,
    /// `init_lora_weights` (default `true`).
    pub init_lora_weights: InitLoraWeights,
    /// `layers_to_transform`.
    pub layers_to_transform: Option<LayersToTransform>,
    /// `layers_pattern`.
    pub layers_pattern: Option<StringOrList>,
    /// `rank_pattern` in file order (first matching key wins; default `{}`).
    pub rank_pattern: Option<IndexMap<String, Number>>,
    /// `alpha_pattern` in file order (first matching key wins; default `{}`).
    pub alpha_pattern: Option<IndexMap<String, Number>>,
    /// `megatron_config`.
    pub megatron_config: Option<Value>,
    /// `megatron_core` (default `"megatron.core"`).
    pub megatron_core: Option<String>,
    /// `trainable_token_indices`.
    pub trainable_token_indices: Option<TrainableTokenIndices>,
    /// `loftq_config` (default `{}`).
    pub loftq_config: Option<Value>,
    /// `eva_config`.
    pub eva_config: Option<Value>,
    /// `corda_config`.
    pub corda_config: Option<Value>,
    /// `lora_ga_config`.
    pub lora_ga_config: Option<Value>,
    /// `use_dora`.
    pub use_dora: bool,
    /// `velora_config`.
    pub velora_config: Option<Value>,
    /// `alora_invocation_tokens`.
    pub alora_invocation_tokens: Option<Vec<i64>>,
    /// `use_qalora`.
    pub use_qalora: bool,
    /// `qalora_group_size` (default 16).
    pub qalora_group_size: i64,
    /// `monteclora_config`.
    pub monteclora_config: Option<Value>,
    /// `layer_replication`: `[start, end)` layer ranges.
    pub layer_replication: Option<Vec<[i64; 2]>>,
    /// `lora_bias`: B has a bias.
    pub lora_bias: bool,
    /// `target_parameters` (a string form is readable but invalid).
    pub target_parameters: Option<StringOrList>,
    /// `use_bdlora` (a BD-LoRA sub-config).
    pub use_bdlora: Option<Value>,
    /// `arrow_config`.
    pub arrow_config: Option<Value>,
    /// `kasa_config`.
    pub kasa_config: Option<Value>,
    /// `ensure_weight_tying`.
    pub ensure_weight_tying: bool,
    /// Fields this peft version does not have, in file order; written back unchanged.
    pub extra: Map<String, Value>,
}

impl Default for LoraConfig {
    /// `LoraConfig()` of peft 0.21.2.
    fn default() -> Self {
        Self {
            task_type: None,
            auto_mapping: None,
            peft_version: Some(PEFT_VERSION.to_owned()),
            base_model_name_or_path: None,
            revision: None,
            inference_mode: false,
            r: 8,
            target_modules: None,
            exclude_modules: None,
            lora_alpha: Number::from(8),
            lora_dropout: float_number(0.0),
            fan_in_fan_out: false,
            bias: "none".to_owned(),
            use_rslora: false,
            modules_to_save: None,
            init_lora_weights: InitLoraWeights::Bool(true),
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: Some(IndexMap::new()),
            alpha_pattern: Some(IndexMap::new()),
            megatron_config: None,
            megatron_core: Some("megatron.core".to_owned()),
            trainable_token_indices: None,
            loftq_config: Some(Value::Object(Map::new())),
            eva_config: None,
            corda_config: None,
            lora_ga_config: None,
            use_dora: false,
            velora_config: None,
            alora_invocation_tokens: None,
            use_qalora: false,
            qalora_group_size: 16,
            monteclora_config: None,
            layer_replication: None,
            lora_bias: false,
            target_parameters: None,
            use_bdlora: None,
            arrow_config: None,
            kasa_config: None,
            ensure_weight_tying: false,
            extra: Map::new(),
        }
    }
}

fn float_number(f: f64) -> Number {
    // Only called with finite literals.
    Number::from_f64(f).unwrap_or_else(|| Number::from(0))
}

/// The names of the fields peft 0.21.2 writes for LoRA, in `dataclasses.fields` order.
pub const LORA_FIELDS: [&str; 41] = [
    "task_type",
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "r",
    "target_modules",
    "exclude_modules",
    "lora_alpha",
    "lora_dropout",
    "fan_in_fan_out",
    "bias",
    "use_rslora",
    "modules_to_save",
    "init_lora_weights",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "megatron_config",
    "megatron_core",
    "trainable_token_indices",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "use_dora",
    "velora_config",
    "alora_invocation_tokens",
    "use_qalora",
    "qalora_group_size",
    "monteclora_config",
    "layer_replication",
    "lora_bias",
    "target_parameters",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
    "ensure_weight_tying",
];

// ---------------------------------------------------------------------------------------------
// Typed field readers. Each takes the value out of the map (so what remains is unknown fields)
// and reports the field name on a type error.

fn describe(v: &Value) -> String {
    let kind = match v {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(n) if n.is_f64() => "a float",
        Value::Number(_) => "an int",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    };
    let mut text = v.to_string();
    if text.chars().count() > 60 {
        text = text.chars().take(57).collect::<String>() + "...";
    }
    format!("{kind} ({text})")
}

fn wrong(field: &str, expected: &'static str, v: &Value) -> ConfigError {
    ConfigError::WrongType {
        field: field.to_owned(),
        expected,
        found: describe(v),
    }
}

fn as_bool(field: &str, v: &Value) -> Result<bool, ConfigError> {
    v.as_bool().ok_or_else(|| wrong(field, "true or false", v))
}

fn as_opt_string(field: &str, v: &Value) -> Result<Option<String>, ConfigError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        other => Err(wrong(field, "a string or null", other)),
    }
}

fn as_number(field: &str, v: &Value) -> Result<Number, ConfigError> {
    match v {
        Value::Number(n) => Ok(n.clone()),
        other => Err(wrong(field, "a number", other)),
    }
}

fn as_int(field: &str, v: &Value) -> Result<i64, ConfigError> {
    v.as_i64().ok_or_else(|| wrong(field, "an integer", v))
}

fn as_int_list(field: &str, v: &Value) -> Result<Vec<i64>, ConfigError> {
    let items = v
        .as_array()
        .ok_or_else(|| wrong(field, "a list of integers", v))?;
    items
        .iter()
        .enumerate()
        .map(|(i, item)| as_int(&format!("{field}[{i}]"), item))
        .collect()
}

fn as_string_list(field: &str, v: &Value) -> Result<Vec<String>, ConfigError> {
    let items = v
        .as_array()
        .ok_or_else(|| wrong(field, "a list of strings", v))?;
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            item.as_str()
                .map(str::to_owned)
                .ok_or_else(|| wrong(&format!("{field}[{i}]"), "a string", item))
        })
        .collect()
}

fn as_opt_string_list(field: &str, v: &Value) -> Result<Option<Vec<String>>, ConfigError> {
    match v {
        Value::Null => Ok(None),
        other => as_string_list(field, other).map(Some),
    }
}

fn as_opt_object(field: &str, v: &Value) -> Result<Option<Value>, ConfigError> {
    match v {
        Value::Null => Ok(None),
        Value::Object(_) => Ok(Some(v.clone())),
        other => Err(wrong(field, "an object or null", other)),
    }
}

fn as_opt_target_modules(field: &str, v: &Value) -> Result<Option<TargetModules>, ConfigError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(TargetModules::Regex(s.clone()))),
        Value::Array(_) => as_string_list(field, v).map(|l| Some(TargetModules::Names(l))),
        other => Err(wrong(field, "a list of strings, a string or null", other)),
    }
}

fn as_opt_string_or_list(field: &str, v: &Value) -> Result<Option<StringOrList>, ConfigError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(StringOrList::One(s.clone()))),
        Value::Array(_) => as_string_list(field, v).map(|l| Some(StringOrList::Many(l))),
        other => Err(wrong(field, "a string, a list of strings or null", other)),
    }
}

fn as_opt_layers(field: &str, v: &Value) -> Result<Option<LayersToTransform>, ConfigError> {
    match v {
        Value::Null => Ok(None),
        Value::Array(_) => as_int_list(field, v).map(|l| Some(LayersToTransform::Many(l))),
        Value::Number(_) => as_int(field, v).map(|i| Some(LayersToTransform::One(i))),
        other => Err(wrong(
            field,
            "an integer, a list of integers or null",
            other,
        )),
    }
}

fn as_opt_pattern_map(
    field: &str,
    v: &Value,
) -> Result<Option<IndexMap<String, Number>>, ConfigError> {
    match v {
        Value::Null => Ok(None),
        Value::Object(map) => map
            .iter()
            .map(|(k, val)| Ok((k.clone(), as_number(&format!("{field}[{k:?}]"), val)?)))
            .collect::<Result<IndexMap<_, _>, _>>()
            .map(Some),
        other => Err(wrong(field, "an object of numbers or null", other)),
    }
}

fn as_init(field: &str, v: &Value) -> Result<InitLoraWeights, ConfigError> {
    match v {
        Value::Bool(b) => Ok(InitLoraWeights::Bool(*b)),
        Value::String(s) => Ok(InitLoraWeights::Method(s.clone())),
        other => Err(wrong(field, "true, false or an initialisation name", other)),
    }
}

fn as_opt_token_indices(
    field: &str,
    v: &Value,
) -> Result<Option<TrainableTokenIndices>, ConfigError> {
    match v {
        Value::Null => Ok(None),
        Value::Array(_) => as_int_list(field, v).map(|l| Some(TrainableTokenIndices::Indices(l))),
        Value::Object(map) => map
            .iter()
            .map(|(k, val)| Ok((k.clone(), as_int_list(&format!("{field}[{k:?}]"), val)?)))
            .collect::<Result<IndexMap<_, _>, _>>()
            .map(|m| Some(TrainableTokenIndices::PerModule(m))),
        other => Err(wrong(
            field,
            "a list of integers, an object of lists or null",
            other,
        )),
    }
}

fn as_opt_replication(field: &str, v: &Value) -> Result<Option<Vec<[i64; 2]>>, ConfigError> {
    match v {
        Value::Null => Ok(None),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let f = format!("{field}[{i}]");
                let pair = as_int_list(&f, item)?;
                match pair.as_slice() {
                    [a, b] => Ok([*a, *b]),
                    _ => Err(wrong(&f, "a [start, end] pair", item)),
                }
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        other => Err(wrong(field, "a list of [start, end] pairs or null", other)),
    }
}

/// Takes fields out of a config map one by one.
struct FieldReader {
    map: Map<String, Value>,
}

impl FieldReader {
    /// The value of `field`, removed from the map; `None` when absent.
    fn take(&mut self, field: &str) -> Option<Value> {
        self.map.shift_remove(field)
    }

    fn read<T>(
        &mut self,
        field: &str,
        default: T,
        parse: impl Fn(&str, &Value) -> Result<T, ConfigError>,
    ) -> Result<T, ConfigError> {
        match self.take(field) {
            None => Ok(default),
            Some(v) => parse(field, &v),
        }
    }
}

fn parse_object(text: &str) -> Result<Map<String, Value>, ConfigError> {
    match serde_json::from_str::<Value>(text)? {
        Value::Object(map) => Ok(map),
        other => Err(ConfigError::NotAnObject(describe(&other))),
    }
}

fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_owned(),
        source,
    })
}

fn peft_type_of(map: &Map<String, Value>) -> Result<String, ConfigError> {
    match map.get("peft_type") {
        None | Some(Value::Null) => Err(ConfigError::MissingPeftType),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(wrong("peft_type", "a string", other)),
    }
}

/// peft's `json.dumps(d, indent=2, sort_keys=True)`, without a trailing newline.
fn write_pyjson(value: &Value) -> String {
    pyjson::to_string(value, &PyJsonStyle::peft_adapter_config())
}

fn opt<T>(v: &Option<T>, f: impl Fn(&T) -> Value) -> Value {
    v.as_ref().map_or(Value::Null, f)
}

fn check_task_type(task_type: Option<&str>) -> Result<(), ConfigError> {
    match task_type {
        Some(t) if !TASK_TYPES.contains(&t) => Err(ConfigError::InvalidTaskType(t.to_owned())),
        _ => Ok(()),
    }
}

/// peft's checks shared by all tuner configs that have layer selection.
fn check_layer_options(rules: &TargetRules) -> Result<(), ConfigError> {
    if matches!(rules.target_modules, Some(TargetModules::Regex(_))) {
        if rules.layers_to_transform.is_some() {
            return Err(ConfigError::LayersWithRegexTargets("layers_to_transform"));
        }
        if rules.layers_pattern.is_some() {
            return Err(ConfigError::LayersWithRegexTargets("layers_pattern"));
        }
    }
    if rules
        .layers_pattern
        .as_ref()
        .is_some_and(StringOrList::is_truthy)
        && rules.layers_to_transform.is_none()
    {
        return Err(ConfigError::LayersPatternWithoutLayersToTransform);
    }
    Ok(())
}

fn is_truthy_object(v: &Option<Value>) -> bool {
    match v {
        Some(Value::Object(m)) => !m.is_empty(),
        Some(Value::Null) | None => false,
        Some(_) => true,
    }
}

impl LoraConfig {
    /// Parses a LoRA config from JSON text (see [`LoraConfig::from_map`]).
    pub fn from_json_str(text: &str) -> Result<(Self, Vec<ConfigWarning>), ConfigError> {
        Self::from_map(parse_object(text)?)
    }

    /// Parses a LoRA config from a JSON object, leniently, as `LoraConfig(**json)` in peft does:
    /// missing fields take their defaults, unknown fields are kept in [`LoraConfig::extra`] and
    /// reported, and peft's load-time adjustments are applied (`runtime_config` dropped,
    /// `peft_version` filled, `loftq_config` reset when unused, EVA/CorDA default sub-configs).
    /// JSON type errors are fatal and name the field; semantic checks are in
    /// [`LoraConfig::validate`].
    pub fn from_map(map: Map<String, Value>) -> Result<(Self, Vec<ConfigWarning>), ConfigError> {
        let found = peft_type_of(&map)?;
        if found != LORA {
            return Err(ConfigError::PeftTypeMismatch {
                expected: LORA.to_owned(),
                found,
            });
        }
        let mut warnings = Vec::new();
        let mut r = FieldReader { map };
        r.take("peft_type");
        if r.take(RUNTIME_CONFIG).is_some() {
            warnings.push(ConfigWarning::RuntimeConfigDropped);
        }
        let d = LoraConfig::default();
        let mut c = LoraConfig {
            task_type: r.read("task_type", d.task_type, as_opt_string)?,
            auto_mapping: r.read("auto_mapping", d.auto_mapping, as_opt_object)?,
            peft_version: r.read("peft_version", None, as_opt_string)?,
            base_model_name_or_path: r.read(
                "base_model_name_or_path",
                d.base_model_name_or_path,
                as_opt_string,
            )?,
            revision: r.read("revision", d.revision, as_opt_string)?,
            inference_mode: r.read("inference_mode", d.inference_mode, as_bool)?,
            r: r.read("r", d.r, |f, v| {
                v.as_u64()
                    .ok_or_else(|| wrong(f, "a non-negative integer", v))
            })?,
            target_modules: r.read("target_modules", d.target_modules, as_opt_target_modules)?,
            exclude_modules: r.read("exclude_modules", d.exclude_modules, as_opt_target_modules)?,
            lora_alpha: r.read("lora_alpha", d.lora_alpha, as_number)?,
            lora_dropout: r.read("lora_dropout", d.lora_dropout, as_number)?,
            fan_in_fan_out: r.read("fan_in_fan_out", d.fan_in_fan_out, as_bool)?,
            bias: r.read("bias", d.bias, |f, v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| wrong(f, "a string", v))
            })?,
            use_rslora: r.read("use_rslora", d.use_rslora, as_bool)?,
            modules_to_save: r.read("modules_to_save", d.modules_to_save, as_opt_string_list)?,
            init_lora_weights: r.read("init_lora_weights", d.init_lora_weights, as_init)?,
            layers_to_transform: r.read(
                "layers_to_transform",
                d.layers_to_transform,
                as_opt_layers,
            )?,
            layers_pattern: r.read("layers_pattern", d.layers_pattern, as_opt_string_or_list)?,
            rank_pattern: r.read("rank_pattern", d.rank_pattern, as_opt_pattern_map)?,
            alpha_pattern: r.read("alpha_pattern", d.alpha_pattern, as_opt_pattern_map)?,
            megatron_config: r.read("megatron_config", d.megatron_config, as_opt_object)?,
            megatron_core: r.read("megatron_core", d.megatron_core, as_opt_string)?,
            trainable_token_indices: r.read(
                "trainable_token_indices",
                d.trainable_token_indices,
                as_opt_token_indices,
            )?,
            loftq_config: r.read("loftq_config", d.loftq_config, as_opt_object)?,
            eva_config: r.read("eva_config", d.eva_config, as_opt_object)?,
            corda_config: r.read("corda_config", d.corda_config, as_opt_object)?,
            lora_ga_config: r.read("lora_ga_config", d.lora_ga_config, as_opt_object)?,
            use_dora: r.read("use_dora", d.use_dora, as_bool)?,
            velora_config: r.read("velora_config", d.velora_config, as_opt_object)?,
            alora_invocation_tokens: r.read(
                "alora_invocation_tokens",
                d.alora_invocation_tokens,
                |f, v| match v {
                    Value::Null => Ok(None),
                    other => as_int_list(f, other).map(Some),
                },
            )?,
            use_qalora: r.read("use_qalora", d.use_qalora, as_bool)?,
            qalora_group_size: r.read("qalora_group_size", d.qalora_group_size, as_int)?,
            monteclora_config: r.read("monteclora_config", d.monteclora_config, as_opt_object)?,
            layer_replication: r.read(
                "layer_replication",
                d.layer_replication,
                as_opt_replication,
            )?,
            lora_bias: r.read("lora_bias", d.lora_bias, as_bool)?,
            target_parameters: r.read(
                "target_parameters",
                d.target_parameters,
                as_opt_string_or_list,
            )?,
            use_bdlora: r.read("use_bdlora", d.use_bdlora, as_opt_object)?,
            arrow_config: r.read("arrow_config", d.arrow_config, as_opt_object)?,
            kasa_config: r.read("kasa_config", d.kasa_config, as_opt_object)?,
            ensure_weight_tying: r.read("ensure_weight_tying", d.ensure_weight_tying, as_bool)?,
            extra: Map::new(),
        };
        warnings.extend(r.map.keys().map(|k| ConfigWarning::UnknownField(k.clone())));
        c.extra = r.map;
        c.apply_load_adjustments(&mut warnings);
        Ok((c, warnings))
    }

    /// What `LoraConfig.__post_init__` changes on load (besides checks), in peft's order.
    fn apply_load_adjustments(&mut self, warnings: &mut Vec<ConfigWarning>) {
        if self.peft_version.is_none() {
            self.peft_version = Some(PEFT_VERSION.to_owned());
            warnings.push(ConfigWarning::PeftVersionFilled);
        }
        let init = &self.init_lora_weights;
        // One if/elif chain in peft: only the first applicable branch runs.
        if init.is("loftq") {
            // Checked by `validate`.
        } else if is_truthy_object(&self.loftq_config) {
            self.loftq_config = Some(Value::Object(Map::new()));
            warnings.push(ConfigWarning::LoftqConfigReset);
        } else if init.is("eva") && self.eva_config.is_none() {
            self.eva_config = Some(json!({
                "rho": 2.0, "tau": 0.99, "use_label_mask": true, "label_mask_value": -100,
                "whiten": false, "adjust_scaling_factors": true
            }));
            warnings.push(ConfigWarning::SubConfigDefaulted("eva_config"));
        } else if !init.is("eva") && self.eva_config.is_some() {
            warnings.push(ConfigWarning::SubConfigUnused("eva_config"));
        } else if init.is("corda") && self.corda_config.is_none() {
            self.corda_config = Some(json!({
                "cache_file": null, "covariance_file": null, "corda_method": "ipm",
                "verbose": false, "use_float16_for_covariance": false,
                "prune_temporary_fields": true
            }));
            warnings.push(ConfigWarning::SubConfigDefaulted("corda_config"));
        } else if !init.is("corda") && self.corda_config.is_some() {
            warnings.push(ConfigWarning::SubConfigUnused("corda_config"));
        }
    }

    /// peft's `LoraConfig.__post_init__` checks plus what peft would reject later when it builds
    /// the layers: `task_type`, `r > 0`, `bias`, `init_lora_weights`, `lora_dropout` in [0, 1],
    /// pattern values, contradictory options, and every regex compiling.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_task_type(self.task_type.as_deref())?;
        if self.r == 0 {
            return Err(ConfigError::InvalidValue {
                field: "r".into(),
                reason: "must be a positive integer".into(),
            });
        }
        if !LORA_BIAS_VALUES.contains(&self.bias.as_str()) {
            return Err(ConfigError::InvalidValue {
                field: "bias".into(),
                reason: format!(
                    "{:?} is not one of {}",
                    self.bias,
                    LORA_BIAS_VALUES.join(", ")
                ),
            });
        }
        if !self.init_lora_weights.is_known() {
            return Err(ConfigError::InvalidValue {
                field: "init_lora_weights".into(),
                reason: format!("unknown initialisation {:?}", self.init_lora_weights),
            });
        }
        if !self
            .lora_dropout
            .as_f64()
            .is_some_and(|p| (0.0..=1.0).contains(&p))
        {
            return Err(ConfigError::InvalidValue {
                field: "lora_dropout".into(),
                reason: format!("{} is not a probability in [0, 1]", self.lora_dropout),
            });
        }
        if !self.lora_alpha.as_f64().is_some_and(f64::is_finite) {
            return Err(ConfigError::InvalidValue {
                field: "lora_alpha".into(),
                reason: format!("{} is not a finite number", self.lora_alpha),
            });
        }
        if let Some(StringOrList::One(s)) = &self.target_parameters {
            return Err(ConfigError::StringTargetParameters(s.clone()));
        }
        let rules = TargetRules::from_lora(self);
        check_layer_options(&rules)?;
        if self.use_dora && is_truthy_object(&self.megatron_config) {
            return Err(ConfigError::DoraWithMegatron);
        }
        if self.init_lora_weights.is("loftq") && !is_truthy_object(&self.loftq_config) {
            return Err(ConfigError::LoftqWithoutConfig);
        }
        if self.lora_bias {
            if let InitLoraWeights::Method(m) = &self.init_lora_weights {
                return Err(ConfigError::LoraBiasWithInit(m.clone()));
            }
            if self.use_dora {
                return Err(ConfigError::LoraBiasWithDora);
            }
        }
        for (k, v) in self.rank_pattern.iter().flatten() {
            if v.as_u64().is_none_or(|r| r == 0) {
                return Err(ConfigError::InvalidValue {
                    field: format!("rank_pattern[{k:?}]"),
                    reason: format!("{v} is not a positive integer"),
                });
            }
        }
        for (k, v) in self.alpha_pattern.iter().flatten() {
            if !v.as_f64().is_some_and(f64::is_finite) {
                return Err(ConfigError::InvalidValue {
                    field: format!("alpha_pattern[{k:?}]"),
                    reason: format!("{v} is not a finite number"),
                });
            }
        }
        // Compiling is the regex check.
        TargetMatcher::new(&rules)?;
        PatternResolver::new(self)?;
        Ok(())
    }

    /// The config as the JSON object peft writes: all 41 fields plus the unknown ones kept from
    /// the file.
    pub fn to_value(&self, options: &WriteOptions) -> Value {
        let order = options.set_order;
        let pattern = |p: &IndexMap<String, Number>| -> Value {
            Value::Object(
                p.iter()
                    .map(|(k, v)| (k.clone(), Value::Number(v.clone())))
                    .collect(),
            )
        };
        let string = |s: &String| Value::String(s.clone());
        let mut m = Map::new();
        m.insert("task_type".into(), opt(&self.task_type, string));
        m.insert("peft_type".into(), Value::String(LORA.into()));
        m.insert("auto_mapping".into(), opt(&self.auto_mapping, Clone::clone));
        m.insert("peft_version".into(), opt(&self.peft_version, string));
        m.insert(
            "base_model_name_or_path".into(),
            opt(&self.base_model_name_or_path, string),
        );
        m.insert("revision".into(), opt(&self.revision, string));
        m.insert("inference_mode".into(), self.inference_mode.into());
        m.insert("r".into(), self.r.into());
        m.insert(
            "target_modules".into(),
            opt(&self.target_modules, |t| t.to_value(order)),
        );
        m.insert(
            "exclude_modules".into(),
            opt(&self.exclude_modules, |t| t.to_value(order)),
        );
        m.insert("lora_alpha".into(), Value::Number(self.lora_alpha.clone()));
        m.insert(
            "lora_dropout".into(),
            Value::Number(self.lora_dropout.clone()),
        );
        m.insert("fan_in_fan_out".into(), self.fan_in_fan_out.into());
        m.insert("bias".into(), string(&self.bias));
        m.insert("use_rslora".into(), self.use_rslora.into());
        m.insert(
            "modules_to_save".into(),
            opt(&self.modules_to_save, |v| json!(v)),
        );
        m.insert(
            "init_lora_weights".into(),
            self.init_lora_weights.to_value(),
        );
        m.insert(
            "layers_to_transform".into(),
            opt(&self.layers_to_transform, LayersToTransform::to_value),
        );
        m.insert(
            "layers_pattern".into(),
            opt(&self.layers_pattern, StringOrList::to_value),
        );
        m.insert("rank_pattern".into(), opt(&self.rank_pattern, pattern));
        m.insert("alpha_pattern".into(), opt(&self.alpha_pattern, pattern));
        m.insert(
            "megatron_config".into(),
            opt(&self.megatron_config, Clone::clone),
        );
        m.insert("megatron_core".into(), opt(&self.megatron_core, string));
        m.insert(
            "trainable_token_indices".into(),
            opt(
                &self.trainable_token_indices,
                TrainableTokenIndices::to_value,
            ),
        );
        m.insert("loftq_config".into(), opt(&self.loftq_config, Clone::clone));
        m.insert("eva_config".into(), opt(&self.eva_config, Clone::clone));
        m.insert("corda_config".into(), opt(&self.corda_config, Clone::clone));
        m.insert(
            "lora_ga_config".into(),
            opt(&self.lora_ga_config, Clone::clone),
        );
        m.insert("use_dora".into(), self.use_dora.into());
        m.insert(
            "velora_config".into(),
            opt(&self.velora_config, Clone::clone),
        );
        m.insert(
            "alora_invocation_tokens".into(),
            opt(&self.alora_invocation_tokens, |v| json!(v)),
        );
        m.insert("use_qalora".into(), self.use_qalora.into());
        m.insert("qalora_group_size".into(), self.qalora_group_size.into());
        m.insert(
            "monteclora_config".into(),
            opt(&self.monteclora_config, Clone::clone),
        );
        m.insert(
            "layer_replication".into(),
            opt(&self.layer_replication, |v| json!(v)),
        );
        m.insert("lora_bias".into(), self.lora_bias.into());
        m.insert(
            "target_parameters".into(),
            opt(&self.target_parameters, StringOrList::to_value),
        );
        m.insert("use_bdlora".into(), opt(&self.use_bdlora, Clone::clone));
        m.insert("arrow_config".into(), opt(&self.arrow_config, Clone::clone));
        m.insert("kasa_config".into(), opt(&self.kasa_config, Clone::clone));
        m.insert(
            "ensure_weight_tying".into(),
            self.ensure_weight_tying.into(),
        );
        for (k, v) in &self.extra {
            m.insert(k.clone(), v.clone());
        }
        Value::Object(m)
    }

    /// The file text peft 0.21.2 would write for this config (set-valued lists sorted).
    pub fn to_json_string(&self) -> String {
        write_pyjson(&self.to_value(&WriteOptions::default()))
    }

    /// The features in use that a plain LoRA/DoRA merge does not cover (spec §2.2, §8): LoRA
    /// variants with extra tensors or different math (`use_bdlora`, `kasa_config`,
    /// `arrow_config`, `monteclora_config`, `alora_invocation_tokens`, `use_qalora`),
    /// `layer_replication`, and initialisations that change the base weights
    /// (`init_lora_weights`). VeLoRA and MiCA merge like plain LoRA and are not listed.
    pub fn unsupported_merge_features(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        let flags: [(&'static str, bool); 7] = [
            ("use_bdlora", self.use_bdlora.is_some()),
            ("kasa_config", self.kasa_config.is_some()),
            ("arrow_config", self.arrow_config.is_some()),
            ("monteclora_config", self.monteclora_config.is_some()),
            (
                "alora_invocation_tokens",
                self.alora_invocation_tokens.is_some(),
            ),
            ("use_qalora", self.use_qalora),
            ("layer_replication", self.layer_replication.is_some()),
        ];
        out.extend(flags.iter().filter(|(_, on)| *on).map(|(name, _)| *name));
        if self.init_lora_weights.mutates_base_weights() {
            out.push("init_lora_weights");
        }
        out
    }
}

/// The config of any method other than LoRA: its `peft_type` and all other fields in file order.
/// Written back as held (set-valued lists sorted unless [`SetOrder::AsHeld`]).
#[derive(Debug, Clone, PartialEq)]
pub struct GenericConfig {
    /// `peft_type`.
    pub peft_type: String,
    /// Every other field, in file order.
    pub fields: Map<String, Value>,
    /// Fields peft stores as sets for this method (from the adapters spec).
    pub set_fields: Vec<String>,
}

impl GenericConfig {
    /// The config as a JSON object.
    pub fn to_value(&self, options: &WriteOptions) -> Value {
        let mut m = self.fields.clone();
        m.insert("peft_type".into(), Value::String(self.peft_type.clone()));
        if options.set_order == SetOrder::Sorted {
            for field in &self.set_fields {
                if let Some(Value::Array(items)) = m.get(field) {
                    // Only all-string lists are sets of module names; leave anything else alone.
                    let names: Option<Vec<String>> = items
                        .iter()
                        .map(|v| v.as_str().map(str::to_owned))
                        .collect();
                    if let Some(names) = names {
                        m.insert(field.clone(), set_list_value(&names, SetOrder::Sorted));
                    }
                }
            }
        }
        Value::Object(m)
    }

    fn target_rules(&self) -> Result<TargetRules, ConfigError> {
        let get = |f: &str| self.fields.get(f).unwrap_or(&Value::Null);
        Ok(TargetRules {
            target_modules: as_opt_target_modules("target_modules", get("target_modules"))?,
            exclude_modules: as_opt_target_modules("exclude_modules", get("exclude_modules"))?,
            modules_to_save: as_opt_string_list("modules_to_save", get("modules_to_save"))?,
            layers_to_transform: as_opt_layers("layers_to_transform", get("layers_to_transform"))?,
            layers_pattern: as_opt_string_or_list("layers_pattern", get("layers_pattern"))?,
            target_parameters: as_opt_string_or_list(
                "target_parameters",
                get("target_parameters"),
            )?,
        })
    }
}

/// An `adapter_config.json` of any PEFT method.
#[derive(Debug, Clone, PartialEq)]
pub enum AdapterConfig {
    /// `peft_type: "LORA"`, typed.
    Lora(Box<LoraConfig>),
    /// Any other known `peft_type`, as an ordered map.
    Other(GenericConfig),
}

impl AdapterConfig {
    /// Parses config text with the embedded adapters spec (which lists the known `peft_type`s).
    pub fn from_json_str(text: &str) -> Result<(Self, Vec<ConfigWarning>), ConfigError> {
        Self::from_json_str_with_spec(text, Spec::embedded())
    }

    /// Parses config text; `spec` decides which `peft_type`s are known.
    pub fn from_json_str_with_spec(
        text: &str,
        spec: &Spec,
    ) -> Result<(Self, Vec<ConfigWarning>), ConfigError> {
        Self::from_map(parse_object(text)?, spec)
    }

    /// Reads `path` (an `adapter_config.json`).
    pub fn from_file(path: &Path) -> Result<(Self, Vec<ConfigWarning>), ConfigError> {
        Self::from_json_str(&read_file(path)?)
    }

    /// Reads `<dir>/adapter_config.json`.
    pub fn from_dir(dir: &Path) -> Result<(Self, Vec<ConfigWarning>), ConfigError> {
        Self::from_file(&dir.join(CONFIG_NAME))
    }

    /// Parses a config object. `peft_type` is required and must be known to `spec`
    /// (peft: `KeyError` otherwise).
    pub fn from_map(
        map: Map<String, Value>,
        spec: &Spec,
    ) -> Result<(Self, Vec<ConfigWarning>), ConfigError> {
        let peft_type = peft_type_of(&map)?;
        let Some(method) = spec.method(&peft_type) else {
            return Err(ConfigError::UnknownPeftType(peft_type));
        };
        if peft_type == LORA {
            let (c, w) = LoraConfig::from_map(map)?;
            return Ok((AdapterConfig::Lora(Box::new(c)), w));
        }
        let mut warnings = Vec::new();
        let mut fields = map;
        fields.shift_remove("peft_type");
        if fields.shift_remove(RUNTIME_CONFIG).is_some() {
            warnings.push(ConfigWarning::RuntimeConfigDropped);
        }
        Ok((
            AdapterConfig::Other(GenericConfig {
                peft_type,
                fields,
                set_fields: method.set_fields.clone(),
            }),
            warnings,
        ))
    }

    /// The `peft_type`.
    pub fn peft_type(&self) -> &str {
        match self {
            AdapterConfig::Lora(_) => LORA,
            AdapterConfig::Other(g) => &g.peft_type,
        }
    }

    /// The LoRA config, if this is one.
    pub fn as_lora(&self) -> Option<&LoraConfig> {
        match self {
            AdapterConfig::Lora(c) => Some(c),
            AdapterConfig::Other(_) => None,
        }
    }

    /// The LoRA config, mutably, if this is one.
    pub fn as_lora_mut(&mut self) -> Option<&mut LoraConfig> {
        match self {
            AdapterConfig::Lora(c) => Some(c),
            AdapterConfig::Other(_) => None,
        }
    }

    /// `task_type` (`None` for null or a non-string value).
    pub fn task_type(&self) -> Option<&str> {
        match self {
            AdapterConfig::Lora(c) => c.task_type.as_deref(),
            AdapterConfig::Other(g) => g.fields.get("task_type").and_then(Value::as_str),
        }
    }

    /// `base_model_name_or_path`.
    pub fn base_model_name_or_path(&self) -> Option<&str> {
        match self {
            AdapterConfig::Lora(c) => c.base_model_name_or_path.as_deref(),
            AdapterConfig::Other(g) => g
                .fields
                .get("base_model_name_or_path")
                .and_then(Value::as_str),
        }
    }

    /// Sets `base_model_name_or_path` (what `save_pretrained` fills in when it is null).
    pub fn set_base_model_name_or_path(&mut self, name: Option<String>) {
        match self {
            AdapterConfig::Lora(c) => c.base_model_name_or_path = name,
            AdapterConfig::Other(g) => {
                g.fields.insert(
                    "base_model_name_or_path".into(),
                    name.map_or(Value::Null, Value::String),
                );
            }
        }
    }

    /// Sets `inference_mode` (`PeftModel.save_pretrained` writes `true`).
    pub fn set_inference_mode(&mut self, on: bool) {
        match self {
            AdapterConfig::Lora(c) => c.inference_mode = on,
            AdapterConfig::Other(g) => {
                g.fields.insert("inference_mode".into(), Value::Bool(on));
            }
        }
    }

    /// The fields that decide which modules are targeted.
    pub fn target_rules(&self) -> Result<TargetRules, ConfigError> {
        match self {
            AdapterConfig::Lora(c) => Ok(TargetRules::from_lora(c)),
            AdapterConfig::Other(g) => g.target_rules(),
        }
    }

    /// peft's load-time checks (see [`LoraConfig::validate`]); for other methods: `task_type`,
    /// the JSON types of the targeting fields, the layer options and their regexes.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self {
            AdapterConfig::Lora(c) => c.validate(),
            AdapterConfig::Other(g) => {
                match g.fields.get("task_type") {
                    None | Some(Value::Null) => {}
                    Some(Value::String(t)) => check_task_type(Some(t))?,
                    Some(other) => return Err(wrong("task_type", "a string or null", other)),
                }
                let rules = g.target_rules()?;
                check_layer_options(&rules)?;
                TargetMatcher::new(&rules)?;
                Ok(())
            }
        }
    }

    /// The config as the JSON object peft writes.
    pub fn to_value(&self, options: &WriteOptions) -> Value {
        match self {
            AdapterConfig::Lora(c) => c.to_value(options),
            AdapterConfig::Other(g) => g.to_value(options),
        }
    }

    /// The file text, as peft 0.21.2 writes it (`json.dumps(indent=2, sort_keys=True)`, no
    /// trailing newline), with set-valued lists sorted.
    pub fn to_json_string(&self) -> String {
        self.to_json_string_with(&WriteOptions::default())
    }

    /// The file text with explicit [`WriteOptions`].
    pub fn to_json_string_with(&self, options: &WriteOptions) -> String {
        write_pyjson(&self.to_value(options))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lora(text: &str) -> (LoraConfig, Vec<ConfigWarning>) {
        LoraConfig::from_json_str(text).expect("parses")
    }

    #[test]
    fn defaults_match_peft() {
        let (c, w) = lora(r#"{"peft_type": "LORA"}"#);
        assert_eq!(w, vec![ConfigWarning::PeftVersionFilled]);
        assert_eq!(c, LoraConfig::default());
        let v = c.to_value(&WriteOptions::default());
        let obj = v.as_object().expect("object");
        assert_eq!(obj.len(), LORA_FIELDS.len());
        for f in LORA_FIELDS {
            assert!(obj.contains_key(f), "{f}");
        }
        assert_eq!(v["lora_dropout"].to_string(), "0.0");
        assert_eq!(v["lora_alpha"].to_string(), "8");
        assert_eq!(v["rank_pattern"], json!({}));
        assert_eq!(v["loftq_config"], json!({}));
        assert_eq!(v["qalora_group_size"], 16);
    }

    /// Spec §3.3: the file peft 0.21.2 writes for
    /// `LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=[q,k,v,o],
    /// task_type="CAUSAL_LM")` on `meta-llama/Llama-3.2-1B` (1130 bytes, no trailing newline).
    const SPEC_EXAMPLE: &str = r#"{
  "alora_invocation_tokens": null,
  "alpha_pattern": {},
  "arrow_config": null,
  "auto_mapping": null,
  "base_model_name_or_path": "meta-llama/Llama-3.2-1B",
  "bias": "none",
  "corda_config": null,
  "ensure_weight_tying": false,
  "eva_config": null,
  "exclude_modules": null,
  "fan_in_fan_out": false,
  "inference_mode": true,
  "init_lora_weights": true,
  "kasa_config": null,
  "layer_replication": null,
  "layers_pattern": null,
  "layers_to_transform": null,
  "loftq_config": {},
  "lora_alpha": 32,
  "lora_bias": false,
  "lora_dropout": 0.05,
  "lora_ga_config": null,
  "megatron_config": null,
  "megatron_core": "megatron.core",
  "modules_to_save": null,
  "monteclora_config": null,
  "peft_type": "LORA",
  "peft_version": "0.21.2",
  "qalora_group_size": 16,
  "r": 16,
  "rank_pattern": {},
  "revision": null,
  "target_modules": [
    "v_proj",
    "o_proj",
    "k_proj",
    "q_proj"
  ],
  "target_parameters": null,
  "task_type": "CAUSAL_LM",
  "trainable_token_indices": null,
  "use_bdlora": null,
  "use_dora": false,
  "use_qalora": false,
  "use_rslora": false,
  "velora_config": null
}"#;

    #[test]
    fn spec_example_is_reproduced_byte_for_byte() {
        assert_eq!(SPEC_EXAMPLE.len(), 1130);
        let config = LoraConfig {
            r: 16,
            lora_alpha: Number::from(32),
            lora_dropout: float_number(0.05),
            target_modules: Some(TargetModules::Names(
                ["v_proj", "o_proj", "k_proj", "q_proj"]
                    .map(String::from)
                    .to_vec(),
            )),
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: Some("meta-llama/Llama-3.2-1B".into()),
            inference_mode: true,
            ..LoraConfig::default()
        };
        let as_held = WriteOptions {
            set_order: SetOrder::AsHeld,
        };
        let written = AdapterConfig::Lora(Box::new(config.clone())).to_json_string_with(&as_held);
        assert_eq!(written, SPEC_EXAMPLE);
        // The default writer sorts the set-valued list.
        let sorted = config.to_json_string();
        assert!(sorted.contains("\"k_proj\",\n    \"o_proj\",\n    \"q_proj\",\n    \"v_proj\"\n"));
        let (parsed, warnings) = LoraConfig::from_json_str(SPEC_EXAMPLE).expect("parses");
        assert!(warnings.is_empty());
        assert_eq!(parsed, config);
    }

    #[test]
    fn int_and_float_are_kept() {
        let (c, _) = lora(
            r#"{"peft_type":"LORA","lora_alpha":16.0,"lora_dropout":0,"alpha_pattern":{"q":2}}"#,
        );
        let v = c.to_value(&WriteOptions::default());
        assert_eq!(v["lora_alpha"].to_string(), "16.0");
        assert_eq!(v["lora_dropout"].to_string(), "0");
        assert_eq!(v["alpha_pattern"]["q"].to_string(), "2");
    }

    #[test]
    fn unknown_fields_and_runtime_config() {
        let (c, w) = lora(
            r#"{"peft_type":"LORA","peft_version":"0.99.0","new_thing":{"a":1},"runtime_config":{}}"#,
        );
        assert_eq!(
            w,
            vec![
                ConfigWarning::RuntimeConfigDropped,
                ConfigWarning::UnknownField("new_thing".into())
            ]
        );
        let v = c.to_value(&WriteOptions::default());
        assert_eq!(v["new_thing"], json!({"a": 1}));
        assert!(v.get("runtime_config").is_none());
        assert_eq!(v["peft_version"], "0.99.0");
    }

    #[test]
    fn wrong_types_name_the_field() {
        let err = LoraConfig::from_json_str(r#"{"peft_type":"LORA","r":"8"}"#).unwrap_err();
        assert!(
            matches!(&err, ConfigError::WrongType { field, .. } if field == "r"),
            "{err}"
        );
        let err = LoraConfig::from_json_str(r#"{"peft_type":"LORA","rank_pattern":{"q":"x"}}"#)
            .unwrap_err();
        assert!(err.to_string().contains(r#"rank_pattern["q"]"#), "{err}");
        let err = LoraConfig::from_json_str(r#"{"peft_type":"LORA","target_modules":["a",1]}"#)
            .unwrap_err();
        assert!(err.to_string().contains("target_modules[1]"), "{err}");
        let err = LoraConfig::from_json_str(r#"{"peft_type":"LORA","use_dora":null}"#).unwrap_err();
        assert!(err.to_string().contains("use_dora"), "{err}");
    }

    #[test]
    fn peft_type_errors() {
        assert!(matches!(
            AdapterConfig::from_json_str(r#"{"r": 8}"#),
            Err(ConfigError::MissingPeftType)
        ));
        assert!(matches!(
            AdapterConfig::from_json_str(r#"{"peft_type": "NOPE"}"#),
            Err(ConfigError::UnknownPeftType(t)) if t == "NOPE"
        ));
        assert!(matches!(
            AdapterConfig::from_json_str(r#"[]"#),
            Err(ConfigError::NotAnObject(_))
        ));
        assert!(matches!(
            LoraConfig::from_json_str(r#"{"peft_type": "IA3"}"#),
            Err(ConfigError::PeftTypeMismatch { .. })
        ));
    }

    fn invalid(text: &str) -> ConfigError {
        let (c, _) = AdapterConfig::from_json_str(text).expect("parses");
        c.validate().expect_err("must be rejected")
    }

    #[test]
    fn validation_mirrors_post_init() {
        assert!(matches!(
            invalid(r#"{"peft_type":"LORA","task_type":"CAUSAL"}"#),
            ConfigError::InvalidTaskType(_)
        ));
        assert!(matches!(
            invalid(r#"{"peft_type":"LORA","target_modules":"q","layers_to_transform":[0]}"#),
            ConfigError::LayersWithRegexTargets("layers_to_transform")
        ));
        assert!(matches!(
            invalid(r#"{"peft_type":"LORA","target_modules":"q","layers_pattern":"layers"}"#),
            ConfigError::LayersWithRegexTargets("layers_pattern")
        ));
        assert!(matches!(
            invalid(r#"{"peft_type":"LORA","target_modules":["q"],"layers_pattern":"layers"}"#),
            ConfigError::LayersPatternWithoutLayersToTransform
        ));
        assert!(matches!(
            invalid(r#"{"peft_type":"LORA","lora_bias":true,"use_dora":true}"#),
            ConfigError::LoraBiasWithDora
        ));
        assert!(matches!(
            invalid(r#"{"peft_type":"LORA","lora_bias":true,"init_lora_weights":"gaussian"}"#),
            ConfigError::LoraBiasWithInit(_)
        ));
        assert!(matches!(
            invalid(r#"{"peft_type":"LORA","target_parameters":"experts.w1"}"#),
            ConfigError::StringTargetParameters(_)
        ));
        assert!(matches!(
            invalid(r#"{"peft_type":"LORA","use_dora":true,"megatron_config":{"a":1}}"#),
            ConfigError::DoraWithMegatron
        ));
        assert!(matches!(
            invalid(r#"{"peft_type":"LORA","init_lora_weights":"loftq"}"#),
            ConfigError::LoftqWithoutConfig
        ));
        assert!(matches!(
            invalid(r#"{"peft_type":"LORA","r":0}"#),
            ConfigError::InvalidValue { field, .. } if field == "r"
        ));
        assert!(matches!(
            invalid(r#"{"peft_type":"LORA","bias":"some"}"#),
            ConfigError::InvalidValue { field, .. } if field == "bias"
        ));
        assert!(matches!(
            invalid(r#"{"peft_type":"LORA","init_lora_weights":"pissa_niter_x"}"#),
            ConfigError::InvalidValue { field, .. } if field == "init_lora_weights"
        ));
        assert!(matches!(
            invalid(r#"{"peft_type":"LORA","rank_pattern":{"q":2.5}}"#),
            ConfigError::InvalidValue { field, .. } if field.starts_with("rank_pattern")
        ));
        assert!(matches!(
            invalid(r#"{"peft_type":"LORA","target_modules":"(q"}"#),
            ConfigError::Regex { field, .. } if field == "target_modules"
        ));
        assert!(matches!(
            invalid(r#"{"peft_type":"LORA","target_modules":["q"],"rank_pattern":{"(q":4}}"#),
            ConfigError::Regex { field, .. } if field == "rank_pattern"
        ));
        assert!(matches!(
            invalid(r#"{"peft_type":"IA3","task_type":"X"}"#),
            ConfigError::InvalidTaskType(_)
        ));
        // Valid, including the empty layers_pattern peft treats as "unset".
        for ok in [
            r#"{"peft_type":"LORA","task_type":"CAUSAL_LM","target_modules":["q"]}"#,
            r#"{"peft_type":"LORA","target_modules":["q"],"layers_pattern":[]}"#,
            r#"{"peft_type":"LORA","init_lora_weights":"pissa_niter_16"}"#,
            r#"{"peft_type":"LORA","init_lora_weights":"loftq","loftq_config":{"loftq_bits":4}}"#,
            r#"{"peft_type":"PROMPT_TUNING","task_type":"CAUSAL_LM","num_virtual_tokens":4}"#,
        ] {
            let (c, _) = AdapterConfig::from_json_str(ok).expect("parses");
            c.validate().unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn load_adjustments_follow_peft() {
        let (c, w) = lora(r#"{"peft_type":"LORA","loftq_config":{"loftq_bits":4}}"#);
        assert!(w.contains(&ConfigWarning::LoftqConfigReset));
        assert_eq!(c.loftq_config, Some(json!({})));
        let (c, w) = lora(r#"{"peft_type":"LORA","init_lora_weights":"eva"}"#);
        assert!(w.contains(&ConfigWarning::SubConfigDefaulted("eva_config")));
        assert_eq!(
            c.eva_config.as_ref().map(|v| v["rho"].clone()),
            Some(json!(2.0))
        );
        let (c, w) = lora(r#"{"peft_type":"LORA","init_lora_weights":"corda"}"#);
        assert!(w.contains(&ConfigWarning::SubConfigDefaulted("corda_config")));
        assert_eq!(
            c.corda_config.as_ref().map(|v| v["corda_method"].clone()),
            Some(json!("ipm"))
        );
    }

    #[test]
    fn set_fields_sorted_or_as_held() {
        let (c, _) = AdapterConfig::from_json_str(
            r#"{"peft_type":"LORA","target_modules":["v","q","v"],"exclude_modules":["b","a"]}"#,
        )
        .expect("parses");
        let sorted = c.to_value(&WriteOptions::default());
        assert_eq!(sorted["target_modules"], json!(["q", "v"]));
        assert_eq!(sorted["exclude_modules"], json!(["a", "b"]));
        let held = c.to_value(&WriteOptions {
            set_order: SetOrder::AsHeld,
        });
        assert_eq!(held["target_modules"], json!(["v", "q", "v"]));
        let (ia3, _) = AdapterConfig::from_json_str(
            r#"{"peft_type":"IA3","target_modules":["v","k"],"feedforward_modules":["v"],"modules_to_save":["z","a"]}"#,
        )
        .expect("parses");
        let v = ia3.to_value(&WriteOptions::default());
        assert_eq!(v["target_modules"], json!(["k", "v"]));
        // modules_to_save is a list in peft: order kept.
        assert_eq!(v["modules_to_save"], json!(["z", "a"]));
    }

    #[test]
    fn generic_configs_keep_everything() {
        let text = r#"{"auto_mapping":null,"base_model_name_or_path":"m","inference_mode":true,
            "num_virtual_tokens":4,"peft_type":"PROMPT_TUNING","prompt_tuning_init":"RANDOM",
            "token_dim":64,"tokenizer_kwargs":null,"runtime_config":{}}"#;
        let (c, w) = AdapterConfig::from_json_str(text).expect("parses");
        assert_eq!(w, vec![ConfigWarning::RuntimeConfigDropped]);
        assert_eq!(c.peft_type(), "PROMPT_TUNING");
        assert_eq!(c.base_model_name_or_path(), Some("m"));
        let v = c.to_value(&WriteOptions::default());
        assert_eq!(v["token_dim"], 64);
        assert_eq!(v["peft_type"], "PROMPT_TUNING");
        assert!(v.get("runtime_config").is_none());
    }

    #[test]
    fn target_rules_from_generic() {
        let (c, _) = AdapterConfig::from_json_str(
            r#"{"peft_type":"LOHA","target_modules":"q|v","exclude_modules":["x"],"layers_to_transform":null}"#,
        )
        .expect("parses");
        let rules = c.target_rules().expect("rules");
        assert_eq!(
            rules.target_modules,
            Some(TargetModules::Regex("q|v".into()))
        );
        assert_eq!(
            rules.exclude_modules,
            Some(TargetModules::Names(vec!["x".into()]))
        );
    }

    #[test]
    fn unsupported_features_are_listed() {
        let (c, _) = lora(
            r#"{"peft_type":"LORA","use_qalora":true,"init_lora_weights":"pissa","layer_replication":[[0,2],[1,3]]}"#,
        );
        assert_eq!(
            c.unsupported_merge_features(),
            vec!["use_qalora", "layer_replication", "init_lora_weights"]
        );
        assert_eq!(c.layer_replication, Some(vec![[0, 2], [1, 3]]));
        assert!(lora(r#"{"peft_type":"LORA","init_lora_weights":"mica"}"#)
            .0
            .unsupported_merge_features()
            .is_empty());
    }
}
