//! The registry of conversion tables: which table serves a `model_type`, user tables layered
//! over the embedded ones, and a table's rules (with its `extends` and the `always` tables)
//! compiled into a [`Mapping`].

use std::collections::BTreeMap;
use std::path::Path;

use crate::engine::Mapping;
use crate::error::{RemapError, Result};
use crate::table::{Aliases, ConversionTable, Rule, EMBEDDED_ALIASES, EMBEDDED_TABLES};

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
