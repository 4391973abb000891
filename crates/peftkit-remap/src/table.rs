//! Conversion tables as data: the JSON schema of `adapters-spec/conversions/*.json` and the
//! tables embedded at build time. Pure data: nothing here compiles or runs a rule (that is
//! `engine`, reached through `registry`).
//!
//! The schema is documented in `adapters-spec/conversions/README.md`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{RemapError, Result};

/// One or several patterns (a JSON string or array of strings).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Patterns {
    /// A single pattern.
    One(String),
    /// Several patterns, tried longest first.
    Many(Vec<String>),
}

impl Patterns {
    /// The patterns as a list.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            Patterns::One(p) => vec![p.clone()],
            Patterns::Many(v) => v.clone(),
        }
    }
}

/// A rename: the same tensor under another name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenameSpec {
    /// The name fragment(s) on disk (original layout).
    pub original: Patterns,
    /// The name fragment(s) in the transformers v5 layout.
    pub v5: Patterns,
}

/// A size in a `split`/`concat` op: a number, or a product of `config.json` fields and numbers
/// written as `"num_key_value_heads*head_dim"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SizeExpr {
    /// A fixed size.
    Fixed(usize),
    /// A product of config fields (dotted paths allowed) and integers.
    Config(String),
}

/// A tensor op, in the forward direction (on disk -> v5). Each has an exact inverse, applied in
/// reverse order when saving in the original layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    /// Stack a module list (one tensor per expert) along a new dim `dim`
    /// (transformers `MergeModulelist`). Inverse: `unstack`.
    Stack {
        /// The new dim.
        dim: usize,
    },
    /// Split dim `dim` into one tensor per index and drop it (transformers
    /// `SplitModulelist`); the outputs are named by replacing `*` with the index. Inverse:
    /// `stack`.
    Unstack {
        /// The dim removed.
        dim: usize,
    },
    /// Concatenate the tensors of all patterns, in pattern order, along `dim`
    /// (transformers `Concatenate`). Inverse: `chunk` into equal parts, or `split` with
    /// `sizes` when given.
    Concat {
        /// The dim joined along.
        dim: usize,
        /// Sizes of the parts along `dim`, when they differ (the inverse then splits with them).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sizes: Option<Vec<SizeExpr>>,
    },
    /// Cut one tensor into as many equal parts as there are target patterns
    /// (transformers `Chunk`). Inverse: `concat`.
    Chunk {
        /// The dim cut along.
        dim: usize,
    },
    /// Cut one tensor into parts of the given sizes, one per target pattern
    /// (transformers `Split`, whose sizes come from the model's parameters). Inverse: `concat`.
    Split {
        /// The dim cut along.
        dim: usize,
        /// Size of each part.
        sizes: Vec<SizeExpr>,
    },
    /// Swap two dims (transformers `Transpose`). Inverse: the same swap.
    Transpose {
        /// First dim.
        dim0: usize,
        /// Second dim.
        dim1: usize,
    },
}

impl Op {
    /// The op that undoes this one.
    ///
    /// ```
    /// use peftkit_remap::Op;
    /// assert_eq!(Op::Stack { dim: 0 }.inverse(), Op::Unstack { dim: 0 });
    /// assert_eq!(Op::Concat { dim: 1, sizes: None }.inverse(), Op::Chunk { dim: 1 });
    /// assert_eq!(Op::Transpose { dim0: 1, dim1: 2 }.inverse(), Op::Transpose { dim0: 2, dim1: 1 });
    /// ```
    pub fn inverse(&self) -> Op {
        match self {
            Op::Stack { dim } => Op::Unstack { dim: *dim },
            Op::Unstack { dim } => Op::Stack { dim: *dim },
            Op::Concat { dim, sizes: None } => Op::Chunk { dim: *dim },
            Op::Concat {
                dim,
                sizes: Some(sizes),
            } => Op::Split {
                dim: *dim,
                sizes: sizes.clone(),
            },
            Op::Chunk { dim } => Op::Concat {
                dim: *dim,
                sizes: None,
            },
            Op::Split { dim, sizes } => Op::Concat {
                dim: *dim,
                sizes: Some(sizes.clone()),
            },
            Op::Transpose { dim0, dim1 } => Op::Transpose {
                dim0: *dim1,
                dim1: *dim0,
            },
        }
    }
}

/// A group of tensors converted together by a list of ops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConvertSpec {
    /// Name fragments on disk; `*` stands for the expert index.
    pub original: Patterns,
    /// Name fragments in v5.
    pub v5: Patterns,
    /// Ops from the original tensors to the v5 tensors.
    pub ops: Vec<Op>,
}

/// When a rule is undone on save.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReversePolicy {
    /// Always (the model's own mapping).
    #[default]
    Always,
    /// Only when the rule matched at load: transformers' `PrefixChange` and the `legacy`
    /// renames, which cannot know from v5 names whether the original had the fragment.
    IfUsed,
}

/// One rule of a table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// A rename.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rename: Option<RenameSpec>,
    /// A tensor op group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub convert: Option<ConvertSpec>,
    /// Name prefixes the rule is limited to, tried in order: the pattern is searched in what
    /// follows the first prefix the name starts with, and the prefix is kept (transformers'
    /// `scope_prefix` of a sub-model's transforms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Vec<String>>,
    /// When the rule is undone on save.
    #[serde(default)]
    pub reverse: ReversePolicy,
    /// Free text for readers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One conversion table (one JSON file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConversionTable {
    /// Name of the table; also the `model_type` it serves.
    pub name: String,
    /// The transformers version the table follows.
    pub transformers_version: String,
    /// Where in transformers the rules come from.
    #[serde(default)]
    pub follows: String,
    /// What the table converts.
    #[serde(default)]
    pub description: String,
    /// Tables whose rules come first, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extends: Vec<String>,
    /// Further model types served by this table (user tables; the embedded ones use
    /// `aliases.json`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub model_types: Vec<String>,
    /// The rules, in transformers' load order.
    pub rules: Vec<Rule>,
}

impl ConversionTable {
    /// Parses a table from JSON text; `origin` names it in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        let table: ConversionTable =
            serde_json::from_str(text).map_err(|e| RemapError::InvalidTable {
                origin: origin.to_owned(),
                reason: e.to_string(),
            })?;
        for (i, r) in table.rules.iter().enumerate() {
            if r.rename.is_some() == r.convert.is_some() {
                return Err(RemapError::InvalidRule {
                    origin: origin.to_owned(),
                    rule: i,
                    reason: "a rule has exactly one of `rename` and `convert`".into(),
                });
            }
        }
        Ok(table)
    }
}

/// `aliases.json`: which table serves which `model_type`, and the tables every model gets.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Aliases {
    /// The transformers version followed.
    pub transformers_version: String,
    /// Where in transformers the list comes from.
    #[serde(default)]
    pub follows: String,
    /// Tables appended to every model's rules at load (transformers' `legacy`).
    #[serde(default)]
    pub always: Vec<String>,
    /// `model_type` -> table name.
    pub aliases: BTreeMap<String, String>,
}

/// The tables compiled into the binary: `(file name, text)` (`adapters-spec/conversions/`).
pub const EMBEDDED_TABLES: &[(&str, &str)] = peftkit_adapters_spec::conversions::TABLES;

/// The embedded `aliases.json`.
pub const EMBEDDED_ALIASES: &str = peftkit_adapters_spec::conversions::ALIASES_JSON;
