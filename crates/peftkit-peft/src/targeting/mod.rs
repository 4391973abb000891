//! peft's module-targeting rules (which modules get an adapter, with which rank, alpha and
//! scaling), reimplemented from `peft/tuners/tuners_utils.py` and `peft/utils/other.py` of
//! peft 0.21.2.
//!
//! Every pattern in an adapter config is a *Python* `re` pattern, compiled with
//! [`PyRegex`].
//!
//! ```
//! use peftkit_peft::LoraConfig;
//! use peftkit_peft::TargetMatcher;
//!
//! let config = LoraConfig::from_json_str(
//!     r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16,
//!         "target_modules": ["q_proj", "v_proj"],
//!         "rank_pattern": {"v_proj": 4}}"#,
//! )
//! .unwrap()
//! .0;
//! let matcher = TargetMatcher::for_lora(&config).unwrap();
//! assert!(matcher.is_target("model.layers.0.self_attn.q_proj").unwrap());
//! assert!(!matcher.is_target("model.layers.0.self_attn.k_proj").unwrap());
//! assert_eq!(config.rank_for("model.layers.3.self_attn.v_proj").unwrap(), 4);
//! ```

use std::collections::{BTreeSet, HashSet};

use serde_json::Number;

use crate::py::{name_matches_suffix, PyRegex, RegexError};
use crate::scaling::lora_scaling;

mod rules;

pub use rules::{LayersToTransform, StringOrList, TargetModules, TargetRules};

/// peft's `MIN_TARGET_MODULES_FOR_OPTIMIZATION`: list targets with at least this many entries are
/// compressed to minimal suffixes before the config is saved.
pub const MIN_TARGET_MODULES_FOR_OPTIMIZATION: usize = 20;

/// peft's `INCLUDE_LINEAR_LAYERS_SHORTHAND` (compared case-insensitively, as peft does).
pub const ALL_LINEAR: &str = "all-linear";

/// Errors of the targeting rules.
#[derive(Debug, thiserror::Error)]
pub enum TargetingError {
    /// A pattern from the config could not be compiled or evaluated.
    #[error("in `{field}`: {source}")]
    Regex {
        /// The config field the pattern came from (`target_modules`, `rank_pattern`, ...).
        field: String,
        /// What went wrong.
        #[source]
        source: RegexError,
    },
    /// `target_modules` is `"all-linear"`: which modules that selects depends on the module
    /// *types* of the model, which a name-only matcher cannot see. peft replaces the value with
    /// the full module names before saving, so saved configs never contain it.
    #[error(
        "target_modules is \"all-linear\", which must be resolved against the model's linear layers first"
    )]
    UnresolvedAllLinear,
    /// Neither `target_modules` nor `target_parameters` is set: peft fills `target_modules` from
    /// its per-model-type defaults (see `Spec::default_target_modules`) before matching.
    #[error("target_modules is null: resolve the model type's default target modules first")]
    NoTargetModules,
    /// `_find_minimal_target_modules` precondition: an empty target list or an empty name.
    #[error("target modules must be a non-empty list of non-empty names")]
    EmptyTargets,
    /// `_find_minimal_target_modules` precondition: a name is both a target and a non-target.
    #[error("module {0:?} is listed both as a target and as a non-target module")]
    OverlappingTargets(String),
    /// A rank found through `rank_pattern` (or `r`) is not a positive integer.
    #[error("rank for module {module:?} is {value}, not a positive integer")]
    InvalidRank {
        /// The module whose rank was looked up.
        module: String,
        /// The offending value as written in the config.
        value: String,
    },
    /// An alpha found through `alpha_pattern` (or `lora_alpha`) is not a finite number.
    #[error("alpha for module {module:?} is {value}, not a finite number")]
    InvalidAlpha {
        /// The module whose alpha was looked up.
        module: String,
        /// The offending value as written in the config.
        value: String,
    },
}

/// Outcome of [`TargetMatcher::check`], mirroring peft's `check_target_module_exists`, which
/// distinguishes "excluded" from "not matched" for its error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetMatch {
    /// The module gets an adapter.
    Targeted,
    /// The module matches no target (or its layer index is not selected).
    NotTargeted,
    /// The module is excluded by `exclude_modules` or because it is in `modules_to_save`.
    Excluded,
}

#[derive(Debug, Clone)]
enum CompiledTargets {
    Regex(PyRegex),
    List(Vec<String>),
}

#[derive(Debug, Clone)]
enum LayerSelection {
    One(i64),
    Many(HashSet<i64>),
}

impl LayerSelection {
    fn contains(&self, idx: i64) -> bool {
        match self {
            LayerSelection::One(one) => *one == idx,
            LayerSelection::Many(set) => set.contains(&idx),
        }
    }
}

/// peft's `check_target_module_exists` with every pattern compiled once, for matching many module
/// names (`named_modules()` names *without* the `base_model.model.` prefix).
#[derive(Debug, Clone)]
pub struct TargetMatcher {
    exclude: Option<CompiledTargets>,
    modules_to_save: Vec<PyRegex>,
    targets: Option<CompiledTargets>,
    all_linear: bool,
    has_target_parameters: bool,
    target_parameters: Vec<String>,
    layers: Option<LayerSelection>,
    layer_index_patterns: Vec<PyRegex>,
}

fn regex_err(field: &str) -> impl Fn(RegexError) -> TargetingError + '_ {
    move |source| TargetingError::Regex {
        field: field.to_owned(),
        source,
    }
}

impl TargetMatcher {
    /// Compiles targeting rules (see [`TargetRules`], also obtainable from non-LoRA configs with
    /// `AdapterConfig::target_rules`).
    pub fn new(rules: &TargetRules) -> Result<Self, TargetingError> {
        let exclude = match &rules.exclude_modules {
            None => None,
            Some(TargetModules::Regex(p)) => Some(CompiledTargets::Regex(
                PyRegex::fullmatch(p).map_err(regex_err("exclude_modules"))?,
            )),
            // An empty list is falsy in peft: no exclusion at all.
            Some(TargetModules::Names(names)) if names.is_empty() => None,
            Some(TargetModules::Names(names)) => Some(CompiledTargets::List(names.clone())),
        };
        // peft inserts each entry into the pattern unescaped: entries are regex fragments.
        let modules_to_save = rules
            .modules_to_save
            .iter()
            .flatten()
            .map(|m| PyRegex::match_start(&format!(r"(^|.*\.){m}($|\..*)")))
            .collect::<Result<Vec<_>, _>>()
            .map_err(regex_err("modules_to_save"))?;
        let mut all_linear = false;
        let targets = match &rules.target_modules {
            None => None,
            Some(TargetModules::Regex(p)) if p.eq_ignore_ascii_case(ALL_LINEAR) => {
                all_linear = true;
                None
            }
            Some(TargetModules::Regex(p)) => Some(CompiledTargets::Regex(
                PyRegex::fullmatch(p).map_err(regex_err("target_modules"))?,
            )),
            Some(TargetModules::Names(names)) => Some(CompiledTargets::List(names.clone())),
        };
        let layers = match &rules.layers_to_transform {
            None => None,
            Some(LayersToTransform::One(i)) => Some(LayerSelection::One(*i)),
            // An empty list means "all layers" in peft.
            Some(LayersToTransform::Many(v)) if v.is_empty() => None,
            Some(LayersToTransform::Many(v)) => {
                Some(LayerSelection::Many(v.iter().copied().collect()))
            }
        };
        // peft 0.21 uses lazy `.*?` so the *first* numbered component is the layer index (a
        // greedy `.*` picked the expert index of MoE names like `layers.1.experts.0`).
        let layer_patterns: Vec<String> = match &rules.layers_pattern {
            Some(StringOrList::One(p)) if !p.is_empty() => vec![p.clone()],
            Some(StringOrList::Many(v)) if !v.is_empty() => v.clone(),
            _ => Vec::new(),
        };
        let layer_index_patterns = if layer_patterns.is_empty() {
            vec![PyRegex::match_start(r".*?\.[^.]*\.(?P<idx>\d+)\.")
                .map_err(regex_err("layers_to_transform"))?]
        } else {
            layer_patterns
                .iter()
                .map(|p| PyRegex::match_start(&format!(r"(?:^|.*?\.){p}\.(?P<idx>\d+)\.")))
                .collect::<Result<Vec<_>, _>>()
                .map_err(regex_err("layers_pattern"))?
        };
        let target_parameters = match &rules.target_parameters {
            Some(StringOrList::Many(v)) => v.clone(),
            Some(StringOrList::One(s)) => vec![s.clone()],
            None => Vec::new(),
        };
        Ok(Self {
            exclude,
            modules_to_save,
            targets,
            all_linear,
            has_target_parameters: rules.target_parameters.is_some(),
            target_parameters,
            layers,
            layer_index_patterns,
        })
    }

    /// Whether `module_name` gets an adapter (`bool(check_target_module_exists(config, name))`).
    pub fn is_target(&self, module_name: &str) -> Result<bool, TargetingError> {
        Ok(self.check(module_name)? == TargetMatch::Targeted)
    }

    /// peft's `check_target_module_exists`, in peft's order: exclusions first, then
    /// `modules_to_save`, then the targets, then the layer-index filter (list targets only).
    pub fn check(&self, module_name: &str) -> Result<TargetMatch, TargetingError> {
        let excluded = match &self.exclude {
            Some(CompiledTargets::Regex(re)) => re
                .is_match(module_name)
                .map_err(regex_err("exclude_modules"))?,
            Some(CompiledTargets::List(names)) => {
                names.iter().any(|e| name_matches_suffix(module_name, e))
            }
            None => false,
        };
        if excluded {
            return Ok(TargetMatch::Excluded);
        }
        for re in &self.modules_to_save {
            if re
                .is_match(module_name)
                .map_err(regex_err("modules_to_save"))?
            {
                return Ok(TargetMatch::Excluded);
            }
        }
        if self.all_linear {
            return Err(TargetingError::UnresolvedAllLinear);
        }
        let targets = match &self.targets {
            Some(t) => t,
            // Targeting parameters only: no module is targeted by name.
            None if self.has_target_parameters => return Ok(TargetMatch::NotTargeted),
            None => return Err(TargetingError::NoTargetModules),
        };
        let found = match targets {
            CompiledTargets::Regex(re) => re
                .is_match(module_name)
                .map_err(regex_err("target_modules"))?,
            // A name listed in full is taken as is: the layer filter applies to suffix matches
            // only (peft's `elif key in config.target_modules` branch).
            CompiledTargets::List(names) if names.iter().any(|t| t == module_name) => true,
            CompiledTargets::List(names) => {
                let suffix_found = names
                    .iter()
                    .any(|t| module_name.ends_with(&format!(".{t}")));
                if suffix_found {
                    self.layer_selected(module_name)?
                } else {
                    false
                }
            }
        };
        Ok(if found {
            TargetMatch::Targeted
        } else {
            TargetMatch::NotTargeted
        })
    }

    fn layer_selected(&self, module_name: &str) -> Result<bool, TargetingError> {
        let Some(layers) = &self.layers else {
            return Ok(true);
        };
        let mut index = None;
        // As in peft: patterns are tried in order and the first one that matches decides.
        for re in &self.layer_index_patterns {
            if let Some(idx) = re
                .named_group(module_name, "idx")
                .map_err(regex_err("layers_pattern"))?
            {
                index = Some(idx);
                break;
            }
        }
        // A digit run that does not fit i64 cannot be a selected layer.
        Ok(index
            .and_then(|s| s.parse::<i64>().ok())
            .is_some_and(|i| layers.contains(i)))
    }

    /// Whether parameter `param_name` of module `module_name` is targeted through
    /// `target_parameters` (LoRA `ParamWrapper`): `"<module>.<param>"` equals an entry or ends
    /// with `"." + entry`.
    pub fn is_target_parameter(&self, module_name: &str, param_name: &str) -> bool {
        let key = format!("{module_name}.{param_name}");
        self.target_parameters
            .iter()
            .any(|t| name_matches_suffix(&key, t))
    }
}

/// Resolves `rank_pattern` / `alpha_pattern` for module names, with the patterns compiled once.
///
/// peft's `get_pattern_key`: the **first** key, in the order the config holds them (file order),
/// for which `re.match(rf"(.*\.)?({key})$", module_name)` matches; no match → `r` /
/// `lora_alpha`.
#[derive(Debug, Clone)]
pub struct PatternResolver {
    r: Number,
    lora_alpha: Number,
    use_rslora: bool,
    rank_patterns: Vec<(PyRegex, Number)>,
    alpha_patterns: Vec<(PyRegex, Number)>,
}

fn compile_patterns(
    field: &str,
    patterns: Option<&indexmap::IndexMap<String, Number>>,
) -> Result<Vec<(PyRegex, Number)>, TargetingError> {
    patterns
        .into_iter()
        .flatten()
        .map(|(key, value)| {
            PyRegex::match_start(&format!(r"(.*\.)?({key})$"))
                .map(|re| (re, value.clone()))
                .map_err(regex_err(field))
        })
        .collect()
}

impl PatternResolver {
    /// Compiles `rank_pattern` / `alpha_pattern` with their defaults `r` / `lora_alpha`
    /// (`PatternResolver::new` takes them from a LoRA config).
    pub fn from_parts(
        r: u64,
        lora_alpha: &Number,
        use_rslora: bool,
        rank_pattern: Option<&indexmap::IndexMap<String, Number>>,
        alpha_pattern: Option<&indexmap::IndexMap<String, Number>>,
    ) -> Result<Self, TargetingError> {
        Ok(Self {
            r: Number::from(r),
            lora_alpha: lora_alpha.clone(),
            use_rslora,
            rank_patterns: compile_patterns("rank_pattern", rank_pattern)?,
            alpha_patterns: compile_patterns("alpha_pattern", alpha_pattern)?,
        })
    }

    fn lookup<'a>(
        &'a self,
        field: &str,
        patterns: &'a [(PyRegex, Number)],
        default: &'a Number,
        module_name: &str,
    ) -> Result<&'a Number, TargetingError> {
        for (re, value) in patterns {
            if re.is_match(module_name).map_err(regex_err(field))? {
                return Ok(value);
            }
        }
        Ok(default)
    }

    /// The rank peft uses for `module_name`.
    pub fn rank_for(&self, module_name: &str) -> Result<u64, TargetingError> {
        let value = self.lookup("rank_pattern", &self.rank_patterns, &self.r, module_name)?;
        value
            .as_u64()
            .filter(|r| *r > 0)
            .ok_or_else(|| TargetingError::InvalidRank {
                module: module_name.to_owned(),
                value: value.to_string(),
            })
    }

    /// The alpha peft uses for `module_name` (int or float in the config, as `f64`).
    pub fn alpha_for(&self, module_name: &str) -> Result<f64, TargetingError> {
        let value = self.lookup(
            "alpha_pattern",
            &self.alpha_patterns,
            &self.lora_alpha,
            module_name,
        )?;
        value
            .as_f64()
            .filter(|a| a.is_finite())
            .ok_or_else(|| TargetingError::InvalidAlpha {
                module: module_name.to_owned(),
                value: value.to_string(),
            })
    }

    /// The scaling factor peft multiplies the delta with, as the `f32` PyTorch uses.
    pub fn scaling_for(&self, module_name: &str) -> Result<f32, TargetingError> {
        let (alpha, r) = (self.alpha_for(module_name)?, self.rank_for(module_name)?);
        // `rank_for` already refuses 0; the error path only keeps this free of panics.
        lora_scaling(alpha, r as usize, self.use_rslora, 1.0).map_err(|_| {
            TargetingError::InvalidRank {
                module: module_name.to_owned(),
                value: r.to_string(),
            }
        })
    }
}

/// The dot-separated suffixes of `name`, shortest first (`"a.b.c"` → `["c", "b.c", "a.b.c"]`).
fn suffixes_shortest_first(name: &str) -> Vec<&str> {
    let mut out = vec![name];
    out.extend(name.match_indices('.').map(|(i, _)| &name[i + 1..]));
    out.reverse();
    out
}

/// peft's `_find_minimal_target_modules`: a small set of name suffixes that selects every name in
/// `targets` (by peft's `key == t or key.endswith("." + t)` rule) and no name in `other_names`.
///
/// Greedy, like peft: targets are visited in the order of their suffix lists (shortest suffix
/// first, compared lexicographically), and each target that no chosen suffix covers yet adds its
/// shortest suffix that no other module shares. When nothing could be chosen the targets are
/// returned unchanged. peft returns a Python `set`; a sorted set is returned here.
///
/// ```
/// use peftkit_peft::minimal_target_suffixes;
/// let targets: Vec<String> = (0..3)
///     .flat_map(|i| ["q_proj", "v_proj"].map(|p| format!("model.layers.{i}.self_attn.{p}")))
///     .collect();
/// let others = vec!["model.layers.0.self_attn.k_proj".to_string()];
/// let min = minimal_target_suffixes(&targets, &others).unwrap();
/// assert_eq!(min.into_iter().collect::<Vec<_>>(), ["q_proj", "v_proj"]);
/// ```
pub fn minimal_target_suffixes<S: AsRef<str>, T: AsRef<str>>(
    targets: &[S],
    other_names: &[T],
) -> Result<BTreeSet<String>, TargetingError> {
    let targets: BTreeSet<&str> = targets.iter().map(AsRef::as_ref).collect();
    if targets.is_empty() || targets.contains("") {
        return Err(TargetingError::EmptyTargets);
    }
    let others: HashSet<&str> = other_names.iter().map(AsRef::as_ref).collect();
    if let Some(both) = targets.iter().find(|t| others.contains(*t)) {
        return Err(TargetingError::OverlappingTargets((*both).to_owned()));
    }
    let other_suffixes: HashSet<&str> = others
        .iter()
        .flat_map(|name| suffixes_shortest_first(name))
        .collect();
    let mut by_suffixes: Vec<(Vec<&str>, &str)> = targets
        .iter()
        .map(|t| (suffixes_shortest_first(t), *t))
        .collect();
    // Python sorts the (item, suffixes) pairs by the suffix lists; equal lists are impossible
    // because the last element of each list is the (unique) full name.
    by_suffixes.sort();
    let mut required: BTreeSet<String> = BTreeSet::new();
    for (suffixes, item) in &by_suffixes {
        for suffix in suffixes {
            if required.contains(*suffix) || other_suffixes.contains(suffix) {
                continue;
            }
            let covered = required
                .iter()
                .any(|req| item.ends_with(&format!(".{req}")));
            if !covered {
                required.insert((*suffix).to_owned());
                break;
            }
        }
    }
    if required.is_empty() {
        return Ok(targets.iter().map(|t| (*t).to_owned()).collect());
    }
    Ok(required)
}

/// The compression peft applies to list `target_modules` before matching (and therefore before
/// saving): with at least [`MIN_TARGET_MODULES_FOR_OPTIMIZATION`] entries, the modules of the
/// model *not* selected by the list are computed from `all_module_names` (every `named_modules()`
/// name), and the minimal suffixes replace the list if they are fewer. Returns `None` when peft
/// would keep the list unchanged. peft skips this step for IA3: callers check the method's
/// `MethodSpec::minimize_target_modules` first.
pub fn compress_target_modules<S: AsRef<str>, T: AsRef<str>>(
    targets: &[S],
    all_module_names: &[T],
) -> Result<Option<BTreeSet<String>>, TargetingError> {
    let distinct: BTreeSet<&str> = targets.iter().map(AsRef::as_ref).collect();
    if distinct.len() < MIN_TARGET_MODULES_FOR_OPTIMIZATION {
        return Ok(None);
    }
    let others: Vec<&str> = all_module_names
        .iter()
        .map(AsRef::as_ref)
        .filter(|name| !distinct.iter().any(|t| name_matches_suffix(name, t)))
        .collect();
    let minimal = minimal_target_suffixes(&distinct.iter().copied().collect::<Vec<_>>(), &others)?;
    Ok((minimal.len() < distinct.len()).then_some(minimal))
}

#[cfg(test)]
mod tests;
