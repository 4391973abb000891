//! Sorting every key of a state dict into base and adapter parameters ([`classify_state_dict`]).

use std::collections::BTreeSet;

use indexmap::IndexMap;
use peftkit_checkpoint::dtype_size;
use peftkit_checkpoint::{StateDict, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::{AdapterConfig, LORA};
use crate::py::PyRegex;
use crate::spec::{remove_adapter_name, KeyClass, Spec};
use crate::targeting::TargetModules;
use crate::targeting::{TargetingError, ALL_LINEAR};

use super::*;

/// What kind of state dict was classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateDictLayout {
    /// `PeftModel.state_dict()`: adapter names inside the keys, wrapped base parameters under
    /// `base_layer`.
    PeftModel,
    /// On-disk adapter keys (an `adapter_model.safetensors`, or a Rust state dict using them).
    PeftAdapter,
    /// burn LoRA factors (`<path>.weight.lora.a` / `.lora.b`).
    Burn,
    /// No adapter tensor at all: a plain checkpoint.
    Base,
}

/// Options of [`classify_state_dict`].
#[derive(Debug, Clone, Default)]
pub struct ClassifyOptions {
    /// The method (`peft_type`) when known (from a config): keys are matched with its rules
    /// only, which settles keys several methods share (`lora_embedding_A`, `prompt_embeddings`).
    pub peft_type: Option<String>,
    /// The name given to adapters whose keys carry none (adapter files, burn). Default
    /// `default`.
    pub disk_adapter_name: Option<String>,
}

/// For people: `PEFT model state dict`, `adapter file`, `burn export`, `plain checkpoint` (the
/// JSON form is the snake_case variant name).
impl std::fmt::Display for StateDictLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StateDictLayout::PeftModel => "PEFT model state dict",
            StateDictLayout::PeftAdapter => "adapter file",
            StateDictLayout::Burn => "burn export",
            StateDictLayout::Base => "plain checkpoint",
        })
    }
}

peftkit_checkpoint::option_setters!(ClassifyOptions {
    peft_type: Some(String),
    disk_adapter_name: Some(String),
});

/// A classified state dict.
#[derive(Debug, Clone)]
pub struct ClassifiedStateDict {
    /// Which layout the input had.
    pub layout: StateDictLayout,
    /// Base parameters under the names of the base checkpoint, in input order.
    pub base: StateDict,
    /// For each base name, the key it had in the input.
    pub base_source_keys: IndexMap<String, String>,
    /// Adapters by name, in order of first appearance.
    pub adapters: IndexMap<String, AdapterTensors>,
    /// Keys dropped because they alias another tensor (prompt learning's `word_embeddings.*`).
    pub dropped: Vec<String>,
    /// Modules wrapped by an adapter layer in the input (those with `<m>.base_layer.` keys).
    pub wrapped_modules: BTreeSet<String>,
    source: StateDict,
}

enum KeyKind {
    Spec(Box<KeyClass>),
    Burn { module: String, role: &'static str },
    Other,
}

/// `<path>.lora.a` / `<path>.lora.b` of burn's built-in LoRA: `(module, role)`. burn wraps a
/// parameter, so the module is the parameter path without `.weight`.
fn burn_key(key: &str) -> Option<(String, &'static str)> {
    let (param, role) = if let Some(p) = key.strip_suffix(".lora.a") {
        (p, "a")
    } else if let Some(p) = key.strip_suffix(".lora.b") {
        (p, "b")
    } else {
        return None;
    };
    let module = param.strip_suffix(".weight").unwrap_or(param);
    (!module.is_empty()).then(|| (module.to_owned(), role))
}

/// A 2-D tensor transposed, computed when its bytes are read (burn factors are stored
/// transposed relative to PEFT).
pub(super) fn transposed(t: &Tensor, key: &str) -> Result<Tensor, ClassifyError> {
    let bad = || ClassifyError::BurnShape {
        origin: origin_of(t),
        key: key.to_owned(),
        shape: t.shape().to_vec(),
    };
    let [rows, cols] = <[usize; 2]>::try_from(t.shape()).map_err(|_| bad())?;
    let elem = dtype_size(t.dtype()).ok_or_else(bad)?;
    let src = t.clone();
    Ok(Tensor::lazy(t.dtype(), vec![cols, rows], move || {
        let bytes = src.bytes()?;
        let mut out = vec![0u8; bytes.len()];
        for r in 0..rows {
            for c in 0..cols {
                let from = (r * cols + c) * elem;
                let to = (c * rows + r) * elem;
                out[to..to + elem].copy_from_slice(&bytes[from..from + elem]);
            }
        }
        Ok(out)
    })?)
}

/// The base checkpoint name of a base key of a PEFT model state dict: prefix stripped,
/// wrapper levels removed (`q_proj.base_layer.weight` → `q_proj.weight`,
/// `embed_tokens.token_adapter.base_layer.weight` → `embed_tokens.weight`,
/// `lm_head.original_module.weight` → `lm_head.weight`,
/// `experts.base_layer.base_layer.gate_up_proj` → `experts.gate_up_proj`).
pub fn clean_base_key(key: &str, prompt_layout: bool) -> String {
    let rest = if prompt_layout {
        key.strip_prefix(PROMPT_BASE_PREFIX).unwrap_or(key)
    } else {
        key.strip_prefix(MODEL_PREFIX).unwrap_or(key)
    };
    let parts: Vec<&str> = rest.split('.').collect();
    let mut out: Vec<&str> = Vec::with_capacity(parts.len());
    let mut i = 0;
    while i < parts.len() {
        let p = parts[i];
        let is_last = i + 1 == parts.len();
        // Wrapper levels are never the parameter name itself (the last component).
        if !is_last
            && (p == "base_layer"
                || p == "original_module"
                || (p == "token_adapter" && parts.get(i + 1) == Some(&"base_layer")))
        {
            i += 1;
            continue;
        }
        out.push(p);
        i += 1;
    }
    out.join(".")
}

/// `<m>.modules_to_save.<name>.<param>` → `(m, name, param)`, `m` without prefix.
fn split_modules_to_save(rest: &str) -> Option<(String, String, String)> {
    let (module, tail) = rest.split_once(".modules_to_save.")?;
    let (name, param) = tail.split_once('.')?;
    (!module.is_empty() && !name.is_empty() && !param.is_empty()).then(|| {
        (
            clean_base_key(module, false),
            name.to_owned(),
            param.to_owned(),
        )
    })
}

/// Classifies every key of `state` (see the module documentation).
pub fn classify_state_dict(
    state: &StateDict,
    options: &ClassifyOptions,
) -> Result<ClassifiedStateDict, ClassifyError> {
    let spec = Spec::embedded();
    let disk_name = options
        .disk_adapter_name
        .clone()
        .unwrap_or_else(|| DEFAULT_ADAPTER_NAME.to_owned());
    let mut kinds = classify_each_key(state, spec, options.peft_type.as_deref());
    let primary = if options.peft_type.is_none() {
        settle_methods(&mut kinds, spec, &disk_name)?
    } else {
        IndexMap::new()
    };
    let layout = detect_layout(&kinds)?;
    let mut b = Builder {
        out: ClassifiedStateDict {
            layout,
            base: StateDict::new(),
            base_source_keys: IndexMap::new(),
            adapters: IndexMap::new(),
            dropped: Vec::new(),
            wrapped_modules: BTreeSet::new(),
            source: state.clone(),
        },
        options,
        primary,
        disk_name,
        prompt_layout: state.keys().any(|k| k.starts_with("prompt_encoder.")),
    };
    for (key, tensor, kind) in kinds {
        match kind {
            KeyKind::Spec(c) => b.add_spec(key, tensor, &c)?,
            KeyKind::Burn { module, role } => b.add_burn(key, tensor, &module, role)?,
            KeyKind::Other => b.add_other(key, tensor)?,
        }
    }
    let mut out = b.out;
    out.order_adapter_entries();
    // peft's order of adapters: `default` (the one `get_peft_model` creates) first, then the
    // others as they appear.
    if let Some(i) = out.adapters.get_index_of(DEFAULT_ADAPTER_NAME) {
        out.adapters.move_index(i, 0);
    }
    Ok(out)
}

/// Pass 1: every key by itself.
fn classify_each_key(
    state: &StateDict,
    spec: &Spec,
    method: Option<&str>,
) -> Vec<(String, Tensor, KeyKind)> {
    let mut kinds: Vec<(String, Tensor, KeyKind)> = Vec::with_capacity(state.len());
    for (key, t) in state {
        let kind = if let Some((module, role)) = burn_key(key) {
            KeyKind::Burn { module, role }
        } else {
            let class = match method {
                Some(m) => spec.classify_key_for(m, key),
                None => spec.classify_key(key),
            };
            match class {
                Some(c) => KeyKind::Spec(Box::new(c)),
                None => KeyKind::Other,
            }
        };
        kinds.push((key.clone(), t.clone(), kind));
    }
    kinds
}

/// Pass 2, without a known method: settles each adapter's method on its first tensor that is
/// not a trainable-token one (which peft also allows next to LoRA), and re-reads the adapter's
/// keys with that method's rules (AdaLoRA's `lora_embedding_A` looks like LoRA's). Returns
/// adapter name -> method.
fn settle_methods(
    kinds: &mut [(String, Tensor, KeyKind)],
    spec: &Spec,
    disk_name: &str,
) -> Result<IndexMap<String, String>, ClassifyError> {
    let mut primary: IndexMap<String, String> = IndexMap::new();
    for (_, _, kind) in kinds.iter() {
        if let KeyKind::Spec(c) = kind {
            let name = c
                .adapter_name
                .clone()
                .unwrap_or_else(|| disk_name.to_owned());
            let slot = primary.entry(name).or_insert_with(|| c.method.clone());
            if slot == "TRAINABLE_TOKENS" {
                *slot = c.method.clone();
            }
        }
    }
    for (key, t, kind) in kinds.iter_mut() {
        let KeyKind::Spec(c) = kind else { continue };
        let name = c
            .adapter_name
            .clone()
            .unwrap_or_else(|| disk_name.to_owned());
        let Some(method) = primary.get(&name) else {
            continue;
        };
        if &c.method == method {
            continue;
        }
        match spec.classify_key_for(method, key) {
            Some(again) => **c = again,
            None if c.method == "TRAINABLE_TOKENS" => {}
            None => {
                return Err(ClassifyError::MixedMethods {
                    origin: origin_of(t),
                    key: key.clone(),
                    adapter: name,
                    method: method.clone(),
                    found: c.method.clone(),
                })
            }
        }
    }
    Ok(primary)
}

/// The layout the key forms show; in-memory, on-disk and burn keys do not mix.
fn detect_layout(kinds: &[(String, Tensor, KeyKind)]) -> Result<StateDictLayout, ClassifyError> {
    let first_memory = kinds.iter().find_map(|(k, _, kind)| match kind {
        KeyKind::Spec(c) if c.adapter_name.is_some() => Some(k.clone()),
        _ => None,
    });
    let first_disk = kinds.iter().find_map(|(k, t, kind)| match kind {
        KeyKind::Spec(c) if c.adapter_name.is_none() => Some((k.clone(), t.clone())),
        _ => None,
    });
    let any_burn = kinds
        .iter()
        .any(|(_, _, k)| matches!(k, KeyKind::Burn { .. }));
    Ok(match (&first_memory, &first_disk, any_burn) {
        (Some(mem), Some((disk, t)), _) => {
            return Err(ClassifyError::MixedKeyForms {
                origin: origin_of(t),
                in_memory: mem.clone(),
                on_disk: disk.clone(),
            })
        }
        (Some(_), None, _) => StateDictLayout::PeftModel,
        (None, Some(_), false) => StateDictLayout::PeftAdapter,
        (None, Some((disk, t)), true) => {
            return Err(ClassifyError::MixedKeyForms {
                origin: origin_of(t),
                in_memory: "a burn `.lora.a` key".into(),
                on_disk: disk.clone(),
            })
        }
        (None, None, true) => StateDictLayout::Burn,
        (None, None, false) => StateDictLayout::Base,
    })
}

/// Pass 3: every classified key into the base or an adapter.
struct Builder<'a> {
    out: ClassifiedStateDict,
    options: &'a ClassifyOptions,
    /// Adapter name -> method settled in pass 2.
    primary: IndexMap<String, String>,
    /// The name of adapters whose keys carry none.
    disk_name: String,
    /// Prompt learning: the transformers model sits one level higher.
    prompt_layout: bool,
}

impl Builder<'_> {
    /// Creates adapter `name` on first use. Its method: the config's, else the one settled in
    /// pass 2, else `method` (the key's own).
    fn adapter(&mut self, name: &str, method: &str) -> &mut AdapterTensors {
        if !self.out.adapters.contains_key(name) {
            let method = self
                .options
                .peft_type
                .as_deref()
                .or(self.primary.get(name).map(String::as_str))
                .unwrap_or(method);
            self.out
                .adapters
                .insert(name.to_owned(), AdapterTensors::new(name, method));
        }
        &mut self.out.adapters[name]
    }

    /// The method of keys that do not name one (modules_to_save, replacements): LoRA unless
    /// the options say otherwise.
    fn default_method(&self) -> String {
        self.options
            .peft_type
            .clone()
            .unwrap_or_else(|| LORA.to_owned())
    }

    fn add_spec(&mut self, key: String, tensor: Tensor, c: &KeyClass) -> Result<(), ClassifyError> {
        let name = c
            .adapter_name
            .clone()
            .unwrap_or_else(|| self.disk_name.clone());
        let method = self
            .options
            .peft_type
            .clone()
            .unwrap_or_else(|| c.method.clone());
        let entry = AdapterEntry {
            source_key: key,
            kind: EntryKind::Adapter {
                role: c.role.clone(),
                module: c.module_path.clone(),
            },
            tensor,
        };
        self.adapter(&name, &method)
            .insert(c.disk_key.clone(), entry)
    }

    fn add_burn(
        &mut self,
        key: String,
        tensor: Tensor,
        module: &str,
        role: &str,
    ) -> Result<(), ClassifyError> {
        let disk_name = self.disk_name.clone();
        self.adapter(&disk_name, LORA);
        let tensor = transposed(&tensor, &key)?;
        let suffix = if role == "a" { "lora_A" } else { "lora_B" };
        let entry = AdapterEntry {
            source_key: key,
            kind: EntryKind::Adapter {
                role: role.to_owned(),
                module: Some(module.to_owned()),
            },
            tensor,
        };
        self.adapter(&disk_name, LORA)
            .insert(format!("{MODEL_PREFIX}{module}.{suffix}.weight"), entry)
    }

    /// A key no method's rules claim: a base parameter, or (by layout) a modules_to_save copy
    /// or a replacement tensor of an adapter file.
    fn add_other(&mut self, key: String, tensor: Tensor) -> Result<(), ClassifyError> {
        match self.out.layout {
            StateDictLayout::PeftModel => self.add_peft_model_other(key, tensor),
            StateDictLayout::PeftAdapter if key.starts_with(MODEL_PREFIX) => {
                let method = self.default_method();
                let disk_name = self.disk_name.clone();
                let base_key = clean_base_key(&key, false);
                let entry = AdapterEntry {
                    source_key: key.clone(),
                    kind: EntryKind::Replacement { base_key },
                    tensor,
                };
                self.adapter(&disk_name, &method).insert(key, entry)
            }
            layout => {
                let clean = if layout == StateDictLayout::Burn {
                    key.clone()
                } else {
                    clean_base_key(&key, false)
                };
                self.out.add_base(clean, key, tensor)
            }
        }
    }

    fn add_peft_model_other(&mut self, key: String, tensor: Tensor) -> Result<(), ClassifyError> {
        let prompt_layout = self.prompt_layout;
        if prompt_layout && (key == "word_embeddings.weight" || key.starts_with("word_embeddings."))
        {
            // PeftModel registers the input embedding a second time as `word_embeddings`; it
            // is the same storage as the base's.
            self.out.dropped.push(key);
            return Ok(());
        }
        // Prompt learning wraps the transformers model one level higher.
        let prefix = if prompt_layout {
            PROMPT_BASE_PREFIX
        } else {
            MODEL_PREFIX
        };
        let rest = key.strip_prefix(prefix).unwrap_or(&key);
        if let Some((module, name, param)) = split_modules_to_save(rest) {
            let method = self.default_method();
            let entry = AdapterEntry {
                source_key: key.clone(),
                kind: EntryKind::ModulesToSave {
                    module: module.clone(),
                    param: param.clone(),
                },
                tensor,
            };
            return self
                .adapter(&name, &method)
                .insert(format!("{prefix}{module}.{param}"), entry);
        }
        if !prompt_layout {
            if let Some((m, _)) = rest.split_once(".base_layer.") {
                self.out.wrapped_modules.insert(clean_base_key(m, false));
            }
        }
        self.out
            .add_base(clean_base_key(&key, prompt_layout), key, tensor)
    }
}

impl ClassifiedStateDict {
    fn add_base(
        &mut self,
        clean: String,
        key: String,
        tensor: Tensor,
    ) -> Result<(), ClassifyError> {
        if let Some(prev) = self.base_source_keys.get(&clean) {
            return Err(ClassifyError::Duplicate {
                origin: origin_of(&tensor),
                adapter: "(base)".into(),
                first: prev.clone(),
                second: key,
                disk_key: clean,
            });
        }
        self.base_source_keys.insert(clean.clone(), key);
        self.base.insert(clean, tensor);
        Ok(())
    }

    /// peft's `get_peft_model_state_dict` order: the method's tensors first, then the auxiliary
    /// wrappers (`modules_to_save`, trainable tokens), then everything else.
    fn order_adapter_entries(&mut self) {
        for a in self.adapters.values_mut() {
            let rank = |e: &AdapterEntry| match &e.kind {
                EntryKind::Adapter { role, .. } if role == "trainable_tokens" => 1,
                EntryKind::Adapter { .. } => 0,
                EntryKind::ModulesToSave { .. } => 1,
                EntryKind::Replacement { .. } => 2,
            };
            a.entries.sort_by(|_, x, _, y| rank(x).cmp(&rank(y)));
        }
    }

    /// The input state dict.
    pub fn source(&self) -> &StateDict {
        &self.source
    }

    /// Adapter names, in order.
    pub fn adapter_names(&self) -> Vec<String> {
        self.adapters.keys().cloned().collect()
    }

    /// The adapter `name`, or the only one when `name` is `None`.
    pub fn adapter(&self, name: Option<&str>) -> Result<&AdapterTensors, ClassifyError> {
        let found = || {
            if self.adapters.is_empty() {
                "none".to_owned()
            } else {
                self.adapter_names().join(", ")
            }
        };
        match name {
            Some(n) => self
                .adapters
                .get(n)
                .ok_or_else(|| ClassifyError::UnknownAdapter {
                    name: n.to_owned(),
                    found: found(),
                }),
            None if self.adapters.len() == 1 => {
                self.adapters
                    .values()
                    .next()
                    .ok_or_else(|| ClassifyError::UnknownAdapter {
                        name: DEFAULT_ADAPTER_NAME.into(),
                        found: found(),
                    })
            }
            None => Err(ClassifyError::AmbiguousAdapter { found: found() }),
        }
    }

    /// Every module name of the base model that the tensors reveal: each prefix of a base
    /// parameter name, every adapted module, every `modules_to_save` module (no root `""`).
    pub fn module_names(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut add_prefixes = |name: &str, include_self: bool| {
            for (i, _) in name.match_indices('.') {
                out.insert(name[..i].to_owned());
            }
            if include_self && !name.is_empty() {
                out.insert(name.to_owned());
            }
        };
        for k in self.base.keys() {
            add_prefixes(k, false);
        }
        for a in self.adapters.values() {
            for m in a.modules().keys() {
                add_prefixes(m, true);
            }
            for m in a.modules_to_save() {
                add_prefixes(&m, true);
            }
        }
        out
    }

    /// The tensors peft's `save_pretrained` writes for adapter `name` under `config`: the
    /// adapter's own tensors, plus (PEFT model state dicts only) the embeddings that
    /// `save_embedding_layers="auto"` adds when an embedding is targeted, and the biases of
    /// `bias="all"` / `"lora_only"` — all under the keys peft gives them.
    pub fn adapter_for_save(
        &self,
        name: &str,
        config: &AdapterConfig,
    ) -> Result<AdapterTensors, ClassifyError> {
        let mut out = self.adapter(Some(name))?.clone();
        if self.layout != StateDictLayout::PeftModel {
            return Ok(out);
        }
        let others: Vec<&String> = self.adapters.keys().filter(|n| *n != name).collect();
        // peft's `_filter_state_dict_for_adapter_name`.
        let belongs_to_other = |key: &str| {
            others
                .iter()
                .any(|o| key.contains(&format!(".{o}.")) || key.ends_with(&format!(".{o}")))
        };
        let mut extra: Vec<(String, String, Tensor)> = Vec::new();
        if let Some(lora) = config.as_lora() {
            match lora.bias.as_str() {
                "all" => {
                    for (k, t) in &self.source {
                        if (k == "bias" || k.ends_with(".bias")) && !belongs_to_other(k) {
                            extra.push((k.clone(), remove_adapter_name(k, name), t.clone()));
                        }
                    }
                }
                "lora_only" => {
                    for m in &self.wrapped_modules {
                        let k = format!("{MODEL_PREFIX}{m}.base_layer.bias");
                        if let Some(t) = self.source.get(&k) {
                            extra.push((k.clone(), k, t.clone()));
                        }
                    }
                }
                _ => {}
            }
        }
        if self.embedding_is_targeted(config)? && !uses_trainable_tokens(config) {
            for emb in self.embedding_modules() {
                if !self.wrapped_modules.contains(&emb) {
                    continue;
                }
                let prefix = format!("{MODEL_PREFIX}{emb}.base_layer.");
                for (k, t) in &self.source {
                    if k.starts_with(&prefix) {
                        extra.push((k.clone(), remove_adapter_name(k, name), t.clone()));
                    }
                }
            }
        }
        for (source_key, disk_key, tensor) in extra {
            if out.entries.contains_key(&disk_key) {
                continue; // `bias="all"` re-adds `lora_B.bias`, already present.
            }
            let base_key = clean_base_key(&source_key, false);
            out.entries.insert(
                disk_key,
                AdapterEntry {
                    source_key,
                    kind: EntryKind::Replacement { base_key },
                    tensor,
                },
            );
        }
        Ok(out)
    }

    /// peft's `embedding_is_targeted` of `get_peft_model_state_dict`.
    fn embedding_is_targeted(&self, config: &AdapterConfig) -> Result<bool, ClassifyError> {
        let rules = config.target_rules()?;
        Ok(match &rules.target_modules {
            Some(TargetModules::Regex(s)) if !s.eq_ignore_ascii_case(ALL_LINEAR) => {
                let re = PyRegex::fullmatch(s).map_err(|source| TargetingError::Regex {
                    field: "target_modules".into(),
                    source,
                })?;
                let mut hit = false;
                for m in self.module_names() {
                    let last = m.rsplit('.').next().unwrap_or(&m);
                    if EMBEDDING_LAYER_NAMES.contains(&last) && re.is_match(&m).unwrap_or(false) {
                        hit = true;
                        break;
                    }
                }
                hit
            }
            Some(TargetModules::Names(v)) => EMBEDDING_LAYER_NAMES
                .iter()
                .any(|e| v.iter().any(|t| t == e)),
            _ => false,
        })
    }

    /// The input and output embedding modules, by name (peft asks the model; peftkit uses the
    /// names transformers gives them: [`INPUT_EMBEDDING_NAMES`], [`OUTPUT_EMBEDDING_NAMES`]).
    fn embedding_modules(&self) -> Vec<String> {
        let names = self.module_names();
        let last = |m: &str| m.rsplit('.').next().unwrap_or(m).to_owned();
        let mut out = Vec::new();
        if let Some(m) = names
            .iter()
            .find(|m| INPUT_EMBEDDING_NAMES.contains(&last(m).as_str()))
        {
            out.push(m.clone());
        }
        if let Some(m) = names
            .iter()
            .find(|m| OUTPUT_EMBEDDING_NAMES.contains(&last(m).as_str()))
        {
            out.push(m.clone());
        }
        out
    }
}

fn uses_trainable_tokens(config: &AdapterConfig) -> bool {
    config.peft_type() == "TRAINABLE_TOKENS"
        || config
            .as_lora()
            .is_some_and(|l| l.trainable_token_indices.is_some())
}
