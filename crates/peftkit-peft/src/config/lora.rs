//! The typed LoRA config: the 41 fields peft 0.21.2 writes, their defaults, reading and writing.

use indexmap::IndexMap;
use serde_json::{json, Map, Number, Value};

use super::read::*;
use super::validate::is_truthy_object;
use super::{
    set_list_value, write_pyjson, ConfigError, ConfigWarning, LayersToTransform, SetOrder,
    StringOrList, TargetModules, TargetRules, WriteOptions, LORA, PEFT_VERSION, RUNTIME_CONFIG,
};
use crate::targeting::{PatternResolver, TargetMatcher, TargetingError};

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
    pub(super) fn is(&self, name: &str) -> bool {
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

pub(super) fn float_number(f: f64) -> Number {
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

fn opt<T>(v: &Option<T>, f: impl Fn(&T) -> Value) -> Value {
    v.as_ref().map_or(Value::Null, f)
}

fn target_modules_value(t: &TargetModules, order: SetOrder) -> Value {
    match t {
        TargetModules::Regex(s) => Value::String(s.clone()),
        TargetModules::Names(v) => set_list_value(v, order),
    }
}

fn string_or_list_value(s: &StringOrList) -> Value {
    match s {
        StringOrList::One(s) => Value::String(s.clone()),
        StringOrList::Many(v) => json!(v),
    }
}

fn layers_value(l: &LayersToTransform) -> Value {
    match l {
        LayersToTransform::One(i) => json!(i),
        LayersToTransform::Many(v) => json!(v),
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
            opt(&self.target_modules, |t| target_modules_value(t, order)),
        );
        m.insert(
            "exclude_modules".into(),
            opt(&self.exclude_modules, |t| target_modules_value(t, order)),
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
            opt(&self.layers_to_transform, layers_value),
        );
        m.insert(
            "layers_pattern".into(),
            opt(&self.layers_pattern, string_or_list_value),
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
            opt(&self.target_parameters, string_or_list_value),
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

    /// The features in use that a plain LoRA/DoRA merge does not cover (docs/formats.md, "PEFT adapters"): LoRA
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

// The LoRA entry points of the targeting rules. They live here, beside the config, so that
// `targeting` depends on nothing in `config`.

impl LoraConfig {
    /// `bool(check_target_module_exists(config, module_name))`. Compiles the config's patterns
    /// on every call: use [`TargetMatcher`] to test many names.
    pub fn is_target(&self, module_name: &str) -> Result<bool, TargetingError> {
        TargetMatcher::for_lora(self)?.is_target(module_name)
    }

    /// The rank of `module_name` (see [`PatternResolver::rank_for`]).
    pub fn rank_for(&self, module_name: &str) -> Result<u64, TargetingError> {
        PatternResolver::new(self)?.rank_for(module_name)
    }

    /// The alpha of `module_name` (see [`PatternResolver::alpha_for`]).
    pub fn alpha_for(&self, module_name: &str) -> Result<f64, TargetingError> {
        PatternResolver::new(self)?.alpha_for(module_name)
    }
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

impl TargetMatcher {
    /// Compiles the targeting rules of a LoRA config.
    pub fn for_lora(config: &LoraConfig) -> Result<Self, TargetingError> {
        Self::new(&TargetRules::from_lora(config))
    }
}

impl PatternResolver {
    /// Compiles the patterns of a LoRA config.
    pub fn new(config: &LoraConfig) -> Result<Self, TargetingError> {
        Self::from_parts(
            config.r,
            &config.lora_alpha,
            config.use_rslora,
            config.rank_pattern.as_ref(),
            config.alpha_pattern.as_ref(),
        )
    }
}
