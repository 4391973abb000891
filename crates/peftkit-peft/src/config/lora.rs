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

/// Declares [`LoraConfig`] from one table: each field is written once, with its type, peft's
/// default, its reader (which names the field on a type error) and its writer. The struct,
/// `Default`, [`LORA_FIELDS`], `from_map` and `to_value` are all generated from it, so they
/// cannot disagree. `@peft_type` marks where peft writes `peft_type` (not a field: always
/// `"LORA"`). `absent` overrides the value a missing field reads as (peft fills `peft_version`
/// after the read, with a warning).
macro_rules! lora_config {
    (
        $( $(#[doc = $hdoc:literal])* $hname:ident : $hty:ty = $hdefault:expr $(, absent $habsent:expr)?, read $hread:ident, write $hwrite:ident; )*
        @peft_type;
        $( $(#[doc = $doc:literal])* $name:ident : $ty:ty = $default:expr $(, absent $absent:expr)?, read $read:ident, write $write:ident; )*
    ) => {
        /// A LoRA `adapter_config.json`: every field peft 0.21.2 writes (`PeftConfig` base fields
        /// first, then `LoraConfig`'s in declaration order), with peft's defaults
        /// ([`LoraConfig::default`]).
        ///
        /// Sub-configs (`eva_config`, `loftq_config`, ...) are kept as JSON. `runtime_config` is
        /// never held (peft drops it on load and never writes it).
        #[derive(Debug, Clone, PartialEq)]
        pub struct LoraConfig {
            $( $(#[doc = $hdoc])* pub $hname: $hty, )*
            $( $(#[doc = $doc])* pub $name: $ty, )*
            /// Fields this peft version does not have, in file order; written back unchanged.
            pub extra: Map<String, Value>,
        }

        impl Default for LoraConfig {
            /// `LoraConfig()` of peft 0.21.2.
            fn default() -> Self {
                Self {
                    $( $hname: $hdefault, )*
                    $( $name: $default, )*
                    extra: Map::new(),
                }
            }
        }

        /// The names of the fields peft 0.21.2 writes for LoRA, in `dataclasses.fields` order.
        pub const LORA_FIELDS: [&str; 41] = [
            $( stringify!($hname), )*
            "peft_type",
            $( stringify!($name), )*
        ];

        impl LoraConfig {
            /// Reads every field of the table out of `r` (absent: the default).
            fn read_fields(r: &mut FieldReader) -> Result<Self, ConfigError> {
                let d = LoraConfig::default();
                Ok(LoraConfig {
                    $( $hname: r.read(stringify!($hname), lora_config!(@absent d.$hname $(, $habsent)?), $hread)?, )*
                    $( $name: r.read(stringify!($name), lora_config!(@absent d.$name $(, $absent)?), $read)?, )*
                    extra: Map::new(),
                })
            }

            /// Writes every field of the table, in [`LORA_FIELDS`] order.
            fn write_fields(&self, m: &mut Map<String, Value>, order: SetOrder) {
                $( m.insert(stringify!($hname).into(), $hwrite(&self.$hname, order)); )*
                m.insert("peft_type".into(), Value::String(LORA.into()));
                $( m.insert(stringify!($name).into(), $write(&self.$name, order)); )*
            }
        }
    };
    (@absent $default:expr) => { $default };
    (@absent $default:expr, $absent:expr) => { $absent };
}

lora_config! {
    /// `task_type`: null or one of [`TASK_TYPES`](super::TASK_TYPES) (checked by `validate`).
    task_type: Option<String> = None, read as_opt_string, write w_json;
    // `peft_type` is written here, between `task_type` and `auto_mapping`.
    @peft_type;
    /// `auto_mapping`: null, or `{"base_model_class", "parent_library"}` when `task_type` is null.
    auto_mapping: Option<Value> = None, read as_opt_object, write w_json;
    /// `peft_version` of the writer (peft ≥ 0.18); peft fills its own version when missing.
    peft_version: Option<String> = Some(PEFT_VERSION.to_owned()), absent None, read as_opt_string, write w_json;
    /// `base_model_name_or_path`.
    base_model_name_or_path: Option<String> = None, read as_opt_string, write w_json;
    /// `revision` of the base model.
    revision: Option<String> = None, read as_opt_string, write w_json;
    /// `inference_mode` (`PeftModel.save_pretrained` always writes `true`).
    inference_mode: bool = false, read as_bool, write w_json;
    /// `r`, the rank (default 8).
    r: u64 = 8, read as_rank, write w_json;
    /// `target_modules` (null: peft fills its per-model-type default before matching).
    target_modules: Option<TargetModules> = None, read as_opt_target_modules, write w_target_modules;
    /// `exclude_modules`.
    exclude_modules: Option<TargetModules> = None, read as_opt_target_modules, write w_target_modules;
    /// `lora_alpha` (default 8), int or float as written.
    lora_alpha: Number = Number::from(8), read as_number, write w_json;
    /// `lora_dropout` (default 0.0), int or float as written.
    lora_dropout: Number = float_number(0.0), read as_number, write w_json;
    /// `fan_in_fan_out` (true for GPT-2 `Conv1D` weights stored as (in, out)).
    fan_in_fan_out: bool = false, read as_bool, write w_json;
    /// `bias`: `"none"`, `"all"` or `"lora_only"`.
    bias: String = "none".to_owned(), read as_string, write w_json;
    /// `use_rslora`: scaling `alpha / sqrt(r)` instead of `alpha / r`.
    use_rslora: bool = false, read as_bool, write w_json;
    /// `modules_to_save`: modules saved (and merged) as full copies.
    modules_to_save: Option<Vec<String>> = None, read as_opt_string_list, write w_json;
    /// `init_lora_weights` (default `true`).
    init_lora_weights: InitLoraWeights = InitLoraWeights::Bool(true), read as_init, write w_init;
    /// `layers_to_transform`.
    layers_to_transform: Option<LayersToTransform> = None, read as_opt_layers, write w_layers;
    /// `layers_pattern`.
    layers_pattern: Option<StringOrList> = None, read as_opt_string_or_list, write w_string_or_list;
    /// `rank_pattern` in file order (first matching key wins; default `{}`).
    rank_pattern: Option<IndexMap<String, Number>> = Some(IndexMap::new()), read as_opt_pattern_map, write w_json;
    /// `alpha_pattern` in file order (first matching key wins; default `{}`).
    alpha_pattern: Option<IndexMap<String, Number>> = Some(IndexMap::new()), read as_opt_pattern_map, write w_json;
    /// `megatron_config`.
    megatron_config: Option<Value> = None, read as_opt_object, write w_json;
    /// `megatron_core` (default `"megatron.core"`).
    megatron_core: Option<String> = Some("megatron.core".to_owned()), read as_opt_string, write w_json;
    /// `trainable_token_indices`.
    trainable_token_indices: Option<TrainableTokenIndices> = None, read as_opt_token_indices, write w_token_indices;
    /// `loftq_config` (default `{}`).
    loftq_config: Option<Value> = Some(Value::Object(Map::new())), read as_opt_object, write w_json;
    /// `eva_config`.
    eva_config: Option<Value> = None, read as_opt_object, write w_json;
    /// `corda_config`.
    corda_config: Option<Value> = None, read as_opt_object, write w_json;
    /// `lora_ga_config`.
    lora_ga_config: Option<Value> = None, read as_opt_object, write w_json;
    /// `use_dora`.
    use_dora: bool = false, read as_bool, write w_json;
    /// `velora_config`.
    velora_config: Option<Value> = None, read as_opt_object, write w_json;
    /// `alora_invocation_tokens`.
    alora_invocation_tokens: Option<Vec<i64>> = None, read as_opt_int_list, write w_json;
    /// `use_qalora`.
    use_qalora: bool = false, read as_bool, write w_json;
    /// `qalora_group_size` (default 16).
    qalora_group_size: i64 = 16, read as_int, write w_json;
    /// `monteclora_config`.
    monteclora_config: Option<Value> = None, read as_opt_object, write w_json;
    /// `layer_replication`: `[start, end)` layer ranges.
    layer_replication: Option<Vec<[i64; 2]>> = None, read as_opt_replication, write w_json;
    /// `lora_bias`: B has a bias.
    lora_bias: bool = false, read as_bool, write w_json;
    /// `target_parameters` (a string form is readable but invalid).
    target_parameters: Option<StringOrList> = None, read as_opt_string_or_list, write w_string_or_list;
    /// `use_bdlora` (a BD-LoRA sub-config).
    use_bdlora: Option<Value> = None, read as_opt_object, write w_json;
    /// `arrow_config`.
    arrow_config: Option<Value> = None, read as_opt_object, write w_json;
    /// `kasa_config`.
    kasa_config: Option<Value> = None, read as_opt_object, write w_json;
    /// `ensure_weight_tying`.
    ensure_weight_tying: bool = false, read as_bool, write w_json;
}

// Readers the table names that `read` does not share with the generic config.

fn as_rank(field: &str, v: &Value) -> Result<u64, ConfigError> {
    v.as_u64()
        .ok_or_else(|| wrong(field, "a non-negative integer", v))
}

fn as_string(field: &str, v: &Value) -> Result<String, ConfigError> {
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| wrong(field, "a string", v))
}

fn as_opt_int_list(field: &str, v: &Value) -> Result<Option<Vec<i64>>, ConfigError> {
    match v {
        Value::Null => Ok(None),
        other => as_int_list(field, other).map(Some),
    }
}

// Writers: the JSON peft writes for each field type (`None` is `null`).

fn w_json<T: serde::Serialize>(v: &T, _: SetOrder) -> Value {
    // Every field type serialises infallibly (no maps with non-string keys).
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn w_target_modules(v: &Option<TargetModules>, order: SetOrder) -> Value {
    opt(v, |t| target_modules_value(t, order))
}

fn w_init(v: &InitLoraWeights, _: SetOrder) -> Value {
    v.to_value()
}

fn w_layers(v: &Option<LayersToTransform>, _: SetOrder) -> Value {
    opt(v, layers_value)
}

fn w_string_or_list(v: &Option<StringOrList>, _: SetOrder) -> Value {
    opt(v, string_or_list_value)
}

fn w_token_indices(v: &Option<TrainableTokenIndices>, _: SetOrder) -> Value {
    opt(v, TrainableTokenIndices::to_value)
}

pub(super) fn float_number(f: f64) -> Number {
    // Only called with finite literals.
    Number::from_f64(f).unwrap_or_else(|| Number::from(0))
}

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
        let mut c = LoraConfig::read_fields(&mut r)?;
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
        let mut m = Map::new();
        self.write_fields(&mut m, options.set_order);
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
