//! `adapter_config.json`, read leniently and written byte for byte as peft 0.21.2 writes it
//! (docs/formats.md, "adapter_config.json").
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
//! use peftkit_peft::{AdapterConfig, ConfigWarning, TargetModules};
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
//!
//! Layout: `lora` (the typed LoRA config and its field table), `generic` (every other
//! method), `read` (typed field readers: errors name the field), `validate` (peft's
//! `__post_init__` checks).

use std::fmt;
use std::path::{Path, PathBuf};

use peftkit_checkpoint::{py_json_string, PyJsonStyle};
use serde_json::{Map, Value};

use crate::py::RegexError;
use crate::spec::Spec;
use crate::targeting::{TargetMatcher, TargetingError};

mod generic;
mod lora;
mod read;
mod validate;

#[cfg(test)]
mod tests;

use crate::targeting::{LayersToTransform, StringOrList, TargetModules, TargetRules};
pub use generic::GenericConfig;
pub use lora::{InitLoraWeights, LoraConfig, TrainableTokenIndices, LORA_FIELDS};

use read::{parse_object, peft_type_of, read_file, wrong};
use validate::{check_layer_options, check_task_type};

/// File name of an adapter config (`peft.utils.CONFIG_NAME`).
pub const ADAPTER_CONFIG_NAME: &str = "adapter_config.json";

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

peftkit_checkpoint::option_setters!(WriteOptions {
    set_order: SetOrder
});

pub(super) fn set_list_value(items: &[String], order: SetOrder) -> Value {
    let mut items = items.to_vec();
    if order == SetOrder::Sorted {
        items.sort();
        items.dedup();
    }
    Value::Array(items.into_iter().map(Value::String).collect())
}

/// peft's `json.dumps(d, indent=2, sort_keys=True)`, without a trailing newline.
pub(super) fn write_pyjson(value: &Value) -> String {
    py_json_string(value, &PyJsonStyle::peft_adapter_config())
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
        Self::from_file(&dir.join(ADAPTER_CONFIG_NAME))
    }

    /// What is wrong with `<dir>/adapter_config.json`, if the folder has one, for `peftkit
    /// verify`: not JSON, an unknown or missing `peft_type`, wrong field types, or a check peft
    /// makes when it loads the adapter (a non-positive `r`, target patterns that do not compile,
    /// …). Empty when the file is absent or fine.
    pub fn problems_in(dir: &Path) -> Vec<peftkit_checkpoint::Problem> {
        let path = dir.join(ADAPTER_CONFIG_NAME);
        if !path.is_file() {
            return Vec::new();
        }
        let checked = Self::from_file(&path).and_then(|(config, _)| config.validate());
        match checked {
            Ok(()) => Vec::new(),
            Err(e) => vec![peftkit_checkpoint::Problem::new(path, e.to_string())],
        }
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
