//! The config values that decide which modules get an adapter, shared by every method's config.
//! They live here, not in `config`, so that targeting needs nothing from the config types.

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
        matches!(self, TargetModules::Regex(s) if s.eq_ignore_ascii_case(super::ALL_LINEAR))
    }

    /// The names, for the list form.
    pub fn names(&self) -> Option<&[String]> {
        match self {
            TargetModules::Names(v) => Some(v),
            TargetModules::Regex(_) => None,
        }
    }
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
}

/// `layers_to_transform`: one layer index or a list of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayersToTransform {
    /// One index.
    One(i64),
    /// Several indices (an empty list means "all layers").
    Many(Vec<i64>),
}

/// The fields that decide which modules get an adapter, from any method's config.
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
