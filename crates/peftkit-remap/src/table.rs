//! Conversion tables as data: the JSON schema of `adapters-spec/conversions/*.json`, the tables
//! embedded at build time, and the registry that resolves a `model_type` to its rules.
//!
//! The schema is documented in `adapters-spec/conversions/README.md`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::engine::Mapping;
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

/// Tables by name and the `model_type` aliases: resolves a model to its rules.
///
/// ```
/// use peftkit_remap::Registry;
/// let reg = Registry::builtin().unwrap();
/// assert_eq!(reg.table_for("qwen3_moe"), Some("qwen2_moe"));
/// assert_eq!(reg.table_for("llama"), None);
/// let mapping = reg.mapping("mixtral").unwrap();
/// assert_eq!(mapping.table(), Some("mixtral"));
/// ```
#[derive(Debug, Clone, Default)]
pub struct Registry {
    tables: BTreeMap<String, (ConversionTable, String)>,
    aliases: Aliases,
}

impl Registry {
    /// The tables of `adapters-spec/conversions/` embedded at build time.
    pub fn builtin() -> Result<Self> {
        let mut reg = Registry {
            tables: BTreeMap::new(),
            aliases: serde_json::from_str(EMBEDDED_ALIASES).map_err(|e| {
                RemapError::InvalidTable {
                    origin: "aliases.json (embedded)".into(),
                    reason: e.to_string(),
                }
            })?,
        };
        for (file, text) in EMBEDDED_TABLES {
            reg.insert_table(text, &format!("{file} (embedded)"))?;
        }
        // Tables are compiled when a mapping is asked for (a few ms each); the test suite
        // compiles every embedded one.
        Ok(reg)
    }

    fn insert_table(&mut self, text: &str, origin: &str) -> Result<String> {
        let table = ConversionTable::from_json(text, origin)?;
        for mt in &table.model_types {
            self.aliases.aliases.insert(mt.clone(), table.name.clone());
        }
        let name = table.name.clone();
        self.tables.insert(name.clone(), (table, origin.to_owned()));
        Ok(name)
    }

    /// Adds (or replaces) a table from JSON text. Its `model_types` become aliases of it.
    /// The table is compiled once here, so a bad pattern is reported now, naming `origin`.
    pub fn add_table_json(&mut self, text: &str, origin: &str) -> Result<()> {
        let name = self.insert_table(text, origin)?;
        self.mapping_for_table(&name).map(|_| ())
    }

    /// Adds (or replaces) a table from a JSON file.
    pub fn add_table_file(&mut self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| peftkit_checkpoint::CheckpointError::io(path, e))?;
        self.add_table_json(&text, &path.display().to_string())
    }

    /// Serves `model_type` with table `table`.
    pub fn add_alias(&mut self, model_type: &str, table: &str) {
        self.aliases
            .aliases
            .insert(model_type.to_owned(), table.to_owned());
    }

    /// A table by name.
    pub fn table(&self, name: &str) -> Option<&ConversionTable> {
        self.tables.get(name).map(|(t, _)| t)
    }

    /// Names of every table.
    pub fn table_names(&self) -> impl Iterator<Item = &str> {
        self.tables.keys().map(String::as_str)
    }

    /// The `model_type` -> table aliases.
    pub fn aliases(&self) -> &BTreeMap<String, String> {
        &self.aliases.aliases
    }

    /// The name of the table serving `model_type`, if any (an alias, or a table of that name
    /// that is not one of the `always` tables).
    pub fn table_for(&self, model_type: &str) -> Option<&str> {
        if let Some(t) = self.aliases.aliases.get(model_type) {
            return Some(t.as_str());
        }
        self.tables
            .get_key_value(model_type)
            .filter(|(k, _)| !self.aliases.always.contains(k))
            .map(|(k, _)| k.as_str())
    }

    fn unknown(&self, name: &str) -> RemapError {
        RemapError::UnknownTable {
            name: name.to_owned(),
            known: self.tables.keys().cloned().collect::<Vec<_>>().join(", "),
        }
    }

    /// The rules of a table with its `extends` expanded, each with its origin and index.
    fn expand(&self, name: &str, depth: usize, out: &mut Vec<(Rule, String, usize)>) -> Result<()> {
        let (table, origin) = self.tables.get(name).ok_or_else(|| self.unknown(name))?;
        if depth > 16 {
            return Err(RemapError::InvalidTable {
                origin: origin.clone(),
                reason: "`extends` nests more than 16 levels (a cycle?)".into(),
            });
        }
        for parent in &table.extends {
            self.expand(parent, depth + 1, out)?;
        }
        out.extend(
            table
                .rules
                .iter()
                .enumerate()
                .map(|(i, r)| (r.clone(), origin.clone(), i)),
        );
        Ok(())
    }

    /// The rules of table `name` (with its `extends`), then the `always` tables.
    pub fn mapping_for_table(&self, name: &str) -> Result<Mapping> {
        let mut rules = Vec::new();
        self.expand(name, 0, &mut rules)?;
        let model_rules = rules.len();
        for always in &self.aliases.always {
            if always != name {
                self.expand(always, 0, &mut rules)?;
            }
        }
        Mapping::compile(Some(name.to_owned()), rules, model_rules)
    }

    /// The rules transformers applies to a model of type `model_type`: its table (if any),
    /// then the `always` tables (`legacy`). A model type without a table still gets those.
    pub fn mapping(&self, model_type: &str) -> Result<Mapping> {
        match self.table_for(model_type) {
            Some(name) => self.mapping_for_table(name),
            None => self.mapping_without_table(),
        }
    }

    /// The rules of a model type without a table, or of a checkpoint whose model type is not
    /// known: the `always` tables (`legacy`) only.
    pub fn mapping_without_table(&self) -> Result<Mapping> {
        let mut rules = Vec::new();
        for always in &self.aliases.always {
            self.expand(always, 0, &mut rules)?;
        }
        Mapping::compile(None, rules, 0)
    }
}
