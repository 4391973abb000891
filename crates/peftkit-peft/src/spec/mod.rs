//! The adapters spec: the data that says how each PEFT method names its tensors, and peft's
//! default target modules per model type.
//!
//! The data lives in the top-level `adapters-spec/` folder (`methods.json`,
//! `default_targets.json`; schema in `adapters-spec/README.md`) and is embedded at build time.
//! A user file can extend or override it at run time ([`Spec::load`], [`Spec::from_env`]).
//!
//! ```
//! use peftkit_peft::{classify_key, Spec};
//!
//! // On-disk key (with the `base_model.model.` prefix, without the adapter name).
//! let k = classify_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").unwrap();
//! assert_eq!((k.method.as_str(), k.role.as_str()), ("LORA", "a"));
//! assert_eq!(k.module_path.as_deref(), Some("model.layers.0.self_attn.q_proj"));
//! assert_eq!(k.adapter_name, None);
//!
//! // In-memory key (adapter name inserted, prefix stripped).
//! let k = classify_key("model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight").unwrap();
//! assert_eq!(k.role, "magnitude");
//! assert_eq!(k.adapter_name.as_deref(), Some("default"));
//! assert_eq!(k.disk_key, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector");
//!
//! let targets = Spec::embedded().default_target_modules("LORA", "llama").unwrap();
//! assert_eq!(targets.names().unwrap(), ["q_proj", "v_proj"]);
//! ```

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use indexmap::IndexMap;
use serde::Deserialize;
use serde_json::Value;

use crate::py::{PyRegex, RegexError};
use crate::targeting::TargetModules;

use crate::embedded::{EMBEDDED_DEFAULT_TARGETS_JSON, EMBEDDED_METHODS_JSON};

/// Environment variable naming a user spec file that [`Spec::from_env`] merges over the embedded
/// spec.
pub const USER_SPEC_ENV: &str = "PEFTKIT_ADAPTERS_SPEC";

/// Placeholder for the adapter name in `memory_template`.
const ADAPTER_PLACEHOLDER: &str = "{adapter}";

/// Errors loading or merging an adapters spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The user file could not be read.
    #[error("cannot read adapters spec {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A document is not JSON or does not follow the schema.
    #[error("adapters spec {what}: {source}")]
    Json {
        /// Which document (`methods.json`, the user file, ...).
        what: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A structural problem (wrong top-level shape of a user file, duplicate roles, ...).
    #[error("adapters spec {what}: {message}")]
    Invalid {
        /// Where.
        what: String,
        /// What is wrong.
        message: String,
    },
    /// A rule's `suffix` does not compile.
    #[error("adapters spec method {method}, rule {role:?}: {source}")]
    Regex {
        /// The method.
        method: String,
        /// The rule.
        role: String,
        /// The compile error.
        #[source]
        source: RegexError,
    },
}

/// Where a rule's tensors live in the key space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleScope {
    /// Per adapted module: `[base_model.model.]<module path>.<suffix>`.
    #[default]
    Module,
    /// Shared by the whole model: `base_model.<suffix>` (VeRA `vera_A`, VB-LoRA vector bank).
    Model,
    /// The whole key, without any prefix (prompt learning: `prompt_embeddings`).
    Top,
}

/// Where peft puts the adapter name in the in-memory (`state_dict`) key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterNamePlacement {
    /// Before the last component (a sub-module's parameter): `lora_A.weight` ↔
    /// `lora_A.<name>.weight`.
    BeforeLast,
    /// After the key (an `nn.ParameterDict` entry): `lora_embedding_A` ↔
    /// `lora_embedding_A.<name>`.
    Append,
    /// After the key, followed by `.weight` (DoRA): `lora_magnitude_vector` ↔
    /// `lora_magnitude_vector.<name>.weight`.
    AppendWeight,
    /// The in-memory key is `memory_template` with `{adapter}` replaced; the on-disk key is the
    /// rule's `example` (prompt learning: `prompt_encoder.<name>.embedding.weight`).
    Template,
    /// No in-memory counterpart: the tensor is computed when saving (P-tuning's
    /// `prompt_embeddings`, VB-LoRA top-k tensors).
    None,
}

/// One key rule: a regex for the part of the key that names the tensor, and its role.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRule {
    /// Name of the tensor's role within the method (`"a"`, `"b"`, `"magnitude"`, ...).
    pub role: String,
    /// Where the key lives (default: per module).
    #[serde(default)]
    pub scope: RuleScope,
    /// Regex (syntax shared by Python `re` and the `regex` crate) that must match the whole key
    /// suffix after `<module path>.` (module scope), after `base_model.` (model scope) or the
    /// whole key (top scope), in its on-disk form.
    pub suffix: String,
    /// Where the adapter name goes in the in-memory key.
    pub adapter_name: AdapterNamePlacement,
    /// For [`AdapterNamePlacement::Template`]: the in-memory key with `{adapter}`.
    #[serde(default)]
    pub memory_template: Option<String>,
    /// An on-disk suffix this rule matches (checked when the spec loads).
    #[serde(default)]
    pub example: Option<String>,
    /// Free text (shapes, conditions).
    #[serde(default)]
    pub note: Option<String>,
}

/// What the spec knows about one `peft_type`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodSpec {
    /// peft's parameter-name prefix (`PEFT_TYPE_TO_PREFIX_MAPPING`).
    pub param_prefix: String,
    /// Whether peft writes per-module keys with the `base_model.model.` prefix.
    pub prefixed: bool,
    /// Prompt-learning method (no per-module tensors; different config fields).
    #[serde(default)]
    pub prompt_learning: bool,
    /// Whether peft compresses list `target_modules` of ≥ 20 entries to minimal suffixes
    /// (false for IA3 only).
    #[serde(default = "default_true")]
    pub minimize_target_modules: bool,
    /// Config fields peft stores as Python sets (written in arbitrary order by peft).
    #[serde(default)]
    pub set_fields: Vec<String>,
    /// Whether `rules` list every tensor the method writes; if so, any other key of such an
    /// adapter is a plain replacement tensor (`modules_to_save`, embeddings, biases).
    #[serde(default)]
    pub rules_complete: bool,
    /// Free text.
    #[serde(default)]
    pub note: Option<String>,
    /// The key rules, in match order.
    #[serde(default)]
    pub rules: Vec<KeyRule>,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct MethodsDoc {
    schema_version: u32,
    peft_version: String,
    model_prefix: String,
    shared_prefix: String,
    methods: IndexMap<String, MethodSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct DefaultTargetsDoc {
    #[allow(dead_code)] // Documents the file; read to validate the schema.
    schema_version: u32,
    #[allow(dead_code)]
    peft_version: String,
    #[serde(default)]
    #[allow(dead_code)]
    source: Option<String>,
    #[serde(default)]
    target_modules: IndexMap<String, IndexMap<String, TargetModules>>,
    #[serde(default)]
    feedforward_modules: IndexMap<String, IndexMap<String, Vec<String>>>,
}

/// A compiled rule: method and rule index plus the regex over the on-disk form.
#[derive(Debug, Clone)]
struct CompiledRule {
    method: usize,
    rule: usize,
    /// Full match over the key after the scope's prefix; module scope captures `module`.
    disk: PyRegex,
    /// Full match over the in-memory key for template rules; captures `adapter`.
    template: Option<PyRegex>,
}

/// The result of classifying a tensor key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyClass {
    /// The method (`peft_type`) whose rule matched.
    pub method: String,
    /// The rule's role.
    pub role: String,
    /// The rule's scope.
    pub scope: RuleScope,
    /// The module path in the base model (module scope only), without `base_model.model.`.
    pub module_path: Option<String>,
    /// The adapter name, when the key was in its in-memory form.
    pub adapter_name: Option<String>,
    /// Whether the key carried the `base_model.model.` (module scope) / `base_model.` (model
    /// scope) prefix.
    pub had_prefix: bool,
    /// The tensor-naming part of the on-disk key (`lora_A.weight`).
    pub suffix: String,
    /// The canonical on-disk key (as peft writes it).
    pub disk_key: String,
    /// Where the adapter name goes in memory.
    pub placement: AdapterNamePlacement,
    memory_template: Option<String>,
    model_prefix: String,
    shared_prefix: String,
}

impl KeyClass {
    /// The in-memory key peft uses for this tensor under adapter `adapter` (with the
    /// `base_model.model.` prefix for module-scope keys), or `None` when the tensor has no
    /// in-memory counterpart.
    pub fn memory_key(&self, adapter: &str) -> Option<String> {
        let suffix = match self.placement {
            AdapterNamePlacement::None => return None,
            AdapterNamePlacement::Template => {
                return self
                    .memory_template
                    .as_ref()
                    .map(|t| t.replace(ADAPTER_PLACEHOLDER, adapter))
            }
            AdapterNamePlacement::Append => format!("{}.{adapter}", self.suffix),
            AdapterNamePlacement::AppendWeight => format!("{}.{adapter}.weight", self.suffix),
            AdapterNamePlacement::BeforeLast => match self.suffix.rsplit_once('.') {
                Some((head, last)) => format!("{head}.{adapter}.{last}"),
                None => format!("{}.{adapter}", self.suffix),
            },
        };
        Some(match self.scope {
            RuleScope::Module => format!(
                "{}{}.{suffix}",
                self.model_prefix,
                self.module_path.as_deref().unwrap_or_default()
            ),
            RuleScope::Model => format!("{}{suffix}", self.shared_prefix),
            RuleScope::Top => suffix,
        })
    }
}

/// The loaded adapters spec (embedded data, optionally merged with user files).
#[derive(Debug, Clone)]
pub struct Spec {
    methods_raw: Value,
    targets_raw: Value,
    methods: MethodsDoc,
    targets: DefaultTargetsDoc,
    method_names: Vec<String>,
    compiled: Vec<CompiledRule>,
}

fn json_err(what: &str) -> impl Fn(serde_json::Error) -> SpecError + '_ {
    move |source| SpecError::Json {
        what: what.to_owned(),
        source,
    }
}

/// Recursive object merge: objects merge key by key, anything else is replaced.
fn merge_objects(base: &mut Value, user: Value) {
    match (base, user) {
        (Value::Object(b), Value::Object(u)) => {
            for (k, v) in u {
                match b.get_mut(&k) {
                    Some(slot) => merge_objects(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// Merges one user method entry over the embedded one: fields replace fields, rules merge by
/// `role` (same role: replaced; new role: appended), `"replace": true` replaces the whole entry.
fn merge_method(base: Option<&mut Value>, mut user: Value) -> Result<Option<Value>, String> {
    let Value::Object(user_map) = &mut user else {
        return Err("a method entry must be an object".into());
    };
    let replace = match user_map.shift_remove("replace") {
        None => false,
        Some(Value::Bool(b)) => b,
        Some(_) => return Err("\"replace\" must be true or false".into()),
    };
    let base = match base {
        Some(b) if !replace => b,
        _ => return Ok(Some(user)),
    };
    let Value::Object(base_map) = base else {
        return Err("embedded method entry is not an object".into());
    };
    for (k, v) in std::mem::take(user_map) {
        if k != "rules" {
            base_map.insert(k, v);
            continue;
        }
        let Value::Array(user_rules) = v else {
            return Err("\"rules\" must be a list".into());
        };
        let base_rules = base_map
            .entry("rules")
            .or_insert_with(|| Value::Array(Vec::new()));
        let Value::Array(base_rules) = base_rules else {
            return Err("embedded \"rules\" is not a list".into());
        };
        for rule in user_rules {
            let role = rule.get("role").cloned();
            match base_rules
                .iter_mut()
                .find(|r| role.is_some() && r.get("role") == role.as_ref())
            {
                Some(existing) => *existing = rule,
                None => base_rules.push(rule),
            }
        }
    }
    Ok(None)
}

impl Spec {
    /// The spec embedded at build time (parsed once).
    pub fn embedded() -> &'static Spec {
        static EMBEDDED: OnceLock<Spec> = OnceLock::new();
        EMBEDDED.get_or_init(|| {
            Spec::from_json(EMBEDDED_METHODS_JSON, EMBEDDED_DEFAULT_TARGETS_JSON)
                // Build-time data, checked by this crate's tests: a failure is a packaging bug.
                .expect("the embedded adapters-spec is valid")
        })
    }

    /// Builds a spec from the two documents.
    pub fn from_json(methods_json: &str, default_targets_json: &str) -> Result<Spec, SpecError> {
        let methods_raw: Value =
            serde_json::from_str(methods_json).map_err(json_err("methods.json"))?;
        let targets_raw: Value =
            serde_json::from_str(default_targets_json).map_err(json_err("default_targets.json"))?;
        Self::from_values(methods_raw, targets_raw)
    }

    fn from_values(methods_raw: Value, targets_raw: Value) -> Result<Spec, SpecError> {
        let methods: MethodsDoc =
            serde_json::from_value(methods_raw.clone()).map_err(json_err("methods.json"))?;
        let targets: DefaultTargetsDoc = serde_json::from_value(targets_raw.clone())
            .map_err(json_err("default_targets.json"))?;
        if methods.schema_version != 1 {
            return Err(SpecError::Invalid {
                what: "methods.json".into(),
                message: format!("unsupported schema_version {}", methods.schema_version),
            });
        }
        let method_names = methods.methods.keys().cloned().collect();
        let compiled = compile_rules(&methods)?;
        Ok(Spec {
            methods_raw,
            targets_raw,
            methods,
            targets,
            method_names,
            compiled,
        })
    }

    /// This spec with a user document merged over it.
    ///
    /// The user document is an object with optional `"methods"` (entries as in `methods.json`,
    /// merged per method: fields replace fields, `rules` merge by `role`, `"replace": true`
    /// replaces the entry) and `"default_targets"` (an object shaped like
    /// `default_targets.json`, merged per method and model type).
    pub fn with_user_json(&self, user_json: &str) -> Result<Spec, SpecError> {
        let what = "user file";
        let user: Value = serde_json::from_str(user_json).map_err(json_err(what))?;
        let Value::Object(mut user) = user else {
            return Err(SpecError::Invalid {
                what: what.into(),
                message: "must be a JSON object".into(),
            });
        };
        let mut methods_raw = self.methods_raw.clone();
        let mut targets_raw = self.targets_raw.clone();
        if let Some(user_methods) = user.shift_remove("methods") {
            let Value::Object(user_methods) = user_methods else {
                return Err(SpecError::Invalid {
                    what: what.into(),
                    message: "\"methods\" must be an object".into(),
                });
            };
            let Some(Value::Object(base_methods)) = methods_raw.get_mut("methods") else {
                return Err(SpecError::Invalid {
                    what: "methods.json".into(),
                    message: "\"methods\" must be an object".into(),
                });
            };
            for (name, entry) in user_methods {
                let merged = merge_method(base_methods.get_mut(&name), entry).map_err(|m| {
                    SpecError::Invalid {
                        what: format!("{what}, method {name}"),
                        message: m,
                    }
                })?;
                if let Some(entry) = merged {
                    base_methods.insert(name, entry);
                }
            }
        }
        if let Some(user_targets) = user.shift_remove("default_targets") {
            if !user_targets.is_object() {
                return Err(SpecError::Invalid {
                    what: what.into(),
                    message: "\"default_targets\" must be an object".into(),
                });
            }
            merge_objects(&mut targets_raw, user_targets);
        }
        if let Some(other) = user.keys().next() {
            return Err(SpecError::Invalid {
                what: what.into(),
                message: format!(
                    "unknown top-level key {other:?} (expected \"methods\", \"default_targets\")"
                ),
            });
        }
        Self::from_values(methods_raw, targets_raw)
    }

    /// This spec with the user file at `path` merged over it (see [`Spec::with_user_json`]).
    pub fn with_user_file(&self, path: &Path) -> Result<Spec, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Io {
            path: path.to_owned(),
            source,
        })?;
        self.with_user_json(&text)
    }

    /// The embedded spec, with `user_file` merged over it if given.
    pub fn load(user_file: Option<&Path>) -> Result<Spec, SpecError> {
        match user_file {
            None => Ok(Spec::embedded().clone()),
            Some(path) => Spec::embedded().with_user_file(path),
        }
    }

    /// [`Spec::load`] with the file named by `$PEFTKIT_ADAPTERS_SPEC` (if set and non-empty).
    pub fn from_env() -> Result<Spec, SpecError> {
        match std::env::var_os(USER_SPEC_ENV) {
            Some(p) if !p.is_empty() => Spec::load(Some(Path::new(&p))),
            _ => Spec::load(None),
        }
    }

    /// The peft version the data was taken from.
    pub fn peft_version(&self) -> &str {
        &self.methods.peft_version
    }

    /// `"base_model.model."`: the prefix of per-module keys.
    pub fn model_prefix(&self) -> &str {
        &self.methods.model_prefix
    }

    /// `"base_model."`: the prefix of model-level shared keys.
    pub fn shared_prefix(&self) -> &str {
        &self.methods.shared_prefix
    }

    /// The spec of method `peft_type`.
    pub fn method(&self, peft_type: &str) -> Option<&MethodSpec> {
        self.methods.methods.get(peft_type)
    }

    /// All known `peft_type`s, in file order.
    pub fn method_names(&self) -> &[String] {
        &self.method_names
    }

    /// Whether peft knows this `peft_type`.
    pub fn is_known_peft_type(&self, peft_type: &str) -> bool {
        self.methods.methods.contains_key(peft_type)
    }

    /// `key` without the `base_model.model.` prefix, and whether it had it.
    pub fn strip_model_prefix<'k>(&self, key: &'k str) -> (&'k str, bool) {
        match key.strip_prefix(self.model_prefix()) {
            Some(rest) => (rest, true),
            None => (key, false),
        }
    }

    /// Classifies a tensor key of any method: on-disk forms of all methods first (in file order),
    /// then in-memory forms (with an adapter name). Keys may carry `base_model.model.` or not.
    ///
    /// Some keys are shared by several methods (`prompt_embeddings`, AdaLoRA's and LoRA's
    /// `lora_embedding_A`): the first method in file order wins. When the method is known (from
    /// `adapter_config.json`), use [`Spec::classify_key_for`].
    pub fn classify_key(&self, key: &str) -> Option<KeyClass> {
        self.classify(key, None)
    }

    /// Classifies a tensor key against the rules of one method only.
    pub fn classify_key_for(&self, peft_type: &str, key: &str) -> Option<KeyClass> {
        let idx = self.methods.methods.get_index_of(peft_type)?;
        self.classify(key, Some(idx))
    }

    fn classify(&self, key: &str, only: Option<usize>) -> Option<KeyClass> {
        let rules = || {
            self.compiled
                .iter()
                .filter(move |c| only.is_none_or(|m| m == c.method))
        };
        rules()
            .find_map(|c| self.match_disk(c, key, None))
            .or_else(|| rules().find_map(|c| self.match_memory(c, key)))
    }

    fn rule(&self, c: &CompiledRule) -> (&str, &KeyRule) {
        let (name, method) = self
            .methods
            .methods
            .get_index(c.method)
            .expect("compiled rules index existing methods");
        (name, &method.rules[c.rule])
    }

    /// Matches the on-disk form of `c` against `key`.
    fn match_disk(&self, c: &CompiledRule, key: &str, adapter: Option<&str>) -> Option<KeyClass> {
        let (method, rule) = self.rule(c);
        let (rest, had_prefix) = match rule.scope {
            RuleScope::Module => self.strip_model_prefix(key),
            RuleScope::Model => match key.strip_prefix(self.shared_prefix()) {
                Some(rest) => (rest, true),
                None => (key, false),
            },
            RuleScope::Top => (key, false),
        };
        // Regex runtime errors can only come from the backtracking engine; a key that trips
        // it is treated as not matching.
        let (module_path, suffix) = match rule.scope {
            RuleScope::Module => {
                let module = c.disk.named_group(rest, "module").ok()??;
                let suffix = rest.get(module.len() + 1..)?.to_owned();
                (Some(module), suffix)
            }
            RuleScope::Model | RuleScope::Top => {
                if !c.disk.is_match(rest).ok()? {
                    return None;
                }
                (None, rest.to_owned())
            }
        };
        let disk_key = match (rule.scope, &module_path) {
            (RuleScope::Module, Some(m)) => format!("{}{m}.{suffix}", self.model_prefix()),
            (RuleScope::Model, _) => format!("{}{suffix}", self.shared_prefix()),
            _ => suffix.clone(),
        };
        Some(KeyClass {
            method: method.to_owned(),
            role: rule.role.clone(),
            scope: rule.scope,
            module_path,
            adapter_name: adapter.map(str::to_owned),
            had_prefix,
            suffix,
            disk_key,
            placement: rule.adapter_name,
            memory_template: rule.memory_template.clone(),
            model_prefix: self.model_prefix().to_owned(),
            shared_prefix: self.shared_prefix().to_owned(),
        })
    }

    /// Matches the in-memory form of `c` against `key`: removes the adapter-name component the
    /// rule's placement implies and matches the rest as an on-disk key.
    fn match_memory(&self, c: &CompiledRule, key: &str) -> Option<KeyClass> {
        let (_, rule) = self.rule(c);
        let (disk, adapter) = match rule.adapter_name {
            AdapterNamePlacement::None => return None,
            AdapterNamePlacement::Template => {
                let adapter = c.template.as_ref()?.named_group(key, "adapter").ok()??;
                (rule.example.clone()?, adapter)
            }
            AdapterNamePlacement::Append => {
                let (head, name) = key.rsplit_once('.')?;
                (head.to_owned(), name.to_owned())
            }
            AdapterNamePlacement::AppendWeight => {
                let head = key.strip_suffix(".weight")?;
                let (head, name) = head.rsplit_once('.')?;
                (head.to_owned(), name.to_owned())
            }
            AdapterNamePlacement::BeforeLast => {
                let (head, last) = key.rsplit_once('.')?;
                let (head, name) = head.rsplit_once('.')?;
                (format!("{head}.{last}"), name.to_owned())
            }
        };
        if adapter.is_empty() {
            return None;
        }
        let mut class = self.match_disk(c, &disk, Some(&adapter))?;
        if rule.scope == RuleScope::Module {
            class.had_prefix = key.starts_with(self.model_prefix());
        }
        Some(class)
    }

    /// peft's default `target_modules` for `peft_type` on a model with `config.json`
    /// `model_type` (`TRANSFORMERS_MODELS_TO_<METHOD>_TARGET_MODULES_MAPPING`).
    pub fn default_target_modules(
        &self,
        peft_type: &str,
        model_type: &str,
    ) -> Option<TargetModules> {
        self.targets
            .target_modules
            .get(peft_type)?
            .get(model_type)
            .cloned()
    }

    /// peft's default `feedforward_modules` (IA3).
    pub fn default_feedforward_modules(
        &self,
        peft_type: &str,
        model_type: &str,
    ) -> Option<Vec<String>> {
        self.targets
            .feedforward_modules
            .get(peft_type)?
            .get(model_type)
            .cloned()
    }
}

fn compile_rules(doc: &MethodsDoc) -> Result<Vec<CompiledRule>, SpecError> {
    let mut out = Vec::new();
    for (mi, (name, method)) in doc.methods.iter().enumerate() {
        let invalid = |role: &str, message: String| SpecError::Invalid {
            what: format!("method {name}, rule {role:?}"),
            message,
        };
        let mut roles = std::collections::HashSet::new();
        for (ri, rule) in method.rules.iter().enumerate() {
            if !roles.insert(rule.role.as_str()) {
                return Err(invalid(&rule.role, "duplicate role".into()));
            }
            let regex_err = |source| SpecError::Regex {
                method: name.clone(),
                role: rule.role.clone(),
                source,
            };
            let pattern = match rule.scope {
                // Greedy: the module path is everything before the last place the suffix fits.
                RuleScope::Module => format!(r"(?P<module>.+)\.(?:{})", rule.suffix),
                RuleScope::Model | RuleScope::Top => rule.suffix.clone(),
            };
            let disk = PyRegex::fullmatch(&pattern).map_err(regex_err)?;
            let template = match (rule.adapter_name, &rule.memory_template) {
                (AdapterNamePlacement::Template, Some(t)) if t.contains(ADAPTER_PLACEHOLDER) => {
                    if rule.example.is_none() {
                        return Err(invalid(
                            &rule.role,
                            "template rules need an \"example\" (the on-disk key)".into(),
                        ));
                    }
                    let escaped = regex::escape(t)
                        .replace(&regex::escape(ADAPTER_PLACEHOLDER), r"(?P<adapter>[^.]+)");
                    Some(PyRegex::fullmatch(&escaped).map_err(regex_err)?)
                }
                (AdapterNamePlacement::Template, _) => {
                    return Err(invalid(
                        &rule.role,
                        "template rules need a \"memory_template\" containing {adapter}".into(),
                    ))
                }
                _ => None,
            };
            if let Some(example) = &rule.example {
                let suffix_only = PyRegex::fullmatch(&rule.suffix).map_err(regex_err)?;
                if !suffix_only.is_match(example).unwrap_or(false) {
                    return Err(invalid(
                        &rule.role,
                        format!(
                            "example {example:?} does not match suffix {:?}",
                            rule.suffix
                        ),
                    ));
                }
            }
            out.push(CompiledRule {
                method: mi,
                rule: ri,
                disk,
                template,
            });
        }
    }
    Ok(out)
}

/// [`Spec::classify_key`] with the embedded spec:
/// `(method, role, module_path, adapter_name)` and more, or `None` for keys that are not adapter
/// tensors of any method (e.g. `modules_to_save` copies).
pub fn classify_key(key: &str) -> Option<KeyClass> {
    Spec::embedded().classify_key(key)
}

/// peft's `_remove_adapter_name_from_state_dict_key`, generic over methods: `x.<name>` → `x`
/// (parameter entries), else `x.<name>.<last>` → `x.<last>` (sub-module parameters); keys without
/// the name are returned unchanged. LoRA's DoRA rename (`lora_magnitude_vector.<name>.weight` →
/// `lora_magnitude_vector`) is not generic: use [`KeyClass::disk_key`] for that.
pub fn remove_adapter_name(key: &str, adapter: &str) -> String {
    if !key.contains('.') {
        return key.to_owned();
    }
    if let Some(head) = key.strip_suffix(&format!(".{adapter}")) {
        return head.to_owned();
    }
    match key.rsplit_once('.') {
        Some((head, last)) => {
            let head = head.strip_suffix(&format!(".{adapter}")).unwrap_or(head);
            format!("{head}.{last}")
        }
        None => key.to_owned(),
    }
}

#[cfg(test)]
mod tests;
