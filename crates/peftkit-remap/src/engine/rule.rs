//! A table's rules compiled: both sides' name patterns, the ops and their inverses, and where
//! each rule came from (for messages).

use crate::error::{RemapError, Result};
use crate::pattern::{rewrite, Hit, Side};
use crate::table::{Op, ReversePolicy, Rule};

use super::{Direction, Mapping};

#[derive(Debug, Clone)]
pub(super) enum Kind {
    Rename,
    Convert(Vec<Op>),
}

#[derive(Debug, Clone)]
pub(super) struct CompiledRule {
    pub(super) kind: Kind,
    pub(super) original: Side,
    pub(super) v5: Side,
    pub(super) scope: Option<Vec<String>>,
    pub(super) reverse: ReversePolicy,
    /// Table file and index, for messages.
    pub(super) origin: String,
    pub(super) index: usize,
    /// Part of the model's own table (not an `always` table such as `legacy`).
    pub(super) model_rule: bool,
}

impl CompiledRule {
    pub(super) fn sides(&self, dir: Direction) -> (&Side, &Side) {
        match dir {
            Direction::Forward => (&self.original, &self.v5),
            Direction::Reverse => (&self.v5, &self.original),
        }
    }

    pub(super) fn ops(&self, dir: Direction) -> Vec<Op> {
        match (&self.kind, dir) {
            (Kind::Rename, _) => Vec::new(),
            (Kind::Convert(ops), Direction::Forward) => ops.clone(),
            (Kind::Convert(ops), Direction::Reverse) => ops.iter().rev().map(Op::inverse).collect(),
        }
    }

    /// Renames `name` with this rule (the write form of the other side's first pattern), as
    /// transformers' `rename_source_key`: `None` when the rule does not match.
    pub(super) fn rename(&self, dir: Direction, name: &str) -> Option<(String, Hit)> {
        let (read, write) = self.sides(dir);
        let (prefix, rest) = match &self.scope {
            None => ("", name),
            Some(prefixes) => {
                let p = prefixes.iter().find(|p| name.starts_with(p.as_str()))?;
                (p.as_str(), &name[p.len()..])
            }
        };
        let hit = read.find(rest)?;
        let renamed = rewrite(rest, &hit, &write.templates[0]);
        Some((format!("{prefix}{renamed}"), hit))
    }

    pub(super) fn label(&self) -> String {
        format!("{} rule {}", self.origin, self.index)
    }
}

impl Mapping {
    /// Compiles rules (with their origin and index in their table); the first `model_rules`
    /// belong to the model's own table, the rest to `always` tables.
    pub(crate) fn compile(
        table: Option<String>,
        rules: Vec<(Rule, String, usize)>,
        model_rules: usize,
    ) -> Result<Self> {
        let mut compiled = Vec::new();
        for (pos, (rule, origin, index)) in rules.into_iter().enumerate() {
            let invalid = |reason: String| RemapError::InvalidRule {
                origin: origin.clone(),
                rule: index,
                reason,
            };
            let (kind, original, v5) = match (&rule.rename, &rule.convert) {
                (Some(r), None) => (Kind::Rename, r.original.to_vec(), r.v5.to_vec()),
                (None, Some(c)) => {
                    if c.ops.is_empty() {
                        return Err(invalid("a `convert` rule needs at least one op".into()));
                    }
                    (
                        Kind::Convert(c.ops.clone()),
                        c.original.to_vec(),
                        c.v5.to_vec(),
                    )
                }
                _ => {
                    return Err(invalid(
                        "a rule has exactly one of `rename` and `convert`".into(),
                    ))
                }
            };
            let original = Side::new(original).map_err(&invalid)?;
            let v5 = Side::new(v5).map_err(&invalid)?;
            let any_group = original.has_group() || v5.has_group();
            if any_group {
                if matches!(kind, Kind::Convert(_)) {
                    return Err(invalid(
                        "capture groups are not supported in `convert` patterns".into(),
                    ));
                }
                let all = original
                    .templates
                    .iter()
                    .chain(&v5.templates)
                    .all(|t| t.has_group());
                if !all {
                    return Err(invalid(
                        "when one pattern has a capture group, every pattern of the rule needs one (its text is carried across)".into(),
                    ));
                }
            }
            if let Some(scope) = &rule.scope {
                if scope.is_empty() {
                    return Err(invalid("`scope` lists no prefix".into()));
                }
            }
            compiled.push(CompiledRule {
                kind,
                original,
                v5,
                scope: rule.scope.clone(),
                reverse: rule.reverse,
                origin: origin.clone(),
                index,
                model_rule: pos < model_rules,
            });
        }
        Ok(Mapping {
            table,
            rules: compiled,
            config: None,
        })
    }
}
